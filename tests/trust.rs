//! What training and tuning must not take on trust: where a resumed run writes, whose loss.svg
//! an output directory holds, kernel variants a checkpoint recorded that no longer exist, a
//! baseline kernel that is wrong, and a Ctrl-C in the middle of tuning.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use shaderformer::gpu::test_gpu;
use shaderformer::gpu::tuning_cache::Problem;
use shaderformer::kernels::{baseline, gemm};
use shaderformer::train::checkpoint;

mod common;
use common::text;

fn scratch(name: &str) -> PathBuf {
    common::scratch("trust", name)
}

/// The binary in `dir`, its tuning cache in `dir/cache`, the tuning mode its own.
fn bin(dir: &Path) -> Command {
    let mut c = common::bin();
    c.env("SHADERFORMER_CACHE_DIR", dir.join("cache"))
        .env_remove("SHADERFORMER_TUNE")
        .current_dir(dir);
    c
}

/// The flags of a tiny addition run of `iters` steps.
fn tiny(iters: &str) -> Vec<&str> {
    vec![
        "train",
        "--n-layer",
        "1",
        "--n-embd",
        "32",
        "--n-head",
        "2",
        "--batch-size",
        "4",
        "--block-size",
        "16",
        "--max-iters",
        iters,
        "--eval-interval",
        "0",
        "--eval-iters",
        "1",
        "--log-interval",
        "1",
        "--sample-tokens",
        "0",
    ]
}

fn run(dir: &Path, args: &[&str]) -> Output {
    bin(dir).args(args).output().expect("run shaderformer")
}

fn ok(dir: &Path, args: &[&str]) -> String {
    let o = run(dir, args);
    assert!(o.status.success(), "{args:?}:\n{}", text(&o));
    text(&o)
}

fn with(mut base: Vec<&'static str>, extra: &[&'static str]) -> Vec<&'static str> {
    base.extend_from_slice(extra);
    base
}

/// `--resume A` without `--out` continues in A (as nanoGPT does), never in ./out, where another
/// run's checkpoint may be.
#[test]
fn a_resumed_run_writes_back_into_its_checkpoint() {
    if test_gpu().is_none() {
        return;
    }
    let dir = scratch("resume-target");
    ok(&dir, &with(tiny("2"), &["--out", "A", "--tune", "off"]));
    ok(
        &dir,
        &[
            "train",
            "--resume",
            "A",
            "--max-iters",
            "4",
            "--sample-tokens",
            "0",
            "--tune",
            "off",
        ],
    );
    assert!(!dir.join("out").exists(), "the resumed run wrote ./out");
    let state = checkpoint::read_state(&dir.join("A")).unwrap();
    assert_eq!(state.step, 4);
    let _ = std::fs::remove_dir_all(dir);
}

/// A loss.svg the user keeps in the output directory is theirs: --overwrite writes the
/// checkpoint beside it and leaves it alone. The one a run draws is recorded as the run's, and
/// later runs replace it.
#[test]
fn overwrite_leaves_the_user_s_own_loss_svg_alone() {
    if test_gpu().is_none() {
        return;
    }
    let dir = scratch("loss-svg");
    std::fs::create_dir(dir.join("B")).unwrap();
    std::fs::write(dir.join("B/loss.svg"), "mine").unwrap();
    let o = run(&dir, &with(tiny("2"), &["--out", "B", "--tune", "off"]));
    assert!(!o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("loss.svg"), "{}", text(&o));
    let t = ok(
        &dir,
        &with(tiny("2"), &["--out", "B", "--tune", "off", "--overwrite"]),
    );
    assert_eq!(
        std::fs::read_to_string(dir.join("B/loss.svg")).unwrap(),
        "mine"
    );
    assert!(t.contains("left alone"), "{t}");
    assert!(!checkpoint::read_state(&dir.join("B")).unwrap().loss_svg);

    ok(&dir, &with(tiny("2"), &["--out", "C", "--tune", "off"]));
    let first = std::fs::read_to_string(dir.join("C/loss.svg")).unwrap();
    assert!(first.starts_with("<svg"));
    assert!(checkpoint::read_state(&dir.join("C")).unwrap().loss_svg);
    // The run's own picture is part of its checkpoint: a new run there replaces it.
    ok(&dir, &with(tiny("3"), &["--out", "C", "--tune", "off"]));
    let _ = std::fs::remove_dir_all(dir);
}

