//! Reverse-mode automatic differentiation over the forward nodes of a graph, and the optimizer
//! nodes that close a training step.
//!
//! A tensor used by several ops receives one gradient contribution from each: the first backward
//! node to write its gradient overwrites (`acc: false`), the later ones add (`acc: true`), so the
//! residual stream sums without extra buffers. Parameter gradients always add and are zeroed once
//! per step, which also sums the tied token embedding's two uses (embedding and lm head) and
//! accumulates over micro-steps.

use std::collections::HashMap;

use super::ir::{Graph, Op, Phase, TensorId, TensorKind};
use crate::gpu::DType;

/// What `append_backward` added.
#[derive(Clone, Debug)]
pub struct Backward {
    /// Gradient tensor of each parameter tensor, by the parameter's tensor id.
    pub param_grads: Vec<(TensorId, TensorId)>,
    /// The embedding-backward index input (written by the CPU with the tokens).
    pub embedding_index: Option<TensorId>,
}

struct Grads {
    of: HashMap<TensorId, TensorId>,
    param: HashMap<TensorId, TensorId>,
}

impl Grads {
    /// The gradient tensor of `x` and whether a backward node must accumulate into it.
    fn get(&mut self, g: &mut Graph, x: TensorId) -> (TensorId, bool) {
        if let Some(&d) = self.param.get(&x) {
            return (d, true);
        }
        if let Some(&d) = self.of.get(&x) {
            return (d, true);
        }
        let t = &g.tensors[x];
        let (name, shape) = (format!("d.{}", t.name), t.shape.clone());
        let d = g.tensor(name, &shape, DType::F32, TensorKind::Gradient);
        self.of.insert(x, d);
        (d, false)
    }
}

