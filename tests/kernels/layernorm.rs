use shaderformer::gpu::{DType, test_gpu};
use shaderformer::kernels::layernorm;
use shaderformer::reference::{self, dot, numeric_grad};
use shaderformer::rng::Rng;

#[test]
fn gpu_matches_reference() {
    crate::check_family(&layernorm::FAMILY);
}

#[test]
fn reference_backward_matches_finite_differences() {
    for (n, c) in [(1, 1), (3, 5), (2, 8)] {
        let mut rng = Rng::new(n as u64 * 100 + c as u64);
        let f = reference::convert::<f32, f64>;
        let inp = f(&rng.vec_uniform(n * c, -2.0, 2.0));
        let weight = f(&rng.vec_uniform(c, -1.5, 1.5));
        let bias = f(&rng.vec_uniform(c, -1.0, 1.0));
        let w = f(&rng.vec_uniform(n * c, -1.0, 1.0));
        let loss = |inp: &[f64], weight: &[f64], bias: &[f64]| {
            let mut out = vec![0.0; n * c];
            let (mut mean, mut rstd) = (vec![0.0; n], vec![0.0; n]);
            reference::layernorm::forward(&mut out, &mut mean, &mut rstd, inp, weight, bias, n, c);
            dot(&out, &w)
        };
        let mut out = vec![0.0; n * c];
        let (mut mean, mut rstd) = (vec![0.0; n], vec![0.0; n]);
        reference::layernorm::forward(&mut out, &mut mean, &mut rstd, &inp, &weight, &bias, n, c);
        let mut dinp = vec![0.0; n * c];
        let (mut dweight, mut dbias) = (vec![0.0; c], vec![0.0; c]);
        reference::layernorm::backward(
            &mut dinp,
            &mut dweight,
            &mut dbias,
            &w,
            &inp,
            &weight,
            &mean,
            &rstd,
            n,
            c,
        );
        let ndinp = numeric_grad(&inp, 1e-6, |x| loss(x, &weight, &bias));
        let ndweight = numeric_grad(&weight, 1e-6, |x| loss(&inp, x, &bias));
        let ndbias = numeric_grad(&bias, 1e-6, |x| loss(&inp, &weight, x));
        reference::compare("dinp", &dinp, &ndinp, 1e-7, 1e-6).assert();
        reference::compare("dweight", &dweight, &ndweight, 1e-7, 1e-6).assert();
        reference::compare("dbias", &dbias, &ndbias, 1e-7, 1e-6).assert();
    }
}

#[test]
fn backward_is_bit_identical_run_to_run() {
    let Some(gpu) = test_gpu() else { return };
    let (n, c) = (1037, 45);
    let mut rng = Rng::new(9);
    let inp = gpu
        .upload_f32("inp", &rng.vec_uniform(n * c, -1.0, 1.0))
        .unwrap();
    let weight = gpu
        .upload_f32("weight", &rng.vec_uniform(c, -1.0, 1.0))
        .unwrap();
    let bias = gpu
        .upload_f32("bias", &rng.vec_uniform(c, -1.0, 1.0))
        .unwrap();
    let dout = gpu
        .upload_f32("dout", &rng.vec_uniform(n * c, -1.0, 1.0))
        .unwrap();
    let out = gpu.zeros("out", DType::F32, n * c).unwrap();
    let mean = gpu.zeros("mean", DType::F32, n).unwrap();
    let rstd = gpu.zeros("rstd", DType::F32, n).unwrap();
    let run = || {
        let dinp = gpu.zeros("dinp", DType::F32, n * c).unwrap();
        let dweight = gpu.zeros("dweight", DType::F32, c).unwrap();
        let dbias = gpu.zeros("dbias", DType::F32, c).unwrap();
        let mut d =
            vec![layernorm::forward(gpu, &out, &mean, &rstd, &inp, &weight, &bias, n, c).unwrap()];
        d.extend(
            layernorm::backward(
                gpu, &dinp, &dweight, &dbias, &dout, &inp, &weight, &mean, &rstd, n, c, false,
            )
            .unwrap(),
        );
        gpu.run(&d).unwrap();
        [&out, &mean, &rstd, &dinp, &dweight, &dbias].map(|v| gpu.read_u32(v).unwrap())
    };
    assert!(run() == run(), "two runs differ");
}

/// With C = 1 a forward workgroup covers 256 rows, so this many rows need a folded grid; every
/// row's mean must be its own input.
#[test]
fn a_grid_of_more_rows_than_one_dimension_allows_folds() {
    let Some(gpu) = test_gpu() else { return };
    let c = 1;
    let n = gpu.limits.max_compute_workgroups_per_dimension as usize * 256 + 1;
    let inp: Vec<f32> = (0..n).map(|i| i as f32).collect();
    let g_inp = gpu.upload_f32("inp", &inp).unwrap();
    let g_weight = gpu.upload_f32("weight", &[2.0]).unwrap();
    let g_bias = gpu.upload_f32("bias", &[0.5]).unwrap();
    let g_out = gpu.zeros("out", DType::F32, n * c).unwrap();
    let g_mean = gpu.zeros("mean", DType::F32, n).unwrap();
    let g_rstd = gpu.zeros("rstd", DType::F32, n).unwrap();
    let d = layernorm::forward(
        gpu, &g_out, &g_mean, &g_rstd, &g_inp, &g_weight, &g_bias, n, c,
    )
    .unwrap();
    assert!(
        d.workgroups[1] > 1,
        "expected a folded grid, got {:?}",
        d.workgroups
    );
    gpu.run(&[d]).unwrap();
    reference::compare("mean", &gpu.read_f32(&g_mean).unwrap(), &inp, 0.0, 0.0).assert();
    let bias = vec![0.5f32; n];
    reference::compare("out", &gpu.read_f32(&g_out).unwrap(), &bias, 0.0, 0.0).assert();
}

#[test]
fn mismatched_shapes_are_an_error() {
    let Some(gpu) = test_gpu() else { return };
    let (n, c) = (4, 6);
    let t = |name: &str, len: usize| gpu.zeros(name, DType::F32, len).unwrap();
    let (inp, out, w, b) = (
        t("inp", n * c),
        t("out", n * c),
        t("weight", c),
        t("bias", c),
    );
    let (mean, rstd) = (t("mean", n), t("rstd", n));
    let bad_mean = t("mean", n + 1);
    let err = layernorm::forward(gpu, &out, &bad_mean, &rstd, &inp, &w, &b, n, c)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("tensor mean") && err.contains(&format!("{}", n + 1)),
        "{err}"
    );
    let bad_weight = t("weight", c - 1);
    let err = layernorm::forward(gpu, &out, &mean, &rstd, &inp, &bad_weight, &b, n, c)
        .unwrap_err()
        .to_string();
    assert!(err.contains("tensor weight"), "{err}");
    let (dinp, dw, db) = (t("dinp", n * c), t("dweight", c), t("dbias", c));
    let bad_dout = t("dout", n * c + 1);
    let err = layernorm::backward(
        gpu, &dinp, &dw, &db, &bad_dout, &inp, &w, &mean, &rstd, n, c, true,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("tensor dout"), "{err}");
    let err = layernorm::forward(gpu, &out, &mean, &rstd, &inp, &w, &b, n, 0)
        .unwrap_err()
        .to_string();
    assert!(err.contains("C = 0"), "{err}");
}
