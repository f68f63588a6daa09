//! Multi-head softmax attention, llm.c style: the scaled scores (`preatt`) and the probabilities
//! (`att`) are materialized as (B, NH, T, T) tensors.
//!
//! Layouts: qkv (B, T, W) with C = NH·HS and W = (NH + 2·NKV)·HS: each token's row holds its NH
//! query heads, then its NKV key heads, then its NKV value heads, HS values each; query head h
//! reads key/value head h / G, G = NH / NKV (grouped-query attention; NKV = NH is multi-head
//! attention, W = 3C, GPT-2's c_attn layout). out (B, T, C); lse (B, NH, T).
//! scale = 1/sqrt(HS). Causal: query t sees keys t2 <= t; masked entries of preatt and att are 0.
//! Dropout: the factors (B, NH, T, T) of `dropout_mask` (0 or 1/(1 - p)) multiply att in the
//! product with v; att itself stays the undropped softmax.

use super::Real;
use crate::hash::{Dropout, scale};

/// The shape of an attention problem: B sequences of T tokens, NH query heads of HS channels
/// each, and NKV key/value heads (NKV divides NH; each serves G = NH / NKV query heads).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dims {
    pub b: usize,
    pub t: usize,
    pub nh: usize,
    pub nkv: usize,
    pub hs: usize,
}

impl Dims {
    /// Multi-head attention: as many key/value heads as query heads.
    pub fn mha(b: usize, t: usize, nh: usize, hs: usize) -> Dims {
        Dims {
            b,
            t,
            nh,
            nkv: nh,
            hs,
        }
    }

    /// Channels per token of q and of the output, C = NH·HS.
    pub fn c(self) -> usize {
        self.nh * self.hs
    }

    /// Channels per token of k (and of v), NKV·HS.
    pub fn kv_c(self) -> usize {
        self.nkv * self.hs
    }

    /// The width W of a qkv row, C + 2·NKV·HS.
    pub fn width(self) -> usize {
        self.c() + 2 * self.kv_c()
    }

    /// Query heads per key/value head, G = NH / NKV.
    pub fn group(self) -> usize {
        self.nh / self.nkv.max(1)
    }

    /// Where, in a qkv row, part `part` (0 = q, 1 = k, 2 = v) of query head `h` starts: q's head
    /// h, or k's (v's) head h / G.
    pub fn part_offset(self, part: usize, h: usize) -> usize {
        match part {
            0 => h * self.hs,
            1 => self.c() + h / self.group() * self.hs,
            _ => self.c() + self.kv_c() + h / self.group() * self.hs,
        }
    }

    /// The index in qkv (B, T, W) of part `part` of query head `h` of token `tok` of sequence `bi`.
    pub fn qkv_index(self, part: usize, bi: usize, tok: usize, h: usize) -> usize {
        (bi * self.t + tok) * self.width() + self.part_offset(part, h)
    }
}

/// How the probabilities are masked: causally or not, and with dropout (its mask from the
/// counter hash, as `dropout_mask` builds it) or not.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Options {
    pub causal: bool,
    pub dropout: Option<Dropout>,
}

impl Options {
    /// Causal, without dropout.
    pub const CAUSAL: Options = Options {
        causal: true,
        dropout: None,
    };
}

/// The dropout factors (B, NH, T, T) of the fused kernels' mask: 1/(1 - p) where
/// `Dropout::keeps_cell` keeps the probability, else 0.
pub fn dropout_mask<F: Real>(b: usize, nh: usize, t: usize, d: Dropout) -> Vec<F> {
    let scale = F::from_f64(scale(d.p) as f64);
    let mut m = vec![F::zero(); b * nh * t * t];
    for row in 0..b * nh * t {
        for j in 0..t {
            if d.keeps_cell(row as u32, j as u32) {
                m[row * t + j] = scale;
            }
        }
    }
    m
}

/// The dropout factors (B, NH, T, T) `opts` asks for, if any.
fn drop_factors<F: Real>(dims: Dims, opts: Options) -> Option<Vec<F>> {
    let Dims { b, t, nh, .. } = dims;
    opts.dropout.map(|d| dropout_mask(b, nh, t, d))
}

