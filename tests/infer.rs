//! Inference against transformers: a GPT2LMHeadModel with a byte-level BPE tokenizer, saved by
//! save_pretrained (scripts/make_fixtures.py), loaded through the checkpoint loader. Logits,
//! 30 greedy tokens, KV-cache decoding against full recomputation, and scoring.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use shaderformer::gpu::{DType, Gpu, test_gpu};
use shaderformer::graph::{ExecOptions, Executor, MicroBatch, ParamStore};
use shaderformer::infer::{self, Engine, SampleOptions};
use shaderformer::io::vocab::Vocab;
use shaderformer::model::ParamTable;
use shaderformer::model::gpt::{self, Mode};
use shaderformer::reference::compare;
use shaderformer::rng::Rng;
use shaderformer::train::checkpoint::{self, Checkpoint};

fn bpe_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/gpt2-bpe")
}

struct Fixture {
    f32s: HashMap<String, Vec<f32>>,
    ids: HashMap<String, Vec<u32>>,
    meta: HashMap<String, String>,
}

fn fixture() -> Fixture {
    let bytes = std::fs::read(bpe_dir().join("fixture.safetensors")).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut f = Fixture {
        f32s: HashMap::new(),
        ids: HashMap::new(),
        meta: meta.metadata().clone().unwrap_or_default(),
    };
    for (name, t) in st.tensors() {
        match t.dtype() {
            safetensors::Dtype::F32 => {
                f.f32s.insert(name, bytemuck::pod_collect_to_vec(t.data()));
            }
            safetensors::Dtype::I32 => {
                let v: Vec<i32> = bytemuck::pod_collect_to_vec(t.data());
                f.ids
                    .insert(name, v.into_iter().map(|x| x as u32).collect());
            }
            other => panic!("{name}: {other:?}"),
        }
    }
    f
}

/// The logits of every position of `ids` through the training code path (forward only).
fn full_logits(gpu: &Gpu, ck: &Checkpoint, ids: &[u32]) -> Vec<f32> {
    let table = ParamTable::new(&ck.cfg);
    let store = ParamStore::new(gpu, &table.store_specs(), &ck.params, false).unwrap();
    let g = gpt::build(&ck.cfg, &table, 1, ids.len(), Mode::Logits);
    let logits = g.logits;
    let mut exec = Executor::new(gpu, g.graph, &store, ExecOptions::default()).unwrap();
    exec.forward(&MicroBatch {
        tokens: ids.to_vec(),
        targets: Vec::new(),
    })
    .unwrap();
    let vp = ck.cfg.padded_vocab();
    gpu.read_f32(exec.view(logits))
        .unwrap()
        .chunks(vp)
        .flat_map(|r| r[..ck.cfg.vocab_size].to_vec())
        .collect()
}

#[test]
fn tokenizer_and_logits_match_transformers() {
    let Some(gpu) = test_gpu() else { return };
    let fx = fixture();
    let ck = checkpoint::load(&bpe_dir()).unwrap();
    let vocab = ck.vocab.clone().expect("tokenizer.json");
    assert!(matches!(vocab, Vocab::Bpe(_)));
    let prompt = vocab.encode(&fx.meta["prompt"], "prompt").unwrap();
    assert_eq!(prompt, fx.ids["prompt_ids"], "tokenization differs");
    let text = std::fs::read_to_string(bpe_dir().join("score.txt")).unwrap();
    assert_eq!(
        vocab.encode(&text, "score.txt").unwrap(),
        fx.ids["score_ids"]
    );
    assert_eq!(vocab.decode(&prompt), fx.meta["prompt"]);

    let want = &fx.f32s["logits"];
    compare(
        "logits (graph)",
        &full_logits(gpu, &ck, &prompt),
        want,
        1e-4,
        0.0,
    )
    .assert();
    let mut engine = Engine::new(gpu, &ck.cfg, &ck.params, DType::F32, 1).unwrap();
    let last = engine.feed(&prompt, prompt.len()).unwrap();
    let v = ck.cfg.vocab_size;
    compare(
        "logits (engine, last)",
        &last[0],
        &want[want.len() - v..],
        1e-4,
        0.0,
    )
    .assert();
}

