//! layernorm.wgsl launchers: LayerNorm over the channels of each row, forward and backward.
//!
//! inp, out, dout, dinp (N, C); weight, bias, dweight, dbias (C); mean, rstd (N).
//! The forward overwrites out, mean and rstd. The backward overwrites dinp or adds to it
//! (`accumulate_dinp`), and always accumulates (`+=`) into dweight and dbias. It sums dweight and
//! dbias over rows in a fixed order (per-block partials in a private scratch buffer, then a
//! fixed tree), so the same inputs give the same bits.
//!
//! Two variants compute the row reductions (the forward's mean and variance, the backward's
//! Σ dnorm and Σ dnorm · xhat), both from layernorm.wgsl: workgroup-memory trees (the base
//! variant, every adapter) and subgroup sums (its `#if SUBGROUP` sections, adapters with
//! SUBGROUP). `forward` and `backward` take the subgroup kernels when the adapter has them;
//! `forward_with` and `backward_with` choose. Both variants share the final dweight/dbias
//! reduction.

mod check;

pub use check::FAMILY;
pub(crate) use check::verify_variant as verify_baseline;

use bytemuck::{Pod, Zeroable};

use super::{bytes_of, expect, expect_dims};
use crate::error::{Error, Result};
use crate::gpu::{
    Binding, Cost, DType, Dispatch, Gpu, KernelSpec, Shader, ShaderVariant, View, grid,
};
use crate::reference;

use Binding::{Read, ReadWrite};

/// The epsilon added to the variance.
pub const EPS: f32 = reference::layernorm::EPS as f32;

/// The shape of a LayerNorm: N rows of C channels.
pub use crate::reference::layernorm::Dims;

/// The tensors of `forward`: out (N, C), mean (N) and rstd (N) written; inp (N, C), weight (C)
/// and bias (C) read.
#[derive(Clone, Copy, Debug)]
pub struct ForwardTensors<'a> {
    pub out: &'a View,
    pub mean: &'a View,
    pub rstd: &'a View,
    pub inp: &'a View,
    pub weight: &'a View,
    pub bias: &'a View,
}

/// The tensors of `backward`: dinp (N, C), dweight (C) and dbias (C) written; dout (N, C) and
/// the forward's inp (N, C), weight (C), mean (N) and rstd (N) read.
#[derive(Clone, Copy, Debug)]
pub struct BackwardTensors<'a> {
    pub dinp: &'a View,
    pub dweight: &'a View,
    pub dbias: &'a View,
    pub dout: &'a View,
    pub inp: &'a View,
    pub weight: &'a View,
    pub mean: &'a View,
    pub rstd: &'a View,
}

/// Most rows one backward workgroup handles (the shader's MAX_ROWS).
const MAX_ROWS: usize = 256;
/// Backward blocks to aim for: enough workgroups to fill a big GPU, few enough partials that
/// their scratch and final reduction stay small next to the (N, C) tensors.
const TARGET_BLOCKS: usize = 512;
/// Fewest rows per backward block, so the partials are at most 1/4 of the size of dout.
const MIN_ROWS: usize = 8;
/// Channels per workgroup of the final dweight/dbias reduction.
pub(super) const PARAMS_COLS: u32 = 32;

pub const FORWARD: KernelSpec = KernelSpec {
    shader: Shader::LayerNorm,
    variant: ShaderVariant::Base,
    entry: "layernorm_forward",
    bindings: &[Read, Read, Read, ReadWrite, ReadWrite, ReadWrite],
};
pub const BACKWARD_ROWS: KernelSpec = KernelSpec {
    shader: Shader::LayerNorm,
    variant: ShaderVariant::Base,
    entry: "layernorm_backward_rows",
    bindings: &[Read, Read, Read, Read, Read, ReadWrite, ReadWrite],
};
/// `FORWARD` and `BACKWARD_ROWS` with subgroup row reductions (layernorm.wgsl's `#if SUBGROUP`
/// sections): same entry points, bindings and params.
pub const FORWARD_SUBGROUP: KernelSpec = FORWARD.with_variant(ShaderVariant::Subgroup);
pub const BACKWARD_ROWS_SUBGROUP: KernelSpec = BACKWARD_ROWS.with_variant(ShaderVariant::Subgroup);
/// The final dweight/dbias reduction of both variants.
pub const BACKWARD_PARAMS: KernelSpec = KernelSpec {
    shader: Shader::LayerNorm,
    variant: ShaderVariant::Base,
    entry: "layernorm_backward_params",
    bindings: &[Read, ReadWrite, ReadWrite],
};

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
pub(super) struct Params {
    pub(super) n: u32,
    pub(super) c: u32,
    pub(super) rows_per_block: u32,
    pub(super) blocks: u32,
    pub(super) accumulate: u32,
    pub(super) eps: f32,
}

