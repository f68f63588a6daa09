//! Activations saved for the backward, stored in bf16: the forward computes and passes on f32
//! values as before, but every activation that the backward reads is rounded to bf16 (to nearest,
//! ties to even) right after the forward node that writes it, held in half the bytes until the
//! backward, and widened back to f32 right before the first backward node that reads it (as
//! PyTorch's saved-tensor pack and unpack hooks do). The f32 originals are then last read inside
//! the forward, so the memory planner reuses their buffers; what stays allocated across the step
//! is the bf16 copies. Every sum still accumulates in f32; the gradients are those of the
//! rounded activations.
//!
//! Not rounded: per-row statistics (LayerNorm's mean and rstd, RMSNorm's rstd, attention's
//! log-sum-exp: a few values a row, where rounding would cost accuracy and save nothing), the
//! losses, and tensors a backward node writes in place (the logits, overwritten by their
//! gradient).

use super::ir::{Graph, Node, Op, Phase, TensorKind};
use crate::gpu::DType;

/// How `train` and `bench` store the activations saved for the backward.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    clap::ValueEnum,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum ActivationDtype {
    /// As computed.
    #[default]
    F32,
    /// Rounded to bf16 (two bytes a value) until the backward reads them.
    Bf16,
}

impl ActivationDtype {
    pub fn name(self) -> &'static str {
        match self {
            ActivationDtype::F32 => "f32",
            ActivationDtype::Bf16 => "bf16",
        }
    }

    /// Applies this setting to a training graph (one with its backward; after any
    /// recomputation, whose copies then read the widened block inputs: `graph::save_memory`
    /// applies both in that order).
    pub fn apply(self, g: &mut Graph) {
        if self == ActivationDtype::Bf16 {
            bf16(g);
        }
    }
}

/// Whether output `k` of `op` is a per-row statistic or a loss, kept in f32.
fn kept_f32(op: &Op, k: usize) -> bool {
    match op {
        Op::LayerNorm { .. } | Op::RmsNorm { .. } | Op::Attention { .. } => k > 0,
        Op::CrossEntropy { .. } | Op::LmHeadLoss { .. } | Op::Mean { .. } => true,
        _ => false,
    }
}

