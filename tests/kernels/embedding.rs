use half::f16;
use shaderformer::gpu::{DType, Gpu, GpuOptions, test_gpu};
use shaderformer::kernels::embedding::{self, Dims, TableChunk};
use shaderformer::reference::{self, dot, numeric_grad};
use shaderformer::rng::Rng;

#[test]
fn gpu_matches_reference() {
    crate::check_family(&embedding::FAMILY);
}

#[test]
fn reference_backward_matches_finite_differences() {
    let (b, t, c, v, max_t) = (2, 3, 4, 5, 4);
    let dims = Dims { b, t, c };
    let tokens = [3u32, 1, 3, 0, 3, 4];
    let mut rng = Rng::new(2);
    let wte: Vec<f64> = reference::convert(&rng.vec_uniform(v * c, -1.0, 1.0));
    let wpe: Vec<f64> = reference::convert(&rng.vec_uniform(max_t * c, -1.0, 1.0));
    let w: Vec<f64> = reference::convert(&rng.vec_uniform(b * t * c, -1.0, 1.0));
    let loss = |wte: &[f64], wpe: &[f64]| {
        let mut out = vec![0.0; b * t * c];
        reference::embedding::forward(&mut out, &tokens, wte, 0, wpe, dims);
        dot(&out, &w)
    };
    let (mut dwte, mut dwpe) = (vec![0.0; v * c], vec![0.0; max_t * c]);
    reference::embedding::backward(&mut dwte, 0, Some(&mut dwpe), &w, &tokens, dims);
    let ndwte = numeric_grad(&wte, 1e-6, |x| loss(x, &wpe));
    let ndwpe = numeric_grad(&wpe, 1e-6, |x| loss(&wte, x));
    reference::compare("dwte", &dwte, &ndwte, 1e-8, 1e-6).assert();
    reference::compare("dwpe", &dwpe, &ndwpe, 1e-8, 1e-6).assert();

    // A chunk of rows [2, 5) gets exactly its slice of the full gradient, and no dwpe.
    let mut chunk = vec![0.0; 3 * c];
    reference::embedding::backward(&mut chunk, 2, None, &w, &tokens, dims);
    reference::compare("dwte chunk", &chunk, &dwte[2 * c..], 0.0, 0.0).assert();
}

#[test]
fn backward_index_groups_positions_by_token() {
    let index = embedding::backward_index(&[5, 2, 5, 7, 2, 5]);
    assert_eq!(index.len(), embedding::backward_index_len(6));
    #[rustfmt::skip]
    let want = [
        3,
        2, 0, 2,   5, 2, 3,   7, 5, 1,   0, 0, 0,   0, 0, 0,   0, 0, 0,
        1, 4, 0, 2, 5, 3,
    ];
    assert_eq!(index, want);
    assert_eq!(embedding::backward_index(&[9]), [1, 9, 0, 1, 0]);
}

#[test]
fn backward_is_bit_reproducible_and_flags_a_stale_index() {
    let Some(gpu) = test_gpu() else { return };
    let (b, t, c, v) = (4, 64, 96, 10);
    let dims = Dims { b, t, c };
    let mut rng = Rng::new(3);
    let tokens: Vec<u32> = (0..b * t).map(|_| rng.below(v as u64) as u32).collect();
    let dout = gpu
        .upload_f32("dout", &rng.vec_uniform(b * t * c, -1.0, 1.0))
        .unwrap();
    let g_tokens = gpu.upload_u32("tokens", &tokens).unwrap();
    let index = gpu
        .upload_u32("index", &embedding::backward_index(&tokens))
        .unwrap();
    let run = |index| {
        let dwte = gpu.zeros("dwte", DType::F32, v * c).unwrap();
        let dwpe = gpu.zeros("dwpe", DType::F32, t * c).unwrap();
        let d = embedding::backward(
            gpu,
            TableChunk::whole(&dwte),
            Some(&dwpe),
            &dout,
            &g_tokens,
            index,
            dims,
        )
        .unwrap();
        gpu.run(&d).unwrap();
        (gpu.read_u32(&dwte).unwrap(), gpu.read_u32(&dwpe).unwrap())
    };
    let first = run(&index);
    assert_eq!(first, run(&index), "two runs differ in their bits");

    // An index built from other tokens: the affected rows become NaN rather than wrong numbers.
    let mut other = tokens.clone();
    other.swap(0, tokens.iter().position(|&x| x != tokens[0]).unwrap());
    let stale = gpu
        .upload_u32("stale", &embedding::backward_index(&other))
        .unwrap();
    let (dwte, _) = run(&stale);
    let row = tokens[0] as usize;
    assert!(
        dwte[row * c..(row + 1) * c]
            .iter()
            .all(|&x| f32::from_bits(x).is_nan())
    );
}

