//! `bench --model` on the Llama-family presets: SmolLM2-135M's inference measured on random
//! weights (a short prompt, so the test stays quick on a CPU adapter), a Llama-family training
//! step timed (a small shape), and the refusals that name their flag before anything is
//! allocated.

mod common;

use common::bin;
use shaderformer::gpu::test_gpu;

/// The run's stdout and stderr, and whether it succeeded.
fn run(args: &[&str]) -> (bool, String, String) {
    let o = bin().args(args).output().unwrap();
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    (o.status.success(), out, err)
}

/// A refusal: a failed run whose error names every one of `parts`, without a panic.
fn assert_refused(args: &[&str], parts: &[&str]) {
    let (ok, out, err) = run(args);
    assert!(!ok, "{args:?} succeeded: {out}");
    assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
    for p in parts {
        assert!(err.contains(p), "{args:?}: '{p}' missing from: {err}");
    }
}

fn positive(v: &serde_json::Value, field: &str) -> f64 {
    let x = v[field]
        .as_f64()
        .unwrap_or_else(|| panic!("{field} missing: {v}"));
    assert!(x.is_finite() && x > 0.0, "{field} = {x}");
    x
}

#[test]
fn smollm2_inference_is_measured_as_json() {
    if test_gpu().is_none() {
        return;
    }
    let args = [
        "--tune",
        "off",
        "bench",
        "--model",
        "smollm2-135m",
        "--what",
        "infer",
        "--prompt-len",
        "4",
        "--new-tokens",
        "1",
        "--recompute-tokens",
        "2",
        "--runs",
        "1",
        "--warmup",
        "0",
        "--json",
    ];
    let (ok, out, err) = run(&args);
    assert!(ok, "{err}");
    let j: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert!(!j["adapter"].as_str().unwrap().is_empty(), "{j}");
    assert!(j["timing"].is_string(), "{j}");
    let model = j["model"].as_str().unwrap();
    for part in [
        "30 layers",
        "9 heads (3 kv heads, head_dim 64)",
        "hidden 576",
        "intermediate 1536",
        "vocab 49152",
        "context 8192",
        "134.5M parameters",
    ] {
        assert!(model.contains(part), "'{part}' missing from {model}");
    }
    assert!(j.get("train").is_none(), "{j}");
    let rows = j["infer"].as_array().unwrap();
    // f32, then f16 where the adapter has SHADER_F16.
    let dtypes: Vec<&str> = rows.iter().map(|r| r["dtype"].as_str().unwrap()).collect();
    assert!(dtypes == ["f32"] || dtypes == ["f32", "f16"], "{j}");
    for r in rows {
        assert_eq!(r["prompt_len"], 4);
        assert_eq!(r["new_tokens"], 1);
        let prefill = positive(r, "prefill_tokens_per_s");
        let prefill_ms = positive(&r["prefill_ms"], "median");
        assert!(
            (prefill - 4.0 / (prefill_ms / 1e3)).abs() <= 1e-6 * prefill,
            "{r}"
        );
        let decode = positive(r, "decode_tokens_per_s");
        let decode_ms = positive(&r["decode_ms_per_token"], "median");
        assert!((decode - 1e3 / decode_ms).abs() <= 1e-6 * decode, "{r}");
        positive(r, "recompute_tokens_per_s");
        // No more tokens recomputed than decoded, and the JSON says so.
        assert_eq!(r["recompute_ms_per_token"]["tokens"], 1, "{r}");
        // One decoded token's kernels: every layer's products (7 each, and the lm head) and
        // attention over the cache, their times summing to the total.
        let kernels = r["decode_kernels"].as_array().unwrap();
        let calls = |prefix: &str| -> u64 {
            kernels
                .iter()
                .filter(|k| k["name"].as_str().unwrap().starts_with(prefix))
                .map(|k| k["calls"].as_u64().unwrap())
                .sum()
        };
        assert_eq!(calls("gemm"), 7 * 30 + 1, "{r}");
        assert_eq!(calls("attention"), 2 * 30, "{r}");
        let total = positive(r, "decode_kernel_total_ms");
        let sum: f64 = kernels.iter().map(|k| k["ms"].as_f64().unwrap()).sum();
        assert!((sum - total).abs() <= 1e-6 * total, "{r}");
    }
}

