//! Measured kernel choice: a family declares the candidate variants for a problem, and `choose`
//! returns the one to use, measuring on first use of the problem on this adapter.
//!
//! Measuring (CubeCL's autotune and llm.c's dev/cuda versions are the models): the baseline
//! variant runs once and its output is read back; each candidate then runs at the real shape on
//! the same inputs, and is rejected if its output differs from the baseline's beyond rounding;
//! the survivors are timed (a warm-up, then timed runs: timestamp queries where the adapter has
//! them, wall clock otherwise) and the fastest median wins. The outcome goes to the adapter's
//! `Tuner` (and its cache file), so a problem is measured once per adapter and shader source.

use std::time::Instant;

use super::harness::{self, BenchOptions};
use crate::error::Result;
use crate::gpu::tune::{Choice, Lookup};
use crate::gpu::{Dispatch, Gpu, View};

/// One candidate set up to run: its dispatches and the tensor its result lands in.
pub struct Trial {
    pub dispatches: Vec<Dispatch>,
    pub output: View,
}

/// A problem of a family, with its candidates.
pub struct Problem {
    pub family: &'static str,
    /// The bucket: problems with the same bucket share one measurement.
    pub bucket: String,
    /// The exact shape, for reports.
    pub shape: String,
    /// Names of the variants that can compute it; the first is the baseline the others are
    /// checked against (a family lists a tested, fast kernel first, e.g. its fixed rule's).
    pub candidates: Vec<String>,
    /// What the fixed rule takes (one of the candidates).
    pub rule: String,
    /// Largest accepted difference from the baseline: `atol + rtol·|baseline|` per element.
    pub atol: f64,
    pub rtol: f64,
}

/// Longest a candidate is timed for before the measurement stops early (seconds).
const TIME_BUDGET: f64 = 1.5;
/// Timed runs per candidate at most.
const MAX_RUNS: usize = 5;
/// A problem whose baseline takes longer than this for one run (seconds) is not measured: it
/// keeps the fixed rule (on a CPU adapter, GPT-2's lm head would otherwise take most of an hour
/// to tune).
const MAX_BASELINE: f64 = 5.0;
/// A candidate whose checked run already took this long (seconds) and over `SLOWER` times the
/// best median so far is not timed further (its checked run, compilation included, stands).
const SLOW_RUN: f64 = 0.5;
const SLOWER: f64 = 3.0;
/// A candidate whose median is under this (seconds) is timed again over `CHEAP_RUNS` runs: such
/// runs cost little, and the host's scheduling shows most in them (on lavapipe, a median of five
/// runs of a 4 ms kernel moved by 2x between measurements).
const CHEAP_RUN: f64 = 0.02;
const CHEAP_RUNS: usize = 21;

/// The variant to compute `problem` with: pinned or cached, measured now (tuning on), or the
/// fixed rule. `build` sets up a candidate by name on inputs that stay the same across calls.
pub fn choose(
    gpu: &Gpu,
    problem: &Problem,
    build: &mut dyn FnMut(&str) -> Result<Trial>,
) -> Result<String> {
    let chosen = match gpu
        .tuner
        .lookup(problem.family, &problem.bucket, &problem.candidates)
    {
        Lookup::Use(v) => v,
        Lookup::Rule => problem.rule.clone(),
        Lookup::Measure if problem.candidates.len() <= 1 => problem.rule.clone(),
        Lookup::Measure => {
            let choice = measure(gpu, problem, build)?;
            let winner = choice.winner.clone();
            gpu.tuner.record(choice);
            winner
        }
    };
    gpu.tuner.note_use(problem.family, &problem.bucket, &chosen);
    Ok(chosen)
}

/// The largest `|x - base|` over `atol + rtol·|base|`, and its index (infinite where only one
/// is finite, or where they differ with no tolerance). At most 1 means the outputs agree.
fn worst(x: &[f32], base: &[f32], atol: f64, rtol: f64) -> (f64, usize) {
    let mut w = (0.0, 0);
    for (i, (&a, &b)) in x.iter().zip(base).enumerate() {
        let (a, b) = (a as f64, b as f64);
        let r = if a.is_finite() && b.is_finite() {
            (a - b).abs() / (atol + rtol * b.abs())
        } else if a.to_bits() == b.to_bits() {
            0.0
        } else {
            f64::INFINITY
        };
        // 0 / 0 (no tolerance, equal values) agrees; any other NaN does not.
        let r = if r.is_nan() {
            if a == b { 0.0 } else { f64::INFINITY }
        } else {
            r
        };
        if r > w.0 {
            w = (r, i);
        }
    }
    w
}

