//! AdamW. An optimizer step is not the gradient of anything, so finite differences do not apply:
//! the reference is checked instead against a trajectory derived by hand (constant gradient) and
//! against an independent textbook formulation (bias-corrected moments) over several steps.

use shaderformer::gpu::{DType, test_gpu};
use shaderformer::kernels::adamw::{self, Hyper, Step, Tensors};
use shaderformer::kernels::step;
use shaderformer::reference;
use shaderformer::reference::adamw::{Update, clip_scale};
use shaderformer::rng::Rng;

#[test]
fn gpu_matches_reference() {
    crate::check_family(&adamw::FAMILY);
}

/// With a constant gradient g from m = v = 0, m_t = (1 - β1^t) g and v_t = (1 - β2^t) g², so the
/// bias-corrected step is exactly lr · g / (|g| + eps) at every t:
/// p_t = p_{t-1} (1 - lr · wd) - lr · g / (|g| + eps).
#[test]
fn reference_follows_the_constant_gradient_trajectory() {
    let (lr, wd, eps) = (0.1, 0.1, 1e-8);
    let g = [0.5, -2.0, 1e-3];
    let mut p = vec![1.0f64, -0.5, 0.25];
    let (mut m, mut v) = (vec![0.0; 3], vec![0.0; 3]);
    let mut want = p.clone();
    for t in 1..=3 {
        let update = Update {
            clip: 1.0,
            lr,
            beta1: 0.9,
            beta2: 0.999,
            eps,
            weight_decay: wd,
            t,
        };
        reference::adamw::step(&mut p, &mut m, &mut v, &g, update);
        for i in 0..3 {
            want[i] = want[i] * (1.0 - lr * wd) - lr * g[i] / (g[i].abs() + eps);
        }
        reference::compare("param", &p, &want, 1e-14, 1e-12).assert();
        if t == 1 {
            // by hand: 1 · 0.99 - 0.1 · 0.5 / (0.5 + 1e-8)
            assert!((p[0] - 0.890_000_002).abs() < 1e-12, "{}", p[0]);
        }
    }
    // three steps by hand: ((1 · 0.99 - 0.1) · 0.99 - 0.1) · 0.99 - 0.1, up to eps
    assert!((p[0] - 0.673_289_006).abs() < 1e-8, "{}", p[0]);
}

/// Textbook Adam with decoupled weight decay, written with bias-corrected moments:
/// m̂ = m / (1 - β1^t), v̂ = v / (1 - β2^t), p ← p (1 - lr wd) - lr m̂ / (sqrt(v̂) + eps).
#[test]
fn reference_matches_the_textbook_formulation() {
    let n = 5;
    let mut rng = Rng::new(5);
    let (lr, b1, b2, eps, wd) = (3e-3, 0.9, 0.95, 1e-8, 0.1);
    let mut p: Vec<f64> = reference::convert(&rng.vec_uniform(n, -1.0, 1.0));
    let (mut m, mut v) = (vec![0.0; n], vec![0.0; n]);
    let (mut tp, mut tm, mut tv) = (p.clone(), m.clone(), v.clone());
    for t in 1..=4 {
        let g: Vec<f64> = reference::convert(&rng.vec_uniform(n, -2.0, 2.0));
        let norm = g.iter().map(|x| x * x).sum::<f64>().sqrt();
        let clip = clip_scale(norm, 1.0);
        let update = Update {
            clip,
            lr,
            beta1: b1,
            beta2: b2,
            eps,
            weight_decay: wd,
            t,
        };
        reference::adamw::step(&mut p, &mut m, &mut v, &g, update);
        for i in 0..n {
            let gi = g[i] * (1.0f64).min(1.0 / (norm + 1e-6));
            tm[i] = b1 * tm[i] + (1.0 - b1) * gi;
            tv[i] = b2 * tv[i] + (1.0 - b2) * gi * gi;
            let m_hat = tm[i] / (1.0 - b1.powi(t as i32));
            let v_hat = tv[i] / (1.0 - b2.powi(t as i32));
            tp[i] = tp[i] * (1.0 - lr * wd) - lr * m_hat / (v_hat.sqrt() + eps);
        }
        reference::compare("param", &p, &tp, 1e-15, 1e-12).assert();
        reference::compare("m", &m, &tm, 1e-15, 1e-12).assert();
        reference::compare("v", &v, &tv, 1e-15, 1e-12).assert();
    }
}

#[test]
fn clip_scale_follows_clip_grad_norm() {
    assert_eq!(clip_scale(2.0f64, 1.0), 1.0 / (2.0 + 1e-6));
    assert_eq!(clip_scale(0.5f64, 1.0), 1.0);
    assert_eq!(clip_scale(1e9f64, 0.0), 1.0);
}

