//! Checkpoint directories: a Hugging Face GPT-2 model (config.json + model.safetensors, loadable
//! by `transformers`), plus the optimizer moments, the trainer state and the vocabulary.
//!
//! Writes are atomic per file: every file is written and synced in a hidden staging directory
//! inside the checkpoint directory, then renamed over its old copy. Only checkpoint files are ever
//! written there; other files in the directory are never touched.

use std::fs;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::io::hf;
use crate::io::vocab::Vocab;
use crate::model::{GptConfig, ParamTable};
use crate::train::state::TrainerState;

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
    pub state: Option<TrainerState>,
    pub vocab: Option<Vocab>,
}

/// Every file a checkpoint consists of. `train` writes and replaces only these in its output
/// directory (plus its hidden lock and staging entries); nothing else there is touched.
pub const FILES: [&str; 6] = [
    hf::WEIGHTS_FILE,
    hf::CONFIG_FILE,
    crate::io::vocab::TOKENIZER_FILE,
    crate::io::vocab::CHAR_VOCAB_FILE,
    OPTIMIZER_FILE,
    STATE_FILE,
];
/// Locked (an OS file lock) by the training run writing into a directory; holds its pid.
pub const LOCK_FILE: &str = ".shaderformer.lock";
/// Where a checkpoint's files are written before each is renamed into place.
const STAGING_DIR: &str = ".shaderformer.staging";
/// Written and removed at start-up to prove the directory is writable.
const PROBE_FILE: &str = ".shaderformer.probe";

fn sync_dir(path: &Path) {
    // Durability of the rename; not every platform can open a directory, which is fine.
    if let Ok(f) = fs::File::open(path) {
        let _ = f.sync_all();
    }
}

fn io<T>(path: &Path, r: std::io::Result<T>) -> Result<T> {
    r.map_err(|e| Error::io(path, e))
}

/// Writes `ckpt` into `dir`, each file atomically: all of them are written and synced in a
/// hidden staging directory inside `dir`, then renamed one by one over their old copies
/// (trainer_state.json last). Files of `dir` that are not checkpoint files are never touched; on
/// failure (a full disk) the staging directory is removed and the previous files stay.
pub fn save(dir: &Path, ckpt: &Checkpoint) -> Result<()> {
    io(dir, fs::create_dir_all(dir))?;
    let staging = dir.join(STAGING_DIR);
    let result = stage(&staging, ckpt).and_then(|names| publish(dir, &staging, &names));
    if staging.exists() {
        let _ = fs::remove_dir_all(&staging);
    }
    result
}

/// Writes every file of `ckpt` into `staging` and syncs it; returns their names, in the order
/// they must be published.
fn stage(staging: &Path, ckpt: &Checkpoint) -> Result<Vec<String>> {
    if staging.exists() {
        io(staging, fs::remove_dir_all(staging))?;
    }
    io(staging, fs::create_dir(staging))?;
    let table = ParamTable::new(&ckpt.cfg);
    hf::write_config(staging, &ckpt.cfg)?;
    hf::save_weights(staging, &ckpt.cfg, &table, &ckpt.params)?;
    if let Some(moments) = &ckpt.optimizer {
        let bytes = moments_bytes(&table.store_specs(), moments)?;
        let path = staging.join(OPTIMIZER_FILE);
        io(&path, fs::write(&path, bytes))?;
    }
    if let Some(vocab) = &ckpt.vocab {
        vocab.save(staging)?;
    }
    if let Some(state) = &ckpt.state {
        let path = staging.join(STATE_FILE);
        io(&path, fs::write(&path, state.to_json()))?;
    }
    let mut names = Vec::new();
    for entry in io(staging, fs::read_dir(staging))? {
        let path = io(staging, entry)?.path();
        io(&path, fs::File::open(&path).and_then(|f| f.sync_all()))?;
        names.push(path.file_name().unwrap().to_string_lossy().to_string());
    }
    // The trainer state last: a checkpoint is a training checkpoint once its state is in place.
    names.sort_by_key(|n| n == STATE_FILE);
    sync_dir(staging);
    Ok(names)
}

fn publish(dir: &Path, staging: &Path, names: &[String]) -> Result<()> {
    for name in names {
        let to = dir.join(name);
        io(&to, fs::rename(staging.join(name), &to))?;
    }
    sync_dir(dir);
    Ok(())
}

/// The lock file of an output directory, locked by the OS while it is open.
#[derive(Debug)]
struct Lock {
    path: PathBuf,
    _file: fs::File,
}

