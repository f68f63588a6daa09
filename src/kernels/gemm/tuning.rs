//! Measured GEMM kernel choice: the tuning problem of a matmul (its bucket, shape and
//! candidates) and the trial tensors its candidates are measured on (see `kernels::measure`).

use super::operand::{normalized, vec4_ok};
use super::{
    Epilogue, FAMILY, Kernel, Matmul, Operand, candidates, fixed_rule, matmul_with, tolerance,
};
use crate::error::{Error, Result};
use crate::gpu::{DType, Gpu, View};
use crate::kernels::round_f16;
use crate::rng::Rng;

/// The measured kernel for `mm` on these operands (see `kernels::measure`). Problems share a
/// measurement when their transposes, bucketed dimensions and batch, vec4 eligibility and B's
/// element type agree; the measurement runs on fresh tensors laid out like the real operands.
pub(super) fn tuned(
    gpu: &Gpu,
    mm: &Matmul,
    c: &Operand,
    a: &Operand,
    b: &Operand,
) -> Result<Kernel> {
    use crate::kernels::measure::{self, Trial};
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
    let name = measure::choose(gpu, &problem, &mut |name| {
        let kernel = Kernel::from_name(name)
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
    Ok(Kernel::from_name(&name).unwrap_or(rule))
}

/// The kernel the tuner holds for `mm` on these operands (pinned, cached or shipped), without
/// measuring anything; None where it would have to measure or take the fixed rule.
pub(super) fn known_winner(gpu: &Gpu, mm: &Matmul, a: &Operand, b: &Operand) -> Option<Kernel> {
    use crate::gpu::tuning_cache::Lookup;
    let problem = tune_problem(gpu, mm, a, b, fixed_rule(gpu, mm));
    match gpu
        .tuner
        .lookup(problem.family, &problem.bucket, &problem.candidates)
    {
        Lookup::Use(name) => Kernel::from_name(&name),
        _ => None,
    }
}

/// The tuning problem of `mm` on these operands: its bucket, its shape, and the candidates with
/// the fixed rule's kernel first (naive where the rule cannot run this problem).
fn tune_problem(
    gpu: &Gpu,
    mm: &Matmul,
    a: &Operand,
    b: &Operand,
    rule: Kernel,
) -> crate::kernels::measure::Problem {
    use crate::kernels::measure::{Problem, bucket};
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
