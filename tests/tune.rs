//! Kernel choice by measurement, as users meet it: `tune` fills the cache and a second run measures
//! nothing; a broken cache or an unwritable cache directory costs one warning; `--tune` refuses
//! unknown modes; training gives the same losses tuned or not; a resumed run keeps the variants
//! its checkpoint recorded whatever the cache says meanwhile; a tuner that defers (as in a
//! browser) serves the fixed rule until `tune_pending` measures, then the winner.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use shaderformer::gpu::test_gpu;
use shaderformer::gpu::tuning_cache::{Choice, TuneMode, Tuner};

mod common;
use common::text;

fn bin(cache: &Path) -> Command {
    let mut c = common::bin();
    c.env("SHADERFORMER_CACHE_DIR", cache)
        .env_remove("SHADERFORMER_TUNE");
    c
}

fn scratch(name: &str) -> PathBuf {
    common::scratch("tune", name)
}

/// A one-layer model small enough to tune in seconds on a CPU adapter.
const MODEL: &[&str] = &[
    "--n-layer",
    "1",
    "--n-head",
    "2",
    "--n-embd",
    "32",
    "--vocab-size",
    "17",
    "--context",
    "16",
    "--batch-size",
    "2",
    "--block-size",
    "16",
];

fn tune(cache: &Path, extra: &[&str]) -> Output {
    bin(cache)
        .arg("tune")
        .args(MODEL)
        .args(extra)
        .output()
        .unwrap()
}

fn cache_files(dir: &Path) -> Vec<PathBuf> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    rd.map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect()
}

fn warnings(o: &Output) -> Vec<String> {
    String::from_utf8_lossy(&o.stderr)
        .lines()
        .filter(|l| l.starts_with("warning:"))
        .map(str::to_string)
        .collect()
}

#[test]
fn tune_fills_the_cache_and_a_second_run_measures_nothing() {
    if test_gpu().is_none() {
        return;
    }
    let cache = scratch("twice");
    let o = tune(&cache, &[]);
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(t.contains("fixed rule") && t.contains("gemm "), "{t}");
    let files = cache_files(&cache);
    assert_eq!(files.len(), 1, "{files:?}");
    let first = std::fs::read(&files[0]).unwrap();
    let v: serde_json::Value = serde_json::from_slice(&first).unwrap();
    let n = v["choices"].as_array().unwrap().len();
    assert!(n >= 3, "{n} problems measured:\n{t}");
    // The winner is the fastest, or the fixed rule where nothing beat it by 10%.
    for c in v["choices"].as_array().unwrap() {
        let winner = c["winner"].as_str().unwrap();
        let times = c["times"].as_array().unwrap();
        let time = |name: &str| {
            times
                .iter()
                .find(|t| t[0] == name)
                .map(|t| t[1].as_f64().unwrap())
        };
        let fastest = times[0][0].as_str().unwrap();
        let kept = winner == c["rule"] && time(fastest).unwrap() > 0.9 * time(winner).unwrap();
        assert!(
            winner == fastest || kept,
            "winner is the fastest, or the rule within 10% of it: {c}"
        );
    }

    let again = tune(&cache, &[]);
    assert!(again.status.success(), "{}", text(&again));
    assert!(warnings(&again).is_empty(), "{}", text(&again));
    // Nothing measured: the file was not rewritten, and the same table came out.
    assert_eq!(std::fs::read(&files[0]).unwrap(), first);
    let rows = |o: &Output| -> Vec<String> {
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .filter(|l| l.starts_with("gemm "))
            .map(str::to_string)
            .collect()
    };
    assert_eq!(rows(&again), rows(&o));
    let _ = std::fs::remove_dir_all(&cache);
}

#[test]
fn a_corrupt_cache_warns_once_and_is_retuned() {
    if test_gpu().is_none() {
        return;
    }
    let cache = scratch("corrupt");
    assert!(tune(&cache, &[]).status.success());
    let file = cache_files(&cache).remove(0);
    let noise: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
        .collect();
    std::fs::write(&file, &noise).unwrap();
    let o = tune(&cache, &[]);
    assert!(o.status.success(), "{}", text(&o));
    let w = warnings(&o);
    assert_eq!(w.len(), 1, "{}", text(&o));
    assert!(w[0].contains(file.to_str().unwrap()), "{w:?}");
    // Measured again and written back whole.
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    assert!(!v["choices"].as_array().unwrap().is_empty());
    let _ = std::fs::remove_dir_all(&cache);
}

