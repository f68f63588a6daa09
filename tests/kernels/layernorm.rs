use shaderformer::gpu::{DType, View, test_gpu};
use shaderformer::kernels::layernorm::{self, BackwardTensors, Dims, ForwardTensors, Variant};
use shaderformer::reference::{self, dot, numeric_grad};
use shaderformer::rng::Rng;

#[test]
fn gpu_matches_reference() {
    crate::check_family(&layernorm::FAMILY);
}

#[test]
fn reference_backward_matches_finite_differences() {
    for (n, c) in [(1, 1), (3, 5), (2, 8)] {
        let dims = Dims { n, c };
        let mut rng = Rng::new(n as u64 * 100 + c as u64);
        let f = reference::convert::<f32, f64>;
        let inp = f(&rng.vec_uniform(n * c, -2.0, 2.0));
        let weight = f(&rng.vec_uniform(c, -1.5, 1.5));
        let bias = f(&rng.vec_uniform(c, -1.0, 1.0));
        let w = f(&rng.vec_uniform(n * c, -1.0, 1.0));
        let loss = |inp: &[f64], weight: &[f64], bias: &[f64]| {
            let mut out = vec![0.0; n * c];
            let (mut mean, mut rstd) = (vec![0.0; n], vec![0.0; n]);
            reference::layernorm::forward(&mut out, &mut mean, &mut rstd, inp, weight, bias, dims);
            dot(&out, &w)
        };
        let mut out = vec![0.0; n * c];
        let (mut mean, mut rstd) = (vec![0.0; n], vec![0.0; n]);
        reference::layernorm::forward(&mut out, &mut mean, &mut rstd, &inp, &weight, &bias, dims);
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
            dims,
        );
        let ndinp = numeric_grad(&inp, 1e-6, |x| loss(x, &weight, &bias));
        let ndweight = numeric_grad(&weight, 1e-6, |x| loss(&inp, x, &bias));
        let ndbias = numeric_grad(&bias, 1e-6, |x| loss(&inp, &weight, x));
        reference::compare("dinp", &dinp, &ndinp, 1e-7, 1e-6).assert();
        reference::compare("dweight", &dweight, &ndweight, 1e-7, 1e-6).assert();
        reference::compare("dbias", &dbias, &ndbias, 1e-7, 1e-6).assert();
    }
}

/// Both variants, forward and backward: two runs give the same bits. The subgroup variant relies
/// on the adapter summing a subgroup in the same order every time.
#[test]
fn each_variant_is_bit_identical_run_to_run() {
    let Some(gpu) = test_gpu() else { return };
    let (n, c) = (1037, 45);
    let dims = Dims { n, c };
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
    for variant in Variant::available(gpu) {
        let run = || {
            let out = gpu.zeros("out", DType::F32, n * c).unwrap();
            let mean = gpu.zeros("mean", DType::F32, n).unwrap();
            let rstd = gpu.zeros("rstd", DType::F32, n).unwrap();
            let dinp = gpu.zeros("dinp", DType::F32, n * c).unwrap();
            let dweight = gpu.zeros("dweight", DType::F32, c).unwrap();
            let dbias = gpu.zeros("dbias", DType::F32, c).unwrap();
            let mut d = vec![
                layernorm::forward_with(
                    gpu,
                    variant,
                    ForwardTensors {
                        out: &out,
                        mean: &mean,
                        rstd: &rstd,
                        inp: &inp,
                        weight: &weight,
                        bias: &bias,
                    },
                    dims,
                )
                .unwrap(),
            ];
            d.extend(
                layernorm::backward_with(
                    gpu,
                    variant,
                    BackwardTensors {
                        dinp: &dinp,
                        dweight: &dweight,
                        dbias: &dbias,
                        dout: &dout,
                        inp: &inp,
                        weight: &weight,
                        mean: &mean,
                        rstd: &rstd,
                    },
                    dims,
                    false,
                )
                .unwrap(),
            );
            gpu.run(&d).unwrap();
            [&out, &mean, &rstd, &dinp, &dweight, &dbias].map(|v| gpu.read_u32(v).unwrap())
        };
        assert!(run() == run(), "two runs of the {variant:?} variant differ");
    }
}

