//! Checkpoint directories: a Hugging Face GPT-2 model (config.json + model.safetensors, loadable
//! by `transformers`), plus the optimizer moments, the trainer state and the vocabulary.
//!
//! Writes are atomic: everything goes to a sibling temporary directory that then replaces the
//! old one by rename, so a crash or Ctrl-C at any moment leaves a whole checkpoint on disk.

use std::fs;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::{Error, Result};
use crate::io::hf;
use crate::io::vocab::Vocab;
use crate::model::{GptConfig, ParamTable};

pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
pub const STATE_FILE: &str = "trainer_state.json";

/// AdamW's first and second moments, one tensor per parameter.
pub type Moments = (Vec<Vec<f32>>, Vec<Vec<f32>>);

/// Everything a checkpoint holds.
#[derive(Clone, Debug)]
pub struct Checkpoint {
    pub cfg: GptConfig,
    /// Parameters in our layout, in parameter-table order.
    pub params: Vec<Vec<f32>>,
    /// AdamW moments (m, v) in the same order, when the checkpoint was written by `train`.
    pub optimizer: Option<Moments>,
    /// Trainer state (step, loader position, settings), when written by `train`.
    pub state: Option<Value>,
    pub vocab: Option<Vocab>,
}

fn sibling(dir: &Path, suffix: &str) -> PathBuf {
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_else(|| "checkpoint".into());
    dir.with_file_name(format!(".{name}.{suffix}"))
}

fn sync_dir(path: &Path) {
    // Durability of the rename; not every platform can open a directory, which is fine.
    if let Ok(f) = fs::File::open(path) {
        let _ = f.sync_all();
    }
}

fn io<T>(path: &Path, r: std::io::Result<T>) -> Result<T> {
    r.map_err(|e| Error::io(path, e))
}

/// Writes `ckpt` to `dir` atomically.
pub fn save(dir: &Path, ckpt: &Checkpoint) -> Result<()> {
    let table = ParamTable::new(&ckpt.cfg);
    let tmp = sibling(dir, "tmp");
    if tmp.exists() {
        io(&tmp, fs::remove_dir_all(&tmp))?;
    }
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        io(parent, fs::create_dir_all(parent))?;
    }
    io(&tmp, fs::create_dir_all(&tmp))?;
    hf::write_config(&tmp, &ckpt.cfg)?;
    hf::save_weights(&tmp, &ckpt.cfg, &table, &ckpt.params)?;
    if let Some((m, v)) = &ckpt.optimizer {
        let mut tensors = Vec::new();
        for (i, spec) in table.specs.iter().enumerate() {
            for (prefix, data) in [("m", &m[i]), ("v", &v[i])] {
                tensors.push((
                    format!("{prefix}.{}", spec.name),
                    spec.shape.clone(),
                    bytemuck::cast_slice(data).to_vec(),
                ));
            }
        }
        hf::write_safetensors(&tmp.join(OPTIMIZER_FILE), &tensors)?;
    }
    if let Some(state) = &ckpt.state {
        let path = tmp.join(STATE_FILE);
        let text = serde_json::to_string_pretty(state).expect("JSON of a state");
        io(&path, fs::write(&path, text))?;
    }
    if let Some(vocab) = &ckpt.vocab {
        vocab.save(&tmp)?;
    }
    for entry in io(&tmp, fs::read_dir(&tmp))? {
        let path = io(&tmp, entry)?.path();
        io(&path, fs::File::open(&path).and_then(|f| f.sync_all()))?;
    }
    sync_dir(&tmp);
    let old = sibling(dir, "old");
    if dir.exists() {
        if old.exists() {
            io(&old, fs::remove_dir_all(&old))?;
        }
        io(dir, fs::rename(dir, &old))?;
    }
    io(dir, fs::rename(&tmp, dir))?;
    if let Some(parent) = dir.parent() {
        sync_dir(parent);
    }
    if old.exists() {
        io(&old, fs::remove_dir_all(&old))?;
    }
    Ok(())
}

