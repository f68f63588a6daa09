//! The model a training run trains, as the loop sees it: GPT-2 (fresh, or from our or
//! transformers' checkpoint) or the Llama family (fresh with `--arch llama`, a checkpoint
//! directory with `--init`, or `--resume` of a run that wrote one). The loop asks it for the parameter table, the graph, the token range
//! and the checkpoint files; the schedule, clipping, evaluation, metrics and checkpoint timing
//! stay the loop's.
//!
//! A Llama-family run writes Hugging Face's layout into `--out`: config.json (as transformers 5.x
//! writes it, dtype float32), the weights in f32 (model.safetensors), the source's tokenizer and
//! generation files copied, so that `sample` and transformers load it; and, as a GPT-2 run does,
//! the AdamW moments (optimizer.safetensors) and trainer_state.json, so that `--resume`
//! continues it bit for bit. A fresh Llama model has no tokenizer of its own: its checkpoint
//! holds the data's vocabulary as a GPT-2 run's does (vocab.json for characters).

use std::path::Path;

use super::adapter::{self, Adapter};
use super::checkpoint::{self, Checkpoint, Moments};
use super::{Dataset, TrainConfig, load_data, parallel, state};
use crate::dist::Comm;
use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::graph::ParamStore;
use crate::io::hf_llama::{self, LlamaConfig};
use crate::io::hf_weights;
use crate::io::vocab::Vocab;
use crate::model::arch::{Arch, Biases, Family, Mlp, Norm, Positions, Rope, RopeScaling};
use crate::model::gpt::{self, GptGraph, Mode};
use crate::model::llama;
use crate::model::llama_params::LlamaParams;
use crate::model::lora::LoraPlan;
use crate::model::{GptConfig, ParamTable};

/// Files of a Llama-family directory copied, when present, into every checkpoint of a run.
pub const LLAMA_COPIED: [&str; 4] = [
    crate::io::vocab::TOKENIZER_FILE,
    "tokenizer_config.json",
    "special_tokens_map.json",
    hf_weights::GENERATION_FILE,
];

/// The `LLAMA_COPIED` files that `dir` holds, by name, with their bytes.
pub fn read_llama_copied(dir: &std::path::Path) -> Result<Vec<(String, Vec<u8>)>> {
    let mut copied = Vec::new();
    for name in LLAMA_COPIED {
        let path = dir.join(name);
        if path.is_file() {
            let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
            copied.push((name.to_string(), bytes));
        }
    }
    Ok(copied)
}

/// The standard deviation of a fresh Llama model's weights (transformers' default
/// `initializer_range`).
pub const LLAMA_INIT_STD: f64 = 0.02;

/// The shape of a fresh Llama model beyond GPT-2's flags (`train --arch llama`); layers, heads,
/// width and context are `TrainConfig`'s `n_layer`, `n_head`, `n_embd` and `block_size`.
#[derive(Clone, Debug, PartialEq)]
pub struct FreshLlama {
    /// Key/value heads (`--n-kv-head`); must divide the query heads.
    pub n_kv_head: usize,
    /// Inner units of the gated MLP (`--intermediate-size`).
    pub intermediate: usize,
    /// RoPE's base (`--rope-theta`).
    pub rope_theta: f64,
}

impl FreshLlama {
    /// The default `--intermediate-size` for a hidden width of `n_embd`: the multiple of 64
    /// nearest 8/3 · n_embd (Llama's SwiGLU sizing, which keeps the gated MLP's parameters at
    /// those of a 4 · n_embd GELU one), at least 64. SmolLM2's 576 gives its 1536.
    pub fn default_intermediate(n_embd: usize) -> usize {
        let units = (8 * n_embd as u128 + 96) / 192; // round(8/3 · n_embd / 64)
        (units.max(1) * 64).min(usize::MAX as u128) as usize
    }

