//! The GEMM variant catalogue: every kernel (entry point and configuration) a matmul can run,
//! its stable name (the tuning cache's key) and parser, where each applies, the candidates an
//! autotuner times, and the fixed rule used without measurement.

use super::operand::Operand;
use super::{
    GEMV, GEMV_COLS, GEMV_MAX_M, GEMVC, GEMVC_VAB, GEMVC_WG, Matmul, NAIVE, NAIVE_WG, REG, REG_VB,
    TILED, TILED_VA, TILED_VAB, TILED_VB, UREG, UREG_VAB, UREG_VB,
};
use crate::gpu::{Gpu, KernelSpec, ShaderVariant};

/// One configuration of the tiled kernel: a workgroup computes a `bm` × `bn` output tile, staging
/// `bk`-deep slices of op(A) and op(B) in workgroup memory; an invocation keeps a
/// (4·rm) × (4·rn) register block.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Tile {
    pub bm: u32,
    pub bn: u32,
    pub bk: u32,
    pub rm: u32,
    pub rn: u32,
}

/// Workgroups that keep every compute unit of a large GPU busy (an H100 has 132 SMs).
const FILL_WORKGROUPS: usize = 128;

/// How many workgroups fill `gpu`. wgpu does not report compute-unit counts; a CPU adapter
/// (lavapipe) runs workgroups on the host's threads, so a few per thread suffice there and larger
/// tiles (more reuse per load) win; a GPU gets `FILL_WORKGROUPS`.
fn fill_workgroups(gpu: &Gpu) -> usize {
    if gpu.info.device_type == wgpu::DeviceType::Cpu {
        4 * std::thread::available_parallelism().map_or(4, |n| n.get())
    } else {
        FILL_WORKGROUPS
    }
}

/// vec4s in each of gemm.wgsl's tile_a and tile_b.
const TILE_VEC4S: u32 = 256;

impl Tile {
    /// 256 invocations of 8 × 8 outputs: the most reuse per load, for large outputs.
    const LARGE: Tile = Tile {
        bm: 128,
        bn: 128,
        bk: 8,
        rm: 2,
        rn: 2,
    };
    /// 256 invocations of 4 × 4 outputs.
    const MEDIUM: Tile = Tile {
        bm: 64,
        bn: 64,
        bk: 16,
        rm: 1,
        rn: 1,
    };
    /// 64 invocations of 4 × 4 outputs: many workgroups for small outputs.
    const SMALL: Tile = Tile {
        bm: 32,
        bn: 32,
        bk: 16,
        rm: 1,
        rn: 1,
    };
    /// The configurations offered as candidates: the three of the fixed rule, then 8 × 8 blocks
    /// per invocation on smaller tiles (64 or 128 invocations, as gpu.cpp's fastest f32 kernel).
    const ALL: [Tile; 6] = [
        Tile::LARGE,
        Tile::MEDIUM,
        Tile::SMALL,
        Tile {
            bm: 64,
            bn: 64,
            bk: 16,
            rm: 2,
            rn: 2,
        },
        Tile {
            bm: 128,
            bn: 64,
            bk: 8,
            rm: 2,
            rn: 2,
        },
        Tile {
            bm: 64,
            bn: 128,
            bk: 8,
            rm: 2,
            rn: 2,
        },
    ];

    fn workgroups(&self, mm: &Matmul) -> usize {
        mm.m.div_ceil(self.bm as usize) * mm.n.div_ceil(self.bn as usize) * mm.batch
    }

    /// The fraction of the tiles' area that holds real outputs.
    fn utilization(&self, mm: &Matmul) -> f64 {
        let padded =
            mm.m.next_multiple_of(self.bm as usize) * mm.n.next_multiple_of(self.bn as usize);
        (mm.m * mm.n) as f64 / padded as f64
    }

    /// The largest tile that still gives `fill` workgroups (enough to occupy the device) without
    /// wasting more than a quarter of its area on padding; the smallest otherwise.
    fn choose(mm: &Matmul, fill: usize) -> Tile {
        [Tile::LARGE, Tile::MEDIUM]
            .into_iter()
            .find(|t| t.workgroups(mm) >= fill && t.utilization(mm) >= 0.75)
            .unwrap_or(Tile::SMALL)
    }

    /// (invocations along N, along M).
    fn workgroup_size(&self) -> (u32, u32) {
        (self.bn / (4 * self.rn), self.bm / (4 * self.rm))
    }

