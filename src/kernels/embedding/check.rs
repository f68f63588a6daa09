//! `shaderformer kernels check|bench embedding`: embedding.wgsl against the CPU reference on awkward
//! shapes, and its variants timed.

use super::*;
use crate::kernels::harness::{self, BenchOptions, BenchReport, CheckReport, Family};
use crate::reference;
use crate::rng::Rng;

pub const FAMILY: Family = Family {
    name: "embedding",
    about: "out = wte[tokens] + wpe[t] (table split in K chunks); backward dwte, dwpe (+=)",
    shape_help: "BxTxCxV[xK]",
    default_shapes: &[
        &[1, 1, 1, 1],
        &[2, 3, 45, 7],
        &[3, 65, 127, 129],
        &[1, 129, 64, 45],
        &[2, 45, 65, 129, 2],
        &[3, 33, 128, 1000, 3],
    ],
    bench_shape: &[8, 1024, 768, 50257],
    check,
    bench,
};

/// Splits `v` rows into `k` chunks of near-equal size: (first row, rows) for each.
fn chunks(v: usize, k: usize) -> Vec<(usize, usize)> {
    let rows = v.div_ceil(k.clamp(1, v));
    (0..v)
        .step_by(rows)
        .map(|r0| (r0, rows.min(v - r0)))
        .collect()
}

fn parse(shape: &[usize]) -> Result<(usize, usize, usize, usize, usize)> {
    match *shape {
        [b, t, c, v] => Ok((b, t, c, v, 1)),
        [b, t, c, v, k] => Ok((b, t, c, v, k)),
        _ => Err(Error::invalid(
            "--shape",
            format!(
                "embedding takes BxTxCxV or BxTxCxVxK (K table chunks), got {} dimensions",
                shape.len()
            ),
        )),
    }
}

/// The check's inputs on the CPU. A third of the positions share one token, so some index
/// segments are long.
struct CheckInputs {
    tokens: Vec<u32>, // (B, T)
    wte: Vec<f32>,    // (V, C)
    wpe: Vec<f32>,    // (T + 2, C)
    out0: Vec<f32>,   // (B, T, C), the output's prior contents
    dout: Vec<f32>,   // (B, T, C)
    dwte0: Vec<f32>,  // (V, C), the gradient the backward accumulates into
    dwpe0: Vec<f32>,  // (T + 2, C)
}

fn check_inputs(b: usize, t: usize, c: usize, v: usize, k: usize) -> CheckInputs {
    let bt = b * t;
    let max_t = t + 2;
    let mut rng = Rng::new((b * 1_000_003 + t * 1009 + c * 31 + v * 7 + k) as u64);
    let hot = (v / 2) as u32;
    let tokens: Vec<u32> = (0..bt)
        .map(|_| {
            if rng.below(3) == 0 {
                hot
            } else {
                rng.below(v as u64) as u32
            }
        })
        .collect();
    let wte = rng.vec_uniform(v * c, -1.0, 1.0);
    let wpe = rng.vec_uniform(max_t * c, -1.0, 1.0);
    let out0 = rng.vec_uniform(bt * c, -1.0, 1.0);
    let dout = rng.vec_uniform(bt * c, -1.0, 1.0);
    let dwte0 = rng.vec_uniform(v * c, -1.0, 1.0);
    let dwpe0 = rng.vec_uniform(max_t * c, -1.0, 1.0);
    CheckInputs {
        tokens,
        wte,
        wpe,
        out0,
        dout,
        dwte0,
        dwpe0,
    }
}

/// The check's inputs on the GPU, wte and dwte split into the chunks `parts`.
struct CheckBuffers {
    tokens: View,
    wpe: View,
    out: View,
    dout: View,
    dwpe: View,
    index: View,
    wte: Vec<View>,
    dwte: Vec<View>,
}

