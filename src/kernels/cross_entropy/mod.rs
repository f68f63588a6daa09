//! cross_entropy.wgsl launchers: fused softmax cross-entropy over rows of padded logits (loss and
//! logsumexp per row), and its in-place backward (logits become dlogits).
//! Legend: N rows (B·T), V vocabulary, Vp padded vocabulary (the row stride, e.g. 50304 for 50257).
//!
//! Three variants, chosen by measurement (`tuned`): a workgroup per row with scalar loads, the same
//! with 16-byte loads and stores (Vp % 4 == 0 and 16-byte aligned logits), and one invocation per
//! row without workgroup memory (short rows, CPU adapters). The fixed rule (`--tune off`) takes the
//! vec4 kernels where the shape allows, except on CPU adapters (lavapipe), where those measured
//! slower, and the scalar ones otherwise.

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
use crate::rng::Rng;

use Binding::{Read, ReadWrite};

/// Threads per row; a power of two (the forward's tree reduction halves it).
const WG: u32 = 256;

/// Target value excluded from the loss (loss 0, gradient row 0).
pub const IGNORE: u32 = reference::cross_entropy::IGNORE;

/// The shape of a loss: N rows of V logits, stored with row stride Vp.
pub use crate::reference::cross_entropy::Dims;

pub const FORWARD: KernelSpec = KernelSpec {
    shader: Shader::CrossEntropy,
    variant: ShaderVariant::Base,
    entry: "cross_entropy_forward",
    bindings: &[Read, Read, ReadWrite, ReadWrite],
};
pub const FORWARD_VEC4: KernelSpec = KernelSpec {
    shader: Shader::CrossEntropy,
    variant: ShaderVariant::Base,
    entry: "cross_entropy_forward_vec4",
    bindings: &[Read, Read, ReadWrite, ReadWrite],
};
pub const BACKWARD: KernelSpec = KernelSpec {
    shader: Shader::CrossEntropy,
    variant: ShaderVariant::Base,
    entry: "cross_entropy_backward",
    bindings: &[Read, Read, ReadWrite],
};
pub const BACKWARD_VEC4: KernelSpec = KernelSpec {
    shader: Shader::CrossEntropy,
    variant: ShaderVariant::Base,
    entry: "cross_entropy_backward_vec4",
    bindings: &[Read, Read, ReadWrite],
};
/// `FORWARD` and `BACKWARD` with one invocation per row: same bindings.
pub const FORWARD_ROWS: KernelSpec = KernelSpec {
    entry: "cross_entropy_forward_rows",
    ..FORWARD
};
pub const BACKWARD_ROWS: KernelSpec = KernelSpec {
    entry: "cross_entropy_backward_rows",
    ..BACKWARD
};

/// Rows per workgroup of the row kernels.
const ROWS_WG: u32 = 64;

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct Params {
    n: u32,
    v: u32,
    vp: u32,
    dloss: f32,
}

/// The layout of `Params`, for the test that compares it with `Params` in the shader.
pub fn params_layout() -> super::ParamsLayout {
    super::params_layout!(Params { n, v, vp, dloss })
}

/// Which kernels a launcher uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Variant {
    /// 16-byte loads where the shape allows, except on CPU adapters (lavapipe), where the scalar
    /// kernels measure faster.
    Auto,
    /// 16-byte loads where the shape allows.
    Vec4,
    /// One f32 per load.
    Scalar,
    /// One invocation per row.
    Rows,
}

impl Variant {
    /// Whether the vec4 kernels run: whole vec4s per row and 16-byte aligned logits required.
    fn vec4(self, gpu: &Gpu, logits: &View, vp: usize) -> bool {
        let fits = vp.is_multiple_of(4) && logits.offset.is_multiple_of(16);
        match self {
            Variant::Auto => fits && gpu.info.device_type != wgpu::DeviceType::Cpu,
            Variant::Vec4 => fits,
            Variant::Scalar | Variant::Rows => false,
        }
    }

    /// The variants a measurement chooses among (Auto is a rule, never a measured choice).
    const MEASURED: [Variant; 3] = [Variant::Vec4, Variant::Scalar, Variant::Rows];

    /// The suffix of a report line: "" for Auto, " vec4", " scalar" or " rows".
    fn name(self) -> &'static str {
        match self {
            Variant::Auto => "",
            Variant::Vec4 => " vec4",
            Variant::Scalar => " scalar",
            Variant::Rows => " rows",
        }
    }

    /// The name a tuning cache keeps: "vec4", "scalar" or "rows".
    fn key(self) -> &'static str {
        self.name().trim_start()
    }

    /// The measured variant `key` names (the inverse of `key`).
    fn from_key(key: &str) -> Option<Variant> {
        Variant::MEASURED.into_iter().find(|v| v.key() == key)
    }

    /// The kernels' specs and their workgroup size and count for `n` rows.
    fn kernels(self, gpu: &Gpu, logits: &View, n: usize, vp: usize) -> Kernels {
        let max_wg = gpu.limits.max_compute_workgroups_per_dimension;
        if self == Variant::Rows {
            return Kernels {
                forward: &FORWARD_ROWS,
                backward: &BACKWARD_ROWS,
                wg: ROWS_WG,
                grid: grid((n as u32).div_ceil(ROWS_WG), max_wg),
            };
        }
        let (forward, backward) = if self.vec4(gpu, logits, vp) {
            (&FORWARD_VEC4, &BACKWARD_VEC4)
        } else {
            (&FORWARD, &BACKWARD)
        };
        Kernels {
            forward,
            backward,
            wg: WG,
            grid: grid(n as u32, max_wg),
        }
    }
}

