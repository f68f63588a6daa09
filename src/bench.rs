//! `shaderformer bench`: training-step and inference throughput on random weights of any GPT-2
//! shape (nothing to download), with the per-kernel GPU time of a training step.

use std::time::Instant;

use serde_json::{Value, json};

use crate::error::Result;
use crate::gpu::Gpu;
use crate::graph::{ExecOptions, Executor, MicroBatch, ParamStore};
use crate::kernels::harness::TimeStats;
use crate::model::gpt::{self, Mode};
use crate::model::{GptConfig, ParamTable};
use crate::rng::Rng;

/// One kernel's share of a training step.
#[derive(Clone, Debug)]
pub struct KernelRow {
    pub name: String,
    pub calls: usize,
    pub seconds: f64,
    pub share: f64,
}

#[derive(Clone, Debug)]
pub struct TrainBench {
    pub b: usize,
    pub t: usize,
    /// Wall-clock time of a whole step (submit to results back), over runs.
    pub step: TimeStats,
    pub tokens_per_s: f64,
    /// nanoGPT's estimate: 6N + 12·L·H·Q·T FLOPs per token.
    pub flops_per_step: f64,
    pub tflops: f64,
    /// GPU time per kernel in one profiled step, largest share first.
    pub kernels: Vec<KernelRow>,
    pub kernel_total: f64,
}

/// FLOPs of one training step per nanoGPT's `estimate_mfu`: N counts the parameters without the
/// position table.
pub fn train_flops(cfg: &GptConfig, b: usize, t: usize) -> f64 {
    let n = (cfg.num_params() - cfg.block_size * cfg.n_embd) as f64;
    let (l, h, q) = (
        cfg.n_layer as f64,
        cfg.n_head as f64,
        cfg.head_size() as f64,
    );
    let per_token = 6.0 * n + 12.0 * l * h * q * t as f64;
    per_token * (b * t) as f64
}

/// Random GPT-2 weights of `cfg`'s shape.
pub fn random_params(cfg: &GptConfig, seed: u64) -> Vec<Vec<f32>> {
    ParamTable::new(cfg).init(cfg, seed)
}

fn random_batch(cfg: &GptConfig, b: usize, t: usize, rng: &mut Rng) -> MicroBatch {
    let mut ids = || {
        (0..b * t)
            .map(|_| rng.below(cfg.vocab_size as u64) as u32)
            .collect()
    };
    MicroBatch {
        tokens: ids(),
        targets: ids(),
    }
}

/// Times training steps of batch `b` × `t` tokens: `warmup` untimed steps, then `runs` timed ones,
/// then one step profiled per kernel.
pub fn train(
    gpu: &Gpu,
    cfg: &GptConfig,
    b: usize,
    t: usize,
    warmup: usize,
    runs: usize,
) -> Result<TrainBench> {
    let table = ParamTable::new(cfg);
    let store = ParamStore::new(gpu, &table.store_specs(), &random_params(cfg, 1), true)?;
    let g = gpt::build(cfg, &table, b, t, Mode::Train);
    let mut exec = Executor::new(gpu, g.graph, &store, ExecOptions::default())?;
    let mut rng = Rng::new(2);
    let mut step = 0u32;
    for _ in 0..warmup {
        step += 1;
        exec.step(&[random_batch(cfg, b, t, &mut rng)], 1e-4, step)?;
        exec.wait_results()?;
    }
    let mut samples = Vec::new();
    for _ in 0..runs.max(1) {
        step += 1;
        let batch = random_batch(cfg, b, t, &mut rng);
        let t0 = Instant::now();
        exec.step(&[batch], 1e-4, step)?;
        exec.wait_results()?;
        samples.push(t0.elapsed().as_secs_f64());
    }
    let stats = TimeStats::from_samples(&samples);
    step += 1;
    let profile = exec.profile_step(&random_batch(cfg, b, t, &mut rng), 1e-4, step)?;
    let kernel_total: f64 = profile.iter().map(|(_, s)| s).sum();
    let mut rows: Vec<KernelRow> = Vec::new();
    for (name, s) in profile {
        match rows.iter_mut().find(|r| r.name == name) {
            Some(r) => {
                r.calls += 1;
                r.seconds += s;
            }
            None => rows.push(KernelRow {
                name,
                calls: 1,
                seconds: s,
                share: 0.0,
            }),
        }
    }
    for r in &mut rows {
        r.share = r.seconds / kernel_total.max(1e-12);
    }
    rows.sort_by(|a, b| b.seconds.total_cmp(&a.seconds));
    let flops = train_flops(cfg, b, t);
    Ok(TrainBench {
        b,
        t,
        step: stats,
        tokens_per_s: (b * t) as f64 / stats.median,
        flops_per_step: flops,
        tflops: flops / stats.median / 1e12,
        kernels: rows,
        kernel_total,
    })
}

impl TrainBench {
    pub fn to_json(&self) -> Value {
        json!({
            "batch_size": self.b,
            "block_size": self.t,
            "ms_per_step": {"median": self.step.median * 1e3, "min": self.step.min * 1e3, "max": self.step.max * 1e3, "runs": self.step.runs},
            "tokens_per_s": self.tokens_per_s,
            "flops_per_step": self.flops_per_step,
            "tflops": self.tflops,
            "kernels": self.kernels.iter().map(|k| json!({
                "name": k.name, "calls": k.calls, "ms": k.seconds * 1e3, "share": k.share,
            })).collect::<Vec<_>>(),
            "kernel_total_ms": self.kernel_total * 1e3,
        })
    }
}