#[test]
fn greedy_decoding_matches_transformers_and_full_recompute() {
    let Some(gpu) = test_gpu() else { return };
    let fx = fixture();
    let ck = checkpoint::load(&bpe_dir()).unwrap();
    let prompt = &fx.ids["prompt_ids"];
    let mut cached = Engine::new(gpu, &ck.cfg, &ck.params, DType::F32, 1).unwrap();
    // Small prefill chunks, so the prompt crosses several chunk boundaries.
    cached.chunk = 7;
    let mut fresh = Engine::new(gpu, &ck.cfg, &ck.params, DType::F32, 1).unwrap();
    let mut ids = prompt.clone();
    let mut logits = cached.feed(prompt, prompt.len()).unwrap().remove(0);
    for step in 0..30 {
        fresh.reset();
        let full = fresh.feed(&ids, ids.len()).unwrap().remove(0);
        compare(
            &format!("step {step}: cached vs recomputed"),
            &logits,
            &full,
            1e-5,
            0.0,
        )
        .assert();
        let next = infer::sampling::argmax(&logits);
        ids.push(next);
        logits = cached.feed(&[next], 1).unwrap().remove(0);
    }
    assert_eq!(&ids[prompt.len()..], fx.ids["greedy_ids"].as_slice());

    // The same through `generate`, with three identical greedy samples side by side.
    let mut batch = Engine::new(gpu, &ck.cfg, &ck.params, DType::F32, 3).unwrap();
    let greedy = SampleOptions {
        greedy: true,
        ..Default::default()
    };
    let out = infer::generate(&mut batch, prompt, 30, &greedy, &mut Rng::new(0), |_, _| {
        Ok(())
    })
    .unwrap();
    for s in &out.ids {
        assert_eq!(s.as_slice(), fx.ids["greedy_ids"].as_slice());
    }
}

/// Different prompts decoded side by side give each the tokens it gets alone (and the fixture's
/// prompt transformers' greedy ids); prompts of unequal lengths are refused.
#[test]
fn greedy_rows_decode_side_by_side_as_alone() {
    let Some(gpu) = test_gpu() else { return };
    let fx = fixture();
    let ck = checkpoint::load(&bpe_dir()).unwrap();
    let prompt = &fx.ids["prompt_ids"];
    let n = prompt.len();
    // The prompt, and the prompt rotated by 1 and 2 tokens: other texts of the same length.
    let prompts: Vec<Vec<u32>> = (0..3)
        .map(|r| (0..n).map(|i| prompt[(i + r) % n]).collect())
        .collect();
    let mut side = Engine::new(gpu, &ck.cfg, &ck.params, DType::F32, 3).unwrap();
    let rows = infer::greedy_each(&mut side, &prompts, 12).unwrap();
    assert_eq!(rows[0].as_slice(), &fx.ids["greedy_ids"][..12]);
    let greedy = SampleOptions {
        greedy: true,
        ..Default::default()
    };
    let mut alone = Engine::new(gpu, &ck.cfg, &ck.params, DType::F32, 1).unwrap();
    for (p, row) in prompts.iter().zip(&rows) {
        let out =
            infer::generate(&mut alone, p, 12, &greedy, &mut Rng::new(0), |_, _| Ok(())).unwrap();
        assert_eq!(&out.ids[0], row, "prompt {p:?}");
    }
    assert_ne!(rows[1], rows[0], "the rotated prompts continue otherwise");
    let uneven = vec![
        prompts[0].clone(),
        prompts[1][1..].to_vec(),
        prompts[2].clone(),
    ];
    let e = infer::greedy_each(&mut side, &uneven, 4)
        .unwrap_err()
        .to_string();
    assert!(e.contains("3 prompts for a batch of 3"), "{e}");
}

#[test]
fn score_matches_transformers() {
    let Some(gpu) = test_gpu() else { return };
    let fx = fixture();
    let ck = checkpoint::load(&bpe_dir()).unwrap();
    let t: usize = fx.meta["score_t"].parse().unwrap();
    let mut engine = Engine::new(gpu, &ck.cfg, &ck.params, DType::F32, 1).unwrap();
    let s = infer::score(&mut engine, &fx.ids["score_ids"], t, |_, _| {}).unwrap();
    let ids = fx.ids["score_ids"].len();
    assert_eq!(s.tokens, ids - 1);
    assert_eq!(s.windows, (ids - 1).div_ceil(t));
    compare("score", &[s.loss()], &fx.f32s["score_loss"], 1e-5, 0.0).assert();
}

#[test]
fn decoding_stops_at_the_context_limit() {
    let Some(gpu) = test_gpu() else { return };
    let ck = checkpoint::load(&bpe_dir()).unwrap();
    let mut engine = Engine::new(gpu, &ck.cfg, &ck.params, DType::F32, 1).unwrap();
    let greedy = SampleOptions {
        greedy: true,
        ..Default::default()
    };
    let out = infer::generate(
        &mut engine,
        &[5, 6, 7],
        1000,
        &greedy,
        &mut Rng::new(0),
        |_, _| Ok(()),
    )
    .unwrap();
    assert!(out.hit_context);
    assert_eq!(out.ids[0].len(), ck.cfg.block_size - 3 + 1);
    let e = engine.feed(&[1], 1).unwrap_err().to_string();
    assert!(e.contains("context of 64"), "{e}");
}

