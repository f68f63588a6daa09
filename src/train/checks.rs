//! Checks of a run's settings before anything is built, and what a resumed run says about the
//! kernels it could not take from its checkpoint.

use super::{TrainConfig, addition, metrics};
use crate::error::{Error, Result};
use crate::gpu::Gpu;

/// Rejects settings no run can use, naming the flag: rates and decay that are negative or not
/// finite (a NaN learning rate would turn every parameter into NaN at the first update), no
/// steps, no evaluation batches, AdamW betas outside [0, 1), a block shorter than one line of
/// the addition dataset.
pub fn check_settings(cfg: &TrainConfig) -> Result<()> {
    metrics::check_outputs(cfg)?;
    check_sizes(cfg)?;
    if let Some(l) = &cfg.llama
        && cfg.init.is_none()
        && cfg.resume.is_none()
    {
        l.check(cfg)?;
    }
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

/// Lines saying which problems a resumed run computes with other kernels than its checkpoint's
/// (their recorded variants no longer exist: an edited shader, a renamed variant), so it is not
/// bit for bit the run that wrote the checkpoint.
pub(super) fn dropped_kernels(gpu: &Gpu) -> Vec<String> {
    let dropped = gpu.tuner.unusable_pins();
    if dropped.is_empty() {
        return Vec::new();
    }
    let used = gpu.tuner.used();
    let mut lines = vec![format!(
        "kernels: {} of the checkpoint's recorded variants no longer exist; these problems were \
         chosen again ({}), so the run is not bit for bit the one that wrote the checkpoint:",
        dropped.len(),
        match gpu.tuner.mode() {
            crate::gpu::tuning_cache::TuneMode::On => "measured, or taken from the tuning cache",
            _ => "by the tuning cache or the fixed rule",
        }
    )];
    for (key, was) in dropped {
        let now = used.get(&key).map_or("?", String::as_str);
        lines.push(format!("  {key}: {was} -> {now}"));
    }
    lines
}

/// Refuses batch sizes whose products (tokens per step; lines of the embedded dataset) would
/// overflow, naming the flags.
fn check_sizes(cfg: &TrainConfig) -> Result<()> {
    let (b, t, ga) = (
        cfg.batch_size as u64,
        cfg.block_size as u64,
        cfg.grad_accum as u64,
    );
    crate::sizes::product(&[
        ("--batch-size", b),
        ("--block-size", t),
        ("--grad-accum", ga),
    ])?;
    if cfg.data.is_none() {
        crate::sizes::product(&[
            ("--max-iters", cfg.max_iters),
            ("--batch-size", b),
            ("--grad-accum", ga),
            ("lines per sequence and split", 16),
        ])?;
    }
    Ok(())
}
