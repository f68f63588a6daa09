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
        Op::Add { .. } | Op::Accumulate { .. } | Op::Fill { .. } | Op::Embedding { .. } => {
            (1e-6, 1e-6)
        }
        Op::Gelu { .. }
        | Op::GeluBackward { .. }
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
    let Context { seed, step, dloss } = ctx;
    let f = |k: usize| ins[k].f();
    // Attention as the model runs it: causal, with this site's dropout at this step, if any.
    let attention_options = |p: f32| r::attention::Options {
        dropout: (p > 0.0).then_some(crate::hash::Dropout { p, seed, step }),
        ..r::attention::Options::CAUSAL
    };
    let mut o: Vec<Vec<f32>> = outs
        .iter()
        .map(|d| match d {
            Data::F32(v) => v.clone(),
            Data::U32(v) => v.iter().map(|&x| x as f32).collect(),
        })
        .collect();
    // Overwriting activation gradients start from zero; accumulating ones from their prior value.
    let zero_unless = |o: &mut Vec<f32>, acc: bool| {
        if !acc {
            o.iter_mut().for_each(|x| *x = 0.0);
        }
    };
    match node.op {
        Op::Embedding { b, t, c } => {
            let dims = r::embedding::Dims { b, t, c };
            r::embedding::forward(&mut o[0], ins[0].u(), f(1), 0, f(2), dims);
        }
        Op::LayerNorm { n, c } => {
            let (y, rest) = o.split_at_mut(1);
            let (mean, rstd) = rest.split_at_mut(1);
            r::layernorm::forward(
                &mut y[0],
                &mut mean[0],
                &mut rstd[0],
                f(0),
                f(1),
                f(2),
                r::layernorm::Dims { n, c },
            );
        }
        Op::Linear { m, k, n, bias } => {
            let dims = r::gemm::LinearDims { m, k, n };
            r::gemm::linear_forward(&mut o[0], f(0), f(1), bias.then(|| f(2)), dims);
        }
        Op::LinearGelu { m, k, n, bias } => {
            let (y, pre) = o.split_at_mut(1);
            let dims = r::gemm::LinearDims { m, k, n };
            r::gemm::linear_forward(&mut pre[0], f(0), f(1), bias.then(|| f(2)), dims);
            r::gelu::forward(&mut y[0], &pre[0]);
        }
        Op::LinearResidual { m, k, n, bias } => {
            let mut proj = vec![0.0; m * n];
            let dims = r::gemm::LinearDims { m, k, n };
            r::gemm::linear_forward(&mut proj, f(0), f(1), bias.then(|| f(2)), dims);
            r::residual::forward(&mut o[0], f(ins.len() - 1), &proj);
        }
        Op::Attention {
            b, t, nh, hs, p, ..
        } => {
            let dims = r::attention::Dims { b, t, nh, hs };
            let mut preatt = vec![0.0; b * nh * t * t];
            let mut att = vec![0.0; b * nh * t * t];
            let (y, lse) = o.split_at_mut(1);
            r::attention::forward(
                &mut y[0],
                &mut preatt,
                &mut att,
                &mut lse[0],
                f(0),
                dims,
                attention_options(p),
            );
        }
        Op::Gelu { .. } => r::gelu::forward(&mut o[0], f(0)),
        Op::Add { .. } => r::residual::forward(&mut o[0], f(0), f(1)),
        Op::Dropout { p, .. } => r::dropout::forward(&mut o[0], f(0), p, seed, step),
        Op::CrossEntropy { n, v, vp } => {
            let (losses, lse) = o.split_at_mut(1);
            let dims = r::cross_entropy::Dims { n, v, vp };
            r::cross_entropy::forward(&mut losses[0], &mut lse[0], f(0), ins[1].u(), dims);
        }
        Op::Mean { n } => r::reduce::sum(&mut o[0], f(0), 1.0 / n as f32),
        Op::LmHeadLoss { n, c, v, vp, rows } => {
            let mut logits = vec![0.0; n * vp];
            let head = r::gemm::LinearDims { m: n, k: c, n: vp };
            r::gemm::linear_forward(&mut logits, f(0), f(1), None, head);
            let (losses, rest) = o.split_at_mut(1);
            let (lse, chunk) = rest.split_at_mut(1);
            let dims = r::cross_entropy::Dims { n, v, vp };
            r::cross_entropy::forward(&mut losses[0], &mut lse[0], &logits, ins[2].u(), dims);
            last_chunk(&mut chunk[0], &logits, n, vp, rows);
        }
        Op::EmbeddingBackward { b, t, c } => {
            let (dwte, dwpe) = o.split_at_mut(1);
            r::embedding::backward(
                &mut dwte[0],
                0,
                Some(&mut dwpe[0]),
                f(0),
                ins[1].u(),
                r::embedding::Dims { b, t, c },
            );
        }
        Op::LayerNormBackward { n, c, acc, bias } => {
            zero_unless(&mut o[0], acc);
            let mut unused = vec![0.0; c];
            let (dx, rest) = o.split_at_mut(1);
            let (dw, db) = rest.split_at_mut(1);
            let db = if bias { &mut db[0] } else { &mut unused };
            r::layernorm::backward(
                &mut dx[0],
                &mut dw[0],
                db,
                f(0),
                f(1),
                f(2),
                f(3),
                f(4),
                r::layernorm::Dims { n, c },
            );
        }
        Op::LinearBackward {
            m,
            k,
            n,
            acc,
            dx,
            bias,
            gelu,
        } => {
            let (dxo, rest) = o.split_at_mut(if dx { 1 } else { 0 });
            let (dw, db) = rest.split_at_mut(1);
            // With gelu, dx first receives the gradient of gelu(pre), then pre's.
            let mut dh = vec![0.0; if gelu { m * k } else { 0 }];
            let dx_out = if gelu {
                Some(&mut dh[..])
            } else {
                dxo.first_mut().map(|v| &mut v[..])
            };
            r::gemm::linear_backward(
                dx_out,
                &mut dw[0],
                if bias { Some(&mut db[0][..]) } else { None },
                f(0),
                f(1),
                f(2),
                r::gemm::LinearDims { m, k, n },
                acc,
            );
            if gelu {
                dxo[0].fill(0.0);
                r::gelu::backward(&mut dxo[0], f(3), &dh);
            }
        }
        Op::AttentionBackward {
            b, t, nh, hs, p, ..
        } => {
            let (dims, opts) = (r::attention::Dims { b, t, nh, hs }, attention_options(p));
            // Recompute the probabilities the reference backward needs.
            let mut y = vec![0.0; b * t * nh * hs];
            let mut preatt = vec![0.0; b * nh * t * t];
            let mut att = vec![0.0; b * nh * t * t];
            let mut lse = vec![0.0; b * nh * t];
            r::attention::forward(&mut y, &mut preatt, &mut att, &mut lse, f(1), dims, opts);
            let (mut dpre, mut datt) = (vec![0.0; att.len()], vec![0.0; att.len()]);
            o[0].iter_mut().for_each(|x| *x = 0.0);
            r::attention::backward(
                &mut o[0],
                &mut dpre,
                &mut datt,
                f(0),
                f(1),
                &att,
                dims,
                opts,
            );
        }
        Op::GeluBackward { acc, .. } => {
            zero_unless(&mut o[0], acc);
            r::gelu::backward(&mut o[0], f(1), f(0));
        }
        Op::Accumulate { acc, .. } => r::residual::accumulate(&mut o[0], f(0), acc),
        Op::DropoutBackward { p, acc, .. } => {
            zero_unless(&mut o[0], acc);
            r::dropout::backward(&mut o[0], f(0), p, seed, step);
        }
        Op::CrossEntropyBackward { n, v, vp } => {
            let logits = f(0).to_vec();
            let dims = r::cross_entropy::Dims { n, v, vp };
            r::cross_entropy::backward(&mut o[0], &logits, ins[2].u(), dloss, dims);
        }
        Op::LmHeadLossBackward {
            n,
            c,
            v,
            vp,
            rows,
            acc,
        } => {
            let mut logits = vec![0.0; n * vp];
            let head = r::gemm::LinearDims { m: n, k: c, n: vp };
            r::gemm::linear_forward(&mut logits, f(0), f(1), None, head);
            let mut dlogits = vec![0.0; n * vp];
            let dims = r::cross_entropy::Dims { n, v, vp };
            r::cross_entropy::backward(&mut dlogits, &logits, ins[2].u(), dloss, dims);
            let (dx, rest) = o.split_at_mut(1);
            let (dwte, chunk) = rest.split_at_mut(1);
            r::gemm::linear_backward(
                Some(&mut dx[0]),
                &mut dwte[0],
                None,
                &dlogits,
                f(0),
                f(1),
                head,
                acc,
            );
            last_chunk(&mut chunk[0], &dlogits, n, vp, rows);
        }
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
