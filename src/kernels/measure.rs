//! Measured kernel choice: a family declares the candidate variants for a problem, and `choose`
//! returns the one to use, measuring on first use of the problem on this adapter.
//!
//! Measuring (CubeCL's autotune and llm.c's dev/cuda versions are the models): the baseline
//! variant runs once and its output is read back; each candidate then runs at the real shape on
//! the same inputs, and is rejected if its output differs from the baseline's beyond rounding;
//! the survivors are timed (a warm-up, then timed runs: timestamp queries where the adapter has
//! them, wall clock otherwise) and the fastest median wins. The outcome goes to the adapter's
//! `Tuner` (and its cache file), so a problem is measured once per adapter and shader source.
//!
//! The measurement is asynchronous at its core (its readbacks and its clock wait on the GPU):
//! natively `choose` blocks on it; in a browser, which can only await the GPU from its event
//! loop, `choose` builds the candidates, serves the fixed rule and defers the problem, and
//! `tune_pending` measures what was deferred (the caller then rebuilds what it built, which
//! now finds the winners).

use std::collections::HashMap;

// std's Instant panics in a browser; web_time's is std's natively and performance.now() there.
use web_time::Instant;

use super::harness::{self, BenchOptions};
use crate::error::{Error, Result};
use crate::gpu::tuning_cache::{Built, Choice, Deferred, Lookup};
pub use crate::gpu::tuning_cache::{Problem, Trial};
use crate::gpu::{Gpu, block_on};

/// Longest a candidate is timed for before the measurement stops early (seconds).
const TIME_BUDGET: f64 = 1.5;
/// Timed runs per candidate at most.
const MAX_RUNS: usize = 5;
/// A problem whose baseline takes longer than this for one run (seconds) is not measured: it
/// keeps the fixed rule (on a CPU adapter, GPT-2's lm head would otherwise take most of an hour
/// to tune).
const MAX_BASELINE: f64 = 5.0;
/// A candidate whose checked run took this long (seconds) is run once more before it is judged:
/// adapters that build a pipeline at its first dispatch spend that run compiling (lavapipe with
/// an empty shader cache, as on a fresh machine: seconds per pipeline, which made every
/// candidate after the first look slow and kept the first). A candidate whose second run still
/// took this long and over `SLOWER` times the best median so far is not timed further.
const SLOW_RUN: f64 = 0.5;
const SLOWER: f64 = 3.0;
/// A candidate whose median is under this (seconds) is timed again over `CHEAP_RUNS` runs: such
/// runs cost little, and the host's scheduling shows most in them (on lavapipe, a median of five
/// runs of a 4 ms kernel moved by 2x between measurements).
const CHEAP_RUN: f64 = 0.02;
const CHEAP_RUNS: usize = 21;

/// The variant to compute `problem` with: pinned or cached, measured now (tuning on), or the
/// fixed rule. `build` sets up a candidate by name on inputs that stay the same across calls.
/// Where the tuner defers (in a browser), a problem to measure gets the fixed rule now and waits
/// for `tune_pending`, its candidates built.
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
        Lookup::Measure if gpu.tuner.defers() => {
            defer(gpu, problem, build);
            problem.rule.clone()
        }
        Lookup::Measure => {
            gpu.tuner.announce_measuring(problem.candidates.len());
            super::baseline::verify(gpu, problem)?;
            let choice = block_on("measuring kernels", measure(gpu, problem, build))?;
            let winner = choice.winner.clone();
            gpu.tuner.record(choice);
            winner
        }
    };
    gpu.tuner.note_use(problem.family, &problem.bucket, &chosen);
    Ok(chosen)
}

/// Builds every candidate of `problem` now (`build` borrows the caller's inputs, which are gone
/// by the time the problem is measured) and keeps them in the tuner, once per problem.
fn defer(gpu: &Gpu, problem: &Problem, build: &mut dyn FnMut(&str) -> Result<Trial>) {
    if gpu.tuner.is_pending(problem.family, &problem.bucket) {
        return;
    }
    let built = problem
        .candidates
        .iter()
        .map(|name| {
            let (trial, errors) = gpu.scoped_later(|| build(name));
            Built {
                name: name.clone(),
                trial,
                errors,
            }
        })
        .collect();
    gpu.tuner.defer(Deferred {
        problem: problem.clone(),
        built,
    });
}

