//! LoRA fine-tuning through `train`: an adapter written in peft's layout, continued bit for bit
//! by `--resume`, the base's files never written, `sample`/`score --lora` equal to the merged
//! checkpoint, merged weights equal to peft's model, and adapters we cannot run refused by name.

mod common;

use std::path::{Path, PathBuf};

use common::fixture::Fixture;
use common::{bin, scratch, text};
use shaderformer::gpu::test_gpu;
use shaderformer::graph::{ExecOptions, Executor, MicroBatch, ParamStore};
use shaderformer::io::{hf, hf_weights};
use shaderformer::model::ParamTable;
use shaderformer::model::gpt::{self, Mode};
use shaderformer::model::llama;
use shaderformer::model::lora::AdapterFiles;
use shaderformer::model::lora::LoraConfig;
use shaderformer::reference::compare;
use shaderformer::train::adapter::{self, LoraFlags};
use shaderformer::train::data::LoaderKind;
use shaderformer::train::schedule::Schedule;
use shaderformer::train::{self, TrainConfig, checkpoint};

fn asset(name: &str) -> PathBuf {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/assets")).join(name)
}

/// Every file of `dir` with its bytes, in name order.
fn files_of(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().to_string();
            (name, std::fs::read(&p).unwrap())
        })
        .collect();
    v.sort();
    v
}

/// An adapter on every linear layer of GPT-2 (gpt2-bpe, with its BPE tokenizer), with dropout on
/// the model and on the adapter's input, trained on text.
fn config(out: &Path, max_iters: u64) -> TrainConfig {
    let mut cfg = TrainConfig {
        data: Some(asset("gpt2-bpe/score.txt")),
        out: out.to_path_buf(),
        init: Some(asset("gpt2-bpe")),
        batch_size: 2,
        block_size: 16,
        dropout: 0.1,
        max_iters,
        eval_interval: max_iters,
        eval_iters: 2,
        log_interval: 5,
        verbose: false,
        lora: Some(LoraFlags {
            r: Some(4),
            alpha: Some(16.0),
            dropout: Some(0.1),
            targets: Some(vec!["c_attn".into(), "c_proj".into(), "c_fc".into()]),
            from: None,
        }),
        ..TrainConfig::default()
    };
    cfg.schedule.lr = 1e-2;
    cfg.schedule.min_lr = 1e-3;
    cfg.schedule.warmup_iters = 0;
    cfg.schedule.lr_decay_iters = max_iters;
    cfg
}

#[test]
fn a_lora_run_resumes_bit_for_bit_and_never_writes_its_base() {
    let Some(gpu) = test_gpu() else { return };
    let dir = scratch("lora-train", "resume");
    let base_before = files_of(&asset("gpt2-bpe"));
    let straight = config(&dir.join("straight"), 6);
    let summary = train::train(gpu, &straight).unwrap();
    assert!(summary.lora);
    let mut first = config(&dir.join("split"), 3);
    first.schedule.lr_decay_iters = 6;
    train::train(gpu, &first).unwrap();
    let mut rest = first.clone();
    rest.init = None;
    rest.lora = None;
    rest.resume = Some(dir.join("split"));
    rest.max_iters = 6;
    rest.eval_interval = 6;
    train::train(gpu, &rest).unwrap();
    for file in ["adapter_model.safetensors", "optimizer.safetensors"] {
        let a = std::fs::read(dir.join("straight").join(file)).unwrap();
        let b = std::fs::read(dir.join("split").join(file)).unwrap();
        assert!(a == b, "{file} differs after resuming");
    }
    // The checkpoint is the adapter alone: peft's two files, the moments and the state.
    let names: Vec<String> = files_of(&dir.join("straight"))
        .into_iter()
        .map(|f| f.0)
        .collect();
    for want in [
        "adapter_config.json",
        "adapter_model.safetensors",
        "optimizer.safetensors",
        "trainer_state.json",
    ] {
        assert!(names.iter().any(|n| n == want), "{want} missing: {names:?}");
    }
    assert!(!names.iter().any(|n| n == "model.safetensors"), "{names:?}");
    let (cfg, base) = LoraConfig::read(&dir.join("straight")).unwrap();
    assert_eq!((cfg.r, cfg.alpha, cfg.dropout), (4, 16.0, 0.1));
    assert_eq!(
        Path::new(&base.unwrap()),
        std::fs::canonicalize(asset("gpt2-bpe")).unwrap()
    );
    assert!(
        files_of(&asset("gpt2-bpe")) == base_before,
        "the base's files changed"
    );
}

