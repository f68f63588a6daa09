//! Training end to end on the GPU: resume is bit-for-bit, the graph's validation switch and
//! memory reuse, bad input, divergence, and convergence on real text.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use shaderformer::gpu::{DType, test_gpu};
use shaderformer::graph::recompute::Recompute;
use shaderformer::graph::saved::ActivationDtype;
use shaderformer::graph::{ExecOptions, Executor, MicroBatch, NodeCheck, ParamStore, Phase};
use shaderformer::model::gpt::{self, Mode};
use shaderformer::model::{GptConfig, ParamTable};
use shaderformer::rng::Rng;
use shaderformer::train::schedule::{LrSchedule, Schedule};
use shaderformer::train::{self, TrainConfig, checkpoint};

fn scratch(name: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "shaderformer-test-{}-{}-{name}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A tiny run on the embedded addition data, with dropout and gradient accumulation on so that
/// resuming must restore the data position, the optimizer and the dropout streams.
fn tiny(out: &Path, max_iters: u64) -> TrainConfig {
    TrainConfig {
        out: out.to_path_buf(),
        n_layer: 1,
        n_head: 2,
        n_embd: 32,
        block_size: 16,
        dropout: 0.1,
        batch_size: 4,
        grad_accum: 2,
        max_iters,
        schedule: LrSchedule {
            kind: Schedule::Cosine,
            lr: 3e-3,
            min_lr: 3e-4,
            warmup_iters: 2,
            lr_decay_iters: 6,
        },
        eval_interval: 3,
        eval_iters: 1,
        log_interval: 1,
        verbose: false,
        ..TrainConfig::default()
    }
}

#[test]
fn resume_continues_bit_for_bit() {
    let Some(gpu) = test_gpu() else { return };
    let root = scratch("resume");
    let straight = root.join("straight");
    let s = train::train(gpu, &tiny(&straight, 6)).unwrap();
    assert_eq!(s.steps, 6);

    let split = root.join("split");
    train::train(gpu, &tiny(&split, 3)).unwrap();
    let resumed = TrainConfig {
        resume: Some(split.clone()),
        ..tiny(&split, 6)
    };
    let r = train::train(gpu, &resumed).unwrap();
    // This run trained steps 4 to 6.
    assert_eq!((r.steps, r.final_step), (3, 6));
    assert_eq!(s.final_train_loss, r.final_train_loss);
    assert_eq!(s.final_val_loss, r.final_val_loss);

    let a = checkpoint::load(&straight).unwrap();
    let b = checkpoint::load(&split).unwrap();
    let bits =
        |v: &Vec<Vec<f32>>| -> Vec<u32> { v.iter().flatten().map(|x| x.to_bits()).collect() };
    assert_eq!(
        bits(&a.params),
        bits(&b.params),
        "parameters differ after resume"
    );
    let (am, av) = a.optimizer.unwrap();
    let (bm, bv) = b.optimizer.unwrap();
    assert_eq!(bits(&am), bits(&bm), "AdamW m differs after resume");
    assert_eq!(bits(&av), bits(&bv), "AdamW v differs after resume");
    assert_eq!(a.state.unwrap().loader, b.state.unwrap().loader);
    let _ = std::fs::remove_dir_all(root);
}

fn small_model() -> GptConfig {
    GptConfig {
        n_layer: 2,
        n_head: 3,
        n_embd: 24,
        block_size: 21,
        vocab_size: 37,
        dropout: 0.2,
        bias: true,
    }
}

fn batch(cfg: &GptConfig, b: usize, t: usize, seed: u64) -> MicroBatch {
    shaderformer::bench::random_batch(cfg, b, t, &mut Rng::new(seed))
}

fn executor<'a>(
    gpu: &'a shaderformer::gpu::Gpu,
    cfg: &GptConfig,
    store: &ParamStore,
    b: usize,
    t: usize,
    reuse: bool,
) -> Executor<'a> {
    executor_for(gpu, cfg, store, b, t, reuse, u64::MAX)
}

/// `executor` for bindings of at most `max_binding` bytes (small ones chunk the logits).
fn executor_for<'a>(
    gpu: &'a shaderformer::gpu::Gpu,
    cfg: &GptConfig,
    store: &ParamStore,
    b: usize,
    t: usize,
    reuse: bool,
    max_binding: u64,
) -> Executor<'a> {
    let plain = (Recompute::None, ActivationDtype::F32);
    executor_with(gpu, cfg, store, (b, t), reuse, max_binding, plain)
}

