use shaderformer::gpu::{DType, test_gpu};
use shaderformer::kernels::rmsnorm::{self, BackwardTensors, Dims, ForwardTensors};
use shaderformer::reference::{self, dot, numeric_grad};
use shaderformer::rng::Rng;

#[test]
fn gpu_matches_reference() {
    crate::check_family(&rmsnorm::FAMILY);
}

#[test]
fn reference_backward_matches_finite_differences() {
    for (n, c) in [(1, 1), (3, 5), (2, 8)] {
        let dims = Dims { n, c };
        let mut rng = Rng::new(n as u64 * 100 + c as u64);
        let f = reference::convert::<f32, f64>;
        let inp = f(&rng.vec_uniform(n * c, -2.0, 2.0));
        let weight = f(&rng.vec_uniform(c, -1.5, 1.5));
        let w = f(&rng.vec_uniform(n * c, -1.0, 1.0));
        // A large eps, so that a backward that forgot it would fail.
        let eps = 0.25;
        let forward = |inp: &[f64], weight: &[f64]| {
            let (mut out, mut rstd) = (vec![0.0; n * c], vec![0.0; n]);
            reference::rmsnorm::forward(&mut out, &mut rstd, inp, weight, dims, eps);
            (out, rstd)
        };
        let (_, rstd) = forward(&inp, &weight);
        let (mut dinp, mut dweight) = (vec![0.0; n * c], vec![0.0; c]);
        reference::rmsnorm::backward(&mut dinp, &mut dweight, &w, &inp, &weight, &rstd, dims);
        let ndinp = numeric_grad(&inp, 1e-6, |x| dot(&forward(x, &weight).0, &w));
        let ndweight = numeric_grad(&weight, 1e-6, |x| dot(&forward(&inp, x).0, &w));
        reference::compare("dinp", &dinp, &ndinp, 1e-7, 1e-6).assert();
        reference::compare("dweight", &dweight, &ndweight, 1e-7, 1e-6).assert();
    }
}

#[test]
fn reference_matches_llama_rms_norm_by_hand() {
    // One row [3, 4] with eps 0: mean square 12.5, rstd 1 / sqrt(12.5); weight [2, -1].
    let (mut out, mut rstd) = (vec![0.0; 2], vec![0.0; 1]);
    let dims = Dims { n: 1, c: 2 };
    reference::rmsnorm::forward(&mut out, &mut rstd, &[3.0, 4.0], &[2.0, -1.0], dims, 0.0);
    let s = 1.0 / 12.5f64.sqrt();
    reference::compare("out", &out, &[6.0 * s, -4.0 * s], 1e-15, 0.0).assert();
    reference::compare("rstd", &rstd, &[s], 1e-15, 0.0).assert();
}

#[test]
fn the_fused_residual_forward_is_the_add_then_the_norm() {
    let dims = Dims { n: 3, c: 4 };
    let mut rng = Rng::new(5);
    let f = reference::convert::<f32, f64>;
    let (a, b, weight) = (
        f(&rng.vec_uniform(12, -2.0, 2.0)),
        f(&rng.vec_uniform(12, -2.0, 2.0)),
        f(&rng.vec_uniform(4, -1.0, 1.0)),
    );
    let (mut resid, mut out, mut rstd) = (vec![0.0; 12], vec![0.0; 12], vec![0.0; 3]);
    reference::rmsnorm::forward_residual(
        &mut resid, &mut out, &mut rstd, &a, &b, &weight, dims, 1e-5,
    );
    let sum: Vec<f64> = a.iter().zip(&b).map(|(x, y)| x + y).collect();
    let (mut out2, mut rstd2) = (vec![0.0; 12], vec![0.0; 3]);
    reference::rmsnorm::forward(&mut out2, &mut rstd2, &sum, &weight, dims, 1e-5);
    assert_eq!((resid, out, rstd), (sum, out2, rstd2));
}

/// Forward and backward (dinp and the fixed-order dweight): two runs give the same bits.
#[test]
fn is_bit_identical_run_to_run() {
    let Some(gpu) = test_gpu() else { return };
    let (n, c) = (1037, 45);
    let dims = Dims { n, c };
    let mut rng = Rng::new(9);
    let mut up = |name: &str, len| gpu.upload_f32(name, &rng.vec_uniform(len, -1.0, 1.0));
    let (inp, weight, dout) = (
        up("inp", n * c).unwrap(),
        up("weight", c).unwrap(),
        up("dout", n * c).unwrap(),
    );
    let run = || {
        let zeros = |name: &str, len| gpu.zeros(name, DType::F32, len).unwrap();
        let (out, rstd) = (zeros("out", n * c), zeros("rstd", n));
        let (dinp, dweight) = (zeros("dinp", n * c), zeros("dweight", c));
        let fwd = ForwardTensors {
            out: &out,
            rstd: &rstd,
            inp: &inp,
            weight: &weight,
        };
        let bwd = BackwardTensors {
            dinp: &dinp,
            dweight: &dweight,
            dout: &dout,
            inp: &inp,
            weight: &weight,
            rstd: &rstd,
        };
        let mut d = vec![rmsnorm::forward(gpu, fwd, dims, 1e-5).unwrap()];
        d.extend(rmsnorm::backward(gpu, bwd, dims, false).unwrap());
        gpu.run(&d).unwrap();
        [out, rstd, dinp, dweight].map(|v| gpu.read_f32(&v).unwrap())
    };
    let (first, second) = (run(), run());
    for (x, y) in first.iter().zip(&second) {
        let same = x.iter().zip(y).all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(same, "two runs differ");
    }
}

#[test]
fn mismatched_shapes_and_a_bad_eps_are_errors() {
    let Some(gpu) = test_gpu() else { return };
    let dims = Dims { n: 4, c: 6 };
    let zeros = |name: &str, len| gpu.zeros(name, DType::F32, len).unwrap();
    let (out, rstd, inp, weight) = (
        zeros("out", 24),
        zeros("rstd", 4),
        zeros("inp", 24),
        zeros("weight", 5),
    );
    let t = ForwardTensors {
        out: &out,
        rstd: &rstd,
        inp: &inp,
        weight: &weight,
    };
    let err = rmsnorm::forward(gpu, t, dims, 1e-5)
        .unwrap_err()
        .to_string();
    assert!(err.contains("tensor weight") && err.contains('5'), "{err}");
    let weight = zeros("weight", 6);
    let t = ForwardTensors {
        weight: &weight,
        ..t
    };
    let err = rmsnorm::forward(gpu, t, dims, 0.0).unwrap_err().to_string();
    assert!(err.contains("eps = 0"), "{err}");
    let err = rmsnorm::forward(gpu, t, Dims { n: 0, c: 6 }, 1e-5)
        .unwrap_err()
        .to_string();
    assert!(err.contains("N = 0"), "{err}");
}
