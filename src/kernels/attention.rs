//! attention.wgsl launchers: fused flash-style softmax attention (causal or not) with O(T) extra
//! memory, forward and backward; KV-cache decoding; and an unfused baseline that keeps the T×T
//! matrices in memory, for comparison.
//!
//! `forward` and `backward` compute their results by the variant the tuner measures fastest: the
//! fused tiled kernels, the fused row kernels, or the GEMM path, which runs the products through
//! the GEMM family's tuned kernels a group of (b, h) pairs at a time, with that group's T×T
//! scores in a scratch buffer shared by every layer (`Groups`).
//!
//! Layouts (f32), C = NH·HS:
//! - qkv, dqkv (B, T, 3, NH, HS) = (B, T, 3C): the QKV projection's output and its gradient
//! - out, dout (B, T, NH, HS) = (B, T, C)
//! - lse (B, NH, T): the natural logsumexp of each row's scaled, masked scores
//! - k_cache, v_cache (B, NH, Tmax, HS)
//! - preatt, att, dpreatt, datt (B, NH, T, T): unfused baseline only
//!
//! scale = 1/sqrt(HS); causal: the query at absolute position i sees keys j <= i.
//! Every launcher overwrites its outputs; dqkv is never accumulated into (the graph has no
//! second gradient source for it). Nothing uses atomics: results are bit-identical run to run.
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

use bytemuck::{Pod, Zeroable};

use super::gemm::{self, Matmul, Operand};
use super::harness::{self, BenchOptions, BenchReport, CheckReport, Family};
use super::step as per_step;
use super::{bytes_of, dropout, expect, expect_dims};
use crate::error::{Error, Result};
use crate::gpu::{
    Binding, Cost, DType, Dispatch, Gpu, KernelSpec, Shader, ShaderVariant, View, grid,
};
use crate::hash;
use crate::reference;
use crate::rng::Rng;

use Binding::{Read, ReadWrite, Step};

/// The largest head size the fused kernels support.
pub const MAX_HS: usize = 128;

/// Fused forward: 1 = q, 2 = k, 3 = v (read), 4 = out, 5 = lse (read_write).
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
/// C = alpha · A · B, batched over (b, h): 1 = A, 2 = B (read), 3 = C (read_write).
pub const UNFUSED_GEMM: KernelSpec = KernelSpec {
    shader: Shader::Attention,
    variant: ShaderVariant::Base,
    entry: "unfused_gemm",
    bindings: &[Read, Read, ReadWrite],
};
/// 1 = preatt (read), 2 = att (read_write).
pub const UNFUSED_SOFTMAX: KernelSpec = KernelSpec {
    shader: Shader::Attention,
    variant: ShaderVariant::Base,
    entry: "unfused_softmax",
    bindings: &[Read, ReadWrite],
};
/// 1 = att, 2 = datt (read), 3 = dpreatt (read_write).
pub const UNFUSED_SOFTMAX_BACKWARD: KernelSpec = KernelSpec {
    shader: Shader::Attention,
    variant: ShaderVariant::Base,
    entry: "unfused_softmax_backward",
    bindings: &[Read, Read, ReadWrite],
};

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
    from_step: u32,
    q: [u32; 4],
    k: [u32; 4],
    v: [u32; 4],
    o: [u32; 4],
    drop_seed: u32,
    pad: u32,
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
        from_step,
        q,
        k,
        v,
        o,
        drop_seed,
        pad,
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
/// launchers), NH heads of HS channels each.
pub use crate::reference::attention::Dims;

/// How the fused kernels mask the probabilities: causally or not, and with dropout or not.
pub use crate::reference::attention::Options;

/// The tensors of the fused `backward`: dqkv (B, T, 3C) written; dout (B, T, C), qkv (B, T, 3C)
/// and the forward's out (B, T, C) and lse (B, NH, T) read.
#[derive(Clone, Copy, Debug)]
pub struct BackwardTensors<'a> {
    pub dqkv: &'a View,
    pub dout: &'a View,
    pub qkv: &'a View,
    pub out: &'a View,
    pub lse: &'a View,
}

/// The tensors of `backward_unfused`: dqkv (B, T, 3C), dpreatt and datt (B, NH, T, T) written;
/// dout (B, T, C), qkv (B, T, 3C) and the forward's att (B, NH, T, T) read.
#[derive(Clone, Copy, Debug)]
pub struct UnfusedBackwardTensors<'a> {
    pub dqkv: &'a View,
    pub dpreatt: &'a View,
    pub datt: &'a View,
    pub dout: &'a View,
    pub qkv: &'a View,
    pub att: &'a View,
}

/// A KV cache: keys `k` and values `v`, each (B, NH, Tmax, HS), both f32 or both f16.
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

/// Strides of part `part` (0 = q, 1 = k, 2 = v) of qkv (B, T, 3C).
fn qkv_strides(t: usize, c: usize, hs: usize, part: usize) -> [u32; 4] {
    [
        (part * c) as u32,
        (t * 3 * c) as u32,
        (3 * c) as u32,
        hs as u32,
    ]
}

/// Strides of a (B, T, C) tensor.
fn btc_strides(t: usize, c: usize, hs: usize) -> [u32; 4] {
    [0, (t * c) as u32, c as u32, hs as u32]
}

/// Strides of a cache (B, NH, Tmax, HS).
fn cache_strides(nh: usize, tmax: usize, hs: usize) -> [u32; 4] {
    [0, (nh * tmax * hs) as u32, hs as u32, (tmax * hs) as u32]
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

    fn new(b: usize, nh: usize, hs: usize, tq: usize, tk: usize, causal: bool) -> Params {
        let scale = 1.0 / (hs as f64).sqrt();
        Params {
            nb: b as u32,
            nh: nh as u32,
            hs: hs as u32,
            tq: tq as u32,
            tk: tk as u32,
            causal: causal as u32,
            scale: scale as f32,
            scale2: (scale * std::f64::consts::LOG2_E) as f32,
            ..Params::default()
        }
    }
}

/// Which fused kernel a tiling is for; each uses different workgroup arrays.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pass {
    Forward,
    Dq,
    Dkdv,
}

/// The tiling of a fused kernel (the override constants of attention.wgsl). A workgroup of `wg`
/// invocations owns `br` rows and streams tiles of `bc` columns; head dims are padded to `hd`.
/// The score phase splits the br × bc tile over `sc` threads across columns; the output phase
/// splits the br × hd output over `tc` threads across vec4 columns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Tiles {
    wg: u32,
    br: u32,
    bc: u32,
    hd: u32,
    sc: u32,
    tc: u32,
}

/// Register-array capacities of attention.wgsl (RS_MAX, CS_MAX, S_MAX, DV_MAX, ACC_MAX).
const RS_MAX: u32 = 8;
const CS_MAX: u32 = 4;
const S_MAX: u32 = 16;
const DV_MAX: u32 = 2;
const ACC_MAX: u32 = 8;

/// (rows, columns, invocations) per workgroup, best first; the first that fits the adapter's
/// workgroup memory wins. Larger tiles reuse each loaded K/V (or Q/dO) tile more.
const FORWARD_SHAPES: &[(u32, u32, u32)] = &[
    (64, 32, 128),
    (32, 32, 64),
    (32, 16, 64),
    (16, 16, 64),
    (16, 8, 32),
    (8, 8, 32),
    (8, 4, 32),
];
const BACKWARD_SHAPES: &[(u32, u32, u32)] = &[
    (64, 32, 128),
    (32, 32, 64),
    (32, 16, 64),
    (16, 16, 64),
    (16, 8, 64),
    (16, 8, 32),
    (8, 8, 32),
    (8, 4, 32),
];

/// Workgroup memory the tilings may use: every tiling in the tables that fits 32 KiB is checked
/// against the reference on lavapipe (which offers exactly 32 KiB); larger tiles would need tuning
/// on the hardware that offers more.
const STORAGE_CAP: u32 = 32 << 10;
/// The WebGPU minimum: every head size must have a tiling within it.
#[cfg(test)]
const STORAGE_MIN: u32 = 16 << 10;

/// Head-size capacity: HS rounded up to a power of two, at least 16.
fn head_capacity(hs: usize) -> u32 {
    (hs.max(16).next_power_of_two()) as u32
}

