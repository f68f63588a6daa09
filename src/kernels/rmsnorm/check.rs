//! `kernels check rmsnorm` and `kernels bench rmsnorm`: the GPU against the CPU reference on
//! awkward shapes, forward (plain and fused with the residual add) and backward, and their times.

use super::{BackwardTensors, Dims, ForwardTensors, ResidualForwardTensors, backward, blocking};
use super::{forward, forward_residual};
use crate::error::Result;
use crate::gpu::{DType, Gpu, View};
use crate::kernels::harness::{self, BenchOptions, BenchReport, CheckReport, Family};
use crate::kernels::residual;
use crate::reference;
use crate::rng::Rng;

/// The epsilon the check uses: large enough (0.02% to 4% of the rows' mean squares) that a lost
/// or misplaced eps fails the comparison on every row, small enough that rstd stays near 1.
const EPS: f32 = 1e-2;
/// The epsilon the bench uses: SmolLM2's and Llama's rms_norm_eps.
const BENCH_EPS: f32 = 1e-5;

pub const FAMILY: Family = Family {
    name: "rmsnorm",
    about: "RMSNorm over C (eps 1e-2 checked): forward out, rstd (and fused resid = a + b); backward dinp, dweight +=",
    shape_help: "NxC",
    default_shapes: &[
        &[1, 1],
        &[3, 1],
        &[1, 3],
        &[3, 3],
        &[65, 45],
        &[129, 45],
        &[65, 127],
        &[3, 129],
        &[1, 576],
        &[65, 576],
        &[129, 1536],
        &[4099, 3],
        &[67, 2053],
    ],
    bench_shape: &[4096, 576],
    check,
    bench,
};

/// The check's inputs, and the prior contents of the gradients the backward accumulates into.
struct CheckInputs {
    a: Vec<f32>,        // (N, C)
    b: Vec<f32>,        // (N, C)
    inp: Vec<f32>,      // (N, C): a + b in f32, as the fused kernel adds them
    weight: Vec<f32>,   // (C)
    dout: Vec<f32>,     // (N, C)
    dinp0: Vec<f32>,    // (N, C)
    dweight0: Vec<f32>, // (C)
}

/// Values of magnitude 0.5 to 2.5 with random signs, scaled per row by 1 to 5 and with the first
/// and last channel at the row's extremes, so that a missing square, a centred variance or a
/// wrong row shows, while every row's rstd stays moderate (a near-zero row measures only the
/// conditioning of 1 / sqrt). a + b is split at random.
fn check_inputs(Dims { n, c }: Dims) -> CheckInputs {
    let mut rng = Rng::new((n * 7919 + c) as u64);
    let mut inp = Vec::with_capacity(n * c);
    for i in 0..n * c {
        let scale = 1.0 + ((i / c) % 5) as f32;
        let mag = match i % c {
            0 if c > 1 => 2.5,
            j if c > 1 && j == c - 1 => 0.5,
            _ => rng.range(0.5, 2.5),
        };
        let sign = if rng.uniform() < 0.5 { -1.0 } else { 1.0 };
        inp.push(sign * mag * scale);
    }
    let b = rng.vec_uniform(n * c, -1.0, 1.0);
    let a: Vec<f32> = inp.iter().zip(&b).map(|(x, b)| x - b).collect();
    // What the fused kernel normalises: a + b rounded to f32.
    let inp = a.iter().zip(&b).map(|(a, b)| a + b).collect();
    CheckInputs {
        a,
        b,
        inp,
        weight: rng.vec_uniform(c, -1.5, 1.5),
        dout: rng.vec_uniform(n * c, -1.0, 1.0),
        dinp0: rng.vec_uniform(n * c, -1.0, 1.0),
        dweight0: rng.vec_uniform(c, -1.0, 1.0),
    }
}

/// The reference's forward and backward, the backward run twice: overwriting dinp, then adding
/// to dinp0; dweight accumulates both.
struct Expected {
    out: Vec<f64>,
    rstd: Vec<f64>,
    dinp_over: Vec<f64>,
    dinp_acc: Vec<f64>,
    dweight: Vec<f64>,
}