/// `train --init BASE --lora DIR` continues a peft-made adapter as PyTorch + peft continue it
/// (scripts/fixtures_lora.py: the same batches, read from continue.bin as the sequential loader
/// reads them): each step's loss and the adapter written at the end within 1e-4.
#[test]
fn a_peft_adapter_continues_as_peft_continues_it() {
    let Some(gpu) = test_gpu() else { return };
    for base in ["gpt2-tiny", "llama-tiny"] {
        let lora = asset(&format!("{base}-lora"));
        let fx = Fixture::load(&lora.join("continue.safetensors"));
        let dir = scratch("lora-train", &format!("continue-{base}"));
        let steps = fx.num("steps") as u64;
        let mut cfg = TrainConfig {
            data: Some(lora.join("continue.bin")),
            out: dir.join("out"),
            init: Some(asset(base)),
            batch_size: fx.num("batch_size") as usize,
            block_size: fx.num("block_size") as usize,
            dropout: 0.0,
            max_iters: steps,
            eval_interval: steps,
            eval_iters: 1,
            log_interval: 1,
            loader: LoaderKind::Sequential,
            metrics: Some(dir.join("metrics.jsonl")),
            weight_decay: fx.num("weight_decay") as f32,
            beta1: fx.num("beta1") as f32,
            beta2: fx.num("beta2") as f32,
            eps: fx.num("eps") as f32,
            grad_clip: fx.num("grad_clip") as f32,
            verbose: false,
            lora: Some(LoraFlags {
                from: Some(lora.clone()),
                ..LoraFlags::default()
            }),
            ..TrainConfig::default()
        };
        cfg.schedule.kind = Schedule::Constant;
        cfg.schedule.lr = fx.num("lr") as f32;
        train::train(gpu, &cfg).unwrap();
        let losses: Vec<f32> = common::losses(&dir.join("metrics.jsonl"))
            .into_iter()
            .map(|(_, l)| l as f32)
            .collect();
        let c = compare(
            &format!("{base} losses"),
            &losses,
            &fx.f32("losses"),
            1e-4,
            0.0,
        );
        eprintln!("{c}");
        c.assert();
        let written = hf::read_safetensors(&dir.join("out/adapter_model.safetensors")).unwrap();
        let finals = fx.names("final.");
        assert_eq!(written.len(), finals.len(), "{base}: adapter tensors");
        for name in finals {
            let key = &name["final.".len()..];
            let got = &written
                .get(key)
                .unwrap_or_else(|| panic!("{key} not written"))
                .1;
            let c = compare(&format!("{base} {key}"), got, &fx.f32(name), 1e-4, 0.0);
            c.assert();
        }
    }
}

/// The merged weights are peft's model: the fixture's loss from the base with the adapter merged
/// in, through the plain graph.
#[test]
fn merged_adapters_give_peft_losses() {
    let Some(gpu) = test_gpu() else { return };
    let opts = ExecOptions {
        reuse: true,
        grad_accum: 1,
        adamw: TrainConfig::default().adamw(),
        seed: 0,
        shard: Default::default(),
    };
    for base in ["gpt2-tiny", "llama-tiny"] {
        let base_fx = Fixture::load(&asset(base).join("fixture.safetensors"));
        let fx = Fixture::load(&asset(&format!("{base}-lora/fixture.safetensors")));
        let lora_dir = asset(&format!("{base}-lora"));
        let tokens = base_fx.u32("tokens");
        let t = base_fx.num("T") as usize;
        let b = tokens.len() / t;
        let (specs, params, graph) = if base == "gpt2-tiny" {
            let mut ck = checkpoint::load(&asset(base)).unwrap();
            adapter::merge_gpt(&mut ck, AdapterFiles::read(&lora_dir).unwrap()).unwrap();
            let table = ParamTable::new(&ck.cfg);
            let g = gpt::build(&ck.cfg, &table, b, t, Mode::Eval);
            (table.store_specs(), ck.params, g)
        } else {
            let mut ck = hf_weights::load(&asset(base)).unwrap();
            adapter::merge_llama(&mut ck, AdapterFiles::read(&lora_dir).unwrap()).unwrap();
            let g = llama::build(&ck.cfg.arch, &ck.table, b, t, Mode::Eval).unwrap();
            (ck.table.store_specs(), ck.params, g)
        };
        let store = ParamStore::new(gpu, &specs, &params, false).unwrap();
        let mut exec = Executor::new(gpu, graph.graph, &store, opts.clone()).unwrap();
        let batch = MicroBatch {
            tokens: tokens.clone(),
            targets: base_fx.u32("targets"),
        };
        let loss = exec.forward_loss(&batch).unwrap();
        let base_loss = base_fx.f32("loss")[0];
        assert!(
            (loss - base_loss).abs() > 1e-3,
            "{base}: the adapter changes nothing"
        );
        compare(
            &format!("{base} merged loss"),
            &[loss],
            &fx.f32("loss"),
            1e-5,
            0.0,
        )
        .assert();
    }
}

