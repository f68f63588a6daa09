//! Attention: the fused kernels (forward and backward, at the adapter's tiling and at the
//! 16 KiB WebGPU-minimum tiling), the GEMM path and KV-cache decoding (f32 and f16 caches)
//! against the CPU reference; the reference's backward against finite differences; determinism;
//! bad input.
//!
//! Each `check` runs causal and non-causal, so every configuration below is covered in both.

use half::f16;
use shaderformer::gpu::{DType, Gpu, GpuOptions, test_gpu};
use shaderformer::kernels::attention::check::{EXHAUSTIVE_SHAPES, Variants};
use shaderformer::kernels::attention::{self, BackwardTensors, Dims, KvCache, MAX_HS, Options};
use shaderformer::kernels::step;
use shaderformer::reference::{self, dot, numeric_grad};
use shaderformer::rng::Rng;

/// Runs the check of the variants `which` selects on one (B, NH, T, HS) and asserts every
/// comparison.
fn check_shape(gpu: &Gpu, shape: &[usize], which: Variants) {
    let reports = attention::check::check_variants(gpu, shape, which)
        .unwrap_or_else(|e| panic!("attention {shape:?} {which:?}: {e}"));
    for r in reports {
        eprintln!("attention {} {}", r.shape, r.comparison);
        r.comparison.assert();
    }
}

/// Every variant at each of the family's awkward default shapes.
#[test]
fn gpu_matches_reference() {
    crate::check_family(&attention::FAMILY);
}

/// The shapes of `kernels check attention --exhaustive`, each with one variant (`gpu_matches_reference`
/// runs them all on the awkward shapes): the variants taken in turn at each head capacity, so
/// that each meets several lengths without every variant being compiled and run at every shape.
fn sweep(shapes: &[&[usize]]) {
    let Some(gpu) = test_gpu() else { return };
    let mut turn = std::collections::HashMap::new();
    for shape in shapes {
        let hs = shape[3];
        let i = turn.entry(hs.max(16).next_power_of_two()).or_insert(0);
        check_shape(gpu, shape, Variants::One(*i));
        *i += 1;
    }
}

/// Every pair of T ∈ {1, 7, 37, 64, 129} and HS ∈ {8, 16, 64}, at NH = 3 and B = 2.
#[test]
fn every_t_with_every_head_size() {
    sweep(&EXHAUSTIVE_SHAPES[..15]);
}

/// The extremes of NH ∈ {1, 12} with both B ∈ {1, 2}, at a T that spans several tiles and a T
/// of one partial tile, with the smallest and largest head sizes of the grid.
#[test]
fn head_and_batch_extremes() {
    sweep(&EXHAUSTIVE_SHAPES[15..]);
}

/// Decoding with a prefill of 5 tokens and then 1-token steps, and with a prefill of 3 and then
/// chunks of 4 new tokens at a time, gives the rows of the full causal forward: multi-head, and
/// grouped-query with caches of the key/value heads alone.
#[test]
fn decoding_matches_the_full_forward() {
    let Some(gpu) = test_gpu() else { return };
    let (b, nh, t, hs) = (2, 3, 37, 64);
    let grouped = Dims {
        nh: 6,
        nkv: 2,
        hs: 16,
        ..Dims::mha(b, t, nh, hs)
    };
    for dims in [Dims::mha(b, t, nh, hs), grouped] {
        let (qkv, _) = attention::check_inputs(dims);
        let gqkv = gpu.upload_f32("qkv", &qkv).unwrap();
        let out = gpu.zeros("out", DType::F32, b * t * dims.c()).unwrap();
        let lse = gpu.zeros("lse", DType::F32, b * dims.nh * t).unwrap();
        gpu.run(&attention::forward(gpu, &out, &lse, &gqkv, dims, Options::CAUSAL).unwrap())
            .unwrap();
        let full = gpu.read_f32(&out).unwrap();
        for (prefill, step) in [(5, 1), (3, 4)] {
            let decoded = attention::decode(gpu, &qkv, dims, prefill, step).unwrap();
            let name = format!("{dims:?}: decoded out, prefill {prefill}, steps of {step}");
            reference::compare(&name, &decoded, &full, 1e-6, 1e-6).assert();
        }
    }
}