/// The reference in f64, so that the tolerances measure the GPU's rounding alone.
fn expected(x: &CheckInputs, dims: Dims) -> Expected {
    let Dims { n, c } = dims;
    let f = reference::convert::<f32, f64>;
    let (inp, weight, dout) = (f(&x.inp), f(&x.weight), f(&x.dout));
    let mut out = vec![0.0; n * c];
    let mut rstd = vec![0.0; n];
    reference::rmsnorm::forward(&mut out, &mut rstd, &inp, &weight, dims, EPS as f64);
    let mut dinp_over = vec![0.0; n * c];
    let mut dinp_acc = f(&x.dinp0);
    let mut dweight = f(&x.dweight0);
    for dinp in [&mut dinp_over, &mut dinp_acc] {
        reference::rmsnorm::backward(dinp, &mut dweight, &dout, &inp, &weight, &rstd, dims);
    }
    Expected {
        out,
        rstd,
        dinp_over,
        dinp_acc,
        dweight,
    }
}

fn check(gpu: &Gpu, shape: &[usize]) -> Result<Vec<CheckReport>> {
    let [n, c] = harness::dims::<2>("rmsnorm", shape)?;
    let dims = Dims { n, c };
    let x = check_inputs(dims);
    let want = expected(&x, dims);
    let got = run(gpu, &x, dims)?;
    // The same tolerances as layernorm's (same f32 tree sums, sqrt and division): about 1e-6
    // measured for out, 3e-7 for dinp, 2e-6 · sqrt(rows) for dweight, a sum over 2N rows.
    let sum_tol = 3e-6 * ((2 * n) as f64).sqrt();
    let s = format!("N={n} C={c}");
    let mut reports = Vec::new();
    let mut add = |what: &str, got: &View, want: &[f64], atol: f64, rtol: f64| -> Result<()> {
        let g = gpu.read_f32(got)?;
        reports.push(CheckReport::new(&s, what, &g, want, atol, rtol));
        Ok(())
    };
    add("forward out", &got.out, &want.out, 4e-6, 1e-6)?;
    add("forward rstd", &got.rstd, &want.rstd, 0.0, 2e-6)?;
    let resid = reference::convert::<f32, f64>(&x.inp);
    add("residual forward resid", &got.resid, &resid, 0.0, 0.0)?;
    add("residual forward out", &got.res_out, &want.out, 4e-6, 1e-6)?;
    add(
        "residual forward rstd",
        &got.res_rstd,
        &want.rstd,
        0.0,
        2e-6,
    )?;
    add("backward dinp", &got.dinp_over, &want.dinp_over, 2e-6, 1e-6)?;
    add(
        "backward dinp +=",
        &got.dinp_acc,
        &want.dinp_acc,
        2e-6,
        1e-6,
    )?;
    add(
        "backward dweight +=",
        &got.dweight,
        &want.dweight,
        sum_tol,
        1e-6,
    )?;
    Ok(reports)
}

/// What the GPU computed: both forwards, then the backward overwriting dinp and the one adding to
/// it (both adding to dweight).
struct Got {
    out: View,
    rstd: View,
    resid: View,
    res_out: View,
    res_rstd: View,
    dinp_over: View,
    dinp_acc: View,
    dweight: View,
}

