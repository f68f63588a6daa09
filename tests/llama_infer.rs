//! Inference on the Llama-family fixtures against transformers: greedy continuations of the
//! fixture prompts (the ids and each step's logits), the score over windows, and generation
//! ending at an eos id.

mod common;

use std::path::Path;

use common::fixture::Fixture;
use shaderformer::gpu::{DType, test_gpu};
use shaderformer::infer::SampleOptions;
use shaderformer::infer::llama::{self, LlamaRunner};
use shaderformer::io::hf_weights;
use shaderformer::reference::compare;
use shaderformer::rng::Rng;

fn dir(model: &str) -> std::path::PathBuf {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/assets")).join(model)
}

const GREEDY: SampleOptions = SampleOptions {
    greedy: true,
    temperature: 1.0,
    top_k: None,
    top_p: 1.0,
};

/// The greedy continuation of the fixture's prompt by the checkpoint in `ck_dir` (ids, and each
/// step's logits from the sequence transformers saw) equals the fixture's.
fn check_greedy(runner: &mut LlamaRunner, fx: &Fixture, what: &str) {
    let (prompt, want) = (fx.u32("prompt_ids"), fx.u32("greedy_ids"));
    let mut rng = Rng::new(0);
    let g = llama::generate(runner, &prompt, want.len(), &GREEDY, &mut rng, |_| Ok(())).unwrap();
    assert_eq!(g.ids[0], want, "{what}: greedy ids");
    let v = runner.arch.vocab;
    let want_logits = fx.f32("greedy_logits");
    let mut ids = prompt.clone();
    let mut worst = 0.0f64;
    runner.reset();
    for (k, &id) in want.iter().enumerate() {
        let got = runner.next(&ids).unwrap();
        let c = compare(
            &format!("{what} greedy step {k} logits"),
            &got,
            &want_logits[k * v..(k + 1) * v],
            1e-4,
            0.0,
        );
        worst = worst.max(c.max_abs);
        c.assert();
        ids.push(id);
    }
    eprintln!("{what}: greedy logits max abs err {worst:.3e}");
}

#[test]
fn greedy_ids_logits_and_score_match_transformers() {
    let Some(gpu) = test_gpu() else { return };
    for model in ["llama-tiny", "qwen2-tiny", "qwen3-tiny"] {
        let d = dir(model);
        let fx = Fixture::load(&d.join("fixture.safetensors"));
        let ck = hf_weights::load(&d).unwrap();
        let mut runner = LlamaRunner::new(gpu, &ck, DType::F32).unwrap();
        check_greedy(&mut runner, &fx, model);
        let t = fx.num("score_t") as usize;
        let s = llama::score(&mut runner, &fx.u32("score_ids"), t).unwrap();
        let c = compare(
            &format!("{model} score"),
            &[s.loss() as f32],
            &fx.f32("score_loss"),
            1e-4,
            0.0,
        );
        eprintln!("{c}");
        c.assert();
    }
}

/// f16 weights and an f16 KV cache (adapters with SHADER_F16) stay as close to the f32 run as
/// GPT-2's f16 path does, over the prompt in one pass and then 8 decoded tokens, each read back
/// from the cache at every position.
#[test]
fn f16_weights_and_cache_stay_close_to_f32() {
    let Some(gpu) = test_gpu() else { return };
    if !gpu.has_f16() {
        eprintln!("skipping: the adapter has no SHADER_F16");
        return;
    }
    for model in ["llama-tiny", "qwen2-tiny", "qwen3-tiny"] {
        let d = dir(model);
        let fx = Fixture::load(&d.join("fixture.safetensors"));
        let ck = hf_weights::load(&d).unwrap();
        let mut f32r = LlamaRunner::with_cache(gpu, &ck, DType::F32).unwrap();
        let mut f16r = LlamaRunner::with_cache(gpu, &ck, DType::F16).unwrap();
        let mut ids = fx.u32("prompt_ids");
        for step in 0..9 {
            let (a, b) = (f32r.next(&ids).unwrap(), f16r.next(&ids).unwrap());
            let c = compare(
                &format!("{model} f16 vs f32, step {step}"),
                &b,
                &a,
                2e-2,
                0.0,
            );
            eprintln!("{c}");
            c.assert();
            ids.push(shaderformer::infer::sampling::argmax(&a));
        }
    }
}

