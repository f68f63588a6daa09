//! `train --init` from Llama-family checkpoints as transformers saved them: the loop fine-tunes
//! llama-tiny (GQA, untied head, llama3 RoPE) from its source model's loss and lowers it; the
//! directory it writes reloads, in f32, to the very model it trained (the same evaluation loss,
//! bit for bit); `--resume` of it continues bit for bit; a bf16 source trains and saves in f32;
//! qwen2-tiny (tied head, tokenizer.json) trains on text, is sampled at the end of the run, and
//! its checkpoint is read by `score` and `sample`; GPT-2's model flags and data outside the
//! model's vocabulary are refused by name. `train --arch llama` trains a fresh model on text
//! (its weights drawn as transformers draws them, its checkpoint sampled, resumed bit for bit
//! and validated node by node), and flags of the other architecture are refused by name.

mod common;

use std::path::{Path, PathBuf};

use common::{bin, losses, scratch, text};
use shaderformer::gpu::test_gpu;
use shaderformer::graph::recompute::Recompute;
use shaderformer::graph::{ExecOptions, Executor, ParamStore};
use shaderformer::io::hf_weights;
use shaderformer::model::gpt::Mode;
use shaderformer::model::llama;
use shaderformer::train::data::{Dataset, Loader, LoaderKind};
use shaderformer::train::{self, FreshLlama, TrainConfig};

fn asset(model: &str) -> PathBuf {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/assets")).join(model)
}

/// A nanoGPT .bin of `n` u16 tokens below `vocab` with a pattern a model learns quickly.
fn pattern_bin(dir: &Path, n: usize, vocab: u16) -> PathBuf {
    let path = dir.join("data.bin");
    let bytes: Vec<u8> = (0..n)
        .flat_map(|i| ((i * 7 % vocab as usize) as u16).to_le_bytes())
        .collect();
    std::fs::write(&path, bytes).unwrap();
    path
}

fn config(data: &Path, out: &Path, max_iters: u64) -> TrainConfig {
    let mut cfg = TrainConfig {
        data: Some(data.to_path_buf()),
        out: out.to_path_buf(),
        init: Some(asset("llama-tiny")),
        batch_size: 2,
        block_size: 24,
        max_iters,
        eval_interval: max_iters,
        eval_iters: 3,
        log_interval: 5,
        verbose: false,
        ..TrainConfig::default()
    };
    cfg.schedule.lr = 3e-3;
    cfg.schedule.min_lr = 3e-4;
    cfg.schedule.warmup_iters = 0;
    cfg.schedule.lr_decay_iters = max_iters;
    cfg
}

/// Mean loss of the written checkpoint over the batches the trainer's evaluation draws (its
/// loader, seeded `seed ^ 0xE7A1_0000`), on the model as `sample` and `score` load it.
fn reloaded_val_loss(dir: &Path, cfg: &TrainConfig) -> f32 {
    with_model(dir, cfg, Mode::Eval, |exec| {
        let data = Dataset::load(cfg.data.as_ref().unwrap(), None).unwrap();
        let (b, t) = (cfg.batch_size, cfg.block_size);
        let mut loader = Loader::new(LoaderKind::Random, b, t, cfg.seed ^ 0xE7A1_0000);
        let mut sum = 0.0f64;
        for _ in 0..cfg.eval_iters {
            sum += exec.forward_loss(&loader.next(&data.val)).unwrap() as f64;
        }
        (sum / cfg.eval_iters as f64) as f32
    })
}

