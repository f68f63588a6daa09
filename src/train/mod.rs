//! Training: nanoGPT's loop on the GPU. Data, schedule, checkpoints, evaluation, metrics.

pub mod adapter;
pub mod addition;
pub mod checkpoint;
mod checks;
pub mod data;
pub mod metrics;
pub mod model;
pub mod parallel;
pub mod schedule;
pub mod state;

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use serde_json::json;

use crate::dist::Comm;
use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::graph::recompute::Recompute;
use crate::graph::saved::ActivationDtype;
use crate::graph::{
    ExecOptions, Executor, GradientSync, MicroBatch, NodeCheck, ParamStore, Shard, StepResult,
};
use crate::io::vocab::Vocab;
use crate::kernels::adamw;
use crate::model::GptConfig;
use crate::model::gpt::Mode;
use checkpoint::Checkpoint;
pub use checks::check_settings;
use checks::dropped_kernels;
use data::{Dataset, Loader, LoaderKind};
use metrics::Metrics;
pub use model::FreshLlama;
use model::Model;
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
    /// Recompute each block's activations in its backward instead of keeping them.
    pub recompute: Recompute,
    /// How the activations saved for the backward are stored.
    pub activation_dtype: ActivationDtype,
    /// Debug: check every node of the first micro-step against its CPU reference first.
    pub validate: bool,
    /// Print progress (a bar on a terminal, log lines otherwise).
    pub verbose: bool,
    /// A fresh model is Llama-shaped (`--arch llama`) with these settings; `None`: GPT-2.
    /// A checkpoint (`init`, `resume`) fixes its own architecture.
    pub llama: Option<FreshLlama>,
    /// Train a LoRA adapter on the frozen `--init` checkpoint (`--lora-*` flags).
    pub lora: Option<adapter::LoraFlags>,
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
            recompute: Recompute::None,
            activation_dtype: ActivationDtype::F32,
            validate: false,
            verbose: true,
            llama: None,
            lora: None,
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
    /// The GPT-2 model trained (`None` for a Llama-family one).
    pub cfg: Option<GptConfig>,
    /// Whether the run trained a LoRA adapter (its checkpoint is the adapter).
    pub lora: bool,
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
        crate::gpu::signal::request_stop();
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

/// Logging, metrics and the divergence check, as step results arrive.
struct Progress<'a> {
    cfg: &'a TrainConfig,
    bar: Option<indicatif::ProgressBar>,
    metrics: Metrics,
    /// Wall-clock ms of each submitted step whose results have not arrived yet.
    ms_of: std::collections::VecDeque<(u64, f64)>,
    last_loss: Option<f32>,
    /// The last whole checkpoint on disk: its directory and step.
    last_ckpt: Option<(PathBuf, u64)>,
    tokens_per_step: usize,
}

