//! Files: Hugging Face GPT-2 checkpoints (config.json + model.safetensors) and token files.

pub mod files;
pub mod hf;
pub mod tokens;
pub mod vocab;