/// `executor_for` with the activation recomputation and saved activations' storage `rewrite`.
fn executor_with<'a>(
    gpu: &'a shaderformer::gpu::Gpu,
    cfg: &GptConfig,
    store: &ParamStore,
    (b, t): (usize, usize),
    reuse: bool,
    max_binding: u64,
    (recompute, saved): (Recompute, ActivationDtype),
) -> Executor<'a> {
    let table = ParamTable::new(cfg);
    let mut g = gpt::build_for(cfg, &table, b, t, Mode::Train, max_binding);
    shaderformer::graph::save_memory(&mut g.graph, recompute, saved);
    let opts = ExecOptions {
        reuse,
        grad_accum: 2,
        ..ExecOptions::default()
    };
    Executor::new(gpu, g.graph, store, opts).unwrap()
}

fn store(gpu: &shaderformer::gpu::Gpu, cfg: &GptConfig) -> ParamStore {
    let table = ParamTable::new(cfg);
    ParamStore::new(gpu, &table.store_specs(), &table.init(cfg, 3), true).unwrap()
}

#[test]
fn every_node_matches_its_cpu_reference() {
    let Some(gpu) = test_gpu() else { return };
    let cfg = small_model();
    for reuse in [true, false] {
        let st = store(gpu, &cfg);
        let mut exec = executor(gpu, &cfg, &st, 2, 19, reuse);
        let checks = exec.validate(&batch(&cfg, 2, 19, 5)).unwrap();
        assert!(checks.len() > 60, "only {} checks", checks.len());
        let bad = NodeCheck::mismatches(&checks);
        assert!(bad.is_empty(), "reuse {reuse}:\n{}", bad.join("\n"));
    }
}

/// Activations saved in bf16, alone and under recomputation: every node (the conversions
/// included, to the bit) matches its CPU reference; the first step's losses are f32's bits (the
/// forward is unchanged) and its gradient norm within bf16's rounding of f32's, the later losses
/// close to f32's; and the activation pool is smaller. (The weights are not compared: AdamW's
/// first steps move a weight whose gradient is near zero by about the learning rate in the
/// direction of that gradient's sign, which rounding may flip.)
#[test]
fn activations_saved_in_bf16_match_their_references_and_track_f32() {
    let Some(gpu) = test_gpu() else { return };
    let cfg = small_model();
    let mut runs = Vec::new();
    let mut pools = Vec::new();
    for rewrite in [
        (Recompute::None, ActivationDtype::F32),
        (Recompute::None, ActivationDtype::Bf16),
        (Recompute::Block, ActivationDtype::Bf16),
    ] {
        let st = store(gpu, &cfg);
        let mut exec = executor_with(gpu, &cfg, &st, (2, 19), true, u64::MAX, rewrite);
        if rewrite.1 == ActivationDtype::Bf16 {
            let checks = exec.validate(&batch(&cfg, 2, 19, 5)).unwrap();
            let converted = checks.iter().filter(|c| c.op == "to_bf16").count();
            assert!(
                converted >= 2 * cfg.n_layer,
                "{rewrite:?}: {converted} conversions"
            );
            let bad = NodeCheck::mismatches(&checks);
            assert!(bad.is_empty(), "{rewrite:?}:\n{}", bad.join("\n"));
        }
        pools.push(exec.plan.planned_bytes);
        let st = store(gpu, &cfg);
        let mut exec = executor_with(gpu, &cfg, &st, (2, 19), true, u64::MAX, rewrite);
        runs.push(three_steps(gpu, &cfg, &st, &mut exec));
    }
    assert!(
        pools[1] < pools[0] && pools[2] < pools[1],
        "pools {pools:?}"
    );
    let f = |bits: &[u32]| -> Vec<f32> { bits.iter().map(|&b| f32::from_bits(b)).collect() };
    for run in &runs[1..] {
        // Each step's values: the micro-steps' losses, then the gradient norm.
        let (first, want) = (&run.0[0], &runs[0].0[0]);
        let n = first.len() - 1;
        assert_eq!(first[..n], want[..n], "the first step's losses differ");
        reference_close(
            "step 1 gradient norm",
            &f(&first[n..]),
            &f(&want[n..]),
            1e-2,
        );
        for (step, (a, b)) in run.0.iter().zip(&runs[0].0).enumerate().skip(1) {
            reference_close(&format!("step {} losses", step + 1), &f(a), &f(b), 1e-4);
        }
    }
    // The rounding reaches the gradients: the weights are not f32's bits.
    assert_ne!(runs[1].1, runs[0].1);
}