/// `f` on the graph of the checkpoint in `dir`, loaded as `sample` and `score` load it, built in
/// `mode` for the run's batch shape and options.
fn with_model<R>(
    dir: &Path,
    cfg: &TrainConfig,
    mode: Mode,
    f: impl FnOnce(&mut Executor<'_>) -> R,
) -> R {
    let gpu = test_gpu().unwrap();
    let ck = hf_weights::load(dir).expect("load the checkpoint");
    let store = ParamStore::new(gpu, &ck.table.store_specs(), &ck.params, true).unwrap();
    let (b, t) = (cfg.batch_size, cfg.block_size);
    let g = llama::build(&ck.cfg.arch, &ck.table, b, t, mode).unwrap();
    let opts = ExecOptions {
        reuse: true,
        grad_accum: 1,
        adamw: cfg.adamw(),
        seed: cfg.seed as u32,
        shard: Default::default(),
    };
    let mut exec = Executor::new(gpu, g.graph, &store, opts).unwrap();
    f(&mut exec)
}

#[test]
fn init_from_llama_tiny_lowers_the_loss_and_writes_the_trained_model() {
    let Some(gpu) = test_gpu() else { return };
    let dir = scratch("llama-train", "init");
    let data = pattern_bin(&dir, 3000, 83);
    let out = dir.join("out");
    let mut cfg = config(&data, &out, 30);
    cfg.metrics = Some(dir.join("metrics.jsonl"));
    let summary = train::train(gpu, &cfg).expect("train --init llama-tiny");
    let l = losses(&dir.join("metrics.jsonl"));
    let first = l.first().unwrap().1;
    let val = summary.final_val_loss.unwrap() as f64;
    // The pattern is learnable: 30 steps at 3e-3 take the random model well down.
    assert!(val < first - 1.0, "loss {first} -> val {val}: {l:?}");

    // f32 weights and config, and the trained model itself: its evaluation loss, recomputed
    // from the files, is the trainer's.
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["dtype"], "float32", "{config}");
    assert_eq!(config["model_type"], "llama", "{config}");
    let bytes = std::fs::read(out.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    for (name, t) in st.tensors() {
        assert_eq!(t.dtype(), safetensors::Dtype::F32, "{name}");
    }
    let source = hf_weights::load(&asset("llama-tiny")).unwrap();
    let trained = hf_weights::load(&out).unwrap();
    assert_eq!(source.table.store_specs(), trained.table.store_specs());
    assert_ne!(source.params, trained.params, "the weights did not move");
    let reloaded = reloaded_val_loss(&out, &cfg);
    assert_eq!(
        reloaded,
        summary.final_val_loss.unwrap(),
        "reloaded model's loss"
    );
}

/// The loop computes with the checkpoint's own model: its first step's loss is, bit for bit, that
/// of the training graph (the one tests/llama_parity.rs checks against transformers) with the
/// source's weights on the loop's first batch.
#[test]
fn first_step_loss_is_the_source_models_on_the_first_batch() {
    let Some(gpu) = test_gpu() else { return };
    let dir = scratch("llama-train", "first");
    let data = pattern_bin(&dir, 3000, 83);
    let mut cfg = config(&data, &dir.join("out"), 2);
    cfg.log_interval = 1;
    cfg.metrics = Some(dir.join("metrics.jsonl"));
    train::train(gpu, &cfg).unwrap();
    let logged = losses(&dir.join("metrics.jsonl"));
    assert_eq!(logged[0].0, 1, "{logged:?}");

    let train_split = Dataset::load(&data, None).unwrap().train;
    let (b, t) = (cfg.batch_size, cfg.block_size);
    let batch = Loader::new(LoaderKind::Random, b, t, cfg.seed).next(&train_split);
    let want = with_model(&asset("llama-tiny"), &cfg, Mode::Train, |exec| {
        exec.forward_loss(&batch).unwrap()
    });
    assert_eq!(
        logged[0].1 as f32, want,
        "step 1's loss against the source model's"
    );
}

/// A bf16 checkpoint trains in f32 and is written in f32.
#[test]
fn bf16_source_is_trained_and_written_in_f32() {
    let Some(gpu) = test_gpu() else { return };
    let dir = scratch("llama-train", "bf16");
    let data = pattern_bin(&dir, 3000, 97);
    let out = dir.join("out");
    let mut cfg = config(&data, &out, 2);
    cfg.init = Some(asset("qwen3-tiny-bf16"));
    train::train(gpu, &cfg).unwrap();
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["dtype"], "float32", "{config}");
    assert_eq!(config["model_type"], "qwen3", "{config}");
    let bytes = std::fs::read(out.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    for (name, t) in st.tensors() {
        assert_eq!(t.dtype(), safetensors::Dtype::F32, "{name}");
    }
    let trained = hf_weights::load(&out).unwrap();
    let source = hf_weights::load(&asset("qwen3-tiny-bf16")).unwrap();
    assert_eq!(trained.params.len(), source.params.len());
    // Moved by two steps, and no longer on bf16's grid.
    assert!(
        trained.params[0].iter().any(|x| x.to_bits() & 0xFFFF != 0),
        "weights still bf16"
    );
}

/// `--recompute block` on llama-tiny (grouped-query attention, untied head, llama3 RoPE) trains
/// to the same bits as keeping every activation.
#[test]
fn recomputed_llama_blocks_train_to_the_same_bits() {
    let Some(gpu) = test_gpu() else { return };
    let dir = scratch("llama-train", "recompute");
    let data = pattern_bin(&dir, 3000, 83);
    let kept = config(&data, &dir.join("kept"), 4);
    let recomputed = TrainConfig {
        out: dir.join("recomputed"),
        recompute: Recompute::Block,
        ..kept.clone()
    };
    let (a, b) = (
        train::train(gpu, &kept).unwrap(),
        train::train(gpu, &recomputed).unwrap(),
    );
    let bits = |l: Option<f32>| l.map(f32::to_bits);
    assert_eq!(bits(a.final_train_loss), bits(b.final_train_loss));
    let a = std::fs::read(dir.join("kept/model.safetensors")).unwrap();
    let b = std::fs::read(dir.join("recomputed/model.safetensors")).unwrap();
    assert!(a == b, "the weights depend on recomputation");
}

#[test]
fn resume_of_a_llama_run_continues_bit_for_bit() {
    let Some(gpu) = test_gpu() else { return };
    let dir = scratch("llama-train", "resume");
    let data = pattern_bin(&dir, 3000, 83);
    let straight = config(&data, &dir.join("straight"), 12);
    train::train(gpu, &straight).unwrap();
    let mut first = config(&data, &dir.join("split"), 6);
    first.schedule.lr_decay_iters = 12;
    train::train(gpu, &first).unwrap();
    let state = std::fs::read_to_string(dir.join("split/trainer_state.json")).unwrap();
    assert!(state.contains("\"step\": 6"), "{state}");
    let mut rest = first.clone();
    rest.init = None;
    rest.resume = Some(dir.join("split"));
    rest.max_iters = 12;
    rest.eval_interval = 12;
    train::train(gpu, &rest).unwrap();
    for file in ["model.safetensors", "optimizer.safetensors"] {
        let a = std::fs::read(dir.join("straight").join(file)).unwrap();
        let b = std::fs::read(dir.join("split").join(file)).unwrap();
        assert!(a == b, "{file} differs after resuming");
    }
}

#[test]
fn qwen2_tiny_trains_on_text_and_its_checkpoint_samples_and_scores() {
    let dir = scratch("llama-train", "qwen2");
    let out = dir.join("out");
    let o = bin()
        .args(["train", "--init"])
        .arg(asset("qwen2-tiny"))
        .arg("--data")
        .arg(asset("qwen2-tiny/score.txt"))
        .arg("--out")
        .arg(&out)
        .args([
            "--max-iters",
            "4",
            "--batch-size",
            "2",
            "--block-size",
            "16",
        ])
        .args([
            "--eval-interval",
            "4",
            "--eval-iters",
            "1",
            "--sample-tokens",
            "8",
        ])
        .output()
        .unwrap();
    let log = text(&o);
    if log.contains("no GPU adapter") {
        return;
    }
    assert!(o.status.success(), "{log}");
    assert!(log.contains("--- sample ---"), "{log}");
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        assert!(out.join(f).is_file(), "{f} missing: {log}");
    }
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["model_type"], "qwen2", "{config}");
    assert_eq!(config["tie_word_embeddings"], true, "{config}");
    let o = bin()
        .args(["score", "--checkpoint"])
        .arg(&out)
        .arg("--data")
        .arg(asset("qwen2-tiny/score.txt"))
        .output()
        .unwrap();
    assert!(o.status.success(), "score: {}", text(&o));
    let o = bin()
        .args(["sample", "--checkpoint"])
        .arg(&out)
        .args(["--prompt", "hello", "--greedy", "--max-new-tokens", "4"])
        .output()
        .unwrap();
    assert!(o.status.success(), "sample: {}", text(&o));
}