/// A grouped-query KV cache holds the NKV key/value heads: caches sized for the NH query heads
/// are refused naming the cache, and key/value heads that do not divide the query heads are
/// refused naming both counts.
#[test]
fn grouped_query_caches_hold_the_key_value_heads() {
    let Some(gpu) = test_gpu() else { return };
    let (b, nh, nkv, hs, tmax) = (1, 6, 2, 8, 8);
    let z = |name, n| gpu.zeros(name, DType::F32, n).unwrap();
    let dims = Dims {
        nkv,
        ..Dims::mha(b, 1, nh, hs)
    };
    let (qkv, out) = (z("qkv", b * dims.width()), z("out", b * dims.c()));
    // The k and v caches of `heads` heads.
    let caches = |heads: usize| ["k_cache", "v_cache"].map(|name| z(name, b * heads * tmax * hs));
    let ([kc, vc], [kc_nh, vc_nh]) = (caches(nkv), caches(nh));
    let cache = KvCache {
        k: &kc,
        v: &vc,
        tmax,
    };
    gpu.run(&[attention::kv_append(gpu, cache, &qkv, dims, 0).unwrap()])
        .unwrap();
    gpu.run(&[attention::forward_cached(gpu, &out, &qkv, cache, dims, 0).unwrap()])
        .unwrap();
    let per_query_head = KvCache {
        k: &kc_nh,
        v: &vc_nh,
        tmax,
    };
    let err = attention::kv_append(gpu, per_query_head, &qkv, dims, 0)
        .unwrap_err()
        .to_string();
    assert!(err.contains("tensor k_cache"), "{err}");
    let err = attention::forward_cached(gpu, &out, &qkv, per_query_head, dims, 0)
        .unwrap_err()
        .to_string();
    assert!(err.contains("tensor k_cache"), "{err}");
    let uneven = Dims { nkv: 4, ..dims };
    let err = attention::forward_cached(gpu, &out, &qkv, cache, uneven, 0)
        .unwrap_err()
        .to_string();
    assert!(err.contains("NKV = 4") && err.contains("NH = 6"), "{err}");
}

/// With and without a dropout mask (a fixed mask: the function stays differentiable).
#[test]
fn reference_backward_matches_finite_differences() {
    let (b, t, nh, hs) = (2, 4, 4, 3);
    // Multi-head, and two query heads per key/value head.
    for dims in [
        Dims::mha(b, t, nh, hs),
        Dims {
            nkv: 2,
            ..Dims::mha(b, t, nh, hs)
        },
    ] {
        finite_differences(dims);
    }
}

fn finite_differences(dims: Dims) {
    let Dims { b, t, nh, .. } = dims;
    let c = dims.c();
    let mut rng = Rng::new(3);
    let qkv: Vec<f64> = reference::convert(&rng.vec_uniform(b * t * dims.width(), -2.0, 2.0));
    let w: Vec<f64> = reference::convert(&rng.vec_uniform(b * t * c, -1.0, 1.0));
    let d = attention::Dropout {
        p: 0.3,
        seed: 11,
        step: 2,
    };
    let noncausal = Options {
        causal: false,
        dropout: None,
    };
    let dropped = Options {
        dropout: Some(d),
        ..Options::CAUSAL
    };
    for opts in [Options::CAUSAL, noncausal, dropped] {
        let square = b * nh * t * t;
        let forward = |x: &[f64]| {
            let mut out = vec![0.0; b * t * c];
            let (mut pre, mut att) = (vec![0.0; square], vec![0.0; square]);
            let mut lse = vec![0.0; b * nh * t];
            reference::attention::forward(&mut out, &mut pre, &mut att, &mut lse, x, dims, opts);
            (out, att)
        };
        let (_, att) = forward(&qkv);
        let mut dqkv = vec![0.0; b * t * dims.width()];
        let (mut dpre, mut datt) = (vec![0.0; square], vec![0.0; square]);
        reference::attention::backward(&mut dqkv, &mut dpre, &mut datt, &w, &qkv, &att, dims, opts);
        let numeric = numeric_grad(&qkv, 1e-5, |x| dot(&forward(x).0, &w));
        reference::compare(
            &format!(
                "dqkv NKV={} causal={} dropout={}",
                dims.nkv,
                opts.causal,
                opts.dropout.is_some()
            ),
            &dqkv,
            &numeric,
            1e-8,
            1e-6,
        )
        .assert();
    }
}