impl Tiles {
    /// The tiling for (br, bc, wg) and head capacity hd, if the shader's divisibility and register
    /// limits allow it: score blocks of up to 4 columns per thread, output blocks of up to 16
    /// threads across the vec4 columns.
    fn derive(br: u32, bc: u32, wg: u32, hd: u32) -> Option<Tiles> {
        // a > 0 and a divides b
        let divides = |a: u32, b: u32| a > 0 && b.is_multiple_of(a);
        if !divides(wg, br * bc) {
            return None;
        }
        let n = br * bc / wg;
        let cs = n.min(CS_MAX).min(bc);
        if !divides(cs, n) || !divides(cs, bc) {
            return None;
        }
        let sc = bc / cs;
        if !divides(sc, wg) || !divides(wg / sc, br) {
            return None;
        }
        let rs = br / (wg / sc);
        let hd4 = hd / 4;
        let tc = hd4.min(16);
        let dv = hd4 / tc;
        if !divides(tc, wg) || !divides(wg / tc, br) {
            return None;
        }
        let ro = br / (wg / tc);
        let ok = (1..=RS_MAX).contains(&rs)
            && rs * cs == n
            && n <= S_MAX
            && dv <= DV_MAX
            && ro >= 1
            && ro * dv <= ACC_MAX;
        ok.then_some(Tiles {
            wg,
            br,
            bc,
            hd,
            sc,
            tc,
        })
    }

    /// Bytes of workgroup memory `pass` declares with this tiling (mirrors the WGSL arrays).
    fn workgroup_bytes(&self, pass: Pass) -> u64 {
        let row = 16 * (self.hd as u64 / 4 + 1);
        let (br, bc) = (self.br as u64, self.bc as u64);
        match pass {
            Pass::Forward => row * (br + 2 * bc) + 4 * (br * bc + br * self.sc as u64 + br),
            Pass::Dq => row * (2 * br + 2 * bc) + 4 * br * bc,
            Pass::Dkdv => row * (2 * br + 2 * bc) + 8 * br * bc,
        }
    }

    /// The best tiling of `pass` for head size `hs` within `storage` bytes of workgroup memory.
    fn choose(pass: Pass, hs: usize, storage: u32) -> Result<Tiles> {
        let hd = head_capacity(hs);
        let shapes = match pass {
            Pass::Forward => FORWARD_SHAPES,
            Pass::Dq | Pass::Dkdv => BACKWARD_SHAPES,
        };
        let candidates = shapes
            .iter()
            .filter_map(|&(br, bc, wg)| Tiles::derive(br, bc, wg, hd));
        let mut smallest = u64::MAX;
        for t in candidates {
            let bytes = t.workgroup_bytes(pass);
            if bytes <= storage as u64 {
                return Ok(t);
            }
            smallest = smallest.min(bytes);
        }
        Err(Error::invalid(
            format!("attention {pass:?}"),
            format!(
                "HS = {hs} needs at least {smallest} bytes of workgroup memory, over the \
                 adapter's max_compute_workgroup_storage_size of {storage}"
            ),
        ))
    }

    fn constants(&self) -> [(&'static str, f64); 6] {
        [
            ("WG", self.wg as f64),
            ("BR", self.br as f64),
            ("BC", self.bc as f64),
            ("HD", self.hd as f64),
            ("SC", self.sc as f64),
            ("TC", self.tc as f64),
        ]
    }
}

/// Invocations per workgroup of the row kernels.
const ROWS_WG: u32 = 64;

/// Which kernels compute a pass, forward or backward: the fused tiled kernels (the forward's
/// tiling twice, or dK/dV's and dQ's), the fused row kernels with `wg` invocations per
/// workgroup, or the GEMM path (`gemm_forward`, `gemm_backward`). The tiled kernels suit GPUs;
/// the row kernels, without workgroup memory or barriers, suit CPU-like adapters and short
/// sequences; the GEMM path suits CPU-like adapters on long sequences. `tuned` measures which
/// wins.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Variant {
    Tiled(Tiles, Tiles),
    Rows(u32),
    Gemm,
}

/// A fused pass as the tuner sees it: the forward, or the whole backward (its three dispatches).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stage {
    Forward,
    Backward,
}

impl Stage {
    fn name(self) -> &'static str {
        match self {
            Stage::Forward => "forward",
            Stage::Backward => "backward",
        }
    }
}

impl Variant {
    /// The fixed rule: the first tiling of the table that fits `storage` bytes.
    fn rule(stage: Stage, hs: usize, storage: u32) -> Result<Variant> {
        Ok(match stage {
            Stage::Forward => {
                let t = Tiles::choose(Pass::Forward, hs, storage)?;
                Variant::Tiled(t, t)
            }
            Stage::Backward => Variant::Tiled(
                Tiles::choose(Pass::Dkdv, hs, storage)?,
                Tiles::choose(Pass::Dq, hs, storage)?,
            ),
        })
    }

    /// Every variant that runs `stage` for head size `hs` within `storage` bytes of workgroup
    /// memory, the fixed rule first: each tiling of the table that fits, then the row kernels.
    fn candidates(stage: Stage, hs: usize, storage: u32) -> Result<Vec<Variant>> {
        let mut all = vec![Variant::rule(stage, hs, storage)?];
        let hd = head_capacity(hs);
        let (shapes, pass) = match stage {
            Stage::Forward => (FORWARD_SHAPES, Pass::Forward),
            // dK/dV's arrays are the larger: a tiling that fits them fits dQ's.
            Stage::Backward => (BACKWARD_SHAPES, Pass::Dkdv),
        };
        for t in shapes
            .iter()
            .filter_map(|&(br, bc, wg)| Tiles::derive(br, bc, wg, hd))
            .filter(|t| t.workgroup_bytes(pass) <= storage as u64)
        {
            let v = Variant::Tiled(t, t);
            if !all.contains(&v) {
                all.push(v);
            }
        }
        all.push(Variant::Rows(ROWS_WG));
        all.push(Variant::Gemm);
        Ok(all)
    }

    /// The variant of `variants` that `name` names (a tuner's answer).
    fn by_name(variants: &[Variant], name: &str) -> Result<Variant> {
        variants
            .iter()
            .copied()
            .find(|v| v.name() == name)
            .ok_or_else(|| Error::invalid("attention tuning", format!("no variant '{name}'")))
    }

    /// "tiles32x32w64" (dK/dV's tiling first where the two differ, "tiles32x32w64+16x16w64"),
    /// "rows64", or "gemm".
    fn name(&self) -> String {
        let tiles = |t: &Tiles| format!("{}x{}w{}", t.br, t.bc, t.wg);
        match self {
            Variant::Tiled(a, b) if a == b => format!("tiles{}", tiles(a)),
            Variant::Tiled(a, b) => format!("tiles{}+{}", tiles(a), tiles(b)),
            Variant::Rows(wg) => format!("rows{wg}"),
            Variant::Gemm => "gemm".to_string(),
        }
    }
}

