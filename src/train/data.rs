//! Training data: a UTF-8 text file (a character vocabulary built from it, or the checkpoint's
//! tokenizer), an llm.c token file, or a nanoGPT headerless u16 `.bin`; a 90/10 train/val split;
//! and the batch loaders.

use std::path::Path;

use crate::error::{Error, Result};
use crate::graph::MicroBatch;
use crate::io::tokens;
use crate::io::vocab::Vocab;
use crate::rng::Rng;

/// Reads a whole regular file. Devices (`/dev/zero`), FIFOs and directories are refused, since
/// reading them may never end; the read stops at the size the file had when opened.
pub fn read_regular_file(path: &Path) -> Result<Vec<u8>> {
    use std::io::Read;
    let not_regular = || {
        Error::invalid(
            path.display().to_string(),
            "is not a regular file (a device, a pipe or a directory); give a data file",
        )
    };
    // Before opening: opening a FIFO blocks until something writes to it.
    if !std::fs::metadata(path)
        .map_err(|e| Error::io(path, e))?
        .is_file()
    {
        return Err(not_regular());
    }
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let meta = file.metadata().map_err(|e| Error::io(path, e))?;
    if !meta.is_file() {
        return Err(not_regular());
    }
    crate::memory::check(&path.display().to_string(), meta.len() as u128)?;
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(meta.len())
        .read_to_end(&mut bytes)
        .map_err(|e| Error::io(path, e))?;
    Ok(bytes)
}

/// What a data file holds.
pub enum Contents {
    /// Token ids of an llm.c token file or a nanoGPT `.bin`.
    Tokens(Vec<u32>),
    Text(String),
}

/// Reads a data file: token ids when it has llm.c's header or a `.bin` name, else UTF-8 text.
/// Errors name the file (missing, empty, neither text nor tokens).
pub fn read_contents(path: &Path) -> Result<Contents> {
    let name = path.display().to_string();
    let bytes = read_regular_file(path)?;
    if bytes.is_empty() {
        return Err(Error::invalid(&name, "the data file is empty"));
    }
    if tokens::is_llmc(&bytes) || path.extension().is_some_and(|e| e == "bin") {
        return Ok(Contents::Tokens(tokens::parse(path, &bytes)?));
    }
    let text = String::from_utf8(bytes).map_err(|e| {
        Error::invalid(
            &name,
            format!(
                "not UTF-8 text (byte {}); token files need llm.c's header or a .bin name",
                e.utf8_error().valid_up_to()
            ),
        )
    })?;
    Ok(Contents::Text(text))
}

/// Tokens split for training and validation, with their vocabulary.
#[derive(Clone, Debug)]
pub struct Dataset {
    pub train: Vec<u32>,
    pub val: Vec<u32>,
    pub vocab: Vocab,
    /// e.g. "tinyshakespeare.txt: 1115394 characters, 65-character vocabulary".
    pub description: String,
}

impl Dataset {
    /// Loads a file. `vocab` is the vocabulary of the model being continued (`--init`,
    /// `--resume`), if any: text is encoded with it instead of building a new one.
    pub fn load(path: &Path, vocab: Option<&Vocab>) -> Result<Dataset> {
        let name = path.display().to_string();
        match read_contents(path)? {
            Contents::Tokens(ids) => {
                let vocab = vocab.cloned().unwrap_or_else(|| {
                    let max = ids.iter().copied().max().unwrap_or(0) as usize;
                    // Token files carry no vocabulary; assume GPT-2's when ids fit it.
                    Vocab::Ids(if max < 50257 { 50257 } else { max + 1 })
                });
                let desc = format!("{name}: {} tokens", ids.len());
                Dataset::from_ids(&name, ids, vocab, desc)
            }
            Contents::Text(text) => Dataset::from_text(&name, &text, vocab),
        }
    }

