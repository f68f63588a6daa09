use shaderformer::gpu::{DType, Gpu, GpuOptions, test_gpu};
use shaderformer::kernels::gemm::{self, Matmul, Operand, Variant};
use shaderformer::reference::gemm::Layout;
use shaderformer::reference::{self, dot, numeric_grad};
use shaderformer::rng::Rng;

#[test]
fn gpu_matches_reference() {
    crate::check_family(&gemm::FAMILY);
}

fn random(rng: &mut Rng, n: usize) -> Vec<f64> {
    reference::convert(&rng.vec_uniform(n, -1.0, 1.0))
}

#[test]
fn reference_backward_matches_finite_differences() {
    let (m, k, n) = (3, 4, 5);
    let mut rng = Rng::new(2);
    let inp = random(&mut rng, m * k);
    let w = random(&mut rng, n * k);
    let bias = random(&mut rng, n);
    // The upstream gradient: the loss is Σ out · dout.
    let dout = random(&mut rng, m * n);
    let loss = |inp: &[f64], w: &[f64], bias: &[f64]| {
        let mut out = vec![0.0; m * n];
        reference::gemm::linear_forward(&mut out, inp, w, Some(bias), m, k, n);
        dot(&out, &dout)
    };
    let ndinp = numeric_grad(&inp, 1e-6, |x| loss(x, &w, &bias));
    let ndw = numeric_grad(&w, 1e-6, |x| loss(&inp, x, &bias));
    let ndbias = numeric_grad(&bias, 1e-6, |x| loss(&inp, &w, x));

    // Overwriting dinp; dw and dbias accumulate onto their starting values.
    let dw0 = random(&mut rng, n * k);
    let dbias0 = random(&mut rng, n);
    let mut dinp = vec![7.0; m * k];
    let (mut dw, mut dbias) = (dw0.clone(), dbias0.clone());
    reference::gemm::linear_backward(
        Some(&mut dinp),
        &mut dw,
        Some(&mut dbias),
        &dout,
        &inp,
        &w,
        m,
        k,
        n,
        false,
    );
    let minus =
        |x: &[f64], x0: &[f64]| -> Vec<f64> { x.iter().zip(x0).map(|(a, b)| a - b).collect() };
    reference::compare("dinp", &dinp, &ndinp, 1e-8, 1e-6).assert();
    reference::compare("dw", &minus(&dw, &dw0), &ndw, 1e-8, 1e-6).assert();
    reference::compare("dbias", &minus(&dbias, &dbias0), &ndbias, 1e-8, 1e-6).assert();

    // Accumulating dinp adds the same gradient.
    let dinp0 = random(&mut rng, m * k);
    let mut dinp_acc = dinp0.clone();
    reference::gemm::linear_backward(
        Some(&mut dinp_acc),
        &mut dw,
        None,
        &dout,
        &inp,
        &w,
        m,
        k,
        n,
        true,
    );
    reference::compare("dinp +=", &minus(&dinp_acc, &dinp0), &ndinp, 1e-8, 1e-6).assert();

    let mut db = vec![0.0; n];
    reference::gemm::bias_backward(&mut db, &dout, m, n);
    reference::compare("bias_backward", &db, &ndbias, 1e-8, 1e-6).assert();
}

