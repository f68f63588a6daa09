//! `sample` and `score` on Llama-family checkpoint directories as transformers saved them:
//! qwen2-tiny's greedy continuation of its prompt (through its tokenizer.json) and its score of
//! score.txt equal the fixture's.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use common::bin;

fn dir(model: &str) -> PathBuf {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/assets")).join(model)
}

/// The fixture's i32 tensors and metadata.
fn fixture(model: &str) -> (HashMap<String, Vec<f64>>, HashMap<String, String>) {
    let bytes = std::fs::read(dir(model).join("fixture.safetensors")).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut out = HashMap::new();
    for (name, t) in st.tensors() {
        let v: Vec<f64> = match t.dtype() {
            safetensors::Dtype::I32 => bytemuck::pod_collect_to_vec::<u8, i32>(t.data())
                .into_iter()
                .map(f64::from)
                .collect(),
            safetensors::Dtype::F32 => bytemuck::pod_collect_to_vec::<u8, f32>(t.data())
                .into_iter()
                .map(f64::from)
                .collect(),
            _ => continue,
        };
        out.insert(name, v);
    }
    (out, meta.metadata().clone().unwrap_or_default())
}

fn run_json(args: &[&str]) -> serde_json::Value {
    let o = bin().args(args).output().unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{args:?} failed: {stderr}");
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {stderr}"))
}

fn ids(v: &serde_json::Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

#[test]
fn greedy_sample_of_qwen2_tiny_equals_transformers() {
    let (fx, meta) = fixture("qwen2-tiny");
    let ck = dir("qwen2-tiny");
    let j = run_json(&[
        "sample",
        "--checkpoint",
        ck.to_str().unwrap(),
        "--prompt",
        &meta["prompt"],
        "--greedy",
        "--max-new-tokens",
        "20",
        "--json",
    ]);
    assert_eq!(ids(&j["prompt_ids"]), fx["prompt_ids"], "{j}");
    assert_eq!(ids(&j["ids"]), fx["greedy_ids"], "{j}");
}

/// Several samples of a Llama-family checkpoint: the first is the one sample of the same seed
/// (the draws continue from sample to sample, so the others differ from it), and greedy ones
/// all equal transformers' continuation.
#[test]
fn several_samples_of_qwen2_tiny() {
    let (fx, meta) = fixture("qwen2-tiny");
    let ck = dir("qwen2-tiny");
    let sample = |extra: &[&str]| {
        let base = [
            "sample",
            "--checkpoint",
            ck.to_str().unwrap(),
            "--prompt",
            &meta["prompt"],
            "--max-new-tokens",
            "12",
            "--seed",
            "7",
            "--json",
        ];
        run_json(&[&base[..], extra].concat())
    };
    let one = sample(&[]);
    let three = sample(&["--num-samples", "3"]);
    let samples = three["samples"].as_array().unwrap();
    assert_eq!(samples.len(), 3, "{three}");
    assert_eq!(ids(&samples[0]["ids"]), ids(&one["ids"]), "{three}");
    assert_eq!(ids(&three["ids"]), ids(&one["ids"]), "{three}");
    assert!(
        samples[1..]
            .iter()
            .any(|s| ids(&s["ids"]) != ids(&one["ids"])),
        "{three}"
    );
    let greedy = sample(&["--num-samples", "2", "--greedy"]);
    for s in greedy["samples"].as_array().unwrap() {
        let want = &fx["greedy_ids"][..12];
        assert_eq!(ids(&s["ids"]), want, "{greedy}");
    }
}

#[test]
fn score_of_qwen2_tiny_equals_transformers() {
    let (fx, meta) = fixture("qwen2-tiny");
    let ck = dir("qwen2-tiny");
    let j = run_json(&[
        "score",
        "--checkpoint",
        ck.to_str().unwrap(),
        "--data",
        ck.join("score.txt").to_str().unwrap(),
        "--block-size",
        &meta["score_t"],
        "--json",
    ]);
    assert_eq!(
        j["tokens"].as_f64().unwrap() as usize,
        fx["score_ids"].len() - 1
    );
    let (got, want) = (j["loss"].as_f64().unwrap(), fx["score_loss"][0]);
    assert!(
        (got - want).abs() <= 1e-4,
        "score {got}, transformers {want}"
    );
}

#[test]
fn sampling_text_without_a_tokenizer_says_so() {
    let ck = dir("llama-tiny");
    let o = bin()
        .args([
            "sample",
            "--checkpoint",
            ck.to_str().unwrap(),
            "--prompt",
            "hi",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(err.contains("tokenizer.json"), "{err}");
}

/// `sample --chat` renders the checkpoint's chat template (with and without --system) and
/// continues as transformers does; generation ends at an eos id of generation_config.json, so
/// the fixture's continuation is compared up to its first one.
#[test]
fn chat_sample_of_qwen2_tiny_equals_transformers() {
    let (fx, meta) = fixture("qwen2-tiny");
    let ck = dir("qwen2-tiny");
    let generation: serde_json::Value =
        serde_json::from_slice(&std::fs::read(ck.join("generation_config.json")).unwrap()).unwrap();
    let eos: Vec<f64> = match &generation["eos_token_id"] {
        serde_json::Value::Array(_) => ids(&generation["eos_token_id"]),
        one => vec![one.as_f64().unwrap()],
    };
    for (prefix, system) in [
        ("chat", None),
        ("chat_system", Some(meta["chat_system"].as_str())),
    ] {
        let mut args = vec![
            "sample",
            "--checkpoint",
            ck.to_str().unwrap(),
            "--chat",
            "--prompt",
            &meta["chat_user"],
            "--greedy",
            "--max-new-tokens",
            "20",
            "--json",
        ];
        if let Some(s) = system {
            args.extend(["--system", s]);
        }
        let j = run_json(&args);
        assert_eq!(
            ids(&j["prompt_ids"]),
            fx[&format!("{prefix}_prompt_ids")],
            "{j}"
        );
        let want = &fx[&format!("{prefix}_greedy_ids")];
        let end = want
            .iter()
            .position(|id| eos.contains(id))
            .map_or(want.len(), |k| k + 1);
        assert_eq!(ids(&j["ids"]), want[..end].to_vec(), "{prefix}: {j}");
    }
}
