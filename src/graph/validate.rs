//! The graph's CPU reference: for one node, compute what its outputs must be from the values of
//! its inputs (and, for accumulating outputs, the outputs' values before the node ran). Used by
//! `Executor::validate`, which runs a micro-step node by node and compares every output.

use super::ir::{Node, Op};
use crate::reference as r;

/// A tensor's contents on the CPU.
#[derive(Clone, Debug)]
pub enum Data {
    F32(Vec<f32>),
    U32(Vec<u32>),
}

impl Data {
    pub fn f(&self) -> &[f32] {
        match self {
            Data::F32(v) => v,
            Data::U32(_) => panic!("expected an f32 tensor"),
        }
    }

    pub fn u(&self) -> &[u32] {
        match self {
            Data::U32(v) => v,
            Data::F32(_) => panic!("expected a u32 tensor"),
        }
    }
}

/// Tolerance (atol, rtol) for comparing a node's GPU outputs with the reference: exact-order
/// elementwise ops are tight; reductions whose summation order differs get room for rounding.
pub fn tolerance(op: &Op) -> (f64, f64) {
    match op {
        // Rounding is defined to the bit.
        Op::ToBf16 { .. } | Op::FromBf16 { .. } => (0.0, 0.0),
        Op::Add { .. }
        | Op::Accumulate { .. }
        | Op::Fill { .. }
        | Op::Embedding { .. }
        | Op::PackQkv { .. } => (1e-6, 1e-6),
        // Sums of G values in head order, as the kernel adds them.
        Op::PackQkvBackward { .. } => (1e-6, 1e-5),
        Op::Gelu { .. }
        | Op::GeluBackward { .. }
        | Op::SwiGlu { .. }
        | Op::SwiGluBackward { .. }
        | Op::Dropout { .. }
        | Op::DropoutBackward { .. } => (1e-6, 1e-5),
        _ => (2e-5, 1e-3),
    }
}

/// What the (R, Vp) chunk buffer of `LmHeadLoss` holds at the end, chunks of `full` (N, Vp) being
/// written in order: the last chunk's rows, then, where that chunk is shorter than R, the rows of
/// the chunk before it (or the prior values when there is none).
fn last_chunk(chunk: &mut [f32], full: &[f32], n: usize, vp: usize, rows: usize) {
    let start = (n - 1) / rows * rows;
    let m = n - start;
    chunk[..m * vp].copy_from_slice(&full[start * vp..]);
    if start >= rows {
        chunk[m * vp..].copy_from_slice(&full[(start - rows + m) * vp..start * vp]);
    }
}

/// Per-run constants the reference needs.
#[derive(Clone, Copy, Debug)]
pub struct Context {
    /// The dropout seed of the node's site and the dropout counter in effect.
    pub seed: u32,
    pub step: u32,
    /// The cross-entropy backward's scale.
    pub dloss: f32,
}

