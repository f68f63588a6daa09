//! `kernels check rope` and `kernels bench rope`: the GPU against the CPU reference on awkward
//! shapes, at the first positions and far into a long context, forward and backward.

use super::{Dims, Rope, RopeScaling, backward, forward};
use crate::error::Result;
use crate::gpu::{DType, Gpu};
use crate::kernels::harness::{self, BenchOptions, BenchReport, CheckReport, Family};
use crate::reference;
use crate::rng::Rng;

pub const FAMILY: Family = Family {
    name: "rope",
    about: "rotary embedding, rotate-half, the first R of H heads (theta; linear, llama3 scalings): forward out; backward dinp",
    shape_help: "BxTxHxRxD",
    default_shapes: &[
        &[1, 1, 1, 1, 2],
        &[1, 3, 2, 1, 6],
        &[3, 5, 3, 3, 2],
        &[2, 45, 3, 2, 6],
        &[1, 65, 5, 5, 64],
        &[2, 129, 15, 12, 64],
        &[1, 127, 3, 3, 128],
        &[3, 33, 7, 5, 128],
    ],
    bench_shape: &[4, 256, 15, 12, 64],
    check,
    bench,
};

/// The frequencies a shape is checked with, by head size, so that every scaling runs: llama3
/// (Llama 3.1's values) at D = 128, linear at D = 6, none (SmolLM2's theta) otherwise.
fn rope_for(d: usize) -> Rope {
    let (theta, scaling) = match d {
        128 => (
            500_000.0,
            RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 8192,
            },
        ),
        6 => (10_000.0, RopeScaling::Linear { factor: 2.0 }),
        _ => (100_000.0, RopeScaling::None),
    };
    Rope { theta, scaling }
}

/// Where the check's sequences start: the first position, and late in a 128k context, where the
/// angles reach 10⁵ radians.
const POSITIONS: [usize; 2] = [0, 131_000];

fn check(gpu: &Gpu, shape: &[usize]) -> Result<Vec<CheckReport>> {
    let [b, t, heads, rotated, d] = harness::dims::<5>("rope", shape)?;
    let dims = Dims {
        b,
        t,
        heads,
        rotated,
        d,
    };
    let rope = rope_for(d);
    let freq = rope.inv_freq(d);
    let n = b * t * heads * d;
    let mut rng = Rng::new((n * 31 + rotated) as u64);
    let inp = rng.vec_uniform(n, -1.0, 1.0);
    let dout = rng.vec_uniform(n, -1.0, 1.0);
    let g_inp = gpu.upload_f32("inp", &inp)?;
    let g_dout = gpu.upload_f32("dout", &dout)?;
    let g_freq = gpu.upload_f32("inv_freq", &freq)?;
    let f = reference::convert::<f32, f64>;
    let (inp64, dout64) = (f(&inp), f(&dout));
    let mut reports = Vec::new();
    for pos0 in POSITIONS {
        // Outputs start as garbage: both directions overwrite.
        let g_out = gpu.upload_f32("out", &dout)?;
        let g_dinp = gpu.upload_f32("dinp", &inp)?;
        gpu.run(&[
            forward(gpu, &g_out, &g_inp, &g_freq, dims, pos0)?,
            backward(gpu, &g_dinp, &g_dout, &g_freq, dims, pos0)?,
        ])?;
        // The reference in f64 on the same f32 angles, so that the tolerances measure the GPU's
        // cos, sin and rounding alone.
        let mut out = vec![0.0; n];
        reference::rope::forward(&mut out, &inp64, &freq, dims, pos0);
        let mut dinp = vec![0.0; n];
        reference::rope::backward(&mut dinp, &dout64, &freq, dims, pos0);
        let s = format!(
            "B={b} T={t} H={heads} R={rotated} D={d} pos0={pos0} {:?}",
            rope.scaling
        );
        // gelu's tolerances: elementwise, through f32 transcendental built-ins.
        let (got_out, got_dinp) = (gpu.read_f32(&g_out)?, gpu.read_f32(&g_dinp)?);
        reports.push(CheckReport::new(
            &s,
            "forward out",
            &got_out,
            &out,
            5e-7,
            5e-6,
        ));
        reports.push(CheckReport::new(
            &s,
            "backward dinp",
            &got_dinp,
            &dinp,
            5e-7,
            5e-6,
        ));
    }
    Ok(reports)
}

fn bench(gpu: &Gpu, shape: &[usize], opts: &BenchOptions) -> Result<Vec<BenchReport>> {
    let [b, t, heads, rotated, d] = harness::dims::<5>("rope", shape)?;
    let dims = Dims {
        b,
        t,
        heads,
        rotated,
        d,
    };
    let n = b * t * heads * d;
    let freq = gpu.upload_f32(
        "inv_freq",
        &Rope {
            theta: 100_000.0,
            scaling: RopeScaling::None,
        }
        .inv_freq(d),
    )?;
    let inp = gpu.upload_f32("inp", &Rng::new(1).vec_uniform(n, -1.0, 1.0))?;
    let out = gpu.zeros("out", DType::F32, n)?;
    let s = format!("B={b} T={t} H={heads} R={rotated} D={d}");
    Ok(vec![
        harness::bench_one(
            gpu,
            opts,
            "forward",
            &s,
            &[forward(gpu, &out, &inp, &freq, dims, 0)?],
        )?,
        harness::bench_one(
            gpu,
            opts,
            "backward",
            &s,
            &[backward(gpu, &inp, &out, &freq, dims, 0)?],
        )?,
    ])
}