/// A resumed run whose recorded kernel variants no longer exist says which problems were chosen
/// again, since it is then not bit for bit the run that wrote the checkpoint.
#[test]
fn a_resume_names_the_kernels_it_could_not_reuse() {
    if test_gpu().is_none() {
        return;
    }
    let dir = scratch("dropped");
    ok(&dir, &with(tiny("2"), &["--out", "A", "--tune", "off"]));
    let path = dir.join("A").join(checkpoint::STATE_FILE);
    let mut state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let kernels = state["kernels"].as_object_mut().unwrap();
    assert!(!kernels.is_empty());
    let renamed = kernels.keys().next().unwrap().clone();
    kernels.insert(renamed.clone(), "renamed_variant".into());
    std::fs::write(&path, state.to_string()).unwrap();
    let t = ok(
        &dir,
        &[
            "train",
            "--resume",
            "A",
            "--max-iters",
            "3",
            "--sample-tokens",
            "0",
            "--tune",
            "off",
        ],
    );
    assert!(t.contains("no longer exist"), "{t}");
    assert!(t.contains(&format!("{renamed}: renamed_variant ->")), "{t}");
    let _ = std::fs::remove_dir_all(dir);
}

/// The edit: the fixed rule's GEMM kernels (the tiled ones) scale their output by 1.5.
/// Before it judges any candidate, tuning checks that baseline against the CPU reference and
/// stops, naming the family, the entry point and the file.
#[test]
fn a_baseline_that_disagrees_with_the_reference_stops_the_run() {
    if test_gpu().is_none() {
        return;
    }
    let dir = scratch("baseline");
    let shaders = dir.join("shaders");
    std::fs::create_dir(&shaders).unwrap();
    let gemm =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/shaders/gemm.wgsl")).unwrap();
    let store = "finish(z, i, j + lane, v[lane]);";
    assert_eq!(gemm.matches(store).count(), 1, "store_c changed");
    let broken = gemm.replace(store, "finish(z, i, j + lane, v[lane] * 1.5);");
    std::fs::write(shaders.join("gemm.wgsl"), broken).unwrap();
    let o = run(
        &dir,
        &with(
            tiny("1"),
            &["--out", "ck", "--tune", "on", "--shader-dir", "shaders"],
        ),
    );
    let t = text(&o);
    assert!(
        !o.status.success(),
        "the broken baseline went unnoticed:\n{t}"
    );
    let err = t.lines().find(|l| l.starts_with("error:")).unwrap_or("");
    for part in ["gemm", "gemm_tiled", "gemm.wgsl", "CPU reference"] {
        assert!(err.contains(part), "error lacks {part:?}:\n{t}");
    }
    assert!(!dir.join("ck/model.safetensors").exists());

    // With the real shaders the fixed rule's kernel agrees with the reference, and the verdict
    // is kept.
    let gpu = test_gpu().unwrap();
    let mm = gemm::Matmul::new(64, 64, 64);
    let rule = gemm::fixed_rule(gpu, &mm).name();
    let problem = Problem {
        family: "gemm",
        bucket: "NN m64 n64 k64 vv f32".into(),
        shape: "NN 64x64x64".into(),
        candidates: vec![rule.clone(), "naive".into()],
        rule: rule.clone(),
        atol: 1e-4,
        rtol: 1e-4,
    };
    baseline::verify(gpu, &problem).unwrap();
    assert!(gpu.tuner.baseline_verified(&format!("gemm: {rule}")));
    let _ = std::fs::remove_dir_all(dir);
}

/// Ctrl-C while kernels are being measured stops between candidates: no step runs, no
/// checkpoint is written, and the run exits with 130 at once.
#[test]
fn ctrl_c_during_tuning_stops_between_candidates() {
    if test_gpu().is_none() {
        return;
    }
    let dir = scratch("ctrl-c-tune");
    let mut child = bin(&dir)
        .args(with(tiny("2"), &["--out", "ck", "--tune", "on"]))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The cache file appears with the first verdict: tuning is under way.
    let t0 = Instant::now();
    let cache = dir.join("cache");
    while !std::fs::read_dir(&cache).is_ok_and(|mut d| d.next().is_some()) {
        assert!(child.try_wait().unwrap().is_none(), "ended before tuning");
        assert!(t0.elapsed() < Duration::from_secs(120), "no tuning seen");
        std::thread::sleep(Duration::from_millis(10));
    }
    let signalled = Instant::now();
    Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    let o = child.wait_with_output().unwrap();
    let t = text(&o);
    assert_eq!(o.status.code(), Some(130), "{t}");
    assert!(t.contains("interrupted"), "{t}");
    assert!(
        signalled.elapsed() < Duration::from_secs(30),
        "slow to stop"
    );
    assert!(!dir.join("ck/model.safetensors").exists(), "{t}");
    assert!(
        !t.lines().any(|l| l.starts_with("step")),
        "a step ran:\n{t}"
    );
    let _ = std::fs::remove_dir_all(dir);
}
