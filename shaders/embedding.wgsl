// Token + position embedding, and its deterministic backward.
//
// embedding_forward:      out (B, T, C) = wte[tokens[b, t] - wte_row0] + wpe[t]      overwrites out
// embedding_forward_vec4: the same, four channels per thread (C % 4 == 0; out a 16-byte aligned
//                         view, wte and wpe aligned to 4 of their elements: 16 bytes in f32, 8 in
//                         f16)
//   tokens (B, T) u32; wte (V_chunk, C) holds vocabulary rows [wte_row0, wte_row0 + V_chunk) of a
//   table that may be split into chunks; wpe (maxT, C), T <= maxT. Positions whose token is outside
//   the chunk are left untouched, so one call per chunk writes every row exactly once; a token
//   outside every chunk leaves its row untouched (and never reads or writes out of bounds).
//   wte and wpe hold TableElem, which the loader's prelude (src/gpu/shaders.rs) declares: f32, or
//   f16 in the F16 variant (inference; adapters with SHADER_F16). Both table entries are widened
//   to f32 and added in f32, so the F16 variant computes exactly what the f32 one does on the
//   f16-rounded tables. out, dout and the gradients are f32 in both.
//
// embedding_backward_wte: dwte (V_chunk, C) += sum over the positions holding each token of
//   dout (B, T, C)                                                             accumulates into dwte
// embedding_backward_wpe: dwpe (maxT, C) rows [0, T) += sum over b = 0, 1, ... of dout[b, t]
//                                                                            accumulates into dwpe
//
// The backward avoids atomics with an index built on the CPU (kernels::embedding::backward_index),
// u32 throughout, of fixed length 1 + 4·BT for BT = B·T positions:
//   index[0]                     S, the number of distinct tokens (segments), 1 <= S <= BT
//   index[1 + 3s + 0, 1, 2]      token, start, count of segment s < S; segments in increasing
//                                token order; slots S <= s < BT are zero
//   index[1 + 3·BT + k], k < BT  the positions b·T + t, sorted by token, stable (increasing
//                                position within a token); segment s owns entries [start, start+count)
// Workgroups cover (segment group g < groups, block of WG channels), one thread per channel; a
// workgroup takes the segments g, g + groups, g + 2·groups, ... For each, a thread keeps four
// partial sums s0..s3 over the segment's i-th positions, i ≡ 0, 1, 2, 3 (mod 4), in increasing i
// (four loads in flight), and adds (s0 + s1) + (s2 + s3) into dwte. Every (token, channel) has a
// fixed summation order: same bits every run, no atomics, no workgroup memory. Each position's
// token is checked against its segment's: a stale index (built from other tokens) turns that
// gradient row into NaN instead of silently training on wrong rows.
//
// Workgroups fold into a 2-D grid for large problems (see gpu::grid); shaders recover the linear
// workgroup index by workgroup_index (include/grid.wgsl).
// Legend: B batch, T sequence, C channels, V vocabulary.

struct Params {
    bt: u32,       // B·T
    t: u32,        // T
    c: u32,        // C (in vec4 units for embedding_forward_vec4)
    row0: u32,     // first vocabulary row held by the wte chunk
    v_chunk: u32,  // rows in the wte chunk
    b: u32,        // B
    groups: u32,   // embedding_backward_wte: segment groups (the segment stride)
}

override WG: u32 = 256u;

@group(0) @binding(0) var<uniform> p: Params;

#include "include/grid.wgsl"

// Bindings for embedding_forward: 1 = tokens (read), 2 = wte (read), 3 = wpe (read),
// 4 = out (read_write, f32).
@group(0) @binding(1) var<storage, read> fw_tokens: array<u32>;
@group(0) @binding(2) var<storage, read> fw_wte: array<TableElem>;
@group(0) @binding(3) var<storage, read> fw_wpe: array<TableElem>;
@group(0) @binding(4) var<storage, read_write> fw_out: array<f32>;

// One thread per output element, consecutive threads on consecutive channels (coalesced).
@compute @workgroup_size(WG)
fn embedding_forward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                     @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = global_index(wid, nwg, WG, lid.x);
    if (i >= p.bt * p.c) {
        return;
    }
    let bt = i / p.c;
    let row = fw_tokens[bt] - p.row0; // wraps for tokens below the chunk
    if (row >= p.v_chunk) {
        return;
    }
    let t = bt % p.t;
    let ch = i - bt * p.c;
    fw_out[i] = f32(fw_wte[row * p.c + ch]) + f32(fw_wpe[t * p.c + ch]);
}