    /// Whether the shader can run this configuration: register blocks of 1 or 2 vec4s each way
    /// dividing the tile, BK a multiple of 4, and both staged slices within the tile arrays.
    fn valid(&self) -> bool {
        let Tile { bm, bn, bk, rm, rn } = *self;
        (1..=2).contains(&rm)
            && (1..=2).contains(&rn)
            && bm > 0
            && bn > 0
            && bm.is_multiple_of(4 * rm)
            && bn.is_multiple_of(4 * rn)
            && bk > 0
            && bk.is_multiple_of(4)
            && bk * bm / 4 <= TILE_VEC4S
            && bk * bn / 4 <= TILE_VEC4S
    }

    /// Whether `gpu`'s limits allow this configuration's workgroup.
    fn fits(&self, gpu: &Gpu) -> bool {
        let (x, y) = self.workgroup_size();
        let l = &gpu.limits;
        x <= l.max_compute_workgroup_size_x
            && y <= l.max_compute_workgroup_size_y
            && x * y <= l.max_compute_invocations_per_workgroup
            && 2 * 16 * TILE_VEC4S <= l.max_compute_workgroup_storage_size
    }

    pub(super) fn constants(&self) -> [(&'static str, f64); 5] {
        [
            ("BM", self.bm as f64),
            ("BN", self.bn as f64),
            ("BK", self.bk as f64),
            ("RM", self.rm as f64),
            ("RN", self.rn as f64),
        ]
    }
}

/// One configuration of the register-block kernel (gemm_reg): a workgroup of `wg` invocations
/// side by side along N computes `rm` rows × `wg · rn` columns of C, each invocation an
/// `rm` × `rn` block straight from memory, without workgroup memory or barriers. `unrolled`
/// takes gemm_ureg, the same work written out for blocks of 8 or 16 rows by 4 or 8 columns.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Reg {
    /// Rows per invocation (and workgroup), 1 to 16.
    pub rm: u32,
    /// Columns per invocation: 4 or 8 (unrolled: also 16).
    pub rn: u32,
    /// Invocations per workgroup.
    pub wg: u32,
    /// gemm_ureg rather than gemm_reg.
    pub unrolled: bool,
}

/// A gemm_reg configuration.
const fn reg(rm: u32, rn: u32, wg: u32) -> Reg {
    Reg {
        rm,
        rn,
        wg,
        unrolled: false,
    }
}

/// A gemm_ureg configuration with 8 × 4 blocks.
const fn ureg(wg: u32) -> Reg {
    ureg_block(8, 4, wg)
}

/// A gemm_ureg configuration.
const fn ureg_block(rm: u32, rn: u32, wg: u32) -> Reg {
    Reg {
        rm,
        rn,
        wg,
        unrolled: true,
    }
}

impl Reg {
    /// The configurations offered as candidates. gemm_reg's loops over register arrays ran 2-4x
    /// slower than gemm_ureg's written-out blocks on lavapipe in every layout
    /// (docs/benchmarks-log.md); its two configurations that had won there before stay for
    /// adapters not measured yet. gemm_ureg's bigger blocks read less per fma (16 × 16: 32 vec4
    /// reads for 1024 fmas per k chunk, 8 × 4: 12 for 128) and ran 2-4x faster than 8 × 4 on
    /// lavapipe at the GPT shapes and at 1024^3; 8 × 8, 16 × 4 and 8 × 16 blocks never won there
    /// (docs/benchmarks-log.md), and the 8 × 4 ones stay for small products.
    const ALL: [Reg; 8] = [
        reg(8, 8, 16),
        reg(16, 4, 16),
        ureg(16),
        ureg(32),
        ureg_block(16, 8, 8),
        ureg_block(16, 8, 16),
        ureg_block(16, 16, 8),
        ureg_block(16, 16, 16),
    ];

    /// Output columns of one workgroup.
    fn cols(&self) -> u32 {
        self.wg * self.rn
    }

    fn valid(&self) -> bool {
        let block = if self.unrolled {
            (self.rm == 8 || self.rm == 16) && [4, 8, 16].contains(&self.rn)
        } else {
            (1..=16).contains(&self.rm) && (self.rn == 4 || self.rn == 8)
        };
        block && self.wg > 0
    }

    fn fits(&self, gpu: &Gpu) -> bool {
        let l = &gpu.limits;
        self.wg <= l.max_compute_workgroup_size_x
            && self.wg <= l.max_compute_invocations_per_workgroup
    }

