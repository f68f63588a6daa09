//! fill, global_norm and sum. These kernels have no backward, so there is no finite-difference
//! test; their references are checked against values computed by hand instead.

use shaderformer::gpu::{DType, View, test_gpu};
use shaderformer::kernels::reduce;
use shaderformer::reference;
use shaderformer::rng::Rng;

#[test]
fn gpu_matches_reference() {
    crate::check_family(&reduce::FAMILY);
}

#[test]
fn references_match_hand_computed_values() {
    let mut norm = [0.0f64];
    reference::reduce::global_norm(&mut norm, &[&[3.0, -4.0]]);
    assert_eq!(norm[0], 5.0);
    reference::reduce::global_norm(&mut norm, &[&[1.0, 2.0], &[-2.0], &[0.0; 5]]);
    assert_eq!(norm[0], 3.0);
    let mut out = [0.0f32];
    reference::reduce::sum(&mut out, &[1.0, 2.0, 3.5, -0.5], 0.25);
    assert_eq!(out[0], 1.5);
    let mut x = [1.0f32; 3];
    reference::reduce::fill(&mut x, -7.0);
    assert_eq!(x, [-7.0; 3]);
}

/// 150 tensors of awkward sizes (1 up to a few thousand, one large), as in a model's gradients.
fn many_tensors(rng: &mut Rng) -> Vec<Vec<f32>> {
    (0..150)
        .map(|i| {
            let len = match i {
                0 => 1,
                37 => 300_001,
                _ => (i * i * 37) % 4099 + 1,
            };
            rng.vec_uniform(len, -1.0, 1.0)
        })
        .collect()
}

fn upload_all(xs: &[Vec<f32>]) -> Vec<View> {
    let gpu = test_gpu().unwrap();
    xs.iter()
        .enumerate()
        .map(|(i, x)| gpu.upload_f32(&format!("grad{i}"), x).unwrap())
        .collect()
}

#[test]
fn global_norm_over_150_tensors() {
    let Some(gpu) = test_gpu() else { return };
    let xs = many_tensors(&mut Rng::new(3));
    let views = upload_all(&xs);
    let refs: Vec<&View> = views.iter().collect();
    let lens: Vec<usize> = xs.iter().map(Vec::len).collect();
    let partials = gpu
        .zeros("partials", DType::F32, reduce::partials_len(gpu, &lens))
        .unwrap();
    let norm = gpu.upload_f32("norm", &[f32::NAN]).unwrap();
    let d = reduce::global_norm(gpu, &norm, &partials, &refs).unwrap();
    assert_eq!(d.len(), 151);
    gpu.run(&d).unwrap();
    let xs64: Vec<Vec<f64>> = xs.iter().map(|x| reference::convert(x)).collect();
    let xs64: Vec<&[f64]> = xs64.iter().map(Vec::as_slice).collect();
    let mut want = [0.0f64];
    reference::reduce::global_norm(&mut want, &xs64);
    reference::compare("norm", &gpu.read_f32(&norm).unwrap(), &want, 0.0, 2e-6).assert();
}

#[test]
fn global_norm_and_sum_are_bit_deterministic() {
    let Some(gpu) = test_gpu() else { return };
    let mut rng = Rng::new(11);
    let xs: Vec<Vec<f32>> = [65537, 1, 1_300_001, 129]
        .iter()
        .map(|&n| rng.vec_normal(n, 1.0))
        .collect();
    let views = upload_all(&xs);
    let refs: Vec<&View> = views.iter().collect();
    let lens: Vec<usize> = xs.iter().map(Vec::len).collect();
    let partials = gpu
        .zeros("partials", DType::F32, reduce::partials_len(gpu, &lens))
        .unwrap();
    let norm = gpu.zeros("norm", DType::F32, 1).unwrap();
    let out = gpu.zeros("sum", DType::F32, 1).unwrap();
    let run = || {
        // fresh dispatches each time, and garbage in the outputs beforehand
        gpu.write(&partials, &vec![f32::NAN; partials.len]).unwrap();
        gpu.run(&[reduce::fill(gpu, &norm, 1e30).unwrap()]).unwrap();
        gpu.run(&reduce::global_norm(gpu, &norm, &partials, &refs).unwrap())
            .unwrap();
        gpu.run(&reduce::sum(gpu, &out, &views[2], lens[2], 0.5).unwrap())
            .unwrap();
        (
            gpu.read_f32(&norm).unwrap()[0].to_bits(),
            gpu.read_f32(&out).unwrap()[0].to_bits(),
            gpu.read_u32(&partials).unwrap(),
        )
    };
    let first = run();
    for _ in 0..3 {
        assert_eq!(run(), first);
    }
}

#[test]
fn partials_len_counts_a_slot_range_per_tensor() {
    let Some(gpu) = test_gpu() else { return };
    assert_eq!(reduce::partials_len(gpu, &[1]), 1);
    let small = reduce::partials_len(gpu, &[1, 3, 45]);
    assert_eq!(small, 3);
    // large tensors are capped, so a model's partials stay small
    let big = reduce::partials_len(gpu, &[124_000_000]);
    assert!((1..=1024).contains(&big), "{big}");
    assert_eq!(
        reduce::partials_len(gpu, &[124_000_000, 1, 3, 45]),
        big + small
    );
}

#[test]
fn bad_inputs_are_errors_naming_the_tensor() {
    let Some(gpu) = test_gpu() else { return };
    let g1 = gpu.zeros("g1", DType::F32, 100).unwrap();
    let g2 = gpu.zeros("g2", DType::F32, 5000).unwrap();
    let need = reduce::partials_len(gpu, &[100, 5000]);
    let short = gpu.zeros("partials", DType::F32, need - 1).unwrap();
    let partials = gpu.zeros("partials", DType::F32, need).unwrap();
    let norm = gpu.zeros("norm", DType::F32, 1).unwrap();
    let norm2 = gpu.zeros("norm2", DType::F32, 2).unwrap();
    let ints = gpu.zeros("ints", DType::U32, 100).unwrap();
    let empty = gpu.zeros("empty", DType::F32, 0).unwrap();

    let err = |r: shaderformer::Result<Vec<_>>| r.unwrap_err().to_string();
    let e = err(reduce::global_norm(gpu, &norm, &short, &[&g1, &g2]));
    assert!(e.contains("tensor partials"), "{e}");
    let e = err(reduce::global_norm(gpu, &norm2, &partials, &[&g1, &g2]));
    assert!(e.contains("tensor norm2"), "{e}");
    let e = err(reduce::global_norm(gpu, &norm, &partials, &[&g1, &ints]));
    assert!(e.contains("tensor ints") && e.contains("u32"), "{e}");
    let e = err(reduce::global_norm(gpu, &norm, &partials, &[&empty]));
    assert!(e.contains("empty"), "{e}");
    let e = err(reduce::global_norm(gpu, &norm, &partials, &[]));
    assert!(e.contains("at least one"), "{e}");
    let e = err(reduce::sum(gpu, &norm, &g1, 99, 1.0));
    assert!(e.contains("tensor g1") && e.contains("100"), "{e}");
    let e = err(reduce::sum(gpu, &norm2, &g1, 100, 1.0));
    assert!(e.contains("tensor norm2"), "{e}");
    let e = reduce::fill(gpu, &ints, 0.0).unwrap_err().to_string();
    assert!(e.contains("tensor ints"), "{e}");
}