#[test]
fn the_subgroup_kernels_are_taken_where_a_gpu_has_subgroups() {
    let Some(gpu) = test_gpu() else { return };
    let want = if gpu.has_subgroups() && gpu.info.device_type != wgpu::DeviceType::Cpu {
        Variant::Subgroup
    } else {
        Variant::Shared
    };
    assert_eq!(Variant::best(gpu), want);
    assert_eq!(
        Variant::available(gpu).contains(&Variant::Subgroup),
        gpu.has_subgroups()
    );
    let (n, c) = (3, 5);
    let dims = Dims { n, c };
    let t = |name: &str, len: usize| gpu.zeros(name, DType::F32, len).unwrap();
    let (inp, out, w, b) = (
        t("inp", n * c),
        t("out", n * c),
        t("weight", c),
        t("bias", c),
    );
    let (mean, rstd) = (t("mean", n), t("rstd", n));
    let fwd = ForwardTensors {
        out: &out,
        mean: &mean,
        rstd: &rstd,
        inp: &inp,
        weight: &w,
        bias: &b,
    };
    let d = layernorm::forward(gpu, fwd, dims).unwrap();
    let subgroup_file = d.name.starts_with("layernorm_subgroup.");
    assert_eq!(subgroup_file, want == Variant::Subgroup, "{}", d.name);
    let (dinp, dw, db) = (t("dinp", n * c), t("dweight", c), t("dbias", c));
    let bwd = BackwardTensors {
        dinp: &dinp,
        dweight: &dw,
        dbias: &db,
        dout: &out,
        inp: &inp,
        weight: &w,
        mean: &mean,
        rstd: &rstd,
    };
    let d = layernorm::backward(gpu, bwd, dims, false).unwrap();
    assert_eq!(
        d[0].name.starts_with("layernorm_subgroup."),
        want == Variant::Subgroup,
        "{}",
        d[0].name
    );
    // Forcing the fallback works everywhere.
    let d = layernorm::forward_with(gpu, Variant::Shared, fwd, dims).unwrap();
    assert_eq!(d.name, "layernorm.layernorm_forward");
}