/// Appends backward nodes for every forward node that reaches the loss (the per-position losses
/// of the `CrossEntropy` or `LmHeadLoss` node; its backward applies dloss itself).
pub fn append_backward(g: &mut Graph) -> Backward {
    let mut grads = Grads {
        of: HashMap::new(),
        param: HashMap::new(),
    };
    let params: Vec<TensorId> = (0..g.tensors.len())
        .filter(|&t| matches!(g.tensors[t].kind, TensorKind::Param(_)))
        .collect();
    let mut param_grads = Vec::new();
    for p in params {
        let TensorKind::Param(i) = g.tensors[p].kind else {
            unreachable!()
        };
        let (name, shape) = (
            format!("d.{}", g.tensors[p].name),
            g.tensors[p].shape.clone(),
        );
        let d = g.tensor(name, &shape, DType::F32, TensorKind::ParamGrad(i));
        grads.param.insert(p, d);
        param_grads.push((p, d));
    }
    let mut embedding_index = None;

    let forward: Vec<usize> = g.nodes_in(Phase::Forward).map(|(i, _)| i).collect();
    // How many forward nodes read each tensor, and the pre-activation of each `LinearGelu` output:
    // a GELU output read once, by a linear layer, gets no gradient of its own; that layer's
    // backward GEMM writes the pre-activation's gradient in its epilogue.
    let mut uses = vec![0usize; g.tensors.len()];
    let mut pre_of = HashMap::new();
    for &ni in &forward {
        let node = &g.nodes[ni];
        for &t in &node.inputs {
            uses[t] += 1;
        }
        if let Op::LinearGelu { .. } = node.op {
            pre_of.insert(node.outputs[0], node.outputs[1]);
        }
    }
    let folded_pre = |x: TensorId| pre_of.get(&x).copied().filter(|_| uses[x] == 1);
    for &ni in forward.iter().rev() {
        let node = g.nodes[ni].clone();
        let label = node.label.clone();
        let (ins, outs) = (&node.inputs, &node.outputs);
        if let Op::CrossEntropy { n, v, vp } = node.op {
            let logits = ins[0];
            grads.of.insert(logits, logits);
            g.push(
                Phase::Backward,
                label,
                Op::CrossEntropyBackward { n, v, vp },
                vec![logits, outs[1], ins[1]],
                vec![logits],
            );
            continue;
        }
        if let Op::LmHeadLoss { n, c, v, vp, rows } = node.op {
            let (dx, acc) = grads.get(g, ins[0]);
            let (dwte, _) = grads.get(g, ins[1]);
            g.push(
                Phase::Backward,
                label,
                Op::LmHeadLossBackward {
                    n,
                    c,
                    v,
                    vp,
                    rows,
                    acc,
                },
                vec![ins[0], ins[1], ins[2], outs[1], outs[2]],
                vec![dx, dwte, outs[2]],
            );
            continue;
        }
        if let Op::LinearGelu { m, k, n, bias } = node.op {
            // The pre-activation's gradient: written by the consumer's backward GEMM, or here
            // from the output's.
            let dpre = match (grads.of.get(&outs[1]), grads.of.get(&outs[0])) {
                (Some(&dpre), _) => dpre,
                (None, Some(&dy)) => {
                    let (dpre, _) = grads.get(g, outs[1]);
                    g.push(
                        Phase::Backward,
                        format!("{label}.gelu"),
                        Op::GeluBackward {
                            n: m * n,
                            acc: false,
                        },
                        vec![dy, outs[1]],
                        vec![dpre],
                    );
                    dpre
                }
                (None, None) => continue, // does not reach the loss
            };
            let linear = LinearShape { m, k, n, bias };
            linear_backward(g, &mut grads, label, linear, dpre, ins, None);
            continue;
        }
        let Some(&dy) = grads.of.get(&outs[0]) else {
            continue; // does not reach the loss
        };
        match node.op {
            Op::Embedding { b, t, c } => {
                let len = crate::kernels::embedding::backward_index_len(b * t);
                let index = g.tensor("embedding_index", &[len], DType::U32, TensorKind::Input);
                embedding_index = Some(index);
                let (dwte, _) = grads.get(g, ins[1]);
                let (dwpe, _) = grads.get(g, ins[2]);
                g.push(
                    Phase::Backward,
                    label,
                    Op::EmbeddingBackward { b, t, c },
                    vec![dy, ins[0], index],
                    vec![dwte, dwpe],
                );
            }
            Op::LayerNorm { n, c } => {
                let (dx, acc) = grads.get(g, ins[0]);
                let (dw, _) = grads.get(g, ins[1]);
                let bias = grads.param.contains_key(&ins[2]);
                let mut out = vec![dx, dw];
                if bias {
                    out.push(grads.get(g, ins[2]).0);
                }
                g.push(
                    Phase::Backward,
                    label,
                    Op::LayerNormBackward { n, c, acc, bias },
                    vec![dy, ins[0], ins[1], outs[1], outs[2]],
                    out,
                );
            }
            Op::Linear { m, k, n, bias } => {
                let linear = LinearShape { m, k, n, bias };
                linear_backward(g, &mut grads, label, linear, dy, ins, folded_pre(ins[0]));
            }
            Op::LinearResidual { m, k, n, bias } => {
                let linear = LinearShape { m, k, n, bias };
                let pre = folded_pre(ins[0]);
                linear_backward(g, &mut grads, label.clone(), linear, dy, ins, pre);
                // The residual stream's gradient is dy itself, as for `Add`'s first operand.
                let res = ins[ins.len() - 1];
                if !grads.of.contains_key(&res) && !grads.param.contains_key(&res) {
                    grads.of.insert(res, dy);
                } else {
                    let (dres, acc) = grads.get(g, res);
                    g.push(
                        Phase::Backward,
                        format!("{label}.res"),
                        Op::Accumulate { n: m * n, acc },
                        vec![dy],
                        vec![dres],
                    );
                }
            }
            Op::Attention {
                b,
                t,
                nh,
                hs,
                p,
                site,
            } => {
                let (dqkv, acc) = grads.get(g, ins[0]);
                assert!(
                    !acc,
                    "attention backward overwrites dqkv; qkv must have one use"
                );
                g.push(
                    Phase::Backward,
                    label,
                    Op::AttentionBackward {
                        b,
                        t,
                        nh,
                        hs,
                        p,
                        site,
                    },
                    vec![dy, ins[0], outs[0], outs[1]],
                    vec![dqkv],
                );
            }
            Op::Gelu { n } => {
                let (dx, acc) = grads.get(g, ins[0]);
                g.push(
                    Phase::Backward,
                    label,
                    Op::GeluBackward { n, acc },
                    vec![dy, ins[0]],
                    vec![dx],
                );
            }
            Op::Dropout { n, p, site } => {
                let (dx, acc) = grads.get(g, ins[0]);
                g.push(
                    Phase::Backward,
                    label,
                    Op::DropoutBackward { n, p, site, acc },
                    vec![dy],
                    vec![dx],
                );
            }
            Op::Add { n } => {
                let (a, b) = (ins[0], ins[1]);
                // b's gradient is a copy (or a sum) of dy...
                let (db, acc) = grads.get(g, b);
                g.push(
                    Phase::Backward,
                    format!("{label}.b"),
                    Op::Accumulate { n, acc },
                    vec![dy],
                    vec![db],
                );
                // ...while a, typically the residual stream, takes dy's buffer itself when it has
                // no gradient yet: dy is dead after this node, so later contributions can add to it.
                if a != b && !grads.of.contains_key(&a) && !grads.param.contains_key(&a) {
                    grads.of.insert(a, dy);
                } else {
                    let (da, acc) = grads.get(g, a);
                    g.push(
                        Phase::Backward,
                        format!("{label}.a"),
                        Op::Accumulate { n, acc },
                        vec![dy],
                        vec![da],
                    );
                }
            }
            Op::Mean { .. } => {}
            ref other => panic!("no gradient rule for {}", other.name()),
        }
    }
    Backward {
        param_grads,
        embedding_index,
    }
}

