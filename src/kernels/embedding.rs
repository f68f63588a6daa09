//! embedding.wgsl launchers: out (B,T,C) = wte[tokens] + wpe[t], and its deterministic backward
//! (dwte += per-token sums of dout through a CPU-built index, dwpe += dout summed over the batch).
//!
//! The token table may be split into row chunks (GPT-2's wte is 154 MB in f32, over many devices'
//! 128 MiB binding limit): each call takes one `TableChunk`, a view `(V_chunk, C)` holding
//! vocabulary rows `[row0, row0 + V_chunk)`, and touches only the positions whose token lies in it.
//!
//! f16 tables (inference): `forward` also takes wte and wpe as f16 views (both f16, output f32),
//! selecting the F16 variant of embedding.wgsl; this needs the adapter's SHADER_F16 feature
//! (`Gpu::has_f16`), and an f16 table on an adapter without it is an error naming the tensor.
//! The backward stays f32.
//! Legend: B batch, T sequence, C channels, V vocabulary.

use bytemuck::{Pod, Zeroable};

use super::harness::{self, BenchOptions, BenchReport, CheckReport, Family};
use super::{bytes_of, expect, expect_dims};
use crate::error::{Error, Result};
use crate::gpu::{
    Binding, Cost, DType, Dispatch, Gpu, KernelSpec, Shader, ShaderVariant, View, grid,
};
use crate::reference;
use crate::rng::Rng;

use super::round_f16;
use Binding::{Read, ReadWrite};

const WG: u32 = 256;
/// Segment groups of the dwte kernel: workgroups per block of WG channels, each striding over the
/// index's segments. Enough to fill a large GPU, few enough that workgroups rarely find no segment.
const SEGMENT_GROUPS: usize = 1024;

pub const FORWARD: KernelSpec = KernelSpec {
    shader: Shader::Embedding,
    variant: ShaderVariant::Base,
    entry: "embedding_forward",
    bindings: &[Read, Read, Read, ReadWrite],
};
pub const FORWARD_VEC4: KernelSpec = KernelSpec {
    shader: Shader::Embedding,
    variant: ShaderVariant::Base,
    entry: "embedding_forward_vec4",
    bindings: &[Read, Read, Read, ReadWrite],
};
/// The forward kernels over f16 tables (embedding.wgsl's F16 variant): same entries and bindings.
pub const FORWARD_F16: KernelSpec = FORWARD.with_variant(ShaderVariant::F16);
pub const FORWARD_VEC4_F16: KernelSpec = FORWARD_VEC4.with_variant(ShaderVariant::F16);
pub const BACKWARD_WTE: KernelSpec = KernelSpec {
    shader: Shader::Embedding,
    variant: ShaderVariant::Base,
    entry: "embedding_backward_wte",
    bindings: &[Read, Read, Read, ReadWrite],
};
pub const BACKWARD_WPE: KernelSpec = KernelSpec {
    shader: Shader::Embedding,
    variant: ShaderVariant::Base,
    entry: "embedding_backward_wpe",
    bindings: &[Read, ReadWrite],
};

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct Params {
    bt: u32,
    t: u32,
    c: u32,
    row0: u32,
    v_chunk: u32,
    b: u32,
    groups: u32,
}

/// The shape of an embedding: B sequences of T tokens, C channels.
pub use crate::reference::embedding::Dims;

/// One chunk of the token table, or of its gradient: `view` (V_chunk, C) holds vocabulary rows
/// [row0, row0 + V_chunk). A table that is not split is one chunk at row 0 (`TableChunk::whole`).
#[derive(Clone, Copy, Debug)]
pub struct TableChunk<'a> {
    pub view: &'a View,
    pub row0: usize,
}

impl<'a> TableChunk<'a> {
    /// The whole table: one chunk starting at vocabulary row 0.
    pub fn whole(view: &'a View) -> Self {
        TableChunk { view, row0: 0 }
    }
}

/// The layout of `Params`, for the test that compares it with `Params` in the shader.
pub fn params_layout() -> super::ParamsLayout {
    super::params_layout!(Params {
        bt,
        t,
        c,
        row0,
        v_chunk,
        b,
        groups
    })
}

/// Checks that `view` is a `dtype` table of whole rows of `c` channels, at least `min_rows` of
/// them, and returns its number of rows.
fn expect_rows(
    kernel: &str,
    view: &View,
    dtype: DType,
    c: usize,
    min_rows: usize,
    what: &str,
) -> Result<usize> {
    if view.dtype != dtype
        || view.len == 0
        || !view.len.is_multiple_of(c)
        || view.len / c < min_rows
    {
        return Err(Error::Shape {
            kernel: kernel.to_string(),
            tensor: view.name.to_string(),
            expected: format!("{} elements forming {what} rows of C = {c}", dtype.name()),
            got: format!("{} {} elements", view.len, view.dtype.name()),
        });
    }
    Ok(view.len / c)
}

