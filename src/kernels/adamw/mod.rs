//! adamw.wgsl launcher: one AdamW step on one tensor (or on a span of many tensors that share a
//! weight-decay setting: the graph runs it over whole flat parameter buffers), in place, with
//! PyTorch's semantics
//! (torch.optim.AdamW, single-tensor formula) and clipping by a global norm computed on the GPU
//! (torch.nn.utils.clip_grad_norm_, see `reduce::global_norm`).
//!
//! Precision: hyperparameters arrive as f32, but PyTorch holds them as f64 (0.9, not
//! 0.89999998), so 1 - β and ln β are computed on the CPU from the shortest decimal that rounds to
//! the f32 value, in f64, then rounded to f32. The bias corrections 1 - β^t are computed on the GPU
//! from t and ln β without cancellation (see the shader), so that a step changes only lr and t,
//! which the kernel reads from the per-step uniform (`kernels::step`). The result matches
//! PyTorch's float32 AdamW to a few ulp per step.

mod check;

pub use check::FAMILY;

use bytemuck::{Pod, Zeroable};

use super::step as per_step;
use super::{bytes_of, expect, expect_dims};
use crate::error::{Error, Result};
use crate::gpu::{
    Binding, Cost, DType, Dispatch, Gpu, KernelSpec, Shader, ShaderVariant, View, grid,
};

use Binding::{Read, ReadWrite};

/// Invocations per workgroup (the shader's `WG`).
const WG: u32 = 256;
/// Elements per invocation (the shader's `ELEMS`).
const ELEMS: u32 = 4;

pub const STEP: KernelSpec = KernelSpec {
    shader: Shader::Adamw,
    variant: ShaderVariant::Base,
    entry: "adamw_step",
    bindings: &[ReadWrite, Read, ReadWrite, ReadWrite, Read, Binding::Step],
};

/// AdamW hyperparameters shared by every tensor (lr and the step number change per step).
#[derive(Clone, Copy, Debug)]
pub struct Hyper {
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    /// Max global gradient norm; 0 = no clipping.
    pub grad_clip: f32,
}

/// The tensors one AdamW step updates, all (N): the parameter, its gradient (read) and the first
/// and second moments.
#[derive(Clone, Copy, Debug)]
pub struct Tensors<'a> {
    pub param: &'a View,
    pub grad: &'a View,
    pub m: &'a View,
    pub v: &'a View,
}

