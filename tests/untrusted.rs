//! What an adversary hands the command line: outputs that are inputs, devices, FIFOs and links;
//! files that never end; values that wrap or overflow an axis. Every case ends quickly, loses
//! nothing and fails (where it must) with one error naming the file or flag, never a panic.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use shaderformer::gpu::test_gpu;

mod common;
use common::text;

fn bin(cache: &Path) -> Command {
    let mut c = common::bin();
    c.env("SHADERFORMER_CACHE_DIR", cache);
    c.env_remove("SHADERFORMER_TUNE");
    c
}

fn scratch(name: &str) -> PathBuf {
    common::scratch("untrusted", name)
}

/// Runs `c`, killing it after `limit`: a hang fails the test instead of stalling the suite.
fn run_within(mut c: Command, limit: Duration) -> Output {
    let mut child = c
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run shaderformer");
    let t0 = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if t0.elapsed() > limit {
            let _ = child.kill();
            let o = child.wait_with_output().unwrap();
            panic!("still running after {limit:?}:\n{}", text(&o));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

fn run(dir: &Path, args: &[&str]) -> Output {
    let mut c = bin(&dir.join("cache"));
    c.args(args).current_dir(dir);
    run_within(c, Duration::from_secs(60))
}

/// One error line holding every piece of `must_contain`, and no panic.
fn assert_refused(o: &Output, must_contain: &[&str]) {
    let t = text(o);
    assert!(!o.status.success(), "expected failure:\n{t}");
    assert_eq!(o.status.code(), Some(1), "not a clean failure:\n{t}");
    assert!(!t.contains("panicked"), "panic:\n{t}");
    let err: Vec<&str> = t.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(err.len(), 1, "expected one error line:\n{t}");
    for m in must_contain {
        assert!(err[0].contains(m), "error line lacks {m:?}:\n{t}");
    }
}

fn mkfifo(path: &Path) {
    let made = Command::new("mkfifo").arg(path).status().unwrap();
    assert!(made.success());
}

const METRICS: &str = "{\"step\":1,\"loss\":3.5}\n{\"step\":2,\"loss\":3.1}\n";

#[test]
fn plot_never_writes_over_its_input_a_device_or_a_link() {
    let dir = scratch("plot-out");
    let m = dir.join("m.jsonl");
    std::fs::write(&m, METRICS).unwrap();
    let o = run(&dir, &["plot", "m.jsonl", "--out", "m.jsonl"]);
    assert_refused(&o, &["--out", "m.jsonl", "input"]);
    assert_eq!(std::fs::read_to_string(&m).unwrap(), METRICS);
    // The same file under another name (a hard link) is the input too.
    std::fs::hard_link(&m, dir.join("same.jsonl")).unwrap();
    let o = run(&dir, &["plot", "m.jsonl", "--out", "same.jsonl"]);
    assert_refused(&o, &["--out", "input"]);
    assert_eq!(std::fs::read_to_string(&m).unwrap(), METRICS);

    // A device stays a device (as root, /dev/null would otherwise be replaced).
    let o = run(&dir, &["plot", "m.jsonl", "--out", "/dev/null"]);
    assert_refused(&o, &["--out", "/dev/null", "device"]);
    use std::os::unix::fs::FileTypeExt;
    assert!(
        std::fs::metadata("/dev/null")
            .unwrap()
            .file_type()
            .is_char_device()
    );

    // A link is written through and stays a link.
    let target = dir.join("target.svg");
    std::fs::write(&target, "old").unwrap();
    std::os::unix::fs::symlink(&target, dir.join("link.svg")).unwrap();
    let o = run(&dir, &["plot", "m.jsonl", "--out", "link.svg"]);
    assert!(o.status.success(), "{}", text(&o));
    let meta = std::fs::symlink_metadata(dir.join("link.svg")).unwrap();
    assert!(meta.file_type().is_symlink(), "the link was replaced");
    assert!(
        std::fs::read_to_string(&target)
            .unwrap()
            .starts_with("<svg")
    );

    // A directory is refused up front and leaves no temporary file behind.
    std::fs::create_dir(dir.join("pics")).unwrap();
    let o = run(&dir, &["plot", "m.jsonl", "--out", "pics"]);
    assert_refused(&o, &["--out", "pics", "directory"]);
    assert!(!dir.join(".pics.tmp").exists(), "a temporary file was left");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn plot_refuses_fifos_and_endless_devices_without_reading_them() {
    let dir = scratch("plot-in");
    mkfifo(&dir.join("fifo.jsonl"));
    let o = run(&dir, &["plot", "fifo.jsonl"]);
    assert_refused(&o, &["fifo.jsonl", "FIFO"]);
    let t0 = Instant::now();
    let o = run(&dir, &["plot", "/dev/zero"]);
    assert_refused(&o, &["/dev/zero", "device"]);
    assert!(t0.elapsed() < Duration::from_secs(10));
    std::os::unix::fs::symlink("/dev/zero", dir.join("zero.jsonl")).unwrap();
    let o = run(&dir, &["plot", "zero.jsonl"]);
    assert_refused(&o, &["zero.jsonl", "not a regular file"]);
    assert!(!dir.join("plot.svg").exists());
    let _ = std::fs::remove_dir_all(dir);
}

/// A diverged run's values (and hand-made ones) are drawn, clipped and said so, quickly and
/// without a NaN coordinate.
#[test]
fn plot_draws_diverged_and_huge_values_quickly() {
    let dir = scratch("plot-huge");
    let cases = [
        "{\"step\":1,\"loss\":3.0}\n{\"step\":2,\"loss\":3e16}\n",
        "{\"step\":1,\"loss\":3e16}\n",
        "{\"step\":1,\"loss\":1e20}\n{\"step\":2,\"loss\":1e20}\n",
        "{\"step\":1e17,\"loss\":2.0}\n{\"step\":2,\"loss\":2.5}\n",
        "{\"step\":1,\"loss\":1e308}\n{\"step\":2,\"loss\":-1e308}\n",
        "{\"step\":1,\"loss\":2.0}\n{\"step\":2,\"loss\":NaN}\n",
        "{\"step\":1,\"loss\":2.0}\n{\"step\":2,\"loss\":1e999}\n",
    ];
    for (k, case) in cases.iter().enumerate() {
        let m = dir.join(format!("m{k}.jsonl"));
        std::fs::write(&m, case).unwrap();
        let out = dir.join(format!("m{k}.svg"));
        let t0 = Instant::now();
        let o = run(
            &dir,
            &["plot", m.to_str().unwrap(), "--out", out.to_str().unwrap()],
        );
        let t = text(&o);
        assert!(t0.elapsed() < Duration::from_secs(20), "case {k} slow");
        if !o.status.success() {
            // What JSON cannot hold is refused in words, naming the line.
            assert!(
                case.contains("NaN") || case.contains("e999"),
                "case {k}:\n{t}"
            );
            assert_refused(&o, &[&format!("m{k}.jsonl:2")]);
            continue;
        }
        assert!(o.status.success(), "case {k}:\n{t}");
        let svg = std::fs::read_to_string(&out).unwrap();
        assert!(
            !svg.contains("NaN") && !svg.contains("inf"),
            "case {k}: {svg}"
        );
        assert!(svg.len() < 100_000, "case {k}: {} bytes", svg.len());
        if case.contains("e308") || case.contains("e20") || case.contains("e16") {
            assert!(svg.contains("clipped"), "case {k} says nothing:\n{svg}");
        }
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// The flags of a tiny addition run into `out`; a flag of `extra` replaces the default.
fn tiny(out: &str, extra: &[&str]) -> Vec<String> {
    let defaults = [
        ("--n-layer", "1"),
        ("--n-embd", "32"),
        ("--n-head", "2"),
        ("--batch-size", "4"),
        ("--block-size", "16"),
        ("--max-iters", "2"),
        ("--eval-interval", "0"),
        ("--eval-iters", "1"),
        ("--log-interval", "1"),
        ("--sample-tokens", "0"),
        ("--tune", "off"),
    ];
    let mut args = vec!["train".to_string(), "--out".into(), out.into()];
    for (flag, value) in defaults {
        if !extra.contains(&flag) {
            args.extend([flag.to_string(), value.to_string()]);
        }
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

fn train(dir: &Path, out: &str, extra: &[&str]) -> Output {
    let args = tiny(out, extra);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    run(dir, &args)
}

/// `--metrics` onto the training data, a directory or a FIFO is refused before anything is
/// built (no adapter is needed to say so), and the data is untouched.
#[test]
fn train_outputs_are_checked_before_anything_runs() {
    let dir = scratch("train-out");
    let data = dir.join("x.txt");
    let text_data = "to be or not to be, that is the question. ".repeat(50);
    std::fs::write(&data, &text_data).unwrap();
    let o = train(&dir, "ck", &["--data", "x.txt", "--metrics", "x.txt"]);
    assert_refused(&o, &["--metrics", "x.txt", "input"]);
    assert_eq!(std::fs::read_to_string(&data).unwrap(), text_data);
    std::fs::create_dir(dir.join("mdir")).unwrap();
    let o = train(&dir, "ck", &["--metrics", "mdir"]);
    assert_refused(&o, &["--metrics", "mdir", "directory"]);
    mkfifo(&dir.join("fifo"));
    let o = train(&dir, "ck", &["--metrics", "fifo"]);
    assert_refused(&o, &["--metrics", "fifo", "FIFO"]);
    let o = train(&dir, "ck", &["--metrics", "no/such/m.jsonl"]);
    assert_refused(&o, &["--metrics", "does not exist"]);
    let o = train(&dir, "x.txt", &["--data", "x.txt"]);
    assert_refused(&o, &["--out", "x.txt"]);
    assert!(!dir.join("ck").exists());
    // Inside the checkpoint directory the run creates, a metrics file is fine.
    let o = train(&dir, "ck", &["--data", "x.txt", "--metrics", "ck/m.jsonl"]);
    assert!(
        o.status.success() || !String::from_utf8_lossy(&o.stderr).contains("--metrics"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// Sizes computed from the flags never wrap: each is refused naming its flag, without a panic.
#[test]
fn sizes_that_would_wrap_are_refused_by_flag() {
    let dir = scratch("sizes");
    let huge = "1152921504606846976"; // 2^60: B·T wraps to 0
    let o = train(&dir, "ck", &["--batch-size", huge]);
    assert_refused(&o, &["--batch-size", "overflows"]);
    let o = train(&dir, "ck", &["--grad-accum", "18446744073709551615"]);
    assert_refused(&o, &["--grad-accum", "overflows"]);
    let tiny_model = ["--n-layer", "1", "--n-embd", "64", "--n-head", "2"];
    for cmd in ["bench", "tune"] {
        let mut args = vec![cmd, "--batch-size", huge, "--context", "64"];
        args.extend(tiny_model);
        let o = run(&dir, &args);
        assert_refused(&o, &["--batch-size"]);
    }
    let ckpt = concat!(env!("CARGO_MANIFEST_DIR"), "/assets/gpt2-bpe");
    for n in ["9007199254740992", "18446744073709551615"] {
        let o = run(
            &dir,
            &[
                "sample",
                "--checkpoint",
                ckpt,
                "--num-samples",
                n,
                "--greedy",
            ],
        );
        assert_refused(&o, &["--num-samples"]);
        let t = text(&o);
        // No wrapped byte count: the refusal shows the flag's own value.
        assert!(t.contains(n), "{t}");
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// A tuning mode from the environment is named as the variable; an empty variable is unset,
/// the same rule as for SHADERFORMER_CACHE_DIR.
#[test]
fn tuning_variables_follow_one_rule_and_are_named() {
    let dir = scratch("env");
    let mut c = bin(&dir.join("cache"));
    c.env("SHADERFORMER_TUNE", "garbage")
        .args(["kernels", "check", "gelu", "--shape", "3"]);
    let o = run_within(c, Duration::from_secs(60));
    assert_refused(&o, &["SHADERFORMER_TUNE", "garbage"]);
    assert!(!text(&o).contains("--tune"), "{}", text(&o));
    if test_gpu().is_none() {
        return;
    }
    let mut c = bin(&dir.join("cache"));
    c.env("SHADERFORMER_TUNE", "")
        .env("SHADERFORMER_CACHE_DIR", "")
        .args(["kernels", "check", "gelu", "--shape", "3"]);
    let o = run_within(c, Duration::from_secs(120));
    assert!(o.status.success(), "{}", text(&o));
    let _ = std::fs::remove_dir_all(dir);
}

/// `bench --what infer --context 16` measures inference without complaining about training's
/// --block-size or inference's lengths, flags the user never gave.
#[test]
fn bench_defaults_fit_a_short_context() {
    if test_gpu().is_none() {
        return;
    }
    let dir = scratch("bench-ctx");
    let o = run(
        &dir,
        &[
            "bench",
            "--what",
            "infer",
            "--context",
            "16",
            "--n-layer",
            "1",
            "--n-embd",
            "32",
            "--n-head",
            "2",
            "--vocab-size",
            "64",
            "--runs",
            "1",
            "--warmup",
            "0",
            "--recompute-tokens",
            "0",
            "--dtype",
            "f32",
            "--tune",
            "off",
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    let _ = std::fs::remove_dir_all(dir);
}

/// Every shader in --shader-dir is read at start-up (for the tuning cache's hash): a FIFO, an
/// endless device, a dangling link or a link loop in place of one is an error naming it, even
/// for a kernel that does not use it, instead of a hang or a silent fall-back.
#[test]
fn broken_files_in_a_shader_dir_are_named_at_once() {
    let dir = scratch("shader-dir");
    let shaders = dir.join("shaders");
    std::fs::create_dir(&shaders).unwrap();
    let gemm = shaders.join("gemm.wgsl");
    let cases: [(&str, &dyn Fn()); 4] = [
        ("FIFO", &|| mkfifo(&gemm)),
        ("device", &|| {
            std::os::unix::fs::symlink("/dev/zero", &gemm).unwrap()
        }),
        ("No such file", &|| {
            std::os::unix::fs::symlink(shaders.join("gone.wgsl"), &gemm).unwrap()
        }),
        ("symbolic links", &|| {
            std::os::unix::fs::symlink(&gemm, &gemm).unwrap()
        }),
    ];
    for (what, make) in cases {
        let _ = std::fs::remove_file(&gemm);
        make();
        let o = run(
            &dir,
            &[
                "kernels",
                "check",
                "gelu",
                "--shape",
                "3",
                "--shader-dir",
                "shaders",
            ],
        );
        assert_refused(&o, &["gemm.wgsl", what]);
    }
    let _ = std::fs::remove_dir_all(dir);
}
