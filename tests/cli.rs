//! The command line as users meet it: listings, checks, and bad input that must end in one clear
//! line and a non-zero exit, never a panic.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

use shaderformer::gpu::test_gpu;

mod common;
use common::text;

fn bin() -> Command {
    let mut c = common::bin();
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
    common::scratch("cli", name)
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

/// ZeRO-1 shards the optimizer across MPI ranks: a single process has none to shard over.
#[test]
fn zero_without_mpi_ranks_is_refused() {
    let o = run(&["train", "--zero", "1", "--max-iters", "1"]);
    assert_clean_failure(&o, &["--zero", "MPI"]);
    let o = run(&["train", "--zero", "2", "--max-iters", "1"]);
    assert_clean_failure(&o, &["--zero", "not a ZeRO stage"]);
}

/// Ctrl-C stops training at a step boundary, writes a whole checkpoint and exits with 130.
#[cfg(unix)]
#[test]
fn ctrl_c_leaves_a_whole_checkpoint() {
    stop_leaves_a_whole_checkpoint("INT");
}

/// SIGTERM (what `kill` and service managers send) is handled as Ctrl-C.
#[cfg(unix)]
#[test]
fn sigterm_leaves_a_whole_checkpoint() {
    stop_leaves_a_whole_checkpoint("TERM");
}

#[cfg(unix)]
fn stop_leaves_a_whole_checkpoint(signal: &str) {
    if test_gpu().is_none() {
        return;
    }
    let out = scratch(&format!("stop-{signal}")).join("ckpt");
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
    Command::new("kill")
        .args([&format!("-{signal}"), &pid])
        .status()
        .unwrap();
    let rest: Vec<String> = lines.map_while(|l| l.ok()).collect();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130), "{rest:?}");
    let ck = shaderformer::train::checkpoint::load(&out).expect("a whole checkpoint");
    let step = ck.state.unwrap().step;
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

/// A tiny run on the embedded addition data (2 steps, no sample) into `out`; flags in `extra`
/// replace the defaults of the same name.
fn tiny_train(out: &std::path::Path, extra: &[&str]) -> Output {
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
    ];
    let mut args = vec!["train", "--out", out.to_str().unwrap()];
    for (flag, value) in defaults {
        if !extra.contains(&flag) {
            args.extend([flag, value]);
        }
    }
    args.extend_from_slice(extra);
    run(&args)
}

fn names_in(dir: &std::path::Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    v.sort();
    v
}

