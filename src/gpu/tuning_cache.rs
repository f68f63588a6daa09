//! The store of measured kernel choices: which variant of a kernel family won on this adapter for
//! each problem, kept in memory and in a cache file per adapter.
//!
//! Kernel families declare their candidates and run the measurements (`kernels::measure`); this
//! module only decides whether a problem needs measuring (`TuneMode`), remembers the outcome and
//! persists it. The cache file lives in the user's cache directory, one file per adapter,
//! identified by the adapter's name, vendor and device id, driver, backend, this crate's version
//! and a hash of the shader sources: a change to any of them makes the old choices stale. The
//! file is written atomically (a temporary file renamed over it); a corrupt, stale or unreadable
//! file costs one warning and is re-tuned; an unwritable directory costs one warning and the run
//! goes on with its choices in memory.
//!
//! Where measuring cannot block (a browser's GPU answers only from its event loop), a problem
//! that needs measuring is deferred instead: the fixed rule serves at once, and the problem waits
//! here, its candidates built, until `kernels::measure::tune_pending` measures it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use super::{Dispatch, Signal, View};
use crate::error::{Error, Result};

/// Environment variable holding the tuning mode (`on`, `cached`, `off`).
pub const ENV_TUNE: &str = "SHADERFORMER_TUNE";
/// Environment variable naming the directory of the tuning cache (default: the user's cache
/// directory, `$XDG_CACHE_HOME/shaderformer` or `~/.cache/shaderformer`).
pub const ENV_CACHE_DIR: &str = "SHADERFORMER_CACHE_DIR";

/// Version of the cache file's layout.
const FORMAT: u32 = 1;

/// When kernel variants are chosen by measurement.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TuneMode {
    /// Use the cache, then the winners shipped for this kind of adapter (`gpu::prior`), and
    /// measure every problem both lack (the default).
    #[default]
    On,
    /// Use the cache, and measure every problem it lacks, whatever the shipped winners say.
    Measure,
    /// Use the cache and the shipped winners; the fixed rule for problems they lack.
    Cached,
    /// The fixed rule everywhere; the cache is neither read nor written.
    Off,
}

impl TuneMode {
    pub const NAMES: &'static str = "on, measure, cached or off";

    pub fn name(self) -> &'static str {
        match self {
            TuneMode::On => "on",
            TuneMode::Measure => "measure",
            TuneMode::Cached => "cached",
            TuneMode::Off => "off",
        }
    }

    /// The mode in `SHADERFORMER_TUNE`, or `default` when it is unset or empty (the rule of
    /// every variable we read: empty is unset). A bad value is an error naming the variable.
    pub fn from_env_or(default: TuneMode) -> Result<TuneMode> {
        match env_var(ENV_TUNE)? {
            Some(s) => s.parse().map_err(|_: Error| {
                Error::invalid(
                    ENV_TUNE,
                    format!("unknown mode '{s}' (expected {})", TuneMode::NAMES),
                )
            }),
            None => Ok(default),
        }
    }
}

impl FromStr for TuneMode {
    type Err = Error;

    fn from_str(s: &str) -> Result<TuneMode> {
        match s.trim().to_ascii_lowercase().as_str() {
            "on" => Ok(TuneMode::On),
            "measure" => Ok(TuneMode::Measure),
            "cached" => Ok(TuneMode::Cached),
            "off" => Ok(TuneMode::Off),
            other => Err(Error::invalid(
                "--tune",
                format!("unknown mode '{other}' (expected {})", TuneMode::NAMES),
            )),
        }
    }
}

/// One problem's measurement: every candidate's median time, the winner and the fixed rule's
/// choice beside it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Choice {
    /// The kernel family, e.g. "gemm".
    pub family: String,
    /// The problem's bucket, e.g. "NT m512 n512 k128 f32".
    pub problem: String,
    /// The exact shape the measurement ran at (the first problem of the bucket met).
    pub shape: String,
    pub winner: String,
    /// What the fixed rule (`--tune off`) takes for this problem.
    pub rule: String,
    /// Median seconds of each candidate that matched the baseline, fastest first.
    pub times: Vec<(String, f64)>,
    /// Candidates whose output differed from the baseline's beyond rounding (or that failed),
    /// with the reason.
    pub rejected: Vec<(String, String)>,
    /// Work of one run at `shape`, for GFLOP/s and GB/s.
    pub flops: u64,
    pub bytes: u64,
}