#[test]
fn gpt2_model_flags_with_a_llama_checkpoint_are_refused() {
    let dir = scratch("llama-train", "flags");
    let data = pattern_bin(&dir, 3000, 83);
    for (flag, value) in [("--n-layer", Some("3")), ("--no-bias", None)] {
        let mut c = bin();
        c.args(["train", "--init"])
            .arg(asset("llama-tiny"))
            .arg("--data")
            .arg(&data)
            .arg("--out")
            .arg(dir.join("out"))
            .arg(flag);
        if let Some(v) = value {
            c.arg(v);
        }
        let o = c.output().unwrap();
        let log = text(&o);
        assert_eq!(o.status.code(), Some(1), "{log}");
        assert!(log.contains(flag) && log.contains("Llama-family"), "{log}");
        assert!(!log.contains("panicked"), "{log}");
    }
}

#[test]
fn data_beyond_the_llama_vocabulary_is_refused() {
    let dir = scratch("llama-train", "vocab");
    let data = pattern_bin(&dir, 3000, 90);
    let o = bin()
        .args(["train", "--init"])
        .arg(asset("llama-tiny"))
        .arg("--data")
        .arg(&data)
        .arg("--out")
        .arg(dir.join("out"))
        .output()
        .unwrap();
    let log = text(&o);
    assert_eq!(o.status.code(), Some(1), "{log}");
    assert!(
        log.contains("data.bin") && log.contains("vocabulary of 83"),
        "{log}"
    );
    assert!(!dir.join("out/model.safetensors").exists(), "{log}");
}

