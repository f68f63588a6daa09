//! dropout.wgsl launchers: inverted dropout with a counter-based mask.
//!
//! Element i is kept iff `hash(seed, step, i) >= threshold(p)` and kept values are scaled by
//! 1 / (1 - p); nothing is stored, the backward regenerates the mask from (seed, step, i).
//! p = 0 is the identity; p must be in [0, 1).
//! out (N) = keep(i) ? inp (N) / (1 - p) : 0; overwrites out.
//! dinp (N) = keep(i) ? dout (N) / (1 - p) : 0; overwritten, or added to (`+=`) when `accumulate`.

mod check;

pub use check::FAMILY;

use std::mem::offset_of;

use bytemuck::{Pod, Zeroable};

use super::{bytes_of, elementwise, expect, expect_dims};
use crate::error::{Error, Result};
use crate::gpu::{Binding, Cost, DType, Dispatch, Gpu, KernelSpec, Shader, ShaderVariant, View};

use Binding::{Read, ReadWrite};

pub const FORWARD: KernelSpec = KernelSpec {
    shader: Shader::Dropout,
    variant: ShaderVariant::Base,
    entry: "dropout_forward",
    bindings: &[Read, ReadWrite],
};
pub const BACKWARD: KernelSpec = KernelSpec {
    shader: Shader::Dropout,
    variant: ShaderVariant::Base,
    entry: "dropout_backward",
    bindings: &[Read, ReadWrite],
};

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct Params {
    seed: u32,
    step: u32,
    n: u32,
    threshold: u32,
    scale: f32,
    accumulate: u32,
}

/// The layout of `Params`, for the test that compares it with `Params` in the shader.
pub fn params_layout() -> super::ParamsLayout {
    super::params_layout!(Params {
        seed,
        step,
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

fn launch(
    gpu: &Gpu,
    spec: &KernelSpec,
    src: &View,
    dst: &View,
    n: usize,
    d: Dropout,
    accumulate: bool,
) -> Result<Dispatch> {
    let name = spec.name();
    expect_dims(&name, &[("N", n)])?;
    check_p(&name, d.p)?;
    expect(&name, src, DType::F32, n)?;
    expect(&name, dst, DType::F32, n)?;
    let params = Params {
        seed: d.seed,
        step: d.step,
        n: n as u32,
        threshold: threshold(d.p),
        scale: scale(d.p),
        accumulate: accumulate as u32,
    };
    let cost = Cost {
        flops: n as u64,
        bytes: (8 + 4 * accumulate as u64) * n as u64,
    };
    elementwise(gpu, spec, n, bytes_of(&params), &[src, dst], cost)
}

/// out (N) = d.keeps(i) ? inp (N) / (1 - p) : 0. Overwrites `out`.
pub fn forward(gpu: &Gpu, out: &View, inp: &View, n: usize, d: Dropout) -> Result<Dispatch> {
    launch(gpu, &FORWARD, inp, out, n, d, false)
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
    launch(gpu, &BACKWARD, dout, dinp, n, d, accumulate)
}

/// Byte offset of the step counter in a dropout dispatch's params, for callers that copy a new
/// counter into `Dispatch::params` on the GPU timeline (between micro-steps of one submission).
pub const STEP_OFFSET: u64 = offset_of!(Params, step) as u64;

/// Rewrites the seed and step counter of a dropout forward or backward dispatch between training
/// steps, without rebuilding it (queued; takes effect at the next submission).
pub fn set_step(gpu: &Gpu, dispatch: &Dispatch, seed: u32, step: u32) {
    debug_assert!(
        dispatch.name == FORWARD.name() || dispatch.name == BACKWARD.name(),
        "set_step on {}, not a dropout dispatch",
        dispatch.name
    );
    const _: () = assert!(offset_of!(Params, step) == offset_of!(Params, seed) + 4);
    gpu.queue.write_buffer(
        &dispatch.params,
        offset_of!(Params, seed) as u64,
        bytemuck::cast_slice(&[seed, step]),
    );
}
