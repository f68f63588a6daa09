//! Inverted dropout with a counter-based mask: element i is kept iff
//! `Dropout { p, seed, step }.keeps(i)` (crate::hash), and kept values are scaled by
//! 1 / (1 - p).

use super::Real;
use crate::hash::{Dropout, scale};

/// out (N) = keep(i) ? inp (N) · 1/(1-p) : 0. Overwrites out. p in [0, 1).
pub fn forward<T: Real>(out: &mut [T], inp: &[T], p: f32, seed: u32, step: u32) {
    let s = T::from_f64(scale(p) as f64);
    let d = Dropout { p, seed, step };
    for i in 0..inp.len() {
        out[i] = if d.keeps(i as u32) {
            inp[i] * s
        } else {
            T::zero()
        };
    }
}

/// dinp (N) += keep(i) ? dout (N) · 1/(1-p) : 0, the same mask as the forward of (seed, step).
pub fn backward<T: Real>(dinp: &mut [T], dout: &[T], p: f32, seed: u32, step: u32) {
    let s = T::from_f64(scale(p) as f64);
    let d = Dropout { p, seed, step };
    for i in 0..dout.len() {
        if d.keeps(i as u32) {
            dinp[i] += dout[i] * s;
        }
    }
}