/// The layout of `Params`, for the test that compares it with `Params` in the shader.
pub fn params_layout() -> super::ParamsLayout {
    super::params_layout!(Params {
        n,
        c,
        rows_per_block,
        blocks,
        accumulate,
        eps
    })
}

/// Threads per workgroup of every layernorm kernel but the subgroup forward.
pub(super) const WG: u32 = 256;

/// Which kernels compute the row reductions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Variant {
    /// Trees in workgroup memory, TPR threads per row (layernorm.wgsl's base variant): every
    /// adapter.
    Shared,
    /// subgroupAdd within each subgroup, then one slot per subgroup in workgroup memory
    /// (layernorm.wgsl's subgroup variant): adapters with the SUBGROUP feature.
    Subgroup,
}

impl Variant {
    /// The variant `forward` and `backward` use on `gpu`: subgroups where a GPU has them. A CPU
    /// adapter (lavapipe) keeps the shared-memory kernels: measured there, its per-row barriers
    /// made the subgroup forward about 2x slower (docs/benchmarks-log.md, "LayerNorm with
    /// subgroups").
    pub fn best(gpu: &Gpu) -> Variant {
        if gpu.has_subgroups() && gpu.info.device_type != wgpu::DeviceType::Cpu {
            Variant::Subgroup
        } else {
            Variant::Shared
        }
    }

    /// Every variant that runs on `gpu`, the fallback first.
    pub fn available(gpu: &Gpu) -> Vec<Variant> {
        let mut v = vec![Variant::Shared];
        if gpu.has_subgroups() {
            v.push(Variant::Subgroup);
        }
        v
    }

    /// Every variant, the fallback first.
    pub const ALL: [Variant; 2] = [Variant::Shared, Variant::Subgroup];

