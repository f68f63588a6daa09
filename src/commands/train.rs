//! `shaderformer train` and `shaderformer sample`.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use shaderformer::dist::Comm;
use shaderformer::error::{Error, Result};
use shaderformer::gpu::DType;
use shaderformer::infer::llama::LlamaRunner;
use shaderformer::infer::{self, Engine, SampleOptions};
use shaderformer::io::vocab::Vocab;
use shaderformer::io::{hf_llama, hf_weights};
use shaderformer::model::GptConfig;
use shaderformer::model::lora::AdapterFiles;
use shaderformer::rng::Rng;
use shaderformer::train::data::LoaderKind;
use shaderformer::train::schedule::{LrSchedule, Schedule};
use shaderformer::train::{self, FreshLlama, TrainConfig, addition, checkpoint};

use crate::GpuArgs;

/// Flags follow nanoGPT's train.py. Without --data, trains on the embedded addition dataset with
/// settings sized for it; model and schedule flags override either default.
#[derive(Args, Debug)]
pub struct TrainArgs {
    /// Training data: a UTF-8 text file, an llm.c token file, or a nanoGPT .bin (u16 tokens).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Checkpoint directory, written at eval points and at the end [default: the --resume
    /// directory when resuming, else out].
    #[arg(long)]
    out: Option<PathBuf>,
    /// Write the checkpoint into --out even when it holds other files (they are never touched;
    /// only the checkpoint's own files are replaced).
    #[arg(long)]
    overwrite: bool,
    /// Start from this checkpoint directory: GPT-2 (ours or one saved by transformers) or the
    /// Llama family (llama, mistral, qwen2, qwen3).
    #[arg(long, conflicts_with = "resume")]
    init: Option<PathBuf>,
    /// Continue this training checkpoint exactly where it stopped.
    #[arg(long)]
    resume: Option<PathBuf>,
    /// The architecture of a fresh model: GPT-2, or Llama (RMSNorm with eps 1e-5, rotary
    /// positions, a gated SiLU MLP, grouped-query attention, no biases, the lm head tied to
    /// the token embedding, weights drawn from normal(0, 0.02)) [default: gpt2]. A checkpoint
    /// (--init, --resume) fixes its own.
    #[arg(long, value_enum)]
    arch: Option<ArchKind>,
    /// Transformer blocks [default: 4; 2 for the addition dataset].
    #[arg(long)]
    n_layer: Option<usize>,
    /// Attention heads [default: 4].
    #[arg(long)]
    n_head: Option<usize>,
    /// Embedding width [default: 128; 64 for the addition dataset].
    #[arg(long)]
    n_embd: Option<usize>,
    /// Context length of the model and of training sequences [default: 64; 10, one line, for
    /// the addition dataset].
    #[arg(long)]
    block_size: Option<usize>,
    /// Train without biases in linear layers and LayerNorms (GPT-2; Llama has none).
    #[arg(long)]
    no_bias: bool,
    /// Key/value heads of --arch llama, each serving --n-head / --n-kv-head query heads
    /// [default: --n-head].
    #[arg(long)]
    n_kv_head: Option<usize>,
    /// Inner units of --arch llama's gated MLP [default: the multiple of 64 nearest
    /// 8/3 · --n-embd].
    #[arg(long)]
    intermediate_size: Option<usize>,
    /// RoPE's base of --arch llama [default: 10000].
    #[arg(long)]
    rope_theta: Option<f64>,
    /// Fine-tune a LoRA adapter of this rank on the frozen --init checkpoint (peft's layout; the
    /// output directory is the adapter) [default: 8 when another --lora flag is given].
    #[arg(long)]
    lora_r: Option<usize>,
    /// The adapter's alpha: its product is scaled by alpha / r [default: 8].
    #[arg(long)]
    lora_alpha: Option<f32>,
    /// Dropout on the adapter's input while training [default: 0].
    #[arg(long)]
    lora_dropout: Option<f32>,
    /// The linear layers to adapt, by the last part of their module name: GPT-2's c_attn,
    /// c_proj, c_fc; the Llama family's q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj,
    /// down_proj [default: c_attn for GPT-2, q_proj,v_proj for the Llama family, as peft's].
    #[arg(long, value_delimiter = ',')]
    lora_targets: Option<Vec<String>>,
    /// Continue training the peft adapter in this directory (its rank, alpha and targets) on
    /// the --init base.
    #[arg(long)]
    lora: Option<PathBuf>,
    /// Dropout on the embeddings, the attention probabilities and after the attention and MLP
    /// projections, as nanoGPT and GPT-2 place it [default: 0].
    #[arg(long)]
    dropout: Option<f32>,
    /// Sequences per micro-step [default: 12; 32 for the addition dataset].
    #[arg(long)]
    batch_size: Option<usize>,
    /// Micro-steps per optimizer step.
    #[arg(long)]
    grad_accum: Option<usize>,
    /// Optimizer steps [default: 2000].
    #[arg(long)]
    max_iters: Option<u64>,
    /// Peak learning rate [default: 1e-3].
    #[arg(long)]
    lr: Option<f32>,
    /// Final learning rate of the cosine [default: lr / 10].
    #[arg(long)]
    min_lr: Option<f32>,
    /// Steps of linear warmup [default: 100; 50 for the addition dataset].
    #[arg(long)]
    warmup_iters: Option<u64>,
    /// Step at which the cosine reaches min_lr (default: max_iters).
    #[arg(long)]
    lr_decay_iters: Option<u64>,
    /// Warmup then cosine decay, or a constant rate [default: cosine].
    #[arg(long, value_enum)]
    lr_schedule: Option<Schedule>,
    /// AdamW's decoupled weight decay, on 2-D weights only [default: 0.1; 0 for the addition
    /// dataset].
    #[arg(long)]
    weight_decay: Option<f32>,
    /// [default: 0.9]
    #[arg(long)]
    beta1: Option<f32>,
    /// [default: 0.99]
    #[arg(long)]
    beta2: Option<f32>,
    /// [default: 1e-8]
    #[arg(long)]
    eps: Option<f32>,
    /// Clip the global gradient norm to this (0 = off) [default: 1.0].
    #[arg(long)]
    grad_clip: Option<f32>,
    /// Seed of initialization, batches and dropout [default: 1337].
    #[arg(long)]
    seed: Option<u64>,
    /// Evaluate and checkpoint every this many steps (0 = only at the end) [default: 250; 500
    /// for the addition dataset].
    #[arg(long)]
    eval_interval: Option<u64>,
    /// Batches per evaluation of the train and val loss [default: 20; 10 for the addition
    /// dataset].
    #[arg(long)]
    eval_iters: Option<usize>,
    /// Log (and write metrics) every this many steps [default: 10; 100 for the addition
    /// dataset].
    #[arg(long)]
    log_interval: Option<u64>,
    /// Random offsets (seeded), or consecutive batches [default: random; sequential for the
    /// addition dataset].
    #[arg(long, value_enum)]
    loader: Option<LoaderKind>,
    /// Append JSON lines (step, loss, lr, grad_norm, ms, tokens_per_s; val_loss at evals).
    #[arg(long)]
    metrics: Option<PathBuf>,
    /// Debug: give every activation its own buffer (no memory reuse).
    #[arg(long)]
    no_reuse: bool,
    /// Activation recomputation (gradient checkpointing): `block` keeps only each transformer
    /// block's input through the forward and recomputes the rest in its backward, trading about
    /// a third more compute for most of the activation memory; losses are unchanged.
    #[arg(long, value_enum, default_value = "none")]
    recompute: shaderformer::graph::recompute::Recompute,
    /// How activations saved for the backward are stored: `bf16` rounds each to bf16 after the
    /// forward node that computes it (the forward itself runs on the f32 values) and widens it
    /// back before the backward reads it, halving what a step holds between the two; every sum
    /// stays f32.
    #[arg(long, value_enum, default_value = "f32")]
    activation_dtype: shaderformer::graph::saved::ActivationDtype,
    /// Debug: before training, run the first batch node by node and compare every output with
    /// its CPU reference; stop on a mismatch.
    #[arg(long)]
    validate: bool,
    /// Tokens to sample at the end (0 = none).
    #[arg(long, default_value_t = 300)]
    sample_tokens: usize,
    /// ZeRO stage under MPI: 1 would shard the AdamW moments across ranks (not implemented
    /// yet; only 0 runs).
    #[arg(long, default_value_t = 0)]
    zero: u8,
}