/// What a variant dispatches.
struct Kernels {
    forward: &'static KernelSpec,
    backward: &'static KernelSpec,
    wg: u32,
    grid: [u32; 3],
}

/// The variant `forward` and `backward` take for N rows of V logits (stride Vp): measured
/// among the fixed rule's kernels, the other load width where the shape allows it, and the row
/// kernels (see `kernels::measure`). The variants sum in different orders, so they agree to rounding.
/// The backward takes the forward's choice: it works in place, so a trial could not rerun it on
/// the same input, and it follows the same row layout.
fn tuned(gpu: &Gpu, logits: &View, dims: Dims) -> Result<Variant> {
    use super::measure::{self, Problem, Trial, bucket};
    let Dims { n, v, vp } = dims;
    let rule = if Variant::Auto.vec4(gpu, logits, vp) {
        Variant::Vec4
    } else {
        Variant::Scalar
    };
    let vec4_fits = Variant::Vec4.vec4(gpu, logits, vp);
    let mut variants = vec![rule];
    if rule == Variant::Scalar && vec4_fits {
        variants.push(Variant::Vec4);
    }
    if rule == Variant::Vec4 {
        variants.push(Variant::Scalar);
    }
    variants.push(Variant::Rows);
    let key = |v: Variant| v.key().to_string();
    let by_name = |name: &str| Variant::from_key(name).filter(|v| variants.contains(v));
    let problem = Problem {
        family: FAMILY.name,
        bucket: format!(
            "forward n{} v{} {}",
            bucket(n),
            bucket(v),
            if vec4_fits { "v" } else { "s" }
        ),
        shape: format!("forward N={n} V={v} Vp={vp}"),
        candidates: variants.iter().map(|&v| key(v)).collect(),
        rule: key(rule),
        atol: 1e-5,
        rtol: 1e-4,
    };
    let mut tensors: Option<[View; 4]> = None;
    let name = measure::choose(gpu, &problem, &mut |name| {
        let variant = by_name(name).ok_or_else(|| {
            Error::invalid("cross_entropy tuning", format!("no variant '{name}'"))
        })?;
        if tensors.is_none() {
            let mut rng = Rng::new(0xce);
            let targets: Vec<u32> = (0..n).map(|_| rng.below(v as u64) as u32).collect();
            tensors = Some([
                gpu.upload_f32("tune.logits", &rng.vec_uniform(n * vp, -4.0, 4.0))?,
                gpu.upload_u32("tune.targets", &targets)?,
                gpu.zeros("tune.losses", DType::F32, n)?,
                gpu.zeros("tune.lse", DType::F32, n)?,
            ]);
        }
        let [logits, targets, losses, lse] = tensors.as_ref().expect("set above");
        Ok(Trial {
            dispatches: vec![forward_variant(
                gpu, losses, lse, logits, targets, dims, variant,
            )?],
            output: losses.clone(),
        })
    })?;
    Ok(by_name(&name).unwrap_or(rule))
}

/// Checks N, V, Vp, V <= Vp, and that N·Vp elements can be indexed with u32 in the shaders.
fn expect_nv(kernel: &str, Dims { n, v, vp }: Dims) -> Result<()> {
    expect_dims(kernel, &[("N", n), ("V", v), ("Vp", vp)])?;
    if v > vp {
        return Err(Error::invalid(
            kernel,
            format!("V = {v} exceeds the padded row length Vp = {vp}"),
        ));
    }
    if n.checked_mul(vp).is_none_or(|e| e > u32::MAX as usize) {
        return Err(Error::invalid(
            kernel,
            format!("N·Vp = {n}·{vp} exceeds the u32 index range"),
        ));
    }
    Ok(())
}

/// losses (N) = logsumexp(logits[i, :V]) - logits[i, target[i]]; lse (N) = logsumexp(logits[i, :V])
/// saved for the backward; logits (N, Vp) with columns [V, Vp) padding that is ignored (never
/// read); targets (N) u32. Loss 0 where the target is `IGNORE`. A target >= V other than `IGNORE`
/// reads nothing out of bounds: its loss is NaN, so the caller can detect and report it.
/// Numerically stable (online softmax with max subtraction). Overwrites losses and lse.
pub fn forward(
    gpu: &Gpu,
    losses: &View,
    lse: &View,
    logits: &View,
    targets: &View,
    dims: Dims,
) -> Result<Dispatch> {
    check_forward(losses, lse, logits, targets, dims)?;
    let variant = tuned(gpu, logits, dims)?;
    forward_variant(gpu, losses, lse, logits, targets, dims, variant)
}