fn upload_check(
    gpu: &Gpu,
    x: &CheckInputs,
    parts: &[(usize, usize)],
    c: usize,
) -> Result<CheckBuffers> {
    let tokens = gpu.upload_u32("tokens", &x.tokens)?;
    let wpe = gpu.upload_f32("wpe", &x.wpe)?;
    let out = gpu.upload_f32("out", &x.out0)?;
    let dout = gpu.upload_f32("dout", &x.dout)?;
    let dwpe = gpu.upload_f32("dwpe", &x.dwpe0)?;
    let index = gpu.upload_u32("index", &backward_index(&x.tokens))?;
    let mut wte = Vec::new();
    let mut dwte = Vec::new();
    for (i, &(r0, rows)) in parts.iter().enumerate() {
        wte.push(gpu.upload_f32(&format!("wte{i}"), &x.wte[r0 * c..(r0 + rows) * c])?);
        dwte.push(gpu.upload_f32(&format!("dwte{i}"), &x.dwte0[r0 * c..(r0 + rows) * c])?);
    }
    Ok(CheckBuffers {
        tokens,
        wpe,
        out,
        dout,
        dwpe,
        index,
        wte,
        dwte,
    })
}

fn check(gpu: &Gpu, shape: &[usize]) -> Result<Vec<CheckReport>> {
    let (b, t, c, v, k) = parse(shape)?;
    let dims = Dims { b, t, c };
    let s = format!("B={b} T={t} C={c} V={v} K={k}");
    let x = check_inputs(b, t, c, v, k);
    let parts = chunks(v, k);
    let g = upload_check(gpu, &x, &parts, c)?;
    let mut reports = check_forward(gpu, &s, &x, &g, &parts, dims)?;
    if gpu.has_f16() {
        reports.push(check_forward_f16(gpu, &s, &x, &g.tokens, &parts, dims)?);
    }
    reports.extend(check_backward(gpu, &s, &x, &g, &parts, dims)?);
    Ok(reports)
}

/// Forward, one chunk at a time; after the first, positions of other chunks are untouched.
fn check_forward(
    gpu: &Gpu,
    s: &str,
    x: &CheckInputs,
    g: &CheckBuffers,
    parts: &[(usize, usize)],
    dims: Dims,
) -> Result<Vec<CheckReport>> {
    let c = dims.c;
    let mut reports = Vec::new();
    let mut out = x.out0.clone();
    for (i, &(r0, rows)) in parts.iter().enumerate() {
        let chunk = TableChunk {
            view: &g.wte[i],
            row0: r0,
        };
        gpu.run(&[forward(gpu, &g.out, &g.tokens, chunk, &g.wpe, dims)?])?;
        let wte = &x.wte[r0 * c..(r0 + rows) * c];
        reference::embedding::forward(&mut out, &x.tokens, wte, r0, &x.wpe, dims);
        if i == 0 && parts.len() > 1 {
            let got = gpu.read_f32(&g.out)?;
            reports.push(CheckReport::new(
                s,
                "forward out, chunk 0 only",
                &got,
                &out,
                0.0,
                0.0,
            ));
        }
    }
    reports.push(CheckReport::new(
        s,
        "forward out",
        &gpu.read_f32(&g.out)?,
        &out,
        0.0,
        0.0,
    ));
    Ok(reports)
}

/// Forward with f16 tables: exactly the f32 sums of the f16-rounded tables.
fn check_forward_f16(
    gpu: &Gpu,
    s: &str,
    x: &CheckInputs,
    g_tokens: &View,
    parts: &[(usize, usize)],
    dims: Dims,
) -> Result<CheckReport> {
    let c = dims.c;
    let (wte16, wte_rounded) = round_f16(&x.wte);
    let (wpe16, wpe_rounded) = round_f16(&x.wpe);
    let g_wpe16 = gpu.upload("wpe16", DType::F16, &wpe16)?;
    let g_out16 = gpu.upload_f32("out16", &x.out0)?;
    let mut dispatches = Vec::new();
    let mut out16 = x.out0.clone();
    let mut tables = Vec::new();
    for (i, &(r0, rows)) in parts.iter().enumerate() {
        let chunk = r0 * c..(r0 + rows) * c;
        tables.push(gpu.upload(&format!("wte16_{i}"), DType::F16, &wte16[chunk.clone()])?);
        let wte16 = TableChunk {
            view: &tables[i],
            row0: r0,
        };
        dispatches.push(forward(gpu, &g_out16, g_tokens, wte16, &g_wpe16, dims)?);
        reference::embedding::forward(
            &mut out16,
            &x.tokens,
            &wte_rounded[chunk],
            r0,
            &wpe_rounded,
            dims,
        );
    }
    gpu.run(&dispatches)?;
    Ok(CheckReport::new(
        s,
        "forward out, f16 tables",
        &gpu.read_f32(&g_out16)?,
        &out16,
        0.0,
        0.0,
    ))
}

