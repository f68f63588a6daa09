//! attention.wgsl launchers: fused flash-style softmax attention (causal or not) with O(T) extra
//! memory, forward and backward; and KV-cache decoding.
//!
//! `forward` and `backward` compute their results by the variant the tuner measures fastest: the
//! fused tiled kernels, the fused row kernels, or the GEMM path, which runs the products through
//! the GEMM family's tuned kernels a group of (b, h) pairs at a time, with that group's T×T
//! scores in a scratch buffer shared by every layer (`Groups`).
//!
//! Layouts (f32), C = NH·HS, NKV key/value heads (grouped-query attention: NKV divides NH and
//! query head h reads key/value head h / (NH / NKV); NKV = NH is multi-head attention),
//! W = C + 2·NKV·HS (`Dims::width`):
//! - qkv, dqkv (B, T, W): the QKV projection's output and its gradient, each token's NH query
//!   heads, then its NKV key heads, then its NKV value heads (with NKV = NH, (B, T, 3C): GPT-2's
//!   c_attn)
//! - out, dout (B, T, NH, HS) = (B, T, C)
//! - lse (B, NH, T): the natural logsumexp of each row's scaled, masked scores
//! - k_cache, v_cache (B, NKV, Tmax, HS): a cache holds each key/value head once
//!
//! scale = 1/sqrt(HS); causal: the query at absolute position i sees keys j <= i.
//! Every launcher overwrites its outputs; dqkv is never accumulated into (the graph has no
//! second gradient source for it). The gradient of a key/value head sums its query heads' in head
//! order, inside one kernel (fused) or by accumulating products (GEMM path). Nothing uses
//! atomics: results are bit-identical run to run.
//!
//! Dropout on the attention probabilities (training): `forward` and `backward` take `Options`
//! with an optional `Dropout` (p, seed, step); P ∘ M replaces P in the product with V, where M is
//! 0 or 1/(1 - p) from a counter-based hash that the backward regenerates, so no mask is stored.
//! `Dropout::keeps_cell` (crate::hash) is the hash's CPU twin. The `_at` launchers read the mask's
//! counter (and, decoding, the position) from the per-step uniform (`kernels::step`), so one
//! dispatch serves every micro-step and every decoded token; the others bind a uniform of their
//! own holding the values they are given.
//!
//! f16 KV cache (inference): `kv_append` and `forward_cached` also take a `KvCache` of f16 views
//! (k and v both f16; qkv and out stay f32), selecting attention.wgsl's F16 variant: the new k
//! and v are rounded to f16 on append and widened on load, with scores, softmax and accumulation
//! in f32 and the same tiling as the f32 kernels. This needs the adapter's SHADER_F16 feature
//! (`Gpu::has_f16`); an f16 cache on an adapter without it is an error naming the tensor.
//!
//! The folder: this file is the launch API (what the graph and inference call); `variants` holds
//! the typed catalogue of kernel variants, the tiling tables and the tuner's choice among them;
//! `gemm_path` the GEMM path's products; `check` the `kernels check` / `kernels bench` harness.

pub mod check;
mod gemm_path;
mod variants;

use bytemuck::{Pod, Zeroable};

use super::step as per_step;
use super::{bytes_of, dropout, expect, expect_dims};
use crate::error::{Error, Result};
use crate::gpu::{
    Binding, Cost, DType, Dispatch, Gpu, KernelSpec, Shader, ShaderVariant, View, grid,
};
use crate::hash;
pub use check::{
    ATOL, FAMILY, RTOL, bench_headline, check_inputs, decode, decode_cached, round_kv_f16,
};
use gemm_path::{gemm_backward, gemm_forward};
pub use variants::{Stage, Tiles, Variant, baseline};
use variants::{head_capacity, tuned, tuned_cached};

use Binding::{Read, ReadWrite, Step};

/// The largest head size the fused kernels support.
pub const MAX_HS: usize = 128;