impl TrainArgs {
    /// The run's settings: flags given on the command line, else (with --resume) the resumed
    /// run's saved settings, else the defaults (the addition dataset's without --data).
    pub fn config(&self) -> Result<TrainConfig> {
        let mut d = if self.data.is_none() && self.init.is_none() && self.resume.is_none() {
            addition::defaults()
        } else {
            TrainConfig::default()
        };
        if let Some(dir) = &self.resume {
            let saved = checkpoint::read_state(dir)?;
            d = d.with_settings(&saved.config);
            if self.data.is_none()
                && let Some(p) = &d.data
                && !p.exists()
            {
                return Err(Error::invalid(
                    "--resume",
                    format!(
                        "the checkpoint's data file {} does not exist; give its new place with \
                         --data",
                        p.display()
                    ),
                ));
            }
        }
        // A resumed LoRA run's model is its adapter's base.
        let resumed_base = match &self.resume {
            Some(dir) if train::adapter::is_adapter(dir) => {
                Some(train::adapter::resumed_base(dir)?)
            }
            _ => None,
        };
        let checkpoint_dir = [
            ("--resume", resumed_base.as_ref().or(self.resume.as_ref())),
            ("--init", self.init.as_ref()),
        ]
        .into_iter()
        .find_map(|(f, d)| d.map(|d| (f, d)));
        self.check_arch_flags(checkpoint_dir.map(|c| c.0))?;
        if let Some((flag, dir)) = checkpoint_dir {
            if hf_llama::is_llama_checkpoint(dir) {
                self.refuse_gpt2_flags(flag, dir)?;
            } else {
                self.check_model_flags(flag, &checkpoint::read_config(dir)?)?;
            }
        }
        let d = d;
        let max_iters = self.max_iters.unwrap_or(d.max_iters);
        let n_head = self.n_head.unwrap_or(d.n_head);
        let n_embd = self.n_embd.unwrap_or(d.n_embd);
        Ok(TrainConfig {
            data: self.data.clone().or(d.data.clone()),
            // A resumed run writes back into its checkpoint, as every trainer does.
            out: self
                .out
                .clone()
                .or_else(|| self.resume.clone())
                .unwrap_or_else(|| PathBuf::from("out")),
            overwrite: self.overwrite,
            init: self.init.clone(),
            resume: self.resume.clone(),
            n_layer: self.n_layer.unwrap_or(d.n_layer),
            n_head,
            n_embd,
            block_size: self.block_size.unwrap_or(d.block_size),
            // With --resume or --init the checkpoint decides (check_model_flags refuses a
            // conflicting --no-bias).
            bias: !self.no_bias,
            dropout: self.dropout.unwrap_or(d.dropout),
            batch_size: self.batch_size.unwrap_or(d.batch_size),
            grad_accum: self.grad_accum.unwrap_or(d.grad_accum),
            max_iters,
            schedule: LrSchedule {
                kind: self.lr_schedule.unwrap_or(d.schedule.kind),
                lr: self.lr.unwrap_or(d.schedule.lr),
                min_lr: self
                    .min_lr
                    .or(self.lr.map(|lr| lr / 10.0))
                    .unwrap_or(d.schedule.min_lr),
                warmup_iters: self.warmup_iters.unwrap_or(d.schedule.warmup_iters),
                lr_decay_iters: self.lr_decay_iters.unwrap_or(if self.resume.is_some() {
                    d.schedule.lr_decay_iters
                } else {
                    max_iters
                }),
            },
            weight_decay: self.weight_decay.unwrap_or(d.weight_decay),
            beta1: self.beta1.unwrap_or(d.beta1),
            beta2: self.beta2.unwrap_or(d.beta2),
            eps: self.eps.unwrap_or(d.eps),
            grad_clip: self.grad_clip.unwrap_or(d.grad_clip),
            seed: self.seed.unwrap_or(d.seed),
            eval_interval: self.eval_interval.unwrap_or(d.eval_interval),
            eval_iters: self.eval_iters.unwrap_or(d.eval_iters),
            log_interval: self.log_interval.unwrap_or(d.log_interval),
            loader: self.loader.unwrap_or(d.loader),
            metrics: self.metrics.clone(),
            no_reuse: self.no_reuse,
            recompute: self.recompute,
            activation_dtype: self.activation_dtype,
            validate: self.validate,
            verbose: true,
            llama: (self.arch == Some(ArchKind::Llama)).then(|| FreshLlama {
                n_kv_head: self.n_kv_head.unwrap_or(n_head),
                intermediate: self
                    .intermediate_size
                    .unwrap_or_else(|| FreshLlama::default_intermediate(n_embd)),
                rope_theta: self.rope_theta.unwrap_or(10000.0),
            }),
            lora: self.lora_flags(),
        })
    }
}