/// The attention dropout mask keeps about 1 - p of the probabilities, scaled by 1/(1 - p),
/// changes with the step, the seed and the position, and changes the output.
#[test]
fn dropout_mask_keeps_one_minus_p_and_changes_the_output() {
    let (b, nh, t, hs) = (2, 3, 64, 8);
    let dims = Dims::mha(b, t, nh, hs);
    let d = attention::Dropout {
        p: 0.25,
        seed: 9,
        step: 0,
    };
    let mask: Vec<f64> = reference::attention::dropout_mask(b, nh, t, d);
    let kept = mask.iter().filter(|&&m| m != 0.0).count() as f64 / mask.len() as f64;
    assert!(
        (kept - 0.75).abs() < 0.01,
        "kept {kept} of the probabilities"
    );
    assert!(
        mask.iter()
            .all(|&m| m == 0.0 || (m - 1.0 / 0.75).abs() < 1e-6)
    );
    for other in [
        attention::Dropout { step: 1, ..d },
        attention::Dropout { seed: 10, ..d },
    ] {
        let m2: Vec<f64> = reference::attention::dropout_mask(b, nh, t, other);
        let same = mask.iter().zip(&m2).filter(|(x, y)| x == y).count() as f64;
        // Independent masks agree on 0.75² + 0.25² = 62.5% of the entries.
        assert!(same / (mask.len() as f64) < 0.7, "{other:?}: {same} equal");
    }
    // Rows of different heads or batches do not repeat one another.
    let row = |r: usize| &mask[r * t..(r + 1) * t];
    assert_ne!(row(0), row(t), "head 1 repeats head 0");
    assert_ne!(row(0), row(nh * t), "batch 1 repeats batch 0");

    let (qkv, _) = attention::check_inputs(dims);
    let qkv: Vec<f64> = reference::convert(&qkv);
    let run = |opts: Options| {
        let square = b * nh * t * t;
        let mut out = vec![0.0; b * t * nh * hs];
        let (mut pre, mut att) = (vec![0.0; square], vec![0.0; square]);
        let mut lse = vec![0.0; b * nh * t];
        reference::attention::forward(&mut out, &mut pre, &mut att, &mut lse, &qkv, dims, opts);
        out
    };
    let dropout = Options {
        dropout: Some(d),
        ..Options::CAUSAL
    };
    let (plain, dropped) = (run(Options::CAUSAL), run(dropout));
    let diff = plain
        .iter()
        .zip(&dropped)
        .fold(0.0f64, |a, (x, y)| a.max((x - y).abs()));
    assert!(diff > 0.1, "dropout changed the output by only {diff}");
}