#[test]
fn an_unknown_model_lists_every_preset() {
    assert_refused(
        &["bench", "--model", "smollm3"],
        &[
            "--model",
            "smollm3",
            "gpt2, gpt2-medium, gpt2-large, gpt2-xl",
            "smollm2-135m",
            "qwen2.5-0.5b",
            "llama-3.2-1b",
        ],
    );
}

#[test]
fn what_a_llama_preset_cannot_take_is_refused_naming_the_flag() {
    let llama = ["bench", "--model", "qwen2.5-0.5b"];
    let with = |extra: &[&'static str]| [&llama[..], extra].concat();
    assert_refused(
        &with(&["--what", "train", "--block-size", "40000"]),
        &["--block-size", "40000", "context 32768"],
    );
    assert_refused(&with(&["--n-head", "4"]), &["--n-head", "qwen2.5-0.5b"]);
    assert_refused(
        &with(&["--context", "16", "--prompt-len", "12", "--new-tokens", "8"]),
        &["--prompt-len", "context 16"],
    );
    // `tune` takes the Llama presets as `bench` does, and refuses what they cannot take.
    assert_refused(
        &["tune", "--model", "llama-3.2-1b", "--n-embd", "64"],
        &["--n-embd", "llama-3.2-1b"],
    );
    assert_refused(
        &[
            "tune",
            "--model",
            "smollm2-135m",
            "--context",
            "16",
            "--block-size",
            "32",
        ],
        &["--block-size", "32", "context 16"],
    );
}

/// A model beyond the host's memory is refused before its weights are drawn: an error, not an
/// abort.
#[test]
fn a_model_over_the_memory_is_refused() {
    if shaderformer::memory::available_bytes().is_none() {
        return;
    }
    assert_refused(
        &[
            "bench",
            "--model",
            "llama-3.2-1b",
            "--n-layer",
            "1000000",
            "--what",
            "infer",
        ],
        &["the model", "memory", "available"],
    );
}

/// A Llama-family training step timed as `bench --model ... --what train` times it, on a small
/// shape: tokens per second and FLOPs as reported follow from the step's time and nanoGPT's
/// estimate, and the profile holds the family's kernels.
#[test]
fn a_llama_training_step_is_timed_and_profiled() {
    let Some(gpu) = test_gpu() else { return };
    let mut arch = shaderformer::model::Arch::preset("smollm2-135m").unwrap();
    arch.n_layer = 2;
    arch.hidden = 64;
    arch.n_head = 4;
    arch.n_kv_head = 2;
    arch.head_dim = 16;
    arch.vocab = 100;
    arch.context = 32;
    arch.mlp = shaderformer::model::arch::Mlp::GatedSilu { intermediate: 128 };
    let (b, t) = (2, 16);
    let mut heard = Vec::new();
    let mut progress = |what: &str| heard.push(what.to_string());
    let r = shaderformer::bench::train_llama(
        gpu,
        &arch,
        (b, t),
        (0, 2),
        &Default::default(),
        &mut progress,
    )
    .unwrap();
    // Each timed step, then the profiled one, is reported as it ends.
    assert_eq!(heard.len(), 3, "{heard:?}");
    assert!(heard[1].starts_with("timed step 2 of 2: "), "{heard:?}");
    let j = r.to_json();
    let ms = positive(&j["ms_per_step"], "median");
    let tokens = positive(&j, "tokens_per_s");
    assert!(
        (tokens - (b * t) as f64 / (ms / 1e3)).abs() <= 1e-6 * tokens,
        "{j}"
    );
    let flops = shaderformer::bench::llama_train_flops(&arch, b, t);
    assert_eq!(j["flops_per_step"].as_f64(), Some(flops), "{j}");
    let names: Vec<&str> = j["kernels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["name"].as_str().unwrap())
        .collect();
    for family in ["rmsnorm.", "rope.", "swiglu.", "attention.", "adamw."] {
        assert!(
            names.iter().any(|n| n.starts_with(family)),
            "{family}: {names:?}"
        );
    }
}
