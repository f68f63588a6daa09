//! `shaderformer merge`: a base checkpoint with a peft LoRA adapter merged into its weights
//! (W + scale · B·A on every adapted layer), written as a plain checkpoint that transformers and
//! every command load without the adapter.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use shaderformer::error::{Error, Result};
use shaderformer::io::files;
use shaderformer::io::{hf_llama, hf_weights};
use shaderformer::model::lora::AdapterFiles;
use shaderformer::train::model::read_llama_copied;
use shaderformer::train::{adapter, checkpoint};

#[derive(Args, Debug)]
pub struct MergeArgs {
    /// The base checkpoint directory (GPT-2 or the Llama family).
    #[arg(long)]
    checkpoint: PathBuf,
    /// The peft LoRA adapter directory (adapter_config.json, adapter_model.safetensors).
    #[arg(long)]
    lora: PathBuf,
    /// The merged checkpoint's directory.
    #[arg(long)]
    out: PathBuf,
}

pub fn merge(args: &MergeArgs) -> Result<ExitCode> {
    for input in [&args.checkpoint, &args.lora] {
        if files::same_file(&args.out, input) {
            return Err(Error::invalid(
                "--out",
                format!(
                    "{} is an input of this merge; writing the merged model there would \
                     destroy it",
                    input.display()
                ),
            ));
        }
    }
    if args.out.exists() && !args.out.is_dir() {
        return Err(Error::invalid(
            "--out",
            format!(
                "{} is a file; it names a checkpoint directory",
                args.out.display()
            ),
        ));
    }
    let cfg = if hf_llama::is_llama_checkpoint(&args.checkpoint) {
        let mut ck = hf_weights::load(&args.checkpoint)?;
        let cfg = adapter::merge_llama(&mut ck, AdapterFiles::read(&args.lora)?)?;
        hf_weights::save(&args.out, &ck.cfg, &ck.table, &ck.params, None)?;
        // The tokenizer travels with the weights.
        let copied: Vec<(String, Vec<u8>)> = read_llama_copied(&args.checkpoint)?
            .into_iter()
            .filter(|(n, _)| n != hf_weights::GENERATION_FILE)
            .collect();
        hf_weights::write_atomically(&args.out, &copied)?;
        cfg
    } else {
        let mut ck = checkpoint::load(&args.checkpoint)?;
        let cfg = adapter::merge_gpt(&mut ck, AdapterFiles::read(&args.lora)?)?;
        ck.optimizer = None;
        ck.state = None;
        checkpoint::save(&args.out, &ck)?;
        cfg
    };
    println!(
        "merged {} (LoRA r {}, alpha {} on {}) into {}: {}",
        args.lora.display(),
        cfg.r,
        cfg.alpha,
        cfg.targets.join(", "),
        args.checkpoint.display(),
        args.out.display()
    );
    Ok(ExitCode::SUCCESS)
}
