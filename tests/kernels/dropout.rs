use shaderformer::gpu::shaders::INCLUDES;
use shaderformer::gpu::{DType, View, test_gpu};
use shaderformer::hash;
use shaderformer::kernels::dropout::{self, Dropout};
use shaderformer::kernels::step;
use shaderformer::reference::{self, dot, numeric_grad};
use shaderformer::rng::Rng;

#[test]
fn gpu_matches_reference() {
    crate::check_family(&dropout::FAMILY);
}

/// A test kernel around shaders/include/hash.wgsl: for each input (seed, step, i, j), writes
/// (pcg(i), mask_key(seed, step), element_hash(key, i), cell_hash(key, i, j)).
const HASH_PROBE: &str = r#"
@group(0) @binding(0) var<storage, read> probe_in: array<vec4<u32>>;
@group(0) @binding(1) var<storage, read_write> probe_out: array<vec4<u32>>;

@compute @workgroup_size(64)
fn probe(@builtin(global_invocation_id) id: vec3<u32>) {
    if (id.x >= arrayLength(&probe_in)) {
        return;
    }
    let x = probe_in[id.x];
    let key = mask_key(x.x, x.y);
    probe_out[id.x] = vec4(pcg(x.z), key, element_hash(key, x.z), cell_hash(key, x.z, x.w));
}
"#;

fn whole(v: &View) -> wgpu::BindingResource<'_> {
    wgpu::BindingResource::Buffer(wgpu::BufferBinding {
        buffer: &v.buffer,
        offset: v.offset,
        size: wgpu::BufferSize::new(v.bytes()),
    })
}

/// The WGSL hash every mask uses (shaders/include/hash.wgsl) and its Rust twin (crate::hash)
/// agree bit for bit on 2^16 inputs: edge values, consecutive counters and random words.
#[test]
fn wgsl_and_rust_hashes_agree() {
    let Some(gpu) = test_gpu() else { return };
    let (_, hash_wgsl) = INCLUDES
        .iter()
        .find(|(path, _)| *path == "include/hash.wgsl")
        .expect("include/hash.wgsl is embedded");
    let n = 1usize << 16;
    let mut rng = Rng::new(17);
    let mut word = || rng.next_u64() as u32;
    let edges = [0, 1, 2, 0x7fff_ffff, 0x8000_0000, u32::MAX - 1, u32::MAX];
    let mut inputs: Vec<[u32; 4]> = Vec::new();
    for &a in &edges {
        for &b in &edges {
            inputs.push([a, b, a ^ b, b]);
        }
    }
    for i in 0..1000 {
        inputs.push([7, 3, i, i + 1]);
    }
    while inputs.len() < n {
        inputs.push([word(), word(), word(), word()]);
    }
    let flat: Vec<u32> = inputs.iter().flatten().copied().collect();
    let g_in = gpu.upload("probe in", DType::U32, &flat).unwrap();
    let g_out = gpu.zeros("probe out", DType::U32, 4 * n).unwrap();
    let module = gpu
        .device
        .create_shader_module(wgpu::ShaderModuleDescriptor {
            label: Some("hash probe"),
            source: wgpu::ShaderSource::Wgsl(format!("{hash_wgsl}\n{HASH_PROBE}").into()),
        });
    let pipeline = gpu
        .device
        .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some("hash probe"),
            layout: None,
            module: &module,
            entry_point: Some("probe"),
            compilation_options: Default::default(),
            cache: None,
        });
    let bind_group = gpu.device.create_bind_group(&wgpu::BindGroupDescriptor {
        label: Some("hash probe"),
        layout: &pipeline.get_bind_group_layout(0),
        entries: &[
            wgpu::BindGroupEntry {
                binding: 0,
                resource: whole(&g_in),
            },
            wgpu::BindGroupEntry {
                binding: 1,
                resource: whole(&g_out),
            },
        ],
    });
    let mut encoder = gpu.device.create_command_encoder(&Default::default());
    {
        let mut pass = encoder.begin_compute_pass(&Default::default());
        pass.set_pipeline(&pipeline);
        pass.set_bind_group(0, &bind_group, &[]);
        pass.dispatch_workgroups((n / 64) as u32, 1, 1);
    }
    gpu.queue.submit([encoder.finish()]);
    let got = gpu.read_u32(&g_out).unwrap();
    for (k, &[seed, step, i, j]) in inputs.iter().enumerate() {
        let key = hash::mask_key(seed, step);
        let want = [
            hash::pcg(i),
            key,
            hash::element_hash(key, i),
            hash::cell_hash(key, i, j),
        ];
        assert_eq!(
            got[4 * k..4 * k + 4],
            want,
            "input {k} (seed {seed}, step {step}, i {i}, j {j}): GPU vs CPU"
        );
    }
}

