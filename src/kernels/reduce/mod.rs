//! reduce.wgsl launchers: `fill`, the global gradient norm (`partials_len`, `global_norm`) and a
//! scaled `sum`, all deterministic (no atomics; fixed slots and fixed summation order).
//!
//! A reduction runs in two stages. Stage 1 (`partials`) gives each input tensor of N elements
//! G = min(ceil(N / (WG·ELEMS)), MAX_GROUPS) workgroups; each writes the sum (of squares, for the
//! norm) of the elements it visits in a grid-stride loop into its own slot of a partials buffer.
//! Stage 2 (`finish`) is one workgroup that sums all the slots in a fixed order, scales, and takes
//! the square root for the norm.

mod check;

pub use check::FAMILY;

use bytemuck::{Pod, Zeroable};

use super::{bytes_of, expect, expect_dims};
use crate::error::{Error, Result};
use crate::gpu::{
    Binding, Cost, DType, Dispatch, Gpu, KernelSpec, Shader, ShaderVariant, View, grid,
};

use Binding::{Read, ReadWrite};

/// Invocations per workgroup (the shader's `WG`; a power of two).
const WG: u32 = 256;
/// Elements each invocation of stage 1 reads at least, before the workgroup cap applies.
const ELEMS: usize = 4;
/// Most stage-1 workgroups per tensor: enough to fill a large GPU, few enough that the partials
/// of a whole model stay small for the one-workgroup stage 2.
const MAX_GROUPS: usize = 1024;

pub const FILL: KernelSpec = KernelSpec {
    shader: Shader::Reduce,
    variant: ShaderVariant::Base,
    entry: "fill",
    bindings: &[ReadWrite],
};
pub const PARTIALS: KernelSpec = KernelSpec {
    shader: Shader::Reduce,
    variant: ShaderVariant::Base,
    entry: "partials",
    bindings: &[Read, ReadWrite],
};
pub const FINISH: KernelSpec = KernelSpec {
    shader: Shader::Reduce,
    variant: ShaderVariant::Base,
    entry: "finish",
    bindings: &[Read, ReadWrite],
};

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct Params {
    n: u32,
    base: u32,
    groups: u32,
    value: f32,
}

/// The layout of `Params`, for the test that compares it with `Params` in the shader.
pub fn params_layout() -> super::ParamsLayout {
    super::params_layout!(Params {
        n,
        base,
        groups,
        value
    })
}

/// Stage-1 workgroups (and partial slots) for a tensor of `n` elements.
fn groups(n: usize) -> usize {
    n.div_ceil(WG as usize * ELEMS).clamp(1, MAX_GROUPS)
}

/// view (N) = value. Overwrites.
pub fn fill(gpu: &Gpu, view: &View, value: f32) -> Result<Dispatch> {
    let name = FILL.name();
    let n = view.len;
    expect_dims(&name, &[("N", n)])?;
    expect(&name, view, DType::F32, n)?;
    let params = Params {
        n: n as u32,
        base: 0,
        groups: 0,
        value,
    };
    let wg = grid(
        (n as u32).div_ceil(WG),
        gpu.limits.max_compute_workgroups_per_dimension,
    );
    let cost = Cost {
        flops: 0,
        bytes: 4 * n as u64,
    };
    gpu.dispatch(&FILL, &[], bytes_of(&params), &[view], wg, cost)
}

/// The number of partial slots `global_norm` needs for tensors of these lengths (one slot range
/// per tensor, in order). The count may depend on the device; today it depends on `lens` alone.
pub fn partials_len(gpu: &Gpu, lens: &[usize]) -> usize {
    let _ = gpu;
    lens.iter().map(|&n| groups(n)).sum()
}