/// A dispatch that reads its mask's counter from the per-step uniform, moved to another counter
/// by rewriting the uniform (how the graph executor draws a fresh mask every micro-step), gives
/// the result of a dispatch built at that counter.
#[test]
fn the_step_uniform_moves_a_dispatch_to_another_mask() {
    let Some(gpu) = test_gpu() else { return };
    let (b, nh, t, hs) = (1, 2, 37, 16);
    let dims = Dims::mha(b, t, nh, hs);
    let c = nh * hs;
    let (qkv, dout) = attention::check_inputs(dims);
    let gqkv = gpu.upload_f32("qkv", &qkv).unwrap();
    let gdout = gpu.upload_f32("dout", &dout).unwrap();
    let at = |step| attention::Dropout {
        p: 0.4,
        seed: 77,
        step,
    };
    let run = |build: u32, run_at: Option<u32>| {
        let out = gpu.zeros("out", DType::F32, b * t * c).unwrap();
        let lse = gpu.zeros("lse", DType::F32, b * nh * t).unwrap();
        let dqkv = gpu.zeros("dqkv", DType::F32, b * t * 3 * c).unwrap();
        let opts = Options {
            dropout: Some(at(build)),
            ..Options::CAUSAL
        };
        let tensors = BackwardTensors {
            dqkv: &dqkv,
            dout: &gdout,
            qkv: &gqkv,
            out: &out,
            lse: &lse,
        };
        let mut ds;
        match run_at {
            None => {
                ds = attention::forward(gpu, &out, &lse, &gqkv, dims, opts).unwrap();
                ds.extend(attention::backward(gpu, tensors, dims, opts).unwrap());
            }
            Some(counter) => {
                let uniform = step::uniform(gpu, "step", &step::Step::default()).unwrap();
                ds = attention::forward_at(gpu, &out, &lse, &gqkv, dims, opts, &uniform).unwrap();
                let bwd = attention::backward_at(gpu, tensors, dims, opts, &uniform);
                ds.extend(bwd.unwrap());
                let at = step::Step {
                    dropout_step: counter,
                    ..Default::default()
                };
                step::write(gpu, &uniform, &at).unwrap();
            }
        }
        gpu.run(&ds).unwrap();
        [out, dqkv].map(|v| gpu.read_u32(&v).unwrap())
    };
    let direct = run(5, None);
    let moved = run(0, Some(5));
    let other = run(0, None);
    assert_eq!(
        direct, moved,
        "a dispatch moved to step 5 differs from one built there"
    );
    assert_ne!(direct[0], other[0], "steps 0 and 5 drew the same mask");
}

#[test]
fn reference_lse_is_the_log_of_the_softmax_denominator() {
    let (b, t, nh, hs) = (1, 5, 2, 4);
    let dims = Dims::mha(b, t, nh, hs);
    let c = nh * hs;
    let qkv: Vec<f64> = reference::convert(&Rng::new(5).vec_uniform(b * t * 3 * c, -2.0, 2.0));
    let square = b * nh * t * t;
    let mut out = vec![0.0; b * t * c];
    let (mut pre, mut att) = (vec![0.0; square], vec![0.0; square]);
    let mut lse = vec![0.0; b * nh * t];
    reference::attention::forward(
        &mut out,
        &mut pre,
        &mut att,
        &mut lse,
        &qkv,
        dims,
        Options::CAUSAL,
    );
    // att = exp(preatt - lse) on the unmasked entries
    for row in 0..b * nh * t {
        for j in 0..=row % t {
            let want = (pre[row * t + j] - lse[row]).exp();
            assert!((att[row * t + j] - want).abs() < 1e-12, "row {row} key {j}");
        }
    }
}

/// Two runs of every kernel on the same inputs give the same bits.
#[test]
fn results_are_bit_identical_run_to_run() {
    let Some(gpu) = test_gpu() else { return };
    let (b, nh, t, hs) = (2, 3, 129, 64);
    let dims = Dims::mha(b, t, nh, hs);
    let c = nh * hs;
    let (qkv, dout) = attention::check_inputs(dims);
    let gqkv = gpu.upload_f32("qkv", &qkv).unwrap();
    let gdout = gpu.upload_f32("dout", &dout).unwrap();
    let run = || {
        let out = gpu.zeros("out", DType::F32, b * t * c).unwrap();
        let lse = gpu.zeros("lse", DType::F32, b * nh * t).unwrap();
        let dqkv = gpu.zeros("dqkv", DType::F32, b * t * 3 * c).unwrap();
        let mut ds = attention::forward(gpu, &out, &lse, &gqkv, dims, Options::CAUSAL).unwrap();
        ds.extend(
            attention::backward(
                gpu,
                BackwardTensors {
                    dqkv: &dqkv,
                    dout: &gdout,
                    qkv: &gqkv,
                    out: &out,
                    lse: &lse,
                },
                dims,
                Options::CAUSAL,
            )
            .unwrap(),
        );
        gpu.run(&ds).unwrap();
        [out, lse, dqkv].map(|v| gpu.read_u32(&v).unwrap())
    };
    let (first, second) = (run(), run());
    for (name, (a, b)) in ["out", "lse", "dqkv"].iter().zip(first.iter().zip(&second)) {
        let diff = a.iter().zip(b).filter(|(x, y)| x != y).count();
        assert_eq!(
            diff,
            0,
            "{name}: {diff} of {} values differ between runs",
            a.len()
        );
    }
}

