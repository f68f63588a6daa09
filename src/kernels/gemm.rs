//! gemm.wgsl launchers: one general matrix multiply (batched, strided, either operand transposed,
//! optional bias, alpha, accumulate) and the linear layer built on it.
//!
//! matmul:          C[z] (M, N) = alpha · op(A[z]) (M, K) · op(B[z]) (K, N) (+ bias (N)) (+ C[z])
//!                  overwrites C, or accumulates (+=) when `Matmul::accumulate`
//! linear_forward:  out (M, N) = inp (M, K) · w (N, K)ᵀ + bias (N)     overwrites out
//! linear_backward: dinp (M, K) = dout (M, N) · w (N, K)               overwrites, or += when asked
//!                  dw (N, K) += dout (M, N)ᵀ · inp (M, K)             accumulates
//!                  dbias (N) += Σ_m dout (M, N)                       accumulates
//!
//! For a linear layer M = B·T rows and w is (out features, in features), as in PyTorch.
//!
//! f16 weights (inference): `matmul` and `linear_forward` also take B (the weight) as an f16 view,
//! widened to f32 on load, with A, bias and C f32 and every product and sum in f32. The view's
//! dtype selects gemm.wgsl's F16 variant (the same tiles as the f32 kernels), so callers need no
//! other API; this needs the adapter's SHADER_F16 feature (`Gpu::has_f16`), and an f16 B on an
//! adapter without it is an error naming the tensor. Operand offsets and strides count elements
//! of the operand's own type. The backward stays f32.

use bytemuck::{Pod, Zeroable};

use super::harness::{self, BenchOptions, BenchReport, CheckReport, Family};
use super::{bytes_of, expect, expect_dims, expect_f16_support, round_f16};
use crate::error::{Error, Result};
use crate::gpu::{
    Binding, Cost, DType, Dispatch, Gpu, KernelSpec, Shader, ShaderVariant, View, grid,
};
use crate::reference;
use crate::reference::gemm::{Layout, Layouts, Product};
use crate::rng::Rng;

use Binding::{Read, ReadWrite};

/// a, b, bias, c, aux (the epilogue's tensor).
const GEMM_BINDINGS: &[Binding] = &[Read, Read, Read, ReadWrite, ReadWrite];

/// The f32 (Base) kernel of gemm.wgsl at `entry`, with the GEMM bindings; `entry()` derives the
/// f16-B variant where one is needed.
const fn gemm_spec(entry: &'static str) -> KernelSpec {
    KernelSpec {
        shader: Shader::Gemm,
        variant: ShaderVariant::Base,
        entry,
        bindings: GEMM_BINDINGS,
    }
}

pub const NAIVE: KernelSpec = gemm_spec("gemm_naive");
/// Matrix-vector products: few rows of a against b stored (N, K) (decoding).
pub const GEMV: KernelSpec = gemm_spec("gemm_gemv");
/// The tiled kernel with scalar reads of a and b.
pub const TILED: KernelSpec = gemm_spec("gemm_tiled");
/// The tiled kernel reading a as vec4.
pub const TILED_VA: KernelSpec = gemm_spec("gemm_tiled_va");
/// The tiled kernel reading b as vec4.
pub const TILED_VB: KernelSpec = gemm_spec("gemm_tiled_vb");
/// The tiled kernel reading a and b as vec4.
pub const TILED_VAB: KernelSpec = gemm_spec("gemm_tiled_vab");
/// The register-block kernel (no workgroup memory), scalar reads of b.
pub const REG: KernelSpec = gemm_spec("gemm_reg");
/// The register-block kernel reading b as vec4.
pub const REG_VB: KernelSpec = gemm_spec("gemm_reg_vb");
/// The register-block kernel written out (8 × 4 blocks), scalar reads of b.
pub const UREG: KernelSpec = gemm_spec("gemm_ureg");
/// The register-block kernel written out, reading b as vec4.
pub const UREG_VB: KernelSpec = gemm_spec("gemm_ureg_vb");
/// The register-block kernel written out, reading a and b as vec4.
pub const UREG_VAB: KernelSpec = gemm_spec("gemm_ureg_vab");
/// Split-K's reduce: binding 1 holds the partial products; binding 2 is not read.
pub const SPLITK_REDUCE: KernelSpec = gemm_spec("gemm_splitk_reduce");
/// The packed-B kernel's first pass: bᵀ into binding 4.
pub const PACK_B: KernelSpec = gemm_spec("gemm_pack_b");
/// Rows of op(A) up to which `matmul` takes the matrix-vector kernel (as `gemm.wgsl`'s
/// GEMV_MAX_M), for B stored (N, K) without batches.
pub const GEMV_MAX_M: usize = 8;
/// Output columns per workgroup of the matrix-vector kernel: 8 invocations per column read 32
/// contiguous bytes of a weight row per step (a memory sector) and need only three barrier
/// levels to combine; 8 columns of 32 invocations were twice as slow on a CPU adapter, where
/// barriers dominate.
const GEMV_COLS: usize = 32;
/// Outputs per workgroup of gemm_splitk_reduce.
const SPLITK_REDUCE_WG: usize = 256;
/// Outputs per workgroup of gemm_pack_b.
const PACK_B_WG: usize = 256;
pub const BIAS_BACKWARD: KernelSpec = KernelSpec {
    shader: Shader::Gemm,
    variant: ShaderVariant::Base,
    entry: "bias_backward",
    bindings: &[Read, ReadWrite],
};

/// Output block of one gemm_naive workgroup (16 × 16 invocations).
const NAIVE_WG: usize = 16;
/// Columns summed by one bias_backward workgroup.
const BIAS_COLS: usize = 32;

#[repr(C)]
#[derive(Clone, Copy, Default, Pod, Zeroable)]
struct Params {
    m: u32,
    n: u32,
    k: u32,
    batch: u32,
    a_off: u32,
    lda: u32,
    a_bs: u32,
    b_off: u32,
    ldb: u32,
    b_bs: u32,
    c_off: u32,
    ldc: u32,
    c_bs: u32,
    alpha: f32,
    tiles_n: u32,
    tiles: u32,
    split_k: u32,
}

/// What gemm.wgsl's `finish` does after the sum: its override constants HAS_BIAS, ACCUMULATE
/// and EPILOGUE (constants, not params, so that an adapter running invocations as SIMD lanes
/// never pays for the code a dispatch does not use; see the shader).
#[derive(Clone, Copy, Default)]
struct Finish {
    bias: bool,
    accumulate: bool,
    /// `Epilogue::code`'s number.
    epilogue: u32,
}

impl Finish {
    fn constants(self) -> [(&'static str, f64); 3] {
        [
            ("HAS_BIAS", self.bias as u32 as f64),
            ("ACCUMULATE", self.accumulate as u32 as f64),
            ("EPILOGUE", self.epilogue as f64),
        ]
    }
}

/// The layout of `Params`, for the test that compares it with `Params` in the shader.
pub fn params_layout() -> super::ParamsLayout {
    super::params_layout!(Params {
        m,
        n,
        k,
        batch,
        a_off,
        lda,
        a_bs,
        b_off,
        ldb,
        b_bs,
        c_off,
        ldc,
        c_bs,
        alpha,
        tiles_n,
        tiles,
        split_k
    })
}

/// Which kernel computes a matmul.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Variant {
    /// One output per invocation, operands read straight from memory: the baseline.
    Naive,
    /// Workgroup-memory tiles and register blocks; the tile configuration is chosen per shape.
    Tiled,
}

/// A matrix operand inside a view: element (r, col) of batch entry z is at
/// `offset + z * batch_stride + r * ld + col` (elements, row-major).
#[derive(Clone, Copy)]
pub struct Operand<'a> {
    pub view: &'a View,
    /// Elements before the first one.
    pub offset: usize,
    /// Row stride in elements.
    pub ld: usize,
    /// Distance between batch entries in elements; 0 shares one matrix across the batch.
    pub batch_stride: usize,
}

impl<'a> Operand<'a> {
    /// The matrix at the start of `view` with row stride `ld`, shared across any batch.
    pub fn new(view: &'a View, ld: usize) -> Self {
        Operand {
            view,
            offset: 0,
            ld,
            batch_stride: 0,
        }
    }

    /// The same operand starting `offset` elements into its view.
    pub fn at(self, offset: usize) -> Self {
        Operand { offset, ..self }
    }

    /// The same operand with batch entries `batch_stride` elements apart.
    pub fn batched(self, batch_stride: usize) -> Self {
        Operand {
            batch_stride,
            ..self
        }
    }
}

