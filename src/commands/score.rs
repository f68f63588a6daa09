//! `shaderformer score`: mean cross-entropy and perplexity of a checkpoint on a file.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use shaderformer::error::{Error, Result};
use shaderformer::infer::{self, Engine};
use shaderformer::io::vocab::Vocab;
use shaderformer::train::checkpoint;
use shaderformer::train::data::{self, Contents};

use crate::GpuArgs;
use crate::commands::train::Dtype;

#[derive(Args, Debug)]
pub struct ScoreArgs {
    /// Checkpoint directory (ours, or a Hugging Face GPT-2 directory).
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
}

pub fn score(gpu: &GpuArgs, args: &ScoreArgs) -> Result<ExitCode> {
    let ck = checkpoint::load(&args.checkpoint)?;
    let name = args.data.display().to_string();
    let ids = match data::read_contents(&args.data)? {
        Contents::Tokens(ids) => ids,
        Contents::Text(text) => {
            let vocab = ck.vocab.clone().unwrap_or(Vocab::Ids(ck.cfg.vocab_size));
            vocab.encode(&text, &name)?
        }
    };
    if let Some((pos, id)) = ids
        .iter()
        .enumerate()
        .find(|(_, id)| **id as usize >= ck.cfg.vocab_size)
    {
        return Err(Error::invalid(
            &name,
            format!(
                "token id {id} at position {pos} is outside the model's vocabulary of {}",
                ck.cfg.vocab_size
            ),
        ));
    }
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
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "checkpoint": args.checkpoint.display().to_string(),
                "data": name,
                "adapter": gpu.adapter_name(),
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
    Ok(ExitCode::SUCCESS)
}