/// The general reference agrees with the linear layer's: out = inp · wᵀ is matmul NT, and a
/// transposed copy of each operand gives the same product.
#[test]
fn reference_matmul_agrees_with_linear() {
    let (m, k, n) = (4, 3, 5);
    let mut rng = Rng::new(3);
    let inp = random(&mut rng, m * k);
    let w = random(&mut rng, n * k);
    let bias = random(&mut rng, n);
    let mut want = vec![0.0; m * n];
    reference::gemm::linear_forward(&mut want, &inp, &w, Some(&bias), m, k, n);
    let transpose = |x: &[f64], rows: usize, cols: usize| -> Vec<f64> {
        (0..cols * rows)
            .map(|i| x[(i % rows) * cols + i / rows])
            .collect()
    };
    let inp_t = transpose(&inp, m, k); // (K, M)
    let w_t = transpose(&w, n, k); // (K, N)
    for (trans_a, trans_b) in [(false, true), (false, false), (true, true), (true, false)] {
        let (a, la) = if trans_a {
            (&inp_t, Layout::new(m))
        } else {
            (&inp, Layout::new(k))
        };
        let (b, lb) = if trans_b {
            (&w, Layout::new(k))
        } else {
            (&w_t, Layout::new(n))
        };
        let mut got = vec![0.0; m * n];
        reference::gemm::matmul(
            &mut got,
            Layout::new(n),
            a,
            la,
            b,
            lb,
            Some(&bias),
            m,
            n,
            k,
            1,
            trans_a,
            trans_b,
            1.0,
            false,
        );
        reference::compare("matmul", &got, &want, 1e-12, 1e-12).assert();
    }
}

