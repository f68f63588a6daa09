//! The `kernels check attention` and `kernels bench attention` harness: every variant against
//! the CPU reference on awkward shapes, decoding against the full forward, and the fused kernels
//! timed beside the GEMM path. Nothing here runs in training or inference.

use super::gemm_path::Groups;
use super::variants::{ROWS_WG, storage_limit, tuned};
use super::{
    BackwardTensors, Dims, Dropout, KvCache, Options, Stage, Variant, backward, backward_with,
    forward, forward_cached, forward_cached_with, forward_with, kv_append, own_step,
};
use crate::error::Result;
use crate::gpu::{DType, Gpu, View};
use crate::kernels::harness::{self, BenchOptions, BenchReport, CheckReport, Family};
use crate::reference;
use crate::rng::Rng;

pub const FAMILY: Family = Family {
    name: "attention",
    about: "fused causal/non-causal softmax attention fwd+bwd, the GEMM path, KV-cache decoding",
    shape_help: "B,NH,T,HS[,NKV] (NKV key/value heads, dividing NH; default NH)",
    default_shapes: &[
        &[1, 1, 1, 8],
        &[2, 3, 7, 16],
        &[1, 4, 50, 24],
        &[1, 3, 37, 64],
        &[2, 2, 65, 45],
        &[1, 2, 129, 3],
        &[2, 1, 33, 128],
        // Grouped-query attention, tiles left partial: one key/value head for 4 query heads (the
        // GEMM path's groups over sequences), SmolLM2's heads (9 of them in groups of 3; the GEMM
        // path's groups over heads).
        &[2, 4, 37, 16, 1],
        &[1, 9, 65, 64, 3],
    ],
    bench_shape: &[1, 12, 256, 64],
    check,
    bench,
};

/// The shapes `kernels check attention --exhaustive` adds to the default ones, every variant at
/// each: every T in {1, 7, 37, 64, 129} with every HS in {8, 16, 64} at NH 3 and B 2, and the
/// extremes of NH in {1, 12} with B in {1, 2} at T 129 (several tiles) and T 37 (one partial
/// tile). The tests run each of them with one variant, in turn (`Variants::One`).
pub const EXHAUSTIVE_SHAPES: &[&[usize]] = &[
    &[2, 3, 1, 8],
    &[2, 3, 1, 16],
    &[2, 3, 1, 64],
    &[2, 3, 7, 8],
    &[2, 3, 7, 16],
    &[2, 3, 7, 64],
    &[2, 3, 37, 8],
    &[2, 3, 37, 16],
    &[2, 3, 37, 64],
    &[2, 3, 64, 8],
    &[2, 3, 64, 16],
    &[2, 3, 64, 64],
    &[2, 3, 129, 8],
    &[2, 3, 129, 16],
    &[2, 3, 129, 64],
    &[1, 1, 129, 8],
    &[1, 1, 37, 64],
    &[2, 1, 129, 8],
    &[2, 1, 37, 64],
    &[1, 12, 129, 8],
    &[1, 12, 37, 64],
    &[2, 12, 129, 8],
    &[2, 12, 37, 64],
];

/// Which variants a check runs at its shape: all of them (`kernels check`), or one, the `i`-th
/// modulo their number (a sweep over many shapes that checks each variant on some of them,
/// without compiling and running every variant at every shape).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Variants {
    All,
    One(usize),
}

/// Tolerances against the f64 reference (|err| <= atol + rtol·|ref|): f32 accumulation over a
/// few hundred terms of magnitude ~1 stays within a few 1e-6.
pub const ATOL: f64 = 1e-5;
pub const RTOL: f64 = 1e-5;

/// The dims of a `--shape`: B, NH, T, HS and, optionally, NKV (default NH).
pub fn dims_of(shape: &[usize]) -> Result<Dims> {
    let ([b, nh, t, hs], nkv) = match *shape {
        [b, nh, t, hs, nkv] => ([b, nh, t, hs], nkv),
        _ => {
            let d = harness::dims::<4>("attention", shape)?;
            (d, d[1])
        }
    };
    Ok(Dims { b, t, nh, nkv, hs })
}