#[test]
fn head_size_beyond_the_maximum_is_an_error() {
    let Some(gpu) = test_gpu() else { return };
    let (b, t, nh, hs) = (1, 2, 1, MAX_HS + 1);
    let dims = Dims::mha(b, t, nh, hs);
    let c = nh * hs;
    let z = |name, n| gpu.zeros(name, DType::F32, n).unwrap();
    let (qkv, out, lse, dqkv) = (
        z("qkv", b * t * 3 * c),
        z("out", b * t * c),
        z("lse", t),
        z("dqkv", b * t * 3 * c),
    );
    let err = attention::forward(gpu, &out, &lse, &qkv, dims, Options::CAUSAL)
        .unwrap_err()
        .to_string();
    assert!(err.contains("HS = 129") && err.contains("MAX_HS"), "{err}");
    let err = attention::backward(
        gpu,
        BackwardTensors {
            dqkv: &dqkv,
            dout: &out,
            qkv: &qkv,
            out: &out,
            lse: &lse,
        },
        dims,
        Options::CAUSAL,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("MAX_HS"), "{err}");
    let cache = z("cache", b * nh * 4 * hs);
    let err = attention::forward_cached(
        gpu,
        &out,
        &qkv,
        KvCache {
            k: &cache,
            v: &cache,
            tmax: 4,
        },
        dims,
        0,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("MAX_HS"), "{err}");
}

#[test]
fn head_size_not_matching_the_channels_is_an_error() {
    let Some(gpu) = test_gpu() else { return };
    let (b, t) = (2, 5);
    let z = |name, n| gpu.zeros(name, DType::F32, n).unwrap();
    // Tensors for C = 64, called with NH = 3, HS = 16 (C = 48).
    let dims = Dims::mha(b, t, 3, 16);
    let (qkv, out, lse) = (
        z("qkv", b * t * 3 * 64),
        z("out", b * t * 48),
        z("lse", b * 3 * t),
    );
    let err = attention::forward(gpu, &out, &lse, &qkv, dims, Options::CAUSAL)
        .unwrap_err()
        .to_string();
    assert!(err.contains("tensor qkv") && err.contains("1920"), "{err}");
    let short_lse = z("lse", b * 3 * t - 1);
    let qkv48 = z("qkv", b * t * 3 * 48);
    let err = attention::forward(gpu, &out, &short_lse, &qkv48, dims, Options::CAUSAL)
        .unwrap_err()
        .to_string();
    assert!(err.contains("tensor lse"), "{err}");
}

#[test]
fn positions_beyond_the_cache_are_an_error() {
    let Some(gpu) = test_gpu() else { return };
    let (b, nh, hs, tmax) = (1, 2, 8, 8);
    let c = nh * hs;
    let z = |name, n| gpu.zeros(name, DType::F32, n).unwrap();
    let (kc, vc) = (
        z("k_cache", b * nh * tmax * hs),
        z("v_cache", b * nh * tmax * hs),
    );
    let cache = KvCache {
        k: &kc,
        v: &vc,
        tmax,
    };
    // Three new tokens.
    let dims = Dims::mha(b, 3, nh, hs);
    let (qkv, out) = (z("qkv", b * 3 * 3 * c), z("out", b * 3 * c));
    let err = attention::kv_append(gpu, cache, &qkv, dims, 6)
        .unwrap_err()
        .to_string();
    assert!(err.contains("Tmax = 8") && err.contains("9"), "{err}");
    let err = attention::forward_cached(gpu, &out, &qkv, cache, dims, 6)
        .unwrap_err()
        .to_string();
    assert!(err.contains("Tmax = 8"), "{err}");
    // A cache allocated for a different Tmax is named.
    let err = attention::forward_cached(gpu, &out, &qkv, KvCache { tmax: 16, ..cache }, dims, 0)
        .unwrap_err()
        .to_string();
    assert!(err.contains("tensor k_cache"), "{err}");
}

