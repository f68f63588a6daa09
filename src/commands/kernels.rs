//! `shaderformer kernels list|check|bench`.

use std::process::ExitCode;

use shaderformer::Result;
use shaderformer::kernels::harness::{self, BenchOptions};

use crate::{GpuArgs, KernelsCommand};

pub fn kernels(args: &GpuArgs, cmd: KernelsCommand) -> Result<ExitCode> {
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
                    harness::validate_shape(f, &s)?;
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
            only,
        } => {
            let f = harness::find(&kernel)?;
            let shape = match shape {
                Some(s) => harness::parse_shape(&s)?,
                None => f.bench_shape.to_vec(),
            };
            harness::validate_shape(f, &shape)?;
            if runs == 0 {
                return Err(shaderformer::Error::invalid("--runs", "must be at least 1"));
            }
            let gpu = args.open()?;
            let opts = BenchOptions { warmup, runs, only };
            let reports = (f.bench)(&gpu, &shape, &opts)?;
            println!(
                "adapter: {}   timing: {}   median of {runs} runs after {warmup} warm-up",
                gpu.adapter_name(),
                gpu.timing_method().name()
            );
            println!(
                "{:<48} {:<16} {:>11} {:>11} {:>11} {:>10} {:>9} {:>12}",
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
    }
}
