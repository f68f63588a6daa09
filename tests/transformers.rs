//! A checkpoint written by `train` loads in transformers' GPT2LMHeadModel and gives the same
//! logits. Runs when a Python with torch and transformers is available: the one named by
//! SHADERFORMER_PYTHON, else `python3` if it imports transformers; skips (saying so) otherwise.

use std::path::PathBuf;
use std::process::Command;

use shaderformer::gpu::{DType, test_gpu};
use shaderformer::infer::Engine;
use shaderformer::train::schedule::{LrSchedule, Schedule};
use shaderformer::train::{self, TrainConfig, checkpoint};

fn python() -> Option<String> {
    let candidate = std::env::var("SHADERFORMER_PYTHON").unwrap_or_else(|_| "python3".into());
    let ok = Command::new(&candidate)
        .args(["-c", "import torch, transformers"])
        .output()
        .is_ok_and(|o| o.status.success());
    ok.then_some(candidate)
}

const CHECK: &str = r#"
import json, sys
import torch
from transformers import GPT2LMHeadModel
d = json.load(open(sys.argv[2]))
model = GPT2LMHeadModel.from_pretrained(sys.argv[1]).eval()
with torch.no_grad():
    logits = model(torch.tensor([d["ids"]])).logits[0, -1]
want = torch.tensor(d["logits"])
err = (logits - want).abs().max().item()
print(f"max abs difference {err:.3e}")
sys.exit(0 if err < 1e-4 else 1)
"#;

#[test]
fn a_trained_checkpoint_loads_in_transformers_with_the_same_logits() {
    let Some(gpu) = test_gpu() else { return };
    let Some(py) = python() else {
        eprintln!("skipping: no Python with torch and transformers (set SHADERFORMER_PYTHON)");
        return;
    };
    let dir = std::env::temp_dir().join(format!("shaderformer-hf-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let out: PathBuf = dir.join("ckpt");
    let cfg = TrainConfig {
        out: out.clone(),
        n_layer: 2,
        n_head: 3,
        n_embd: 48,
        block_size: 24,
        batch_size: 4,
        max_iters: 5,
        schedule: LrSchedule {
            kind: Schedule::Constant,
            lr: 1e-2,
            min_lr: 1e-2,
            warmup_iters: 0,
            lr_decay_iters: 5,
        },
        eval_interval: 0,
        eval_iters: 1,
        verbose: false,
        ..TrainConfig::default()
    };
    train::train(gpu, &cfg).unwrap();
    let ck = checkpoint::load(&out).unwrap();
    let ids: Vec<u32> = (0..20)
        .map(|i| (i * 7 % ck.cfg.vocab_size) as u32)
        .collect();
    let mut engine = Engine::new(gpu, &ck.cfg, &ck.params, DType::F32, 1).unwrap();
    let logits = engine.feed(&ids, ids.len()).unwrap().remove(0);
    let data = dir.join("logits.json");
    std::fs::write(
        &data,
        serde_json::json!({"ids": ids, "logits": logits}).to_string(),
    )
    .unwrap();
    let o = Command::new(&py)
        .args(["-c", CHECK, out.to_str().unwrap(), data.to_str().unwrap()])
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    eprintln!("{text}");
    assert!(o.status.success(), "transformers disagrees:\n{text}");
    let _ = std::fs::remove_dir_all(&dir);
}