/// Decoding over f16 caches gives what the f32 path gives on the same f16-rounded keys and values,
/// for HS 8, 16, 64, 128 at T not a multiple of any tile, with 1-token steps and chunks of 4.
#[test]
fn f16_cache_decoding_matches_the_f32_path_on_rounded_data() {
    let Some(gpu) = test_gpu() else { return };
    if !gpu.has_f16() {
        return;
    }
    for (b, nh, t, hs, prefill, step) in [
        (2, 3, 37, 8, 5, 1),
        (1, 2, 21, 16, 3, 4),
        (2, 1, 33, 64, 1, 1),
        (1, 2, 19, 128, 3, 4),
    ] {
        let dims = Dims::mha(b, t, nh, hs);
        let (qkv, _) = attention::check_inputs(dims);
        let rounded = attention::round_kv_f16(&qkv, dims);
        let f32_out =
            attention::decode_cached(gpu, &rounded, dims, prefill, step, DType::F32).unwrap();
        let f16_out =
            attention::decode_cached(gpu, &rounded, dims, prefill, step, DType::F16).unwrap();
        let name = format!("B={b} NH={nh} T={t} HS={hs}, prefill {prefill}, steps of {step}");
        reference::compare(&name, &f16_out, &f32_out, 1e-6, 1e-6).assert();
    }
}

/// kv_append into f16 caches writes each element, rounded to f16, into its own half of a word:
/// odd HS and an odd pos0 put rows across word boundaries, and every element outside the new
/// rows keeps its old value.
#[test]
fn f16_kv_append_writes_each_half_word() {
    let Some(gpu) = test_gpu() else { return };
    if !gpu.has_f16() {
        return;
    }
    let (b, nh, hs, tmax, tq, pos0) = (2, 3, 5, 9, 3, 3);
    let dims = Dims::mha(b, tq, nh, hs);
    let c = nh * hs;
    let mut rng = Rng::new(8);
    let qkv = rng.vec_uniform(b * tq * 3 * c, -3.0, 3.0);
    let gqkv = gpu.upload_f32("qkv", &qkv).unwrap();
    let sentinel = f16::from_f32(-1000.0);
    let old = vec![sentinel; b * nh * tmax * hs];
    let kc = gpu.upload("k_cache", DType::F16, &old).unwrap();
    let vc = gpu.upload("v_cache", DType::F16, &old).unwrap();
    let d = attention::kv_append(
        gpu,
        KvCache {
            k: &kc,
            v: &vc,
            tmax,
        },
        &gqkv,
        dims,
        pos0,
    )
    .unwrap();
    assert_eq!(d.name, "attention_f16.kv_append");
    gpu.run(&[d]).unwrap();
    let read = |v| -> Vec<f16> { bytemuck::pod_collect_to_vec(&gpu.read_bytes(v).unwrap()) };
    for (part, cache) in [(1, read(&kc)), (2, read(&vc))] {
        for bi in 0..b {
            for h in 0..nh {
                for pos in 0..tmax {
                    for d in 0..hs {
                        let got = cache[((bi * nh + h) * tmax + pos) * hs + d];
                        if pos < pos0 || pos >= pos0 + tq {
                            assert_eq!(got, sentinel, "part {part} b {bi} h {h} pos {pos} d {d}");
                            continue;
                        }
                        let x = qkv[(bi * tq + pos - pos0) * 3 * c + part * c + h * hs + d];
                        // Within one f16 step of x: 2^-10 relative, 2^-24 for subnormals.
                        let step = (x.abs() / 1024.0).max(2f32.powi(-24));
                        assert!(
                            (got.to_f32() - x).abs() <= step,
                            "part {part} b {bi} h {h} pos {pos} d {d}: {got} for {x}"
                        );
                    }
                }
            }
        }
    }
}