/// Asserts |a - b| <= tol · (1 + |b|) elementwise, naming `what`.
fn reference_close(what: &str, a: &[f32], b: &[f32], tol: f32) {
    assert_eq!(a.len(), b.len(), "{what}");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!(
            (x - y).abs() <= tol * (1.0 + y.abs()),
            "{what}[{i}]: {x} vs {y}"
        );
    }
}

/// Attention through the GEMM path (the tuner's "gemm" variant, pinned): every node still
/// matches its reference, dropout on the probabilities included, and the executor rewrites the
/// dropout step only in the dispatches that hold attention's params, not in the products'.
#[test]
fn attention_through_gemms_matches_its_cpu_reference() {
    use shaderformer::gpu::{TuneMode, own_test_gpu};
    let Some(gpu) = own_test_gpu(TuneMode::Off) else {
        return;
    };
    // T 32: the shortest sequence the tuner offers the GEMM path for.
    let cfg = GptConfig {
        block_size: 32,
        ..small_model()
    };
    let st = store(&gpu, &cfg);
    drop(executor(&gpu, &cfg, &st, 2, 32, true));
    let attention: std::collections::BTreeMap<String, String> = gpu
        .tuner
        .used()
        .into_keys()
        .filter(|k| k.starts_with("attention: "))
        .map(|k| (k, "gemm".to_string()))
        .collect();
    assert_eq!(attention.len(), 2, "forward and backward");
    gpu.tuner.pin(&attention);
    let mut exec = executor(&gpu, &cfg, &st, 2, 32, true);
    let used = gpu.tuner.used();
    for k in attention.keys() {
        assert_eq!(used[k], "gemm", "{k}");
    }
    let checks = exec.validate(&batch(&cfg, 2, 32, 5)).unwrap();
    let attn = checks.iter().filter(|c| c.op.starts_with("attention"));
    assert!(attn.count() >= 2 * cfg.n_layer, "{} checks", checks.len());
    let bad = NodeCheck::mismatches(&checks);
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}

/// The flat parameter layout: zeroing the gradients, their norm and AdamW take a handful of
/// dispatches for the whole model (one span per class of tensors, weights and vectors), also with
/// the token embedding split into row chunks; every tensor reads back as written.
#[test]
fn the_optimizer_runs_over_flat_buffers() {
    let Some(gpu) = test_gpu() else { return };
    let cfg = small_model();
    let table = ParamTable::new(&cfg);
    let init = table.init(&cfg, 3);
    for limit in [u64::MAX, 20 * 24 * 4] {
        let chunk_limit = |i| if i == table.wte { limit } else { u64::MAX };
        let specs = table.store_specs();
        let st = ParamStore::build(gpu, &specs, &init, true, DType::F32, &chunk_limit).unwrap();
        assert_eq!(
            st.params[table.wte].len(),
            if limit == u64::MAX { 1 } else { 4 }
        );
        assert_eq!(st.read_params(gpu).unwrap(), init);
        let exec = executor(gpu, &cfg, &st, 2, 19, true);
        let count = |p: Phase| exec.dispatches[&p].len();
        assert_eq!(count(Phase::Zero), 2, "one fill per class");
        // The norm: one partial sum per class and the finish; AdamW: one step per class.
        assert_eq!(count(Phase::Optimizer), 3 + 2);
    }
}

/// The same with the logits in 64-row chunks (`LmHeadLoss`): 76 rows make a full chunk and a
/// short one; the token embedding is split into chunks of 20 rows as well.
#[test]
fn every_node_matches_its_cpu_reference_with_chunked_logits() {
    let Some(gpu) = test_gpu() else { return };
    let cfg = small_model();
    let table = ParamTable::new(&cfg);
    let st = ParamStore::build(
        gpu,
        &table.store_specs(),
        &table.init(&cfg, 3),
        true,
        DType::F32,
        &|i| {
            if i == table.wte {
                20 * 24 * 4
            } else {
                u64::MAX
            }
        },
    )
    .unwrap();
    assert_eq!(st.params[table.wte].len(), 4);
    let mut exec = executor_for(gpu, &cfg, &st, 4, 19, true, 64 * 64 * 4);
    let checks = exec.validate(&batch(&cfg, 4, 19, 5)).unwrap();
    let lm_head: Vec<_> = checks
        .iter()
        .filter(|c| c.op.starts_with("lm_head"))
        .collect();
    assert_eq!(lm_head.len(), 6, "forward and backward, 3 outputs each");
    let bad = NodeCheck::mismatches(&checks);
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}

