// Multi-head softmax attention: a fused flash-style forward and backward (O(T) extra memory),
// the GEMM path's score kernels, and the KV-cache helpers used by generation.
//
// Legend: B batch, T sequence, C = NH·HS channels, NH query heads, HS head size, NKV key/value
// heads (grouped-query attention: NKV divides NH, G = NH / NKV = p.group, and query head h reads
// key/value head h / G; NKV = NH, G = 1, is multi-head attention).
// Layouts (f32):
//   qkv              (B, T, W), W = C + 2·NKV·HS: the QKV projection's output; q of token t,
//                    head h at qkv[(b·T + t)·W + h·HS + d], k of key/value head j at
//                    qkv[(b·T + t)·W + C + j·HS + d], v at qkv[(b·T + t)·W + C + NKV·HS + j·HS + d]
//                    (with NKV = NH, W = 3C: GPT-2's c_attn layout)
//   out, dout        (B, T, NH, HS) = (B, T, C)
//   lse, D           (B, NH, T): per-row logsumexp of the scaled, masked scores (natural log),
//                    and D = rowsum(dout ∘ out)
//   k_cache, v_cache (B, NKV, Tmax, HS), of KvElem: f32, or f16 in the F16 variant
// scale = 1/sqrt(HS). Causal: the query at absolute position pos0 + i sees keys j <= pos0 + i.
//
// Fused kernels read q, k, v through (base, batch stride, token stride, head stride) in Params,
// so one kernel serves K/V inside qkv (training) and K/V in the caches (generation); k and v are
// addressed by key/value head, q, out and lse by query head. The gradient of a key/value head
// sums its G query heads': the dK/dV kernels own a key/value head and loop over its group in head
// order, so the sum has one writer and a fixed order. Head dims
// are padded with zeros to HD (a multiple of 4, >= HS) inside workgroup memory only.
//
// Every reduction runs in a fixed order and nothing uses atomics: the same inputs give the same
// bits on the same adapter.
//
// The F16 variant (inference over an f16 KV cache; adapters with SHADER_F16): the loader's prelude
// (src/gpu/shaders.rs) declares KvElem = f16 instead of f32, so attention_forward (as used by
// forward_cached) reads k and v from f16 caches, widened on load through k_at / v_at: the tiles in
// workgroup memory, the scores, the softmax and every accumulation stay f32, with the same tiling
// and the same order of operations, so on f16-rounded keys and values both variants compute the
// same sums. kv_append rounds the new k and v to f16 (values must lie within f16's finite range,
// |x| <= 65504). qkv and out stay f32; the training kernels are only used in f32.
//
// Dropout on the probabilities (training, fused kernels only): with drop_threshold > 0, P
// becomes P ∘ M in the product with V, M = 0 or 1/(1 - p) from a counter-based hash of
// (seed, step, row, key) with row = (b·NH + h)·Tq + i (include/hash.wgsl's cell_hash;
// src/hash.rs is its CPU twin), which the backward regenerates: nothing is stored. lse stays that
// of the undropped softmax; the backward uses dS = P ∘ (M ∘ dP - D), dv = (P ∘ M)ᵀ·dout, with
// D = rowsum(dout ∘ out) as without dropout.

struct Params {
    nb: u32,          // B
    nh: u32,          // NH
    hs: u32,          // HS
    tq: u32,          // queries per sequence (T, or Tq new tokens when decoding)
    tk: u32,          // keys per sequence (T, or pos0 + Tq when decoding; Tmax for kv_append)
    pos0: u32,        // absolute position of query 0
    causal: u32,      // 1: mask keys after the query's position
    write_lse: u32,   // 1: attention_forward writes lse
    ntiles: u32,      // row tiles per (b, h) of the fused kernels
    scale: f32,       // 1/sqrt(HS)
    scale2: f32,      // log2(e)/sqrt(HS): scores in base 2
    group: u32,       // G = NH / NKV: query heads per key/value head
    q: vec4<u32>,     // (base, batch stride, token stride, head stride) of q, in elements
    k: vec4<u32>,     // same for k (qkv or k_cache); dk uses it inside dqkv
    v: vec4<u32>,     // same for v (qkv or v_cache); dv uses it inside dqkv
    o: vec4<u32>,     // same for out / dout, (B, T, C)
    drop_seed: u32,   // attention dropout: seed of this site's stream
    grp_step: u32,    // the GEMM path's heads: entry g is head h0 + g·grp_step; see group_bh
    drop_threshold: u32, // probabilities whose hash is below this are dropped; 0 = no dropout
    drop_scale: f32,  // 1 / (1 - p): the factor of the kept ones
    grp: vec4<u32>,   // the GEMM path's group: (b0, h0, over b?, entries); see group_bh
}

@group(0) @binding(0) var<uniform> p: Params;
#include "include/step.wgsl"

// 1: a decoding dispatch, at the per-step uniform's position. An override constant, so that the
// other pipelines compile the uniform's read out of their inner loops.
override FROM_STEP: u32 = 0u;

