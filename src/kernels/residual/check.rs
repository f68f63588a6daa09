//! `shaderformer kernels check|bench residual`: residual.wgsl against the CPU reference on awkward
//! shapes, and its variants timed.

use super::*;
use crate::kernels::harness::{self, BenchReport, CheckReport, Family};
use crate::reference;
use crate::rng::Rng;

pub const FAMILY: Family = Family {
    name: "residual",
    about: "out = a + b; backward da += dout, db += dout; accumulate dst (=|+=) src",
    shape_help: "N",
    default_shapes: &[&[1], &[3], &[45], &[127], &[129], &[1000], &[65537]],
    bench_shape: &[1 << 24],
    check,
    bench,
};

fn check(gpu: &Gpu, shape: &[usize]) -> Result<Vec<CheckReport>> {
    let [n] = harness::dims::<1>("residual", shape)?;
    let mut rng = Rng::new(n as u64);
    let a = rng.vec_uniform(n, -1.0, 1.0);
    let b = rng.vec_uniform(n, -1.0, 1.0);
    let dout = rng.vec_uniform(n, -1.0, 1.0);
    let da0 = rng.vec_uniform(n, -1.0, 1.0);
    let db0 = rng.vec_uniform(n, -1.0, 1.0);

    let ga = gpu.upload_f32("a", &a)?;
    let gb = gpu.upload_f32("b", &b)?;
    let gout = gpu.zeros("out", DType::F32, n)?;
    let gdout = gpu.upload_f32("dout", &dout)?;
    let gda = gpu.upload_f32("da", &da0)?;
    let gdb = gpu.upload_f32("db", &db0)?;
    let gcopy = gpu.upload_f32("copy", &da0)?;
    gpu.run(&[
        forward(gpu, &gout, &ga, &gb)?,
        backward(gpu, &gda, &gdb, &gdout)?,
        accumulate(gpu, &gda, &gdout, true)?,
        accumulate(gpu, &gcopy, &gdout, false)?,
    ])?;

    let mut out = vec![0.0; n];
    reference::residual::forward(&mut out, &a, &b);
    let (mut da, mut db) = (da0, db0);
    reference::residual::backward(&mut da, &mut db, &dout);
    reference::residual::accumulate(&mut da, &dout, true);
    let mut copy = db.clone();
    reference::residual::accumulate(&mut copy, &dout, false);

    let s = format!("N={n}");
    Ok(vec![
        CheckReport::new(&s, "forward out", &gpu.read_f32(&gout)?, &out, 0.0, 0.0),
        CheckReport::new(
            &s,
            "backward+accumulate da",
            &gpu.read_f32(&gda)?,
            &da,
            1e-6,
            1e-6,
        ),
        CheckReport::new(&s, "backward db", &gpu.read_f32(&gdb)?, &db, 0.0, 0.0),
        CheckReport::new(
            &s,
            "accumulate (overwrite)",
            &gpu.read_f32(&gcopy)?,
            &copy,
            0.0,
            0.0,
        ),
    ])
}

fn bench(gpu: &Gpu, shape: &[usize], opts: &harness::BenchOptions) -> Result<Vec<BenchReport>> {
    let [n] = harness::dims::<1>("residual", shape)?;
    let a = gpu.zeros("a", DType::F32, n)?;
    let b = gpu.zeros("b", DType::F32, n)?;
    let out = gpu.zeros("out", DType::F32, n)?;
    let s = format!("N={n}");
    Ok(vec![
        harness::bench_one(gpu, opts, "forward", &s, &[forward(gpu, &out, &a, &b)?])?,
        harness::bench_one(gpu, opts, "backward", &s, &[backward(gpu, &a, &b, &out)?])?,
    ])
}
