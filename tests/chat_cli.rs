//! `sample --chat` on a GPT-2 checkpoint given a chat template: the prompt the model sees is
//! the rendered template, tokenized; a checkpoint without a template says so.

use std::path::Path;

mod common;
use common::text;
use shaderformer::infer::chat::ChatTemplate;
use shaderformer::io::vocab::Vocab;

/// A short template (gpt2-bpe's context is 64 tokens) using the tokenizer's special token.
const TEMPLATE: &str = "{{ bos_token }}{% for m in messages %}{{ m['role'][0] }}: \
    {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}a:{% endif %}";

/// gpt2-bpe's checkpoint in a scratch directory, with `tokenizer_config` when given.
fn checkpoint(name: &str, tokenizer_config: Option<serde_json::Value>) -> std::path::PathBuf {
    let dir = common::scratch("chat", name);
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/gpt2-bpe");
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(src.join(f), dir.join(f)).unwrap();
    }
    if let Some(cfg) = tokenizer_config {
        std::fs::write(dir.join("tokenizer_config.json"), cfg.to_string()).unwrap();
    }
    dir
}

fn sample(dir: &Path, extra: &[&str]) -> std::process::Output {
    let d = dir.to_str().unwrap();
    let mut args = vec![
        "sample",
        "--checkpoint",
        d,
        "--greedy",
        "--max-new-tokens",
        "3",
    ];
    args.extend_from_slice(extra);
    common::bin().args(&args).output().unwrap()
}

#[test]
fn sample_chat_feeds_the_rendered_template() {
    let dir = checkpoint(
        "template",
        Some(serde_json::json!({
            "chat_template": TEMPLATE,
            "bos_token": {"content": "<|endoftext|>"},
        })),
    );
    let vocab = Vocab::load(&dir).unwrap().unwrap();
    let template = ChatTemplate::load(&dir).unwrap();
    for system in [None, Some("Answer in JSON.")] {
        let mut args = vec!["--chat", "--prompt", "Say hi", "--json"];
        if let Some(s) = system {
            args.extend(["--system", s]);
        }
        let o = sample(&dir, &args);
        assert!(o.status.success(), "{}", text(&o));
        let out: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        let rendered = template.render("Say hi", system).unwrap();
        let system_line = system.map_or(String::new(), |s| format!("s: {s}\n"));
        assert_eq!(rendered, format!("<|endoftext|>{system_line}u: Say hi\na:"));
        let want = vocab.encode(&rendered, "chat").unwrap();
        let got: Vec<u32> = serde_json::from_value(out["prompt_ids"].clone()).unwrap();
        assert_eq!(got, want);
        assert_eq!(out["ids"].as_array().unwrap().len(), 3);
    }
}

#[test]
fn sample_chat_without_a_template_says_so() {
    let dir = checkpoint("none", None);
    let o = sample(&dir, &["--chat", "--prompt", "hi"]);
    assert!(!o.status.success());
    let t = text(&o);
    assert!(
        t.contains("has no chat template") && !t.contains("panicked"),
        "{t}"
    );
    let o = sample(&dir, &["--system", "x", "--prompt", "hi"]);
    assert!(
        !o.status.success() && text(&o).contains("--chat"),
        "{}",
        text(&o)
    );
}