    /// Encodes `text` (with `vocab`, or a character vocabulary built from it).
    pub fn from_text(name: &str, text: &str, vocab: Option<&Vocab>) -> Result<Dataset> {
        let vocab = match vocab {
            Some(v) => v.clone(),
            None => Vocab::chars_of(text),
        };
        let ids = vocab.encode(text, name)?;
        let desc = format!(
            "{name}: {} characters, {} tokens, {} vocabulary of {}",
            text.chars().count(),
            ids.len(),
            vocab.kind(),
            vocab.size()
        );
        Dataset::from_ids(name, ids, vocab, desc)
    }

    fn from_ids(name: &str, ids: Vec<u32>, vocab: Vocab, description: String) -> Result<Dataset> {
        if ids.len() < 2 {
            return Err(Error::invalid(name, "the data holds fewer than 2 tokens"));
        }
        if let Some((pos, &id)) = ids
            .iter()
            .enumerate()
            .find(|(_, id)| **id as usize >= vocab.size())
        {
            return Err(Error::invalid(
                name,
                format!(
                    "token id {id} at position {pos} is outside the vocabulary of {}",
                    vocab.size()
                ),
            ));
        }
        let split = ids.len() - ids.len() / 10;
        Ok(Dataset {
            val: ids[split..].to_vec(),
            train: ids[..split].to_vec(),
            vocab,
            description,
        })
    }

