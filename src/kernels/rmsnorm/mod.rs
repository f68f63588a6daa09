//! rmsnorm.wgsl launchers: RMSNorm over the channels of each row (the Llama family's norms),
//! forward, forward fused with the residual add, and backward.
//!
//! inp, out, dout, dinp, a, b, resid (N, C); weight, dweight (C); rstd (N).
//! The forwards overwrite their outputs (out, rstd; resid too in `forward_residual`). The backward
//! overwrites dinp or adds to it (`accumulate_dinp`), and always accumulates (`+=`) into dweight,
//! summed over rows in a fixed order (per-block partials in a private scratch buffer, then a fixed
//! tree, as layernorm's dweight): the same inputs give the same bits.
//!
//! One variant, workgroup-memory trees (every adapter); a subgroup variant, as layernorm has,
//! would be a tuner candidate for later.

pub mod check;

pub use check::FAMILY;

// The row-kernel geometry is layernorm's: the same workgroup size, threads per row, backward
// blocks (both shaders hold MAX_ROWS = 256 rows' statistics) and dweight reduction columns.
// Its Params too: include/row_norm.wgsl declares them once for both shaders.
use super::bytes_of;
use super::layernorm::{PARAMS_COLS, Params, WG, blocking, check_shapes, threads_per_row};
use crate::error::{Error, Result};
use crate::gpu::{
    Binding, Cost, DType, Dispatch, Gpu, KernelSpec, Shader, ShaderVariant, View, grid,
};

use Binding::{Read, ReadWrite};

/// The shape of an RMSNorm: N rows of C channels.
pub use crate::reference::rmsnorm::Dims;

/// The tensors of `forward`: out (N, C) and rstd (N) written; inp (N, C) and weight (C) read.
#[derive(Clone, Copy, Debug)]
pub struct ForwardTensors<'a> {
    pub out: &'a View,
    pub rstd: &'a View,
    pub inp: &'a View,
    pub weight: &'a View,
}

/// The tensors of `forward_residual`: resid (N, C) = a + b, out (N, C) and rstd (N) written;
/// a (N, C), b (N, C) and weight (C) read.
#[derive(Clone, Copy, Debug)]
pub struct ResidualForwardTensors<'a> {
    pub resid: &'a View,
    pub out: &'a View,
    pub rstd: &'a View,
    pub a: &'a View,
    pub b: &'a View,
    pub weight: &'a View,
}

/// The tensors of `backward`: dinp (N, C) and dweight (C) written; dout (N, C) and the forward's
/// inp (N, C) (resid, after `forward_residual`), weight (C) and rstd (N) read.
#[derive(Clone, Copy, Debug)]
pub struct BackwardTensors<'a> {
    pub dinp: &'a View,
    pub dweight: &'a View,
    pub dout: &'a View,
    pub inp: &'a View,
    pub weight: &'a View,
    pub rstd: &'a View,
}

pub const FORWARD: KernelSpec = KernelSpec {
    shader: Shader::RmsNorm,
    variant: ShaderVariant::Base,
    entry: "rmsnorm_forward",
    bindings: &[Read, Read, ReadWrite, ReadWrite],
};
pub const RESIDUAL_FORWARD: KernelSpec = KernelSpec {
    shader: Shader::RmsNorm,
    variant: ShaderVariant::Base,
    entry: "rmsnorm_residual_forward",
    bindings: &[Read, Read, Read, ReadWrite, ReadWrite, ReadWrite],
};
pub const BACKWARD_ROWS: KernelSpec = KernelSpec {
    shader: Shader::RmsNorm,
    variant: ShaderVariant::Base,
    entry: "rmsnorm_backward_rows",
    bindings: &[Read, Read, Read, Read, ReadWrite, ReadWrite],
};
pub const BACKWARD_PARAMS: KernelSpec = KernelSpec {
    shader: Shader::RmsNorm,
    variant: ShaderVariant::Base,
    entry: "rmsnorm_backward_params",
    bindings: &[Read, ReadWrite],
};

/// The layout of `Params` (layernorm's), for the test that compares it with `Params` in the
/// shader.
pub fn params_layout() -> super::ParamsLayout {
    super::layernorm::params_layout()
}

/// Fails unless eps is finite and positive (rstd of a zero row would be infinite otherwise).
fn check_eps(kernel: &str, eps: f32) -> Result<()> {
    if !(eps.is_finite() && eps > 0.0) {
        return Err(Error::invalid(
            kernel,
            format!("eps = {eps} must be finite and positive"),
        ));
    }
    Ok(())
}

fn forward_params(Dims { n, c }: Dims, eps: f32) -> Params {
    Params {
        n: n as u32,
        c: c as u32,
        rows_per_block: 1,
        blocks: n as u32,
        accumulate: 0,
        eps,
    }
}

/// The row-group launch both forwards share: WG / TPR rows per workgroup.
fn launch_rows(
    gpu: &Gpu,
    spec: &KernelSpec,
    dims: Dims,
    eps: f32,
    args: &[&View],
    cost: Cost,
) -> Result<Dispatch> {
    let tpr = threads_per_row(dims.c);
    let workgroups = (dims.n as u32).div_ceil(WG / tpr);
    gpu.dispatch(
        spec,
        &[("WG", WG as f64), ("TPR", tpr as f64)],
        bytes_of(&forward_params(dims, eps)),
        args,
        grid(workgroups, gpu.limits.max_compute_workgroups_per_dimension),
        cost,
    )
}