impl Choice {
    /// Median seconds of `variant`, if it was timed.
    pub fn time_of(&self, variant: &str) -> Option<f64> {
        self.times.iter().find(|(v, _)| v == variant).map(|t| t.1)
    }

    /// The family and problem, the key of the store.
    pub fn key(&self) -> String {
        key(&self.family, &self.problem)
    }
}

pub(crate) fn key(family: &str, problem: &str) -> String {
    format!("{family}: {problem}")
}

/// One candidate set up to run: its dispatches and the tensor its result lands in.
pub struct Trial {
    pub dispatches: Vec<Dispatch>,
    pub output: View,
}

/// A problem of a kernel family, with its candidates.
#[derive(Clone, Debug)]
pub struct Problem {
    pub family: &'static str,
    /// The bucket: problems with the same bucket share one measurement.
    pub bucket: String,
    /// The exact shape, for reports.
    pub shape: String,
    /// Names of the variants that can compute it; the first is the baseline the others are
    /// checked against (a family lists a tested, fast kernel first, e.g. its fixed rule's).
    pub candidates: Vec<String>,
    /// What the fixed rule takes (one of the candidates).
    pub rule: String,
    /// Largest accepted difference from the baseline: `atol + rtol·|baseline|` per element.
    pub atol: f64,
    pub rtol: f64,
}

/// A candidate built for a deferred measurement: its trial (or why it could not be built), and
/// the device's verdict on building it (a validation error, known once the event loop answers).
pub struct Built {
    pub name: String,
    pub trial: Result<Trial>,
    pub errors: Signal<Option<String>>,
}

/// A problem waiting to be measured, with its candidates built on inputs of their own.
pub struct Deferred {
    pub problem: Problem,
    pub built: Vec<Built>,
}

/// What the store says about a problem.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Lookup {
    /// Use this variant (pinned by a checkpoint, or measured before).
    Use(String),
    /// Measure the candidates now.
    Measure,
    /// Use the fixed rule.
    Rule,
}

/// Everything that identifies an adapter and the code measured on it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    pub adapter: String,
    pub vendor: u32,
    pub device: u32,
    pub driver: String,
    pub driver_info: String,
    pub backend: String,
    pub crate_version: String,
    /// FNV-1a of every shader source, as loaded (embedded or from --shader-dir).
    pub shaders: String,
}

impl Identity {
    pub fn new(info: &wgpu::AdapterInfo, shaders_hash: u64) -> Identity {
        Identity {
            adapter: info.name.clone(),
            vendor: info.vendor,
            device: info.device,
            driver: info.driver.clone(),
            driver_info: info.driver_info.clone(),
            backend: format!("{:?}", info.backend),
            crate_version: env!("CARGO_PKG_VERSION").to_string(),
            shaders: format!("{shaders_hash:016x}"),
        }
    }

    /// The cache file's name: the adapter, readable, and a hash of the whole identity.
    fn file_name(&self) -> String {
        let readable: String = self
            .adapter
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '-'
                }
            })
            .collect();
        let readable = readable.trim_matches('-');
        let readable = &readable[..readable.len().min(40)];
        let id = serde_json::to_string(self).unwrap_or_default();
        format!("tune-{readable}-{:016x}.json", fnv1a(id.as_bytes()))
    }
}

#[derive(Serialize, Deserialize)]
struct CacheFile {
    format: u32,
    identity: Identity,
    choices: Vec<Choice>,
    /// Baseline kernels ("family: variant") found to agree with the CPU reference on this
    /// adapter and shader source (see `kernels::baseline`).
    #[serde(default)]
    baselines: Vec<String>,
}

/// What a cache file holds for this identity.
#[derive(Default)]
struct Cached {
    choices: Vec<Choice>,
    baselines: Vec<String>,
}

#[derive(Default)]
struct State {
    choices: BTreeMap<String, Choice>,
    /// Baselines checked against the CPU reference (see `kernels::baseline`).
    baselines: std::collections::BTreeSet<String>,
    /// Variants a checkpoint trained with, by key: they win over the cache.
    pinned: BTreeMap<String, String>,
    /// Keys looked up by this process, in first-use order, with the variant used.
    used: Vec<(String, String)>,
    /// Problems to measure later (see `defers`), in first-use order.
    pending: Vec<Deferred>,
    /// Pinned variants that no candidate list offered any more, by key.
    unusable_pins: BTreeMap<String, String>,
    warned_write: bool,
    announced: bool,
}

