//! The executor: binds every node of a graph to GPU memory once, creates all its dispatches once,
//! then records a whole training step (zeroing, every micro-step's forward and backward, gradient
//! norm, AdamW) into one command buffer, submitted once per step. Step results (losses, gradient
//! norm) come back through a ring of mapped buffers, so the CPU never waits inside a step. A
//! data-parallel step is the exception: it is two submissions around a `GradientSync`, which
//! waits for the backward and sums the gradients across ranks before the update.

use std::collections::HashMap;

use super::ir::{Graph, Node, Op, Phase, Tensor, TensorId, TensorKind};
use super::planner::{self, Plan};
use super::store::{self, ParamStore};
use super::validate;
use crate::error::{Error, Result};
use crate::gpu::{DType, Dispatch, Gpu, Signal, View};
use crate::kernels::{
    adamw, attention, cross_entropy, dropout, embedding, gelu, gemm, layernorm, reduce, residual,
};

/// How long a step's result buffer may take to map once the queue is idle: the callback is
/// immediate unless another thread holds it, so waiting longer means the device is gone.
const CALLBACK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

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

struct Readback {
    buffer: wgpu::Buffer,
    step: Option<u64>,
    /// Set by the map callback: whether mapping succeeded.
    ready: Signal<bool>,
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
    inputs: Vec<(TensorId, wgpu::Buffer)>,
    /// Dispatches with dropout (phase, index, byte offset of the step counter in their params)
    /// whose step counter changes every micro-step: dropout's and attention's.
    dropouts: Vec<(Phase, usize, u64)>,
    /// Step counters of every dropout dispatch for every micro-step, copied into the dispatches'
    /// params between micro-steps.
    dropout_steps: Option<wgpu::Buffer>,
    adamw_dispatches: Vec<usize>,
    /// Position windows with the position table they are cut from (decoding).
    windows: Vec<(View, View, usize)>,
    /// Forward dispatches that take the decoding position, with their number of new tokens.
    positioned: Vec<(usize, usize)>,
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

/// Readbacks kept in flight: the CPU runs at most this many steps ahead of the GPU.
const RING: usize = 2;

/// One buffer per slot of the memory plan.
fn allocate_pool(gpu: &Gpu, plan: &Plan) -> Result<Vec<wgpu::Buffer>> {
    let mut pool = Vec::new();
    for (i, &bytes) in plan.slots.iter().enumerate() {
        pool.push(gpu.create_storage(&format!("pool.{i}"), bytes)?);
    }
    Ok(pool)
}

/// The `RING` mapped buffers that step results (`results`) are copied into for reading back.
fn readback_ring(gpu: &Gpu, results: &View) -> Result<Vec<Readback>> {
    let mut ring = Vec::new();
    for i in 0..RING {
        let buffer = gpu.scoped("readback", results.bytes(), || {
            gpu.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(&format!("step_results.readback.{i}")),
                size: results.bytes(),
                usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            })
        })?;
        ring.push(Readback {
            buffer,
            step: None,
            ready: Signal::new(),
        });
    }
    Ok(ring)
}

/// Where a graph's tensors find their storage: the parameter store, the planned pool, or
/// buffers of their own; `accum` micro-steps of input values are staged at once.
struct Memory<'m> {
    gpu: &'m Gpu,
    store: &'m ParamStore,
    plan: &'m Plan,
    pool: &'m [wgpu::Buffer],
    accum: usize,
}

/// Every tensor bound to storage, and the tensors the executor handles by role.
struct Bindings {
    /// Each tensor's storage, as `Executor::views`.
    views: Vec<Vec<View>>,
    inputs: Vec<(TensorId, wgpu::Buffer)>,
    windows: Vec<(View, View, usize)>,
    loss: Option<TensorId>,
    norm: Option<TensorId>,
}

impl Bindings {
    fn new(mem: &Memory, graph: &Graph) -> Result<Bindings> {
        let mut b = Bindings {
            views: vec![Vec::new(); graph.tensors.len()],
            inputs: Vec::new(),
            windows: Vec::new(),
            loss: None,
            norm: None,
        };
        for (id, t) in graph.tensors.iter().enumerate() {
            b.views[id] = b.bind(mem, id, t)?;
        }
        Ok(b)
    }

    /// The storage of tensor `id`: the store's chunks for parameters, gradients and moments; one
    /// view otherwise; none for a planned tensor no micro-step node uses.
    fn bind(&mut self, mem: &Memory, id: TensorId, t: &Tensor) -> Result<Vec<View>> {
        let (gpu, store) = (mem.gpu, mem.store);
        let own = |name: &str| gpu.zeros(name, t.dtype, t.numel());
        let view = match t.kind {
            TensorKind::Param(i) => return Ok(store.params[i].clone()),
            TensorKind::ParamGrad(i) => return Ok(store.grads[i].clone()),
            TensorKind::AdamM(i) => return Ok(store.m[i].clone()),
            TensorKind::AdamV(i) => return Ok(store.v[i].clone()),
            TensorKind::KvCache { layer, value } => {
                let cache = store.kv.get(layer).ok_or_else(|| {
                    Error::invalid("decode", "no KV cache was allocated for this model")
                })?;
                cache[value as usize].clone()
            }
            TensorKind::PositionWindow(p) => self.position_window(mem, t, p)?,
            TensorKind::Input => {
                let v = own(&t.name)?;
                let staging = gpu
                    .create_storage(&format!("{}.staging", t.name), v.bytes() * mem.accum as u64)?;
                self.inputs.push((id, staging));
                v
            }
            TensorKind::Constant(bits) => {
                let v = own(&t.name)?;
                gpu.write(&v, &vec![f32::from_bits(bits); t.numel()])?;
                v
            }
            TensorKind::Result => {
                if t.name == "loss" {
                    self.loss = Some(id);
                } else if t.name == "grad_norm" {
                    self.norm = Some(id);
                }
                own(&t.name)?
            }
            TensorKind::Activation | TensorKind::Gradient => match mem.plan.slot_of[id] {
                Some(slot) => View {
                    buffer: mem.pool[slot].clone(),
                    offset: 0,
                    len: t.numel(),
                    dtype: t.dtype,
                    name: t.name.as_str().into(),
                },
                None => return Ok(Vec::new()), // never used by a micro-step node
            },
        };
        Ok(vec![view])
    }

