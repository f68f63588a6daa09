//! Attention's operand: q, k and v packed into one row per token, the layout the fused attention
//! kernels read (see `reference::attention`), llm.c style.
//!
//! Each row holds the token's NH query heads, then its NKV key heads, then its NKV value heads
//! (W = (NH + 2·NKV)·HS values); the attention reads key/value head h / G for query head h,
//! G = NH / NKV, so nothing is repeated here.

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

impl Dims {
    /// The width W of a packed row, (NH + 2·NKV)·HS.
    pub fn width(self) -> usize {
        (self.nh + 2 * self.nkv) * self.hs
    }
}

/// qkv (B·T, W) = [q, k, v] row by row, from q (B·T, NH·HS), k and v (B·T, NKV·HS). Overwrites
/// qkv.
pub fn forward<T: Real>(qkv: &mut [T], q: &[T], k: &[T], v: &[T], dims: Dims) {
    let (cq, ckv, w) = (dims.nh * dims.hs, dims.nkv * dims.hs, dims.width());
    for row in 0..dims.b * dims.t {
        let out = &mut qkv[row * w..][..w];
        out[..cq].copy_from_slice(&q[row * cq..][..cq]);
        out[cq..cq + ckv].copy_from_slice(&k[row * ckv..][..ckv]);
        out[cq + ckv..].copy_from_slice(&v[row * ckv..][..ckv]);
    }
}

/// Backward of `forward`, accumulating into every output: dq (B·T, NH·HS), dk and dv
/// (B·T, NKV·HS) += dqkv's q, k and v parts.
pub fn backward<T: Real>(dq: &mut [T], dk: &mut [T], dv: &mut [T], dqkv: &[T], dims: Dims) {
    let (cq, ckv, w) = (dims.nh * dims.hs, dims.nkv * dims.hs, dims.width());
    for row in 0..dims.b * dims.t {
        let d = &dqkv[row * w..][..w];
        let parts = [
            (&mut dq[row * cq..][..cq], &d[..cq]),
            (&mut dk[row * ckv..][..ckv], &d[cq..cq + ckv]),
            (&mut dv[row * ckv..][..ckv], &d[cq + ckv..]),
        ];
        for (out, part) in parts {
            for (o, &x) in out.iter_mut().zip(part) {
                *o += x;
            }
        }
    }
}
