// The counter hash of the dropout masks, included by dropout.wgsl and attention.wgsl. src/hash.rs
// is its Rust twin, bit for bit (tests/kernels/dropout.rs compares them on many inputs).
//
// A mask is a pure function of (seed, step, position): nothing is stored, a backward pass
// regenerates its forward's mask, and a new step counter gives a new mask.

// PCG-RXS-M-XS output permutation of one LCG step: a bijective 32-bit hash.
fn pcg(v: u32) -> u32 {
    let state = v * 747796405u + 2891336453u;
    let word = ((state >> ((state >> 28u) + 4u)) ^ state) * 277803737u;
    return (word >> 22u) ^ word;
}

// The key of the mask of (seed, step).
fn mask_key(seed: u32, step: u32) -> u32 {
    return pcg(seed ^ pcg(step));
}

// The hash of element i of a 1-D mask (dropout.wgsl).
fn element_hash(key: u32, i: u32) -> u32 {
    return pcg(key ^ pcg(i));
}

// The hash of cell (row, j) of a 2-D mask (attention.wgsl: row (b·NH + h)·Tq + i, key j).
fn cell_hash(key: u32, row: u32, j: u32) -> u32 {
    return pcg(pcg(key ^ pcg(row)) ^ j);
}