/// What a matmul does last with each output value v = alpha · s (+ bias) (+ C), before storing it
/// in C: f32 training's fused layers. The tensor each holds is laid out as C's view (element e
/// of C pairs with element e of it), f32, in a buffer of its own.
#[derive(Clone, Copy, Debug, Default)]
pub enum Epilogue<'a> {
    #[default]
    None,
    /// C = gelu(v), and `pre` = v (the pre-activation, kept for the backward).
    Gelu { pre: &'a View },
    /// C = v · gelu'(pre): v is the gradient of gelu(pre), C receives pre's (the GELU backward
    /// folded into the matmul that produces its output's gradient). Overwrites C.
    GeluBackward { pre: &'a View },
    /// C = v + res: the residual add after a projection.
    Residual { res: &'a View },
}

impl<'a> Epilogue<'a> {
    /// The shader's code for it and the tensor it binds.
    fn code(self) -> (u32, Option<&'a View>) {
        match self {
            Epilogue::None => (0, None),
            Epilogue::Gelu { pre } => (1, Some(pre)),
            Epilogue::GeluBackward { pre } => (2, Some(pre)),
            Epilogue::Residual { res } => (3, Some(res)),
        }
    }
}

/// The shape and scalars of one (batched) matrix multiply.
#[derive(Clone, Copy, Debug)]
pub struct Matmul<'a> {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub batch: usize,
    /// A is stored (K, M) instead of (M, K).
    pub trans_a: bool,
    /// B is stored (N, K) instead of (K, N).
    pub trans_b: bool,
    pub alpha: f32,
    /// Add into C (+=) instead of overwriting it.
    pub accumulate: bool,
    /// Applied to every output value last (f32 B only).
    pub epilogue: Epilogue<'a>,
}

impl Matmul<'_> {
    /// C (M, N) = A (M, K) · B (K, N): one batch entry, no transposes, alpha 1, overwriting C.
    pub fn new(m: usize, n: usize, k: usize) -> Matmul<'static> {
        Matmul {
            m,
            n,
            k,
            batch: 1,
            trans_a: false,
            trans_b: false,
            alpha: 1.0,
            accumulate: false,
            epilogue: Epilogue::None,
        }
    }

    /// (rows, columns) of A and B as stored.
    fn stored(&self) -> ((usize, usize), (usize, usize)) {
        let a = if self.trans_a {
            (self.k, self.m)
        } else {
            (self.m, self.k)
        };
        let b = if self.trans_b {
            (self.n, self.k)
        } else {
            (self.k, self.n)
        };
        (a, b)
    }

    /// "NN", "NT", "TN" or "TT": whether A and B are transposed.
    fn ops(&self) -> &'static str {
        match (self.trans_a, self.trans_b) {
            (false, false) => "NN",
            (false, true) => "NT",
            (true, false) => "TN",
            (true, true) => "TT",
        }
    }
}

/// The shape of a linear layer: M rows of K input features to N output features.
pub use crate::reference::gemm::LinearDims;