/// Fused forward: 1 = q, 2 = k, 3 = v (read), 4 = out, 5 = lse (read_write), and the per-step
/// uniform (as every attention kernel but the backward's prep).
pub const FORWARD: KernelSpec = KernelSpec {
    shader: Shader::Attention,
    variant: ShaderVariant::Base,
    entry: "attention_forward",
    bindings: &[Read, Read, Read, ReadWrite, ReadWrite, Step],
};
/// D = rowsum(dout ∘ out): 1 = dout, 2 = out (read), 3 = D (read_write).
pub const BACKWARD_PREP: KernelSpec = KernelSpec {
    shader: Shader::Attention,
    variant: ShaderVariant::Base,
    entry: "attention_backward_prep",
    bindings: &[Read, Read, ReadWrite],
};
/// dk, dv: 1, 2, 3 = qkv, 4 = dout, 5 = lse, 6 = D (read), 7 = dqkv (read_write).
pub const BACKWARD_DKDV: KernelSpec = KernelSpec {
    shader: Shader::Attention,
    variant: ShaderVariant::Base,
    entry: "attention_backward_dkdv",
    bindings: &[Read, Read, Read, Read, Read, Read, ReadWrite, Step],
};
/// dq: the bindings of `BACKWARD_DKDV`.
pub const BACKWARD_DQ: KernelSpec = KernelSpec {
    shader: Shader::Attention,
    variant: ShaderVariant::Base,
    entry: "attention_backward_dq",
    bindings: &[Read, Read, Read, Read, Read, Read, ReadWrite, Step],
};
/// `FORWARD`, `BACKWARD_DKDV` and `BACKWARD_DQ` with one invocation per row and no workgroup
/// memory (attention.wgsl's row kernels): same bindings.
pub const FORWARD_ROWS: KernelSpec = KernelSpec {
    entry: "attention_forward_rows",
    ..FORWARD
};
pub const BACKWARD_DKDV_ROWS: KernelSpec = KernelSpec {
    entry: "attention_backward_dkdv_rows",
    ..BACKWARD_DKDV
};
pub const BACKWARD_DQ_ROWS: KernelSpec = KernelSpec {
    entry: "attention_backward_dq_rows",
    ..BACKWARD_DQ
};
/// The GEMM path's softmax over one sequence's scores: 1 = scores, 2 = lse (read_write).
pub const SCORES_SOFTMAX: KernelSpec = KernelSpec {
    shader: Shader::Attention,
    variant: ShaderVariant::Base,
    entry: "attention_scores_softmax",
    bindings: &[ReadWrite, ReadWrite, Step],
};
/// The GEMM path's score gradients: 1 = scores, 2 = dP (read_write), 3 = lse, 4 = D (read).
pub const SCORES_BACKWARD: KernelSpec = KernelSpec {
    shader: Shader::Attention,
    variant: ShaderVariant::Base,
    entry: "attention_scores_backward",
    bindings: &[ReadWrite, ReadWrite, Read, Read, Step],
};
/// 1 = qkv (read), 2 = k_cache, 3 = v_cache (read_write).
pub const KV_APPEND: KernelSpec = KernelSpec {
    shader: Shader::Attention,
    variant: ShaderVariant::Base,
    entry: "kv_append",
    bindings: &[Read, ReadWrite, ReadWrite, Step],
};
/// `FORWARD` over f16 caches (attention.wgsl's F16 variant): 2 = k_cache, 3 = v_cache are f16.
pub const FORWARD_F16: KernelSpec = FORWARD.with_variant(ShaderVariant::F16);
/// `KV_APPEND` into f16 caches (attention.wgsl's F16 variant).
pub const KV_APPEND_F16: KernelSpec = KV_APPEND.with_variant(ShaderVariant::F16);
/// Mirrors `Params` in attention.wgsl. Strides are (base, batch, token, head) in elements.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
struct Params {
    nb: u32,
    nh: u32,
    hs: u32,
    tq: u32,
    tk: u32,
    pos0: u32,
    causal: u32,
    write_lse: u32,
    ntiles: u32,
    scale: f32,
    scale2: f32,
    group: u32,
    q: [u32; 4],
    k: [u32; 4],
    v: [u32; 4],
    o: [u32; 4],
    drop_seed: u32,
    grp_step: u32,
    drop_threshold: u32,
    drop_scale: f32,
    grp: [u32; 4],
}