/// The label of a check or bench shape: "B=.. NH=.. T=.. HS=..", with " NKV=.." where grouped.
fn label(dims: Dims) -> String {
    let Dims { b, t, nh, nkv, hs } = dims;
    let kv = if nkv == nh {
        String::new()
    } else {
        format!(" NKV={nkv}")
    };
    format!("B={b} NH={nh}{kv} T={t} HS={hs}")
}

/// The inputs of a check: qkv (B, T, W) and dout (B, T, C), seeded by the shape.
pub fn check_inputs(dims: Dims) -> (Vec<f32>, Vec<f32>) {
    let Dims { b, t, nh, nkv, hs } = dims;
    let seed = b * 1_000_003 + nh * 10_007 + t * 101 + hs + (nh - nkv) * 7;
    let mut rng = Rng::new(seed as u64);
    let qkv = rng.vec_uniform(b * t * dims.width(), -2.0, 2.0);
    let dout = rng.vec_uniform(b * t * dims.c(), -1.0, 1.0);
    (qkv, dout)
}

/// The reference's out, lse and dqkv in f64.
struct Expected {
    out: Vec<f64>,
    lse: Vec<f64>,
    dqkv: Vec<f64>,
}

/// The reference, causal and not, without dropout.
fn expected(qkv: &[f32], dout: &[f32], dims: Dims) -> [Expected; 2] {
    [true, false].map(|causal| {
        let opts = Options {
            causal,
            dropout: None,
        };
        expected_one(qkv, dout, dims, opts)
    })
}

fn expected_one(qkv: &[f32], dout: &[f32], dims: Dims, opts: Options) -> Expected {
    let Dims { b, t, nh, .. } = dims;
    let c = dims.c();
    let qkv: Vec<f64> = reference::convert(qkv);
    let dout: Vec<f64> = reference::convert(dout);
    let square = b * nh * t * t;
    let mut e = Expected {
        out: vec![0.0; b * t * c],
        lse: vec![0.0; b * nh * t],
        dqkv: vec![0.0; b * t * dims.width()],
    };
    let (mut preatt, mut att) = (vec![0.0; square], vec![0.0; square]);
    reference::attention::forward(
        &mut e.out,
        &mut preatt,
        &mut att,
        &mut e.lse,
        &qkv,
        dims,
        opts,
    );
    let (mut dpre, mut datt) = (vec![0.0; square], vec![0.0; square]);
    reference::attention::backward(
        &mut e.dqkv,
        &mut dpre,
        &mut datt,
        &dout,
        &qkv,
        &att,
        dims,
        opts,
    );
    e
}

/// One report per (name, GPU tensor, reference) against ATOL and RTOL, labelled "{label} {name}".
fn compare_views(
    gpu: &Gpu,
    shape: &str,
    label: &str,
    items: &[(&str, &View, &Vec<f64>)],
    reports: &mut Vec<CheckReport>,
) -> Result<()> {
    for &(name, got, want) in items {
        let what = format!("{label} {name}");
        let got = gpu.read_f32(got)?;
        reports.push(CheckReport::new(shape, &what, &got, want, ATOL, RTOL));
    }
    Ok(())
}

fn check(gpu: &Gpu, shape: &[usize]) -> Result<Vec<CheckReport>> {
    check_variants(gpu, shape, Variants::All)
}

