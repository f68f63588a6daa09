//! shaderformer: a GPT engine whose every tensor operation is a hand-written WGSL compute shader.
//!
//! Layers, from the bottom: `gpu` (device, buffers, pipelines, profiler), `kernels` (one launcher
//! module per shader file), `reference` (the plain-Rust specification of every kernel).

pub mod bench;
pub mod dist;
pub mod error;
pub mod gpu;
pub mod graph;
pub mod hash;
pub mod infer;
pub mod io;
pub mod kernels;
pub mod memory;
pub mod model;
pub mod plot;
pub mod reference;
pub mod rng;
pub mod sizes;
pub mod suite;
pub mod train;

pub use error::{Error, Result};