#[derive(Clone, Copy)]
struct LinearShape {
    m: usize,
    k: usize,
    n: usize,
    bias: bool,
}

/// The backward of a linear layer with input `ins[0]`, weight `ins[1]` and bias `ins[2]`, from
/// its output's gradient `dy`. With `pre`, the input is gelu(pre) read by this layer alone: the
/// dx GEMM writes pre's gradient instead (the GELU backward in its epilogue).
fn linear_backward(
    g: &mut Graph,
    grads: &mut Grads,
    label: String,
    shape: LinearShape,
    dy: TensorId,
    ins: &[TensorId],
    pre: Option<TensorId>,
) {
    let LinearShape { m, k, n, bias } = shape;
    let (dx, acc) = grads.get(g, pre.unwrap_or(ins[0]));
    assert!(
        !(pre.is_some() && acc),
        "a folded GELU backward overwrites the pre-activation's gradient"
    );
    let (dw, _) = grads.get(g, ins[1]);
    let mut out = vec![dx, dw];
    if bias {
        out.push(grads.get(g, ins[2]).0);
    }
    let mut inputs = vec![dy, ins[0], ins[1]];
    inputs.extend(pre);
    g.push(
        Phase::Backward,
        label,
        Op::LinearBackward {
            m,
            k,
            n,
            acc,
            dx: true,
            bias,
            gelu: pre.is_some(),
        },
        inputs,
        out,
    );
}

/// Appends the optimizer: one node zeroing every parameter gradient (phase Zero), the global
/// gradient norm, and one AdamW node over all the parameters that take weight decay and one over
/// those that do not (phase Optimizer). These nodes are multi-tensor: the executor runs each over
/// the store's flat buffers in a few dispatches. `decay(i)` says whether parameter i takes weight
/// decay. Returns the norm tensor.
pub fn append_optimizer(g: &mut Graph, bw: &Backward, decay: impl Fn(usize) -> bool) -> TensorId {
    let grads: Vec<TensorId> = bw.param_grads.iter().map(|&(_, d)| d).collect();
    g.push(
        Phase::Zero,
        "zero_grads",
        Op::Fill { value: 0.0 },
        vec![],
        grads.clone(),
    );
    let norm = g.tensor("grad_norm", &[1], DType::F32, TensorKind::Result);
    g.push(
        Phase::Optimizer,
        "grad_norm",
        Op::GlobalNorm,
        grads,
        vec![norm],
    );
    for class in [true, false] {
        let (mut ds, mut ps, mut ms, mut vs) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for &(p, d) in &bw.param_grads {
            let TensorKind::Param(i) = g.tensors[p].kind else {
                unreachable!()
            };
            if decay(i) != class {
                continue;
            }
            let (name, shape) = (g.tensors[p].name.clone(), g.tensors[p].shape.clone());
            ms.push(g.tensor(
                format!("m.{name}"),
                &shape,
                DType::F32,
                TensorKind::AdamM(i),
            ));
            vs.push(g.tensor(
                format!("v.{name}"),
                &shape,
                DType::F32,
                TensorKind::AdamV(i),
            ));
            ds.push(d);
            ps.push(p);
        }
        if ps.is_empty() {
            continue;
        }
        ds.push(norm);
        let label = if class {
            "adamw.decay"
        } else {
            "adamw.no_decay"
        };
        let outputs = [ps, ms, vs].concat();
        g.push(
            Phase::Optimizer,
            label,
            Op::AdamW { decay: class },
            ds,
            outputs,
        );
    }
    norm
}