/// `--resume` takes a Llama-family run's checkpoint only: a directory as transformers saved it
/// has no trainer state, one without optimizer.safetensors no moments; each is named.
#[test]
fn resume_refuses_a_llama_directory_that_is_not_a_training_checkpoint() {
    let dir = scratch("llama-train", "resume-refused");
    let o = bin()
        .arg("train")
        .arg("--resume")
        .arg(asset("llama-tiny"))
        .output()
        .unwrap();
    let log = text(&o);
    assert_eq!(o.status.code(), Some(1), "{log}");
    assert!(
        log.contains("llama-tiny") && log.contains("no trainer_state.json"),
        "{log}"
    );

    let data = pattern_bin(&dir, 3000, 83);
    let out = dir.join("out");
    let train = |how: &str, dir: &Path| {
        bin()
            .args(["train", how])
            .arg(dir)
            .arg("--data")
            .arg(&data)
            .args(["--max-iters", "1", "--batch-size", "2", "--block-size", "8"])
            .args(["--eval-iters", "1", "--out"])
            .arg(&out)
            .output()
            .unwrap()
    };
    let o = train("--init", &asset("llama-tiny"));
    if text(&o).contains("no GPU adapter") {
        return;
    }
    assert!(o.status.success(), "{}", text(&o));
    std::fs::remove_file(out.join("optimizer.safetensors")).unwrap();
    let o = train("--resume", &out);
    let log = text(&o);
    assert_eq!(o.status.code(), Some(1), "{log}");
    assert!(
        log.contains(&out.display().to_string()) && log.contains("no optimizer.safetensors"),
        "{log}"
    );
    assert!(!log.contains("panicked"), "{log}");
}

/// A short text a small model learns quickly: one sentence, repeated.
fn sentence_text(dir: &Path) -> PathBuf {
    let path = dir.join("text.txt");
    std::fs::write(
        &path,
        "the quick brown fox jumps over the lazy dog.\n".repeat(120),
    )
    .unwrap();
    path
}

/// `train --arch llama` from scratch: 2 layers, n_embd 32, 4 heads over 2 key/value heads.
fn fresh_config(data: &Path, out: &Path, max_iters: u64) -> TrainConfig {
    TrainConfig {
        init: None,
        n_layer: 2,
        n_head: 4,
        n_embd: 32,
        block_size: 16,
        llama: Some(FreshLlama {
            n_kv_head: 2,
            intermediate: FreshLlama::default_intermediate(32),
            rope_theta: 10000.0,
        }),
        ..config(data, out, max_iters)
    }
}

#[test]
fn default_intermediate_size_is_the_multiple_of_64_nearest_8_thirds_of_n_embd() {
    // SmolLM2-135M: hidden 576, intermediate 1536 = 8/3 · 576.
    assert_eq!(FreshLlama::default_intermediate(576), 1536);
    assert_eq!(FreshLlama::default_intermediate(32), 64);
    assert_eq!(FreshLlama::default_intermediate(128), 320); // 341.3 -> 320
    assert_eq!(FreshLlama::default_intermediate(4096), 10944); // 10922.7 -> 10944
}

