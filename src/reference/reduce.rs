//! Fill, global gradient norm and scaled sum.

use super::Real;

/// out (N) = value
pub fn fill<T: Real>(out: &mut [T], value: T) {
    for o in out.iter_mut() {
        *o = value;
    }
}

/// norm (1) = sqrt(Σ_k Σ_i grads[k][i]²), over tensors grads[k] (N_k) of any lengths.
/// The `total_norm` of torch.nn.utils.clip_grad_norm_ (2-norm).
pub fn global_norm<T: Real>(norm: &mut [T], grads: &[&[T]]) {
    let mut sumsq = T::zero();
    for g in grads {
        for &x in g.iter() {
            sumsq += x * x;
        }
    }
    norm[0] = sumsq.sqrt();
}

/// out (1) = scale · Σ_i inp[i], inp (N)
pub fn sum<T: Real>(out: &mut [T], inp: &[T], scale: T) {
    let mut total = T::zero();
    for &x in inp {
        total += x;
    }
    out[0] = scale * total;
}