    /// A buffer of its own for the position window `t`, filled from the whole position table
    /// (parameter `p`) before each call.
    fn position_window(&mut self, mem: &Memory, t: &Tensor, p: usize) -> Result<View> {
        let table = mem.store.params[p].as_slice();
        if table.len() != 1 {
            return Err(Error::invalid(
                &t.name,
                "the position table is split into chunks; decoding needs it whole",
            ));
        }
        let (rows, cols) = (t.shape[0], t.shape[1]);
        let dtype = table[0].dtype;
        // Buffer copies move whole 4-byte words.
        if !(cols as u64 * dtype.size()).is_multiple_of(4) {
            return Err(Error::invalid(
                &t.name,
                format!("rows of {cols} {} values are not whole words", dtype.name()),
            ));
        }
        let v = mem.gpu.zeros(&t.name, dtype, rows * cols)?;
        self.windows.push((v.clone(), table[0].clone(), cols));
        Ok(v)
    }
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
            dropouts: Vec::new(),
            dropout_steps: None,
            adamw_dispatches: Vec::new(),
            windows: bound.windows,
            positioned: Vec::new(),
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
        if !ex.dropouts.is_empty() {
            let bytes = (ex.dropouts.len() * accum * 4) as u64;
            ex.dropout_steps = Some(gpu.create_storage("dropout_steps", bytes)?);
        }
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
            match node.op {
                Op::Dropout { .. } | Op::DropoutBackward { .. } => {
                    self.dropouts
                        .push((node.phase, start, dropout::STEP_OFFSET));
                }
                Op::Attention { p, .. } | Op::AttentionBackward { p, .. } if p > 0.0 => {
                    let at = attention::DROPOUT_STEP_OFFSET;
                    let held = ds
                        .iter()
                        .enumerate()
                        .filter(|d| attention::has_dropout_step(d.1));
                    self.dropouts
                        .extend(held.map(|(d, _)| (node.phase, start + d, at)));
                }
                _ => {}
            }
            list.extend(ds);
            let end = list.len();
            if let Op::AdamW { .. } = node.op {
                self.adamw_dispatches.extend(start..end);
            }
            if let Op::AttentionCached { tq, .. } | Op::KvAppend { tq, .. } = node.op {
                self.positioned.extend((start..end).map(|d| (d, tq)));
            }
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

    /// The dispatches of one node: its operands checked, then lowered by its op's function.
    fn node(&self, node: &Node) -> Result<Vec<Dispatch>> {
        self.check_splits(node)?;
        let x = Lowering { ex: self, node };
        let one = |d: Result<Dispatch>| d.map(|d| vec![d]);
        let (gpu, i, o) = (self.gpu, |k| x.i(k), |k| x.o(k));
        match node.op {
            Op::Embedding { b, t, c } => x.embedding(b, t, c),
            Op::LayerNorm { n, c } => x.layernorm(n, c),
            Op::Linear { m, k, n, bias } => x.linear(m, k, n, bias),
            Op::LinearGelu { m, k, n, bias } => x.linear_gelu((m, k, n, bias)),
            Op::LinearResidual { m, k, n, bias } => x.linear_residual((m, k, n, bias)),
            Op::Attention {
                b,
                t,
                nh,
                hs,
                p,
                site,
            } => x.attention(attention::Dims { b, t, nh, hs }, p, site),
            Op::AttentionCached {
                b,
                tq,
                nh,
                hs,
                tmax,
            } => x.attention_cached(attention::Dims { b, t: tq, nh, hs }, tmax),
            Op::KvAppend {
                b,
                tq,
                nh,
                hs,
                tmax,
            } => x.kv_append(attention::Dims { b, t: tq, nh, hs }, tmax),
            Op::Gelu { n } => one(gelu::forward(gpu, o(0), i(0), n)),
            Op::Add { .. } => one(residual::forward(gpu, o(0), i(0), i(1))),
            Op::Dropout { n, p, site } => x.dropout(n, p, site),
            Op::CrossEntropy { n, v, vp } => x.cross_entropy(n, v, vp),
            Op::Mean { n } => reduce::sum(gpu, o(0), i(0), n, 1.0 / n as f32),
            Op::EmbeddingBackward { b, t, c } => x.embedding_backward(b, t, c),
            Op::LayerNormBackward { n, c, acc, bias } => x.layernorm_backward(n, c, acc, bias),
            Op::LinearBackward {
                m,
                k,
                n,
                acc,
                dx,
                bias,
                gelu,
            } => x.linear_backward((m, k, n, bias), acc, dx, gelu),
            Op::AttentionBackward {
                b,
                t,
                nh,
                hs,
                p,
                site,
            } => x.attention_backward(attention::Dims { b, t, nh, hs }, p, site),
            Op::GeluBackward { n, acc } => one(gelu::backward(gpu, o(0), i(1), i(0), n, acc)),
            Op::Accumulate { acc, .. } => one(residual::accumulate(gpu, o(0), i(0), acc)),
            Op::DropoutBackward { n, p, site, acc } => x.dropout_backward(n, p, site, acc),
            Op::LmHeadLoss { n, c, v, vp, rows } => x.lm_head_loss(n, c, (v, vp), rows),
            Op::LmHeadLossBackward {
                n,
                c,
                v,
                vp,
                rows,
                acc,
            } => x.lm_head_loss_backward(n, c, (v, vp), rows, acc),
            Op::CrossEntropyBackward { n, v, vp } => x.cross_entropy_backward(n, v, vp),
            Op::Fill { value } => self.lower_fill(node, value),
            Op::GlobalNorm => self.lower_global_norm(node),
            Op::AdamW { decay } => self.lower_adamw(node, decay),
        }
    }

    /// Refuses a node with an operand split into row chunks where its op cannot take one: only
    /// the token table in the embedding and the lm head, and everything the optimizer touches,
    /// may be split parameters.
    fn check_splits(&self, node: &Node) -> Result<()> {
        let splittable = |input: bool, k: usize| match node.op {
            Op::Embedding { .. } => input && k == 1,
            Op::EmbeddingBackward { .. } => !input && k == 0,
            Op::Linear { bias, .. } => input && k == 1 && !bias,
            Op::LinearBackward { bias, .. } => (input && k == 2) || (!input && k == 1 && !bias),
            Op::LmHeadLoss { .. } => input && k == 1,
            Op::LmHeadLossBackward { .. } => k == 1,
            Op::Fill { .. } | Op::GlobalNorm | Op::AdamW { .. } => true,
            _ => false,
        };
        let operands = node
            .inputs
            .iter()
            .enumerate()
            .map(|(k, &t)| (true, k, t))
            .chain(node.outputs.iter().enumerate().map(|(k, &t)| (false, k, t)));
        for (input, k, t) in operands {
            if !splittable(input, k) && self.views[t].len() > 1 {
                return Err(Error::invalid(
                    node.op.name(),
                    format!(
                        "tensor {} is split into {} chunks to fit the device's bindings, which \
                         this op does not support",
                        self.graph.tensors[t].name,
                        self.views[t].len()
                    ),
                ));
            }
        }
        Ok(())
    }

    /// y (M, N) = x (M, K) · w (N, K)ᵀ (+ bias) with `epilogue` (inputs [x, w, bias?, ...],
    /// output [y, ...]).
    fn lower_fused_linear(
        &self,
        node: &Node,
        (m, k, n, bias): (usize, usize, usize, bool),
        epilogue: gemm::Epilogue,
    ) -> Result<Vec<Dispatch>> {
        let (x, w, y) = (
            self.view(node.inputs[0]),
            self.view(node.inputs[1]),
            self.view(node.outputs[0]),
        );
        let mm = gemm::Matmul {
            trans_b: true,
            epilogue,
            ..gemm::Matmul::new(m, n, k)
        };
        let bias = bias.then(|| self.view(node.inputs[2]));
        let (y, x, w) = (
            gemm::Operand::new(y, n),
            gemm::Operand::new(x, k),
            gemm::Operand::new(w, k),
        );
        gemm::matmul(self.gpu, &mm, y, x, w, bias, gemm::Variant::Tiled)
    }

