//! dropout.wgsl launchers: inverted dropout with a counter-based mask.
//!
//! Element i is kept iff `hash(seed, step, i) >= threshold(p)` and kept values are scaled by
//! 1 / (1 - p); nothing is stored, the backward regenerates the mask from (seed, step, i). The
//! counter `step` is the per-step uniform's `dropout_step` (`kernels::step`), so one dispatch
//! draws every micro-step's mask.
//! p = 0 is the identity; p must be in [0, 1).
//! out (N) = keep(i) ? inp (N) / (1 - p) : 0; overwrites out.
//! dinp (N) = keep(i) ? dout (N) / (1 - p) : 0; overwritten, or added to (`+=`) when `accumulate`.

use bytemuck::{Pod, Zeroable};

use super::harness::{self, BenchOptions, BenchReport, CheckReport, Family};
use super::step as per_step;
use super::{bytes_of, elementwise, expect, expect_dims};
use crate::error::{Error, Result};
use crate::gpu::{Binding, Cost, DType, Dispatch, Gpu, KernelSpec, Shader, ShaderVariant, View};
use crate::reference;
use crate::rng::Rng;

use Binding::{Read, ReadWrite};

pub const FORWARD: KernelSpec = KernelSpec {
    shader: Shader::Dropout,
    variant: ShaderVariant::Base,
    entry: "dropout_forward",
    bindings: &[Read, ReadWrite, Binding::Step],
};
pub const BACKWARD: KernelSpec = KernelSpec {
    shader: Shader::Dropout,
    variant: ShaderVariant::Base,
    entry: "dropout_backward",
    bindings: &[Read, ReadWrite, Binding::Step],
};

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct Params {
    seed: u32,
    n: u32,
    threshold: u32,
    scale: f32,
    accumulate: u32,
}

/// The layout of `Params`, for the test that compares it with `Params` in the shader.
pub fn params_layout() -> super::ParamsLayout {
    super::params_layout!(Params {
        seed,
        n,
        threshold,
        scale,
        accumulate
    })
}

pub use crate::hash::{scale, threshold};

/// A dispatch's drop probability p in [0, 1) and the (seed, step) that pick its mask.
pub use crate::hash::Dropout;

/// Whether element `i` is kept at (`seed`, `step`) with drop probability `p` in [0, 1): the CPU
/// twin of the shader's mask (see crate::hash).
pub fn keep(seed: u32, step: u32, i: u32, p: f32) -> bool {
    crate::hash::Dropout { p, seed, step }.keeps(i)
}

pub(crate) fn check_p(kernel: &str, p: f32) -> Result<()> {
    if !(0.0..1.0).contains(&p) {
        return Err(Error::invalid(
            kernel,
            format!("dropout probability p = {p} must be in [0, 1)"),
        ));
    }
    Ok(())
}

/// A dropout dispatch of `spec` from `src` to `dst`, its mask counter read from `step`.
#[allow(clippy::too_many_arguments)]
fn launch(
    gpu: &Gpu,
    spec: &KernelSpec,
    src: &View,
    dst: &View,
    n: usize,
    d: Dropout,
    accumulate: bool,
    step: &View,
) -> Result<Dispatch> {
    let name = spec.name();
    expect_dims(&name, &[("N", n)])?;
    check_p(&name, d.p)?;
    expect(&name, src, DType::F32, n)?;
    expect(&name, dst, DType::F32, n)?;
    let params = Params {
        seed: d.seed,
        n: n as u32,
        threshold: threshold(d.p),
        scale: scale(d.p),
        accumulate: accumulate as u32,
    };
    let cost = Cost {
        flops: n as u64,
        bytes: (8 + 4 * accumulate as u64) * n as u64,
    };
    elementwise(gpu, spec, n, bytes_of(&params), &[src, dst, step], cost)
}

/// A uniform of its own holding `d.step` as the mask counter.
fn own_step(gpu: &Gpu, d: Dropout) -> Result<View> {
    let at = per_step::Step {
        dropout_step: d.step,
        ..Default::default()
    };
    per_step::uniform(gpu, "dropout.step", &at)
}

/// out (N) = d.keeps(i) ? inp (N) / (1 - p) : 0. Overwrites `out`.
pub fn forward(gpu: &Gpu, out: &View, inp: &View, n: usize, d: Dropout) -> Result<Dispatch> {
    forward_at(gpu, out, inp, n, d, &own_step(gpu, d)?)
}

/// `forward` with the mask counter read from the per-step uniform `step` (`d.step` unused).
pub fn forward_at(
    gpu: &Gpu,
    out: &View,
    inp: &View,
    n: usize,
    d: Dropout,
    step: &View,
) -> Result<Dispatch> {
    launch(gpu, &FORWARD, inp, out, n, d, false, step)
}

