use shaderformer::gpu::{DType, test_gpu};
use shaderformer::kernels::rope::{self, Dims, Rope, RopeScaling};
use shaderformer::reference::{self, dot, numeric_grad};
use shaderformer::rng::Rng;

#[test]
fn gpu_matches_reference() {
    crate::check_family(&rope::FAMILY);
}

/// The inverse frequencies of head size `d` at `theta`, scaled as `scaling` says.
fn inv_freq(d: usize, theta: f64, scaling: RopeScaling) -> Vec<f32> {
    Rope { theta, scaling }.inv_freq(d)
}

fn dims(b: usize, t: usize, heads: usize, rotated: usize, d: usize) -> Dims {
    Dims {
        b,
        t,
        heads,
        rotated,
        d,
    }
}

#[test]
fn reference_backward_matches_finite_differences() {
    for (dims, pos0) in [(dims(1, 1, 1, 1, 2), 0), (dims(2, 3, 3, 2, 6), 7)] {
        let n = dims.b * dims.t * dims.heads * dims.d;
        let mut rng = Rng::new(n as u64);
        let freq = inv_freq(dims.d, 10_000.0, RopeScaling::None);
        let inp: Vec<f64> = reference::convert(&rng.vec_uniform(n, -1.0, 1.0));
        let w: Vec<f64> = reference::convert(&rng.vec_uniform(n, -1.0, 1.0));
        let mut dinp = vec![0.0; n];
        reference::rope::backward(&mut dinp, &w, &freq, dims, pos0);
        let ndinp = numeric_grad(&inp, 1e-6, |x| {
            let mut out = vec![0.0; n];
            reference::rope::forward(&mut out, x, &freq, dims, pos0);
            dot(&out, &w)
        });
        reference::compare("dinp", &dinp, &ndinp, 1e-8, 1e-6).assert();
    }
}

#[test]
fn reference_rotates_the_halves_as_transformers_does() {
    // D = 4, inv_freq [1, 0.01] (theta 10⁴), position 2: pair 0 turns by 2 rad, pair 1 by 0.02.
    let freq = inv_freq(4, 10_000.0, RopeScaling::None);
    assert_eq!(freq, vec![1.0, 0.01]);
    let x = [1.0, 2.0, 3.0, 4.0];
    let mut out = vec![0.0f64; 4];
    reference::rope::forward(&mut out, &x, &freq, dims(1, 1, 1, 1, 4), 2);
    let (a0, a1) = (2.0f64, (2.0f32 * 0.01f32) as f64);
    let want = [
        1.0 * a0.cos() - 3.0 * a0.sin(),
        2.0 * a1.cos() - 4.0 * a1.sin(),
        3.0 * a0.cos() + 1.0 * a0.sin(),
        4.0 * a1.cos() + 2.0 * a1.sin(),
    ];
    reference::compare("out", &out, &want, 1e-15, 0.0).assert();
}

#[test]
fn llama3_scaling_keeps_high_divides_low_and_blends_between() {
    // Llama 3.1's values at D = 8, theta 5·10⁵: wavelengths 6.3, 167 (kept: under 8192 / 4),
    // 4443 (blended) and 118143 (over 8192: divided by 8). The values transformers 5 computes
    // (`_compute_llama3_parameters`, float32), bit for bit.
    let llama3 = RopeScaling::Llama3 {
        factor: 8.0,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position_embeddings: 8192,
    };
    let got = inv_freq(8, 500_000.0, llama3);
    let want: [f32; 4] = [1.0, 0.037_606_03, 0.000_524_846, 6.647_869_7e-6];
    assert_eq!(got, want);
    let linear = inv_freq(8, 500_000.0, RopeScaling::Linear { factor: 4.0 });
    let plain = inv_freq(8, 500_000.0, RopeScaling::None);
    let quarter: Vec<f32> = plain.iter().map(|f| f / 4.0).collect();
    reference::compare("linear", &linear, &quarter, 0.0, 1e-7).assert();
}