/// The variant `forward` or `backward` takes for this problem: measured among
/// `Variant::candidates` (see `kernels::tune`), `Variant::rule` being the fixed rule. The
/// variants sum in different orders, so they agree to rounding, not bit for bit.
fn tuned(gpu: &Gpu, stage: Stage, dims: Dims, causal: bool) -> Result<Variant> {
    use super::tune::{self, Problem, Trial, bucket};
    let Dims { b, t, nh, hs } = dims;
    let storage = storage_limit(gpu);
    let variants: Vec<Variant> = Variant::candidates(stage, hs, storage)?
        .into_iter()
        .filter(|&v| v != Variant::Gemm || t >= GEMM_PATH_MIN_T)
        .collect();
    let rule = variants[0];
    let mode = if causal { "causal" } else { "noncausal" };
    let problem = Problem {
        family: FAMILY.name,
        bucket: format!(
            "{} bh{} t{} hs{hs} {mode}",
            stage.name(),
            bucket(b * nh),
            bucket(t)
        ),
        shape: format!("{} B={b} NH={nh} T={t} HS={hs} {mode}", stage.name()),
        candidates: variants.iter().map(Variant::name).collect(),
        rule: rule.name(),
        // Inputs in [-1, 1]: the products sum HS terms, the outputs T of them.
        atol: 1e-5 * ((t.max(hs)) as f64 / 256.0).max(1.0),
        rtol: 1e-4,
    };
    let c = nh * hs;
    let opts = Options {
        causal,
        dropout: None,
    };
    let mut tensors: Option<[View; 5]> = None;
    let name = tune::choose(gpu, &problem, &mut |name| {
        let v = Variant::by_name(&variants, name)?;
        if tensors.is_none() {
            let mut rng = Rng::new(0xa77e);
            let mut up =
                |name: &str, len: usize| gpu.upload_f32(name, &rng.vec_uniform(len, -1.0, 1.0));
            let ts = [
                up("tune.qkv", b * t * 3 * c)?,
                up("tune.dout", b * t * c)?,
                gpu.zeros("tune.out", DType::F32, b * t * c)?,
                gpu.zeros("tune.lse", DType::F32, b * nh * t)?,
                gpu.zeros("tune.dqkv", DType::F32, b * t * 3 * c)?,
            ];
            // The backward reads the forward's out and lse.
            let [qkv, _, out, lse, _] = &ts;
            let rule = Variant::rule(Stage::Forward, hs, storage)?;
            let step = own_step(gpu, opts.dropout, 0)?;
            gpu.run(&forward_with(gpu, out, lse, qkv, dims, opts, rule, &step)?)?;
            tensors = Some(ts);
        }
        let [qkv, dout, out, lse, dqkv] = tensors.as_ref().expect("set above");
        let step = own_step(gpu, opts.dropout, 0)?;
        let bwd = BackwardTensors {
            dqkv,
            dout,
            qkv,
            out,
            lse,
        };
        Ok(match stage {
            // (Each call of `tuned` measures one stage: the forward's trials may overwrite the
            // out and lse that only the backward's read.)
            Stage::Forward => Trial {
                dispatches: forward_with(gpu, out, lse, qkv, dims, opts, v, &step)?,
                output: out.clone(),
            },
            Stage::Backward => Trial {
                dispatches: backward_with(gpu, bwd, dims, opts, v, &step)?,
                output: dqkv.clone(),
            },
        })
    })?;
    Ok(Variant::by_name(&variants, &name).unwrap_or(rule))
}

/// The workgroup memory the fused kernels may plan for on this adapter.
fn storage_limit(gpu: &Gpu) -> u32 {
    gpu.limits
        .max_compute_workgroup_storage_size
        .min(STORAGE_CAP)
}

/// Checks the dimensions and head size of a fused kernel.
fn check_fused_dims(kernel: &str, dims: &[(&str, usize)], hs: usize) -> Result<()> {
    expect_dims(kernel, dims)?;
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
/// Dispatch costs count useful work only, the same for the fused and the unfused kernels: a
/// forward is 2 products, a backward 4 (dP, dV, dQ, dK). The fused backward's recomputation of
/// the scores and the unfused GEMMs' work on masked entries are left out, so GFLOP/s compares
/// the time taken for the same result.
fn product_flops(dims: Dims, tk: usize, causal: bool) -> u64 {
    let Dims { b, t: tq, nh, hs } = dims;
    let pairs: u64 = if causal {
        // query i (at position tk - tq + i) sees tk - tq + i + 1 keys
        (0..tq as u64).map(|i| (tk - tq) as u64 + i + 1).sum()
    } else {
        (tq * tk) as u64
    };
    2 * pairs * hs as u64 * (b * nh) as u64
}

fn fused_forward(
    gpu: &Gpu,
    shader: ShaderVariant,
    spec_args: [&View; 6],
    params: Params,
    cost: Cost,
    variant: Variant,
) -> Result<Dispatch> {
    let max_wg = gpu.limits.max_compute_workgroups_per_dimension;
    match variant {
        Variant::Tiled(tiles, _) => {
            let ntiles = params.tq.div_ceil(tiles.br);
            let params = Params { ntiles, ..params };
            gpu.dispatch(
                &FORWARD.with_variant(shader),
                &tiles.constants(),
                bytes_of(&params),
                &spec_args,
                grid(params.nb * params.nh * ntiles, max_wg),
                cost,
            )
        }
        Variant::Rows(wg) => gpu.dispatch(
            &FORWARD_ROWS.with_variant(shader),
            &rows_constants(wg, params.hs),
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

/// Fused forward: out (B, T, C) and lse (B, NH, T) from qkv (B, T, 3C); scale 1/sqrt(HS); causal
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
    let Dims { b, t, nh, hs } = dims;
    let name = FORWARD.name();
    check_fused_dims(&name, &[("B", b), ("T", t), ("NH", nh), ("HS", hs)], hs)?;
    let c = nh * hs;
    expect(&name, qkv, DType::F32, b * t * 3 * c)?;
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
    let Dims { b, t, nh, hs } = dims;
    let Options { causal, dropout } = opts;
    let c = nh * hs;
    let params = Params {
        write_lse: 1,
        q: qkv_strides(t, c, hs, 0),
        k: qkv_strides(t, c, hs, 1),
        v: qkv_strides(t, c, hs, 2),
        o: btc_strides(t, c, hs),
        ..Params::new(b, nh, hs, t, t, causal)
    }
    .with_dropout(&FORWARD.name(), dropout)?;
    if variant == Variant::Gemm {
        return gemm_forward(gpu, [out, lse, qkv, step], dims, &params);
    }
    let cost = Cost {
        flops: 2 * product_flops(dims, t, causal),
        bytes: 4 * (b * t * 4 * c + b * nh * t) as u64,
    };
    Ok(vec![fused_forward(
        gpu,
        ShaderVariant::Base,
        [qkv, qkv, qkv, out, lse, step],
        params,
        cost,
        variant,
    )?])
}

/// Fused backward: dqkv (B, T, 3C) from dout (B, T, C), qkv (B, T, 3C), and the forward's out
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
    let Dims { b, t, nh, hs } = dims;
    let name = "attention.backward";
    check_fused_dims(name, &[("B", b), ("T", t), ("NH", nh), ("HS", hs)], hs)?;
    let c = nh * hs;
    expect(name, dqkv, DType::F32, b * t * 3 * c)?;
    expect(name, dout, DType::F32, b * t * c)?;
    expect(name, qkv, DType::F32, b * t * 3 * c)?;
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
    Dims { b, t, nh, hs }: Dims,
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
    let Dims { b, t, nh, hs } = dims;
    let Options { causal, dropout } = opts;
    let c = nh * hs;
    let max_wg = gpu.limits.max_compute_workgroups_per_dimension;
    let base = Params {
        q: qkv_strides(t, c, hs, 0),
        k: qkv_strides(t, c, hs, 1),
        v: qkv_strides(t, c, hs, 2),
        o: btc_strides(t, c, hs),
        ..Params::new(b, nh, hs, t, t, causal)
    }
    .with_dropout(name, dropout)?;
    let rows = b * nh * t;
    let d = gpu.zeros("attention D", DType::F32, rows)?;
    let prep = backward_prep(gpu, &base, dout, out, &d, dims)?;
    let product = product_flops(dims, t, causal);
    let io_bytes = 4 * (2 * b * t * 3 * c + b * t * c + 2 * rows) as u64;
    let cost = Cost {
        // dV and dK, or dP and dQ
        flops: 2 * product,
        bytes: io_bytes / 2,
    };
    let args = [qkv, qkv, qkv, dout, lse, &d, dqkv, step];
    let mut all = vec![prep];
    match variant {
        Variant::Tiled(dkdv_tiles, dq_tiles) => {
            for (spec, tiles) in [(&BACKWARD_DKDV, dkdv_tiles), (&BACKWARD_DQ, dq_tiles)] {
                let ntiles = (t as u32).div_ceil(tiles.br);
                let params = Params { ntiles, ..base };
                all.push(gpu.dispatch(
                    spec,
                    &tiles.constants(),
                    bytes_of(&params),
                    &args,
                    grid(params.nb * params.nh * ntiles, max_wg),
                    cost,
                )?);
            }
        }
        Variant::Rows(wg) => {
            for spec in [&BACKWARD_DKDV_ROWS, &BACKWARD_DQ_ROWS] {
                all.push(gpu.dispatch(
                    spec,
                    &rows_constants(wg, base.hs),
                    bytes_of(&base),
                    &args,
                    grid((rows as u32).div_ceil(wg), max_wg),
                    cost,
                )?);
            }
        }
        Variant::Gemm => all.extend(gemm_backward(gpu, tensors, dims, &base, (&d, step))?),
    }
    Ok(all)
}

// ---------------------------------------------------------------------------------------------
// The GEMM path (attention.wgsl's "The GEMM path"): the products by the GEMM family's tuned
// kernels, a group of (b, h) pairs at a time, and the score kernels between them.

/// Invocations per workgroup of the score kernels.
const SCORES_WG: u32 = 64;

/// The shortest sequence the tuner offers the GEMM path for. Below it the products are too small
/// to pay for their dispatches (lavapipe, B 32, NH 4, T 10: 2-6x slower than the row kernels; T
/// 32: even with them; T 64: 1.6-1.7x faster than the fixed rule), and measuring them would
/// first build and tune GEMM candidates for three more problems.
const GEMM_PATH_MIN_T: usize = 32;

/// How the GEMM path groups the B·NH (b, h) pairs: each group is one batched product per
/// matrix, its entries the NH heads of one sequence or one head of each of the B sequences,
/// whichever makes fewer groups (fewer, larger dispatches) while the group's T × T scores fit
/// one binding. Only these two orders give the entries of qkv a single batch stride.
#[derive(Clone, Copy, Debug)]
struct Groups {
    dims: Dims,
    /// The entries are sequences (one group per head), not heads (one group per sequence).
    over_b: bool,
}

impl Groups {
    fn new(gpu: &Gpu, dims: Dims) -> Result<Groups> {
        let Dims { b, t, nh, .. } = dims;
        let fits = |entries: usize| {
            let len = (entries as u128) * (t as u128) * (t as u128);
            len <= u32::MAX as u128 && 4 * len <= gpu.limits.max_storage_buffer_binding_size as u128
        };
        // Fewer groups first, the other order where only it fits.
        let orders = if b >= nh {
            [true, false]
        } else {
            [false, true]
        };
        let entries = |over_b: bool| if over_b { b } else { nh };
        match orders.into_iter().find(|&over_b| fits(entries(over_b))) {
            Some(over_b) => Ok(Groups { dims, over_b }),
            None => Err(Error::invalid(
                "attention gemm path",
                format!(
                    "min(B, NH)·T² = {} scores exceed the adapter's storage binding limit of {} \
                     bytes",
                    b.min(nh) * t * t,
                    gpu.limits.max_storage_buffer_binding_size
                ),
            )),
        }
    }

    /// Batch entries per group.
    fn entries(&self) -> usize {
        if self.over_b {
            self.dims.b
        } else {
            self.dims.nh
        }
    }

    /// Groups in all.
    fn count(&self) -> usize {
        self.dims.b * self.dims.nh / self.entries()
    }

    /// The group's scores: `entries` matrices of T × T in `view`.
    fn scores<'a>(&self, view: &'a View) -> Operand<'a> {
        let t = self.dims.t;
        Operand::new(view, t).batched(t * t)
    }

    /// Group `g`'s (T, HS) matrices of part `part` of qkv (0 = q, 1 = k, 2 = v; row stride 3C),
    /// or of a (B, T, C) tensor (`part` None).
    fn rows<'a>(&self, view: &'a View, g: usize, part: Option<usize>) -> Operand<'a> {
        let Dims { t, nh, hs, .. } = self.dims;
        let c = nh * hs;
        let (ld, start) = match part {
            Some(part) => (3 * c, part * c),
            None => (c, 0),
        };
        let op = Operand::new(view, ld);
        if self.over_b {
            op.at(start + g * hs).batched(t * ld)
        } else {
            op.at(start + g * t * ld).batched(hs)
        }
    }

    /// `base` for the score kernels of group `g`.
    fn params(&self, base: &Params, g: usize) -> Params {
        let (b0, h0) = if self.over_b { (0, g) } else { (g, 0) };
        Params {
            grp: [
                b0 as u32,
                h0 as u32,
                self.over_b as u32,
                self.entries() as u32,
            ],
            ..*base
        }
    }

    /// `product_flops` of one group.
    fn flops(&self, causal: bool) -> u64 {
        let d = self.dims;
        product_flops(d, d.t, causal) / self.count() as u64
    }
}

