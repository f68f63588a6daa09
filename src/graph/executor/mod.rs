//! The executor: binds every node of a graph to GPU memory once, creates all its dispatches once,
//! then records a whole training step (zeroing, every micro-step's forward and backward, gradient
//! norm, AdamW) into one command buffer, submitted once per step. Step results (losses, gradient
//! norm) come back through a ring of mapped buffers, so the CPU never waits inside a step. A
//! data-parallel step is the exception: it is two submissions around a `GradientSync`, which
//! waits for the backward and sums the gradients across ranks before the update.

mod bindings;
mod check;
mod lower;
mod run;
mod split;
mod step;

use std::collections::HashMap;

use super::ir::{Graph, Phase, TensorId};
use super::planner::{self, Plan};
use super::store::ParamStore;
use crate::error::{Error, Result};
use crate::gpu::{DType, Dispatch, Gpu, View};
use crate::kernels::adamw;
use bindings::{Bindings, Memory, StagedInput, allocate_pool};
use run::{Readback, readback_ring};
use step::StepUniform;

pub use check::NodeCheck;

/// Debug switches and training constants.
#[derive(Clone, Debug)]
pub struct ExecOptions {
    /// Pack activations into reused buffers (off: one buffer per tensor, to rule out aliasing).
    pub reuse: bool,
    /// Micro-steps per optimizer step (gradient accumulation).
    pub grad_accum: usize,
    pub adamw: adamw::Hyper,
    /// Base seed of the dropout streams.
    pub seed: u32,
    /// This process's share of a data-parallel step.
    pub shard: Shard,
}

/// A rank's share of a data-parallel step: `ranks` ranks each run `grad_accum` micro-steps, and
/// the step's gradient is the sum over ranks. Global micro-step g = k·ranks + rank (k the rank's
/// own micro-step) keys the batch and the dropout masks, so N ranks compute what one rank with
/// `grad_accum` · N computes, and the loss scale 1 / (grad_accum · ranks) makes the summed
/// gradient the mean over the global batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shard {
    pub rank: usize,
    pub ranks: usize,
}

impl Default for Shard {
    fn default() -> Self {
        Shard { rank: 0, ranks: 1 }
    }
}

/// The seam between a step's backward and its optimizer update, where data parallelism sums
/// the gradients across ranks (`Executor::step_synced`).
pub trait GradientSync {
    /// Called with this step's gradients complete on the GPU (`grads`: the flat gradient spans)
    /// and this rank's micro-step losses; replaces the gradients with their sum over ranks and
    /// `losses` with every rank's, in global micro-step order.
    fn sync(&mut self, gpu: &Gpu, grads: &[View], losses: &mut Vec<f32>) -> Result<()>;
}

impl Default for ExecOptions {
    fn default() -> Self {
        ExecOptions {
            reuse: true,
            grad_accum: 1,
            adamw: adamw::Hyper {
                beta1: 0.9,
                beta2: 0.95,
                eps: 1e-8,
                weight_decay: 0.1,
                grad_clip: 1.0,
            },
            seed: 1337,
            shard: Shard::default(),
        }
    }
}

/// The token batch of one micro-step: B·T inputs and B·T targets.
#[derive(Clone, Debug, Default)]
pub struct MicroBatch {
    pub tokens: Vec<u32>,
    pub targets: Vec<u32>,
}

/// What one training step produced, read back asynchronously.
#[derive(Clone, Debug)]
pub struct StepResult {
    pub step: u64,
    /// Mean loss of each micro-step's forward (before the update).
    pub losses: Vec<f32>,
    /// Global gradient norm before clipping.
    pub grad_norm: f32,
}

impl StepResult {
    pub fn loss(&self) -> f32 {
        self.losses.iter().sum::<f32>() / self.losses.len() as f32
    }
}

/// A range of dispatches created for one node.
#[derive(Clone, Debug)]
pub struct NodeDispatches {
    pub node: usize,
    pub range: std::ops::Range<usize>,
}

