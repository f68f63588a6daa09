//! residual.wgsl launchers: out = a + b, its backward (da += dout, db += dout), and
//! dst (=|+=) src.

use bytemuck::{Pod, Zeroable};

use super::harness::{self, BenchReport, CheckReport, Family};
use super::{bytes_of, elementwise};
use crate::error::Result;
use crate::gpu::{Binding, Cost, DType, Dispatch, Gpu, KernelSpec, Shader, ShaderVariant, View};
use crate::reference;
use crate::rng::Rng;

use Binding::{Read, ReadWrite};

pub const FORWARD: KernelSpec = KernelSpec {
    shader: Shader::Residual,
    variant: ShaderVariant::Base,
    entry: "residual_forward",
    bindings: &[Read, Read, ReadWrite],
};
pub const BACKWARD: KernelSpec = KernelSpec {
    shader: Shader::Residual,
    variant: ShaderVariant::Base,
    entry: "residual_backward",
    bindings: &[Read, ReadWrite, ReadWrite],
};
pub const ACCUMULATE: KernelSpec = KernelSpec {
    shader: Shader::Residual,
    variant: ShaderVariant::Base,
    entry: "accumulate",
    bindings: &[Read, ReadWrite],
};

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct Params {
    n: u32,
    accumulate: u32,
}

/// The layout of `Params`, for the test that compares it with `Params` in the shader.
pub fn params_layout() -> super::ParamsLayout {
    super::params_layout!(Params { n, accumulate })
}

fn launch(
    gpu: &Gpu,
    spec: &KernelSpec,
    n: usize,
    accumulate: bool,
    args: &[&View],
    cost: Cost,
) -> Result<Dispatch> {
    let params = Params {
        n: n as u32,
        accumulate: accumulate as u32,
    };
    elementwise(gpu, spec, n, bytes_of(&params), args, cost)
}

/// out (N) = a (N) + b (N). Overwrites `out`.
pub fn forward(gpu: &Gpu, out: &View, a: &View, b: &View) -> Result<Dispatch> {
    let n = out.len;
    let cost = Cost {
        flops: n as u64,
        bytes: 12 * n as u64,
    };
    launch(gpu, &FORWARD, n, false, &[a, b, out], cost)
}

/// da (N) += dout (N); db (N) += dout (N). Accumulates.
pub fn backward(gpu: &Gpu, da: &View, db: &View, dout: &View) -> Result<Dispatch> {
    let n = dout.len;
    let cost = Cost {
        flops: 2 * n as u64,
        bytes: 20 * n as u64,
    };
    launch(gpu, &BACKWARD, n, true, &[dout, da, db], cost)
}

/// dst (N) = src (N), or dst += src when `accumulate`.
pub fn accumulate(gpu: &Gpu, dst: &View, src: &View, accumulate: bool) -> Result<Dispatch> {
    let n = dst.len;
    let cost = Cost {
        flops: n as u64,
        bytes: 12 * n as u64,
    };
    launch(gpu, &ACCUMULATE, n, accumulate, &[src, dst], cost)
}

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