/// Stage 1 over `x` (N) into `partials[base..base + groups(N))`.
fn stage1(gpu: &Gpu, x: &View, partials: &View, base: usize, square: bool) -> Result<Dispatch> {
    let name = PARTIALS.name();
    let n = x.len;
    expect_dims(&name, &[(&x.name, n)])?;
    expect(&name, x, DType::F32, n)?;
    let g = groups(n);
    let params = Params {
        n: n as u32,
        base: base as u32,
        groups: g as u32,
        value: 0.0,
    };
    let wg = grid(g as u32, gpu.limits.max_compute_workgroups_per_dimension);
    let cost = Cost {
        flops: 2 * n as u64,
        bytes: 4 * (n + g) as u64,
    };
    let square = if square { 1.0 } else { 0.0 };
    gpu.dispatch(
        &PARTIALS,
        &[("SQUARE", square)],
        bytes_of(&params),
        &[x, partials],
        wg,
        cost,
    )
}

/// Stage 2: out[0] = scale · Σ partials[..count], square-rooted when `root`.
fn stage2(
    gpu: &Gpu,
    out: &View,
    partials: &View,
    count: usize,
    scale: f32,
    root: bool,
) -> Result<Dispatch> {
    let params = Params {
        n: count as u32,
        base: 0,
        groups: 1,
        value: scale,
    };
    let cost = Cost {
        flops: count as u64,
        bytes: 4 * (count + 1) as u64,
    };
    let root = if root { 1.0 } else { 0.0 };
    gpu.dispatch(
        &FINISH,
        &[("ROOT", root)],
        bytes_of(&params),
        &[partials, out],
        [1, 1, 1],
        cost,
    )
}

/// norm (1) = sqrt(Σ over every tensor in `grads` of Σ g²). Overwrites `norm` and the first
/// `partials_len` slots of `partials` (f32, at least `partials_len(gpu, lens)` elements).
///
/// Returns one stage-1 dispatch per tensor (tensor k writes its per-workgroup sums of squares to
/// its own slot range), then the stage-2 dispatch, to be recorded in this order. Deterministic:
/// the same gradients on the same adapter give the same bits.
pub fn global_norm(
    gpu: &Gpu,
    norm: &View,
    partials: &View,
    grads: &[&View],
) -> Result<Vec<Dispatch>> {
    let name = "reduce.global_norm".to_string();
    if grads.is_empty() {
        return Err(Error::invalid(
            &name,
            "global_norm needs at least one tensor",
        ));
    }
    expect(&name, norm, DType::F32, 1)?;
    let lens: Vec<usize> = grads.iter().map(|g| g.len).collect();
    let count = partials_len(gpu, &lens);
    if partials.dtype != DType::F32 || partials.len < count {
        return Err(Error::Shape {
            kernel: name,
            tensor: partials.name.to_string(),
            expected: format!("at least {count} f32 elements (partials_len)"),
            got: format!("{} {} elements", partials.len, partials.dtype.name()),
        });
    }
    expect_dims(&name, &[("partial slots", count)])?;
    let mut out = Vec::with_capacity(grads.len() + 1);
    let mut base = 0;
    for g in grads {
        out.push(stage1(gpu, g, partials, base, true)?);
        base += groups(g.len);
    }
    out.push(stage2(gpu, norm, partials, count, 1.0, true)?);
    Ok(out)
}

/// out (1) = scale · Σ inp (N). Overwrites `out`. Deterministic; allocates its own partials
/// (at most 4 KiB), kept alive by the returned dispatches.
pub fn sum(gpu: &Gpu, out: &View, inp: &View, n: usize, scale: f32) -> Result<Vec<Dispatch>> {
    let name = "reduce.sum";
    expect_dims(name, &[("N", n)])?;
    expect(name, inp, DType::F32, n)?;
    expect(name, out, DType::F32, 1)?;
    let count = groups(n);
    let partials = gpu.zeros("sum partials", DType::F32, count)?;
    Ok(vec![
        stage1(gpu, inp, &partials, 0, false)?,
        stage2(gpu, out, &partials, count, scale, false)?,
    ])
}
