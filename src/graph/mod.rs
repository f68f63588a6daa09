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

/// The memory-saving rewrites of a training graph, in the order they compose: recomputation
/// first (it copies forward nodes into the backward), then the storage of what stays saved
/// between the passes (whose widened copies the recomputed nodes then read).
pub fn save_memory(g: &mut Graph, recompute: recompute::Recompute, saved: saved::ActivationDtype) {
    recompute.apply(g);
    saved.apply(g);
}

pub use executor::{ExecOptions, Executor, GradientSync, MicroBatch, NodeCheck, Shard, StepResult};
pub use ir::{Graph, Input, Op, Phase, StepOutput, TensorId, TensorKind};
pub use store::ParamStore;