#[test]
fn memory_reuse_changes_nothing_but_memory() {
    let Some(gpu) = test_gpu() else { return };
    let cfg = small_model();
    let mut runs = Vec::new();
    for reuse in [true, false] {
        let st = store(gpu, &cfg);
        let mut exec = executor(gpu, &cfg, &st, 2, 19, reuse);
        if reuse {
            assert!(exec.plan.planned_bytes < exec.plan.unplanned_bytes);
        } else {
            assert_eq!(exec.plan.planned_bytes, exec.plan.unplanned_bytes);
        }
        runs.push(three_steps(gpu, &cfg, &st, &mut exec));
    }
    assert_eq!(runs[0].0.len(), 3);
    assert_eq!(runs[0], runs[1], "results depend on buffer reuse");
}

/// The losses and gradient norms of three steps of two micro-batches (B 2, T 19) through
/// `exec`, and the parameters after them, as bits.
fn three_steps(
    gpu: &shaderformer::gpu::Gpu,
    cfg: &GptConfig,
    st: &ParamStore,
    exec: &mut Executor,
) -> (Vec<Vec<u32>>, Vec<u32>) {
    for step in 1..=3 {
        let micro = [batch(cfg, 2, 19, step), batch(cfg, 2, 19, step + 100)];
        exec.step(&micro, 1e-3, step as u32).unwrap();
    }
    let losses: Vec<Vec<u32>> = exec
        .wait_results()
        .unwrap()
        .iter()
        .map(|r| {
            let norm = r.grad_norm.to_bits();
            r.losses.iter().map(|x| x.to_bits()).chain([norm]).collect()
        })
        .collect();
    let params: Vec<u32> = st
        .read_params(gpu)
        .unwrap()
        .iter()
        .flatten()
        .map(|x| x.to_bits())
        .collect();
    (losses, params)
}

/// Recomputing each block's activations in the backward (dropout included: the copies draw the
/// same masks) gives the same bits, in a smaller activation pool.
#[test]
fn recomputed_blocks_change_nothing_but_memory() {
    let Some(gpu) = test_gpu() else { return };
    let cfg = GptConfig {
        n_layer: 3,
        ..small_model()
    };
    let mut runs = Vec::new();
    let mut pools = Vec::new();
    for recompute in [Recompute::None, Recompute::Block] {
        let st = store(gpu, &cfg);
        let rewrite = (recompute, ActivationDtype::F32);
        let mut exec = executor_with(gpu, &cfg, &st, (2, 19), true, u64::MAX, rewrite);
        pools.push(exec.plan.planned_bytes);
        runs.push(three_steps(gpu, &cfg, &st, &mut exec));
    }
    assert_eq!(runs[0].0.len(), 3);
    assert_eq!(runs[0], runs[1], "results depend on recomputation");
    assert!(
        pools[1] < pools[0],
        "recomputation planned {} activation bytes against {}",
        pools[1],
        pools[0]
    );
}

fn err_of(cfg: &TrainConfig) -> String {
    let gpu = test_gpu().unwrap();
    match train::train(gpu, cfg) {
        Ok(_) => panic!("training should have failed"),
        Err(e) => e.to_string(),
    }
}

fn assets() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("assets")
}