/// Measures every problem deferred so far and records the choices in the adapter's tuner;
/// returns how many were measured. Later calls of `choose` for them return their winners.
pub async fn tune_pending(gpu: &Gpu) -> Result<usize> {
    let pending = gpu.tuner.take_pending();
    let count = pending.len();
    for Deferred { problem, built } in pending {
        let mut trials: HashMap<String, Result<Trial>> = HashMap::new();
        for b in built {
            let trial = match b.errors.wait().await {
                Some(message) => Err(Error::Validation {
                    context: format!("{} variant {}", problem.family, b.name),
                    message,
                }),
                None => b.trial,
            };
            trials.insert(b.name, trial);
        }
        let mut take = |name: &str| {
            trials.remove(name).unwrap_or_else(|| {
                Err(Error::invalid(
                    "kernel tuning",
                    format!("{} variant {name} was not built", problem.family),
                ))
            })
        };
        let choice = measure(gpu, &problem, &mut take).await?;
        gpu.tuner.record(choice);
    }
    Ok(count)
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

/// Checks every candidate against the baseline and times the survivors (see the module's
/// comment); `build` hands over each candidate once, by name, the baseline first.
async fn measure(
    gpu: &Gpu,
    problem: &Problem,
    build: &mut dyn FnMut(&str) -> Result<Trial>,
) -> Result<Choice> {
    let bar = progress_bar(problem);
    let base_name = &problem.candidates[0];
    let base = build(base_name)?;
    let base_time = compiled_run_time(gpu, &base.dispatches, MAX_BASELINE).await?;
    let expected = gpu.read_f32_async(&base.output).await?;
    if base_time > MAX_BASELINE {
        bar.finish_and_clear();
        return Ok(unmeasured(problem, &base, base_time));
    }
    let mut times: Vec<(String, f64)> = Vec::new();
    let mut rejected = Vec::new();
    let mut cost = (0, 0);
    for name in &problem.candidates {
        // Ctrl-C stops between candidates, not after the whole model is measured.
        if crate::gpu::signal::stop_requested() {
            bar.finish_and_clear();
            return Err(Error::Interrupted {
                during: format!("while measuring {} {}", problem.family, problem.shape),
            });
        }
        bar.inc(1);
        let trial = if name == base_name {
            Ok(Trial {
                dispatches: base.dispatches.clone(),
                output: base.output.clone(),
            })
        } else {
            build(name)
        };
        let best = times.iter().map(|t| t.1).fold(f64::INFINITY, f64::min);
        let outcome = match trial {
            Ok(trial) => time_candidate(gpu, problem, &trial, &expected, best).await,
            Err(e) => Err(e),
        };
        match outcome {
            Ok(Ok((t, timed_cost))) => {
                times.push((name.clone(), t));
                cost = timed_cost.unwrap_or(cost);
            }
            Ok(Err(why)) => rejected.push((name.clone(), why)),
            // A variant the device cannot build or run is rejected, not fatal; a lost device is.
            Err(e @ Error::DeviceLost { .. }) => return Err(e),
            Err(e) => rejected.push((name.clone(), e.to_string())),
        }
    }
    bar.finish_and_clear();
    if let Some(note) = disagreement_note(problem, &times, &rejected) {
        eprintln!("warning: {note}");
    }
    times.sort_by(|a, b| a.1.total_cmp(&b.1));
    let winner = pick(&times, &problem.rule);
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

/// How much faster than the fixed rule a candidate must be to replace it (a fraction of the
/// rule's median). The rule's pipeline serves every problem that keeps it, so each problem that
/// takes another variant costs a pipeline of its own: on lavapipe several seconds of compiling
/// per GEMM specialization on a first run, for a gain that, under this margin, the host's
/// scheduling makes and unmakes between measurements (0.3 ms products timed 35% apart in both
/// directions).
const RULE_MARGIN: f64 = 0.1;

/// The winner among `times` (sorted, fastest first): the fastest, unless the fixed rule `rule`
/// was timed and the fastest is not `RULE_MARGIN` faster than it.
fn pick(times: &[(String, f64)], rule: &str) -> String {
    let Some((fastest, best)) = times.first() else {
        return rule.to_string();
    };
    match times.iter().find(|t| t.0 == rule) {
        Some((_, at_rule)) if *best > at_rule * (1.0 - RULE_MARGIN) => rule.to_string(),
        _ => fastest.clone(),
    }
}

/// What to say when most candidates disagreed with the baseline: the baseline itself is then
/// the likelier culprit (a broken edit, a miscompiling driver).
fn disagreement_note(
    problem: &Problem,
    times: &[(String, f64)],
    rejected: &[(String, String)],
) -> Option<String> {
    let disagree = rejected
        .iter()
        .filter(|r| r.1.contains("against the baseline"))
        .count();
    let others = problem.candidates.len().saturating_sub(1);
    (others > 0 && disagree * 2 > others).then(|| {
        format!(
            "{} {}: {disagree} of {others} candidates disagree with the baseline {}; the \
             baseline may be the wrong one ({} agreed)",
            problem.family,
            problem.shape,
            problem.candidates[0],
            times.len().saturating_sub(1)
        )
    })
}

/// The bar that shows a problem's measurement on the terminal (a browser has none to draw on).
fn progress_bar(problem: &Problem) -> indicatif::ProgressBar {
    let target = if cfg!(target_arch = "wasm32") {
        indicatif::ProgressDrawTarget::hidden()
    } else {
        indicatif::ProgressDrawTarget::stderr()
    };
    let bar =
        indicatif::ProgressBar::with_draw_target(Some(problem.candidates.len() as u64), target);
    bar.set_style(
        indicatif::ProgressStyle::with_template("tuning {msg} [{bar:20}] {pos}/{len}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_message(format!("{} {}", problem.family, problem.shape));
    bar
}

/// The outcome for a problem whose baseline alone ran too long to measure the others: the fixed
/// rule, with the reason.
fn unmeasured(problem: &Problem, base: &Trial, base_time: f64) -> Choice {
    let base_name = &problem.candidates[0];
    Choice {
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
    }
}

/// One candidate's checked run against the baseline's output `expected`, then its timed runs:
/// its median and (flops, bytes), or only its first run's time where that was already too slow
/// against `best` (the fastest median so far), or why its output was rejected.
async fn time_candidate(
    gpu: &Gpu,
    problem: &Problem,
    trial: &Trial,
    expected: &[f32],
    best: f64,
) -> Result<std::result::Result<(f64, Option<(u64, u64)>), String>> {
    let first = compiled_run_time(gpu, &trial.dispatches, SLOW_RUN).await?;
    let got = gpu.read_f32_async(&trial.output).await?;
    let (w, i) = worst(&got, expected, problem.atol, problem.rtol);
    if w > 1.0 {
        return Ok(Err(format!(
            "element {i}: {} against the baseline's {}",
            got[i], expected[i]
        )));
    }
    if first > SLOW_RUN && first > SLOWER * best {
        return Ok(Ok((first, None)));
    }
    let runs = ((TIME_BUDGET / first.max(1e-6)) as usize).clamp(1, MAX_RUNS);
    let opts = BenchOptions {
        warmup: 0,
        runs,
        ..BenchOptions::default()
    };
    let mut stats = harness::time_async(gpu, &trial.dispatches, &opts).await?;
    if stats.median < CHEAP_RUN {
        let opts = BenchOptions {
            warmup: 0,
            runs: CHEAP_RUNS,
            ..BenchOptions::default()
        };
        stats = harness::time_async(gpu, &trial.dispatches, &opts).await?;
    }
    let cost = trial
        .dispatches
        .iter()
        .fold((0, 0), |c, d| (c.0 + d.cost.flops, c.1 + d.cost.bytes));
    Ok(Ok((stats.median, Some(cost))))
}

/// The wall time (seconds, to its end on the device) of a checked run of `dispatches`, or of a
/// second run where the first took over `slow`: a first run may include building the pipelines
/// (see `SLOW_RUN`).
async fn compiled_run_time(
    gpu: &Gpu,
    dispatches: &[crate::gpu::Dispatch],
    slow: f64,
) -> Result<f64> {
    let mut time = 0.0;
    for _ in 0..2 {
        let t0 = Instant::now();
        gpu.run_checked_async(dispatches).await?;
        time = t0.elapsed().as_secs_f64();
        if time <= slow {
            break;
        }
    }
    Ok(time)
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
    fn the_rule_keeps_problems_that_no_candidate_clearly_wins() {
        let t = |v: &[(&str, f64)]| -> Vec<(String, f64)> {
            v.iter().map(|(n, s)| (n.to_string(), *s)).collect()
        };
        // 5% faster: within the margin, the rule stays.
        assert_eq!(pick(&t(&[("w16", 0.95), ("w8", 1.0)]), "w8"), "w8");
        // 20% faster: the candidate wins.
        assert_eq!(pick(&t(&[("w16", 0.8), ("w8", 1.0)]), "w8"), "w16");
        // The rule fastest, or not timed (rejected): the fastest.
        assert_eq!(pick(&t(&[("w8", 0.9), ("w16", 1.0)]), "w8"), "w8");
        assert_eq!(pick(&t(&[("w16", 0.99), ("naive", 1.0)]), "w8"), "w16");
        // Nothing timed: the rule.
        assert_eq!(pick(&[], "w8"), "w8");
    }

    /// The case: the rule's kernel scaled by 1.5, so naive, reg and ureg all disagree.
    #[test]
    fn most_candidates_disagreeing_with_the_baseline_is_said() {
        let problem = Problem {
            family: "gemm",
            bucket: "NN m64 n64 k64 vv f32".into(),
            shape: "NN 64x64x64".into(),
            candidates: ["tiled", "naive", "reg", "ureg"].map(String::from).to_vec(),
            rule: "tiled".into(),
            atol: 1e-5,
            rtol: 1e-5,
        };
        let times = vec![("tiled".to_string(), 1.0)];
        let why = |v: &str| {
            (
                v.to_string(),
                "element 0: 1 against the baseline's 1.5".into(),
            )
        };
        let rejected = vec![why("naive"), why("reg"), why("ureg")];
        let note = disagreement_note(&problem, &times, &rejected).expect("a note");
        assert!(note.contains("3 of 3") && note.contains("tiled"), "{note}");
        assert_eq!(disagreement_note(&problem, &times, &rejected[..1]), None);
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