/// The message of an expected error.
fn err<T>(r: shaderformer::Result<T>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn mismatched_shapes_are_an_error() {
    let Some(gpu) = test_gpu() else { return };
    let (m, k, n) = (6, 5, 7);
    let z = |name: &str, len: usize| gpu.zeros(name, DType::F32, len).unwrap();
    let (inp, w, out) = (z("inp", m * k), z("w", n * k), z("out", m * n));
    let short_w = z("short_w", n * k - 1);

    let e = err(gemm::linear_forward(
        gpu, &out, &inp, &short_w, None, m, k, n,
    ));
    assert!(
        e.contains("tensor short_w") && e.contains(&format!("{}", n * k - 1)),
        "{e}"
    );
    let long_bias = z("long_bias", n + 1);
    let e = err(gemm::linear_forward(
        gpu,
        &out,
        &inp,
        &w,
        Some(&long_bias),
        m,
        k,
        n,
    ));
    assert!(e.contains("tensor long_bias"), "{e}");
    let e = err(gemm::linear_backward(
        gpu,
        Some(&out),
        &w,
        None,
        &out,
        &inp,
        &w,
        m,
        k,
        n,
        false,
    ));
    assert!(
        e.contains("tensor out") && e.contains(&format!("{}", m * k)),
        "{e}"
    );
    let e = err(gemm::bias_backward(gpu, &inp, &out, m, n));
    assert!(e.contains("tensor inp"), "{e}");
    let e = err(gemm::linear_forward(gpu, &out, &inp, &w, None, 0, k, n));
    assert!(e.contains("dimension M"), "{e}");

    // A general operand that runs past its view: an offset, a row stride, a batch.
    let mm = Matmul::new(m, n, k);
    let c = Operand::new(&out, n);
    let (a, b) = (Operand::new(&inp, k), Operand::new(&w, n));
    // w holds K · N elements: exactly B (K, N).
    gemm::matmul(gpu, &mm, c, a, b, None, Variant::Tiled).unwrap();
    let e = err(gemm::matmul(gpu, &mm, c, a.at(1), b, None, Variant::Tiled));
    assert!(e.contains("tensor inp") && e.contains("operand a"), "{e}");
    let e = err(gemm::matmul(
        gpu,
        &mm,
        c,
        a,
        Operand::new(&w, n + 1),
        None,
        Variant::Naive,
    ));
    assert!(e.contains("tensor w") && e.contains("operand b"), "{e}");
    let e = err(gemm::matmul(
        gpu,
        &mm,
        Operand::new(&out, n - 1),
        a,
        b,
        None,
        Variant::Tiled,
    ));
    assert!(e.contains("tensor out") && e.contains("row stride"), "{e}");
    let batched = Matmul { batch: 2, ..mm };
    let e = err(gemm::matmul(
        gpu,
        &batched,
        c.batched(m * n),
        a,
        b,
        None,
        Variant::Tiled,
    ));
    assert!(e.contains("tensor out") && e.contains("operand c"), "{e}");
    // Batch entries of C that overlap would race.
    let wide = z("wide", 2 * m * n);
    let e = err(gemm::matmul(
        gpu,
        &batched,
        Operand::new(&wide, n).batched(n),
        a,
        b,
        None,
        Variant::Tiled,
    ));
    assert!(e.contains("tensor wide") && e.contains("overlap"), "{e}");
    // Transposed A (K, M) with the row stride of (M, K) is too short.
    let ta = Matmul {
        trans_a: true,
        ..mm
    };
    let e = err(gemm::matmul(gpu, &ta, c, a, b, None, Variant::Tiled));
    assert!(e.contains("tensor inp") && e.contains("row stride"), "{e}");
    // C may not share a buffer with an input.
    let shared = out.slice(0, m * k, "out_again");
    let e = err(gemm::matmul(
        gpu,
        &mm,
        c,
        Operand::new(&shared, k),
        b,
        None,
        Variant::Tiled,
    ));
    assert!(
        e.contains("out_again") && e.contains("shares a buffer"),
        "{e}"
    );
    let ints = gpu.zeros("ints", DType::U32, m * k).unwrap();
    let e = err(gemm::matmul(
        gpu,
        &mm,
        c,
        Operand::new(&ints, k),
        b,
        None,
        Variant::Tiled,
    ));
    assert!(e.contains("tensor ints") && e.contains("u32"), "{e}");
}

/// The same dispatches twice give the same bits: no atomics, a fixed summation order.
#[test]
fn results_are_deterministic() {
    let Some(gpu) = test_gpu() else { return };
    let (m, k, n) = (150, 70, 90);
    let mut rng = Rng::new(4);
    let inp = gpu
        .upload_f32("inp", &rng.vec_uniform(m * k, -1.0, 1.0))
        .unwrap();
    let w = gpu
        .upload_f32("w", &rng.vec_uniform(n * k, -1.0, 1.0))
        .unwrap();
    let bias = gpu
        .upload_f32("bias", &rng.vec_uniform(n, -1.0, 1.0))
        .unwrap();
    let dout = gpu
        .upload_f32("dout", &rng.vec_uniform(m * n, -1.0, 1.0))
        .unwrap();
    let z = |name: &str, len: usize| gpu.zeros(name, DType::F32, len).unwrap();
    let (out, dinp, dw, dbias) = (
        z("out", m * n),
        z("dinp", m * k),
        z("dw", n * k),
        z("dbias", n),
    );
    let mut dispatches =
        vec![gemm::linear_forward(gpu, &out, &inp, &w, Some(&bias), m, k, n).unwrap()];
    dispatches.extend(
        gemm::linear_backward(
            gpu,
            Some(&dinp),
            &dw,
            Some(&dbias),
            &dout,
            &inp,
            &w,
            m,
            k,
            n,
            false,
        )
        .unwrap(),
    );
    let read = |views: &[&shaderformer::gpu::View]| -> Vec<Vec<u8>> {
        views.iter().map(|v| gpu.read_bytes(v).unwrap()).collect()
    };
    gpu.run(&dispatches).unwrap();
    let first = read(&[&out, &dinp, &dw, &dbias]);
    // dw and dbias accumulate: reset them, then run the same dispatches again.
    gpu.write(&dw, &vec![0.0f32; n * k]).unwrap();
    gpu.write(&dbias, &vec![0.0f32; n]).unwrap();
    gpu.run(&dispatches).unwrap();
    let second = read(&[&out, &dinp, &dw, &dbias]);
    for (i, name) in ["out", "dinp", "dw", "dbias"].iter().enumerate() {
        assert!(first[i] == second[i], "{name} differs between two runs");
    }
}

/// With a tiny per-dimension workgroup limit the launchers fold the tile grid into x and y and
/// loop over batch entries in z; the results stay those of the reference.
#[test]
fn small_dispatch_limits_fold_the_grid() {
    if test_gpu().is_none() {
        return;
    }
    let mut gpu = Gpu::new(&GpuOptions::from_env()).unwrap();
    gpu.limits.max_compute_workgroups_per_dimension = 3;
    let gpu = &gpu;
    let (m, k, n, batch) = (45, 9, 40, 5);
    let mut rng = Rng::new(5);
    let a = rng.vec_uniform(batch * m * k, -1.0, 1.0);
    let b = rng.vec_uniform(n * k, -1.0, 1.0);
    let ga = gpu.upload_f32("a", &a).unwrap();
    let gb = gpu.upload_f32("b", &b).unwrap();
    // A (M, K) per batch entry, B (N, K) shared, C (M, N) stacked.
    let mm = Matmul {
        batch,
        trans_b: true,
        ..Matmul::new(m, n, k)
    };
    let mut want = vec![0.0; batch * m * n];
    reference::gemm::matmul(
        &mut want,
        Layout {
            batch_stride: m * n,
            ..Layout::new(n)
        },
        &reference::convert::<f32, f64>(&a),
        Layout {
            batch_stride: m * k,
            ..Layout::new(k)
        },
        &reference::convert::<f32, f64>(&b),
        Layout::new(k),
        None,
        m,
        n,
        k,
        batch,
        false,
        true,
        1.0,
        false,
    );
    for variant in [Variant::Naive, Variant::Tiled] {
        let gc = gpu.zeros("c", DType::F32, batch * m * n).unwrap();
        let d = gemm::matmul(
            gpu,
            &mm,
            Operand::new(&gc, n).batched(m * n),
            Operand::new(&ga, k).batched(m * k),
            Operand::new(&gb, k),
            None,
            variant,
        )
        .unwrap();
        assert!(d.workgroups.iter().all(|&w| w <= 3), "{:?}", d.workgroups);
        gpu.run(&[d]).unwrap();
        let got = gpu.read_f32(&gc).unwrap();
        reference::compare(&format!("{variant:?}"), &got, &want, 1e-5, 1e-4).assert();
    }

    // 200 columns are 7 blocks of 32, folded into 3 x 3.
    let (m, n) = (5, 200);
    let dout = rng.vec_uniform(m * n, -1.0, 1.0);
    let g_dout = gpu.upload_f32("dout", &dout).unwrap();
    let g_dbias = gpu.zeros("dbias", DType::F32, n).unwrap();
    let d = gemm::bias_backward(gpu, &g_dbias, &g_dout, m, n).unwrap();
    assert!(d.workgroups.iter().all(|&w| w <= 3), "{:?}", d.workgroups);
    gpu.run(&[d]).unwrap();
    let mut want = vec![0.0; n];
    reference::gemm::bias_backward(&mut want, &reference::convert::<f32, f64>(&dout), m, n);
    reference::compare("dbias", &gpu.read_f32(&g_dbias).unwrap(), &want, 1e-6, 1e-5).assert();
}

#[test]
fn linear_backward_skips_what_is_not_asked() {
    let Some(gpu) = test_gpu() else { return };
    let (m, k, n) = (4, 3, 2);
    let z = |name: &str, len: usize| gpu.zeros(name, DType::F32, len).unwrap();
    let (dout, inp, w, dw) = (
        z("dout", m * n),
        z("inp", m * k),
        z("w", n * k),
        z("dw", n * k),
    );
    let (dinp, dbias) = (z("dinp", m * k), z("dbias", n));
    let count = |dinp, dbias| {
        gemm::linear_backward(gpu, dinp, &dw, dbias, &dout, &inp, &w, m, k, n, false)
            .unwrap()
            .len()
    };
    assert_eq!(count(None, None), 1);
    assert_eq!(count(Some(&dinp), None), 2);
    assert_eq!(count(Some(&dinp), Some(&dbias)), 3);
}
