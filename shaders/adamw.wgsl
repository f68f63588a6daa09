// AdamW, one step on one tensor, in place, with PyTorch's semantics (torch.optim.AdamW) and the
// clipping factor of torch.nn.utils.clip_grad_norm_.
//
// adamw_step: param (N), m (N), v (N)   read and overwritten (the optimizer updates in place)
//             grad (N)                  read only; scaled by clip on the fly
//             norm (1)                  the global gradient norm (reduce.wgsl), read when clipping
//
//   clip  = min(1, grad_clip / (norm[0] + 1e-6))   when grad_clip > 0, else 1
//   g     = clip · grad
//   p     = p · (1 - lr · weight_decay)            weight_decay is 0 for tensors that do not decay
//   m     = β1 · m + (1 - β1) · g
//   v     = β2 · v + (1 - β2) · g²
//   denom = sqrt(v) / sqrt(1 - β2^t) + eps
//   p     = p - lr / (1 - β1^t) · m / denom
//
// The bias corrections 1 - β^t are computed here from t, so that a step dispatch reads lr and t
// alone from the per-step uniform (include/step.wgsl) and serves every step.
// 1 - β^t = -expm1(t · ln β) with ln β precomputed on the CPU in f64: a series for small |t · ln β| avoids the cancellation of 1 - pow(β, t) in f32 (which
// would cost ~1e-5 relative error at t = 1 with β2 = 0.999). Accurate to a few f32 ulp.
//
// Each invocation updates ELEMS elements WG apart (coalesced); the 1-D grid of workgroups may be
// folded into 2-D for large N (see gpu::grid).

struct Params {
    n: u32,
    beta1: f32,
    beta2: f32,
    one_minus_beta1: f32,
    one_minus_beta2: f32,
    log_beta1: f32,       // ln β1
    log_beta2: f32,       // ln β2
    eps: f32,
    weight_decay: f32,    // 0 when this tensor does not decay
    grad_clip: f32,       // 0 = no clipping
}

override WG: u32 = 256u;
override ELEMS: u32 = 4u;

@group(0) @binding(0) var<uniform> p: Params;
#include "include/step.wgsl"

#include "include/grid.wgsl"
@group(0) @binding(1) var<storage, read_write> param: array<f32>;
@group(0) @binding(2) var<storage, read> grad: array<f32>;
@group(0) @binding(3) var<storage, read_write> m: array<f32>;
@group(0) @binding(4) var<storage, read_write> v: array<f32>;
@group(0) @binding(5) var<storage, read> norm: array<f32>;

// 1 - exp(x) for x <= 0, without cancellation near 0.
fn one_minus_exp(x: f32) -> f32 {
    if (x > -0.5) {
        // -expm1(x) = -x (1 + x/2 (1 + x/3 (1 + ...))); with |x| <= 1/2, 11 terms reach 1e-11.
        var s = 1.0;
        for (var k = 11u; k >= 2u; k--) {
            s = 1.0 + s * x / f32(k);
        }
        return -x * s;
    }
    return 1.0 - exp(x);
}

@compute @workgroup_size(WG)
fn adamw_step(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_id) lid: vec3<u32>) {
    let first = global_index(wid, nwg, WG * ELEMS, lid.x);
    if (first >= p.n) {
        return;
    }
    let tf = f32(step.t);
    let step_size = step.lr / one_minus_exp(tf * p.log_beta1);
    let bias_correction2_sqrt = sqrt(one_minus_exp(tf * p.log_beta2));
    let decay = 1.0 - step.lr * p.weight_decay;
    var clip = 1.0;
    if (p.grad_clip > 0.0) {
        clip = min(1.0, p.grad_clip / (norm[0] + 1e-6));
    }
    for (var e = 0u; e < ELEMS; e++) {
        let i = first + e * WG;
        if (i >= p.n) {
            break;
        }
        let g = grad[i] * clip;
        let mi = p.beta1 * m[i] + p.one_minus_beta1 * g;
        let vi = p.beta2 * v[i] + p.one_minus_beta2 * (g * g);
        m[i] = mi;
        v[i] = vi;
        let denom = sqrt(vi) / bias_correction2_sqrt + p.eps;
        param[i] = param[i] * decay - step_size * mi / denom;
    }
}
