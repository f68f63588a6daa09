use shaderformer::gpu::{DType, test_gpu};
use shaderformer::kernels::qkv_pack::{self, BackwardTensors, Dims};
use shaderformer::reference::{self, compare};
use shaderformer::rng::Rng;

/// The GPU against the reference, forward and both backward modes, on awkward shapes (groups of
/// 1, 3 and 9 query heads, head sizes that are no multiple of anything).
#[test]
fn gpu_matches_reference() {
    let Some(gpu) = test_gpu() else { return };
    let mut rng = Rng::new(5);
    let shapes = [
        (1, 1, 1, 1, 1),
        (2, 3, 6, 2, 5),
        (1, 45, 9, 3, 7),
        (3, 5, 9, 1, 3),
        (1, 129, 4, 4, 2),
    ];
    for (b, t, nh, nkv, hs) in shapes {
        let dims = Dims { b, t, nh, nkv, hs };
        let (nq, nk) = (b * t * nh * hs, b * t * nkv * hs);
        let up = |name: &str, v: &[f32]| {
            let view = gpu.zeros(name, DType::F32, v.len()).unwrap();
            gpu.write(&view, v).unwrap();
            view
        };
        let (q, k, v) = (
            rng.vec_uniform(nq, -1.0, 1.0),
            rng.vec_uniform(nk, -1.0, 1.0),
            rng.vec_uniform(nk, -1.0, 1.0),
        );
        let mut want = vec![0.0f32; 3 * nq];
        reference::qkv_pack::forward(&mut want, &q, &k, &v, dims);
        let qkv = up("qkv", &vec![7.0; 3 * nq]);
        let (qg, kg, vg) = (up("q", &q), up("k", &k), up("v", &v));
        gpu.run(&[qkv_pack::forward(gpu, &qkv, (&qg, &kg, &vg), dims).unwrap()])
            .unwrap();
        let got = gpu.read_f32(&qkv).unwrap();
        compare(&format!("qkv {dims:?}"), &got, &want, 0.0, 0.0).assert();

        let dqkv = rng.vec_uniform(3 * nq, -1.0, 1.0);
        for acc in [false, true] {
            let prior = [
                rng.vec_uniform(nq, -1.0, 1.0),
                rng.vec_uniform(nk, -1.0, 1.0),
                rng.vec_uniform(nk, -1.0, 1.0),
            ];
            let mut want = prior.clone();
            if !acc {
                want.iter_mut().for_each(|w| w.fill(0.0));
            }
            let [wq, wk, wv] = &mut want;
            reference::qkv_pack::backward(wq, wk, wv, &dqkv, dims);
            let (dq, dk, dv) = (
                up("dq", &prior[0]),
                up("dk", &prior[1]),
                up("dv", &prior[2]),
            );
            let dqkv_g = up("dqkv", &dqkv);
            let tensors = BackwardTensors {
                dq: &dq,
                dk: &dk,
                dv: &dv,
                dqkv: &dqkv_g,
            };
            gpu.run(&qkv_pack::backward(gpu, tensors, dims, acc).unwrap())
                .unwrap();
            for (name, view, w) in [
                ("dq", &dq, &want[0]),
                ("dk", &dk, &want[1]),
                ("dv", &dv, &want[2]),
            ] {
                let got = gpu.read_f32(view).unwrap();
                compare(&format!("{name} {dims:?} acc {acc}"), &got, w, 1e-6, 1e-6).assert();
            }
        }
    }
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
    let (q, k, qkv) = (zeros("q", 36), zeros("k", 24), zeros("qkv", 108));
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
