//! Training: nanoGPT's loop on the GPU. Data, schedule, checkpoints, evaluation, metrics.

pub mod addition;
pub mod checkpoint;
pub mod data;
pub mod parallel;
mod progress;
pub mod schedule;
pub mod state;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use serde_json::json;

use crate::dist::Comm;
use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::graph::{ExecOptions, Executor, GradientSync, MicroBatch, NodeCheck, ParamStore, Shard};
use crate::io::vocab::Vocab;
use crate::kernels::adamw;
use crate::model::gpt::{self, Mode};
use crate::model::{GptConfig, ParamTable};
use checkpoint::Checkpoint;
use data::{Dataset, Loader, LoaderKind};
use progress::Progress;
use schedule::LrSchedule;

/// Everything `shaderformer train` takes (nanoGPT's names).
#[derive(Clone, Debug)]
pub struct TrainConfig {
    /// Text or token file; `None` trains on the embedded addition dataset.
    pub data: Option<PathBuf>,
    pub out: PathBuf,
    /// Write the checkpoint into `out` even when it holds other files (never touching them).
    pub overwrite: bool,
    pub init: Option<PathBuf>,
    pub resume: Option<PathBuf>,
    pub n_layer: usize,
    pub n_head: usize,
    pub n_embd: usize,
    pub block_size: usize,
    pub bias: bool,
    pub dropout: f32,
    pub batch_size: usize,
    pub grad_accum: usize,
    pub max_iters: u64,
    pub schedule: LrSchedule,
    pub weight_decay: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub grad_clip: f32,
    pub seed: u64,
    pub eval_interval: u64,
    pub eval_iters: usize,
    pub log_interval: u64,
    pub loader: LoaderKind,
    pub metrics: Option<PathBuf>,
    /// Debug: one buffer per activation instead of the planner's reuse.
    pub no_reuse: bool,
    /// Debug: check every node of the first micro-step against its CPU reference first.
    pub validate: bool,
    /// Print progress (a bar on a terminal, log lines otherwise).
    pub verbose: bool,
}

impl TrainConfig {
    /// The optimizer's hyper-parameters (the learning rate comes from the schedule, per step).
    pub fn adamw(&self) -> adamw::Hyper {
        adamw::Hyper {
            beta1: self.beta1,
            beta2: self.beta2,
            eps: self.eps,
            weight_decay: self.weight_decay,
            grad_clip: self.grad_clip,
        }
    }
}

impl Default for TrainConfig {
    /// nanoGPT's small CPU configuration for tiny shakespeare.
    fn default() -> Self {
        TrainConfig {
            data: None,
            out: PathBuf::from("out"),
            overwrite: false,
            init: None,
            resume: None,
            n_layer: 4,
            n_head: 4,
            n_embd: 128,
            block_size: 64,
            bias: true,
            dropout: 0.0,
            batch_size: 12,
            grad_accum: 1,
            max_iters: 2000,
            schedule: LrSchedule {
                kind: schedule::Schedule::Cosine,
                lr: 1e-3,
                min_lr: 1e-4,
                warmup_iters: 100,
                lr_decay_iters: 2000,
            },
            weight_decay: 0.1,
            beta1: 0.9,
            beta2: 0.99,
            eps: 1e-8,
            grad_clip: 1.0,
            seed: 1337,
            eval_interval: 250,
            eval_iters: 20,
            log_interval: 10,
            loader: LoaderKind::Random,
            metrics: None,
            no_reuse: false,
            validate: false,
            verbose: true,
        }
    }
}

/// What a finished run reports.
#[derive(Clone, Debug)]
pub struct TrainSummary {
    /// Optimizer steps this run took (after a resume: only the new ones).
    pub steps: u64,
    /// The step the run ended at.
    pub final_step: u64,
    pub final_train_loss: Option<f32>,
    pub final_val_loss: Option<f32>,
    pub seconds: f64,
    /// Wall-clock ms per step run, evaluations and checkpoints left out.
    pub ms_per_step: f64,
    pub tokens_per_step: usize,
    /// True when stopped early by Ctrl-C (a checkpoint was written).
    pub interrupted: bool,
    pub cfg: GptConfig,
}

