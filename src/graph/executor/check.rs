//! The node-by-node check of one micro-step against the CPU reference (`--validate`).

use super::super::ir::{Op, Phase, TensorId};
use super::super::store::ParamStore;
use super::super::validate;
use super::lower::dropout_seed;
use super::{Executor, MicroBatch};
use crate::error::Result;
use crate::gpu::DType;
use crate::kernels::step::Step;

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
        self.step_uniform.stage(self.gpu, &[Step::default()]);
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
