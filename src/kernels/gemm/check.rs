//! `shaderformer kernels check|bench gemm`: every GEMM kernel against the CPU reference on
//! awkward shapes, and the candidates timed side by side.

use super::{
    Epilogue, GEMV_MAX_M, Kernel, LinearBackwardTensors, LinearDims, Matmul, Operand,
    bias_backward, candidates, fixed_rule, known_winner, linear_backward, linear_forward,
    matmul_with, tolerance,
};
use crate::error::{Error, Result};
use crate::gpu::{DType, Gpu, View};
use crate::kernels::harness::{self, BenchOptions, BenchReport, CheckReport, Family};
use crate::kernels::round_f16;
use crate::reference;
use crate::reference::gemm::{Layout, Layouts, Product};
use crate::rng::Rng;

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

fn check(gpu: &Gpu, shape: &[usize]) -> Result<Vec<CheckReport>> {
    let [m, k, n] = harness::dims::<3>("gemm", shape)?;
    let mut reports = check_linear(gpu, m, k, n)?;
    reports.extend(check_epilogues(gpu, m, k, n)?);
    let sweep = if harness::exhaustive() {
        Sweep::Exhaustive
    } else {
        Sweep::OnePlacement
    };
    reports.extend(check_layouts(gpu, (m, k, n), &LAYOUTS, false, sweep)?);
    if gpu.has_f16() {
        reports.extend(check_layouts(gpu, (m, k, n), &F16_LAYOUTS, true, sweep)?);
    }
    if m <= GEMV_MAX_M {
        // Decoding's matrix-vector products: NT with one batch entry, f32 and f16 weights.
        let mm = Matmul {
            trans_b: true,
            ..Matmul::new(m, n, k)
        };
        let gemv = |k: &Kernel| {
            sweep == Sweep::Exhaustive || matches!(k, Kernel::Naive | Kernel::Gemv | Kernel::Gemvc)
        };
        reports.extend(check_matmul(gpu, mm, (false, false), false, &gemv)?);
        // gemm_gemvc's vec4 form.
        reports.extend(check_matmul(gpu, mm, (true, true), false, &gemv)?);
        if gpu.has_f16() {
            reports.extend(check_matmul(gpu, mm, (true, true), true, &gemv)?);
        }
    }
    Ok(reports)
}

/// A product's transposes (trans_a, trans_b) and whether A and B are read as vec4 (vec_a, vec_b).
type Placement = ((bool, bool), (bool, bool));

/// The f32 placements: each operand read as vec4 ('v') or as scalars ('s') under the four
/// transpose combinations, which between them take all four tiled entry points and every load
/// path of A and B.
const LAYOUTS: [Placement; 8] = [
    ((false, false), (true, true)),
    ((false, false), (false, false)),
    ((false, true), (true, false)),
    ((false, true), (false, true)),
    ((true, false), (true, true)),
    ((true, false), (false, false)),
    ((true, true), (true, false)),
    ((true, true), (false, true)),
];

/// The f16-B placements: NT as in linear_forward and the lm head, with every combination of vec4
/// and scalar loads (all four tiled entry points, both NT load paths of B, the lm-head column
/// block of C at an odd offset); NN for the other two load paths of B.
const F16_LAYOUTS: [Placement; 6] = [
    ((false, true), (false, false)),
    ((false, true), (false, true)),
    ((false, true), (true, false)),
    ((false, true), (true, true)),
    ((false, false), (false, false)),
    ((false, false), (true, true)),
];

/// Which kernels `check_layouts` runs in which placement.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Sweep {
    /// Every candidate in every placement (`kernels check --exhaustive`): one pipeline per
    /// kernel, placement and epilogue, which an adapter without a warm shader cache compiles
    /// for minutes.
    Exhaustive,
    /// Every candidate in one placement of its own (and the naive baseline in all), so that each
    /// kernel's pipeline is built once and then checked on every shape; the placements are dealt
    /// out in catalogue order within each kind of kernel, so the kinds each cover the entry
    /// points and load paths their placements reach.
    OnePlacement,
}

/// Whether a kernel takes only one batch entry (split-K and packed B).
fn one_entry(kernel: &Kernel) -> bool {
    matches!(kernel, Kernel::SplitK(_) | Kernel::Packed(_))
}

/// Whether a kernel of `kernel`'s kind can run in `placement` (packed B needs B stored (K, N)).
fn applies(kernel: &Kernel, ((_, trans_b), _): Placement) -> bool {
    !matches!(kernel, Kernel::Packed(_)) || !trans_b
}

