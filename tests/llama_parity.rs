//! The Llama family against PyTorch and transformers, as tests/parity.rs checks GPT-2: each
//! small random model of scripts/fixtures_llama.py (GQA with an untied head and llama3 RoPE;
//! Qwen2's q/k/v biases with a tied head; Qwen3's per-head q/k norms with head_dim ≠ C/NH) is
//! loaded from its config.json and model.safetensors through `io`; logits, loss, every parameter
//! gradient, the losses and gradient norms of 10 AdamW steps (clipping and weight decay on) and
//! the final weights must match the fixture at GPT-2's tolerances. Every mismatch fails.

mod common;

use std::path::Path;

use common::fixture::Fixture;
use shaderformer::gpu::{DType, test_gpu};
use shaderformer::graph::{ExecOptions, Executor, MicroBatch, ParamStore};
use shaderformer::io::hf_weights::{self, LlamaCheckpoint};
use shaderformer::kernels::adamw::Hyper;
use shaderformer::model::arch::Positions;
use shaderformer::model::gpt::Mode;
use shaderformer::model::llama;
use shaderformer::reference::compare;
use shaderformer::rng::Rng;

fn assets() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/assets"))
}

/// The fixture of `model` and its checkpoint, loaded through `io` as transformers saved it.
fn load(model: &str) -> (Fixture, LlamaCheckpoint) {
    let dir = assets().join(model);
    let fx = Fixture::load(&dir.join("fixture.safetensors"));
    let ck = hf_weights::load(&dir).expect("load the transformers checkpoint");
    (fx, ck)
}

#[test]
fn llama_tiny_matches_transformers() {
    parity("llama-tiny");
}

#[test]
fn qwen2_tiny_matches_transformers() {
    parity("qwen2-tiny");
}

#[test]
fn qwen3_tiny_matches_transformers() {
    parity("qwen3-tiny");
}

/// The training graph's nodes, run one by one, against their CPU references (`--validate`).
#[test]
fn every_node_of_qwen3_tiny_matches_its_reference() {
    let Some(gpu) = test_gpu() else { return };
    let (fx, ck) = load("qwen3-tiny");
    let (b, t) = (fx.num("B") as usize, fx.num("T") as usize);
    let store = ParamStore::new(gpu, &ck.table.store_specs(), &ck.params, true).unwrap();
    let g = llama::build(&ck.cfg.arch, &ck.table, b, t, Mode::Train).unwrap();
    let mut exec = Executor::new(gpu, g.graph, &store, options(&fx)).unwrap();
    let batch = MicroBatch {
        tokens: fx.u32("tokens"),
        targets: fx.u32("targets"),
    };
    let checks = exec.validate(&batch).unwrap();
    let bad = shaderformer::graph::NodeCheck::mismatches(&checks);
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}

/// The same with the logits in row chunks (`LmHeadLoss`: 76 rows, a chunk of 64 and one of 12)
/// and the token table held in chunks of 20 rows, as tensors past a storage binding are held.
#[test]
fn every_node_of_qwen3_tiny_matches_its_reference_with_chunked_logits() {
    let Some(gpu) = test_gpu() else { return };
    let (fx, ck) = load("qwen3-tiny");
    let (arch, embed) = (&ck.cfg.arch, ck.table.embed);
    let rows_of_20 = 20 * arch.hidden as u64 * 4;
    let store = ParamStore::build(
        gpu,
        &ck.table.store_specs(),
        &ck.params,
        true,
        DType::F32,
        &|i| if i == embed { rows_of_20 } else { u64::MAX },
    )
    .unwrap();
    assert!(store.params[embed].len() > 1, "the token table is chunked");
    let (b, t) = (4, 19);
    let logits_of_64_rows = 64 * arch.vocab as u64 * 4;
    let g = llama::build_for(arch, &ck.table, (b, t), Mode::Train, logits_of_64_rows).unwrap();
    let mut exec = Executor::new(gpu, g.graph, &store, options(&fx)).unwrap();
    let mut rng = Rng::new(5);
    let mut ids = || -> Vec<u32> {
        (0..b * t)
            .map(|_| rng.below(arch.vocab as u64) as u32)
            .collect()
    };
    let batch = MicroBatch {
        tokens: ids(),
        targets: ids(),
    };
    let checks = exec.validate(&batch).unwrap();
    let lm_head = checks.iter().filter(|c| c.op.starts_with("lm_head"));
    assert_eq!(lm_head.count(), 6, "forward and backward, 3 outputs each");
    let bad = shaderformer::graph::NodeCheck::mismatches(&checks);
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}

fn options(fx: &Fixture) -> ExecOptions {
    ExecOptions {
        reuse: true,
        grad_accum: 1,
        adamw: Hyper {
            beta1: fx.num("beta1") as f32,
            beta2: fx.num("beta2") as f32,
            eps: fx.num("eps") as f32,
            weight_decay: fx.num("weight_decay") as f32,
            grad_clip: fx.num("grad_clip") as f32,
        },
        seed: 0,
        shard: Default::default(),
    }
}

fn parity(model: &str) {
    let Some(gpu) = test_gpu() else { return };
    let (fx, ck) = load(model);
    let arch = &ck.cfg.arch;
    let Positions::Rotary(rope) = arch.positions else {
        panic!("{model}: not rotary")
    };
    // The inverse frequencies the graph rotates by are transformers' own, bit for bit.
    let inv = rope.inv_freq(arch.head_dim);
    assert_eq!(inv, fx.f32("rope.inv_freq"), "{model}: rope.inv_freq");
    let (b, t) = (fx.num("B") as usize, fx.num("T") as usize);
    let table = &ck.table;
    let store = ParamStore::new(gpu, &table.store_specs(), &ck.params, true).unwrap();
    let g = llama::build(arch, table, b, t, Mode::Train).unwrap();
    let logits_id = g.logits;
    let mut exec = Executor::new(gpu, g.graph, &store, options(&fx)).unwrap();
    let batch = MicroBatch {
        tokens: fx.u32("tokens"),
        targets: fx.u32("targets"),
    };

    // Logits and loss.
    let loss = exec.forward_loss(&batch).unwrap();
    let logits = gpu.read_f32(exec.view(logits_id)).unwrap();
    let c = compare("logits", &logits, &fx.f32("logits"), 1e-4, 0.0);
    eprintln!("{model}: {c}");
    c.assert();
    let c = compare("loss", &[loss], &fx.f32("loss"), 1e-5, 0.0);
    eprintln!("{model}: {c}");
    c.assert();

    // Every parameter gradient (the tied embedding's holds both of its uses).
    exec.forward_backward(&batch).unwrap();
    let grads = ParamStore::read(gpu, &store.grads).unwrap();
    for (i, spec) in table.specs.iter().enumerate() {
        let want = fx.f32(&format!("grad.{}", spec.name));
        let c = compare(&format!("grad {}", spec.name), &grads[i], &want, 1e-5, 1e-3);
        eprintln!("{model}: {c}");
        c.assert();
    }

    // Ten AdamW steps on the same batch; then the weights they leave.
    common::fixture::check_adamw_steps(&mut exec, &batch, &fx, model);
    let finals = store.read_params(gpu).unwrap();
    for (i, spec) in table.specs.iter().enumerate() {
        let want = fx.f32(&format!("final.{}", spec.name));
        let c = compare(
            &format!("final {}", spec.name),
            &finals[i],
            &want,
            1e-4,
            0.0,
        );
        eprintln!("{model}: {c}");
        c.assert();
    }
}