/// The outputs `node` must produce. `ins` are its inputs; `outs` its outputs' prior values
/// (accumulating outputs start from them).
pub fn reference(node: &Node, ins: &[Data], outs: &[Data], ctx: Context) -> Vec<Vec<f32>> {
    let x = Inputs { ins, ctx };
    let f = |k: usize| ins[k].f();
    let mut o = prior_values(outs);
    let Context { seed, step, .. } = ctx;
    match node.op {
        Op::Embedding { b, t, c } => {
            let dims = r::embedding::Dims { b, t, c };
            r::embedding::forward(&mut o[0], ins[0].u(), f(1), 0, f(2), dims);
        }
        Op::LayerNorm { n, c } => layernorm(&mut o, &x, r::layernorm::Dims { n, c }),
        Op::Linear { m, k, n, bias } => {
            let dims = r::gemm::LinearDims { m, k, n };
            r::gemm::linear_forward(&mut o[0], f(0), f(1), bias.then(|| f(2)), dims);
        }
        Op::LinearGelu { m, k, n, bias } => {
            linear_gelu(&mut o, &x, r::gemm::LinearDims { m, k, n }, bias)
        }
        Op::LinearResidual { m, k, n, bias } => {
            linear_residual(&mut o, &x, r::gemm::LinearDims { m, k, n }, bias)
        }
        Op::Attention {
            b,
            t,
            nh,
            nkv,
            hs,
            p,
            ..
        } => attention(&mut o, &x, r::attention::Dims { b, t, nh, nkv, hs }, p),
        Op::RmsNorm { n, c, eps } => {
            let (y, rstd) = o.split_at_mut(1);
            let dims = r::rmsnorm::Dims { n, c };
            r::rmsnorm::forward(&mut y[0], &mut rstd[0], f(0), f(1), dims, eps as f64);
        }
        Op::Rope { b, t, heads, d } => {
            let dims = rope_dims(b, t, heads, d);
            r::rope::forward(&mut o[0], f(0), f(1), dims, 0);
        }
        Op::PackQkv { b, t, nh, nkv, hs } => {
            let dims = r::qkv_pack::Dims { b, t, nh, nkv, hs };
            r::qkv_pack::forward(&mut o[0], f(0), f(1), f(2), dims);
        }
        Op::Gelu { .. } => r::gelu::forward(&mut o[0], f(0)),
        Op::SwiGlu { .. } => r::swiglu::forward(&mut o[0], f(0), f(1)),
        Op::Add { .. } => r::residual::forward(&mut o[0], f(0), f(1)),
        Op::ToBf16 { .. } => o[0] = r::bf16::round_bf16(f(0)),
        // The input arrives widened already.
        Op::FromBf16 { .. } => o[0] = f(0).to_vec(),
        Op::Dropout { p, .. } => r::dropout::forward(&mut o[0], f(0), p, seed, step),
        Op::CrossEntropy { n, v, vp } => {
            cross_entropy(&mut o, &x, r::cross_entropy::Dims { n, v, vp })
        }
        Op::Mean { n } => r::reduce::sum(&mut o[0], f(0), 1.0 / n as f32),
        Op::LmHeadLoss { n, c, v, vp, rows } => {
            lm_head_loss(&mut o, &x, LmHead { n, c, v, vp, rows })
        }
        Op::EmbeddingBackward { b, t, c } => {
            embedding_backward(&mut o, &x, r::embedding::Dims { b, t, c })
        }
        Op::LayerNormBackward { n, c, acc, bias } => {
            layernorm_backward(&mut o, &x, r::layernorm::Dims { n, c }, acc, bias)
        }
        Op::LinearBackward {
            m,
            k,
            n,
            acc,
            dx,
            dw,
            bias,
            gelu,
        } => {
            let dims = r::gemm::LinearDims { m, k, n };
            let outputs = LinearOutputs { dx, dw, bias, gelu };
            linear_backward(&mut o, &x, dims, acc, outputs)
        }
        Op::AttentionBackward {
            b,
            t,
            nh,
            nkv,
            hs,
            p,
            ..
        } => attention_backward(&mut o, &x, r::attention::Dims { b, t, nh, nkv, hs }, p),
        Op::RmsNormBackward { n, c, acc } => {
            zero_unless(&mut o[0], acc);
            let (dx, dw) = o.split_at_mut(1);
            let dims = r::rmsnorm::Dims { n, c };
            r::rmsnorm::backward(&mut dx[0], &mut dw[0], f(0), f(1), f(2), f(3), dims);
        }
        Op::RopeBackward { b, t, heads, d } => {
            let dims = rope_dims(b, t, heads, d);
            r::rope::backward(&mut o[0], f(0), f(1), dims, 0);
        }
        Op::PackQkvBackward {
            b,
            t,
            nh,
            nkv,
            hs,
            acc,
        } => {
            o.iter_mut().for_each(|d| zero_unless(d, acc));
            let (dq, rest) = o.split_at_mut(1);
            let (dk, dv) = rest.split_at_mut(1);
            let dims = r::qkv_pack::Dims { b, t, nh, nkv, hs };
            r::qkv_pack::backward(&mut dq[0], &mut dk[0], &mut dv[0], f(0), dims);
        }
        Op::GeluBackward { acc, .. } => {
            zero_unless(&mut o[0], acc);
            r::gelu::backward(&mut o[0], f(1), f(0));
        }
        Op::SwiGluBackward { acc, .. } => {
            let (dgate, dup) = o.split_at_mut(1);
            zero_unless(&mut dgate[0], acc);
            zero_unless(&mut dup[0], acc);
            r::swiglu::backward(&mut dgate[0], &mut dup[0], f(1), f(2), f(0));
        }
        Op::Accumulate { acc, .. } => r::residual::accumulate(&mut o[0], f(0), acc),
        Op::DropoutBackward { p, acc, .. } => {
            zero_unless(&mut o[0], acc);
            r::dropout::backward(&mut o[0], f(0), p, seed, step);
        }
        Op::CrossEntropyBackward { n, v, vp } => {
            cross_entropy_backward(&mut o[0], &x, r::cross_entropy::Dims { n, v, vp })
        }
        Op::LmHeadLossBackward {
            n,
            c,
            v,
            vp,
            rows,
            acc,
            dw,
        } => lm_head_loss_backward(&mut o, &x, LmHead { n, c, v, vp, rows }, (acc, dw)),
        Op::Lora { m, k, r, n, scale } => lora(&mut o, &x, (m, k, r, n), scale),
        Op::LoraBackward {
            m,
            k,
            r,
            n,
            scale,
            acc,
        } => lora_backward(&mut o, &x, (m, k, r, n), scale, acc),
        Op::Fill { value } => o.iter_mut().for_each(|x| r::reduce::fill(x, value)),
        Op::GlobalNorm | Op::AdamW { .. } => {
            unreachable!("optimizer nodes are checked by their kernel tests")
        }
        Op::AttentionCached { .. } | Op::KvAppend { .. } => {
            unreachable!("decoding is checked against full recomputation")
        }
    }
    o
}

