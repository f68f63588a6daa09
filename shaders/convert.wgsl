// Storage conversions between f32 and bf16 (bfloat16: the upper 16 bits of an f32's pattern).
// WGSL has no bf16 type: a bf16 tensor of N values is stored two to a u32 word, value 2w in the
// low half of word w and value 2w + 1 in the high half (the high half of the last word is 0
// when N is odd), so bf16 needs no adapter feature.
//
// to_bf16:   y (N bf16, ceil(N / 2) words) = x (N f32) rounded to nearest, ties to even; a NaN
//            stays a NaN (its sign and top mantissa bits kept, the quiet bit set), as
//            `half::bf16::from_f32` rounds. One invocation per word, so no two write one word.
// from_bf16: y (N f32) = x (N bf16) widened (exact).
//
// One invocation per word (to_bf16) or element (from_bf16); the 1-D grid may be folded into 2-D
// for large N (see gpu::grid).

struct Params {
    n: u32,
}

override WG: u32 = 256u;

@group(0) @binding(0) var<uniform> p: Params;

#include "include/grid.wgsl"

// The bf16 bits of v in the low 16 bits.
fn bf16_bits(v: f32) -> u32 {
    let x = bitcast<u32>(v);
    if ((x & 0x7fffffffu) > 0x7f800000u) {
        return (x >> 16u) | 0x40u;
    }
    // Round to nearest, ties to even: add just under half a unit, plus the kept lowest bit.
    return (x + 0x7fffu + ((x >> 16u) & 1u)) >> 16u;
}

// Bindings for to_bf16: 1 = x (read, f32), 2 = y (read_write, packed bf16).
@group(0) @binding(1) var<storage, read> to_x: array<f32>;
@group(0) @binding(2) var<storage, read_write> to_y: array<u32>;

@compute @workgroup_size(WG)
fn to_bf16(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
           @builtin(local_invocation_id) lid: vec3<u32>) {
    let w = global_index(wid, nwg, WG, lid.x);
    let i = 2u * w;
    if (i < p.n) {
        var hi = 0u;
        if (i + 1u < p.n) {
            hi = bf16_bits(to_x[i + 1u]);
        }
        to_y[w] = bf16_bits(to_x[i]) | (hi << 16u);
    }
}

// Bindings for from_bf16: 1 = x (read, packed bf16), 2 = y (read_write, f32).
@group(0) @binding(1) var<storage, read> from_x: array<u32>;
@group(0) @binding(2) var<storage, read_write> from_y: array<f32>;

@compute @workgroup_size(WG)
fn from_bf16(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
             @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = global_index(wid, nwg, WG, lid.x);
    if (i < p.n) {
        let word = from_x[i / 2u];
        let bits = select(word & 0xffffu, word >> 16u, (i & 1u) == 1u);
        from_y[i] = bitcast<f32>(bits << 16u);
    }
}