/// The one placement (of `layouts`) that `Sweep::OnePlacement` checks `kernel` in: the kernels
/// of each kind in catalogue order take the placements that apply to them in turn.
fn placement_of(kernel: &Kernel, layouts: &[Placement]) -> Option<Placement> {
    let kind = std::mem::discriminant(kernel);
    let nth = Kernel::catalogue()
        .iter()
        .filter(|k| std::mem::discriminant(*k) == kind)
        .position(|k| k == kernel)?;
    let fit: Vec<Placement> = layouts
        .iter()
        .copied()
        .filter(|&p| applies(kernel, p))
        .collect();
    (!fit.is_empty()).then(|| fit[nth % fit.len()])
}

/// Every placement of `layouts` under the kernels `sweep` gives it: batched (two entries) for
/// the kernels that take a batch, then unbatched for split-K and packed B.
fn check_layouts(
    gpu: &Gpu,
    (m, k, n): (usize, usize, usize),
    layouts: &[Placement],
    f16_b: bool,
    sweep: Sweep,
) -> Result<Vec<CheckReport>> {
    let mut reports = Vec::new();
    for &placement in layouts {
        let ((trans_a, trans_b), vecs) = placement;
        let chosen = |kernel: &Kernel| {
            sweep == Sweep::Exhaustive || placement_of(kernel, layouts) == Some(placement)
        };
        let mm = Matmul {
            batch: 2,
            trans_a,
            trans_b,
            ..Matmul::new(m, n, k)
        };
        let batched = |k: &Kernel| *k == Kernel::Naive || (!one_entry(k) && chosen(k));
        reports.extend(check_matmul(gpu, mm, vecs, f16_b, &batched)?);
        // Split-K and packed B take one batch entry: the same placement unbatched.
        let single = |k: &Kernel| *k == Kernel::Naive || (one_entry(k) && chosen(k));
        let any_single = Kernel::catalogue()
            .iter()
            .any(|k| k != &Kernel::Naive && single(k) && applies(k, placement));
        if any_single {
            let one = Matmul { batch: 1, ..mm };
            reports.extend(check_matmul(gpu, one, vecs, f16_b, &single)?);
        }
    }
    Ok(reports)
}

/// Every epilogue after a linear layer's product (out (M, N) = inp (M, K) · w (N, K)ᵀ + bias)
/// against the reference composed of the separate ops, on the kernel training runs and on split-K
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

    // The plain product v and what each epilogue makes of it.
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