/// The scratch for a group's scores (`Groups::scores`), shared by every GEMM-path launcher of
/// this size: each group's dispatches write it before they read it.
fn scores_scratch(gpu: &Gpu, tag: &str, groups: &Groups) -> Result<View> {
    let t = groups.dims.t;
    gpu.shared_scratch(tag, DType::F32, groups.entries() * t * t)
}

/// One batched product of a group, by the GEMM family's tuned kernel, its dispatches costed at
/// `useful` FLOPs in all (see `product_flops`).
fn group_product(
    gpu: &Gpu,
    mm: &Matmul,
    [c, a, b]: [Operand; 3],
    useful: u64,
) -> Result<Vec<Dispatch>> {
    let mut ds = gemm::matmul(gpu, mm, c, a, b, None, gemm::Variant::Tiled)?;
    for (i, d) in ds.iter_mut().rev().enumerate() {
        d.cost.flops = if i == 0 { useful } else { 0 };
    }
    Ok(ds)
}

/// S (T, T) = scale2 · q · kᵀ for each entry of group `g`: base-2 scores, masked ones included.
fn scores_product(
    gpu: &Gpu,
    scores: &View,
    qkv: &View,
    (groups, g): (&Groups, usize),
    params: &Params,
) -> Result<Vec<Dispatch>> {
    let Dims { t, hs, .. } = groups.dims;
    let mm = Matmul {
        batch: groups.entries(),
        trans_b: true,
        alpha: params.scale2,
        ..Matmul::new(t, t, hs)
    };
    let ops = [
        groups.scores(scores),
        groups.rows(qkv, g, Some(0)),
        groups.rows(qkv, g, Some(1)),
    ];
    group_product(gpu, &mm, ops, groups.flops(params.causal != 0))
}

/// A score kernel over group `g`: one invocation per score row (`per_row` 1) or per score
/// (`per_row` T).
fn scores_dispatch(
    gpu: &Gpu,
    (spec, args): (&KernelSpec, &[&View]),
    (groups, g): (&Groups, usize),
    params: &Params,
    per_row: usize,
    cost: Cost,
) -> Result<Dispatch> {
    let invocations = groups.entries() * groups.dims.t * per_row;
    gpu.dispatch(
        spec,
        &[("WG", SCORES_WG as f64)],
        bytes_of(&groups.params(params, g)),
        args,
        grid(
            (invocations as u32).div_ceil(SCORES_WG),
            gpu.limits.max_compute_workgroups_per_dimension,
        ),
        cost,
    )
}

/// `Variant::Gemm`'s forward: per group, S = scale2·q·kᵀ, then P ∘ M / l and lse from S in
/// place, then out = P·v.
fn gemm_forward(
    gpu: &Gpu,
    [out, lse, qkv, step]: [&View; 4],
    dims: Dims,
    params: &Params,
) -> Result<Vec<Dispatch>> {
    let groups = Groups::new(gpu, dims)?;
    let scores = scores_scratch(gpu, "attention.scores", &groups)?;
    let square = (groups.entries() * dims.t * dims.t) as u64;
    let useful = groups.flops(params.causal != 0);
    let softmax_cost = Cost {
        flops: 5 * square,
        bytes: 8 * square,
    };
    // out = P · v
    let mm = Matmul {
        batch: groups.entries(),
        ..Matmul::new(dims.t, dims.hs, dims.t)
    };
    let mut all = Vec::new();
    for g in 0..groups.count() {
        all.extend(scores_product(gpu, &scores, qkv, (&groups, g), params)?);
        let kernel = (&SCORES_SOFTMAX, &[&scores, lse, step][..]);
        all.push(scores_dispatch(
            gpu,
            kernel,
            (&groups, g),
            params,
            1,
            softmax_cost,
        )?);
        let ops = [
            groups.rows(out, g, None),
            groups.scores(&scores),
            groups.rows(qkv, g, Some(2)),
        ];
        all.extend(group_product(gpu, &mm, ops, useful)?);
    }
    Ok(all)
}

