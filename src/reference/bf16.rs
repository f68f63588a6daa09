//! f32 to bf16 and back, as convert.wgsl stores bf16: round to nearest, ties to even (a NaN stays
//! a NaN), two values to a 32-bit word, the first in the low half.

/// The bf16 words of `x`: value 2w in the low half of word w, 2w + 1 in the high half (0 past
/// the end).
pub fn to_bf16(y: &mut [u32], x: &[f32]) {
    assert_eq!(y.len(), x.len().div_ceil(2));
    for (w, pair) in y.iter_mut().zip(x.chunks(2)) {
        let lo = half::bf16::from_f32(pair[0]).to_bits() as u32;
        let hi = pair
            .get(1)
            .map_or(0, |&v| half::bf16::from_f32(v).to_bits() as u32);
        *w = lo | (hi << 16);
    }
}

/// The `y.len()` values held in the bf16 words `x`, widened to f32 (exact).
pub fn from_bf16(y: &mut [f32], x: &[u32]) {
    assert_eq!(x.len(), y.len().div_ceil(2));
    for (i, v) in y.iter_mut().enumerate() {
        let bits = (x[i / 2] >> (16 * (i % 2))) & 0xffff;
        *v = f32::from_bits(bits << 16);
    }
}

/// `x` rounded to bf16 and widened back: what a tensor stored in bf16 holds.
pub fn round_bf16(x: &[f32]) -> Vec<f32> {
    x.iter()
        .map(|&v| half::bf16::from_f32(v).to_f32())
        .collect()
}