/// Decoding against the KV cache (the prompt in one pass, then a token a pass) continues each
/// fixture's prompt as transformers does.
#[test]
fn kv_cache_decoding_matches_transformers() {
    let Some(gpu) = test_gpu() else { return };
    for model in ["llama-tiny", "qwen2-tiny", "qwen3-tiny"] {
        let d = dir(model);
        let fx = Fixture::load(&d.join("fixture.safetensors"));
        let ck = hf_weights::load(&d).unwrap();
        let mut runner = LlamaRunner::with_cache(gpu, &ck, DType::F32).unwrap();
        check_greedy(&mut runner, &fx, &format!("{model} (KV cache)"));
    }
}

/// The same model read from other files: bf16 weights (qwen3-tiny-bf16, its own fixture),
/// sharded ones (llama-tiny-sharded) and transformers 4.x's config.json layout (top-level
/// rope_theta and rope_scaling) continue the prompts as transformers does.
#[test]
fn bf16_sharded_and_4x_layout_checkpoints_match_transformers() {
    let Some(gpu) = test_gpu() else { return };
    let llama_fx = Fixture::load(&dir("llama-tiny").join("fixture.safetensors"));
    let bf16 = dir("qwen3-tiny-bf16");
    let bf16_fx = Fixture::load(&bf16.join("fixture.safetensors"));
    // llama-tiny with config.4x.json as its config.json.
    let v4 = std::env::temp_dir().join(format!("shaderformer-llama-4x-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&v4);
    std::fs::create_dir_all(&v4).unwrap();
    for (from, to) in [
        ("config.4x.json", "config.json"),
        ("generation_config.json", "generation_config.json"),
        ("model.safetensors", "model.safetensors"),
    ] {
        std::fs::copy(dir("llama-tiny").join(from), v4.join(to)).unwrap();
    }
    let cases = [
        (bf16, &bf16_fx, "qwen3-tiny-bf16"),
        (dir("llama-tiny-sharded"), &llama_fx, "llama-tiny-sharded"),
        (v4.clone(), &llama_fx, "llama-tiny, 4.x config"),
    ];
    for (d, fx, what) in cases {
        let ck = hf_weights::load(&d).unwrap();
        let mut runner = LlamaRunner::new(gpu, &ck, DType::F32).unwrap();
        check_greedy(&mut runner, fx, what);
    }
    let _ = std::fs::remove_dir_all(&v4);
}

#[test]
fn generation_ends_at_an_eos_id_and_keeps_it() {
    let Some(gpu) = test_gpu() else { return };
    let d = dir("llama-tiny");
    let fx = Fixture::load(&d.join("fixture.safetensors"));
    let ck = hf_weights::load(&d).unwrap();
    assert_eq!(ck.eos_token_ids, vec![82], "generation_config.json's eos");
    let mut runner = LlamaRunner::new(gpu, &ck, DType::F32).unwrap();
    let want = fx.u32("greedy_ids");
    // The sixth greedy id (its first appearance) made an eos id.
    let stop = (0..want.len())
        .find(|&k| k >= 5 && !want[..k].contains(&want[k]))
        .unwrap();
    runner.eos = vec![1000, want[stop]];
    let mut rng = Rng::new(0);
    let mut seen = Vec::new();
    let g = llama::generate(
        &mut runner,
        &fx.u32("prompt_ids"),
        20,
        &GREEDY,
        &mut rng,
        |id| {
            seen.push(id);
            Ok(())
        },
    )
    .unwrap();
    assert_eq!(g.ids[0], want[..=stop].to_vec());
    assert_eq!(seen, g.ids[0]);
    assert!(!g.hit_context);
}
