//! The counter hash of the dropout masks, shared by the launchers (`kernels::dropout`,
//! `kernels::attention`) and the CPU reference. shaders/include/hash.wgsl is its WGSL twin, bit
//! for bit; tests/kernels/dropout.rs runs both on many inputs and compares.
//!
//! A mask is a pure function of (seed, step, position): nothing is stored, a backward pass
//! regenerates its forward's mask, and a new step counter gives a new mask. A position is dropped
//! when its hash is below `threshold(p)`, and kept values are scaled by `scale(p)`.

/// PCG-RXS-M-XS output permutation of one LCG step: a bijective 32-bit hash (WGSL `pcg`).
pub fn pcg(v: u32) -> u32 {
    let state = v.wrapping_mul(747_796_405).wrapping_add(2_891_336_453);
    let word = ((state >> ((state >> 28) + 4)) ^ state).wrapping_mul(277_803_737);
    (word >> 22) ^ word
}

/// The key of the mask of (`seed`, `step`) (WGSL `mask_key`).
pub fn mask_key(seed: u32, step: u32) -> u32 {
    pcg(seed ^ pcg(step))
}

/// The hash of element `i` of a 1-D mask (WGSL `element_hash`; dropout).
pub fn element_hash(key: u32, i: u32) -> u32 {
    pcg(key ^ pcg(i))
}

/// The hash of cell (`row`, `j`) of a 2-D mask (WGSL `cell_hash`; attention dropout).
pub fn cell_hash(key: u32, row: u32, j: u32) -> u32 {
    pcg(pcg(key ^ pcg(row)) ^ j)
}

/// Positions whose hash is below this are dropped: round-down of p · 2³², 0 for p = 0.
pub fn threshold(p: f32) -> u32 {
    (p as f64 * 4_294_967_296.0).clamp(0.0, u32::MAX as f64) as u32
}

/// The factor kept values are scaled by, 1 / (1 - p), rounded once to f32.
pub fn scale(p: f32) -> f32 {
    (1.0 / (1.0 - p as f64)) as f32
}

/// Dropout on a tensor: drop probability `p` in [0, 1), the stream's `seed` and the `step`
/// counter that picks this step's mask.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Dropout {
    pub p: f32,
    pub seed: u32,
    pub step: u32,
}

impl Dropout {
    /// Whether element `i` of a 1-D mask is kept (dropout.wgsl).
    pub fn keeps(self, i: u32) -> bool {
        element_hash(mask_key(self.seed, self.step), i) >= threshold(self.p)
    }

    /// Whether cell (`row`, `j`) of a 2-D mask is kept (attention.wgsl).
    pub fn keeps_cell(self, row: u32, j: u32) -> bool {
        cell_hash(mask_key(self.seed, self.step), row, j) >= threshold(self.p)
    }
}