/// A rotary embedding over every head of (B, T, H, D).
fn rope_dims(b: usize, t: usize, heads: usize, d: usize) -> r::rope::Dims {
    r::rope::Dims {
        b,
        t,
        heads,
        rotated: heads,
        d,
    }
}

/// The outputs' values before the node runs, as f32.
fn prior_values(outs: &[Data]) -> Vec<Vec<f32>> {
    outs.iter()
        .map(|d| match d {
            Data::F32(v) => v.clone(),
            Data::U32(v) => v.iter().map(|&x| x as f32).collect(),
        })
        .collect()
}

/// A node's inputs and the run's constants.
struct Inputs<'a> {
    ins: &'a [Data],
    ctx: Context,
}

impl Inputs<'_> {
    /// Input k, an f32 tensor.
    fn f(&self, k: usize) -> &[f32] {
        self.ins[k].f()
    }

    /// Input k, a u32 tensor.
    fn u(&self, k: usize) -> &[u32] {
        self.ins[k].u()
    }

    /// Attention as the model runs it: causal, with this site's dropout at this step, if any.
    fn attention_options(&self, p: f32) -> r::attention::Options {
        let Context { seed, step, .. } = self.ctx;
        r::attention::Options {
            dropout: (p > 0.0).then_some(crate::hash::Dropout { p, seed, step }),
            ..r::attention::Options::CAUSAL
        }
    }
}

/// Overwriting activation gradients start from zero; accumulating ones from their prior value.
fn zero_unless(o: &mut [f32], acc: bool) {
    if !acc {
        o.iter_mut().for_each(|x| *x = 0.0);
    }
}

/// Outputs [y, mean, rstd].
fn layernorm(o: &mut [Vec<f32>], x: &Inputs, dims: r::layernorm::Dims) {
    let (y, rest) = o.split_at_mut(1);
    let (mean, rstd) = rest.split_at_mut(1);
    r::layernorm::forward(
        &mut y[0],
        &mut mean[0],
        &mut rstd[0],
        x.f(0),
        x.f(1),
        x.f(2),
        dims,
    );
}

/// Outputs [y = gelu(pre), pre].
fn linear_gelu(o: &mut [Vec<f32>], x: &Inputs, dims: r::gemm::LinearDims, bias: bool) {
    let (y, pre) = o.split_at_mut(1);
    r::gemm::linear_forward(&mut pre[0], x.f(0), x.f(1), bias.then(|| x.f(2)), dims);
    r::gelu::forward(&mut y[0], &pre[0]);
}

/// The residual stream is the last input.
fn linear_residual(o: &mut [Vec<f32>], x: &Inputs, dims: r::gemm::LinearDims, bias: bool) {
    let mut proj = vec![0.0; dims.m * dims.n];
    r::gemm::linear_forward(&mut proj, x.f(0), x.f(1), bias.then(|| x.f(2)), dims);
    r::residual::forward(&mut o[0], x.f(x.ins.len() - 1), &proj);
}

/// Outputs [y, lse].
fn attention(o: &mut [Vec<f32>], x: &Inputs, dims: r::attention::Dims, p: f32) {
    let r::attention::Dims { b, t, nh, .. } = dims;
    let mut preatt = vec![0.0; b * nh * t * t];
    let mut att = vec![0.0; b * nh * t * t];
    let (y, lse) = o.split_at_mut(1);
    r::attention::forward(
        &mut y[0],
        &mut preatt,
        &mut att,
        &mut lse[0],
        x.f(0),
        dims,
        x.attention_options(p),
    );
}