/// Scalings that would raise a frequency above 1 (a factor below 1), or give meaningless ones,
/// are refused naming the field: the kernel's angle reduction counts on frequencies at most 1.
#[test]
fn scalings_the_kernel_cannot_take_are_refused_by_name() {
    let rope = |theta, scaling| Rope { theta, scaling }.validate();
    assert!(rope(10_000.0, RopeScaling::Linear { factor: 2.0 }).is_ok());
    let err = rope(10_000.0, RopeScaling::Linear { factor: 0.5 }).unwrap_err();
    assert!(
        err.to_string().contains("factor") && err.to_string().contains("0.5"),
        "{err}"
    );
    let err = rope(0.5, RopeScaling::None).unwrap_err();
    assert!(err.to_string().contains("rope_theta"), "{err}");
    let llama3 = |factor, low_freq_factor| RopeScaling::Llama3 {
        factor,
        low_freq_factor,
        high_freq_factor: 4.0,
        original_max_position_embeddings: 8192,
    };
    assert!(rope(5e5, llama3(8.0, 1.0)).is_ok());
    let err = rope(5e5, llama3(0.5, 1.0)).unwrap_err();
    assert!(err.to_string().contains("factor"), "{err}");
    let err = rope(5e5, llama3(8.0, 0.0)).unwrap_err();
    assert!(err.to_string().contains("low_freq_factor"), "{err}");
}

#[test]
fn an_odd_head_dim_is_refused() {
    let Some(gpu) = test_gpu() else { return };
    let zeros = |name: &str, n| gpu.zeros(name, DType::F32, n).unwrap();
    let (x, out, freq) = (
        zeros("inp", 2 * 5),
        zeros("out", 2 * 5),
        zeros("inv_freq", 2),
    );
    let err = rope::forward(gpu, &out, &x, &freq, dims(1, 2, 1, 1, 5), 0)
        .unwrap_err()
        .to_string();
    assert!(err.contains("D = 5") && err.contains("even"), "{err}");
}

#[test]
fn bad_shapes_and_positions_are_errors() {
    let Some(gpu) = test_gpu() else { return };
    let zeros = |name: &str, n| gpu.zeros(name, DType::F32, n).unwrap();
    let (x, out, freq) = (zeros("inp", 24), zeros("out", 24), zeros("inv_freq", 3));
    let err = rope::forward(gpu, &out, &x, &freq, dims(1, 2, 2, 3, 6), 0)
        .unwrap_err()
        .to_string();
    assert!(err.contains("rotated heads = 3"), "{err}");
    let err = rope::forward(
        gpu,
        &out,
        &x,
        &freq,
        dims(1, 2, 2, 2, 6),
        rope::MAX_POSITION,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("past the limit"), "{err}");
    let short = zeros("inv_freq", 2);
    let err = rope::forward(gpu, &out, &x, &short, dims(1, 2, 2, 2, 6), 0)
        .unwrap_err()
        .to_string();
    assert!(err.contains("tensor inv_freq"), "{err}");
}

/// Decoding one token at pos0 = k gives row k of the whole sequence rotated from position 0,
/// and the backward undoes the forward.
#[test]
fn a_decode_step_matches_its_row_of_the_prefill_and_backward_inverts() {
    let Some(gpu) = test_gpu() else { return };
    let (t, heads, d) = (9, 5, 64);
    let freq = inv_freq(d, 100_000.0, RopeScaling::None);
    let row = heads * d;
    let x = Rng::new(4).vec_uniform(t * row, -1.0, 1.0);
    let g_freq = gpu.upload_f32("inv_freq", &freq).unwrap();
    let g_x = gpu.upload_f32("inp", &x).unwrap();
    let g_all = gpu.zeros("out", DType::F32, t * row).unwrap();
    let g_back = gpu.zeros("dinp", DType::F32, t * row).unwrap();
    let g_last = gpu.upload_f32("inp", &x[(t - 1) * row..]).unwrap();
    let g_step = gpu.zeros("out", DType::F32, row).unwrap();
    let full = dims(1, t, heads, 3, d);
    gpu.run(&[
        rope::forward(gpu, &g_all, &g_x, &g_freq, full, 0).unwrap(),
        rope::backward(gpu, &g_back, &g_all, &g_freq, full, 0).unwrap(),
        rope::forward(
            gpu,
            &g_step,
            &g_last,
            &g_freq,
            dims(1, 1, heads, 3, d),
            t - 1,
        )
        .unwrap(),
    ])
    .unwrap();
    let all = gpu.read_f32(&g_all).unwrap();
    let step = gpu.read_f32(&g_step).unwrap();
    assert_eq!(
        &all[(t - 1) * row..],
        &step[..],
        "decode step differs from prefill"
    );
    let back = gpu.read_f32(&g_back).unwrap();
    reference::compare("backward(forward(x))", &back, &x, 1e-6, 0.0).assert();
    // The two unrotated heads of each row are copied exactly.
    for r in 0..t {
        let v = (r * heads + 3) * d..(r + 1) * row;
        assert_eq!(&all[v.clone()], &x[v]);
    }
}