    /// "shared" or "subgroup", for reports and the tuning cache.
    pub fn name(self) -> &'static str {
        match self {
            Variant::Shared => "shared",
            Variant::Subgroup => "subgroup",
        }
    }

    /// The variant `name` names (the inverse of `name`).
    pub fn from_name(name: &str) -> Option<Variant> {
        Variant::ALL.into_iter().find(|v| v.name() == name)
    }

    /// Fails on an adapter without subgroups when the subgroup kernels are asked for.
    fn require(self, gpu: &Gpu, kernel: &str) -> Result<()> {
        if self == Variant::Subgroup && !gpu.has_subgroups() {
            return Err(Error::invalid(
                kernel,
                format!(
                    "the subgroup variant needs the SUBGROUP feature (wgpu::Features::SUBGROUP), \
                     which adapter {} lacks",
                    gpu.adapter_name()
                ),
            ));
        }
        Ok(())
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Pass {
    Forward,
    Backward,
}

/// The variant `forward` or `backward` takes for N rows of C channels: measured among
/// `Variant::available` (see `kernels::measure`), `Variant::best` being the fixed rule. The two
/// variants reduce in different orders, so their results agree to rounding, not bit for bit.
fn tuned(gpu: &Gpu, pass: Pass, dims: Dims) -> Result<Variant> {
    use super::measure::{self, Problem, bucket};
    let Dims { n, c } = dims;
    let variants = Variant::available(gpu);
    let pass_name = if pass == Pass::Forward {
        "forward"
    } else {
        "backward"
    };
    let problem = Problem {
        family: "layernorm",
        bucket: format!("{pass_name} n{} c{c}", bucket(n)),
        shape: format!("{pass_name} {n}x{c}"),
        candidates: variants.iter().map(|v| v.name().to_string()).collect(),
        rule: Variant::best(gpu).name().to_string(),
        atol: 1e-5,
        rtol: 1e-4,
    };
    let mut tensors: Option<TuneTensors> = None;
    let name = measure::choose(gpu, &problem, &mut |name| {
        let v = Variant::from_name(name)
            .filter(|v| variants.contains(v))
            .ok_or_else(|| Error::invalid("layernorm tuning", format!("no variant '{name}'")))?;
        if tensors.is_none() {
            tensors = Some(TuneTensors::new(gpu, dims)?);
        }
        tensors
            .as_ref()
            .expect("set above")
            .trial(gpu, pass, v, dims)
    })?;
    Ok(Variant::from_name(&name)
        .filter(|v| variants.contains(v))
        .unwrap_or_else(|| Variant::best(gpu)))
}

/// The tensors a tuning measurement runs on: random inputs, and mean and rstd from one forward.
struct TuneTensors {
    inp: View,     // (N, C)
    weight: View,  // (C)
    bias: View,    // (C)
    dout: View,    // (N, C)
    out: View,     // (N, C), also the backward's dinp
    mean: View,    // (N)
    rstd: View,    // (N)
    dweight: View, // (C)
    dbias: View,   // (C)
}

impl TuneTensors {
    fn new(gpu: &Gpu, dims: Dims) -> Result<TuneTensors> {
        let Dims { n, c } = dims;
        let mut rng = crate::rng::Rng::new(0x1a7e);
        let mut up =
            |name: &str, len: usize| gpu.upload_f32(name, &rng.vec_uniform(len, -1.0, 1.0));
        let t = TuneTensors {
            inp: up("tune.inp", n * c)?,
            weight: up("tune.weight", c)?,
            bias: up("tune.bias", c)?,
            dout: up("tune.dout", n * c)?,
            out: gpu.zeros("tune.out", DType::F32, n * c)?,
            mean: gpu.zeros("tune.mean", DType::F32, n)?,
            rstd: gpu.zeros("tune.rstd", DType::F32, n)?,
            dweight: gpu.zeros("tune.dweight", DType::F32, c)?,
            dbias: gpu.zeros("tune.dbias", DType::F32, c)?,
        };
        // The backward reads the forward's mean and rstd.
        let fwd = forward_with(gpu, Variant::Shared, t.forward(), dims)?;
        gpu.run(&[fwd])?;
        Ok(t)
    }

    fn forward(&self) -> ForwardTensors<'_> {
        ForwardTensors {
            out: &self.out,
            mean: &self.mean,
            rstd: &self.rstd,
            inp: &self.inp,
            weight: &self.weight,
            bias: &self.bias,
        }
    }

    /// One measurement of variant `v` on `pass`.
    fn trial(
        &self,
        gpu: &Gpu,
        pass: Pass,
        v: Variant,
        dims: Dims,
    ) -> Result<super::measure::Trial> {
        let dispatches = match pass {
            Pass::Forward => vec![forward_with(gpu, v, self.forward(), dims)?],
            // dinp (overwritten) lands in `out`: the forward's output is no longer needed.
            Pass::Backward => {
                let bwd = BackwardTensors {
                    dinp: &self.out,
                    dweight: &self.dweight,
                    dbias: &self.dbias,
                    dout: &self.dout,
                    inp: &self.inp,
                    weight: &self.weight,
                    mean: &self.mean,
                    rstd: &self.rstd,
                };
                backward_with(gpu, v, bwd, dims, false)?
            }
        };
        Ok(super::measure::Trial {
            dispatches,
            output: self.out.clone(),
        })
    }
}

/// Threads per row in the row reductions: a power of two giving each thread about
/// `CHANNELS_PER_THREAD` channels, from 1 to WG.
pub(super) fn threads_per_row(c: usize) -> u32 {
    const CHANNELS_PER_THREAD: usize = 32;
    c.div_ceil(CHANNELS_PER_THREAD)
        .next_power_of_two()
        .min(WG as usize) as u32
}