/// The shape of the lm head and its loss, as in `Op::LmHeadLoss`.
struct LmHead {
    n: usize,
    c: usize,
    v: usize,
    vp: usize,
    rows: usize,
}

/// Outputs [losses, lse].
fn cross_entropy(o: &mut [Vec<f32>], x: &Inputs, dims: r::cross_entropy::Dims) {
    let (losses, lse) = o.split_at_mut(1);
    r::cross_entropy::forward(&mut losses[0], &mut lse[0], x.f(0), x.u(1), dims);
}

/// Outputs [losses, lse, logits chunk].
fn lm_head_loss(o: &mut [Vec<f32>], x: &Inputs, shape: LmHead) {
    let LmHead { n, c, v, vp, rows } = shape;
    let mut logits = vec![0.0; n * vp];
    let head = r::gemm::LinearDims { m: n, k: c, n: vp };
    r::gemm::linear_forward(&mut logits, x.f(0), x.f(1), None, head);
    let (losses, rest) = o.split_at_mut(1);
    let (lse, chunk) = rest.split_at_mut(1);
    let dims = r::cross_entropy::Dims { n, v, vp };
    r::cross_entropy::forward(&mut losses[0], &mut lse[0], &logits, x.u(2), dims);
    last_chunk(&mut chunk[0], &logits, n, vp, rows);
}

/// Outputs [dwte +=, dwpe +=?].
fn embedding_backward(o: &mut [Vec<f32>], x: &Inputs, dims: r::embedding::Dims) {
    let (dwte, dwpe) = o.split_at_mut(1);
    let dwpe = dwpe.first_mut().map(|d| &mut d[..]);
    r::embedding::backward(&mut dwte[0], 0, dwpe, x.f(0), x.u(1), dims);
}

/// Outputs [dx, dweight, dbias?].
fn layernorm_backward(
    o: &mut [Vec<f32>],
    x: &Inputs,
    dims: r::layernorm::Dims,
    acc: bool,
    bias: bool,
) {
    zero_unless(&mut o[0], acc);
    let mut unused = vec![0.0; dims.c];
    let (dx, rest) = o.split_at_mut(1);
    let (dw, db) = rest.split_at_mut(1);
    let db = if bias { &mut db[0] } else { &mut unused };
    r::layernorm::backward(
        &mut dx[0],
        &mut dw[0],
        db,
        x.f(0),
        x.f(1),
        x.f(2),
        x.f(3),
        x.f(4),
        dims,
    );
}

/// Which outputs a `LinearBackward` has, and whether its dx is pre's gradient.
struct LinearOutputs {
    dx: bool,
    dw: bool,
    bias: bool,
    gelu: bool,
}

/// Outputs [dx?, dw?, dbias?].
fn linear_backward(
    o: &mut [Vec<f32>],
    x: &Inputs,
    dims: r::gemm::LinearDims,
    acc: bool,
    outputs: LinearOutputs,
) {
    let LinearOutputs { dx, dw, bias, gelu } = outputs;
    let (dxo, rest) = o.split_at_mut(if dx { 1 } else { 0 });
    // A frozen weight's gradient is computed and dropped.
    let mut frozen = [vec![0.0; if dw { 0 } else { dims.n * dims.k }]];
    let (dw, db) = if dw {
        rest.split_at_mut(1)
    } else {
        (&mut frozen[..], &mut [][..])
    };
    // With gelu, dx first receives the gradient of gelu(pre), then pre's.
    let mut dh = vec![0.0; if gelu { dims.m * dims.k } else { 0 }];
    let dx_out = if gelu {
        Some(&mut dh[..])
    } else {
        dxo.first_mut().map(|v| &mut v[..])
    };
    r::gemm::linear_backward(
        dx_out,
        &mut dw[0],
        if bias { Some(&mut db[0][..]) } else { None },
        x.f(0),
        x.f(1),
        x.f(2),
        dims,
        acc,
    );
    if gelu {
        dxo[0].fill(0.0);
        r::gelu::backward(&mut dxo[0], x.f(3), &dh);
    }
}