/// dinp (N) = d.keeps(i) ? dout (N) / (1 - p) : 0, the forward's mask for the same `d`.
/// Overwrites `dinp`, or adds to it (`+=`) when `accumulate`.
pub fn backward(
    gpu: &Gpu,
    dinp: &View,
    dout: &View,
    n: usize,
    d: Dropout,
    accumulate: bool,
) -> Result<Dispatch> {
    backward_at(gpu, dinp, dout, n, d, accumulate, &own_step(gpu, d)?)
}

/// `backward` with the mask counter read from the per-step uniform `step` (`d.step` unused).
pub fn backward_at(
    gpu: &Gpu,
    dinp: &View,
    dout: &View,
    n: usize,
    d: Dropout,
    accumulate: bool,
    step: &View,
) -> Result<Dispatch> {
    launch(gpu, &BACKWARD, dout, dinp, n, d, accumulate, step)
}

pub const FAMILY: Family = Family {
    name: "dropout",
    about: "inverted dropout, counter-based mask: forward out; backward dinp (= or +=)",
    shape_help: "N",
    default_shapes: &[&[1], &[3], &[45], &[65], &[127], &[129], &[1000], &[65537]],
    bench_shape: &[4096 * 3072],
    check,
    bench,
};

fn check(gpu: &Gpu, shape: &[usize]) -> Result<Vec<CheckReport>> {
    let [n] = harness::dims::<1>("dropout", shape)?;
    let mut rng = Rng::new(n as u64);
    let inp = rng.vec_normal(n, 1.0);
    let dout = rng.vec_uniform(n, -1.0, 1.0);
    let dinp0 = rng.vec_uniform(n, -1.0, 1.0);
    let (seed, step) = (0x5eed_u32.wrapping_add(n as u32), 3 + n as u32);
    let s = format!("N={n}");
    let mut reports = Vec::new();
    for p in [0.0, 0.1, 0.5, 0.9] {
        let g_inp = gpu.upload_f32("inp", &inp)?;
        let g_out = gpu.zeros("out", DType::F32, n)?;
        let g_dout = gpu.upload_f32("dout", &dout)?;
        let g_dinp_over = gpu.upload_f32("dinp", &dinp0)?;
        let g_dinp_acc = gpu.upload_f32("dinp", &dinp0)?;
        let d = Dropout { p, seed, step };
        gpu.run(&[
            forward(gpu, &g_out, &g_inp, n, d)?,
            backward(gpu, &g_dinp_over, &g_dout, n, d, false)?,
            backward(gpu, &g_dinp_acc, &g_dout, n, d, true)?,
        ])?;
        let mut out = vec![0.0f32; n];
        reference::dropout::forward(&mut out, &inp, p, seed, step);
        let mut dinp_over = vec![0.0f32; n];
        reference::dropout::backward(&mut dinp_over, &dout, p, seed, step);
        let mut dinp_acc = dinp0.clone();
        reference::dropout::backward(&mut dinp_acc, &dout, p, seed, step);
        // Same mask, same f32 products: bit-exact.
        reports.push(CheckReport::new(
            &s,
            &format!("forward out p={p}"),
            &gpu.read_f32(&g_out)?,
            &out,
            0.0,
            0.0,
        ));
        reports.push(CheckReport::new(
            &s,
            &format!("backward dinp p={p}"),
            &gpu.read_f32(&g_dinp_over)?,
            &dinp_over,
            0.0,
            0.0,
        ));
        reports.push(CheckReport::new(
            &s,
            &format!("backward dinp += p={p}"),
            &gpu.read_f32(&g_dinp_acc)?,
            &dinp_acc,
            0.0,
            0.0,
        ));
    }
    Ok(reports)
}

fn bench(gpu: &Gpu, shape: &[usize], opts: &BenchOptions) -> Result<Vec<BenchReport>> {
    let [n] = harness::dims::<1>("dropout", shape)?;
    let inp = gpu.upload_f32("inp", &Rng::new(1).vec_normal(n, 1.0))?;
    let out = gpu.zeros("out", DType::F32, n)?;
    let dinp = gpu.zeros("dinp", DType::F32, n)?;
    let s = format!("N={n} p=0.1");
    let d = Dropout {
        p: 0.1,
        seed: 1,
        step: 0,
    };
    Ok(vec![
        harness::bench_one(gpu, opts, "forward", &s, &[forward(gpu, &out, &inp, n, d)?])?,
        harness::bench_one(
            gpu,
            opts,
            "backward",
            &s,
            &[backward(gpu, &dinp, &out, n, d, false)?],
        )?,
        harness::bench_one(
            gpu,
            opts,
            "backward +=",
            &s,
            &[backward(gpu, &dinp, &out, n, d, true)?],
        )?,
    ])
}
