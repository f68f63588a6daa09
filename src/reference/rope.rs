//! Rotary position embedding in Hugging Face's rotate-half layout (transformers'
//! `apply_rotary_pos_emb` with `rotate_half`), llm.c style.
//!
//! Each head vector x of even size D is rotated pairwise: for i < D/2, with angle
//! a = pos · inv_freq[i] (the product rounded to f32, as transformers computes it),
//!   out[i]       = x[i] · cos a - x[i + D/2] · sin a
//!   out[i + D/2] = x[i + D/2] · cos a + x[i] · sin a.
//! The inverse frequencies (with any scaling) are an input, computed on the CPU by
//! `kernels::rope::Rope::inv_freq`.

use super::Real;

/// The shape of a rotary embedding: inp and out are (B, T, H, D); the first `rotated` heads of
/// every token are rotated, the others (a fused q/k/v row's values) copied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dims {
    pub b: usize,
    pub t: usize,
    /// Heads per token row (H).
    pub heads: usize,
    /// Heads rotated, the first of each row (at most H).
    pub rotated: usize,
    /// Head size (D), even.
    pub d: usize,
}

/// The rotation angle of pair i at position pos: pos · inv_freq[i], rounded to f32 as the GPU and
/// transformers compute it (`inv_freq @ position_ids` in f32).
pub fn angle(pos: usize, inv_freq: f32) -> f64 {
    (pos as f32 * inv_freq) as f64
}

/// out (B, T, H, D) = inp rotated by angle(pos0 + t, inv_freq[i]) for the first `rotated` heads,
/// copied for the rest. inv_freq (D/2). Overwrites out.
pub fn forward<T: Real>(out: &mut [T], inp: &[T], inv_freq: &[f32], dims: Dims, pos0: usize) {
    rotate(out, inp, inv_freq, dims, pos0, 1.0);
}

/// Backward of `forward`: the rotation by -angle (the transpose of a rotation), so
/// dinp (B, T, H, D) = rotate(dout, -angle) on the rotated heads and dout on the rest.
/// Overwrites dinp.
pub fn backward<T: Real>(dinp: &mut [T], dout: &[T], inv_freq: &[f32], dims: Dims, pos0: usize) {
    rotate(dinp, dout, inv_freq, dims, pos0, -1.0);
}

fn rotate<T: Real>(out: &mut [T], inp: &[T], inv_freq: &[f32], dims: Dims, pos0: usize, sign: f64) {
    let Dims {
        b,
        t,
        heads,
        rotated,
        d,
    } = dims;
    let half = d / 2;
    for row in 0..b * t {
        let pos = pos0 + row % t;
        for h in 0..heads {
            let x = &inp[(row * heads + h) * d..(row * heads + h + 1) * d];
            let y = &mut out[(row * heads + h) * d..(row * heads + h + 1) * d];
            if h >= rotated {
                y.copy_from_slice(x);
                continue;
            }
            for i in 0..half {
                let a = angle(pos, inv_freq[i]);
                let (c, s) = (T::from_f64(a.cos()), T::from_f64(sign * a.sin()));
                y[i] = x[i] * c - x[i + half] * s;
                y[i + half] = x[i + half] * c + x[i] * s;
            }
        }
    }
}
