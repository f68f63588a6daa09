//! LoRA against PyTorch and peft: the adapters of scripts/fixtures_lora.py (r 4, alpha 8, B random
//! and non-zero) on assets/gpt2-tiny (GPT-2's Conv1D layers: c_attn, both c_proj, c_fc) and on
//! assets/llama-tiny (all seven projections) are read as peft saved them and laid on their frozen
//! bases; the loss, the gradient of every adapter tensor, the losses and gradient norms of 10
//! AdamW steps of the adapter alone, and the adapter after them must match the fixture. The base
//! weights must come out of training unchanged, bit for bit. Every mismatch fails.

mod common;

use std::path::Path;

use common::fixture::Fixture;
use shaderformer::gpu::test_gpu;
use shaderformer::graph::{ExecOptions, Executor, MicroBatch, NodeCheck, ParamStore};
use shaderformer::io::hf_weights;
use shaderformer::kernels::adamw::Hyper;
use shaderformer::model::gpt::{self, GptGraph, Mode};
use shaderformer::model::llama;
use shaderformer::model::lora::{LoraConfig, LoraPlan};
use shaderformer::model::{GptConfig, ParamTable};
use shaderformer::reference::compare;
use shaderformer::train::checkpoint;

fn assets() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/assets"))
}

/// A base model with its adapter plan and every parameter's value (base, then adapter).
struct Adapted {
    plan: LoraPlan,
    values: Vec<Vec<f32>>,
    graph: Box<dyn Fn(Mode, usize, usize) -> GptGraph>,
}

fn gpt2() -> Adapted {
    let ck = checkpoint::load(&assets().join("gpt2-tiny")).unwrap();
    let cfg: GptConfig = ck.cfg.clone();
    let table = ParamTable::new(&cfg);
    let (lora, _) = LoraConfig::read(&assets().join("gpt2-tiny-lora")).unwrap();
    let plan = LoraPlan::new(&lora, &table.specs, &table.linear_weights()).unwrap();
    let mut values = ck.params.clone();
    values.extend(plan.read_values(&assets().join("gpt2-tiny-lora")).unwrap());
    let p = plan.clone();
    Adapted {
        plan,
        values,
        graph: Box::new(move |mode, b, t| {
            gpt::build_adapted(&cfg, &table, Some(&p), (b, t), mode, u64::MAX)
        }),
    }
}

fn llama_tiny() -> Adapted {
    let ck = hf_weights::load(&assets().join("llama-tiny")).unwrap();
    let (lora, _) = LoraConfig::read(&assets().join("llama-tiny-lora")).unwrap();
    let plan = LoraPlan::new(&lora, &ck.table.specs, &ck.table.linear_weights()).unwrap();
    let mut values = ck.params.clone();
    values.extend(plan.read_values(&assets().join("llama-tiny-lora")).unwrap());
    let p = plan.clone();
    let (arch, table) = (ck.cfg.arch.clone(), ck.table.clone());
    Adapted {
        plan,
        values,
        graph: Box::new(move |mode, b, t| {
            llama::build_adapted(&arch, &table, Some(&p), (b, t), mode, u64::MAX).unwrap()
        }),
    }
}

#[test]
fn gpt2_lora_matches_peft() {
    parity("gpt2-tiny", gpt2());
}

#[test]
fn llama_lora_matches_peft() {
    parity("llama-tiny", llama_tiny());
}