#[test]
fn score_and_sample_with_an_adapter_equal_its_merged_checkpoint() {
    let dir = scratch("lora-train", "cli");
    let out = dir.join("adapter");
    let o = bin()
        .args(["train", "--init"])
        .arg(asset("qwen2-tiny"))
        .arg("--data")
        .arg(asset("qwen2-tiny/score.txt"))
        .arg("--out")
        .arg(&out)
        .args([
            "--max-iters",
            "2",
            "--batch-size",
            "2",
            "--block-size",
            "16",
        ])
        .args(["--eval-iters", "1", "--lr", "1e-2", "--warmup-iters", "0"])
        .args(["--lora-r", "4", "--lora-targets", "q_proj,o_proj,down_proj"])
        .output()
        .unwrap();
    let log = text(&o);
    if log.contains("no GPU adapter") {
        return;
    }
    assert!(o.status.success(), "{log}");
    assert!(
        log.contains("LoRA: r 4, alpha 8") && log.contains("6 layers"),
        "{log}"
    );
    let merged = dir.join("merged");
    let o = bin()
        .args(["merge", "--checkpoint"])
        .arg(asset("qwen2-tiny"))
        .arg("--lora")
        .arg(&out)
        .arg("--out")
        .arg(&merged)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let run = |args: &[&str], lora: Option<&Path>, ck: &Path| {
        let mut c = bin();
        c.args(args).arg("--checkpoint").arg(ck);
        if let Some(l) = lora {
            c.arg("--lora").arg(l);
        }
        let o = c.output().unwrap();
        assert!(o.status.success(), "{}", text(&o));
        String::from_utf8_lossy(&o.stdout).to_string()
    };
    let data = asset("qwen2-tiny/score.txt");
    let score = [
        "score",
        "--json",
        "--block-size",
        "24",
        "--data",
        data.to_str().unwrap(),
    ];
    let loss = |s: String| serde_json::from_str::<serde_json::Value>(&s).unwrap()["loss"].as_f64();
    let adapted = loss(run(&score, Some(&out), &asset("qwen2-tiny")));
    let plain = loss(run(&score, None, &merged));
    let base = loss(run(&score, None, &asset("qwen2-tiny")));
    assert_eq!(adapted, plain);
    assert_ne!(adapted, base, "the adapter changes nothing");
    let sample = [
        "sample",
        "--greedy",
        "--max-new-tokens",
        "12",
        "--prompt",
        "The",
    ];
    assert_eq!(
        run(&sample, Some(&out), &asset("qwen2-tiny")),
        run(&sample, None, &merged)
    );
}

#[test]
fn adapters_and_flags_that_cannot_run_are_refused_by_name() {
    let dir = scratch("lora-train", "refused");
    // An adapter with DoRA: peft's own config, one field changed.
    let dora = dir.join("dora");
    std::fs::create_dir_all(&dora).unwrap();
    let cfg = std::fs::read_to_string(asset("gpt2-tiny-lora/adapter_config.json")).unwrap();
    let cfg = cfg.replace("\"use_dora\": false", "\"use_dora\": true");
    std::fs::write(dora.join("adapter_config.json"), cfg).unwrap();
    let err = LoraConfig::read(&dora).unwrap_err().to_string();
    assert!(
        err.contains("use_dora") && err.contains("adapter_config.json"),
        "{err}"
    );

    let score = |lora: &Path| {
        let o = bin()
            .args(["score", "--checkpoint"])
            .arg(asset("gpt2-bpe"))
            .arg("--data")
            .arg(asset("gpt2-bpe/score.txt"))
            .arg("--lora")
            .arg(lora)
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(1), "{}", text(&o));
        text(&o)
    };
    // gpt2-tiny's adapter on gpt2-bpe: the shapes differ, the tensor is named.
    let log = score(&asset("gpt2-tiny-lora"));
    assert!(
        log.contains("c_attn.lora_A.weight") && log.contains("shape"),
        "{log}"
    );
    // A Llama adapter's targets on GPT-2.
    let log = score(&asset("llama-tiny-lora"));
    assert!(
        log.contains("_proj\" names no linear layer") && log.contains("c_attn, c_fc, c_proj"),
        "{log}"
    );

    let train = |args: &[&str]| {
        let o = bin()
            .arg("train")
            .args(args)
            .arg("--out")
            .arg(dir.join("out"))
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(1), "{}", text(&o));
        text(&o)
    };
    let log = train(&["--lora-r", "4"]);
    assert!(log.contains("--init"), "{log}");
    let base = asset("gpt2-bpe");
    let log = train(&["--init", base.to_str().unwrap(), "--lora-targets", "wte"]);
    assert!(log.contains("\"wte\" names no linear layer"), "{log}");
    let lora = asset("gpt2-tiny-lora");
    let log = train(&[
        "--init",
        base.to_str().unwrap(),
        "--lora",
        lora.to_str().unwrap(),
        "--lora-r",
        "8",
    ]);
    assert!(
        log.contains("--lora-r") && log.contains("fixes its own rank"),
        "{log}"
    );
}

