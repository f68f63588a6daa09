//! cross_entropy.wgsl launchers: fused softmax cross-entropy over rows of padded logits (loss and
//! logsumexp per row), and its in-place backward (logits become dlogits).
//! Legend: N rows (B·T), V vocabulary, Vp padded vocabulary (the row stride, e.g. 50304 for 50257).
//!
//! Three variants, chosen by measurement (`tuned`): a workgroup per row with scalar loads, the same
//! with 16-byte loads and stores (Vp % 4 == 0 and 16-byte aligned logits), and one invocation per
//! row without workgroup memory (short rows, CPU adapters). The fixed rule (`--tune off`) takes the
//! vec4 kernels where the shape allows, except on CPU adapters (lavapipe), where those measured
//! slower, and the scalar ones otherwise.

use bytemuck::{Pod, Zeroable};

use super::harness::{self, BenchOptions, BenchReport, CheckReport, Family};
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

    fn name(self) -> &'static str {
        match self {
            Variant::Auto => "",
            Variant::Vec4 => " vec4",
            Variant::Scalar => " scalar",
            Variant::Rows => " rows",
        }
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
/// kernels (see `kernels::tune`). The variants sum in different orders, so they agree to rounding.
/// The backward takes the forward's choice: it works in place, so a trial could not rerun it on
/// the same input, and it follows the same row layout.
fn tuned(gpu: &Gpu, logits: &View, dims: Dims) -> Result<Variant> {
    use super::tune::{self, Problem, Trial, bucket};
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
    let key = |v: Variant| v.name().trim().to_string();
    let by_name = |name: &str| variants.iter().copied().find(|&v| key(v) == name);
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
    let name = tune::choose(gpu, &problem, &mut |name| {
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

pub const FAMILY: Family = Family {
    name: "cross_entropy",
    about: "losses, lse = softmax cross-entropy of padded logits rows; backward dlogits in place",
    shape_help: "NxV[xVp]",
    default_shapes: &[
        &[1, 1, 64],
        &[3, 65, 128],
        &[3, 65, 67],
        &[45, 127, 127],
        &[45, 127, 128],
        &[129, 1000, 1024],
        &[4, 50257, 50304],
    ],
    bench_shape: &[1024, 50257],
    check,
    bench,
};

/// Stands for NaN in comparisons where a NaN is the expected result.
const NAN_MARK: f64 = -1.0e30;

/// N, V and Vp from NxV (Vp = V rounded up to a multiple of 64) or NxVxVp.
fn parse(shape: &[usize]) -> Result<(usize, usize, usize)> {
    match *shape {
        [n, v] => Ok((n, v, v.div_ceil(64) * 64)),
        [n, v, vp] => Ok((n, v, vp)),
        _ => Err(Error::invalid(
            "--shape",
            format!(
                "cross_entropy takes NxV or NxVxVp, got {} dimensions",
                shape.len()
            ),
        )),
    }
}

fn check(gpu: &Gpu, shape: &[usize]) -> Result<Vec<CheckReport>> {
    let (n, v, vp) = parse(shape)?;
    let dims = Dims { n, v, vp };
    let s = format!("N={n} V={v} Vp={vp}");
    let (targets, logits) = check_inputs(dims);
    let valid = targets.iter().filter(|&&t| t != IGNORE).count();
    let dloss = 1.0 / valid.max(1) as f32;

    // The reference in f64 on the same f32 inputs.
    let logits64: Vec<f64> = reference::convert(&logits);
    let (mut losses, mut lse) = (vec![0.0; n], vec![0.0; n]);
    reference::cross_entropy::forward(&mut losses, &mut lse, &logits64, &targets, dims);
    let mut dlogits = vec![0.0; n * vp];
    reference::cross_entropy::backward(&mut dlogits, &logits64, &targets, dloss as f64, dims);
    let (losses, dlogits) = (marked(&losses), marked(&dlogits));

    let g_targets = gpu.upload_u32("targets", &targets)?;
    let mut reports = Vec::new();
    for variant in [Variant::Vec4, Variant::Scalar, Variant::Rows] {
        let g_logits = gpu.upload_f32("logits", &logits)?;
        if variant == Variant::Vec4 && !variant.vec4(gpu, &g_logits, vp) {
            continue;
        }
        let (got_losses, got_lse, got_dlogits) =
            run_check(gpu, variant, &g_logits, &g_targets, dims, dloss)?;
        let what = |t: &str| format!("{t}{}", variant.name());
        reports.extend([
            CheckReport::new(
                &s,
                &what("forward losses"),
                &got_losses,
                &losses,
                1e-5,
                1e-5,
            ),
            CheckReport::new(&s, &what("forward lse"), &got_lse, &lse, 1e-5, 1e-6),
            CheckReport::new(
                &s,
                &what("backward dlogits"),
                &got_dlogits,
                &dlogits,
                1e-9,
                1e-5,
            ),
        ]);
    }
    Ok(reports)
}

/// The check's targets (N) and logits (N, Vp). About one row in eight ignored, and row 1
/// always; the last of three or more rows has an invalid target (>= V), whose loss and gradient
/// row must be NaN. Logits in [-4, 4), padding filled with NaN the kernels must not read. Rows 2,
/// 7, 12, ... are shifted by +100 and rows 3, 8, 13, ... by -100, where an exp without max
/// subtraction overflows or underflows; rows 0, 5, 10, ... have -inf (masked) logits in every
/// third column other than the target's.
fn check_inputs(Dims { n, v, vp }: Dims) -> (Vec<u32>, Vec<f32>) {
    let mut rng = Rng::new((n * 1_000_003 + v * 31 + vp) as u64);
    let targets: Vec<u32> = (0..n)
        .map(|i| {
            if i == 1 || rng.below(8) == 0 {
                IGNORE
            } else if i == n - 1 && n >= 3 {
                v as u32
            } else {
                rng.below(v as u64) as u32
            }
        })
        .collect();
    let mut logits = rng.vec_uniform(n * vp, -4.0, 4.0);
    for i in 0..n {
        for j in 0..vp {
            let x = &mut logits[i * vp + j];
            *x = match (j < v, i % 5) {
                (false, _) => f32::NAN,
                (true, 0) if j % 3 == 1 && j as u32 != targets[i] => f32::NEG_INFINITY,
                (true, 2) => *x + 100.0,
                (true, 3) => *x - 100.0,
                _ => *x,
            };
        }
    }
    (targets, logits)
}

/// Expected NaNs (invalid targets) must be NaN on the GPU too: both become one finite marker.
fn marked(x: &[f64]) -> Vec<f64> {
    x.iter()
        .map(|&x| if x.is_nan() { NAN_MARK } else { x })
        .collect()
}

/// One variant's forward, then its backward in place on `logits`: the losses (marked), lse and
/// dlogits (marked).
fn run_check(
    gpu: &Gpu,
    variant: Variant,
    g_logits: &View,
    g_targets: &View,
    dims: Dims,
    dloss: f32,
) -> Result<(Vec<f64>, Vec<f32>, Vec<f64>)> {
    let n = dims.n;
    // Outputs start as garbage: the forward overwrites them.
    let g_losses = gpu.upload_f32("losses", &vec![f32::NAN; n])?;
    let g_lse = gpu.upload_f32("lse", &vec![f32::NAN; n])?;
    let fw = forward_variant(gpu, &g_losses, &g_lse, g_logits, g_targets, dims, variant)?;
    // Built with another dloss, then rewritten as a training step would.
    let bw = backward_variant(gpu, g_logits, &g_lse, g_targets, dims, 1.0, variant)?;
    set_dloss(gpu, &bw, dloss);
    gpu.run(&[fw])?;
    let got_losses = gpu.read_f32(&g_losses)?;
    let got_lse = gpu.read_f32(&g_lse)?;
    gpu.run(&[bw])?;
    let got_dlogits: Vec<f64> = reference::convert(&gpu.read_f32(g_logits)?);
    let got_losses: Vec<f64> = reference::convert(&got_losses);
    Ok((marked(&got_losses), got_lse, marked(&got_dlogits)))
}

fn bench(gpu: &Gpu, shape: &[usize], opts: &BenchOptions) -> Result<Vec<BenchReport>> {
    let (n, v, vp) = parse(shape)?;
    // Rows split into as many chunks as the binding limit requires, as a caller would.
    let rows = ((gpu.max_binding() / (4 * vp as u64)) as usize).clamp(1, n);
    let chunks: Vec<(usize, usize)> = (0..n).step_by(rows).map(|r| (r, rows.min(n - r))).collect();
    let s = format!("N={n} V={v} Vp={vp} K={}", chunks.len());
    let mut rng = Rng::new(2);
    let mut bufs = Vec::new();
    for (k, &(_, rows)) in chunks.iter().enumerate() {
        let logits = gpu.upload_f32(
            &format!("logits{k}"),
            &rng.vec_uniform(rows * vp, -4.0, 4.0),
        )?;
        let targets: Vec<u32> = (0..rows).map(|_| rng.below(v as u64) as u32).collect();
        let targets = gpu.upload_u32(&format!("targets{k}"), &targets)?;
        let losses = gpu.zeros(&format!("losses{k}"), DType::F32, rows)?;
        let lse = gpu.zeros(&format!("lse{k}"), DType::F32, rows)?;
        bufs.push((rows, logits, targets, losses, lse));
    }
    let mut reports = Vec::new();
    for variant in [Variant::Vec4, Variant::Scalar, Variant::Rows] {
        if variant == Variant::Vec4 && !vp.is_multiple_of(4) {
            continue;
        }
        let (mut fw, mut bw) = (Vec::new(), Vec::new());
        for (rows, logits, targets, losses, lse) in &bufs {
            let dims = Dims { n: *rows, v, vp };
            fw.push(forward_variant(
                gpu, losses, lse, logits, targets, dims, variant,
            )?);
            // dlogits overwrite the logits; the timings do not depend on their values.
            let dloss = 1.0 / n as f32;
            bw.push(backward_variant(
                gpu, logits, lse, targets, dims, dloss, variant,
            )?);
        }
        let name = |what: &str| format!("{what}{}", variant.name());
        reports.push(harness::bench_one(gpu, opts, &name("forward"), &s, &fw)?);
        reports.push(harness::bench_one(
            gpu,
            opts,
            &name("backward (in place)"),
            &s,
            &bw,
        )?);
    }
    Ok(reports)
}