/// Every node of the adapted training graph, GELU and dropout on, against its CPU reference.
#[test]
fn every_node_of_an_adapted_gpt2_matches_its_reference() {
    let Some(gpu) = test_gpu() else { return };
    let base = checkpoint::load(&assets().join("gpt2-tiny")).unwrap();
    let cfg = GptConfig {
        dropout: 0.1,
        ..base.cfg.clone()
    };
    let table = ParamTable::new(&cfg);
    let lora = LoraConfig {
        dropout: 0.2,
        ..LoraConfig::read(&assets().join("gpt2-tiny-lora"))
            .unwrap()
            .0
    };
    let plan = LoraPlan::new(&lora, &table.specs, &table.linear_weights()).unwrap();
    let mut values = base.params.clone();
    values.extend(plan.read_values(&assets().join("gpt2-tiny-lora")).unwrap());
    let store =
        ParamStore::with_frozen(gpu, &plan.store_specs(), &values, &plan.trained()).unwrap();
    let (b, t) = (2, 13);
    let g = gpt::build_adapted(&cfg, &table, Some(&plan), (b, t), Mode::Train, u64::MAX);
    let lora_ops = g
        .graph
        .nodes
        .iter()
        .filter(|n| n.op.name().starts_with("lora"));
    assert_eq!(
        lora_ops.count(),
        2 * 8,
        "forward and backward of 8 adapted layers"
    );
    let mut exec = Executor::new(gpu, g.graph, &store, options(None)).unwrap();
    let ids = |k: u32| (0..(b * t) as u32).map(|i| (i * 7 + k) % 77).collect();
    let checks = exec
        .validate(&MicroBatch {
            tokens: ids(3),
            targets: ids(5),
        })
        .unwrap();
    let bad = NodeCheck::mismatches(&checks);
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}

fn options(fx: Option<&Fixture>) -> ExecOptions {
    let num = |k: &str, d: f64| fx.map_or(d, |f| f.num(k)) as f32;
    ExecOptions {
        reuse: true,
        grad_accum: 1,
        adamw: Hyper {
            beta1: num("beta1", 0.9),
            beta2: num("beta2", 0.95),
            eps: num("eps", 1e-8),
            weight_decay: num("weight_decay", 0.1),
            grad_clip: num("grad_clip", 1.0),
        },
        seed: 0,
        shard: Default::default(),
    }
}

fn parity(base: &str, model: Adapted) {
    let Some(gpu) = test_gpu() else { return };
    let base_fx = Fixture::load(&assets().join(base).join("fixture.safetensors"));
    let fx = Fixture::load(&assets().join(format!("{base}-lora/fixture.safetensors")));
    let Adapted {
        plan,
        values,
        graph,
    } = model;
    let tokens = base_fx.u32("tokens");
    let t = base_fx.num("T") as usize;
    let b = tokens.len() / t;
    let store =
        ParamStore::with_frozen(gpu, &plan.store_specs(), &values, &plan.trained()).unwrap();
    // The frozen base has no gradients or moments.
    assert!(store.grads[..plan.base_len].iter().all(Vec::is_empty));
    assert!(store.m[plan.base_len..].iter().all(|c| !c.is_empty()));
    let g = graph(Mode::Train, b, t);
    let mut exec = Executor::new(gpu, g.graph, &store, options(Some(&fx))).unwrap();
    let batch = MicroBatch {
        tokens,
        targets: base_fx.u32("targets"),
    };

    let loss = exec.forward_loss(&batch).unwrap();
    compare("loss", &[loss], &fx.f32("loss"), 1e-5, 0.0).assert();

    exec.forward_backward(&batch).unwrap();
    let grads = ParamStore::read(gpu, &store.grads).unwrap();
    for (i, spec) in plan.specs.iter().enumerate().skip(plan.base_len) {
        let want = fx.f32(&format!("grad.{}", spec.name));
        let c = compare(&format!("grad {}", spec.name), &grads[i], &want, 1e-5, 1e-3);
        eprintln!("{c}");
        c.assert();
    }

    common::fixture::check_adamw_steps(&mut exec, &batch, &fx, base);

    let after = store.read_params(gpu).unwrap();
    for (i, spec) in plan.specs.iter().enumerate() {
        if i < plan.base_len {
            assert!(
                after[i]
                    .iter()
                    .zip(&values[i])
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "the frozen base tensor {} changed",
                spec.name
            );
        } else {
            let want = fx.f32(&format!("final.{}", spec.name));
            compare(&format!("final {}", spec.name), &after[i], &want, 1e-4, 0.0).assert();
        }
    }
}
