//! `shaderformer kernels check|bench convert`: convert.wgsl against the CPU reference (the same
//! bits) on awkward shapes, and its kernels timed.

use super::*;
use crate::kernels::harness::{self, BenchReport, CheckReport, Family};
use crate::reference;
use crate::rng::Rng;

pub const FAMILY: Family = Family {
    name: "convert",
    about: "f32 to bf16 (round to nearest even) and bf16 to f32, two bf16 values to a word",
    shape_help: "N",
    default_shapes: &[&[1], &[2], &[3], &[45], &[127], &[129], &[1000], &[65537]],
    bench_shape: &[1 << 24],
    check,
    bench,
};

/// N values that exercise rounding: random magnitudes, ties (a half unit exactly, with even and
/// odd kept bits), values that round up into the next exponent or to infinity, zeros, subnormals,
/// infinities and NaNs.
fn values(n: usize) -> Vec<f32> {
    let mut rng = Rng::new(n as u64);
    let special = [
        f32::from_bits(0x3f80_8000), // 1 + half a bf16 unit: a tie, kept bit even (down)
        f32::from_bits(0x3f81_8000), // a tie, kept bit odd (up)
        f32::from_bits(0x3f80_8001), // just past a tie (up)
        f32::from_bits(0x3fff_ffff), // rounds up into the next exponent
        f32::MAX,                    // rounds to infinity
        -0.0,
        f32::from_bits(1), // the smallest subnormal
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        f32::from_bits(0xff80_0001), // a signalling NaN with a low payload
    ];
    (0..n)
        .map(|i| match i % 4 {
            0 => special[(i / 4) % special.len()],
            _ => rng.range(-1.0, 1.0) * 10f32.powi((i % 7) as i32 - 3),
        })
        .collect()
}

fn check(gpu: &Gpu, shape: &[usize]) -> Result<Vec<CheckReport>> {
    let [n] = harness::dims::<1>("convert", shape)?;
    let x = values(n);
    let gx = gpu.upload_f32("x", &x)?;
    let gb = gpu.zeros("x_bf16", DType::BF16, n)?;
    let gy = gpu.zeros("y", DType::F32, n)?;
    gpu.run(&[to_bf16(gpu, &gb, &gx)?, from_bf16(gpu, &gy, &gb)?])?;

    let mut words = vec![0u32; n.div_ceil(2)];
    reference::bf16::to_bf16(&mut words, &x);
    let mut back = vec![0.0; n];
    reference::bf16::from_bf16(&mut back, &words);
    let got_words = gpu.read_u32(&gb)?;
    let s = format!("N={n}");
    // Compared as bits, 16 at a time (exact in f32; a NaN equals itself here): the words, then
    // the widened values.
    let halves = |w: &[u32]| -> Vec<f32> {
        w.iter()
            .flat_map(|&b| [(b & 0xffff) as f32, (b >> 16) as f32])
            .collect()
    };
    let as_f = |w: &[u32]| halves(w);
    let bits = |v: &[f32]| halves(&v.iter().map(|x| x.to_bits()).collect::<Vec<_>>());
    Ok(vec![
        CheckReport::new(
            &s,
            "to_bf16 words",
            &as_f(&got_words[..words.len()]),
            &as_f(&words),
            0.0,
            0.0,
        ),
        CheckReport::new(
            &s,
            "from_bf16 bits",
            &bits(&gpu.read_f32(&gy)?),
            &bits(&back),
            0.0,
            0.0,
        ),
    ])
}

fn bench(gpu: &Gpu, shape: &[usize], opts: &harness::BenchOptions) -> Result<Vec<BenchReport>> {
    let [n] = harness::dims::<1>("convert", shape)?;
    let x = gpu.zeros("x", DType::F32, n)?;
    let b = gpu.zeros("x_bf16", DType::BF16, n)?;
    let s = format!("N={n}");
    Ok(vec![
        harness::bench_one(gpu, opts, "to_bf16", &s, &[to_bf16(gpu, &b, &x)?])?,
        harness::bench_one(gpu, opts, "from_bf16", &s, &[from_bf16(gpu, &x, &b)?])?,
    ])
}
