use shaderformer::gpu::{DType, test_gpu};
use shaderformer::kernels::convert;
use shaderformer::reference;

#[test]
fn gpu_matches_reference() {
    crate::check_family(&convert::FAMILY);
}

/// The reference rounds as bf16 is defined: to nearest, ties to even, and widening is exact.
#[test]
fn reference_rounds_to_nearest_even() {
    let x = [
        1.0,
        f32::from_bits(0x3f80_8000), // a tie, kept bit even: down
        f32::from_bits(0x3f81_8000), // a tie, kept bit odd: up
        f32::from_bits(0x3f80_7fff), // under half a unit: down
        -2.5,
    ];
    let mut words = vec![0u32; 3];
    reference::bf16::to_bf16(&mut words, &x);
    assert_eq!(words, [0x3f80_3f80, 0x3f80_3f82, 0x0000_c020]);
    let mut back = vec![0.0; 5];
    reference::bf16::from_bf16(&mut back, &words);
    assert_eq!(back, [1.0, 1.0, f32::from_bits(0x3f82_0000), 1.0, -2.5]);
}

#[test]
fn mismatched_shapes_are_an_error() {
    let Some(gpu) = test_gpu() else { return };
    let x = gpu.zeros("x", DType::F32, 10).unwrap();
    let y = gpu.zeros("y", DType::BF16, 11).unwrap();
    let err = convert::to_bf16(gpu, &y, &x).unwrap_err().to_string();
    assert!(err.contains("tensor y") && err.contains("11"), "{err}");
    let f = gpu.zeros("f", DType::F32, 10).unwrap();
    let err = convert::from_bf16(gpu, &f, &x).unwrap_err().to_string();
    assert!(err.contains("tensor x") && err.contains("bf16"), "{err}");
}