/// out (N, C) = inp · rstd · weight, rstd (N) = 1 / sqrt(Σ_c inp² / C + eps), from inp (N, C) and
/// weight (C). Overwrites out and rstd.
pub fn forward(gpu: &Gpu, tensors: ForwardTensors, dims: Dims, eps: f32) -> Result<Dispatch> {
    let ForwardTensors {
        out,
        rstd,
        inp,
        weight,
    } = tensors;
    let name = FORWARD.name();
    check_shapes(&name, (dims.n, dims.c), &[out, inp], &[weight], &[rstd])?;
    check_eps(&name, eps)?;
    let (n64, c64) = (dims.n as u64, dims.c as u64);
    let cost = Cost {
        flops: 4 * n64 * c64,
        bytes: 4 * (2 * n64 * c64 + c64 + n64),
    };
    launch_rows(gpu, &FORWARD, dims, eps, &[inp, weight, out, rstd], cost)
}

/// resid (N, C) = a + b, then out (N, C) and rstd (N) as `forward` of resid, in one pass over the
/// row (a separate residual add would write resid and read it back). Overwrites resid, out and
/// rstd.
pub fn forward_residual(
    gpu: &Gpu,
    tensors: ResidualForwardTensors,
    dims: Dims,
    eps: f32,
) -> Result<Dispatch> {
    let ResidualForwardTensors {
        resid,
        out,
        rstd,
        a,
        b,
        weight,
    } = tensors;
    let name = RESIDUAL_FORWARD.name();
    check_shapes(
        &name,
        (dims.n, dims.c),
        &[resid, out, a, b],
        &[weight],
        &[rstd],
    )?;
    check_eps(&name, eps)?;
    let (n64, c64) = (dims.n as u64, dims.c as u64);
    let cost = Cost {
        flops: 5 * n64 * c64,
        bytes: 4 * (4 * n64 * c64 + c64 + n64),
    };
    let args = [a, b, weight, resid, out, rstd];
    launch_rows(gpu, &RESIDUAL_FORWARD, dims, eps, &args, cost)
}

/// Backward of `forward`, given dout (N, C) and the forward's inp (N, C), weight (C) and rstd (N):
/// dinp (N, C) = rstd · (dnorm - xhat · mean_c(dnorm · xhat)), xhat = inp · rstd,
/// dnorm = weight · dout; overwritten, or added to (`+=`) when `accumulate_dinp`.
/// dweight (C) += Σ_rows dout · xhat (always accumulates).
/// Two dispatches: rows (dinp and per-block partials into a scratch buffer of P·C floats,
/// P ≤ max(512, N/256) blocks, shared with other backwards of the same shape), then a
/// fixed-order reduction of the partials; record them consecutively.
pub fn backward(
    gpu: &Gpu,
    tensors: BackwardTensors,
    dims: Dims,
    accumulate_dinp: bool,
) -> Result<Vec<Dispatch>> {
    let BackwardTensors {
        dinp,
        dweight,
        dout,
        inp,
        weight,
        rstd,
    } = tensors;
    let Dims { n, c } = dims;
    let name = BACKWARD_ROWS.name();
    check_shapes(
        &name,
        (dims.n, dims.c),
        &[dinp, dout, inp],
        &[dweight, weight],
        &[rstd],
    )?;
    let (rows, blocks) = blocking(n);
    // Written by the rows dispatch and consumed by the next one: every backward of this shape
    // (one per RMSNorm of a model) shares the buffer.
    let partials = gpu.shared_scratch("rmsnorm.partials", DType::F32, blocks * c)?;
    let params = Params {
        n: n as u32,
        c: c as u32,
        rows_per_block: rows as u32,
        blocks: blocks as u32,
        accumulate: accumulate_dinp as u32,
        eps: 0.0,
    };
    let (n64, c64) = (n as u64, c as u64);
    let max = gpu.limits.max_compute_workgroups_per_dimension;
    let rows_dispatch = gpu.dispatch(
        &BACKWARD_ROWS,
        &[("WG", WG as f64), ("TPR", threads_per_row(c) as f64)],
        bytes_of(&params),
        &[dout, inp, weight, rstd, dinp, &partials],
        grid(blocks as u32, max),
        Cost {
            flops: 10 * n64 * c64,
            bytes: 4 * ((3 + accumulate_dinp as u64) * n64 * c64 + c64 + n64),
        },
    )?;
    let params_dispatch = gpu.dispatch(
        &BACKWARD_PARAMS,
        &[("WG", WG as f64), ("COLS", PARAMS_COLS as f64)],
        bytes_of(&params),
        &[&partials, dweight],
        grid((c as u32).div_ceil(PARAMS_COLS), max),
        Cost {
            flops: blocks as u64 * c64,
            bytes: 4 * (blocks as u64 + 2) * c64,
        },
    )?;
    Ok(vec![rows_dispatch, params_dispatch])
}
