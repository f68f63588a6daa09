// Rotary position embedding in Hugging Face's rotate-half layout, and its backward.
//
// rope_rotate: one thread per pair (b, t, h, i), i < D/2 = p.half; P = B · T · H · D/2 pairs,
//   folded over x and y (see gpu::grid).
//   inp (B, T, H, D), inv_freq (D/2)
//   For the first p.rotated heads of each token row, with a = f32(pos0 + t) · inv_freq[i]
//   (pos0 = p.pos0 + step.pos0, the launcher's and the per-step uniform's) and
//   sign = +1 (forward) or -1 (backward, the rotation by -a):
//     out[i]       = inp[i] · cos a - inp[i + D/2] · sign · sin a
//     out[i + D/2] = inp[i + D/2] · cos a + inp[i] · sign · sin a
//   and out = inp for heads h ≥ p.rotated (a fused q/k/v row's values).  overwrites out
//
// The angle is rounded to f32 as transformers rounds it; cos and sin then see it reduced to
// [-π, π] (reduce_angle), where WGSL's built-ins are accurate, rather than positions times
// frequencies of up to 4·10⁵ radians.

struct Params {
    pairs: u32,   // B · T · H · D/2
    t: u32,       // T: positions are pos0 + (row mod T)
    heads: u32,   // H: heads per token row
    rotated: u32, // heads rotated, the first of each row
    half: u32,    // D/2
    pos0: u32,    // position of t = 0, less the per-step uniform's pos0
    sign: f32,    // +1 forward, -1 backward
    zero: f32,    // 0.0, see rope_rotate
}

override WG: u32 = 256u;

@group(0) @binding(0) var<uniform> p: Params;
// Bindings for rope_rotate: 1 = inp, 2 = inv_freq (read); 3 = out (read_write).
@group(0) @binding(1) var<storage, read> inp: array<f32>;
@group(0) @binding(2) var<storage, read> inv_freq: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;
#include "include/step.wgsl"

// 2π in three parts (Cody and Waite): TWO_PI_1 and TWO_PI_2 have 8 significant bits each, so
// k · TWO_PI_1 and k · TWO_PI_2 are exact for k < 2^16 (angles below 4·10⁵, which the launcher
// guarantees), and so is a - k · TWO_PI_1; TWO_PI_3 carries the rest of 2π, and its product
// (about 10⁻¹) rounds by under 10⁻⁸. The reduced angle is then off by at most a rounding of
// itself.
const TWO_PI_1: f32 = 6.28125;
const TWO_PI_2: f32 = 1.93023681640625e-3; // 253 / 2^17
const TWO_PI_3: f32 = 5.070363179981996e-6;
const INV_TWO_PI: f32 = 0.15915494309189535;

// a - k · 2π for the k that brings it nearest zero.
fn reduce_angle(a: f32) -> f32 {
    let k = round(a * INV_TWO_PI);
    return ((a - k * TWO_PI_1) - k * TWO_PI_2) - k * TWO_PI_3;
}

@compute @workgroup_size(WG)
fn rope_rotate(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
               @builtin(local_invocation_id) lid: vec3<u32>) {
    let j = (wid.x + wid.y * nwg.x) * WG + lid.x;
    if (j >= p.pairs) {
        return;
    }
    let i = j % p.half;
    let head = j / p.half; // (b · T + t) · H + h
    let h = head % p.heads;
    let row = head / p.heads; // b · T + t
    let lo = head * 2u * p.half + i;
    let hi = lo + p.half;
    let x1 = inp[lo];
    let x2 = inp[hi];
    if (h >= p.rotated) {
        out[lo] = x1;
        out[hi] = x2;
        return;
    }
    let pos = p.pos0 + step.pos0 + row % p.t;
    // + p.zero (0.0, unknown to the compiler) rounds the product to f32 even where the compiler
    // fuses a multiply with the add after it: a fused pos · inv_freq - k · 2π would skip the
    // rounding that transformers applies, and at position 10⁴ that is 10⁻³ radians.
    let a = reduce_angle(f32(pos) * inv_freq[i] + p.zero);
    let c = cos(a);
    let s = p.sign * sin(a);
    out[lo] = x1 * c - x2 * s;
    out[hi] = x2 * c + x1 * s;
}