    /// Checks the shape's flags against each other, naming them: head_dim is n_embd / n_head,
    /// and each key/value head serves a whole group of query heads.
    pub fn check(&self, cfg: &TrainConfig) -> Result<()> {
        if cfg.n_head == 0 || !cfg.n_embd.is_multiple_of(cfg.n_head) {
            return Err(Error::invalid(
                "--n-embd",
                format!(
                    "{} is not a multiple of --n-head {}: head_dim is n_embd / n_head",
                    cfg.n_embd, cfg.n_head
                ),
            ));
        }
        if self.n_kv_head == 0 || !cfg.n_head.is_multiple_of(self.n_kv_head) {
            return Err(Error::invalid(
                "--n-kv-head",
                format!(
                    "{} does not divide --n-head {}: each key/value head serves a whole group \
                     of query heads",
                    self.n_kv_head, cfg.n_head
                ),
            ));
        }
        if self.intermediate == 0 {
            return Err(Error::invalid("--intermediate-size", "must be at least 1"));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return Err(Error::invalid(
                "--rope-theta",
                format!("{} is not a positive number", self.rope_theta),
            ));
        }
        Ok(())
    }

    /// The configuration of a fresh model of `cfg`'s shape (layers, heads, width, context,
    /// dropout) and this one's, over a vocabulary of `vocab` tokens; checked.
    pub fn config(&self, cfg: &TrainConfig, vocab: usize) -> Result<LlamaConfig> {
        self.check(cfg)?;
        let arch = Arch {
            family: Family::Llama,
            n_layer: cfg.n_layer,
            hidden: cfg.n_embd,
            n_head: cfg.n_head,
            n_kv_head: self.n_kv_head,
            head_dim: cfg.n_embd / cfg.n_head,
            vocab,
            context: cfg.block_size,
            norm: Norm::RmsNorm { eps: 1e-5 },
            positions: Positions::Rotary(Rope {
                theta: self.rope_theta,
                scaling: RopeScaling::None,
            }),
            mlp: Mlp::GatedSilu {
                intermediate: self.intermediate,
            },
            biases: Biases::NONE,
            qk_norm: false,
            tied_head: true,
            dropout: cfg.dropout,
        };
        arch.validate()?;
        Ok(LlamaConfig {
            arch,
            bos_token_id: None,
            eos_token_ids: Vec::new(),
            pad_token_id: None,
            initializer_range: LLAMA_INIT_STD,
        })
    }
}

/// The model being trained.
#[derive(Debug)]
pub enum Model {
    Gpt(GptConfig),
    Llama(Box<LlamaModel>),
}

/// A Llama-family checkpoint being fine-tuned.
#[derive(Debug)]
pub struct LlamaModel {
    pub cfg: LlamaConfig,
    pub table: LlamaParams,
    /// The initial weights, until uploaded.
    params: Vec<Vec<f32>>,
    /// Its tokenizer, or bare ids when it has none.
    vocab: Vocab,
    /// The AdamW moments a resumed run continues with, until uploaded.
    optimizer: Option<Moments>,
    /// `LLAMA_COPIED` files of the source, read at the start (so `--out` may be the source).
    copied: Vec<(String, Vec<u8>)>,
}

impl LlamaModel {
    /// A fresh model of `cfg`'s shape and `fresh`'s (its vocabulary from the data, later).
    fn fresh(cfg: &TrainConfig, fresh: &FreshLlama) -> Result<LlamaModel> {
        // The shape is checked now, on a placeholder vocabulary of one token; `take_vocab`
        // builds the real table.
        let mut config = fresh.config(cfg, 1)?;
        let table = LlamaParams::new(&config.arch, LLAMA_INIT_STD as f32)?;
        config.arch.vocab = 0; // from the data
        Ok(LlamaModel {
            table,
            cfg: config,
            params: Vec::new(), // drawn at upload, from the run's seed
            vocab: Vocab::Ids(0),
            optimizer: None,
            copied: Vec::new(),
        })
    }

    /// Gives a fresh model the data's vocabulary: the token embedding's rows, and the file
    /// its checkpoints carry so that `sample` decodes text.
    fn take_vocab(&mut self, vocab: &Vocab) -> Result<()> {
        self.cfg.arch.vocab = vocab.size();
        self.cfg.arch.validate()?;
        self.table = LlamaParams::new(&self.cfg.arch, self.cfg.initializer_range as f32)?;
        let (name, bytes) = vocab.to_file()?;
        self.copied.push((name.to_string(), bytes));
        self.vocab = vocab.clone();
        Ok(())
    }