/// Backward, one chunk at a time, dwpe with the first chunk only; reference in f64.
fn check_backward(
    gpu: &Gpu,
    s: &str,
    x: &CheckInputs,
    g: &CheckBuffers,
    parts: &[(usize, usize)],
    dims: Dims,
) -> Result<[CheckReport; 2]> {
    for (i, &(r0, _)) in parts.iter().enumerate() {
        let dwpe = (i == 0).then_some(&g.dwpe);
        let dwte = TableChunk {
            view: &g.dwte[i],
            row0: r0,
        };
        gpu.run(&backward(
            gpu, dwte, dwpe, &g.dout, &g.tokens, &g.index, dims,
        )?)?;
    }
    let mut dwte: Vec<f64> = reference::convert(&x.dwte0);
    let mut dwpe: Vec<f64> = reference::convert(&x.dwpe0);
    let dout64: Vec<f64> = reference::convert(&x.dout);
    reference::embedding::backward(&mut dwte, 0, Some(&mut dwpe), &dout64, &x.tokens, dims);
    let mut got_dwte = Vec::with_capacity(x.dwte0.len());
    for view in &g.dwte {
        got_dwte.extend(gpu.read_f32(view)?);
    }
    Ok([
        CheckReport::new(s, "backward dwte", &got_dwte, &dwte, 1e-5, 1e-5),
        CheckReport::new(
            s,
            "backward dwpe",
            &gpu.read_f32(&g.dwpe)?,
            &dwpe,
            1e-5,
            1e-5,
        ),
    ])
}

fn bench(gpu: &Gpu, shape: &[usize], opts: &BenchOptions) -> Result<Vec<BenchReport>> {
    let (b, t, c, v, k) = parse(shape)?;
    let dims = Dims { b, t, c };
    // As many table chunks as the binding limit requires (or more, when asked).
    let rows_per_binding = (gpu.max_binding() / (4 * c as u64)).max(1) as usize;
    let parts = chunks(v, k.max(v.div_ceil(rows_per_binding)));
    let s = format!("B={b} T={t} C={c} V={v} K={}", parts.len());
    let tokens = zipf_tokens(b * t, v);
    let g_tokens = gpu.upload_u32("tokens", &tokens)?;
    let wpe = gpu.zeros("wpe", DType::F32, t * c)?;
    let out = gpu.zeros("out", DType::F32, b * t * c)?;
    let mut wte = Vec::new();
    for (i, &(_, rows)) in parts.iter().enumerate() {
        wte.push(gpu.zeros(&format!("wte{i}"), DType::F32, rows * c)?);
    }
    let bench = BenchCase {
        gpu,
        opts,
        s: &s,
        dims,
        parts: &parts,
        tokens: &g_tokens,
        out: &out,
    };
    let mut reports = bench.forward(&wte, &wpe)?;
    if gpu.has_f16() {
        reports.push(bench.forward_f16()?);
    }
    reports.extend(bench.backward(&tokens, &wte, &wpe)?);
    Ok(reports)
}

/// Log-uniform token ids in [0, v) (Zipf-like, as in text): a few ids repeat often, most are rare.
fn zipf_tokens(bt: usize, v: usize) -> Vec<u32> {
    let mut rng = Rng::new(1);
    (0..bt)
        .map(|_| (((v as f64 + 1.0).ln() * rng.uniform()).exp() as usize - 1).min(v - 1) as u32)
        .collect()
}

/// What every benchmark of one shape shares: the table split `parts`, the tokens and the output.
struct BenchCase<'a> {
    gpu: &'a Gpu,
    opts: &'a BenchOptions,
    s: &'a str,
    dims: Dims,
    parts: &'a [(usize, usize)],
    tokens: &'a View,
    out: &'a View,
}

