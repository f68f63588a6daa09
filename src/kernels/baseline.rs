//! The baseline of a measurement checked against the CPU reference before it becomes the
//! yardstick: tuning rejects every candidate that disagrees with the baseline, so a baseline that
//! is wrong (an edited shader, a driver that miscompiles it) would reject every correct kernel
//! and win every problem in silence.
//!
//! Once per adapter, shader source and baseline kernel (the tuning cache keeps the verdict with
//! the winners), the baseline runs on a small awkward shape and is compared with the plain-Rust
//! reference; a disagreement stops the run with an error naming the family, the entry point and
//! the shader file. GEMM, attention (forward, backward and decoding over an f32 cache),
//! LayerNorm and cross-entropy are checked, each with the tolerances of its own
//! `kernels check`; a family without a check here is measured as before.

use crate::error::{Error, Result};
use crate::gpu::tuning_cache::Problem;
use crate::gpu::{Gpu, Shader, block_on};
use crate::reference::gemm::{Layout, Layouts, Product};
use crate::rng::Rng;

use super::gemm::{self, Kernel, Matmul, Operand};
use super::{attention, cross_entropy, layernorm};

/// Checks the baseline of `problem` (its first candidate) unless the tuner already holds its
/// verdict; records a pass.
pub fn verify(gpu: &Gpu, problem: &Problem) -> Result<()> {
    let Some(baseline) = problem.candidates.first() else {
        return Ok(());
    };
    let key = verdict_key(problem, baseline);
    if gpu.tuner.baseline_verified(&key) {
        return Ok(());
    }
    let checked = match problem.family {
        "gemm" => verify_gemm(gpu, problem, baseline)?,
        "attention" => verify_attention(gpu, problem, baseline)?,
        "layernorm" => {
            let variant = layernorm::Variant::from_name(baseline);
            let found = variant
                .map(|v| layernorm::verify_baseline(gpu, v))
                .transpose()?;
            judge(
                gpu,
                problem,
                Shader::LayerNorm,
                variant.is_some(),
                found.flatten(),
            )?
        }
        "cross_entropy" => {
            let found = cross_entropy::verify_baseline(gpu, baseline)?;
            judge(gpu, problem, Shader::CrossEntropy, true, found)?
        }
        _ => false,
    };
    if checked {
        gpu.tuner.record_baseline(key);
    }
    Ok(())
}

/// The key a baseline's verdict is kept under: "family: variant", with, for attention, the
/// problem's pass, head size and mode ("attention forward hs64 causal: tiles32x32w64"), which
/// the same name compiles differently for. LayerNorm's and cross-entropy's checks run the
/// forward and the backward both.
fn verdict_key(problem: &Problem, baseline: &str) -> String {
    if problem.family != "attention" {
        return format!("{}: {baseline}", problem.family);
    }
    // Drop the sizes that only bucket the problem: bh.., t.., tq.., tmax...
    let scope: Vec<&str> = problem
        .bucket
        .split_whitespace()
        .filter(|w| !w.starts_with("bh") && !w.starts_with('t'))
        .collect();
    format!("attention {}: {baseline}", scope.join(" "))
}

/// The verdict of a family's check: Ok(checked) where it agreed (`checked` false where nothing
/// ran), the error naming the kernel where it did not.
fn judge(
    gpu: &Gpu,
    problem: &Problem,
    shader: Shader,
    checked: bool,
    disagreement: Option<(String, String)>,
) -> Result<bool> {
    match disagreement {
        Some((entry, detail)) => Err(disagrees(gpu, problem.family, shader, &entry, &detail)),
        None => Ok(checked),
    }
}

/// Checks attention's baseline: the pass (forward, backward, or decoding over an f32 cache),
/// head size and mode come from the bucket ("forward bh12 t128 hs64 causal", "cached bh4 tq1
/// tmax10 hs16 f32").
fn verify_attention(gpu: &Gpu, problem: &Problem, name: &str) -> Result<bool> {
    use super::attention::check::Problem as Pass;
    let words: Vec<&str> = problem.bucket.split_whitespace().collect();
    let pass = match words.first() {
        Some(&"forward") => Pass::Forward,
        Some(&"backward") => Pass::Backward,
        Some(&"cached") if words.last() == Some(&"f32") => Pass::Cached,
        _ => return Ok(false),
    };
    let hs = words
        .iter()
        .find_map(|w| w.strip_prefix("hs")?.parse::<usize>().ok());
    let Some(hs) = hs else {
        return Ok(false);
    };
    let Ok(variant) = attention::Variant::parse(name, hs) else {
        return Ok(false);
    };
    let causal = words.contains(&"causal");
    let found = attention::check::verify_variant(gpu, pass, variant, hs, causal)?;
    judge(gpu, problem, Shader::Attention, true, found)
}

/// Shapes (M, N, K) to check a GEMM kernel on, smallest first: rows that are no multiple of any
/// block (one fewer where a transposed A must be read as vec4), columns and depth that are no
/// multiple of a tile but that vec4 reads can take. The larger ones reach kernels offered only
/// from a size on.
const GEMM_SHAPES: [(usize, usize, usize); 3] = [(45, 36, 68), (129, 132, 68), (257, 260, 260)];