/// The tuning mode, the measured choices and their cache file.
pub struct Tuner {
    mode: TuneMode,
    identity: Identity,
    /// The cache file; `None` when no cache directory is known.
    path: Option<PathBuf>,
    /// Whether a problem to measure is deferred rather than measured on the spot.
    defers: std::sync::atomic::AtomicBool,
    /// Winners shipped for this kind of adapter (`gpu::prior`), by key.
    prior: BTreeMap<String, String>,
    state: Mutex<State>,
}

/// 64-bit FNV-1a: a stable hash for cache keys (std's hasher may change between releases).
pub fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The value of the environment variable `name`: `None` when it is unset or empty (blank),
/// an error naming it when it is not Unicode.
pub fn env_var(name: &str) -> Result<Option<String>> {
    match std::env::var(name) {
        Ok(s) if s.trim().is_empty() => Ok(None),
        Ok(s) => Ok(Some(s)),
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(_)) => Err(Error::invalid(name, "is not valid Unicode")),
    }
}

/// The directory of the tuning cache: `SHADERFORMER_CACHE_DIR`, else `$XDG_CACHE_HOME/shaderformer`,
/// else `$HOME/.cache/shaderformer` (an empty variable counts as unset).
pub fn cache_dir() -> Option<PathBuf> {
    let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
    if let Some(d) = var(ENV_CACHE_DIR) {
        return Some(PathBuf::from(d));
    }
    if let Some(d) = var("XDG_CACHE_HOME") {
        return Some(PathBuf::from(d).join("shaderformer"));
    }
    var("HOME").map(|h| PathBuf::from(h).join(".cache").join("shaderformer"))
}

fn warn(message: &str) {
    eprintln!("warning: {message}");
}

impl Tuner {
    /// A tuner for the adapter `identity`, reading the cache in `dir` unless `mode` is off.
    pub fn new(mode: TuneMode, identity: Identity, dir: Option<&Path>) -> Tuner {
        let path = dir.map(|d| d.join(identity.file_name()));
        let mut state = State::default();
        let prior = super::prior::for_adapter(&identity.adapter);
        if mode != TuneMode::Off
            && let Some(path) = &path
        {
            match read_cache(path, &identity) {
                Ok(cached) => {
                    state.choices = cached.choices.into_iter().map(|c| (c.key(), c)).collect();
                    state.baselines = cached.baselines.into_iter().collect();
                }
                Err(why) => warn(&format!(
                    "kernel tuning cache {}: {why}; {}",
                    path.display(),
                    match mode {
                        TuneMode::Cached if prior.is_empty() => {
                            "--tune cached measures nothing, so the fixed rule computes every \
                             problem (--tune on measures them again)"
                        }
                        TuneMode::Cached => {
                            "--tune cached measures nothing, so the winners shipped for this \
                             adapter and, for the problems they lack, the fixed rule compute them \
                             (--tune on measures the rest)"
                        }
                        _ => "its problems will be measured again",
                    }
                )),
            }
        }
        Tuner {
            mode,
            identity,
            path,
            // A browser cannot block on the GPU: there measuring waits for `tune_pending`.
            defers: cfg!(target_arch = "wasm32").into(),
            prior,
            state: Mutex::new(state),
        }
    }