    /// A linear layer's backward whose input is gelu(pre): d.pre (M, K) = (dy · w) ⊙ gelu'(pre)
    /// in one GEMM (inputs [dy, x, w, pre], outputs [d.pre, dw, dbias?]), then dw and dbias.
    fn lower_linear_backward_gelu(
        &self,
        node: &Node,
        (m, k, n, bias): (usize, usize, usize, bool),
    ) -> Result<Vec<Dispatch>> {
        let [dy, x, w, pre] = [0, 1, 2, 3].map(|j| self.view(node.inputs[j]));
        let out = |j: usize| self.view(node.outputs[j]);
        let mm = gemm::Matmul {
            epilogue: gemm::Epilogue::GeluBackward { pre },
            ..gemm::Matmul::new(m, k, n)
        };
        let (dpre, dy_op, w_op) = (
            gemm::Operand::new(out(0), k),
            gemm::Operand::new(dy, n),
            gemm::Operand::new(w, k),
        );
        let mut ds = gemm::matmul(self.gpu, &mm, dpre, dy_op, w_op, None, gemm::Variant::Tiled)?;
        let tensors = gemm::LinearBackwardTensors {
            dinp: None,
            dw: out(1),
            dbias: bias.then(|| out(2)),
            dout: dy,
            inp: x,
            w,
        };
        let dims = gemm::LinearDims { m, k, n };
        ds.extend(gemm::linear_backward(self.gpu, tensors, dims, false)?);
        Ok(ds)
    }

    /// Every chunk of the tensors `ids`, merged into spans of the store's flat buffers.
    fn spans_of(&self, ids: &[TensorId]) -> Vec<View> {
        let all: Vec<&View> = ids.iter().flat_map(|&t| self.chunks(t)).collect();
        let align = self.gpu.limits.min_storage_buffer_offset_alignment as u64;
        store::spans(&all, align.max(4))
    }

    /// outputs = value: one fill per span (the whole of a flat buffer for the gradients).
    fn lower_fill(&self, node: &Node, value: f32) -> Result<Vec<Dispatch>> {
        let spans = self.spans_of(&node.outputs);
        spans
            .iter()
            .map(|v| reduce::fill(self.gpu, v, value))
            .collect()
    }

    /// norm = sqrt(Σ g²) over every input: one stage-1 dispatch per span, then one to finish.
    fn lower_global_norm(&self, node: &Node) -> Result<Vec<Dispatch>> {
        let grads = self.spans_of(&node.inputs);
        let lens: Vec<usize> = grads.iter().map(|g| g.len).collect();
        let partials = self.gpu.zeros(
            "grad_norm.partials",
            DType::F32,
            reduce::partials_len(self.gpu, &lens),
        )?;
        let grads: Vec<&View> = grads.iter().collect();
        let norm = self.view(node.outputs[0]);
        reduce::global_norm(self.gpu, norm, &partials, &grads)
    }

    /// One AdamW dispatch per span of the parameters (the gradients and moments share their
    /// layout, so their spans line up).
    fn lower_adamw(&self, node: &Node, decay: bool) -> Result<Vec<Dispatch>> {
        let k = node.inputs.len() - 1;
        let norm = self.view(node.inputs[k]);
        let grads = self.spans_of(&node.inputs[..k]);
        let [params, ms, vs] = [0, 1, 2].map(|j| self.spans_of(&node.outputs[j * k..(j + 1) * k]));
        let same = |a: &View, b: &View| a.offset == b.offset && a.len == b.len;
        let lined_up = [&grads, &ms, &vs]
            .iter()
            .all(|l| l.len() == params.len() && l.iter().zip(&params).all(|(a, b)| same(a, b)));
        if !lined_up {
            return Err(Error::invalid(
                "adamw",
                "parameters, gradients and moments are not laid out alike",
            ));
        }
        (0..params.len())
            .map(|j| {
                let tensors = adamw::Tensors {
                    param: &params[j],
                    grad: &grads[j],
                    m: &ms[j],
                    v: &vs[j],
                };
                // lr and t are set per step (`adamw::set_step`).
                let placeholder = adamw::Step { lr: 0.0, t: 1 };
                let (n, hyper) = (params[j].len, &self.opts.adamw);
                adamw::step(self.gpu, tensors, norm, n, hyper, decay, placeholder)
            })
            .collect()
    }

    /// Micro-steps of one optimizer step over all ranks.
    fn micro_per_step(&self) -> usize {
        self.opts.grad_accum.max(1) * self.opts.shard.ranks.max(1)
    }

    /// Queues one training step: `micro` holds `grad_accum` batches; `lr` and the AdamW step
    /// number `t` (1-based) apply to this step. Returns without waiting for the GPU; the step's
    /// losses arrive through `poll` or `wait_results`.
    pub fn step(&mut self, micro: &[MicroBatch], lr: f32, t: u32) -> Result<()> {
        self.step_synced(micro, lr, t, None)
    }

    /// `step`, with `sync` run between the backward and the optimizer update: the forward and
    /// backward are submitted, waited for, handed to `sync` (which sums the gradients across
    /// ranks), then the update is submitted. Without `sync`, the whole step is one submission.
    pub fn step_synced(
        &mut self,
        micro: &[MicroBatch],
        lr: f32,
        t: u32,
        sync: Option<&mut dyn GradientSync>,
    ) -> Result<()> {
        let accum = self.opts.grad_accum.max(1);
        if micro.len() != accum {
            return Err(Error::invalid(
                "step",
                format!("{} micro-batches given, grad_accum is {accum}", micro.len()),
            ));
        }
        self.write_inputs(micro)?;
        for &d in &self.adamw_dispatches {
            adamw::set_step(self.gpu, &self.dispatches[&Phase::Optimizer][d], lr, t);
        }
        if let Some(buf) = &self.dropout_steps {
            // Every micro-step of every step draws fresh masks, keyed by the global micro-step:
            // counter = t · accum · ranks + k · ranks + rank.
            let Shard { rank, ranks } = self.opts.shard;
            let per_step = self.micro_per_step() as u32;
            let mut steps = Vec::with_capacity(accum * self.dropouts.len());
            for k in 0..accum {
                for _ in &self.dropouts {
                    steps.push(t * per_step + (k * ranks + rank) as u32);
                }
            }
            self.gpu
                .queue
                .write_buffer(buf, 0, bytemuck::cast_slice(&steps));
        }
        let slot = self.reserve_readback()?;
        match sync {
            None => self.submit("training step", |enc| {
                self.record_accumulate(enc);
                self.record_update(enc, slot);
            })?,
            Some(sync) => {
                self.submit("forward and backward", |enc| self.record_accumulate(enc))?;
                let mut losses = match &self.results {
                    Some(r) => self.gpu.read_f32(&r.slice(0, accum, "step_losses")?)?,
                    None => Vec::new(),
                };
                let grads = self.gradient_spans();
                sync.sync(self.gpu, &grads, &mut losses)?;
                self.synced_losses.push((t as u64, losses));
                self.submit("optimizer", |enc| self.record_update(enc, slot))?;
            }
        }
        if let Some(slot) = slot {
            let rb = &mut self.ring[slot];
            rb.step = Some(t as u64);
            let ready = rb.ready.clone();
            ready.clear();
            rb.buffer
                .slice(..)
                .map_async(wgpu::MapMode::Read, move |r| ready.set(r.is_ok()));
        }
        Ok(())
    }