/// The layout of `Params`, for the test that compares it with `Params` in the shader.
pub fn params_layout() -> super::ParamsLayout {
    super::params_layout!(Params {
        nb,
        nh,
        hs,
        tq,
        tk,
        pos0,
        causal,
        write_lse,
        ntiles,
        scale,
        scale2,
        group,
        q,
        k,
        v,
        o,
        drop_seed,
        grp_step,
        drop_threshold,
        drop_scale,
        grp
    })
}

/// Dropout on the attention probabilities: the probability of query `i` (row
/// (b·NH + h)·Tq + i) and key `j` is kept iff `Dropout::keeps_cell(row, j)`, bit for bit the
/// shader's `drop_factor`.
pub use crate::hash::Dropout;

/// The shape of an attention problem: B sequences of T tokens (the Tq new tokens, for the KV-cache
/// launchers), NH query heads of HS channels each, NKV key/value heads.
pub use crate::reference::attention::Dims;

/// How the fused kernels mask the probabilities: causally or not, and with dropout or not.
pub use crate::reference::attention::Options;

/// The tensors of the fused `backward`: dqkv (B, T, W) written; dout (B, T, C), qkv (B, T, W)
/// and the forward's out (B, T, C) and lse (B, NH, T) read.
#[derive(Clone, Copy, Debug)]
pub struct BackwardTensors<'a> {
    pub dqkv: &'a View,
    pub dout: &'a View,
    pub qkv: &'a View,
    pub out: &'a View,
    pub lse: &'a View,
}

/// A KV cache: keys `k` and values `v`, each (B, NKV, Tmax, HS), both f32 or both f16.
#[derive(Clone, Copy, Debug)]
pub struct KvCache<'a> {
    pub k: &'a View,
    pub v: &'a View,
    /// Positions the cache holds.
    pub tmax: usize,
}

/// A per-step uniform of a dispatch's own, for launchers called outside the graph: the mask
/// counter of `dropout` (if any) and the decoding position `pos0`.
fn own_step(gpu: &Gpu, dropout: Option<Dropout>, pos0: usize) -> Result<View> {
    let at = per_step::Step {
        dropout_step: dropout.map_or(0, |d| d.step),
        pos0: pos0 as u32,
        ..Default::default()
    };
    per_step::uniform(gpu, "attention.step", &at)
}

/// Strides of part `part` (0 = q, 1 = k, 2 = v) of qkv (B, T, W) with `dims.t` tokens, the head
/// stride per head of that part (query heads for q, key/value heads for k and v).
fn qkv_strides(dims: Dims, part: usize) -> [u32; 4] {
    let w = dims.width();
    [
        dims.part_offset(part, 0) as u32,
        (dims.t * w) as u32,
        w as u32,
        dims.hs as u32,
    ]
}

/// Strides of a (B, T, C) tensor.
fn btc_strides(Dims { t, nh, hs, .. }: Dims) -> [u32; 4] {
    let c = nh * hs;
    [0, (t * c) as u32, c as u32, hs as u32]
}

/// Strides of a cache (B, NKV, Tmax, HS).
fn cache_strides(nkv: usize, tmax: usize, hs: usize) -> [u32; 4] {
    [0, (nkv * tmax * hs) as u32, hs as u32, (tmax * hs) as u32]
}

impl Params {
    /// The params with `dropout` switched on (p > 0), after checking p.
    fn with_dropout(self, kernel: &str, dropout: Option<Dropout>) -> Result<Params> {
        let Some(d) = dropout.filter(|d| d.p != 0.0) else {
            return Ok(self);
        };
        dropout::check_p(kernel, d.p)?;
        Ok(Params {
            drop_seed: d.seed,
            drop_threshold: hash::threshold(d.p),
            drop_scale: hash::scale(d.p),
            ..self
        })
    }

    /// The params of `dims` (`dims.t` queries) over `tk` keys, before strides.
    fn new(dims: Dims, tk: usize, causal: bool) -> Params {
        let Dims { b, t, nh, hs, .. } = dims;
        let scale = 1.0 / (hs as f64).sqrt();
        Params {
            nb: b as u32,
            nh: nh as u32,
            hs: hs as u32,
            tq: t as u32,
            tk: tk as u32,
            group: dims.group() as u32,
            causal: causal as u32,
            scale: scale as f32,
            scale2: (scale * std::f64::consts::LOG2_E) as f32,
            ..Params::default()
        }
    }
}

