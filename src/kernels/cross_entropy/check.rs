//! `shaderformer kernels check|bench cross_entropy`: cross_entropy.wgsl against the CPU reference on awkward
//! shapes, and its variants timed.

use super::*;
use crate::kernels::harness::{self, BenchOptions, BenchReport, CheckReport, Family};
use crate::reference;
use crate::rng::Rng;

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
    let r = Reference::new(dims);
    let targets = gpu.upload_u32("targets", &r.targets)?;
    let case = r.case(&targets);
    let mut reports = Vec::new();
    for variant in [Variant::Vec4, Variant::Scalar, Variant::Rows] {
        reports.extend(case.check_variant(gpu, variant)?.unwrap_or_default());
    }
    Ok(reports)
}

/// A check shape's inputs (`check_inputs`) and the reference's results in f64 on them (NaNs
/// marked), the loss gradient 1 / (rows not ignored).
struct Reference {
    s: String,
    targets: Vec<u32>,
    logits: Vec<f32>,
    losses: Vec<f64>,
    lse: Vec<f64>,
    dlogits: Vec<f64>,
    dloss: f32,
    dims: Dims,
}

impl Reference {
    fn new(dims: Dims) -> Reference {
        let Dims { n, v, vp } = dims;
        let (targets, logits) = check_inputs(dims);
        let valid = targets.iter().filter(|&&t| t != IGNORE).count();
        let dloss = 1.0 / valid.max(1) as f32;
        let logits64: Vec<f64> = reference::convert(&logits);
        let (mut losses, mut lse) = (vec![0.0; n], vec![0.0; n]);
        reference::cross_entropy::forward(&mut losses, &mut lse, &logits64, &targets, dims);
        let mut dlogits = vec![0.0; n * vp];
        reference::cross_entropy::backward(&mut dlogits, &logits64, &targets, dloss as f64, dims);
        Reference {
            s: format!("N={n} V={v} Vp={vp}"),
            losses: marked(&losses),
            lse,
            dlogits: marked(&dlogits),
            targets,
            logits,
            dloss,
            dims,
        }
    }

    /// The check of these values, with `targets` uploaded.
    fn case<'a>(&'a self, targets: &'a View) -> Case<'a> {
        Case {
            s: &self.s,
            logits: &self.logits,
            targets,
            losses: &self.losses,
            lse: &self.lse,
            dlogits: &self.dlogits,
            dloss: self.dloss,
            dims: self.dims,
        }
    }
}

/// A check's inputs and the reference's results (NaNs marked).
struct Case<'a> {
    s: &'a str,
    logits: &'a [f32],
    targets: &'a View,
    losses: &'a [f64],
    lse: &'a [f64],
    dlogits: &'a [f64],
    dloss: f32,
    dims: Dims,
}

impl Case<'_> {
    /// `variant`'s forward and backward against the reference; None where the vec4 kernels do
    /// not apply.
    fn check_variant(&self, gpu: &Gpu, variant: Variant) -> Result<Option<Vec<CheckReport>>> {
        let g_logits = gpu.upload_f32("logits", self.logits)?;
        if variant == Variant::Vec4 && !variant.vec4(gpu, &g_logits, self.dims.vp) {
            return Ok(None);
        }
        let (got_losses, got_lse, got_dlogits) =
            run_check(gpu, variant, &g_logits, self.targets, self.dims, self.dloss)?;
        let what = |t: &str| format!("{t}{}", variant.name());
        let s = self.s;
        Ok(Some(vec![
            CheckReport::new(
                s,
                &what("forward losses"),
                &got_losses,
                self.losses,
                1e-5,
                1e-5,
            ),
            CheckReport::new(s, &what("forward lse"), &got_lse, self.lse, 1e-5, 1e-6),
            CheckReport::new(
                s,
                &what("backward dlogits"),
                &got_dlogits,
                self.dlogits,
                1e-9,
                1e-5,
            ),
        ]))
    }
}

/// The shape (N, V, Vp) a baseline is checked at before tuning trusts it (see
/// `kernels::baseline`): rows and a vocabulary no multiple of a workgroup, padded to a multiple
/// of 4 so that the vec4 kernels apply.
const BASELINE_SHAPE: [usize; 3] = [45, 127, 128];

/// The variant the tuning cache names `key` against the reference at `BASELINE_SHAPE`, with the
/// tolerances of `check`: the kernel of the first disagreement and what disagreed, or None (also
/// where `key` names no variant that runs there).
pub(crate) fn verify_variant(gpu: &Gpu, key: &str) -> Result<Option<(String, String)>> {
    let Some(variant) = Variant::from_key(key) else {
        return Ok(None);
    };
    let [n, v, vp] = BASELINE_SHAPE;
    let dims = Dims { n, v, vp };
    let r = Reference::new(dims);
    let targets = gpu.upload_u32("baseline.targets", &r.targets)?;
    let case = r.case(&targets);
    let Some(reports) = case.check_variant(gpu, variant)? else {
        return Ok(None);
    };
    let probe = gpu.upload_f32("baseline.logits", &r.logits)?;
    let k = variant.kernels(gpu, &probe, n, vp);
    Ok(reports.into_iter().find(|r| !r.ok()).map(|r| {
        let spec = if r.comparison.name.starts_with("forward") {
            k.forward
        } else {
            k.backward
        };
        (spec.name(), format!("{}: {}", case.s, r.comparison))
    }))
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