static INTERRUPTS: AtomicUsize = AtomicUsize::new(0);
#[cfg(not(target_arch = "wasm32"))]
static HANDLER: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// A browser tab has no Ctrl-C: its page stops training between steps instead.
#[cfg(target_arch = "wasm32")]
fn install_interrupt_handler() {}

/// First Ctrl-C: finish the current step, write a checkpoint, stop. Second: exit at once (the
/// checkpoint on disk is whole either way, since writes are atomic).
#[cfg(not(target_arch = "wasm32"))]
fn install_interrupt_handler() {
    if HANDLER.swap(true, Ordering::SeqCst) {
        return;
    }
    let _ = ctrlc::set_handler(|| {
        if INTERRUPTS.fetch_add(1, Ordering::SeqCst) >= 1 {
            eprintln!("\ninterrupted again: exiting without waiting");
            std::process::exit(130);
        }
        eprintln!(
            "\ninterrupted: stopping after this step and writing a checkpoint (Ctrl-C again to quit now)"
        );
    });
}

fn interrupted() -> bool {
    INTERRUPTS.load(Ordering::SeqCst) > 0
}

/// The dataset named by `cfg.data`, or the embedded addition problems.
pub fn load_data(cfg: &TrainConfig, vocab: Option<&Vocab>) -> Result<Dataset> {
    match &cfg.data {
        Some(path) => Dataset::load(path, vocab),
        None => {
            // Enough lines that a sequential run reads each batch from fresh, line-aligned text;
            // a multiple of 10 so the 90/10 split falls on a line boundary.
            let needed =
                cfg.max_iters as usize * cfg.batch_size * cfg.grad_accum + cfg.batch_size + 2;
            let lines = (needed * 10 / 9 + 1).max(60_000).next_multiple_of(10);
            let text = addition::text(lines, cfg.seed);
            let mut d = Dataset::from_text("embedded addition dataset", &text, vocab)?;
            d.description = format!(
                "embedded addition dataset: {lines} problems like {} (47+85=132, digits least \
                 significant first), {}-character vocabulary",
                addition::line(47, 85),
                d.vocab.size()
            );
            Ok(d)
        }
    }
}

/// Mean loss over `iters` batches drawn from `split` (the way training draws them) by a loader
/// started afresh at every evaluation, so successive evaluations compare like with like and the
/// training stream is untouched. The ranks share the batches (rank r takes every N-th from the
/// r-th), so any number of ranks evaluates the same batches.
fn evaluate(exec: &mut Executor, split: &[u32], cfg: &TrainConfig, comm: &Comm) -> Result<f32> {
    let (b, t, iters) = (cfg.batch_size, cfg.block_size, cfg.eval_iters);
    let mut loader = Loader::new(cfg.loader, b, t, cfg.seed ^ 0xE7A1_0000);
    let mut sum = 0.0f64;
    for i in 0..iters {
        let batch = loader.next(split);
        if i % comm.size() == comm.rank() {
            sum += exec.forward_loss(&batch)? as f64;
        }
    }
    let sum = parallel::sum_over_ranks(comm, sum)?;
    // check_settings keeps iters >= 1.
    Ok((sum / iters as f64) as f32)
}

