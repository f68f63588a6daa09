// What the row-normalising families (layernorm.wgsl, rmsnorm.wgsl) share: their parameters, the
// workgroup geometry their launchers choose (one choice for both, src/kernels/layernorm), the
// grid index and the workgroup tree sums.

struct Params {
    n: u32,              // rows N
    c: u32,              // channels C
    rows_per_block: u32, // backward: rows per workgroup, at most MAX_ROWS
    blocks: u32,         // backward: P = ceil(N / rows_per_block)
    accumulate: u32,     // backward: 0 overwrites dinp, 1 adds to it
    eps: f32,
}

// Threads per workgroup: a power of two, at most 256. (Any size is correct for layernorm's
// subgroup reductions; the launcher takes a power of two.)
override WG: u32 = 256u;
// Threads per row in the tree row reductions, a power of two, at most WG.
override TPR: u32 = 32u;
// The *_backward_params entry points: channels per workgroup; WG / COLS must be a power of two.
override COLS: u32 = 32u;

// Rows of one backward block at most.
const MAX_ROWS: u32 = 256u;

@group(0) @binding(0) var<uniform> p: Params;

#include "include/grid.wgsl"

// Tree sums in red_f32 / red_vec2 (one slot per invocation).
#include "include/reduce_wg.wgsl"

// The rows a *_backward_rows workgroup owns: row0 .. row0 + rows of block `index`; rows = 0 past
// the last block of a folded grid.
struct RowBlock {
    index: u32,
    row0: u32,
    rows: u32,
}

fn row_block(wid: vec3<u32>, nwg: vec3<u32>) -> RowBlock {
    let blk = workgroup_index(wid, nwg);
    if (blk >= p.blocks) {
        return RowBlock(blk, p.n, 0u);
    }
    let row0 = blk * p.rows_per_block;
    return RowBlock(blk, row0, min(p.rows_per_block, p.n - row0));
}

// A *_backward_params invocation: channel ch, column col of the workgroup's COLS, summing the
// blocks lane, lane + WG / COLS, ... (The lane count WG / COLS stays out of the struct: a value
// read from a struct that holds an invocation's index is non-uniform to WGSL's uniformity
// analysis, and the tree sum's barriers loop over the lane count.)
struct ColLane {
    col: u32,
    lane: u32,
    ch: u32,
}

fn col_lane(wid: vec3<u32>, nwg: vec3<u32>, l: u32) -> ColLane {
    let col = l % COLS;
    return ColLane(col, l / COLS, global_index(wid, nwg, COLS, col));
}