#[test]
fn bad_data_is_a_clear_error() {
    if test_gpu().is_none() {
        return;
    }
    let root = scratch("bad-data");
    let missing = root.join("missing.txt");
    let e = err_of(&TrainConfig {
        data: Some(missing.clone()),
        ..tiny(&root.join("out"), 2)
    });
    assert!(e.contains("missing.txt"), "{e}");

    let empty = root.join("empty.txt");
    std::fs::write(&empty, "").unwrap();
    let e = err_of(&TrainConfig {
        data: Some(empty),
        ..tiny(&root.join("out"), 2)
    });
    assert!(e.contains("empty.txt") && e.contains("empty"), "{e}");

    // Token ids beyond the vocabulary of the model being fine-tuned (77 tokens).
    let bin = root.join("ids.bin");
    let ids: Vec<u16> = (0..500).map(|i| (i % 90) as u16).collect();
    std::fs::write(&bin, bytemuck::cast_slice(&ids)).unwrap();
    let e = err_of(&TrainConfig {
        data: Some(bin.clone()),
        init: Some(assets().join("gpt2-tiny")),
        ..tiny(&root.join("out"), 2)
    });
    assert!(
        e.contains("token id 77") && e.contains("vocabulary of 77"),
        "{e}"
    );

    // A block size beyond the checkpoint's position table (64).
    let ok_ids: Vec<u16> = (0..5000).map(|i| (i % 70) as u16).collect();
    std::fs::write(&bin, bytemuck::cast_slice(&ok_ids)).unwrap();
    let e = err_of(&TrainConfig {
        data: Some(bin),
        init: Some(assets().join("gpt2-tiny")),
        block_size: 100,
        ..tiny(&root.join("out"), 2)
    });
    assert!(e.contains("--block-size") && e.contains("64"), "{e}");

    // Text for a checkpoint that has no tokenizer.
    let text = root.join("text.txt");
    std::fs::write(&text, "hello world ".repeat(100)).unwrap();
    let e = err_of(&TrainConfig {
        data: Some(text),
        init: Some(assets().join("gpt2-tiny")),
        ..tiny(&root.join("out"), 2)
    });
    assert!(e.contains("no tokenizer"), "{e}");
    let _ = std::fs::remove_dir_all(root);
}

/// Rewrites gpt2-tiny's weights with one tensor dropped or reshaped.
fn broken_checkpoint(root: &Path, name: &str, drop: bool) -> PathBuf {
    let src = assets().join("gpt2-tiny");
    let dir = root.join(format!("broken-{}", drop as u8));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(src.join("config.json"), dir.join("config.json")).unwrap();
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors = Vec::new();
    for (n, t) in st.tensors() {
        if n == name {
            if drop {
                continue;
            }
            let mut shape = t.shape().to_vec();
            shape.reverse();
            tensors.push((n, shape, t.data().to_vec()));
        } else {
            tensors.push((n, t.shape().to_vec(), t.data().to_vec()));
        }
    }
    shaderformer::io::hf::write_safetensors(&dir.join("model.safetensors"), &tensors).unwrap();
    dir
}

#[test]
fn broken_checkpoints_name_the_tensor() {
    let root = scratch("broken");
    let name = "transformer.h.1.mlp.c_fc.weight";
    let e = checkpoint::load(&broken_checkpoint(&root, name, true))
        .unwrap_err()
        .to_string();
    assert!(e.contains(name) && e.contains("missing"), "{e}");
    let e = checkpoint::load(&broken_checkpoint(&root, name, false))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(name) && e.contains("[192, 48]") && e.contains("[48, 192]"),
        "{e}"
    );
    let e = checkpoint::load(&root.join("nowhere"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("nowhere") && e.contains("does not exist"), "{e}");
    std::fs::write(
        root.join("config.json"),
        r#"{"model_type": "llama", "architectures": ["LlamaForCausalLM"]}"#,
    )
    .unwrap();
    let e = checkpoint::load(&root).unwrap_err().to_string();
    assert!(e.contains("unsupported architecture"), "{e}");
    let _ = std::fs::remove_dir_all(root);
}

#[test]
fn a_model_too_large_for_the_adapter_names_the_tensor_and_limit() {
    let Some(gpu) = test_gpu() else { return };
    // The MLP weight (4C, C) is just over the largest storage binding: held in row chunks, which
    // the MLP's linear layer (with its bias) cannot take. Heads of 64 (the fused attention
    // kernels' limit is 128).
    let c = (((gpu.max_binding() / 16) as f64).sqrt() as usize + 8).next_multiple_of(64);
    let e = err_of(&TrainConfig {
        n_layer: 1,
        n_head: c / 64,
        n_embd: c,
        ..tiny(&scratch("too-large"), 1)
    });
    assert!(
        e.contains("c_fc.weight") || e.contains("c_proj.weight"),
        "{e}"
    );
    assert!(
        e.contains(&gpu.max_binding().to_string()) || e.contains("max_"),
        "{e}"
    );
}

