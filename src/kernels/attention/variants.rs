//! The typed catalogue of attention's kernel variants: the tilings of the fused kernels (the
//! override constants of attention.wgsl) and the tables they come from, the row kernels and the
//! GEMM path; their names (for display and the tuning cache) and the parser back from a name;
//! and `tuned`, the tuner's choice among them.

use super::gemm_path::GEMM_PATH_MIN_T;
use super::{
    BackwardTensors, Dims, FAMILY, KvCache, Options, backward_with, forward_cached_with,
    forward_with, kv_append, own_step,
};
use crate::error::{Error, Result};
use crate::gpu::{DType, Gpu, View};
use crate::rng::Rng;

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
pub struct Tiles {
    pub(super) wg: u32,
    pub(super) br: u32,
    pub(super) bc: u32,
    pub(super) hd: u32,
    pub(super) sc: u32,
    pub(super) tc: u32,
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
pub(super) fn head_capacity(hs: usize) -> u32 {
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

    pub(super) fn constants(&self) -> [(&'static str, f64); 6] {
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
pub(super) const ROWS_WG: u32 = 64;
/// New tokens per decoding call up to which a CPU adapter's fixed rule is the row kernels.
const DECODE_ROWS_MAX_TQ: usize = 8;

/// Which kernels compute a pass, forward or backward: the fused tiled kernels (the forward's
/// tiling twice, or dK/dV's and dQ's), the fused row kernels with `wg` invocations per
/// workgroup, or the GEMM path (`gemm_forward`, `gemm_backward`). The tiled kernels suit GPUs;
/// the row kernels, without workgroup memory or barriers, suit CPU-like adapters and short
/// sequences; the GEMM path suits CPU-like adapters on long sequences. `tuned` measures which
/// wins.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Variant {
    Tiled(Tiles, Tiles),
    Rows(u32),
    Gemm,
}

/// A fused pass as the tuner sees it: the forward, or the whole backward (its three dispatches).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    Forward,
    Backward,
}

impl Stage {
    pub const ALL: [Stage; 2] = [Stage::Forward, Stage::Backward];

    /// "forward" or "backward", as in the tuning cache's keys.
    pub fn name(self) -> &'static str {
        match self {
            Stage::Forward => "forward",
            Stage::Backward => "backward",
        }
    }

    /// The stage `name` names (`Stage::name`'s inverse).
    pub fn parse(name: &str) -> Result<Stage> {
        Stage::ALL
            .into_iter()
            .find(|s| s.name() == name)
            .ok_or_else(|| Error::invalid("attention stage", format!("no stage '{name}'")))
    }
}

impl Variant {
    /// The fixed rule: the first tiling of the table that fits `storage` bytes.
    pub(super) fn rule(stage: Stage, hs: usize, storage: u32) -> Result<Variant> {
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
    pub(super) fn candidates(stage: Stage, hs: usize, storage: u32) -> Result<Vec<Variant>> {
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
    pub fn name(&self) -> String {
        let tiles = |t: &Tiles| format!("{}x{}w{}", t.br, t.bc, t.wg);
        match self {
            Variant::Tiled(a, b) if a == b => format!("tiles{}", tiles(a)),
            Variant::Tiled(a, b) => format!("tiles{}+{}", tiles(a), tiles(b)),
            Variant::Rows(wg) => format!("rows{wg}"),
            Variant::Gemm => "gemm".to_string(),
        }
    }

    /// The variant `name` names (`Variant::name`'s inverse) for head size `hs`, whose capacity
    /// the tilings' override constants depend on. An error names anything else, and a tiling
    /// the kernels cannot run.
    pub fn parse(name: &str, hs: usize) -> Result<Variant> {
        let bad = |why: &str| {
            Error::invalid(
                "attention variant",
                format!(
                    "'{name}': {why} (expected tiles<BR>x<BC>w<WG>[+<BR>x<BC>w<WG>], rows<WG> or gemm)"
                ),
            )
        };
        let number = |s: &str| s.parse::<u32>().map_err(|_| bad("not a number"));
        let tiles = |s: &str| -> Result<Tiles> {
            let (br, rest) = s.split_once('x').ok_or_else(|| bad("no 'x'"))?;
            let (bc, wg) = rest.split_once('w').ok_or_else(|| bad("no 'w'"))?;
            let (br, bc, wg) = (number(br)?, number(bc)?, number(wg)?);
            Tiles::derive(br, bc, wg, head_capacity(hs))
                .ok_or_else(|| bad(&format!("no such tiling for HS = {hs}")))
        };
        if name == "gemm" {
            Ok(Variant::Gemm)
        } else if let Some(wg) = name.strip_prefix("rows") {
            Ok(Variant::Rows(number(wg)?))
        } else if let Some(rest) = name.strip_prefix("tiles") {
            Ok(match rest.split_once('+') {
                Some((a, b)) => Variant::Tiled(tiles(a)?, tiles(b)?),
                None => {
                    let t = tiles(rest)?;
                    Variant::Tiled(t, t)
                }
            })
        } else {
            Err(bad("unknown kind"))
        }
    }
}

/// The variant `forward` or `backward` takes for this problem: measured among
/// `Variant::candidates` (see `kernels::measure`), `Variant::rule` being the fixed rule. The
/// variants sum in different orders, so they agree to rounding, not bit for bit.
pub(super) fn tuned(gpu: &Gpu, stage: Stage, dims: Dims, causal: bool) -> Result<Variant> {
    use crate::kernels::measure::{self, Problem, Trial, bucket};
    let Dims { b, t, nh, hs, .. } = dims;
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
            "{} bh{} t{} hs{hs}{} {mode}",
            stage.name(),
            bucket(b * nh),
            bucket(t),
            group_key(dims)
        ),
        shape: format!(
            "{} B={b} NH={nh}{} T={t} HS={hs} {mode}",
            stage.name(),
            group_shape(dims)
        ),
        candidates: variants.iter().map(Variant::name).collect(),
        rule: rule.name(),
        // Inputs in [-1, 1]: the products sum HS terms, the outputs T of them.
        atol: 1e-5 * ((t.max(hs)) as f64 / 256.0).max(1.0),
        rtol: 1e-4,
    };
    let (c, w) = (dims.c(), dims.width());
    let opts = Options {
        causal,
        dropout: None,
    };
    let mut tensors: Option<[View; 5]> = None;
    let name = measure::choose(gpu, &problem, &mut |name| {
        let v = Variant::by_name(&variants, name)?;
        if tensors.is_none() {
            let mut rng = Rng::new(0xa77e);
            let mut up =
                |name: &str, len: usize| gpu.upload_f32(name, &rng.vec_uniform(len, -1.0, 1.0));
            let ts = [
                up("tune.qkv", b * t * w)?,
                up("tune.dout", b * t * c)?,
                gpu.zeros("tune.out", DType::F32, b * t * c)?,
                gpu.zeros("tune.lse", DType::F32, b * nh * t)?,
                gpu.zeros("tune.dqkv", DType::F32, b * t * w)?,
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

/// The tuning cache's key for grouped-query attention: " g{G}" with G query heads per key/value
/// head, nothing for multi-head attention (whose keys predate grouping).
fn group_key(dims: Dims) -> String {
    match dims.group() {
        1 => String::new(),
        g => format!(" g{g}"),
    }
}

/// `group_key` for a problem's shape: " NKV={NKV}", nothing for multi-head attention.
fn group_shape(dims: Dims) -> String {
    match dims.group() {
        1 => String::new(),
        _ => format!(" NKV={}", dims.nkv),
    }
}

/// The baseline of `stage`'s tuning at head size `hs` on this adapter: the fixed rule's tiling.
pub fn baseline(gpu: &Gpu, stage: Stage, hs: usize) -> Result<Variant> {
    Variant::rule(stage, hs, storage_limit(gpu))
}

/// The workgroup memory the fused kernels may plan for on this adapter.
pub(super) fn storage_limit(gpu: &Gpu) -> u32 {
    gpu.limits
        .max_compute_workgroup_storage_size
        .min(STORAGE_CAP)
}

/// The variant `forward_cached` takes for Tq new tokens over caches of `tmax` positions: the
/// fixed rule's tiling or the row kernel, measured with the caches full (pos0 = Tmax - Tq), the
/// longest attention a decoding dispatch computes.
pub(super) fn tuned_cached(gpu: &Gpu, cache: DType, dims: Dims, tmax: usize) -> Result<Variant> {
    use crate::kernels::measure::{self, Problem, Trial, bucket};
    let Dims {
        b,
        t: tq,
        nh,
        nkv,
        hs,
    } = dims;
    let tiled = Variant::rule(Stage::Forward, hs, storage_limit(gpu))?;
    let rows = Variant::Rows(ROWS_WG);
    // A query tile holding one or a few live rows wastes most of a tiled workgroup: on a CPU
    // adapter the row kernels decode a token 6.6x faster (lavapipe, SmolLM2-135M's heads over
    // a cache of 256: 4.3 against 28.6 ms), so they are its rule there.
    let cpu = gpu.info.device_type == wgpu::DeviceType::Cpu;
    let (rule, variants) = if cpu && tq <= DECODE_ROWS_MAX_TQ {
        (rows, [rows, tiled])
    } else {
        (tiled, [tiled, rows])
    };
    let problem = Problem {
        family: FAMILY.name,
        bucket: format!(
            "cached bh{} tq{} tmax{} hs{hs}{} {}",
            bucket(b * nh),
            bucket(tq),
            bucket(tmax),
            group_key(dims),
            cache.name()
        ),
        shape: format!(
            "cached B={b} NH={nh}{} Tq={tq} Tmax={tmax} HS={hs} {}",
            group_shape(dims),
            cache.name()
        ),
        candidates: variants.iter().map(Variant::name).collect(),
        rule: rule.name(),
        atol: 1e-5 * (tmax.max(hs) as f64 / 256.0).max(1.0),
        rtol: 1e-4,
    };
    let (c, w) = (dims.c(), dims.width());
    let mut tensors: Option<[View; 4]> = None;
    let name = measure::choose(gpu, &problem, &mut |name| {
        let v = Variant::by_name(&variants, name)?;
        if tensors.is_none() {
            let mut rng = Rng::new(0xdec0);
            let full = gpu.upload_f32("tune.qkv", &rng.vec_uniform(b * tmax * w, -1.0, 1.0))?;
            let kc = gpu.zeros("tune.k_cache", cache, b * nkv * tmax * hs)?;
            let vc = gpu.zeros("tune.v_cache", cache, b * nkv * tmax * hs)?;
            let kv = KvCache {
                k: &kc,
                v: &vc,
                tmax,
            };
            gpu.run(&[kv_append(gpu, kv, &full, Dims { t: tmax, ..dims }, 0)?])?;
            tensors = Some([
                gpu.upload_f32("tune.step_qkv", &rng.vec_uniform(b * tq * w, -1.0, 1.0))?,
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

#[cfg(test)]
mod tests {
    use super::super::MAX_HS;
    use super::*;

    /// Every variant the tuner may offer, at every head size and both storage tiers, and the
    /// variants with different forward and backward tilings, come back from their names; a
    /// name that is no variant is an error.
    #[test]
    fn every_variant_round_trips_through_its_name() {
        let mut seen = 0;
        for hs in 1..=MAX_HS {
            for storage in [STORAGE_MIN, STORAGE_CAP] {
                for stage in Stage::ALL {
                    let mut all = Variant::candidates(stage, hs, storage).unwrap();
                    all.push(Variant::rule(Stage::Backward, hs, storage).unwrap());
                    for v in all {
                        assert_eq!(Variant::parse(&v.name(), hs).unwrap(), v, "{}", v.name());
                        seen += 1;
                    }
                }
            }
        }
        assert!(seen > 4 * MAX_HS, "{seen} variants");
        for stage in Stage::ALL {
            assert_eq!(Stage::parse(stage.name()).unwrap(), stage);
        }
        let split = Variant::parse("tiles32x32w64+16x16w64", 64).unwrap();
        assert!(matches!(split, Variant::Tiled(a, b) if a != b));
        assert_eq!(split.name(), "tiles32x32w64+16x16w64");
        for bad in [
            "",
            "tiles",
            "tiles32x32",
            "tiles7x32w64",
            "rows",
            "rowsx",
            "gemm2",
            "fused",
        ] {
            assert!(Variant::parse(bad, 64).is_err(), "{bad}");
        }
        assert!(Stage::parse("sideways").is_err());
    }

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
