//! The models: the architecture description (GPT-2, the Llama family), GPT-2's configuration,
//! the parameter tables, and the forward graph.

pub mod arch;
pub mod config;
pub mod gpt;
pub mod llama;
pub mod llama_params;
pub mod lora;
pub mod params;
pub mod presets;

pub use arch::Arch;
pub use config::GptConfig;
pub use params::ParamTable;
