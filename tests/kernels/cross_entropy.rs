use shaderformer::gpu::{DType, test_gpu};
use shaderformer::kernels::cross_entropy::{self, Dims, IGNORE};
use shaderformer::reference::{self, numeric_grad};
use shaderformer::rng::Rng;

#[test]
fn gpu_matches_reference() {
    crate::check_family(&cross_entropy::FAMILY);
}

#[test]
fn reference_backward_matches_finite_differences() {
    let (n, v, vp) = (3, 5, 8);
    let dims = Dims { n, v, vp };
    let targets = [2, IGNORE, 4];
    let dloss = 0.7;
    let mut rng = Rng::new(4);
    let logits: Vec<f64> = reference::convert(&rng.vec_uniform(n * vp, -2.0, 2.0));
    let loss = |x: &[f64]| {
        let (mut losses, mut lse) = (vec![0.0; n], vec![0.0; n]);
        reference::cross_entropy::forward(&mut losses, &mut lse, x, &targets, dims);
        dloss * losses.iter().sum::<f64>()
    };
    let mut dlogits = vec![f64::NAN; n * vp];
    reference::cross_entropy::backward(&mut dlogits, &logits, &targets, dloss, dims);
    let numeric = numeric_grad(&logits, 1e-6, loss);
    reference::compare("dlogits", &dlogits, &numeric, 1e-8, 1e-6).assert();
}

#[test]
fn an_invalid_target_gives_nan_without_touching_other_rows() {
    let Some(gpu) = test_gpu() else { return };
    let (n, v, vp) = (3, 5, 64);
    let dims = Dims { n, v, vp };
    let mut rng = Rng::new(5);
    let logits = rng.vec_uniform(n * vp, -2.0, 2.0);
    let targets = [1, v as u32, 4];
    let g_logits = gpu.upload_f32("logits", &logits).unwrap();
    let g_targets = gpu.upload_u32("targets", &targets).unwrap();
    let losses = gpu.zeros("losses", DType::F32, n).unwrap();
    let lse = gpu.zeros("lse", DType::F32, n).unwrap();
    let d = [
        cross_entropy::forward(gpu, &losses, &lse, &g_logits, &g_targets, dims).unwrap(),
        cross_entropy::backward(gpu, &g_logits, &lse, &g_targets, dims, 1.0).unwrap(),
    ];
    gpu.run(&d).unwrap();
    let losses = gpu.read_f32(&losses).unwrap();
    let dlogits = gpu.read_f32(&g_logits).unwrap();
    assert!(losses[1].is_nan() && losses[0].is_finite() && losses[2].is_finite());
    assert!(dlogits[vp..vp + v].iter().all(|x| x.is_nan()));
    assert!(dlogits[vp + v..2 * vp].iter().all(|&x| x == 0.0));
    assert!(
        dlogits[..vp]
            .iter()
            .chain(&dlogits[2 * vp..])
            .all(|x| x.is_finite())
    );
}

#[test]
fn forward_and_backward_are_bit_reproducible() {
    let Some(gpu) = test_gpu() else { return };
    let (n, v, vp) = (5, 3001, 3008);
    let dims = Dims { n, v, vp };
    let mut rng = Rng::new(6);
    let logits = rng.vec_uniform(n * vp, -8.0, 8.0);
    let targets: Vec<u32> = (0..n).map(|_| rng.below(v as u64) as u32).collect();
    let g_targets = gpu.upload_u32("targets", &targets).unwrap();
    let run = || {
        let g_logits = gpu.upload_f32("logits", &logits).unwrap();
        let losses = gpu.zeros("losses", DType::F32, n).unwrap();
        let lse = gpu.zeros("lse", DType::F32, n).unwrap();
        let d = [
            cross_entropy::forward(gpu, &losses, &lse, &g_logits, &g_targets, dims).unwrap(),
            cross_entropy::backward(gpu, &g_logits, &lse, &g_targets, dims, 0.2).unwrap(),
        ];
        gpu.run(&d).unwrap();
        (
            gpu.read_u32(&losses).unwrap(),
            gpu.read_u32(&g_logits).unwrap(),
        )
    };
    assert_eq!(run(), run(), "two runs differ in their bits");
}

#[test]
fn mismatched_shapes_are_an_error() {
    let Some(gpu) = test_gpu() else { return };
    let (n, v, vp) = (4, 10, 64);
    let dims = Dims { n, v, vp };
    let z = |name: &str, dtype, len| gpu.zeros(name, dtype, len).unwrap();
    fn err<T>(r: shaderformer::Result<T>) -> String {
        r.map(|_| ()).unwrap_err().to_string()
    }
    let logits = z("logits", DType::F32, n * vp);
    let targets = z("targets", DType::U32, n);
    let losses = z("losses", DType::F32, n);
    let lse = z("lse", DType::F32, n);

    let unpadded = z("logits_unpadded", DType::F32, n * v);
    let e = err(cross_entropy::forward(
        gpu, &losses, &lse, &unpadded, &targets, dims,
    ));
    assert!(e.contains("tensor logits_unpadded"), "{e}");
    let f32_targets = z("targets_f32", DType::F32, n);
    let e = err(cross_entropy::forward(
        gpu,
        &losses,
        &lse,
        &logits,
        &f32_targets,
        dims,
    ));
    assert!(e.contains("tensor targets_f32"), "{e}");
    let short_lse = z("lse_short", DType::F32, n - 1);
    let e = err(cross_entropy::forward(
        gpu, &losses, &short_lse, &logits, &targets, dims,
    ));
    assert!(e.contains("tensor lse_short"), "{e}");
    let e = err(cross_entropy::backward(
        gpu, &logits, &short_lse, &targets, dims, 1.0,
    ));
    assert!(e.contains("tensor lse_short"), "{e}");
    let e = err(cross_entropy::backward(
        gpu,
        &logits,
        &lse,
        &targets,
        Dims { v: vp + 1, ..dims },
        1.0,
    ));
    assert!(e.contains("exceeds the padded row length"), "{e}");
}
