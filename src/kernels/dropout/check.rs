//! `shaderformer kernels check|bench dropout`: dropout.wgsl against the CPU reference on awkward
//! shapes, and its variants timed.

use super::*;
use crate::kernels::harness::{self, BenchOptions, BenchReport, CheckReport, Family};
use crate::reference;
use crate::rng::Rng;

pub const FAMILY: Family = Family {
    name: "dropout",
    about: "inverted dropout, counter-based mask: forward out; backward dinp (= or +=)",
    shape_help: "N",
    default_shapes: &[&[1], &[3], &[45], &[65], &[127], &[129], &[1000], &[65537]],
    bench_shape: &[4096 * 3072],
    check,
    bench,
};

fn check(gpu: &Gpu, shape: &[usize]) -> Result<Vec<CheckReport>> {
    let [n] = harness::dims::<1>("dropout", shape)?;
    let mut rng = Rng::new(n as u64);
    let inp = rng.vec_normal(n, 1.0);
    let dout = rng.vec_uniform(n, -1.0, 1.0);
    let dinp0 = rng.vec_uniform(n, -1.0, 1.0);
    let (seed, step) = (0x5eed_u32.wrapping_add(n as u32), 3 + n as u32);
    let s = format!("N={n}");
    let mut reports = Vec::new();
    for p in [0.0, 0.1, 0.5, 0.9] {
        let g_inp = gpu.upload_f32("inp", &inp)?;
        let g_out = gpu.zeros("out", DType::F32, n)?;
        let g_dout = gpu.upload_f32("dout", &dout)?;
        let g_dinp_over = gpu.upload_f32("dinp", &dinp0)?;
        let g_dinp_acc = gpu.upload_f32("dinp", &dinp0)?;
        let d = Dropout { p, seed, step };
        gpu.run(&[
            forward(gpu, &g_out, &g_inp, n, d)?,
            backward(gpu, &g_dinp_over, &g_dout, n, d, false)?,
            backward(gpu, &g_dinp_acc, &g_dout, n, d, true)?,
        ])?;
        let mut out = vec![0.0f32; n];
        reference::dropout::forward(&mut out, &inp, p, seed, step);
        let mut dinp_over = vec![0.0f32; n];
        reference::dropout::backward(&mut dinp_over, &dout, p, seed, step);
        let mut dinp_acc = dinp0.clone();
        reference::dropout::backward(&mut dinp_acc, &dout, p, seed, step);
        // Same mask, same f32 products: bit-exact.
        reports.push(CheckReport::new(
            &s,
            &format!("forward out p={p}"),
            &gpu.read_f32(&g_out)?,
            &out,
            0.0,
            0.0,
        ));
        reports.push(CheckReport::new(
            &s,
            &format!("backward dinp p={p}"),
            &gpu.read_f32(&g_dinp_over)?,
            &dinp_over,
            0.0,
            0.0,
        ));
        reports.push(CheckReport::new(
            &s,
            &format!("backward dinp += p={p}"),
            &gpu.read_f32(&g_dinp_acc)?,
            &dinp_acc,
            0.0,
            0.0,
        ));
    }
    Ok(reports)
}

fn bench(gpu: &Gpu, shape: &[usize], opts: &BenchOptions) -> Result<Vec<BenchReport>> {
    let [n] = harness::dims::<1>("dropout", shape)?;
    let inp = gpu.upload_f32("inp", &Rng::new(1).vec_normal(n, 1.0))?;
    let out = gpu.zeros("out", DType::F32, n)?;
    let dinp = gpu.zeros("dinp", DType::F32, n)?;
    let s = format!("N={n} p=0.1");
    let d = Dropout {
        p: 0.1,
        seed: 1,
        step: 0,
    };
    Ok(vec![
        harness::bench_one(gpu, opts, "forward", &s, &[forward(gpu, &out, &inp, n, d)?])?,
        harness::bench_one(
            gpu,
            opts,
            "backward",
            &s,
            &[backward(gpu, &dinp, &out, n, d, false)?],
        )?,
        harness::bench_one(
            gpu,
            opts,
            "backward +=",
            &s,
            &[backward(gpu, &dinp, &out, n, d, true)?],
        )?,
    ])
}
