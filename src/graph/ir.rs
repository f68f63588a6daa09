//! The graph IR: tensors with static shapes and typed ops over them, in schedule order.
//!
//! Output conventions of backward ops follow the kernels: gradients of parameters always
//! accumulate (`+=`, zeroed at the start of a step); gradients of activations overwrite the
//! first time they are written and accumulate after (`acc`).

use std::fmt;

use crate::gpu::DType;

pub type TensorId = usize;

/// What a graph input holds, for the executor to fill it from a micro-batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Input {
    /// The batch's token ids (B, T).
    Tokens,
    /// The batch's next-token targets (B, T).
    Targets,
    /// The embedding backward's index of the tokens (`kernels::embedding::backward_index`).
    EmbeddingIndex,
}

/// A step result the executor reads back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StepOutput {
    /// The mean loss of a micro-step.
    Loss,
    /// The global gradient norm before clipping.
    GradNorm,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TensorKind {
    /// A model parameter (index into the parameter table); lives outside the graph.
    Param(usize),
    /// A parameter that is read but not trained (the base model under a LoRA adapter): no
    /// gradient, no AdamW moments.
    Frozen(usize),
    /// The gradient of parameter i; lives outside the graph.
    ParamGrad(usize),
    /// AdamW's first and second moments of parameter i.
    AdamM(usize),
    AdamV(usize),
    /// Written by the CPU before each micro-step, from the micro-batch: which part it holds.
    Input(Input),
    /// A constant filled once (e.g. the zero bias of a bias-free LayerNorm).
    Constant(u32),
    /// A constant table written once from `Graph::tables[i]` (RoPE's inverse frequencies).
    Table(usize),
    /// Forward values and gradients of activations: packed by the memory planner.
    Activation,
    Gradient,
    /// Step results kept across micro-steps, the executor reading back the loss and the gradient
    /// norm.
    Result(StepOutput),
    /// The key (`value: false`) or value cache of a layer, (B, NH, Tmax, HS), kept across calls.
    KvCache {
        layer: usize,
        value: bool,
    },
    /// The position-table rows of the tokens being decoded, (Tq, C): copied from the position
    /// table (the `Param` this window belongs to) before each call, at the current position.
    PositionWindow(usize),
}

impl TensorKind {
    /// Whether the memory planner may place this tensor in a shared, reused buffer.
    pub fn planned(self) -> bool {
        matches!(self, TensorKind::Activation | TensorKind::Gradient)
    }
}

#[derive(Clone, Debug)]
pub struct Tensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub dtype: DType,
    pub kind: TensorKind,
}

impl Tensor {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Bytes of its buffer: two-byte elements pad an odd count to a whole 32-bit word.
    pub fn bytes(&self) -> u64 {
        (self.numel() as u64 * self.dtype.size()).div_ceil(4) * 4
    }
}

/// Which part of a training step a node belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Phase {
    /// Once per step, before the first micro-step (zeroing parameter gradients).
    Zero,
    /// Once per micro-step.
    Forward,
    Backward,
    /// Once per step, after the last micro-step (gradient norm, AdamW).
    Optimizer,
}

