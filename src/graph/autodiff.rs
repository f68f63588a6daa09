//! Reverse-mode automatic differentiation over the forward nodes of a graph, and the optimizer
//! nodes that close a training step.
//!
//! A tensor used by several ops receives one gradient contribution from each: the first backward
//! node to write its gradient overwrites (`acc: false`), the later ones add (`acc: true`), so the
//! residual stream sums without extra buffers. Parameter gradients always add and are zeroed once
//! per step, which also sums the tied token embedding's two uses (embedding and lm head) and
//! accumulates over micro-steps.

use std::collections::HashMap;

use super::ir::{Graph, Input, Node, Op, Phase, StepOutput, TensorId, TensorKind};
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
    let param_grads = add_param_grads(g, &mut grads);
    let forward: Vec<usize> = g.nodes_in(Phase::Forward).map(|(i, _)| i).collect();
    let folded = FoldedGelu::new(g, &forward);
    let mut bp = Backprop {
        g,
        grads,
        folded,
        embedding_index: None,
    };
    for &ni in forward.iter().rev() {
        let node = bp.g.nodes[ni].clone();
        bp.node(&node);
    }
    Backward {
        param_grads,
        embedding_index: bp.embedding_index,
    }
}

/// Creates the gradient tensor of every parameter, in parameter-tensor order.
fn add_param_grads(g: &mut Graph, grads: &mut Grads) -> Vec<(TensorId, TensorId)> {
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
    param_grads
}

/// Which GELU outputs get no gradient of their own: a `LinearGelu` output read once, by a linear
/// layer, whose backward GEMM writes the pre-activation's gradient in its epilogue instead.
struct FoldedGelu {
    /// How many forward nodes read each tensor.
    uses: Vec<usize>,
    /// The pre-activation of each `LinearGelu` output.
    pre_of: HashMap<TensorId, TensorId>,
}

impl FoldedGelu {
    fn new(g: &Graph, forward: &[usize]) -> FoldedGelu {
        let mut uses = vec![0usize; g.tensors.len()];
        let mut pre_of = HashMap::new();
        for &ni in forward {
            let node = &g.nodes[ni];
            for &t in &node.inputs {
                uses[t] += 1;
            }
            if let Op::LinearGelu { .. } = node.op {
                pre_of.insert(node.outputs[0], node.outputs[1]);
            }
        }
        FoldedGelu { uses, pre_of }
    }

    /// The pre-activation whose gradient the backward of a linear layer reading `x` writes.
    fn pre(&self, x: TensorId) -> Option<TensorId> {
        self.pre_of.get(&x).copied().filter(|_| self.uses[x] == 1)
    }
}

/// The state of one backward pass: the graph it appends to and the gradients created so far.
/// Each method below is the gradient rule of one forward op, from the node and its output's
/// gradient `dy`.
struct Backprop<'g> {
    g: &'g mut Graph,
    grads: Grads,
    folded: FoldedGelu,
    embedding_index: Option<TensorId>,
}

