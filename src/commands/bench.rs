//! `shaderformer bench`: training and inference throughput on random weights.

use std::process::ExitCode;

use clap::Args;

use shaderformer::bench::{self, InferBench, KernelRow, TrainBench};
use shaderformer::error::{Error, Result};
use shaderformer::gpu::{DType, Gpu};
use shaderformer::graph::recompute::Recompute;
use shaderformer::graph::saved::ActivationDtype;
use shaderformer::model::llama_params::LlamaParams;
use shaderformer::model::lora::LoraConfig;
use shaderformer::model::presets::{self, Preset};
use shaderformer::model::{Arch, GptConfig};

use crate::GpuArgs;

/// A named shape, with dimensions overridden.
#[derive(Args, Debug)]
pub struct ModelArgs {
    /// A shape: gpt2, gpt2-medium, gpt2-large, gpt2-xl, or a Llama-family one: smollm2-135m,
    /// qwen2.5-0.5b, llama-3.2-1b. Dimension flags override a GPT-2 shape;
    /// --n-layer, --vocab-size and --context a Llama-family one.
    #[arg(long, default_value = "gpt2")]
    model: String,
    #[arg(long)]
    n_layer: Option<usize>,
    #[arg(long)]
    n_head: Option<usize>,
    #[arg(long)]
    n_embd: Option<usize>,
    #[arg(long)]
    vocab_size: Option<usize>,
    /// Context length of the model (position table).
    #[arg(long)]
    context: Option<usize>,
}

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// What to measure.
    #[arg(long, value_enum, default_value = "all")]
    what: What,
    #[command(flatten)]
    model: ModelArgs,
    /// Training batch size.
    #[arg(long, default_value_t = 4)]
    batch_size: usize,
    /// Training sequence length [default: 64, or the model's context where shorter].
    #[arg(long)]
    block_size: Option<usize>,
    /// Inference prompt length [default: 128, or half the model's context where shorter].
    #[arg(long)]
    prompt_len: Option<usize>,
    /// Tokens decoded with the KV cache [default: 128, or what the context leaves after the
    /// prompt].
    #[arg(long)]
    new_tokens: Option<usize>,
    /// Tokens decoded by full recomputation, for comparison (0 = skip).
    #[arg(long, default_value_t = 16)]
    recompute_tokens: usize,
    /// Weight formats for inference (both: f32, and f16 when the adapter has it).
    #[arg(long, value_enum, default_value = "both")]
    dtype: BenchDtype,
    /// Timed runs (the median is reported, with min and max).
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Untimed warm-up runs.
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Print one JSON object instead of tables; with a FILE, write it there (and print the
    /// tables).
    #[arg(long, value_name = "FILE", num_args = 0..=1, default_missing_value = "-")]
    json: Option<std::path::PathBuf>,
    /// Run every headline benchmark (GEMM, attention, training steps, prefill and decode) in one
    /// process: `quick` at small shapes, few GEMM kernels and no kernel measured (`--tune
    /// cached` unless told otherwise), `full` at the shapes a real GPU needs. Other flags are
    /// ignored, but `--json` and `--tune`.
    #[arg(long, value_enum)]
    suite: Option<SuiteArg>,
    /// Time the training step of a LoRA adapter of this rank on the frozen random weights
    /// instead of full training.
    #[arg(long)]
    lora_r: Option<usize>,
    /// The adapter's alpha [default: the rank].
    #[arg(long)]
    lora_alpha: Option<f32>,
    /// The adapted layers (as `train --lora-targets`) [default: the attention projections:
    /// c_attn,c_proj for GPT-2; q_proj,k_proj,v_proj,o_proj for the Llama family].
    #[arg(long, value_delimiter = ',')]
    lora_targets: Option<Vec<String>>,
    /// Build the training step and report the device memory it plans (parameters, gradients,
    /// AdamW moments, activations) without timing it; with `--tune off` nothing is measured.
    #[arg(long)]
    plan_only: bool,
    /// Time (or plan) the training step with block activations recomputed in the backward
    /// (`block`), as `train --recompute`.
    #[arg(long, value_enum, default_value = "none")]
    recompute: Recompute,
    /// Time (or plan) the training step with the activations saved for the backward stored in
    /// bf16, as `train --activation-dtype`.
    #[arg(long, value_enum, default_value = "f32")]
    activation_dtype: ActivationDtype,
}

