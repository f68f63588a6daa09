//! dropout.wgsl launchers: inverted dropout with a counter-based mask.
//!
//! Element i is kept iff `hash(seed, step, i) >= threshold(p)` and kept values are scaled by
//! 1 / (1 - p); nothing is stored, the backward regenerates the mask from (seed, step, i). The
//! counter `step` is the per-step uniform's `dropout_step` (`kernels::step`), so one dispatch
//! draws every micro-step's mask.
//! p = 0 is the identity; p must be in [0, 1).
//! out (N) = keep(i) ? inp (N) / (1 - p) : 0; overwrites out.
//! dinp (N) = keep(i) ? dout (N) / (1 - p) : 0; overwritten, or added to (`+=`) when `accumulate`.

mod check;

pub use check::FAMILY;

use bytemuck::{Pod, Zeroable};

use super::step as per_step;
use super::{bytes_of, elementwise, expect, expect_dims};
use crate::error::{Error, Result};
use crate::gpu::{Binding, Cost, DType, Dispatch, Gpu, KernelSpec, Shader, ShaderVariant, View};

use Binding::{Read, ReadWrite};

pub const FORWARD: KernelSpec = KernelSpec {
    shader: Shader::Dropout,
    variant: ShaderVariant::Base,
    entry: "dropout_forward",
    bindings: &[Read, ReadWrite, Binding::Step],
};
pub const BACKWARD: KernelSpec = KernelSpec {
    shader: Shader::Dropout,
    variant: ShaderVariant::Base,
    entry: "dropout_backward",
    bindings: &[Read, ReadWrite, Binding::Step],
};

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct Params {
    seed: u32,
    n: u32,
    threshold: u32,
    scale: f32,
    accumulate: u32,
}

/// The layout of `Params`, for the test that compares it with `Params` in the shader.
pub fn params_layout() -> super::ParamsLayout {
    super::params_layout!(Params {
        seed,
        n,
        threshold,
        scale,
        accumulate
    })
}

pub use crate::hash::{scale, threshold};

/// A dispatch's drop probability p in [0, 1) and the (seed, step) that pick its mask.
pub use crate::hash::Dropout;

/// Whether element `i` is kept at (`seed`, `step`) with drop probability `p` in [0, 1): the CPU
/// twin of the shader's mask (see crate::hash).
pub fn keep(seed: u32, step: u32, i: u32, p: f32) -> bool {
    crate::hash::Dropout { p, seed, step }.keeps(i)
}

pub(crate) fn check_p(kernel: &str, p: f32) -> Result<()> {
    if !(0.0..1.0).contains(&p) {
        return Err(Error::invalid(
            kernel,
            format!("dropout probability p = {p} must be in [0, 1)"),
        ));
    }
    Ok(())
}

/// A dropout dispatch of `spec` from `src` to `dst`, its mask counter read from `step`.
#[allow(clippy::too_many_arguments)]
fn launch(
    gpu: &Gpu,
    spec: &KernelSpec,
    src: &View,
    dst: &View,
    n: usize,
    d: Dropout,
    accumulate: bool,
    step: &View,
) -> Result<Dispatch> {
    let name = spec.name();
    expect_dims(&name, &[("N", n)])?;
    check_p(&name, d.p)?;
    expect(&name, src, DType::F32, n)?;
    expect(&name, dst, DType::F32, n)?;
    let params = Params {
        seed: d.seed,
        n: n as u32,
        threshold: threshold(d.p),
        scale: scale(d.p),
        accumulate: accumulate as u32,
    };
    let cost = Cost {
        flops: n as u64,
        bytes: (8 + 4 * accumulate as u64) * n as u64,
    };
    elementwise(gpu, spec, n, bytes_of(&params), &[src, dst, step], cost)
}

/// A uniform of its own holding `d.step` as the mask counter.
fn own_step(gpu: &Gpu, d: Dropout) -> Result<View> {
    let at = per_step::Step {
        dropout_step: d.step,
        ..Default::default()
    };
    per_step::uniform(gpu, "dropout.step", &at)
}

/// out (N) = d.keeps(i) ? inp (N) / (1 - p) : 0. Overwrites `out`.
pub fn forward(gpu: &Gpu, out: &View, inp: &View, n: usize, d: Dropout) -> Result<Dispatch> {
    forward_at(gpu, out, inp, n, d, &own_step(gpu, d)?)
}

/// `forward` with the mask counter read from the per-step uniform `step` (`d.step` unused).
pub fn forward_at(
    gpu: &Gpu,
    out: &View,
    inp: &View,
    n: usize,
    d: Dropout,
    step: &View,
) -> Result<Dispatch> {
    launch(gpu, &FORWARD, inp, out, n, d, false, step)
}

/// dinp (N) = d.keeps(i) ? dout (N) / (1 - p) : 0, the forward's mask for the same `d`.
/// Overwrites `dinp`, or adds to it (`+=`) when `accumulate`.
pub fn backward(
    gpu: &Gpu,
    dinp: &View,
    dout: &View,
    n: usize,
    d: Dropout,
    accumulate: bool,
) -> Result<Dispatch> {
    backward_at(gpu, dinp, dout, n, d, accumulate, &own_step(gpu, d)?)
}

/// `backward` with the mask counter read from the per-step uniform `step` (`d.step` unused).
pub fn backward_at(
    gpu: &Gpu,
    dinp: &View,
    dout: &View,
    n: usize,
    d: Dropout,
    accumulate: bool,
    step: &View,
) -> Result<Dispatch> {
    launch(gpu, &BACKWARD, dout, dinp, n, d, accumulate, step)
}
