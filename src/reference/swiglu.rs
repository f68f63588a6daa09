//! The gated MLP's activation (the Llama family's `act_fn(gate_proj(x)) * up_proj(x)` with
//! SiLU), llm.c style.

use super::Real;

/// The logistic sigmoid 1 / (1 + e^-x), written so that no exponential overflows.
pub fn sigmoid<T: Real>(x: T) -> T {
    if x >= T::zero() {
        T::one() / (T::one() + (-x).exp())
    } else {
        let e = x.exp();
        e / (T::one() + e)
    }
}

/// out (N) = silu(gate (N)) · up (N), silu(x) = x · sigmoid(x). Overwrites out.
pub fn forward<T: Real>(out: &mut [T], gate: &[T], up: &[T]) {
    for i in 0..out.len() {
        let g = gate[i];
        out[i] = g * sigmoid(g) * up[i];
    }
}

/// Backward of `forward`, accumulating into both outputs:
/// dgate (N) += dout · up · silu'(gate), silu'(x) = s · (1 + x · (1 - s)), s = sigmoid(x);
/// dup (N) += dout · silu(gate).
pub fn backward<T: Real>(dgate: &mut [T], dup: &mut [T], gate: &[T], up: &[T], dout: &[T]) {
    for i in 0..dout.len() {
        let g = gate[i];
        let s = sigmoid(g);
        dgate[i] += dout[i] * up[i] * (s * (T::one() + g * (T::one() - s)));
        dup[i] += dout[i] * (g * s);
    }
}
