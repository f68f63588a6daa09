//! `shaderformer kernels check|bench gelu`: gelu.wgsl against the CPU reference on awkward
//! shapes, and its variants timed.

use super::*;
use crate::kernels::harness::{self, BenchOptions, BenchReport, CheckReport, Family};
use crate::reference;
use crate::rng::Rng;

pub const FAMILY: Family = Family {
    name: "gelu",
    about: "GELU, tanh approximation: forward out; backward dinp (= or +=)",
    shape_help: "N",
    default_shapes: &[&[1], &[3], &[45], &[65], &[127], &[129], &[1000], &[65537]],
    bench_shape: &[4096 * 3072],
    check,
    bench,
};

/// Inputs for the check: mostly N(0, 2²), with the far tails and zero at the front.
fn inputs(rng: &mut Rng, n: usize) -> Vec<f32> {
    const TAILS: [f32; 10] = [0.0, -1e4, 1e4, -40.0, 40.0, -9.0, 9.0, -5.5, 5.5, -0.75];
    let mut x = rng.vec_normal(n, 2.0);
    for (v, t) in x.iter_mut().zip(TAILS) {
        *v = t;
    }
    x
}

fn check(gpu: &Gpu, shape: &[usize]) -> Result<Vec<CheckReport>> {
    let [n] = harness::dims::<1>("gelu", shape)?;
    let mut rng = Rng::new(n as u64);
    let inp = inputs(&mut rng, n);
    let dout = rng.vec_uniform(n, -1.0, 1.0);
    let dinp0 = rng.vec_uniform(n, -1.0, 1.0);

    let g_inp = gpu.upload_f32("inp", &inp)?;
    let g_out = gpu.zeros("out", DType::F32, n)?;
    let g_dout = gpu.upload_f32("dout", &dout)?;
    // Starts as garbage when overwritten and as dinp0 when accumulated into.
    let g_dinp_over = gpu.upload_f32("dinp", &dinp0)?;
    let g_dinp_acc = gpu.upload_f32("dinp", &dinp0)?;
    gpu.run(&[
        forward(gpu, &g_out, &g_inp, n)?,
        backward(gpu, &g_dinp_over, &g_inp, &g_dout, n, false)?,
        backward(gpu, &g_dinp_acc, &g_inp, &g_dout, n, true)?,
    ])?;

    // The reference in f64, so that the tolerances measure the GPU's rounding alone.
    let f = reference::convert::<f32, f64>;
    let (inp, dout) = (f(&inp), f(&dout));
    let mut out = vec![0.0; n];
    reference::gelu::forward(&mut out, &inp);
    let mut dinp_over = vec![0.0; n];
    reference::gelu::backward(&mut dinp_over, &inp, &dout);
    let mut dinp_acc = f(&dinp0);
    reference::gelu::backward(&mut dinp_acc, &inp, &dout);

    let s = format!("N={n}");
    Ok(vec![
        CheckReport::new(&s, "forward out", &gpu.read_f32(&g_out)?, &out, 5e-7, 5e-6),
        CheckReport::new(
            &s,
            "backward dinp",
            &gpu.read_f32(&g_dinp_over)?,
            &dinp_over,
            5e-7,
            5e-6,
        ),
        CheckReport::new(
            &s,
            "backward dinp +=",
            &gpu.read_f32(&g_dinp_acc)?,
            &dinp_acc,
            5e-7,
            5e-6,
        ),
    ])
}

fn bench(gpu: &Gpu, shape: &[usize], opts: &BenchOptions) -> Result<Vec<BenchReport>> {
    let [n] = harness::dims::<1>("gelu", shape)?;
    let inp = gpu.upload_f32("inp", &Rng::new(1).vec_normal(n, 2.0))?;
    let out = gpu.zeros("out", DType::F32, n)?;
    let dinp = gpu.zeros("dinp", DType::F32, n)?;
    let s = format!("N={n}");
    Ok(vec![
        harness::bench_one(gpu, opts, "forward", &s, &[forward(gpu, &out, &inp, n)?])?,
        harness::bench_one(
            gpu,
            opts,
            "backward",
            &s,
            &[backward(gpu, &dinp, &inp, &out, n, false)?],
        )?,
        harness::bench_one(
            gpu,
            opts,
            "backward +=",
            &s,
            &[backward(gpu, &dinp, &inp, &out, n, true)?],
        )?,
    ])
}