#[test]
fn tokens_outside_the_table_are_left_untouched() {
    let Some(gpu) = test_gpu() else { return };
    let (b, t, c, v) = (1, 3, 8, 4);
    let dims = Dims { b, t, c };
    let tokens = gpu.upload_u32("tokens", &[1, 4, u32::MAX]).unwrap();
    let wte = gpu.upload_f32("wte", &vec![1.0; v * c]).unwrap();
    let wpe = gpu.upload_f32("wpe", &vec![0.5; t * c]).unwrap();
    let out = gpu.upload_f32("out", &vec![-7.0; b * t * c]).unwrap();
    let dout = gpu.upload_f32("dout", &vec![1.0; b * t * c]).unwrap();
    let dwte = gpu.zeros("dwte", DType::F32, v * c).unwrap();
    let index = gpu
        .upload_u32("index", &embedding::backward_index(&[1, 4, u32::MAX]))
        .unwrap();
    let g_tokens = tokens.clone();
    let mut d =
        vec![embedding::forward(gpu, &out, &tokens, TableChunk::whole(&wte), &wpe, dims).unwrap()];
    d.extend(
        embedding::backward(
            gpu,
            TableChunk::whole(&dwte),
            None,
            &dout,
            &g_tokens,
            &index,
            dims,
        )
        .unwrap(),
    );
    gpu.run(&d).unwrap();
    let out = gpu.read_f32(&out).unwrap();
    assert!(out[..c].iter().all(|&x| x == 1.5));
    assert!(out[c..].iter().all(|&x| x == -7.0));
    let dwte = gpu.read_f32(&dwte).unwrap();
    let want: Vec<f32> = (0..v * c).map(|i| f32::from(i / c == 1)).collect();
    assert_eq!(dwte, want);
}

#[test]
fn mismatched_shapes_are_an_error() {
    let Some(gpu) = test_gpu() else { return };
    let (b, t, c) = (2, 3, 4);
    let dims = Dims { b, t, c };
    let z = |name: &str, dtype, len| gpu.zeros(name, dtype, len).unwrap();
    let out = z("out", DType::F32, b * t * c);
    let tokens = z("tokens", DType::U32, b * t);
    let wte = z("wte", DType::F32, 10 * c);
    let wpe = z("wpe", DType::F32, t * c);
    let index = z("index", DType::U32, embedding::backward_index_len(b * t));
    fn err<T>(r: shaderformer::Result<T>) -> String {
        r.map(|_| ()).unwrap_err().to_string()
    }

    let bad_wte = z("wte_ragged", DType::F32, 10 * c + 1);
    let e = err(embedding::forward(
        gpu,
        &out,
        &tokens,
        TableChunk::whole(&bad_wte),
        &wpe,
        dims,
    ));
    assert!(e.contains("tensor wte_ragged"), "{e}");
    let short_wpe = z("wpe_short", DType::F32, (t - 1) * c);
    let e = err(embedding::forward(
        gpu,
        &out,
        &tokens,
        TableChunk::whole(&wte),
        &short_wpe,
        dims,
    ));
    assert!(e.contains("tensor wpe_short"), "{e}");
    let f32_tokens = z("tokens_f32", DType::F32, b * t);
    let e = err(embedding::forward(
        gpu,
        &out,
        &f32_tokens,
        TableChunk::whole(&wte),
        &wpe,
        dims,
    ));
    assert!(e.contains("tensor tokens_f32"), "{e}");
    let e = err(embedding::forward(
        gpu,
        &out,
        &tokens,
        TableChunk::whole(&wte),
        &wpe,
        Dims { t: t + 1, ..dims },
    ));
    assert!(e.contains("tensor out"), "{e}");

    let short_index = z("index_short", DType::U32, b * t);
    let e = err(embedding::backward(
        gpu,
        TableChunk::whole(&wte),
        Some(&wpe),
        &out,
        &tokens,
        &short_index,
        dims,
    ));
    assert!(e.contains("tensor index_short"), "{e}");
    let e = err(embedding::backward(
        gpu,
        TableChunk::whole(&wte),
        Some(&short_wpe),
        &out,
        &tokens,
        &index,
        dims,
    ));
    assert!(e.contains("tensor wpe_short"), "{e}");
    let e = err(embedding::backward(
        gpu,
        TableChunk::whole(&wte),
        None,
        &out,
        &tokens,
        &index,
        Dims { c: 0, ..dims },
    ));
    assert!(e.contains("C = 0"), "{e}");
}