    pub(super) fn constants(&self) -> [(&'static str, f64); 3] {
        [
            ("REG_M", self.rm as f64),
            ("REG_NV", (self.rn / 4) as f64),
            ("REG_WG", self.wg as f64),
        ]
    }

    fn name(&self) -> String {
        let u = if self.unrolled { "u" } else { "" };
        format!("{u}reg{}x{}w{}", self.rm, self.rn, self.wg)
    }
}

/// Split-K: the K range cut into `splits` slices whose partial products gemm_reg (in `reg`'s
/// configuration) writes to a scratch buffer, then gemm_splitk_reduce adds them in slice order
/// and applies alpha, bias and accumulate. For one large-K product with a small output (the weight
/// gradient: M = out features, N = in features, K = B·T). It sums in a different order from the
/// other kernels (to rounding the same, bit for bit repeatable).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SplitK {
    pub splits: u32,
    pub reg: Reg,
}

impl SplitK {
    /// The configurations offered as candidates.
    const ALL: [SplitK; 3] = [
        SplitK {
            splits: 4,
            reg: ureg(16),
        },
        SplitK {
            splits: 8,
            reg: ureg(16),
        },
        SplitK {
            splits: 16,
            reg: ureg(16),
        },
    ];

    /// K per slice: a multiple of 4 (the vec4 reads along K stay aligned), so that at most
    /// `splits` slices cover K.
    pub(super) fn slice(&self, k: usize) -> usize {
        k.div_ceil(self.splits as usize).next_multiple_of(4)
    }

    /// Whether split-K applies: one batch entry, and K long enough to give each slice 4 or more.
    fn applies(&self, mm: &Matmul) -> bool {
        mm.batch == 1 && mm.k >= 4 * self.splits as usize
    }
}

/// Which kernel (entry point and configuration) computes a matmul: what an autotuner chooses
/// among. `name` and `from_name` give each a short, stable spelling (the tuning cache
/// keeps these names, so they must not change).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kernel {
    /// One output per invocation: the correctness baseline.
    Naive,
    /// Few rows of A against B stored (N, K): matrix-vector products.
    Gemv,
    /// The same problems, one output column per invocation without barriers (CPU adapters).
    Gemvc,
    /// Workgroup-memory tiles (gemm_tiled*).
    Tiled(Tile),
    /// Register blocks straight from memory (gemm_reg*).
    Reg(Reg),
    /// Split-K over gemm_reg, then a fixed-order reduce.
    SplitK(SplitK),
    /// B stored (K, N) transposed into a scratch buffer first, then gemm_ureg with TRANS_B on it
    /// (the register block's configuration; gemm_ureg only): for one batch entry.
    Packed(Reg),
}

impl Kernel {
    /// Whether the matrix-vector kernel applies: few rows, B stored (N, K), A not transposed,
    /// one batch entry.
    fn gemv_fits(mm: &Matmul) -> bool {
        mm.m <= GEMV_MAX_M && mm.trans_b && !mm.trans_a && mm.batch == 1
    }