impl Progress<'_> {
    fn log(&self, s: String) {
        match &self.bar {
            Some(pb) => pb.println(s),
            None if self.cfg.verbose => println!("{s}"),
            None => {}
        }
    }

    /// The error that stops a diverged run: `what` happened, nothing was written, and the last
    /// checkpoint (if any) is intact.
    fn diverged(&self, what: String) -> Error {
        let kept = match &self.last_ckpt {
            Some((dir, s)) => format!("; {} (step {s}) is untouched", dir.display()),
            None => String::new(),
        };
        Error::invalid(
            "train",
            format!("training diverged {what}; stopped without writing a checkpoint{kept}"),
        )
    }

    fn handle(&mut self, results: Vec<StepResult>) -> Result<()> {
        for r in results {
            let loss = r.loss();
            if !loss.is_finite() || !r.grad_norm.is_finite() {
                return Err(self.diverged(format!(
                    "at step {}: loss {loss}, gradient norm {}",
                    r.step, r.grad_norm
                )));
            }
            self.last_loss = Some(loss);
            let ms = self
                .ms_of
                .iter()
                .find(|(s, _)| *s == r.step)
                .map_or(0.0, |(_, ms)| *ms);
            self.ms_of.retain(|(s, _)| *s > r.step);
            let lr = self.cfg.schedule.at(r.step - 1);
            let tps = self.tokens_per_step as f64 / (ms / 1e3).max(1e-9);
            if let Some(pb) = &self.bar {
                pb.set_position(r.step);
                pb.set_message(format!("loss {loss:.4}"));
            }
            if r.step % self.cfg.log_interval.max(1) == 0 || r.step == self.cfg.max_iters {
                self.log(format!(
                    "step {:>6}: loss {loss:.4}, lr {lr:.3e}, grad norm {:.3}, {ms:.1} ms, {tps:.0} tok/s",
                    r.step, r.grad_norm
                ));
                self.metrics.write(json!({
                    "step": r.step, "loss": loss, "lr": lr, "grad_norm": r.grad_norm,
                    "ms": ms, "tokens_per_s": tps,
                }))?;
            }
        }
        Ok(())
    }
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
pub(super) fn check_ranks_fed(comm: &Comm, cfg: &TrainConfig, train_tokens: usize) -> Result<()> {
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
    parallel::check_same_shaders(comm, gpu)?;
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

/// Claims the output directory (rank 0 writes it) before the first step, not at the first
/// checkpoint.
fn claim_out(
    cfg: &TrainConfig,
    comm: &Comm,
    model: &Model,
    lora: bool,
) -> Result<Option<checkpoint::OutDir>> {
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
                    also_ours: match model {
                        _ if lora => &adapter::ADAPTER_FILES,
                        Model::Gpt(_) => &[],
                        Model::Llama(_) => &model::LLAMA_COPIED,
                    },
                },
            )
        })
        .transpose()
}

/// The training and evaluation executors over the parameters in `store`.
fn build_executors<'g>(
    gpu: &'g Gpu,
    cfg: &TrainConfig,
    comm: &Comm,
    (model, lora): (&Model, Option<&adapter::Adapter>),
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
        let plan = lora.map(|a| &a.plan);
        let mut train_graph = model.graph((b, t), Mode::Train, gpu.max_binding(), plan)?;
        crate::graph::save_memory(&mut train_graph.graph, cfg.recompute, cfg.activation_dtype);
        let exec = Executor::new(gpu, train_graph.graph, store, opts.clone())?;
        let eval_graph = model.graph((b, t), Mode::Eval, gpu.max_binding(), plan)?;
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
    let built = match root {
        Some(built) => built,
        None => {
            gpu.tuner.pin(
                &serde_json::from_slice(&choices[0])
                    .map_err(|e| Error::invalid("kernel choices of rank 0", e.to_string()))?,
            );
            build()?
        }
    };
    // A rank whose adapter could not take rank 0's choices chose its own: refused.
    parallel::check_same_kernels(comm, gpu)?;
    Ok(built)
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

impl<'a> Progress<'a> {
    /// Progress from `step` on: a bar that draws on stderr and replaces the log lines, only when
    /// both are terminals, and never for the ranks of a job, whose output mpirun interleaves.
    fn new(cfg: &'a TrainConfig, comm: &Comm, step: u64) -> Result<Progress<'a>> {
        let bar = (cfg.verbose
            && comm.size() == 1
            && std::io::stdout().is_terminal()
            && std::io::stderr().is_terminal())
        .then(|| {
            let pb = indicatif::ProgressBar::new(cfg.max_iters);
            pb.set_style(
                indicatif::ProgressStyle::with_template(
                    "{bar:30} {pos}/{len} [{elapsed_precise} < {eta_precise}] {msg}",
                )
                .expect("progress template"),
            );
            pb.set_position(step);
            pb
        });
        Ok(Progress {
            cfg,
            bar,
            metrics: Metrics::open(cfg.metrics.as_deref(), step > 0)?,
            ms_of: Default::default(),
            last_loss: None,
            // A resumed run starts from a checkpoint that is, so far, the last good one.
            last_ckpt: cfg.resume.clone().map(|dir| (dir, step)),
            tokens_per_step: comm.size() * cfg.batch_size * cfg.block_size * cfg.grad_accum,
        })
    }
}

/// A training run set up on one rank: the model's parameters on the GPU, its data, the training
/// and evaluation executors, and the loader and the step it is at.
struct Trainer<'a> {
    gpu: &'a Gpu,
    cfg: &'a TrainConfig,
    comm: &'a Comm,
    model: Model,
    /// The LoRA adapter trained on the frozen model, if any.
    adapter: Option<adapter::Adapter>,
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
    out: Option<checkpoint::OutDir>,
}