/// `Variant::Gemm`'s backward after D: per group, S and dP = dout·vᵀ, then P ∘ M and dS from
/// them in place, then dv = (P ∘ M)ᵀ·dout, dq = scale·dS·k and dk = scale·dSᵀ·q.
fn gemm_backward(
    gpu: &Gpu,
    tensors: BackwardTensors,
    dims: Dims,
    params: &Params,
    (d, step): (&View, &View),
) -> Result<Vec<Dispatch>> {
    let BackwardTensors {
        dqkv,
        dout,
        qkv,
        lse,
        ..
    } = tensors;
    let Dims { t, hs, .. } = dims;
    let groups = Groups::new(gpu, dims)?;
    let scores = scores_scratch(gpu, "attention.scores", &groups)?;
    let dscores = scores_scratch(gpu, "attention.dscores", &groups)?;
    let square = (groups.entries() * t * t) as u64;
    let useful = groups.flops(params.causal != 0);
    let batch = groups.entries();
    // dP = dout · vᵀ
    let dp_mm = Matmul {
        batch,
        trans_b: true,
        ..Matmul::new(t, t, hs)
    };
    let grad_cost = Cost {
        flops: 6 * square,
        bytes: 16 * square,
    };
    let mut all = Vec::new();
    for g in 0..groups.count() {
        all.extend(scores_product(gpu, &scores, qkv, (&groups, g), params)?);
        let ops = [
            groups.scores(&dscores),
            groups.rows(dout, g, None),
            groups.rows(qkv, g, Some(2)),
        ];
        all.extend(group_product(gpu, &dp_mm, ops, useful)?);
        let kernel = (&SCORES_BACKWARD, &[&scores, &dscores, lse, d, step][..]);
        all.push(scores_dispatch(
            gpu,
            kernel,
            (&groups, g),
            params,
            t,
            grad_cost,
        )?);
        // dv = (P ∘ M)ᵀ · dout, dq = scale · dS · k, dk = scale · dSᵀ · q
        let products = [
            (&scores, true, 1.0, (dout, None), 2),
            (&dscores, false, params.scale, (qkv, Some(1)), 0),
            (&dscores, true, params.scale, (qkv, Some(0)), 1),
        ];
        for (a, trans_a, alpha, (bv, b_part), c_part) in products {
            let mm = Matmul {
                batch,
                trans_a,
                alpha,
                ..Matmul::new(t, hs, t)
            };
            let ops = [
                groups.rows(dqkv, g, Some(c_part)),
                groups.scores(a),
                groups.rows(bv, g, b_part),
            ];
            all.extend(group_product(gpu, &mm, ops, useful)?);
        }
    }
    Ok(all)
}

/// KV-cache decoding: the Tq = `dims.t` new tokens of qkv (B, Tq, 3C), at absolute positions
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
    let Dims { b, t: tq, nh, hs } = dims;
    let tmax = cache.tmax;
    check_fused_dims(
        name,
        &[("B", b), ("Tq", tq), ("NH", nh), ("HS", hs), ("Tmax", tmax)],
        hs,
    )?;
    check_cache_positions(name, tq, pos0, tmax)?;
    let c = nh * hs;
    expect(name, out, DType::F32, b * tq * c)?;
    expect(name, qkv, DType::F32, b * tq * 3 * c)?;
    let (dtype, _) = cache_dtype(gpu, name, cache.k, &FORWARD, &FORWARD_F16)?;
    expect(name, cache.k, dtype, b * nh * tmax * hs)?;
    expect(name, cache.v, dtype, b * nh * tmax * hs)?;
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
    let Dims { b, t: tq, nh, hs } = dims;
    let tmax = cache.tmax;
    let c = nh * hs;
    let shader = if dtype == DType::F16 {
        ShaderVariant::F16
    } else {
        ShaderVariant::Base
    };
    let tk = pos0 + tq;
    // Queries at step.pos0 + i, keys 0 .. step.pos0 + Tq (attention.wgsl's pos0 and tk).
    let params = Params {
        from_step: 1,
        write_lse: 0,
        q: qkv_strides(tq, c, hs, 0),
        k: cache_strides(nh, tmax, hs),
        v: cache_strides(nh, tmax, hs),
        o: btc_strides(tq, c, hs),
        ..Params::new(b, nh, hs, tq, tq, true)
    };
    // The kernel's lse binding is not written when write_lse = 0; a word stands in for it.
    let unused_lse = gpu.zeros("attention unused lse", DType::F32, 1)?;
    let cost = Cost {
        flops: 2 * product_flops(dims, tk, true),
        bytes: 4 * (b * tq * 4 * c) as u64 + dtype.size() * (2 * b * tk * c) as u64,
    };
    fused_forward(
        gpu,
        shader,
        [qkv, cache.k, cache.v, out, &unused_lse, step],
        params,
        cost,
        variant,
    )
}

