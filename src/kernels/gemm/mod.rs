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
//!
//! This file is the launch API; `operand` checks where operands lie, `variants` is the catalogue
//! of kernels (names, where each applies, the candidates and the fixed rule), `tuning` measures
//! among them, and `check` is the `kernels check` / `kernels bench` harness.

mod check;
mod operand;
mod tuning;
mod variants;

use bytemuck::{Pod, Zeroable};

use super::{bytes_of, expect, expect_dims};
use crate::error::{Error, Result};
use crate::gpu::{
    Binding, Cost, DType, Dispatch, Gpu, KernelSpec, Shader, ShaderVariant, View, grid,
};
use operand::{check_matmul_args, normalized, vec4_ok};
use tuning::{known_winner, tuned};
use variants::{block, entry, unfit};

pub use check::{FAMILY, bench_headline};
pub use operand::Operand;
pub use variants::{Kernel, Reg, SLOW_BUILD_MIN_FMAS, SplitK, Tile, candidates, fixed_rule};

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
/// Matrix-vector products, one output column per invocation (CPU adapters), scalar reads.
pub const GEMVC: KernelSpec = gemm_spec("gemm_gemvc");
/// The same, reading a and b as vec4.
pub const GEMVC_VAB: KernelSpec = gemm_spec("gemm_gemvc_vab");
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
/// Output columns per workgroup of gemm_gemvc: its invocations (`gemm.wgsl`'s GEMVC_WG) times
/// the columns each owns (GEMVC_COLS).
const GEMVC_WG: usize = 64 * 4;
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

fn u32_of(x: usize) -> u32 {
    // Every value passed here has been checked against 32-bit indexing.
    x as u32
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
        Kernel::Gemvc => constants.push(("GEMV_ROWS", mm.m as f64)),
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

/// Tolerance for sums of `terms` products of values in [-1, 1] in f32 against an f64 reference:
/// atol 1e-5 up to 256 terms, then growing linearly with the length of the sum (as the worst-case
/// rounding error of a sequential f32 sum does); rtol 1e-4.
fn tolerance(terms: usize) -> (f64, f64) {
    (1e-5 * (terms as f64 / 256.0).max(1.0), 1e-4)
}