#[test]
fn fresh_llama_learns_and_its_checkpoint_samples() {
    let dir = scratch("llama-train", "fresh");
    let data = sentence_text(&dir);
    let out = dir.join("out");
    let metrics = dir.join("metrics.jsonl");
    let o = bin()
        .args(["train", "--arch", "llama", "--data"])
        .arg(&data)
        .arg("--out")
        .arg(&out)
        .arg("--metrics")
        .arg(&metrics)
        .args(["--n-layer", "2", "--n-head", "4", "--n-embd", "32"])
        .args(["--n-kv-head", "2", "--rope-theta", "50000"])
        .args([
            "--block-size",
            "16",
            "--batch-size",
            "2",
            "--max-iters",
            "20",
        ])
        .args(["--lr", "1e-2", "--warmup-iters", "0", "--log-interval", "1"])
        .args(["--eval-interval", "20", "--eval-iters", "2"])
        .args(["--sample-tokens", "8"])
        .output()
        .unwrap();
    let log = text(&o);
    if log.contains("no GPU adapter") {
        return;
    }
    assert!(o.status.success(), "{log}");
    assert!(log.contains("--- sample ---"), "{log}");
    let l = losses(&metrics);
    let (first, last) = (l.first().unwrap().1, l.last().unwrap().1);
    // 29 characters: a uniform guess is ln 29 = 3.37.
    assert!(
        (first - 29f64.ln()).abs() < 0.3,
        "first loss {first}: {l:?}"
    );
    assert!(last < first - 1.0, "loss {first} -> {last}: {l:?}");
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
    for (key, want) in [
        ("model_type", serde_json::json!("llama")),
        ("num_hidden_layers", 2.into()),
        ("hidden_size", 32.into()),
        ("num_attention_heads", 4.into()),
        ("num_key_value_heads", 2.into()),
        ("intermediate_size", 64.into()),
        ("max_position_embeddings", 16.into()),
        ("vocab_size", 29.into()),
        ("rms_norm_eps", 1e-5.into()),
        ("tie_word_embeddings", true.into()),
        ("initializer_range", 0.02.into()),
    ] {
        assert_eq!(config[key], want, "{key}: {config}");
    }
    let theta = config["rope_parameters"]["rope_theta"]
        .as_f64()
        .or(config["rope_theta"].as_f64());
    assert_eq!(theta, Some(50000.0), "{config}");
    for f in ["model.safetensors", "generation_config.json", "vocab.json"] {
        assert!(out.join(f).is_file(), "{f} missing: {log}");
    }
    let o = bin()
        .args(["sample", "--checkpoint"])
        .arg(&out)
        .args(["--prompt", "the ", "--greedy", "--max-new-tokens", "6"])
        .output()
        .unwrap();
    assert!(o.status.success(), "sample: {}", text(&o));
    let o = bin()
        .args(["score", "--checkpoint"])
        .arg(&out)
        .arg("--data")
        .arg(&data)
        .output()
        .unwrap();
    assert!(o.status.success(), "score: {}", text(&o));
}

#[test]
fn fresh_llama_weights_start_as_transformers_draws_them() {
    let Some(gpu) = test_gpu() else { return };
    let dir = scratch("llama-train", "fresh-init");
    let data = sentence_text(&dir);
    // One step at a rate too small to move a weight by a visible amount.
    let mut cfg = fresh_config(&data, &dir.join("out"), 1);
    cfg.schedule.lr = 1e-9;
    cfg.schedule.min_lr = 1e-9;
    train::train(gpu, &cfg).unwrap();
    let ck = hf_weights::load(&dir.join("out")).unwrap();
    let (mut linear, mut norms) = (Vec::new(), 0);
    for (spec, values) in ck.table.specs.iter().zip(&ck.params) {
        if spec.name.ends_with("norm.weight") {
            assert!(values.iter().all(|&x| x == 1.0), "{} is not 1", spec.name);
            norms += 1;
        } else {
            assert_eq!(spec.shape.len(), 2, "{}: a bias?", spec.name);
            linear.extend(values.iter().map(|&x| x as f64));
        }
    }
    assert_eq!(norms, 2 * 2 + 1, "two per layer and the final one");
    let n = linear.len() as f64;
    let mean = linear.iter().sum::<f64>() / n;
    let std = (linear.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n).sqrt();
    assert!(mean.abs() < 1e-3, "mean {mean} of {n} weights");
    assert!((std - 0.02).abs() < 0.001, "std {std} of {n} weights");
}