    /// The flat spans of every gradient the optimizer reads (those of the gradient norm).
    pub fn gradient_spans(&self) -> Vec<View> {
        self.graph
            .nodes
            .iter()
            .find(|n| matches!(n.op, Op::GlobalNorm))
            .map_or_else(Vec::new, |n| self.spans_of(&n.inputs))
    }

    /// Records into one command buffer and submits it.
    fn submit(&self, label: &str, record: impl FnOnce(&mut wgpu::CommandEncoder)) -> Result<()> {
        let gpu = self.gpu;
        gpu.scoped(label, 0, || {
            let mut enc = gpu
                .device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some(label) });
            record(&mut enc);
            gpu.queue.submit([enc.finish()]);
        })
    }

    /// Zeroes the gradients and records every micro-step's forward and backward, each loss
    /// copied into the step's results.
    fn record_accumulate(&self, enc: &mut wgpu::CommandEncoder) {
        let gpu = self.gpu;
        gpu.record(enc, self.phase(Phase::Zero));
        for k in 0..self.opts.grad_accum.max(1) {
            self.record_micro_inputs(enc, k);
            gpu.record(enc, self.phase(Phase::Forward));
            gpu.record(enc, self.phase(Phase::Backward));
            if let (Some(loss), Some(r)) = (self.loss, &self.results) {
                let l = self.view(loss);
                enc.copy_buffer_to_buffer(
                    &l.buffer,
                    l.offset,
                    &r.buffer,
                    r.offset + 4 * k as u64,
                    4,
                );
            }
        }
    }

    /// Records the gradient norm and AdamW, and the copy of the step's results into ring `slot`.
    fn record_update(&self, enc: &mut wgpu::CommandEncoder, slot: Option<usize>) {
        let accum = self.opts.grad_accum.max(1);
        self.gpu.record(enc, self.phase(Phase::Optimizer));
        if let (Some(norm), Some(r)) = (self.norm, &self.results) {
            let nv = self.view(norm);
            enc.copy_buffer_to_buffer(
                &nv.buffer,
                nv.offset,
                &r.buffer,
                r.offset + 4 * accum as u64,
                4,
            );
        }
        if let (Some(slot), Some(r)) = (slot, &self.results) {
            enc.copy_buffer_to_buffer(&r.buffer, r.offset, &self.ring[slot].buffer, 0, r.bytes());
        }
    }

    fn phase(&self, p: Phase) -> &[Dispatch] {
        self.dispatches.get(&p).map_or(&[], Vec::as_slice)
    }

    fn write_inputs(&self, micro: &[MicroBatch]) -> Result<()> {
        for (id, staging) in &self.inputs {
            let t = &self.graph.tensors[*id];
            let mut all: Vec<u32> = Vec::with_capacity(t.numel() * micro.len());
            for mb in micro {
                let part: Vec<u32> = match t.name.as_str() {
                    "tokens" => mb.tokens.clone(),
                    "targets" => mb.targets.clone(),
                    "embedding_index" => embedding::backward_index(&mb.tokens),
                    other => panic!("unknown input {other}"),
                };
                if part.len() != t.numel() {
                    return Err(Error::Shape {
                        kernel: "step".into(),
                        tensor: t.name.clone(),
                        expected: format!("{} values", t.numel()),
                        got: format!("{} values", part.len()),
                    });
                }
                all.extend(part);
            }
            self.gpu
                .queue
                .write_buffer(staging, 0, bytemuck::cast_slice(&all));
        }
        Ok(())
    }

    /// Copies micro-step k's inputs and dropout counters into place (between compute passes).
    fn record_micro_inputs(&self, enc: &mut wgpu::CommandEncoder, k: usize) {
        for (id, staging) in &self.inputs {
            let v = self.view(*id);
            enc.copy_buffer_to_buffer(
                staging,
                v.bytes() * k as u64,
                &v.buffer,
                v.offset,
                v.bytes(),
            );
        }
        if let Some(buf) = &self.dropout_steps {
            for (j, &(phase, d, at)) in self.dropouts.iter().enumerate() {
                let src = ((k * self.dropouts.len() + j) * 4) as u64;
                enc.copy_buffer_to_buffer(buf, src, &self.dispatches[&phase][d].params, at, 4);
            }
        }
    }

    /// Picks the ring slot for the next step's results, first collecting the step that used it.
    fn reserve_readback(&mut self) -> Result<Option<usize>> {
        if self.ring.is_empty() {
            return Ok(None);
        }
        let slot = self.next_ring;
        self.next_ring = (self.next_ring + 1) % self.ring.len();
        if self.ring[slot].step.is_some() {
            let done = self.collect(slot, true)?;
            self.pending.extend(done);
        }
        Ok(Some(slot))
    }

    fn collect(&mut self, slot: usize, block: bool) -> Result<Option<StepResult>> {
        let Some(step) = self.ring[slot].step else {
            return Ok(None);
        };
        let ready = |rb: &Readback| rb.ready.peek();
        let lost = |reason: String| Error::DeviceLost {
            reason: format!("while reading back the results of step {step}: {reason}"),
        };
        if block {
            self.gpu.wait().map_err(|e| lost(e.to_string()))?;
            // The queue is idle, but when another thread polls the same device, it may have
            // taken this buffer's map callback and not run it yet: wait for the callback, a
            // little, without spinning, and never past a lost device or a poll error.
            let deadline = std::time::Instant::now() + CALLBACK_TIMEOUT;
            while ready(&self.ring[slot]).is_none() {
                self.gpu
                    .check("readback")
                    .map_err(|e| lost(e.to_string()))?;
                if std::time::Instant::now() > deadline {
                    return Err(lost(format!(
                        "the queue is idle but the buffer was not mapped within {} s",
                        CALLBACK_TIMEOUT.as_secs()
                    )));
                }
                std::thread::sleep(std::time::Duration::from_millis(1));
                self.gpu
                    .device
                    .poll(wgpu::PollType::Poll)
                    .map_err(|e| lost(e.to_string()))?;
            }
        } else {
            self.gpu
                .device
                .poll(wgpu::PollType::Poll)
                .map_err(|e| lost(e.to_string()))?;
            self.gpu
                .check("readback")
                .map_err(|e| lost(e.to_string()))?;
        }
        let state = ready(&self.ring[slot]);
        match state {
            None => Ok(None),
            Some(false) => Err(lost("mapping the result buffer failed".into())),
            Some(true) => {
                let rb = &mut self.ring[slot];
                let data: Vec<f32> =
                    {
                        let view = rb.buffer.slice(..).get_mapped_range().map_err(|e| {
                            Error::Validation {
                                context: "step results".into(),
                                message: e.to_string(),
                            }
                        })?;
                        bytemuck::pod_collect_to_vec(&view)
                    };
                rb.buffer.unmap();
                rb.step = None;
                let accum = self.opts.grad_accum.max(1);
                let losses = match self.synced_losses.iter().position(|(s, _)| *s == step) {
                    Some(i) => self.synced_losses.swap_remove(i).1,
                    None => data[..accum].to_vec(),
                };
                Ok(Some(StepResult {
                    step,
                    losses,
                    grad_norm: data[accum],
                }))
            }
        }
    }

    /// Step results that have arrived, oldest first (never blocks).
    pub fn poll(&mut self) -> Result<Vec<StepResult>> {
        let mut out = std::mem::take(&mut self.pending);
        for k in 0..self.ring.len() {
            let slot = (self.next_ring + k) % self.ring.len();
            out.extend(self.collect(slot, false)?);
        }
        out.sort_by_key(|r| r.step);
        Ok(out)
    }

    /// Waits for every queued step and returns the results not yet returned.
    pub fn wait_results(&mut self) -> Result<Vec<StepResult>> {
        let mut out = std::mem::take(&mut self.pending);
        for k in 0..self.ring.len() {
            let slot = (self.next_ring + k) % self.ring.len();
            out.extend(self.collect(slot, true)?);
        }
        out.sort_by_key(|r| r.step);
        Ok(out)
    }

    /// `poll` for a caller that must not block (a browser): when every readback slot is taken,
    /// awaits the oldest, so that the next `step` finds a free slot; returns what has arrived.
    pub async fn poll_async(&mut self) -> Result<Vec<StepResult>> {
        if self.ring.iter().all(|rb| rb.step.is_some()) {
            let slot = self.next_ring;
            let done = self.collect_async(slot).await?;
            self.pending.extend(done);
        }
        self.poll()
    }

    /// `wait_results`, awaited.
    pub async fn wait_results_async(&mut self) -> Result<Vec<StepResult>> {
        let mut out = std::mem::take(&mut self.pending);
        for k in 0..self.ring.len() {
            let slot = (self.next_ring + k) % self.ring.len();
            out.extend(self.collect_async(slot).await?);
        }
        out.sort_by_key(|r| r.step);
        Ok(out)
    }

    /// Collects a slot, awaiting its mapping: natively by polling the device as `collect` does,
    /// in a browser by yielding to the event loop until the map callback has run.
    async fn collect_async(&mut self, slot: usize) -> Result<Option<StepResult>> {
        if cfg!(target_arch = "wasm32") {
            if self.ring[slot].step.is_some() {
                let ready = self.ring[slot].ready.clone();
                ready.wait().await;
            }
            self.collect(slot, false)
        } else {
            self.collect(slot, true)
        }
    }

    /// `forward_loss`, awaited (evaluation in a browser).
    pub async fn forward_loss_async(&mut self, batch: &MicroBatch) -> Result<f32> {
        self.submit_one("forward", batch, &[Phase::Forward])?;
        let loss = self
            .loss
            .ok_or_else(|| Error::invalid("forward_loss", "graph has no loss"))?;
        Ok(self.gpu.read_f32_async(self.view(loss)).await?[0])
    }

    /// Runs the forward pass on one batch and returns the mean loss (blocking; for evaluation).
    pub fn forward_loss(&mut self, batch: &MicroBatch) -> Result<f32> {
        self.forward(batch)?;
        let loss = self
            .loss
            .ok_or_else(|| Error::invalid("forward_loss", "graph has no loss"))?;
        Ok(self.gpu.read_f32(self.view(loss))?[0])
    }

    /// Decodes one batch of new tokens at positions pos0 .. pos0 + T against the KV caches
    /// (appending their keys and values), without waiting: read the logits or losses after.
    pub fn decode(&mut self, batch: &MicroBatch, pos0: usize) -> Result<()> {
        for &(d, tq) in &self.positioned {
            attention::set_position(self.gpu, &self.dispatches[&Phase::Forward][d], pos0, tq);
        }
        self.write_inputs(std::slice::from_ref(batch))?;
        let gpu = self.gpu;
        gpu.scoped("decode", 0, || {
            let mut enc = gpu
                .device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                    label: Some("decode"),
                });
            // The position rows pos0 .. pos0 + T, cut from the position table.
            for (window, table, cols) in &self.windows {
                let size = window.dtype.size();
                enc.copy_buffer_to_buffer(
                    &table.buffer,
                    table.offset + (pos0 * cols) as u64 * size,
                    &window.buffer,
                    window.offset,
                    window.len as u64 * size,
                );
            }
            self.record_micro_inputs(&mut enc, 0);
            gpu.record(&mut enc, self.phase(Phase::Forward));
            gpu.queue.submit([enc.finish()]);
        })
    }

    /// Runs the forward pass on one batch (targets may be empty for a logits-only graph) and
    /// waits for it.
    pub fn forward(&mut self, batch: &MicroBatch) -> Result<()> {
        self.submit_one("forward", batch, &[Phase::Forward])?;
        self.gpu.wait()
    }

    /// Writes `batch` as micro-step 0's inputs and submits, in one command buffer, the copies of
    /// those inputs into place and then `phases`. Does not wait.
    fn submit_one(&self, label: &str, batch: &MicroBatch, phases: &[Phase]) -> Result<()> {
        self.write_inputs(std::slice::from_ref(batch))?;
        let gpu = self.gpu;
        gpu.scoped(label, 0, || {
            let mut enc = gpu
                .device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some(label) });
            self.record_micro_inputs(&mut enc, 0);
            for &p in phases {
                gpu.record(&mut enc, self.phase(p));
            }
            gpu.queue.submit([enc.finish()]);
        })
    }
}