    /// Whether problems to measure are deferred (in a browser) rather than measured on the spot.
    pub fn defers(&self) -> bool {
        self.defers.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Defers measuring (or not) from now on; natively measuring is on the spot by default.
    pub fn set_defers(&self, defers: bool) {
        self.defers
            .store(defers, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether `problem` of `family` already waits to be measured.
    pub fn is_pending(&self, family: &str, problem: &str) -> bool {
        let state = self.state.lock().unwrap();
        state
            .pending
            .iter()
            .any(|d| d.problem.family == family && d.problem.bucket == problem)
    }

    /// Keeps a problem to measure later.
    pub fn defer(&self, deferred: Deferred) {
        self.state.lock().unwrap().pending.push(deferred);
    }

    /// The problems waiting to be measured, leaving none.
    pub fn take_pending(&self) -> Vec<Deferred> {
        std::mem::take(&mut self.state.lock().unwrap().pending)
    }

    /// How many problems wait to be measured.
    pub fn pending(&self) -> usize {
        self.state.lock().unwrap().pending.len()
    }

    pub fn mode(&self) -> TuneMode {
        self.mode
    }

    /// Says once per process, before the first measurement, that kernels are being measured
    /// and about how long it takes (`candidates` of the first problem).
    pub fn announce_measuring(&self, candidates: usize) {
        let mut state = self.state.lock().unwrap();
        if std::mem::replace(&mut state.announced, true) {
            return;
        }
        eprintln!(
            "measuring kernel variants on {} for the problems its tuning cache lacks \
             ({candidates} candidates for the first; about a second each on a GPU, up to a minute \
             on a CPU adapter with an empty shader cache); once per adapter, kept in {}",
            self.identity.adapter,
            self.path
                .as_deref()
                .map_or("memory only".into(), |p| p.display().to_string())
        );
    }

    /// How many problems of any family each variant wins on this adapter, in the cache and
    /// the shipped winners together.
    pub fn wins(&self) -> BTreeMap<String, usize> {
        let state = self.state.lock().unwrap();
        let mut wins = BTreeMap::new();
        let winners = (state.choices.values().map(|c| &c.winner)).chain(self.prior.values());
        for w in winners {
            *wins.entry(w.clone()).or_insert(0) += 1;
        }
        wins
    }

    /// How many problems the shipped prior answers for on this adapter.
    pub fn prior_len(&self) -> usize {
        self.prior.len()
    }

    /// The cache file (which may not exist yet).
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// What to do for `problem` of `family`; `candidates` are the variants that apply now (a
    /// pinned or cached choice outside them is ignored).
    pub fn lookup(&self, family: &str, problem: &str, candidates: &[String]) -> Lookup {
        let k = key(family, problem);
        let mut state = self.state.lock().unwrap();
        let usable = |v: &String| candidates.contains(v);
        match state.pinned.get(&k).cloned() {
            Some(v) if usable(&v) => return Lookup::Use(v),
            Some(v) => {
                state.unusable_pins.insert(k.clone(), v);
            }
            None => {}
        }
        if self.mode == TuneMode::Off {
            return Lookup::Rule;
        }
        if let Some(c) = state.choices.get(&k).filter(|c| usable(&c.winner)) {
            return Lookup::Use(c.winner.clone());
        }
        if self.mode != TuneMode::Measure
            && let Some(v) = self.prior.get(&k).filter(|v| usable(v))
        {
            return Lookup::Use(v.clone());
        }
        match self.mode {
            TuneMode::On | TuneMode::Measure => Lookup::Measure,
            _ => Lookup::Rule,
        }
    }

    /// Notes that this process computes `problem` of `family` with `variant` (for checkpoints
    /// and the `tune` table). A problem used again keeps its place in the order, with the variant
    /// of its latest use (a deferred problem is first computed by the fixed rule, then, once
    /// measured, by its winner).
    pub fn note_use(&self, family: &str, problem: &str, variant: &str) {
        let k = key(family, problem);
        let mut state = self.state.lock().unwrap();
        match state.used.iter_mut().find(|(u, _)| *u == k) {
            Some(u) => u.1 = variant.to_string(),
            None => state.used.push((k, variant.to_string())),
        }
    }

    /// Pinned variants (a checkpoint's) that the problem's candidates no longer include (the
    /// shader was edited, a variant renamed), by key: those problems were computed otherwise.
    pub fn unusable_pins(&self) -> BTreeMap<String, String> {
        self.state.lock().unwrap().unusable_pins.clone()
    }

    /// Whether baseline `key` ("family: variant") agreed with the CPU reference on this adapter
    /// and shader source.
    pub fn baseline_verified(&self, key: &str) -> bool {
        self.state.lock().unwrap().baselines.contains(key)
    }

    /// Keeps a baseline's passed check (see `kernels::baseline`) with the measurements.
    pub fn record_baseline(&self, key: String) {
        let mut state = self.state.lock().unwrap();
        state.baselines.insert(key);
        self.persist(&mut state);
    }

    /// Keeps a measurement and rewrites the cache file.
    pub fn record(&self, choice: Choice) {
        let mut state = self.state.lock().unwrap();
        state.choices.insert(choice.key(), choice);
        self.persist(&mut state);
    }

    /// Rewrites the cache file, merged under its lock with what other processes wrote there
    /// meanwhile (theirs kept, ours winning where both measured the same problem).
    fn persist(&self, state: &mut State) {
        // Off: the cache is neither read nor written.
        let Some(path) = self.path.as_ref().filter(|_| self.mode != TuneMode::Off) else {
            return;
        };
        let written = with_file_lock(path, || {
            let theirs = read_cache(path, &self.identity).unwrap_or_default();
            let mut merged: BTreeMap<String, Choice> =
                theirs.choices.into_iter().map(|c| (c.key(), c)).collect();
            for (k, c) in &state.choices {
                merged.insert(k.clone(), c.clone());
            }
            let mut baselines = state.baselines.clone();
            baselines.extend(theirs.baselines);
            let file = CacheFile {
                format: FORMAT,
                identity: self.identity.clone(),
                choices: merged.values().cloned().collect(),
                baselines: baselines.iter().cloned().collect(),
            };
            write_atomic(path, &file)?;
            Ok((merged, baselines))
        });
        let written = written.map(|(merged, baselines)| {
            // What the others measured is ours to use too.
            for (k, c) in merged {
                state.choices.entry(k).or_insert(c);
            }
            state.baselines = baselines;
        });
        if let Err(e) = written
            && !state.warned_write
        {
            state.warned_write = true;
            warn(&format!(
                "cannot write the kernel tuning cache {}: {e}; this run keeps its choices in memory",
                path.display()
            ));
        }
    }

    /// Variants to use whatever the cache says (a checkpoint's), by "family: problem" key.
    pub fn pin(&self, choices: &BTreeMap<String, String>) {
        let mut state = self.state.lock().unwrap();
        state
            .pinned
            .extend(choices.iter().map(|(k, v)| (k.clone(), v.clone())));
    }

    /// Every problem this process has computed, with the variant it used, by key.
    pub fn used(&self) -> BTreeMap<String, String> {
        self.state.lock().unwrap().used.iter().cloned().collect()
    }

    /// The measurement behind each problem this process used, in first-use order (problems
    /// that were never measured on this adapter are left out).
    pub fn used_choices(&self) -> Vec<Choice> {
        let state = self.state.lock().unwrap();
        state
            .used
            .iter()
            .filter_map(|(k, _)| state.choices.get(k).cloned())
            .collect()
    }

    /// Keys this process used that have no measurement (computed by the fixed rule or a pin).
    pub fn unmeasured(&self) -> Vec<(String, String)> {
        let state = self.state.lock().unwrap();
        state
            .used
            .iter()
            .filter(|(k, _)| !state.choices.contains_key(k))
            .cloned()
            .collect()
    }
}

fn read_cache(path: &Path, identity: &Identity) -> std::result::Result<Cached, String> {
    let bytes = match crate::io::files::read_bytes(path, crate::io::files::Kind::TuningCache) {
        Ok(b) => b,
        // No cache yet (or its directory cannot exist: writing it will say so).
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory
            ) =>
        {
            return Ok(Cached::default());
        }
        Err(e) => return Err(format!("unreadable: it {e}")),
    };
    let file: CacheFile =
        serde_json::from_slice(&bytes).map_err(|e| format!("not a tuning cache ({e})"))?;
    if file.format != FORMAT {
        return Err(format!(
            "format {} (this build writes {FORMAT})",
            file.format
        ));
    }
    if file.identity != *identity {
        return Err("stale (made for another adapter, driver, version or shader source)".into());
    }
    Ok(Cached {
        choices: file.choices,
        baselines: file.baselines,
    })
}

/// Runs `f` holding `PATH.lock` (created exclusively; one left by a dead process, or older than
/// a minute, is taken over), waiting up to ten seconds for another holder.
fn with_file_lock<T>(path: &Path, f: impl FnOnce() -> std::io::Result<T>) -> std::io::Result<T> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let lock = path.with_extension("json.lock");
    let t0 = std::time::Instant::now();
    loop {
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&lock)
        {
            Ok(mut file) => {
                use std::io::Write;
                let _ = write!(file, "{}", std::process::id());
                let result = f();
                let _ = std::fs::remove_file(&lock);
                return result;
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                if lock_is_abandoned(&lock) || t0.elapsed().as_secs() >= 10 {
                    let _ = std::fs::remove_file(&lock);
                } else {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
            }
            Err(e) => return Err(e),
        }
    }
}

/// Whether a lock file's holder is gone: its pid names no live process, or it is over a minute
/// old (no write of the cache takes that long).
fn lock_is_abandoned(lock: &Path) -> bool {
    let old = std::fs::metadata(lock)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.elapsed().ok())
        .is_some_and(|age| age.as_secs() > 60);
    let pid = crate::io::files::read_text(lock, crate::io::files::Kind::TuningCache)
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok());
    let dead = cfg!(target_os = "linux")
        && pid.is_some_and(|p| !Path::new("/proc").join(p.to_string()).exists());
    old || dead
}

