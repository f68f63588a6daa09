//! `shaderformer kernels check|bench layernorm`: layernorm.wgsl against the CPU reference on awkward
//! shapes, and its variants timed.

use super::*;
use crate::kernels::harness::{self, BenchOptions, BenchReport, CheckReport, Family};
use crate::reference;
use crate::rng::Rng;

pub const FAMILY: Family = Family {
    name: "layernorm",
    about: "LayerNorm over C (eps 1e-5): forward out, mean, rstd; backward dinp, dweight +=, dbias +=",
    shape_help: "NxC",
    default_shapes: &[
        &[1, 1],
        &[3, 1],
        &[1, 3],
        &[3, 3],
        &[65, 45],
        &[129, 45],
        &[1, 127],
        &[65, 127],
        &[3, 129],
        &[129, 129],
        &[1, 768],
        &[3, 768],
        &[65, 768],
        &[129, 768],
        &[4099, 3],
        &[77, 1000],
        &[67, 2053],
        &[3, 4099],
    ],
    bench_shape: &[4096, 768],
    check,
    bench,
};

fn check(gpu: &Gpu, shape: &[usize]) -> Result<Vec<CheckReport>> {
    let [n, c] = harness::dims::<2>("layernorm", shape)?;
    let dims = Dims { n, c };
    let x = check_inputs(dims);
    let want = expected(&x, dims);
    let g_inp = gpu.upload_f32("inp", &x.inp)?;
    let g_weight = gpu.upload_f32("weight", &x.weight)?;
    let g_bias = gpu.upload_f32("bias", &x.bias)?;
    let g_dout = gpu.upload_f32("dout", &x.dout)?;
    let inputs = [&g_inp, &g_weight, &g_bias, &g_dout];
    let mut reports = Vec::new();
    // Every variant the adapter runs, each on fresh outputs.
    for variant in Variant::available(gpu) {
        reports.extend(check_variant(gpu, variant, &x, inputs, &want, dims)?);
    }
    Ok(reports)
}

/// The shape a baseline is checked at before tuning trusts it (see `kernels::baseline`): rows
/// and channels no multiple of a workgroup, a subgroup or a backward block.
const BASELINE_DIMS: Dims = Dims { n: 65, c: 45 };

/// Variant `variant` (forward and both backwards) against the reference at `BASELINE_DIMS`, with
/// the tolerances of `check`: the kernel of the first disagreement and what disagreed, or None.
pub(crate) fn verify_variant(gpu: &Gpu, variant: Variant) -> Result<Option<(String, String)>> {
    let dims = BASELINE_DIMS;
    let x = check_inputs(dims);
    let want = expected(&x, dims);
    let g_inp = gpu.upload_f32("baseline.inp", &x.inp)?;
    let g_weight = gpu.upload_f32("baseline.weight", &x.weight)?;
    let g_bias = gpu.upload_f32("baseline.bias", &x.bias)?;
    let g_dout = gpu.upload_f32("baseline.dout", &x.dout)?;
    let inputs = [&g_inp, &g_weight, &g_bias, &g_dout];
    let reports = check_variant(gpu, variant, &x, inputs, &want, dims)?;
    let (forward, rows) = match variant {
        Variant::Shared => (&FORWARD, &BACKWARD_ROWS),
        Variant::Subgroup => (&FORWARD_SUBGROUP, &BACKWARD_ROWS_SUBGROUP),
    };
    Ok(reports.into_iter().find(|r| !r.ok()).map(|r| {
        let entry = if r.comparison.name.starts_with("forward") {
            forward.name()
        } else if r.comparison.name.contains("dinp") {
            rows.name()
        } else {
            format!("{} or {}", rows.name(), BACKWARD_PARAMS.name())
        };
        (entry, format!("{}: {}", r.shape, r.comparison))
    }))
}

/// The check's inputs, and the prior contents of the gradients the backward accumulates into.
struct CheckInputs {
    inp: Vec<f32>,      // (N, C)
    weight: Vec<f32>,   // (C)
    bias: Vec<f32>,     // (C)
    dout: Vec<f32>,     // (N, C)
    dinp0: Vec<f32>,    // (N, C)
    dweight0: Vec<f32>, // (C)
    dbias0: Vec<f32>,   // (C)
}

/// Rows with offsets of 1 to 5 and values in offset ± 2, the first and last channel at the
/// ends, so that a one-pass or uncentred variance would show while every row's rstd stays
/// small (a near-constant row only measures the conditioning of f32 inputs).
fn check_inputs(Dims { n, c }: Dims) -> CheckInputs {
    let mut rng = Rng::new((n * 7919 + c) as u64);
    let inp: Vec<f32> = (0..n * c)
        .map(|i| {
            let offset = 1.0 + ((i / c) % 5) as f32;
            match i % c {
                _ if c == 1 => offset + rng.range(-2.0, 2.0),
                0 => offset - 2.0,
                j if j == c - 1 => offset + 2.0,
                _ => offset + rng.range(-2.0, 2.0),
            }
        })
        .collect();
    CheckInputs {
        inp,
        weight: rng.vec_uniform(c, -1.5, 1.5),
        bias: rng.vec_uniform(c, -1.0, 1.0),
        dout: rng.vec_uniform(n * c, -1.0, 1.0),
        dinp0: rng.vec_uniform(n * c, -1.0, 1.0),
        dweight0: rng.vec_uniform(c, -1.0, 1.0),
        dbias0: rng.vec_uniform(c, -1.0, 1.0),
    }
}