/// The check at `shape` (B, NH, T, HS[, NKV]) of the variants `which` selects: forward and
/// backward, causal and not, with dropout, against the reference; then decoding with f32 and f16
/// caches.
pub fn check_variants(gpu: &Gpu, shape: &[usize], which: Variants) -> Result<Vec<CheckReport>> {
    let dims = dims_of(shape)?;
    let hs = dims.hs;
    let s = label(dims);
    let (qkv, dout) = check_inputs(dims);
    let want = expected(&qkv, &dout, dims);
    let gqkv = gpu.upload_f32("qkv", &qkv)?;
    let gdout = gpu.upload_f32("dout", &dout)?;
    let case = CheckCase {
        gpu,
        s: &s,
        dims,
        qkv: &gqkv,
        dout: &gdout,
    };
    let mut reports = Vec::new();
    let mut pairs = variant_pairs(hs, storage_limit(gpu))?;
    if let Variants::One(i) = which {
        pairs = vec![pairs[i % pairs.len()]];
    }
    for (causal, want) in [true, false].iter().zip(&want) {
        let mode = if *causal { "causal" } else { "noncausal" };
        let opts = Options {
            causal: *causal,
            dropout: None,
        };
        for &pair in &pairs {
            case.fused(opts, pair, want, mode, &mut reports)?;
        }
    }

    // Dropout on the probabilities (causal; the fixed rule's tiling, the row kernels and the
    // GEMM path) against the reference under the same mask, at two steps: the mask changes with
    // the step, and the backward regenerates it.
    // With one variant, that variant.
    let untiled = |v: Variant| !matches!(v, Variant::Tiled(..));
    let dropout_pairs: Vec<_> = (pairs.iter().take(1))
        .chain(pairs.iter().skip(1).filter(|p| untiled(p.0)))
        .copied()
        .collect();
    for step in [0, 1] {
        let opts = Options {
            dropout: Some(Dropout {
                p: 0.25,
                seed: 0x5eed,
                step,
            }),
            ..Options::CAUSAL
        };
        let want = expected_one(&qkv, &dout, dims, opts);
        let label = format!("causal dropout step {step}");
        for &pair in &dropout_pairs {
            case.fused(opts, pair, &want, &label, &mut reports)?;
        }
    }

    // Decoding: a prefill of up to 5 tokens, then one token per step, against the causal rows.
    let cached = decode(gpu, &qkv, dims, 5, 1)?;
    reports.push(CheckReport::new(
        &s,
        "cached out",
        &cached,
        &want[0].out,
        ATOL,
        RTOL,
    ));
    if gpu.has_f16() {
        reports.push(check_cached_f16(gpu, &s, &qkv, dims)?);
    }
    Ok(reports)
}

/// Every variant the tuner may pick on this adapter: each tiling that fits its workgroup
/// memory (the WebGPU minimum's among them), the row kernels and the GEMM path. Forward and
/// backward tilings are paired in order, the last of the shorter list repeated; then the row
/// kernels with each other, and the GEMM paths.
fn variant_pairs(hs: usize, storage: u32) -> Result<Vec<(Variant, Variant)>> {
    let tiled = |stage| -> Result<Vec<Variant>> {
        let all = Variant::candidates(stage, hs, storage)?;
        Ok(all
            .into_iter()
            .filter(|v| matches!(v, Variant::Tiled(..)))
            .collect())
    };
    let (fwd, bwd) = (tiled(Stage::Forward)?, tiled(Stage::Backward)?);
    let mut pairs: Vec<_> = (0..fwd.len().max(bwd.len()))
        .map(|i| (fwd[i.min(fwd.len() - 1)], bwd[i.min(bwd.len() - 1)]))
        .collect();
    let rows = Variant::Rows(ROWS_WG);
    pairs.extend([(rows, rows), (Variant::Gemm, Variant::Gemm)]);
    Ok(pairs)
}

/// One check shape: its label, dims and inputs on the GPU.
struct CheckCase<'a> {
    gpu: &'a Gpu,
    s: &'a str,
    dims: Dims,
    qkv: &'a View,
    dout: &'a View,
}

