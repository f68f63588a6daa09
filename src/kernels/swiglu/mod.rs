//! swiglu.wgsl launchers: the gated MLP's activation, SiLU(gate) · up, and its backward.
//!
//! gate, up, out, dout, dgate, dup (N), separate tensors (gate_proj's and up_proj's outputs).
//! out (N) = silu(gate) · up, silu(x) = x · sigmoid(x); overwrites out.
//! dgate (N) = dout · up · silu'(gate), silu'(x) = s · (1 + x · (1 - s)), s = sigmoid(x);
//! dup (N) = dout · silu(gate); both overwritten, or added to (`+=`) when `accumulate`.

pub mod check;

pub use check::FAMILY;

use bytemuck::{Pod, Zeroable};

use super::{bytes_of, elementwise, expect_dims};
use crate::error::Result;
use crate::gpu::{Binding, Cost, Dispatch, Gpu, KernelSpec, Shader, ShaderVariant, View};

use Binding::{Read, ReadWrite};

pub const FORWARD: KernelSpec = KernelSpec {
    shader: Shader::Swiglu,
    variant: ShaderVariant::Base,
    entry: "swiglu_forward",
    bindings: &[Read, Read, ReadWrite],
};
pub const BACKWARD: KernelSpec = KernelSpec {
    shader: Shader::Swiglu,
    variant: ShaderVariant::Base,
    entry: "swiglu_backward",
    bindings: &[Read, Read, Read, ReadWrite, ReadWrite],
};

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct Params {
    n: u32,
    accumulate: u32,
}

/// The layout of `Params`, for the test that compares it with `Params` in the shader.
pub fn params_layout() -> super::ParamsLayout {
    super::params_layout!(Params { n, accumulate })
}

/// The gradients of `backward`: dgate (N) and dup (N) written; gate (N), up (N) (the forward's
/// inputs) and dout (N) read.
#[derive(Clone, Copy, Debug)]
pub struct BackwardTensors<'a> {
    pub dgate: &'a View,
    pub dup: &'a View,
    pub gate: &'a View,
    pub up: &'a View,
    pub dout: &'a View,
}

/// out (N) = silu(gate (N)) · up (N). Overwrites `out`.
pub fn forward(gpu: &Gpu, out: &View, gate: &View, up: &View, n: usize) -> Result<Dispatch> {
    expect_dims(&FORWARD.name(), &[("N", n)])?;
    let cost = Cost {
        flops: 6 * n as u64,
        bytes: 12 * n as u64,
    };
    let params = Params {
        n: n as u32,
        accumulate: 0,
    };
    elementwise(gpu, &FORWARD, n, bytes_of(&params), &[gate, up, out], cost)
}

/// dgate (N) = dout · up · silu'(gate), dup (N) = dout · silu(gate); both overwritten, or added
/// to (`+=`) when `accumulate`.
pub fn backward(
    gpu: &Gpu,
    tensors: BackwardTensors,
    n: usize,
    accumulate: bool,
) -> Result<Dispatch> {
    let BackwardTensors {
        dgate,
        dup,
        gate,
        up,
        dout,
    } = tensors;
    expect_dims(&BACKWARD.name(), &[("N", n)])?;
    let cost = Cost {
        flops: 12 * n as u64,
        bytes: (20 + 8 * accumulate as u64) * n as u64,
    };
    let params = Params {
        n: n as u32,
        accumulate: accumulate as u32,
    };
    let args = [gate, up, dout, dgate, dup];
    elementwise(gpu, &BACKWARD, n, bytes_of(&params), &args, cost)
}