/// One output of one node compared with its CPU reference (`Executor::validate`).
#[derive(Clone, Debug)]
pub struct NodeCheck {
    pub node: usize,
    pub label: String,
    pub op: &'static str,
    pub comparison: crate::reference::Comparison,
}

impl NodeCheck {
    /// The failed comparisons among `checks`, one line each.
    pub fn mismatches(checks: &[NodeCheck]) -> Vec<String> {
        checks
            .iter()
            .filter(|c| !c.comparison.ok())
            .map(|c| c.comparison.to_string())
            .collect()
    }
}

impl Executor<'_> {
    /// Runs the Zero, Forward and Backward phases on one batch (no optimizer step) and waits:
    /// the parameter gradients are then those of this batch's mean loss.
    pub fn forward_backward(&mut self, batch: &MicroBatch) -> Result<()> {
        let phases = [Phase::Zero, Phase::Forward, Phase::Backward];
        self.submit_one("forward and backward", batch, &phases)?;
        self.gpu.wait()
    }

    /// Times every dispatch of one training step (one micro-step) with the GPU profiler, each
    /// in its own pass. Returns (dispatch name, seconds) in schedule order. Parameters are updated
    /// as by a real step with learning rate `lr` and step number `t`.
    pub fn profile_step(
        &mut self,
        batch: &MicroBatch,
        lr: f32,
        t: u32,
    ) -> Result<Vec<(String, f64)>> {
        for &d in &self.adamw_dispatches {
            adamw::set_step(self.gpu, &self.dispatches[&Phase::Optimizer][d], lr, t);
        }
        self.submit_one("profile inputs", batch, &[])?;
        let gpu = self.gpu;
        let all: Vec<Dispatch> = [
            Phase::Zero,
            Phase::Forward,
            Phase::Backward,
            Phase::Optimizer,
        ]
        .iter()
        .flat_map(|&p| self.phase(p).iter().cloned())
        .collect();
        let times = gpu.profile(&all)?;
        Ok(all.into_iter().map(|d| d.name).zip(times).collect())
    }

    /// The whole of a tensor, its chunks joined when it is a split parameter (only parameters,
    /// which are never u32, are split).
    fn read_data(&self, t: TensorId) -> Result<validate::Data> {
        Ok(match self.view(t).dtype {
            DType::U32 => validate::Data::U32(self.gpu.read_u32(self.view(t))?),
            _ => validate::Data::F32(ParamStore::read_chunks(self.gpu, self.chunks(t))?),
        })
    }

    /// The debug switch that corners kernel and aliasing bugs: runs one micro-step node by node
    /// (dropout counter 0), and compares every output of every node with the CPU reference
    /// computed from that node's actual inputs. Returns one check per output.
    pub fn validate(&mut self, batch: &MicroBatch) -> Result<Vec<NodeCheck>> {
        if let Some(buf) = &self.dropout_steps {
            let zeros = vec![0u32; (buf.size() / 4) as usize];
            self.gpu
                .queue
                .write_buffer(buf, 0, bytemuck::cast_slice(&zeros));
        }
        self.submit_one("validate", batch, &[Phase::Zero])?;
        let gpu = self.gpu;
        gpu.wait()?;
        let dloss = 1.0 / self.micro_per_step() as f32;
        let mut checks = Vec::new();
        for phase in [Phase::Forward, Phase::Backward] {
            let nds = self
                .node_dispatches
                .get(&phase)
                .cloned()
                .unwrap_or_default();
            for nd in nds {
                let node = self.graph.nodes[nd.node].clone();
                let ins = node
                    .inputs
                    .iter()
                    .map(|&t| self.read_data(t))
                    .collect::<Result<Vec<_>>>()?;
                let before = node
                    .outputs
                    .iter()
                    .map(|&t| self.read_data(t))
                    .collect::<Result<Vec<_>>>()?;
                gpu.run(&self.dispatches[&phase][nd.range.clone()])?;
                let site = match node.op {
                    Op::Dropout { site, .. }
                    | Op::DropoutBackward { site, .. }
                    | Op::Attention { site, .. }
                    | Op::AttentionBackward { site, .. } => site,
                    _ => 0,
                };
                let n = match node.op {
                    Op::CrossEntropyBackward { n, .. } | Op::LmHeadLossBackward { n, .. } => n,
                    _ => 1,
                };
                let ctx = validate::Context {
                    seed: dropout_seed(self.opts.seed, site),
                    step: 0,
                    dloss: dloss / n as f32,
                };
                let want = validate::reference(&node, &ins, &before, ctx);
                let (atol, rtol) = validate::tolerance(&node.op);
                for (k, &t) in node.outputs.iter().enumerate() {
                    let got = self.read_data(t)?;
                    let name = format!("{} -> {}", node.label, self.graph.tensors[t].name);
                    checks.push(NodeCheck {
                        node: nd.node,
                        label: node.label.clone(),
                        op: node.op.name(),
                        comparison: crate::reference::compare(&name, got.f(), &want[k], atol, rtol),
                    });
                }
            }
        }
        Ok(checks)
    }
}

