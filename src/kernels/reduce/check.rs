//! `shaderformer kernels check|bench reduce`: reduce.wgsl against the CPU reference on awkward
//! shapes, and its variants timed.

use super::*;
use crate::kernels::harness::{self, BenchReport, CheckReport, Family};
use crate::reference;
use crate::rng::Rng;

pub const FAMILY: Family = Family {
    name: "reduce",
    about: "fill; global gradient norm sqrt(Σ g²) over many tensors; scaled sum (deterministic)",
    shape_help: "N",
    default_shapes: &[
        &[1],
        &[3],
        &[45],
        &[65],
        &[127],
        &[129],
        &[1000],
        &[65537],
        &[1_300_001],
    ],
    bench_shape: &[124_000_000 / 4],
    check,
    bench,
};

/// Σ |x| in f64: the scale of the rounding error of any f32 summation order.
fn abs_sum(x: &[f32]) -> f64 {
    x.iter().map(|&v| (v as f64).abs()).sum()
}

/// The sizes of the many-tensor check for shape N: N itself among awkward neighbours.
fn many_sizes(n: usize) -> Vec<usize> {
    vec![1, n, 3, 129, n.div_ceil(2), 1000, 45, n + 1]
}

/// The rounding error of an f32 sum is at most depth · 2^-24 · Σ|x|, where the depth (terms
/// one invocation adds in sequence plus the tree levels of both stages) stays under 40 for these
/// shapes. So 4e-6 · Σ|x| bounds it, while one missing or doubled element (about Σ|x| / N)
/// still fails for N up to about 10^5. The norm's relative error is half that of its square.
const REL: f64 = 4e-6;

fn check(gpu: &Gpu, shape: &[usize]) -> Result<Vec<CheckReport>> {
    let [n] = harness::dims::<1>("reduce", shape)?;
    let mut rng = Rng::new(n as u64 + 7);
    let s = format!("N={n}");
    let fill = check_fill(gpu, &s, n, &mut rng)?;
    let x = rng.vec_uniform(n, -1.0, 1.0);
    let gx = gpu.upload_f32("grad", &x)?;
    let norm = gpu.upload_f32("norm", &[f32::NAN])?;
    Ok(vec![
        fill,
        check_norm_one(gpu, &s, &x, &gx, &norm)?,
        check_norm_many(gpu, &s, n, &mut rng, &norm)?,
        check_sum(gpu, &s, &x, &gx)?,
    ])
}

/// fill over a buffer of garbage.
fn check_fill(gpu: &Gpu, s: &str, n: usize, rng: &mut Rng) -> Result<CheckReport> {
    let garbage = rng.vec_uniform(n, -1.0, 1.0);
    let gview = gpu.upload_f32("fill out", &garbage)?;
    gpu.run(&[fill(gpu, &gview, -2.5)?])?;
    let mut want = vec![0.0f32; n];
    reference::reduce::fill(&mut want, -2.5);
    Ok(CheckReport::new(
        s,
        "fill out",
        &gpu.read_f32(&gview)?,
        &want,
        0.0,
        0.0,
    ))
}

/// global_norm over one tensor, `x` (uploaded as `gx`).
fn check_norm_one(gpu: &Gpu, s: &str, x: &[f32], gx: &View, norm: &View) -> Result<CheckReport> {
    let partials = gpu.zeros("partials", DType::F32, partials_len(gpu, &[x.len()]))?;
    gpu.run(&global_norm(gpu, norm, &partials, &[gx])?)?;
    let mut want = [0.0f64];
    reference::reduce::global_norm(&mut want, &[&reference::convert::<f32, f64>(x)]);
    Ok(CheckReport::new(
        s,
        "global_norm 1 tensor",
        &gpu.read_f32(norm)?,
        &want,
        0.0,
        0.5 * REL,
    ))
}

/// global_norm over several tensors of awkward sizes.
fn check_norm_many(
    gpu: &Gpu,
    s: &str,
    n: usize,
    rng: &mut Rng,
    norm: &View,
) -> Result<CheckReport> {
    let sizes = many_sizes(n);
    let xs: Vec<Vec<f32>> = sizes
        .iter()
        .map(|&k| rng.vec_uniform(k, -2.0, 2.0))
        .collect();
    let views = xs
        .iter()
        .enumerate()
        .map(|(i, x)| gpu.upload_f32(&format!("grad{i}"), x))
        .collect::<Result<Vec<_>>>()?;
    let refs: Vec<&View> = views.iter().collect();
    let partials = gpu.zeros("partials", DType::F32, partials_len(gpu, &sizes))?;
    gpu.run(&global_norm(gpu, norm, &partials, &refs)?)?;
    let xs64: Vec<Vec<f64>> = xs.iter().map(|x| reference::convert(x)).collect();
    let xs64: Vec<&[f64]> = xs64.iter().map(|x| x.as_slice()).collect();
    let mut want = [0.0f64];
    reference::reduce::global_norm(&mut want, &xs64);
    Ok(CheckReport::new(
        s,
        &format!("global_norm {} tensors", sizes.len()),
        &gpu.read_f32(norm)?,
        &want,
        0.0,
        0.5 * REL,
    ))
}

/// sum with a scale (the mean of a per-position loss) of `x` (uploaded as `gx`).
fn check_sum(gpu: &Gpu, s: &str, x: &[f32], gx: &View) -> Result<CheckReport> {
    let n = x.len();
    let scale = 1.0 / n as f32;
    let out = gpu.upload_f32("sum out", &[f32::NAN])?;
    gpu.run(&sum(gpu, &out, gx, n, scale)?)?;
    let mut want = [0.0f64];
    reference::reduce::sum(&mut want, &reference::convert::<f32, f64>(x), scale as f64);
    Ok(CheckReport::new(
        s,
        "sum",
        &gpu.read_f32(&out)?,
        &want,
        REL * scale as f64 * abs_sum(x),
        0.0,
    ))
}

fn bench(gpu: &Gpu, shape: &[usize], opts: &harness::BenchOptions) -> Result<Vec<BenchReport>> {
    let [n] = harness::dims::<1>("reduce", shape)?;
    let x = gpu.zeros("grad", DType::F32, n)?;
    let norm = gpu.zeros("norm", DType::F32, 1)?;
    let out = gpu.zeros("sum out", DType::F32, 1)?;
    let partials = gpu.zeros("partials", DType::F32, partials_len(gpu, &[n]))?;
    let s = format!("N={n}");
    Ok(vec![
        harness::bench_one(
            gpu,
            opts,
            "global_norm",
            &s,
            &global_norm(gpu, &norm, &partials, &[&x])?,
        )?,
        harness::bench_one(gpu, opts, "sum", &s, &sum(gpu, &out, &x, n, 1.0)?)?,
        harness::bench_one(gpu, opts, "fill", &s, &[fill(gpu, &x, 0.0)?])?,
    ])
}
