//! Token files: llm.c's format (a 1024-byte header of 256 little-endian i32: magic 20240520,
//! version 1, token count; then u16 tokens) and nanoGPT's headerless u16 `.bin`.

use std::path::Path;

use crate::error::{Error, Result};

pub const LLMC_MAGIC: i32 = 20240520;
pub const LLMC_VERSION: i32 = 1;
const HEADER_BYTES: usize = 1024;

/// True when `bytes` begin with llm.c's token-file magic.
pub fn is_llmc(bytes: &[u8]) -> bool {
    bytes.len() >= 4 && i32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) == LLMC_MAGIC
}

/// The magic number of a file laid out as an llm.c token file (a known version, and a token
/// count that matches the size exactly) whose magic is wrong.
fn llmc_layout_without_magic(bytes: &[u8]) -> Option<i32> {
    if bytes.len() < HEADER_BYTES || is_llmc(bytes) {
        return None;
    }
    let h = |i: usize| i32::from_le_bytes(bytes[4 * i..4 * i + 4].try_into().unwrap());
    let count = h(2);
    (h(1) == LLMC_VERSION && count >= 0 && bytes.len() - HEADER_BYTES == count as usize * 2)
        .then(|| h(0))
}

/// Parses a token file already read into memory: llm.c's format when the magic is present,
/// headerless u16 otherwise.
pub fn parse(path: &Path, bytes: &[u8]) -> Result<Vec<u32>> {
    let bad = |msg: String| Error::invalid(path.display().to_string(), msg);
    let body = if is_llmc(bytes) {
        if bytes.len() < HEADER_BYTES {
            return Err(bad("truncated llm.c header".into()));
        }
        let h = |i: usize| i32::from_le_bytes(bytes[4 * i..4 * i + 4].try_into().unwrap());
        if h(1) != LLMC_VERSION {
            return Err(bad(format!(
                "llm.c token file version {} is not supported (expected {LLMC_VERSION})",
                h(1)
            )));
        }
        let count = h(2);
        let body = &bytes[HEADER_BYTES..];
        if count < 0 || body.len() != count as usize * 2 {
            return Err(bad(format!(
                "header says {count} tokens but the file holds {} bytes of tokens",
                body.len()
            )));
        }
        body
    } else {
        if let Some(magic) = llmc_layout_without_magic(bytes) {
            return Err(bad(format!(
                "has llm.c's token-file layout (version and token count match the size) but the \
                 magic number {magic}, not {LLMC_MAGIC}: a damaged header, not headerless tokens"
            )));
        }
        if !bytes.len().is_multiple_of(2) {
            return Err(bad(format!(
                "{} bytes is not a whole number of u16 tokens",
                bytes.len()
            )));
        }
        bytes
    };
    Ok(body
        .chunks_exact(2)
        .map(|b| u16::from_le_bytes([b[0], b[1]]) as u32)
        .collect())
}

/// Writes tokens in llm.c's format.
pub fn write_llmc(path: &Path, tokens: &[u16]) -> Result<()> {
    let mut bytes = vec![0u8; HEADER_BYTES];
    bytes[0..4].copy_from_slice(&LLMC_MAGIC.to_le_bytes());
    bytes[4..8].copy_from_slice(&LLMC_VERSION.to_le_bytes());
    bytes[8..12].copy_from_slice(&(tokens.len() as i32).to_le_bytes());
    for t in tokens {
        bytes.extend_from_slice(&t.to_le_bytes());
    }
    std::fs::write(path, bytes).map_err(|e| Error::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_damaged_llmc_magic_is_not_read_as_raw_tokens() {
        let dir = std::env::temp_dir().join(format!("shaderformer-tokens-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("train.bin");
        write_llmc(&path, &[1, 2, 3, 4]).unwrap();
        let mut bytes = std::fs::read(&path).unwrap();
        assert_eq!(parse(&path, &bytes).unwrap(), vec![1, 2, 3, 4]);
        bytes[0] ^= 0xFF;
        let e = parse(&path, &bytes).unwrap_err().to_string();
        assert!(e.contains("magic") && e.contains("train.bin"), "{e}");
        // A headerless file is still read as u16 tokens.
        assert_eq!(parse(&path, &[7, 0, 9, 0]).unwrap(), vec![7, 9]);
        let _ = std::fs::remove_dir_all(dir);
    }
}
