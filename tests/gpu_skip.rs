//! A GPU test that finds no adapter is reported as skipped and counted, not passed in silence,
//! and fails outright under SHADERFORMER_REQUIRE_GPU=1. This binary runs its own probe tests
//! again in a child process whose adapter choice matches nothing.

use std::process::Command;

use shaderformer::gpu::{ENV_ADAPTER, ENV_BACKEND, ENV_REQUIRE_GPU, test_gpu};

/// Set in the child process: the outer test then does nothing, the probes do their part.
const ENV_CHILD: &str = "SHADERFORMER_GPU_SKIP_CHILD";

#[test]
fn probe_first_gpu_test() {
    let _ = test_gpu();
}

#[test]
fn probe_second_gpu_test() {
    // Asking twice within one test counts it once.
    let _ = test_gpu();
    let _ = test_gpu();
}

fn run_probes(require: bool) -> (bool, String) {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args(["probe_", "--test-threads=1"])
        .env(ENV_CHILD, "1")
        .env(ENV_ADAPTER, "no adapter has this name")
        .env_remove(ENV_BACKEND)
        .env_remove(ENV_REQUIRE_GPU);
    if require {
        cmd.env(ENV_REQUIRE_GPU, "1");
    }
    let out = cmd.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn a_test_without_gpu_is_reported_skipped_and_counted() {
    if std::env::var_os(ENV_CHILD).is_some() {
        return;
    }
    let (ok, text) = run_probes(false);
    assert!(ok, "the probes should pass when skipped:\n{text}");
    for probe in ["probe_first_gpu_test", "probe_second_gpu_test"] {
        let line = format!("skipped: no GPU adapter: {probe}");
        assert_eq!(text.matches(&line).count(), 1, "{line} once:\n{text}");
    }
    assert!(
        text.contains("2 GPU test(s) skipped: no GPU adapter"),
        "no summary count:\n{text}"
    );
}

#[test]
fn a_test_without_gpu_fails_when_a_gpu_is_required() {
    if std::env::var_os(ENV_CHILD).is_some() {
        return;
    }
    let (ok, text) = run_probes(true);
    assert!(
        !ok,
        "the probes passed without a GPU under {ENV_REQUIRE_GPU}=1:\n{text}"
    );
    assert!(text.contains("no GPU is usable"), "{text}");
}
