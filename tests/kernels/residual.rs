use shaderformer::gpu::{DType, test_gpu};
use shaderformer::kernels::residual;
use shaderformer::reference::{self, dot, numeric_grad};
use shaderformer::rng::Rng;

#[test]
fn gpu_matches_reference() {
    crate::check_family(&residual::FAMILY);
}

#[test]
fn reference_backward_matches_finite_differences() {
    let n = 7;
    let mut rng = Rng::new(1);
    let a: Vec<f64> = reference::convert(&rng.vec_uniform(n, -1.0, 1.0));
    let b: Vec<f64> = reference::convert(&rng.vec_uniform(n, -1.0, 1.0));
    let w: Vec<f64> = reference::convert(&rng.vec_uniform(n, -1.0, 1.0));
    let (mut da, mut db) = (vec![0.0; n], vec![0.0; n]);
    reference::residual::backward(&mut da, &mut db, &w);
    let loss = |a: &[f64], b: &[f64]| {
        let mut out = vec![0.0; n];
        reference::residual::forward(&mut out, a, b);
        dot(&out, &w)
    };
    let nda = numeric_grad(&a, 1e-6, |x| loss(x, &b));
    let ndb = numeric_grad(&b, 1e-6, |x| loss(&a, x));
    reference::compare("da", &da, &nda, 1e-8, 1e-6).assert();
    reference::compare("db", &db, &ndb, 1e-8, 1e-6).assert();
}

#[test]
fn mismatched_shapes_are_an_error() {
    let Some(gpu) = test_gpu() else { return };
    let a = gpu.zeros("a", DType::F32, 10).unwrap();
    let b = gpu.zeros("b", DType::F32, 11).unwrap();
    let out = gpu.zeros("out", DType::F32, 10).unwrap();
    let err = residual::forward(gpu, &out, &a, &b)
        .unwrap_err()
        .to_string();
    assert!(err.contains("tensor b") && err.contains("11"), "{err}");
}
