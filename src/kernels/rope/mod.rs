//! rope.wgsl launchers: rotary position embedding in Hugging Face's rotate-half layout, forward
//! and backward (the rotation by -angle).
//!
//! Layout: inp, out, dout, dinp (B, T, H, D), head vectors of D (even) contiguous floats, the H
//! heads of a token next to each other; inv_freq (D/2) from `Rope::inv_freq`. The first `rotated`
//! heads of every token row are rotated, the rest copied: q alone is (B, T, NH, D) with every
//! head rotated, k alone (B, T, n_kv_heads, D) likewise, and a fused q/k/v row
//! (B, T, NH + 2·n_kv_heads, D) rotates its first NH + n_kv_heads heads and copies v. Token t of
//! every sequence sits at position pos0 + step.pos0 + t: pos0 given to the launcher, step.pos0
//! read from the per-step uniform when the dispatch runs (0 in training; the KV cache's length
//! when decoding, so that one dispatch serves every decoded token).
//! Both directions overwrite their output.

pub mod check;
pub mod freq;

pub use check::FAMILY;
pub use freq::{ROPE_TYPES, Rope, RopeScaling};

use bytemuck::{Pod, Zeroable};

use super::step as per_step;
use super::{bytes_of, expect, expect_dims};
use crate::error::{Error, Result};
use crate::gpu::{
    Binding, Cost, DType, Dispatch, Gpu, KernelSpec, Shader, ShaderVariant, View, grid,
};

use Binding::{Read, ReadWrite};

/// The shape of a rotary embedding: (B, T, H, D), the first `rotated` heads of a row rotated.
pub use crate::reference::rope::Dims;

pub const ROTATE: KernelSpec = KernelSpec {
    shader: Shader::Rope,
    variant: ShaderVariant::Base,
    entry: "rope_rotate",
    bindings: &[Read, Read, ReadWrite, Binding::Step],
};

/// Positions at most this: with inverse frequencies at most 1 (every valid `Rope` keeps them so)
/// the angles stay below 2^16 · 2π, where the shader's reduction to [-π, π] is exact.
pub const MAX_POSITION: usize = 1 << 18;

const WG: u32 = 256;

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct Params {
    pairs: u32,
    t: u32,
    heads: u32,
    rotated: u32,
    half: u32,
    pos0: u32,
    sign: f32,
    zero: f32,
}

/// The layout of `Params`, for the test that compares it with `Params` in the shader.
pub fn params_layout() -> super::ParamsLayout {
    super::params_layout!(Params {
        pairs,
        t,
        heads,
        rotated,
        half,
        pos0,
        sign,
        zero
    })
}

/// out (B, T, H, D) = inp rotated by angle pos · inv_freq[i] (pos = pos0 + t) on the first
/// `rotated` heads of each row, inp itself on the rest. Overwrites out.
pub fn forward(
    gpu: &Gpu,
    out: &View,
    inp: &View,
    inv_freq: &View,
    dims: Dims,
    pos0: usize,
) -> Result<Dispatch> {
    let step = per_step::uniform(gpu, "rope.step", &per_step::Step::default())?;
    rotate(gpu, [out, inp, inv_freq, &step], dims, pos0, 1.0)
}

/// `forward` at the position the per-step uniform `step` holds when the dispatch runs (its
/// `pos0`; the caller keeps pos0 + T - 1 within `MAX_POSITION`, as the model's context does).
pub fn forward_at(
    gpu: &Gpu,
    out: &View,
    inp: &View,
    inv_freq: &View,
    dims: Dims,
    step: &View,
) -> Result<Dispatch> {
    rotate(gpu, [out, inp, inv_freq, step], dims, 0, 1.0)
}

/// Backward of `forward`: dinp (B, T, H, D) = dout rotated by -angle on the rotated heads,
/// dout itself on the rest. Overwrites dinp.
pub fn backward(
    gpu: &Gpu,
    dinp: &View,
    dout: &View,
    inv_freq: &View,
    dims: Dims,
    pos0: usize,
) -> Result<Dispatch> {
    let step = per_step::uniform(gpu, "rope.step", &per_step::Step::default())?;
    rotate(gpu, [dinp, dout, inv_freq, &step], dims, pos0, -1.0)
}

/// `backward` at the per-step uniform's position, as `forward_at`.
pub fn backward_at(
    gpu: &Gpu,
    dinp: &View,
    dout: &View,
    inv_freq: &View,
    dims: Dims,
    step: &View,
) -> Result<Dispatch> {
    rotate(gpu, [dinp, dout, inv_freq, step], dims, 0, -1.0)
}

/// The rotation by `sign` · angle of [out, inp, inv_freq, step uniform].
fn rotate(
    gpu: &Gpu,
    [out, inp, inv_freq, step]: [&View; 4],
    dims: Dims,
    pos0: usize,
    sign: f32,
) -> Result<Dispatch> {
    let name = ROTATE.name();
    let pairs = check_shapes(&name, out, inp, inv_freq, dims, pos0)?;
    let params = Params {
        pairs: pairs as u32,
        t: dims.t as u32,
        heads: dims.heads as u32,
        rotated: dims.rotated as u32,
        half: (dims.d / 2) as u32,
        pos0: pos0 as u32,
        sign,
        zero: 0.0,
    };
    let n = 2 * pairs as u64;
    let cost = Cost {
        flops: 4 * n,
        bytes: 8 * n,
    };
    let workgroups = (pairs as u32).div_ceil(WG);
    gpu.dispatch(
        &ROTATE,
        &[("WG", WG as f64)],
        bytes_of(&params),
        &[inp, inv_freq, out, step],
        grid(workgroups, gpu.limits.max_compute_workgroups_per_dimension),
        cost,
    )
}

/// Checks the dimensions, the tensors and the positions; returns the number of pairs.
fn check_shapes(
    kernel: &str,
    out: &View,
    inp: &View,
    inv_freq: &View,
    dims: Dims,
    pos0: usize,
) -> Result<usize> {
    let Dims {
        b,
        t,
        heads,
        rotated,
        d,
    } = dims;
    expect_dims(kernel, &[("B", b), ("T", t), ("H", heads), ("D", d)])?;
    if !d.is_multiple_of(2) {
        return Err(Error::invalid(
            kernel,
            format!("head_dim D = {d} must be even for the rotate-half layout"),
        ));
    }
    if rotated == 0 || rotated > heads {
        return Err(Error::invalid(
            kernel,
            format!("rotated heads = {rotated} must be between 1 and H = {heads}"),
        ));
    }
    let last = pos0.saturating_add(t - 1);
    if last > MAX_POSITION {
        return Err(Error::invalid(
            kernel,
            format!("position {last} (pos0 {pos0} + T {t} - 1) is past the limit {MAX_POSITION}"),
        ));
    }
    let len = [b, t, heads, d]
        .iter()
        .try_fold(1usize, |a, &x| a.checked_mul(x))
        .filter(|&l| l <= u32::MAX as usize)
        .ok_or_else(|| {
            Error::invalid(
                kernel,
                format!("B·T·H·D = {b}·{t}·{heads}·{d} does not fit in 32 bits"),
            )
        })?;
    expect(kernel, inp, DType::F32, len)?;
    expect(kernel, out, DType::F32, len)?;
    expect(kernel, inv_freq, DType::F32, d / 2)?;
    Ok(len / 2)
}