impl CheckCase<'_> {
    /// A fused forward and backward, against `want`.
    fn fused(
        &self,
        opts: Options,
        (fv, bv): (Variant, Variant),
        want: &Expected,
        label: &str,
        reports: &mut Vec<CheckReport>,
    ) -> Result<()> {
        let (gpu, dims) = (self.gpu, self.dims);
        let Dims { b, t, nh, .. } = dims;
        let out = gpu.zeros("out", DType::F32, b * t * dims.c())?;
        let lse = gpu.zeros("lse", DType::F32, b * nh * t)?;
        let dqkv = gpu.zeros("dqkv", DType::F32, b * t * dims.width())?;
        let tensors = BackwardTensors {
            dqkv: &dqkv,
            dout: self.dout,
            qkv: self.qkv,
            out: &out,
            lse: &lse,
        };
        let step = own_step(gpu, opts.dropout, 0)?;
        let mut ds = forward_with(gpu, &out, &lse, self.qkv, dims, opts, fv, &step)?;
        ds.extend(backward_with(gpu, tensors, dims, opts, bv, &step)?);
        gpu.run(&ds)?;
        let got = [("out", &out, &want.out), ("lse", &lse, &want.lse)];
        compare_views(
            gpu,
            self.s,
            &format!("{label} {}", fv.name()),
            &got,
            reports,
        )?;
        let got = [("dqkv", &dqkv, &want.dqkv)];
        compare_views(
            gpu,
            self.s,
            &format!("{label} {}", bv.name()),
            &got,
            reports,
        )
    }
}

/// The batch, heads and positions (B, NH, T) a baseline is checked at before tuning trusts it
/// (see `kernels::baseline`), at the problem's head size: T no multiple of a tile.
const BASELINE_BNT: [usize; 3] = [1, 3, 45];
/// New tokens of the decoding check: the last of the T positions, over caches of T.
const BASELINE_TQ: usize = 5;

/// Which tuned attention problem a baseline computes: the forward, the backward, or decoding
/// over a KV cache (f32; an f16 cache is not checked here).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Problem {
    Forward,
    Backward,
    Cached,
}

/// `variant` computing `problem` at head size `hs` against the reference at `BASELINE_BNT`,
/// with ATOL and RTOL (the backward on the reference's out and lse, so that it is judged alone):
/// the kernels of the first disagreement and what disagreed, or None.
pub(crate) fn verify_variant(
    gpu: &Gpu,
    problem: Problem,
    variant: Variant,
    hs: usize,
    causal: bool,
) -> Result<Option<(String, String)>> {
    let [b, nh, t] = BASELINE_BNT;
    let dims = Dims::mha(b, t, nh, hs);
    let (c, w) = (dims.c(), dims.width());
    let opts = Options {
        causal: causal || problem == Problem::Cached,
        dropout: None,
    };
    let (qkv, dout) = check_inputs(dims);
    let want = expected_one(&qkv, &dout, dims, opts);
    let gqkv = gpu.upload_f32("baseline.qkv", &qkv)?;
    let f32s = |x: &[f64]| x.iter().map(|&v| v as f32).collect::<Vec<_>>();
    let (dispatches, got) = match problem {
        Problem::Forward => {
            let out = gpu.zeros("baseline.out", DType::F32, b * t * c)?;
            let lse = gpu.zeros("baseline.lse", DType::F32, b * nh * t)?;
            let step = own_step(gpu, None, 0)?;
            let ds = forward_with(gpu, &out, &lse, &gqkv, dims, opts, variant, &step)?;
            gpu.run(&ds)?;
            let got = vec![
                ("out", gpu.read_f32(&out)?, want.out),
                ("lse", gpu.read_f32(&lse)?, want.lse),
            ];
            (ds, got)
        }
        Problem::Backward => {
            let dqkv = gpu.zeros("baseline.dqkv", DType::F32, b * t * w)?;
            let tensors = BackwardTensors {
                dqkv: &dqkv,
                dout: &gpu.upload_f32("baseline.dout", &dout)?,
                qkv: &gqkv,
                out: &gpu.upload_f32("baseline.out", &f32s(&want.out))?,
                lse: &gpu.upload_f32("baseline.lse", &f32s(&want.lse))?,
            };
            let step = own_step(gpu, None, 0)?;
            let ds = backward_with(gpu, tensors, dims, opts, variant, &step)?;
            gpu.run(&ds)?;
            (ds, vec![("dqkv", gpu.read_f32(&dqkv)?, want.dqkv)])
        }
        Problem::Cached => {
            let (k, v) = (
                gpu.zeros("baseline.k_cache", DType::F32, b * nh * t * hs)?,
                gpu.zeros("baseline.v_cache", DType::F32, b * nh * t * hs)?,
            );
            let kv = KvCache {
                k: &k,
                v: &v,
                tmax: t,
            };
            let pos0 = t - BASELINE_TQ;
            let step = gpu.upload_f32("baseline.step_qkv", &qkv[pos0 * w..])?;
            let step_dims = Dims {
                t: BASELINE_TQ,
                ..dims
            };
            let out = gpu.zeros("baseline.out", DType::F32, b * BASELINE_TQ * c)?;
            let append = kv_append(gpu, kv, &gqkv, dims, 0)?;
            let at = own_step(gpu, None, pos0)?;
            let d = forward_cached_with(gpu, &out, &step, kv, step_dims, (pos0, &at), variant)?;
            gpu.run(&[append, d.clone()])?;
            let got = gpu.read_f32(&out)?;
            (
                vec![d],
                vec![("cached out", got, want.out[pos0 * c..].to_vec())],
            )
        }
    };
    let s = label(dims);
    let entries: Vec<String> = dispatches.iter().map(|d| d.name.clone()).collect();
    Ok(got
        .into_iter()
        .map(|(what, got, want)| CheckReport::new(&s, what, &got, &want, ATOL, RTOL))
        .find(|r| !r.ok())
        .map(|r| (entries.join(" / "), format!("{s}: {}", r.comparison))))
}

