//! Crash safety of checkpoints: a tiny training run that checkpoints at every step is killed with
//! SIGKILL at 20 moments drawn from a seeded generator (during start-up, between steps, inside a
//! checkpoint write). After every kill the output directory holds a whole checkpoint or none
//! (never a torn one), the checkpoint loads, and `--resume` continues from its step.

#![cfg(unix)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use shaderformer::gpu::test_gpu;
use shaderformer::rng::Rng;
use shaderformer::train::checkpoint;

const KILLS: usize = 20;
const SEED: u64 = 20240520;

mod common;

fn scratch(name: &str) -> PathBuf {
    common::scratch("kill", name)
}

/// A tiny model on the embedded addition data, evaluated (one batch) and checkpointed at every
/// step; resumed from `out` when it holds a checkpoint.
fn train(out: &Path, resume: bool, max_iters: u64) -> Command {
    let mut c = common::bin();
    c.args(["train", "--out", out.to_str().unwrap()]);
    c.args([
        "--max-iters",
        &max_iters.to_string(),
        "--sample-tokens",
        "0",
    ]);
    if resume {
        c.args(["--resume", out.to_str().unwrap()]);
    } else {
        c.args([
            "--n-layer",
            "1",
            "--n-embd",
            "32",
            "--n-head",
            "2",
            "--batch-size",
            "4",
            "--eval-interval",
            "1",
            "--eval-iters",
            "1",
            "--log-interval",
            "1",
        ]);
    }
    c.stdout(Stdio::piped()).stderr(Stdio::piped());
    c
}

/// Forwards the child's stdout lines to a channel (so waiting for a line can time out) and keeps
/// its stderr for messages.
fn lines_of(child: &mut Child) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for l in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    rx
}

/// Where a run is killed: `delay_ms` after spawning, or after the `after`-th checkpoint line plus
/// `delay_ms` (a checkpoint write of this model takes about that long).
#[derive(Clone, Copy, Debug)]
struct Moment {
    after_checkpoints: Option<usize>,
    delay_ms: u64,
}

fn schedule() -> Vec<Moment> {
    let mut rng = Rng::new(SEED);
    (0..KILLS)
        .map(|_| {
            if rng.below(4) == 0 {
                // Blind: anywhere from start-up to the first steps.
                Moment {
                    after_checkpoints: None,
                    delay_ms: rng.below(3000),
                }
            } else {
                Moment {
                    after_checkpoints: Some(rng.below(3) as usize),
                    delay_ms: rng.below(60),
                }
            }
        })
        .collect()
}

/// The step of the checkpoint in `out`, if there is one; a checkpoint that is there must load
/// whole (weights, optimizer moments, trainer state, vocabulary).
fn checkpoint_step(out: &Path, context: &str) -> Option<u64> {
    let present = out.exists()
        || out
            .with_file_name(format!(
                ".{}.old",
                out.file_name().unwrap().to_string_lossy()
            ))
            .exists();
    if !present {
        return None;
    }
    let ck = checkpoint::load(out)
        .unwrap_or_else(|e| panic!("{context}: the checkpoint left behind does not load: {e}"));
    assert!(ck.optimizer.is_some(), "{context}: no optimizer moments");
    assert!(ck.vocab.is_some(), "{context}: no vocabulary");
    let state = ck
        .state
        .unwrap_or_else(|| panic!("{context}: no trainer state"));
    Some(state.step)
}

#[test]
fn sigkill_at_random_moments_leaves_a_whole_checkpoint_or_none() {
    if test_gpu().is_none() {
        return;
    }
    let out = scratch("run").join("ckpt");
    let max_iters = 2_000;
    let mut saved: Option<u64> = None;
    let mut kills_inside_runs = 0;
    let t0 = Instant::now();
    for (i, m) in schedule().into_iter().enumerate() {
        let context = format!("kill {i} ({m:?}, checkpoint before: {saved:?})");
        let mut child = train(&out, saved.is_some(), max_iters).spawn().unwrap();
        let lines = lines_of(&mut child);
        let mut seen = Vec::new();
        if let Some(k) = m.after_checkpoints {
            let mut checkpoints = 0;
            let deadline = Instant::now() + Duration::from_secs(60);
            while checkpoints <= k {
                let left = deadline.saturating_duration_since(Instant::now());
                let Ok(line) = lines.recv_timeout(left) else {
                    let _ = child.kill();
                    let o = child.wait_with_output().unwrap();
                    panic!(
                        "{context}: no checkpoint line; stdout {seen:?}, stderr {}",
                        String::from_utf8_lossy(&o.stderr)
                    );
                };
                if let Some(s) = saved
                    && line.starts_with("resuming at step")
                {
                    assert_eq!(line, format!("resuming at step {s}"), "{context}");
                }
                checkpoints += line.starts_with("checkpoint:") as usize;
                seen.push(line);
            }
            kills_inside_runs += 1;
        }
        std::thread::sleep(Duration::from_millis(m.delay_ms));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let now = checkpoint_step(&out, &context);
        if let Some(before) = saved {
            let now = now.unwrap_or_else(|| panic!("{context}: the checkpoint disappeared"));
            assert!(now >= before, "{context}: step went back to {now}");
        }
        if m.after_checkpoints.is_some() {
            assert!(
                now.is_some(),
                "{context}: a checkpoint line but no checkpoint"
            );
        }
        eprintln!("{context}: checkpoint at step {now:?}");
        saved = now;
    }
    assert!(
        kills_inside_runs >= KILLS / 2,
        "too few kills after start-up"
    );
    // The last checkpoint resumes and finishes two more steps.
    let start = saved.expect("no run reached a checkpoint");
    let o = train(&out, true, start + 2).output().unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "resume from step {start}:\n{text}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        text.contains(&format!("resuming at step {start}")),
        "{text}"
    );
    assert_eq!(checkpoint_step(&out, "final"), Some(start + 2));
    eprintln!("{KILLS} kills in {:.1} s", t0.elapsed().as_secs_f64());
    let _ = std::fs::remove_dir_all(out.parent().unwrap());
}
