//! The embedded default dataset: three-digit additions, one per line, generated in code so
//! `shaderformer train` runs offline with nothing to download and shows learning within minutes.
//!
//! Each line is `aaa+bbb=ssss` with zero-padded operands and the four-digit sum written backwards
//! (least significant digit first), the order in which a left-to-right model can carry:
//! `123+469=2950` means 123 + 469 = 0592.

use crate::rng::Rng;

/// One problem as a line (without the newline).
pub fn line(a: u32, b: u32) -> String {
    let sum: String = format!("{:04}", a + b).chars().rev().collect();
    format!("{a:03}+{b:03}={sum}")
}

/// The prompt for `a + b`: everything up to and including `=`, after a newline so the model sees
/// the start of a line.
pub fn prompt(a: u32, b: u32) -> String {
    format!("\n{a:03}+{b:03}=")
}

/// Reads the model's four answer characters back as a number (None if they are not digits).
pub fn parse_answer(completion: &str) -> Option<u32> {
    let digits: String = completion.chars().take(4).collect();
    if digits.len() != 4 || !digits.chars().all(|c| c.is_ascii_digit()) {
        return None;
    }
    digits.chars().rev().collect::<String>().parse().ok()
}

/// Whether a problem is held out of the training text (a fixed 1 in 10 of all pairs), so the
/// final accuracy measures generalization, not recall.
pub fn held_out(a: u32, b: u32) -> bool {
    (a * 1000 + b)
        .wrapping_mul(2_654_435_761)
        .is_multiple_of(10)
}

/// `n` training lines drawn from the problems not held out.
pub fn text(n: usize, seed: u64) -> String {
    let mut rng = Rng::new(seed);
    let mut s = String::with_capacity(n * 13);
    let mut k = 0;
    while k < n {
        let (a, b) = (rng.below(1000) as u32, rng.below(1000) as u32);
        if held_out(a, b) {
            continue;
        }
        s.push_str(&line(a, b));
        s.push('\n');
        k += 1;
    }
    s
}

/// `n` held-out problems for evaluation.
pub fn test_problems(n: usize, seed: u64) -> Vec<(u32, u32)> {
    let mut rng = Rng::new(seed);
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let (a, b) = (rng.below(1000) as u32, rng.below(1000) as u32);
        if held_out(a, b) {
            out.push((a, b));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_and_answers_round_trip() {
        assert_eq!(line(123, 469), "123+469=2950");
        assert_eq!(line(5, 7), "005+007=2100");
        assert_eq!(parse_answer("2950\n"), Some(592));
        assert_eq!(parse_answer("29x0"), None);
        let t = text(100, 1);
        assert_eq!(t.lines().count(), 100);
        for p in test_problems(50, 2) {
            assert!(held_out(p.0, p.1));
            assert!(!t.contains(&line(p.0, p.1)));
        }
    }
}
