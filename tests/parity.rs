//! The whole model against PyTorch and transformers (llm.c's test_gpt2 method): a random GPT-2 of
//! awkward size saved by `save_pretrained` is loaded through the checkpoint loader; logits, loss,
//! every parameter gradient and the losses of 10 AdamW steps (clipping and weight decay on) must
//! match the values recorded by scripts/make_fixtures.py. Every mismatch fails the test.

mod common;

use std::path::Path;

use common::fixture::Fixture;
use shaderformer::gpu::{DType, test_gpu};
use shaderformer::graph::{ExecOptions, Executor, MicroBatch, ParamStore};
use shaderformer::io::hf;
use shaderformer::kernels::adamw::Hyper;
use shaderformer::model::ParamTable;
use shaderformer::model::gpt::{self, Mode};
use shaderformer::reference::compare;
use shaderformer::train::checkpoint;

fn assets() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/assets"))
}

#[test]
fn gpt2_tiny_matches_pytorch() {
    gpt2_tiny(u64::MAX, u64::MAX);
}

/// The same with the token embedding (and its gradient and moments) split into row chunks of 20
/// rows, as a large vocabulary is on devices with small storage bindings.
#[test]
fn gpt2_tiny_with_a_split_embedding_matches_pytorch() {
    gpt2_tiny(20 * 48 * 4, u64::MAX);
}

/// The same with the logits computed with their loss in row chunks (`LmHeadLoss`), as they are
/// when B·T × Vp floats exceed a binding, over a split embedding too: 64-row chunks of the 2·T
/// rows, the last one shorter.
#[test]
fn gpt2_tiny_with_chunked_logits_matches_pytorch() {
    gpt2_tiny(20 * 48 * 4, 64 * 128 * 4);
}

fn gpt2_tiny(chunk_limit: u64, logits_limit: u64) {
    let Some(gpu) = test_gpu() else { return };
    let dir = assets().join("gpt2-tiny");
    let fx = Fixture::load(&dir.join("fixture.safetensors"));
    let ck = checkpoint::load(&dir).expect("load the transformers checkpoint");
    let cfg = ck.cfg.clone();
    let (b, t) = (fx.num("B") as usize, fx.num("T") as usize);
    let (v, vp) = (cfg.vocab_size, cfg.padded_vocab());
    let table = ParamTable::new(&cfg);
    let store = ParamStore::build(
        gpu,
        &table.store_specs(),
        &ck.params,
        true,
        DType::F32,
        &|i| {
            if i == table.wte {
                chunk_limit
            } else {
                u64::MAX
            }
        },
    )
    .unwrap();
    let wte_chunks = store.params[table.wte].len();
    assert_eq!(wte_chunks, if chunk_limit == u64::MAX { 1 } else { 7 });
    let opts = ExecOptions {
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
    };
    let g = gpt::build_for(&cfg, &table, b, t, Mode::Train, logits_limit);
    let logits_id = g.logits;
    let chunked = gpt::logits_chunk_rows(b * t, vp, logits_limit);
    assert_eq!(chunked.is_some(), logits_limit != u64::MAX);
    let lm_head_ops = |name: &str| g.graph.nodes.iter().filter(|n| n.op.name() == name).count();
    assert_eq!(lm_head_ops("lm_head_loss"), chunked.is_some() as usize);
    let mut exec = Executor::new(gpu, g.graph, &store, opts).unwrap();
    let batch = MicroBatch {
        tokens: fx.u32("tokens"),
        targets: fx.u32("targets"),
    };

    // Logits (the padded columns dropped) and loss.
    let loss = exec.forward_loss(&batch).unwrap();
    let logits_p = gpu.read_f32(exec.view(logits_id)).unwrap();
    let logits: Vec<f32> = logits_p
        .chunks(vp)
        .flat_map(|row| row[..v].to_vec())
        .collect();
    let want_logits = fx.f32("logits");
    // Chunked, the buffer holds the last chunk's rows.
    let first_row = chunked.map_or(0, |rows| (b * t - 1) / rows * rows);
    let n_rows = chunked.map_or(b * t, |_| b * t - first_row);
    compare(
        "logits",
        &logits[..n_rows * v],
        &want_logits[first_row * v..],
        1e-4,
        0.0,
    )
    .assert();
    compare("loss", &[loss], &fx.f32("loss"), 1e-5, 0.0).assert();

    // Every parameter gradient, in our layout.
    exec.forward_backward(&batch).unwrap();
    let grads = ParamStore::read(gpu, &store.grads).unwrap();
    for (i, spec) in table.specs.iter().enumerate() {
        let want = hf::from_hf(&table, &cfg, i, fx.f32(&format!("grad.{}", spec.name)));
        let got = &grads[i];
        let c = compare(&format!("grad {}", spec.name), got, &want, 1e-5, 1e-3);
        eprintln!("{c}");
        c.assert();
    }

    // Ten AdamW steps on the same batch.
    common::fixture::check_adamw_steps(&mut exec, &batch, &fx, "gpt2-tiny");
}
