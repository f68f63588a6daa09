//! qkv_pack.wgsl launchers: attention's operand, q, k and v packed into one row per token (the
//! layout the fused attention kernels read, which serve each key/value head's group of query
//! heads themselves), and the backward that splits a gradient of it.
//!
//! q, dq (B·T, NH, HS); k, v, dk, dv (B·T, NKV, HS); qkv, dqkv (B·T, W), W = (NH + 2·NKV)·HS;
//! NKV divides NH. The forward overwrites qkv; the backward overwrites dq, dk and dv, or adds to
//! them (`accumulate`), one thread per element: the same inputs give the same bits.

pub mod check;

pub use check::FAMILY;

use bytemuck::{Pod, Zeroable};

use super::{bytes_of, expect, expect_dims};
use crate::error::{Error, Result};
use crate::gpu::{
    Binding, Cost, DType, Dispatch, Gpu, KernelSpec, Shader, ShaderVariant, View, grid,
};

use Binding::{Read, ReadWrite};

pub use crate::reference::qkv_pack::Dims;

pub const FORWARD: KernelSpec = KernelSpec {
    shader: Shader::QkvPack,
    variant: ShaderVariant::Base,
    entry: "qkv_pack_forward",
    bindings: &[Read, Read, Read, ReadWrite],
};
pub const BACKWARD_Q: KernelSpec = KernelSpec {
    shader: Shader::QkvPack,
    variant: ShaderVariant::Base,
    entry: "qkv_pack_backward_q",
    bindings: &[Read, ReadWrite],
};
pub const BACKWARD_KV: KernelSpec = KernelSpec {
    shader: Shader::QkvPack,
    variant: ShaderVariant::Base,
    entry: "qkv_pack_backward_kv",
    bindings: &[Read, ReadWrite, ReadWrite],
};

const WG: u32 = 256;

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct Params {
    n: u32,
    nh: u32,
    nkv: u32,
    hs: u32,
    accumulate: u32,
    zero: u32,
}

/// The layout of `Params`, for the test that compares it with `Params` in the shader.
pub fn params_layout() -> super::ParamsLayout {
    super::params_layout!(Params {
        n,
        nh,
        nkv,
        hs,
        accumulate,
        zero
    })
}

/// The tensors of `backward`: dq, dk and dv written, dqkv read.
#[derive(Clone, Copy, Debug)]
pub struct BackwardTensors<'a> {
    pub dq: &'a View,
    pub dk: &'a View,
    pub dv: &'a View,
    pub dqkv: &'a View,
}

/// Checks the dimensions; returns the lengths of q (B·T·NH·HS) and of k (B·T·NKV·HS).
fn check_dims(kernel: &str, dims: Dims) -> Result<(usize, usize)> {
    let Dims { b, t, nh, nkv, hs } = dims;
    expect_dims(
        kernel,
        &[("B", b), ("T", t), ("NH", nh), ("NKV", nkv), ("HS", hs)],
    )?;
    if !nh.is_multiple_of(nkv) {
        return Err(Error::invalid(
            kernel,
            format!("NKV = {nkv} key/value heads do not divide NH = {nh} query heads"),
        ));
    }
    // qkv, the largest, holds B·T·(NH + 2·NKV)·HS values.
    [b, t, nh + 2 * nkv, hs]
        .iter()
        .try_fold(1usize, |a, &x| a.checked_mul(x))
        .filter(|&l| l <= u32::MAX as usize)
        .ok_or_else(|| {
            Error::invalid(
                kernel,
                format!(
                    "B·T·(NH + 2·NKV)·HS = {b}·{t}·({nh} + 2·{nkv})·{hs} does not fit in 32 bits"
                ),
            )
        })?;
    Ok((b * t * nh * hs, b * t * nkv * hs))
}

fn launch(
    gpu: &Gpu,
    spec: &KernelSpec,
    params: Params,
    args: &[&View],
    cost: Cost,
) -> Result<Dispatch> {
    let workgroups = params.n.div_ceil(WG);
    gpu.dispatch(
        spec,
        &[("WG", WG as f64)],
        bytes_of(&params),
        args,
        grid(workgroups, gpu.limits.max_compute_workgroups_per_dimension),
        cost,
    )
}

fn params(n: usize, dims: Dims, accumulate: bool) -> Params {
    Params {
        n: n as u32,
        nh: dims.nh as u32,
        nkv: dims.nkv as u32,
        hs: dims.hs as u32,
        accumulate: accumulate as u32,
        zero: 0,
    }
}

/// qkv (B·T, W) = [q, k, v] row by row from q (B·T, NH, HS), k and v (B·T, NKV, HS). Overwrites
/// qkv.
pub fn forward(
    gpu: &Gpu,
    qkv: &View,
    (q, k, v): (&View, &View, &View),
    dims: Dims,
) -> Result<Dispatch> {
    let name = FORWARD.name();
    let (nq, nk) = check_dims(&name, dims)?;
    expect(&name, q, DType::F32, nq)?;
    expect(&name, k, DType::F32, nk)?;
    expect(&name, v, DType::F32, nk)?;
    let n = nq + 2 * nk;
    expect(&name, qkv, DType::F32, n)?;
    let cost = Cost {
        flops: 0,
        bytes: 8 * n as u64,
    };
    let p = params(n, dims, false);
    launch(gpu, &FORWARD, p, &[q, k, v, qkv], cost)
}

/// dq (B·T, NH, HS) = dqkv's q part; dk, dv (B·T, NKV, HS) = its k and v parts. Overwritten, or
/// added to (`+=`) when `accumulate`. Two dispatches (dq, then dk and dv); record them together.
pub fn backward(
    gpu: &Gpu,
    tensors: BackwardTensors,
    dims: Dims,
    accumulate: bool,
) -> Result<Vec<Dispatch>> {
    let BackwardTensors { dq, dk, dv, dqkv } = tensors;
    let name = BACKWARD_Q.name();
    let (nq, nk) = check_dims(&name, dims)?;
    expect(&name, dqkv, DType::F32, nq + 2 * nk)?;
    expect(&name, dq, DType::F32, nq)?;
    expect(&name, dk, DType::F32, nk)?;
    expect(&name, dv, DType::F32, nk)?;
    let rw = 1 + accumulate as u64;
    let q_cost = Cost {
        flops: accumulate as u64 * nq as u64,
        bytes: 4 * (1 + rw) * nq as u64,
    };
    let kv_cost = Cost {
        flops: accumulate as u64 * 2 * nk as u64,
        bytes: 4 * 2 * (1 + rw) * nk as u64,
    };
    Ok(vec![
        launch(
            gpu,
            &BACKWARD_Q,
            params(nq, dims, accumulate),
            &[dqkv, dq],
            q_cost,
        )?,
        launch(
            gpu,
            &BACKWARD_KV,
            params(nk, dims, accumulate),
            &[dqkv, dk, dv],
            kv_cost,
        )?,
    ])
}
