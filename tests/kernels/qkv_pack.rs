use shaderformer::gpu::{DType, test_gpu};
use shaderformer::kernels::qkv_pack::{self, Dims};
use shaderformer::reference::{self, dot};
use shaderformer::rng::Rng;

#[test]
fn gpu_matches_reference() {
    crate::check_family(&qkv_pack::FAMILY);
}

/// The reference's backward is the transpose of its forward: <dqkv, pack(q, k, v)> equals
/// <dq, q> + <dk, k> + <dv, v> for any dqkv, q, k and v (in f64).
#[test]
fn reference_backward_is_the_forwards_transpose() {
    let dims = Dims {
        b: 2,
        t: 3,
        nh: 6,
        nkv: 2,
        hs: 5,
    };
    let (nq, nk) = (2 * 3 * 6 * 5, 2 * 3 * 2 * 5);
    let mut rng = Rng::new(9);
    let mut u = |n| reference::convert::<f32, f64>(&rng.vec_uniform(n, -1.0, 1.0));
    let (q, k, v, dqkv) = (u(nq), u(nk), u(nk), u(nq + 2 * nk));
    let mut qkv = vec![0.0; nq + 2 * nk];
    reference::qkv_pack::forward(&mut qkv, &q, &k, &v, dims);
    let (mut dq, mut dk, mut dv) = (vec![0.0; nq], vec![0.0; nk], vec![0.0; nk]);
    reference::qkv_pack::backward(&mut dq, &mut dk, &mut dv, &dqkv, dims);
    let lhs = dot(&dqkv, &qkv);
    let rhs = dot(&dq, &q) + dot(&dk, &k) + dot(&dv, &v);
    assert!((lhs - rhs).abs() < 1e-12, "{lhs} != {rhs}");
}

#[test]
fn heads_that_do_not_divide_are_an_error() {
    let Some(gpu) = test_gpu() else { return };
    let zeros = |name: &str, n| gpu.zeros(name, DType::F32, n).unwrap();
    let dims = Dims {
        b: 1,
        t: 2,
        nh: 6,
        nkv: 4,
        hs: 3,
    };
    let (q, k, qkv) = (zeros("q", 36), zeros("k", 24), zeros("qkv", 84));
    let err = qkv_pack::forward(gpu, &qkv, (&q, &k, &k), dims)
        .unwrap_err()
        .to_string();
    assert!(err.contains("NKV = 4") && err.contains("NH = 6"), "{err}");
    let dims = Dims { nkv: 2, ..dims };
    let err = qkv_pack::forward(gpu, &qkv, (&q, &k, &k), dims)
        .unwrap_err()
        .to_string();
    assert!(err.contains("tensor k") && err.contains("24"), "{err}");
}