fn run(gpu: &Gpu, x: &CheckInputs, dims: Dims) -> Result<Got> {
    let Dims { n, c } = dims;
    let inp = gpu.upload_f32("inp", &x.inp)?;
    let a = gpu.upload_f32("a", &x.a)?;
    let b = gpu.upload_f32("b", &x.b)?;
    let weight = gpu.upload_f32("weight", &x.weight)?;
    let dout = gpu.upload_f32("dout", &x.dout)?;
    let got = Got {
        out: gpu.zeros("out", DType::F32, n * c)?,
        rstd: gpu.zeros("rstd", DType::F32, n)?,
        resid: gpu.zeros("resid", DType::F32, n * c)?,
        res_out: gpu.zeros("out", DType::F32, n * c)?,
        res_rstd: gpu.zeros("rstd", DType::F32, n)?,
        // dinp starts as garbage when overwritten and as dinp0 when accumulated into.
        dinp_over: gpu.upload_f32("dinp", &x.dinp0)?,
        dinp_acc: gpu.upload_f32("dinp", &x.dinp0)?,
        dweight: gpu.upload_f32("dweight", &x.dweight0)?,
    };
    let fwd = ForwardTensors {
        out: &got.out,
        rstd: &got.rstd,
        inp: &inp,
        weight: &weight,
    };
    let res = ResidualForwardTensors {
        resid: &got.resid,
        out: &got.res_out,
        rstd: &got.res_rstd,
        a: &a,
        b: &b,
        weight: &weight,
    };
    let mut dispatches = vec![
        forward(gpu, fwd, dims, EPS)?,
        forward_residual(gpu, res, dims, EPS)?,
    ];
    for (dinp, acc) in [(&got.dinp_over, false), (&got.dinp_acc, true)] {
        let t = BackwardTensors {
            dinp,
            dweight: &got.dweight,
            dout: &dout,
            inp: &inp,
            weight: &weight,
            rstd: &got.rstd,
        };
        dispatches.extend(backward(gpu, t, dims, acc)?);
    }
    gpu.run(&dispatches)?;
    Ok(got)
}

fn bench(gpu: &Gpu, shape: &[usize], opts: &BenchOptions) -> Result<Vec<BenchReport>> {
    let [n, c] = harness::dims::<2>("rmsnorm", shape)?;
    let dims = Dims { n, c };
    let mut rng = Rng::new(1);
    let mut up = |name: &str, len: usize| gpu.upload_f32(name, &rng.vec_uniform(len, -1.0, 1.0));
    let (a, b, weight) = (up("a", n * c)?, up("b", n * c)?, up("weight", c)?);
    let zeros = |name: &str, len: usize| gpu.zeros(name, DType::F32, len);
    let (resid, out, dinp) = (
        zeros("resid", n * c)?,
        zeros("out", n * c)?,
        zeros("dinp", n * c)?,
    );
    let (rstd, dweight) = (zeros("rstd", n)?, zeros("dweight", c)?);
    let fwd = ForwardTensors {
        out: &out,
        rstd: &rstd,
        inp: &resid,
        weight: &weight,
    };
    let res = ResidualForwardTensors {
        resid: &resid,
        out: &out,
        rstd: &rstd,
        a: &a,
        b: &b,
        weight: &weight,
    };
    let bwd = BackwardTensors {
        dinp: &dinp,
        dweight: &dweight,
        dout: &out,
        inp: &resid,
        weight: &weight,
        rstd: &rstd,
    };
    let f = forward(gpu, fwd, dims, BENCH_EPS)?;
    let fr = forward_residual(gpu, res, dims, BENCH_EPS)?;
    gpu.run(std::slice::from_ref(&fr))?;
    let add = residual::forward(gpu, &resid, &a, &b)?;
    let bw = backward(gpu, bwd, dims, false)?;
    let s = format!("N={n} C={c}");
    let mut backward_report = harness::bench_one(gpu, opts, "backward", &s, &bw)?;
    backward_report.extra_bytes = Some(4 * (blocking(n).1 * c) as u64);
    Ok(vec![
        harness::bench_one(gpu, opts, "forward", &s, std::slice::from_ref(&f))?,
        harness::bench_one(gpu, opts, "residual forward (fused)", &s, &[fr])?,
        harness::bench_one(gpu, opts, "residual add + forward", &s, &[add, f])?,
        backward_report,
        harness::bench_one(gpu, opts, "backward rows", &s, &bw[..1])?,
        harness::bench_one(gpu, opts, "backward params", &s, &bw[1..])?,
    ])
}
