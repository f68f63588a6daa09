//! `trainer_state.json`: the step, the loader's position and every setting of a run, so that
//! `--resume DIR` alone continues it. Typed: a field of the wrong type or value is an error
//! naming the file and the field, never a silent default.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::TrainConfig;
use super::data::{LoaderKind, LoaderState};
use super::schedule::Schedule;
use crate::error::{Error, Result};

/// The settings a resumed run takes as its defaults.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// The data file, absolute (`None`: the embedded addition dataset).
    pub data: Option<PathBuf>,
    pub batch_size: usize,
    pub block_size: usize,
    pub grad_accum: usize,
    pub max_iters: u64,
    pub lr_schedule: Schedule,
    pub lr: f32,
    pub min_lr: f32,
    pub warmup_iters: u64,
    pub lr_decay_iters: u64,
    pub weight_decay: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub grad_clip: f32,
    pub dropout: f32,
    pub seed: u64,
    pub eval_interval: u64,
    pub eval_iters: usize,
    pub log_interval: u64,
    pub loader: LoaderKind,
}

/// The whole file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainerState {
    /// Optimizer steps taken.
    pub step: u64,
    pub loader: LoaderState,
    pub data_description: String,
    pub config: Settings,
    /// The kernel variant of every tuned problem the run computed, by "family: problem" key, so
    /// a resumed run computes as this one did whatever the tuning cache says by then (absent
    /// from checkpoints written before variants were recorded).
    #[serde(default)]
    pub kernels: BTreeMap<String, String>,
    /// Ranks of the data-parallel run that wrote it (absent: 1).
    #[serde(default = "one_rank", skip_serializing_if = "is_one_rank")]
    pub ranks: usize,
    /// The loader states of ranks 1 .. ranks (rank 0's is `loader`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rank_loaders: Vec<LoaderState>,
    /// Whether the directory's `loss.svg` was written by the run (otherwise it is the user's
    /// file, and no run replaces it).
    #[serde(default)]
    pub loss_svg: bool,
}

fn one_rank() -> usize {
    1
}

fn is_one_rank(n: &usize) -> bool {
    *n == 1
}

impl TrainerState {
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("JSON of a trainer state")
    }

    /// Parses and checks the text of `path`. serde names missing and unknown fields itself; for
    /// a value of the wrong type it gives a line, whose key (one per line in the files we write)
    /// names the field.
    pub fn parse(path: &Path, text: &str) -> Result<TrainerState> {
        let name = path.display().to_string();
        let state: TrainerState = serde_json::from_str(text).map_err(|e| {
            let key = text
                .lines()
                .nth(e.line().saturating_sub(1))
                .and_then(key_of_line);
            let msg = match key {
                Some(k) => format!("field {k}: {e}"),
                None => e.to_string(),
            };
            Error::invalid(&name, msg)
        })?;
        for l in std::iter::once(&state.loader).chain(&state.rank_loaders) {
            l.rng_state()
                .map_err(|e| Error::invalid(&name, e.to_string()))?;
        }
        state.check_values(&name)?;
        Ok(state)
    }

    /// Values no run can have written: named by their field.
    fn check_values(&self, name: &str) -> Result<()> {
        let c = &self.config;
        let bad =
            |field: &str, msg: String| Err(Error::invalid(name, format!("field {field}: {msg}")));
        for (field, x) in [
            ("config.batch_size", c.batch_size as u64),
            ("config.block_size", c.block_size as u64),
            ("config.grad_accum", c.grad_accum as u64),
            ("config.max_iters", c.max_iters),
            ("config.eval_iters", c.eval_iters as u64),
            ("config.log_interval", c.log_interval),
        ] {
            if x == 0 {
                return bad(field, "must be at least 1".into());
            }
        }
        if self.ranks == 0
            || !(self.rank_loaders.is_empty() || self.rank_loaders.len() + 1 == self.ranks)
        {
            return bad(
                "rank_loaders",
                format!(
                    "{} loader states for {} ranks (expected none, or one per rank after the first)",
                    self.rank_loaders.len(),
                    self.ranks
                ),
            );
        }
        if self.step > c.max_iters {
            return bad(
                "step",
                format!("{} is beyond config.max_iters {}", self.step, c.max_iters),
            );
        }
        for (field, x) in [
            ("config.lr", c.lr),
            ("config.min_lr", c.min_lr),
            ("config.weight_decay", c.weight_decay),
            ("config.grad_clip", c.grad_clip),
        ] {
            if !(x.is_finite() && x >= 0.0) {
                return bad(field, format!("{x} must be finite and >= 0"));
            }
        }
        if !(0.0..1.0).contains(&c.dropout) {
            return bad("config.dropout", format!("{} is not in [0, 1)", c.dropout));
        }
        Ok(())
    }
}

/// `"step": 20,` → `step`.
fn key_of_line(line: &str) -> Option<String> {
    let rest = line.trim_start().strip_prefix('"')?;
    let (key, after) = rest.split_once('"')?;
    after.trim_start().starts_with(':').then(|| key.to_string())
}

