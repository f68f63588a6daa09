//! `shaderformer score`: mean cross-entropy and perplexity of a checkpoint on a file.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use shaderformer::error::{Error, Result};
use shaderformer::infer::llama::LlamaRunner;
use shaderformer::infer::{self, Engine};
use shaderformer::io::vocab::Vocab;
use shaderformer::io::{hf_llama, hf_weights};
use shaderformer::model::lora::AdapterFiles;
use shaderformer::train::data::{self, Contents};
use shaderformer::train::{adapter, checkpoint};

use crate::GpuArgs;
use crate::commands::train::Dtype;

#[derive(Args, Debug)]
pub struct ScoreArgs {
    /// Checkpoint directory (ours, a Hugging Face GPT-2 directory, or a Llama-family one).
    #[arg(long)]
    checkpoint: PathBuf,
    /// Text (encoded with the checkpoint's tokenizer) or a token file (llm.c format or .bin).
    #[arg(long)]
    data: PathBuf,
    /// Window length T: windows of T+1 tokens start at 0, T, 2T, ... (default: the context).
    #[arg(long)]
    block_size: Option<usize>,
    #[arg(long, value_enum, default_value = "f32")]
    dtype: Dtype,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
    /// A peft LoRA adapter directory to apply to the checkpoint (merged into its weights).
    #[arg(long)]
    lora: Option<PathBuf>,
}

pub fn score(gpu: &GpuArgs, args: &ScoreArgs) -> Result<ExitCode> {
    if hf_llama::is_llama_checkpoint(&args.checkpoint) {
        return score_llama(gpu, args);
    }
    let mut ck = checkpoint::load(&args.checkpoint)?;
    if let Some(dir) = &args.lora {
        adapter::merge_gpt(&mut ck, AdapterFiles::read(dir)?)?;
    }
    let vocab = ck.vocab.clone().unwrap_or(Vocab::Ids(ck.cfg.vocab_size));
    let ids = read_ids(args, &vocab, ck.cfg.vocab_size)?;
    let t = args.block_size.unwrap_or(ck.cfg.block_size);
    let gpu = gpu.open()?;
    let mut engine = Engine::new(&gpu, &ck.cfg, &ck.params, args.dtype.gpu(), 1)?;
    let bar = (!args.json && std::io::stderr().is_terminal()).then(|| {
        let pb = indicatif::ProgressBar::new(0);
        pb.set_style(
            indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} windows [{eta}]")
                .expect("progress template"),
        );
        pb
    });
    let s = infer::score(&mut engine, &ids, t, |done, total| {
        if let Some(pb) = &bar {
            pb.set_length(total as u64);
            pb.set_position(done as u64);
        }
    })?;
    if let Some(pb) = bar {
        pb.finish_and_clear();
    }
    report(args, &gpu.adapter_name(), t, s);
    Ok(ExitCode::SUCCESS)
}

/// `score` on a Llama-family checkpoint (config.json, model.safetensors, and tokenizer.json for
/// text), with weights in `--dtype`, each window one forward pass.
fn score_llama(gpu: &GpuArgs, args: &ScoreArgs) -> Result<ExitCode> {
    let mut ck = hf_weights::load(&args.checkpoint)?;
    if let Some(dir) = &args.lora {
        adapter::merge_llama(&mut ck, AdapterFiles::read(dir)?)?;
    }
    let v = ck.cfg.arch.vocab;
    let vocab = Vocab::load(&args.checkpoint)?.unwrap_or(Vocab::Ids(v));
    let ids = read_ids(args, &vocab, v)?;
    let t = args.block_size.unwrap_or(ck.cfg.arch.context);
    let gpu = gpu.open()?;
    let mut runner = LlamaRunner::new(&gpu, &ck, args.dtype.gpu())?;
    let s = infer::llama::score(&mut runner, &ids, t)?;
    report(args, &gpu.adapter_name(), t, s);
    Ok(ExitCode::SUCCESS)
}

/// The tokens of --data (a token file, or text encoded with `vocab`), each below `vocab_size`.
fn read_ids(args: &ScoreArgs, vocab: &Vocab, vocab_size: usize) -> Result<Vec<u32>> {
    let name = args.data.display().to_string();
    let ids = match data::read_contents(&args.data)? {
        Contents::Tokens(ids) => ids,
        Contents::Text(text) => vocab.encode(&text, &name)?,
    };
    if let Some((pos, id)) = ids
        .iter()
        .enumerate()
        .find(|(_, id)| **id as usize >= vocab_size)
    {
        return Err(Error::invalid(
            &name,
            format!(
                "token id {id} at position {pos} is outside the model's vocabulary of {vocab_size}"
            ),
        ));
    }
    Ok(ids)
}

/// Prints the score, as text or one JSON object.
fn report(args: &ScoreArgs, adapter: &str, t: usize, s: infer::Score) {
    let name = args.data.display().to_string();
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "checkpoint": args.checkpoint.display().to_string(),
                "lora": args.lora.as_ref().map(|d| d.display().to_string()),
                "data": name,
                "adapter": adapter,
                "block_size": t,
                "windows": s.windows,
                "tokens": s.tokens,
                "loss": s.loss(),
                "perplexity": s.perplexity(),
            })
        );
    } else {
        println!(
            "{name}: mean cross-entropy {:.6} nats/token, perplexity {:.4} ({} predicted tokens, {} windows of {t})",
            s.loss(),
            s.perplexity(),
            s.tokens,
            s.windows
        );
    }
}