/// Where a checkpoint can be read from: `dir`, or the previous copy left by a write that was
/// interrupted between its two renames.
fn resolve(dir: &Path) -> PathBuf {
    let old = sibling(dir, "old");
    if !dir.exists() && old.join(hf::CONFIG_FILE).exists() {
        eprintln!(
            "note: {} is missing; using the previous checkpoint {} (an earlier write was interrupted)",
            dir.display(),
            old.display()
        );
        return old;
    }
    dir.to_path_buf()
}

/// The error for resuming from a directory without `trainer_state.json`.
pub fn not_a_training_checkpoint(dir: &Path) -> Error {
    Error::invalid(
        dir.display().to_string(),
        "has no trainer_state.json: not a training checkpoint (use --init to start from it)",
    )
}

/// Reads `trainer_state.json` only (what `--resume` needs before loading anything else).
pub fn read_state(dir: &Path) -> Result<Value> {
    let dir = resolve(dir);
    if !dir.is_dir() {
        return Err(Error::invalid(
            dir.display().to_string(),
            "checkpoint directory does not exist",
        ));
    }
    let path = dir.join(STATE_FILE);
    if !path.exists() {
        return Err(not_a_training_checkpoint(&dir));
    }
    let text = io(&path, fs::read_to_string(&path))?;
    serde_json::from_str(&text)
        .map_err(|e| Error::invalid(path.display().to_string(), format!("not JSON: {e}")))
}

/// Reads the model config only.
pub fn read_config(dir: &Path) -> Result<GptConfig> {
    hf::read_config(&resolve(dir))
}

/// Loads a checkpoint directory: ours, or any Hugging Face GPT-2 directory (then without
/// optimizer and trainer state).
pub fn load(dir: &Path) -> Result<Checkpoint> {
    let dir = resolve(dir);
    let cfg = hf::read_config(&dir)?;
    hf::check_weights_fit(&dir, &cfg)?;
    let table = ParamTable::new(&cfg);
    let params = hf::load_weights(&dir, &cfg, &table)?;
    let opt_path = dir.join(OPTIMIZER_FILE);
    let optimizer = if opt_path.exists() {
        let mut st = hf::read_safetensors(&opt_path)?;
        let mut take = |prefix: &str, i: usize| -> Result<Vec<f32>> {
            let spec = &table.specs[i];
            let name = format!("{prefix}.{}", spec.name);
            match st.remove(&name) {
                Some((shape, data)) if shape == spec.shape => Ok(data),
                Some((shape, _)) => Err(Error::invalid(
                    opt_path.display().to_string(),
                    format!(
                        "tensor {name} has shape {shape:?}, expected {:?}",
                        spec.shape
                    ),
                )),
                None => Err(Error::invalid(
                    opt_path.display().to_string(),
                    format!("tensor {name} is missing"),
                )),
            }
        };
        let mut m = Vec::new();
        let mut v = Vec::new();
        for i in 0..table.specs.len() {
            m.push(take("m", i)?);
            v.push(take("v", i)?);
        }
        Some((m, v))
    } else {
        None
    };
    let state_path = dir.join(STATE_FILE);
    let state = if state_path.exists() {
        let text = io(&state_path, fs::read_to_string(&state_path))?;
        Some(serde_json::from_str(&text).map_err(|e| {
            Error::invalid(state_path.display().to_string(), format!("not JSON: {e}"))
        })?)
    } else {
        None
    };
    let vocab = Vocab::load(&dir)?;
    if let Some(v) = &vocab
        && v.size() > cfg.vocab_size
    {
        return Err(Error::invalid(
            dir.display().to_string(),
            format!(
                "the {} vocabulary has {} tokens but the model's vocab_size is {}",
                v.kind(),
                v.size(),
                cfg.vocab_size
            ),
        ));
    }
    Ok(Checkpoint {
        cfg,
        params,
        optimizer,
        state,
        vocab,
    })
}