impl TrainConfig {
    /// This run's settings, as a resumed run reads them back.
    pub fn settings(&self) -> Settings {
        Settings {
            // Absolute, so that a resume from another directory finds the same file.
            data: self
                .data
                .as_ref()
                .map(|p| std::fs::canonicalize(p).unwrap_or_else(|_| p.clone())),
            batch_size: self.batch_size,
            block_size: self.block_size,
            grad_accum: self.grad_accum,
            max_iters: self.max_iters,
            lr_schedule: self.schedule.kind,
            lr: self.schedule.lr,
            min_lr: self.schedule.min_lr,
            warmup_iters: self.schedule.warmup_iters,
            lr_decay_iters: self.schedule.lr_decay_iters,
            weight_decay: self.weight_decay,
            beta1: self.beta1,
            beta2: self.beta2,
            eps: self.eps,
            grad_clip: self.grad_clip,
            dropout: self.dropout,
            seed: self.seed,
            eval_interval: self.eval_interval,
            eval_iters: self.eval_iters,
            log_interval: self.log_interval,
            loader: self.loader,
        }
    }

    /// `self` with every saved setting replacing its value.
    pub fn with_settings(mut self, s: &Settings) -> TrainConfig {
        self.data = s.data.clone();
        self.batch_size = s.batch_size;
        self.block_size = s.block_size;
        self.grad_accum = s.grad_accum;
        self.max_iters = s.max_iters;
        self.schedule.kind = s.lr_schedule;
        self.schedule.lr = s.lr;
        self.schedule.min_lr = s.min_lr;
        self.schedule.warmup_iters = s.warmup_iters;
        self.schedule.lr_decay_iters = s.lr_decay_iters;
        self.weight_decay = s.weight_decay;
        self.beta1 = s.beta1;
        self.beta2 = s.beta2;
        self.eps = s.eps;
        self.grad_clip = s.grad_clip;
        self.dropout = s.dropout;
        self.seed = s.seed;
        self.eval_interval = s.eval_interval;
        self.eval_iters = s.eval_iters;
        self.log_interval = s.log_interval;
        self.loader = s.loader;
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn saved() -> String {
        let cfg = TrainConfig::default();
        TrainerState {
            step: 20,
            loader: super::super::data::Loader::new(LoaderKind::Random, 2, 8, 1).state(),
            data_description: "test".into(),
            config: cfg.settings(),
            kernels: Default::default(),
            ranks: 1,
            rank_loaders: Vec::new(),
            loss_svg: true,
        }
        .to_json()
    }

    fn err(text: &str) -> String {
        TrainerState::parse(Path::new("ck/trainer_state.json"), text)
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn a_saved_state_reads_back() {
        let text = saved();
        let s = TrainerState::parse(Path::new("x"), &text).unwrap();
        assert_eq!(s.step, 20);
        assert_eq!(s.to_json(), text);
    }

    #[test]
    fn the_data_path_is_stored_absolute() {
        let cfg = TrainConfig {
            data: Some(PathBuf::from("Cargo.toml")),
            ..TrainConfig::default()
        };
        let d = cfg.settings().data.unwrap();
        assert!(d.is_absolute() && d.ends_with("Cargo.toml"), "{d:?}");
    }

    #[test]
    fn every_bad_field_is_named() {
        let text = saved();
        for (from, to, field) in [
            ("\"step\": 20", "\"step\": \"20\"", "field step"),
            ("\"step\": 20", "\"step\": -5", "field step"),
            ("\"step\": 20", "\"step\": 20.5", "field step"),
            (
                "\"eval_interval\": 250",
                "\"eval_interval\": -1",
                "field eval_interval",
            ),
            (
                "\"loader\": \"random\"",
                "\"loader\": \"zigzag\"",
                "field loader",
            ),
            (
                "\"max_iters\": 2000",
                "\"max_iters\": 0",
                "config.max_iters",
            ),
            ("\"lr\": 0.001", "\"lr\": -0.001", "config.lr"),
            ("\"step\": 20", "\"stepp\": 20", "stepp"),
        ] {
            assert!(text.contains(from), "{from} not in {text}");
            let e = err(&text.replacen(from, to, 1));
            assert!(e.contains("ck/trainer_state.json"), "{e}");
            assert!(e.contains(field), "{to}: {e}");
        }
        let words = TrainerState::parse(Path::new("x"), &text)
            .unwrap()
            .loader
            .rng;
        let mut zero = text.clone();
        for w in &words {
            zero = zero.replacen(&format!("\"{w}\""), "\"0\"", 1);
        }
        assert!(err(&zero).contains("loader.rng"), "{}", err(&zero));
        for v in ["[]", "null", "{}"] {
            let e = err(v);
            assert!(e.contains("ck/trainer_state.json"), "{e}");
        }
        assert!(err("{}").contains("missing field `step`"), "{}", err("{}"));
    }
}