/// Settings no run can use are refused before anything is trained, naming the flag.
#[test]
fn bad_settings_name_the_flag() {
    if test_gpu().is_none() {
        return;
    }
    let root = scratch("bad-settings");
    let out = root.join("out");
    let with_lr = |lr: f32| TrainConfig {
        schedule: LrSchedule {
            lr,
            ..tiny(&out, 2).schedule
        },
        ..tiny(&out, 2)
    };
    for (cfg, flag) in [
        (with_lr(-1.0), "--lr: -1"),
        (with_lr(f32::NAN), "--lr: NaN"),
        (
            TrainConfig {
                eps: 0.0,
                ..tiny(&out, 2)
            },
            "--eps",
        ),
        (
            TrainConfig {
                weight_decay: f32::INFINITY,
                ..tiny(&out, 2)
            },
            "--weight-decay",
        ),
        (tiny(&out, 0), "--max-iters: must be at least 1"),
        (
            TrainConfig {
                eval_iters: 0,
                ..tiny(&out, 2)
            },
            "--eval-iters",
        ),
    ] {
        let e = err_of(&cfg);
        assert!(e.contains(flag), "{flag}: {e}");
    }
    assert!(!out.exists(), "a refused run wrote {}", out.display());

    // Resuming a run that already reached --max-iters says so instead of doing nothing.
    train::train(test_gpu().unwrap(), &tiny(&out, 2)).unwrap();
    let e = err_of(&TrainConfig {
        resume: Some(out.clone()),
        ..tiny(&out, 2)
    });
    assert!(e.contains("at step 2") && e.contains("--max-iters"), "{e}");
    let _ = std::fs::remove_dir_all(root);
}

/// `cfg` with a constant learning rate of `lr` and no clipping, to send the weights to infinity.
fn absurd_lr(cfg: TrainConfig, lr: f32) -> TrainConfig {
    TrainConfig {
        schedule: LrSchedule {
            kind: Schedule::Constant,
            lr,
            ..cfg.schedule
        },
        grad_clip: 0.0,
        ..cfg
    }
}

/// A single update that sends the weights to infinity is caught by the evaluation after it
/// (its own loss was computed before the update): no checkpoint of NaN weights is written.
#[test]
fn divergence_in_the_last_update_writes_no_checkpoint() {
    if test_gpu().is_none() {
        return;
    }
    let root = scratch("diverge-last");
    let out = root.join("out");
    let e = err_of(&absurd_lr(tiny(&out, 1), 1e38));
    assert!(
        e.contains("diverged by step 1") && e.contains("evaluation"),
        "{e}"
    );
    assert!(
        !out.exists(),
        "a checkpoint of diverged weights was written"
    );
    let _ = std::fs::remove_dir_all(root);
}

#[test]
fn divergence_stops_and_keeps_the_last_checkpoint() {
    if test_gpu().is_none() {
        return;
    }
    let root = scratch("diverge");
    let out = root.join("out");
    train::train(test_gpu().unwrap(), &tiny(&out, 3)).unwrap();
    let before = std::fs::read(out.join("model.safetensors")).unwrap();
    // An absurd learning rate sends the weights to infinity within a step or two.
    let cfg = TrainConfig {
        resume: Some(out.clone()),
        ..tiny(&out, 9)
    };
    let e = err_of(&absurd_lr(cfg, 1e36));
    assert!(e.contains("diverged"), "{e}");
    assert!(e.contains("(step 3) is untouched"), "{e}");
    let after = std::fs::read(out.join("model.safetensors")).unwrap();
    assert!(before == after, "the last good checkpoint was modified");
    checkpoint::load(&out).expect("the checkpoint stays loadable");
    let _ = std::fs::remove_dir_all(root);
}

