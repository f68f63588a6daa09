//! The `shaderformer` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use shaderformer::Result;
use shaderformer::gpu::{self, Gpu, GpuOptions, ShaderSource};

mod commands;

#[derive(Parser)]
#[command(
    name = "shaderformer",
    version,
    about = "GPT training and inference on WGSL compute shaders"
)]
struct Cli {
    #[command(flatten)]
    gpu: GpuArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Clone)]
pub struct GpuArgs {
    /// Graphics API: vulkan, metal, dx12 or gl (default: all, preferring native APIs).
    #[arg(long, global = true, env = gpu::ENV_BACKEND)]
    backend: Option<String>,
    /// Adapter to use: its index in `shaderformer devices` (given the same --backend) or a
    /// substring of its name (default: the highest-performance adapter).
    #[arg(long, global = true, env = gpu::ENV_ADAPTER)]
    adapter: Option<String>,
    /// Load shaders from this directory instead of the embedded copies: `<family>.wgsl` and
    /// `include/*.wgsl` (files missing there fall back to the embedded ones).
    #[arg(long, global = true, value_name = "DIR")]
    shader_dir: Option<PathBuf>,
    /// Kernel choice by measurement: `on` measures what the cache lacks, `cached` uses the
    /// cache and the fixed rule for the rest, `off` uses the fixed rule everywhere.
    /// [default: SHADERFORMER_TUNE, else on]
    #[arg(long, global = true, value_name = "MODE")]
    pub tune: Option<String>,
}

impl GpuArgs {
    /// `--tune`, else `SHADERFORMER_TUNE` (an empty variable counts as unset), else on; a bad
    /// value is an error naming where it came from.
    pub fn tune_mode(&self) -> Result<gpu::tuning_cache::TuneMode> {
        match &self.tune {
            Some(s) => s.parse(),
            None => gpu::tuning_cache::TuneMode::from_env_or(gpu::tuning_cache::TuneMode::On),
        }
    }

    pub fn open(&self) -> Result<Gpu> {
        let shaders = match &self.shader_dir {
            Some(dir) => {
                if !dir.is_dir() {
                    return Err(shaderformer::Error::invalid(
                        "--shader-dir",
                        format!("{} is not a directory", dir.display()),
                    ));
                }
                let source = ShaderSource::Dir(dir.clone());
                source.check_files()?;
                source
            }
            None => ShaderSource::Embedded,
        };
        Gpu::new(&GpuOptions {
            backend: self.backend.clone(),
            adapter: self.adapter.clone(),
            shaders,
            tune: self.tune_mode()?,
        })
    }
}

#[derive(Subcommand)]
enum Command {
    /// List every GPU adapter with its backend, limits and features.
    Devices,
    /// Work on individual kernels: list, check against the CPU reference, benchmark.
    #[command(subcommand)]
    Kernels(KernelsCommand),
    /// Train a GPT on the GPU (nanoGPT's flags). Without --data: the embedded addition dataset.
    Train(Box<commands::train::TrainArgs>),
    /// Generate text from a checkpoint.
    Sample(commands::train::SampleArgs),
    /// Mean cross-entropy and perplexity of a checkpoint on a file.
    Score(commands::score::ScoreArgs),
    /// Merge a peft LoRA adapter into its base checkpoint (a plain checkpoint transformers loads).
    Merge(commands::merge::MergeArgs),
    /// Benchmark training and inference on random weights of a GPT-2 shape.
    Bench(commands::bench::BenchArgs),
    /// Measure every kernel variant of a workload on this adapter and cache the winners.
    Tune(commands::tune_ahead::TuneArgs),
    /// Draw the loss curves of one or several runs' metrics files (train --metrics) as SVG.
    Plot(commands::plot::PlotArgs),
}

#[derive(Subcommand)]
pub enum KernelsCommand {
    /// List the kernel families.
    List,
    /// Run forward and backward against the CPU reference and print the max error.
    Check {
        /// Kernel family (all when omitted).
        kernel: Option<String>,
        /// Shape, e.g. 127x45x129 (the family's awkward default shapes when omitted).
        #[arg(long)]
        shape: Option<String>,
        /// Check every variant in every layout (gemm: every kernel under every transpose, vec4
        /// and f16 combination), not each variant in the layouts that build its pipeline once.
        /// Slow where the shader cache is empty.
        #[arg(long)]
        exhaustive: bool,
    },
    /// Time a kernel family's variants on the GPU.
    Bench {
        /// Kernel family.
        kernel: String,
        /// Shape, e.g. 1024x1024x1024.
        #[arg(long)]
        shape: Option<String>,
        /// Timed runs (the median is reported).
        #[arg(long, default_value_t = 10)]
        runs: usize,
        /// Untimed warm-up runs.
        #[arg(long, default_value_t = 2)]
        warmup: usize,
        /// Time only the candidates whose name holds this text (gemm and attention), e.g.
        /// `--only ureg`.
        #[arg(long)]
        only: Option<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Devices => devices(&cli.gpu),
        Command::Kernels(k) => commands::kernels::kernels(&cli.gpu, k),
        Command::Train(a) => commands::train::train(&cli.gpu, &a),
        Command::Sample(a) => commands::train::sample(&cli.gpu, &a),
        Command::Score(a) => commands::score::score(&cli.gpu, &a),
        Command::Merge(a) => commands::merge::merge(&a),
        Command::Bench(a) => commands::bench::bench(&cli.gpu, &a),
        Command::Tune(a) => commands::tune_ahead::tune(&cli.gpu, &a),
        Command::Plot(a) => commands::plot::plot(&a),
    }
}

fn devices(args: &GpuArgs) -> Result<ExitCode> {
    let adapters = gpu::enumerate(args.backend.as_deref())?;
    if adapters.is_empty() {
        println!(
            "no GPU adapters found (on Linux without a GPU: apt-get install mesa-vulkan-drivers)"
        );
        return Ok(ExitCode::FAILURE);
    }
    for (i, a) in adapters.iter().enumerate() {
        println!("{}", gpu::adapter_report(i, a));
    }
    Ok(ExitCode::SUCCESS)
}