#[test]
fn reference_backward_matches_finite_differences() {
    let n = 64;
    let mut rng = Rng::new(4);
    let inp: Vec<f64> = reference::convert(&rng.vec_normal(n, 1.0));
    let w: Vec<f64> = reference::convert(&rng.vec_uniform(n, -1.0, 1.0));
    for p in [0.0, 0.25, 0.5] {
        let mut dinp = vec![0.0; n];
        reference::dropout::backward(&mut dinp, &w, p, 11, 7);
        let ndinp = numeric_grad(&inp, 1e-6, |x| {
            let mut out = vec![0.0; n];
            reference::dropout::forward(&mut out, x, p, 11, 7);
            dot(&out, &w)
        });
        reference::compare("dinp", &dinp, &ndinp, 1e-8, 1e-6).assert();
    }
}

#[test]
fn p_zero_is_the_identity() {
    let x: Vec<f32> = Rng::new(1).vec_normal(1000, 1.0);
    let mut out = vec![0.0; x.len()];
    reference::dropout::forward(&mut out, &x, 0.0, 3, 4);
    assert_eq!(out, x);
}

/// GPU masks over 1e5 elements: the kept fraction is 1 - p within 5 standard deviations, equal
/// to the CPU twin's count, and neighbouring elements are kept independently.
#[test]
fn kept_fraction_is_one_minus_p() {
    let Some(gpu) = test_gpu() else { return };
    let n = 100_000;
    let ones = gpu.upload_f32("inp", &vec![1.0f32; n]).unwrap();
    let out = gpu.zeros("out", DType::F32, n).unwrap();
    for p in [0.1f32, 0.5, 0.9] {
        let d = Dropout {
            p,
            seed: 1234,
            step: 5,
        };
        gpu.run(&[dropout::forward(gpu, &out, &ones, n, d).unwrap()])
            .unwrap();
        let kept: Vec<bool> = gpu
            .read_f32(&out)
            .unwrap()
            .iter()
            .map(|&v| v != 0.0)
            .collect();
        let count = kept.iter().filter(|&&k| k).count();
        let cpu = (0..n as u32)
            .filter(|&i| dropout::keep(1234, 5, i, p))
            .count();
        assert_eq!(count, cpu, "GPU and CPU masks disagree at p = {p}");
        let q = 1.0 - p as f64;
        let sigma = (q * (1.0 - q) / n as f64).sqrt();
        let frac = count as f64 / n as f64;
        assert!(
            (frac - q).abs() < 5.0 * sigma,
            "p = {p}: kept {frac}, expected {q} ± {}",
            5.0 * sigma
        );
        let pairs = kept.windows(2).filter(|w| w[0] && w[1]).count() as f64 / (n - 1) as f64;
        let sigma2 = (q * q * (1.0 - q * q) / n as f64).sqrt();
        assert!(
            (pairs - q * q).abs() < 6.0 * sigma2,
            "p = {p}: neighbours kept together {pairs}, expected {}",
            q * q
        );
    }
}