/// The forward and backward of rows far from zero (offset ±1e4, values within ±1 of it), where an
/// uncentred variance (Σ x² / C - mean²) loses every digit: 1e8 has an f32 ulp of 8, the variance
/// is 1/3. Every variant must keep the precision of a centred one.
#[test]
fn rows_far_from_zero_keep_their_precision() {
    let Some(gpu) = test_gpu() else { return };
    for (n, c) in [(67, 768), (5, 45), (3, 2053), (4, 1)] {
        let dims = Dims { n, c };
        let mut rng = Rng::new(n as u64 * 31 + c as u64);
        let inp: Vec<f32> = (0..n * c)
            .map(|i| {
                let offset = if (i / c) % 2 == 0 { 1e4 } else { -1e4 };
                offset + rng.range(-1.0, 1.0)
            })
            .collect();
        let weight = rng.vec_uniform(c, -1.5, 1.5);
        let bias = rng.vec_uniform(c, -1.0, 1.0);
        let dout = rng.vec_uniform(n * c, -1.0, 1.0);
        let f = reference::convert::<f32, f64>;
        let (inp64, weight64, bias64, dout64) = (f(&inp), f(&weight), f(&bias), f(&dout));
        let mut out = vec![0.0; n * c];
        let (mut mean, mut rstd) = (vec![0.0; n], vec![0.0; n]);
        reference::layernorm::forward(
            &mut out, &mut mean, &mut rstd, &inp64, &weight64, &bias64, dims,
        );
        let up = |name: &str, v: &[f32]| gpu.upload_f32(name, v).unwrap();
        let (g_inp, g_weight, g_bias, g_dout) = (
            up("inp", &inp),
            up("weight", &weight),
            up("bias", &bias),
            up("dout", &dout),
        );
        for variant in Variant::available(gpu) {
            let t = |name: &str, len: usize| gpu.zeros(name, DType::F32, len).unwrap();
            let (g_out, g_mean, g_rstd) = (t("out", n * c), t("mean", n), t("rstd", n));
            let (g_dinp, g_dw, g_db) = (t("dinp", n * c), t("dweight", c), t("dbias", c));
            let mut d = vec![
                layernorm::forward_with(
                    gpu,
                    variant,
                    ForwardTensors {
                        out: &g_out,
                        mean: &g_mean,
                        rstd: &g_rstd,
                        inp: &g_inp,
                        weight: &g_weight,
                        bias: &g_bias,
                    },
                    dims,
                )
                .unwrap(),
            ];
            d.extend(
                layernorm::backward_with(
                    gpu,
                    variant,
                    BackwardTensors {
                        dinp: &g_dinp,
                        dweight: &g_dw,
                        dbias: &g_db,
                        dout: &g_dout,
                        inp: &g_inp,
                        weight: &g_weight,
                        mean: &g_mean,
                        rstd: &g_rstd,
                    },
                    dims,
                    false,
                )
                .unwrap(),
            );
            gpu.run(&d).unwrap();
            let read = |v: &View| gpu.read_f32(v).unwrap();
            let what = |t: &str| format!("{t} [{variant:?}] N={n} C={c}");
            let got_mean = read(&g_mean);
            let got_rstd = read(&g_rstd);
            // The mean within 2 ulp of 1e4 (ulp 2^-10 ≈ 9.8e-4). rstd to a few ulp: both
            // variants centre the row before summing squares (the shared one shifts it by its
            // first element, the subgroup one uses a corrected two-pass); an uncentred variance,
            // or per-thread means merged at ulp(1e4), is off by far more (9e-5 measured).
            reference::compare(&what("mean"), &got_mean, &mean, 0.0, 2e-7).assert();
            reference::compare(&what("rstd"), &got_rstd, &rstd, 0.0, 1e-6).assert();
            // out inherits the f32 mean's rounding: |Δmean| · rstd · |weight|, under
            // 2 ulp(1e4) · 1.75 · 1.5 = 5.1e-3 (rstd ≤ sqrt(3) for values within ±1, and more
            // for C = 1 where out = bias).
            reference::compare(&what("out"), &read(&g_out), &out, 5.1e-3, 1e-6).assert();
            // The backward from the GPU's own mean and rstd: x - mean is exact here, so dinp,
            // dweight and dbias meet the tolerances of the ordinary check.
            let (gm, gr) = (f(&got_mean), f(&got_rstd));
            let mut dinp = vec![0.0; n * c];
            let (mut dw, mut db) = (vec![0.0; c], vec![0.0; c]);
            reference::layernorm::backward(
                &mut dinp, &mut dw, &mut db, &dout64, &inp64, &weight64, &gm, &gr, dims,
            );
            let sum_tol = 3e-6 * (n as f64).sqrt();
            reference::compare(&what("dinp"), &read(&g_dinp), &dinp, 2e-6, 1e-6).assert();
            reference::compare(&what("dweight"), &read(&g_dw), &dw, sum_tol, 1e-6).assert();
            reference::compare(&what("dbias"), &read(&g_db), &db, sum_tol, 1e-6).assert();
        }
    }
}

/// A backward block of more rows than the subgroup kernel keeps slots for at once (4 rows per
/// subgroup lane of a 256-thread workgroup: 32 rows with 8-wide subgroups), with a partial last
/// chunk: 76807 rows make blocks of 151.
#[test]
fn backward_blocks_longer_than_a_chunk_match_the_reference() {
    let Some(gpu) = test_gpu() else { return };
    for r in (layernorm::FAMILY.check)(gpu, &[76807, 5]).unwrap() {
        r.comparison.assert();
    }
}