/// `--out` holding other files (notes, the training data itself) is refused before training and
/// left as it was; with --overwrite the checkpoint is written beside them, never removing them.
/// A symbolic link to a directory is followed and stays a link.
#[cfg(unix)]
#[test]
fn train_out_never_loses_other_files() {
    if test_gpu().is_none() {
        return;
    }
    let root = scratch("out-others");
    let mydata = root.join("mydata");
    std::fs::create_dir_all(&mydata).unwrap();
    let input = mydata.join("input.txt");
    std::fs::write(
        &input,
        "to be or not to be, that is the question\n".repeat(40),
    )
    .unwrap();
    std::fs::write(mydata.join("notes.md"), "mine").unwrap();
    let o = tiny_train(&mydata, &["--data", input.to_str().unwrap()]);
    assert_clean_failure(&o, &["mydata", "input.txt", "--overwrite"]);
    assert!(
        !text(&o).contains("step "),
        "trained before refusing:\n{}",
        text(&o)
    );
    assert_eq!(names_in(&mydata), ["input.txt", "notes.md"]);

    let link = root.join("link");
    std::os::unix::fs::symlink(&mydata, &link).unwrap();
    let o = tiny_train(&link, &["--data", input.to_str().unwrap(), "--overwrite"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        std::fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink()
    );
    assert_eq!(
        std::fs::read_to_string(mydata.join("notes.md")).unwrap(),
        "mine"
    );
    assert!(input.exists());
    let names = names_in(&mydata);
    for f in [
        "config.json",
        "model.safetensors",
        "trainer_state.json",
        "vocab.json",
    ] {
        assert!(names.iter().any(|n| n == f), "{f} missing: {names:?}");
    }
    assert!(
        names.iter().all(|n| !n.starts_with('.')),
        "left behind: {names:?}"
    );
    shaderformer::train::checkpoint::load(&mydata).expect("a whole checkpoint");
    let _ = std::fs::remove_dir_all(root);
}

/// The embedded default ends with its held-out additions, decoded side by side: ten examples
/// and the accuracy over all 100 (a two-step model answers at random; the table is the point).
#[test]
fn the_addition_run_ends_with_its_held_out_answers() {
    if test_gpu().is_none() {
        return;
    }
    let o = tiny_train(&scratch("additions"), &["--sample-tokens", "1"]);
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    let table = t
        .split("greedy answers ---\n")
        .nth(1)
        .unwrap_or_else(|| panic!("{t}"));
    let examples = table.lines().take_while(|l| l.contains("(prompt ")).count();
    assert_eq!(examples, 10, "{t}");
    assert!(table.contains("accuracy on 100 held-out problems: "), "{t}");
}

/// An --out that cannot be a checkpoint directory is refused at start-up, before any step, and
/// nothing is renamed or removed: a file, a path under a file, a directory another run holds.
#[test]
fn train_out_is_checked_before_training() {
    if test_gpu().is_none() {
        return;
    }
    let root = scratch("out-checks");
    let file = root.join("results.txt");
    std::fs::write(&file, "keep me").unwrap();
    let o = tiny_train(&file, &[]);
    assert_clean_failure(&o, &["results.txt", "not a directory"]);
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep me");
    assert_eq!(names_in(&root), ["results.txt"]);

    let o = tiny_train(&file.join("ckpt"), &[]);
    assert_clean_failure(&o, &["results.txt"]);
    assert!(!text(&o).contains("step "), "{}", text(&o));

    // A lock held by a live process (this test's): the run names its pid and stops.
    let busy = root.join("busy");
    std::fs::create_dir_all(&busy).unwrap();
    let me = std::process::id().to_string();
    std::fs::write(busy.join(".shaderformer.lock"), &me).unwrap();
    let held = std::fs::File::open(busy.join(".shaderformer.lock")).unwrap();
    held.try_lock().unwrap();
    let o = tiny_train(&busy, &[]);
    assert_clean_failure(&o, &["busy", &format!("pid {me}")]);
    assert!(!text(&o).contains("step "), "{}", text(&o));
    // A lock file left by a process that is gone (its OS lock went with it) does not block.
    drop(held);
    std::fs::write(busy.join(".shaderformer.lock"), "4294967295").unwrap();
    let o = tiny_train(&busy, &[]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        !busy.join(".shaderformer.lock").exists(),
        "the lock outlived the run"
    );
    let _ = std::fs::remove_dir_all(root);
}

/// A model without biases writes a checkpoint that every command loads: biases stored as zeros,
/// `"bias": false` in config.json, and --resume keeps them absent. Model flags that disagree
/// with the checkpoint being continued are errors naming the flag and the checkpoint's value.
#[test]
fn no_bias_checkpoints_round_trip_and_conflicting_flags_are_refused() {
    if test_gpu().is_none() {
        return;
    }
    let root = scratch("nobias");
    let ck = root.join("ck");
    let o = tiny_train(&ck, &["--no-bias"]);
    assert!(o.status.success(), "{}", text(&o));
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ck.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["bias"], false);
    let loaded = shaderformer::train::checkpoint::load(&ck).expect("loads");
    assert!(!loaded.cfg.bias);
    let st = shaderformer::io::hf::read_safetensors(&ck.join("model.safetensors")).unwrap();
    let (_, b) = &st["transformer.h.0.ln_1.bias"];
    assert!(b.iter().all(|&x| x == 0.0));

    let o = run(&[
        "sample",
        "--checkpoint",
        ck.to_str().unwrap(),
        "--prompt",
        "12+34=",
        "--max-new-tokens",
        "2",
        "--greedy",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let data = root.join("sums.txt");
    std::fs::write(&data, "12+34=64\n".repeat(30)).unwrap();
    let o = run(&[
        "score",
        "--checkpoint",
        ck.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));

    let o = run(&[
        "train",
        "--resume",
        ck.to_str().unwrap(),
        "--out",
        ck.to_str().unwrap(),
        "--max-iters",
        "3",
        "--sample-tokens",
        "0",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("trained 1 steps (to step 3)"),
        "{}",
        text(&o)
    );
    assert!(!shaderformer::train::checkpoint::load(&ck).unwrap().cfg.bias);

    let init_out = root.join("from-init");
    let o = run(&[
        "train",
        "--init",
        ck.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--out",
        init_out.to_str().unwrap(),
        "--max-iters",
        "1",
        "--block-size",
        "8",
        "--batch-size",
        "2",
        "--eval-iters",
        "1",
        "--sample-tokens",
        "0",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        !shaderformer::train::checkpoint::load(&init_out)
            .unwrap()
            .cfg
            .bias
    );

    for (flag, value, has) in [
        ("--n-embd", "64", "32"),
        ("--n-layer", "2", "1"),
        ("--n-head", "4", "2"),
    ] {
        for how in ["--resume", "--init"] {
            let o = run(&[
                "train",
                how,
                ck.to_str().unwrap(),
                flag,
                value,
                "--max-iters",
                "9",
            ]);
            assert_clean_failure(&o, &[flag, value, has]);
        }
    }
    let bias_ck = root.join("with-bias");
    let o = tiny_train(&bias_ck, &[]);
    assert!(o.status.success(), "{}", text(&o));
    let o = run(&[
        "train",
        "--resume",
        bias_ck.to_str().unwrap(),
        "--no-bias",
        "--max-iters",
        "9",
    ]);
    assert_clean_failure(&o, &["--no-bias"]);

    // --dropout on resume is applied: the model trains with it and records it.
    let o = run(&[
        "train",
        "--resume",
        bias_ck.to_str().unwrap(),
        "--out",
        bias_ck.to_str().unwrap(),
        "--dropout",
        "0.2",
        "--max-iters",
        "3",
        "--sample-tokens",
        "0",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let resumed = shaderformer::train::checkpoint::load(&bias_ck).unwrap();
    assert!(
        (resumed.cfg.dropout - 0.2).abs() < 1e-6,
        "{}",
        resumed.cfg.dropout
    );
    assert!((resumed.state.unwrap().config.dropout - 0.2).abs() < 1e-6);
    let _ = std::fs::remove_dir_all(root);
}

/// Flags and shapes that used to panic, hang or fill the machine's memory end in one error line.
#[cfg(unix)]
#[test]
fn absurd_sizes_and_endless_inputs_are_refused() {
    if test_gpu().is_none() {
        return;
    }
    let root = scratch("absurd");
    let out = root.join("ck");
    let o = tiny_train(&out, &["--data", "/dev/zero"]);
    assert_clean_failure(&o, &["/dev/zero", "regular file"]);
    let fifo = root.join("fifo");
    assert!(
        Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success()
    );
    let o = tiny_train(&out, &["--data", fifo.to_str().unwrap()]);
    assert_clean_failure(&o, &["fifo", "regular file"]);
    let o = tiny_train(&out, &["--n-layer", "100000", "--n-embd", "1024"]);
    assert_clean_failure(&o, &["memory", "available"]);
    let o = tiny_train(&out, &["--block-size", "5"]);
    assert_clean_failure(&o, &["--block-size", "5"]);
    for (flag, arg) in [("--beta1", "--beta1=1.0"), ("--beta2", "--beta2=-1")] {
        let o = tiny_train(&out, &[arg]);
        assert_clean_failure(&o, &[flag, "[0, 1)"]);
    }
    assert!(!out.exists(), "a refused run created its --out");

    for flag in ["--batch-size", "--block-size", "--runs", "--new-tokens"] {
        let o = run(&["bench", "--model", "gpt2", "--n-layer", "1", flag, "0"]);
        assert_clean_failure(&o, &[flag]);
    }
    let o = run(&["kernels", "check", "cross_entropy", "--shape", "2x10x5"]);
    assert_clean_failure(&o, &["cross_entropy", "Vp 5", "V 10"]);
    let o = run(&["kernels", "check", "gemm", "--shape", "4294967296x1x1"]);
    assert_clean_failure(&o, &["gemm", "memory", "available"]);
    let o = run(&[
        "kernels",
        "bench",
        "attention",
        "--shape",
        "4294967296x1x1x1",
    ]);
    assert_clean_failure(&o, &["attention", "memory"]);
    let o = run(&["kernels", "check", "embedding", "--shape", "1x2x3x4x9"]);
    assert_clean_failure(&o, &["embedding", "K 9"]);
    let _ = std::fs::remove_dir_all(root);
}

/// `score` names a token id outside the vocabulary and its position; a token file whose llm.c
/// magic is damaged is refused, not read as raw tokens header and all.
#[test]
fn score_names_bad_token_ids_and_damaged_headers() {
    if test_gpu().is_none() {
        return;
    }
    let root = scratch("score-ids");
    let bin = root.join("ids.bin");
    let ids: Vec<u8> = [5u16, 7, 60000, 9]
        .iter()
        .flat_map(|t| t.to_le_bytes())
        .collect();
    std::fs::write(&bin, ids).unwrap();
    let o = run(&[
        "score",
        "--checkpoint",
        bpe(),
        "--data",
        bin.to_str().unwrap(),
    ]);
    assert_clean_failure(&o, &["60000", "position 2"]);

    let llmc = root.join("llmc.bin");
    shaderformer::io::tokens::write_llmc(&llmc, &[1, 2, 3, 4]).unwrap();
    let mut bytes = std::fs::read(&llmc).unwrap();
    bytes[0] = 0;
    std::fs::write(&llmc, bytes).unwrap();
    let o = run(&[
        "score",
        "--checkpoint",
        bpe(),
        "--data",
        llmc.to_str().unwrap(),
    ]);
    assert_clean_failure(&o, &["llmc.bin", "magic"]);
    let _ = std::fs::remove_dir_all(root);
}

/// The adapter list an error prints uses the numbering --adapter counts in (with --backend).
#[test]
fn adapter_errors_list_the_numbering_they_count_in() {
    let o = run(&[
        "--backend",
        "gl",
        "--adapter",
        "99",
        "kernels",
        "check",
        "residual",
    ]);
    assert_clean_failure(&o, &["adapter '99'"]);
    assert!(!text(&o).contains("(Vulkan)"), "{}", text(&o));
}