#[test]
fn different_steps_and_seeds_give_different_masks() {
    let n = 100_000u32;
    let p = 0.5;
    let mask = |seed, step| {
        (0..n)
            .map(|i| dropout::keep(seed, step, i, p))
            .collect::<Vec<_>>()
    };
    let base = mask(1, 0);
    for other in [mask(1, 1), mask(1, 2), mask(2, 0), mask(0, 1)] {
        // Independent masks agree on about half the elements.
        let same = base.iter().zip(&other).filter(|(a, b)| a == b).count() as f64 / n as f64;
        assert!(
            (same - 0.5).abs() < 0.01,
            "masks agree on {same} of elements"
        );
    }
    assert_eq!(
        base,
        mask(1, 0),
        "the mask is a function of (seed, step, i)"
    );
}

#[test]
fn the_step_uniform_changes_the_mask_without_rebuilding() {
    let Some(gpu) = test_gpu() else { return };
    let n = 1000;
    let inp: Vec<f32> = Rng::new(8).vec_normal(n, 1.0);
    let g_inp = gpu.upload_f32("inp", &inp).unwrap();
    let g_out = gpu.zeros("out", DType::F32, n).unwrap();
    let first = Dropout {
        p: 0.3,
        seed: 10,
        step: 0,
    };
    let uniform = step::uniform(gpu, "step", &step::Step::default()).unwrap();
    let d = dropout::forward_at(gpu, &g_out, &g_inp, n, first, &uniform).unwrap();
    for counter in [0, 1, 7] {
        let at = step::Step {
            dropout_step: counter,
            ..Default::default()
        };
        step::write(gpu, &uniform, &at).unwrap();
        gpu.run(std::slice::from_ref(&d)).unwrap();
        let mut out = vec![0.0f32; n];
        reference::dropout::forward(&mut out, &inp, 0.3, 10, counter);
        reference::compare("out", &gpu.read_f32(&g_out).unwrap(), &out, 0.0, 0.0).assert();
    }
}

#[test]
fn a_grid_of_more_workgroups_than_one_dimension_allows_folds() {
    let Some(gpu) = test_gpu() else { return };
    let n = gpu.limits.max_compute_workgroups_per_dimension as usize * 256 + 1;
    let g_inp = gpu.upload_f32("inp", &vec![1.0f32; n]).unwrap();
    let g_out = gpu.zeros("out", DType::F32, n).unwrap();
    let half = Dropout {
        p: 0.5,
        seed: 2,
        step: 3,
    };
    let d = dropout::forward(gpu, &g_out, &g_inp, n, half).unwrap();
    assert!(
        d.workgroups[1] > 1,
        "expected a folded grid, got {:?}",
        d.workgroups
    );
    gpu.run(&[d]).unwrap();
    let got = gpu.read_f32(&g_out).unwrap();
    let scale = dropout::scale(0.5);
    let bad = (0..n).find(|&i| {
        got[i]
            != if dropout::keep(2, 3, i as u32, 0.5) {
                scale
            } else {
                0.0
            }
    });
    assert_eq!(bad, None, "first mismatch");
}

#[test]
fn bad_arguments_are_an_error() {
    let Some(gpu) = test_gpu() else { return };
    let inp = gpu.zeros("inp", DType::F32, 10).unwrap();
    let out = gpu.zeros("out", DType::F32, 12).unwrap();
    let d = Dropout {
        p: 0.1,
        seed: 0,
        step: 0,
    };
    let err = dropout::forward(gpu, &out, &inp, 10, d)
        .unwrap_err()
        .to_string();
    assert!(err.contains("tensor out") && err.contains("12"), "{err}");
    let dout = gpu.zeros("dout", DType::F32, 10).unwrap();
    let err = dropout::backward(gpu, &out, &dout, 10, d, true)
        .unwrap_err()
        .to_string();
    assert!(err.contains("tensor out"), "{err}");
    for p in [1.0, -0.1, f32::NAN] {
        let err = dropout::forward(gpu, &dout, &inp, 10, Dropout { p, ..d })
            .unwrap_err()
            .to_string();
        assert!(err.contains("[0, 1)"), "{err}");
    }
}