/// One batched, strided matmul configuration under every candidate kernel that `wanted` picks,
/// each against the reference and, where it sums in the naive kernel's order, against
/// the naive kernel's bits.
/// With a vec4 A, C is stacked per batch entry and overwritten with alpha 1 and a bias; otherwise
/// C is a column block of a wider matrix (the lm-head chunk case) with the batch entries side by
/// side, accumulated into with alpha -0.75. With `f16_b`, B is stored in f16 and the reference
/// uses the f16-rounded values.
fn check_matmul(
    gpu: &Gpu,
    mm: Matmul,
    (vec_a, vec_b): (bool, bool),
    f16_b: bool,
    wanted: &dyn Fn(&Kernel) -> bool,
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
    let kernels = candidates(gpu, &mm, &a_op, &b_op)
        .into_iter()
        .filter(|k| wanted(k));
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
    compare_kernels(&s, kernels, run, (&want, vec_a && vec_b), tolerance(k))
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
/// kernel but gemv, gemvc's vec4 form (A and B read as vec4: `vec_ab`) and split-K, when the
/// naive kernel ran first).
fn compare_kernels(
    s: &str,
    kernels: impl Iterator<Item = Kernel>,
    mut run: impl FnMut(Kernel) -> Result<(String, Vec<f32>)>,
    (want, vec_ab): (&[f64], bool),
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
            // The vec4 form sums four interleaved partials.
            (Kernel::Gemvc, _) if vec_ab => {}
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

/// `bench --suite quick`'s GEMM at `shape` (M, K, N): the forward product alone (NT: out =
/// inp · wᵀ), and of its candidates only the tuned winner (where the tuner holds one without
/// measuring), the fixed rule, and the best of each kind that competes on speed (tiled, reg,
/// ureg, split-K, packed; naive is the correctness baseline) as the tuner knows them: the
/// configuration of that kind that wins the most problems in the cache and the shipped winners
/// (the kind's first candidate where none does). On lavapipe, timing every candidate in every
/// layout, as `bench` does, takes over ten minutes at 1024^3.
pub fn bench_headline(gpu: &Gpu, shape: &[usize], opts: &BenchOptions) -> Result<Vec<BenchReport>> {
    let [m, k, n] = harness::dims::<3>("gemm", shape)?;
    let mut rng = Rng::new(0);
    let inp = gpu.upload_f32("inp", &rng.vec_uniform(m * k, -1.0, 1.0))?;
    let w = gpu.upload_f32("w", &rng.vec_uniform(n * k, -1.0, 1.0))?;
    let out = gpu.zeros("out", DType::F32, m * n)?;
    let mm = Matmul {
        trans_b: true,
        ..Matmul::new(m, n, k)
    };
    let (c, a, b) = (
        Operand::new(&out, n),
        Operand::new(&inp, k),
        Operand::new(&w, k),
    );
    let mut timed: Vec<(Kernel, String)> = Vec::new();
    let mut add = |kernel: Kernel, why: &str| match timed.iter_mut().find(|t| t.0 == kernel) {
        Some(t) => t.1.push_str(&format!(", {why}")),
        None => timed.push((kernel, why.to_string())),
    };
    if let Some(w) = known_winner(gpu, &mm, &a, &b) {
        add(w, "tuned");
    }
    add(fixed_rule(gpu, &mm), "fixed rule");
    let contenders = candidates(gpu, &mm, &a, &b).into_iter().filter(|k| {
        !matches!(k, Kernel::Naive | Kernel::Gemv | Kernel::Gemvc) && opts.wants(&k.name())
    });
    for kernel in best_of_each_kind(contenders, &gpu.tuner.wins()) {
        add(kernel, &format!("best {}", kernel.kind()));
    }
    let s = format!("{m}x{k}x{n}");
    let mut reports = Vec::new();
    for (kernel, why) in timed {
        let d = matmul_with(gpu, &mm, c, a, b, None, kernel)?;
        let name = format!("forward {} {} ({why})", mm.ops(), kernel.name());
        reports.push(harness::bench_one(gpu, opts, &name, &s, &d)?);
    }
    let fastest = reports
        .iter_mut()
        .min_by(|x, y| x.time.median.total_cmp(&y.time.median));
    if let Some(r) = fastest {
        r.variant.push_str(" <- fastest");
    }
    Ok(reports)
}

/// Of `kernels`, the one of each kind that wins the most problems in `wins` (the first of its
/// kind on a tie or where none wins), in the order the kinds first appear.
fn best_of_each_kind(
    kernels: impl Iterator<Item = Kernel>,
    wins: &std::collections::BTreeMap<String, usize>,
) -> Vec<Kernel> {
    let mut best: Vec<(Kernel, usize)> = Vec::new();
    for kernel in kernels {
        let w = wins.get(&kernel.name()).copied().unwrap_or(0);
        match best.iter_mut().find(|(k, _)| k.kind() == kernel.kind()) {
            Some(held) if w > held.1 => *held = (kernel, w),
            Some(_) => {}
            None => best.push((kernel, w)),
        }
    }
    best.into_iter().map(|b| b.0).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The default sweep gives every kernel of the catalogue a placement in both the f32 and
    /// the f16 layouts, and the tiled, register-block and packed kernels between them reach each
    /// of their entry points (each combination of vec4 and scalar reads they have).
    #[test]
    fn one_placement_sweep_covers_every_kernel_and_entry() {
        for layouts in [&LAYOUTS[..], &F16_LAYOUTS[..]] {
            for kernel in Kernel::catalogue() {
                assert!(
                    placement_of(&kernel, layouts).is_some(),
                    "{} has no placement",
                    kernel.name()
                );
            }
        }
        let reads = |pick: fn(&Kernel) -> bool| -> Vec<(bool, bool)> {
            let mut v: Vec<(bool, bool)> = Kernel::catalogue()
                .iter()
                .filter(|k| pick(k))
                .filter_map(|k| placement_of(k, &LAYOUTS))
                .map(|(_, vecs)| vecs)
                .collect();
            v.sort();
            v.dedup();
            v
        };
        let all = vec![(false, false), (false, true), (true, false), (true, true)];
        assert_eq!(reads(|k| matches!(k, Kernel::Tiled(_))), all);
        // gemm_ureg, gemm_ureg_vb and gemm_ureg_vab: b read as scalars and as vec4, a as vec4.
        let ureg = reads(|k| matches!(k, Kernel::Reg(r) if r.unrolled));
        assert!(
            ureg.contains(&(true, true)) && ureg.iter().any(|&(_, vb)| !vb),
            "{ureg:?}"
        );
        let reg = reads(|k| matches!(k, Kernel::Reg(r) if !r.unrolled));
        assert!(
            reg.iter().any(|&(_, vb)| vb) && reg.iter().any(|&(_, vb)| !vb),
            "{reg:?}"
        );
        let packed = reads(|k| matches!(k, Kernel::Packed(_)));
        assert!(packed.iter().any(|&(va, _)| va) && packed.iter().any(|&(va, _)| !va));
    }
}
