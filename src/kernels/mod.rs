//! Kernel launchers: one module per shader file. Each family's `mod.rs` holds the params struct
//! mirrored from its WGSL, the `KernelSpec` of every entry point, the dispatch geometry and shape
//! checks: what the graph and inference call. Its `check.rs` holds the harness hooks (`FAMILY`,
//! `check`, `bench`) used by `shaderformer kernels` and the tests; a family with a variant
//! catalogue keeps it (names, candidates, tuning) in a file of its own (gemm's `variants.rs`).
//!
//! Launchers never submit: they return `Dispatch`es that the caller records (once, or every step).
//! Legend for shapes: B batch, T sequence, C channels, NH heads, HS head size, V vocabulary.

pub mod adamw;
pub mod attention;
pub mod baseline;
pub mod convert;
pub mod cross_entropy;
pub mod dropout;
pub mod embedding;
pub mod gelu;
pub mod gemm;
pub mod harness;
pub mod layernorm;
pub mod measure;
pub mod qkv_pack;
pub mod reduce;
pub mod residual;
pub mod rmsnorm;
pub mod rope;
pub mod step;
pub mod swiglu;

use crate::error::{Error, Result};
use crate::gpu::{Cost, DType, Dispatch, Gpu, KernelSpec, View, grid};

/// The memory layout of a launcher's `#[repr(C)]` params struct: its size and each field's name,
/// byte offset and byte size, in declaration order. A test compares it with the WGSL struct the
/// shader declares, so a mirrored field cannot drift.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParamsLayout {
    pub size: usize,
    pub fields: Vec<(&'static str, usize, usize)>,
}

/// `params_layout!(Params { a, b, c })`: the `ParamsLayout` of a `#[repr(C)]` + `Zeroable` struct.
/// The struct pattern has no `..`, so leaving out a field (or naming one that is gone) does not
/// compile.
macro_rules! params_layout {
    ($ty:ident { $($field:ident),* $(,)? }) => {{
        let p: $ty = bytemuck::Zeroable::zeroed();
        let $ty { $($field: _),* } = p;
        $crate::kernels::ParamsLayout {
            size: std::mem::size_of::<$ty>(),
            fields: vec![$(
                (stringify!($field), std::mem::offset_of!($ty, $field), std::mem::size_of_val(&p.$field))
            ),*],
        }
    }};
}
pub(crate) use params_layout;

/// Fails unless `view` holds exactly `len` elements of `dtype`.
pub fn expect(kernel: &str, view: &View, dtype: DType, len: usize) -> Result<()> {
    if view.dtype != dtype || view.len != len {
        return Err(Error::Shape {
            kernel: kernel.to_string(),
            tensor: view.name.to_string(),
            expected: format!("{len} {} elements", dtype.name()),
            got: format!("{} {} elements", view.len, view.dtype.name()),
        });
    }
    Ok(())
}

/// Fails unless every dimension is at least 1 and fits in a u32 for the shader's params.
pub fn expect_dims(kernel: &str, dims: &[(&str, usize)]) -> Result<()> {
    for (name, v) in dims {
        if *v == 0 || *v > u32::MAX as usize {
            return Err(Error::invalid(
                kernel,
                format!("dimension {name} = {v} must be between 1 and {}", u32::MAX),
            ));
        }
    }
    Ok(())
}

/// Fails, naming the tensor, when `view` is f16 and the adapter cannot run f16 shaders.
pub(crate) fn expect_f16_support(gpu: &Gpu, kernel: &str, view: &View) -> Result<()> {
    if view.dtype == DType::F16 && !gpu.has_f16() {
        return Err(Error::invalid(
            kernel,
            format!(
                "tensor {} is f16, but adapter {} lacks SHADER_F16 (wgpu::Features::SHADER_F16); \
                 store it in f32 on this adapter",
                view.name,
                gpu.adapter_name()
            ),
        ));
    }
    Ok(())
}

/// `x` rounded to f16, and those f16 values widened back to f32 (what an f16 kernel computes
/// with, for the reference).
pub fn round_f16(x: &[f32]) -> (Vec<half::f16>, Vec<f32>) {
    let h: Vec<half::f16> = x.iter().map(|&v| half::f16::from_f32(v)).collect();
    let w = h.iter().map(|v| v.to_f32()).collect();
    (h, w)
}

/// Workgroup size (the `WG` override) of the elementwise kernels.
pub const ELEMENTWISE_WG: u32 = 256;

/// Launches an elementwise kernel: one invocation per element of `n`, `ELEMENTWISE_WG` per
/// workgroup, the grid folded into x and y (`gpu::grid`). Every view must hold `n` f32 values.
pub fn elementwise(
    gpu: &Gpu,
    spec: &KernelSpec,
    n: usize,
    params: &[u8],
    args: &[&View],
    cost: Cost,
) -> Result<Dispatch> {
    let name = spec.name();
    expect_dims(&name, &[("N", n)])?;
    // Every tensor holds N f32 values; the per-step uniform, where bound, is no tensor.
    let tensors = args.iter().zip(spec.bindings);
    for (a, _) in tensors.filter(|(_, b)| **b != crate::gpu::Binding::Step) {
        expect(&name, a, DType::F32, n)?;
    }
    let wg = grid(
        (n as u32).div_ceil(ELEMENTWISE_WG),
        gpu.limits.max_compute_workgroups_per_dimension,
    );
    gpu.dispatch(
        spec,
        &[("WG", ELEMENTWISE_WG as f64)],
        params,
        args,
        wg,
        cost,
    )
}

/// The bytes of a params struct, for `Gpu::dispatch`.
pub fn bytes_of<T: bytemuck::Pod>(p: &T) -> &[u8] {
    bytemuck::bytes_of(p)
}
