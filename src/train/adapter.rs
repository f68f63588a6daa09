//! LoRA fine-tuning in the training loop: an adapter (fresh, read from a peft directory with
//! `--lora`, or continued with `--resume`) on the frozen base that `--init` names. The base's
//! parameters stay on the GPU without gradients or AdamW moments; the adapter's are trained.
//!
//! A LoRA run's checkpoint is peft's adapter directory (adapter_config.json, naming the base by
//! its absolute path, and adapter_model.safetensors) with the adapter's AdamW moments
//! (optimizer.safetensors) and trainer_state.json, so that `peft.PeftModel.from_pretrained(base,
//! dir)` loads it and `--resume dir` continues it bit for bit. The base's files are only read.

use std::path::{Path, PathBuf};

use super::checkpoint::{self, Checkpoint, Moments};
use super::model::Model;
use super::{TrainConfig, state};
use crate::error::{Error, Result};
use crate::model::lora::{self, AdapterFiles, LoraConfig, LoraPlan};
use crate::model::params::ParamSpec;

/// `train`'s LoRA flags (`--lora-r`, `--lora-alpha`, `--lora-dropout`, `--lora-targets`,
/// `--lora`); a flag not given takes the adapter's value (`--lora`) or peft's default.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LoraFlags {
    pub r: Option<usize>,
    pub alpha: Option<f32>,
    pub dropout: Option<f32>,
    pub targets: Option<Vec<String>>,
    /// Continue training this peft adapter directory.
    pub from: Option<PathBuf>,
}

/// The files of a LoRA run's checkpoint beside the trainer's own.
pub const ADAPTER_FILES: [&str; 2] = [lora::CONFIG_FILE, lora::WEIGHTS_FILE];

/// Whether `dir` holds a peft adapter (its adapter_config.json).
pub fn is_adapter(dir: &Path) -> bool {
    dir.join(lora::CONFIG_FILE).is_file()
}

/// An adapter being trained on a frozen base.
#[derive(Debug)]
pub struct Adapter {
    pub plan: LoraPlan,
    /// The adapter's initial values (A and B of each layer), until uploaded.
    pub(super) values: Vec<Vec<f32>>,
    /// The AdamW moments of a resumed run, until uploaded.
    pub(super) optimizer: Option<Moments>,
    /// The base checkpoint directory, absolute.
    pub base: PathBuf,
    /// The base stores its linear weights (in, out) (GPT-2's Conv1D): peft's `fan_in_fan_out`.
    fan_in_fan_out: bool,
}

/// The base checkpoint of `--resume dir` when dir is a LoRA run's: adapter_config.json's
/// `base_model_name_or_path` (relative to dir when relative).
pub fn resumed_base(dir: &Path) -> Result<PathBuf> {
    let (_, base) = LoraConfig::read(dir)?;
    let base = base.ok_or_else(|| {
        Error::invalid(
            dir.join(lora::CONFIG_FILE).display().to_string(),
            "names no base_model_name_or_path: the base checkpoint to continue on is unknown",
        )
    })?;
    let path = dir.join(&base);
    if !path.is_dir() {
        return Err(Error::invalid(
            dir.join(lora::CONFIG_FILE).display().to_string(),
            format!(
                "base_model_name_or_path {base:?} is not a checkpoint directory here ({} does \
                 not exist)",
                path.display()
            ),
        ));
    }
    Ok(path)
}

/// The config of a new adapter from the flags: peft's defaults where none is given (its
/// default targets for GPT-2, or for the Llama family).
pub fn fresh_config(flags: &LoraFlags, gpt2: bool) -> LoraConfig {
    let default_targets: &[&str] = if gpt2 {
        &lora::GPT2_TARGETS
    } else {
        &lora::LLAMA_TARGETS
    };
    LoraConfig {
        r: flags.r.unwrap_or(8),
        alpha: flags.alpha.unwrap_or(8.0),
        dropout: flags.dropout.unwrap_or(0.0),
        targets: flags
            .targets
            .clone()
            .unwrap_or_else(|| default_targets.iter().map(|s| s.to_string()).collect()),
    }
}

/// The config of an existing adapter in `dir`, refusing flags that would change its shape (the
/// dropout is a training setting and may change).
fn existing_config(dir: &Path, flags: &LoraFlags) -> Result<LoraConfig> {
    let (mut cfg, _) = LoraConfig::read(dir)?;
    let fixed = [
        ("--lora-r", flags.r.is_some()),
        ("--lora-alpha", flags.alpha.is_some()),
        ("--lora-targets", flags.targets.is_some()),
    ];
    if let Some((flag, _)) = fixed.iter().find(|f| f.1) {
        return Err(Error::invalid(
            *flag,
            format!(
                "the adapter in {} fixes its own rank, alpha and target modules",
                dir.display()
            ),
        ));
    }
    if let Some(p) = flags.dropout {
        cfg.dropout = p;
    }
    Ok(cfg)
}