    /// The kernel's kind: "naive", "gemv", "gemvc", "tiled", "reg", "ureg", "splitk" or
    /// "packed" (its name without the configuration).
    pub fn kind(&self) -> &'static str {
        match self {
            Kernel::Naive => "naive",
            Kernel::Gemv => "gemv",
            Kernel::Gemvc => "gemvc",
            Kernel::Tiled(_) => "tiled",
            Kernel::Reg(r) if r.unrolled => "ureg",
            Kernel::Reg(_) => "reg",
            Kernel::SplitK(_) => "splitk",
            Kernel::Packed(_) => "packed",
        }
    }

    /// "naive", "gemv", "tiled128x128x8r2x2", "reg8x4w64", "ureg8x4w64",
    /// "splitk8reg8x4w16", "splitk8ureg8x4w16", "packedureg8x4w16".
    pub fn name(&self) -> String {
        match self {
            Kernel::Naive => "naive".to_string(),
            Kernel::Gemv => "gemv".to_string(),
            Kernel::Gemvc => "gemvc".to_string(),
            Kernel::Tiled(t) => format!("tiled{}x{}x{}r{}x{}", t.bm, t.bn, t.bk, t.rm, t.rn),
            Kernel::Reg(r) => r.name(),
            Kernel::SplitK(s) => format!("splitk{}{}", s.splits, s.reg.name()),
            Kernel::Packed(r) => format!("packed{}", r.name()),
        }
    }

    /// Every kernel offered as a candidate, in the order `candidates` lists them: the naive
    /// baseline, the matrix-vector kernel, then each configuration of the tiled, register-block,
    /// split-K and packed-B kernels.
    pub fn catalogue() -> Vec<Kernel> {
        [Kernel::Naive, Kernel::Gemv, Kernel::Gemvc]
            .into_iter()
            .chain(Tile::ALL.map(Kernel::Tiled))
            .chain(Reg::ALL.map(Kernel::Reg))
            .chain(SplitK::ALL.map(Kernel::SplitK))
            .chain(
                [
                    ureg(16),
                    ureg(32),
                    ureg_block(16, 8, 8),
                    ureg_block(16, 8, 16),
                    ureg_block(16, 16, 8),
                ]
                .map(Kernel::Packed),
            )
            .collect()
    }

    /// The kernel `name` spells, if its configuration is one the shader can run: the inverse of
    /// `name`, for the tuning cache and `--only`.
    pub fn from_name(s: &str) -> Option<Kernel> {
        let kernel = match s {
            "naive" => Kernel::Naive,
            "gemv" => Kernel::Gemv,
            "gemvc" => Kernel::Gemvc,
            _ if s.starts_with("tiled") => {
                let [bm, bn, bk, rm, rn] = numbers(&s["tiled".len()..], "xxrx")?;
                Kernel::Tiled(Tile { bm, bn, bk, rm, rn })
            }
            _ if s.starts_with("reg") || s.starts_with("ureg") => Kernel::Reg(parse_reg(s)?),
            _ if s.starts_with("packed") => Kernel::Packed(parse_reg(&s["packed".len()..])?),
            _ if s.starts_with("splitk") => {
                let rest = &s["splitk".len()..];
                let at = rest.find(|c: char| !c.is_ascii_digit())?;
                let [splits] = numbers(&rest[..at], "")?;
                Kernel::SplitK(SplitK {
                    splits,
                    reg: parse_reg(&rest[at..])?,
                })
            }
            _ => return None,
        };
        (kernel.valid() && kernel.name() == s).then_some(kernel)
    }

    /// Whether the configuration is one the shader can run at all (on any adapter).
    fn valid(&self) -> bool {
        match self {
            Kernel::Naive | Kernel::Gemv | Kernel::Gemvc => true,
            Kernel::Tiled(t) => t.valid(),
            Kernel::Reg(r) => r.valid(),
            Kernel::SplitK(s) => s.splits >= 2 && s.reg.valid(),
            Kernel::Packed(r) => r.unrolled && r.valid(),
        }
    }

    /// Whether building the kernel's pipeline takes seconds on CPU adapters: gemm_ureg's 16-column
    /// blocks (lavapipe compiles each of their pipelines in 6-11 s, a 16 × 8 one in about 3).
    pub fn slow_to_build(&self) -> bool {
        match self {
            Kernel::Reg(r) | Kernel::Packed(r) | Kernel::SplitK(SplitK { reg: r, .. }) => {
                r.unrolled && r.rn == 16
            }
            _ => false,
        }
    }

    /// Whether the packed-B kernel applies: one batch entry of B stored (K, N).
    fn packed_fits(mm: &Matmul) -> bool {
        !mm.trans_b && mm.batch == 1
    }
}

/// "reg8x4w64" or "ureg8x4w64" as a register block.
fn parse_reg(s: &str) -> Option<Reg> {
    let (unrolled, rest) = match s.strip_prefix("ureg") {
        Some(rest) => (true, rest),
        None => (false, s.strip_prefix("reg")?),
    };
    let [rm, rn, wg] = numbers(rest, "xw")?;
    Some(Reg {
        rm,
        rn,
        wg,
        unrolled,
    })
}

/// The N decimal numbers of `s`, separated by the characters of `seps` in that order.
fn numbers<const N: usize>(s: &str, seps: &str) -> Option<[u32; N]> {
    let mut out = [0; N];
    let mut rest = s;
    let mut seps = seps.chars();
    for (i, x) in out.iter_mut().enumerate() {
        let end = if i + 1 < N {
            rest.find(seps.next()?)?
        } else {
            rest.len()
        };
        let digits = &rest[..end];
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        *x = digits.parse().ok()?;
        rest = rest.get(end + 1..).unwrap_or("");
    }
    seps.next().is_none().then_some(out)
}

