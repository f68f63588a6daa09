//! The `shaderformer` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use shaderformer::Result;
use shaderformer::gpu::{self, Gpu, GpuOptions, ShaderSource};
use shaderformer::kernels::harness::{self, BenchOptions};

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
struct GpuArgs {
    /// Graphics API: vulkan, metal, dx12 or gl (default: all, preferring native APIs).
    #[arg(long, global = true, env = gpu::ENV_BACKEND)]
    backend: Option<String>,
    /// Adapter to use: its index in `shaderformer devices` or a substring of its name
    /// (default: the highest-performance adapter).
    #[arg(long, global = true, env = gpu::ENV_ADAPTER)]
    adapter: Option<String>,
    /// Load shaders from this directory instead of the embedded copies (files missing there
    /// fall back to the embedded ones).
    #[arg(long, global = true, value_name = "DIR")]
    shader_dir: Option<PathBuf>,
}

impl GpuArgs {
    fn open(&self) -> Result<Gpu> {
        let shaders = match &self.shader_dir {
            Some(dir) => {
                if !dir.is_dir() {
                    return Err(shaderformer::Error::invalid(
                        "--shader-dir",
                        format!("{} is not a directory", dir.display()),
                    ));
                }
                ShaderSource::Dir(dir.clone())
            }
            None => ShaderSource::Embedded,
        };
        Gpu::new(&GpuOptions {
            backend: self.backend.clone(),
            adapter: self.adapter.clone(),
            shaders,
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
}

#[derive(Subcommand)]
enum KernelsCommand {
    /// List the kernel families.
    List,
    /// Run forward and backward against the CPU reference and print the max error.
    Check {
        /// Kernel family (all when omitted).
        kernel: Option<String>,
        /// Shape, e.g. 127x45x129 (the family's awkward default shapes when omitted).
        #[arg(long)]
        shape: Option<String>,
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
        Command::Kernels(k) => kernels(&cli.gpu, k),
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

fn kernels(args: &GpuArgs, cmd: KernelsCommand) -> Result<ExitCode> {
    match cmd {
        KernelsCommand::List => {
            for f in harness::families() {
                println!("{:<14} --shape {:<14} {}", f.name, f.shape_help, f.about);
            }
            Ok(ExitCode::SUCCESS)
        }
        KernelsCommand::Check { kernel, shape } => {
            let families = match &kernel {
                Some(k) => vec![harness::find(k)?],
                None => harness::families(),
            };
            let shape = shape.as_deref().map(harness::parse_shape).transpose()?;
            let gpu = args.open()?;
            println!("adapter: {}", gpu.adapter_name());
            let (mut total, mut failed) = (0, 0);
            for f in families {
                let shapes: Vec<Vec<usize>> = match &shape {
                    Some(s) => vec![s.clone()],
                    None => f.default_shapes.iter().map(|s| s.to_vec()).collect(),
                };
                for s in shapes {
                    let reports = match (f.check)(&gpu, &s) {
                        Ok(r) => r,
                        Err(e) => {
                            total += 1;
                            failed += 1;
                            println!("{:<14} {:?}  FAILED: {e}", f.name, s);
                            continue;
                        }
                    };
                    for r in reports {
                        total += 1;
                        let c = &r.comparison;
                        let verdict = if r.ok() {
                            "ok".to_string()
                        } else {
                            failed += 1;
                            match c.first_bad {
                                Some((i, got, want)) => format!(
                                    "FAILED ({} bad; first at {i}: got {got:e}, want {want:e})",
                                    c.bad_count
                                ),
                                None => "FAILED".into(),
                            }
                        };
                        println!(
                            "{:<14} {:<22} {:<28} max abs err {:>9.2e}  {verdict}",
                            f.name, r.shape, c.name, c.max_abs
                        );
                    }
                }
            }
            println!("{total} checks, {failed} failed");
            Ok(if failed == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        KernelsCommand::Bench {
            kernel,
            shape,
            runs,
            warmup,
        } => {
            let f = harness::find(&kernel)?;
            let shape = match shape {
                Some(s) => harness::parse_shape(&s)?,
                None => f.bench_shape.to_vec(),
            };
            let gpu = args.open()?;
            let opts = BenchOptions { warmup, runs };
            let reports = (f.bench)(&gpu, &shape, &opts)?;
            println!(
                "adapter: {}   timing: {}   median of {runs} runs after {warmup} warm-up",
                gpu.adapter_name(),
                gpu.timing_method().name()
            );
            println!(
                "{:<28} {:<24} {:>11} {:>11} {:>11} {:>10} {:>9} {:>12}",
                "variant",
                "shape",
                "median ms",
                "min ms",
                "max ms",
                "GFLOP/s",
                "GB/s",
                "extra bytes"
            );
            for r in reports {
                println!(
                    "{:<28} {:<24} {:>11.4} {:>11.4} {:>11.4} {:>10.2} {:>9.2} {:>12}",
                    r.variant,
                    r.shape,
                    r.time.median * 1e3,
                    r.time.min * 1e3,
                    r.time.max * 1e3,
                    r.gflops(),
                    r.gbps(),
                    r.extra_bytes.map_or("-".to_string(), |b| b.to_string())
                );
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