/// One node being lowered to its dispatches, with its operands as views of GPU memory. Its
/// methods lower one op (or one op's variants) each, `Executor::node` choosing by op.
#[derive(Clone, Copy)]
struct Lowering<'s> {
    ex: &'s Executor<'s>,
    node: &'s Node,
}

impl<'s> Lowering<'s> {
    /// Input k (the first chunk of a split one).
    fn i(self, k: usize) -> &'s View {
        self.ex.view(self.node.inputs[k])
    }

    /// Output k (the first chunk of a split one).
    fn o(self, k: usize) -> &'s View {
        self.ex.view(self.node.outputs[k])
    }

    /// Every row chunk of input k.
    fn ic(self, k: usize) -> &'s [View] {
        self.ex.chunks(self.node.inputs[k])
    }

    /// Every row chunk of output k.
    fn oc(self, k: usize) -> &'s [View] {
        self.ex.chunks(self.node.outputs[k])
    }

    fn gpu(self) -> &'s Gpu {
        self.ex.gpu
    }

    /// Token rows plus position rows: one dispatch per row chunk of the token table.
    fn embedding(self, b: usize, t: usize, c: usize) -> Result<Vec<Dispatch>> {
        let (i, o) = (|k| self.i(k), |k| self.o(k));
        let dims = embedding::Dims { b, t, c };
        let mut row0 = 0;
        let mut out = Vec::new();
        for view in self.ic(1) {
            let wte = embedding::TableChunk { view, row0 };
            out.push(embedding::forward(self.gpu(), o(0), i(0), wte, i(2), dims)?);
            row0 += view.len / c;
        }
        Ok(out)
    }

    /// The embedding's backward: each row chunk of the token table's gradient gets its rows, the
    /// first chunk's dispatch also the position table's gradient.
    fn embedding_backward(self, b: usize, t: usize, c: usize) -> Result<Vec<Dispatch>> {
        let (i, o) = (|k| self.i(k), |k| self.o(k));
        let dims = embedding::Dims { b, t, c };
        let mut row0 = 0;
        let mut out = Vec::new();
        for (k, view) in self.oc(0).iter().enumerate() {
            let dwte = embedding::TableChunk { view, row0 };
            let dwpe = (k == 0).then(|| o(1));
            out.extend(embedding::backward(
                self.gpu(),
                dwte,
                dwpe,
                i(0),
                i(1),
                i(2),
                dims,
            )?);
            row0 += view.len / c;
        }
        Ok(out)
    }

    fn layernorm(self, n: usize, c: usize) -> Result<Vec<Dispatch>> {
        let (i, o) = (|k| self.i(k), |k| self.o(k));
        let tensors = layernorm::ForwardTensors {
            out: o(0),
            mean: o(1),
            rstd: o(2),
            inp: i(0),
            weight: i(1),
            bias: i(2),
        };
        let d = layernorm::forward(self.gpu(), tensors, layernorm::Dims { n, c })?;
        Ok(vec![d])
    }

    /// The layer norm's backward; without a bias, its gradient goes to a scratch buffer.
    fn layernorm_backward(
        self,
        n: usize,
        c: usize,
        acc: bool,
        bias: bool,
    ) -> Result<Vec<Dispatch>> {
        let (i, o) = (|k| self.i(k), |k| self.o(k));
        let scratch;
        let dbias = if bias {
            o(2)
        } else {
            scratch = self.gpu().zeros("unused dbias", DType::F32, c)?;
            &scratch
        };
        let tensors = layernorm::BackwardTensors {
            dinp: o(0),
            dweight: o(1),
            dbias,
            dout: i(0),
            inp: i(1),
            weight: i(2),
            mean: i(3),
            rstd: i(4),
        };
        layernorm::backward(self.gpu(), tensors, layernorm::Dims { n, c }, acc)
    }

    /// y (M, N) = x (M, K) · w (N, K)ᵀ (+ bias).
    fn linear(self, m: usize, k: usize, n: usize, bias: bool) -> Result<Vec<Dispatch>> {
        let (i, o) = (|j| self.i(j), |j| self.o(j));
        if self.ic(1).len() == 1 {
            let dims = gemm::LinearDims { m, k, n };
            return gemm::linear_forward(self.gpu(), o(0), i(0), i(1), bias.then(|| i(2)), dims);
        }
        // A weight split into row chunks (the tied lm head): each chunk writes its block of
        // output columns.
        split_linear_forward(
            self.gpu(),
            gemm::Operand::new(o(0), n),
            gemm::Operand::new(i(0), k),
            self.ic(1),
            m,
            k,
        )
    }

    /// gelu(x · wᵀ + bias) in one GEMM, keeping the pre-activation (outputs [y, pre]).
    fn linear_gelu(self, dims: (usize, usize, usize, bool)) -> Result<Vec<Dispatch>> {
        let epilogue = gemm::Epilogue::Gelu { pre: self.o(1) };
        self.ex.lower_fused_linear(self.node, dims, epilogue)
    }

    /// res + x · wᵀ + bias in one GEMM, res being the last input.
    fn linear_residual(self, dims: (usize, usize, usize, bool)) -> Result<Vec<Dispatch>> {
        let res = self.i(self.node.inputs.len() - 1);
        let epilogue = gemm::Epilogue::Residual { res };
        self.ex.lower_fused_linear(self.node, dims, epilogue)
    }

    /// A linear layer's backward: over a split weight, fused with GELU's backward when its
    /// input is gelu(pre), or the plain one.
    fn linear_backward(
        self,
        (m, k, n, bias): (usize, usize, usize, bool),
        acc: bool,
        dx: bool,
        gelu: bool,
    ) -> Result<Vec<Dispatch>> {
        let (i, o) = (|j| self.i(j), |j| self.o(j));
        if self.ic(2).len() > 1 {
            let tensors = SplitLinearBackwardTensors {
                dx: dx.then(|| gemm::Operand::new(o(0), k)),
                dw: self.oc(1),
                dy: gemm::Operand::new(i(0), n),
                x: gemm::Operand::new(i(1), k),
                w: self.ic(2),
            };
            return split_linear_backward(self.gpu(), tensors, m, k, acc);
        }
        if gelu {
            return self
                .ex
                .lower_linear_backward_gelu(self.node, (m, k, n, bias));
        }
        let tensors = gemm::LinearBackwardTensors {
            dinp: dx.then(|| o(0)),
            dw: o(1),
            dbias: bias.then(|| o(2)),
            dout: i(0),
            inp: i(1),
            w: i(2),
        };
        gemm::linear_backward(self.gpu(), tensors, gemm::LinearDims { m, k, n }, acc)
    }

    /// Causal self-attention over qkv (B, T, 3C), with dropout on the probabilities at `site`.
    fn attention(self, dims: attention::Dims, p: f32, site: u32) -> Result<Vec<Dispatch>> {
        let (i, o) = (|k| self.i(k), |k| self.o(k));
        let opts = attention_options(self.ex.opts.seed, p, site);
        attention::forward(self.gpu(), o(0), o(1), i(0), dims, opts)
    }

    fn attention_backward(self, dims: attention::Dims, p: f32, site: u32) -> Result<Vec<Dispatch>> {
        let (i, o) = (|k| self.i(k), |k| self.o(k));
        let tensors = attention::BackwardTensors {
            dqkv: o(0),
            dout: i(0),
            qkv: i(1),
            out: i(2),
            lse: i(3),
        };
        let opts = attention_options(self.ex.opts.seed, p, site);
        attention::backward(self.gpu(), tensors, dims, opts)
    }

    /// Attention of the Tq = `dims.t` new tokens over a KV cache of `tmax` positions.
    fn attention_cached(self, dims: attention::Dims, tmax: usize) -> Result<Vec<Dispatch>> {
        let (i, o) = (|k| self.i(k), |k| self.o(k));
        let cache = attention::KvCache {
            k: i(1),
            v: i(2),
            tmax,
        };
        let d = attention::forward_cached(self.gpu(), o(0), i(0), cache, dims, 0)?;
        Ok(vec![d])
    }

    /// Appends the keys and values of the Tq = `dims.t` new tokens to the KV cache.
    fn kv_append(self, dims: attention::Dims, tmax: usize) -> Result<Vec<Dispatch>> {
        let (i, o) = (|k| self.i(k), |k| self.o(k));
        let cache = attention::KvCache {
            k: o(0),
            v: o(1),
            tmax,
        };
        let d = attention::kv_append(self.gpu(), cache, i(0), dims, 0)?;
        Ok(vec![d])
    }

    fn dropout(self, n: usize, p: f32, site: u32) -> Result<Vec<Dispatch>> {
        let seed = dropout_seed(self.ex.opts.seed, site);
        let d = dropout::Dropout { p, seed, step: 0 };
        let d = dropout::forward(self.gpu(), self.o(0), self.i(0), n, d)?;
        Ok(vec![d])
    }

    fn dropout_backward(self, n: usize, p: f32, site: u32, acc: bool) -> Result<Vec<Dispatch>> {
        let seed = dropout_seed(self.ex.opts.seed, site);
        let d = dropout::Dropout { p, seed, step: 0 };
        let d = dropout::backward(self.gpu(), self.o(0), self.i(0), n, d, acc)?;
        Ok(vec![d])
    }

    fn cross_entropy(self, n: usize, v: usize, vp: usize) -> Result<Vec<Dispatch>> {
        let (i, o) = (|k| self.i(k), |k| self.o(k));
        let dims = cross_entropy::Dims { n, v, vp };
        let d = cross_entropy::forward(self.gpu(), o(0), o(1), i(0), i(1), dims)?;
        Ok(vec![d])
    }

    /// The loss's gradient, each position's scaled by 1 / (positions of the whole step).
    fn cross_entropy_backward(self, n: usize, v: usize, vp: usize) -> Result<Vec<Dispatch>> {
        let i = |k| self.i(k);
        let dloss = 1.0 / (n * self.ex.micro_per_step()) as f32;
        let dims = cross_entropy::Dims { n, v, vp };
        let d = cross_entropy::backward(self.gpu(), i(0), i(1), i(2), dims, dloss)?;
        Ok(vec![d])
    }

    /// The lm head and the loss in chunks of `rows` positions, each chunk's logits computed into
    /// the one chunk buffer and reduced to its losses.
    fn lm_head_loss(
        self,
        n: usize,
        c: usize,
        (v, vp): (usize, usize),
        rows: usize,
    ) -> Result<Vec<Dispatch>> {
        let (gpu, i, o) = (self.gpu(), |k| self.i(k), |k| self.o(k));
        let mut out = Vec::new();
        for r0 in (0..n).step_by(rows) {
            let m = rows.min(n - r0);
            let logits = o(2).slice(0, m * vp, "lm_head.logits chunk")?;
            out.extend(split_linear_forward(
                gpu,
                gemm::Operand::new(&logits, vp),
                gemm::Operand::new(i(0), c).at(r0 * c),
                self.ic(1),
                m,
                c,
            )?);
            out.push(cross_entropy::forward(
                gpu,
                &o(0).slice(r0, m, "losses chunk")?,
                &o(1).slice(r0, m, "lse chunk")?,
                &logits,
                &i(2).slice(r0, m, "targets chunk")?,
                cross_entropy::Dims { n: m, v, vp },
            )?);
        }
        Ok(out)
    }

    /// The chunked lm head and loss backward: each chunk's logits recomputed, turned into their
    /// gradient, and taken back through the lm head.
    fn lm_head_loss_backward(
        self,
        n: usize,
        c: usize,
        (v, vp): (usize, usize),
        rows: usize,
        acc: bool,
    ) -> Result<Vec<Dispatch>> {
        let (gpu, i, o) = (self.gpu(), |k| self.i(k), |k| self.o(k));
        let dloss = 1.0 / (n * self.ex.micro_per_step()) as f32;
        let (x, wte, dwte) = (i(0), self.ic(1), self.oc(1));
        let mut out = Vec::new();
        for r0 in (0..n).step_by(rows) {
            let m = rows.min(n - r0);
            let logits = o(2).slice(0, m * vp, "lm_head.logits chunk")?;
            let xs = gemm::Operand::new(x, c).at(r0 * c);
            out.extend(split_linear_forward(
                gpu,
                gemm::Operand::new(&logits, vp),
                xs,
                wte,
                m,
                c,
            )?);
            out.push(cross_entropy::backward(
                gpu,
                &logits,
                &i(3).slice(r0, m, "lse chunk")?,
                &i(2).slice(r0, m, "targets chunk")?,
                cross_entropy::Dims { n: m, v, vp },
                dloss,
            )?);
            let tensors = SplitLinearBackwardTensors {
                dx: Some(gemm::Operand::new(o(0), c).at(r0 * c)),
                dw: dwte,
                dy: gemm::Operand::new(&logits, vp),
                x: xs,
                w: wte,
            };
            out.extend(split_linear_backward(gpu, tensors, m, c, acc)?);
        }
        Ok(out)
    }
}