/// Typed ops. Inputs and outputs are listed in `Node` in the order given for each op.
#[derive(Clone, Debug, PartialEq)]
pub enum Op {
    /// in [tokens (B,T) u32, wte (Vp,C), wpe (maxT,C)] → out [x (B,T,C)]
    Embedding { b: usize, t: usize, c: usize },
    /// in [x (N,C), weight (C), bias (C)] → out [y (N,C), mean (N), rstd (N)]
    LayerNorm { n: usize, c: usize },
    /// in [x (M,K), w (N,K), bias (N)?] → out [y (M,N)]
    Linear {
        m: usize,
        k: usize,
        n: usize,
        bias: bool,
    },
    /// The linear layer and GELU as one GEMM (its epilogue): in [x (M,K), w (N,K), bias (N)?] →
    /// out [y (M,N) = gelu(pre), pre (M,N) = x·wᵀ + bias, kept for the backward]
    LinearGelu {
        m: usize,
        k: usize,
        n: usize,
        bias: bool,
    },
    /// A projection and the residual add as one GEMM: in [x (M,K), w (N,K), bias (N)?, res (M,N)]
    /// → out [y (M,N) = res + x·wᵀ + bias]
    LinearResidual {
        m: usize,
        k: usize,
        n: usize,
        bias: bool,
    },
    /// in [qkv (B,T,W)] → out [y (B,T,C), lse (B,NH,T)]; dropout `p` on the probabilities
    /// (0 = none), with the random stream of `site` as in `Dropout`. NKV key/value heads (NKV
    /// divides NH; NKV = NH is multi-head attention), W = (NH + 2·NKV)·HS: each token's query
    /// heads, key heads and value heads side by side.
    Attention {
        b: usize,
        t: usize,
        nh: usize,
        nkv: usize,
        hs: usize,
        p: f32,
        site: u32,
    },
    /// Decoding with a KV cache: in [qkv (B,Tq,W), k_cache, v_cache (B,NKV,Tmax,HS)] → out
    /// [y (B,Tq,C)]; the queries sit at positions pos0 .. pos0+Tq, set per call.
    AttentionCached {
        b: usize,
        tq: usize,
        nh: usize,
        nkv: usize,
        hs: usize,
        tmax: usize,
    },
    /// in [qkv (B,Tq,W)] → out [k_cache, v_cache], rows pos0 .. pos0+Tq written in place.
    KvAppend {
        b: usize,
        tq: usize,
        nh: usize,
        nkv: usize,
        hs: usize,
        tmax: usize,
    },
    /// in [x (N,C), weight (C)] → out [y (N,C), rstd (N)]: RMSNorm, rows of C channels.
    RmsNorm { n: usize, c: usize, eps: f32 },
    /// Rotary embedding in the rotate-half layout: in [x (B,T,H,D), inv_freq (D/2)] → out
    /// [y (B,T,H,D)], every head rotated, token t at position t.
    Rope {
        b: usize,
        t: usize,
        heads: usize,
        d: usize,
    },
    /// Attention's operand: in [q (B,T,NH·HS), k (B,T,NKV·HS), v (B,T,NKV·HS)] → out
    /// [qkv (B,T,W)], W = (NH + 2·NKV)·HS, the q, k and v rows of each token side by side.
    PackQkv {
        b: usize,
        t: usize,
        nh: usize,
        nkv: usize,
        hs: usize,
    },
    /// in [x (N)] → out [y (N)]
    Gelu { n: usize },
    /// in [gate (N), up (N)] → out [silu(gate) · up (N)]: the gated MLP's activation.
    SwiGlu { n: usize },
    /// in [a (N), b (N)] → out [y (N)]
    Add { n: usize },
    /// in [x (N)] → out [y (N)]; `site` separates the random streams of different dropouts.
    Dropout { n: usize, p: f32, site: u32 },
    /// in [logits (N,Vp), targets (N) u32] → out [losses (N), lse (N)]
    CrossEntropy { n: usize, v: usize, vp: usize },
    /// in [losses (N)] → out [loss (1)] = mean
    Mean { n: usize },
    /// The lm head and cross-entropy over row chunks, for logits too large for one binding:
    /// in [x (N,C), wte (Vp,C), targets (N) u32] → out [losses (N), lse (N), logits (R,Vp)], where
    /// each chunk of R rows (the last may be shorter), in order, computes its logits into the
    /// (R, Vp) buffer and its losses.
    LmHeadLoss {
        n: usize,
        c: usize,
        v: usize,
        vp: usize,
        rows: usize,
    },