// The absolute position of query 0, and the keys per sequence: decoding dispatches
// (FROM_STEP = 1) move with the per-step uniform's position (queries at step.pos0 + i, keys
// 0 .. step.pos0 + Tq; kv_append keeps Tmax in p.tk and reads it directly), so one dispatch
// serves every decoded token; the others use p alone.
fn pos0() -> u32 {
    return p.pos0 + FROM_STEP * step.pos0;
}

fn tk() -> u32 {
    return p.tk + FROM_STEP * step.pos0;
}

// Key/value heads, NKV = NH / G.
fn nkv() -> u32 {
    return p.nh / p.group;
}

// ---------------------------------------------------------------------------------------------
// Tiling of the fused kernels. A workgroup owns BR rows (queries in the forward and dQ kernels,
// keys in the dK/dV kernel) and streams tiles of BC columns (keys, or queries for dK/dV)
// through workgroup memory. Two thread layouts share the WG invocations:
//   score phase:  SR × SC threads, each computing an RS × CS block of the BR × BC score tile;
//   output phase: TR × TC threads, each owning RO rows × DV vec4 columns of the BR × HD output.
// The launcher picks the sizes (override constants) to fit the adapter's workgroup memory and
// checks that they divide evenly and stay within the register arrays' capacities below.

override WG: u32 = 64u;   // invocations per workgroup
override BR: u32 = 32u;   // rows per workgroup
override BC: u32 = 32u;   // columns per streamed tile
override HD: u32 = 64u;   // head-size capacity, a multiple of 4 and >= HS
override SC: u32 = 8u;    // score-phase threads across columns
override TC: u32 = 16u;   // output-phase threads across vec4 columns

override HD4: u32 = HD / 4u;
override HDP: u32 = HD4 + 1u;   // padded row stride of tiles, in vec4s (spreads memory banks)
override SR: u32 = WG / SC;
override RS: u32 = BR / SR;
override CS: u32 = BC / SC;
override TR: u32 = WG / TC;
override RO: u32 = BR / TR;
override DV: u32 = HD4 / TC;

// Register-array capacities (the launcher keeps RS, CS, RS·CS, DV and RO·DV within them).
const RS_MAX: u32 = 8u;
const CS_MAX: u32 = 4u;
const S_MAX: u32 = 16u;
const DV_MAX: u32 = 2u;
const ACC_MAX: u32 = 8u;

const LOG2E: f32 = 1.4426950408889634;
const LN2: f32 = 0.6931471805599453;
// Running maxima start at NEG; masked scores are MASKED < NEG, so exp2(MASKED - m) is 0 even
// before a row has seen a valid key, and exp2(NEG - m) is 0 once it has.
const NEG: f32 = -1.0e30;
const MASKED: f32 = -3.0e38;

var<workgroup> sh_a: array<vec4<f32>, BR * HDP>;    // resident rows: Q (fwd, dQ) or K (dK/dV)
var<workgroup> sh_a2: array<vec4<f32>, BR * HDP>;   // resident rows: dO (dQ) or V (dK/dV)
var<workgroup> sh_b: array<vec4<f32>, BC * HDP>;    // streamed: K (fwd, dQ) or Q (dK/dV)
var<workgroup> sh_b2: array<vec4<f32>, BC * HDP>;   // streamed: V (fwd, dQ) or dO (dK/dV)
var<workgroup> sh_p: array<f32, BR * BC>;           // P (fwd), dS (dQ), P (dK/dV)
var<workgroup> sh_p2: array<f32, BR * BC>;          // dS (dK/dV)
var<workgroup> sh_red: array<f32, BR * SC>;         // per-row partials across score threads
var<workgroup> sh_row: array<f32, BR>;              // per-row rescale factor, then running max

// Fused forward bindings: 1 = q (read, f32), 2 = k, 3 = v (read, KvElem; the same buffer may be
// bound to all three in f32, to k and v in f16), 4 = out (read_write), 5 = lse (read_write).
@group(0) @binding(1) var<storage, read> q_in: array<f32>;
@group(0) @binding(2) var<storage, read> k_in: array<KvElem>;
@group(0) @binding(3) var<storage, read> v_in: array<KvElem>;
@group(0) @binding(4) var<storage, read_write> out: array<f32>;
@group(0) @binding(5) var<storage, read_write> lse_out: array<f32>;

// Element loads, one function per tensor: k and v are widened from KvElem (a no-op in f32).
fn q_at(i: u32) -> f32 {
    return q_in[i];
}
fn k_at(i: u32) -> f32 {
    return f32(k_in[i]);
}
fn v_at(i: u32) -> f32 {
    return f32(v_in[i]);
}

// First element of row (b, t, h) of a tensor with strides s = (base, batch, token, head).
fn row_start(s: vec4<u32>, b: u32, h: u32, t: u32) -> u32 {
    return s.x + b * s.y + t * s.z + h * s.w;
}

// Dims 4·d4 .. 4·d4+3 of query i of query head h / key j of key/value head kh, zero beyond HS
// and for rows past the end.
fn q4(b: u32, h: u32, i: u32, d4: u32) -> vec4<f32> {
    var r = vec4<f32>(0.0);
    if (i < p.tq) {
        let base = row_start(p.q, b, h, i);
        for (var c = 0u; c < 4u; c++) {
            let d = 4u * d4 + c;
            if (d < p.hs) {
                r[c] = q_at(base + d);
            }
        }
    }
    return r;
}

