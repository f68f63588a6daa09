//! Multi-head softmax attention, llm.c style: the scaled scores (`preatt`) and the probabilities
//! (`att`) are materialized as (B, NH, T, T) tensors.
//!
//! Layouts: qkv (B, T, 3, NH, HS) = (B, T, 3C) with C = NH·HS, the q, k, v of token t, head h at
//! qkv[(b·T + t)·3C + {0, C, 2C} + h·HS + d]; out (B, T, C); lse (B, NH, T).
//! scale = 1/sqrt(HS). Causal: query t sees keys t2 <= t; masked entries of preatt and att are 0.
//! Dropout: the factors (B, NH, T, T) of `dropout_mask` (0 or 1/(1 - p)) multiply att in the
//! product with v; att itself stays the undropped softmax.

use super::Real;
use crate::hash::{Dropout, scale};

/// The shape of an attention problem: B sequences of T tokens, NH heads of HS channels each.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dims {
    pub b: usize,
    pub t: usize,
    pub nh: usize,
    pub hs: usize,
}

impl Dims {
    /// Channels per token, C = NH·HS.
    pub fn c(self) -> usize {
        self.nh * self.hs
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

/// out (B, T, C), preatt (B, NH, T, T), att (B, NH, T, T), lse (B, NH, T) from qkv (B, T, 3C),
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
    let Dims { b, t, nh, hs } = dims;
    let (c, causal) = (dims.c(), opts.causal);
    let scale = F::one() / F::from_f64(hs as f64).sqrt();
    let drop = drop_factors::<F>(dims, opts);
    let factor = |i: usize| drop.as_ref().map_or(F::one(), |m| m[i]);
    for bi in 0..b {
        for h in 0..nh {
            for t1 in 0..t {
                // q (HS) of token t1, head h
                let q = &qkv[(bi * t + t1) * 3 * c + h * hs..][..hs];
                let row = ((bi * nh + h) * t + t1) * t;
                let n = if causal { t1 + 1 } else { t };
                // preatt[t2] = scale · q·k[t2], and its max
                let mut maxval = F::from_f64(f64::MIN);
                for t2 in 0..t {
                    let mut v = F::zero();
                    if t2 < n {
                        let k = &qkv[(bi * t + t2) * 3 * c + c + h * hs..][..hs];
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
                    let v = &qkv[(bi * t + t2) * 3 * c + 2 * c + h * hs..][..hs];
                    let a = att[row + t2] * factor(row + t2);
                    for d in 0..hs {
                        o[d] += a * v[d];
                    }
                }
            }
        }
    }
}

/// dqkv (B, T, 3C), dpreatt (B, NH, T, T), datt (B, NH, T, T) from dout (B, T, C), qkv (B, T, 3C)
/// and the forward's att (B, NH, T, T), with the forward's `opts` (the same dropout mask). datt is
/// the gradient of the undropped att. Overwrites every output (the GPU backward passes overwrite
/// dqkv too).
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
    let Dims { b, t, nh, hs } = dims;
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
                        let v = (bi * t + t2) * 3 * c + 2 * c + h * hs;
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
                let q = (bi * t + t1) * 3 * c + h * hs;
                for t2 in 0..n {
                    let k = (bi * t + t2) * 3 * c + c + h * hs;
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