    /// in [dx (B,T,C), tokens, index] → out [dwte +=, dwpe +=]
    EmbeddingBackward { b: usize, t: usize, c: usize },
    /// in [dy, x, weight, mean, rstd] → out [dx (acc), dweight +=, dbias +=?]
    LayerNormBackward {
        n: usize,
        c: usize,
        acc: bool,
        bias: bool,
    },
    /// in [dy (M,N), x (M,K), w (N,K)] → out [dx (acc)?, dw +=?, dbias +=?]. With `gelu`, x is
    /// gelu(pre) of a `LinearGelu` and the inputs end with pre (M,K): the GELU backward is folded
    /// into the dx GEMM's epilogue, which writes pre's gradient (dy·w) ⊙ gelu'(pre) as dx
    /// (overwriting; acc is false). Without `dw` (a frozen weight) neither dw nor dbias is
    /// written.
    LinearBackward {
        m: usize,
        k: usize,
        n: usize,
        acc: bool,
        dx: bool,
        dw: bool,
        bias: bool,
        gelu: bool,
    },
    /// in [dy (B,T,C), qkv, y, lse] → out [dqkv] (overwrites); `p` and `site` as in the forward.
    AttentionBackward {
        b: usize,
        t: usize,
        nh: usize,
        nkv: usize,
        hs: usize,
        p: f32,
        site: u32,
    },
    /// in [dy, x, weight, rstd] → out [dx (acc), dweight +=]
    RmsNormBackward { n: usize, c: usize, acc: bool },
    /// in [dy, inv_freq] → out [dx] (overwrites): the rotation by the negative angle.
    RopeBackward {
        b: usize,
        t: usize,
        heads: usize,
        d: usize,
    },
    /// in [dqkv] → out [dq, dk, dv], dqkv's three parts, all overwritten or all added to (`acc`).
    PackQkvBackward {
        b: usize,
        t: usize,
        nh: usize,
        nkv: usize,
        hs: usize,
        acc: bool,
    },
    /// in [dy, x] → out [dx (acc)]
    GeluBackward { n: usize, acc: bool },
    /// in [dy, gate, up] → out [dgate, dup], both overwritten, or both added to (`acc`).
    SwiGluBackward { n: usize, acc: bool },
    /// in [src] → out [dst (acc)]: routes a gradient through a sum.
    Accumulate { n: usize, acc: bool },
    /// in [dy] → out [dx (acc)]
    DropoutBackward {
        n: usize,
        p: f32,
        site: u32,
        acc: bool,
    },
    /// in [logits, lse, targets] → out [logits] overwritten in place with dloss·(softmax − onehot)
    CrossEntropyBackward { n: usize, v: usize, vp: usize },
    /// in [x (N,C), wte (Vp,C), targets, lse (N), logits (R,Vp)] → out [dx (acc), dwte +=?,
    /// logits (R,Vp) scratch]: per chunk, the logits recomputed, then dlogits = dloss·(softmax −
    /// onehot) in place, dx = dlogits·wte, and with `dw` dwte += dlogitsᵀ·x (without it, wte is
    /// frozen and the outputs are [dx, logits]).
    LmHeadLossBackward {
        n: usize,
        c: usize,
        v: usize,
        vp: usize,
        rows: usize,
        acc: bool,
        dw: bool,
    },
    /// A LoRA adapter on a linear layer: in [x (M,K), a (R,K), b (N,R), base (M,N)] → out
    /// [y (M,N) = base + scale · u · bᵀ, u (M,R) = x · aᵀ, kept for the backward]. `base` is the
    /// frozen layer's output; x is the layer's input (after the adapter's dropout, if any).
    Lora {
        m: usize,
        k: usize,
        r: usize,
        n: usize,
        scale: f32,
    },
    /// in [dy (M,N), x (M,K), a (R,K), b (N,R), u (M,R)] → out [dx (acc), da +=, db +=,
    /// du (M,R) scratch]: db += scale · dyᵀ · u, du = scale · dy · b, da += duᵀ · x,
    /// dx = du · a (or +=).
    LoraBackward {
        m: usize,
        k: usize,
        r: usize,
        n: usize,
        scale: f32,
        acc: bool,
    },

    /// in [x (N) f32] → out [y (N) bf16]: x rounded to nearest even, stored two to a word (an
    /// activation saved for the backward in bf16; `saved::bf16`).
    ToBf16 { n: usize },
    /// in [x (N) bf16] → out [y (N) f32]: x widened (exact).
    FromBf16 { n: usize },

    /// in [] → out [x...] = value (one or many tensors: the parameter gradients at once)
    Fill { value: f32 },
    /// in [grads...] → out [norm (1)] = global L2 norm
    GlobalNorm,
    /// in [grad_1..grad_k, norm] → out [param_1..param_k, m_1..m_k, v_1..v_k], updated in place:
    /// one multi-tensor step over k parameters of one weight-decay setting.
    AdamW { decay: bool },
}

impl Op {
    pub fn name(&self) -> &'static str {
        match self {
            Op::Embedding { .. } => "embedding",
            Op::LayerNorm { .. } => "layernorm",
            Op::Linear { .. } => "linear",
            Op::LinearGelu { .. } => "linear_gelu",
            Op::LinearResidual { .. } => "linear_residual",
            Op::Attention { .. } => "attention",
            Op::AttentionCached { .. } => "attention_cached",
            Op::KvAppend { .. } => "kv_append",
            Op::RmsNorm { .. } => "rmsnorm",
            Op::Rope { .. } => "rope",
            Op::PackQkv { .. } => "pack_qkv",
            Op::Gelu { .. } => "gelu",
            Op::SwiGlu { .. } => "swiglu",
            Op::Add { .. } => "add",
            Op::Dropout { .. } => "dropout",
            Op::CrossEntropy { .. } => "cross_entropy",
            Op::Mean { .. } => "mean",
            Op::LmHeadLoss { .. } => "lm_head_loss",
            Op::EmbeddingBackward { .. } => "embedding_backward",
            Op::LayerNormBackward { .. } => "layernorm_backward",
            Op::LinearBackward { .. } => "linear_backward",
            Op::AttentionBackward { .. } => "attention_backward",
            Op::RmsNormBackward { .. } => "rmsnorm_backward",
            Op::RopeBackward { .. } => "rope_backward",
            Op::PackQkvBackward { .. } => "pack_qkv_backward",
            Op::GeluBackward { .. } => "gelu_backward",
            Op::SwiGluBackward { .. } => "swiglu_backward",
            Op::Accumulate { .. } => "accumulate",
            Op::DropoutBackward { .. } => "dropout_backward",
            Op::CrossEntropyBackward { .. } => "cross_entropy_backward",
            Op::LmHeadLossBackward { .. } => "lm_head_loss_backward",
            Op::Lora { .. } => "lora",
            Op::LoraBackward { .. } => "lora_backward",
            Op::ToBf16 { .. } => "to_bf16",
            Op::FromBf16 { .. } => "from_bf16",
            Op::Fill { .. } => "fill",
            Op::GlobalNorm => "global_norm",
            Op::AdamW { .. } => "adamw",
        }
    }
}