/// Decoding with f16 caches, on keys and values rounded to f16 (what the caches hold), against
/// the reference on those values; a prefill of 3, then chunks of 2 new tokens.
fn check_cached_f16(gpu: &Gpu, s: &str, qkv: &[f32], dims: Dims) -> Result<CheckReport> {
    let Dims { b, t, nh, .. } = dims;
    let rounded = round_kv_f16(qkv, dims);
    let mut out = vec![0.0; b * t * dims.c()];
    let (mut pre, mut att) = (vec![0.0; b * nh * t * t], vec![0.0; b * nh * t * t]);
    let mut lse = vec![0.0; b * nh * t];
    reference::attention::forward(
        &mut out,
        &mut pre,
        &mut att,
        &mut lse,
        &reference::convert::<f32, f64>(&rounded),
        dims,
        Options::CAUSAL,
    );
    let cached = decode_cached(gpu, &rounded, dims, 3, 2, DType::F16)?;
    Ok(CheckReport::new(
        s,
        "cached out, f16 cache",
        &cached,
        &out,
        ATOL,
        RTOL,
    ))
}

/// qkv (B, T, W) with its k and v parts rounded to f16 (the values an f16 cache holds) and q
/// unchanged.
pub fn round_kv_f16(qkv: &[f32], dims: Dims) -> Vec<f32> {
    let (c, w) = (dims.c(), dims.width());
    qkv.iter()
        .enumerate()
        .map(|(i, &x)| {
            if i % w < c {
                x
            } else {
                half::f16::from_f32(x).to_f32()
            }
        })
        .collect()
}

/// Runs generation-style attention over qkv (B, T, W): kv_append and forward_cached for a
/// prefill of `prefill` tokens, then for `step` tokens at a time (the last step may be shorter);
/// returns the outputs as (B, T, C).
pub fn decode(gpu: &Gpu, qkv: &[f32], dims: Dims, prefill: usize, step: usize) -> Result<Vec<f32>> {
    decode_cached(gpu, qkv, dims, prefill, step, DType::F32)
}