/// With SHADERFORMER_TEST_DATA naming a text file (CI sets it to tiny shakespeare), a small model
/// learns it: after 400 steps the validation loss is well below the unigram entropy of English
/// characters (about 3.3 nats).
#[test]
fn converges_on_real_text() {
    let Some(gpu) = test_gpu() else { return };
    let Ok(path) = std::env::var("SHADERFORMER_TEST_DATA") else {
        eprintln!("skipping: SHADERFORMER_TEST_DATA is not set");
        return;
    };
    let root = scratch("converge");
    let cfg = TrainConfig {
        data: Some(PathBuf::from(path)),
        out: root.join("out"),
        n_layer: 2,
        n_head: 4,
        n_embd: 64,
        block_size: 32,
        batch_size: 16,
        max_iters: 400,
        schedule: LrSchedule {
            kind: Schedule::Cosine,
            lr: 3e-3,
            min_lr: 3e-4,
            warmup_iters: 20,
            lr_decay_iters: 400,
        },
        eval_interval: 0,
        eval_iters: 10,
        verbose: false,
        ..TrainConfig::default()
    };
    let s = train::train(gpu, &cfg).unwrap();
    let val = s.final_val_loss.unwrap();
    eprintln!(
        "val loss after 400 steps: {val:.4} ({:.1} ms/step)",
        s.ms_per_step
    );
    assert!(val < 2.40, "val loss {val} is not below 2.40");
    let _ = std::fs::remove_dir_all(root);
}

/// A copy of the transformers checkpoint gpt2-bpe (with its generation_config.json and
/// tokenizer_config.json) and a text file its tokenizer encodes.
fn bpe_copy(root: &Path) -> (PathBuf, PathBuf) {
    let src = assets().join("gpt2-bpe");
    let dir = root.join("gpt2-bpe");
    std::fs::create_dir_all(&dir).unwrap();
    for e in std::fs::read_dir(&src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dir.join(e.file_name())).unwrap();
    }
    let text = root.join("text.txt");
    let body = std::fs::read_to_string(src.join("score.txt")).unwrap();
    std::fs::write(&text, body.repeat(3)).unwrap();
    (dir, text)
}

/// `--init X --out X` continues X in place: our files are replaced, X's others stay.
#[test]
fn init_in_place_keeps_the_checkpoints_other_files() {
    let Some(gpu) = test_gpu() else { return };
    let root = scratch("init-in-place");
    let (dir, text) = bpe_copy(&root);
    let generation = std::fs::read(dir.join("generation_config.json")).unwrap();
    let cfg = TrainConfig {
        data: Some(text),
        init: Some(dir.clone()),
        out: dir.clone(),
        block_size: 32,
        batch_size: 2,
        max_iters: 1,
        eval_iters: 1,
        verbose: false,
        ..TrainConfig::default()
    };
    train::train(gpu, &cfg).unwrap();
    assert_eq!(
        std::fs::read(dir.join("generation_config.json")).unwrap(),
        generation
    );
    for f in ["tokenizer_config.json", "score.txt", "fixture.safetensors"] {
        assert!(dir.join(f).exists(), "{f} was removed");
    }
    let ck = checkpoint::load(&dir).unwrap();
    assert_eq!(ck.state.unwrap().step, 1);
    let _ = std::fs::remove_dir_all(root);
}

/// A failed write (here a directory where model.safetensors should go; a full disk takes the
/// same path) leaves no staging files and the previous checkpoint files as they were.
#[test]
fn a_failed_checkpoint_write_leaves_nothing_behind() {
    let root = scratch("failed-write");
    let ck = checkpoint::load(&assets().join("gpt2-tiny")).unwrap();
    let dir = root.join("ck");
    std::fs::create_dir_all(dir.join("model.safetensors")).unwrap();
    std::fs::write(dir.join("config.json"), "old").unwrap();
    assert!(checkpoint::save(&dir, &ck).is_err());
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    names.sort();
    assert_eq!(names, ["config.json", "model.safetensors"], "left behind");
    assert_eq!(
        std::fs::read_to_string(dir.join("config.json")).unwrap(),
        "old"
    );
    let _ = std::fs::remove_dir_all(root);
}