fn k4(b: u32, kh: u32, j: u32, d4: u32) -> vec4<f32> {
    var r = vec4<f32>(0.0);
    if (j < tk()) {
        let base = row_start(p.k, b, kh, j);
        for (var c = 0u; c < 4u; c++) {
            let d = 4u * d4 + c;
            if (d < p.hs) {
                r[c] = k_at(base + d);
            }
        }
    }
    return r;
}

fn v4(b: u32, kh: u32, j: u32, d4: u32) -> vec4<f32> {
    var r = vec4<f32>(0.0);
    if (j < tk()) {
        let base = row_start(p.v, b, kh, j);
        for (var c = 0u; c < 4u; c++) {
            let d = 4u * d4 + c;
            if (d < p.hs) {
                r[c] = v_at(base + d);
            }
        }
    }
    return r;
}

// Writes the first HS dims of vec4 column d4 of row (b, i, h) of out.
fn store_out(b: u32, h: u32, i: u32, d4: u32, val: vec4<f32>) {
    let base = row_start(p.o, b, h, i);
    for (var c = 0u; c < 4u; c++) {
        let d = 4u * d4 + c;
        if (d < p.hs) {
            out[base + d] = val[c];
        }
    }
}

#include "include/hash.wgsl"
#include "include/grid.wgsl"

// The dropout factor M of query i (row of the (b, h) block) and key j: 1 without dropout.
fn drop_factor(b: u32, h: u32, i: u32, j: u32) -> f32 {
    if (p.drop_threshold == 0u) {
        return 1.0;
    }
    let row = (b * p.nh + h) * p.tq + i;
    if (cell_hash(mask_key(p.drop_seed, step.dropout_step), row, j) >= p.drop_threshold) {
        return p.drop_scale;
    }
    return 0.0;
}

// Whether query i (relative to pos0) may see key j.
fn visible(i: u32, j: u32) -> bool {
    return i < p.tq && j < tk() && (p.causal == 0u || j <= pos0() + i);
}

// One key past the last key any query of rows [i0, i0 + n) may see: the causal mask ends the
// loop over key tiles there, so fully masked tiles are never loaded.
fn key_end(i0: u32, n: u32) -> u32 {
    if (p.causal == 0u) {
        return tk();
    }
    return min(tk(), pos0() + min(i0 + n, p.tq));
}

// (b, h, r) of item idx of n per (b, h) with `heads` heads, r fastest: a row of a row kernel
// (query heads), or a key row or tile of dK/dV (key/value heads). Past the last item, b >= B.
fn row_of(idx: u32, n: u32, heads: u32) -> vec3<u32> {
    let bh = idx / n;
    return vec3<u32>(bh / heads, bh % heads, idx % n);
}

// Query tiles are handed out heaviest first under the causal mask (the last query tiles see
// the most keys), which evens out the tail of the dispatch. Past the last tile, b >= B.
fn query_tile(linear: u32) -> vec3<u32> {
    let t = p.ntiles - 1u - linear % p.ntiles;
    let bh = linear / p.ntiles;
    return vec3<u32>(bh / p.nh, bh % p.nh, t);
}

// Streams tile j0 .. j0 + BC of k and v of key/value head kh into sh_b and sh_b2 (forward,
// dQ), between barriers.
fn stream_kv(b: u32, kh: u32, j0: u32, tid: u32) {
    workgroupBarrier();
    for (var e = tid; e < BC * HD4; e += WG) {
        let r = e / HD4;
        let d4 = e % HD4;
        sh_b[r * HDP + d4] = k4(b, kh, j0 + r, d4);
        sh_b2[r * HDP + d4] = v4(b, kh, j0 + r, d4);
    }
    workgroupBarrier();
}

// attention_forward: out (B, Tq, NH, HS) and lse (B, NH, Tq) from q (B, Tq, NH, HS) and k, v
// (B, Tk, NKV, HS), each read through its strides; overwrites out and lse (lse only when
// write_lse = 1). One workgroup per (b, h, tile of BR queries), grid folded into x and y.
// Online softmax: the running max m and sum l per row rescale the output accumulator as each
// key tile arrives, so no T×T matrix exists anywhere; key tiles past the causal limit are skipped.
// With dropout, l sums the undropped probabilities and the accumulator takes the dropped ones.
@compute @workgroup_size(WG)
fn attention_forward(@builtin(workgroup_id) wid: vec3<u32>,
                     @builtin(num_workgroups) nwg: vec3<u32>,
                     @builtin(local_invocation_id) lid: vec3<u32>) {
    let tile = query_tile(workgroup_index(wid, nwg));
    if (tile.x < p.nb) {
        forward_tile(tile.x, tile.y, tile.z * BR, lid.x);
    }
}