/// Rejects settings no run can use, naming the flag: rates and decay that are negative or not
/// finite (a NaN learning rate would turn every parameter into NaN at the first update), no
/// steps, no evaluation batches, AdamW betas outside [0, 1), a block shorter than one line of
/// the addition dataset.
fn check_settings(cfg: &TrainConfig) -> Result<()> {
    for (flag, x) in [("--beta1", cfg.beta1), ("--beta2", cfg.beta2)] {
        if !(0.0..1.0).contains(&x) {
            return Err(Error::invalid(flag, format!("{x} is not in [0, 1)")));
        }
    }
    if cfg.data.is_none() && cfg.block_size < addition::LINE {
        return Err(Error::invalid(
            "--block-size",
            format!(
                "{} is shorter than one line of the addition dataset ({} tokens)",
                cfg.block_size,
                addition::LINE
            ),
        ));
    }
    let s = &cfg.schedule;
    for (flag, x) in [
        ("--lr", s.lr),
        ("--min-lr", s.min_lr),
        ("--weight-decay", cfg.weight_decay),
        ("--grad-clip", cfg.grad_clip),
    ] {
        if !(x.is_finite() && x >= 0.0) {
            return Err(Error::invalid(flag, format!("{x} must be finite and >= 0")));
        }
    }
    if !(cfg.eps.is_finite() && cfg.eps > 0.0) {
        return Err(Error::invalid(
            "--eps",
            format!("{} must be finite and > 0", cfg.eps),
        ));
    }
    for (flag, x) in [
        ("--max-iters", cfg.max_iters),
        ("--eval-iters", cfg.eval_iters as u64),
        ("--log-interval", cfg.log_interval),
    ] {
        if x == 0 {
            return Err(Error::invalid(flag, "must be at least 1"));
        }
    }
    Ok(())
}

