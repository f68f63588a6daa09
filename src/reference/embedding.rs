//! Token + position embedding, with the vocabulary table possibly split into row chunks.

use super::Real;

/// The shape of an embedding: B sequences of T tokens, C channels per token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dims {
    pub b: usize,
    pub t: usize,
    pub c: usize,
}

/// out (B, T, C) = wte[tokens[b, t] - wte_row0] + wpe[t] for the positions whose token lies in the
/// chunk [wte_row0, wte_row0 + V_chunk) held by wte (V_chunk, C); other positions are untouched.
/// tokens (B, T), wpe (maxT, C) with T <= maxT.
pub fn forward<T: Real>(
    out: &mut [T],
    tokens: &[u32],
    wte: &[T],
    wte_row0: usize,
    wpe: &[T],
    dims: Dims,
) {
    let Dims { b, t, c } = dims;
    let v_chunk = wte.len() / c;
    for bi in 0..b {
        for ti in 0..t {
            let tok = tokens[bi * t + ti] as usize;
            if tok < wte_row0 || tok >= wte_row0 + v_chunk {
                continue;
            }
            let row = tok - wte_row0;
            for ci in 0..c {
                out[(bi * t + ti) * c + ci] = wte[row * c + ci] + wpe[ti * c + ci];
            }
        }
    }
}

/// dwte (V_chunk, C) += dout (B, T, C) at the rows of the positions whose token lies in the chunk;
/// dwpe (maxT, C), when given, += dout summed over b (rows [0, T)).
pub fn backward<T: Real>(
    dwte: &mut [T],
    wte_row0: usize,
    dwpe: Option<&mut [T]>,
    dout: &[T],
    tokens: &[u32],
    dims: Dims,
) {
    let Dims { b, t, c } = dims;
    let v_chunk = dwte.len() / c;
    for bi in 0..b {
        for ti in 0..t {
            let tok = tokens[bi * t + ti] as usize;
            if tok < wte_row0 || tok >= wte_row0 + v_chunk {
                continue;
            }
            let row = tok - wte_row0;
            for ci in 0..c {
                dwte[row * c + ci] += dout[(bi * t + ti) * c + ci];
            }
        }
    }
    if let Some(dwpe) = dwpe {
        for bi in 0..b {
            for ti in 0..t {
                for ci in 0..c {
                    dwpe[ti * c + ci] += dout[(bi * t + ti) * c + ci];
                }
            }
        }
    }
}