/// The entry point that runs `kernel` on operands read as vec4 (`va`, `vb`) or not, with an f16
/// B or not (every entry point reads b through read_b / read_b4, so each has an f16 form).
pub(super) fn entry(kernel: Kernel, va: bool, vb: bool, f16_b: bool) -> KernelSpec {
    let spec = match kernel {
        Kernel::Naive => NAIVE,
        Kernel::Gemv => GEMV,
        Kernel::Gemvc if va && vb => GEMVC_VAB,
        Kernel::Gemvc => GEMVC,
        Kernel::Tiled(_) => match (va, vb) {
            (false, false) => TILED,
            (true, false) => TILED_VA,
            (false, true) => TILED_VB,
            (true, true) => TILED_VAB,
        },
        // The scratch copy of B is f32 and read as vec4.
        Kernel::Packed(_) => return if va { UREG_VAB } else { UREG_VB },
        Kernel::Reg(r) | Kernel::SplitK(SplitK { reg: r, .. }) => match (r.unrolled, va, vb) {
            (false, _, false) => REG,
            (false, _, true) => REG_VB,
            (true, _, false) => UREG,
            (true, false, true) => UREG_VB,
            (true, true, true) => UREG_VAB,
        },
    };
    if f16_b {
        spec.with_variant(ShaderVariant::F16)
    } else {
        spec
    }
}

/// Why `kernel` cannot compute `mm` on `gpu`, if it cannot: the checks that do not depend on
/// where the operands lie or on B's element type.
pub(super) fn unfit(gpu: &Gpu, mm: &Matmul, kernel: Kernel) -> Option<String> {
    if !kernel.valid() {
        return Some("not a configuration the shader can run".to_string());
    }
    let fits = match kernel {
        Kernel::Naive => true,
        Kernel::Gemv | Kernel::Gemvc => Kernel::gemv_fits(mm),
        Kernel::Tiled(t) => t.fits(gpu),
        Kernel::Reg(r) => r.fits(gpu),
        Kernel::SplitK(s) => s.reg.fits(gpu) && s.applies(mm),
        Kernel::Packed(r) => r.fits(gpu) && Kernel::packed_fits(mm),
    };
    let (bm, bn) = block(kernel);
    let max = gpu.limits.max_compute_workgroups_per_dimension as usize;
    let tiles = mm.m.div_ceil(bm) * mm.n.div_ceil(bn);
    if fits && tiles <= max * max {
        return None;
    }
    Some(match kernel {
        Kernel::Gemv | Kernel::Gemvc => format!(
            "the matrix-vector kernels take at most {GEMV_MAX_M} rows of an untransposed A \
             against B stored (N, K), without batches"
        ),
        Kernel::SplitK(s) if !s.applies(mm) => format!(
            "split-K takes one batch entry and K of at least {} (got batch {}, K {})",
            4 * s.splits,
            mm.batch,
            mm.k
        ),
        Kernel::Packed(_) if !Kernel::packed_fits(mm) => {
            "the packed-B kernel takes one batch entry of B stored (K, N)".to_string()
        }
        _ if fits => format!("{tiles} output tiles exceed the {max} x {max} workgroup grid"),
        _ => "the workgroup exceeds the adapter's limits (max_compute_workgroup_size_*, \
              max_compute_invocations_per_workgroup, max_compute_workgroup_storage_size)"
            .to_string(),
    })
}

/// Output rows and columns of one workgroup of `kernel`.
pub(super) fn block(kernel: Kernel) -> (usize, usize) {
    match kernel {
        Kernel::Naive => (NAIVE_WG, NAIVE_WG),
        Kernel::Gemv => (GEMV_MAX_M, GEMV_COLS),
        Kernel::Gemvc => (GEMV_MAX_M, GEMVC_WG),
        Kernel::Tiled(t) => (t.bm as usize, t.bn as usize),
        Kernel::Reg(r) | Kernel::SplitK(SplitK { reg: r, .. }) | Kernel::Packed(r) => {
            (r.rm as usize, r.cols() as usize)
        }
    }
}

/// The multiply-adds from which `candidates` offers kernels that are slow to build: below it the
/// build costs more than such a kernel saves in a typical run, and a model's small products would
/// each pay it when tuned.
pub const SLOW_BUILD_MIN_FMAS: usize = 1 << 24;

/// The multiply-adds of a dispatch (every batch entry: attention's products are many small ones)
/// with M, N, K and the batch rounded up as the tuner buckets them, so that every product of a
/// bucket is offered the same candidates (a cached winner that one of them was not offered would
/// be measured again).
fn bucket_fmas(mm: &Matmul) -> usize {
    use crate::kernels::measure::bucket;
    bucket(mm.m) * bucket(mm.n) * bucket(mm.k) * bucket(mm.batch)
}