impl BenchArgs {
    /// The training step's setup: `--lora-*` and `--recompute`.
    fn step_setup(&self, gpt2: bool) -> Result<bench::StepSetup> {
        Ok(bench::StepSetup {
            lora: self.lora(gpt2)?,
            recompute: self.recompute,
            activations: self.activation_dtype,
        })
    }

    /// The adapter of `--lora-r`, if given; `gpt2` picks the default targets.
    fn lora(&self, gpt2: bool) -> Result<Option<LoraConfig>> {
        let Some(r) = self.lora_r else {
            if self.lora_alpha.is_some() || self.lora_targets.is_some() {
                return Err(Error::invalid(
                    "--lora-alpha, --lora-targets",
                    "apply to a LoRA step: give --lora-r",
                ));
            }
            return Ok(None);
        };
        let default: &[&str] = if gpt2 {
            &["c_attn", "c_proj"]
        } else {
            &["q_proj", "k_proj", "v_proj", "o_proj"]
        };
        let cfg = LoraConfig {
            r,
            alpha: self.lora_alpha.unwrap_or(r as f32),
            dropout: 0.0,
            targets: self
                .lora_targets
                .clone()
                .unwrap_or_else(|| default.iter().map(|s| s.to_string()).collect()),
        };
        cfg.check("--lora-r, --lora-alpha, --lora-targets")?;
        Ok(Some(cfg))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum SuiteArg {
    Quick,
    Full,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum What {
    Train,
    Infer,
    All,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum BenchDtype {
    F32,
    F16,
    Both,
}

impl ModelArgs {
    /// The preset named by --model, its dimensions overridden by the flags.
    pub fn preset(&self) -> Result<Preset> {
        match Preset::find(&self.model) {
            Some(Preset::Gpt2(_)) => Ok(Preset::Gpt2(self.config()?)),
            Some(Preset::Llama(arch)) => Ok(Preset::Llama(self.llama(arch)?)),
            None => Err(self.unknown()),
        }
    }

    fn unknown(&self) -> Error {
        Error::invalid(
            "--model",
            format!("unknown shape '{}' ({})", self.model, presets::names()),
        )
    }

    /// A Llama-family preset with --n-layer, --vocab-size and --context applied; the head and
    /// width flags, which would leave the key/value heads and head_dim ambiguous, are refused.
    fn llama(&self, mut arch: Arch) -> Result<Arch> {
        for (flag, set) in [
            ("--n-head", self.n_head.is_some()),
            ("--n-embd", self.n_embd.is_some()),
        ] {
            if set {
                return Err(Error::invalid(
                    flag,
                    format!(
                        "applies to GPT-2 shapes, not to {} (--n-layer, --vocab-size and \
                         --context do)",
                        self.model
                    ),
                ));
            }
        }
        arch.n_layer = self.n_layer.unwrap_or(arch.n_layer);
        arch.vocab = self.vocab_size.unwrap_or(arch.vocab);
        arch.context = self.context.unwrap_or(arch.context);
        arch.validate()?;
        Ok(arch)
    }

    /// The GPT-2 preset named by --model, its dimensions overridden by the flags.
    fn config(&self) -> Result<GptConfig> {
        let mut cfg = GptConfig::preset(&self.model).ok_or_else(|| self.unknown())?;
        cfg.n_layer = self.n_layer.unwrap_or(cfg.n_layer);
        cfg.n_head = self.n_head.unwrap_or(cfg.n_head);
        cfg.n_embd = self.n_embd.unwrap_or(cfg.n_embd);
        cfg.vocab_size = self.vocab_size.unwrap_or(cfg.vocab_size);
        cfg.block_size = self.context.unwrap_or(cfg.block_size);
        cfg.validate()?;
        Ok(cfg)
    }
}

/// Refuses a training sequence longer than the model's `context`.
pub fn check_block(block_size: usize, context: usize) -> Result<()> {
    if block_size > context {
        return Err(Error::invalid(
            "--block-size",
            format!("{block_size} is beyond the model's context {context}"),
        ));
    }
    Ok(())
}

impl BenchArgs {
    /// Inference's prompt and new tokens: the flags, else defaults that fit the model's
    /// `context` (a default the user never gave is never the reason for an error).
    fn lengths(&self, context: usize) -> (usize, usize) {
        let prompt = self.prompt_len.unwrap_or(128.min(context / 2).max(1));
        let new = self
            .new_tokens
            .unwrap_or(128.min(context.saturating_sub(prompt)));
        (prompt, new)
    }

    /// One inference measurement per weight format `--dtype` asks for (f16 with `both` only
    /// where the adapter has it), at `lengths(context)`.
    fn infer_setups(&self, gpu: &Gpu, context: usize) -> Vec<bench::InferSetup> {
        let mut dtypes = Vec::new();
        if self.dtype != BenchDtype::F16 {
            dtypes.push(DType::F32);
        }
        if self.dtype == BenchDtype::F16 || (self.dtype == BenchDtype::Both && gpu.has_f16()) {
            dtypes.push(DType::F16);
        }
        let (prompt_len, new_tokens) = self.lengths(context);
        (dtypes.into_iter())
            .map(|dtype| bench::InferSetup {
                dtype,
                prompt_len,
                new_tokens,
                warmup: self.warmup,
                runs: self.runs,
                recompute_tokens: self.recompute_tokens,
            })
            .collect()
    }

    /// `--json` or `--json -`: the JSON object alone on stdout.
    fn json_to_stdout(&self) -> bool {
        self.json.as_deref() == Some(std::path::Path::new("-"))
    }
}

/// Refuses a training batch whose sizes overflow or whose logits alone are over the host's
/// memory, naming the flags.
pub fn check_batch(cfg: &GptConfig, batch_size: usize, block_size: usize) -> Result<()> {
    shaderformer::sizes::bytes(
        "the logits of one batch",
        &[
            ("--batch-size", batch_size as u64),
            ("--block-size", block_size as u64),
            ("padded vocabulary", cfg.padded_vocab() as u64),
            ("bytes per value", 4),
        ],
    )
    .map(|_| ())
}

/// Refuses a zero count, naming its flag.
pub fn at_least_one(flags: &[(&str, usize)]) -> Result<()> {
    match flags.iter().find(|(_, x)| *x == 0) {
        Some((flag, _)) => Err(Error::invalid(*flag, "must be at least 1")),
        None => Ok(()),
    }
}

pub fn bench(gpu: &GpuArgs, args: &BenchArgs) -> Result<ExitCode> {
    if let Some(suite) = args.suite {
        return run_suite(gpu, suite, args.json.as_deref());
    }
    let out = match args.model.preset()? {
        Preset::Gpt2(cfg) => bench_gpt2(gpu, args, &cfg)?,
        Preset::Llama(arch) => bench_llama(gpu, args, &arch)?,
    };
    let out = serde_json::Value::Object(out);
    if args.json_to_stdout() {
        println!("{out}");
    }
    if let Some(path) = args
        .json
        .as_deref()
        .filter(|p| *p != std::path::Path::new("-"))
    {
        write_json(path, &out)?;
    }
    Ok(ExitCode::SUCCESS)
}

/// The JSON object's first fields (adapter, model, timing), printed too unless the JSON goes
/// to stdout.
fn header(
    gpu: &Gpu,
    shape: String,
    args: &BenchArgs,
) -> serde_json::Map<String, serde_json::Value> {
    let mut out = serde_json::Map::new();
    out.insert("adapter".into(), gpu.adapter_name().into());
    if !args.json_to_stdout() {
        println!("adapter: {}", gpu.adapter_name());
        println!("model:   {shape}");
    }
    out.insert("model".into(), shape.into());
    out.insert("timing".into(), gpu.timing_method().name().into());
    out
}

/// Adds the inference rows to `out` (and prints them).
fn add_infer(
    gpu: &Gpu,
    out: &mut serde_json::Map<String, serde_json::Value>,
    rows: &[InferBench],
    args: &BenchArgs,
) {
    out.insert(
        "infer".into(),
        rows.iter().map(|r| r.to_json()).collect::<Vec<_>>().into(),
    );
    if !args.json_to_stdout() {
        print_infer(gpu, rows, args);
    }
}

/// Each training step's end, on stderr (a large model's step on a CPU adapter takes minutes; the
/// tables and the JSON stay on stdout).
fn step_progress(what: &str) {
    eprintln!("  {what}");
}

/// Training and inference of a GPT-2 shape.
fn bench_gpt2(
    gpu: &GpuArgs,
    args: &BenchArgs,
    cfg: &GptConfig,
) -> Result<serde_json::Map<String, serde_json::Value>> {
    let block_size = args.block_size.unwrap_or(64.min(cfg.block_size));
    let (prompt, new) = args.lengths(cfg.block_size);
    at_least_one(&[
        ("--batch-size", args.batch_size),
        ("--block-size", block_size),
        ("--prompt-len", prompt),
        ("--new-tokens", new),
        ("--runs", args.runs),
    ])?;
    shaderformer::memory::check("the model", cfg.training_bytes())?;
    if args.what != What::Infer {
        check_block(block_size, cfg.block_size)?;
        check_batch(cfg, args.batch_size, block_size)?;
    }
    let gpu = gpu.open()?;
    let mut out = header(&gpu, describe(cfg), args);
    if matches!(args.what, What::Train | What::All) && args.plan_only {
        let shape = (args.batch_size, block_size);
        let setup = args.step_setup(true)?;
        let (memory, lora) = bench::plan_train(&gpu, cfg, shape, &setup)?;
        report_plan(&mut out, args, &memory, lora.as_ref(), &setup);
    } else if matches!(args.what, What::Train | What::All) {
        let r = bench::train(
            &gpu,
            cfg,
            (args.batch_size, block_size),
            (args.warmup, args.runs),
            &args.step_setup(true)?,
            &mut step_progress,
        )?;
        out.insert("train".into(), r.to_json());
        if !args.json_to_stdout() {
            print_train(&gpu, &r, args.warmup);
        }
    }
    if matches!(args.what, What::Infer | What::All) {
        add_infer(&gpu, &mut out, &infer(&gpu, cfg, args)?, args);
    }
    Ok(out)
}

/// Training and inference of a Llama-family shape on random weights (inference in each weight
/// format asked for). The memory the weights, their training state and the KV cache need is
/// checked before anything is allocated.
fn bench_llama(
    gpu: &GpuArgs,
    args: &BenchArgs,
    arch: &Arch,
) -> Result<serde_json::Map<String, serde_json::Value>> {
    let block_size = args.block_size.unwrap_or(64.min(arch.context));
    let (prompt, new) = args.lengths(arch.context);
    at_least_one(&[
        ("--batch-size", args.batch_size),
        ("--block-size", block_size),
        ("--prompt-len", prompt),
        ("--new-tokens", new),
        ("--runs", args.runs),
    ])?;
    let train = matches!(args.what, What::Train | What::All);
    let infer = matches!(args.what, What::Infer | What::All);
    if infer && prompt.saturating_add(new) > arch.context {
        return Err(Error::invalid(
            "--prompt-len",
            format!(
                "prompt {prompt} + new tokens {new} are beyond the model's context {}",
                arch.context
            ),
        ));
    }
    if train {
        check_block(block_size, arch.context)?;
    }
    let mut bytes = 0;
    if train {
        bytes = bench::llama_train_bytes(arch);
    }
    if infer {
        bytes = bytes.max(bench::llama_infer_bytes(arch, prompt + new));
    }
    shaderformer::memory::check("the model", bytes)?;
    let gpu = gpu.open()?;
    let mut out = header(&gpu, arch.describe(), args);
    if train && args.plan_only {
        let shape = (args.batch_size, block_size);
        let setup = args.step_setup(false)?;
        let (memory, lora) = bench::plan_train_llama(&gpu, arch, shape, &setup)?;
        report_plan(&mut out, args, &memory, lora.as_ref(), &setup);
    } else if train {
        let shape = (args.batch_size, block_size);
        let steps = (args.warmup, args.runs);
        let setup = args.step_setup(false)?;
        let r = bench::train_llama(&gpu, arch, shape, steps, &setup, &mut step_progress)?;
        out.insert("train".into(), r.to_json());
        if !args.json_to_stdout() {
            print_train(&gpu, &r, args.warmup);
        }
    }
    if infer {
        let table = LlamaParams::new(arch, 0.02)?;
        let params = table.init(1);
        let rows = (args.infer_setups(&gpu, arch.context).into_iter())
            .map(|setup| bench::infer_llama(&gpu, arch, &table, &params, setup))
            .collect::<Result<Vec<_>>>()?;
        add_infer(&gpu, &mut out, &rows, args);
    }
    Ok(out)
}

/// Writes `value` to `path` atomically (a temporary file beside it, then a rename).
fn write_json(path: &std::path::Path, value: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value).expect("JSON values serialize");
    shaderformer::plot::write_atomic(path, &(text + "\n"))
}

/// `bench --suite`: every headline benchmark, a table on stdout, the JSON to `json` (stdout
/// alone when it is "-"). Fails when any section failed, after writing what the others measured.
fn run_suite(gpu: &GpuArgs, suite: SuiteArg, json: Option<&std::path::Path>) -> Result<ExitCode> {
    use shaderformer::suite::{self, Plan, Suite};
    let to_stdout = json == Some(std::path::Path::new("-"));
    let plan = Plan::new(match suite {
        SuiteArg::Quick => Suite::Quick,
        SuiteArg::Full => Suite::Full,
    });
    // Quick measures no kernel choice unless asked (--tune or SHADERFORMER_TUNE): it takes the
    // tuning cache, the winners shipped for the adapter and the fixed rule, since measuring the
    // candidates of GPT-2's problems alone takes longer on a CPU adapter than the whole suite.
    let mut gpu = gpu.clone();
    if plan.suite == Suite::Quick && gpu.tune.is_none() {
        use shaderformer::gpu::tuning_cache::TuneMode;
        gpu.tune = Some(TuneMode::from_env_or(TuneMode::Cached)?.name().to_string());
    }
    let gpu = gpu.open()?;
    let start = std::time::Instant::now();
    let mut progress = |what: &str| {
        if !to_stdout {
            println!("[{:>6.1} s] {what}", start.elapsed().as_secs_f64());
        }
    };
    progress(&format!(
        "bench --suite {} on {}",
        plan.suite.name(),
        gpu.adapter_name()
    ));
    let mut outcome = suite::run(&gpu, &plan, &mut progress);
    let seconds = start.elapsed().as_secs_f64();
    outcome.json["seconds"] = seconds.into();
    if to_stdout {
        println!("{}", outcome.json);
    } else {
        println!("\nadapter: {}", gpu.adapter_name());
        print!("{}", suite::table(&outcome.rows));
        println!("{:.1} s in all", seconds);
        if let Some(path) = json {
            write_json(path, &outcome.json)?;
            println!("JSON: {}", path.display());
        }
    }
    if outcome.failures.is_empty() {
        Ok(ExitCode::SUCCESS)
    } else {
        for (section, e) in &outcome.failures {
            eprintln!("error: {section}: {e}");
        }
        Ok(ExitCode::FAILURE)
    }
}

/// The model's shape in one line, with its parameter count.
fn describe(cfg: &GptConfig) -> String {
    format!(
        "{} layers, {} heads, {} embd, vocab {}, context {} ({:.1}M parameters)",
        cfg.n_layer,
        cfg.n_head,
        cfg.n_embd,
        cfg.vocab_size,
        cfg.block_size,
        cfg.num_params() as f64 / 1e6
    )
}

/// The training step's time and throughput, then the GPU time of each kernel.
fn print_train(gpu: &Gpu, r: &TrainBench, warmup: usize) {
    println!(
        "\ntraining step, batch {} x {} tokens (median of {} after {} warm-up):",
        r.b, r.t, r.step.runs, warmup
    );
    println!(
        "  {:.1} ms/step (min {:.1}, max {:.1}), {:.0} tokens/s, {:.4} TFLOP/s ({:.2} GFLOP per step, nanoGPT's 6N + 12LHQT)",
        r.step.median * 1e3,
        r.step.min * 1e3,
        r.step.max * 1e3,
        r.tokens_per_s,
        r.tflops,
        r.flops_per_step / 1e9
    );
    print_memory(&r.memory, r.lora.as_ref());
    print_kernels(
        &format!(
            "GPU time per kernel in one step ({}",
            gpu.timing_method().name()
        ),
        &r.kernels,
        r.kernel_total,
    );
}

/// A planned step (`--plan-only`): its memory into the output, and printed.
fn report_plan(
    out: &mut serde_json::Map<String, serde_json::Value>,
    args: &BenchArgs,
    memory: &bench::Memory,
    lora: Option<&bench::AdapterSummary>,
    setup: &bench::StepSetup,
) {
    out.insert("train".into(), bench::plan_json(memory, lora, setup));
    if !args.json_to_stdout() {
        println!(
            "\ntraining step planned (not timed), recompute {}, activations saved in {}:",
            setup.recompute.name(),
            setup.activations.name()
        );
        print_memory(memory, lora);
    }
}

/// The planned device memory of a training step and its adapter, if any.
fn print_memory(m: &bench::Memory, lora: Option<&bench::AdapterSummary>) {
    let mib = |b: u64| b as f64 / 1048576.0;
    println!(
        "  planned device memory {:.1} MiB: parameters {:.1}, gradients {:.1}, AdamW moments {:.1}, activations {:.1}",
        mib(m.total()),
        mib(m.params),
        mib(m.grads),
        mib(m.moments),
        mib(m.activations)
    );
    if let Some(a) = lora {
        println!(
            "  LoRA r {} alpha {} on {}: {} trainable parameters, adapter file {:.2} MiB",
            a.cfg.r,
            a.cfg.alpha,
            a.cfg.targets.join(","),
            a.trainable,
            mib(a.file_bytes)
        );
    }
}

/// A table of kernels' GPU times under `title` (which ends with "; ... in all):").
fn print_kernels(title: &str, rows: &[KernelRow], total: f64) {
    println!("\n{title}; {:.1} ms in all):", total * 1e3);
    println!(
        "  {:<34} {:>6} {:>10} {:>7}",
        "kernel", "calls", "ms", "share"
    );
    for k in rows {
        println!(
            "  {:<34} {:>6} {:>10.2} {:>6.1}%",
            k.name,
            k.calls,
            k.seconds * 1e3,
            k.share * 100.0
        );
    }
}

/// Measures inference in each weight format asked for.
fn infer(gpu: &Gpu, cfg: &GptConfig, args: &BenchArgs) -> Result<Vec<InferBench>> {
    let params = bench::random_params(cfg, 1);
    (args.infer_setups(gpu, cfg.block_size).into_iter())
        .map(|setup| bench::infer(gpu, cfg, &params, setup))
        .collect()
}

/// One table row per weight format: prefill and decode throughput, and full recomputation's.
fn print_infer(gpu: &Gpu, rows: &[InferBench], args: &BenchArgs) {
    println!(
        "\ninference, batch 1, prompt {} tokens, {} new tokens (median of {} after {} warm-up):",
        rows.first().map_or(0, |r| r.prompt_len),
        rows.first().map_or(0, |r| r.new_tokens),
        args.runs,
        args.warmup
    );
    println!(
        "  {:<6} {:>14} {:>16} {:>16} {:>22}",
        "dtype", "prefill tok/s", "decode tok/s", "decode ms/tok", "recompute ms/tok"
    );
    for r in rows {
        println!(
            "  {:<6} {:>14.1} {:>16.2} {:>16.2} {:>22}",
            r.dtype.name(),
            r.prefill_tokens_per_s(),
            r.decode_tokens_per_s(),
            r.decode.median * 1e3,
            r.recompute.map_or("-".to_string(), |x| format!(
                "{:.2} ({} tok)",
                x.median * 1e3,
                r.recompute_tokens.min(r.new_tokens)
            ))
        );
    }
    for r in rows.iter().filter(|r| !r.decode_kernels.is_empty()) {
        print_kernels(
            &format!(
                "GPU time per kernel of one decoded token, {} ({}",
                r.dtype.name(),
                gpu.timing_method().name()
            ),
            &r.decode_kernels,
            r.decode_kernel_total,
        );
    }
}