/// The error an f16 cache costs against the f32 cache on unrounded data, for the record; the
/// bound holds for rounding and fails for a cache read or written at the wrong element.
#[test]
fn f16_cache_error_against_the_f32_cache() {
    let Some(gpu) = test_gpu() else { return };
    if !gpu.has_f16() {
        return;
    }
    let (b, nh, t, hs) = (1, 2, 40, 64);
    let dims = Dims::mha(b, t, nh, hs);
    let (qkv, _) = attention::check_inputs(dims);
    let f32_out = attention::decode_cached(gpu, &qkv, dims, 4, 1, DType::F32).unwrap();
    let f16_out = attention::decode_cached(gpu, &qkv, dims, 4, 1, DType::F16).unwrap();
    let scale = f32_out.iter().fold(0.0f32, |a, x| a.max(x.abs()));
    let err = f16_out
        .iter()
        .zip(&f32_out)
        .fold(0.0f32, |a, (x, y)| a.max((x - y).abs()))
        / scale;
    eprintln!("decode B={b} NH={nh} T={t} HS={hs}: max |f16 - f32| / max |out| = {err:.2e}");
    assert!(err < 1e-2, "f16 cache: relative error {err:.3e}");
}

#[test]
fn mismatched_cache_dtypes_are_an_error() {
    let Some(gpu) = test_gpu() else { return };
    let (b, nh, hs, tmax, tq) = (1, 2, 8, 8, 2);
    let dims = Dims::mha(b, tq, nh, hs);
    let c = nh * hs;
    let n = b * nh * tmax * hs;
    let z = |name, dtype, len| gpu.zeros(name, dtype, len).unwrap();
    let (kc16, vc16) = (z("k_cache16", DType::F16, n), z("v_cache16", DType::F16, n));
    let (kc, vc) = (z("k_cache", DType::F32, n), z("v_cache", DType::F32, n));
    let (qkv, out) = (
        z("qkv", DType::F32, b * tq * 3 * c),
        z("out", DType::F32, b * tq * c),
    );
    let qkv16 = z("qkv16", DType::F16, b * tq * 3 * c);
    fn err<T>(r: shaderformer::Result<T>) -> String {
        r.map(|_| ()).unwrap_err().to_string()
    }
    let cache16 = KvCache {
        k: &kc16,
        v: &vc16,
        tmax,
    };
    let cache32 = KvCache {
        k: &kc,
        v: &vc,
        tmax,
    };
    let e = err(attention::kv_append(
        gpu,
        KvCache { v: &vc, ..cache16 },
        &qkv,
        dims,
        0,
    ));
    assert!(e.contains("tensor v_cache") && e.contains("f16"), "{e}");
    let e = err(attention::kv_append(
        gpu,
        KvCache {
            v: &vc16,
            ..cache32
        },
        &qkv,
        dims,
        0,
    ));
    assert!(e.contains("tensor v_cache16") && e.contains("f32"), "{e}");
    let mixed = KvCache { v: &vc, ..cache16 };
    let e = err(attention::forward_cached(gpu, &out, &qkv, mixed, dims, 0));
    assert!(e.contains("tensor v_cache"), "{e}");
    let e = err(attention::forward_cached(
        gpu, &out, &qkv16, cache16, dims, 0,
    ));
    assert!(e.contains("tensor qkv16"), "{e}");
    let e = err(attention::kv_append(gpu, cache16, &qkv16, dims, 0));
    assert!(e.contains("tensor qkv16"), "{e}");

    // On an adapter without SHADER_F16, f16 caches are a clear error naming the cache.
    let mut no_f16 = Gpu::new(&GpuOptions::from_env()).unwrap();
    no_f16.features.remove(wgpu::Features::SHADER_F16);
    let gpu = &no_f16;
    let z = |name, dtype, len| gpu.zeros(name, dtype, len).unwrap();
    let (kc16, vc16) = (z("k_cache16", DType::F16, n), z("v_cache16", DType::F16, n));
    let (qkv, out) = (
        z("qkv", DType::F32, b * tq * 3 * c),
        z("out", DType::F32, b * tq * c),
    );
    let cache16 = KvCache {
        k: &kc16,
        v: &vc16,
        tmax,
    };
    let e = err(attention::kv_append(gpu, cache16, &qkv, dims, 0));
    assert!(
        e.contains("tensor k_cache16") && e.contains("SHADER_F16"),
        "{e}"
    );
    let e = err(attention::forward_cached(gpu, &out, &qkv, cache16, dims, 0));
    assert!(
        e.contains("tensor k_cache16") && e.contains("SHADER_F16"),
        "{e}"
    );
}