/// The output directory of a training run, locked for it until dropped.
#[derive(Debug)]
pub struct OutDir {
    lock: Lock,
    /// Created by this run: removed again if the run ends without writing into it.
    created: Option<PathBuf>,
    /// Whether `loss.svg` there is the checkpoint's to write (absent, or written by a run).
    pub plot_ours: bool,
}

impl Drop for OutDir {
    fn drop(&mut self) {
        // Removed while still locked; the lock itself goes with the file handle, after.
        let _ = fs::remove_file(&self.lock.path);
        if let Some(dir) = &self.created {
            // Fails, harmlessly, unless the directory is empty.
            let _ = fs::remove_dir(dir);
        }
    }
}

/// What `open_out` may find in the directory besides checkpoint files.
#[derive(Clone, Copy, Debug, Default)]
pub struct OutPolicy<'a> {
    /// Other files are fine (they are still never touched): `--overwrite`, or the directory is
    /// the checkpoint being continued (`--init X --out X`).
    pub other_files: bool,
    /// A file of this run that may live there (`--metrics DIR/metrics.jsonl`).
    pub own_file: Option<&'a Path>,
    /// Further names a checkpoint of this run writes (a Llama-family run's copied files).
    pub also_ours: &'a [&'a str],
}

/// Prepares `dir` for a training run before anything is trained: refuses a path that is a file
/// (or a symbolic link to one), a directory holding files that are not a checkpoint's (unless
/// `policy` allows them), a directory another run holds (naming its pid), and a directory that
/// cannot be written (a probe file is written and removed). Symbolic links to directories are
/// followed: the checkpoint is written into the directory they point to.
pub fn open_out(dir: &Path, policy: OutPolicy) -> Result<OutDir> {
    let name = dir.display().to_string();
    if let Ok(meta) = fs::symlink_metadata(dir)
        && meta.file_type().is_symlink()
        && !dir.is_dir()
    {
        return Err(Error::invalid(
            &name,
            "is a symbolic link that does not lead to a directory; --out needs a directory",
        ));
    }
    if dir.exists() && !dir.is_dir() {
        return Err(Error::invalid(
            &name,
            "is a file, not a directory; --out names the checkpoint directory",
        ));
    }
    let created = (!dir.exists()).then(|| dir.to_path_buf());
    io(dir, fs::create_dir_all(dir))?;
    let lock = take_lock(dir)?;
    // From here the lock is ours: dropping the guard on an error below releases it.
    let plot_ours = super::metrics::plot_is_ours(dir);
    let out = OutDir {
        lock,
        created,
        plot_ours,
    };
    let own = policy.own_file.filter(|f| {
        let parent = f.parent().filter(|p| !p.as_os_str().is_empty());
        let parent = fs::canonicalize(parent.unwrap_or(Path::new(".")));
        parent.is_ok() && parent.ok() == fs::canonicalize(dir).ok()
    });
    let own = own.and_then(Path::file_name);
    let mut others = Vec::new();
    for entry in io(dir, fs::read_dir(dir))? {
        let n = io(dir, entry)?.file_name();
        let ours = own == Some(n.as_os_str()) || {
            let n = n.to_string_lossy();
            FILES.contains(&n.as_ref())
                || policy.also_ours.contains(&n.as_ref())
                || (plot_ours && n == super::metrics::PLOT_FILE)
                || [LOCK_FILE, STAGING_DIR, PROBE_FILE].contains(&n.as_ref())
        };
        if !ours {
            others.push(n.to_string_lossy().to_string());
        }
    }
    if !others.is_empty() && !policy.other_files {
        others.sort();
        let shown: Vec<&str> = others.iter().take(3).map(String::as_str).collect();
        return Err(Error::invalid(
            &name,
            format!(
                "holds files that are not a checkpoint's ({}{}); choose another --out, or give \
                 --overwrite to write the checkpoint files beside them (they are never touched)",
                shown.join(", "),
                if others.len() > 3 { ", ..." } else { "" }
            ),
        ));
    }
    let probe = dir.join(PROBE_FILE);
    io(&probe, fs::write(&probe, b"probe"))?;
    io(&probe, fs::remove_file(&probe))?;
    Ok(out)
}