#[derive(Clone, Debug)]
pub struct Node {
    pub op: Op,
    pub inputs: Vec<TensorId>,
    pub outputs: Vec<TensorId>,
    pub phase: Phase,
    /// A readable label, e.g. "h.3.attn.c_proj".
    pub label: String,
}

/// Tensors and nodes; nodes are stored in schedule order.
#[derive(Clone, Debug, Default)]
pub struct Graph {
    pub tensors: Vec<Tensor>,
    pub nodes: Vec<Node>,
    /// The contents of the `TensorKind::Table` tensors.
    pub tables: Vec<Vec<f32>>,
    /// The forward nodes of each transformer block, by node index, in order: what
    /// `recompute::blocks` recomputes in the backward.
    pub blocks: Vec<std::ops::Range<usize>>,
}

impl Graph {
    pub fn tensor(
        &mut self,
        name: impl Into<String>,
        shape: &[usize],
        dtype: DType,
        kind: TensorKind,
    ) -> TensorId {
        self.tensors.push(Tensor {
            name: name.into(),
            shape: shape.to_vec(),
            dtype,
            kind,
        });
        self.tensors.len() - 1
    }

    /// A planned f32 activation.
    pub fn activation(&mut self, name: impl Into<String>, shape: &[usize]) -> TensorId {
        self.tensor(name, shape, DType::F32, TensorKind::Activation)
    }

    pub fn push(
        &mut self,
        phase: Phase,
        label: impl Into<String>,
        op: Op,
        inputs: Vec<TensorId>,
        outputs: Vec<TensorId>,
    ) {
        self.nodes.push(Node {
            op,
            inputs,
            outputs,
            phase,
            label: label.into(),
        });
    }

    /// A constant f32 tensor holding `values`, written once.
    pub fn table(&mut self, name: impl Into<String>, values: Vec<f32>) -> TensorId {
        let len = values.len();
        self.tables.push(values);
        let kind = TensorKind::Table(self.tables.len() - 1);
        self.tensor(name, &[len], DType::F32, kind)
    }

    /// Inserts `before[i]` ahead of node i (`before[nodes.len()]` after the last), keeping the
    /// order within each list: how a rewrite of a built graph adds nodes. The block ranges
    /// point at old node indices afterwards, so they are dropped.
    pub fn insert_before(&mut self, mut before: Vec<Vec<Node>>) {
        assert_eq!(before.len(), self.nodes.len() + 1, "one list per gap");
        let added: usize = before.iter().map(Vec::len).sum();
        let mut nodes = Vec::with_capacity(self.nodes.len() + added);
        for (i, node) in std::mem::take(&mut self.nodes).into_iter().enumerate() {
            nodes.append(&mut before[i]);
            nodes.push(node);
        }
        nodes.append(before.last_mut().expect("one list per gap"));
        self.nodes = nodes;
        self.blocks.clear();
    }

    /// Finds a tensor by kind.
    pub fn find(&self, kind: TensorKind) -> Option<TensorId> {
        self.tensors.iter().position(|t| t.kind == kind)
    }

    pub fn nodes_in(&self, phase: Phase) -> impl Iterator<Item = (usize, &Node)> {
        self.nodes
            .iter()
            .enumerate()
            .filter(move |(_, n)| n.phase == phase)
    }
}

impl fmt::Display for Graph {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, n) in self.nodes.iter().enumerate() {
            let names = |ids: &[TensorId]| {
                ids.iter()
                    .map(|&t| {
                        let t = &self.tensors[t];
                        format!("{}{:?}", t.name, t.shape)
                    })
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            writeln!(
                f,
                "{i:4} {:?} {:<22} {:<24} ({}) -> ({})",
                n.phase,
                n.op.name(),
                n.label,
                names(&n.inputs),
                names(&n.outputs)
            )?;
        }
        Ok(())
    }
}