    /// Reads the checkpoint in `dir`: config, weights, tokenizer and the files to copy.
    fn load(dir: &Path, dropout: f32) -> Result<LlamaModel> {
        let ck = hf_weights::load(dir)?;
        let mut copied = Vec::new();
        let vocab = match Vocab::load(dir)? {
            // Ours (a fresh run's vocab.json): carried into every checkpoint of the run.
            Some(v) if !matches!(v, Vocab::Bpe(_)) => {
                let (name, bytes) = v.to_file()?;
                copied.push((name.to_string(), bytes));
                v
            }
            Some(v) => v,
            None => Vocab::Ids(ck.cfg.arch.vocab),
        };
        copied.extend(read_llama_copied(dir)?);
        let mut cfg = ck.cfg;
        cfg.arch.dropout = dropout;
        Ok(LlamaModel {
            cfg,
            table: ck.table,
            params: ck.params,
            optimizer: None,
            vocab,
            copied,
        })
    }

    /// Reads a training checkpoint of a Llama-family run in `dir` to continue it: the weights,
    /// the AdamW moments and the trainer state.
    fn load_resumable(dir: &Path, dropout: f32) -> Result<(LlamaModel, state::TrainerState)> {
        let state = checkpoint::read_state(dir)?;
        let opt_path = dir.join(checkpoint::OPTIMIZER_FILE);
        if !opt_path.is_file() {
            return Err(no_optimizer(dir));
        }
        let mut l = LlamaModel::load(dir, dropout)?;
        l.optimizer = Some(checkpoint::read_moments(&opt_path, &l.table.store_specs())?);
        Ok((l, state))
    }

    /// Writes a checkpoint into `dir` atomically: config.json, `params` as model.safetensors
    /// (f32), the copied files, the AdamW moments and the trainer state (last, as a GPT-2 run
    /// writes it); weight files of another layout left there (an index, shards) are removed
    /// after.
    pub fn save(
        &self,
        dir: &Path,
        params: &[Vec<f32>],
        moments: &Moments,
        state: &state::TrainerState,
    ) -> Result<()> {
        let mut files = llama_files(&self.cfg, &self.table, params, &self.copied)?;
        files.push((
            checkpoint::OPTIMIZER_FILE.to_string(),
            checkpoint::moments_bytes(&self.table.store_specs(), moments)?,
        ));
        // The trainer state last: a checkpoint is a training checkpoint once it is in place.
        files.push((
            checkpoint::STATE_FILE.to_string(),
            state.to_json().into_bytes(),
        ));
        hf_weights::write_atomically(dir, &files)?;
        hf_weights::remove_stale_weights(dir, &files)
    }
}

/// A Llama-family model's files as transformers reads them: config.json, the weights
/// (model.safetensors, f32), the files `copied` from its source or its data (the tokenizer or
/// our vocab.json) and, unless copied, generation_config.json.
pub fn llama_files(
    cfg: &LlamaConfig,
    table: &LlamaParams,
    params: &[Vec<f32>],
    copied: &[(String, Vec<u8>)],
) -> Result<Vec<(String, Vec<u8>)>> {
    let mut files = hf_weights::weight_files(table, params, None)?;
    let config = hf_llama::config_json(cfg)?;
    files.push((
        crate::io::hf::CONFIG_FILE.to_string(),
        serde_json::to_vec_pretty(&config).expect("JSON of a config"),
    ));
    files.extend(copied.iter().cloned());
    if !copied.iter().any(|f| f.0 == hf_weights::GENERATION_FILE) {
        let json = hf_weights::GenerationConfig::json_of(cfg);
        files.push((
            hf_weights::GENERATION_FILE.to_string(),
            serde_json::to_vec_pretty(&json).expect("JSON of a generation config"),
        ));
    }
    Ok(files)
}

impl Model {
    /// (name, shape) of every parameter, in store order.
    pub fn store_specs(&self) -> Vec<(String, Vec<usize>)> {
        match self {
            Model::Gpt(c) => ParamTable::new(c).store_specs(),
            Model::Llama(l) => l.table.store_specs(),
        }
    }

