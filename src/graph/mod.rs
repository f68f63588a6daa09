//! The graph: IR of typed ops over statically shaped tensors, automatic differentiation, the
//! memory planner and the executor that records whole training steps.

pub mod autodiff;
pub mod executor;
pub mod ir;
pub mod planner;
pub mod recompute;
pub mod saved;
pub mod store;
pub mod validate;

pub use executor::{ExecOptions, Executor, GradientSync, MicroBatch, NodeCheck, Shard, StepResult};
pub use ir::{Graph, Input, Op, Phase, StepOutput, TensorId, TensorKind};
pub use store::ParamStore;
