//! `shaderformer kernels check|bench adamw`: adamw.wgsl against the CPU reference on awkward
//! shapes, and its variants timed.

use super::*;
use crate::kernels::harness::{self, BenchReport, CheckReport, Family};
use crate::reference;
use crate::rng::Rng;

pub const FAMILY: Family = Family {
    name: "adamw",
    about: "AdamW step in place (PyTorch semantics), clipping by a GPU global norm",
    shape_help: "N",
    default_shapes: &[&[1], &[3], &[45], &[127], &[129], &[1000], &[65537]],
    bench_shape: &[124_000_000 / 4],
    check,
    bench,
};

/// One check scenario: three steps with per-step gradient scales, so that clipping switches
/// between active and inactive.
struct Scenario {
    what: &'static str,
    hyper: Hyper,
    decay: bool,
    /// grad_clip as a multiple of the first step's gradient norm (0 = no clipping).
    clip_ratio: f32,
}

const SCENARIOS: [Scenario; 3] = [
    Scenario {
        what: "decay, clip at t=2 only",
        hyper: Hyper {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.1,
            grad_clip: 0.0,
        },
        decay: true,
        clip_ratio: 1.5,
    },
    Scenario {
        what: "no decay, clip always",
        hyper: Hyper {
            beta1: 0.8,
            beta2: 0.95,
            eps: 1e-6,
            weight_decay: 0.1,
            grad_clip: 0.0,
        },
        decay: false,
        clip_ratio: 0.25,
    },
    Scenario {
        what: "decay, grad_clip 0",
        hyper: Hyper {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
            grad_clip: 0.0,
        },
        decay: true,
        clip_ratio: 0.0,
    },
];

/// Gradient scale of steps t = 1, 2, 3 and the learning rates given through the step uniform.
const GRAD_SCALES: [f32; 3] = [1.0, 3.0, 0.3];
const LRS: [f32; 3] = [1e-2, 5e-3, 2e-3];

fn norm_of(g: &[f32]) -> f32 {
    let mut out = [0.0f64];
    reference::reduce::global_norm(&mut out, &[&reference::convert::<f32, f64>(g)]);
    out[0] as f32
}

fn check(gpu: &Gpu, shape: &[usize]) -> Result<Vec<CheckReport>> {
    let [n] = harness::dims::<1>("adamw", shape)?;
    let mut reports = Vec::new();
    for (k, sc) in SCENARIOS.iter().enumerate() {
        reports.extend(check_scenario(gpu, n, k, sc)?);
    }
    Ok(reports)
}

/// The reference's step t with learning rate `lr` under `hyper`, the gradient's norm `g_norm`
/// (weight decay only when `decay`).
fn reference_update(
    hyper: &Hyper,
    decay: bool,
    g_norm: f32,
    lr: f32,
    t: u32,
) -> reference::adamw::Update<f64> {
    let wd = if decay {
        widen(hyper.weight_decay)
    } else {
        0.0
    };
    reference::adamw::Update {
        clip: reference::adamw::clip_scale(g_norm as f64, widen(hyper.grad_clip)),
        lr: widen(lr),
        beta1: widen(hyper.beta1),
        beta2: widen(hyper.beta2),
        eps: widen(hyper.eps),
        weight_decay: wd,
        t,
    }
}

/// Three steps of one scenario (the `k`-th) on N parameters against the reference: param after
/// steps 1 and 3, m and v after step 3. The dispatch is built once and reads each step's learning
/// rate and t from the per-step uniform, as in training.
fn check_scenario(gpu: &Gpu, n: usize, k: usize, sc: &Scenario) -> Result<Vec<CheckReport>> {
    let s = format!("N={n}");
    let mut reports = Vec::new();
    let mut rng = Rng::new(1000 * n as u64 + k as u64);
    let p0 = rng.vec_uniform(n, -1.0, 1.0);
    let grads: Vec<Vec<f32>> = GRAD_SCALES
        .iter()
        .map(|&sc| rng.vec_uniform(n, -sc, sc))
        .collect();
    let mut hyper = sc.hyper;
    hyper.grad_clip = sc.clip_ratio * norm_of(&grads[0]);

    let param = gpu.upload_f32("param", &p0)?;
    let grad = gpu.zeros("grad", DType::F32, n)?;
    let m = gpu.zeros("m", DType::F32, n)?;
    let v = gpu.zeros("v", DType::F32, n)?;
    let norm = gpu.zeros("norm", DType::F32, 1)?;
    let tensors = Tensors {
        param: &param,
        grad: &grad,
        m: &m,
        v: &v,
    };
    let uniform = per_step::uniform(gpu, "adamw.step", &per_step::Step::default())?;
    let d = step_at(gpu, tensors, &norm, n, &hyper, sc.decay, &uniform)?;

    let mut rp: Vec<f64> = reference::convert(&p0);
    let (mut rm, mut rv) = (vec![0.0f64; n], vec![0.0f64; n]);
    for t in 1..=3u32 {
        let g = &grads[t as usize - 1];
        let g_norm = norm_of(g);
        let lr = LRS[t as usize - 1];
        gpu.write(&grad, g)?;
        gpu.write(&norm, &[g_norm])?;
        let at = per_step::Step {
            t,
            lr,
            ..Default::default()
        };
        per_step::write(gpu, &uniform, &at)?;
        gpu.run(std::slice::from_ref(&d))?;

        let update = reference_update(&hyper, sc.decay, g_norm, lr, t);
        let g = reference::convert::<f32, f64>(g);
        reference::adamw::step(&mut rp, &mut rm, &mut rv, &g, update);
        if t == 1 || t == 3 {
            let what = format!("{}: t={t} param", sc.what);
            reports.push(CheckReport::new(
                &s,
                &what,
                &gpu.read_f32(&param)?,
                &rp,
                1e-7,
                1e-6,
            ));
        }
    }
    let what = format!("{}: t=3 m", sc.what);
    reports.push(CheckReport::new(
        &s,
        &what,
        &gpu.read_f32(&m)?,
        &rm,
        1e-6,
        1e-5,
    ));
    let what = format!("{}: t=3 v", sc.what);
    reports.push(CheckReport::new(
        &s,
        &what,
        &gpu.read_f32(&v)?,
        &rv,
        1e-10,
        1e-5,
    ));
    Ok(reports)
}

fn bench(gpu: &Gpu, shape: &[usize], opts: &harness::BenchOptions) -> Result<Vec<BenchReport>> {
    let [n] = harness::dims::<1>("adamw", shape)?;
    let param = gpu.zeros("param", DType::F32, n)?;
    let grad = gpu.zeros("grad", DType::F32, n)?;
    let m = gpu.zeros("m", DType::F32, n)?;
    let v = gpu.zeros("v", DType::F32, n)?;
    let norm = gpu.upload_f32("norm", &[2.0])?;
    let hyper = Hyper {
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.1,
        grad_clip: 1.0,
    };
    let tensors = Tensors {
        param: &param,
        grad: &grad,
        m: &m,
        v: &v,
    };
    let d = step(
        gpu,
        tensors,
        &norm,
        n,
        &hyper,
        true,
        Step { lr: 6e-4, t: 1 },
    )?;
    let s = format!("N={n}");
    Ok(vec![harness::bench_one(gpu, opts, "step", &s, &[d])?])
}