/// The variant `forward_cached` takes for Tq new tokens over caches of `tmax` positions: the
/// fixed rule's tiling or the row kernel, measured with the caches full (pos0 = Tmax - Tq), the
/// longest attention a decoding dispatch computes.
fn tuned_cached(gpu: &Gpu, cache: DType, dims: Dims, tmax: usize) -> Result<Variant> {
    use super::tune::{self, Problem, Trial, bucket};
    let Dims { b, t: tq, nh, hs } = dims;
    let rule = Variant::rule(Stage::Forward, hs, storage_limit(gpu))?;
    let variants = [rule, Variant::Rows(ROWS_WG)];
    let problem = Problem {
        family: FAMILY.name,
        bucket: format!(
            "cached bh{} tq{} tmax{} hs{hs} {}",
            bucket(b * nh),
            bucket(tq),
            bucket(tmax),
            cache.name()
        ),
        shape: format!(
            "cached B={b} NH={nh} Tq={tq} Tmax={tmax} HS={hs} {}",
            cache.name()
        ),
        candidates: variants.iter().map(Variant::name).collect(),
        rule: rule.name(),
        atol: 1e-5 * (tmax.max(hs) as f64 / 256.0).max(1.0),
        rtol: 1e-4,
    };
    let c = nh * hs;
    let mut tensors: Option<[View; 4]> = None;
    let name = tune::choose(gpu, &problem, &mut |name| {
        let v = Variant::by_name(&variants, name)?;
        if tensors.is_none() {
            let mut rng = Rng::new(0xdec0);
            let full = gpu.upload_f32("tune.qkv", &rng.vec_uniform(b * tmax * 3 * c, -1.0, 1.0))?;
            let kc = gpu.zeros("tune.k_cache", cache, b * nh * tmax * hs)?;
            let vc = gpu.zeros("tune.v_cache", cache, b * nh * tmax * hs)?;
            let kv = KvCache {
                k: &kc,
                v: &vc,
                tmax,
            };
            gpu.run(&[kv_append(gpu, kv, &full, Dims { t: tmax, ..dims }, 0)?])?;
            tensors = Some([
                gpu.upload_f32("tune.step_qkv", &rng.vec_uniform(b * tq * 3 * c, -1.0, 1.0))?,
                kc,
                vc,
                gpu.zeros("tune.out", DType::F32, b * tq * c)?,
            ]);
        }
        let [qkv, k_cache, v_cache, out] = tensors.as_ref().expect("set above");
        let kv = KvCache {
            k: k_cache,
            v: v_cache,
            tmax,
        };
        let step = own_step(gpu, None, tmax - tq)?;
        let d = forward_cached_with(gpu, out, qkv, kv, dims, (tmax - tq, &step), v)?;
        Ok(Trial {
            dispatches: vec![d],
            output: out.clone(),
        })
    })?;
    Ok(Variant::by_name(&variants, &name).unwrap_or(rule))
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

/// Copies the k and v of the Tq = `dims.t` new tokens of qkv (B, Tq, 3C) into `cache`'s k and v
/// (B, NH, Tmax, HS) at positions pos0 .. pos0 + Tq. Overwrites those rows of the caches.
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
    let Dims { b, t: tq, nh, hs } = dims;
    let KvCache {
        k: k_cache,
        v: v_cache,
        tmax,
    } = cache;
    let name = KV_APPEND.name();
    expect_dims(
        &name,
        &[("B", b), ("Tq", tq), ("NH", nh), ("HS", hs), ("Tmax", tmax)],
    )?;
    check_cache_positions(&name, tq, 0, tmax)?;
    let c = nh * hs;
    expect(&name, qkv, DType::F32, b * tq * 3 * c)?;
    let (cache, spec) = cache_dtype(gpu, &name, k_cache, &KV_APPEND, &KV_APPEND_F16)?;
    expect(&name, k_cache, cache, b * nh * tmax * hs)?;
    expect(&name, v_cache, cache, b * nh * tmax * hs)?;
    // Written at step.pos0 + i (attention.wgsl's pos0); p.tk keeps Tmax.
    let params = Params {
        from_step: 1,
        k: qkv_strides(tq, c, hs, 1),
        v: qkv_strides(tq, c, hs, 2),
        ..Params::new(b, nh, hs, tq, tmax, true)
    };
    const WG: u32 = 256;
    let n = b * tq * c;
    gpu.dispatch(
        spec,
        &[("WG", WG as f64)],
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

// ---------------------------------------------------------------------------------------------
// Unfused baseline.

/// Mirrors `GemmParams` in attention.wgsl.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
struct GemmParams {
    m: u32,
    n: u32,
    k: u32,
    nh: u32,
    mask: u32,
    alpha: f32,
    a_sm: u32,
    a_sk: u32,
    a_base: u32,
    a_sb: u32,
    a_sh: u32,
    b_sk: u32,
    b_sn: u32,
    b_base: u32,
    b_sb: u32,
    b_sh: u32,
    c_base: u32,
    c_sb: u32,
    c_sh: u32,
    c_sm: u32,
}

/// The layout of `GemmParams`, for the test that compares it with `GemmParams` in the shader.
pub fn gemm_params_layout() -> super::ParamsLayout {
    super::params_layout!(GemmParams {
        m,
        n,
        k,
        nh,
        mask,
        alpha,
        a_sm,
        a_sk,
        a_base,
        a_sb,
        a_sh,
        b_sk,
        b_sn,
        b_base,
        b_sb,
        b_sh,
        c_base,
        c_sb,
        c_sh,
        c_sm
    })
}

/// A strided matrix per (b, h): element (r, c) at base + b·sb + h·sh + r·s0 + c·s1.
#[derive(Clone, Copy)]
struct Mat {
    base: usize,
    sb: usize,
    sh: usize,
    s0: usize,
    s1: usize,
}

impl Mat {
    /// Part `part` of qkv (B, T, 3C) as (T, HS) matrices.
    fn qkv(t: usize, c: usize, hs: usize, part: usize) -> Mat {
        Mat {
            base: part * c,
            sb: t * 3 * c,
            sh: hs,
            s0: 3 * c,
            s1: 1,
        }
    }
    /// A (B, T, C) tensor as (T, HS) matrices.
    fn btc(t: usize, c: usize, hs: usize) -> Mat {
        Mat {
            base: 0,
            sb: t * c,
            sh: hs,
            s0: c,
            s1: 1,
        }
    }
    /// A (B, NH, T, T) tensor as (T, T) matrices.
    fn square(t: usize, nh: usize) -> Mat {
        Mat {
            base: 0,
            sb: nh * t * t,
            sh: t * t,
            s0: t,
            s1: 1,
        }
    }
    fn transposed(self) -> Mat {
        Mat {
            s0: self.s1,
            s1: self.s0,
            ..self
        }
    }
}

const GEMM_TILE: u32 = 64;

/// One product of the unfused kernels, for each (b, h): c (M, N) = alpha · a (M, K) · b (K, N),
/// with the causal mask applied to c when `mask`; c must be contiguous along N.
struct Product<'a> {
    a: (&'a View, Mat),
    b: (&'a View, Mat),
    c: (&'a View, Mat),
    /// (M, N, K)
    mnk: (usize, usize, usize),
    alpha: f32,
    mask: bool,
}

/// `p` over the B·NH (b, h) of `dims`; `flops` is the useful work (see `product_flops`).
fn gemm(gpu: &Gpu, dims: Dims, p: Product, flops: u64) -> Result<Dispatch> {
    let Product {
        a: (a, am),
        b: (bv, bm),
        c: (c, cm),
        mnk: (m, n, k),
        alpha,
        mask,
    } = p;
    let Dims { b: batch, nh, .. } = dims;
    debug_assert_eq!(cm.s1, 1);
    let params = GemmParams {
        m: m as u32,
        n: n as u32,
        k: k as u32,
        nh: nh as u32,
        mask: mask as u32,
        alpha,
        a_sm: am.s0 as u32,
        a_sk: am.s1 as u32,
        a_base: am.base as u32,
        a_sb: am.sb as u32,
        a_sh: am.sh as u32,
        b_sk: bm.s0 as u32,
        b_sn: bm.s1 as u32,
        b_base: bm.base as u32,
        b_sb: bm.sb as u32,
        b_sh: bm.sh as u32,
        c_base: cm.base as u32,
        c_sb: cm.sb as u32,
        c_sh: cm.sh as u32,
        c_sm: cm.s0 as u32,
    };
    let wg = [
        (n as u32).div_ceil(GEMM_TILE),
        (m as u32).div_ceil(GEMM_TILE),
        (batch * nh) as u32,
    ];
    let cost = Cost {
        flops,
        bytes: 4 * (batch * nh * (m * k + k * n + m * n)) as u64,
    };
    gpu.dispatch(&UNFUSED_GEMM, &[], bytes_of(&params), &[a, bv, c], wg, cost)
}

const SOFTMAX_WG: u32 = 128;

fn softmax_dispatch(
    gpu: &Gpu,
    spec: &KernelSpec,
    args: &[&View],
    dims: Dims,
    causal: bool,
    cost: Cost,
) -> Result<Dispatch> {
    let Dims { b, t, nh, .. } = dims;
    let params = Params::new(b, nh, 1, t, t, causal);
    gpu.dispatch(
        spec,
        &[("WG", SOFTMAX_WG as f64)],
        bytes_of(&params),
        args,
        grid(
            (b * nh * t) as u32,
            gpu.limits.max_compute_workgroups_per_dimension,
        ),
        cost,
    )
}

fn check_unfused_dims(kernel: &str, dims: Dims) -> Result<()> {
    let Dims { b, t, nh, hs } = dims;
    expect_dims(kernel, &[("B", b), ("T", t), ("NH", nh), ("HS", hs)])?;
    let square = (b as u128) * (nh as u128) * (t as u128) * (t as u128);
    if square > u32::MAX as u128 {
        return Err(Error::invalid(
            kernel,
            format!("B·NH·T² = {square} elements do not fit the kernels' 32-bit indices"),
        ));
    }
    Ok(())
}

/// Unfused baseline forward (llm.c's attention_forward): preatt (B, NH, T, T) = scale·q·kᵀ
/// (masked entries 0), att = softmax(preatt) (masked entries 0), out (B, T, C) = att·v, from qkv
/// (B, T, 3C). Overwrites out, preatt and att. The T×T products are computed in full.
pub fn forward_unfused(
    gpu: &Gpu,
    out: &View,
    preatt: &View,
    att: &View,
    qkv: &View,
    dims: Dims,
    causal: bool,
) -> Result<Vec<Dispatch>> {
    let name = "attention.forward_unfused";
    check_unfused_dims(name, dims)?;
    let Dims { b, t, nh, hs } = dims;
    let c = nh * hs;
    expect(name, out, DType::F32, b * t * c)?;
    expect(name, preatt, DType::F32, b * nh * t * t)?;
    expect(name, att, DType::F32, b * nh * t * t)?;
    expect(name, qkv, DType::F32, b * t * 3 * c)?;
    let scale = 1.0 / (hs as f32).sqrt();
    let sq = Mat::square(t, nh);
    let rows = b * nh * t;
    let product = product_flops(dims, t, causal);
    Ok(vec![
        gemm(
            gpu,
            dims,
            Product {
                a: (qkv, Mat::qkv(t, c, hs, 0)),
                b: (qkv, Mat::qkv(t, c, hs, 1).transposed()),
                c: (preatt, sq),
                mnk: (t, t, hs),
                alpha: scale,
                mask: causal,
            },
            product,
        )?,
        softmax_dispatch(
            gpu,
            &UNFUSED_SOFTMAX,
            &[preatt, att],
            dims,
            causal,
            Cost {
                flops: 5 * (rows * t) as u64,
                bytes: 8 * (rows * t) as u64,
            },
        )?,
        gemm(
            gpu,
            dims,
            Product {
                a: (att, sq),
                b: (qkv, Mat::qkv(t, c, hs, 2)),
                c: (out, Mat::btc(t, c, hs)),
                mnk: (t, hs, t),
                alpha: 1.0,
                mask: false,
            },
            product,
        )?,
    ])
}

/// Checks the unfused backward's dimensions and tensors.
fn check_unfused_backward(tensors: UnfusedBackwardTensors, dims: Dims) -> Result<()> {
    let name = "attention.backward_unfused";
    check_unfused_dims(name, dims)?;
    let Dims { b, t, nh, hs } = dims;
    let c = nh * hs;
    expect(name, tensors.dqkv, DType::F32, b * t * 3 * c)?;
    expect(name, tensors.dpreatt, DType::F32, b * nh * t * t)?;
    expect(name, tensors.datt, DType::F32, b * nh * t * t)?;
    expect(name, tensors.dout, DType::F32, b * t * c)?;
    expect(name, tensors.qkv, DType::F32, b * t * 3 * c)?;
    expect(name, tensors.att, DType::F32, b * nh * t * t)?;
    Ok(())
}

/// Unfused baseline backward: dqkv (B, T, 3C) from dout (B, T, C), qkv and the forward's att
/// (B, NH, T, T), through datt = dout·vᵀ and dpreatt = att ∘ (datt - rowsum(att ∘ datt)), both
/// (B, NH, T, T) and overwritten; overwrites dqkv.
pub fn backward_unfused(
    gpu: &Gpu,
    tensors: UnfusedBackwardTensors,
    dims: Dims,
    causal: bool,
) -> Result<Vec<Dispatch>> {
    let UnfusedBackwardTensors {
        dqkv,
        dpreatt,
        datt,
        dout,
        qkv,
        att,
    } = tensors;
    check_unfused_backward(tensors, dims)?;
    let Dims { b, t, nh, hs } = dims;
    let c = nh * hs;
    let scale = 1.0 / (hs as f32).sqrt();
    let sq = Mat::square(t, nh);
    let dmat = Mat::btc(t, c, hs);
    let rows = b * nh * t;
    let product = product_flops(dims, t, causal);
    Ok(vec![
        // datt (T, T) = dout (T, HS) · vᵀ (HS, T)
        gemm(
            gpu,
            dims,
            Product {
                a: (dout, dmat),
                b: (qkv, Mat::qkv(t, c, hs, 2).transposed()),
                c: (datt, sq),
                mnk: (t, t, hs),
                alpha: 1.0,
                mask: causal,
            },
            product,
        )?,
        // dv (T, HS) = attᵀ (T, T) · dout (T, HS)
        gemm(
            gpu,
            dims,
            Product {
                a: (att, sq.transposed()),
                b: (dout, dmat),
                c: (dqkv, Mat::qkv(t, c, hs, 2)),
                mnk: (t, hs, t),
                alpha: 1.0,
                mask: false,
            },
            product,
        )?,
        softmax_dispatch(
            gpu,
            &UNFUSED_SOFTMAX_BACKWARD,
            &[att, datt, dpreatt],
            dims,
            causal,
            Cost {
                flops: 4 * (rows * t) as u64,
                bytes: 12 * (rows * t) as u64,
            },
        )?,
        // dq (T, HS) = scale · dpreatt (T, T) · k (T, HS)
        gemm(
            gpu,
            dims,
            Product {
                a: (dpreatt, sq),
                b: (qkv, Mat::qkv(t, c, hs, 1)),
                c: (dqkv, Mat::qkv(t, c, hs, 0)),
                mnk: (t, hs, t),
                alpha: scale,
                mask: false,
            },
            product,
        )?,
        // dk (T, HS) = scale · dpreattᵀ (T, T) · q (T, HS)
        gemm(
            gpu,
            dims,
            Product {
                a: (dpreatt, sq.transposed()),
                b: (qkv, Mat::qkv(t, c, hs, 0)),
                c: (dqkv, Mat::qkv(t, c, hs, 1)),
                mnk: (t, hs, t),
                alpha: scale,
                mask: false,
            },
            product,
        )?,
    ])
}

// ---------------------------------------------------------------------------------------------
// Harness.

pub const FAMILY: Family = Family {
    name: "attention",
    about: "fused causal/non-causal softmax attention fwd+bwd, KV-cache decoding, unfused baseline",
    shape_help: "B,NH,T,HS",
    default_shapes: &[
        &[1, 1, 1, 8],
        &[2, 3, 7, 16],
        &[1, 4, 50, 24],
        &[1, 3, 37, 64],
        &[2, 2, 65, 45],
        &[1, 2, 129, 3],
        &[2, 1, 33, 128],
    ],
    bench_shape: &[1, 12, 256, 64],
    check,
    bench,
};

/// Tolerances against the f64 reference (|err| <= atol + rtol·|ref|): f32 accumulation over a
/// few hundred terms of magnitude ~1 stays within a few 1e-6.
pub const ATOL: f64 = 1e-5;
pub const RTOL: f64 = 1e-5;

/// The inputs of a check: qkv (B, T, 3C) and dout (B, T, C), seeded by the shape.
pub fn check_inputs(dims: Dims) -> (Vec<f32>, Vec<f32>) {
    let Dims { b, t, nh, hs } = dims;
    let c = nh * hs;
    let mut rng = Rng::new((b * 1_000_003 + nh * 10_007 + t * 101 + hs) as u64);
    let qkv = rng.vec_uniform(b * t * 3 * c, -2.0, 2.0);
    let dout = rng.vec_uniform(b * t * c, -1.0, 1.0);
    (qkv, dout)
}

/// The reference's out, preatt, att, lse and dqkv in f64.
struct Expected {
    out: Vec<f64>,
    preatt: Vec<f64>,
    att: Vec<f64>,
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
    let Dims { b, t, nh, hs } = dims;
    let c = nh * hs;
    let qkv: Vec<f64> = reference::convert(qkv);
    let dout: Vec<f64> = reference::convert(dout);
    {
        let mut e = Expected {
            out: vec![0.0; b * t * c],
            preatt: vec![0.0; b * nh * t * t],
            att: vec![0.0; b * nh * t * t],
            lse: vec![0.0; b * nh * t],
            dqkv: vec![0.0; b * t * 3 * c],
        };
        reference::attention::forward(
            &mut e.out,
            &mut e.preatt,
            &mut e.att,
            &mut e.lse,
            &qkv,
            dims,
            opts,
        );
        let (mut dpre, mut datt) = (vec![0.0; b * nh * t * t], vec![0.0; b * nh * t * t]);
        reference::attention::backward(
            &mut e.dqkv,
            &mut dpre,
            &mut datt,
            &dout,
            &qkv,
            &e.att,
            dims,
            opts,
        );
        e
    }
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
    let [b, nh, t, hs] = harness::dims::<4>("attention", shape)?;
    let dims = Dims { b, t, nh, hs };
    let s = format!("B={b} NH={nh} T={t} HS={hs}");
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
    let pairs = variant_pairs(hs, storage_limit(gpu))?;
    for (causal, want) in [true, false].iter().zip(&want) {
        let mode = if *causal { "causal" } else { "noncausal" };
        let opts = Options {
            causal: *causal,
            dropout: None,
        };
        for &pair in &pairs {
            case.fused(opts, pair, want, mode, &mut reports)?;
        }
        case.unfused(*causal, want, mode, &mut reports)?;
    }

    // Dropout on the probabilities (causal; the fixed rule's tiling, the row kernels and the
    // GEMM path) against the reference under the same mask, at two steps: the mask changes with
    // the step, and the backward regenerates it.
    let untiled = |v: Variant| !matches!(v, Variant::Tiled(..));
    let dropout_pairs: Vec<_> = (pairs.iter().take(1))
        .chain(pairs.iter().filter(|p| untiled(p.0)))
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
        let Dims { b, t, nh, hs } = dims;
        let c = nh * hs;
        let out = gpu.zeros("out", DType::F32, b * t * c)?;
        let lse = gpu.zeros("lse", DType::F32, b * nh * t)?;
        let dqkv = gpu.zeros("dqkv", DType::F32, b * t * 3 * c)?;
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

    /// The unfused forward and backward (through preatt and att), against `want`.
    fn unfused(
        &self,
        causal: bool,
        want: &Expected,
        mode: &str,
        reports: &mut Vec<CheckReport>,
    ) -> Result<()> {
        let (gpu, dims) = (self.gpu, self.dims);
        let Dims { b, t, nh, hs } = dims;
        let c = nh * hs;
        let out = gpu.zeros("out", DType::F32, b * t * c)?;
        let preatt = gpu.zeros("preatt", DType::F32, b * nh * t * t)?;
        let att = gpu.zeros("att", DType::F32, b * nh * t * t)?;
        let dpreatt = gpu.zeros("dpreatt", DType::F32, b * nh * t * t)?;
        let datt = gpu.zeros("datt", DType::F32, b * nh * t * t)?;
        let dqkv = gpu.zeros("dqkv", DType::F32, b * t * 3 * c)?;
        let mut ds = forward_unfused(gpu, &out, &preatt, &att, self.qkv, dims, causal)?;
        let tensors = UnfusedBackwardTensors {
            dqkv: &dqkv,
            dpreatt: &dpreatt,
            datt: &datt,
            dout: self.dout,
            qkv: self.qkv,
            att: &att,
        };
        ds.extend(backward_unfused(gpu, tensors, dims, causal)?);
        gpu.run(&ds)?;
        let got = [
            ("preatt", &preatt, &want.preatt),
            ("att", &att, &want.att),
            ("out", &out, &want.out),
            ("dqkv", &dqkv, &want.dqkv),
        ];
        compare_views(gpu, self.s, &format!("{mode} unfused"), &got, reports)
    }
}

/// Decoding with f16 caches, on keys and values rounded to f16 (what the caches hold), against
/// the reference on those values; a prefill of 3, then chunks of 2 new tokens.
fn check_cached_f16(gpu: &Gpu, s: &str, qkv: &[f32], dims: Dims) -> Result<CheckReport> {
    let Dims { b, t, nh, hs } = dims;
    let rounded = round_kv_f16(qkv, nh, hs);
    let mut out = vec![0.0; b * t * nh * hs];
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

/// qkv (B, T, 3C) with its k and v parts rounded to f16 (the values an f16 cache holds) and q
/// unchanged.
pub fn round_kv_f16(qkv: &[f32], nh: usize, hs: usize) -> Vec<f32> {
    let c = nh * hs;
    qkv.iter()
        .enumerate()
        .map(|(i, &x)| {
            if i % (3 * c) < c {
                x
            } else {
                half::f16::from_f32(x).to_f32()
            }
        })
        .collect()
}

/// Runs generation-style attention over qkv (B, T, 3C): kv_append and forward_cached for a
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
    let Dims { b, t, nh, hs } = dims;
    let c = nh * hs;
    // A cache longer than needed, so that Tmax and the sequence length differ.
    let tmax = t + 3;
    let kc = gpu.zeros("k_cache", cache, b * nh * tmax * hs)?;
    let vc = gpu.zeros("v_cache", cache, b * nh * tmax * hs)?;
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
        // qkv (B, n, 3C) of tokens pos0 .. pos0 + n
        let mut step_qkv = Vec::with_capacity(b * n * 3 * c);
        for bi in 0..b {
            step_qkv.extend_from_slice(&qkv[(bi * t + pos0) * 3 * c..(bi * t + pos0 + n) * 3 * c]);
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
    let [b, nh, t, hs] = harness::dims::<4>("attention", shape)?;
    let dims = Dims { b, t, nh, hs };
    let c = nh * hs;
    let s = format!("B={b} NH={nh} T={t} HS={hs} causal");
    let (qkv_data, dout) = check_inputs(dims);
    let qkv = gpu.upload_f32("qkv", &qkv_data)?;
    let dout = gpu.upload_f32("dout", &dout)?;
    let out = gpu.zeros("out", DType::F32, b * t * c)?;
    let lse = gpu.zeros("lse", DType::F32, b * nh * t)?;
    let dqkv = gpu.zeros("dqkv", DType::F32, b * t * 3 * c)?;
    let tensors = BackwardTensors {
        dqkv: &dqkv,
        dout: &dout,
        qkv: &qkv,
        out: &out,
        lse: &lse,
    };
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
    let [unfused_fwd, unfused_bwd] = case.unfused()?;
    let mut reports = fused_fwd;
    reports.extend([drop_fwd, unfused_fwd]);
    reports.extend(fused_bwd);
    reports.extend([drop_bwd, unfused_bwd]);
    reports.extend(bench_decode(gpu, opts, &qkv_data, &qkv, dims)?);
    Ok(reports)
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

    /// The unfused forward and backward, through the (B, NH, T, T) preatt and att.
    fn unfused(&self) -> Result<[BenchReport; 2]> {
        let (gpu, dims, tensors) = (self.gpu, self.dims, self.tensors);
        let Dims { b, t, nh, .. } = dims;
        let square_bytes = 4 * (b * nh * t * t) as u64;
        let preatt = gpu.zeros("preatt", DType::F32, b * nh * t * t)?;
        let att = gpu.zeros("att", DType::F32, b * nh * t * t)?;
        let ufwd = forward_unfused(gpu, tensors.out, &preatt, &att, tensors.qkv, dims, true)?;
        let mut unfused_fwd = harness::bench_one(gpu, self.opts, "unfused forward", self.s, &ufwd)?;
        // preatt and att
        unfused_fwd.extra_bytes = Some(2 * square_bytes);
        drop(ufwd);
        drop(preatt);
        let dpreatt = gpu.zeros("dpreatt", DType::F32, b * nh * t * t)?;
        let datt = gpu.zeros("datt", DType::F32, b * nh * t * t)?;
        let unfused = UnfusedBackwardTensors {
            dqkv: tensors.dqkv,
            dpreatt: &dpreatt,
            datt: &datt,
            dout: tensors.dout,
            qkv: tensors.qkv,
            att: &att,
        };
        let ubwd = backward_unfused(gpu, unfused, dims, true)?;
        let mut unfused_bwd =
            harness::bench_one(gpu, self.opts, "unfused backward", self.s, &ubwd)?;
        // att (kept from the forward), datt and dpreatt
        unfused_bwd.extra_bytes = Some(3 * square_bytes);
        Ok([unfused_fwd, unfused_bwd])
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
    let Dims { b, t, nh, hs } = dims;
    let c = nh * hs;
    let pos0 = t - 1;
    let ds = format!("B={b} NH={nh} Tq=1 pos0={pos0} HS={hs}");
    let mut last = Vec::with_capacity(b * 3 * c);
    for bi in 0..b {
        last.extend_from_slice(&qkv_data[(bi * t + pos0) * 3 * c..(bi * t + t) * 3 * c]);
    }
    let step_qkv = gpu.upload_f32("step qkv", &last)?;
    let step_out = gpu.zeros("step out", DType::F32, b * c)?;
    let mut caches = vec![DType::F32];
    if gpu.has_f16() {
        caches.push(DType::F16);
    }
    let mut reports = Vec::new();
    for dtype in caches {
        let kc = gpu.zeros("k_cache", dtype, b * nh * t * hs)?;
        let vc = gpu.zeros("v_cache", dtype, b * nh * t * hs)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_head_size_has_a_tiling_at_both_tiers() {
        for hs in 1..=MAX_HS {
            for storage in [STORAGE_MIN, STORAGE_CAP] {
                for pass in [Pass::Forward, Pass::Dq, Pass::Dkdv] {
                    let t = Tiles::choose(pass, hs, storage).unwrap();
                    assert!(t.workgroup_bytes(pass) <= storage as u64);
                    assert!(t.wg <= 256 && t.hd as usize >= hs);
                }
            }
        }
    }
}