/// Threads per row (= per workgroup) of the subgroup forward, one row per workgroup: a power of
/// two giving each thread about 8 channels (several loads in flight; 128 threads for C = 768),
/// at least 64 so that a workgroup fills a 64-wide subgroup (or two 32-wide ones), at most WG.
fn subgroup_forward_threads(c: usize) -> u32 {
    c.div_ceil(8).next_power_of_two().clamp(64, WG as usize) as u32
}

/// (rows per block, blocks) of the backward for N rows.
pub(super) fn blocking(n: usize) -> (usize, usize) {
    let rows = n.div_ceil(TARGET_BLOCKS).clamp(MIN_ROWS, MAX_ROWS);
    (rows, n.div_ceil(rows))
}

/// Fails unless the (N, C) views hold N·C f32s (fitting in 32 bits), the per-channel views C
/// and the per-row views N (layernorm's and rmsnorm's launchers).
pub(super) fn check_shapes(
    kernel: &str,
    (n, c): (usize, usize),
    nc: &[&View],
    per_c: &[&View],
    per_n: &[&View],
) -> Result<()> {
    expect_dims(kernel, &[("N", n), ("C", c)])?;
    let Some(len) = n.checked_mul(c).filter(|&l| l <= u32::MAX as usize) else {
        return Err(Error::invalid(
            kernel,
            format!("N·C = {n}·{c} does not fit in 32 bits"),
        ));
    };
    for v in nc {
        expect(kernel, v, DType::F32, len)?;
    }
    for v in per_c {
        expect(kernel, v, DType::F32, c)?;
    }
    for v in per_n {
        expect(kernel, v, DType::F32, n)?;
    }
    Ok(())
}

/// out (N, C), mean (N), rstd (N) from inp (N, C), weight (C), bias (C):
/// out = (inp - mean) · rstd · weight + bias, rstd = 1 / sqrt(var + EPS), biased variance.
/// Overwrites out, mean and rstd. Takes the subgroup kernels where the adapter has them
/// (`Variant::best`).
pub fn forward(gpu: &Gpu, tensors: ForwardTensors, dims: Dims) -> Result<Dispatch> {
    forward_with(gpu, tuned(gpu, Pass::Forward, dims)?, tensors, dims)
}

/// `forward` with the row-reduction kernels of `variant`; `Variant::Subgroup` fails on an adapter
/// without subgroups.
pub fn forward_with(
    gpu: &Gpu,
    variant: Variant,
    tensors: ForwardTensors,
    dims: Dims,
) -> Result<Dispatch> {
    let ForwardTensors {
        out,
        mean,
        rstd,
        inp,
        weight,
        bias,
    } = tensors;
    let Dims { n, c } = dims;
    let spec = match variant {
        Variant::Shared => &FORWARD,
        Variant::Subgroup => &FORWARD_SUBGROUP,
    };
    let name = spec.name();
    check_shapes(
        &name,
        (dims.n, dims.c),
        &[out, inp],
        &[weight, bias],
        &[mean, rstd],
    )?;
    variant.require(gpu, &name)?;
    let params = Params {
        n: n as u32,
        c: c as u32,
        rows_per_block: 1,
        blocks: n as u32,
        accumulate: 0,
        eps: EPS,
    };
    let (n64, c64) = (n as u64, c as u64);
    let cost = Cost {
        flops: 8 * n64 * c64,
        bytes: 4 * (2 * n64 * c64 + 2 * c64 + 2 * n64),
    };
    let (constants, workgroups) = match variant {
        Variant::Shared => {
            let tpr = threads_per_row(c);
            let wg = vec![("WG", WG as f64), ("TPR", tpr as f64)];
            (wg, (n as u32).div_ceil(WG / tpr))
        }
        // One row per workgroup.
        Variant::Subgroup => (vec![("WG", subgroup_forward_threads(c) as f64)], n as u32),
    };
    gpu.dispatch(
        spec,
        &constants,
        bytes_of(&params),
        &[inp, weight, bias, out, mean, rstd],
        grid(workgroups, gpu.limits.max_compute_workgroups_per_dimension),
        cost,
    )
}

