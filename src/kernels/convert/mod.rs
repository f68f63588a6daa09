//! convert.wgsl launchers: f32 to bf16 (round to nearest, ties to even) and bf16 to f32, for
//! tensors stored in bf16 (two values to a 32-bit word).

mod check;

pub use check::FAMILY;

use bytemuck::{Pod, Zeroable};

use super::{ELEMENTWISE_WG, bytes_of, expect, expect_dims};
use crate::error::Result;
use crate::gpu::{
    Binding, Cost, DType, Dispatch, Gpu, KernelSpec, Shader, ShaderVariant, View, grid,
};

use Binding::{Read, ReadWrite};

pub const TO_BF16: KernelSpec = KernelSpec {
    shader: Shader::Convert,
    variant: ShaderVariant::Base,
    entry: "to_bf16",
    bindings: &[Read, ReadWrite],
};
pub const FROM_BF16: KernelSpec = KernelSpec {
    shader: Shader::Convert,
    variant: ShaderVariant::Base,
    entry: "from_bf16",
    bindings: &[Read, ReadWrite],
};

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct Params {
    n: u32,
}

/// The layout of `Params`, for the test that compares it with `Params` in the shader.
pub fn params_layout() -> super::ParamsLayout {
    super::params_layout!(Params { n })
}

/// `invocations` invocations of `spec` over N values, `ELEMENTWISE_WG` per workgroup.
fn launch(
    gpu: &Gpu,
    spec: &KernelSpec,
    n: usize,
    invocations: usize,
    args: &[&View],
) -> Result<Dispatch> {
    let params = Params { n: n as u32 };
    let wg = grid(
        (invocations as u32).div_ceil(ELEMENTWISE_WG),
        gpu.limits.max_compute_workgroups_per_dimension,
    );
    let cost = Cost {
        flops: n as u64,
        bytes: 6 * n as u64,
    };
    gpu.dispatch(
        spec,
        &[("WG", ELEMENTWISE_WG as f64)],
        bytes_of(&params),
        args,
        wg,
        cost,
    )
}

/// y (N bf16) = x (N f32) rounded to nearest, ties to even. Overwrites `y`.
pub fn to_bf16(gpu: &Gpu, y: &View, x: &View) -> Result<Dispatch> {
    let (name, n) = (TO_BF16.name(), x.len);
    expect_dims(&name, &[("N", n)])?;
    expect(&name, x, DType::F32, n)?;
    expect(&name, y, DType::BF16, n)?;
    launch(gpu, &TO_BF16, n, n.div_ceil(2), &[x, y])
}

/// y (N f32) = x (N bf16), exactly. Overwrites `y`.
pub fn from_bf16(gpu: &Gpu, y: &View, x: &View) -> Result<Dispatch> {
    let (name, n) = (FROM_BF16.name(), y.len);
    expect_dims(&name, &[("N", n)])?;
    expect(&name, x, DType::BF16, n)?;
    expect(&name, y, DType::F32, n)?;
    launch(gpu, &FROM_BF16, n, n, &[x, y])
}