/// Rewrites `g` so that the f32 activations its backward reads are held in bf16 in between.
pub fn bf16(g: &mut Graph) {
    let mut producer = vec![None; g.tensors.len()];
    let mut first_backward_read = vec![None; g.tensors.len()];
    let mut written_by_backward = vec![false; g.tensors.len()];
    for (ni, node) in g.nodes.iter().enumerate() {
        match node.phase {
            Phase::Forward => {
                for (k, &t) in node.outputs.iter().enumerate() {
                    producer[t] = (!kept_f32(&node.op, k)).then_some(ni);
                }
            }
            Phase::Backward => {
                for &t in &node.inputs {
                    first_backward_read[t].get_or_insert(ni);
                }
                for &t in &node.outputs {
                    written_by_backward[t] = true;
                }
            }
            _ => {}
        }
    }
    // Nodes to insert before each node.
    let mut before: Vec<Vec<Node>> = vec![Vec::new(); g.nodes.len() + 1];
    let mut widened = vec![None; g.tensors.len()];
    for t in 0..producer.len() {
        let (Some(p), Some(r)) = (producer[t], first_backward_read[t]) else {
            continue;
        };
        let tensor = &g.tensors[t];
        if tensor.kind != TensorKind::Activation
            || tensor.dtype != DType::F32
            || written_by_backward[t]
        {
            continue;
        }
        let (name, shape, n) = (tensor.name.clone(), tensor.shape.clone(), tensor.numel());
        let saved = g.tensor(
            format!("{name}.bf16"),
            &shape,
            DType::BF16,
            TensorKind::Activation,
        );
        let wide = g.activation(format!("{name}.widened"), &shape);
        let label = &g.nodes[p].label;
        before[p + 1].push(Node {
            op: Op::ToBf16 { n },
            inputs: vec![t],
            outputs: vec![saved],
            phase: Phase::Forward,
            label: format!("{label}.save_bf16"),
        });
        let label = &g.nodes[r].label;
        before[r].push(Node {
            op: Op::FromBf16 { n },
            inputs: vec![saved],
            outputs: vec![wide],
            phase: Phase::Backward,
            label: format!("{label}.load_bf16"),
        });
        widened[t] = Some(wide);
    }
    for node in g.nodes.iter_mut().filter(|n| n.phase == Phase::Backward) {
        for t in node.inputs.iter_mut() {
            if let Some(w) = widened[*t] {
                *t = w;
            }
        }
    }
    g.insert_before(before);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::ir::TensorId;
    use crate::graph::{planner, recompute::Recompute};
    use crate::model::gpt::{self, Mode};
    use crate::model::{GptConfig, ParamTable};

    fn graph(rewrite: (Recompute, ActivationDtype)) -> Graph {
        let cfg = GptConfig {
            n_layer: 3,
            n_head: 2,
            n_embd: 32,
            block_size: 16,
            vocab_size: 40,
            dropout: 0.1,
            bias: true,
        };
        let mut g = gpt::build(&cfg, &ParamTable::new(&cfg), 2, 16, Mode::Train).graph;
        crate::graph::save_memory(&mut g, rewrite.0, rewrite.1);
        g
    }

    /// No backward node reads an f32 activation that a forward node wrote, but the kept ones
    /// (statistics, and the logits that a backward node overwrites in place); every saved
    /// tensor is converted right after the node that writes it.
    #[test]
    fn the_backward_reads_only_widened_copies() {
        for recompute in [Recompute::None, Recompute::Block] {
            let g = graph((recompute, ActivationDtype::Bf16));
            let mut forward_written = vec![None; g.tensors.len()];
            for (_, n) in g.nodes_in(Phase::Forward) {
                for (k, &t) in n.outputs.iter().enumerate() {
                    forward_written[t] = Some((n.op.clone(), k));
                }
            }
            let in_place: Vec<TensorId> = g
                .nodes_in(Phase::Backward)
                .flat_map(|(_, n)| n.outputs.clone())
                .collect();
            let mut conversions = 0;
            for (i, n) in g.nodes.iter().enumerate() {
                if let Op::ToBf16 { .. } = n.op {
                    conversions += 1;
                    // Conversions follow their writer, after any other conversion of its outputs.
                    let writer = (0..i)
                        .rev()
                        .find(|&j| !matches!(g.nodes[j].op, Op::ToBf16 { .. }));
                    let writer = &g.nodes[writer.unwrap()];
                    assert!(writer.outputs.contains(&n.inputs[0]), "{}", n.label);
                }
                if n.phase != Phase::Backward {
                    continue;
                }
                for &id in &n.inputs {
                    let Some((op, k)) = &forward_written[id] else {
                        continue;
                    };
                    let t = &g.tensors[id];
                    if t.kind != TensorKind::Activation || t.dtype != DType::F32 {
                        continue;
                    }
                    let overwritten = in_place.contains(&id);
                    assert!(
                        kept_f32(op, *k) || overwritten || matches!(op, Op::FromBf16 { .. }),
                        "{recompute:?}: {} reads the forward's f32 {}",
                        n.label,
                        t.name
                    );
                }
            }
            assert!(conversions >= 3, "{recompute:?}: {conversions} conversions");
        }
    }

    /// Saving in bf16 shrinks the planned activations, alone and under recomputation.
    #[test]
    fn the_pool_shrinks() {
        let pool = |r| {
            planner::plan(&graph(r), true, u64::MAX)
                .unwrap()
                .planned_bytes
        };
        let f32_kept = pool((Recompute::None, ActivationDtype::F32));
        let bf16_kept = pool((Recompute::None, ActivationDtype::Bf16));
        let f32_recomputed = pool((Recompute::Block, ActivationDtype::F32));
        let bf16_recomputed = pool((Recompute::Block, ActivationDtype::Bf16));
        assert!(bf16_kept < f32_kept * 3 / 4, "{bf16_kept} vs {f32_kept}");
        assert!(
            bf16_recomputed < f32_recomputed,
            "{bf16_recomputed} vs {f32_recomputed}"
        );
    }
}