/// Checks the dimensions and head size of a fused kernel: `dims` (whose T is named `t_name`) and
/// the further dimensions `more`.
fn check_fused_dims(kernel: &str, dims: Dims, t_name: &str, more: &[(&str, usize)]) -> Result<()> {
    let Dims { b, t, nh, nkv, hs } = dims;
    let named = [("B", b), (t_name, t), ("NH", nh), ("NKV", nkv), ("HS", hs)];
    expect_dims(kernel, &named)?;
    expect_dims(kernel, more)?;
    if !nh.is_multiple_of(nkv) {
        return Err(Error::invalid(
            kernel,
            format!("NKV = {nkv} key/value heads do not divide NH = {nh} query heads"),
        ));
    }
    if hs > MAX_HS {
        return Err(Error::invalid(
            kernel,
            format!("head size HS = {hs} exceeds the fused kernels' maximum MAX_HS = {MAX_HS}"),
        ));
    }
    Ok(())
}

/// FLOPs of one product over the unmasked (query, key) pairs, such as q·kᵀ or att·v, where the
/// T = Tq queries of `dims` attend to `tk` keys.
///
/// Dispatch costs count useful work only, the same for the fused kernels and the GEMM path: a
/// forward is 2 products, a backward 4 (dP, dV, dQ, dK). The fused backward's recomputation of
/// the scores and the GEMM path's work on masked entries are left out, so GFLOP/s compares the
/// time taken for the same result.
fn product_flops(dims: Dims, tk: usize, causal: bool) -> u64 {
    let Dims {
        b, t: tq, nh, hs, ..
    } = dims;
    let pairs: u64 = if causal {
        // query i (at position tk - tq + i) sees tk - tq + i + 1 keys
        (0..tq as u64).map(|i| (tk - tq) as u64 + i + 1).sum()
    } else {
        (tq * tk) as u64
    };
    2 * pairs * hs as u64 * (b * nh) as u64
}

/// attention.wgsl's override constant that makes a dispatch take its position from the per-step
/// uniform (decoding: `forward_cached_at`, `kv_append_at`).
const FROM_STEP: (&str, f64) = ("FROM_STEP", 1.0);

/// A fused forward dispatch of `variant`; `decoding` reads the position from the per-step uniform
/// (`FROM_STEP`).
fn fused_forward(
    gpu: &Gpu,
    (shader, decoding): (ShaderVariant, bool),
    spec_args: [&View; 6],
    params: Params,
    cost: Cost,
    variant: Variant,
) -> Result<Dispatch> {
    let max_wg = gpu.limits.max_compute_workgroups_per_dimension;
    let with_position = |mut constants: Vec<(&'static str, f64)>| {
        if decoding {
            constants.push(FROM_STEP);
        }
        constants
    };
    match variant {
        Variant::Tiled(tiles, _) => {
            let ntiles = params.tq.div_ceil(tiles.br);
            let params = Params { ntiles, ..params };
            gpu.dispatch(
                &FORWARD.with_variant(shader),
                &with_position(tiles.constants().to_vec()),
                bytes_of(&params),
                &spec_args,
                grid(params.nb * params.nh * ntiles, max_wg),
                cost,
            )
        }
        Variant::Rows(wg) => gpu.dispatch(
            &FORWARD_ROWS.with_variant(shader),
            &with_position(rows_constants(wg, params.hs).to_vec()),
            bytes_of(&params),
            &spec_args,
            grid((params.nb * params.nh * params.tq).div_ceil(wg), max_wg),
            cost,
        ),
        Variant::Gemm => Err(Error::invalid(
            FORWARD.name(),
            "the GEMM path is not a fused kernel (KV-cache decoding has none)",
        )),
    }
}