    /// The graph for batches of `b` sequences of `t` tokens, with the adapter `lora` if any.
    pub fn graph(
        &self,
        (b, t): (usize, usize),
        mode: Mode,
        max_binding: u64,
        lora: Option<&LoraPlan>,
    ) -> Result<GptGraph> {
        match self {
            Model::Gpt(c) => Ok(gpt::build_adapted(
                c,
                &ParamTable::new(c),
                lora,
                (b, t),
                mode,
                max_binding,
            )),
            Model::Llama(l) => {
                llama::build_adapted(&l.cfg.arch, &l.table, lora, (b, t), mode, max_binding)
            }
        }
    }

    /// One line for the start of a run.
    pub fn describe(&self) -> String {
        match self {
            Model::Gpt(c) => format!(
                "{} layers, {} heads, {} embd, block {}, vocab {} (padded {}), {:.2}M parameters",
                c.n_layer,
                c.n_head,
                c.n_embd,
                c.block_size,
                c.vocab_size,
                c.padded_vocab(),
                c.num_params() as f64 / 1e6
            ),
            Model::Llama(l) => l.cfg.arch.describe(),
        }
    }

    /// The GPT-2 config, for a GPT-2 model.
    pub fn gpt(&self) -> Option<&GptConfig> {
        match self {
            Model::Gpt(c) => Some(c),
            Model::Llama(_) => None,
        }
    }

    fn vocab_size(&self) -> usize {
        match self {
            Model::Gpt(c) => c.vocab_size,
            Model::Llama(l) => l.cfg.arch.vocab,
        }
    }

    /// The most positions, and the config field that says so.
    fn context(&self) -> (usize, &'static str) {
        match self {
            Model::Gpt(c) => (c.block_size, "n_positions"),
            Model::Llama(l) => (l.cfg.arch.context, "max_position_embeddings"),
        }
    }

    fn padded_vocab(&self) -> usize {
        match self {
            Model::Gpt(c) => c.padded_vocab(),
            Model::Llama(l) => l.cfg.arch.vocab,
        }
    }

    fn training_bytes(&self) -> u128 {
        match self {
            Model::Gpt(c) => c.training_bytes(),
            // Parameters, gradients and two AdamW moments, f32.
            Model::Llama(l) => l
                .cfg
                .arch
                .checked_num_params()
                .map_or(u128::MAX, |n| n as u128 * 16),
        }
    }

    fn validate(&self) -> Result<()> {
        match self {
            Model::Gpt(c) => c.validate(),
            Model::Llama(l) => l.cfg.arch.validate(),
        }
    }
}

/// The error for resuming from a directory without optimizer.safetensors.
fn no_optimizer(dir: &Path) -> Error {
    Error::invalid(
        dir.display().to_string(),
        "has no optimizer.safetensors: cannot resume (use --init to start from it)",
    )
}

/// What a run starts from: the model, its checkpoint (GPT-2), the trainer state of a resumed
/// run, and the LoRA adapter of a fine-tuning run.
pub(super) type Start = (
    Model,
    Option<Checkpoint>,
    Option<state::TrainerState>,
    Option<Adapter>,
);

/// The model a run starts from: continued from a checkpoint (`--resume`, with the trainer state
/// and optimizer moments), initialized from one (`--init`, weights only: ours, transformers'
/// GPT-2 or a Llama-family directory), or fresh; with a LoRA adapter on a frozen `--init` base
/// (or the base of a resumed LoRA run).
pub(super) fn start_model(gpu: &Gpu, cfg: &TrainConfig) -> Result<Start> {
    if adapter::wanted(cfg) {
        return start_adapted(gpu, cfg);
    }
    let (model, ck, state) = start_full(gpu, cfg)?;
    Ok((model, ck, state, None))
}

