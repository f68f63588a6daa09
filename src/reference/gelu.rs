//! GELU, GPT-2's tanh approximation ("gelu_new"), llm.c style.

use super::Real;

/// sqrt(2 / π)
pub const SQRT_2_OVER_PI: f64 = 0.797_884_560_802_865_4;
/// The cubic coefficient of the tanh approximation.
pub const CUBIC: f64 = 0.044715;

/// out (N) = 0.5 · x · (1 + tanh(sqrt(2/π) · (x + 0.044715 · x³))), x = inp (N). Overwrites out.
pub fn forward<T: Real>(out: &mut [T], inp: &[T]) {
    let (k, a, half) = (
        T::from_f64(SQRT_2_OVER_PI),
        T::from_f64(CUBIC),
        T::from_f64(0.5),
    );
    for i in 0..inp.len() {
        let x = inp[i];
        let u = k * (x + a * x * x * x);
        out[i] = half * x * (T::one() + u.tanh());
    }
}

/// dinp (N) += dout (N) · gelu'(inp (N)), with the exact derivative of the tanh form:
/// gelu'(x) = 0.5 · (1 + tanh u) + 0.5 · x · (1 - tanh² u) · sqrt(2/π) · (1 + 3 · 0.044715 · x²).
pub fn backward<T: Real>(dinp: &mut [T], inp: &[T], dout: &[T]) {
    let (k, a, half) = (
        T::from_f64(SQRT_2_OVER_PI),
        T::from_f64(CUBIC),
        T::from_f64(0.5),
    );
    let three = T::from_f64(3.0);
    for i in 0..inp.len() {
        let x = inp[i];
        let u = k * (x + a * x * x * x);
        let t = u.tanh();
        let du = k * (T::one() + three * a * x * x);
        let grad = half * (T::one() + t) + half * x * (T::one() - t * t) * du;
        dinp[i] += dout[i] * grad;
    }
}