/// `decode` with caches of element type `cache` (f32 or f16).
pub fn decode_cached(
    gpu: &Gpu,
    qkv: &[f32],
    dims: Dims,
    prefill: usize,
    step: usize,
    cache: DType,
) -> Result<Vec<f32>> {
    let Dims { b, t, nkv, hs, .. } = dims;
    let (c, w) = (dims.c(), dims.width());
    // A cache longer than needed, so that Tmax and the sequence length differ.
    let tmax = t + 3;
    let kc = gpu.zeros("k_cache", cache, b * nkv * tmax * hs)?;
    let vc = gpu.zeros("v_cache", cache, b * nkv * tmax * hs)?;
    let mut steps = vec![(0, prefill.clamp(1, t))];
    while let Some(&(p, n)) = steps.last() {
        if p + n >= t {
            break;
        }
        steps.push((p + n, step.max(1).min(t - p - n)));
    }
    let mut dispatches = Vec::new();
    let mut outs = Vec::new();
    for &(pos0, n) in &steps {
        // qkv (B, n, W) of tokens pos0 .. pos0 + n
        let mut step_qkv = Vec::with_capacity(b * n * w);
        for bi in 0..b {
            step_qkv.extend_from_slice(&qkv[(bi * t + pos0) * w..(bi * t + pos0 + n) * w]);
        }
        let sq = gpu.upload_f32("step qkv", &step_qkv)?;
        let so = gpu.zeros("step out", DType::F32, b * n * c)?;
        let kv = KvCache {
            k: &kc,
            v: &vc,
            tmax,
        };
        let step_dims = Dims { t: n, ..dims };
        dispatches.push(kv_append(gpu, kv, &sq, step_dims, pos0)?);
        dispatches.push(forward_cached(gpu, &so, &sq, kv, step_dims, pos0)?);
        outs.push(so);
    }
    gpu.run(&dispatches)?;
    let mut full = vec![0.0; b * t * c];
    for (&(pos0, n), so) in steps.iter().zip(&outs) {
        let o = gpu.read_f32(so)?;
        for bi in 0..b {
            full[(bi * t + pos0) * c..(bi * t + pos0 + n) * c]
                .copy_from_slice(&o[bi * n * c..(bi + 1) * n * c]);
        }
    }
    Ok(full)
}

fn bench(gpu: &Gpu, shape: &[usize], opts: &BenchOptions) -> Result<Vec<BenchReport>> {
    let dims = dims_of(shape)?;
    let s = format!("{} causal", label(dims));
    let x = BenchTensors::new(gpu, dims)?;
    let tensors = x.tensors();
    let case = BenchCase {
        gpu,
        opts,
        s: &s,
        dims,
        tensors,
    };
    let fused_fwd = case.fused(Stage::Forward)?;
    let fused_bwd = case.fused(Stage::Backward)?;
    let [drop_fwd, drop_bwd] = case.dropout()?;
    let mut reports = fused_fwd;
    reports.push(drop_fwd);
    reports.extend(fused_bwd);
    reports.push(drop_bwd);
    reports.extend(bench_decode(gpu, opts, &x.qkv_data, &x.qkv, dims)?);
    Ok(reports)
}

/// `bench --suite quick`'s attention at `shape` (B, NH, T, HS[, NKV]), causal: the forward and
/// the backward the tuner takes, not every candidate, dropout and decoding as `bench` does.
pub fn bench_headline(gpu: &Gpu, shape: &[usize], opts: &BenchOptions) -> Result<Vec<BenchReport>> {
    let dims = dims_of(shape)?;
    let s = format!("{} causal", label(dims));
    let x = BenchTensors::new(gpu, dims)?;
    let fv = tuned(gpu, Stage::Forward, dims, true)?;
    let step = own_step(gpu, None, 0)?;
    let fwd = forward_with(
        gpu,
        &x.out,
        &x.lse,
        &x.qkv,
        dims,
        Options::CAUSAL,
        fv,
        &step,
    )?;
    let forward = harness::bench_one(gpu, opts, &format!("forward {}", fv.name()), &s, &fwd)?;
    // The backward reads the out and lse the forward's runs left.
    let tensors = x.tensors();
    let bv = tuned(gpu, Stage::Backward, dims, true)?;
    let bwd = backward_with(gpu, tensors, dims, Options::CAUSAL, bv, &step)?;
    let backward = harness::bench_one(gpu, opts, &format!("backward {}", bv.name()), &s, &bwd)?;
    Ok(vec![forward, backward])
}

