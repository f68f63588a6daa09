//! Where a graph's tensors live: the memory plan's pool, the parameter store, and buffers of
//! their own for inputs, constants, results and decoding's position windows.

use super::super::ir::{Graph, Input, StepOutput, Tensor, TensorId, TensorKind};
use super::super::planner::Plan;
use super::super::store::ParamStore;
use crate::error::{Error, Result};
use crate::gpu::{Gpu, View};

/// One buffer per slot of the memory plan.
pub(super) fn allocate_pool(gpu: &Gpu, plan: &Plan) -> Result<Vec<wgpu::Buffer>> {
    let mut pool = Vec::new();
    for (i, &bytes) in plan.slots.iter().enumerate() {
        pool.push(gpu.create_storage(&format!("pool.{i}"), bytes)?);
    }
    Ok(pool)
}

/// Where a graph's tensors find their storage: the parameter store, the planned pool, or
/// buffers of their own; `accum` micro-steps of input values are staged at once.
pub(super) struct Memory<'m> {
    pub(super) gpu: &'m Gpu,
    pub(super) store: &'m ParamStore,
    pub(super) plan: &'m Plan,
    pub(super) pool: &'m [wgpu::Buffer],
    pub(super) accum: usize,
}

/// A graph input with the staging buffer holding every micro-step's values of it.
pub(super) struct StagedInput {
    pub(super) input: Input,
    pub(super) tensor: TensorId,
    pub(super) staging: wgpu::Buffer,
}

/// Every tensor bound to storage, and the tensors the executor handles by role.
pub(super) struct Bindings {
    /// Each tensor's storage, as `Executor::views`.
    pub(super) views: Vec<Vec<View>>,
    pub(super) inputs: Vec<StagedInput>,
    pub(super) windows: Vec<(View, View, usize)>,
    pub(super) loss: Option<TensorId>,
    pub(super) norm: Option<TensorId>,
}

impl Bindings {
    pub(super) fn new(mem: &Memory, graph: &Graph) -> Result<Bindings> {
        let mut b = Bindings {
            views: vec![Vec::new(); graph.tensors.len()],
            inputs: Vec::new(),
            windows: Vec::new(),
            loss: None,
            norm: None,
        };
        for (id, t) in graph.tensors.iter().enumerate() {
            b.views[id] = b.bind(mem, graph, id, t)?;
        }
        Ok(b)
    }

    /// The storage of tensor `id`: the store's chunks for parameters, gradients and moments; one
    /// view otherwise; none for a planned tensor no micro-step node uses.
    fn bind(&mut self, mem: &Memory, graph: &Graph, id: TensorId, t: &Tensor) -> Result<Vec<View>> {
        let (gpu, store) = (mem.gpu, mem.store);
        let own = |name: &str| gpu.zeros(name, t.dtype, t.numel());
        let view = match t.kind {
            TensorKind::Param(i) | TensorKind::Frozen(i) => return Ok(store.params[i].clone()),
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
            TensorKind::Input(input) => {
                let v = own(&t.name)?;
                let staging = gpu
                    .create_storage(&format!("{}.staging", t.name), v.bytes() * mem.accum as u64)?;
                self.inputs.push(StagedInput {
                    input,
                    tensor: id,
                    staging,
                });
                v
            }
            TensorKind::Constant(bits) => {
                let v = own(&t.name)?;
                gpu.write(&v, &vec![f32::from_bits(bits); t.numel()])?;
                v
            }
            TensorKind::Table(i) => {
                let v = own(&t.name)?;
                gpu.write(&v, &graph.tables[i])?;
                v
            }
            TensorKind::Result(output) => {
                match output {
                    StepOutput::Loss => self.loss = Some(id),
                    StepOutput::GradNorm => self.norm = Some(id),
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