/// The reference's forward and backward, the backward run twice: overwriting dinp, then adding
/// to dinp0; dweight and dbias accumulate both.
struct Expected {
    out: Vec<f64>,
    mean: Vec<f64>,
    rstd: Vec<f64>,
    dinp_over: Vec<f64>,
    dinp_acc: Vec<f64>,
    dweight: Vec<f64>,
    dbias: Vec<f64>,
}

/// The reference in f64, so that the tolerances measure the GPU's rounding alone.
fn expected(x: &CheckInputs, dims: Dims) -> Expected {
    let Dims { n, c } = dims;
    let f = reference::convert::<f32, f64>;
    let (inp64, weight64, bias64, dout64) = (f(&x.inp), f(&x.weight), f(&x.bias), f(&x.dout));
    let mut out = vec![0.0; n * c];
    let mut mean = vec![0.0; n];
    let mut rstd = vec![0.0; n];
    reference::layernorm::forward(
        &mut out, &mut mean, &mut rstd, &inp64, &weight64, &bias64, dims,
    );
    let mut dinp_over = vec![0.0; n * c];
    let mut dinp_acc = f(&x.dinp0);
    let (mut dweight, mut dbias) = (f(&x.dweight0), f(&x.dbias0));
    for dinp in [&mut dinp_over, &mut dinp_acc] {
        reference::layernorm::backward(
            dinp,
            &mut dweight,
            &mut dbias,
            &dout64,
            &inp64,
            &weight64,
            &mean,
            &rstd,
            dims,
        );
    }
    Expected {
        out,
        mean,
        rstd,
        dinp_over,
        dinp_acc,
        dweight,
        dbias,
    }
}

/// One variant's forward and both backwards on fresh outputs, against `want`.
fn check_variant(
    gpu: &Gpu,
    variant: Variant,
    x: &CheckInputs,
    inputs: [&View; 4],
    want: &Expected,
    dims: Dims,
) -> Result<Vec<CheckReport>> {
    let [out, mean, rstd, dinp_over, dinp_acc, dweight, dbias] =
        run_variant(gpu, variant, x, inputs, dims)?;
    let Dims { n, c } = dims;
    // Measured on lavapipe (f32 tree sums, sqrt and division) the errors are about 1e-6 for
    // out, 3e-7 for dinp and 2e-6 · sqrt(rows) for dweight and dbias, sums over 2N rows; the
    // tolerances leave room for GPUs whose sqrt and division are a few ulp off. Both variants
    // meet the same tolerances.
    let sum_tol = 3e-6 * ((2 * n) as f64).sqrt();
    let s = format!("N={n} C={c}");
    let v = variant.name();
    let mut reports = Vec::new();
    let mut add = |what: &str, got: &View, want: &[f64], atol: f64, rtol: f64| -> Result<()> {
        let what = format!("{what} [{v}]");
        reports.push(CheckReport::new(
            &s,
            &what,
            &gpu.read_f32(got)?,
            want,
            atol,
            rtol,
        ));
        Ok(())
    };
    add("forward out", &out, &want.out, 4e-6, 1e-6)?;
    add("forward mean", &mean, &want.mean, 1e-7, 1e-6)?;
    add("forward rstd", &rstd, &want.rstd, 0.0, 2e-6)?;
    add("backward dinp", &dinp_over, &want.dinp_over, 2e-6, 1e-6)?;
    add("backward dinp +=", &dinp_acc, &want.dinp_acc, 2e-6, 1e-6)?;
    add(
        "backward dweight +=",
        &dweight,
        &want.dweight,
        sum_tol,
        1e-6,
    )?;
    add("backward dbias +=", &dbias, &want.dbias, sum_tol, 1e-6)?;
    Ok(reports)
}