#[test]
fn a_tokenizer_larger_than_the_vocabulary_is_an_error() {
    let dir = std::env::temp_dir().join(format!("shaderformer-tok-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let tiny = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/gpt2-tiny");
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(tiny.join(f), dir.join(f)).unwrap();
    }
    std::fs::copy(bpe_dir().join("tokenizer.json"), dir.join("tokenizer.json")).unwrap();
    let e = checkpoint::load(&dir).unwrap_err().to_string();
    assert!(e.contains("400") && e.contains("77"), "{e}");
    std::fs::remove_file(dir.join("config.json")).unwrap();
    let e = checkpoint::load(&dir).unwrap_err().to_string();
    assert!(e.contains("config.json"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn f16_weights_and_cache_stay_close_to_f32() {
    let Some(gpu) = test_gpu() else { return };
    if !gpu.has_f16() {
        eprintln!("skipping: the adapter has no SHADER_F16");
        return;
    }
    let fx = fixture();
    let ck = checkpoint::load(&bpe_dir()).unwrap();
    let prompt = &fx.ids["prompt_ids"];
    let mut f32e = Engine::new(gpu, &ck.cfg, &ck.params, DType::F32, 1).unwrap();
    let mut f16e = Engine::new(gpu, &ck.cfg, &ck.params, DType::F16, 1).unwrap();
    f16e.chunk = 7;
    let mut a = f32e.feed(prompt, prompt.len()).unwrap().remove(0);
    let mut b = f16e.feed(prompt, prompt.len()).unwrap().remove(0);
    // Decode a few tokens too, so the f16 cache is read at many positions.
    for step in 0..8 {
        let c = compare(
            &format!("f16 vs f32 logits, step {step}"),
            &b,
            &a,
            2e-2,
            0.0,
        );
        eprintln!("{c}");
        c.assert();
        let next = infer::sampling::argmax(&a);
        a = f32e.feed(&[next], 1).unwrap().remove(0);
        b = f16e.feed(&[next], 1).unwrap().remove(0);
    }
}

/// gpt2-bpe's weights rewritten as `dtype` (F16 or BF16) in a fresh directory.
fn converted(dtype: safetensors::Dtype) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("shaderformer-{dtype:?}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["config.json", "tokenizer.json"] {
        std::fs::copy(bpe_dir().join(f), dir.join(f)).unwrap();
    }
    let bytes = std::fs::read(bpe_dir().join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let tensors: Vec<(String, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(n, t)| {
            let x: Vec<f32> = bytemuck::pod_collect_to_vec(t.data());
            let data: Vec<u8> = match dtype {
                safetensors::Dtype::F16 => x
                    .iter()
                    .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
                    .collect(),
                _ => x
                    .iter()
                    .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
                    .collect(),
            };
            (n, t.shape().to_vec(), data)
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(n, s, d)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(dtype, s.clone(), d).unwrap(),
            )
        })
        .collect();
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    std::fs::write(
        dir.join("model.safetensors"),
        safetensors::serialize(views, Some(meta)).unwrap(),
    )
    .unwrap();
    dir
}

#[test]
fn f16_and_bf16_checkpoints_load_as_f32() {
    let f32_ck = checkpoint::load(&bpe_dir()).unwrap();
    for (dtype, round) in [
        (
            safetensors::Dtype::F16,
            (|x: f32| half::f16::from_f32(x).to_f32()) as fn(f32) -> f32,
        ),
        (safetensors::Dtype::BF16, |x: f32| {
            half::bf16::from_f32(x).to_f32()
        }),
    ] {
        let dir = converted(dtype);
        let ck = checkpoint::load(&dir).unwrap();
        assert_eq!(ck.cfg, f32_ck.cfg);
        for (got, want) in ck.params.iter().zip(&f32_ck.params) {
            let want: Vec<f32> = want.iter().map(|&x| round(x)).collect();
            assert_eq!(got, &want, "{dtype:?}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// `train --init` on a BPE checkpoint encodes text with its tokenizer and keeps it.
#[test]
fn fine_tuning_uses_the_checkpoints_tokenizer() {
    let Some(gpu) = test_gpu() else { return };
    let root = std::env::temp_dir().join(format!("shaderformer-ft-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).unwrap();
    let text = root.join("text.txt");
    std::fs::write(
        &text,
        std::fs::read_to_string(bpe_dir().join("score.txt"))
            .unwrap()
            .repeat(3),
    )
    .unwrap();
    let cfg = shaderformer::train::TrainConfig {
        data: Some(text),
        init: Some(bpe_dir()),
        out: root.join("out"),
        block_size: 32,
        batch_size: 2,
        max_iters: 3,
        eval_interval: 0,
        eval_iters: 1,
        verbose: false,
        ..Default::default()
    };
    let s = shaderformer::train::train(gpu, &cfg).unwrap();
    assert!(s.final_val_loss.unwrap().is_finite());
    let ck = checkpoint::load(&root.join("out")).unwrap();
    assert!(matches!(ck.vocab, Some(Vocab::Bpe(_))));
    assert_eq!(ck.cfg.vocab_size, 400);
    let _ = std::fs::remove_dir_all(&root);
}