/// Output [dqkv], overwritten.
fn attention_backward(o: &mut [Vec<f32>], x: &Inputs, dims: r::attention::Dims, p: f32) {
    let r::attention::Dims { b, t, nh, hs, .. } = dims;
    let opts = x.attention_options(p);
    // Recompute the probabilities the reference backward needs.
    let mut y = vec![0.0; b * t * nh * hs];
    let mut preatt = vec![0.0; b * nh * t * t];
    let mut att = vec![0.0; b * nh * t * t];
    let mut lse = vec![0.0; b * nh * t];
    r::attention::forward(&mut y, &mut preatt, &mut att, &mut lse, x.f(1), dims, opts);
    let (mut dpre, mut datt) = (vec![0.0; att.len()], vec![0.0; att.len()]);
    o[0].iter_mut().for_each(|x| *x = 0.0);
    r::attention::backward(
        &mut o[0],
        &mut dpre,
        &mut datt,
        x.f(0),
        x.f(1),
        &att,
        dims,
        opts,
    );
}

/// Output [logits], overwritten in place with their gradient.
fn cross_entropy_backward(dlogits: &mut [f32], x: &Inputs, dims: r::cross_entropy::Dims) {
    let logits = x.f(0).to_vec();
    r::cross_entropy::backward(dlogits, &logits, x.u(2), x.ctx.dloss, dims);
}

/// Outputs [dx, dwte, logits chunk]: the logits recomputed, their gradient, then the lm head's.
fn lm_head_loss_backward(o: &mut [Vec<f32>], x: &Inputs, shape: LmHead, (acc, dw): (bool, bool)) {
    let LmHead { n, c, v, vp, rows } = shape;
    let mut logits = vec![0.0; n * vp];
    let head = r::gemm::LinearDims { m: n, k: c, n: vp };
    r::gemm::linear_forward(&mut logits, x.f(0), x.f(1), None, head);
    let mut dlogits = vec![0.0; n * vp];
    let dims = r::cross_entropy::Dims { n, v, vp };
    r::cross_entropy::backward(&mut dlogits, &logits, x.u(2), x.ctx.dloss, dims);
    let (dx, rest) = o.split_at_mut(1);
    // A frozen wte's gradient is computed and dropped.
    let mut frozen = [vec![0.0; if dw { 0 } else { vp * c }]];
    let (dwte, chunk) = if dw {
        rest.split_at_mut(1)
    } else {
        (&mut frozen[..], rest)
    };
    r::gemm::linear_backward(
        Some(&mut dx[0]),
        &mut dwte[0],
        None,
        &dlogits,
        x.f(0),
        x.f(1),
        head,
        acc,
    );
    last_chunk(&mut chunk[0], &dlogits, n, vp, rows);
}

/// Outputs [y = base + scale · (x · aᵀ) · bᵀ, u = x · aᵀ]; inputs [x, a, b, base].
fn lora(o: &mut [Vec<f32>], x: &Inputs, (m, k, r, n): (usize, usize, usize, usize), scale: f32) {
    let (y, u) = o.split_at_mut(1);
    r::gemm::linear_forward(
        &mut u[0],
        x.f(0),
        x.f(1),
        None,
        r::gemm::LinearDims { m, k, n: r },
    );
    let mut up = vec![0.0; m * n];
    r::gemm::linear_forward(
        &mut up,
        &u[0],
        x.f(2),
        None,
        r::gemm::LinearDims { m, k: r, n },
    );
    for ((y, &base), &up) in y[0].iter_mut().zip(x.f(3)).zip(&up) {
        *y = scale * up + base;
    }
}

/// Outputs [dx (acc), da +=, db +=, du]; inputs [dy, x, a, b, u].
fn lora_backward(
    o: &mut [Vec<f32>],
    x: &Inputs,
    (m, k, r, n): (usize, usize, usize, usize),
    scale: f32,
    acc: bool,
) {
    use r::gemm::{Layout, Layouts, Product, matmul};
    let at = |c, a, b| Layouts {
        c: Layout::new(c),
        a: Layout::new(a),
        b: Layout::new(b),
    };
    let (dy, xs, a, b, u) = (x.f(0), x.f(1), x.f(2), x.f(3), x.f(4));
    let db = Product {
        trans_a: true,
        alpha: scale,
        accumulate: true,
        ..Product::new(n, r, m)
    };
    matmul(&mut o[2], dy, u, None, at(r, n, r), db);
    let du = Product {
        alpha: scale,
        ..Product::new(m, r, n)
    };
    matmul(&mut o[3], dy, b, None, at(r, n, r), du);
    let du = o[3].clone();
    let da = Product {
        trans_a: true,
        accumulate: true,
        ..Product::new(r, k, m)
    };
    matmul(&mut o[1], &du, xs, None, at(k, r, k), da);
    let dx = Product {
        accumulate: acc,
        ..Product::new(m, k, r)
    };
    matmul(&mut o[0], &du, a, None, at(k, r, k), dx);
}