#[test]
fn resume_of_a_fresh_llama_run_continues_bit_for_bit() {
    let Some(gpu) = test_gpu() else { return };
    let dir = scratch("llama-train", "fresh-resume");
    let data = sentence_text(&dir);
    train::train(gpu, &fresh_config(&data, &dir.join("straight"), 10)).unwrap();
    let mut first = fresh_config(&data, &dir.join("split"), 5);
    first.schedule.lr_decay_iters = 10;
    train::train(gpu, &first).unwrap();
    // Into another directory: the vocabulary must travel with the run.
    let rest = TrainConfig {
        resume: Some(dir.join("split")),
        out: dir.join("resumed"),
        llama: None,
        max_iters: 10,
        eval_interval: 10,
        ..first.clone()
    };
    train::train(gpu, &rest).unwrap();
    for file in ["model.safetensors", "optimizer.safetensors", "vocab.json"] {
        let a = std::fs::read(dir.join("straight").join(file)).unwrap();
        let b = std::fs::read(dir.join("resumed").join(file))
            .unwrap_or_else(|e| panic!("{file} of the resumed run: {e}"));
        assert!(a == b, "{file} differs after resuming");
    }
}

#[test]
fn fresh_llama_validates_against_the_cpu_reference() {
    let Some(gpu) = test_gpu() else { return };
    let dir = scratch("llama-train", "fresh-validate");
    let data = sentence_text(&dir);
    let cfg = TrainConfig {
        validate: true,
        ..fresh_config(&data, &dir.join("out"), 1)
    };
    train::train(gpu, &cfg).expect("--validate of a fresh Llama model");
}

#[test]
fn arch_flags_of_the_other_architecture_are_refused_by_name() {
    let dir = scratch("llama-train", "arch-flags");
    let data = sentence_text(&dir);
    let llama_tiny = asset("llama-tiny");
    let llama_tiny = llama_tiny.to_str().unwrap();
    let cases: [(&[&str], &str, &str); 7] = [
        (&["--n-kv-head", "2"], "--n-kv-head", "--arch llama"),
        (
            &["--arch", "gpt2", "--rope-theta", "5e5"],
            "--rope-theta",
            "--arch llama",
        ),
        (
            &["--intermediate-size", "64"],
            "--intermediate-size",
            "--arch llama",
        ),
        (
            &["--arch", "llama", "--no-bias"],
            "--no-bias",
            "--arch gpt2",
        ),
        (
            &["--arch", "llama", "--init", llama_tiny],
            "--arch",
            "--init",
        ),
        (
            &["--n-kv-head", "1", "--init", llama_tiny],
            "--n-kv-head",
            "--init",
        ),
        (
            &["--arch", "llama", "--n-head", "4", "--n-kv-head", "3"],
            "--n-kv-head",
            "--n-head",
        ),
    ];
    for (args, flag, also) in cases {
        // One step: a run that wrongly starts ends soon, and fails the test.
        let o = bin()
            .args(["train", "--max-iters", "1", "--data"])
            .arg(&data)
            .arg("--out")
            .arg(dir.join("out"))
            .args(args)
            .output()
            .unwrap();
        let log = text(&o);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {log}");
        assert!(log.contains(flag) && log.contains(also), "{args:?}: {log}");
        assert!(!log.contains("panicked"), "{log}");
    }
    let o = bin()
        .args([
            "train", "--arch", "llama", "--n-embd", "30", "--n-head", "4",
        ])
        .arg("--out")
        .arg(dir.join("out"))
        .output()
        .unwrap();
    let log = text(&o);
    assert_eq!(o.status.code(), Some(1), "{log}");
    assert!(
        log.contains("--n-embd") && log.contains("--n-head"),
        "{log}"
    );
    assert!(!dir.join("out").exists(), "an error left a checkpoint");
}
