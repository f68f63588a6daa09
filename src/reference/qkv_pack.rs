//! Grouped-query attention's operand (transformers' `repeat_kv` and the packing of q, k and v
//! into one row per token that the fused attention kernels read), llm.c style.
//!
//! Query head h reads key/value head h / G, G = NH / NKV: key/value head j serves the query
//! heads j·G .. (j+1)·G, as `repeat_kv` expands it.

use super::Real;

/// The shape: B sequences of T tokens, NH query heads, NKV key/value heads (NKV divides NH),
/// HS values a head.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dims {
    pub b: usize,
    pub t: usize,
    pub nh: usize,
    pub nkv: usize,
    pub hs: usize,
}

/// qkv (B, T, 3, NH, HS) = [q[b, t, h], k[b, t, h / G], v[b, t, h / G]] from q (B, T, NH, HS),
/// k and v (B, T, NKV, HS). Overwrites qkv.
pub fn forward<T: Real>(qkv: &mut [T], q: &[T], k: &[T], v: &[T], dims: Dims) {
    let Dims { b, t, nh, nkv, hs } = dims;
    let g = nh / nkv;
    for row in 0..b * t {
        for h in 0..nh {
            for e in 0..hs {
                let out = |which: usize| ((row * 3 + which) * nh + h) * hs + e;
                let kv = (row * nkv + h / g) * hs + e;
                qkv[out(0)] = q[(row * nh + h) * hs + e];
                qkv[out(1)] = k[kv];
                qkv[out(2)] = v[kv];
            }
        }
    }
}

/// Backward of `forward`, accumulating into every output: dq (B, T, NH, HS) += dqkv's q part;
/// dk, dv (B, T, NKV, HS) += the sum over the G query heads of each group, in head order.
pub fn backward<T: Real>(dq: &mut [T], dk: &mut [T], dv: &mut [T], dqkv: &[T], dims: Dims) {
    let Dims { b, t, nh, nkv, hs } = dims;
    let g = nh / nkv;
    for row in 0..b * t {
        for h in 0..nh {
            for e in 0..hs {
                dq[(row * nh + h) * hs + e] += dqkv[(row * 3 * nh + h) * hs + e];
            }
        }
        for j in 0..nkv {
            for e in 0..hs {
                let (mut sk, mut sv) = (T::zero(), T::zero());
                for r in 0..g {
                    let h = j * g + r;
                    sk += dqkv[((row * 3 + 1) * nh + h) * hs + e];
                    sv += dqkv[((row * 3 + 2) * nh + h) * hs + e];
                }
                dk[(row * nkv + j) * hs + e] += sk;
                dv[(row * nkv + j) * hs + e] += sv;
            }
        }
    }
}