fn write_atomic(path: &Path, file: &CacheFile) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let text = serde_json::to_string_pretty(file).map_err(std::io::Error::other)?;
    let tmp = path.with_extension(format!("json.tmp{}", std::process::id()));
    let result = std::fs::write(&tmp, text).and_then(|_| std::fs::rename(&tmp, path));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity(adapter: &str) -> Identity {
        Identity {
            adapter: adapter.into(),
            vendor: 1,
            device: 2,
            driver: "d".into(),
            driver_info: "i".into(),
            backend: "Vulkan".into(),
            crate_version: "0".into(),
            shaders: "00".into(),
        }
    }

    fn choice(problem: &str, winner: &str) -> Choice {
        Choice {
            family: "gemm".into(),
            problem: problem.into(),
            shape: problem.into(),
            winner: winner.into(),
            rule: "a".into(),
            times: vec![(winner.into(), 1.0), ("a".into(), 2.0)],
            rejected: vec![],
            flops: 1,
            bytes: 1,
        }
    }

    fn cands() -> Vec<String> {
        vec!["a".into(), "b".into()]
    }

    fn temp_dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("sf-tune-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn modes_parse_and_name_the_accepted_values() {
        assert_eq!("ON".parse::<TuneMode>().unwrap(), TuneMode::On);
        assert_eq!("cached".parse::<TuneMode>().unwrap(), TuneMode::Cached);
        assert_eq!(" off".parse::<TuneMode>().unwrap(), TuneMode::Off);
        let e = "bogus".parse::<TuneMode>().unwrap_err().to_string();
        assert!(
            e.contains("--tune") && e.contains("on, measure, cached or off"),
            "{e}"
        );
    }

    #[test]
    fn choices_persist_per_adapter_and_go_stale_with_the_identity() {
        let dir = temp_dir("persist");
        let t = Tuner::new(TuneMode::On, identity("x"), Some(&dir));
        assert_eq!(t.lookup("gemm", "p", &cands()), Lookup::Measure);
        t.record(choice("p", "b"));
        let again = Tuner::new(TuneMode::On, identity("x"), Some(&dir));
        assert_eq!(again.lookup("gemm", "p", &cands()), Lookup::Use("b".into()));
        // Cached mode uses it too, and the fixed rule for the rest; off ignores it.
        let cached = Tuner::new(TuneMode::Cached, identity("x"), Some(&dir));
        assert_eq!(
            cached.lookup("gemm", "p", &cands()),
            Lookup::Use("b".into())
        );
        assert_eq!(cached.lookup("gemm", "q", &cands()), Lookup::Rule);
        let off = Tuner::new(TuneMode::Off, identity("x"), Some(&dir));
        assert_eq!(off.lookup("gemm", "p", &cands()), Lookup::Rule);
        // Another adapter has its own file; a changed identity under the same name is stale.
        let other = Tuner::new(TuneMode::On, identity("y"), Some(&dir));
        assert_eq!(other.lookup("gemm", "p", &cands()), Lookup::Measure);
        let path = again.path().unwrap().to_path_buf();
        let mut text: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        text["identity"]["driver"] = "newer".into();
        std::fs::write(&path, text.to_string()).unwrap();
        let stale = Tuner::new(TuneMode::On, identity("x"), Some(&dir));
        assert_eq!(stale.lookup("gemm", "p", &cands()), Lookup::Measure);
        // A winner that no longer applies is measured again.
        assert_eq!(
            again.lookup("gemm", "p", &["a".to_string()]),
            Lookup::Measure
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn corrupt_cache_is_retuned_and_rewritten() {
        let dir = temp_dir("corrupt");
        std::fs::create_dir_all(&dir).unwrap();
        let probe = Tuner::new(TuneMode::On, identity("x"), Some(&dir));
        let path = probe.path().unwrap().to_path_buf();
        let noise: Vec<u8> = (0..500u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        std::fs::write(&path, noise).unwrap();
        let t = Tuner::new(TuneMode::On, identity("x"), Some(&dir));
        assert_eq!(t.lookup("gemm", "p", &cands()), Lookup::Measure);
        t.record(choice("p", "a"));
        let again = Tuner::new(TuneMode::On, identity("x"), Some(&dir));
        assert_eq!(again.lookup("gemm", "p", &cands()), Lookup::Use("a".into()));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn unwritable_directory_keeps_choices_in_memory() {
        // A directory below a regular file can never be created.
        let dir = temp_dir("unwritable");
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("file");
        std::fs::write(&file, b"x").unwrap();
        let t = Tuner::new(TuneMode::On, identity("x"), Some(&file.join("cache")));
        t.record(choice("p", "b"));
        assert_eq!(t.lookup("gemm", "p", &cands()), Lookup::Use("b".into()));
        assert!(!file.join("cache").exists());
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A cache path that is a FIFO (or a link to an endless device, or a file far larger than a
    /// cache) costs a warning and a re-tune, without blocking or reading it whole.
    #[cfg(unix)]
    #[test]
    fn a_cache_that_is_no_regular_file_is_not_read() {
        let dir = temp_dir("fifo");
        std::fs::create_dir_all(&dir).unwrap();
        let path = Tuner::new(TuneMode::Off, identity("x"), Some(&dir))
            .path()
            .unwrap()
            .to_path_buf();
        let make: [&dyn Fn(&Path); 3] = [
            &|p| {
                let ok = std::process::Command::new("mkfifo").arg(p).status();
                assert!(ok.unwrap().success());
            },
            &|p| std::os::unix::fs::symlink("/dev/zero", p).unwrap(),
            &|p| {
                std::fs::File::create(p)
                    .unwrap()
                    .set_len(crate::io::files::Kind::TuningCache.cap() + 1)
                    .unwrap()
            },
        ];
        for (k, make) in make.iter().enumerate() {
            let _ = std::fs::remove_file(&path);
            make(&path);
            let (tx, rx) = std::sync::mpsc::channel();
            let d = dir.clone();
            std::thread::spawn(move || {
                let t = Tuner::new(TuneMode::On, identity("x"), Some(&d));
                let _ = tx.send(t.lookup("gemm", "p", &cands()));
            });
            let got = rx.recv_timeout(std::time::Duration::from_secs(10));
            assert_eq!(got, Ok(Lookup::Measure), "case {k}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Two tuners sharing a cache keep each other's measurements.
    #[test]
    fn tuners_sharing_a_cache_merge_their_measurements() {
        let dir = temp_dir("merge");
        let first = Tuner::new(TuneMode::On, identity("x"), Some(&dir));
        let second = Tuner::new(TuneMode::On, identity("x"), Some(&dir));
        first.record(choice("p", "b"));
        second.record(choice("q", "a"));
        first.record_baseline("gemm: a".into());
        let again = Tuner::new(TuneMode::On, identity("x"), Some(&dir));
        assert_eq!(again.lookup("gemm", "p", &cands()), Lookup::Use("b".into()));
        assert_eq!(again.lookup("gemm", "q", &cands()), Lookup::Use("a".into()));
        assert!(again.baseline_verified("gemm: a"));
        assert!(!again.baseline_verified("gemm: b"));
        let left: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .filter(|n| n.ends_with(".lock") || n.contains(".tmp"))
            .collect();
        assert!(left.is_empty(), "{left:?}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A pinned variant that is no candidate any more is reported, not dropped in silence.
    #[test]
    fn pins_that_no_longer_apply_are_reported() {
        let t = Tuner::new(TuneMode::Off, identity("x"), None);
        let mut pins = BTreeMap::new();
        pins.insert(key("gemm", "p"), "gone".to_string());
        t.pin(&pins);
        assert_eq!(t.lookup("gemm", "p", &cands()), Lookup::Rule);
        assert_eq!(t.unusable_pins(), pins);
    }

    #[test]
    fn pins_win_over_the_cache_and_the_mode() {
        let t = Tuner::new(TuneMode::Off, identity("x"), None);
        let mut pins = BTreeMap::new();
        pins.insert(key("gemm", "p"), "b".to_string());
        t.pin(&pins);
        assert_eq!(t.lookup("gemm", "p", &cands()), Lookup::Use("b".into()));
        t.note_use("gemm", "p", "b");
        t.note_use("gemm", "p", "b");
        assert_eq!(t.used(), pins);
    }
}