/// Runs one variant's forward, then the backward overwriting dinp and the one adding to it
/// (both adding to dweight and dbias). Returns out, mean, rstd, both dinps, dweight and dbias.
fn run_variant(
    gpu: &Gpu,
    variant: Variant,
    x: &CheckInputs,
    [g_inp, g_weight, g_bias, g_dout]: [&View; 4],
    dims: Dims,
) -> Result<[View; 7]> {
    let Dims { n, c } = dims;
    let g_out = gpu.zeros("out", DType::F32, n * c)?;
    let g_mean = gpu.zeros("mean", DType::F32, n)?;
    let g_rstd = gpu.zeros("rstd", DType::F32, n)?;
    // dinp starts as garbage when overwritten and as dinp0 when accumulated into.
    let g_dinp_over = gpu.upload_f32("dinp", &x.dinp0)?;
    let g_dinp_acc = gpu.upload_f32("dinp", &x.dinp0)?;
    let g_dweight = gpu.upload_f32("dweight", &x.dweight0)?;
    let g_dbias = gpu.upload_f32("dbias", &x.dbias0)?;

    let mut dispatches = vec![forward_with(
        gpu,
        variant,
        ForwardTensors {
            out: &g_out,
            mean: &g_mean,
            rstd: &g_rstd,
            inp: g_inp,
            weight: g_weight,
            bias: g_bias,
        },
        dims,
    )?];
    // The first backward overwrites dinp and adds to dweight/dbias; the second adds to all
    // three.
    for (dinp, acc) in [(&g_dinp_over, false), (&g_dinp_acc, true)] {
        dispatches.extend(backward_with(
            gpu,
            variant,
            BackwardTensors {
                dinp,
                dweight: &g_dweight,
                dbias: &g_dbias,
                dout: g_dout,
                inp: g_inp,
                weight: g_weight,
                mean: &g_mean,
                rstd: &g_rstd,
            },
            dims,
            acc,
        )?);
    }
    gpu.run(&dispatches)?;
    Ok([
        g_out,
        g_mean,
        g_rstd,
        g_dinp_over,
        g_dinp_acc,
        g_dweight,
        g_dbias,
    ])
}

fn bench(gpu: &Gpu, shape: &[usize], opts: &BenchOptions) -> Result<Vec<BenchReport>> {
    let [n, c] = harness::dims::<2>("layernorm", shape)?;
    let dims = Dims { n, c };
    let mut rng = Rng::new(1);
    let inp = gpu.upload_f32("inp", &rng.vec_uniform(n * c, -1.0, 1.0))?;
    let weight = gpu.upload_f32("weight", &rng.vec_uniform(c, -1.0, 1.0))?;
    let bias = gpu.zeros("bias", DType::F32, c)?;
    let out = gpu.zeros("out", DType::F32, n * c)?;
    let mean = gpu.zeros("mean", DType::F32, n)?;
    let rstd = gpu.zeros("rstd", DType::F32, n)?;
    let dweight = gpu.zeros("dweight", DType::F32, c)?;
    let dbias = gpu.zeros("dbias", DType::F32, c)?;
    let dinp = gpu.zeros("dinp", DType::F32, n * c)?;
    let fwd_tensors = ForwardTensors {
        out: &out,
        mean: &mean,
        rstd: &rstd,
        inp: &inp,
        weight: &weight,
        bias: &bias,
    };
    let bwd_tensors = BackwardTensors {
        dinp: &dinp,
        dweight: &dweight,
        dbias: &dbias,
        dout: &out,
        inp: &inp,
        weight: &weight,
        mean: &mean,
        rstd: &rstd,
    };
    // Each kernel's variants one after the other, so that they are timed side by side.
    let variants = Variant::available(gpu);
    let mut fwd = Vec::new();
    let mut bwd = Vec::new();
    for &v in &variants {
        let f = forward_with(gpu, v, fwd_tensors, dims)?;
        gpu.run(std::slice::from_ref(&f))?;
        fwd.push(f);
        bwd.push(backward_with(gpu, v, bwd_tensors, dims, false)?);
    }
    bench_variants(gpu, opts, dims, &variants, &fwd, &bwd)
}

/// Times each variant's forward, then its backward (whole, then the rows kernel alone), then the
/// final dweight/dbias reduction, which is the same kernel in every variant.
fn bench_variants(
    gpu: &Gpu,
    opts: &BenchOptions,
    Dims { n, c }: Dims,
    variants: &[Variant],
    fwd: &[Dispatch],
    bwd: &[Vec<Dispatch>],
) -> Result<Vec<BenchReport>> {
    let (_, blocks) = blocking(n);
    let s = format!("N={n} C={c}");
    let mut reports = Vec::new();
    for (v, f) in variants.iter().zip(fwd) {
        let name = format!("forward {}", v.name());
        reports.push(harness::bench_one(
            gpu,
            opts,
            &name,
            &s,
            std::slice::from_ref(f),
        )?);
    }
    for (v, b) in variants.iter().zip(bwd) {
        let name = format!("backward {}", v.name());
        let mut r = harness::bench_one(gpu, opts, &name, &s, b)?;
        r.extra_bytes = Some(4 * 2 * (blocks * c) as u64);
        reports.push(r);
    }
    for (v, b) in variants.iter().zip(bwd) {
        let name = format!("backward rows {}", v.name());
        reports.push(harness::bench_one(gpu, opts, &name, &s, &b[..1])?);
    }
    reports.push(harness::bench_one(
        gpu,
        opts,
        "backward params",
        &s,
        &bwd[0][1..],
    )?);
    Ok(reports)
}
