//! Files: Hugging Face checkpoints (config.json + safetensors: GPT-2, the Llama family), token
//! files and tokenizers.

pub mod files;
pub mod hf;
pub mod hf_llama;
pub mod hf_weights;
pub mod tokens;
pub mod vocab;