/// The token embedding past a storage binding (the binding size the engine plans for lowered
/// with SHADERFORMER_MAX_BINDING, so that gpt2-bpe's embedding, 71,680 bytes, and qwen2-tiny's
/// tied one, 52,032, are split into row chunks as GPT-2 124M's is on most adapters) trains as
/// the whole one does, fully and with LoRA: the same losses and weights within rounding (not bit
/// for bit: the lm head's input gradient sums over the vocabulary chunk by chunk). A binding too
/// small for a layer's weight, which no op takes split, is refused naming the tensor.
#[test]
fn a_split_embedding_trains_as_the_whole_one() {
    if test_gpu().is_none() {
        return;
    }
    let dir = scratch("lora-train", "split");
    // (base, a binding that splits its embedding but not its logits, its LoRA targets)
    let bases = [
        ("gpt2-bpe", "65536", "c_attn,c_proj,c_fc"),
        ("qwen2-tiny", "40960", "q_proj,v_proj,down_proj"),
    ];
    let run = |base: &str, name: &str, cap: &str, lora: Option<&str>| {
        let out = dir.join(base).join(name);
        let mut c = bin();
        c.env(shaderformer::gpu::ENV_MAX_BINDING, cap)
            .args(["--tune", "off", "train", "--init"])
            .arg(asset(base))
            .arg("--data")
            .arg(asset(base).join("score.txt"))
            .arg("--out")
            .arg(&out)
            .arg("--metrics")
            .arg(out.join("metrics.jsonl"))
            .args([
                "--max-iters",
                "4",
                "--batch-size",
                "2",
                "--block-size",
                "16",
            ])
            // A small learning rate: AdamW turns a rounding difference in a gradient near zero
            // into a step of up to lr, which would measure AdamW rather than the chunks.
            .args(["--lr", "1e-4", "--warmup-iters", "0", "--log-interval", "1"])
            .args(["--eval-iters", "1", "--sample-tokens", "0"]);
        if let Some(targets) = lora {
            c.args([
                "--lora-r",
                "4",
                "--lora-alpha",
                "16",
                "--lora-targets",
                targets,
            ]);
        }
        (c.output().unwrap(), out)
    };
    for (base, cap, targets) in bases {
        for (lora, weights) in [
            (None, "model.safetensors"),
            (Some(targets), "adapter_model.safetensors"),
        ] {
            let tag = format!("{base}, LoRA {}", lora.is_some());
            let (o, whole) = run(base, &format!("whole-{}", lora.is_some()), "", lora);
            assert!(o.status.success(), "{}", text(&o));
            let (o, split) = run(base, &format!("split-{}", lora.is_some()), cap, lora);
            assert!(o.status.success(), "{}", text(&o));
            let losses = |d: &Path| -> Vec<f32> {
                common::losses(&d.join("metrics.jsonl"))
                    .into_iter()
                    .map(|(_, l)| l as f32)
                    .collect()
            };
            let (a, b) = (losses(&whole), losses(&split));
            assert_eq!(a.len(), 4);
            compare(&format!("{tag}: losses"), &b, &a, 1e-5, 0.0).assert();
            let (a, b) = (
                hf::read_safetensors(&whole.join(weights)).unwrap(),
                hf::read_safetensors(&split.join(weights)).unwrap(),
            );
            assert_eq!(a.len(), b.len());
            for (name, (_, w)) in &a {
                compare(&format!("{tag}: {name}"), &b[name].1, w, 1e-5, 0.0).assert();
            }
        }
    }
    let (o, _) = run("gpt2-bpe", "too-small", "8192", None);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        text(&o).contains("h.0.attn.c_attn") && text(&o).contains("8192"),
        "{}",
        text(&o)
    );
}
