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

mod check;

pub use check::FAMILY;

use bytemuck::{Pod, Zeroable};

use super::{bytes_of, expect, expect_dims};
use crate::error::{Error, Result};
use crate::gpu::{
    Binding, Cost, DType, Dispatch, Gpu, KernelSpec, Shader, ShaderVariant, View, grid,
};

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