/// y (M, ·) = x (M, K) · wᵀ for a weight w split into row chunks: chunk j (rows_j, K) writes
/// columns [v_j, v_j + rows_j) of y, v_j being the rows of the chunks before it.
fn split_linear_forward(
    gpu: &Gpu,
    y: gemm::Operand,
    x: gemm::Operand,
    w: &[View],
    m: usize,
    k: usize,
) -> Result<Vec<Dispatch>> {
    let mut out = Vec::with_capacity(w.len());
    let mut v0 = 0;
    for w in w {
        let rows = w.len / k;
        let mm = gemm::Matmul {
            trans_b: true,
            ..gemm::Matmul::new(m, rows, k)
        };
        let y = y.at(y.offset + v0);
        let w = gemm::Operand::new(w, k);
        out.extend(gemm::matmul(gpu, &mm, y, x, w, None, gemm::Variant::Tiled)?);
        v0 += rows;
    }
    Ok(out)
}

/// The tensors of `split_linear_backward`: dx (M, K) written when given, the chunks dw_j
/// (rows_j, K) of the weight's gradient added to; dy (M, ·), x (M, K) and the weight's chunks
/// w_j read.
struct SplitLinearBackwardTensors<'a> {
    dx: Option<gemm::Operand<'a>>,
    dw: &'a [View],
    dy: gemm::Operand<'a>,
    x: gemm::Operand<'a>,
    w: &'a [View],
}

