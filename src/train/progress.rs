//! A run's progress as step results arrive: the log lines or the progress bar, the metrics file
//! and its loss plot, and the divergence check.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use super::TrainConfig;
use crate::dist::Comm;
use crate::error::{Error, Result};
use crate::graph::StepResult;

pub(super) struct Metrics {
    file: Option<std::fs::File>,
    /// Every record written (and, when resuming, those already in the file), for loss.svg.
    curves: crate::plot::Curves,
}

impl Metrics {
    fn open(path: Option<&Path>, append: bool) -> Result<Metrics> {
        let curves = match path {
            Some(p) if append && p.exists() => crate::plot::Curves::read(p)?,
            _ => crate::plot::Curves::new("training"),
        };
        let file = match path {
            Some(p) => Some(
                std::fs::OpenOptions::new()
                    .create(true)
                    .write(true)
                    .append(append)
                    .truncate(!append)
                    .open(p)
                    .map_err(|e| Error::io(p, e))?,
            ),
            None => None,
        };
        Ok(Metrics { file, curves })
    }

    /// Draws the train and validation loss so far as `DIR/loss.svg`.
    pub(super) fn plot(&self, dir: &Path) -> Result<()> {
        let svg = crate::plot::svg(std::slice::from_ref(&self.curves));
        crate::plot::write_atomic(&dir.join("loss.svg"), &svg)
    }

    pub(super) fn write(&mut self, v: Value) -> Result<()> {
        self.curves.add(&v);
        if let Some(f) = &mut self.file {
            writeln!(f, "{v}").map_err(|e| Error::io("metrics", e))?;
        }
        Ok(())
    }
}

/// Logging, metrics and the divergence check, as step results arrive.
pub(super) struct Progress<'a> {
    cfg: &'a TrainConfig,
    pub(super) bar: Option<indicatif::ProgressBar>,
    pub(super) metrics: Metrics,
    /// Wall-clock ms of each submitted step whose results have not arrived yet.
    pub(super) ms_of: std::collections::VecDeque<(u64, f64)>,
    pub(super) last_loss: Option<f32>,
    /// The last whole checkpoint on disk: its directory and step.
    pub(super) last_ckpt: Option<(PathBuf, u64)>,
    pub(super) tokens_per_step: usize,
}

impl Progress<'_> {
    pub(super) fn log(&self, s: String) {
        match &self.bar {
            Some(pb) => pb.println(s),
            None if self.cfg.verbose => println!("{s}"),
            None => {}
        }
    }

    /// The error that stops a diverged run: `what` happened, nothing was written, and the last
    /// checkpoint (if any) is intact.
    pub(super) fn diverged(&self, what: String) -> Error {
        let kept = match &self.last_ckpt {
            Some((dir, s)) => format!("; {} (step {s}) is untouched", dir.display()),
            None => String::new(),
        };
        Error::invalid(
            "train",
            format!("training diverged {what}; stopped without writing a checkpoint{kept}"),
        )
    }

    pub(super) fn handle(&mut self, results: Vec<StepResult>) -> Result<()> {
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

impl<'a> Progress<'a> {
    /// Progress from `step` on: a bar that draws on stderr and replaces the log lines, only when
    /// both are terminals, and never for the ranks of a job, whose output mpirun interleaves.
    pub(super) fn new(cfg: &'a TrainConfig, comm: &Comm, step: u64) -> Result<Progress<'a>> {
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
