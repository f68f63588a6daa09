use shaderformer::gpu::{DType, test_gpu};
use shaderformer::kernels::swiglu::{self, BackwardTensors};
use shaderformer::reference::{self, dot, numeric_grad};
use shaderformer::rng::Rng;

#[test]
fn gpu_matches_reference() {
    crate::check_family(&swiglu::FAMILY);
}

#[test]
fn reference_backward_matches_finite_differences() {
    let n = 41;
    let mut rng = Rng::new(2);
    // Across the bend and into both tails.
    let gate: Vec<f64> = (0..n)
        .map(|i| -8.0 + 0.4 * i as f64 + 0.01 * rng.uniform())
        .collect();
    let up: Vec<f64> = reference::convert(&rng.vec_uniform(n, -2.0, 2.0));
    let w: Vec<f64> = reference::convert(&rng.vec_uniform(n, -1.0, 1.0));
    let loss = |gate: &[f64], up: &[f64]| {
        let mut out = vec![0.0; n];
        reference::swiglu::forward(&mut out, gate, up);
        dot(&out, &w)
    };
    let (mut dgate, mut dup) = (vec![0.0; n], vec![0.0; n]);
    reference::swiglu::backward(&mut dgate, &mut dup, &gate, &up, &w);
    let ndgate = numeric_grad(&gate, 1e-6, |x| loss(x, &up));
    let ndup = numeric_grad(&up, 1e-6, |x| loss(&gate, x));
    reference::compare("dgate", &dgate, &ndgate, 1e-8, 1e-6).assert();
    reference::compare("dup", &dup, &ndup, 1e-8, 1e-6).assert();
}

#[test]
fn reference_sigmoid_is_torch_silu_far_out() {
    // silu(x) = x · sigmoid(x): 0 far left (no e^1000 overflow), x far right.
    let mut out = vec![0.0f32; 4];
    reference::swiglu::forward(&mut out, &[-1000.0, 1000.0, 0.0, 1.0], &[1.0; 4]);
    assert_eq!(&out[..3], &[0.0, 1000.0, 0.0]);
    assert!((out[3] - 0.731_058_6).abs() < 1e-7, "{}", out[3]);
}

#[test]
fn mismatched_shapes_are_an_error() {
    let Some(gpu) = test_gpu() else { return };
    let zeros = |name: &str, n| gpu.zeros(name, DType::F32, n).unwrap();
    let (gate, up, out) = (zeros("gate", 10), zeros("up", 11), zeros("out", 10));
    let err = swiglu::forward(gpu, &out, &gate, &up, 10)
        .unwrap_err()
        .to_string();
    assert!(err.contains("tensor up") && err.contains("11"), "{err}");
    let (dgate, dup, dout) = (zeros("dgate", 10), zeros("dup", 9), zeros("dout", 10));
    let t = BackwardTensors {
        dgate: &dgate,
        dup: &dup,
        gate: &gate,
        up: &out,
        dout: &dout,
    };
    let err = swiglu::backward(gpu, t, 10, false).unwrap_err().to_string();
    assert!(err.contains("tensor dup") && err.contains('9'), "{err}");
    let err = swiglu::forward(gpu, &out, &gate, &out, 0)
        .unwrap_err()
        .to_string();
    assert!(err.contains("N = 0"), "{err}");
}