impl<'a> Trainer<'a> {
    /// Everything before the first step: the model, the data, the checks that need no GPU, the
    /// output directory, the parameters and executors on the GPU, the loader; then says what
    /// will run.
    fn new(gpu: &'a Gpu, cfg: &'a TrainConfig, comm: &'a Comm) -> Result<Trainer<'a>> {
        let (mut model, mut ckpt, start_state, mut adapter) = model::start_model(gpu, cfg)?;
        let data =
            model::load_checked_data(cfg, comm, &mut model, ckpt.as_ref(), adapter.as_ref())?;
        // Everything is checked that can be without the GPU.
        let out = claim_out(cfg, comm, &model, adapter.is_some())?;
        // A parameter past a storage binding (GPT-2's token embedding on many adapters) is held
        // in row chunks; an op that cannot take one split is refused, naming the tensor, when
        // the executors are built, before any step.
        let store =
            model::upload_params(gpu, cfg, comm, (&mut model, &mut ckpt), adapter.as_mut())?;
        let (mut exec, eval_exec) =
            build_executors(gpu, cfg, comm, (&model, adapter.as_ref()), &store)?;
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
            model,
            adapter,
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
            out,
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
        let (cfg, comm) = (self.cfg, self.comm);
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
        self.say(format!("model: {}", self.model.describe()));
        if let Some(a) = &self.adapter {
            self.say(a.describe());
        }
        let recomputed = match cfg.recompute {
            Recompute::Block => ", blocks recomputed in the backward",
            Recompute::None => "",
        };
        let recomputed = match cfg.activation_dtype {
            ActivationDtype::Bf16 => format!("{recomputed}, saved in bf16"),
            ActivationDtype::F32 => recomputed.to_string(),
        };
        self.say(format!(
            "memory: parameters + gradients + AdamW {:.1} MiB; activations planned {:.1} MiB (without reuse {:.1} MiB{recomputed})",
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
        for line in dropped_kernels(self.gpu) {
            self.say(line);
        }
        if comm.is_root() && !self.plot_ours() {
            self.say(format!(
                "{}: not written by a run, so left alone; no loss plot is drawn",
                cfg.out.join(metrics::PLOT_FILE).display()
            ));
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
            cfg: self.model.gpt().cloned(),
            lora: self.adapter.is_some(),
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
        if self.plot_ours() {
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

    /// Whether this rank draws `loss.svg` into the output directory: rank 0, where the file is
    /// the checkpoint's own (a user's file of that name is left alone).
    fn plot_ours(&self) -> bool {
        self.out.as_ref().is_some_and(|o| o.plot_ours)
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
        let state = state::TrainerState {
            step: self.step,
            loader: self.loader.state(),
            data_description: self.data.description.clone(),
            config: self.cfg.settings(),
            kernels: gpu.tuner.used(),
            ranks: comm.size(),
            rank_loaders,
            loss_svg: self.plot_ours(),
        };
        let params = read(&store.params)?;
        let moments = (read(&store.m)?, read(&store.v)?);
        if let Some(a) = &self.adapter {
            return a.save(&self.cfg.out, &params, &moments, &state);
        }
        match &self.model {
            Model::Llama(l) => l.save(&self.cfg.out, &params, &moments, &state),
            Model::Gpt(c) => checkpoint::save(
                &self.cfg.out,
                &Checkpoint {
                    cfg: c.clone(),
                    params,
                    optimizer: Some(moments),
                    state: Some(state),
                    vocab: Some(self.data.vocab.clone()),
                },
            ),
        }
    }
}