/// The tensors of `linear_backward`: dinp (M, K) written when given, dw (N, K) and dbias (N) added
/// to (dbias when given); dout (M, N) and the forward's inp (M, K) and w (N, K) read.
#[derive(Clone, Copy, Debug)]
pub struct LinearBackwardTensors<'a> {
    pub dinp: Option<&'a View>,
    pub dw: &'a View,
    pub dbias: Option<&'a View>,
    pub dout: &'a View,
    pub inp: &'a View,
    pub w: &'a View,
}

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

    fn constants(&self) -> [(&'static str, f64); 5] {
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
    /// slower than gemm_ureg's written-out blocks on lavapipe in every layout (BENCHMARKS.md);
    /// its two configurations that had won there before stay for adapters not measured yet.
    /// gemm_ureg's bigger blocks read less per fma (16 × 16: 32 vec4 reads for 1024 fmas per k
    /// chunk, 8 × 4: 12 for 128) and ran 2-4x faster than 8 × 4 on lavapipe at the GPT shapes
    /// and at 1024^3; 8 × 8, 16 × 4 and 8 × 16 blocks never won there (BENCHMARKS.md), and the
    /// 8 × 4 ones stay for small products.
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

    fn constants(&self) -> [(&'static str, f64); 3] {
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
    fn slice(&self, k: usize) -> usize {
        k.div_ceil(self.splits as usize).next_multiple_of(4)
    }

    /// Whether split-K applies: one batch entry, and K long enough to give each slice 4 or more.
    fn applies(&self, mm: &Matmul) -> bool {
        mm.batch == 1 && mm.k >= 4 * self.splits as usize
    }
}

/// Which kernel (entry point and configuration) computes a matmul: what an autotuner chooses
/// among. `name` and `parse` give each a short, stable spelling.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kernel {
    /// One output per invocation: the correctness baseline.
    Naive,
    /// Few rows of A against B stored (N, K): matrix-vector products.
    Gemv,
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

    /// "naive", "gemv", "tiled128x128x8r2x2", "reg8x4w64", "ureg8x4w64",
    /// "splitk8reg8x4w16", "splitk8ureg8x4w16", "packedureg8x4w16".
    pub fn name(&self) -> String {
        match self {
            Kernel::Naive => "naive".to_string(),
            Kernel::Gemv => "gemv".to_string(),
            Kernel::Tiled(t) => format!("tiled{}x{}x{}r{}x{}", t.bm, t.bn, t.bk, t.rm, t.rn),
            Kernel::Reg(r) => r.name(),
            Kernel::SplitK(s) => format!("splitk{}{}", s.splits, s.reg.name()),
            Kernel::Packed(r) => format!("packed{}", r.name()),
        }
    }

    /// The kernel `name` spells, if its configuration is one the shader can run.
    pub fn parse(s: &str) -> Option<Kernel> {
        let kernel = match s {
            "naive" => Kernel::Naive,
            "gemv" => Kernel::Gemv,
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
            Kernel::Naive | Kernel::Gemv => true,
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

/// An operand's offset, row stride and batch stride as the shader sees them: the row stride of a
/// single row and the batch stride of a single entry are never used, so they are 0.
fn normalized(op: &Operand, rows: usize, batch: usize) -> (usize, usize, usize) {
    let ld = if rows == 1 { 0 } else { op.ld };
    let bs = if batch == 1 { 0 } else { op.batch_stride };
    (op.offset, ld, bs)
}

/// Checks that `batch` matrices of `rows` × `cols` (as stored) lie inside the operand's view, rows
/// apart by at least a row, with every index within the shader's 32-bit arithmetic, and that the
/// view holds f32 (or f16 where `f16_ok`). `role` names the operand ("a", "b", "c") in messages.
fn check_operand(
    kernel: &str,
    role: &str,
    op: &Operand,
    (rows, cols, batch): (usize, usize, usize),
    f16_ok: bool,
) -> Result<()> {
    let v = op.view;
    let shape = |expected: String, got: String| Error::Shape {
        kernel: kernel.to_string(),
        tensor: v.name.to_string(),
        expected,
        got,
    };
    let dtype_ok = v.dtype == DType::F32 || (f16_ok && v.dtype == DType::F16);
    if !dtype_ok {
        let want = if f16_ok { "f32 or f16" } else { "f32" };
        return Err(shape(
            format!("{want} elements (operand {role})"),
            format!("{} elements", v.dtype.name()),
        ));
    }
    let (offset, ld, bs) = normalized(op, rows, batch);
    if rows > 1 && ld < cols {
        return Err(shape(
            format!("a row stride of at least {cols} (operand {role}, {rows} x {cols} as stored)"),
            format!("row stride {ld}"),
        ));
    }
    // One past the last element the operand covers; u128 cannot overflow here.
    let end = offset as u128
        + (batch as u128 - 1) * bs as u128
        + (rows as u128 - 1) * ld as u128
        + cols as u128;
    if end > v.len as u128 {
        return Err(shape(
            format!(
                "at least {end} elements (operand {role}: {batch} x {rows} x {cols} as stored, \
                 offset {offset}, row stride {ld}, batch stride {bs})"
            ),
            format!("{} elements", v.len),
        ));
    }
    if end > u32::MAX as u128 {
        return Err(Error::invalid(
            kernel,
            format!(
                "tensor {}: operand {role} reaches element {end}, past 32-bit indexing",
                v.name
            ),
        ));
    }
    Ok(())
}

/// Batch entries of C must not overlap (they would race): each entry stacked after the previous
/// one, or entries side by side within one row stride.
fn check_disjoint(kernel: &str, c: &Operand, m: usize, n: usize, batch: usize) -> Result<()> {
    if batch == 1 {
        return Ok(());
    }
    let (_, ld, bs) = normalized(c, m, batch);
    let extent = (m as u128 - 1) * ld as u128 + n as u128;
    let stacked = bs as u128 >= extent;
    let side_by_side =
        bs >= n && m > 1 && (batch as u128 - 1) * bs as u128 + n as u128 <= ld as u128;
    if stacked || side_by_side {
        return Ok(());
    }
    Err(Error::Shape {
        kernel: kernel.to_string(),
        tensor: c.view.name.to_string(),
        expected: format!(
            "batch entries that do not overlap (operand c: batch stride at least {extent}, or \
             at least {n} with all {batch} entries within the row stride {ld})"
        ),
        got: format!("batch stride {bs}"),
    })
}

/// Whether the shader may read the operand as vec4: its view holds whole vec4s and every row
/// and batch entry starts at a multiple of 4, so every aligned vec4 it touches is in the view.
/// A vec4<f16> is 8 bytes, so an f16 view must also start at a multiple of 8 bytes (a device's
/// storage offset alignment may be as small as 4).
fn vec4_ok(op: &Operand, rows: usize, batch: usize) -> bool {
    let (offset, ld, bs) = normalized(op, rows, batch);
    let aligned = op.view.dtype != DType::F16 || op.view.offset.is_multiple_of(8);
    aligned
        && [op.view.len, offset, ld, bs]
            .iter()
            .all(|x| x.is_multiple_of(4))
}

fn u32_of(x: usize) -> u32 {
    // Every value passed here has been checked against 32-bit indexing.
    x as u32
}

/// The entry point that runs `kernel` on operands read as vec4 (`va`, `vb`) or not, with an f16
/// B or not (every entry point reads b through read_b / read_b4, so each has an f16 form).
fn entry(kernel: Kernel, va: bool, vb: bool, f16_b: bool) -> KernelSpec {
    let spec = match kernel {
        Kernel::Naive => NAIVE,
        Kernel::Gemv => GEMV,
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
fn unfit(gpu: &Gpu, mm: &Matmul, kernel: Kernel) -> Option<String> {
    if !kernel.valid() {
        return Some("not a configuration the shader can run".to_string());
    }
    let fits = match kernel {
        Kernel::Naive => true,
        Kernel::Gemv => Kernel::gemv_fits(mm),
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
        Kernel::Gemv => format!(
            "the matrix-vector kernel takes at most {GEMV_MAX_M} rows of an untransposed A \
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

/// Checks the shape, every operand and the bias of a matmul for the kernel named `name`.
fn check_matmul_args(
    gpu: &Gpu,
    name: &str,
    mm: &Matmul,
    (c, a, b): (&Operand, &Operand, &Operand),
    bias: Option<&View>,
) -> Result<()> {
    let Matmul { m, n, k, batch, .. } = *mm;
    expect_dims(name, &[("M", m), ("N", n), ("K", k), ("batch", batch)])?;
    let ((ar, ac), (br, bc)) = mm.stored();
    check_operand(name, "a", a, (ar, ac, batch), false)?;
    check_operand(name, "b", b, (br, bc, batch), true)?;
    check_operand(name, "c", c, (m, n, batch), false)?;
    expect_f16_support(gpu, name, b.view)?;
    check_disjoint(name, c, m, n, batch)?;
    let reads = [("a", a.view), ("b", b.view)]
        .into_iter()
        .chain(bias.map(|v| ("bias", v)));
    for (role, x) in reads {
        if x.buffer == c.view.buffer {
            return Err(Error::invalid(
                name,
                format!(
                    "tensor {} (operand c) shares a buffer with tensor {} (operand {role}); a \
                     dispatch cannot write a buffer it reads",
                    c.view.name, x.name
                ),
            ));
        }
    }
    if let Some(bias) = bias {
        expect(name, bias, DType::F32, n)?;
    }
    check_epilogue(name, mm, c, [a.view, b.view].into_iter().chain(bias))
}

/// The epilogue's tensor: laid out as C's view, f32, apart from every operand the dispatch
/// reads; GELU forms overwrite C, and an f16 B has no epilogue.
fn check_epilogue<'v>(
    name: &str,
    mm: &Matmul,
    c: &Operand<'v>,
    reads: impl Iterator<Item = &'v View>,
) -> Result<()> {
    let (_, Some(aux)) = mm.epilogue.code() else {
        return Ok(());
    };
    expect(name, aux, DType::F32, c.view.len)?;
    let gelu = matches!(
        mm.epilogue,
        Epilogue::Gelu { .. } | Epilogue::GeluBackward { .. }
    );
    if gelu && mm.accumulate {
        return Err(Error::invalid(
            name,
            "a GELU epilogue overwrites C; it cannot accumulate",
        ));
    }
    for x in reads.chain([c.view]) {
        if x.dtype == DType::F16 {
            return Err(Error::invalid(
                name,
                format!("no epilogue with an f16 operand ({})", x.name),
            ));
        }
        if x.buffer == aux.buffer {
            return Err(Error::invalid(
                name,
                format!(
                    "the epilogue's tensor {} shares a buffer with operand {}",
                    aux.name, x.name
                ),
            ));
        }
    }
    Ok(())
}

/// Output rows and columns of one workgroup of `kernel`.
fn block(kernel: Kernel) -> (usize, usize) {
    match kernel {
        Kernel::Naive => (NAIVE_WG, NAIVE_WG),
        Kernel::Gemv => (GEMV_MAX_M, GEMV_COLS),
        Kernel::Tiled(t) => (t.bm as usize, t.bn as usize),
        Kernel::Reg(r) | Kernel::SplitK(SplitK { reg: r, .. }) | Kernel::Packed(r) => {
            (r.rm as usize, r.cols() as usize)
        }
    }
}

/// The workgroup grid over `tiles` tiles and `batch` entries, within the per-dimension limit.
fn tile_grid(gpu: &Gpu, name: &str, tiles: usize, batch: usize) -> Result<[u32; 3]> {
    let max = gpu.limits.max_compute_workgroups_per_dimension;
    if tiles > max as usize * max as usize {
        return Err(Error::invalid(
            name,
            format!("{tiles} output tiles exceed the {max} x {max} workgroup grid"),
        ));
    }
    let mut workgroups = grid(tiles as u32, max);
    workgroups[2] = (batch as u32).min(max);
    Ok(workgroups)
}

/// `matmul` with the given kernel: an error naming the kernel when it cannot compute this
/// problem (see `candidates`). Split-K gives two dispatches, every other kernel one.
pub fn matmul_with(
    gpu: &Gpu,
    mm: &Matmul,
    c: Operand,
    a: Operand,
    b: Operand,
    bias: Option<&View>,
    kernel: Kernel,
) -> Result<Vec<Dispatch>> {
    let name = format!("gemm.{}", kernel.name());
    let f16_b = b.view.dtype == DType::F16;
    if let Some(why) = unfit(gpu, mm, kernel) {
        return Err(Error::invalid(&name, why));
    }
    check_matmul_args(gpu, &name, mm, (&c, &a, &b), bias)?;
    let batch = mm.batch;
    let ((ar, _), (br, _)) = mm.stored();
    let (va, vb) = (vec4_ok(&a, ar, batch), vec4_ok(&b, br, batch));
    let spec = entry(kernel, va, vb, f16_b);
    let mut constants = kernel_constants(mm, kernel);
    let params = launch_params(mm, kernel, (&c, &a, &b));
    let finish = Finish {
        bias: bias.is_some(),
        accumulate: mm.accumulate,
        epilogue: mm.epilogue.code().0,
    };
    // Without a bias or an epilogue the bindings still need buffers; the shader never reads
    // them. The epilogue's read-write binding gets a spare word of its own: WebGPU refuses two
    // writable bindings of one dispatch over the same bytes (C standing in for it).
    let bias_view = bias.unwrap_or(b.view);
    let spare;
    let aux = match mm.epilogue.code().1 {
        Some(v) => v,
        None => {
            spare = gpu.shared_scratch("gemm.no_epilogue", DType::F32, 1)?;
            &spare
        }
    };
    if let Kernel::SplitK(s) = kernel {
        let views = [a.view, b.view, bias_view, c.view, aux];
        return split_k(gpu, &name, s, (&spec, &constants), (params, finish), views);
    }
    if let Kernel::Packed(_) = kernel {
        constants[1].1 = 1.0;
        let views = [a.view, b.view, c.view];
        return packed_b(
            gpu,
            &name,
            (&spec, &constants),
            (params, finish),
            views,
            [bias, mm.epilogue.code().1],
        );
    }

    let cost = direct_cost(mm, &params, b.view.dtype, bias.is_some());
    let workgroups = tile_grid(gpu, &name, params.tiles as usize, mm.batch)?;
    constants.extend(finish.constants());
    Ok(vec![gpu.dispatch(
        &spec,
        &constants,
        bytes_of(&params),
        &[a.view, b.view, bias_view, c.view, aux],
        workgroups,
        cost,
    )?])
}

/// The override constants of `kernel` for `mm`'s transposes (before `Finish`'s).
fn kernel_constants(mm: &Matmul, kernel: Kernel) -> Vec<(&'static str, f64)> {
    let mut constants = vec![
        ("TRANS_A", mm.trans_a as u32 as f64),
        ("TRANS_B", mm.trans_b as u32 as f64),
    ];
    match kernel {
        Kernel::Naive => {}
        Kernel::Gemv => constants.push(("GEMV_COLS", GEMV_COLS as f64)),
        Kernel::Tiled(t) => constants.extend(t.constants()),
        Kernel::Reg(r) | Kernel::SplitK(SplitK { reg: r, .. }) | Kernel::Packed(r) => {
            constants.extend(r.constants())
        }
    }
    constants
}

/// The params of one GEMM dispatch: `mm`'s dimensions, the operands' normalized offsets and
/// strides, and the output tiles of `kernel`'s block (split-K's slice count left at 0).
fn launch_params(mm: &Matmul, kernel: Kernel, (c, a, b): (&Operand, &Operand, &Operand)) -> Params {
    let Matmul { m, n, k, batch, .. } = *mm;
    let ((ar, _), (br, _)) = mm.stored();
    let (bm, bn) = block(kernel);
    let tiles_n = n.div_ceil(bn);
    let tiles = m.div_ceil(bm) * tiles_n;
    let (a_off, lda, a_bs) = normalized(a, ar, batch);
    let (b_off, ldb, b_bs) = normalized(b, br, batch);
    let (c_off, ldc, c_bs) = normalized(c, m, batch);
    Params {
        m: u32_of(m),
        n: u32_of(n),
        k: u32_of(k),
        batch: u32_of(batch),
        a_off: u32_of(a_off),
        lda: u32_of(lda),
        a_bs: u32_of(a_bs),
        b_off: u32_of(b_off),
        ldb: u32_of(ldb),
        b_bs: u32_of(b_bs),
        c_off: u32_of(c_off),
        ldc: u32_of(ldc),
        c_bs: u32_of(c_bs),
        alpha: mm.alpha,
        tiles_n: u32_of(tiles_n),
        tiles: u32_of(tiles),
        split_k: 0,
    }
}

/// What one direct GEMM dispatch computes and moves: A and B once per batch entry they differ
/// in (a zero batch stride is shared), C written (and read when accumulating), the bias.
fn direct_cost(mm: &Matmul, params: &Params, b_dtype: DType, bias: bool) -> Cost {
    let Matmul { m, n, k, batch, .. } = *mm;
    let entries = |ops: u64, bs: u32| if bs == 0 { ops } else { ops * batch as u64 };
    let (m64, n64, k64) = (m as u64, n as u64, k as u64);
    let c_traffic = if mm.accumulate { 2 } else { 1 };
    Cost {
        flops: 2 * m64 * n64 * k64 * batch as u64,
        bytes: 4
            * (entries(m64 * k64, params.a_bs)
                + c_traffic * m64 * n64 * batch as u64
                + if bias { n64 } else { 0 })
            + b_dtype.size() * entries(k64 * n64, params.b_bs),
    }
}

/// Split-K's two dispatches: `spec` (gemm_reg with `constants`) writes the partial products of
/// each K slice to a scratch buffer ((slices, M, N), shared by every split-K of this size), then
/// gemm_splitk_reduce adds them in slice order and applies alpha (from `params`, the whole
/// product's), then bias, accumulate and the epilogue as `finish` asks. `views` are the GEMM bindings: A's,
/// B's, the bias's, C's and the epilogue's views.
fn split_k(
    gpu: &Gpu,
    name: &str,
    s: SplitK,
    (spec, constants): (&KernelSpec, &[(&'static str, f64)]),
    (params, finish): (Params, Finish),
    [a, b, bias, c, aux]: [&View; 5],
) -> Result<Vec<Dispatch>> {
    let (m, n, k) = (params.m as usize, params.n as usize, params.k as usize);
    let slice = s.slice(k);
    let slices = k.div_ceil(slice);
    let len = slices * m * n;
    if len > u32::MAX as usize {
        return Err(Error::invalid(
            name,
            format!("{slices} partial products of {m} x {n} exceed 32-bit indexing"),
        ));
    }
    let partials = gpu.shared_scratch("gemm.splitk.partials", DType::F32, len)?;
    let partial_params = Params {
        batch: u32_of(slices),
        c_off: 0,
        ldc: u32_of(n),
        c_bs: u32_of(m * n),
        alpha: 1.0,
        split_k: u32_of(slice),
        ..params
    };
    // The partials are plain sums; the reduce applies what `finish` asks.
    let partial_constants = [constants, &Finish::default().constants()].concat();
    let (m64, n64, k64, s64) = (m as u64, n as u64, k as u64, slices as u64);
    let partial = gpu.dispatch(
        spec,
        &partial_constants,
        bytes_of(&partial_params),
        &[a, b, b, &partials, &partials],
        tile_grid(gpu, name, params.tiles as usize, slices)?,
        Cost {
            flops: 2 * m64 * n64 * k64,
            bytes: 4 * (m64 * k64 + s64 * m64 * n64) + b.dtype.size() * k64 * n64,
        },
    )?;
    let blocks = (m * n).div_ceil(SPLITK_REDUCE_WG);
    let reduce_params = Params {
        batch: u32_of(slices),
        a_off: 0,
        a_bs: u32_of(m * n),
        tiles: u32_of(blocks),
        split_k: 0,
        ..params
    };
    let c_traffic = 1 + finish.accumulate as u64;
    let reduce = gpu.dispatch(
        &SPLITK_REDUCE,
        &finish.constants(),
        bytes_of(&reduce_params),
        &[&partials, b, bias, c, aux],
        tile_grid(gpu, name, blocks, 1)?,
        Cost {
            flops: s64 * m64 * n64,
            bytes: 4 * (s64 + c_traffic) * m64 * n64,
        },
    )?;
    Ok(vec![partial, reduce])
}

/// The packed-B kernel's two dispatches: gemm_pack_b writes bᵀ (N, KP), KP = K rounded up to a
/// multiple of 4, to a scratch buffer (shared by every packed GEMM of this size, f32 whatever B's
/// type), then `spec` (gemm_ureg_vb, or gemm_ureg_vab where A reads as vec4) with `constants`
/// (TRANS_B set) computes what `params` asks on it.
fn packed_b(
    gpu: &Gpu,
    name: &str,
    (spec, constants): (&KernelSpec, &[(&'static str, f64)]),
    (params, finish): (Params, Finish),
    [a, b, c]: [&View; 3],
    [bias, aux]: [Option<&View>; 2],
) -> Result<Vec<Dispatch>> {
    let (n, k) = (params.n as usize, params.k as usize);
    let kp = k.next_multiple_of(4);
    let len = n * kp;
    if len > u32::MAX as usize {
        return Err(Error::invalid(
            name,
            format!("B's transpose, {n} x {kp}, exceeds 32-bit indexing"),
        ));
    }
    let packed = gpu.shared_scratch("gemm.packed_b", DType::F32, len)?;
    // The shader strides over the outputs, so the grid may stop at the adapter's limit.
    let max = gpu.limits.max_compute_workgroups_per_dimension as usize;
    let blocks = len.div_ceil(PACK_B_WG).min(max * max);
    let pack_spec = if b.dtype == DType::F16 {
        PACK_B.with_variant(ShaderVariant::F16)
    } else {
        PACK_B
    };
    let pack = gpu.dispatch(
        &pack_spec,
        &[],
        bytes_of(&Params {
            ldc: u32_of(kp),
            ..params
        }),
        &[a, b, b, &packed, &packed],
        tile_grid(gpu, name, blocks, 1)?,
        Cost {
            flops: 0,
            bytes: (b.dtype.size() + 4) * (n * k) as u64,
        },
    )?;
    let (m64, n64, k64) = (params.m as u64, n as u64, k as u64);
    let c_traffic = 1 + finish.accumulate as u64;
    let product = gpu.dispatch(
        spec,
        &[constants, &finish.constants()].concat(),
        bytes_of(&Params {
            b_off: 0,
            ldb: u32_of(kp),
            b_bs: 0,
            ..params
        }),
        &[a, &packed, bias.unwrap_or(&packed), c, aux.unwrap_or(c)],
        tile_grid(gpu, name, params.tiles as usize, 1)?,
        Cost {
            flops: 2 * m64 * n64 * k64,
            bytes: 4 * (m64 * k64 + n64 * k64 + c_traffic * m64 * n64 + bias.map_or(0, |_| n64)),
        },
    )?;
    Ok(vec![pack, product])
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
    use super::tune::bucket;
    bucket(mm.m) * bucket(mm.n) * bucket(mm.k) * bucket(mm.batch)
}

/// Every kernel that can compute `mm` with these operands on `gpu`, the naive baseline first:
/// what an autotuner times. Each applies to any placement of the operands that `matmul`
/// accepts (vec4 reads are chosen per operand at launch).
pub fn candidates(gpu: &Gpu, mm: &Matmul, a: &Operand, b: &Operand) -> Vec<Kernel> {
    let _ = (a, b);
    let all = [Kernel::Naive, Kernel::Gemv]
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
        );
    all.filter(|&k| unfit(gpu, mm, k).is_none())
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

/// The kernel `matmul` runs for `Variant::Tiled`: the matrix-vector kernel where it applies,
/// otherwise the tile configuration `Tile::choose` picks for the adapter's kind.
pub fn fixed_rule(gpu: &Gpu, mm: &Matmul) -> Kernel {
    if Kernel::gemv_fits(mm) {
        Kernel::Gemv
    } else {
        Kernel::Tiled(Tile::choose(mm, fill_workgroups(gpu)))
    }
}

/// C[z] (M, N) = alpha · op(A[z]) · op(B[z]) (+ bias (N) broadcast over rows) (+ C[z] when
/// `mm.accumulate`), for z in 0..batch. op(A) is (M, K): A stored (M, K) row-major with row
/// stride `a.ld`, or (K, M) when `mm.trans_a`. Same for B: (K, N), or (N, K) when `mm.trans_b`.
/// Overwrites C (never reading it) unless `mm.accumulate`. Each operand must lie inside its view;
/// C must not share a buffer with A or B, and its batch entries must not overlap.
/// A, C and bias are f32; B is f32, or f16 (weights for inference: the lm head's tied wte chunk)
/// when the adapter has SHADER_F16, widened to f32 on load.
/// The dispatches run in order (a kernel may need more than one).
pub fn matmul(
    gpu: &Gpu,
    mm: &Matmul,
    c: Operand,
    a: Operand,
    b: Operand,
    bias: Option<&View>,
    variant: Variant,
) -> Result<Vec<Dispatch>> {
    let kernel = match variant {
        Variant::Naive => Kernel::Naive,
        Variant::Tiled => tuned(gpu, mm, &c, &a, &b)?,
    };
    matmul_with(gpu, mm, c, a, b, bias, kernel)
}

/// The measured kernel for `mm` on these operands (see `kernels::tune`). Problems share a
/// measurement when their transposes, bucketed dimensions and batch, vec4 eligibility and B's
/// element type agree; the measurement runs on fresh tensors laid out like the real operands.
fn tuned(gpu: &Gpu, mm: &Matmul, c: &Operand, a: &Operand, b: &Operand) -> Result<Kernel> {
    use super::tune::{self, Trial};
    let rule = fixed_rule(gpu, mm);
    let problem = tune_problem(gpu, mm, a, b, rule);
    let Matmul { m, n, batch, .. } = *mm;
    let ((ar, ac), (br, bc)) = mm.stored();
    let mut inputs: Option<[View; 3]> = None;
    // The plain product: every kernel applies an epilogue the same way, in `finish`.
    let trial_mm = Matmul {
        accumulate: false,
        epilogue: Epilogue::None,
        ..*mm
    };
    let name = tune::choose(gpu, &problem, &mut |name| {
        let kernel = Kernel::parse(name)
            .ok_or_else(|| Error::invalid("gemm tuning", format!("unknown kernel '{name}'")))?;
        if inputs.is_none() {
            let mut rng = Rng::new(0x7e57);
            inputs = Some([
                trial_tensor(gpu, "tune.a", a, (ar, ac, batch), &mut rng)?,
                trial_tensor(gpu, "tune.b", b, (br, bc, batch), &mut rng)?,
                trial_tensor(gpu, "tune.c", c, (m, n, batch), &mut rng)?,
            ]);
        }
        let [ta, tb, tc] = inputs.as_ref().expect("set above");
        let dispatches = matmul_with(
            gpu,
            &trial_mm,
            trial_operand(tc, c, m, batch),
            trial_operand(ta, a, ar, batch),
            trial_operand(tb, b, br, batch),
            None,
            kernel,
        )?;
        Ok(Trial {
            dispatches,
            output: tc.clone(),
        })
    })?;
    Ok(Kernel::parse(&name).unwrap_or(rule))
}

/// The tuning problem of `mm` on these operands: its bucket, its shape, and the candidates with
/// the fixed rule's kernel first (naive where the rule cannot run this problem).
fn tune_problem(
    gpu: &Gpu,
    mm: &Matmul,
    a: &Operand,
    b: &Operand,
    rule: Kernel,
) -> super::tune::Problem {
    use super::tune::{Problem, bucket};
    let kernels = candidates(gpu, mm, a, b);
    let baseline = if kernels.contains(&rule) {
        rule
    } else {
        Kernel::Naive
    };
    let Matmul { m, n, k, batch, .. } = *mm;
    let ((ar, _), (br, _)) = mm.stored();
    let (va, vb) = (vec4_ok(a, ar, batch), vec4_ok(b, br, batch));
    let vec = |ok: bool| if ok { "v" } else { "s" };
    let (atol, rtol) = tolerance(k);
    Problem {
        family: FAMILY.name,
        bucket: format!(
            "{} m{} n{} k{}{} {}{} {}",
            mm.ops(),
            bucket(m),
            bucket(n),
            bucket(k),
            if batch > 1 {
                format!(" x{}", bucket(batch))
            } else {
                String::new()
            },
            vec(va),
            vec(vb),
            b.view.dtype.name()
        ),
        shape: format!(
            "{} {m}x{k}x{n}{}",
            mm.ops(),
            if batch > 1 {
                format!(" x{batch}")
            } else {
                String::new()
            }
        ),
        // The fixed rule's kernel first (naive where the rule cannot run this problem): the
        // baseline the others are checked against.
        candidates: std::iter::once(baseline)
            .chain(kernels.iter().copied().filter(|&k| k != baseline))
            .map(|k| k.name())
            .collect(),
        rule: rule.name(),
        // Inputs in [-1, 1]: sums of k products, as the kernels' own checks.
        atol,
        rtol,
    }
}

/// A fresh tensor with the same row and batch strides as `op`, and the same vec4 eligibility
/// (it starts one element in when `op` cannot be read as vec4), filled with values in [-1, 1].
fn trial_tensor(
    gpu: &Gpu,
    name: &str,
    op: &Operand,
    (rows, cols, batch): (usize, usize, usize),
    rng: &mut Rng,
) -> Result<View> {
    let (_, ld, bs) = normalized(op, rows, batch);
    let start = if vec4_ok(op, rows, batch) { 0 } else { 1 };
    let extent = (batch - 1) * bs + (rows - 1) * ld + cols;
    let len = (start + extent).next_multiple_of(4);
    let data = rng.vec_uniform(len, -1.0, 1.0);
    if op.view.dtype == DType::F16 {
        let (h, _) = round_f16(&data);
        gpu.upload(name, DType::F16, &h)
    } else {
        gpu.upload_f32(name, &data)
    }
}

/// `op`'s layout on a trial tensor made by `trial_tensor`.
fn trial_operand<'a>(view: &'a View, op: &Operand, rows: usize, batch: usize) -> Operand<'a> {
    let (_, ld, bs) = normalized(op, rows, batch);
    let start = if vec4_ok(op, rows, batch) { 0 } else { 1 };
    Operand {
        view,
        offset: start,
        ld,
        batch_stride: bs,
    }
}

/// out (M, N) = inp (M, K) · w (N, K)ᵀ + bias (N). Overwrites `out`. inp, bias and out are f32;
/// w is f32, or f16 when the adapter has SHADER_F16 (widened to f32 on load, f32 sums).
pub fn linear_forward(
    gpu: &Gpu,
    out: &View,
    inp: &View,
    w: &View,
    bias: Option<&View>,
    dims: LinearDims,
) -> Result<Vec<Dispatch>> {
    let LinearDims { m, k, n } = dims;
    let name = "gemm.linear_forward";
    expect_dims(name, &[("M", m), ("K", k), ("N", n)])?;
    expect(name, inp, DType::F32, m * k)?;
    let w_dtype = if w.dtype == DType::F16 {
        DType::F16
    } else {
        DType::F32
    };
    expect(name, w, w_dtype, n * k)?;
    expect(name, out, DType::F32, m * n)?;
    let mm = Matmul {
        trans_b: true,
        ..Matmul::new(m, n, k)
    };
    matmul(
        gpu,
        &mm,
        Operand::new(out, n),
        Operand::new(inp, k),
        Operand::new(w, k),
        bias,
        Variant::Tiled,
    )
}

/// The backward pass of `linear_forward`, as up to three dispatches:
/// dinp (M, K) = dout (M, N) · w (N, K), overwriting, or accumulating (+=) when `accumulate_dinp`
/// (skipped when `dinp` is None); dw (N, K) += dout (M, N)ᵀ · inp (M, K), accumulating;
/// dbias (N) += Σ_rows dout, accumulating (skipped when `dbias` is None).
pub fn linear_backward(
    gpu: &Gpu,
    tensors: LinearBackwardTensors,
    dims: LinearDims,
    accumulate_dinp: bool,
) -> Result<Vec<Dispatch>> {
    let LinearBackwardTensors {
        dinp,
        dw,
        dbias,
        dout,
        inp,
        w,
    } = tensors;
    let LinearDims { m, k, n } = dims;
    let name = "gemm.linear_backward";
    expect_dims(name, &[("M", m), ("K", k), ("N", n)])?;
    expect(name, dout, DType::F32, m * n)?;
    expect(name, inp, DType::F32, m * k)?;
    expect(name, w, DType::F32, n * k)?;
    expect(name, dw, DType::F32, n * k)?;
    if let Some(dinp) = dinp {
        expect(name, dinp, DType::F32, m * k)?;
    }
    let mut out = Vec::with_capacity(3);
    if let Some(dinp) = dinp {
        let mm = Matmul {
            accumulate: accumulate_dinp,
            ..Matmul::new(m, k, n)
        };
        out.extend(matmul(
            gpu,
            &mm,
            Operand::new(dinp, k),
            Operand::new(dout, n),
            Operand::new(w, k),
            None,
            Variant::Tiled,
        )?);
    }
    let mm = Matmul {
        trans_a: true,
        accumulate: true,
        ..Matmul::new(n, k, m)
    };
    out.extend(matmul(
        gpu,
        &mm,
        Operand::new(dw, k),
        Operand::new(dout, n),
        Operand::new(inp, k),
        None,
        Variant::Tiled,
    )?);
    if let Some(dbias) = dbias {
        out.push(bias_backward(gpu, dbias, dout, m, n)?);
    }
    Ok(out)
}

/// dbias (N) += Σ_m dout (M, N), accumulating; every column is summed in a fixed order.
pub fn bias_backward(gpu: &Gpu, dbias: &View, dout: &View, m: usize, n: usize) -> Result<Dispatch> {
    let name = BIAS_BACKWARD.name();
    expect_dims(&name, &[("M", m), ("N", n)])?;
    expect(&name, dout, DType::F32, m * n)?;
    expect(&name, dbias, DType::F32, n)?;
    if m * n > u32::MAX as usize {
        return Err(Error::invalid(
            &name,
            format!(
                "tensor {}: {m} x {n} elements exceed 32-bit indexing",
                dout.name
            ),
        ));
    }
    let blocks = n.div_ceil(BIAS_COLS);
    let params = Params {
        m: u32_of(m),
        n: u32_of(n),
        tiles: u32_of(blocks),
        ..Params::default()
    };
    let cost = Cost {
        flops: (m * n) as u64,
        bytes: 4 * (m * n + 2 * n) as u64,
    };
    let workgroups = grid(
        u32_of(blocks),
        gpu.limits.max_compute_workgroups_per_dimension,
    );
    gpu.dispatch(
        &BIAS_BACKWARD,
        &[],
        bytes_of(&params),
        &[dout, dbias],
        workgroups,
        cost,
    )
}

pub const FAMILY: Family = Family {
    name: "gemm",
    about: "C = alpha·op(A)·op(B) (+bias) (+C), batched and strided; linear forward/backward",
    shape_help: "MxKxN",
    default_shapes: &[
        &[1, 1, 1],
        &[3, 5, 7],
        &[1, 129, 3],
        &[45, 65, 127],
        &[127, 129, 65],
        &[129, 127, 45],
        &[64, 64, 64],
        &[67, 33, 259],
        &[7, 300, 77],
    ],
    bench_shape: &[1024, 1024, 1024],
    check,
    bench,
};

/// Tolerance for sums of `terms` products of values in [-1, 1] in f32 against an f64 reference:
/// atol 1e-5 up to 256 terms, then growing linearly with the length of the sum (as the worst-case
/// rounding error of a sequential f32 sum does); rtol 1e-4.
fn tolerance(terms: usize) -> (f64, f64) {
    (1e-5 * (terms as f64 / 256.0).max(1.0), 1e-4)
}

fn check(gpu: &Gpu, shape: &[usize]) -> Result<Vec<CheckReport>> {
    let [m, k, n] = harness::dims::<3>("gemm", shape)?;
    let mut reports = check_linear(gpu, m, k, n)?;
    reports.extend(check_epilogues(gpu, m, k, n)?);
    // Each operand read as vec4 ('v') or as scalars ('s'); over the four transpose combinations
    // these cover all four tiled entry points and every load path of A and B.
    for (i, (trans_a, trans_b)) in [(false, false), (false, true), (true, false), (true, true)]
        .into_iter()
        .enumerate()
    {
        let layouts = if i % 2 == 0 {
            [(true, true), (false, false)]
        } else {
            [(true, false), (false, true)]
        };
        for (vec_a, vec_b) in layouts {
            let mm = Matmul {
                batch: 2,
                trans_a,
                trans_b,
                ..Matmul::new(m, n, k)
            };
            reports.extend(check_matmul(gpu, mm, vec_a, vec_b, false, false)?);
            // Split-K and packed B take one batch entry: the same layouts unbatched.
            let one = Matmul { batch: 1, ..mm };
            reports.extend(check_matmul(gpu, one, vec_a, vec_b, false, true)?);
        }
    }
    if gpu.has_f16() {
        // f16 B (the weight): NT as in linear_forward and the lm head, with every combination of
        // vec4 and scalar loads (all four tiled entry points, both NT load paths of B, the lm-head
        // column block of C at an odd offset); NN for the other two load paths of B.
        let f16_layouts = [
            (true, (false, false)),
            (true, (false, true)),
            (true, (true, false)),
            (true, (true, true)),
            (false, (false, false)),
            (false, (true, true)),
        ];
        for (trans_b, (vec_a, vec_b)) in f16_layouts {
            let mm = Matmul {
                batch: 2,
                trans_b,
                ..Matmul::new(m, n, k)
            };
            reports.extend(check_matmul(gpu, mm, vec_a, vec_b, true, false)?);
            if !trans_b {
                // Packed B transposes the f16 weight into f32: unbatched.
                let one = Matmul { batch: 1, ..mm };
                reports.extend(check_matmul(gpu, one, vec_a, vec_b, true, true)?);
            }
        }
    }
    if m <= GEMV_MAX_M {
        // Decoding's matrix-vector products: NT with one batch entry, f32 and f16 weights.
        let mm = Matmul {
            trans_b: true,
            ..Matmul::new(m, n, k)
        };
        reports.extend(check_matmul(gpu, mm, false, false, false, false)?);
        if gpu.has_f16() {
            reports.extend(check_matmul(gpu, mm, true, true, true, false)?);
        }
    }
    Ok(reports)
}

/// Every epilogue after a linear layer's product (out (M, N) = inp (M, K) · w (N, K)ᵀ + bias)
/// against the reference composed of the unfused ops, on the kernel training runs and on split-K
/// where it applies (it applies the epilogue in its reduce pass).
fn check_epilogues(gpu: &Gpu, m: usize, k: usize, n: usize) -> Result<Vec<CheckReport>> {
    let dims = LinearDims { m, k, n };
    let mut rng = Rng::new((m * 7919 + k * 104_729 + n) as u64);
    let inp = rng.vec_uniform(m * k, -1.0, 1.0);
    let w = rng.vec_uniform(n * k, -1.0, 1.0);
    let bias = rng.vec_uniform(n, -1.0, 1.0);
    let other = rng.vec_uniform(m * n, -2.0, 2.0);
    let (g_inp, g_w) = (gpu.upload_f32("inp", &inp)?, gpu.upload_f32("w", &w)?);
    let g_bias = gpu.upload_f32("bias", &bias)?;
    let mm = Matmul {
        trans_b: true,
        ..Matmul::new(m, n, k)
    };
    let (a, b) = (Operand::new(&g_inp, k), Operand::new(&g_w, k));

    // The unfused value v and what each epilogue makes of it.
    let mut v = vec![0.0f64; m * n];
    reference::gemm::linear_forward(&mut v, &f64s(&inp), &f64s(&w), Some(&f64s(&bias)), dims);
    let other64 = f64s(&other);
    let mut gelu = vec![0.0; m * n];
    reference::gelu::forward(&mut gelu, &v);
    let mut gelu_back = vec![0.0; m * n];
    reference::gelu::backward(&mut gelu_back, &other64, &v);
    let residual: Vec<f64> = v.iter().zip(&other64).map(|(x, r)| x + r).collect();

    let split = candidates(gpu, &mm, &a, &b)
        .into_iter()
        .find(|kern| matches!(kern, Kernel::SplitK(_)));
    let kernels = [Some(fixed_rule(gpu, &mm)), split].into_iter().flatten();
    let s = format!("{m}x{k}x{n}");
    let (atol, rtol) = tolerance(k);
    let mut reports = Vec::new();
    for kernel in kernels {
        let aux = gpu.upload_f32("aux", &other)?;
        let cases = [
            ("gelu", Epilogue::Gelu { pre: &aux }, &gelu),
            (
                "gelu_backward",
                Epilogue::GeluBackward { pre: &aux },
                &gelu_back,
            ),
            ("residual", Epilogue::Residual { res: &aux }, &residual),
        ];
        for (what, epilogue, want) in cases {
            gpu.write(&aux, &other)?;
            let out = gpu.upload_f32("out", &garbage(&mut rng, m * n))?;
            let fused = Matmul { epilogue, ..mm };
            let c = Operand::new(&out, n);
            gpu.run(&matmul_with(gpu, &fused, c, a, b, Some(&g_bias), kernel)?)?;
            let what = format!("{} epilogue {what}", kernel.name());
            let got = gpu.read_f32(&out)?;
            reports.push(CheckReport::new(&s, &what, &got, want, atol, rtol));
            if what.ends_with("epilogue gelu") {
                let pre = gpu.read_f32(&aux)?;
                let what = format!("{what}: pre-activation");
                reports.push(CheckReport::new(&s, &what, &pre, &v, atol, rtol));
            }
        }
    }
    Ok(reports)
}

/// Values in [100, 200): reading them where a kernel should only write shows up at once.
fn garbage(rng: &mut Rng, len: usize) -> Vec<f32> {
    rng.vec_uniform(len, 100.0, 200.0)
}

fn f64s(x: &[f32]) -> Vec<f64> {
    reference::convert(x)
}

/// check_linear's inputs: the operands of the forward and backward, and the prior contents of
/// every output (garbage where the kernel overwrites, values where it accumulates).
struct LinearInputs {
    inp: Vec<f32>,       // (M, K)
    w: Vec<f32>,         // (N, K)
    bias: Vec<f32>,      // (N)
    dout: Vec<f32>,      // (M, N)
    out0: Vec<f32>,      // (M, N)
    dinp0: Vec<f32>,     // (M, K)
    dinp_acc0: Vec<f32>, // (M, K)
    dw0: Vec<f32>,       // (N, K)
    dbias0: Vec<f32>,    // (N)
}

fn linear_inputs(LinearDims { m, k, n }: LinearDims) -> LinearInputs {
    let mut rng = Rng::new((m * 1_000_003 + k * 1009 + n) as u64);
    LinearInputs {
        inp: rng.vec_uniform(m * k, -1.0, 1.0),
        w: rng.vec_uniform(n * k, -1.0, 1.0),
        bias: rng.vec_uniform(n, -1.0, 1.0),
        dout: rng.vec_uniform(m * n, -1.0, 1.0),
        out0: garbage(&mut rng, m * n),
        dinp0: garbage(&mut rng, m * k),
        dinp_acc0: rng.vec_uniform(m * k, -1.0, 1.0),
        dw0: rng.vec_uniform(n * k, -1.0, 1.0),
        dbias0: rng.vec_uniform(n, -1.0, 1.0),
    }
}

/// check_linear's outputs, on the GPU or from the reference: the forward (and the forward with
/// an f16 w), the backward overwriting dinp with dbias, and the backward accumulating into dinp
/// without dbias.
struct LinearOutputs<T> {
    out: T,
    out16: Option<T>,
    dinp: T,
    dw: T,
    dbias: T,
    dinp_acc: T,
    dw2: T,
}

/// Runs linear_forward (also with w in f16, where the adapter has it) and both linear_backward
/// modes, all in one submission.
fn run_linear(gpu: &Gpu, x: &LinearInputs, dims: LinearDims) -> Result<LinearOutputs<View>> {
    let g_inp = gpu.upload_f32("inp", &x.inp)?;
    let g_w = gpu.upload_f32("w", &x.w)?;
    let g_bias = gpu.upload_f32("bias", &x.bias)?;
    let g_dout = gpu.upload_f32("dout", &x.dout)?;
    let g_out = gpu.upload_f32("out", &x.out0)?;
    let g_dinp = gpu.upload_f32("dinp", &x.dinp0)?;
    let g_dinp_acc = gpu.upload_f32("dinp_acc", &x.dinp_acc0)?;
    let g_dw = gpu.upload_f32("dw", &x.dw0)?;
    let g_dw2 = gpu.upload_f32("dw2", &x.dw0)?;
    let g_dbias = gpu.upload_f32("dbias", &x.dbias0)?;
    let mut dispatches = linear_forward(gpu, &g_out, &g_inp, &g_w, Some(&g_bias), dims)?;
    let out16 = if gpu.has_f16() {
        let (w16, _) = round_f16(&x.w);
        let g_w16 = gpu.upload("w16", DType::F16, &w16)?;
        let g_out16 = gpu.upload_f32("out16", &x.out0)?;
        dispatches.extend(linear_forward(
            gpu,
            &g_out16,
            &g_inp,
            &g_w16,
            Some(&g_bias),
            dims,
        )?);
        Some(g_out16)
    } else {
        None
    };
    let backward = |dinp, dw, dbias, accumulate| {
        let tensors = LinearBackwardTensors {
            dinp: Some(dinp),
            dw,
            dbias,
            dout: &g_dout,
            inp: &g_inp,
            w: &g_w,
        };
        linear_backward(gpu, tensors, dims, accumulate)
    };
    dispatches.extend(backward(&g_dinp, &g_dw, Some(&g_dbias), false)?);
    dispatches.extend(backward(&g_dinp_acc, &g_dw2, None, true)?);
    gpu.run(&dispatches)?;
    Ok(LinearOutputs {
        out: g_out,
        out16,
        dinp: g_dinp,
        dw: g_dw,
        dbias: g_dbias,
        dinp_acc: g_dinp_acc,
        dw2: g_dw2,
    })
}

/// What `run_linear` computes, in f64 (`out16`, the forward of the f16-rounded w, when `f16`).
fn linear_reference(x: &LinearInputs, dims: LinearDims, f16: bool) -> LinearOutputs<Vec<f64>> {
    let (inp, w, bias, dout) = (f64s(&x.inp), f64s(&x.w), f64s(&x.bias), f64s(&x.dout));
    let mut out = f64s(&x.out0);
    reference::gemm::linear_forward(&mut out, &inp, &w, Some(&bias), dims);
    let out16 = f16.then(|| {
        let mut out16 = f64s(&x.out0);
        let w_rounded = f64s(&round_f16(&x.w).1);
        reference::gemm::linear_forward(&mut out16, &inp, &w_rounded, Some(&bias), dims);
        out16
    });
    let mut dinp = f64s(&x.dinp0);
    let mut dw = f64s(&x.dw0);
    let mut dbias = f64s(&x.dbias0);
    reference::gemm::linear_backward(
        Some(&mut dinp),
        &mut dw,
        Some(&mut dbias),
        &dout,
        &inp,
        &w,
        dims,
        false,
    );
    let mut dinp_acc = f64s(&x.dinp_acc0);
    let mut dw2 = f64s(&x.dw0);
    reference::gemm::linear_backward(
        Some(&mut dinp_acc),
        &mut dw2,
        None,
        &dout,
        &inp,
        &w,
        dims,
        true,
    );
    LinearOutputs {
        out,
        out16,
        dinp,
        dw,
        dbias,
        dinp_acc,
        dw2,
    }
}

/// linear_forward and linear_backward against the reference, with bias, overwriting and
/// accumulating into dinp.
fn check_linear(gpu: &Gpu, m: usize, k: usize, n: usize) -> Result<Vec<CheckReport>> {
    let dims = LinearDims { m, k, n };
    let x = linear_inputs(dims);
    let got = run_linear(gpu, &x, dims)?;
    let want = linear_reference(&x, dims, got.out16.is_some());
    let s = format!("{m}x{k}x{n}");
    // Each output sums over one dimension: out over K, dinp over N, dw and dbias over M.
    let (ka, kr) = tolerance(k);
    let (na, nr) = tolerance(n);
    let (ma, mr) = tolerance(m);
    let report = |what: &str, got: &View, want: &[f64], (atol, rtol): (f64, f64)| {
        Ok::<_, Error>(CheckReport::new(
            &s,
            what,
            &gpu.read_f32(got)?,
            want,
            atol,
            rtol,
        ))
    };
    let mut reports = Vec::new();
    if let (Some(got16), Some(want16)) = (&got.out16, &want.out16) {
        reports.push(report("forward out, f16 w", got16, want16, (ka, kr))?);
    }
    reports.extend([
        report("forward out", &got.out, &want.out, (ka, kr))?,
        report("backward dinp", &got.dinp, &want.dinp, (na, nr))?,
        report("backward dw", &got.dw, &want.dw, (ma, mr))?,
        report("backward dbias", &got.dbias, &want.dbias, (ma, mr))?,
        report("backward dinp +=", &got.dinp_acc, &want.dinp_acc, (na, nr))?,
        report("backward dw (no dbias)", &got.dw2, &want.dw2, (ma, mr))?,
    ]);
    Ok(reports)
}

/// One operand's placement for a check: with `vec4`, offset, row stride, batch stride and view
/// length are multiples of 4 (the vec4 kernels); without, none is (the scalar loads).
fn placement(rows: usize, cols: usize, batch: usize, vec4: bool, shared: bool) -> (Layout, usize) {
    let mut l = if vec4 {
        Layout {
            offset: 4,
            ld: cols.next_multiple_of(4) + 4,
            batch_stride: 0,
        }
    } else {
        Layout {
            offset: 3,
            ld: cols + 1,
            batch_stride: 0,
        }
    };
    if !shared {
        l.batch_stride = rows * l.ld + if vec4 { 8 } else { 5 };
    }
    let end = l.at(batch - 1, rows - 1, cols);
    let len = if vec4 {
        end.next_multiple_of(4)
    } else {
        end + 2
    };
    (l, len)
}

/// A view's contents for an operand: random values in [-1, 1) on the operand's elements and NaN
/// everywhere else, so a kernel that lets anything outside the operand into its sums fails.
fn operand_data(
    rng: &mut Rng,
    len: usize,
    l: Layout,
    rows: usize,
    cols: usize,
    batch: usize,
) -> Vec<f32> {
    let mut x = vec![f32::NAN; len];
    for z in 0..batch {
        for r in 0..rows {
            for col in 0..cols {
                x[l.at(z, r, col)] = rng.range(-1.0, 1.0);
            }
        }
    }
    x
}

/// One batched, strided matmul configuration under every candidate kernel (with
/// `one_entry_only`, only the naive kernel and those that take a single batch entry: split-K and
/// packed B), each against the reference and, where it sums in the naive kernel's order, against
/// the naive kernel's bits.
/// With a vec4 A, C is stacked per batch entry and overwritten with alpha 1 and a bias; otherwise
/// C is a column block of a wider matrix (the lm-head chunk case) with the batch entries side by
/// side, accumulated into with alpha -0.75. With `f16_b`, B is stored in f16 and the reference
/// uses the f16-rounded values.
fn check_matmul(
    gpu: &Gpu,
    mm: Matmul,
    vec_a: bool,
    vec_b: bool,
    f16_b: bool,
    one_entry_only: bool,
) -> Result<Vec<CheckReport>> {
    let Matmul { m, n, k, batch, .. } = mm;
    let ((ar, ac), (br, bc)) = mm.stored();
    let mut rng =
        Rng::new((m * 7919 + k * 131 + n) as u64 * 4 + mm.trans_a as u64 * 2 + mm.trans_b as u64);
    let (la, a_len) = placement(ar, ac, batch, vec_a, false);
    // B shared across the batch in the vec4 layouts, one per entry otherwise.
    let (lb, b_len) = placement(br, bc, batch, vec_b, vec_b);
    let (lc, c_len, mm) = c_placement(mm, vec_a);
    let with_bias = vec_a || mm.trans_a == mm.trans_b;

    let a = operand_data(&mut rng, a_len, la, ar, ac, batch);
    let b = operand_data(&mut rng, b_len, lb, br, bc, batch);
    let (b16, b_rounded) = round_f16(&b);
    let b = if f16_b { b_rounded } else { b };
    let bias = rng.vec_uniform(n, -1.0, 1.0);
    let c0 = if mm.accumulate {
        rng.vec_uniform(c_len, -1.0, 1.0)
    } else {
        garbage(&mut rng, c_len)
    };
    let layouts = Layouts {
        c: lc,
        a: la,
        b: lb,
    };
    let want = matmul_reference(&mm, layouts, &c0, &a, &b, with_bias.then_some(&bias[..]));

    let ga = gpu.upload_f32("a", &a)?;
    let gb = if f16_b {
        gpu.upload("b", DType::F16, &b16)?
    } else {
        gpu.upload_f32("b", &b)?
    };
    let gbias = gpu.upload_f32("bias", &bias)?;
    let (a_op, b_op) = (op(&ga, la), op(&gb, lb));
    let kernels = candidates(gpu, &mm, &a_op, &b_op).into_iter().filter(|k| {
        !one_entry_only || matches!(k, Kernel::Naive | Kernel::SplitK(_) | Kernel::Packed(_))
    });
    let run = |kernel: Kernel| {
        let gc = gpu.upload_f32("c", &c0)?;
        let bias = with_bias.then_some(&gbias);
        gpu.run(&matmul_with(
            gpu,
            &mm,
            op(&gc, lc),
            a_op,
            b_op,
            bias,
            kernel,
        )?)?;
        let what = format!(
            "{} {}a {}b{} {}{}",
            mm.ops(),
            if vec_a { 'v' } else { 's' },
            if vec_b { 'v' } else { 's' },
            if f16_b { " f16" } else { "" },
            kernel.name(),
            if mm.accumulate { " +=" } else { "" },
        );
        Ok((what, gpu.read_f32(&gc)?))
    };
    let s = format!("{m}x{k}x{n} batch {batch}");
    compare_kernels(&s, kernels, run, &want, tolerance(k))
}

/// Where check_matmul puts C, its view's length, and the product it computes there. With a vec4
/// A: stacked per batch entry, overwritten. Otherwise: a column block of a wider matrix with the
/// batch entries side by side, accumulated into with alpha -0.75.
fn c_placement(mm: Matmul, vec_a: bool) -> (Layout, usize, Matmul) {
    let Matmul { m, n, batch, .. } = mm;
    if vec_a {
        let ld = n.next_multiple_of(4);
        let lc = Layout {
            offset: 4,
            ld,
            batch_stride: m * ld,
        };
        (lc, lc.at(batch, 0, 0), mm)
    } else {
        let ld = batch * (n + 1) + 4;
        let lc = Layout {
            offset: 3,
            ld,
            batch_stride: n + 1,
        };
        let mm = Matmul {
            alpha: -0.75,
            accumulate: true,
            ..mm
        };
        (lc, m * ld, mm)
    }
}

/// The reference of `mm` in f64 on C's prior contents `c0`, with the operands laid out as
/// `layouts` says.
fn matmul_reference(
    mm: &Matmul,
    layouts: Layouts,
    c0: &[f32],
    a: &[f32],
    b: &[f32],
    bias: Option<&[f32]>,
) -> Vec<f64> {
    let mut want = f64s(c0);
    reference::gemm::matmul(
        &mut want,
        &f64s(a),
        &f64s(b),
        bias.map(f64s).as_deref(),
        layouts,
        Product {
            batch: mm.batch,
            trans_a: mm.trans_a,
            trans_b: mm.trans_b,
            alpha: mm.alpha as f64,
            accumulate: mm.accumulate,
            ..Product::new(mm.m, mm.n, mm.k)
        },
    );
    want
}

/// Runs each of `kernels` (`run` gives its report name and output) and compares the output with
/// `want`, and with the naive kernel's bits where the kernel sums in the naive order (every
/// kernel but gemv and split-K, when the naive kernel ran first).
fn compare_kernels(
    s: &str,
    kernels: impl Iterator<Item = Kernel>,
    mut run: impl FnMut(Kernel) -> Result<(String, Vec<f32>)>,
    want: &[f64],
    (atol, rtol): (f64, f64),
) -> Result<Vec<CheckReport>> {
    let mut reports = Vec::new();
    let mut naive: Option<Vec<f32>> = None;
    for kernel in kernels {
        let (what, got) = run(kernel)?;
        reports.push(CheckReport::new(s, &what, &got, want, atol, rtol));
        match (kernel, &naive) {
            (Kernel::Naive, _) => naive = Some(got),
            (Kernel::Gemv | Kernel::SplitK(_), _) | (_, None) => {}
            (_, Some(bits)) => reports.push(CheckReport::new(
                s,
                &format!("{what} same bits as naive"),
                &got,
                bits,
                0.0,
                0.0,
            )),
        }
    }
    Ok(reports)
}

fn op(view: &View, l: Layout) -> Operand<'_> {
    Operand {
        view,
        offset: l.offset,
        ld: l.ld,
        batch_stride: l.batch_stride,
    }
}

/// Every candidate for one product, side by side: the variant names the layout and the kernel,
/// "(fixed rule)" marks the kernel `matmul` runs today and "<- fastest" the lowest median.
fn bench_candidates(
    gpu: &Gpu,
    opts: &BenchOptions,
    shape: &str,
    label: &str,
    mm: &Matmul,
    (c, a, b): (Operand, Operand, Operand),
) -> Result<Vec<BenchReport>> {
    let fixed = fixed_rule(gpu, mm);
    let mut reports = Vec::new();
    for kernel in candidates(gpu, mm, &a, &b) {
        if !opts.wants(&kernel.name()) {
            continue;
        }
        let d = matmul_with(gpu, mm, c, a, b, None, kernel)?;
        let mut name = format!("{label} {} {}", mm.ops(), kernel.name());
        if kernel == fixed {
            name.push_str(" (fixed rule)");
        }
        reports.push(harness::bench_one(gpu, opts, &name, shape, &d)?);
    }
    let fastest = reports
        .iter_mut()
        .min_by(|x, y| x.time.median.total_cmp(&y.time.median));
    if let Some(r) = fastest {
        r.variant.push_str(" <- fastest");
    }
    Ok(reports)
}

fn bench(gpu: &Gpu, shape: &[usize], opts: &BenchOptions) -> Result<Vec<BenchReport>> {
    let [m, k, n] = harness::dims::<3>("gemm", shape)?;
    let mut rng = Rng::new(0);
    let inp = gpu.upload_f32("inp", &rng.vec_uniform(m * k, -1.0, 1.0))?;
    let w_data = rng.vec_uniform(n * k, -1.0, 1.0);
    let w = gpu.upload_f32("w", &w_data)?;
    // The inference forward's weight, stored in f16, where the adapter has it.
    let w16 = if gpu.has_f16() {
        Some(gpu.upload("w16", DType::F16, &round_f16(&w_data).0)?)
    } else {
        None
    };
    let dout = gpu.upload_f32("dout", &rng.vec_uniform(m * n, -1.0, 1.0))?;
    let out = gpu.zeros("out", DType::F32, m * n)?;
    let dinp = gpu.zeros("dinp", DType::F32, m * k)?;
    let dw = gpu.zeros("dw", DType::F32, n * k)?;
    let dbias = gpu.zeros("dbias", DType::F32, n)?;
    let s = format!("{m}x{k}x{n}");

    // out = inp · wᵀ (NT); dinp = dout · w (NN); dw += doutᵀ · inp (TN).
    let forward = Matmul {
        trans_b: true,
        ..Matmul::new(m, n, k)
    };
    let backward_inp = Matmul::new(m, k, n);
    let backward_w = Matmul {
        trans_a: true,
        accumulate: true,
        ..Matmul::new(n, k, m)
    };
    let runs = [
        ("forward", forward, (&out, n), (&inp, k), (&w, k)),
        (
            "backward dinp",
            backward_inp,
            (&dinp, k),
            (&dout, n),
            (&w, k),
        ),
        ("backward dw", backward_w, (&dw, k), (&dout, n), (&inp, k)),
    ];
    let mut reports = Vec::new();
    for (label, mm, c, a, b) in runs {
        let (c, a, b) = (
            Operand::new(c.0, c.1),
            Operand::new(a.0, a.1),
            Operand::new(b.0, b.1),
        );
        reports.extend(bench_candidates(gpu, opts, &s, label, &mm, (c, a, b))?);
        if let Some(w16) = w16.as_ref().filter(|_| label == "forward") {
            // The inference forward: the same product with the weight stored in f16.
            let b16 = Operand::new(w16, k);
            reports.extend(bench_candidates(
                gpu,
                opts,
                &s,
                "forward f16 w",
                &mm,
                (c, a, b16),
            )?);
        }
    }
    let db = bias_backward(gpu, &dbias, &dout, m, n)?;
    reports.push(harness::bench_one(gpu, opts, "backward dbias", &s, &[db])?);
    Ok(reports)
}