/// A LoRA run: the base read as `--init` reads it, the adapter fresh, from `--lora`, or resumed.
fn start_adapted(gpu: &Gpu, cfg: &TrainConfig) -> Result<Start> {
    let flags = cfg.lora.clone().unwrap_or_default();
    let (base, resume) = match &cfg.resume {
        Some(dir) if !adapter::is_adapter(dir) => {
            return Err(Error::invalid(
                "--lora",
                format!(
                    "{} is a full training run's checkpoint, not an adapter's: --resume it \
                     without LoRA flags, or start an adapter on it with --init",
                    dir.display()
                ),
            ));
        }
        Some(dir) => (adapter::resumed_base(dir)?, Some(dir.as_path())),
        None => (
            cfg.init.clone().ok_or_else(|| {
                Error::invalid(
                    "--lora",
                    "LoRA trains an adapter on a frozen base checkpoint: name it with --init",
                )
            })?,
            None,
        ),
    };
    let state = resume.map(checkpoint::read_state).transpose()?;
    if let Some(s) = &state {
        gpu.tuner.pin(&s.kernels);
    }
    let (model, ck) = init_model(&base, cfg.dropout)?;
    let ad = Adapter::start(&model, &base, &flags, resume, cfg.seed)?;
    Ok((model, ck, state, Some(ad)))
}

/// The weights of the checkpoint in `dir` to start from (`--init`): ours, transformers' GPT-2 or
/// a Llama-family directory.
fn init_model(dir: &Path, dropout: f32) -> Result<(Model, Option<Checkpoint>)> {
    if hf_llama::is_llama_checkpoint(dir) {
        let l = LlamaModel::load(dir, dropout)?;
        return Ok((Model::Llama(Box::new(l)), None));
    }
    let mut ck = checkpoint::load(dir)?;
    ck.optimizer = None;
    ck.state = None;
    let mut c = ck.cfg.clone();
    c.dropout = dropout;
    Ok((Model::Gpt(c), Some(ck)))
}

/// `start_model` without an adapter.
fn start_full(
    gpu: &Gpu,
    cfg: &TrainConfig,
) -> Result<(Model, Option<Checkpoint>, Option<state::TrainerState>)> {
    if let Some(dir) = &cfg.resume {
        if hf_llama::is_llama_checkpoint(dir) {
            let (l, state) = LlamaModel::load_resumable(dir, cfg.dropout)?;
            gpu.tuner.pin(&state.kernels);
            return Ok((Model::Llama(Box::new(l)), None, Some(state)));
        }
        let ck = checkpoint::load(dir)?;
        let state = ck
            .state
            .clone()
            .ok_or_else(|| checkpoint::not_a_training_checkpoint(dir))?;
        if ck.optimizer.is_none() {
            return Err(no_optimizer(dir));
        }
        // The variants the checkpoint's run computed with win over the cache.
        gpu.tuner.pin(&state.kernels);
        // The checkpoint's dropout is the default (`with_settings`); a --dropout flag applies.
        let mut c = ck.cfg.clone();
        c.dropout = cfg.dropout;
        Ok((Model::Gpt(c), Some(ck), Some(state)))
    } else if let Some(dir) = &cfg.init {
        let (model, ck) = init_model(dir, cfg.dropout)?;
        Ok((model, ck, None))
    } else if let Some(fresh) = &cfg.llama {
        let l = LlamaModel::fresh(cfg, fresh)?;
        Ok((Model::Llama(Box::new(l)), None, None))
    } else {
        let fresh = GptConfig {
            n_layer: cfg.n_layer,
            n_head: cfg.n_head,
            n_embd: cfg.n_embd,
            block_size: cfg.block_size,
            vocab_size: 0, // from the data
            dropout: cfg.dropout,
            bias: cfg.bias,
        };
        Ok((Model::Gpt(fresh), None, None))
    }
}