/// The override constants of the row kernels.
fn rows_constants(wg: u32, hs: u32) -> [(&'static str, f64); 2] {
    [("WG", wg as f64), ("HD", head_capacity(hs as usize) as f64)]
}

/// Fused forward: out (B, T, C) and lse (B, NH, T) from qkv (B, T, W); scale 1/sqrt(HS); causal
/// or not, dropout on the probabilities or not, as `opts` asks. Overwrites out and lse. No T×T
/// matrix is stored; key tiles wholly past the causal limit are skipped. The kernels are chosen
/// by measurement (`tuned`).
pub fn forward(
    gpu: &Gpu,
    out: &View,
    lse: &View,
    qkv: &View,
    dims: Dims,
    opts: Options,
) -> Result<Vec<Dispatch>> {
    let step = own_step(gpu, opts.dropout, 0)?;
    forward_at(gpu, out, lse, qkv, dims, opts, &step)
}

/// `forward` with the dropout mask's counter read from the per-step uniform `step` (the counter in
/// `opts` unused).
pub fn forward_at(
    gpu: &Gpu,
    out: &View,
    lse: &View,
    qkv: &View,
    dims: Dims,
    opts: Options,
    step: &View,
) -> Result<Vec<Dispatch>> {
    check_forward(out, lse, qkv, dims)?;
    let variant = tuned(gpu, Stage::Forward, dims, opts.causal)?;
    forward_with(gpu, out, lse, qkv, dims, opts, variant, step)
}

/// Checks the tensors of the fused forward.
fn check_forward(out: &View, lse: &View, qkv: &View, dims: Dims) -> Result<()> {
    let Dims { b, t, nh, hs, .. } = dims;
    let name = FORWARD.name();
    check_fused_dims(&name, dims, "T", &[])?;
    let c = nh * hs;
    expect(&name, qkv, DType::F32, b * t * dims.width())?;
    expect(&name, out, DType::F32, b * t * c)?;
    expect(&name, lse, DType::F32, b * nh * t)
}

/// `forward_at` computed by `variant`.
#[allow(clippy::too_many_arguments)]
fn forward_with(
    gpu: &Gpu,
    out: &View,
    lse: &View,
    qkv: &View,
    dims: Dims,
    opts: Options,
    variant: Variant,
    step: &View,
) -> Result<Vec<Dispatch>> {
    check_forward(out, lse, qkv, dims)?;
    let Dims { b, t, nh, .. } = dims;
    let Options { causal, dropout } = opts;
    let (c, w) = (dims.c(), dims.width());
    let params = Params {
        write_lse: 1,
        q: qkv_strides(dims, 0),
        k: qkv_strides(dims, 1),
        v: qkv_strides(dims, 2),
        o: btc_strides(dims),
        ..Params::new(dims, t, causal)
    }
    .with_dropout(&FORWARD.name(), dropout)?;
    if variant == Variant::Gemm {
        return gemm_forward(gpu, [out, lse, qkv, step], dims, &params);
    }
    let cost = Cost {
        flops: 2 * product_flops(dims, t, causal),
        bytes: 4 * (b * t * (w + c) + b * nh * t) as u64,
    };
    Ok(vec![fused_forward(
        gpu,
        (ShaderVariant::Base, false),
        [qkv, qkv, qkv, out, lse, step],
        params,
        cost,
        variant,
    )?])
}

/// Fused backward: dqkv (B, T, W) from dout (B, T, C), qkv (B, T, W), and the forward's out
/// (B, T, C) and lse (B, NH, T). Overwrites dqkv. Three dispatches: D = rowsum(dout ∘ out) into a
/// private (B, NH, T) scratch, then dk and dv (one workgroup per key tile, or one invocation per
/// key), then dq (per query tile, or per query); probabilities are recomputed from lse, and the
/// dropout mask (the forward's `opts`, same step) from its hash. Deterministic, no atomics.
/// The kernels are chosen by measurement (`tuned`).
pub fn backward(
    gpu: &Gpu,
    tensors: BackwardTensors,
    dims: Dims,
    opts: Options,
) -> Result<Vec<Dispatch>> {
    let step = own_step(gpu, opts.dropout, 0)?;
    backward_at(gpu, tensors, dims, opts, &step)
}

/// `backward` with the dropout mask's counter read from the per-step uniform `step` (the counter
/// in `opts` unused).
pub fn backward_at(
    gpu: &Gpu,
    tensors: BackwardTensors,
    dims: Dims,
    opts: Options,
    step: &View,
) -> Result<Vec<Dispatch>> {
    check_backward(tensors, dims)?;
    let variant = tuned(gpu, Stage::Backward, dims, opts.causal)?;
    backward_with(gpu, tensors, dims, opts, variant, step)
}

/// Checks the tensors of the fused backward.
fn check_backward(tensors: BackwardTensors, dims: Dims) -> Result<()> {
    let BackwardTensors {
        dqkv,
        dout,
        qkv,
        out,
        lse,
    } = tensors;
    let Dims { b, t, nh, hs, .. } = dims;
    let name = "attention.backward";
    check_fused_dims(name, dims, "T", &[])?;
    let (c, w) = (nh * hs, dims.width());
    expect(name, dqkv, DType::F32, b * t * w)?;
    expect(name, dout, DType::F32, b * t * c)?;
    expect(name, qkv, DType::F32, b * t * w)?;
    expect(name, out, DType::F32, b * t * c)?;
    expect(name, lse, DType::F32, b * nh * t)
}

/// The backward's first pass: D (B, NH, T) = rowsum(dout ⊙ out) per head, which both gradient
/// kernels read.
fn backward_prep(
    gpu: &Gpu,
    base: &Params,
    dout: &View,
    out: &View,
    d: &View,
    Dims { b, t, nh, hs, .. }: Dims,
) -> Result<Dispatch> {
    const PREP_WG: u32 = 256;
    let (c, rows) = (nh * hs, b * nh * t);
    gpu.dispatch(
        &BACKWARD_PREP,
        &[("WG", PREP_WG as f64)],
        bytes_of(base),
        &[dout, out, d],
        grid(
            (rows as u32).div_ceil(PREP_WG),
            gpu.limits.max_compute_workgroups_per_dimension,
        ),
        Cost {
            flops: 2 * (b * t * c) as u64,
            bytes: 4 * (2 * b * t * c + rows) as u64,
        },
    )
}

/// `backward_at` computed by `variant`.
fn backward_with(
    gpu: &Gpu,
    tensors: BackwardTensors,
    dims: Dims,
    opts: Options,
    variant: Variant,
    step: &View,
) -> Result<Vec<Dispatch>> {
    check_backward(tensors, dims)?;
    let BackwardTensors {
        dqkv,
        dout,
        qkv,
        out,
        lse,
    } = tensors;
    let name = "attention.backward";
    let Dims { b, t, nh, nkv, .. } = dims;
    let Options { causal, dropout } = opts;
    let (c, w) = (dims.c(), dims.width());
    let max_wg = gpu.limits.max_compute_workgroups_per_dimension;
    let base = Params {
        q: qkv_strides(dims, 0),
        k: qkv_strides(dims, 1),
        v: qkv_strides(dims, 2),
        o: btc_strides(dims),
        ..Params::new(dims, t, causal)
    }
    .with_dropout(name, dropout)?;
    let rows = b * nh * t;
    let d = gpu.zeros("attention D", DType::F32, rows)?;
    let prep = backward_prep(gpu, &base, dout, out, &d, dims)?;
    let product = product_flops(dims, t, causal);
    let io_bytes = 4 * (2 * b * t * w + b * t * c + 2 * rows) as u64;
    let cost = Cost {
        // dV and dK, or dP and dQ
        flops: 2 * product,
        bytes: io_bytes / 2,
    };
    let args = [qkv, qkv, qkv, dout, lse, &d, dqkv, step];
    let mut all = vec![prep];
    match variant {
        // dK/dV runs per key/value head (each looping over its group), dQ per query head.
        Variant::Tiled(dkdv_tiles, dq_tiles) => {
            let passes = [
                (&BACKWARD_DKDV, dkdv_tiles, nkv),
                (&BACKWARD_DQ, dq_tiles, nh),
            ];
            for (spec, tiles, heads) in passes {
                let ntiles = (t as u32).div_ceil(tiles.br);
                let params = Params { ntiles, ..base };
                all.push(gpu.dispatch(
                    spec,
                    &tiles.constants(),
                    bytes_of(&params),
                    &args,
                    grid(params.nb * heads as u32 * ntiles, max_wg),
                    cost,
                )?);
            }
        }
        Variant::Rows(wg) => {
            for (spec, heads) in [(&BACKWARD_DKDV_ROWS, nkv), (&BACKWARD_DQ_ROWS, nh)] {
                all.push(gpu.dispatch(
                    spec,
                    &rows_constants(wg, base.hs),
                    bytes_of(&base),
                    &args,
                    grid(((b * heads * t) as u32).div_ceil(wg), max_wg),
                    cost,
                )?);
            }
        }
        Variant::Gemm => all.extend(gemm_backward(gpu, tensors, dims, &base, (&d, step))?),
    }
    Ok(all)
}

/// KV-cache decoding: the Tq = `dims.t` new tokens of qkv (B, Tq, W), at absolute positions
/// pos0 .. pos0 + Tq, attend causally to keys and values 0 .. pos0 + Tq held in `cache` (append
/// the new tokens first with `kv_append`). Overwrites out (B, Tq, C); no lse. The caches are both
/// f32, or both f16 (on adapters with SHADER_F16: widened to f32 on load); qkv and out are f32.
pub fn forward_cached(
    gpu: &Gpu,
    out: &View,
    qkv: &View,
    cache: KvCache,
    dims: Dims,
    pos0: usize,
) -> Result<Dispatch> {
    let dtype = check_cached(gpu, out, qkv, cache, dims, pos0)?;
    let variant = tuned_cached(gpu, dtype, dims, cache.tmax)?;
    let step = own_step(gpu, None, pos0)?;
    forward_cached_with(gpu, out, qkv, cache, dims, (pos0, &step), variant)
}

/// `forward_cached` at the position the per-step uniform `step` holds when it runs (its `pos0`;
/// the caller keeps pos0 + Tq within the cache): one dispatch serves every decoding step.
pub fn forward_cached_at(
    gpu: &Gpu,
    out: &View,
    qkv: &View,
    cache: KvCache,
    dims: Dims,
    step: &View,
) -> Result<Dispatch> {
    let dtype = check_cached(gpu, out, qkv, cache, dims, 0)?;
    let variant = tuned_cached(gpu, dtype, dims, cache.tmax)?;
    forward_cached_with(gpu, out, qkv, cache, dims, (0, step), variant)
}

/// Checks the tensors of `forward_cached` for Tq = `dims.t` new tokens at `pos0`; returns the
/// caches' element type.
fn check_cached(
    gpu: &Gpu,
    out: &View,
    qkv: &View,
    cache: KvCache,
    dims: Dims,
    pos0: usize,
) -> Result<DType> {
    let name = "attention.forward_cached";
    let Dims {
        b, t: tq, nkv, hs, ..
    } = dims;
    let tmax = cache.tmax;
    check_fused_dims(name, dims, "Tq", &[("Tmax", tmax)])?;
    check_cache_positions(name, tq, pos0, tmax)?;
    expect(name, out, DType::F32, b * tq * dims.c())?;
    expect(name, qkv, DType::F32, b * tq * dims.width())?;
    let (dtype, _) = cache_dtype(gpu, name, cache.k, &FORWARD, &FORWARD_F16)?;
    expect(name, cache.k, dtype, b * nkv * tmax * hs)?;
    expect(name, cache.v, dtype, b * nkv * tmax * hs)?;
    Ok(dtype)
}

/// `forward_cached_at` computed by `variant`, checked and costed at position `pos0`.
fn forward_cached_with(
    gpu: &Gpu,
    out: &View,
    qkv: &View,
    cache: KvCache,
    dims: Dims,
    (pos0, step): (usize, &View),
    variant: Variant,
) -> Result<Dispatch> {
    let dtype = check_cached(gpu, out, qkv, cache, dims, pos0)?;
    let Dims {
        b, t: tq, nkv, hs, ..
    } = dims;
    let tmax = cache.tmax;
    let (c, w) = (dims.c(), dims.width());
    let shader = if dtype == DType::F16 {
        ShaderVariant::F16
    } else {
        ShaderVariant::Base
    };
    let tk = pos0 + tq;
    // Queries at step.pos0 + i, keys 0 .. step.pos0 + Tq (attention.wgsl's pos0 and tk, with
    // FROM_STEP = 1).
    let params = Params {
        write_lse: 0,
        q: qkv_strides(dims, 0),
        k: cache_strides(nkv, tmax, hs),
        v: cache_strides(nkv, tmax, hs),
        o: btc_strides(dims),
        ..Params::new(dims, tq, true)
    };
    // The kernel's lse binding is not written when write_lse = 0; a word stands in for it.
    let unused_lse = gpu.zeros("attention unused lse", DType::F32, 1)?;
    let cost = Cost {
        flops: 2 * product_flops(dims, tk, true),
        bytes: 4 * (b * tq * (w + c)) as u64 + dtype.size() * (2 * b * tk * dims.kv_c()) as u64,
    };
    fused_forward(
        gpu,
        (shader, true),
        [qkv, cache.k, cache.v, out, &unused_lse, step],
        params,
        cost,
        variant,
    )
}

/// The element type of a KV cache, with the kernel for it: f16 when `k_cache` is f16 (the
/// adapter must have SHADER_F16), f32 otherwise; the caller checks both caches against it.
fn cache_dtype<'a>(
    gpu: &Gpu,
    kernel: &str,
    k_cache: &View,
    f32_spec: &'a KernelSpec,
    f16_spec: &'a KernelSpec,
) -> Result<(DType, &'a KernelSpec)> {
    if k_cache.dtype == DType::F16 {
        super::expect_f16_support(gpu, kernel, k_cache)?;
        Ok((DType::F16, f16_spec))
    } else {
        Ok((DType::F32, f32_spec))
    }
}