/// What changes from one optimizer step to the next: the learning rate and the step number t,
/// counted from 1 (a dispatch built by `step_at` reads both from the per-step uniform).
#[derive(Clone, Copy, Debug)]
pub struct Step {
    pub lr: f32,
    pub t: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct Params {
    n: u32,
    beta1: f32,
    beta2: f32,
    one_minus_beta1: f32,
    one_minus_beta2: f32,
    log_beta1: f32,
    log_beta2: f32,
    eps: f32,
    weight_decay: f32,
    grad_clip: f32,
}

/// The layout of `Params`, for the test that compares it with `Params` in the shader.
pub fn params_layout() -> super::ParamsLayout {
    super::params_layout!(Params {
        n,
        beta1,
        beta2,
        one_minus_beta1,
        one_minus_beta2,
        log_beta1,
        log_beta2,
        eps,
        weight_decay,
        grad_clip
    })
}

/// The f64 a user meant by an f32 hyperparameter: its shortest round-tripping decimal (0.9f32 is
/// 0.9, as in PyTorch, not 0.89999997615814).
pub fn widen(x: f32) -> f64 {
    x.to_string().parse().unwrap_or(x as f64)
}

fn check_hyper(name: &str, h: &Hyper, lr: f32, t: u32) -> Result<()> {
    let bad = |what: &str, v: f32, rule: &str| {
        Err(Error::invalid(
            name,
            format!("{what} = {v} must be {rule} (as in torch.optim.AdamW)"),
        ))
    };
    for (what, b) in [("beta1", h.beta1), ("beta2", h.beta2)] {
        if !(0.0..1.0).contains(&b) {
            return bad(what, b, "in [0, 1)");
        }
    }
    for (what, x) in [
        ("eps", h.eps),
        ("weight_decay", h.weight_decay),
        ("grad_clip", h.grad_clip),
        ("lr", lr),
    ] {
        if !(x >= 0.0 && x.is_finite()) {
            return bad(what, x, "finite and >= 0");
        }
    }
    if t == 0 {
        return Err(Error::invalid(name, "step number t counts from 1"));
    }
    Ok(())
}

/// One AdamW step on one tensor, in place: param (N), m (N), v (N) are read and overwritten;
/// grad (N) is read and scaled by clip = min(1, grad_clip / (norm[0] + 1e-6)) when grad_clip > 0
/// (norm (1) is the `reduce::global_norm` output, read on the GPU, so no CPU round trip; it is
/// bound but unused when grad_clip = 0). `decay` switches weight decay for this tensor (2-D
/// weights decay; biases, LayerNorm and 1-D tensors do not). `at` holds lr and t, from 1, in a
/// uniform of the dispatch's own.
///
/// PyTorch order: p *= 1 - lr·wd (if decay); m = β1 m + (1-β1) g; v = β2 v + (1-β2) g²;
/// denom = sqrt(v)/sqrt(1-β2^t) + eps; p -= (lr/(1-β1^t)) · m / denom.
pub fn step(
    gpu: &Gpu,
    tensors: Tensors,
    norm: &View,
    n: usize,
    hyper: &Hyper,
    decay: bool,
    at: Step,
) -> Result<Dispatch> {
    let Step { lr, t } = at;
    check_hyper(&STEP.name(), hyper, lr, t)?;
    let uniform = per_step::Step {
        t,
        lr,
        ..Default::default()
    };
    let uniform = per_step::uniform(gpu, "adamw.step", &uniform)?;
    step_at(gpu, tensors, norm, n, hyper, decay, &uniform)
}

/// `step`, reading lr and t from the per-step uniform `step` (`kernels::step`), whose writer
/// keeps lr finite and >= 0 and t >= 1: one dispatch serves every step.
pub fn step_at(
    gpu: &Gpu,
    tensors: Tensors,
    norm: &View,
    n: usize,
    hyper: &Hyper,
    decay: bool,
    step: &View,
) -> Result<Dispatch> {
    let Tensors { param, grad, m, v } = tensors;
    let name = STEP.name();
    expect_dims(&name, &[("N", n)])?;
    for x in [param, grad, m, v] {
        expect(&name, x, DType::F32, n)?;
    }
    expect(&name, norm, DType::F32, 1)?;
    check_hyper(&name, hyper, 0.0, 1)?;
    let (b1, b2) = (widen(hyper.beta1), widen(hyper.beta2));
    let params = Params {
        n: n as u32,
        beta1: hyper.beta1,
        beta2: hyper.beta2,
        one_minus_beta1: (1.0 - b1) as f32,
        one_minus_beta2: (1.0 - b2) as f32,
        log_beta1: b1.ln() as f32,
        log_beta2: b2.ln() as f32,
        eps: hyper.eps,
        weight_decay: if decay { hyper.weight_decay } else { 0.0 },
        grad_clip: hyper.grad_clip,
    };
    let wg = grid(
        (n as u32).div_ceil(WG * ELEMS),
        gpu.limits.max_compute_workgroups_per_dimension,
    );
    let cost = Cost {
        flops: 16 * n as u64,
        // read param, grad, m, v; write param, m, v
        bytes: 28 * n as u64,
    };
    gpu.dispatch(
        &STEP,
        &[("WG", WG as f64), ("ELEMS", ELEMS as f64)],
        bytes_of(&params),
        &[param, grad, m, v, norm, step],
        wg,
        cost,
    )
}