fn measure(
    gpu: &Gpu,
    problem: &Problem,
    build: &mut dyn FnMut(&str) -> Result<Trial>,
) -> Result<Choice> {
    let bar = indicatif::ProgressBar::new(problem.candidates.len() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("tuning {msg} [{bar:20}] {pos}/{len}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_message(format!("{} {}", problem.family, problem.shape));

    let base_name = &problem.candidates[0];
    let base = build(base_name)?;
    let t0 = Instant::now();
    gpu.run(&base.dispatches)?;
    let base_time = t0.elapsed().as_secs_f64();
    let expected = gpu.read_f32(&base.output)?;
    if base_time > MAX_BASELINE {
        bar.finish_and_clear();
        return Ok(Choice {
            family: problem.family.to_string(),
            problem: problem.bucket.clone(),
            shape: problem.shape.clone(),
            winner: problem.rule.clone(),
            rule: problem.rule.clone(),
            times: vec![(base_name.clone(), base_time)],
            rejected: vec![(
                "the other candidates".into(),
                format!(
                    "not measured: one run of {base_name} took {base_time:.1} s (over {MAX_BASELINE} s)"
                ),
            )],
            flops: base.dispatches.iter().map(|d| d.cost.flops).sum(),
            bytes: base.dispatches.iter().map(|d| d.cost.bytes).sum(),
        });
    }
    let mut times = Vec::new();
    let mut rejected = Vec::new();
    let mut cost = (0, 0);
    for name in &problem.candidates {
        bar.inc(1);
        let outcome = (|| -> Result<std::result::Result<f64, String>> {
            let trial = if name == base_name {
                Trial {
                    dispatches: base.dispatches.clone(),
                    output: base.output.clone(),
                }
            } else {
                build(name)?
            };
            let t0 = Instant::now();
            gpu.run(&trial.dispatches)?;
            let first = t0.elapsed().as_secs_f64();
            let got = gpu.read_f32(&trial.output)?;
            let (w, i) = worst(&got, &expected, problem.atol, problem.rtol);
            if w > 1.0 {
                return Ok(Err(format!(
                    "element {i}: {} against the baseline's {}",
                    got[i], expected[i]
                )));
            }
            let best = times
                .iter()
                .map(|t: &(String, f64)| t.1)
                .fold(f64::INFINITY, f64::min);
            if first > SLOW_RUN && first > SLOWER * best {
                return Ok(Ok(first));
            }
            let runs = ((TIME_BUDGET / first.max(1e-6)) as usize).clamp(1, MAX_RUNS);
            let opts = BenchOptions {
                warmup: 0,
                runs,
                ..BenchOptions::default()
            };
            let mut stats = harness::time(gpu, &trial.dispatches, &opts)?;
            if stats.median < CHEAP_RUN {
                let opts = BenchOptions {
                    warmup: 0,
                    runs: CHEAP_RUNS,
                    ..BenchOptions::default()
                };
                stats = harness::time(gpu, &trial.dispatches, &opts)?;
            }
            cost = trial
                .dispatches
                .iter()
                .fold((0, 0), |c, d| (c.0 + d.cost.flops, c.1 + d.cost.bytes));
            Ok(Ok(stats.median))
        })();
        match outcome {
            Ok(Ok(t)) => times.push((name.clone(), t)),
            Ok(Err(why)) => rejected.push((name.clone(), why)),
            // A variant the device cannot build or run is rejected, not fatal; a lost device is.
            Err(e @ crate::Error::DeviceLost { .. }) => return Err(e),
            Err(e) => rejected.push((name.clone(), e.to_string())),
        }
    }
    bar.finish_and_clear();
    times.sort_by(|a, b| a.1.total_cmp(&b.1));
    let winner = times
        .first()
        .map_or_else(|| problem.rule.clone(), |t| t.0.clone());
    Ok(Choice {
        family: problem.family.to_string(),
        problem: problem.bucket.clone(),
        shape: problem.shape.clone(),
        winner,
        rule: problem.rule.clone(),
        times,
        rejected,
        flops: cost.0,
        bytes: cost.1,
    })
}

/// Rounds a dimension up to its bucket: itself up to 16, then the next power of two, so that a
/// model's shapes fall into a few buckets measured once each.
pub fn bucket(x: usize) -> usize {
    if x <= 16 { x } else { x.next_power_of_two() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worst_flags_mismatches_and_nan() {
        assert!(worst(&[1.0, 2.0], &[1.0, 2.0], 1e-6, 0.0).0 <= 1.0);
        let (w, i) = worst(&[1.0, 2.1], &[1.0, 2.0], 1e-3, 1e-3);
        assert!(w > 1.0 && i == 1);
        assert!(worst(&[f32::NAN], &[1.0], 1e-3, 1e-3).0 > 1.0);
        assert!(worst(&[1.0], &[f32::NAN], 1e-3, 1e-3).0 > 1.0);
    }

    #[test]
    fn buckets() {
        assert_eq!(bucket(1), 1);
        assert_eq!(bucket(16), 16);
        assert_eq!(bucket(17), 32);
        assert_eq!(bucket(512), 512);
        assert_eq!(bucket(513), 1024);
    }
}
