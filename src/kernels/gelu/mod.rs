//! gelu.wgsl launchers: GELU, GPT-2's tanh approximation (gelu_new), and its backward.
//!
//! out (N) = 0.5 · x · (1 + tanh(sqrt(2/π) · (x + 0.044715 · x³))), x = inp (N); overwrites out.
//! dinp (N) = dout (N) · gelu'(inp), the exact derivative of the tanh form; overwritten, or added
//! to (`+=`) when `accumulate`.

mod check;

pub use check::FAMILY;

use bytemuck::{Pod, Zeroable};

use super::{bytes_of, elementwise, expect_dims};
use crate::error::Result;
use crate::gpu::{Binding, Cost, DType, Dispatch, Gpu, KernelSpec, Shader, ShaderVariant, View};

use Binding::{Read, ReadWrite};

pub const FORWARD: KernelSpec = KernelSpec {
    shader: Shader::Gelu,
    variant: ShaderVariant::Base,
    entry: "gelu_forward",
    bindings: &[Read, ReadWrite],
};
pub const BACKWARD: KernelSpec = KernelSpec {
    shader: Shader::Gelu,
    variant: ShaderVariant::Base,
    entry: "gelu_backward",
    bindings: &[Read, Read, ReadWrite],
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
    params: Params,
    args: &[&View],
    cost: Cost,
) -> Result<Dispatch> {
    elementwise(gpu, spec, params.n as usize, bytes_of(&params), args, cost)
}

/// out (N) = gelu(inp (N)). Overwrites `out`.
pub fn forward(gpu: &Gpu, out: &View, inp: &View, n: usize) -> Result<Dispatch> {
    expect_dims(&FORWARD.name(), &[("N", n)])?;
    let cost = Cost {
        flops: 14 * n as u64,
        bytes: 8 * n as u64,
    };
    let params = Params {
        n: n as u32,
        accumulate: 0,
    };
    launch(gpu, &FORWARD, params, &[inp, out], cost)
}

/// dinp (N) = dout (N) · gelu'(inp (N)); overwrites `dinp`, or adds to it (`+=`) when
/// `accumulate`.
pub fn backward(
    gpu: &Gpu,
    dinp: &View,
    inp: &View,
    dout: &View,
    n: usize,
    accumulate: bool,
) -> Result<Dispatch> {
    expect_dims(&BACKWARD.name(), &[("N", n)])?;
    let cost = Cost {
        flops: 22 * n as u64,
        bytes: (12 + 4 * accumulate as u64) * n as u64,
    };
    let params = Params {
        n: n as u32,
        accumulate: accumulate as u32,
    };
    launch(gpu, &BACKWARD, params, &[inp, dout, dinp], cost)
}