// Bindings for embedding_forward_vec4: as embedding_forward, the tables viewed as vec4<TableElem>
// and out as vec4<f32>.
@group(0) @binding(1) var<storage, read> fv_tokens: array<u32>;
@group(0) @binding(2) var<storage, read> fv_wte: array<vec4<TableElem>>;
@group(0) @binding(3) var<storage, read> fv_wpe: array<vec4<TableElem>>;
@group(0) @binding(4) var<storage, read_write> fv_out: array<vec4<f32>>;

// p.c is C / 4 here.
@compute @workgroup_size(WG)
fn embedding_forward_vec4(@builtin(workgroup_id) wid: vec3<u32>,
                          @builtin(num_workgroups) nwg: vec3<u32>,
                          @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = global_index(wid, nwg, WG, lid.x);
    if (i >= p.bt * p.c) {
        return;
    }
    let bt = i / p.c;
    let row = fv_tokens[bt] - p.row0;
    if (row >= p.v_chunk) {
        return;
    }
    let t = bt % p.t;
    let ch = i - bt * p.c;
    fv_out[i] = vec4<f32>(fv_wte[row * p.c + ch]) + vec4<f32>(fv_wpe[t * p.c + ch]);
}

// Bindings for embedding_backward_wte: 1 = dout (read), 2 = tokens (read), 3 = index (read),
// 4 = dwte (read_write).
@group(0) @binding(1) var<storage, read> bw_dout: array<f32>;
@group(0) @binding(2) var<storage, read> bw_tokens: array<u32>;
@group(0) @binding(3) var<storage, read> bw_index: array<u32>;
@group(0) @binding(4) var<storage, read_write> bw_dwte: array<f32>;

// dout[pos, ch] for the k-th entry pos of the index's position list, or NaN when the token at pos is
// not `token` (a stale index).
fn grad_at(k: u32, token: u32, ch: u32) -> f32 {
    let pos = min(bw_index[1u + 3u * p.bt + k], p.bt - 1u);
    let tok = bw_tokens[pos];
    return select(bw_dout[pos * p.c + ch], bitcast<f32>(0x7fc00000u | (tok & 1u)), tok != token);
}

@compute @workgroup_size(WG)
fn embedding_backward_wte(@builtin(workgroup_id) wid: vec3<u32>,
                          @builtin(num_workgroups) nwg: vec3<u32>,
                          @builtin(local_invocation_id) lid: vec3<u32>) {
    let blocks = (p.c + WG - 1u) / WG;
    let w = workgroup_index(wid, nwg);
    let first = w / blocks;
    let ch = (w - first * blocks) * WG + lid.x;
    if (first >= p.groups || ch >= p.c) {
        return;
    }
    let segments = min(bw_index[0], p.bt);
    for (var seg = first; seg < segments; seg += p.groups) {
        let token = bw_index[1u + 3u * seg];
        let start = bw_index[2u + 3u * seg];
        let count = bw_index[3u + 3u * seg];
        // Out-of-chunk tokens belong to another call; a malformed segment is skipped.
        if (token - p.row0 >= p.v_chunk || start > p.bt || count > p.bt - start) {
            continue;
        }
        var acc = vec4<f32>(0.0);
        let end = start + count;
        var k = start;
        for (; k + 4u <= end; k += 4u) {
            acc += vec4<f32>(grad_at(k, token, ch), grad_at(k + 1u, token, ch),
                             grad_at(k + 2u, token, ch), grad_at(k + 3u, token, ch));
        }
        if (k < end) {
            acc.x += grad_at(k, token, ch);
        }
        if (k + 1u < end) {
            acc.y += grad_at(k + 1u, token, ch);
        }
        if (k + 2u < end) {
            acc.z += grad_at(k + 2u, token, ch);
        }
        let i = (token - p.row0) * p.c + ch;
        bw_dwte[i] = bw_dwte[i] + ((acc.x + acc.y) + (acc.z + acc.w));
    }
}

// Bindings for embedding_backward_wpe: 1 = dout (read), 2 = dwpe (read_write).
@group(0) @binding(1) var<storage, read> bp_dout: array<f32>;
@group(0) @binding(2) var<storage, read_write> bp_dwpe: array<f32>;

// One thread per element of dwpe rows [0, T), coalesced over channels; sums b in order.
@compute @workgroup_size(WG)
fn embedding_backward_wpe(@builtin(workgroup_id) wid: vec3<u32>,
                          @builtin(num_workgroups) nwg: vec3<u32>,
                          @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = global_index(wid, nwg, WG, lid.x);
    let tc = p.t * p.c;
    if (i >= tc) {
        return;
    }
    var acc = 0.0;
    for (var b = 0u; b < p.b; b++) {
        acc += bp_dout[b * tc + i];
    }
    bp_dwpe[i] = bp_dwpe[i] + acc;
}
