//! `kernels check qkv_pack` and `kernels bench qkv_pack`: the GPU against the CPU reference on
//! awkward shapes (groups of 1, 3 and 9 query heads, head sizes no multiple of anything), the
//! forward and the backward (overwriting and accumulating), and their times.

use super::{BackwardTensors, Dims, backward, forward};
use crate::error::Result;
use crate::gpu::{DType, Gpu, View};
use crate::kernels::harness::{self, BenchOptions, BenchReport, CheckReport, Family};
use crate::reference;
use crate::rng::Rng;

pub const FAMILY: Family = Family {
    name: "qkv_pack",
    about: "attention operand: q, k, v rows side by side into (B,T,(NH+2·NKV)·HS); backward splits (= or +=)",
    shape_help: "BxTxNHxNKVxHS",
    default_shapes: &[
        &[1, 1, 1, 1, 1],
        &[2, 3, 6, 2, 5],
        &[1, 45, 9, 3, 7],
        &[3, 5, 9, 1, 3],
        &[1, 129, 4, 4, 2],
        &[2, 65, 9, 3, 64],
    ],
    bench_shape: &[4, 256, 9, 3, 64],
    check,
    bench,
};

fn dims_of(shape: &[usize]) -> Result<Dims> {
    let [b, t, nh, nkv, hs] = harness::dims::<5>("qkv_pack", shape)?;
    Ok(Dims { b, t, nh, nkv, hs })
}

fn check(gpu: &Gpu, shape: &[usize]) -> Result<Vec<CheckReport>> {
    let dims = dims_of(shape)?;
    let Dims { b, t, nh, nkv, hs } = dims;
    let (nq, nk) = (b * t * nh * hs, b * t * nkv * hs);
    let mut rng = Rng::new((nq + nk) as u64);
    let u = |rng: &mut Rng, n| rng.vec_uniform(n, -1.0, 1.0);
    let (q, k, v, dqkv) = (
        u(&mut rng, nq),
        u(&mut rng, nk),
        u(&mut rng, nk),
        u(&mut rng, nq + 2 * nk),
    );
    let prior = [u(&mut rng, nq), u(&mut rng, nk), u(&mut rng, nk)];

    // The reference in f64.
    let f = reference::convert::<f32, f64>;
    let mut want_qkv = vec![0.0; nq + 2 * nk];
    reference::qkv_pack::forward(&mut want_qkv, &f(&q), &f(&k), &f(&v), dims);
    let mut over = [vec![0.0; nq], vec![0.0; nk], vec![0.0; nk]];
    let [oq, ok, ov] = &mut over;
    reference::qkv_pack::backward(oq, ok, ov, &f(&dqkv), dims);
    let mut acc = prior.clone().map(|p| f(&p));
    let [aq, ak, av] = &mut acc;
    reference::qkv_pack::backward(aq, ak, av, &f(&dqkv), dims);

    let g_qkv = gpu.zeros("qkv", DType::F32, nq + 2 * nk)?;
    let (g_q, g_k, g_v) = (
        gpu.upload_f32("q", &q)?,
        gpu.upload_f32("k", &k)?,
        gpu.upload_f32("v", &v)?,
    );
    let g_dqkv = gpu.upload_f32("dqkv", &dqkv)?;
    // Gradients start as garbage when overwritten and as the prior values when added to.
    let upload = |names: [&str; 3]| -> Result<[View; 3]> {
        Ok([
            gpu.upload_f32(names[0], &prior[0])?,
            gpu.upload_f32(names[1], &prior[1])?,
            gpu.upload_f32(names[2], &prior[2])?,
        ])
    };
    let g_over = upload(["dq", "dk", "dv"])?;
    let g_acc = upload(["dq", "dk", "dv"])?;
    let mut ds = vec![forward(gpu, &g_qkv, (&g_q, &g_k, &g_v), dims)?];
    ds.extend(backward(gpu, grads(&g_over, &g_dqkv), dims, false)?);
    ds.extend(backward(gpu, grads(&g_acc, &g_dqkv), dims, true)?);
    gpu.run(&ds)?;

    let s = format!("B={b} T={t} NH={nh} NKV={nkv} HS={hs}");
    let mut reports = Vec::new();
    let mut add = |what: &str, got: &View, want: &[f64], tol: f64| -> Result<()> {
        let g = gpu.read_f32(got)?;
        reports.push(CheckReport::new(&s, what, &g, want, tol, tol));
        Ok(())
    };
    // Copies are exact; the added ones round once.
    add("forward qkv", &g_qkv, &want_qkv, 0.0)?;
    for (j, name) in ["dq", "dk", "dv"].iter().enumerate() {
        add(&format!("backward {name}"), &g_over[j], &over[j], 0.0)?;
        add(&format!("backward {name} +="), &g_acc[j], &acc[j], 1e-6)?;
    }
    Ok(reports)
}

/// The backward's tensors: the gradients `g` (dq, dk, dv) of `dqkv`.
fn grads<'a>(g: &'a [View; 3], dqkv: &'a View) -> BackwardTensors<'a> {
    BackwardTensors {
        dq: &g[0],
        dk: &g[1],
        dv: &g[2],
        dqkv,
    }
}

fn bench(gpu: &Gpu, shape: &[usize], opts: &BenchOptions) -> Result<Vec<BenchReport>> {
    let dims = dims_of(shape)?;
    let Dims { b, t, nh, nkv, hs } = dims;
    let (nq, nk) = (b * t * nh * hs, b * t * nkv * hs);
    let z = |name: &str, n| gpu.zeros(name, DType::F32, n);
    let (q, k, v, qkv) = (
        z("q", nq)?,
        z("k", nk)?,
        z("v", nk)?,
        z("qkv", nq + 2 * nk)?,
    );
    let tensors = BackwardTensors {
        dq: &q,
        dk: &k,
        dv: &v,
        dqkv: &qkv,
    };
    let s = format!("B={b} T={t} NH={nh} NKV={nkv} HS={hs}");
    Ok(vec![
        harness::bench_one(
            gpu,
            opts,
            "forward",
            &s,
            &[forward(gpu, &qkv, (&q, &k, &v), dims)?],
        )?,
        harness::bench_one(
            gpu,
            opts,
            "backward",
            &s,
            &backward(gpu, tensors, dims, false)?,
        )?,
    ])
}
