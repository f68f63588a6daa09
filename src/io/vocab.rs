//! Vocabularies: characters (built from a text file, nanoGPT's shakespeare_char style), GPT-2
//! byte-level BPE read from a checkpoint's tokenizer.json (through the `tokenizers` crate), or
//! bare token ids (token files without a tokenizer).

use std::path::Path;

use serde_json::{Value, json};

use crate::error::{Error, Result};

pub const CHAR_VOCAB_FILE: &str = "vocab.json";
pub const TOKENIZER_FILE: &str = "tokenizer.json";

pub enum Vocab {
    /// Token i is the i-th character of the sorted list.
    Chars(Vec<char>),
    /// Byte-level BPE.
    Bpe(Box<tokenizers::Tokenizer>),
    /// Ids 0..n with no text form.
    Ids(usize),
}

impl std::fmt::Debug for Vocab {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Vocab::Chars(c) => write!(f, "Chars({})", c.len()),
            Vocab::Bpe(t) => write!(f, "Bpe({})", t.get_vocab_size(true)),
            Vocab::Ids(n) => write!(f, "Ids({n})"),
        }
    }
}

impl Clone for Vocab {
    fn clone(&self) -> Self {
        match self {
            Vocab::Chars(c) => Vocab::Chars(c.clone()),
            Vocab::Bpe(t) => Vocab::Bpe(t.clone()),
            Vocab::Ids(n) => Vocab::Ids(*n),
        }
    }
}

impl Vocab {
    /// The sorted set of characters of `text`.
    pub fn chars_of(text: &str) -> Vocab {
        let mut chars: Vec<char> = text.chars().collect();
        chars.sort_unstable();
        chars.dedup();
        Vocab::Chars(chars)
    }

    pub fn size(&self) -> usize {
        match self {
            Vocab::Chars(c) => c.len(),
            Vocab::Bpe(t) => t.get_vocab_size(true),
            Vocab::Ids(n) => *n,
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Vocab::Chars(_) => "characters",
            Vocab::Bpe(_) => "byte-level BPE",
            Vocab::Ids(_) => "token ids",
        }
    }

    /// Encodes text; `source` names the text in errors (a file, "--prompt").
    pub fn encode(&self, text: &str, source: &str) -> Result<Vec<u32>> {
        match self {
            Vocab::Chars(chars) => text
                .chars()
                .enumerate()
                .map(|(i, ch)| {
                    chars.binary_search(&ch).map(|k| k as u32).map_err(|_| {
                        Error::invalid(
                            source,
                            format!(
                                "character {ch:?} at position {i} is not in the model's \
                                     {}-character vocabulary",
                                chars.len()
                            ),
                        )
                    })
                })
                .collect(),
            Vocab::Bpe(tok) => tok
                .encode(text, false)
                .map(|e| e.get_ids().to_vec())
                .map_err(|e| Error::invalid(source, format!("tokenizer failed: {e}"))),
            Vocab::Ids(_) => Err(Error::invalid(
                source,
                "this model has no tokenizer (it was trained on token ids); give a checkpoint \
                 with a tokenizer.json or vocab.json",
            )),
        }
    }

    /// Decodes ids to text (ids outside the vocabulary decode to U+FFFD).
    pub fn decode(&self, ids: &[u32]) -> String {
        match self {
            Vocab::Chars(chars) => ids
                .iter()
                .map(|&i| chars.get(i as usize).copied().unwrap_or('\u{FFFD}'))
                .collect(),
            Vocab::Bpe(tok) => tok.decode(ids, false).unwrap_or_default(),
            Vocab::Ids(_) => ids
                .iter()
                .map(|i| i.to_string())
                .collect::<Vec<_>>()
                .join(" "),
        }
    }

    /// Writes the vocabulary into a checkpoint directory.
    pub fn save(&self, dir: &Path) -> Result<()> {
        let (name, bytes) = self.to_file()?;
        let path = dir.join(name);
        std::fs::write(&path, bytes).map_err(|e| Error::io(&path, e))
    }

    /// The checkpoint file holding the vocabulary: its name and contents.
    pub fn to_file(&self) -> Result<(&'static str, Vec<u8>)> {
        let json = |v: Value| serde_json::to_vec(&v).expect("JSON of a vocabulary");
        Ok(match self {
            Vocab::Chars(chars) => {
                let s: String = chars.iter().collect();
                (CHAR_VOCAB_FILE, json(json!({"type": "chars", "chars": s})))
            }
            Vocab::Bpe(tok) => {
                let text = tok
                    .to_string(false)
                    .map_err(|e| Error::invalid(TOKENIZER_FILE, e.to_string()))?;
                (TOKENIZER_FILE, text.into_bytes())
            }
            Vocab::Ids(n) => (CHAR_VOCAB_FILE, json(json!({"type": "ids", "size": n}))),
        })
    }

    /// Reads a checkpoint directory's vocabulary: tokenizer.json if present, else vocab.json,
    /// else `None`.
    pub fn load(dir: &Path) -> Result<Option<Vocab>> {
        for name in [TOKENIZER_FILE, CHAR_VOCAB_FILE] {
            let path = dir.join(name);
            if path.exists() {
                let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
                return Self::from_file(&path, &bytes).map(Some);
            }
        }
        Ok(None)
    }

    /// Parses a vocabulary file: a tokenizer.json, or our vocab.json (told apart by the name
    /// at the end of `path`, which also names it in errors).
    pub fn from_file(path: &Path, bytes: &[u8]) -> Result<Vocab> {
        let bad = |m: &str| Error::invalid(path.display().to_string(), m.to_string());
        if path.file_name().is_some_and(|n| n == TOKENIZER_FILE) {
            // Text first, as Tokenizer::from_file reads it: tokenizers' deserializer can panic
            // on bytes that are not UTF-8 (tests/fuzz.rs).
            let text = std::str::from_utf8(bytes)
                .map_err(|e| bad(&format!("not a valid tokenizer: not UTF-8: {e}")))?;
            let tok = text
                .parse::<tokenizers::Tokenizer>()
                .map_err(|e| bad(&format!("not a valid tokenizer: {e}")))?;
            return Ok(Vocab::Bpe(Box::new(tok)));
        }
        let v: Value = serde_json::from_slice(bytes).map_err(|e| bad(&format!("not JSON: {e}")))?;
        match v.get("type").and_then(Value::as_str) {
            Some("chars") => {
                let s = v
                    .get("chars")
                    .and_then(Value::as_str)
                    .ok_or_else(|| bad("missing 'chars'"))?;
                let chars: Vec<char> = s.chars().collect();
                let mut seen = std::collections::HashSet::new();
                if let Some(c) = chars.iter().find(|c| !seen.insert(**c)) {
                    return Err(bad(&format!(
                        "the character {c:?} appears twice: ids would decode ambiguously"
                    )));
                }
                Ok(Vocab::Chars(chars))
            }
            Some("ids") => {
                let n = v
                    .get("size")
                    .and_then(Value::as_u64)
                    .ok_or_else(|| bad("missing 'size'"))?;
                Ok(Vocab::Ids(n as usize))
            }
            _ => Err(bad("unknown vocabulary type")),
        }
    }
}