/// The tensors of a causal bench shape: qkv and dout from `check_inputs` (qkv's values kept for
/// decoding), out, lse and dqkv zeroed.
struct BenchTensors {
    qkv_data: Vec<f32>,
    qkv: View,
    dout: View,
    out: View,
    lse: View,
    dqkv: View,
}

impl BenchTensors {
    fn new(gpu: &Gpu, dims: Dims) -> Result<BenchTensors> {
        let Dims { b, t, nh, .. } = dims;
        let (qkv_data, dout) = check_inputs(dims);
        Ok(BenchTensors {
            qkv: gpu.upload_f32("qkv", &qkv_data)?,
            dout: gpu.upload_f32("dout", &dout)?,
            out: gpu.zeros("out", DType::F32, b * t * dims.c())?,
            lse: gpu.zeros("lse", DType::F32, b * nh * t)?,
            dqkv: gpu.zeros("dqkv", DType::F32, b * t * dims.width())?,
            qkv_data,
        })
    }

    fn tensors(&self) -> BackwardTensors<'_> {
        BackwardTensors {
            dqkv: &self.dqkv,
            dout: &self.dout,
            qkv: &self.qkv,
            out: &self.out,
            lse: &self.lse,
        }
    }
}

/// One bench shape (causal): its label, dims, and the fused kernels' tensors.
struct BenchCase<'a> {
    gpu: &'a Gpu,
    opts: &'a BenchOptions,
    s: &'a str,
    dims: Dims,
    tensors: BackwardTensors<'a>,
}

