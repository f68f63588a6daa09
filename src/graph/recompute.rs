//! Activation recomputation (gradient checkpointing): each transformer block keeps only what
//! leaves it (its output, the next block's input) through the forward, and recomputes the
//! activations its backward reads just before that backward runs.
//!
//! The pass rewrites a graph that already has its backward: for each block (`Graph::blocks`),
//! the forward nodes whose outputs the backward reads are copied, in order, into the backward
//! phase right before the first backward node that reads one of them, writing fresh tensors; the
//! backward nodes then read those copies. The forward's own activations of the block are then
//! last read inside the forward, so the memory planner reuses their buffers across blocks, and
//! at any time only one block's activations are held. The copies run the same kernels on the
//! same inputs (dropout draws from the same site and step), so the gradients are the same bits.

use std::collections::{HashMap, HashSet};

use super::ir::{Graph, Node, Phase, TensorId, TensorKind};

/// Whether `train` and `bench` recompute block activations in the backward.
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
pub enum Recompute {
    /// Every activation is kept from the forward to the backward.
    #[default]
    None,
    /// A block keeps its input; the rest is recomputed in its backward.
    Block,
}

impl Recompute {
    pub fn name(self) -> &'static str {
        match self {
            Recompute::None => "none",
            Recompute::Block => "block",
        }
    }

    /// Applies this setting to a training graph (one with its backward).
    pub fn apply(self, g: &mut Graph) {
        if self == Recompute::Block {
            blocks(g);
        }
    }
}