/// Every kernel that can compute `mm` with these operands on `gpu`, the naive baseline first:
/// what an autotuner times. Each applies to any placement of the operands that `matmul`
/// accepts (vec4 reads are chosen per operand at launch).
pub fn candidates(gpu: &Gpu, mm: &Matmul, a: &Operand, b: &Operand) -> Vec<Kernel> {
    let _ = (a, b);
    Kernel::catalogue()
        .into_iter()
        .filter(|&k| unfit(gpu, mm, k).is_none())
        .filter(|&k| !k.slow_to_build() || bucket_fmas(mm) >= SLOW_BUILD_MIN_FMAS)
        .filter(|&k| match k {
            Kernel::SplitK(s) => {
                let slices = mm.k.div_ceil(s.slice(mm.k));
                4 * (slices * mm.m * mm.n) as u64 <= gpu.limits.max_storage_buffer_binding_size
            }
            Kernel::Packed(_) => {
                4 * (mm.n * mm.k.next_multiple_of(4)) as u64
                    <= gpu.limits.max_storage_buffer_binding_size
            }
            _ => true,
        })
        .collect()
}

/// The register block a CPU adapter's fixed rule takes for products that are not
/// matrix-vector ones: 16 × 8 outputs per invocation written out in registers, 8 invocations a
/// workgroup, no workgroup memory or barriers. It won most of the products measured on lavapipe
/// (the embedded default's; 16 × 16 won at 1024^3 by a few percent), where the workgroup tiles
/// that GPUs want ran several times slower.
pub const CPU_RULE: Reg = ureg_block(16, 8, 8);

/// The kernel `matmul` runs for `Variant::Tiled` where nothing was measured: a matrix-vector
/// kernel where one applies (on a CPU adapter the one without barriers, 1.5-1.9x faster than
/// gemm_gemv on lavapipe at SmolLM2-135M's decoding products); otherwise, on a CPU adapter,
/// `CPU_RULE`'s register blocks, and on a GPU the tile configuration `Tile::choose` picks.
pub fn fixed_rule(gpu: &Gpu, mm: &Matmul) -> Kernel {
    let cpu = gpu.info.device_type == wgpu::DeviceType::Cpu;
    if Kernel::gemv_fits(mm) {
        if cpu { Kernel::Gemvc } else { Kernel::Gemv }
    } else if cpu && unfit(gpu, mm, Kernel::Reg(CPU_RULE)).is_none() {
        Kernel::Reg(CPU_RULE)
    } else {
        Kernel::Tiled(Tile::choose(mm, fill_workgroups(gpu)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every kernel of the catalogue has a distinct name that parses back to it.
    #[test]
    fn every_name_parses_back() {
        let all = Kernel::catalogue();
        for kernel in &all {
            assert!(kernel.valid(), "{kernel:?}");
            assert_eq!(Kernel::from_name(&kernel.name()), Some(*kernel));
        }
        let mut names: Vec<String> = all.iter().map(Kernel::name).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), all.len());
    }

    /// Names the tuning caches already hold keep their meaning.
    #[test]
    fn cached_names_keep_their_kernels() {
        let cases = [
            ("naive", Kernel::Naive),
            ("gemv", Kernel::Gemv),
            ("gemvc", Kernel::Gemvc),
            ("tiled128x128x8r2x2", Kernel::Tiled(Tile::LARGE)),
            ("reg8x8w16", Kernel::Reg(reg(8, 8, 16))),
            ("ureg8x4w32", Kernel::Reg(ureg(32))),
            ("ureg16x16w8", Kernel::Reg(ureg_block(16, 16, 8))),
            (
                "splitk8ureg8x4w16",
                Kernel::SplitK(SplitK {
                    splits: 8,
                    reg: ureg(16),
                }),
            ),
            ("packedureg16x8w8", Kernel::Packed(ureg_block(16, 8, 8))),
        ];
        for (name, kernel) in cases {
            assert_eq!(Kernel::from_name(name), Some(kernel), "{name}");
            assert_eq!(kernel.name(), name);
        }
        for bad in [
            "",
            "tiled",
            "reg8x5w64",
            "splitk1reg8x4w16",
            "packedreg8x4w16",
            "naive ",
        ] {
            assert_eq!(Kernel::from_name(bad), None, "{bad}");
        }
    }
}