/// The transposes and vec4 reads of `problem`'s bucket ("NT m512 n512 k128 vs f32": A as is,
/// B transposed, A read as vec4, B not).
fn bucket_form(problem: &Problem) -> (bool, bool, bool, bool) {
    let words: Vec<&str> = problem.bucket.split_whitespace().collect();
    let ops = words.first().map_or(&b""[..], |w| w.as_bytes());
    let vec = words
        .len()
        .checked_sub(2)
        .map_or(&b""[..], |i| words[i].as_bytes());
    (
        ops.first() == Some(&b'T'),
        ops.get(1) == Some(&b'T'),
        vec.first() == Some(&b'v'),
        vec.get(1) == Some(&b'v'),
    )
}

/// A stored matrix of `rows` x `cols` values in [-1, 1], placed so that it is read as vec4 or,
/// one element in, not: the values and its layout.
fn matrix(rng: &mut Rng, rows: usize, cols: usize, vec4: bool) -> (Vec<f32>, Layout) {
    let offset = usize::from(!vec4);
    let mut x = vec![0.0; offset];
    x.extend(rng.vec_uniform(rows * cols, -1.0, 1.0));
    (
        x,
        Layout {
            offset,
            ld: cols,
            batch_stride: 0,
        },
    )
}

/// Runs GEMM kernel `name` at the first of `GEMM_SHAPES` it can compute, its operands laid out
/// as the problem's, and compares it with `reference::gemm::matmul`. Returns false where it was
/// not checked (an f16 B, a kernel no shape here fits).
fn verify_gemm(gpu: &Gpu, problem: &Problem, name: &str) -> Result<bool> {
    let Some(kernel) = Kernel::from_name(name) else {
        return Ok(false);
    };
    if !problem.bucket.ends_with("f32") {
        return Ok(false);
    }
    let (trans_a, trans_b, va, vb) = bucket_form(problem);
    for (m, n, k) in GEMM_SHAPES {
        let m = if trans_a && va { m - 1 } else { m };
        let mm = Matmul {
            trans_a,
            trans_b,
            ..Matmul::new(m, n, k)
        };
        // Stored shapes: A (M, K) or (K, M), B (K, N) or (N, K).
        let (ar, ac) = if trans_a { (k, m) } else { (m, k) };
        let (br, bc) = if trans_b { (n, k) } else { (k, n) };
        let mut rng = Rng::new(0xba5e);
        let (a, la) = matrix(&mut rng, ar, ac, va);
        let (b, lb) = matrix(&mut rng, br, bc, vb);
        let (ga, gb) = (
            gpu.upload_f32("baseline.a", &a)?,
            gpu.upload_f32("baseline.b", &b)?,
        );
        let gc = gpu.upload_f32("baseline.c", &vec![f32::NAN; m * n])?;
        let operand = |v, l: Layout| Operand::new(v, l.ld).at(l.offset);
        let dispatches = match gemm::matmul_with(
            gpu,
            &mm,
            Operand::new(&gc, n),
            operand(&ga, la),
            operand(&gb, lb),
            None,
            kernel,
        ) {
            Ok(d) => d,
            // The kernel cannot take this shape (too small for it): try the next.
            Err(Error::Invalid { .. }) => continue,
            Err(e) => return Err(e),
        };
        let got = block_on("checking a baseline kernel", async {
            gpu.run_checked_async(&dispatches).await?;
            gpu.read_f32_async(&gc).await
        })?;
        let mut want = vec![0.0f64; m * n];
        let f64s = |x: &[f32]| x.iter().map(|&v| v as f64).collect::<Vec<_>>();
        crate::reference::gemm::matmul(
            &mut want,
            &f64s(&a),
            &f64s(&b),
            None,
            Layouts {
                c: Layout::new(n),
                a: la,
                b: lb,
            },
            Product {
                trans_a,
                trans_b,
                ..Product::new(m, n, k)
            },
        );
        if let Some(i) = first_mismatch(&got, &want, problem.atol, problem.rtol) {
            let entry = dispatches
                .first()
                .map_or(name.to_string(), |d| d.name.clone());
            return Err(disagrees(
                gpu,
                problem.family,
                Shader::Gemm,
                &entry,
                &format!(
                    "{} {m}x{k}x{n}: element {i} is {} where the CPU reference gives {}",
                    mm_ops(trans_a, trans_b),
                    got[i],
                    want[i]
                ),
            ));
        }
        return Ok(true);
    }
    Ok(false)
}

fn mm_ops(trans_a: bool, trans_b: bool) -> String {
    format!(
        "{}{}",
        if trans_a { "T" } else { "N" },
        if trans_b { "T" } else { "N" }
    )
}

/// The first index where `got` is off `want` by more than `atol + rtol·|want|` (or is not
/// finite).
fn first_mismatch(got: &[f32], want: &[f64], atol: f64, rtol: f64) -> Option<usize> {
    got.iter().zip(want).position(|(&g, &w)| {
        let err = (g as f64 - w).abs();
        // A NaN output compares false, and so mismatches.
        err.is_nan() || err > atol + rtol * w.abs()
    })
}

/// The error for a baseline that disagrees with the reference.
fn disagrees(gpu: &Gpu, family: &str, shader: Shader, entry: &str, detail: &str) -> Error {
    Error::invalid(
        format!("kernel tuning of {family}"),
        format!(
            "the baseline {entry} (shader file {}) disagrees with the CPU reference ({detail}); \
             every candidate would be judged against it, so the run stops",
            gpu.shader_file(shader)
        ),
    )
}
