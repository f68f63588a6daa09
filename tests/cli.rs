//! The command line as users meet it: listings, checks, and bad input that must end in one clear
//! line and a non-zero exit, never a panic.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

use shaderformer::gpu::test_gpu;

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_shaderformer"));
    c.env("XDG_RUNTIME_DIR", std::env::temp_dir());
    // Kernel tuning stays on (the default), its cache in a folder of this test run.
    c.env(
        "SHADERFORMER_CACHE_DIR",
        std::env::temp_dir().join(format!("shaderformer-cli-cache-{}", std::process::id())),
    );
    c
}

fn run(args: &[&str]) -> Output {
    bin().args(args).output().expect("run shaderformer")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Fails on anything that looks like a panic or a wgpu abort.
fn assert_clean_failure(o: &Output, must_contain: &[&str]) {
    let t = text(o);
    assert!(!o.status.success(), "expected failure:\n{t}");
    assert!(
        !t.contains("panicked") && !t.contains("RUST_BACKTRACE"),
        "panic:\n{t}"
    );
    let err: Vec<&str> = t.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(err.len(), 1, "expected one error line:\n{t}");
    for m in must_contain {
        assert!(err[0].contains(m), "error line lacks {m:?}:\n{t}");
    }
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("shaderformer-cli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn kernels_list_names_every_family() {
    let o = run(&["kernels", "list"]);
    assert!(o.status.success());
    let t = text(&o);
    for f in [
        "gemm",
        "layernorm",
        "gelu",
        "embedding",
        "cross_entropy",
        "residual",
        "dropout",
        "adamw",
        "reduce",
        "attention",
    ] {
        assert!(t.lines().any(|l| l.starts_with(f)), "{f} missing:\n{t}");
    }
}

#[test]
fn kernels_check_passes_and_reports_errors() {
    if test_gpu().is_none() {
        return;
    }
    let o = run(&["kernels", "check", "residual", "--shape", "45"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("max abs err"));

    let o = run(&["kernels", "check", "gemm", "--shape", "3x4"]);
    assert!(!o.status.success());
    assert!(text(&o).contains("3 dimensions"), "{}", text(&o));

    let o = run(&["kernels", "check", "nosuchkernel"]);
    assert_clean_failure(&o, &["nosuchkernel", "gemm"]);
}

#[test]
fn a_broken_shader_in_shader_dir_names_file_and_line() {
    if test_gpu().is_none() {
        return;
    }
    let dir = scratch("shaders");
    let src = include_str!("../shaders/gelu.wgsl");
    // Break the first `let` in a function body.
    let broken = src.replacen("let ", "let let ", 1);
    std::fs::write(dir.join("gelu.wgsl"), broken).unwrap();
    let o = run(&[
        "--shader-dir",
        dir.to_str().unwrap(),
        "kernels",
        "bench",
        "gelu",
        "--shape",
        "1000",
        "--runs",
        "1",
    ]);
    assert_clean_failure(&o, &["gelu.wgsl:", "does not compile"]);
    let line: String = text(&o)
        .lines()
        .find(|l| l.starts_with("error:"))
        .unwrap()
        .split("gelu.wgsl:")
        .nth(1)
        .unwrap()
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect();
    assert!(line.parse::<u32>().unwrap() > 1, "no line number");
}

#[test]
fn a_buffer_over_the_device_limit_names_tensor_and_limit() {
    let Some(gpu) = test_gpu() else { return };
    let n = (gpu.max_binding() / 4 + 1024).to_string();
    let o = run(&["kernels", "bench", "residual", "--shape", &n, "--runs", "1"]);
    assert_clean_failure(&o, &["tensor", "max_"]);
}

#[test]
fn bad_sampling_options_and_prompts_are_errors() {
    let ckpt = concat!(env!("CARGO_MANIFEST_DIR"), "/assets/gpt2-tiny");
    let o = run(&["sample", "--checkpoint", ckpt, "--temperature", "0"]);
    assert_clean_failure(&o, &["--temperature", "--greedy"]);
    let o = run(&["sample", "--checkpoint", ckpt, "--top-p", "1.5"]);
    assert_clean_failure(&o, &["--top-p", "(0, 1]"]);
    let o = run(&["sample", "--checkpoint", "/nonexistent/dir", "--greedy"]);
    assert_clean_failure(&o, &["/nonexistent/dir"]);
}

#[test]
fn train_without_data_file_is_an_error() {
    let o = run(&[
        "train",
        "--data",
        "/nonexistent/input.txt",
        "--max-iters",
        "1",
    ]);
    assert_clean_failure(&o, &["/nonexistent/input.txt"]);
}

/// Ctrl-C stops training at a step boundary, writes a whole checkpoint and exits with 130.
#[cfg(unix)]
#[test]
fn ctrl_c_leaves_a_whole_checkpoint() {
    if test_gpu().is_none() {
        return;
    }
    let out = scratch("ctrlc").join("ckpt");
    let mut child = bin()
        .args([
            "train",
            "--max-iters",
            "100000",
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
            "--eval-interval",
            "0",
            "--log-interval",
            "1",
            "--out",
            out.to_str().unwrap(),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    // Wait until steps are running.
    for line in lines.by_ref() {
        if line.unwrap().starts_with("step") {
            break;
        }
    }
    let pid = child.id().to_string();
    Command::new("kill").args(["-INT", &pid]).status().unwrap();
    let rest: Vec<String> = lines.map_while(|l| l.ok()).collect();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130), "{rest:?}");
    let ck = shaderformer::train::checkpoint::load(&out).expect("a whole checkpoint");
    let step = ck.state.unwrap()["step"].as_u64().unwrap();
    assert!(step >= 1);
    assert!(ck.optimizer.is_some());
    let _ = std::fs::remove_dir_all(out.parent().unwrap());
}

fn bpe() -> &'static str {
    concat!(env!("CARGO_MANIFEST_DIR"), "/assets/gpt2-bpe")
}

#[test]
fn score_reports_loss_and_perplexity() {
    if test_gpu().is_none() {
        return;
    }
    let data = format!("{}/score.txt", bpe());
    let o = run(&[
        "score",
        "--checkpoint",
        bpe(),
        "--data",
        &data,
        "--block-size",
        "24",
        "--json",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let loss = v["loss"].as_f64().unwrap();
    let ppl = v["perplexity"].as_f64().unwrap();
    assert!((ppl - loss.exp()).abs() < 1e-9 * ppl);
    assert_eq!(
        v["windows"].as_u64().unwrap(),
        v["tokens"].as_u64().unwrap().div_ceil(24)
    );

    let o = run(&[
        "score",
        "--checkpoint",
        bpe(),
        "--data",
        &data,
        "--block-size",
        "65",
    ]);
    assert_clean_failure(&o, &["--block-size", "64"]);
}

#[test]
fn sample_streams_and_checks_its_input() {
    if test_gpu().is_none() {
        return;
    }
    let o = run(&[
        "sample",
        "--checkpoint",
        bpe(),
        "--prompt",
        "The json module",
        "--greedy",
        "--max-new-tokens",
        "5",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(String::from_utf8_lossy(&o.stdout).starts_with("The json module"));

    let o = run(&[
        "sample",
        "--checkpoint",
        bpe(),
        "--prompt",
        "x",
        "--max-new-tokens",
        "3",
        "--num-samples",
        "2",
        "--json",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["samples"].as_array().unwrap().len(), 2);
    assert_eq!(v["ids"].as_array().unwrap().len(), 3);

    let long = "word ".repeat(200);
    let o = run(&["sample", "--checkpoint", bpe(), "--prompt", &long]);
    assert_clean_failure(&o, &["--prompt", "context of 64"]);

    let o = run(&[
        "sample",
        "--checkpoint",
        concat!(env!("CARGO_MANIFEST_DIR"), "/assets"),
        "--greedy",
    ]);
    assert_clean_failure(&o, &["config.json"]);
}