/// Takes the OS file lock on `DIR/.shaderformer.lock` and writes our pid into it; refuses, naming
/// the holder's pid, when another process holds the lock. The OS releases the lock when the
/// process ends however it ends, so a lock file left by a killed run does not block. Where the
/// platform has no file locks, the directory is taken without one.
fn take_lock(dir: &Path) -> Result<Lock> {
    let path = dir.join(LOCK_FILE);
    // A run that ends removes the file while still holding its lock; a run that opened the old
    // file just before then may lock it once it is gone: lock again, on the file now there.
    for _ in 0..3 {
        let mut file = io(
            &path,
            fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path),
        )?;
        match file.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                let holder = fs::read_to_string(&path).unwrap_or_default();
                let holder = match holder.trim().parse::<u32>() {
                    Ok(pid) => format!(" (pid {pid})"),
                    Err(_) => String::new(),
                };
                return Err(Error::invalid(
                    dir.display().to_string(),
                    format!("is in use by another training run{holder}"),
                ));
            }
            Err(fs::TryLockError::Error(e)) if e.kind() == std::io::ErrorKind::Unsupported => {}
            Err(fs::TryLockError::Error(e)) => return Err(Error::io(&path, e)),
        }
        if !same_file(&file, &path) {
            continue;
        }
        use std::io::Write;
        io(&path, file.set_len(0))?;
        io(&path, write!(file, "{}", std::process::id()))?;
        return Ok(Lock { path, _file: file });
    }
    Err(Error::invalid(
        path.display().to_string(),
        "another run keeps taking this lock",
    ))
}

/// Whether `path` still names the open `file` (it may have been removed and created anew).
fn same_file(file: &fs::File, path: &Path) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        match (file.metadata(), fs::metadata(path)) {
            (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
            _ => false,
        }
    }
    #[cfg(not(unix))]
    {
        let _ = file;
        path.exists()
    }
}

/// The error for resuming from a directory without `trainer_state.json`.
pub fn not_a_training_checkpoint(dir: &Path) -> Error {
    Error::invalid(
        dir.display().to_string(),
        "has no trainer_state.json: not a training checkpoint (use --init to start from it)",
    )
}

/// Reads `trainer_state.json` only (what `--resume` needs before loading anything else).
pub fn read_state(dir: &Path) -> Result<TrainerState> {
    if !dir.is_dir() {
        return Err(Error::invalid(
            dir.display().to_string(),
            "checkpoint directory does not exist",
        ));
    }
    let path = dir.join(STATE_FILE);
    if !path.exists() {
        return Err(not_a_training_checkpoint(dir));
    }
    let text = crate::io::files::read(&path, crate::io::files::Kind::Json)?;
    TrainerState::parse(&path, &text)
}

/// Reads the model config only.
pub fn read_config(dir: &Path) -> Result<GptConfig> {
    hf::read_config(dir)
}

/// Loads a checkpoint directory: ours, or any Hugging Face GPT-2 directory (then without
/// optimizer and trainer state).
pub fn load(dir: &Path) -> Result<Checkpoint> {
    let cfg = hf::read_config(dir)?;
    hf::check_weights_fit(dir, &cfg)?;
    let table = ParamTable::new(&cfg);
    let params = hf::load_weights(dir, &cfg, &table)?;
    let opt_path = dir.join(OPTIMIZER_FILE);
    let optimizer = if opt_path.exists() {
        Some(read_moments(&opt_path, &table.store_specs())?)
    } else {
        None
    };
    let state = if dir.join(STATE_FILE).exists() {
        Some(read_state(dir)?)
    } else {
        None
    };
    let vocab = Vocab::load(dir)?;
    check_vocab(&dir.display().to_string(), vocab.as_ref(), &cfg)?;
    Ok(Checkpoint {
        cfg,
        params,
        optimizer,
        state,
        vocab,
    })
}

/// optimizer.safetensors of the parameters `specs` (name, shape): "m.NAME" and "v.NAME" each.
pub fn moments_bytes(specs: &[(String, Vec<usize>)], (m, v): &Moments) -> Result<Vec<u8>> {
    let mut tensors = Vec::new();
    for (i, (name, shape)) in specs.iter().enumerate() {
        for (prefix, data) in [("m", &m[i]), ("v", &v[i])] {
            tensors.push((
                format!("{prefix}.{name}"),
                shape.clone(),
                bytemuck::cast_slice(data).to_vec(),
            ));
        }
    }
    hf::safetensors_bytes(Path::new(OPTIMIZER_FILE), &tensors)
}