impl Adapter {
    /// The adapter of a run on `model` (loaded from the base `base`): continued from `resume`
    /// (a LoRA run's checkpoint, with its moments), read from `flags.from`, or fresh from the
    /// flags (A drawn from `seed`).
    pub fn start(
        model: &Model,
        base: &Path,
        flags: &LoraFlags,
        resume: Option<&Path>,
        seed: u64,
    ) -> Result<Adapter> {
        let gpt_table;
        let (specs, linear, fan_in_fan_out) = match model {
            Model::Gpt(c) => {
                gpt_table = crate::model::ParamTable::new(c);
                (&gpt_table.specs[..], gpt_table.linear_weights(), true)
            }
            Model::Llama(l) => (&l.table.specs[..], l.table.linear_weights(), false),
        };
        let from = resume.or(flags.from.as_deref());
        let cfg = match from {
            Some(dir) => existing_config(dir, flags)?,
            None => fresh_config(flags, fan_in_fan_out),
        };
        let plan = LoraPlan::new(&cfg, specs, &linear)?;
        let values = match from {
            Some(dir) => plan.read_values(dir)?,
            None => plan.init(seed),
        };
        let optimizer = match resume {
            Some(dir) => {
                let path = dir.join(checkpoint::OPTIMIZER_FILE);
                if !path.is_file() {
                    return Err(Error::invalid(
                        dir.display().to_string(),
                        "has no optimizer.safetensors: cannot resume (use --lora to continue the \
                         adapter with fresh moments)",
                    ));
                }
                Some(checkpoint::read_moments(
                    &path,
                    &crate::model::params::store_specs(plan.adapter_specs()),
                )?)
            }
            None => None,
        };
        let base = std::fs::canonicalize(base).map_err(|e| Error::io(base, e))?;
        Ok(Adapter {
            plan,
            values,
            optimizer,
            base,
            fan_in_fan_out,
        })
    }

    /// One line for the start of a run: the adapter's shape and what it trains.
    pub fn describe(&self) -> String {
        let cfg = &self.plan.cfg;
        let (trained, base) = (self.plan.trainable_numel(), self.plan.base_numel());
        format!(
            "LoRA: r {}, alpha {}, dropout {} on {} ({} layers): {} trainable parameters, the \
             base's {:.2}M frozen ({})",
            cfg.r,
            cfg.alpha,
            cfg.dropout,
            cfg.targets.join(", "),
            self.plan.adapted.len(),
            trained,
            base as f64 / 1e6,
            self.base.display()
        )
    }

    /// Bytes the run needs for parameters, gradients and moments: the base's values alone, the
    /// adapter's with their gradients and two moments.
    pub fn training_bytes(&self) -> u128 {
        self.plan.base_numel() as u128 * 4 + self.plan.trainable_numel() as u128 * 16
    }

    /// The moments to upload, one list per parameter (empty for the frozen base).
    pub(super) fn take_moments(&mut self) -> Option<Moments> {
        let (m, v) = self.optimizer.take()?;
        let empty = vec![Vec::new(); self.plan.base_len];
        Some(([empty.clone(), m].concat(), [empty, v].concat()))
    }

    /// Writes the checkpoint into `dir` atomically: peft's two files, the adapter's AdamW
    /// moments and the trainer state (last). `params` and `moments` hold every parameter, base
    /// first; only the adapter's are written.
    pub fn save(
        &self,
        dir: &Path,
        params: &[Vec<f32>],
        (m, v): &Moments,
        state: &state::TrainerState,
    ) -> Result<()> {
        let n = self.plan.base_len;
        let base = self.base.display().to_string();
        let mut files = self.plan.files(&base, self.fan_in_fan_out, &params[n..])?;
        let moments = (m[n..].to_vec(), v[n..].to_vec());
        files.extend([
            (
                checkpoint::OPTIMIZER_FILE.to_string(),
                checkpoint::moments_bytes(
                    &crate::model::params::store_specs(self.plan.adapter_specs()),
                    &moments,
                )?,
            ),
            (
                checkpoint::STATE_FILE.to_string(),
                state.to_json().into_bytes(),
            ),
        ]);
        crate::io::hf_weights::write_atomically(dir, &files)
    }
}

/// Whether `cfg` trains an adapter: a LoRA flag, or `--resume` of a LoRA run.
pub fn wanted(cfg: &TrainConfig) -> bool {
    cfg.lora.is_some() || cfg.resume.as_deref().is_some_and(is_adapter)
}

/// Lays the peft adapter `adapter` onto a base (specs and linear layers of its table) and merges
/// it: the values of `params` become W + scale · B·A on every adapted layer. Inference
/// (`sample`, `score`, the page) and `merge` read an adapter this way: the product is formed
/// once, so decoding runs at the base model's speed.
fn merge_into(
    adapter: AdapterFiles,
    specs: &[ParamSpec],
    linear: &[usize],
    params: &mut Vec<Vec<f32>>,
) -> Result<LoraConfig> {
    let plan = LoraPlan::new(&adapter.cfg, specs, linear).map_err(|e| {
        Error::invalid(
            adapter.weights.display().to_string(),
            format!("does not fit this base model: {e}"),
        )
    })?;
    let mut values = std::mem::take(params);
    values.extend(plan.values_from(&adapter.weights, adapter.tensors)?);
    *params = plan.merge(&values);
    Ok(adapter.cfg)
}

/// `merge_into` for a GPT-2 checkpoint.
pub fn merge_gpt(ck: &mut Checkpoint, adapter: AdapterFiles) -> Result<LoraConfig> {
    let table = crate::model::ParamTable::new(&ck.cfg);
    merge_into(
        adapter,
        &table.specs,
        &table.linear_weights(),
        &mut ck.params,
    )
}

/// `merge_into` for a Llama-family checkpoint.
pub fn merge_llama(
    ck: &mut crate::io::hf_weights::LlamaCheckpoint,
    adapter: AdapterFiles,
) -> Result<LoraConfig> {
    let linear = ck.table.linear_weights();
    merge_into(adapter, &ck.table.specs, &linear, &mut ck.params)
}