/// `--arch`: the architecture of a fresh model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ArchKind {
    Gpt2,
    Llama,
}

impl TrainArgs {
    /// The LoRA flags, when any is given.
    fn lora_flags(&self) -> Option<train::adapter::LoraFlags> {
        let flags = train::adapter::LoraFlags {
            r: self.lora_r,
            alpha: self.lora_alpha,
            dropout: self.lora_dropout,
            targets: self.lora_targets.clone(),
            from: self.lora.clone(),
        };
        (flags != train::adapter::LoraFlags::default()).then_some(flags)
    }

    /// A flag of one architecture given with the other, or --arch with a checkpoint (which
    /// fixes its own), is an error naming the flag.
    fn check_arch_flags(&self, checkpoint: Option<&str>) -> Result<()> {
        let llama_only = [
            ("--n-kv-head", self.n_kv_head.is_some()),
            ("--intermediate-size", self.intermediate_size.is_some()),
            ("--rope-theta", self.rope_theta.is_some()),
        ];
        let given = |flags: &[(&'static str, bool)]| flags.iter().find(|f| f.1).map(|f| f.0);
        if let Some(source) = checkpoint {
            let flag = given(&[("--arch", self.arch.is_some())]).or(given(&llama_only));
            return match flag {
                Some(flag) => Err(Error::invalid(
                    flag,
                    format!(
                        "sets a fresh model's architecture; the {source} checkpoint fixes its own"
                    ),
                )),
                None => Ok(()),
            };
        }
        match self.arch.unwrap_or(ArchKind::Gpt2) {
            ArchKind::Gpt2 => match given(&llama_only) {
                Some(flag) => Err(Error::invalid(
                    flag,
                    "applies to --arch llama only (the model is GPT-2)",
                )),
                None => Ok(()),
            },
            ArchKind::Llama if self.no_bias => Err(Error::invalid(
                "--no-bias",
                "applies to --arch gpt2 only (a Llama model has no biases)",
            )),
            ArchKind::Llama => Ok(()),
        }
    }

    /// A Llama-family checkpoint has its own shape: GPT-2's model flags are refused, naming the
    /// flag and the directory.
    fn refuse_gpt2_flags(&self, source: &str, dir: &std::path::Path) -> Result<()> {
        let given = [
            ("--n-layer", self.n_layer.is_some()),
            ("--n-head", self.n_head.is_some()),
            ("--n-embd", self.n_embd.is_some()),
            ("--no-bias", self.no_bias),
        ];
        match given.into_iter().find(|g| g.1) {
            Some((flag, _)) => Err(Error::invalid(
                flag,
                format!(
                    "is a GPT-2 model flag; the {source} checkpoint {} is a Llama-family model, \
                     whose shape its config.json fixes",
                    dir.display()
                ),
            )),
            None => Ok(()),
        }
    }

    /// The model's shape comes from the checkpoint being continued: a flag that disagrees with
    /// it is an error naming both values, never ignored.
    fn check_model_flags(&self, source: &str, ck: &GptConfig) -> Result<()> {
        for (flag, given, has) in [
            ("--n-layer", self.n_layer, ck.n_layer),
            ("--n-head", self.n_head, ck.n_head),
            ("--n-embd", self.n_embd, ck.n_embd),
        ] {
            if let Some(x) = given
                && x != has
            {
                return Err(Error::invalid(
                    flag,
                    format!("{x} conflicts with the {source} checkpoint's {has}"),
                ));
            }
        }
        if self.no_bias && ck.bias {
            return Err(Error::invalid(
                "--no-bias",
                format!("conflicts with the {source} checkpoint, which has biases"),
            ));
        }
        Ok(())
    }
}

pub fn train(gpu: &GpuArgs, args: &TrainArgs) -> Result<ExitCode> {
    let comm = Comm::from_env()?;
    match train_rank(gpu, args, &comm) {
        Err(e @ Error::Interrupted { .. }) if comm.size() == 1 => {
            // Ctrl-C before the first step: nothing was trained, so no checkpoint is written.
            eprintln!("{e}: nothing was trained and no checkpoint was written");
            Ok(ExitCode::from(130))
        }
        Err(e) if comm.size() > 1 => {
            // The other ranks may be waiting in a collective this one will never join.
            // One write: mpirun forwards each write as it comes, and the pieces eprintln! writes
            // would interleave with the other ranks' lines.
            let line = format!("error: rank {}: {e}\n", comm.rank());
            let _ = std::io::Write::write_all(&mut std::io::stderr().lock(), line.as_bytes());
            // mpirun forwards each rank's output asynchronously, and the first abort ends every
            // rank. A setting check fails on all ranks at once: rank 0 aborts first, after its
            // line has had a moment to be forwarded, so the job's message is rank 0's, whole;
            // a failure on one rank alone still ends the job within seconds.
            let pause = if comm.rank() == 0 { 300 } else { 2000 };
            std::thread::sleep(std::time::Duration::from_millis(pause));
            comm.abort(1)
        }
        other => other,
    }
}

/// `--zero`: stage 0 only; stage 1 needs ranks to shard over, and is not implemented.
fn check_zero(zero: u8, comm: &Comm) -> Result<()> {
    match zero {
        0 => Ok(()),
        1 if comm.size() == 1 => Err(Error::invalid(
            "--zero",
            if Comm::HAS_MPI {
                "1 shards the optimizer state across MPI ranks: start the run with mpirun or srun \
                 on 2 or more ranks"
            } else {
                "1 shards the optimizer state across MPI ranks: this build has no MPI (build with \
                 --features mpi and start the run with mpirun or srun)"
            },
        )),
        1 => Err(Error::invalid(
            "--zero",
            "1 (sharded AdamW moments) is not implemented yet; run with --zero 0",
        )),
        z => Err(Error::invalid(
            "--zero",
            format!("{z} is not a ZeRO stage (0 or 1)"),
        )),
    }
}

/// The adapter of a rank: its local rank's index among the host's adapters of the preferred
/// kind (the kind and API of the adapter a single process would take), shared round-robin
/// when the host has fewer adapters than ranks.
fn rank_adapter(gpu: &GpuArgs, comm: &Comm) -> Result<Option<String>> {
    if gpu.adapter.is_some() || comm.size() == 1 {
        return Ok(gpu.adapter.clone());
    }
    let adapters = shaderformer::gpu::enumerate(gpu.backend.as_deref())?;
    let Some(first) = adapters.first().map(|a| a.get_info()) else {
        return Ok(None); // Gpu::new names the missing adapter.
    };
    let same = adapters
        .iter()
        .take_while(|a| {
            let i = a.get_info();
            i.device_type == first.device_type && i.backend == first.backend
        })
        .count();
    Ok(Some((comm.local_rank() % same.max(1)).to_string()))
}

fn train_rank(gpu: &GpuArgs, args: &TrainArgs, comm: &Comm) -> Result<ExitCode> {
    check_zero(args.zero, comm)?;
    let cfg = args.config()?;
    // Settings, sizes and outputs are checked before the adapter is opened, the model built and
    // its kernels tuned.
    train::check_settings(&cfg)?;
    let gpu = GpuArgs {
        adapter: rank_adapter(gpu, comm)?,
        ..gpu.clone()
    }
    .open()?;
    let summary = train::train_on(&gpu, &cfg, comm)?;
    if !comm.is_root() {
        return Ok(if summary.interrupted {
            ExitCode::from(130)
        } else {
            ExitCode::SUCCESS
        });
    }
    println!(
        "trained {} steps (to step {}) in {:.1} s ({:.1} ms/step, {:.0} tokens/s){}",
        summary.steps,
        summary.final_step,
        summary.seconds,
        summary.ms_per_step,
        summary.tokens_per_step as f64 / (summary.ms_per_step / 1e3).max(1e-9),
        summary
            .final_val_loss
            .map_or(String::new(), |v| format!(", final val loss {v:.4}"))
    );
    if summary.interrupted {
        return Ok(ExitCode::from(130));
    }
    if summary.lora {
        println!(
            "adapter: {} (sample or score it with --lora {} on the base)",
            cfg.out.display(),
            cfg.out.display()
        );
        return Ok(ExitCode::SUCCESS);
    }
    if args.sample_tokens > 0 && summary.cfg.is_none() {
        sample_after_llama_run(&gpu, &cfg, args.sample_tokens)?;
    } else if args.sample_tokens > 0 {
        let ck = checkpoint::load(&cfg.out)?;
        let vocab = ck.vocab.clone().unwrap_or(Vocab::Ids(ck.cfg.vocab_size));
        if cfg.data.is_none() && cfg.init.is_none() && cfg.resume.is_none() {
            show_addition(&gpu, &ck, &vocab)?;
        } else if !matches!(vocab, Vocab::Ids(_)) {
            println!("--- sample ---");
            let prompt = vocab
                .encode("\n", "sample prompt")
                .unwrap_or_else(|_| vec![0]);
            let opts = SampleOptions {
                top_k: Some(200),
                temperature: 0.8,
                ..Default::default()
            };
            let mut rng = Rng::new(cfg.seed);
            let mut out = std::io::stdout();
            let mut engine = Engine::new(&gpu, &ck.cfg, &ck.params, DType::F32, 1)?;
            let new = args.sample_tokens.min(ck.cfg.block_size - prompt.len());
            infer::generate(&mut engine, &prompt, new, &opts, &mut rng, |_, id| {
                let _ = write!(out, "{}", vocab.decode(&[id]));
                let _ = out.flush();
                Ok(())
            })?;
            println!();
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The sample after a Llama-family run, from its checkpoint as `sample` reads it: `n` tokens
/// after a newline, when the checkpoint has a tokenizer (token ids alone have no text).
fn sample_after_llama_run(gpu: &shaderformer::gpu::Gpu, cfg: &TrainConfig, n: usize) -> Result<()> {
    let vocab = match Vocab::load(&cfg.out)? {
        Some(v) if !matches!(v, Vocab::Ids(_)) => v,
        _ => return Ok(()),
    };
    let ck = hf_weights::load(&cfg.out)?;
    let prompt = vocab
        .encode("\n", "sample prompt")
        .unwrap_or_else(|_| vec![0]);
    let new = n.min(ck.cfg.arch.context.saturating_sub(prompt.len()));
    let opts = SampleOptions {
        top_k: Some(200),
        temperature: 0.8,
        ..Default::default()
    };
    let mut runner = LlamaRunner::with_cache(gpu, &ck, DType::F32)?;
    let mut rng = Rng::new(cfg.seed);
    let mut out = std::io::stdout();
    println!("--- sample ---");
    infer::llama::generate(&mut runner, &prompt, new, &opts, &mut rng, |id| {
        let _ = write!(out, "{}", vocab.decode(&[id]));
        let _ = out.flush();
        Ok(())
    })?;
    println!();
    Ok(())
}

/// Greedy answers to held-out additions, decoded side by side: a table of examples and the
/// accuracy.
fn show_addition(
    gpu: &shaderformer::gpu::Gpu,
    ck: &checkpoint::Checkpoint,
    vocab: &Vocab,
) -> Result<()> {
    let problems = addition::test_problems(100, 7);
    let prompts = problems
        .iter()
        .map(|&(a, b)| vocab.encode(&addition::prompt(a, b), "prompt"))
        .collect::<Result<Vec<_>>>()?;
    let mut engine = Engine::new(gpu, &ck.cfg, &ck.params, DType::F32, problems.len())?;
    let answers = infer::greedy_each(&mut engine, &prompts, addition::DIGITS + 1)?;
    let mut correct = 0;
    println!("--- held-out additions (never in the training text), greedy answers ---");
    for (k, (&(a, b), ids)) in problems.iter().zip(&answers).enumerate() {
        let text = vocab.decode(ids);
        let answer = addition::parse_answer(&text);
        let ok = answer == Some(a + b);
        correct += ok as usize;
        if k < 10 {
            println!(
                "{a:>2} + {b:>2} = {:>4}   (prompt {:?}, the model wrote {text:?}){}",
                answer.map_or("?".to_string(), |x| x.to_string()),
                addition::prompt(a, b),
                if ok { "" } else { "   wrong" }
            );
        }
    }
    println!(
        "accuracy on {} held-out problems: {correct}%",
        problems.len()
    );
    Ok(())
}

/// Weight storage on the GPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Dtype {
    F32,
    /// f16 weights and KV cache with f32 accumulation (needs SHADER_F16).
    F16,
}

impl Dtype {
    pub fn gpu(self) -> DType {
        match self {
            Dtype::F32 => DType::F32,
            Dtype::F16 => DType::F16,
        }
    }
}

#[derive(Args, Debug)]
pub struct SampleArgs {
    /// Checkpoint directory (ours, a Hugging Face GPT-2 directory with tokenizer.json, or a
    /// Llama-family one: llama, mistral, qwen2, qwen3).
    #[arg(long)]
    checkpoint: PathBuf,
    /// A peft LoRA adapter directory to apply to the checkpoint (merged into its weights).
    #[arg(long)]
    lora: Option<PathBuf>,
    #[arg(long, default_value = "\n")]
    prompt: String,
    #[arg(long, default_value_t = 200)]
    max_new_tokens: usize,
    /// Softmax temperature (> 0).
    #[arg(long, default_value_t = 1.0)]
    temperature: f32,
    /// Sample among the k most likely tokens only.
    #[arg(long)]
    top_k: Option<usize>,
    /// Sample among the most likely tokens whose probability reaches p (0 < p <= 1).
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Always take the most likely token.
    #[arg(long)]
    greedy: bool,
    #[arg(long, default_value_t = 1337)]
    seed: u64,
    /// Independent samples, decoded side by side.
    #[arg(long, default_value_t = 1)]
    num_samples: usize,
    #[arg(long, value_enum, default_value = "f32")]
    dtype: Dtype,
    /// Print one JSON object (prompt ids, generated ids, text) instead of streaming text.
    #[arg(long)]
    json: bool,
    /// --prompt is a user message, rendered with the checkpoint's chat template.
    #[arg(long)]
    chat: bool,
    /// A system message before the user's (with --chat).
    #[arg(long, requires = "chat")]
    system: Option<String>,
}

pub fn sample(gpu: &GpuArgs, args: &SampleArgs) -> Result<ExitCode> {
    let opts = SampleOptions {
        greedy: args.greedy,
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
    };
    opts.validate()?;
    if args.num_samples == 0 {
        return Err(Error::invalid("--num-samples", "must be at least 1"));
    }
    if hf_llama::is_llama_checkpoint(&args.checkpoint) {
        return sample_llama(gpu, args, &opts);
    }
    let mut ck = checkpoint::load(&args.checkpoint)?;
    if let Some(dir) = &args.lora {
        train::adapter::merge_gpt(&mut ck, AdapterFiles::read(dir)?)?;
    }
    let (vocab, prompt) = encode_prompt(args, &ck)?;
    check_sample_sizes(args, &ck.cfg)?;
    let gpu = gpu.open()?;
    let mut engine = Engine::new(
        &gpu,
        &ck.cfg,
        &ck.params,
        args.dtype.gpu(),
        args.num_samples,
    )?;
    let mut rng = Rng::new(args.seed);
    let mut out = std::io::stdout();
    let stream = !args.json && args.num_samples == 1;
    if stream {
        print!("{}", args.prompt);
        let _ = out.flush();
    }
    let generation = infer::generate(
        &mut engine,
        &prompt,
        args.max_new_tokens,
        &opts,
        &mut rng,
        |_, id| {
            if stream {
                let _ = write!(out, "{}", vocab.decode(&[id]));
                let _ = out.flush();
            }
            Ok(())
        },
    )?;
    print_samples(args, &vocab, &prompt, &generation, stream);
    if generation.hit_context {
        eprintln!(
            "stopped: the context of {} tokens is full",
            ck.cfg.block_size
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Refuses a --num-samples whose KV cache or logits would overflow or not fit in memory.
fn check_sample_sizes(args: &SampleArgs, cfg: &GptConfig) -> Result<()> {
    let n = args.num_samples as u64;
    shaderformer::sizes::bytes(
        "the KV cache of --num-samples sequences",
        &[
            ("--num-samples", n),
            ("layers", cfg.n_layer as u64),
            ("K and V", 2),
            ("context", cfg.block_size as u64),
            ("n_embd", cfg.n_embd as u64),
            ("bytes per value", 4),
        ],
    )?;
    shaderformer::sizes::bytes(
        "the logits of --num-samples sequences",
        &[
            ("--num-samples", n),
            ("padded vocabulary", cfg.padded_vocab() as u64),
            ("bytes per value", 4),
        ],
    )?;
    Ok(())
}

/// `sample` on a Llama-family checkpoint (config.json, model.safetensors, tokenizer.json):
/// sequences decoded against a KV cache (weights and cache in `--dtype`), one after another,
/// each ending at generation_config.json's eos ids.
fn sample_llama(gpu: &GpuArgs, args: &SampleArgs, opts: &SampleOptions) -> Result<ExitCode> {
    let mut ck = hf_weights::load(&args.checkpoint)?;
    if let Some(dir) = &args.lora {
        train::adapter::merge_llama(&mut ck, AdapterFiles::read(dir)?)?;
    }
    let vocab = Vocab::load(&args.checkpoint)?;
    let (vocab, prompt) = encode_for(args, vocab, ck.cfg.arch.context)?;
    let gpu = gpu.open()?;
    let mut runner = LlamaRunner::with_cache(&gpu, &ck, args.dtype.gpu())?;
    let mut rng = Rng::new(args.seed);
    let mut out = std::io::stdout();
    let stream = !args.json && args.num_samples == 1;
    if stream {
        print!("{}", args.prompt);
        let _ = out.flush();
    }
    let sizes = (args.num_samples, args.max_new_tokens);
    let generation =
        infer::llama::generate_samples(&mut runner, &prompt, sizes, opts, &mut rng, |_, id| {
            if stream {
                let _ = write!(out, "{}", vocab.decode(&[id]));
                let _ = out.flush();
            }
            Ok(())
        })?;
    print_samples(args, &vocab, &prompt, &generation, stream);
    if generation.hit_context {
        eprintln!(
            "stopped: the context of {} tokens is full",
            ck.cfg.arch.context
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// What `sample` prints after generating: the JSON object, the end of the streamed line, or
/// each sample after its header.
fn print_samples(
    args: &SampleArgs,
    vocab: &Vocab,
    prompt: &[u32],
    generation: &infer::Generation,
    streamed: bool,
) {
    if args.json {
        println!("{}", sample_json(args, vocab, prompt, generation));
    } else if streamed {
        println!();
    } else {
        for (k, ids) in generation.ids.iter().enumerate() {
            println!("--- sample {k} ---\n{}{}", args.prompt, vocab.decode(ids));
        }
    }
}

/// The checkpoint's vocabulary and the prompt's tokens, which must leave room in the context.
fn encode_prompt(args: &SampleArgs, ck: &checkpoint::Checkpoint) -> Result<(Vocab, Vec<u32>)> {
    encode_for(args, ck.vocab.clone(), ck.cfg.block_size)
}

/// `vocab` and the prompt's tokens, which must leave room in a context of `context` positions.
fn encode_for(
    args: &SampleArgs,
    vocab: Option<Vocab>,
    context: usize,
) -> Result<(Vocab, Vec<u32>)> {
    let vocab = vocab.ok_or_else(|| {
        Error::invalid(
            args.checkpoint.display().to_string(),
            "has no tokenizer.json or vocab.json to encode the prompt",
        )
    })?;
    let text = if args.chat {
        infer::chat::ChatTemplate::load(&args.checkpoint)?
            .render(&args.prompt, args.system.as_deref())?
    } else {
        args.prompt.clone()
    };
    let prompt = vocab.encode(&text, "--prompt")?;
    if prompt.is_empty() {
        return Err(Error::invalid("--prompt", "encodes to no tokens"));
    }
    if prompt.len() >= context {
        return Err(Error::invalid(
            "--prompt",
            format!(
                "{} tokens leave no room in the model's context of {context}",
                prompt.len(),
            ),
        ));
    }
    Ok((vocab, prompt))
}

/// `sample --json`'s object: the prompt, the first sample, and with several samples all of them.
fn sample_json(
    args: &SampleArgs,
    vocab: &Vocab,
    prompt: &[u32],
    generation: &infer::Generation,
) -> serde_json::Value {
    let mut obj = serde_json::json!({
        "prompt": args.prompt,
        "prompt_ids": prompt,
        "ids": generation.ids[0],
        "text": vocab.decode(&generation.ids[0]),
        "stopped_at_context_limit": generation.hit_context,
    });
    if args.num_samples > 1 {
        let samples: Vec<serde_json::Value> = generation
            .ids
            .iter()
            .map(|ids| serde_json::json!({"ids": ids, "text": vocab.decode(ids)}))
            .collect();
        obj["samples"] = samples.into();
    }
    obj
}
