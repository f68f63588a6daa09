//! How much memory the machine can give: the bound a configuration or a kernel shape is checked
//! against before anything is allocated, so an absurd size is an error rather than a machine
//! brought to a halt.

use crate::error::{Error, Result};

/// Bytes of memory available to a new allocation: Linux's `MemAvailable`, else `None` (unknown,
/// and then nothing is refused).
pub fn available_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Refuses `bytes` (what `what` needs) when it is over the available memory. The GPU's own
/// memory cannot be queried through wgpu; host memory bounds both a software adapter's buffers
/// and the host copies that checkpoints and CPU references make.
pub fn check(what: &str, bytes: u128) -> Result<()> {
    let Some(avail) = available_bytes() else {
        return Ok(());
    };
    if bytes > avail as u128 {
        return Err(Error::invalid(
            what,
            format!(
                "needs {} of memory, more than the {} available (MemAvailable)",
                human(bytes),
                human(avail as u128)
            ),
        ));
    }
    Ok(())
}

/// `1.5 GiB`, `12.0 MiB`, `300 B`.
pub fn human(bytes: u128) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut x = bytes as f64 / 1024.0;
    let mut u = 0;
    while x >= 1024.0 && u + 1 < UNITS.len() {
        x /= 1024.0;
        u += 1;
    }
    format!("{x:.1} {}", UNITS[u])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_impossible_size_is_refused_with_both_numbers() {
        if available_bytes().is_none() {
            return;
        }
        let e = check("the model", 1u128 << 70).unwrap_err().to_string();
        assert!(e.contains("1.0 ZiB") || e.contains("1024.0 EiB"), "{e}");
        assert!(e.contains("available"), "{e}");
        check("a byte", 1).unwrap();
    }
}