/// Whether two paths name the same existing directory.
fn same_dir(a: &Path, b: &Path) -> bool {
    match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

/// Trains. Returns the summary, or an error (bad input, divergence) after which the last
/// checkpoint on disk is intact.
pub fn train(gpu: &Gpu, cfg: &TrainConfig) -> Result<TrainSummary> {
    train_on(gpu, cfg, &Comm::single())
}

/// Refuses a number of ranks the training split cannot give distinct batches to.
fn check_ranks_fed(comm: &Comm, cfg: &TrainConfig, train_tokens: usize) -> Result<()> {
    let n = comm.size();
    let need = n * cfg.batch_size * cfg.block_size + 1;
    if n > 1 && train_tokens < need {
        return Err(Error::invalid(
            "-np",
            format!(
                "{n} ranks x --batch-size {} x --block-size {} need {need} tokens of training \
                 data per round of batches, but the train split holds {train_tokens}: use fewer \
                 ranks or a smaller --batch-size",
                cfg.batch_size, cfg.block_size
            ),
        ));
    }
    Ok(())
}

/// `train`, as rank `comm.rank()` of a data-parallel job of `comm.size()` ranks: each rank reads
/// its share of every global batch, gradients are summed across ranks between backward and
/// update, and rank 0 alone logs and writes metrics and checkpoints.
pub fn train_on(gpu: &Gpu, cfg: &TrainConfig, comm: &Comm) -> Result<TrainSummary> {
    let t0 = Instant::now();
    check_settings(cfg)?;
    parallel::check_same_settings(comm, cfg)?;
    // Other ranks are silent and write nothing.
    let quiet;
    let cfg = if comm.is_root() {
        cfg
    } else {
        quiet = TrainConfig {
            verbose: false,
            metrics: None,
            ..cfg.clone()
        };
        &quiet
    };
    install_interrupt_handler();
    Trainer::new(gpu, cfg, comm)?.run(t0)
}

/// The model a run starts from: continued from a checkpoint (`--resume`, with the trainer state
/// and optimizer moments), initialized from one (`--init`, weights only), or fresh.
fn start_model(
    gpu: &Gpu,
    cfg: &TrainConfig,
) -> Result<(GptConfig, Option<Checkpoint>, Option<state::TrainerState>)> {
    if let Some(dir) = &cfg.resume {
        let ck = checkpoint::load(dir)?;
        let state = ck
            .state
            .clone()
            .ok_or_else(|| checkpoint::not_a_training_checkpoint(dir))?;
        if ck.optimizer.is_none() {
            return Err(Error::invalid(
                dir.display().to_string(),
                "has no optimizer.safetensors: cannot resume (use --init to start from it)",
            ));
        }
        // The variants the checkpoint's run computed with win over the cache.
        gpu.tuner.pin(&state.kernels);
        // The checkpoint's dropout is the default (`with_settings`); a --dropout flag applies.
        let mut c = ck.cfg.clone();
        c.dropout = cfg.dropout;
        Ok((c, Some(ck), Some(state)))
    } else if let Some(dir) = &cfg.init {
        let mut ck = checkpoint::load(dir)?;
        ck.optimizer = None;
        ck.state = None;
        let mut c = ck.cfg.clone();
        c.dropout = cfg.dropout;
        Ok((c, Some(ck), None))
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
        Ok((fresh, None, None))
    }
}

/// Loads the training data and checks it, the model and the batch shape against each other
/// (and the memory the model needs), before anything touches the GPU. A fresh model takes its
/// vocabulary size from the data.
fn load_checked_data(
    cfg: &TrainConfig,
    comm: &Comm,
    model_cfg: &mut GptConfig,
    ckpt: Option<&Checkpoint>,
) -> Result<Dataset> {
    // A checkpoint without a vocabulary (a bare transformers directory) still fixes the token
    // range: token files are checked against it, text cannot be encoded for it.
    let ck_vocab = ckpt.map(|c| c.vocab.clone().unwrap_or(Vocab::Ids(c.cfg.vocab_size)));
    let data = load_data(cfg, ck_vocab.as_ref())?;
    if model_cfg.vocab_size == 0 {
        model_cfg.vocab_size = data.vocab.size();
    }
    if data.vocab.size() > model_cfg.vocab_size {
        return Err(Error::invalid(
            "--data",
            format!(
                "the data's vocabulary has {} tokens, more than the model's {}",
                data.vocab.size(),
                model_cfg.vocab_size
            ),
        ));
    }
    model_cfg.validate()?;
    let (b, t) = (cfg.batch_size, cfg.block_size);
    if t > model_cfg.block_size {
        return Err(Error::invalid(
            "--block-size",
            format!(
                "{t} is beyond the model's position table of {} (n_positions)",
                model_cfg.block_size
            ),
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
    check_ranks_fed(comm, cfg, data.train.len())?;
    crate::memory::check(
        "the model's parameters, gradients and AdamW moments",
        model_cfg.training_bytes(),
    )?;
    Ok(data)
}

/// Claims the output directory (rank 0 writes it) before the first step, not at the first
/// checkpoint.
fn claim_out(cfg: &TrainConfig, comm: &Comm) -> Result<Option<checkpoint::OutDir>> {
    comm.is_root()
        .then(|| {
            checkpoint::open_out(
                &cfg.out,
                checkpoint::OutPolicy {
                    other_files: cfg.overwrite
                        || [&cfg.init, &cfg.resume]
                            .into_iter()
                            .flatten()
                            .any(|d| same_dir(d, &cfg.out)),
                    own_file: cfg.metrics.as_deref(),
                },
            )
        })
        .transpose()
}

/// The parameters (and, when resuming, the AdamW moments) on the GPU, checked to be the same on
/// every rank. The checkpoint's copies on the CPU are dropped once uploaded.
fn upload_params(
    gpu: &Gpu,
    cfg: &TrainConfig,
    comm: &Comm,
    model_cfg: &GptConfig,
    table: &ParamTable,
    ckpt: &mut Option<Checkpoint>,
) -> Result<ParamStore> {
    let init_params = match &ckpt {
        Some(ck) => ck.params.clone(),
        None => table.init(model_cfg, cfg.seed),
    };
    let store = ParamStore::new(gpu, &table.store_specs(), &init_params, true)?;
    if let Some((m, v)) = ckpt.as_ref().and_then(|c| c.optimizer.as_ref()) {
        ParamStore::write(gpu, &store.m, m)?;
        ParamStore::write(gpu, &store.v, v)?;
    }
    drop(init_params);
    // Every rank initialized from the same seed or loaded the same checkpoint: verify.
    parallel::check_same_weights(comm, gpu, &store, "at the start")?;
    if let Some(ck) = ckpt {
        ck.params = Vec::new();
        ck.optimizer = None;
    }
    Ok(store)
}

/// The training and evaluation executors over the parameters in `store`.
fn build_executors<'g>(
    gpu: &'g Gpu,
    cfg: &TrainConfig,
    comm: &Comm,
    model_cfg: &GptConfig,
    table: &ParamTable,
    store: &ParamStore,
) -> Result<(Executor<'g>, Executor<'g>)> {
    let (b, t) = (cfg.batch_size, cfg.block_size);
    let opts = ExecOptions {
        reuse: !cfg.no_reuse,
        grad_accum: cfg.grad_accum,
        adamw: cfg.adamw(),
        seed: cfg.seed as u32,
        shard: Shard {
            rank: comm.rank(),
            ranks: comm.size(),
        },
    };
    let build = || -> Result<(Executor, Executor)> {
        let train_graph = gpt::build_for(model_cfg, table, b, t, Mode::Train, gpu.max_binding());
        let exec = Executor::new(gpu, train_graph.graph, store, opts.clone())?;
        let eval_graph = gpt::build_for(model_cfg, table, b, t, Mode::Eval, gpu.max_binding());
        let eval_exec = Executor::new(gpu, eval_graph.graph, store, opts.clone())?;
        Ok((exec, eval_exec))
    };
    if comm.size() == 1 {
        return build();
    }
    // Kernel variants chosen by timing could differ between ranks, and so would their bits:
    // rank 0 chooses (building first), the others compute with its choices.
    let root = if comm.is_root() { Some(build()?) } else { None };
    let used = serde_json::to_vec(&gpu.tuner.used()).expect("JSON of kernel choices");
    let choices = comm.all_gather_bytes(&used)?;
    match root {
        Some(built) => Ok(built),
        None => {
            gpu.tuner.pin(
                &serde_json::from_slice(&choices[0])
                    .map_err(|e| Error::invalid("kernel choices of rank 0", e.to_string()))?,
            );
            build()
        }
    }
}

/// `--validate`: a throwaway batch (not from the loader, so training is unchanged) checked node
/// by node against the CPU reference.
fn validate_nodes(exec: &mut Executor, cfg: &TrainConfig, data: &Dataset) -> Result<()> {
    let mut probe = Loader::new(
        LoaderKind::Random,
        cfg.batch_size,
        cfg.block_size,
        cfg.seed ^ 0x5A11,
    );
    let checks = exec.validate(&probe.next(&data.train))?;
    let bad = NodeCheck::mismatches(&checks);
    if cfg.verbose {
        println!(
            "validate: {} outputs of {} nodes checked against the CPU reference, {} mismatched",
            checks.len(),
            checks
                .iter()
                .map(|c| c.node)
                .collect::<std::collections::HashSet<_>>()
                .len(),
            bad.len()
        );
    }
    if !bad.is_empty() {
        return Err(Error::invalid("--validate", bad.join("; ")));
    }
    Ok(())
}

/// This rank's loader, and the step to start from: continued where a resumed checkpoint left
/// off (exactly when it was written by as many ranks, else at its global batch, the number of
/// ranks it was written by returned too), or from the start.
fn start_loader(
    cfg: &TrainConfig,
    comm: &Comm,
    start_state: Option<&state::TrainerState>,
) -> Result<(Loader, u64, Option<usize>)> {
    let (b, t) = (cfg.batch_size, cfg.block_size);
    let mut loader = Loader::sharded(cfg.loader, b, t, cfg.seed, comm.rank(), comm.size());
    let Some(state) = start_state else {
        return Ok((loader, 0, None));
    };
    let step = state.step;
    let mut rank_change = None;
    if state.ranks == comm.size() {
        match comm.rank() {
            0 => loader.restore(&state.loader)?,
            r => loader.restore(state.rank_loaders.get(r - 1).ok_or_else(|| {
                Error::invalid(
                    "--resume",
                    format!("the checkpoint has no loader state for rank {r}"),
                )
            })?)?,
        }
    } else {
        loader.restore_position(state.loader.position, cfg.seed);
        rank_change = Some(state.ranks);
    }
    if step >= cfg.max_iters {
        return Err(Error::invalid(
            "--max-iters",
            format!(
                "the checkpoint is at step {step} and --max-iters is {}: nothing left to \
                 train (give a larger --max-iters to continue)",
                cfg.max_iters
            ),
        ));
    }
    Ok((loader, step, rank_change))
}

/// A training run set up on one rank: the model's parameters on the GPU, its data, the training
/// and evaluation executors, and the loader and the step it is at.
struct Trainer<'a> {
    gpu: &'a Gpu,
    cfg: &'a TrainConfig,
    comm: &'a Comm,
    model_cfg: GptConfig,
    data: Dataset,
    store: ParamStore,
    exec: Executor<'a>,
    eval_exec: Executor<'a>,
    loader: Loader,
    /// The last step taken (or the resumed checkpoint's).
    step: u64,
    grad_sum: parallel::GradientSum<'a>,
    last_val: Option<f32>,
    /// The claimed output directory (rank 0's), held for the run.
    _out: Option<checkpoint::OutDir>,
}

impl<'a> Trainer<'a> {
    /// Everything before the first step: the model, the data, the checks that need no GPU, the
    /// output directory, the parameters and executors on the GPU, the loader; then says what
    /// will run.
    fn new(gpu: &'a Gpu, cfg: &'a TrainConfig, comm: &'a Comm) -> Result<Trainer<'a>> {
        let (mut model_cfg, mut ckpt, start_state) = start_model(gpu, cfg)?;
        let data = load_checked_data(cfg, comm, &mut model_cfg, ckpt.as_ref())?;
        // Everything is checked that can be without the GPU.
        let out = claim_out(cfg, comm)?;
        let table = ParamTable::new(&model_cfg);
        table.check_fits(gpu)?;
        let store = upload_params(gpu, cfg, comm, &model_cfg, &table, &mut ckpt)?;
        let (mut exec, eval_exec) = build_executors(gpu, cfg, comm, &model_cfg, &table, &store)?;
        if cfg.validate {
            validate_nodes(&mut exec, cfg, &data)?;
        }
        let (loader, step, rank_change) = start_loader(cfg, comm, start_state.as_ref())?;
        let places =
            comm.all_gather_bytes(format!("{}\t{}", comm.host(), gpu.adapter_name()).as_bytes())?;
        let trainer = Trainer {
            gpu,
            cfg,
            comm,
            model_cfg,
            data,
            store,
            exec,
            eval_exec,
            loader,
            step,
            grad_sum: parallel::GradientSum {
                comm,
                timing: Default::default(),
            },
            last_val: None,
            _out: out,
        };
        trainer.announce(&places, rank_change);
        Ok(trainer)
    }

    fn say(&self, s: String) {
        if self.cfg.verbose {
            println!("{s}");
        }
    }

    /// Prints the ranks (or the adapter), the data, the model, the memory, the global batch and
    /// where a resumed run continues. `places` holds each rank's host and adapter.
    fn announce(&self, places: &[Vec<u8>], rank_change: Option<usize>) {
        let (cfg, comm, model_cfg) = (self.cfg, self.comm, &self.model_cfg);
        let (b, t, step) = (cfg.batch_size, cfg.block_size, self.step);
        if comm.size() > 1 {
            self.say(format!("ranks: {} (MPI)", comm.size()));
            for (r, p) in places.iter().enumerate() {
                let p = String::from_utf8_lossy(p);
                let (host, adapter) = p.split_once('\t').unwrap_or((&p, "?"));
                self.say(format!("  rank {r}: host {host}, adapter {adapter}"));
            }
        } else {
            self.say(format!("adapter: {}", self.gpu.adapter_name()));
        }
        self.say(format!("data: {}", self.data.description));
        self.say(format!(
            "model: {} layers, {} heads, {} embd, block {}, vocab {} (padded {}), {:.2}M parameters",
            model_cfg.n_layer,
            model_cfg.n_head,
            model_cfg.n_embd,
            model_cfg.block_size,
            model_cfg.vocab_size,
            model_cfg.padded_vocab(),
            model_cfg.num_params() as f64 / 1e6
        ));
        self.say(format!(
            "memory: parameters + gradients + AdamW {:.1} MiB; activations planned {:.1} MiB (without reuse {:.1} MiB)",
            self.store.bytes() as f64 / 1048576.0,
            self.exec.plan.planned_bytes as f64 / 1048576.0,
            self.exec.plan.unplanned_bytes as f64 / 1048576.0
        ));
        self.say(format!(
            "global batch: {} ranks x {b} sequences x {} micro-steps x {t} tokens = {} tokens per step",
            comm.size(),
            cfg.grad_accum,
            comm.size() * b * cfg.grad_accum * t
        ));
        if step > 0 {
            self.say(format!("resuming at step {step}"));
        }
        if let Some(was) = rank_change {
            self.say(format!(
                "the checkpoint was written by {was} ranks, this run has {}: the loader continues \
                 at global batch {}{}",
                comm.size(),
                self.loader.position,
                if cfg.loader == LoaderKind::Random {
                    " with fresh per-rank random streams"
                } else {
                    ""
                }
            ));
        }
    }

    /// Steps until `--max-iters` (or Ctrl-C), evaluating and saving every `--eval-interval`
    /// steps and at the end; `t0` is when the run began.
    fn run(mut self, t0: Instant) -> Result<TrainSummary> {
        let cfg = self.cfg;
        let mut run = Progress::new(cfg, self.comm, self.step)?;
        let first_step = self.step + 1;
        let mut last_submit = Instant::now();
        // The loop's wall time without evaluations and checkpoints, over the steps run.
        // (Intervals between submissions would undercount the first steps, which the readback
        // ring lets through without waiting.)
        let (loop_t0, mut pause) = (Instant::now(), std::time::Duration::ZERO);
        let mut was_interrupted = false;
        while self.step < cfg.max_iters {
            self.take_step()?;
            let now = Instant::now();
            let ms = now.duration_since(last_submit).as_secs_f64() * 1e3;
            last_submit = now;
            run.ms_of.push_back((self.step, ms));
            run.handle(self.exec.poll()?)?;

            let step = self.step;
            let eval_now = cfg.eval_interval > 0 && step.is_multiple_of(cfg.eval_interval);
            // Every rank stops at the same step (a Ctrl-C may reach them apart).
            let stop = self.comm.any(interrupted())?;
            if eval_now || step == cfg.max_iters || stop {
                // Never checkpoint parameters a diverged step may have touched.
                run.handle(self.exec.wait_results()?)?;
                let paused = Instant::now();
                self.evaluate_and_save(&mut run, eval_now || step == cfg.max_iters)?;
                pause += paused.elapsed();
                last_submit = Instant::now();
                if stop {
                    was_interrupted = true;
                    break;
                }
            }
        }
        run.handle(self.exec.wait_results()?)?;
        if let Some(pb) = &run.bar {
            pb.finish_and_clear();
        }
        let step = self.step;
        let ms_per_step = if step >= first_step {
            (loop_t0.elapsed() - pause).as_secs_f64() * 1e3 / (step + 1 - first_step) as f64
        } else {
            0.0
        };
        if self.grad_sum.timing.steps > 0 {
            run.log(self.grad_sum.timing.summary(ms_per_step));
        }
        Ok(TrainSummary {
            steps: step + 1 - first_step,
            final_step: step,
            final_train_loss: run.last_loss,
            final_val_loss: self.last_val,
            seconds: t0.elapsed().as_secs_f64(),
            ms_per_step,
            tokens_per_step: run.tokens_per_step,
            interrupted: was_interrupted,
            cfg: self.model_cfg,
        })
    }

    /// One optimizer step: `--grad-accum` micro-batches forward and backward, the gradients
    /// summed across ranks, AdamW at the scheduled rate. Submitted, not waited for.
    fn take_step(&mut self) -> Result<()> {
        let cfg = self.cfg;
        self.step += 1;
        let step = self.step;
        let micro: Vec<MicroBatch> = (0..cfg.grad_accum)
            .map(|_| self.loader.next(&self.data.train))
            .collect();
        let sync = (self.comm.size() > 1).then_some(&mut self.grad_sum as &mut dyn GradientSync);
        self.exec
            .step_synced(&micro, cfg.schedule.at(step - 1), step as u32, sync)
    }

    /// With `evaluate`: checks the ranks' weights agree and logs the train and validation
    /// losses (an error if either is not finite). Then writes the checkpoint and the loss plot.
    fn evaluate_and_save(&mut self, run: &mut Progress, evaluate: bool) -> Result<()> {
        let step = self.step;
        if evaluate {
            self.evaluate(run)?;
        }
        self.save()?;
        run.last_ckpt = Some((self.cfg.out.clone(), step));
        if self.comm.is_root() {
            run.metrics.plot(&self.cfg.out)?;
        }
        run.log(format!(
            "checkpoint: {} (step {step})",
            self.cfg.out.display()
        ));
        Ok(())
    }

    /// The train and validation losses now, logged and written to the metrics.
    fn evaluate(&mut self, run: &mut Progress) -> Result<()> {
        let (cfg, comm, step) = (self.cfg, self.comm, self.step);
        let when = format!("at step {step}");
        if let Some(h) = parallel::check_same_weights(comm, self.gpu, &self.store, &when)? {
            run.log(format!(
                "step {step:>6}: weights identical on all {} ranks (checksum {h:016x})",
                comm.size()
            ));
        }
        let tl = evaluate(&mut self.eval_exec, &self.data.train, cfg, comm)?;
        let vl = evaluate(&mut self.eval_exec, &self.data.val, cfg, comm)?;
        if !(tl.is_finite() && vl.is_finite()) {
            return Err(run.diverged(format!(
                "by step {step}: evaluation loss {tl} (train), {vl} (val)"
            )));
        }
        run.log(format!(
            "step {step:>6}: train loss {tl:.4}, val loss {vl:.4}"
        ));
        run.metrics
            .write(json!({"step": step, "val_loss": vl, "train_loss": tl}))?;
        self.last_val = Some(vl);
        Ok(())
    }

    /// Writes the checkpoint at this step (rank 0), with every rank's loader state, so that the
    /// same number of ranks continues bit for bit.
    fn save(&self) -> Result<()> {
        let (gpu, comm, store) = (self.gpu, self.comm, &self.store);
        let states = comm.all_gather_bytes(
            &serde_json::to_vec(&self.loader.state()).expect("JSON of a loader state"),
        )?;
        if !comm.is_root() {
            return Ok(());
        }
        let rank_loaders = states[1..]
            .iter()
            .map(|b| {
                serde_json::from_slice(b)
                    .map_err(|e| Error::invalid("loader state of a rank", e.to_string()))
            })
            .collect::<Result<Vec<_>>>()?;
        let read = |views| ParamStore::read(gpu, views);
        checkpoint::save(
            &self.cfg.out,
            &Checkpoint {
                cfg: self.model_cfg.clone(),
                params: read(&store.params)?,
                optimizer: Some((read(&store.m)?, read(&store.v)?)),
                state: Some(state::TrainerState {
                    step: self.step,
                    loader: self.loader.state(),
                    data_description: self.data.description.clone(),
                    config: self.cfg.settings(),
                    kernels: gpu.tuner.used(),
                    ranks: comm.size(),
                    rank_loaders,
                }),
                vocab: Some(self.data.vocab.clone()),
            },
        )
    }
}
