use half::f16;
use shaderformer::gpu::{DType, Gpu, GpuOptions, test_gpu};
use shaderformer::kernels::gemm::{
    self, Kernel, LinearBackwardTensors, LinearDims, Matmul, Operand, Variant,
};
use shaderformer::reference::gemm::{Layout, Layouts, Product};
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
    let dims = LinearDims { m, k, n };
    let mut rng = Rng::new(2);
    let inp = random(&mut rng, m * k);
    let w = random(&mut rng, n * k);
    let bias = random(&mut rng, n);
    // The upstream gradient: the loss is Σ out · dout.
    let dout = random(&mut rng, m * n);
    let loss = |inp: &[f64], w: &[f64], bias: &[f64]| {
        let mut out = vec![0.0; m * n];
        reference::gemm::linear_forward(&mut out, inp, w, Some(bias), dims);
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
        dims,
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
        dims,
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
    let dims = LinearDims { m, k, n };
    let mut rng = Rng::new(3);
    let inp = random(&mut rng, m * k);
    let w = random(&mut rng, n * k);
    let bias = random(&mut rng, n);
    let mut want = vec![0.0; m * n];
    reference::gemm::linear_forward(&mut want, &inp, &w, Some(&bias), dims);
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
            a,
            b,
            Some(&bias),
            Layouts {
                c: Layout::new(n),
                a: la,
                b: lb,
            },
            Product {
                trans_a,
                trans_b,
                ..Product::new(m, n, k)
            },
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
    let dims = LinearDims { m, k, n };
    let z = |name: &str, len: usize| gpu.zeros(name, DType::F32, len).unwrap();
    let (inp, w, out) = (z("inp", m * k), z("w", n * k), z("out", m * n));
    let short_w = z("short_w", n * k - 1);

    let e = err(gemm::linear_forward(gpu, &out, &inp, &short_w, None, dims));
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
        dims,
    ));
    assert!(e.contains("tensor long_bias"), "{e}");
    let e = err(gemm::linear_backward(
        gpu,
        LinearBackwardTensors {
            dinp: Some(&out),
            dw: &w,
            dbias: None,
            dout: &out,
            inp: &inp,
            w: &w,
        },
        dims,
        false,
    ));
    assert!(
        e.contains("tensor out") && e.contains(&format!("{}", m * k)),
        "{e}"
    );
    let e = err(gemm::bias_backward(gpu, &inp, &out, m, n));
    assert!(e.contains("tensor inp"), "{e}");
    let e = err(gemm::linear_forward(
        gpu,
        &out,
        &inp,
        &w,
        None,
        LinearDims { m: 0, ..dims },
    ));
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
    let shared = out.slice(0, m * k, "out_again").unwrap();
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
    let dims = LinearDims { m, k, n };
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
    let mut dispatches = gemm::linear_forward(gpu, &out, &inp, &w, Some(&bias), dims).unwrap();
    dispatches.extend(
        gemm::linear_backward(
            gpu,
            LinearBackwardTensors {
                dinp: Some(&dinp),
                dw: &dw,
                dbias: Some(&dbias),
                dout: &dout,
                inp: &inp,
                w: &w,
            },
            dims,
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
        &reference::convert::<f32, f64>(&a),
        &reference::convert::<f32, f64>(&b),
        None,
        Layouts {
            c: Layout {
                batch_stride: m * n,
                ..Layout::new(n)
            },
            a: Layout {
                batch_stride: m * k,
                ..Layout::new(k)
            },
            b: Layout::new(k),
        },
        Product {
            batch,
            trans_b: true,
            ..Product::new(m, n, k)
        },
    );
    let (a_op, b_op) = (Operand::new(&ga, k).batched(m * k), Operand::new(&gb, k));
    for kernel in one_of_each_kind(gemm::candidates(gpu, &mm, &a_op, &b_op)) {
        let gc = gpu.zeros("c", DType::F32, batch * m * n).unwrap();
        let c = Operand::new(&gc, n).batched(m * n);
        let d = gemm::matmul_with(gpu, &mm, c, a_op, b_op, None, kernel).unwrap();
        assert!(d.iter().all(|d| d.workgroups.iter().all(|&w| w <= 3)));
        gpu.run(&d).unwrap();
        let got = gpu.read_f32(&gc).unwrap();
        reference::compare(&kernel.name(), &got, &want, 1e-5, 1e-4).assert();
    }

    // One entry with a long K: split-K's slices in z, its reduce's blocks folded.
    let (m, k, n) = (45, 70, 40);
    let a = rng.vec_uniform(k * m, -1.0, 1.0);
    let b = rng.vec_uniform(k * n, -1.0, 1.0);
    let ga = gpu.upload_f32("a", &a).unwrap();
    let gb = gpu.upload_f32("b", &b).unwrap();
    let mm = Matmul {
        trans_a: true,
        ..Matmul::new(m, n, k)
    };
    let mut want = vec![0.0; m * n];
    reference::gemm::matmul(
        &mut want,
        &reference::convert::<f32, f64>(&a),
        &reference::convert::<f32, f64>(&b),
        None,
        Layouts {
            c: Layout::new(n),
            a: Layout::new(m),
            b: Layout::new(n),
        },
        Product {
            trans_a: true,
            ..Product::new(m, n, k)
        },
    );
    let (a_op, b_op) = (Operand::new(&ga, m), Operand::new(&gb, n));
    let kernels = one_of_each_kind(gemm::candidates(gpu, &mm, &a_op, &b_op));
    assert!(kernels.iter().any(|k| k.name().starts_with("splitk")));
    for kernel in kernels {
        let gc = gpu.zeros("c", DType::F32, m * n).unwrap();
        let d =
            gemm::matmul_with(gpu, &mm, Operand::new(&gc, n), a_op, b_op, None, kernel).unwrap();
        assert!(d.iter().all(|d| d.workgroups.iter().all(|&w| w <= 3)));
        gpu.run(&d).unwrap();
        let got = gpu.read_f32(&gc).unwrap();
        reference::compare(&kernel.name(), &got, &want, 1e-5, 1e-4).assert();
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

/// The first kernel of each kind among `kernels` (naive, gemv, tiled, reg, ureg, split-K, packed
/// B): how a launcher folds its grid depends on the kind, not on the configuration, and each
/// pipeline costs seconds to build on a CPU adapter with an empty shader cache.
fn one_of_each_kind(kernels: Vec<Kernel>) -> Vec<Kernel> {
    let mut kinds: Vec<String> = Vec::new();
    kernels
        .into_iter()
        .filter(|k| {
            // "tiled128x128x8r2x2" is a "tiled", "splitk8ureg8x4w16" a "splitk".
            let kind: String = k
                .name()
                .chars()
                .take_while(char::is_ascii_alphabetic)
                .collect();
            let new = !kinds.contains(&kind);
            kinds.push(kind);
            new
        })
        .collect()
}

#[test]
fn linear_backward_skips_what_is_not_asked() {
    let Some(gpu) = test_gpu() else { return };
    let (m, k, n) = (4, 3, 2);
    let dims = LinearDims { m, k, n };
    let z = |name: &str, len: usize| gpu.zeros(name, DType::F32, len).unwrap();
    let (dout, inp, w, dw) = (
        z("dout", m * n),
        z("inp", m * k),
        z("w", n * k),
        z("dw", n * k),
    );
    let (dinp, dbias) = (z("dinp", m * k), z("dbias", n));
    let count = |dinp, dbias| {
        gemm::linear_backward(
            gpu,
            LinearBackwardTensors {
                dinp,
                dw: &dw,
                dbias,
                dout: &dout,
                inp: &inp,
                w: &w,
            },
            dims,
            false,
        )
        .unwrap()
        .len()
    };
    assert_eq!(count(None, None), 1);
    assert_eq!(count(Some(&dinp), None), 2);
    assert_eq!(count(Some(&dinp), Some(&dbias)), 3);
}

/// `x` rounded to f16 (round to nearest even).
fn to_f16(x: &[f32]) -> Vec<f16> {
    x.iter().map(|&v| f16::from_f32(v)).collect()
}

/// f16 values widened to f64, for the reference.
fn widen(x: &[f16]) -> Vec<f64> {
    x.iter().map(|v| v.to_f64()).collect()
}

/// The lm head with an f16 tied embedding: logits (M, V) computed one vocabulary chunk at a time,
/// chunk rows [r0, r0 + rows) of wte (V, C) read at an element offset into the f16 view and
/// written at column offset r0 of logits (ldc = V > N). V = 129 in chunks of 45 gives odd column
/// offsets; C = 45 (odd K, scalar loads of B at odd offsets) and C = 64 (vec4<f16> loads).
/// M = 3 takes the matrix-vector kernel (decoding), M = 9 the fixed rule's other kernel (prefill:
/// register blocks on a CPU adapter, tiles on a GPU).
#[test]
fn f16_lm_head_chunks_match_reference() {
    let Some(gpu) = test_gpu() else { return };
    if !gpu.has_f16() {
        return;
    }
    let (v, rows) = (129, 45);
    for (m, c) in [(3, 45), (3, 64), (9, 45), (9, 64)] {
        let mut rng = Rng::new(c as u64);
        let x = rng.vec_uniform(m * c, -1.0, 1.0);
        let wte = to_f16(&rng.vec_uniform(v * c, -1.0, 1.0));
        let gx = gpu.upload_f32("x", &x).unwrap();
        let gwte = gpu.upload("wte", DType::F16, &wte).unwrap();
        let logits = gpu.zeros("logits", DType::F32, m * v).unwrap();
        let mut dispatches = Vec::new();
        for r0 in (0..v).step_by(rows) {
            let n = rows.min(v - r0);
            let mm = Matmul {
                trans_b: true,
                ..Matmul::new(m, n, c)
            };
            let d = gemm::matmul(
                gpu,
                &mm,
                Operand::new(&logits, v).at(r0),
                Operand::new(&gx, c),
                Operand::new(&gwte, c).at(r0 * c),
                None,
                Variant::Tiled,
            )
            .unwrap();
            // B is read as vec4<f16> exactly when C keeps every row 4-aligned (the
            // matrix-vector kernel of CPU adapters has a vec4 form; the other, none).
            let vab = if c % 4 == 0 { "_vab" } else { "" };
            let rule = gemm::fixed_rule(gpu, &mm);
            let matrix_vector = matches!(rule, Kernel::Gemv | Kernel::Gemvc);
            assert_eq!(matrix_vector, m <= gemm::GEMV_MAX_M, "M = {m}: {rule:?}");
            let want = match rule {
                Kernel::Gemvc => format!("gemm_f16.gemm_gemvc{vab}"),
                Kernel::Gemv => "gemm_f16.gemm_gemv".to_string(),
                Kernel::Reg(_) => format!("gemm_f16.gemm_ureg{vab}"),
                _ => format!("gemm_f16.gemm_tiled{vab}"),
            };
            assert_eq!(d.len(), 1);
            assert_eq!(d[0].name, want);
            dispatches.extend(d);
        }
        gpu.run(&dispatches).unwrap();
        let mut want = vec![0.0; m * v];
        reference::gemm::linear_forward(
            &mut want,
            &reference::convert::<f32, f64>(&x),
            &widen(&wte),
            None,
            LinearDims { m, k: c, n: v },
        );
        let got = gpu.read_f32(&logits).unwrap();
        reference::compare(&format!("lm head C={c}"), &got, &want, 1e-5, 1e-4).assert();
    }
}

/// The error f16 weights cost against the unrounded f32 weights, for the record; the bound holds
/// for rounding (relative error ~1e-4 at most per weight) and fails for anything that reads the
/// wrong element of a word or loses the tails.
#[test]
fn f16_weight_error_against_f32_weights() {
    let Some(gpu) = test_gpu() else { return };
    if !gpu.has_f16() {
        return;
    }
    let (m, k, n) = (33, 257, 130);
    let dims = LinearDims { m, k, n };
    let mut rng = Rng::new(11);
    let inp = rng.vec_uniform(m * k, -1.0, 1.0);
    let w = rng.vec_uniform(n * k, -1.0, 1.0);
    let bias = rng.vec_uniform(n, -1.0, 1.0);
    let gi = gpu.upload_f32("inp", &inp).unwrap();
    let gb = gpu.upload_f32("bias", &bias).unwrap();
    let gw32 = gpu.upload_f32("w", &w).unwrap();
    let gw16 = gpu.upload("w16", DType::F16, &to_f16(&w)).unwrap();
    let out32 = gpu.zeros("out32", DType::F32, m * n).unwrap();
    let out16 = gpu.zeros("out16", DType::F32, m * n).unwrap();
    let mut dispatches = gemm::linear_forward(gpu, &out32, &gi, &gw32, Some(&gb), dims).unwrap();
    dispatches.extend(gemm::linear_forward(gpu, &out16, &gi, &gw16, Some(&gb), dims).unwrap());
    gpu.run(&dispatches).unwrap();
    let mut exact = vec![0.0; m * n];
    let f64s = reference::convert::<f32, f64>;
    reference::gemm::linear_forward(&mut exact, &f64s(&inp), &f64s(&w), Some(&f64s(&bias)), dims);
    let scale = exact.iter().fold(0.0f64, |a, x| a.max(x.abs()));
    let rel = |got: &[f32]| {
        got.iter()
            .zip(&exact)
            .fold(0.0f64, |a, (g, e)| a.max((*g as f64 - e).abs()))
            / scale
    };
    let (e16, e32) = (
        rel(&gpu.read_f32(&out16).unwrap()),
        rel(&gpu.read_f32(&out32).unwrap()),
    );
    eprintln!(
        "linear {m}x{k}x{n}: max |err| / max |out| = {e16:.2e} with f16 weights, {e32:.2e} with f32"
    );
    assert!(e16 < 1e-2, "f16 weights: relative error {e16:.3e}");
    assert!(e32 < 1e-5, "f32 weights: relative error {e32:.3e}");
}

#[test]
fn f16_operands_other_than_the_weight_are_errors() {
    let Some(gpu) = test_gpu() else { return };
    let (m, k, n) = (6, 5, 7);
    let dims = LinearDims { m, k, n };
    let z = |name: &str, dtype, len: usize| gpu.zeros(name, dtype, len).unwrap();
    let (inp, out) = (z("inp", DType::F32, m * k), z("out", DType::F32, m * n));
    let (w, w16) = (z("w", DType::F32, n * k), z("w16", DType::F16, n * k));
    let inp16 = z("inp16", DType::F16, m * k);
    let out16 = z("out16", DType::F16, m * n);
    let bias16 = z("bias16", DType::F16, n);

    let e = err(gemm::linear_forward(gpu, &out, &inp16, &w, None, dims));
    assert!(e.contains("tensor inp16") && e.contains("f16"), "{e}");
    let e = err(gemm::linear_forward(gpu, &out16, &inp, &w16, None, dims));
    assert!(e.contains("tensor out16"), "{e}");
    let e = err(gemm::linear_forward(
        gpu,
        &out,
        &inp,
        &w16,
        Some(&bias16),
        dims,
    ));
    assert!(e.contains("tensor bias16"), "{e}");
    let short16 = z("short16", DType::F16, n * k - 1);
    let e = err(gemm::linear_forward(gpu, &out, &inp, &short16, None, dims));
    assert!(
        e.contains("tensor short16") && e.contains(&format!("{}", n * k)),
        "{e}"
    );
    // A general matmul takes f16 only as B.
    let mm = Matmul {
        trans_b: true,
        ..Matmul::new(m, n, k)
    };
    let e = err(gemm::matmul(
        gpu,
        &mm,
        Operand::new(&out, n),
        Operand::new(&inp16, k),
        Operand::new(&w16, k),
        None,
        Variant::Tiled,
    ));
    assert!(e.contains("tensor inp16") && e.contains("operand a"), "{e}");
    // The backward is f32 only.
    let dw = z("dw", DType::F32, n * k);
    let e = err(gemm::linear_backward(
        gpu,
        LinearBackwardTensors {
            dinp: None,
            dw: &dw,
            dbias: None,
            dout: &out,
            inp: &inp,
            w: &w16,
        },
        dims,
        false,
    ));
    assert!(e.contains("tensor w16") && e.contains("f32"), "{e}");
}

/// On an adapter without SHADER_F16 an f16 weight is a clear error naming it, not a wgpu abort.
#[test]
fn f16_weights_without_shader_f16_are_an_error() {
    if test_gpu().is_none() {
        return;
    }
    let mut gpu = Gpu::new(&GpuOptions::from_env()).unwrap();
    gpu.features.remove(wgpu::Features::SHADER_F16);
    let gpu = &gpu;
    let (m, k, n) = (4, 8, 3);
    let dims = LinearDims { m, k, n };
    let inp = gpu.zeros("inp", DType::F32, m * k).unwrap();
    let out = gpu.zeros("out", DType::F32, m * n).unwrap();
    let w16 = gpu.zeros("w16", DType::F16, n * k).unwrap();
    let e = err(gemm::linear_forward(gpu, &out, &inp, &w16, None, dims));
    assert!(e.contains("tensor w16") && e.contains("SHADER_F16"), "{e}");
    let mm = Matmul::new(m, n, k);
    let e = err(gemm::matmul(
        gpu,
        &mm,
        Operand::new(&out, n),
        Operand::new(&inp, k),
        Operand::new(&w16, n),
        None,
        Variant::Naive,
    ));
    assert!(e.contains("tensor w16") && e.contains("SHADER_F16"), "{e}");
}

/// Every candidate's name parses back to it; misspelt or impossible configurations do not parse.
#[test]
fn kernel_names_parse_back() {
    let Some(gpu) = test_gpu() else { return };
    let (m, k, n) = (5, 300, 7);
    let a = gpu.zeros("a", DType::F32, m * k).unwrap();
    let b = gpu.zeros("b", DType::F32, n * k).unwrap();
    let mm = Matmul {
        trans_b: true,
        ..Matmul::new(m, n, k)
    };
    let kernels = gemm::candidates(gpu, &mm, &Operand::new(&a, k), &Operand::new(&b, k));
    for name in ["naive", "gemv", "gemvc", "tiled", "reg", "splitk"] {
        assert!(
            kernels.iter().any(|k| k.name().starts_with(name)),
            "no {name} among {kernels:?}"
        );
    }
    for kernel in &kernels {
        assert_eq!(Kernel::from_name(&kernel.name()), Some(*kernel));
    }
    for bad in [
        "",
        "tiled",
        "tiled128x128x8r3x2",
        "tiled128x128x6r2x2",
        "tiled128x128x8r2x2x",
        "reg8x4",
        "reg8x5w64",
        "reg08x4w64",
        "reg0x4w64",
        "splitk8",
        "splitk1reg8x4w16",
        "splitkreg8x4w16",
        "ureg32x8w16",
        "ureg16x12w16",
        "naive ",
    ] {
        assert_eq!(Kernel::from_name(bad), None, "{bad}");
    }
}

/// A kernel that cannot compute the problem is an error naming it.
#[test]
fn matmul_with_refuses_kernels_that_do_not_apply() {
    let Some(gpu) = test_gpu() else { return };
    let (m, k, n) = (16, 64, 8);
    let z = |name: &str, len: usize| gpu.zeros(name, DType::F32, len).unwrap();
    let (a, b, c) = (z("a", 2 * m * k), z("b", n * k), z("c", 2 * m * n));
    let mm = Matmul {
        batch: 2,
        trans_b: true,
        ..Matmul::new(m, n, k)
    };
    let (a, b, c) = (
        Operand::new(&a, k).batched(m * k),
        Operand::new(&b, k),
        Operand::new(&c, n).batched(m * n),
    );
    for name in ["gemv", "gemvc", "splitk4reg8x4w16"] {
        let kernel = Kernel::from_name(name).unwrap();
        assert!(!gemm::candidates(gpu, &mm, &a, &b).contains(&kernel));
        let e = err(gemm::matmul_with(gpu, &mm, c, a, b, None, kernel));
        assert!(e.contains(name), "{e}");
    }
}

/// Split-K sums in its own order (slices, then the slices in order) but repeats bit for bit, and
/// agrees with the single-pass kernels to rounding.
#[test]
fn split_k_repeats_bit_for_bit() {
    let Some(gpu) = test_gpu() else { return };
    // dw += doutᵀ · inp: M = out features, N = in features, K = B·T.
    let (m, n, k) = (36, 20, 1001);
    let mut rng = Rng::new(6);
    let dout = gpu
        .upload_f32("dout", &rng.vec_uniform(k * m, -1.0, 1.0))
        .unwrap();
    let inp = gpu
        .upload_f32("inp", &rng.vec_uniform(k * n, -1.0, 1.0))
        .unwrap();
    let dw0 = rng.vec_uniform(m * n, -1.0, 1.0);
    let mm = Matmul {
        trans_a: true,
        accumulate: true,
        ..Matmul::new(m, n, k)
    };
    let (a, b) = (Operand::new(&dout, m), Operand::new(&inp, n));
    let run = |kernel: Kernel| {
        let dw = gpu.upload_f32("dw", &dw0).unwrap();
        let d = gemm::matmul_with(gpu, &mm, Operand::new(&dw, n), a, b, None, kernel).unwrap();
        gpu.run(&d).unwrap();
        gpu.read_f32(&dw).unwrap()
    };
    let naive = run(Kernel::Naive);
    let split: Vec<Kernel> = gemm::candidates(gpu, &mm, &a, &b)
        .into_iter()
        .filter(|k| k.name().starts_with("splitk"))
        .collect();
    assert!(!split.is_empty());
    for kernel in split {
        let first = run(kernel);
        let second = run(kernel);
        let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        assert!(
            bits(&first) == bits(&second),
            "{} differs between runs",
            kernel.name()
        );
        reference::compare(&kernel.name(), &first, &naive, 1e-4, 1e-4).assert();
    }
}

/// gemm_ureg's 16-column blocks, offered only for products of at least SLOW_BUILD_MIN_FMAS
/// multiply-adds (M, N, K and the batch rounded up as the tuner buckets them), give the naive
/// kernel's bits on awkward sizes in each of their entry points: both operands as vec4 (NT), A as
/// scalars (K odd), B as scalars (N not a multiple of 4).
#[test]
fn big_register_blocks_give_naive_bits() {
    let Some(gpu) = test_gpu() else { return };
    let mut rng = Rng::new(16);
    // (m, k, n, trans_b)
    for (m, k, n, trans_b) in [
        (260, 500, 270, true),
        (260, 501, 268, false),
        (260, 500, 270, false),
    ] {
        assert!(m * n * k >= gemm::SLOW_BUILD_MIN_FMAS);
        let mm = Matmul {
            trans_b,
            ..Matmul::new(m, n, k)
        };
        big_blocks_match_naive(gpu, &mm, &mut rng);
    }
    // Below the threshold they are not offered.
    let (a, b) = (
        gpu.zeros("a", DType::F32, 64 * 64).unwrap(),
        gpu.zeros("b", DType::F32, 64 * 64).unwrap(),
    );
    let small = Matmul::new(64, 64, 64);
    let kernels = gemm::candidates(gpu, &small, &Operand::new(&a, 64), &Operand::new(&b, 64));
    assert!(!kernels.iter().any(Kernel::slow_to_build));
    // A product below it whose bucket (512 x 256 x 256) is above it is offered them, as its
    // bucket's others are.
    let (m, k, n) = (260, 250, 250);
    assert!(m * n * k < gemm::SLOW_BUILD_MIN_FMAS);
    let (a, b) = (
        gpu.zeros("a", DType::F32, m * k).unwrap(),
        gpu.zeros("b", DType::F32, k * n).unwrap(),
    );
    let mm = Matmul::new(m, n, k);
    let kernels = gemm::candidates(gpu, &mm, &Operand::new(&a, k), &Operand::new(&b, n));
    assert!(kernels.iter().any(Kernel::slow_to_build));

    // Many small products in one dispatch (attention's) count all their entries, and the big
    // blocks give the naive kernel's bits there too, every entry at its own offsets.
    let (m, k, n, batch) = (40, 37, 44, 40);
    assert!(m * n * k < gemm::SLOW_BUILD_MIN_FMAS / 64);
    for trans_b in [true, false] {
        let mm = Matmul {
            batch,
            trans_b,
            ..Matmul::new(m, n, k)
        };
        big_blocks_match_naive(gpu, &mm, &mut rng);
    }
}

/// Runs `mm` (packed entries, random operands) under every slow-to-build candidate `candidates`
/// offers, at least two of them, and asserts each gives the naive kernel's bits.
fn big_blocks_match_naive(gpu: &Gpu, mm: &Matmul, rng: &mut Rng) {
    let Matmul {
        m,
        n,
        k,
        batch,
        trans_b,
        ..
    } = *mm;
    let a = gpu
        .upload_f32("a", &rng.vec_uniform(batch * m * k, -1.0, 1.0))
        .unwrap();
    let b = gpu
        .upload_f32("b", &rng.vec_uniform(batch * n * k, -1.0, 1.0))
        .unwrap();
    let a_op = Operand::new(&a, k).batched(m * k);
    let b_op = Operand::new(&b, if trans_b { k } else { n }).batched(n * k);
    let run = |kernel: Kernel| {
        let c = gpu.zeros("c", DType::F32, batch * m * n).unwrap();
        let c_op = Operand::new(&c, n).batched(m * n);
        let d = gemm::matmul_with(gpu, mm, c_op, a_op, b_op, None, kernel);
        gpu.run(&d.unwrap()).unwrap();
        gpu.read_f32(&c).unwrap()
    };
    let naive = run(Kernel::Naive);
    let big: Vec<Kernel> = gemm::candidates(gpu, mm, &a_op, &b_op)
        .into_iter()
        .filter(Kernel::slow_to_build)
        .collect();
    let what = format!("{m}x{k}x{n} x{batch} trans_b {trans_b}");
    assert!(big.len() >= 2, "{what}: {big:?}");
    for kernel in big {
        let got = run(kernel);
        assert!(
            got.iter()
                .zip(&naive)
                .all(|(x, y)| x.to_bits() == y.to_bits()),
            "{what}: {} differs from naive",
            kernel.name()
        );
    }
}
