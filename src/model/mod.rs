//! The GPT-2 model: configuration, parameter table, and the forward graph.

pub mod config;
pub mod gpt;
pub mod params;

pub use config::GptConfig;
pub use params::ParamTable;