fn check_cache_positions(kernel: &str, tq: usize, pos0: usize, tmax: usize) -> Result<()> {
    if pos0 + tq > tmax {
        return Err(Error::invalid(
            kernel,
            format!(
                "positions pos0 + Tq = {pos0} + {tq} = {} exceed the cache's Tmax = {tmax}",
                pos0 + tq
            ),
        ));
    }
    Ok(())
}

/// Copies the k and v of the Tq = `dims.t` new tokens of qkv (B, Tq, W) into `cache`'s k and v
/// (B, NKV, Tmax, HS) at positions pos0 .. pos0 + Tq. Overwrites those rows of the caches.
/// The caches are both f32, or both f16 (on adapters with SHADER_F16: the values are rounded to
/// f16 and must lie within its range, |x| <= 65504); qkv is f32.
pub fn kv_append(
    gpu: &Gpu,
    cache: KvCache,
    qkv: &View,
    dims: Dims,
    pos0: usize,
) -> Result<Dispatch> {
    check_cache_positions(&KV_APPEND.name(), dims.t, pos0, cache.tmax)?;
    kv_append_at(gpu, cache, qkv, dims, &own_step(gpu, None, pos0)?)
}

/// `kv_append` at the position the per-step uniform `step` holds when it runs (its `pos0`; the
/// caller keeps pos0 + Tq within the cache).
pub fn kv_append_at(
    gpu: &Gpu,
    cache: KvCache,
    qkv: &View,
    dims: Dims,
    step: &View,
) -> Result<Dispatch> {
    let Dims {
        b, t: tq, nkv, hs, ..
    } = dims;
    let KvCache {
        k: k_cache,
        v: v_cache,
        tmax,
    } = cache;
    let name = KV_APPEND.name();
    check_fused_dims(&name, dims, "Tq", &[("Tmax", tmax)])?;
    check_cache_positions(&name, tq, 0, tmax)?;
    expect(&name, qkv, DType::F32, b * tq * dims.width())?;
    let (cache, spec) = cache_dtype(gpu, &name, k_cache, &KV_APPEND, &KV_APPEND_F16)?;
    expect(&name, k_cache, cache, b * nkv * tmax * hs)?;
    expect(&name, v_cache, cache, b * nkv * tmax * hs)?;
    // Written at step.pos0 + i (attention.wgsl's pos0, with FROM_STEP = 1); p.tk keeps Tmax.
    let params = Params {
        k: qkv_strides(dims, 1),
        v: qkv_strides(dims, 2),
        ..Params::new(dims, tmax, true)
    };
    const WG: u32 = 256;
    let n = b * tq * dims.kv_c();
    gpu.dispatch(
        spec,
        &[("WG", WG as f64), FROM_STEP],
        bytes_of(&params),
        &[qkv, k_cache, v_cache, step],
        grid(
            (n as u32).div_ceil(WG),
            gpu.limits.max_compute_workgroups_per_dimension,
        ),
        Cost {
            flops: 0,
            // k and v read as f32, written as f32 or f16
            bytes: (8 + 2 * cache.size()) * n as u64,
        },
    )
}