/// Checks B, T, C and that B·T·C elements can be indexed with u32 in the shaders.
fn expect_btc(kernel: &str, Dims { b, t, c }: Dims) -> Result<()> {
    expect_dims(kernel, &[("B", b), ("T", t), ("C", c)])?;
    if b.checked_mul(t)
        .and_then(|bt| bt.checked_mul(c))
        .is_none_or(|n| n > u32::MAX as usize)
    {
        return Err(Error::invalid(
            kernel,
            format!("B·T·C = {b}·{t}·{c} exceeds the u32 index range"),
        ));
    }
    Ok(())
}

/// out (B,T,C) = wte[tokens[b,t]] + wpe[t], tokens (B,T) u32, wte a `TableChunk` (V_chunk, C)
/// holding vocabulary rows [wte.row0, wte.row0 + V_chunk), wpe (maxT, C) with T <= maxT.
/// Rows whose token is outside the chunk are left untouched, so calling it once per chunk of a
/// split table writes every row exactly once. Overwrites. Tokens >= V are the caller's error; their
/// rows are left untouched and nothing is read or written out of bounds.
/// wte and wpe are both f32, or both f16 (inference weights, on adapters with SHADER_F16: widened
/// to f32 and added in f32); out is f32.
pub fn forward(
    gpu: &Gpu,
    out: &View,
    tokens: &View,
    wte: TableChunk,
    wpe: &View,
    dims: Dims,
) -> Result<Dispatch> {
    forward_variant(gpu, out, tokens, wte, wpe, dims, true)
}

/// `forward`, choosing the four-channels-per-thread kernel when `vec4` allows and the shapes and
/// alignments permit it.
fn forward_variant(
    gpu: &Gpu,
    out: &View,
    tokens: &View,
    wte: TableChunk,
    wpe: &View,
    dims: Dims,
    vec4: bool,
) -> Result<Dispatch> {
    let Dims { b, t, c } = dims;
    let (wte, wte_row0) = (wte.view, wte.row0);
    // f16 tables select embedding.wgsl's F16 variant; wpe must match wte.
    let f16 = wte.dtype == DType::F16;
    let (table, scalar_spec, vec4_spec) = if f16 {
        (DType::F16, &FORWARD_F16, &FORWARD_VEC4_F16)
    } else {
        (DType::F32, &FORWARD, &FORWARD_VEC4)
    };
    let name = scalar_spec.name();
    expect_btc(&name, dims)?;
    let bt = b * t;
    expect(&name, out, DType::F32, bt * c)?;
    expect(&name, tokens, DType::U32, bt)?;
    let v_chunk = expect_rows(&name, wte, table, c, 1, "V_chunk >= 1")?;
    expect_rows(&name, wpe, table, c, t, &format!("maxT >= T = {t}"))?;
    super::expect_f16_support(gpu, &name, wte)?;
    if wte_row0
        .checked_add(v_chunk)
        .is_none_or(|end| end > u32::MAX as usize)
    {
        return Err(Error::invalid(
            &name,
            format!("wte rows [{wte_row0}, {wte_row0} + {v_chunk}) exceed the u32 token range"),
        ));
    }
    // vec4 reads: 16 bytes of out, 4 · (2 or 4) bytes of the tables.
    let vec4 = vec4
        && c.is_multiple_of(4)
        && out.offset.is_multiple_of(16)
        && [wte, wpe]
            .iter()
            .all(|v| v.offset.is_multiple_of(4 * table.size()));
    let (spec, lanes) = if vec4 {
        (vec4_spec, c / 4)
    } else {
        (scalar_spec, c)
    };
    let params = Params {
        bt: bt as u32,
        t: t as u32,
        c: lanes as u32,
        row0: wte_row0 as u32,
        v_chunk: v_chunk as u32,
        b: b as u32,
        groups: 0,
    };
    let n = (bt * c) as u64;
    let cost = Cost {
        flops: n,
        // tokens, then wte rows, wpe and out (every token in the chunk)
        bytes: 4 * bt as u64 + (2 * table.size() + 4) * n,
    };
    let wg = grid(
        ((bt * lanes) as u32).div_ceil(WG),
        gpu.limits.max_compute_workgroups_per_dimension,
    );
    gpu.dispatch(
        spec,
        &[],
        bytes_of(&params),
        &[tokens, wte, wpe, out],
        wg,
        cost,
    )
}

/// Length of the index `backward_index` builds for B·T = `bt` positions: 1 + 4·bt u32s.
pub fn backward_index_len(bt: usize) -> usize {
    1 + 4 * bt
}

