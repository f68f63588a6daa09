//! AdamW with PyTorch's semantics (torch.optim.AdamW, single-tensor formula) and the clipping
//! factor of torch.nn.utils.clip_grad_norm_.

use super::Real;

/// The factor clip_grad_norm_ multiplies every gradient by: min(1, grad_clip / (norm + 1e-6)),
/// or 1 when `grad_clip` is 0 (clipping off). `norm` is the global norm of all gradients.
pub fn clip_scale<T: Real>(norm: T, grad_clip: T) -> T {
    if grad_clip > T::zero() {
        (grad_clip / (norm + T::from_f64(1e-6))).min(T::one())
    } else {
        T::one()
    }
}

/// The scalars of one AdamW step on one tensor.
#[derive(Clone, Copy, Debug)]
pub struct Update<T> {
    /// The factor every gradient is multiplied by (see `clip_scale`).
    pub clip: T,
    pub lr: T,
    pub beta1: T,
    pub beta2: T,
    pub eps: T,
    /// 0 for tensors that do not decay (biases, LayerNorm, other 1-D tensors).
    pub weight_decay: T,
    /// The step number, from 1.
    pub t: u32,
}

/// One AdamW step `u.t` (t = 1, 2, ...) on one tensor, in place:
/// param (N), m (N), v (N) updated; grad (N) read and multiplied by `u.clip`.
///
///   g = clip · grad
///   p = p · (1 - lr · weight_decay)
///   m = β1 · m + (1 - β1) · g
///   v = β2 · v + (1 - β2) · g²
///   denom = sqrt(v) / sqrt(1 - β2^t) + eps
///   p = p - lr / (1 - β1^t) · m / denom
pub fn step<T: Real>(param: &mut [T], m: &mut [T], v: &mut [T], grad: &[T], u: Update<T>) {
    let Update {
        clip,
        lr,
        beta1,
        beta2,
        eps,
        weight_decay,
        t,
    } = u;
    let one = T::one();
    let mut beta1_t = one;
    let mut beta2_t = one;
    for _ in 0..t {
        beta1_t *= beta1;
        beta2_t *= beta2;
    }
    let bias_correction1 = one - beta1_t;
    let bias_correction2 = one - beta2_t;
    let step_size = lr / bias_correction1;
    let bias_correction2_sqrt = bias_correction2.sqrt();
    for i in 0..param.len() {
        let g = clip * grad[i];
        param[i] *= one - lr * weight_decay;
        m[i] = beta1 * m[i] + (one - beta1) * g;
        v[i] = beta2 * v[i] + (one - beta2) * g * g;
        let denom = v[i].sqrt() / bias_correction2_sqrt + eps;
        param[i] -= step_size * m[i] / denom;
    }
}