/// Checkpoint contents that would be silently wrong are errors naming the file and the key:
/// an untied lm head, a character vocabulary smaller than the model's or with a duplicate,
/// optimizer moments holding NaN.
#[test]
fn silently_wrong_checkpoints_are_refused() {
    let Some(gpu) = test_gpu() else { return };
    let root = scratch("wrong-ckpt");
    let out = root.join("out");
    train::train(gpu, &tiny(&out, 1)).unwrap();
    let edit = |file: &str, from: &str, to: &str| {
        let dir = root.join(format!("edited-{}", from.len() + to.len()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        for e in std::fs::read_dir(&out).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), dir.join(e.file_name())).unwrap();
        }
        let text = std::fs::read_to_string(dir.join(file)).unwrap();
        assert!(text.contains(from), "{from} not in {text}");
        std::fs::write(dir.join(file), text.replacen(from, to, 1)).unwrap();
        checkpoint::load(&dir).unwrap_err().to_string()
    };
    let e = edit(
        "config.json",
        "\"tie_word_embeddings\": true",
        "\"tie_word_embeddings\": false",
    );
    assert!(e.contains("tie_word_embeddings"), "{e}");
    let vocab = std::fs::read_to_string(out.join("vocab.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&vocab).unwrap();
    let chars = v["chars"].as_str().unwrap().to_string();
    let short: String = chars.chars().skip(1).collect();
    let as_json = |c: &str| serde_json::json!({"type": "chars", "chars": c}).to_string();
    let e = edit("vocab.json", &vocab, &as_json(&short));
    assert!(e.contains("vocab_size"), "{e}");
    let twice: String = chars
        .chars()
        .take(chars.chars().count() - 1)
        .chain("0".chars())
        .collect();
    let e = edit("vocab.json", &vocab, &as_json(&twice));
    assert!(e.contains("twice"), "{e}");

    let opt = out.join("optimizer.safetensors");
    let mut st = shaderformer::io::hf::read_safetensors(&opt).unwrap();
    let (_, v) = st.get_mut("v.transformer.wpe.weight").unwrap();
    v[3] = f32::NAN;
    let tensors: Vec<(String, Vec<usize>, Vec<u8>)> = st
        .into_iter()
        .map(|(n, (shape, d))| (n, shape, bytemuck::cast_slice(&d).to_vec()))
        .collect();
    shaderformer::io::hf::write_safetensors(&opt, &tensors).unwrap();
    let e = checkpoint::load(&out).unwrap_err().to_string();
    assert!(
        e.contains("optimizer.safetensors") && e.contains("v.transformer.wpe.weight"),
        "{e}"
    );
    let _ = std::fs::remove_dir_all(root);
}

/// A resumed run that diverges names the checkpoint it resumed from, which is intact, not the
/// --out directory it had not written yet.
#[test]
fn divergence_after_resume_names_the_checkpoint_that_exists() {
    let Some(gpu) = test_gpu() else { return };
    let root = scratch("diverge-resume");
    let first = root.join("first");
    train::train(gpu, &tiny(&first, 2)).unwrap();
    let elsewhere = root.join("elsewhere");
    let cfg = TrainConfig {
        resume: Some(first.clone()),
        eval_interval: 0,
        ..tiny(&elsewhere, 9)
    };
    let e = err_of(&absurd_lr(cfg, 1e36));
    assert!(e.contains("diverged"), "{e}");
    assert!(
        e.contains(&format!("{} (step 2) is untouched", first.display())),
        "{e}"
    );
    assert!(!elsewhere.join("model.safetensors").exists());
    let _ = std::fs::remove_dir_all(root);
}

/// Destroying the device in the middle of training ends the wait for a step's results with an
/// error naming the step, within seconds, instead of a spin that never returns.
#[test]
fn a_lost_device_is_an_error_naming_the_step() {
    if test_gpu().is_none() {
        return;
    }
    let gpu = shaderformer::gpu::Gpu::new(&shaderformer::gpu::GpuOptions::from_env()).unwrap();
    let cfg = small_model();
    let table = ParamTable::new(&cfg);
    let params = table.init(&cfg, 1);
    let store = ParamStore::new(&gpu, &table.store_specs(), &params, true).unwrap();
    let (b, t) = (2, 8);
    let g = gpt::build_for(&cfg, &table, b, t, Mode::Train, gpu.max_binding());
    let mut exec = Executor::new(&gpu, g.graph, &store, ExecOptions::default()).unwrap();
    exec.step(&[batch(&cfg, b, t, 1)], 1e-3, 1).unwrap();
    exec.wait_results().unwrap();
    gpu.device.destroy();
    let t0 = std::time::Instant::now();
    let e = exec
        .step(&[batch(&cfg, b, t, 2)], 1e-3, 2)
        .and_then(|_| exec.wait_results())
        .expect_err("a destroyed device cannot return results");
    assert!(t0.elapsed().as_secs() < 20, "took {:?}", t0.elapsed());
    let e = e.to_string();
    assert!(e.contains("step 2"), "{e}");
}