/// A graph bound to memory with all its dispatches created.
pub struct Executor<'a> {
    gpu: &'a Gpu,
    pub graph: Graph,
    pub plan: Plan,
    /// Each tensor's storage: one view, or the row chunks of a split parameter; empty if unused.
    views: Vec<Vec<View>>,
    pool: Vec<wgpu::Buffer>,
    /// Dispatches by phase, in schedule order, with the node each came from.
    pub dispatches: HashMap<Phase, Vec<Dispatch>>,
    pub node_dispatches: HashMap<Phase, Vec<NodeDispatches>>,
    /// Input tensors with their staging buffers holding every micro-step's values.
    inputs: Vec<StagedInput>,
    /// What changes per step, micro-step or decoded token (lr and t, dropout counters, the
    /// decoding position): one uniform every dispatch that reads them binds.
    step_uniform: StepUniform,
    /// Position windows with the position table they are cut from (decoding).
    windows: Vec<(View, View, usize)>,
    loss: Option<TensorId>,
    norm: Option<TensorId>,
    /// Every micro-step's loss, then the gradient norm.
    results: Option<View>,
    ring: Vec<Readback>,
    next_ring: usize,
    /// Results collected while reserving a ring slot, not yet returned by `poll`.
    pending: Vec<StepResult>,
    /// Every rank's losses of the synced steps whose results have not been collected yet.
    synced_losses: Vec<(u64, Vec<f32>)>,
    pub opts: ExecOptions,
}
impl<'a> Executor<'a> {
    /// Plans memory, allocates the pool, and creates every dispatch of `graph`.
    pub fn new(gpu: &'a Gpu, graph: Graph, store: &ParamStore, opts: ExecOptions) -> Result<Self> {
        let plan = planner::plan(&graph, opts.reuse, gpu.max_binding())?;
        let pool = allocate_pool(gpu, &plan)?;
        let accum = opts.grad_accum.max(1);
        let memory = Memory {
            gpu,
            store,
            plan: &plan,
            pool: &pool,
            accum,
        };
        let bound = Bindings::new(&memory, &graph)?;
        let results = match bound.loss {
            Some(_) => Some(gpu.zeros("step_results", DType::F32, accum + 1)?),
            None => None,
        };
        let mut ex = Executor {
            gpu,
            graph,
            plan,
            views: bound.views,
            pool,
            dispatches: HashMap::new(),
            node_dispatches: HashMap::new(),
            inputs: bound.inputs,
            step_uniform: StepUniform::new(gpu, accum)?,
            windows: bound.windows,
            loss: bound.loss,
            norm: bound.norm,
            results,
            ring: Vec::new(),
            next_ring: 0,
            pending: Vec::new(),
            synced_losses: Vec::new(),
            opts,
        };
        ex.create_dispatches()?;
        if let Some(r) = &ex.results {
            ex.ring = readback_ring(gpu, r)?;
        }
        Ok(ex)
    }

    /// The GPU view of a tensor (the first chunk of a split one).
    pub fn view(&self, t: TensorId) -> &View {
        self.views[t]
            .first()
            .unwrap_or_else(|| panic!("tensor {} has no storage", self.graph.tensors[t].name))
    }

    /// Every row chunk of a tensor (one view unless it is a split parameter).
    pub fn chunks(&self, t: TensorId) -> &[View] {
        &self.views[t]
    }

    /// Bytes of GPU memory the executor allocated (pool, inputs, results; not the parameters).
    pub fn pool_bytes(&self) -> u64 {
        self.pool.iter().map(|b| b.size()).sum()
    }

    fn create_dispatches(&mut self) -> Result<()> {
        for ni in 0..self.graph.nodes.len() {
            let node = self.graph.nodes[ni].clone();
            let ds = self.node(&node).map_err(|e| match e {
                Error::Invalid { what, message } => Error::Invalid {
                    what: format!("{} ({})", node.label, what),
                    message,
                },
                other => other,
            })?;
            let list = self.dispatches.entry(node.phase).or_default();
            let start = list.len();
            list.extend(ds);
            let end = list.len();
            self.node_dispatches
                .entry(node.phase)
                .or_default()
                .push(NodeDispatches {
                    node: ni,
                    range: start..end,
                });
        }
        Ok(())
    }

    /// Micro-steps of one optimizer step over all ranks.
    fn micro_per_step(&self) -> usize {
        self.opts.grad_accum.max(1) * self.opts.shard.ranks.max(1)
    }
}
