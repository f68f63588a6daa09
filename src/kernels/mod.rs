//! Kernel launchers: one module per shader file. Each module holds the params struct mirrored
//! from its WGSL, the `KernelSpec` of every entry point, the dispatch geometry, shape checks, and
//! the harness hooks (`check`, `bench`) used by `shaderformer kernels` and the tests.
//!
//! Launchers never submit: they return `Dispatch`es that the caller records (once, or every step).
//! Legend for shapes: B batch, T sequence, C channels, NH heads, HS head size, V vocabulary.

pub mod adamw;
pub mod attention;
pub mod cross_entropy;
pub mod dropout;
pub mod embedding;
pub mod gelu;
pub mod gemm;
pub mod harness;
pub mod layernorm;
pub mod reduce;
pub mod residual;

use crate::error::{Error, Result};
use crate::gpu::{DType, View};

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

/// The bytes of a params struct, for `Gpu::dispatch`.
pub fn bytes_of<T: bytemuck::Pod>(p: &T) -> &[u8] {
    bytemuck::bytes_of(p)
}
