use shaderformer::gpu::{DType, test_gpu};
use shaderformer::kernels::gelu;
use shaderformer::reference::{self, dot, numeric_grad};
use shaderformer::rng::Rng;

#[test]
fn gpu_matches_reference() {
    crate::check_family(&gelu::FAMILY);
}

#[test]
fn reference_backward_matches_finite_differences() {
    let n = 41;
    let mut rng = Rng::new(2);
    // Across the bend and both tails.
    let inp: Vec<f64> = (0..n)
        .map(|i| -6.0 + 0.3 * i as f64 + 0.01 * rng.uniform())
        .collect();
    let w: Vec<f64> = reference::convert(&rng.vec_uniform(n, -1.0, 1.0));
    let mut dinp = vec![0.0; n];
    reference::gelu::backward(&mut dinp, &inp, &w);
    let ndinp = numeric_grad(&inp, 1e-6, |x| {
        let mut out = vec![0.0; n];
        reference::gelu::forward(&mut out, x);
        dot(&out, &w)
    });
    reference::compare("dinp", &dinp, &ndinp, 1e-8, 1e-6).assert();
}

#[test]
fn a_grid_of_more_workgroups_than_one_dimension_allows_folds() {
    let Some(gpu) = test_gpu() else { return };
    let n = gpu.limits.max_compute_workgroups_per_dimension as usize * 256 + 1;
    let inp = Rng::new(3).vec_normal(n, 2.0);
    let g_inp = gpu.upload_f32("inp", &inp).unwrap();
    let g_out = gpu.zeros("out", DType::F32, n).unwrap();
    let d = gelu::forward(gpu, &g_out, &g_inp, n).unwrap();
    assert!(
        d.workgroups[1] > 1,
        "expected a folded grid, got {:?}",
        d.workgroups
    );
    gpu.run(&[d]).unwrap();
    let mut out = vec![0.0; n];
    reference::gelu::forward(&mut out, &inp);
    reference::compare("out", &gpu.read_f32(&g_out).unwrap(), &out, 1e-6, 1e-5).assert();
}

#[test]
fn mismatched_shapes_are_an_error() {
    let Some(gpu) = test_gpu() else { return };
    let inp = gpu.zeros("inp", DType::F32, 10).unwrap();
    let out = gpu.zeros("out", DType::F32, 11).unwrap();
    let err = gelu::forward(gpu, &out, &inp, 10).unwrap_err().to_string();
    assert!(err.contains("tensor out") && err.contains("11"), "{err}");
    let dinp = gpu.zeros("dinp", DType::F32, 10).unwrap();
    let dout = gpu.zeros("dout", DType::F32, 9).unwrap();
    let err = gelu::backward(gpu, &dinp, &inp, &dout, 10, false)
        .unwrap_err()
        .to_string();
    assert!(err.contains("tensor dout") && err.contains('9'), "{err}");
    let err = gelu::forward(gpu, &dinp, &inp, 0).unwrap_err().to_string();
    assert!(err.contains("N = 0"), "{err}");
}