/// Reads the AdamW moments of the parameters `specs` (name, shape) from `path`, refusing a
/// missing tensor, a wrong shape and an impossible value.
pub fn read_moments(path: &Path, specs: &[(String, Vec<usize>)]) -> Result<Moments> {
    let mut st = hf::read_safetensors(path)?;
    let mut take = |prefix: &str, (name, want): &(String, Vec<usize>)| -> Result<Vec<f32>> {
        let name = format!("{prefix}.{name}");
        match st.remove(&name) {
            Some((shape, data)) if shape == *want => {
                // v is a mean of squares: negative is as impossible as NaN.
                let bad = data
                    .iter()
                    .enumerate()
                    .find(|(_, x)| !x.is_finite() || (prefix == "v" && **x < 0.0));
                match bad {
                    Some((k, x)) => Err(Error::invalid(
                        path.display().to_string(),
                        format!("tensor {name} holds an impossible value ({x}) at element {k}"),
                    )),
                    None => Ok(data),
                }
            }
            Some((shape, _)) => Err(Error::invalid(
                path.display().to_string(),
                format!("tensor {name} has shape {shape:?}, expected {want:?}"),
            )),
            None => Err(Error::invalid(
                path.display().to_string(),
                format!("tensor {name} is missing"),
            )),
        }
    };
    let mut m = Vec::new();
    let mut v = Vec::new();
    for spec in specs {
        m.push(take("m", spec)?);
        v.push(take("v", spec)?);
    }
    Ok((m, v))
}

/// Our own vocabularies (characters, ids) have exactly the model's rows: fewer would leave
/// tokens that decode to nothing. A BPE tokenizer may be smaller (models pad vocab_size), never
/// larger.
fn check_vocab(what: &str, vocab: Option<&Vocab>, cfg: &GptConfig) -> Result<()> {
    if let Some(v) = vocab {
        let ours = matches!(v, Vocab::Chars(_) | Vocab::Ids(_));
        if v.size() > cfg.vocab_size || (ours && v.size() != cfg.vocab_size) {
            return Err(Error::invalid(
                what,
                format!(
                    "the {} vocabulary has {} tokens but the model's vocab_size is {}",
                    v.kind(),
                    v.size(),
                    cfg.vocab_size
                ),
            ));
        }
    }
    Ok(())
}

/// A model from the contents of its files, by name (where there is no directory: a browser's
/// file picker): config.json and model.safetensors, and tokenizer.json or vocab.json when
/// present. Optimizer and trainer state are not read.
pub fn from_files(files: &std::collections::HashMap<String, Vec<u8>>) -> Result<Checkpoint> {
    let need = |name: &str| {
        files.get(name).ok_or_else(|| {
            Error::invalid(
                name,
                "is missing: a checkpoint is config.json and model.safetensors (with \
                 tokenizer.json or vocab.json for text)",
            )
        })
    };
    let config_text = std::str::from_utf8(need(hf::CONFIG_FILE)?)
        .map_err(|_| Error::invalid(hf::CONFIG_FILE, "is not UTF-8 text"))?;
    let cfg = hf::parse_config(Path::new(hf::CONFIG_FILE), config_text)?;
    let weights = need(hf::WEIGHTS_FILE)?;
    let table = ParamTable::new(&cfg);
    let params = hf::weights_from_bytes(Path::new(hf::WEIGHTS_FILE), weights, &cfg, &table)?;
    let mut vocab = None;
    for name in [
        crate::io::vocab::TOKENIZER_FILE,
        crate::io::vocab::CHAR_VOCAB_FILE,
    ] {
        if let Some(bytes) = files.get(name) {
            vocab = Some(Vocab::from_file(Path::new(name), bytes)?);
            break;
        }
    }
    check_vocab("the checkpoint", vocab.as_ref(), &cfg)?;
    Ok(Checkpoint {
        cfg,
        params,
        optimizer: None,
        state: None,
        vocab,
    })
}

/// A model's files as `from_files` reads them and a browser downloads them: config.json,
/// model.safetensors and the vocabulary (no optimizer, no trainer state).
pub fn to_files(
    cfg: &GptConfig,
    params: &[Vec<f32>],
    vocab: &Vocab,
) -> Result<Vec<(String, Vec<u8>)>> {
    let table = ParamTable::new(cfg);
    let config = serde_json::to_vec_pretty(&hf::config_json(cfg)).expect("JSON of a config");
    let (vocab_name, vocab_bytes) = vocab.to_file()?;
    Ok(vec![
        (hf::CONFIG_FILE.to_string(), config),
        (
            hf::WEIGHTS_FILE.to_string(),
            hf::weights_bytes(cfg, &table, params)?,
        ),
        (vocab_name.to_string(), vocab_bytes),
    ])
}