impl BenchCase<'_> {
    /// The f32 forward, vec4 and (when C allows vec4) scalar.
    fn forward(&self, wte: &[View], wpe: &View) -> Result<Vec<BenchReport>> {
        let Dims { b, t, c } = self.dims;
        let (bt, n) = (b * t, (b * t * c) as u64);
        // Bytes a perfect kernel moves: tokens, the rows used, wpe, out.
        let fw_cost = Cost {
            flops: n,
            bytes: 4 * bt as u64 + 4 * n + 4 * (t * c) as u64 + 4 * n,
        };
        let mut reports = Vec::new();
        for (variant, vec4) in [("forward", true), ("forward scalar", false)] {
            if variant == "forward scalar" && !c.is_multiple_of(4) {
                continue;
            }
            let d = self
                .parts
                .iter()
                .zip(wte)
                .map(|(&(row0, _), view)| {
                    let wte = TableChunk { view, row0 };
                    forward_variant(self.gpu, self.out, self.tokens, wte, wpe, self.dims, vec4)
                })
                .collect::<Result<Vec<_>>>()?;
            let mut r = harness::bench_one(self.gpu, self.opts, variant, self.s, &d)?;
            r.cost = fw_cost;
            reports.push(r);
        }
        Ok(reports)
    }

    /// The inference forward: both tables in f16, split as the f32 table is.
    fn forward_f16(&self) -> Result<BenchReport> {
        let (gpu, Dims { b, t, c }) = (self.gpu, self.dims);
        let (bt, n) = (b * t, (b * t * c) as u64);
        let wpe16 = gpu.zeros("wpe16", DType::F16, t * c)?;
        let mut d = Vec::new();
        for (i, &(r0, rows)) in self.parts.iter().enumerate() {
            let w = gpu.zeros(&format!("wte16_{i}"), DType::F16, rows * c)?;
            let wte = TableChunk { view: &w, row0: r0 };
            d.push(forward(gpu, self.out, self.tokens, wte, &wpe16, self.dims)?);
        }
        let mut r = harness::bench_one(gpu, self.opts, "forward f16 tables", self.s, &d)?;
        r.cost = Cost {
            flops: n,
            bytes: 4 * bt as u64 + 2 * n + 2 * (t * c) as u64 + 4 * n,
        };
        Ok(r)
    }

    /// dwte and dwpe, writing into the tables' storage (values are irrelevant here) with `out` as
    /// dout.
    fn backward(&self, tokens: &[u32], wte: &[View], wpe: &View) -> Result<[BenchReport; 2]> {
        let (gpu, Dims { b, t, c }) = (self.gpu, self.dims);
        let (bt, n) = (b * t, (b * t * c) as u64);
        let index = backward_index(tokens);
        let distinct = index[0] as u64;
        let g_index = gpu.upload_u32("index", &index)?;
        let mut d_wte = Vec::new();
        for (i, (&(row0, _), view)) in self.parts.iter().zip(wte).enumerate() {
            let dwpe = (i == 0).then_some(wpe);
            let dwte = TableChunk { view, row0 };
            d_wte.extend(backward(
                gpu,
                dwte,
                dwpe,
                self.out,
                self.tokens,
                &g_index,
                self.dims,
            )?);
        }
        let (wpe_d, wte_d): (Vec<Dispatch>, Vec<Dispatch>) = d_wte
            .into_iter()
            .partition(|d| d.name.ends_with("backward_wpe"));
        let variant = format!("backward dwte ({distinct} ids)");
        let mut r = harness::bench_one(gpu, self.opts, &variant, self.s, &wte_d)?;
        r.cost = Cost {
            flops: n,
            // dout, tokens, index, and each distinct token's row read and written
            bytes: 4 * n + 4 * (bt + backward_index_len(bt)) as u64 + 8 * distinct * c as u64,
        };
        let dwpe = harness::bench_one(gpu, self.opts, "backward dwpe", self.s, &wpe_d)?;
        Ok([r, dwpe])
    }
}
