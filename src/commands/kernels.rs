//! `shaderformer kernels list|check|bench`.

use std::process::ExitCode;

use shaderformer::Result;
use shaderformer::gpu::Gpu;
use shaderformer::kernels::harness::{self, BenchOptions, CheckReport, Family};

use crate::{GpuArgs, KernelsCommand};

pub fn kernels(args: &GpuArgs, cmd: KernelsCommand) -> Result<ExitCode> {
    match cmd {
        KernelsCommand::List => {
            for f in harness::families() {
                println!("{:<14} --shape {:<14} {}", f.name, f.shape_help, f.about);
            }
            Ok(ExitCode::SUCCESS)
        }
        KernelsCommand::Check {
            kernel,
            shape,
            exhaustive,
        } => {
            harness::set_exhaustive(exhaustive);
            check(args, kernel.as_deref(), shape.as_deref())
        }
        KernelsCommand::Bench {
            kernel,
            shape,
            runs,
            warmup,
            only,
        } => bench(
            args,
            &kernel,
            shape.as_deref(),
            BenchOptions { warmup, runs, only },
        ),
    }
}

/// Checks `kernel` (every family when None) on `shape` (the family's default shapes when None)
/// against the CPU reference, one line per comparison; fails when any comparison does.
fn check(args: &GpuArgs, kernel: Option<&str>, shape: Option<&str>) -> Result<ExitCode> {
    let families = match kernel {
        Some(k) => vec![harness::find(k)?],
        None => harness::families(),
    };
    let shape = shape.map(harness::parse_shape).transpose()?;
    let gpu = args.open()?;
    println!("adapter: {}", gpu.adapter_name());
    let mut tally = Tally::default();
    for f in families {
        let shapes: Vec<Vec<usize>> = match &shape {
            Some(s) => vec![s.clone()],
            None => f.default_shapes.iter().map(|s| s.to_vec()).collect(),
        };
        for s in shapes {
            harness::validate_shape(f, &s)?;
            tally.check(&gpu, f, &s);
        }
    }
    println!("{} checks, {} failed", tally.total, tally.failed);
    Ok(if tally.failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Checks run and failed so far.
#[derive(Default)]
struct Tally {
    total: usize,
    failed: usize,
}

impl Tally {
    /// Runs family `f`'s check on `shape` and prints its comparisons; a check that cannot run
    /// counts as one failure.
    fn check(&mut self, gpu: &Gpu, f: &Family, shape: &[usize]) {
        match (f.check)(gpu, shape) {
            Ok(reports) => {
                for r in reports {
                    self.report(f, &r);
                }
            }
            Err(e) => {
                self.total += 1;
                self.failed += 1;
                println!("{:<14} {:?}  FAILED: {e}", f.name, shape);
            }
        }
    }

    fn report(&mut self, f: &Family, r: &CheckReport) {
        self.total += 1;
        let c = &r.comparison;
        let verdict = if r.ok() {
            "ok".to_string()
        } else {
            self.failed += 1;
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

/// Times `kernel`'s variants on `shape` (the family's bench shape when None), one table row each.
fn bench(
    args: &GpuArgs,
    kernel: &str,
    shape: Option<&str>,
    opts: BenchOptions,
) -> Result<ExitCode> {
    let f = harness::find(kernel)?;
    let shape = match shape {
        Some(s) => harness::parse_shape(s)?,
        None => f.bench_shape.to_vec(),
    };
    harness::validate_shape(f, &shape)?;
    let (warmup, runs) = (opts.warmup, opts.runs);
    if runs == 0 {
        return Err(shaderformer::Error::invalid("--runs", "must be at least 1"));
    }
    let gpu = args.open()?;
    let reports = (f.bench)(&gpu, &shape, &opts)?;
    println!(
        "adapter: {}   timing: {}   median of {runs} runs after {warmup} warm-up",
        gpu.adapter_name(),
        gpu.timing_method().name()
    );
    println!(
        "{:<48} {:<16} {:>11} {:>11} {:>11} {:>10} {:>9} {:>12}",
        "variant", "shape", "median ms", "min ms", "max ms", "GFLOP/s", "GB/s", "extra bytes"
    );
    for r in reports {
        println!(
            "{:<48} {:<16} {:>11.4} {:>11.4} {:>11.4} {:>10.2} {:>9.2} {:>12}",
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