/// The backward of `split_linear_forward`: dx (M, K) (= or += with `acc`) Σ_j dy[:, cols_j] ·
/// w_j (skipped without dx) and dw_j (rows_j, K) += dy[:, cols_j]ᵀ · x, chunk by chunk.
fn split_linear_backward(
    gpu: &Gpu,
    tensors: SplitLinearBackwardTensors,
    m: usize,
    k: usize,
    acc: bool,
) -> Result<Vec<Dispatch>> {
    let SplitLinearBackwardTensors { dx, dw, dy, x, w } = tensors;
    let mut out = Vec::with_capacity(2 * w.len());
    let mut v0 = 0;
    for (j, (w, dw)) in w.iter().zip(dw).enumerate() {
        let rows = w.len / k;
        let dy = dy.at(dy.offset + v0);
        if let Some(dx) = dx {
            let mm = gemm::Matmul {
                accumulate: acc || j > 0,
                ..gemm::Matmul::new(m, k, rows)
            };
            let w = gemm::Operand::new(w, k);
            out.extend(gemm::matmul(
                gpu,
                &mm,
                dx,
                dy,
                w,
                None,
                gemm::Variant::Tiled,
            )?);
        }
        let mm = gemm::Matmul {
            trans_a: true,
            accumulate: true,
            ..gemm::Matmul::new(rows, k, m)
        };
        let dw = gemm::Operand::new(dw, k);
        out.extend(gemm::matmul(
            gpu,
            &mm,
            dw,
            dy,
            x,
            None,
            gemm::Variant::Tiled,
        )?);
        v0 += rows;
    }
    Ok(out)
}

/// The seed of one dropout site's random stream.
fn dropout_seed(seed: u32, site: u32) -> u32 {
    seed ^ site.wrapping_mul(0x9E37_79B9)
}

/// An attention node's options: causal, with dropout at step counter 0 (the executor rewrites the
/// counter per micro-step), or none for p = 0.
fn attention_options(seed: u32, p: f32, site: u32) -> attention::Options {
    attention::Options {
        dropout: (p > 0.0).then(|| attention::Dropout {
            p,
            seed: dropout_seed(seed, site),
            step: 0,
        }),
        ..attention::Options::CAUSAL
    }
}