/// Loads the training data and checks it, the model and the batch shape against each other
/// (and the memory the model needs), before anything touches the GPU. A fresh model takes its
/// vocabulary size from the data.
pub(super) fn load_checked_data(
    cfg: &TrainConfig,
    comm: &Comm,
    model: &mut Model,
    ckpt: Option<&Checkpoint>,
    adapter: Option<&Adapter>,
) -> Result<Dataset> {
    // A checkpoint without a vocabulary (a bare transformers directory) still fixes the token
    // range: token files are checked against it, text cannot be encoded for it.
    let ck_vocab = match &*model {
        Model::Llama(l) if l.cfg.arch.vocab == 0 => None, // fresh
        Model::Llama(l) => Some(l.vocab.clone()),
        Model::Gpt(_) => ckpt.map(|c| c.vocab.clone().unwrap_or(Vocab::Ids(c.cfg.vocab_size))),
    };
    let data = load_data(cfg, ck_vocab.as_ref())?;
    match model {
        Model::Gpt(c) if c.vocab_size == 0 => c.vocab_size = data.vocab.size(),
        Model::Llama(l) if l.cfg.arch.vocab == 0 => l.take_vocab(&data.vocab)?,
        _ => {}
    }
    let model = &*model;
    if let Some(id) = data.train.iter().chain(&data.val).copied().max()
        && id as usize >= model.vocab_size()
    {
        return Err(Error::invalid(
            "--data",
            format!(
                "token id {id} of the data is outside the model's vocabulary of {}",
                model.vocab_size()
            ),
        ));
    }
    if let Model::Gpt(c) = model
        && data.vocab.size() > c.vocab_size
    {
        return Err(Error::invalid(
            "--data",
            format!(
                "the data's vocabulary has {} tokens, more than the model's {}",
                data.vocab.size(),
                c.vocab_size
            ),
        ));
    }
    model.validate()?;
    let (b, t) = (cfg.batch_size, cfg.block_size);
    let (context, field) = model.context();
    if t > context {
        return Err(Error::invalid(
            "--block-size",
            format!("{t} is beyond the model's position table of {context} ({field})"),
        ));
    }
    if b == 0 || t == 0 || cfg.grad_accum == 0 {
        return Err(Error::invalid(
            "train",
            "--batch-size, --block-size and --grad-accum must be at least 1",
        ));
    }
    let data_name = cfg
        .data
        .as_ref()
        .map_or("embedded dataset".to_string(), |p| p.display().to_string());
    data.check_fits(&data_name, t)?;
    crate::sizes::bytes(
        "the logits of one micro-batch",
        &[
            ("--batch-size", b as u64),
            ("--block-size", t as u64),
            ("padded vocabulary", model.padded_vocab() as u64),
            ("bytes per value", 4),
        ],
    )?;
    super::check_ranks_fed(comm, cfg, data.train.len())?;
    crate::memory::check(
        "the model's parameters, gradients and AdamW moments",
        adapter.map_or_else(|| model.training_bytes(), Adapter::training_bytes),
    )?;
    Ok(data)
}

/// The parameters (and, when resuming, the AdamW moments) on the GPU, checked to be the same on
/// every rank; with an adapter, the base's frozen and the adapter's after them. The initial
/// copies on the CPU are dropped once uploaded.
pub(super) fn upload_params(
    gpu: &Gpu,
    cfg: &TrainConfig,
    comm: &Comm,
    (model, ckpt): (&mut Model, &mut Option<Checkpoint>),
    adapter: Option<&mut Adapter>,
) -> Result<ParamStore> {
    let init_params = match (&mut *model, &ckpt) {
        // A fresh model, initialized as transformers' LlamaPreTrainedModel is.
        (Model::Llama(l), _) if l.params.is_empty() => l.table.init(cfg.seed),
        (Model::Llama(l), _) => std::mem::take(&mut l.params),
        (Model::Gpt(_), Some(ck)) => ck.params.clone(),
        (Model::Gpt(c), None) => ParamTable::new(c).init(c, cfg.seed),
    };
    let (store, moments) = match adapter {
        Some(ad) => {
            let mut values = init_params;
            values.append(&mut ad.values);
            let specs = ad.plan.store_specs();
            let store = ParamStore::with_frozen(gpu, &specs, &values, &ad.plan.trained())?;
            (store, ad.take_moments())
        }
        None => {
            let store = ParamStore::new(gpu, &model.store_specs(), &init_params, true)?;
            drop(init_params);
            let moments = match (&mut *model, &mut *ckpt) {
                (Model::Llama(l), _) => l.optimizer.take(),
                (Model::Gpt(_), Some(ck)) => ck.optimizer.take(),
                (Model::Gpt(_), None) => None,
            };
            (store, moments)
        }
    };
    if let Some((m, v)) = &moments {
        ParamStore::write(gpu, &store.m, m)?;
        ParamStore::write(gpu, &store.v, v)?;
    }
    drop(moments);
    // Every rank initialized from the same seed or loaded the same checkpoint: verify.
    parallel::check_same_weights(comm, gpu, &store, "at the start")?;
    if let Some(ck) = ckpt {
        ck.params = Vec::new();
        ck.optimizer = None;
    }
    Ok(store)
}