/// out (B, T, C), preatt (B, NH, T, T), att (B, NH, T, T), lse (B, NH, T) from qkv (B, T, W),
/// masked as `opts` asks. lse is the natural logsumexp of each row's unmasked scaled scores.
/// Overwrites every output.
pub fn forward<F: Real>(
    out: &mut [F],
    preatt: &mut [F],
    att: &mut [F],
    lse: &mut [F],
    qkv: &[F],
    dims: Dims,
    opts: Options,
) {
    let Dims { b, t, nh, hs, .. } = dims;
    let (c, causal) = (dims.c(), opts.causal);
    let scale = F::one() / F::from_f64(hs as f64).sqrt();
    let drop = drop_factors::<F>(dims, opts);
    let factor = |i: usize| drop.as_ref().map_or(F::one(), |m| m[i]);
    for bi in 0..b {
        for h in 0..nh {
            for t1 in 0..t {
                // q (HS) of token t1, head h
                let q = &qkv[dims.qkv_index(0, bi, t1, h)..][..hs];
                let row = ((bi * nh + h) * t + t1) * t;
                let n = if causal { t1 + 1 } else { t };
                // preatt[t2] = scale · q·k[t2], and its max
                let mut maxval = F::from_f64(f64::MIN);
                for t2 in 0..t {
                    let mut v = F::zero();
                    if t2 < n {
                        let k = &qkv[dims.qkv_index(1, bi, t2, h)..][..hs];
                        for d in 0..hs {
                            v += q[d] * k[d];
                        }
                        v *= scale;
                        maxval = maxval.max(v);
                    }
                    preatt[row + t2] = v;
                }
                // att[t2] = exp(preatt[t2] - max) / sum
                let mut sum = F::zero();
                for t2 in 0..t {
                    let e = if t2 < n {
                        (preatt[row + t2] - maxval).exp()
                    } else {
                        F::zero()
                    };
                    att[row + t2] = e;
                    sum += e;
                }
                for t2 in 0..t {
                    att[row + t2] /= sum;
                }
                lse[(bi * nh + h) * t + t1] = maxval + sum.ln();
                // out (HS) = Σ att[t2] · drop[t2] · v[t2]
                let o = &mut out[(bi * t + t1) * c + h * hs..][..hs];
                o.fill(F::zero());
                for t2 in 0..n {
                    let v = &qkv[dims.qkv_index(2, bi, t2, h)..][..hs];
                    let a = att[row + t2] * factor(row + t2);
                    for d in 0..hs {
                        o[d] += a * v[d];
                    }
                }
            }
        }
    }
}

/// dqkv (B, T, W), dpreatt (B, NH, T, T), datt (B, NH, T, T) from dout (B, T, C), qkv (B, T, W)
/// and the forward's att (B, NH, T, T), with the forward's `opts` (the same dropout mask). datt is
/// the gradient of the undropped att; dk and dv of a key/value head sum its G query heads'.
/// Overwrites every output (the GPU backward passes overwrite dqkv too).
// The reference keeps llm.c's plain list (outputs, then inputs, then the shape) so that it reads
// as the specification; a struct of these slices would only rename the tensors listed here.
#[allow(clippy::too_many_arguments)]
pub fn backward<F: Real>(
    dqkv: &mut [F],
    dpreatt: &mut [F],
    datt: &mut [F],
    dout: &[F],
    qkv: &[F],
    att: &[F],
    dims: Dims,
    opts: Options,
) {
    let Dims { b, t, nh, hs, .. } = dims;
    let (c, causal) = (dims.c(), opts.causal);
    let scale = F::one() / F::from_f64(hs as f64).sqrt();
    let drop = drop_factors::<F>(dims, opts);
    let factor = |i: usize| drop.as_ref().map_or(F::one(), |m| m[i]);
    dqkv.fill(F::zero());
    for bi in 0..b {
        for h in 0..nh {
            for t1 in 0..t {
                let row = ((bi * nh + h) * t + t1) * t;
                let n = if causal { t1 + 1 } else { t };
                let dout_row = &dout[(bi * t + t1) * c + h * hs..][..hs];
                // through out = Σ att[t2] m[t2] v[t2]: datt[t2] = m[t2] · dout·v[t2],
                // dv[t2] += att[t2] m[t2] · dout
                for t2 in 0..t {
                    let mut g = F::zero();
                    if t2 < n {
                        let v = dims.qkv_index(2, bi, t2, h);
                        let a = att[row + t2] * factor(row + t2);
                        for d in 0..hs {
                            g += dout_row[d] * qkv[v + d];
                            dqkv[v + d] += a * dout_row[d];
                        }
                        g *= factor(row + t2);
                    }
                    datt[row + t2] = g;
                }
                // through the softmax: dpreatt[t2] = att[t2] · (datt[t2] - Σ att·datt)
                let mut dot = F::zero();
                for t2 in 0..n {
                    dot += att[row + t2] * datt[row + t2];
                }
                for t2 in 0..t {
                    dpreatt[row + t2] = if t2 < n {
                        att[row + t2] * (datt[row + t2] - dot)
                    } else {
                        F::zero()
                    };
                }
                // through preatt = scale · q·k: dq += scale · dpreatt · k, dk += scale · dpreatt · q
                let q = dims.qkv_index(0, bi, t1, h);
                for t2 in 0..n {
                    let k = dims.qkv_index(1, bi, t2, h);
                    let g = dpreatt[row + t2] * scale;
                    for d in 0..hs {
                        dqkv[q + d] += g * qkv[k + d];
                        dqkv[k + d] += g * qkv[q + d];
                    }
                }
            }
        }
    }
}
