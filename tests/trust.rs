//! What training and tuning must not take on trust: where a resumed run writes, whose loss.svg
//! an output directory holds, kernel variants a checkpoint recorded that no longer exist, a
//! baseline kernel that is wrong, and a Ctrl-C in the middle of tuning.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use shaderformer::gpu::tuning_cache::Problem;
use shaderformer::gpu::{Gpu, GpuOptions, ShaderSource, test_gpu};
use shaderformer::kernels::attention::{self, Stage};
use shaderformer::kernels::{baseline, gemm, layernorm};
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

/// The edit: the fixed rule's GEMM kernels (the tiled ones of a GPU, the register-block
/// ones of a CPU adapter; both are broken) scale their output by 1.5. Before it judges any
/// candidate, tuning checks that baseline against the CPU reference and stops, naming the
/// family, the entry point and the file.
#[test]
fn a_baseline_that_disagrees_with_the_reference_stops_the_run() {
    if test_gpu().is_none() {
        return;
    }
    let dir = scratch("baseline");
    let shaders = dir.join("shaders");
    std::fs::create_dir(&shaders).unwrap();
    // The tiled and the register-block kernels all store their rows through store_row.
    let gemm =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/shaders/gemm.wgsl")).unwrap();
    let store = "finish(z, i, j + lane, v[lane]);";
    assert_eq!(gemm.matches(store).count(), 1, "the row store changed");
    let broken = gemm.replace(store, "finish(z, i, j + lane, v[lane] * 1.5);");
    std::fs::write(shaders.join("gemm.wgsl"), broken).unwrap();
    let gpu = test_gpu().unwrap();
    let mm = gemm::Matmul::new(64, 64, 64);
    let rule = gemm::fixed_rule(gpu, &mm).name();
    let entry = if rule.starts_with("ureg") {
        "gemm_ureg"
    } else {
        "gemm_tiled"
    };
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
    for part in ["gemm", entry, "gemm.wgsl", "CPU reference"] {
        assert!(err.contains(part), "error lacks {part:?}:\n{t}");
    }
    assert!(!dir.join("ck/model.safetensors").exists());

    // With the real shaders the fixed rule's kernel agrees with the reference, and the verdict
    // is kept.
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

/// A device whose `file` in a shader directory has `from` replaced by `to` (`from` must occur
/// once), and the directory.
fn broken_gpu(name: &str, file: &str, from: &str, to: &str) -> (Gpu, PathBuf) {
    let dir = scratch(name);
    let path = format!("{}/shaders/{file}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(path).unwrap();
    assert_eq!(text.matches(from).count(), 1, "{file} changed: {from}");
    std::fs::write(dir.join(file), text.replace(from, to)).unwrap();
    let opts = GpuOptions {
        shaders: ShaderSource::Dir(dir.clone()),
        ..GpuOptions::from_env()
    };
    (Gpu::new(&opts).unwrap(), dir)
}

/// A tuning problem of `family` whose baseline (first candidate) is `candidates[0]`.
fn problem(family: &'static str, bucket: &str, candidates: &[String]) -> Problem {
    Problem {
        family,
        bucket: bucket.into(),
        shape: bucket.into(),
        candidates: candidates.to_vec(),
        rule: candidates[0].clone(),
        atol: 1e-5,
        rtol: 1e-4,
    }
}

/// Checks `problem`'s baseline on the broken device, which must stop with an error holding each
/// of `parts`; then on the real shaders, which must pass and keep the verdict.
fn expect_stopped(broken: &Gpu, problem: &Problem, parts: &[&str]) {
    let err = match baseline::verify(broken, problem) {
        Ok(()) => panic!("the broken baseline of {} went unnoticed", problem.bucket),
        Err(e) => e.to_string(),
    };
    for part in parts.iter().chain(&["CPU reference"]) {
        assert!(err.contains(part), "error lacks {part:?}: {err}");
    }
    assert!(
        baseline::verify(broken, problem).is_err(),
        "a failed check was kept"
    );
    let gpu = test_gpu().unwrap();
    baseline::verify(gpu, problem).unwrap();
}

/// LayerNorm's shared-memory forward (the baseline everywhere) scales its output by 1.5.
#[test]
fn a_layernorm_baseline_that_disagrees_stops_the_run() {
    if test_gpu().is_none() {
        return;
    }
    let (gpu, dir) = broken_gpu(
        "layernorm",
        "layernorm.wgsl",
        "fw_out[base + i] = ((fw_inp[base + i] - x0) - m) * s * fw_weight[i] + fw_bias[i];",
        "fw_out[base + i] = 1.5 * (((fw_inp[base + i] - x0) - m) * s * fw_weight[i] + fw_bias[i]);",
    );
    let names: Vec<String> = layernorm::Variant::available(&gpu)
        .iter()
        .map(|v| v.name().to_string())
        .collect();
    assert_eq!(names[0], "shared");
    for pass in ["forward", "backward"] {
        let p = problem("layernorm", &format!("{pass} n64 c32"), &names);
        expect_stopped(
            &gpu,
            &p,
            &["layernorm", "layernorm_forward", "layernorm.wgsl"],
        );
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// Cross-entropy's forward (every variant writes its loss through `write_loss`) scales the loss
/// by 1.5.
#[test]
fn a_cross_entropy_baseline_that_disagrees_stops_the_run() {
    if test_gpu().is_none() {
        return;
    }
    let (gpu, dir) = broken_gpu(
        "cross-entropy",
        "cross_entropy.wgsl",
        "fw_losses[row] = loss;",
        "fw_losses[row] = loss * 1.5;",
    );
    for baseline in ["scalar", "vec4"] {
        let names = [baseline, "rows"].map(String::from);
        let p = problem("cross_entropy", "forward n64 v128 v", &names);
        expect_stopped(
            &gpu,
            &p,
            &[
                "cross_entropy",
                "cross_entropy_forward",
                "cross_entropy.wgsl",
            ],
        );
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// The tiled attention forward (the fixed rule's kernel, and decoding's) scales its output by
/// 1.5: the forward's and decoding's baselines stop the run.
#[test]
fn an_attention_forward_baseline_that_disagrees_stops_the_run() {
    if test_gpu().is_none() {
        return;
    }
    let (gpu, dir) = broken_gpu(
        "attention-forward",
        "attention.wgsl",
        "store_out(b, h, i, tc + TC * v, acc[o * DV + v] * inv);",
        "store_out(b, h, i, tc + TC * v, acc[o * DV + v] * inv * 1.5);",
    );
    let rule = attention::baseline(&gpu, Stage::Forward, 16)
        .unwrap()
        .name();
    let names = [rule, "rows64".into()];
    for bucket in [
        "forward bh4 t16 hs16 causal",
        "forward bh4 t16 hs16 noncausal",
        "cached bh4 tq1 tmax16 hs16 f32",
    ] {
        let p = problem("attention", bucket, &names);
        expect_stopped(
            &gpu,
            &p,
            &["attention", "attention_forward", "attention.wgsl"],
        );
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// The tiled attention backward's dQ kernel scales dq by 1.5.
#[test]
fn an_attention_backward_baseline_that_disagrees_stops_the_run() {
    if test_gpu().is_none() {
        return;
    }
    let (gpu, dir) = broken_gpu(
        "attention-backward",
        "attention.wgsl",
        "store_dqkv(p.q, b, h, i, tc + TC * v, dq[o * DV + v] * p.scale);",
        "store_dqkv(p.q, b, h, i, tc + TC * v, dq[o * DV + v] * p.scale * 1.5);",
    );
    let rule = attention::baseline(&gpu, Stage::Backward, 16)
        .unwrap()
        .name();
    let p = problem(
        "attention",
        "backward bh4 t16 hs16 causal",
        &[rule, "rows64".into()],
    );
    expect_stopped(
        &gpu,
        &p,
        &["attention", "attention_backward_dq", "attention.wgsl"],
    );
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