/// With C = 1 a forward workgroup covers 256 rows in the shared variant and one row in the
/// subgroup variant, so these many rows need a folded grid; every row's mean must be its own
/// input.
#[test]
fn a_grid_of_more_rows_than_one_dimension_allows_folds() {
    let Some(gpu) = test_gpu() else { return };
    let c = 1;
    let max = gpu.limits.max_compute_workgroups_per_dimension as usize;
    for variant in Variant::available(gpu) {
        let rows_per_workgroup = match variant {
            Variant::Shared => 256,
            Variant::Subgroup => 1,
        };
        let n = max * rows_per_workgroup + 1;
        let dims = Dims { n, c };
        let inp: Vec<f32> = (0..n).map(|i| i as f32).collect();
        let g_inp = gpu.upload_f32("inp", &inp).unwrap();
        let g_weight = gpu.upload_f32("weight", &[2.0]).unwrap();
        let g_bias = gpu.upload_f32("bias", &[0.5]).unwrap();
        let g_out = gpu.zeros("out", DType::F32, n * c).unwrap();
        let g_mean = gpu.zeros("mean", DType::F32, n).unwrap();
        let g_rstd = gpu.zeros("rstd", DType::F32, n).unwrap();
        let d = layernorm::forward_with(
            gpu,
            variant,
            ForwardTensors {
                out: &g_out,
                mean: &g_mean,
                rstd: &g_rstd,
                inp: &g_inp,
                weight: &g_weight,
                bias: &g_bias,
            },
            dims,
        )
        .unwrap();
        assert!(
            d.workgroups[1] > 1,
            "{variant:?}: expected a folded grid, got {:?}",
            d.workgroups
        );
        gpu.run(&[d]).unwrap();
        let what = |t: &str| format!("{t} [{variant:?}]");
        reference::compare(
            &what("mean"),
            &gpu.read_f32(&g_mean).unwrap(),
            &inp,
            0.0,
            0.0,
        )
        .assert();
        let bias = vec![0.5f32; n];
        reference::compare(
            &what("out"),
            &gpu.read_f32(&g_out).unwrap(),
            &bias,
            0.0,
            0.0,
        )
        .assert();
    }
}

#[test]
fn mismatched_shapes_are_an_error() {
    let Some(gpu) = test_gpu() else { return };
    let (n, c) = (4, 6);
    let dims = Dims { n, c };
    let t = |name: &str, len: usize| gpu.zeros(name, DType::F32, len).unwrap();
    let (inp, out, w, b) = (
        t("inp", n * c),
        t("out", n * c),
        t("weight", c),
        t("bias", c),
    );
    let (mean, rstd) = (t("mean", n), t("rstd", n));
    let fwd = ForwardTensors {
        out: &out,
        mean: &mean,
        rstd: &rstd,
        inp: &inp,
        weight: &w,
        bias: &b,
    };
    let bad_mean = t("mean", n + 1);
    let err = layernorm::forward(
        gpu,
        ForwardTensors {
            mean: &bad_mean,
            ..fwd
        },
        dims,
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("tensor mean") && err.contains(&format!("{}", n + 1)),
        "{err}"
    );
    let bad_weight = t("weight", c - 1);
    let err = layernorm::forward(
        gpu,
        ForwardTensors {
            weight: &bad_weight,
            ..fwd
        },
        dims,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("tensor weight"), "{err}");
    let (dinp, dw, db) = (t("dinp", n * c), t("dweight", c), t("dbias", c));
    let bad_dout = t("dout", n * c + 1);
    let bwd = BackwardTensors {
        dinp: &dinp,
        dweight: &dw,
        dbias: &db,
        dout: &bad_dout,
        inp: &inp,
        weight: &w,
        mean: &mean,
        rstd: &rstd,
    };
    let err = layernorm::backward(gpu, bwd, dims, true)
        .unwrap_err()
        .to_string();
    assert!(err.contains("tensor dout"), "{err}");
    for variant in [Variant::Shared, Variant::Subgroup] {
        let err = layernorm::backward_with(gpu, variant, bwd, dims, false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("tensor dout"), "{variant:?}: {err}");
        let bad = ForwardTensors {
            mean: &bad_mean,
            ..fwd
        };
        let err = layernorm::forward_with(gpu, variant, bad, dims)
            .unwrap_err()
            .to_string();
        assert!(err.contains("tensor mean"), "{variant:?}: {err}");
    }
    let err = layernorm::forward(gpu, fwd, Dims { c: 0, ..dims })
        .unwrap_err()
        .to_string();
    assert!(err.contains("C = 0"), "{err}");
}