#[test]
fn widen_recovers_the_decimal_hyperparameters() {
    assert_eq!(adamw::widen(0.9), 0.9);
    assert_eq!(adamw::widen(0.999), 0.999);
    assert_eq!(adamw::widen(1e-8), 1e-8);
    assert_eq!(adamw::widen(6e-4), 6e-4);
}

/// Late steps, from a warm optimizer state: the bias corrections at large t (where 1 - β^t is
/// no longer small), one dispatch jumping straight to any t through the per-step uniform.
#[test]
fn late_steps_match_reference() {
    let Some(gpu) = test_gpu() else { return };
    let n = 1031;
    let mut rng = Rng::new(9);
    let p0 = rng.vec_uniform(n, -1.0, 1.0);
    let m0 = rng.vec_uniform(n, -0.1, 0.1);
    let v0 = rng.vec_uniform(n, 0.0, 0.01);
    let g = rng.vec_uniform(n, -0.2, 0.2);
    let hyper = Hyper {
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.1,
        grad_clip: 1.0,
    };
    let param = gpu.upload_f32("param", &p0).unwrap();
    let grad = gpu.upload_f32("grad", &g).unwrap();
    let m = gpu.zeros("m", DType::F32, n).unwrap();
    let v = gpu.zeros("v", DType::F32, n).unwrap();
    let norm = gpu.upload_f32("norm", &[3.0]).unwrap();
    let tensors = Tensors {
        param: &param,
        grad: &grad,
        m: &m,
        v: &v,
    };
    let uniform = step::uniform(gpu, "step", &step::Step::default()).unwrap();
    let d = adamw::step_at(gpu, tensors, &norm, n, &hyper, true, &uniform).unwrap();
    for t in [7u32, 700, 5000, 100_000] {
        let lr = 6e-4;
        gpu.write(&param, &p0).unwrap();
        gpu.write(&m, &m0).unwrap();
        gpu.write(&v, &v0).unwrap();
        let at = step::Step {
            t,
            lr,
            ..Default::default()
        };
        step::write(gpu, &uniform, &at).unwrap();
        gpu.run(std::slice::from_ref(&d)).unwrap();
        let mut rp: Vec<f64> = reference::convert(&p0);
        let mut rm: Vec<f64> = reference::convert(&m0);
        let mut rv: Vec<f64> = reference::convert(&v0);
        let clip = clip_scale(3.0, 1.0);
        let w = adamw::widen;
        reference::adamw::step(
            &mut rp,
            &mut rm,
            &mut rv,
            &reference::convert::<f32, f64>(&g),
            Update {
                clip,
                lr: w(lr),
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay: 0.1,
                t,
            },
        );
        let what = format!("t={t} param");
        reference::compare(&what, &gpu.read_f32(&param).unwrap(), &rp, 1e-7, 1e-6).assert();
        reference::compare("m", &gpu.read_f32(&m).unwrap(), &rm, 1e-8, 1e-5).assert();
        reference::compare("v", &gpu.read_f32(&v).unwrap(), &rv, 1e-10, 1e-5).assert();
    }
}

#[test]
fn bad_inputs_are_errors_naming_the_tensor() {
    let Some(gpu) = test_gpu() else { return };
    let n = 10;
    let z = |name: &str, len| gpu.zeros(name, DType::F32, len).unwrap();
    let (p, g, m, v, norm) = (z("p", n), z("g", n), z("m", n), z("v", n), z("norm", 1));
    let (m11, norm2) = (z("m11", 11), z("norm2", 2));
    let h = Hyper {
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.1,
        grad_clip: 1.0,
    };
    let tensors = Tensors {
        param: &p,
        grad: &g,
        m: &m,
        v: &v,
    };
    let at = Step { lr: 1e-3, t: 1 };
    let e = adamw::step(gpu, Tensors { m: &m11, ..tensors }, &norm, n, &h, true, at)
        .unwrap_err()
        .to_string();
    assert!(e.contains("tensor m11") && e.contains("11"), "{e}");
    let e = adamw::step(gpu, tensors, &norm2, n, &h, true, at)
        .unwrap_err()
        .to_string();
    assert!(e.contains("tensor norm2"), "{e}");
    let e = adamw::step(gpu, tensors, &norm, 9, &h, true, at)
        .unwrap_err()
        .to_string();
    assert!(e.contains("tensor p"), "{e}");
    let bad = Hyper { beta1: 1.0, ..h };
    let e = adamw::step(gpu, tensors, &norm, n, &bad, true, at)
        .unwrap_err()
        .to_string();
    assert!(e.contains("beta1"), "{e}");
    let e = adamw::step(gpu, tensors, &norm, n, &h, true, Step { t: 0, ..at })
        .unwrap_err()
        .to_string();
    assert!(e.contains("t counts from 1"), "{e}");
    let nan_lr = Step { lr: f32::NAN, ..at };
    let e = adamw::step(gpu, tensors, &norm, n, &h, true, nan_lr)
        .unwrap_err()
        .to_string();
    assert!(e.contains("lr"), "{e}");
}