/// Rewrites `g` so that each block's activations read by the backward are recomputed there.
pub fn blocks(g: &mut Graph) {
    // The forward nodes that read each tensor.
    let mut readers: Vec<Vec<usize>> = vec![Vec::new(); g.tensors.len()];
    for (ni, node) in g.nodes_in(Phase::Forward) {
        for &t in &node.inputs {
            readers[t].push(ni);
        }
    }
    let backward: Vec<usize> = g.nodes_in(Phase::Backward).map(|(ni, _)| ni).collect();
    // The copies to insert before each node.
    let mut before: Vec<Vec<Node>> = vec![Vec::new(); g.nodes.len() + 1];
    for block in g.blocks.clone() {
        // A block's internal tensors: written inside it and read by no forward node outside
        // (the block's output is read by the next block, or the final norm, and stays).
        let mut internal = HashSet::new();
        for ni in block.clone() {
            for &t in &g.nodes[ni].outputs {
                let planned = g.tensors[t].kind == TensorKind::Activation;
                if planned && readers[t].iter().all(|r| block.contains(r)) {
                    internal.insert(t);
                }
            }
        }
        let wanted: HashSet<TensorId> = backward
            .iter()
            .flat_map(|&ni| g.nodes[ni].inputs.iter().chain(&g.nodes[ni].outputs))
            .copied()
            .filter(|t| internal.contains(t))
            .collect();
        let Some(&at) = backward.iter().find(|&&ni| {
            let n = &g.nodes[ni];
            n.inputs
                .iter()
                .chain(&n.outputs)
                .any(|t| wanted.contains(t))
        }) else {
            continue;
        };
        // The block's nodes that (transitively) produce what the backward reads.
        let mut need = wanted.clone();
        let mut copy = vec![false; g.nodes.len()];
        for ni in block.clone().rev() {
            if g.nodes[ni].outputs.iter().any(|t| need.contains(t)) {
                copy[ni] = true;
                need.extend(g.nodes[ni].inputs.iter().filter(|t| internal.contains(t)));
            }
        }
        let mut fresh: HashMap<TensorId, TensorId> = HashMap::new();
        let mut copies = Vec::new();
        for ni in block.filter(|&ni| copy[ni]) {
            let node = g.nodes[ni].clone();
            let inputs = node
                .inputs
                .iter()
                .map(|t| *fresh.get(t).unwrap_or(t))
                .collect();
            let outputs = node
                .outputs
                .iter()
                .map(|&t| {
                    let (name, shape) = (
                        format!("{}.recomputed", g.tensors[t].name),
                        g.tensors[t].shape.clone(),
                    );
                    let r = g.tensor(name, &shape, g.tensors[t].dtype, TensorKind::Activation);
                    if internal.contains(&t) {
                        fresh.insert(t, r);
                    }
                    r
                })
                .collect();
            copies.push(Node {
                inputs,
                outputs,
                phase: Phase::Backward,
                label: format!("{}.recompute", node.label),
                ..node
            });
        }
        for &ni in &backward {
            let n = &mut g.nodes[ni];
            for t in n.inputs.iter_mut().chain(n.outputs.iter_mut()) {
                if let Some(&r) = fresh.get(t) {
                    *t = r;
                }
            }
        }
        before[at].extend(copies);
    }
    g.insert_before(before);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::planner;
    use crate::model::gpt::{self, Mode};
    use crate::model::{GptConfig, ParamTable};

    /// The activation pool of a training graph of `n_layer` blocks.
    fn pool(n_layer: usize, recompute: Recompute) -> u64 {
        let cfg = GptConfig {
            n_layer,
            n_head: 2,
            n_embd: 32,
            block_size: 16,
            vocab_size: 40,
            dropout: 0.1,
            bias: true,
        };
        let mut g = gpt::build(&cfg, &ParamTable::new(&cfg), 2, 16, Mode::Train).graph;
        recompute.apply(&mut g);
        planner::plan(&g, true, u64::MAX).unwrap().planned_bytes
    }

    /// Without recomputation each block adds its activations to the pool; with it, a block adds
    /// little more than the input it keeps (one B·T·C tensor of 4 KiB here).
    #[test]
    fn each_block_keeps_little_more_than_its_input() {
        let per_block = |r| (pool(6, r) - pool(2, r)) / 4;
        let (kept, recomputed) = (per_block(Recompute::None), per_block(Recompute::Block));
        assert!(
            recomputed * 4 < kept,
            "a block adds {recomputed} bytes with recomputation, {kept} without"
        );
        assert!(
            recomputed <= 2 * 16 * 32 * 4,
            "{recomputed} bytes per block"
        );
    }

    /// Every forward node of a block that the backward needs is copied once, right before the
    /// block's backward, and the backward reads the copies.
    #[test]
    fn the_backward_reads_the_copies() {
        let cfg = GptConfig {
            n_layer: 2,
            n_head: 2,
            n_embd: 32,
            block_size: 16,
            vocab_size: 40,
            dropout: 0.0,
            bias: true,
        };
        let built = gpt::build(&cfg, &ParamTable::new(&cfg), 2, 16, Mode::Train).graph;
        let mut g = built.clone();
        blocks(&mut g);
        let copies: Vec<&Node> = g
            .nodes
            .iter()
            .filter(|n| n.label.ends_with(".recompute"))
            .collect();
        assert!(!copies.is_empty());
        assert!(copies.iter().all(|n| n.phase == Phase::Backward));
        // The first block's LayerNorm, attention and MLP are all recomputed.
        for op in [
            "layernorm",
            "linear",
            "attention",
            "linear_gelu",
            "linear_residual",
        ] {
            assert!(
                copies
                    .iter()
                    .any(|n| n.op.name() == op && n.label.starts_with("h.0.")),
                "no copy of h.0's {op}"
            );
        }
        // No backward node but a copy reads an activation that a block's forward node wrote
        // and no forward node outside that block reads.
        let forward_written: HashSet<TensorId> = built
            .blocks
            .iter()
            .flat_map(|r| r.clone())
            .flat_map(|ni| built.nodes[ni].outputs.clone())
            .collect();
        let read_outside: HashSet<TensorId> = built
            .nodes_in(Phase::Forward)
            .filter(|(ni, _)| !built.blocks.iter().any(|r| r.contains(ni)))
            .flat_map(|(_, n)| n.inputs.clone())
            .collect();
        let next_block_input = |t: &TensorId| {
            read_outside.contains(t)
                || built.blocks.iter().any(|r| {
                    r.clone().any(|ni| built.nodes[ni].inputs.contains(t))
                        && !r.clone().any(|ni| built.nodes[ni].outputs.contains(t))
                })
        };
        for n in g.nodes_in(Phase::Backward).map(|(_, n)| n) {
            if n.label.ends_with(".recompute") {
                continue;
            }
            for t in &n.inputs {
                assert!(
                    !forward_written.contains(t) || next_block_input(t),
                    "{} reads the forward's {}",
                    n.label,
                    g.tensors[*t].name
                );
            }
        }
    }
}