/// Backward of `forward`, given dout (N, C) and the forward's inp (N, C), weight (C), mean (N)
/// and rstd (N):
/// dinp (N, C) = rstd · (dnorm - mean_c(dnorm) - xhat · mean_c(dnorm · xhat)), xhat = (inp -
/// mean) · rstd, dnorm = weight · dout; overwritten, or added to (`+=`) when `accumulate_dinp`.
/// dweight (C) += Σ_rows dout · xhat; dbias (C) += Σ_rows dout (always accumulate).
/// Two dispatches: rows (dinp and per-block partials into a scratch buffer of 2·P·C floats,
/// P ≤ max(512, N/256) blocks, shared with other backwards of the same shape), then a
/// fixed-order reduction of the partials; record them consecutively. Takes the
/// subgroup kernels where the adapter has them (`Variant::best`).
pub fn backward(
    gpu: &Gpu,
    tensors: BackwardTensors,
    dims: Dims,
    accumulate_dinp: bool,
) -> Result<Vec<Dispatch>> {
    let variant = tuned(gpu, Pass::Backward, dims)?;
    backward_with(gpu, variant, tensors, dims, accumulate_dinp)
}

/// `backward` with the row-reduction kernels of `variant`; `Variant::Subgroup` fails on an
/// adapter without subgroups.
pub fn backward_with(
    gpu: &Gpu,
    variant: Variant,
    tensors: BackwardTensors,
    dims: Dims,
    accumulate_dinp: bool,
) -> Result<Vec<Dispatch>> {
    let BackwardTensors {
        dinp,
        dweight,
        dbias,
        dout,
        inp,
        weight,
        mean,
        rstd,
    } = tensors;
    let Dims { n, c } = dims;
    let (rows_spec, rows_constants) = match variant {
        Variant::Shared => (
            &BACKWARD_ROWS,
            vec![("WG", WG as f64), ("TPR", threads_per_row(c) as f64)],
        ),
        Variant::Subgroup => (&BACKWARD_ROWS_SUBGROUP, vec![("WG", WG as f64)]),
    };
    let name = rows_spec.name();
    check_shapes(
        &name,
        (dims.n, dims.c),
        &[dinp, dout, inp],
        &[dweight, dbias, weight],
        &[mean, rstd],
    )?;
    variant.require(gpu, &name)?;
    let (rows, blocks) = blocking(n);
    // Written by the rows dispatch and consumed by the next one: every backward of this shape
    // (one per LayerNorm of a model) shares the buffer.
    let partials = gpu.shared_scratch("layernorm.partials", DType::F32, 2 * blocks * c)?;
    let params = Params {
        n: n as u32,
        c: c as u32,
        rows_per_block: rows as u32,
        blocks: blocks as u32,
        accumulate: accumulate_dinp as u32,
        eps: EPS,
    };
    let (n64, c64) = (n as u64, c as u64);
    let max = gpu.limits.max_compute_workgroups_per_dimension;
    let rows_dispatch = gpu.dispatch(
        rows_spec,
        &rows_constants,
        bytes_of(&params),
        &[dout, inp, weight, mean, rstd, dinp, &partials],
        grid(blocks as u32, max),
        Cost {
            flops: 14 * n64 * c64,
            bytes: 4 * ((3 + accumulate_dinp as u64) * n64 * c64 + c64 + 2 * n64),
        },
    )?;
    let params_dispatch = gpu.dispatch(
        &BACKWARD_PARAMS,
        &[("WG", WG as f64), ("COLS", PARAMS_COLS as f64)],
        bytes_of(&params),
        &[&partials, dweight, dbias],
        grid((c as u32).div_ceil(PARAMS_COLS), max),
        Cost {
            flops: 2 * blocks as u64 * c64,
            bytes: 4 * 4 * c64,
        },
    )?;
    Ok(vec![rows_dispatch, params_dispatch])
}

#[cfg(test)]
mod tests {
    use super::Variant;

    /// Every variant's name parses back to it; other names do not parse.
    #[test]
    fn variant_names_parse_back() {
        for v in Variant::ALL {
            assert_eq!(Variant::from_name(v.name()), Some(v));
        }
        for bad in ["", "Shared", "subgroups"] {
            assert_eq!(Variant::from_name(bad), None, "{bad}");
        }
    }
}