impl Backprop<'_> {
    /// Appends the backward of one forward node, if it reaches the loss.
    fn node(&mut self, node: &Node) {
        let (ins, outs) = (&node.inputs, &node.outputs);
        // The losses and the fused linear-GELU find their gradients themselves.
        match node.op {
            Op::CrossEntropy { n, v, vp } => return self.cross_entropy(node, n, v, vp),
            Op::LmHeadLoss { n, c, v, vp, rows } => {
                return self.lm_head_loss(node, n, c, v, vp, rows);
            }
            Op::LinearGelu { m, k, n, bias } => {
                return self.linear_gelu(node, LinearShape { m, k, n, bias });
            }
            _ => {}
        }
        let Some(&dy) = self.grads.of.get(&outs[0]) else {
            return; // does not reach the loss
        };
        match node.op {
            Op::Embedding { b, t, c } => self.embedding(node, dy, b, t, c),
            Op::LayerNorm { n, c } => self.layernorm(node, dy, n, c),
            Op::Linear { m, k, n, bias } => {
                let pre = self.folded.pre(ins[0]);
                self.linear(&node.label, LinearShape { m, k, n, bias }, dy, ins, pre);
            }
            Op::LinearResidual { m, k, n, bias } => {
                self.linear_residual(node, LinearShape { m, k, n, bias }, dy);
            }
            Op::Attention {
                b,
                t,
                nh,
                nkv,
                hs,
                p,
                site,
            } => {
                let backward = Op::AttentionBackward {
                    b,
                    t,
                    nh,
                    nkv,
                    hs,
                    p,
                    site,
                };
                self.attention(node, dy, backward);
            }
            Op::RmsNorm { n, c, .. } => self.rmsnorm(node, dy, n, c),
            Op::Rope { b, t, heads, d } => self.rope(node, dy, Op::RopeBackward { b, t, heads, d }),
            Op::PackQkv { b, t, nh, nkv, hs } => {
                let backward = |acc| Op::PackQkvBackward {
                    b,
                    t,
                    nh,
                    nkv,
                    hs,
                    acc,
                };
                self.pack_qkv(node, dy, backward);
            }
            Op::Gelu { n } => self.gelu(node, dy, n),
            Op::SwiGlu { n } => self.swiglu(node, dy, n),
            Op::Dropout { n, p, site } => self.dropout(node, dy, n, p, site),
            Op::Add { n } => self.add(node, dy, n),
            Op::Lora { m, k, r, n, scale } => self.lora(node, dy, (m, k, r, n), scale),
            Op::Mean { .. } => {}
            ref other => panic!("no gradient rule for {}", other.name()),
        }
    }

    /// The gradient tensor of `x` and whether a backward node must accumulate into it.
    fn grad(&mut self, x: TensorId) -> (TensorId, bool) {
        self.grads.get(self.g, x)
    }

    /// Whether `x` is a parameter that takes no gradient.
    fn frozen(&self, x: TensorId) -> bool {
        matches!(self.g.tensors[x].kind, TensorKind::Frozen(_))
    }

    /// The tensor a kernel that always adds to its weight's gradient (`+=`) writes it to: the
    /// parameter's gradient, or, for a frozen weight, a scratch tensor that nothing reads (small:
    /// a normalization's weight).
    fn weight_grad(&mut self, w: TensorId) -> TensorId {
        if !self.frozen(w) {
            return self.grad(w).0;
        }
        let t = &self.g.tensors[w];
        let (name, shape) = (format!("d.{}.unused", t.name), t.shape.clone());
        self.g
            .tensor(name, &shape, DType::F32, TensorKind::Gradient)
    }

    /// Whether `x` has a gradient tensor yet.
    fn has_grad(&self, x: TensorId) -> bool {
        self.grads.of.contains_key(&x) || self.grads.param.contains_key(&x)
    }

    fn push(&mut self, label: impl Into<String>, op: Op, ins: Vec<TensorId>, outs: Vec<TensorId>) {
        self.g.push(Phase::Backward, label, op, ins, outs);
    }

    /// The logits' gradient overwrites the logits in place.
    fn cross_entropy(&mut self, node: &Node, n: usize, v: usize, vp: usize) {
        let (ins, outs) = (&node.inputs, &node.outputs);
        let logits = ins[0];
        self.grads.of.insert(logits, logits);
        let op = Op::CrossEntropyBackward { n, v, vp };
        self.push(&node.label, op, vec![logits, outs[1], ins[1]], vec![logits]);
    }

    /// From the loss itself, as `cross_entropy`: the backward recomputes each chunk's logits and
    /// their gradient (dloss applied), then writes dx and adds to dwte.
    fn lm_head_loss(&mut self, node: &Node, n: usize, c: usize, v: usize, vp: usize, rows: usize) {
        let (ins, outs) = (&node.inputs, &node.outputs);
        let (dx, acc) = self.grad(ins[0]);
        let dw = !self.frozen(ins[1]);
        let op = Op::LmHeadLossBackward {
            n,
            c,
            v,
            vp,
            rows,
            acc,
            dw,
        };
        let inputs = vec![ins[0], ins[1], ins[2], outs[1], outs[2]];
        let mut out = vec![dx];
        if dw {
            out.push(self.grad(ins[1]).0);
        }
        out.push(outs[2]);
        self.push(&node.label, op, inputs, out);
    }

    fn linear_gelu(&mut self, node: &Node, linear: LinearShape) {
        let (label, outs) = (&node.label, &node.outputs);
        // The pre-activation's gradient: written by the consumer's backward GEMM, or here
        // from the output's.
        let dpre = match (self.grads.of.get(&outs[1]), self.grads.of.get(&outs[0])) {
            (Some(&dpre), _) => dpre,
            (None, Some(&dy)) => {
                let (dpre, _) = self.grad(outs[1]);
                let op = Op::GeluBackward {
                    n: linear.m * linear.n,
                    acc: false,
                };
                self.push(format!("{label}.gelu"), op, vec![dy, outs[1]], vec![dpre]);
                dpre
            }
            (None, None) => return, // does not reach the loss
        };
        self.linear(label, linear, dpre, &node.inputs, None);
    }

    /// Also creates the index input of the embedding backward, for the CPU to write. A frozen
    /// token table (and position table) takes no gradient: nothing to do.
    fn embedding(&mut self, node: &Node, dy: TensorId, b: usize, t: usize, c: usize) {
        let ins = &node.inputs;
        if self.frozen(ins[1]) {
            assert!(
                !self.grads.param.contains_key(&ins[2]),
                "{}: a trained position table beside a frozen token table",
                node.label
            );
            return;
        }
        let len = crate::kernels::embedding::backward_index_len(b * t);
        let kind = TensorKind::Input(Input::EmbeddingIndex);
        let index = self.g.tensor("embedding_index", &[len], DType::U32, kind);
        self.embedding_index = Some(index);
        let (dwte, _) = self.grad(ins[1]);
        let mut outs = vec![dwte];
        // A constant position table (the rotary models' zeros) takes no gradient.
        if self.grads.param.contains_key(&ins[2]) {
            outs.push(self.grad(ins[2]).0);
        }
        let op = Op::EmbeddingBackward { b, t, c };
        self.push(&node.label, op, vec![dy, ins[0], index], outs);
    }

    fn layernorm(&mut self, node: &Node, dy: TensorId, n: usize, c: usize) {
        let (ins, outs) = (&node.inputs, &node.outputs);
        let (dx, acc) = self.grad(ins[0]);
        let dw = self.weight_grad(ins[1]);
        let bias = self.grads.param.contains_key(&ins[2]);
        let mut out = vec![dx, dw];
        if bias {
            out.push(self.grad(ins[2]).0);
        }
        let op = Op::LayerNormBackward { n, c, acc, bias };
        self.push(
            &node.label,
            op,
            vec![dy, ins[0], ins[1], outs[1], outs[2]],
            out,
        );
    }

    /// The backward of a linear layer with input `ins[0]`, weight `ins[1]` and bias `ins[2]`,
    /// from its output's gradient `dy`. With `pre`, the input is gelu(pre) read by this layer
    /// alone: the dx GEMM writes pre's gradient instead (the GELU backward in its epilogue).
    fn linear(
        &mut self,
        label: &str,
        shape: LinearShape,
        dy: TensorId,
        ins: &[TensorId],
        pre: Option<TensorId>,
    ) {
        let LinearShape { m, k, n, bias } = shape;
        let (dx, acc) = self.grad(pre.unwrap_or(ins[0]));
        assert!(
            !(pre.is_some() && acc),
            "a folded GELU backward overwrites the pre-activation's gradient"
        );
        // A frozen weight (and its bias, frozen with it) takes no gradient.
        let dw = !self.frozen(ins[1]);
        let bias = bias && dw;
        let mut out = vec![dx];
        if dw {
            out.push(self.grad(ins[1]).0);
        }
        if bias {
            out.push(self.grad(ins[2]).0);
        }
        let mut inputs = vec![dy, ins[0], ins[1]];
        inputs.extend(pre);
        let op = Op::LinearBackward {
            m,
            k,
            n,
            acc,
            dx: true,
            dw,
            bias,
            gelu: pre.is_some(),
        };
        self.push(label, op, inputs, out);
    }

    fn linear_residual(&mut self, node: &Node, linear: LinearShape, dy: TensorId) {
        let ins = &node.inputs;
        let pre = self.folded.pre(ins[0]);
        self.linear(&node.label, linear, dy, ins, pre);
        // The residual stream's gradient is dy itself, as for `Add`'s first operand.
        let res = ins[ins.len() - 1];
        let label = format!("{}.res", node.label);
        self.pass_through(label, linear.m * linear.n, dy, res);
    }

    /// `backward` is the node's `AttentionBackward` op.
    fn attention(&mut self, node: &Node, dy: TensorId, backward: Op) {
        let (ins, outs) = (&node.inputs, &node.outputs);
        let (dqkv, acc) = self.grad(ins[0]);
        assert!(
            !acc,
            "attention backward overwrites dqkv; qkv must have one use"
        );
        self.push(
            &node.label,
            backward,
            vec![dy, ins[0], outs[0], outs[1]],
            vec![dqkv],
        );
    }

    /// dx overwritten or added to; the weight's gradient always added to (a parameter's).
    fn rmsnorm(&mut self, node: &Node, dy: TensorId, n: usize, c: usize) {
        let (ins, outs) = (&node.inputs, &node.outputs);
        let (dx, acc) = self.grad(ins[0]);
        let dw = self.weight_grad(ins[1]);
        let op = Op::RmsNormBackward { n, c, acc };
        let inputs = vec![dy, ins[0], ins[1], outs[1]];
        self.push(&node.label, op, inputs, vec![dx, dw]);
    }

    /// The rotation back by the negative angle, which overwrites: into x's gradient when it has
    /// none yet, else into a buffer of its own that is then added to it.
    fn rope(&mut self, node: &Node, dy: TensorId, backward: Op) {
        let (x, inv_freq) = (node.inputs[0], node.inputs[1]);
        let (dx, acc) = self.grad(x);
        if !acc {
            self.push(&node.label, backward, vec![dy, inv_freq], vec![dx]);
            return;
        }
        let t = &self.g.tensors[x];
        let (name, shape, n) = (format!("d.{}.rope", t.name), t.shape.clone(), t.numel());
        let part = self
            .g
            .tensor(name, &shape, DType::F32, TensorKind::Gradient);
        self.push(&node.label, backward, vec![dy, inv_freq], vec![part]);
        let label = format!("{}.acc", node.label);
        self.push(label, Op::Accumulate { n, acc: true }, vec![part], vec![dx]);
    }

    /// One kernel pair writes dq, dk and dv with one `accumulate` flag, as `swiglu` does.
    fn pack_qkv(&mut self, node: &Node, dy: TensorId, backward: impl Fn(bool) -> Op) {
        let ins = &node.inputs;
        assert!(
            ins[0] != ins[1] && ins[1] != ins[2] && ins[0] != ins[2],
            "{}: q, k and v must be three tensors",
            node.label
        );
        let grads: Vec<(TensorId, bool)> = ins.iter().map(|&x| self.grad(x)).collect();
        let acc = grads.iter().any(|&(_, a)| a);
        for &(d, a) in &grads {
            if acc && !a {
                self.push(&node.label, Op::Fill { value: 0.0 }, vec![], vec![d]);
            }
        }
        let outs = grads.iter().map(|&(d, _)| d).collect();
        self.push(&node.label, backward(acc), vec![dy], outs);
    }

    /// One kernel writes both gradients, so they are both overwritten or both added to: a
    /// gradient met for the first time beside one that already holds a sum starts from zero.
    fn swiglu(&mut self, node: &Node, dy: TensorId, n: usize) {
        let (gate, up) = (node.inputs[0], node.inputs[1]);
        // One invocation writes both gradients: they must be two buffers.
        assert_ne!(
            gate, up,
            "{}: swiglu's gate and up are one tensor",
            node.label
        );
        let (dgate, acc_gate) = self.grad(gate);
        let (dup, acc_up) = self.grad(up);
        let acc = acc_gate || acc_up;
        for (d, fresh) in [(dgate, !acc_gate), (dup, !acc_up)] {
            if acc && fresh {
                self.push(&node.label, Op::Fill { value: 0.0 }, vec![], vec![d]);
            }
        }
        self.push(
            &node.label,
            Op::SwiGluBackward { n, acc },
            vec![dy, gate, up],
            vec![dgate, dup],
        );
    }

    fn gelu(&mut self, node: &Node, dy: TensorId, n: usize) {
        let x = node.inputs[0];
        let (dx, acc) = self.grad(x);
        self.push(
            &node.label,
            Op::GeluBackward { n, acc },
            vec![dy, x],
            vec![dx],
        );
    }

    fn dropout(&mut self, node: &Node, dy: TensorId, n: usize, p: f32, site: u32) {
        let (dx, acc) = self.grad(node.inputs[0]);
        let op = Op::DropoutBackward { n, p, site, acc };
        self.push(&node.label, op, vec![dy], vec![dx]);
    }

    /// The adapter's A and B gradients (added to), x's, and the frozen base output's: dy itself.
    fn lora(
        &mut self,
        node: &Node,
        dy: TensorId,
        (m, k, r, n): (usize, usize, usize, usize),
        scale: f32,
    ) {
        let (ins, outs) = (&node.inputs, &node.outputs);
        let (dx, acc) = self.grad(ins[0]);
        let (da, _) = self.grad(ins[1]);
        let (db, _) = self.grad(ins[2]);
        let du_name = format!("d.{}", self.g.tensors[outs[1]].name);
        let du = self
            .g
            .tensor(du_name, &[m, r], DType::F32, TensorKind::Gradient);
        let op = Op::LoraBackward {
            m,
            k,
            r,
            n,
            scale,
            acc,
        };
        let inputs = vec![dy, ins[0], ins[1], ins[2], outs[1]];
        self.push(&node.label, op, inputs, vec![dx, da, db, du]);
        self.pass_through(format!("{}.base", node.label), m * n, dy, ins[3]);
    }

    fn add(&mut self, node: &Node, dy: TensorId, n: usize) {
        let (a, b) = (node.inputs[0], node.inputs[1]);
        // b's gradient is a copy (or a sum) of dy...
        let (db, acc) = self.grad(b);
        let label = format!("{}.b", node.label);
        self.push(label, Op::Accumulate { n, acc }, vec![dy], vec![db]);
        // ...while a, typically the residual stream, takes dy's buffer itself when it has no
        // gradient yet (when a is b, it has one by now).
        self.pass_through(format!("{}.a", node.label), n, dy, a);
    }

    /// Routes `dy` unchanged into `x`'s gradient: when `x` has none yet, dy's buffer becomes it
    /// (dy is dead after this node, so later contributions can add to it); otherwise dy is added
    /// to (or copied into) the one it has.
    fn pass_through(&mut self, label: String, n: usize, dy: TensorId, x: TensorId) {
        if !self.has_grad(x) {
            self.grads.of.insert(x, dy);
        } else {
            let (dx, acc) = self.grad(x);
            self.push(label, Op::Accumulate { n, acc }, vec![dy], vec![dx]);
        }
    }
}

#[derive(Clone, Copy)]
struct LinearShape {
    m: usize,
    k: usize,
    n: usize,
    bias: bool,
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
    let kind = TensorKind::Result(StepOutput::GradNorm);
    let norm = g.tensor("grad_norm", &[1], DType::F32, kind);
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