/// f16 tables against the reference on the f16-rounded tables (exact: one f32 add of two widened
/// f16 values): C = 45 (scalar loads, odd f16 lengths) and C = 64 (vec4<f16> loads), the table
/// split into two chunks of 7 and 6 rows; tokens outside the table leave their rows untouched.
#[test]
fn f16_tables_match_reference() {
    let Some(gpu) = test_gpu() else { return };
    if !gpu.has_f16() {
        return;
    }
    let (b, t, v) = (2, 5, 13);
    let tokens: Vec<u32> = vec![0, 12, 7, 6, 99, 3, 3, 11, 6, 5];
    for c in [45, 64] {
        let dims = Dims { b, t, c };
        let mut rng = Rng::new(c as u64);
        let wte: Vec<f16> = rng
            .vec_uniform(v * c, -1.0, 1.0)
            .iter()
            .map(|&x| f16::from_f32(x))
            .collect();
        let wpe: Vec<f16> = rng
            .vec_uniform(t * c, -1.0, 1.0)
            .iter()
            .map(|&x| f16::from_f32(x))
            .collect();
        let widen = |x: &[f16]| -> Vec<f32> { x.iter().map(|h| h.to_f32()).collect() };
        let g_tokens = gpu.upload_u32("tokens", &tokens).unwrap();
        let g_wpe = gpu.upload("wpe", DType::F16, &wpe).unwrap();
        let out0 = vec![-7.0f32; b * t * c];
        let g_out = gpu.upload_f32("out", &out0).unwrap();
        let mut want = out0.clone();
        let mut d = Vec::new();
        let mut tables = Vec::new();
        for (r0, rows) in [(0, 7), (7, 6)] {
            let chunk = &wte[r0 * c..(r0 + rows) * c];
            tables.push(gpu.upload("wte", DType::F16, chunk).unwrap());
            d.push(
                embedding::forward(
                    gpu,
                    &g_out,
                    &g_tokens,
                    TableChunk {
                        view: tables.last().unwrap(),
                        row0: r0,
                    },
                    &g_wpe,
                    dims,
                )
                .unwrap(),
            );
            reference::embedding::forward(
                &mut want,
                &tokens,
                &widen(chunk),
                r0,
                &widen(&wpe),
                dims,
            );
        }
        let entry = if c % 4 == 0 {
            "embedding_forward_vec4"
        } else {
            "embedding_forward"
        };
        assert_eq!(d[0].name, format!("embedding_f16.{entry}"));
        gpu.run(&d).unwrap();
        let got = gpu.read_f32(&g_out).unwrap();
        reference::compare(&format!("f16 tables C={c}"), &got, &want, 0.0, 0.0).assert();
        assert!(
            got[4 * c..5 * c].iter().all(|&x| x == -7.0),
            "token 99 row was written"
        );
    }
}

#[test]
fn mismatched_table_dtypes_are_an_error() {
    let Some(gpu) = test_gpu() else { return };
    let (b, t, c, v) = (2, 3, 4, 10);
    let dims = Dims { b, t, c };
    let z = |name: &str, dtype, len| gpu.zeros(name, dtype, len).unwrap();
    let out = z("out", DType::F32, b * t * c);
    let tokens = z("tokens", DType::U32, b * t);
    let (wte, wte16) = (z("wte", DType::F32, v * c), z("wte16", DType::F16, v * c));
    let (wpe, wpe16) = (z("wpe", DType::F32, t * c), z("wpe16", DType::F16, t * c));
    fn err<T>(r: shaderformer::Result<T>) -> String {
        r.map(|_| ()).unwrap_err().to_string()
    }
    let e = err(embedding::forward(
        gpu,
        &out,
        &tokens,
        TableChunk::whole(&wte16),
        &wpe,
        dims,
    ));
    assert!(e.contains("tensor wpe") && e.contains("f16"), "{e}");
    let e = err(embedding::forward(
        gpu,
        &out,
        &tokens,
        TableChunk::whole(&wte),
        &wpe16,
        dims,
    ));
    assert!(e.contains("tensor wpe16") && e.contains("f32"), "{e}");
    let out16 = z("out16", DType::F16, b * t * c);
    let e = err(embedding::forward(
        gpu,
        &out16,
        &tokens,
        TableChunk::whole(&wte16),
        &wpe16,
        dims,
    ));
    assert!(e.contains("tensor out16"), "{e}");
    // The backward is f32 only.
    let index = z("index", DType::U32, embedding::backward_index_len(b * t));
    let e = err(embedding::backward(
        gpu,
        TableChunk::whole(&wte16),
        None,
        &out,
        &tokens,
        &index,
        dims,
    ));
    assert!(e.contains("tensor wte16") && e.contains("f32"), "{e}");

    // On an adapter without SHADER_F16, f16 tables are a clear error naming the table.
    let mut no_f16 = Gpu::new(&GpuOptions::from_env()).unwrap();
    no_f16.features.remove(wgpu::Features::SHADER_F16);
    let gpu = &no_f16;
    let out = gpu.zeros("out", DType::F32, b * t * c).unwrap();
    let tokens = gpu.zeros("tokens", DType::U32, b * t).unwrap();
    let wte16 = gpu.zeros("wte16", DType::F16, v * c).unwrap();
    let wpe16 = gpu.zeros("wpe16", DType::F16, t * c).unwrap();
    let e = err(embedding::forward(
        gpu,
        &out,
        &tokens,
        TableChunk::whole(&wte16),
        &wpe16,
        dims,
    ));
    assert!(
        e.contains("tensor wte16") && e.contains("SHADER_F16"),
        "{e}"
    );
}