impl BenchCase<'_> {
    /// Bytes of one row statistic (lse, D) over B·NH·T rows.
    fn row_bytes(&self) -> u64 {
        let Dims { b, t, nh, .. } = self.dims;
        4 * (b * nh * t) as u64
    }

    /// Bytes `v` keeps besides its inputs and outputs: the forward's lse (kept for the
    /// backward), the backward's lse and D, and the GEMM path's scores (S, or S and dP).
    fn extra_bytes(&self, stage: Stage, v: Variant) -> Result<u64> {
        let rows = self.row_bytes();
        let (stats, squares) = match stage {
            Stage::Forward => (rows, 1),
            Stage::Backward => (2 * rows, 2),
        };
        if v != Variant::Gemm {
            return Ok(stats);
        }
        let (groups, t) = (Groups::new(self.gpu, self.dims)?, self.dims.t);
        Ok(stats + squares * 4 * (groups.entries() * t * t) as u64)
    }

    /// Every candidate of `stage` side by side, the fixed rule and the fastest marked.
    fn fused(&self, stage: Stage) -> Result<Vec<BenchReport>> {
        let (gpu, dims, tensors) = (self.gpu, self.dims, self.tensors);
        let causal = Options::CAUSAL;
        let candidates = Variant::candidates(stage, dims.hs, storage_limit(gpu))?;
        let mut reports = Vec::new();
        for (i, &v) in candidates.iter().enumerate() {
            if !self.opts.wants(&v.name()) {
                continue;
            }
            let step = own_step(gpu, None, 0)?;
            let ds = match stage {
                Stage::Forward => {
                    let (out, lse, qkv) = (tensors.out, tensors.lse, tensors.qkv);
                    forward_with(gpu, out, lse, qkv, dims, causal, v, &step)?
                }
                Stage::Backward => backward_with(gpu, tensors, dims, causal, v, &step)?,
            };
            let mut name = match v {
                Variant::Gemm => format!("{} gemm path", stage.name()),
                _ => format!("fused {} {}", stage.name(), v.name()),
            };
            if i == 0 {
                name.push_str(" (fixed rule)");
            }
            let mut r = harness::bench_one(gpu, self.opts, &name, self.s, &ds)?;
            r.extra_bytes = Some(self.extra_bytes(stage, v)?);
            reports.push(r);
        }
        if let Some(r) = reports
            .iter_mut()
            .min_by(|x, y| x.time.median.total_cmp(&y.time.median))
        {
            r.variant.push_str(" <- fastest");
        }
        Ok(reports)
    }

    /// The tuned kernels with dropout 0.1 on the probabilities: the cost of the mask's hash.
    fn dropout(&self) -> Result<[BenchReport; 2]> {
        let (gpu, dims, tensors) = (self.gpu, self.dims, self.tensors);
        let dropout = Options {
            dropout: Some(Dropout {
                p: 0.1,
                seed: 1,
                step: 0,
            }),
            ..Options::CAUSAL
        };
        let dfwd = forward(gpu, tensors.out, tensors.lse, tensors.qkv, dims, dropout)?;
        let dbwd = backward(gpu, tensors, dims, dropout)?;
        let mut drop_fwd =
            harness::bench_one(gpu, self.opts, "tuned forward, dropout", self.s, &dfwd)?;
        let fv = tuned(gpu, Stage::Forward, dims, true)?;
        drop_fwd.extra_bytes = Some(self.extra_bytes(Stage::Forward, fv)?);
        let mut drop_bwd =
            harness::bench_one(gpu, self.opts, "tuned backward, dropout", self.s, &dbwd)?;
        let bv = tuned(gpu, Stage::Backward, dims, true)?;
        drop_bwd.extra_bytes = Some(self.extra_bytes(Stage::Backward, bv)?);
        Ok([drop_fwd, drop_bwd])
    }
}

/// Decoding one token (Tq = 1) at position T - 1 over a cache of T keys (prefilled from qkv),
/// with f32 and, where the adapter has it, f16 caches.
fn bench_decode(
    gpu: &Gpu,
    opts: &BenchOptions,
    qkv_data: &[f32],
    qkv: &View,
    dims: Dims,
) -> Result<Vec<BenchReport>> {
    let Dims { b, t, nkv, hs, .. } = dims;
    let (c, w) = (dims.c(), dims.width());
    let pos0 = t - 1;
    let ds = format!("{} Tq=1 pos0={pos0}", label(dims));
    let mut last = Vec::with_capacity(b * w);
    for bi in 0..b {
        last.extend_from_slice(&qkv_data[(bi * t + pos0) * w..(bi * t + t) * w]);
    }
    let step_qkv = gpu.upload_f32("step qkv", &last)?;
    let step_out = gpu.zeros("step out", DType::F32, b * c)?;
    let mut caches = vec![DType::F32];
    if gpu.has_f16() {
        caches.push(DType::F16);
    }
    let mut reports = Vec::new();
    for dtype in caches {
        let kc = gpu.zeros("k_cache", dtype, b * nkv * t * hs)?;
        let vc = gpu.zeros("v_cache", dtype, b * nkv * t * hs)?;
        let kv = KvCache {
            k: &kc,
            v: &vc,
            tmax: t,
        };
        gpu.run(&[kv_append(gpu, kv, qkv, dims, 0)?])?;
        let d = forward_cached(gpu, &step_out, &step_qkv, kv, Dims { t: 1, ..dims }, pos0)?;
        let variant = format!("decode, {} cache", dtype.name());
        reports.push(harness::bench_one(gpu, opts, &variant, &ds, &[d])?);
    }
    Ok(reports)
}