    /// Checks both splits can hold one sequence of `t` tokens plus its target.
    pub fn check_fits(&self, name: &str, t: usize) -> Result<()> {
        for (split, d) in [("train", &self.train), ("val", &self.val)] {
            if d.len() < t + 1 {
                return Err(Error::invalid(
                    name,
                    format!(
                        "the {split} split has {} tokens, fewer than block size {t} + 1",
                        d.len()
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// How batches are drawn.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum LoaderKind {
    /// B random offsets per batch from a seeded generator (nanoGPT).
    Random,
    /// Batch i reads B·T+1 consecutive tokens from offset (i·B·T) mod (N − B·T − 1).
    Sequential,
}

/// A loader's position, as `trainer_state.json` stores it.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoaderState {
    pub kind: LoaderKind,
    /// Batches drawn so far.
    pub position: u64,
    /// The generator's four state words, as decimal strings.
    pub rng: [String; 4],
}

impl LoaderState {
    /// The generator state; an error names the field when a word is not a u64 or all are zero
    /// (xoshiro's one state it never leaves).
    pub fn rng_state(&self) -> Result<[u64; 4]> {
        let bad = |m: String| Error::invalid("trainer_state.json: field loader.rng", m);
        let mut s = [0u64; 4];
        for (k, w) in self.rng.iter().enumerate() {
            s[k] = w.parse().map_err(|_| {
                bad(format!(
                    "word {k} ({w:?}) is not an unsigned 64-bit integer"
                ))
            })?;
        }
        if s == [0; 4] {
            return Err(bad("all four words are zero, not a generator state".into()));
        }
        Ok(s)
    }
}

/// Draws micro-batches; its state is saved in checkpoints so a resumed run sees the same data.
#[derive(Clone, Debug)]
pub struct Loader {
    pub kind: LoaderKind,
    pub b: usize,
    pub t: usize,
    rng: Rng,
    /// Batches drawn so far, by every rank together.
    pub position: u64,
    /// This loader's share of the batches: rank `rank` of `ranks`.
    rank: usize,
    ranks: usize,
}

impl Loader {
    pub fn new(kind: LoaderKind, b: usize, t: usize, seed: u64) -> Loader {
        Loader::sharded(kind, b, t, seed, 0, 1)
    }

    /// Rank `rank`'s share of the batches of `ranks` ranks. Sequential: the rank-th of every
    /// `ranks` consecutive batches, so that the ranks together read what one loader reads.
    /// Random: a stream of the rank's own, derived from the seed (rank 0's is the seed's).
    pub fn sharded(
        kind: LoaderKind,
        b: usize,
        t: usize,
        seed: u64,
        rank: usize,
        ranks: usize,
    ) -> Loader {
        Loader {
            kind,
            b,
            t,
            rng: Rng::new(rank_seed(seed, rank)),
            position: 0,
            rank,
            ranks: ranks.max(1),
        }
    }

    pub fn next(&mut self, data: &[u32]) -> MicroBatch {
        let (b, t) = (self.b, self.t);
        let mut mb = MicroBatch {
            tokens: Vec::with_capacity(b * t),
            targets: Vec::with_capacity(b * t),
        };
        match self.kind {
            LoaderKind::Random => {
                for _ in 0..b {
                    let i = self.rng.below((data.len() - t) as u64) as usize;
                    mb.tokens.extend_from_slice(&data[i..i + t]);
                    mb.targets.extend_from_slice(&data[i + 1..i + 1 + t]);
                }
            }
            LoaderKind::Sequential => {
                let span = b * t;
                let index = self.position + self.rank as u64;
                let start = if data.len() > span + 1 {
                    ((index as u128 * span as u128) % (data.len() - span - 1) as u128) as usize
                } else {
                    0
                };
                // With less than one batch of data, wrap around the (short) split.
                let at = |k: usize| data[(start + k) % data.len()];
                mb.tokens.extend((0..span).map(at));
                mb.targets.extend((0..span).map(|k| at(k + 1)));
            }
        }
        self.position += self.ranks as u64;
        mb
    }

    pub fn state(&self) -> LoaderState {
        LoaderState {
            kind: self.kind,
            position: self.position,
            // As strings: JSON readers often keep numbers in f64, which would round them.
            rng: self.rng.state().map(|s| s.to_string()),
        }
    }

    /// Continues from a position saved by a run with another number of ranks: sequential
    /// loaders read on from the same place; random ones start the rank's stream afresh, keyed
    /// by the seed and the position.
    pub fn restore_position(&mut self, position: u64, seed: u64) {
        self.position = position;
        if self.kind == LoaderKind::Random {
            self.rng = Rng::new(rank_seed(
                seed ^ position.wrapping_mul(0xA24B_AED4_963E_E407),
                self.rank,
            ));
        }
    }

    /// Continues from a saved state (checked by `LoaderState::check`).
    pub fn restore(&mut self, s: &LoaderState) -> Result<()> {
        // Batches drawn so far: a count no run reaches (the next batch would overflow it) is a
        // corrupted file.
        if s.position >= u64::MAX / 2 {
            return Err(Error::invalid(
                "trainer_state.json",
                format!(
                    "field 'loader.position': {} batches is past any run",
                    s.position
                ),
            ));
        }
        self.position = s.position;
        self.rng = Rng::from_state(s.rng_state()?);
        Ok(())
    }
}

/// The seed of rank `rank`'s random stream: the run's seed for rank 0 (a one-rank run draws
/// what it always drew), a mix of it and the rank for the others.
fn rank_seed(seed: u64, rank: usize) -> u64 {
    if rank == 0 {
        seed
    } else {
        seed ^ (rank as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// N sequential shards, taken in turn, read exactly the batches of one loader; random shards
    /// draw streams of their own (rank 0's is the one-rank stream), and positions count globally.
    #[test]
    fn shards_read_what_one_loader_reads() {
        let data: Vec<u32> = (0..1000).collect();
        let mut one = Loader::new(LoaderKind::Sequential, 3, 7, 5);
        let mut shards: Vec<Loader> = (0..3)
            .map(|r| Loader::sharded(LoaderKind::Sequential, 3, 7, 5, r, 3))
            .collect();
        for _ in 0..20 {
            for s in &mut shards {
                let (a, b) = (one.next(&data), s.next(&data));
                assert_eq!((a.tokens, a.targets), (b.tokens, b.targets));
            }
        }
        assert!(shards.iter().all(|s| s.position == one.position));

        let mut r0 = Loader::sharded(LoaderKind::Random, 3, 7, 5, 0, 2);
        let mut r1 = Loader::sharded(LoaderKind::Random, 3, 7, 5, 1, 2);
        let mut solo = Loader::new(LoaderKind::Random, 3, 7, 5);
        let (a, b, c) = (r0.next(&data), r1.next(&data), solo.next(&data));
        assert_eq!(a.tokens, c.tokens);
        assert_ne!(a.tokens, b.tokens);
        assert_eq!((r0.position, r1.position), (2, 2));
    }
}