#[test]
fn an_unwritable_cache_directory_warns_once_and_the_run_completes() {
    if test_gpu().is_none() {
        return;
    }
    let dir = scratch("unwritable");
    // Nothing can be created below a regular file, whoever runs the test.
    let file = dir.join("a-file");
    std::fs::write(&file, b"not a directory").unwrap();
    let o = tune(&file.join("cache"), &[]);
    assert!(o.status.success(), "{}", text(&o));
    let w = warnings(&o);
    assert_eq!(w.len(), 1, "{}", text(&o));
    assert!(w[0].contains("cannot write"), "{w:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_unknown_mode_names_the_accepted_values() {
    let cache = scratch("bogus");
    // The flag is named as the flag, the variable as the variable.
    for (o, source) in [
        (tune(&cache, &["--tune", "bogus"]), "--tune"),
        (
            bin(&cache)
                .env("SHADERFORMER_TUNE", "bogus")
                .args(["tune"])
                .args(MODEL)
                .output()
                .unwrap(),
            "SHADERFORMER_TUNE",
        ),
    ] {
        let t = text(&o);
        assert!(!o.status.success(), "{t}");
        assert!(!t.contains("panicked"), "{t}");
        let err: Vec<&str> = t.lines().filter(|l| l.starts_with("error:")).collect();
        assert_eq!(err.len(), 1, "{t}");
        assert!(
            err[0].starts_with(&format!("error: {source}:"))
                && err[0].contains("on, measure, cached or off"),
            "{t}"
        );
    }
    let _ = std::fs::remove_dir_all(&cache);
}

fn train(cache: &Path, out: &Path, steps: u32, extra: &[&str]) -> Output {
    let o = bin(cache)
        .args(["train", "--data"])
        .arg(data())
        .args([
            "--n-layer",
            "1",
            "--n-head",
            "2",
            "--n-embd",
            "32",
            "--batch-size",
            "2",
            "--block-size",
            "16",
            "--eval-interval",
            "0",
            "--log-interval",
            "1",
            "--max-iters",
            &steps.to_string(),
            "--seed",
            "5",
        ])
        .arg("--out")
        .arg(out)
        .arg("--metrics")
        .arg(out.with_extension("jsonl"))
        .args(extra)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    o
}

/// A small text with a character vocabulary, written once per test process.
fn data() -> PathBuf {
    let p = std::env::temp_dir().join(format!("shaderformer-tune-{}.txt", std::process::id()));
    if !p.exists() {
        let line = "to be or not to be, that is the question: whether tis nobler in the mind\n";
        std::fs::write(&p, line.repeat(40)).unwrap();
    }
    p
}

fn losses(out: &Path) -> Vec<(u64, f64)> {
    common::losses(&out.with_extension("jsonl"))
}

fn recorded_kernels(out: &Path) -> serde_json::Value {
    let s = std::fs::read_to_string(out.join("trainer_state.json")).unwrap();
    serde_json::from_str::<serde_json::Value>(&s).unwrap()["kernels"].clone()
}

/// A stale cache under `--tune cached` says what the run does instead: it measures nothing, and
/// the shipped winners or the fixed rule compute the problems; never that they "will be
/// measured again", which that mode does not do.
#[test]
fn a_stale_cache_under_tune_cached_says_that_nothing_is_measured() {
    let Some(gpu) = test_gpu() else {
        return;
    };
    let cache = scratch("stale-cached");
    // A cache file of this adapter and build, then its identity edited as another shader source
    // would have left it.
    let tuner = Tuner::new(TuneMode::On, gpu.tuner.identity().clone(), Some(&cache));
    tuner.record(Choice {
        family: "gemm".into(),
        problem: "NN m64 n64 k64 vv f32".into(),
        shape: "NN 64x64x64".into(),
        winner: "naive".into(),
        rule: "naive".into(),
        times: vec![("naive".into(), 1e-3)],
        rejected: Vec::new(),
        flops: 0,
        bytes: 0,
    });
    let file = cache_files(&cache).remove(0);
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    v["identity"]["shaders"] = "0123456789abcdef".into();
    std::fs::write(&file, v.to_string()).unwrap();

    let out = cache.join("run");
    let o = train(&cache, &out, 1, &["--tune", "cached"]);
    let t = text(&o);
    let w: Vec<String> = warnings(&o)
        .into_iter()
        .filter(|w| w.contains("tuning cache"))
        .collect();
    assert_eq!(w.len(), 1, "{t}");
    for part in ["stale", "measures nothing", "fixed rule"] {
        assert!(w[0].contains(part), "warning lacks {part:?}: {}", w[0]);
    }
    assert!(!w[0].contains("measured again"), "{}", w[0]);
    assert!(!t.contains("measuring kernel variants"), "{t}");
    let _ = std::fs::remove_dir_all(&cache);
}

#[test]
fn training_tuned_or_not_gives_the_same_losses() {
    if test_gpu().is_none() {
        return;
    }
    let dir = scratch("onoff");
    let on = train(&dir.join("cache"), &dir.join("on"), 6, &["--tune", "on"]);
    let off = train(&dir.join("cache"), &dir.join("off"), 6, &["--tune", "off"]);
    let (a, b) = (losses(&dir.join("on")), losses(&dir.join("off")));
    assert_eq!(a.len(), 6, "{}", text(&on));
    assert_eq!(b.len(), 6, "{}", text(&off));
    for ((s, x), (_, y)) in a.iter().zip(&b) {
        assert!((x - y).abs() <= 1e-5, "step {s}: tuned {x}, fixed rule {y}");
    }
    // The tuned run recorded a variant for every GEMM problem it ran.
    let k = recorded_kernels(&dir.join("on"));
    assert!(
        k.as_object()
            .unwrap()
            .keys()
            .any(|k| k.starts_with("gemm: ")),
        "{k}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_resumed_run_keeps_its_checkpoints_variants_whatever_the_cache_says() {
    if test_gpu().is_none() {
        return;
    }
    let dir = scratch("resume");
    let cache = dir.join("cache");
    train(&cache, &dir.join("straight"), 6, &[]);
    let split = dir.join("split");
    train(&cache, &split, 3, &[]);
    let before = recorded_kernels(&split);
    // The same cache, the same variants: the runs below continue from what `straight` ran (the
    // variants of some families round differently, so which were measured fastest matters).
    assert_eq!(recorded_kernels(&dir.join("straight")), before);
    let gone = dir.join("gone");
    train(&cache, &gone, 3, &[]);
    // Every measured winner becomes the naive kernel: a resumed run that followed the cache
    // would record (and run) those instead of its checkpoint's variants.
    for f in cache_files(&cache) {
        let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&f).unwrap()).unwrap();
        for c in v["choices"].as_array_mut().unwrap() {
            c["winner"] = "naive".into();
        }
        std::fs::write(&f, v.to_string()).unwrap();
    }
    train(&cache, &split, 6, &["--resume", split.to_str().unwrap()]);
    assert_eq!(recorded_kernels(&split), before);
    // Resumed with no cache at all, a run also continues bit for bit.
    let _ = std::fs::remove_dir_all(&cache);
    train(&cache, &gone, 6, &["--resume", gone.to_str().unwrap()]);
    let straight = losses(&dir.join("straight"));
    assert_eq!(straight.len(), 6);
    for run in [&split, &gone] {
        let resumed = losses(run);
        assert_eq!(resumed.len(), 6, "{resumed:?}");
        for ((s, x), (_, y)) in straight.iter().zip(&resumed) {
            assert_eq!(
                x.to_bits(),
                y.to_bits(),
                "step {s}: {x} straight, {y} resumed"
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// The browser's way, natively: a problem met while the tuner defers is computed by the fixed
/// rule and kept pending; `tune_pending` measures it through the same asynchronous measurement
/// `--tune on` blocks on, and the next build of the same problem gets the winner.
#[test]
fn a_deferred_problem_takes_the_fixed_rule_until_tune_pending_measures_it() {
    use shaderformer::gpu::tuning_cache::Lookup;
    use shaderformer::gpu::{TuneMode, block_on, own_test_gpu};
    use shaderformer::kernels::gemm::{LinearDims, linear_forward};
    use shaderformer::kernels::measure::tune_pending;
    let Some(gpu) = own_test_gpu(TuneMode::On) else {
        return;
    };
    gpu.tuner.set_defers(true);
    let dims = LinearDims {
        m: 45,
        k: 64,
        n: 32,
    };
    let inp = gpu.upload_f32("inp", &vec![0.5; dims.m * dims.k]).unwrap();
    let w = gpu.upload_f32("w", &vec![0.25; dims.n * dims.k]).unwrap();
    let out = gpu.upload_f32("out", &vec![0.0; dims.m * dims.n]).unwrap();
    linear_forward(&gpu, &out, &inp, &w, None, dims).unwrap();
    assert_eq!(
        gpu.tuner.pending(),
        1,
        "the GEMM problem waits to be measured"
    );
    let (key, rule) = gpu.tuner.used().into_iter().next().unwrap();
    // Met again before measuring: still the rule, and not deferred twice.
    linear_forward(&gpu, &out, &inp, &w, None, dims).unwrap();
    assert_eq!(gpu.tuner.pending(), 1);

    assert_eq!(block_on("tuning", tune_pending(&gpu)).unwrap(), 1);
    assert_eq!(gpu.tuner.pending(), 0);
    let choice = gpu.tuner.used_choices().pop().expect("a measurement");
    assert_eq!(choice.key(), key);
    assert!(
        choice.times.len() > 1,
        "candidates timed: {:?}",
        choice.times
    );
    assert_eq!(choice.rule, rule);
    // Built again: the winner, nothing deferred.
    linear_forward(&gpu, &out, &inp, &w, None, dims).unwrap();
    assert_eq!(gpu.tuner.pending(), 0);
    assert_eq!(gpu.tuner.used()[&key], choice.winner);
    let (family, problem) = key.split_once(": ").unwrap();
    assert_eq!(
        gpu.tuner
            .lookup(family, problem, std::slice::from_ref(&choice.winner)),
        Lookup::Use(choice.winner.clone())
    );
}