/// The CPU-built index that makes the backward deterministic without atomics (llm.c's approach):
/// positions grouped by token id in a fixed order. Fixed length for a given B·T (`tokens.len()`),
/// so its buffer is allocated once. Layout, u32 throughout, with BT = tokens.len():
/// - `index[0]`: S, the number of distinct tokens (segments);
/// - `index[1 + 3s ..= 3 + 3s]`: (token, start, count) of segment s < S, in increasing token
///   order; the slots of s in [S, BT) are zero;
/// - `index[1 + 3·BT + k]`, k < BT: the positions b·T + t sorted by token, stable (increasing
///   position within a token); segment s owns entries [start, start + count).
pub fn backward_index(tokens: &[u32]) -> Vec<u32> {
    let bt = tokens.len();
    let mut positions: Vec<u32> = (0..bt as u32).collect();
    positions.sort_by_key(|&p| tokens[p as usize]);
    let mut index = vec![0u32; backward_index_len(bt)];
    let mut segments = 0usize;
    let mut k = 0usize;
    while k < bt {
        let token = tokens[positions[k] as usize];
        let start = k;
        while k < bt && tokens[positions[k] as usize] == token {
            k += 1;
        }
        index[1 + 3 * segments..4 + 3 * segments].copy_from_slice(&[
            token,
            start as u32,
            (k - start) as u32,
        ]);
        segments += 1;
    }
    index[0] = segments as u32;
    index[1 + 3 * bt..].copy_from_slice(&positions);
    index
}

/// dwte (V_chunk, C) += Σ over positions with that token of dout (B,T,C) (a `TableChunk` of rows
/// [dwte.row0, dwte.row0 + V_chunk)); dwpe (maxT, C) rows [0, T) += Σ_b dout[b, t]. Accumulates.
/// Deterministic: every element is summed in a fixed order, no atomics. dwpe is only updated when
/// `dwpe` is Some (so with a split wte it is added once). `index` is `backward_index(tokens)` for
/// the same `tokens` (B,T); a position whose token disagrees with its index segment makes that
/// segment's dwte row NaN, so a stale index cannot go unnoticed.
/// Returns the dwte dispatch, then the dwpe one when requested.
pub fn backward(
    gpu: &Gpu,
    dwte: TableChunk,
    dwpe: Option<&View>,
    dout: &View,
    tokens: &View,
    index: &View,
    dims: Dims,
) -> Result<Vec<Dispatch>> {
    let Dims { b, t, c } = dims;
    let (dwte, wte_row0) = (dwte.view, dwte.row0);
    let name = BACKWARD_WTE.name();
    expect_btc(&name, dims)?;
    let bt = b * t;
    let v_chunk = expect_rows(&name, dwte, DType::F32, c, 1, "V_chunk >= 1")?;
    if let Some(dwpe) = dwpe {
        expect_rows(&name, dwpe, DType::F32, c, t, &format!("maxT >= T = {t}"))?;
    }
    expect(&name, dout, DType::F32, bt * c)?;
    expect(&name, tokens, DType::U32, bt)?;
    expect(&name, index, DType::U32, backward_index_len(bt))?;
    if wte_row0
        .checked_add(v_chunk)
        .is_none_or(|end| end > u32::MAX as usize)
    {
        return Err(Error::invalid(
            &name,
            format!("dwte rows [{wte_row0}, {wte_row0} + {v_chunk}) exceed the u32 token range"),
        ));
    }
    let blocks = c.div_ceil(WG as usize);
    let groups = bt.min(SEGMENT_GROUPS);
    let workgroups = groups
        .checked_mul(blocks)
        .filter(|&g| g <= u32::MAX as usize)
        .ok_or_else(|| Error::invalid(&name, format!("C = {c} needs too many workgroups")))?;
    let params = Params {
        bt: bt as u32,
        t: t as u32,
        c: c as u32,
        row0: wte_row0 as u32,
        v_chunk: v_chunk as u32,
        b: b as u32,
        groups: groups as u32,
    };
    let max = gpu.limits.max_compute_workgroups_per_dimension;
    let n = (bt * c) as u64;
    let mut out = vec![gpu.dispatch(
        &BACKWARD_WTE,
        &[],
        bytes_of(&params),
        &[dout, tokens, index, dwte],
        grid(workgroups as u32, max),
        Cost {
            flops: n,
            // dout, tokens and index, then dwte rows read and written (every token distinct)
            bytes: 12 * n + 4 * (bt + backward_index_len(bt)) as u64,
        },
    )?];
    if let Some(dwpe) = dwpe {
        let tc = (t * c) as u64;
        out.push(gpu.dispatch(
            &BACKWARD_WPE,
            &[],
            bytes_of(&params),
            &[dout, dwpe],
            grid((tc as u32).div_ceil(WG), max),
            Cost {
                flops: n,
                bytes: 4 * n + 8 * tc,
            },
        )?);
    }
    Ok(out)
}

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
