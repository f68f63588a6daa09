//! Residual add and gradient accumulation.

use super::Real;

/// out (N) = a (N) + b (N)
pub fn forward<T: Real>(out: &mut [T], a: &[T], b: &[T]) {
    for i in 0..out.len() {
        out[i] = a[i] + b[i];
    }
}

/// da (N) += dout; db (N) += dout
pub fn backward<T: Real>(da: &mut [T], db: &mut [T], dout: &[T]) {
    for i in 0..dout.len() {
        da[i] += dout[i];
        db[i] += dout[i];
    }
}

/// dst (N) = src (N), or dst += src when `accumulate`
pub fn accumulate<T: Real>(dst: &mut [T], src: &[T], accumulate: bool) {
    for i in 0..dst.len() {
        dst[i] = if accumulate { dst[i] + src[i] } else { src[i] };
    }
}