// attention_forward's work for the query tile i0 .. i0 + BR of (b, h), as invocation tid.
fn forward_tile(b: u32, h: u32, i0: u32, tid: u32) {
    for (var e = tid; e < BR * HD4; e += WG) {
        let r = e / HD4;
        let d4 = e % HD4;
        sh_a[r * HDP + d4] = q4(b, h, i0 + r, d4);
    }

    let sr = tid / SC;
    let sc = tid % SC;
    let tr = tid / TC;
    let tc = tid % TC;

    var m: array<f32, RS_MAX>;
    var l: array<f32, RS_MAX>;
    for (var i = 0u; i < RS; i++) {
        m[i] = NEG;
        l[i] = 0.0;
    }
    var acc: array<vec4<f32>, ACC_MAX>;
    for (var a = 0u; a < RO * DV; a++) {
        acc[a] = vec4<f32>(0.0);
    }

    let nkt = (key_end(i0, BR) + BC - 1u) / BC;
    for (var kt = 0u; kt < nkt; kt++) {
        let j0 = kt * BC;
        stream_kv(b, h / p.group, j0, tid);

        // Scores of this thread's RS rows × CS keys (keys interleaved across the SC threads).
        var s: array<f32, S_MAX>;
        for (var a = 0u; a < RS * CS; a++) {
            s[a] = 0.0;
        }
        for (var d4 = 0u; d4 < HD4; d4++) {
            var kk: array<vec4<f32>, CS_MAX>;
            for (var c = 0u; c < CS; c++) {
                kk[c] = sh_b[(sc + SC * c) * HDP + d4];
            }
            for (var i = 0u; i < RS; i++) {
                let qv = sh_a[(sr * RS + i) * HDP + d4];
                for (var c = 0u; c < CS; c++) {
                    s[i * CS + c] += dot(qv, kk[c]);
                }
            }
        }
        for (var i = 0u; i < RS; i++) {
            let row = sr * RS + i;
            var mx = NEG;
            for (var c = 0u; c < CS; c++) {
                var x = s[i * CS + c] * p.scale2;
                if (!visible(i0 + row, j0 + sc + SC * c)) {
                    x = MASKED;
                }
                s[i * CS + c] = x;
                mx = max(mx, x);
            }
            sh_red[row * SC + sc] = mx;
        }
        workgroupBarrier();

        // New row maxima, probabilities, partial sums; the rescale factor goes to sh_row.
        for (var i = 0u; i < RS; i++) {
            let row = sr * RS + i;
            var mx = m[i];
            for (var c = 0u; c < SC; c++) {
                mx = max(mx, sh_red[row * SC + c]);
            }
            let alpha = exp2(m[i] - mx);
            m[i] = mx;
            var ls = 0.0;
            for (var c = 0u; c < CS; c++) {
                let col = sc + SC * c;
                let pr = exp2(s[i * CS + c] - mx);
                sh_p[row * BC + col] = pr * drop_factor(b, h, i0 + row, j0 + col);
                ls += pr;
            }
            l[i] = l[i] * alpha + ls;
            if (sc == 0u) {
                sh_row[row] = alpha;
            }
        }
        workgroupBarrier();

        // acc = acc · alpha + P · V for this thread's RO rows × DV vec4 columns.
        for (var o = 0u; o < RO; o++) {
            let alpha = sh_row[tr * RO + o];
            for (var v = 0u; v < DV; v++) {
                acc[o * DV + v] *= alpha;
            }
        }
        for (var c = 0u; c < BC; c++) {
            var vv: array<vec4<f32>, DV_MAX>;
            for (var v = 0u; v < DV; v++) {
                vv[v] = sh_b2[c * HDP + tc + TC * v];
            }
            for (var o = 0u; o < RO; o++) {
                let pr = sh_p[(tr * RO + o) * BC + c];
                for (var v = 0u; v < DV; v++) {
                    acc[o * DV + v] += pr * vv[v];
                }
            }
        }
    }

    // Row sums: the SC partials of each row, added in a fixed order.
    workgroupBarrier();
    for (var i = 0u; i < RS; i++) {
        let row = sr * RS + i;
        sh_red[row * SC + sc] = l[i];
        if (sc == 0u) {
            sh_row[row] = m[i];
        }
    }
    workgroupBarrier();
    for (var o = 0u; o < RO; o++) {
        let row = tr * RO + o;
        let i = i0 + row;
        if (i >= p.tq) {
            continue;
        }
        var lsum = 0.0;
        for (var c = 0u; c < SC; c++) {
            lsum += sh_red[row * SC + c];
        }
        let inv = 1.0 / lsum;
        for (var v = 0u; v < DV; v++) {
            store_out(b, h, i, tc + TC * v, acc[o * DV + v] * inv);
        }
        if (tc == 0u && p.write_lse != 0u) {
            lse_out[(b * p.nh + h) * p.tq + i] = (sh_row[row] + log2(lsum)) * LN2;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Fused backward, in three dispatches (no atomics; each output element has one writer):
//   attention_backward_prep: D (B, NH, T) = rowsum(dout ∘ out), overwrites D
//   attention_backward_dkdv: dk, dv inside dqkv (B, T, W), overwrites them; one workgroup per
//                            (b, key/value head, tile of BR keys), streaming, for each query
//                            head of the group in turn, the query tiles that see them
//   attention_backward_dq:   dq inside dqkv (B, T, W), overwrites it; one workgroup per
//                            (b, h, tile of BR queries), streaming the visible key tiles
// Both recompute P = exp(scale·q·k - lse) from the saved lse; with dP = dout·vᵀ,
// dS = P ∘ (M ∘ dP - D), dq = scale·dS·k, dk = scale·dSᵀ·q, dv = (P ∘ M)ᵀ·dout (M = 1 without
// dropout).
// Only pos0 = 0 and tq = tk = T occur here.

// Bindings of attention_backward_prep: 1 = dout (read), 2 = out (read), 3 = D (read_write).
@group(0) @binding(1) var<storage, read> pre_dout: array<f32>;
@group(0) @binding(2) var<storage, read> pre_out: array<f32>;
@group(0) @binding(3) var<storage, read_write> pre_d: array<f32>;

@compute @workgroup_size(WG)
fn attention_backward_prep(@builtin(workgroup_id) wid: vec3<u32>,
                           @builtin(num_workgroups) nwg: vec3<u32>,
                           @builtin(local_invocation_id) lid: vec3<u32>) {
    let idx = global_index(wid, nwg, WG, lid.x);
    if (idx >= p.nb * p.nh * p.tq) {
        return;
    }
    let i = idx % p.tq;
    let bh = idx / p.tq;
    let base = row_start(p.o, bh / p.nh, bh % p.nh, i);
    var sum = 0.0;
    for (var d = 0u; d < p.hs; d++) {
        sum += pre_dout[base + d] * pre_out[base + d];
    }
    pre_d[idx] = sum;
}

// Bindings of attention_backward_dkdv and attention_backward_dq: 1, 2, 3 = qkv (read; q, k and v
// through p.q, p.k, p.v), 4 = dout (read), 5 = lse (read), 6 = D (read), 7 = dqkv (read_write).
@group(0) @binding(4) var<storage, read> bw_dout: array<f32>;
@group(0) @binding(5) var<storage, read> bw_lse: array<f32>;
@group(0) @binding(6) var<storage, read> bw_d: array<f32>;
@group(0) @binding(7) var<storage, read_write> bw_dqkv: array<f32>;

fn do4(b: u32, h: u32, i: u32, d4: u32) -> vec4<f32> {
    var r = vec4<f32>(0.0);
    if (i < p.tq) {
        let base = row_start(p.o, b, h, i);
        for (var c = 0u; c < 4u; c++) {
            let d = 4u * d4 + c;
            if (d < p.hs) {
                r[c] = bw_dout[base + d];
            }
        }
    }
    return r;
}

// Writes the first HS dims of vec4 column d4 of row (b, t, h) of a tensor inside dqkv.
fn store_dqkv(s: vec4<u32>, b: u32, h: u32, t: u32, d4: u32, val: vec4<f32>) {
    let base = row_start(s, b, h, t);
    for (var c = 0u; c < 4u; c++) {
        let d = 4u * d4 + c;
        if (d < p.hs) {
            bw_dqkv[base + d] = val[c];
        }
    }
}

// Streams tile i0 .. i0 + BC of q and dout into sh_b and sh_b2 (dK/dV), between barriers.
fn stream_qdo(b: u32, h: u32, i0: u32, tid: u32) {
    workgroupBarrier();
    for (var e = tid; e < BC * HD4; e += WG) {
        let r = e / HD4;
        let d4 = e % HD4;
        sh_b[r * HDP + d4] = q4(b, h, i0 + r, d4);
        sh_b2[r * HDP + d4] = do4(b, h, i0 + r, d4);
    }
    workgroupBarrier();
}

// lse·log2(e) and D of query i of (b, h); 0 and 0 past the last query.
fn row_stats(b: u32, h: u32, i: u32) -> vec2<f32> {
    if (i >= p.tq) {
        return vec2<f32>(0.0);
    }
    let r = (b * p.nh + h) * p.tq + i;
    return vec2<f32>(bw_lse[r] * LOG2E, bw_d[r]);
}

// The score block of score-phase thread (sr, sc) in the backward kernels, for its RS rows × CS
// columns (columns interleaved across the SC threads): s = (rows of sh_a)·(columns of sh_b) and
// dp = (rows of sh_a2)·(columns of sh_b2). dK/dV holds k and v and streams q and dout
// (s = k·q, dp = v·dout); dQ holds q and dout and streams k and v (s = q·k, dp = dout·v).
struct ScoreBlock {
    s: array<f32, S_MAX>,
    dp: array<f32, S_MAX>,
}

fn score_block(sr: u32, sc: u32) -> ScoreBlock {
    var blk: ScoreBlock;
    for (var a = 0u; a < RS * CS; a++) {
        blk.s[a] = 0.0;
        blk.dp[a] = 0.0;
    }
    for (var d4 = 0u; d4 < HD4; d4++) {
        var bb: array<vec4<f32>, CS_MAX>;
        var bb2: array<vec4<f32>, CS_MAX>;
        for (var c = 0u; c < CS; c++) {
            bb[c] = sh_b[(sc + SC * c) * HDP + d4];
            bb2[c] = sh_b2[(sc + SC * c) * HDP + d4];
        }
        for (var i = 0u; i < RS; i++) {
            let a = sh_a[(sr * RS + i) * HDP + d4];
            let a2 = sh_a2[(sr * RS + i) * HDP + d4];
            for (var c = 0u; c < CS; c++) {
                blk.s[i * CS + c] += dot(a, bb[c]);
                blk.dp[i * CS + c] += dot(a2, bb2[c]);
            }
        }
    }
    return blk;
}

@compute @workgroup_size(WG)
fn attention_backward_dkdv(@builtin(workgroup_id) wid: vec3<u32>,
                           @builtin(num_workgroups) nwg: vec3<u32>,
                           @builtin(local_invocation_id) lid: vec3<u32>) {
    // Key tiles in ascending order: under the causal mask the first ones see the most queries.
    let tile = row_of(workgroup_index(wid, nwg), p.ntiles, nkv());
    if (tile.x < p.nb) {
        dkdv_tile(tile.x, tile.y, tile.z * BR, lid.x);
    }
}

// attention_backward_dkdv's work for the key tile j0 .. j0 + BR of (b, kh), kh a key/value
// head, as invocation tid: the group's query heads kh·G .. kh·G + G in order.
fn dkdv_tile(b: u32, kh: u32, j0: u32, tid: u32) {
    for (var e = tid; e < BR * HD4; e += WG) {
        let r = e / HD4;
        let d4 = e % HD4;
        sh_a[r * HDP + d4] = k4(b, kh, j0 + r, d4);
        sh_a2[r * HDP + d4] = v4(b, kh, j0 + r, d4);
    }

    let sr = tid / SC;
    let sc = tid % SC;
    let tr = tid / TC;
    let tc = tid % TC;

    var dk: array<vec4<f32>, ACC_MAX>;
    var dv: array<vec4<f32>, ACC_MAX>;
    for (var a = 0u; a < RO * DV; a++) {
        dk[a] = vec4<f32>(0.0);
        dv[a] = vec4<f32>(0.0);
    }

    // Queries i see key j when j <= i: the query tiles before j0 see none of these keys.
    var qt0 = 0u;
    if (p.causal != 0u) {
        qt0 = j0 / BC;
    }
    let nqt = (p.tq + BC - 1u) / BC;
    // The query tiles qt0 .. nqt of each query head of the group, head after head.
    let per_head = nqt - qt0;
    for (var qi = 0u; qi < per_head * p.group; qi++) {
        let h = kh * p.group + qi / per_head;
        let i0 = (qt0 + qi % per_head) * BC;
        stream_qdo(b, h, i0, tid);

        // s = k·q and dp = v·dout for RS keys × CS queries.
        let blk = score_block(sr, sc);
        for (var c = 0u; c < CS; c++) {
            let col = sc + SC * c;
            let i = i0 + col;
            let st = row_stats(b, h, i);
            let lq = st.x;
            let dd = st.y;
            for (var k = 0u; k < RS; k++) {
                let row = sr * RS + k;
                var pr = 0.0;
                if (visible(i, j0 + row)) {
                    pr = exp2(blk.s[k * CS + c] * p.scale2 - lq);
                }
                let f = drop_factor(b, h, i, j0 + row);
                sh_p[row * BC + col] = pr * f;
                sh_p2[row * BC + col] = pr * (blk.dp[k * CS + c] * f - dd);
            }
        }
        workgroupBarrier();

        // dv += (P ∘ M)ᵀ·dout and dk += dSᵀ·q for RO keys × DV vec4 columns.
        for (var c = 0u; c < BC; c++) {
            var oo: array<vec4<f32>, DV_MAX>;
            var qq: array<vec4<f32>, DV_MAX>;
            for (var v = 0u; v < DV; v++) {
                oo[v] = sh_b2[c * HDP + tc + TC * v];
                qq[v] = sh_b[c * HDP + tc + TC * v];
            }
            for (var o = 0u; o < RO; o++) {
                let row = tr * RO + o;
                let pr = sh_p[row * BC + c];
                let ds = sh_p2[row * BC + c];
                for (var v = 0u; v < DV; v++) {
                    dv[o * DV + v] += pr * oo[v];
                    dk[o * DV + v] += ds * qq[v];
                }
            }
        }
    }

    for (var o = 0u; o < RO; o++) {
        let j = j0 + tr * RO + o;
        if (j >= tk()) {
            continue;
        }
        for (var v = 0u; v < DV; v++) {
            store_dqkv(p.k, b, kh, j, tc + TC * v, dk[o * DV + v] * p.scale);
            store_dqkv(p.v, b, kh, j, tc + TC * v, dv[o * DV + v]);
        }
    }
}

@compute @workgroup_size(WG)
fn attention_backward_dq(@builtin(workgroup_id) wid: vec3<u32>,
                         @builtin(num_workgroups) nwg: vec3<u32>,
                         @builtin(local_invocation_id) lid: vec3<u32>) {
    let tile = query_tile(workgroup_index(wid, nwg));
    if (tile.x < p.nb) {
        dq_tile(tile.x, tile.y, tile.z * BR, lid.x);
    }
}

// attention_backward_dq's work for the query tile i0 .. i0 + BR of (b, h), as invocation tid.
fn dq_tile(b: u32, h: u32, i0: u32, tid: u32) {
    for (var e = tid; e < BR * HD4; e += WG) {
        let r = e / HD4;
        let d4 = e % HD4;
        sh_a[r * HDP + d4] = q4(b, h, i0 + r, d4);
        sh_a2[r * HDP + d4] = do4(b, h, i0 + r, d4);
    }

    let sr = tid / SC;
    let sc = tid % SC;
    let tr = tid / TC;
    let tc = tid % TC;

    var lrow: array<f32, RS_MAX>;
    var drow: array<f32, RS_MAX>;
    for (var k = 0u; k < RS; k++) {
        let st = row_stats(b, h, i0 + sr * RS + k);
        lrow[k] = st.x;
        drow[k] = st.y;
    }
    var dq: array<vec4<f32>, ACC_MAX>;
    for (var a = 0u; a < RO * DV; a++) {
        dq[a] = vec4<f32>(0.0);
    }

    let nkt = (key_end(i0, BR) + BC - 1u) / BC;
    for (var kt = 0u; kt < nkt; kt++) {
        let j0 = kt * BC;
        stream_kv(b, h / p.group, j0, tid);

        // s = q·k and dp = dout·v for RS queries × CS keys; dS goes to sh_p.
        let blk = score_block(sr, sc);
        for (var k = 0u; k < RS; k++) {
            let row = sr * RS + k;
            for (var c = 0u; c < CS; c++) {
                let col = sc + SC * c;
                var pr = 0.0;
                if (visible(i0 + row, j0 + col)) {
                    pr = exp2(blk.s[k * CS + c] * p.scale2 - lrow[k]);
                }
                let f = drop_factor(b, h, i0 + row, j0 + col);
                sh_p[row * BC + col] = pr * (blk.dp[k * CS + c] * f - drow[k]);
            }
        }
        workgroupBarrier();

        // dq += dS·k for RO queries × DV vec4 columns.
        for (var c = 0u; c < BC; c++) {
            var kk: array<vec4<f32>, DV_MAX>;
            for (var v = 0u; v < DV; v++) {
                kk[v] = sh_b[c * HDP + tc + TC * v];
            }
            for (var o = 0u; o < RO; o++) {
                let ds = sh_p[(tr * RO + o) * BC + c];
                for (var v = 0u; v < DV; v++) {
                    dq[o * DV + v] += ds * kk[v];
                }
            }
        }
    }

    for (var o = 0u; o < RO; o++) {
        let i = i0 + tr * RO + o;
        if (i >= p.tq) {
            continue;
        }
        for (var v = 0u; v < DV; v++) {
            store_dqkv(p.q, b, h, i, tc + TC * v, dq[o * DV + v] * p.scale);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Row kernels (include/attention_rows.wgsl): the fused forward and backward again with one
// invocation per row and no workgroup memory, which a CPU-like adapter wants.
#include "include/attention_rows.wgsl"

// ---------------------------------------------------------------------------------------------
// The GEMM path: the fused kernels' results (out and lse; dqkv) from products of the GEMM family
// (gemm.wgsl) and these two kernels between them (src/kernels/attention/gemm_path.rs runs them).
// The B·NH (b, h) pairs go in groups: heads of one sequence, or one head of every sequence,
// whichever makes fewer groups; a group's E = p.grp.w score matrices (T × T) lie in a scratch
// buffer, row (g, i) of entry g at (g·T + i)·T. Under grouped-query attention the heads of a
// sequence go in G groups, group r holding the query heads r, r + G, r + 2G, ... (one per
// key/value head, so that the entries' q, k and v each have one stride).
//   forward:  S = scale2·q·kᵀ (scores in base 2, as the fused kernels use them);
//             attention_scores_softmax turns S into P ∘ M / l and writes lse; out = that · v
//   backward: S again and dP = dout·vᵀ; attention_scores_backward turns S into P ∘ M and dP into
//             dS = P ∘ (M ∘ dP - D); dv = (P ∘ M)ᵀ·dout, dq = scale·dS·k, dk = scale·dSᵀ·q
// A GEMM knows no mask: the products fill masked entries too, and these kernels set them to 0.
// Each product reuses every loaded value across a block of outputs, where the fused kernels
// read each key once per query row; on a CPU-like adapter (lavapipe) that outweighs computing
// the masked half. The tuner measures which path wins.

// (b, h) of entry g of the group: (b0 + g, h0) when the entries are sequences (p.grp.z = 1),
// (b0, h0 + g·grp_step) when they are heads.
fn group_bh(g: u32) -> vec2<u32> {
    if (p.grp.z != 0u) {
        return vec2<u32>(p.grp.x + g, p.grp.y);
    }
    return vec2<u32>(p.grp.x, p.grp.y + g * p.grp_step);
}

// attention_scores_softmax: one invocation per row (g, i) of the group: the row's visible scores
// become P ∘ M / l, the rest 0 (overwritten in place), and lse of (b, h, i) the natural
// logsumexp of the visible scores. Bindings: 1 = scores (read_write), 2 = lse (read_write).
@group(0) @binding(1) var<storage, read_write> gs_s: array<f32>;
@group(0) @binding(2) var<storage, read_write> gs_lse: array<f32>;

@compute @workgroup_size(WG)
fn attention_scores_softmax(@builtin(workgroup_id) wid: vec3<u32>,
                            @builtin(num_workgroups) nwg: vec3<u32>,
                            @builtin(local_invocation_id) lid: vec3<u32>) {
    let idx = global_index(wid, nwg, WG, lid.x);
    if (idx >= p.grp.w * p.tq) {
        return;
    }
    let bh = group_bh(idx / p.tq);
    let i = idx % p.tq;
    let base = idx * tk();
    let n = key_end(i, 1u);
    var m = NEG;
    for (var j = 0u; j < n; j++) {
        m = max(m, gs_s[base + j]);
    }
    var l = 0.0;
    for (var j = 0u; j < n; j++) {
        l += exp2(gs_s[base + j] - m);
    }
    let inv = 1.0 / l;
    for (var j = 0u; j < tk(); j++) {
        var x = 0.0;
        if (j < n) {
            x = exp2(gs_s[base + j] - m) * inv * drop_factor(bh.x, bh.y, i, j);
        }
        gs_s[base + j] = x;
    }
    gs_lse[(bh.x * p.nh + bh.y) * p.tq + i] = (m + log2(l)) * LN2;
}

// attention_scores_backward: one invocation per score (g, i, j) of the group, from the
// recomputed S and dP: P = exp2(S - lse·log2(e)) where j is visible, and writes P ∘ M over S and
// dS = P ∘ (M ∘ dP - D) over dP (both 0 where masked). Bindings: 1 = scores, 2 = dP
// (read_write), 3 = lse, 4 = D (read).
@group(0) @binding(1) var<storage, read_write> gb_s: array<f32>;
@group(0) @binding(2) var<storage, read_write> gb_dp: array<f32>;
@group(0) @binding(3) var<storage, read> gb_lse: array<f32>;
@group(0) @binding(4) var<storage, read> gb_d: array<f32>;

@compute @workgroup_size(WG)
fn attention_scores_backward(@builtin(workgroup_id) wid: vec3<u32>,
                             @builtin(num_workgroups) nwg: vec3<u32>,
                             @builtin(local_invocation_id) lid: vec3<u32>) {
    let idx = global_index(wid, nwg, WG, lid.x);
    if (idx >= p.grp.w * p.tq * tk()) {
        return;
    }
    let j = idx % tk();
    let gi = idx / tk();
    let bh = group_bh(gi / p.tq);
    let i = gi % p.tq;
    let r = (bh.x * p.nh + bh.y) * p.tq + i;
    var pm = 0.0;
    var ds = 0.0;
    if (visible(i, j)) {
        let pr = exp2(gb_s[idx] - gb_lse[r] * LOG2E);
        let f = drop_factor(bh.x, bh.y, i, j);
        pm = pr * f;
        ds = pr * (gb_dp[idx] * f - gb_d[r]);
    }
    gb_s[idx] = pm;
    gb_dp[idx] = ds;
}

// ---------------------------------------------------------------------------------------------
// kv_append: k_cache, v_cache (B, NKV, Tmax, HS) at positions pos0 .. pos0 + Tq receive the k
// and v of the Tq new tokens of qkv (B, Tq, W) (read through p.k and p.v); overwrites those rows.
// One thread per element; p.tk holds Tmax. The caches hold KvElem: the F16 variant rounds to f16.
// Bindings: 1 = qkv (read, f32), 2 = k_cache (read_write), 3 = v_cache (read_write).
// Each f16 store is its own memory location: neighbouring threads write the two halves of a
// word without a race.
@group(0) @binding(2) var<storage, read_write> kc_out: array<KvElem>;
@group(0) @binding(3) var<storage, read_write> vc_out: array<KvElem>;

@compute @workgroup_size(WG)
fn kv_append(@builtin(workgroup_id) wid: vec3<u32>,
             @builtin(num_workgroups) nwg: vec3<u32>,
             @builtin(local_invocation_id) lid: vec3<u32>) {
    let idx = global_index(wid, nwg, WG, lid.x);
    if (idx >= p.nb * p.tq * nkv() * p.hs) {
        return;
    }
    let d = idx % p.hs;
    let r = idx / p.hs;
    let kh = r % nkv();
    let bt = r / nkv();
    let i = bt % p.tq;
    let b = bt / p.tq;
    let dst = ((b * nkv() + kh) * p.tk + pos0() + i) * p.hs + d;
    kc_out[dst] = KvElem(q_in[row_start(p.k, b, kh, i) + d]);
    vc_out[dst] = KvElem(q_in[row_start(p.v, b, kh, i) + d]);
}
