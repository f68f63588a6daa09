//! residual.wgsl launchers: out = a + b, its backward (da += dout, db += dout), and
//! dst (=|+=) src.

mod check;

pub use check::FAMILY;

use bytemuck::{Pod, Zeroable};

use super::{bytes_of, elementwise};
use crate::error::Result;
use crate::gpu::{Binding, Cost, DType, Dispatch, Gpu, KernelSpec, Shader, ShaderVariant, View};

use Binding::{Read, ReadWrite};

pub const FORWARD: KernelSpec = KernelSpec {
    shader: Shader::Residual,
    variant: ShaderVariant::Base,
    entry: "residual_forward",
    bindings: &[Read, Read, ReadWrite],
};
pub const BACKWARD: KernelSpec = KernelSpec {
    shader: Shader::Residual,
    variant: ShaderVariant::Base,
    entry: "residual_backward",
    bindings: &[Read, ReadWrite, ReadWrite],
};
pub const ACCUMULATE: KernelSpec = KernelSpec {
    shader: Shader::Residual,
    variant: ShaderVariant::Base,
    entry: "accumulate",
    bindings: &[Read, ReadWrite],
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

fn launch(
    gpu: &Gpu,
    spec: &KernelSpec,
    n: usize,
    accumulate: bool,
    args: &[&View],
    cost: Cost,
) -> Result<Dispatch> {
    let params = Params {
        n: n as u32,
        accumulate: accumulate as u32,
    };
    elementwise(gpu, spec, n, bytes_of(&params), args, cost)
}

/// out (N) = a (N) + b (N). Overwrites `out`.
pub fn forward(gpu: &Gpu, out: &View, a: &View, b: &View) -> Result<Dispatch> {
    let n = out.len;
    let cost = Cost {
        flops: n as u64,
        bytes: 12 * n as u64,
    };
    launch(gpu, &FORWARD, n, false, &[a, b, out], cost)
}

/// da (N) += dout (N); db (N) += dout (N). Accumulates.
pub fn backward(gpu: &Gpu, da: &View, db: &View, dout: &View) -> Result<Dispatch> {
    let n = dout.len;
    let cost = Cost {
        flops: 2 * n as u64,
        bytes: 20 * n as u64,
    };
    launch(gpu, &BACKWARD, n, true, &[dout, da, db], cost)
}

/// dst (N) = src (N), or dst += src when `accumulate`.
pub fn accumulate(gpu: &Gpu, dst: &View, src: &View, accumulate: bool) -> Result<Dispatch> {
    let n = dst.len;
    let cost = Cost {
        flops: n as u64,
        bytes: 12 * n as u64,
    };
    launch(gpu, &ACCUMULATE, n, accumulate, &[src, dst], cost)
}
