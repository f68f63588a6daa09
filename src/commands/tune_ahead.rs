//! `shaderformer tune`: measures every kernel of a workload on this adapter ahead of time, fills
//! the tuning cache and prints what won against the fixed rule.

use std::process::ExitCode;
use std::time::Instant;

use clap::Args;

use shaderformer::bench;
use shaderformer::error::Result;
use shaderformer::gpu::tuning_cache::Choice;
use shaderformer::gpu::{DType, Gpu, TuneMode};
use shaderformer::model::llama_params::LlamaParams;
use shaderformer::model::presets::Preset;

use super::bench::{ModelArgs, at_least_one, check_block};
use crate::GpuArgs;

#[derive(Args, Debug)]
pub struct TuneArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Training batch size.
    #[arg(long, default_value_t = 4)]
    batch_size: usize,
    /// Training sequence length.
    #[arg(long, default_value_t = 64)]
    block_size: usize,
    /// Also tune inference (prefill of --block-size tokens and one-token decoding).
    #[arg(long)]
    infer: bool,
}

pub fn tune(gpu: &GpuArgs, args: &TuneArgs) -> Result<ExitCode> {
    let (b, t) = (args.batch_size, args.block_size);
    at_least_one(&[("--batch-size", b), ("--block-size", t)])?;
    let preset = args.model.preset()?;
    match &preset {
        Preset::Gpt2(cfg) => {
            shaderformer::memory::check("the model", cfg.training_bytes())?;
            check_block(t, cfg.block_size)?;
            super::bench::check_batch(cfg, b, t)?;
        }
        Preset::Llama(arch) => {
            check_block(t, arch.context)?;
            let infer = bench::llama_infer_bytes(arch, t + 1);
            let bytes = bench::llama_train_bytes(arch).max(infer);
            shaderformer::memory::check("the model", bytes)?;
        }
    }
    // Tuning is this command's job: whatever mode was asked for (once it is a valid one).
    gpu.tune_mode()?;
    let mut gpu_args = gpu.clone();
    // Asked to measure: the winners shipped for this kind of adapter are not taken on trust.
    gpu_args.tune = Some(TuneMode::Measure.name().into());
    let gpu = gpu_args.open()?;
    let t0 = Instant::now();
    println!("adapter: {}", gpu.adapter_name());
    if let Some(p) = gpu.tuner.path() {
        println!("cache:   {}", p.display());
    }
    // Building the executors looks up (and measures) every kernel the workload runs; with
    // --infer, a prefill of --block-size tokens and one decoded token do the same for inference.
    let setup = |context: usize| bench::InferSetup {
        dtype: DType::F32,
        prompt_len: t.min(context - 1),
        new_tokens: 1,
        warmup: 0,
        runs: 1,
        recompute_tokens: 0,
    };
    match &preset {
        Preset::Gpt2(cfg) => {
            bench::build_training(&gpu, cfg, b, t)?;
            if args.infer {
                let params = bench::random_params(cfg, 1);
                bench::infer(&gpu, cfg, &params, setup(cfg.block_size))?;
            }
        }
        Preset::Llama(arch) => {
            bench::build_training_llama(&gpu, arch, (b, t))?;
            if args.infer {
                let table = LlamaParams::new(arch, 0.02)?;
                let params = table.init(1);
                bench::infer_llama(&gpu, arch, &table, &params, setup(arch.context))?;
            }
        }
    }
    print_table(&gpu);
    println!("done in {:.1} s", t0.elapsed().as_secs_f64());
    Ok(ExitCode::SUCCESS)
}

/// "12.34 GFLOP/s" for compute-heavy work, "GB/s" for memory-bound work.
fn speed(c: &Choice, seconds: f64) -> String {
    if c.flops >= c.bytes && c.flops > 0 {
        format!("{:.2} GFLOP/s", c.flops as f64 / seconds / 1e9)
    } else {
        format!("{:.2} GB/s", c.bytes as f64 / seconds / 1e9)
    }
}

/// The measured problems the workload used: winner and fixed rule side by side.
pub fn print_table(gpu: &Gpu) {
    let choices = gpu.tuner.used_choices();
    println!(
        "\n{:<10} {:<28} {:<22} {:>16}   {:<22} {:>16} {:>8}",
        "kernel", "problem", "winner", "speed", "fixed rule", "speed", "gain"
    );
    for c in &choices {
        let win = c.time_of(&c.winner);
        let rule = c.time_of(&c.rule);
        let cell = |t: Option<f64>| t.map_or("-".to_string(), |t| speed(c, t));
        let gain = match (win, rule) {
            (Some(w), Some(r)) => format!("{:.2}x", r / w),
            _ => "-".into(),
        };
        println!(
            "{:<10} {:<28} {:<22} {:>16}   {:<22} {:>16} {:>8}",
            c.family,
            c.shape,
            c.winner,
            cell(win),
            c.rule,
            cell(rule),
            gain
        );
        for (name, why) in &c.rejected {
            println!("{:<10} {:<28} rejected {name}: {why}", "", "");
        }
    }
    let rest = gpu.tuner.unmeasured();
    if !rest.is_empty() {
        println!(
            "{} problem(s) with a single candidate or pinned, not measured: {}",
            rest.len(),
            rest.iter()
                .map(|(k, v)| format!("{k} -> {v}"))
                .collect::<Vec<_>>()
                .join("; ")
        );
    }
}
