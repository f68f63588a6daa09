//! `kernels check swiglu` and `kernels bench swiglu`: the GPU against the CPU reference on
//! awkward sizes, forward and backward (overwriting and accumulating), and their times.

use super::{BackwardTensors, backward, forward};
use crate::error::Result;
use crate::gpu::{DType, Gpu, View};
use crate::kernels::harness::{self, BenchOptions, BenchReport, CheckReport, Family};
use crate::reference;
use crate::rng::Rng;

pub const FAMILY: Family = Family {
    name: "swiglu",
    about: "gated MLP activation silu(gate) · up: forward out; backward dgate, dup (= or +=)",
    shape_help: "N",
    default_shapes: &[&[1], &[3], &[45], &[65], &[127], &[129], &[1536], &[65537]],
    bench_shape: &[4096 * 1536],
    check,
    bench,
};

/// Gate values: mostly N(0, 2²), with the far tails, zero and the bend at the front.
fn gate_inputs(rng: &mut Rng, n: usize) -> Vec<f32> {
    const TAILS: [f32; 10] = [0.0, -1e4, 1e4, -90.0, 90.0, -20.0, 20.0, -5.5, 5.5, -1.28];
    let mut x = rng.vec_normal(n, 2.0);
    for (v, t) in x.iter_mut().zip(TAILS) {
        *v = t;
    }
    x
}

/// The reference's outputs: out, then dgate and dup overwritten and accumulated into.
struct Expected {
    out: Vec<f64>,
    dgate_over: Vec<f64>,
    dup_over: Vec<f64>,
    dgate_acc: Vec<f64>,
    dup_acc: Vec<f64>,
}

/// The reference in f64, so that the tolerances measure the GPU's rounding alone.
fn expected(gate: &[f32], up: &[f32], dout: &[f32], dgate0: &[f32], dup0: &[f32]) -> Expected {
    let f = reference::convert::<f32, f64>;
    let (gate, up, dout) = (f(gate), f(up), f(dout));
    let n = gate.len();
    let mut out = vec![0.0; n];
    reference::swiglu::forward(&mut out, &gate, &up);
    let (mut dgate_over, mut dup_over) = (vec![0.0; n], vec![0.0; n]);
    reference::swiglu::backward(&mut dgate_over, &mut dup_over, &gate, &up, &dout);
    let (mut dgate_acc, mut dup_acc) = (f(dgate0), f(dup0));
    reference::swiglu::backward(&mut dgate_acc, &mut dup_acc, &gate, &up, &dout);
    Expected {
        out,
        dgate_over,
        dup_over,
        dgate_acc,
        dup_acc,
    }
}

fn check(gpu: &Gpu, shape: &[usize]) -> Result<Vec<CheckReport>> {
    let [n] = harness::dims::<1>("swiglu", shape)?;
    let mut rng = Rng::new(n as u64);
    let gate = gate_inputs(&mut rng, n);
    let up = rng.vec_uniform(n, -2.0, 2.0);
    let dout = rng.vec_uniform(n, -1.0, 1.0);
    let dgate0 = rng.vec_uniform(n, -1.0, 1.0);
    let dup0 = rng.vec_uniform(n, -1.0, 1.0);
    let want = expected(&gate, &up, &dout, &dgate0, &dup0);

    let (g_gate, g_up) = (gpu.upload_f32("gate", &gate)?, gpu.upload_f32("up", &up)?);
    let g_dout = gpu.upload_f32("dout", &dout)?;
    let g_out = gpu.zeros("out", DType::F32, n)?;
    // Gradients start as garbage when overwritten and as dgate0, dup0 when accumulated into.
    let g_dgate_over = gpu.upload_f32("dgate", &dgate0)?;
    let g_dup_over = gpu.upload_f32("dup", &dup0)?;
    let g_dgate_acc = gpu.upload_f32("dgate", &dgate0)?;
    let g_dup_acc = gpu.upload_f32("dup", &dup0)?;
    let grads = |dgate, dup| BackwardTensors {
        dgate,
        dup,
        gate: &g_gate,
        up: &g_up,
        dout: &g_dout,
    };
    gpu.run(&[
        forward(gpu, &g_out, &g_gate, &g_up, n)?,
        backward(gpu, grads(&g_dgate_over, &g_dup_over), n, false)?,
        backward(gpu, grads(&g_dgate_acc, &g_dup_acc), n, true)?,
    ])?;

    let s = format!("N={n}");
    let mut reports = Vec::new();
    // gelu's tolerances: elementwise, through an f32 exponential.
    let mut add = |what: &str, got: &View, want: &[f64]| -> Result<()> {
        let g = gpu.read_f32(got)?;
        reports.push(CheckReport::new(&s, what, &g, want, 5e-7, 5e-6));
        Ok(())
    };
    add("forward out", &g_out, &want.out)?;
    add("backward dgate", &g_dgate_over, &want.dgate_over)?;
    add("backward dup", &g_dup_over, &want.dup_over)?;
    add("backward dgate +=", &g_dgate_acc, &want.dgate_acc)?;
    add("backward dup +=", &g_dup_acc, &want.dup_acc)?;
    Ok(reports)
}

fn bench(gpu: &Gpu, shape: &[usize], opts: &BenchOptions) -> Result<Vec<BenchReport>> {
    let [n] = harness::dims::<1>("swiglu", shape)?;
    let mut rng = Rng::new(1);
    let gate = gpu.upload_f32("gate", &rng.vec_normal(n, 2.0))?;
    let up = gpu.upload_f32("up", &rng.vec_normal(n, 1.0))?;
    let out = gpu.zeros("out", DType::F32, n)?;
    let dgate = gpu.zeros("dgate", DType::F32, n)?;
    let dup = gpu.zeros("dup", DType::F32, n)?;
    let t = BackwardTensors {
        dgate: &dgate,
        dup: &dup,
        gate: &gate,
        up: &up,
        dout: &out,
    };
    let s = format!("N={n}");
    Ok(vec![
        harness::bench_one(
            gpu,
            opts,
            "forward",
            &s,
            &[forward(gpu, &out, &gate, &up, n)?],
        )?,
        harness::bench_one(gpu, opts, "backward", &s, &[backward(gpu, t, n, false)?])?,
        harness::bench_one(gpu, opts, "backward +=", &s, &[backward(gpu, t, n, true)?])?,
    ])
}