/// Checks the forward's tensors and dimensions.
fn check_forward(
    losses: &View,
    lse: &View,
    logits: &View,
    targets: &View,
    dims: Dims,
) -> Result<()> {
    let Dims { n, vp, .. } = dims;
    let name = FORWARD.name();
    expect_nv(&name, dims)?;
    expect(&name, logits, DType::F32, n * vp)?;
    expect(&name, targets, DType::U32, n)?;
    expect(&name, losses, DType::F32, n)?;
    expect(&name, lse, DType::F32, n)
}

fn forward_variant(
    gpu: &Gpu,
    losses: &View,
    lse: &View,
    logits: &View,
    targets: &View,
    dims: Dims,
    variant: Variant,
) -> Result<Dispatch> {
    check_forward(losses, lse, logits, targets, dims)?;
    let Dims { n, v, vp } = dims;
    let params = Params {
        n: n as u32,
        v: v as u32,
        vp: vp as u32,
        dloss: 0.0,
    };
    let (n64, v64) = (n as u64, v as u64);
    let cost = Cost {
        // max, subtract, exp, multiply-add per logit
        flops: 5 * n64 * v64,
        // logits once, targets, the target logits, losses and lse
        bytes: 4 * n64 * v64 + 16 * n64,
    };
    let k = variant.kernels(gpu, logits, n, vp);
    gpu.dispatch(
        k.forward,
        &[("WG", k.wg as f64)],
        bytes_of(&params),
        &[logits, targets, losses, lse],
        k.grid,
        cost,
    )
}

/// In place: logits (N, Vp) becomes dlogits = dloss · (softmax(logits[i, :V]) − onehot(target)),
/// recomputing the softmax from `lse` (N) saved by `forward`; 0 in columns [V, Vp) and in ignored
/// rows, NaN in columns [0, V) of rows with an invalid target (>= V, not `IGNORE`). Overwrites.
pub fn backward(
    gpu: &Gpu,
    logits: &View,
    lse: &View,
    targets: &View,
    dims: Dims,
    dloss: f32,
) -> Result<Dispatch> {
    check_backward(logits, lse, targets, dims)?;
    let variant = tuned(gpu, logits, dims)?;
    backward_variant(gpu, logits, lse, targets, dims, dloss, variant)
}

/// Checks the backward's tensors and dimensions.
fn check_backward(logits: &View, lse: &View, targets: &View, dims: Dims) -> Result<()> {
    let Dims { n, vp, .. } = dims;
    let name = BACKWARD.name();
    expect_nv(&name, dims)?;
    expect(&name, logits, DType::F32, n * vp)?;
    expect(&name, lse, DType::F32, n)?;
    expect(&name, targets, DType::U32, n)
}

fn backward_variant(
    gpu: &Gpu,
    logits: &View,
    lse: &View,
    targets: &View,
    dims: Dims,
    dloss: f32,
    variant: Variant,
) -> Result<Dispatch> {
    check_backward(logits, lse, targets, dims)?;
    let Dims { n, v, vp } = dims;
    let params = Params {
        n: n as u32,
        v: v as u32,
        vp: vp as u32,
        dloss,
    };
    let (n64, v64, vp64) = (n as u64, v as u64, vp as u64);
    let cost = Cost {
        flops: 4 * n64 * v64,
        // logits read, dlogits written (padding included), lse and targets
        bytes: 4 * n64 * v64 + 4 * n64 * vp64 + 8 * n64,
    };
    let k = variant.kernels(gpu, logits, n, vp);
    gpu.dispatch(
        k.backward,
        &[("WG", k.wg as f64)],
        bytes_of(&params),
        &[lse, targets, logits],
        k.grid,
        cost,
    )
}

/// Rewrites dloss of a backward dispatch (e.g. 1 / number of non-ignored targets) between steps
/// without rebuilding it (queued; takes effect at the next submission). Any other dispatch is left
/// alone (and is a bug caught by a debug assertion).
pub fn set_dloss(gpu: &Gpu, dispatch: &Dispatch, dloss: f32) {
    let ours =
        [BACKWARD.name(), BACKWARD_VEC4.name(), BACKWARD_ROWS.name()].contains(&dispatch.name);
    debug_assert!(ours, "set_dloss on {}", dispatch.name);
    if ours {
        gpu.queue.write_buffer(
            &dispatch.params,
            std::mem::offset_of!(Params, dloss) as u64,
            bytemuck::bytes_of(&dloss),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::Variant;

    /// Every measured variant's cache name parses back to it; other names do not parse.
    #[test]
    fn variant_keys_parse_back() {
        for v in Variant::MEASURED {
            assert_eq!(Variant::from_key(v.key()), Some(v));
        }
        for bad in ["", " vec4", "auto", "Rows"] {
            assert_eq!(Variant::from_key(bad), None, "{bad}");
        }
    }
}
