// Multi-head softmax attention over an f16 KV cache: the decoding kernels of attention.wgsl
// (attention_forward as used by forward_cached, and kv_append) with k_cache and v_cache stored in
// f16. Valid only where the adapter has SHADER_F16; attention.wgsl is the f32 twin and the spec.
//
// Legend: B batch, T sequence, C = NH·HS channels, NH heads, HS head size.
// Layouts:
//   qkv              (B, Tq, 3, NH, HS) = (B, Tq, 3C) f32: the QKV projection's output for the
//                    Tq new tokens; q, k, v of token t, head h at
//                    qkv[(b·Tq + t)·3C + {0, C, 2C} + h·HS + d]
//   out              (B, Tq, NH, HS) = (B, Tq, C) f32
//   k_cache, v_cache (B, NH, Tmax, HS) f16, two elements per 32-bit word
// scale = 1/sqrt(HS). Causal: the query at absolute position pos0 + i sees keys j <= pos0 + i.
//
// attention_forward is attention.wgsl's with k and v widened from f16 on load: the tiles in
// workgroup memory, the scores, the softmax and every accumulation stay f32, with the same tiling
// and the same order of operations, so on f16-rounded keys and values both files compute the
// same sums. kv_append rounds the new k and v to f16 (values must lie within f16's finite
// range, |x| <= 65504).
//
// Every reduction runs in a fixed order and nothing uses atomics: the same inputs give the same
// bits on the same adapter.

enable f16;

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
    pad: u32,
    q: vec4<u32>,     // (base, batch stride, token stride, head stride) of q, in elements
    k: vec4<u32>,     // same for k (k_cache; qkv for kv_append)
    v: vec4<u32>,     // same for v (v_cache; qkv for kv_append)
    o: vec4<u32>,     // same for out, (B, Tq, C)
    drop_seed: u32,   // attention dropout (attention.wgsl's training kernels only): unused here
    drop_step: u32,
    drop_threshold: u32,
    drop_scale: f32,
}

@group(0) @binding(0) var<uniform> p: Params;

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

var<workgroup> sh_a: array<vec4<f32>, BR * HDP>;    // resident rows: Q
var<workgroup> sh_b: array<vec4<f32>, BC * HDP>;    // streamed: K
var<workgroup> sh_b2: array<vec4<f32>, BC * HDP>;   // streamed: V
var<workgroup> sh_p: array<f32, BR * BC>;           // P
var<workgroup> sh_red: array<f32, BR * SC>;         // per-row partials across score threads
var<workgroup> sh_row: array<f32, BR>;              // per-row rescale factor, then running max

// Fused forward bindings: 1 = q (read, f32), 2 = k, 3 = v (read, f16; the same buffer may be
// bound to both), 4 = out (read_write), 5 = lse (read_write).
@group(0) @binding(1) var<storage, read> q_in: array<f32>;
@group(0) @binding(2) var<storage, read> k_in: array<f16>;
@group(0) @binding(3) var<storage, read> v_in: array<f16>;
@group(0) @binding(4) var<storage, read_write> out: array<f32>;
@group(0) @binding(5) var<storage, read_write> lse_out: array<f32>;

// Element loads, one function per tensor: k and v are widened from the f16 caches.
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

// Dims 4·d4 .. 4·d4+3 of query i / key j, zero beyond HS and for rows past the end.
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

fn k4(b: u32, h: u32, j: u32, d4: u32) -> vec4<f32> {
    var r = vec4<f32>(0.0);
    if (j < p.tk) {
        let base = row_start(p.k, b, h, j);
        for (var c = 0u; c < 4u; c++) {
            let d = 4u * d4 + c;
            if (d < p.hs) {
                r[c] = k_at(base + d);
            }
        }
    }
    return r;
}

fn v4(b: u32, h: u32, j: u32, d4: u32) -> vec4<f32> {
    var r = vec4<f32>(0.0);
    if (j < p.tk) {
        let base = row_start(p.v, b, h, j);
        for (var c = 0u; c < 4u; c++) {
            let d = 4u * d4 + c;
            if (d < p.hs) {
                r[c] = v_at(base + d);
            }
        }
    }
    return r;
}

// Whether query i (relative to pos0) may see key j.
fn visible(i: u32, j: u32) -> bool {
    return i < p.tq && j < p.tk && (p.causal == 0u || j <= p.pos0 + i);
}

// One key past the last key any query of rows [i0, i0 + n) may see: the causal mask ends the
// loop over key tiles there, so fully masked tiles are never loaded.
fn key_end(i0: u32, n: u32) -> u32 {
    if (p.causal == 0u) {
        return p.tk;
    }
    return min(p.tk, p.pos0 + min(i0 + n, p.tq));
}

// Rows tiles are handed out heaviest first under the causal mask (the last query tiles see
// the most keys), which evens out the tail of the dispatch.
fn query_tile(linear: u32) -> vec3<u32> {
    let t = p.ntiles - 1u - linear % p.ntiles;
    let bh = linear / p.ntiles;
    return vec3<u32>(bh / p.nh, bh % p.nh, t);
}

// attention_forward: out (B, Tq, NH, HS) and lse (B, NH, Tq) from q (B, Tq, NH, HS) and k, v
// (B, Tk, NH, HS), each read through its strides; overwrites out and lse (lse only when
// write_lse = 1). One workgroup per (b, h, tile of BR queries), grid folded into x and y.
// Online softmax: the running max m and sum l per row rescale the output accumulator as each
// key tile arrives, so no T×T matrix exists anywhere; key tiles past the causal limit are skipped.
@compute @workgroup_size(WG)
fn attention_forward(@builtin(workgroup_id) wid: vec3<u32>,
                     @builtin(num_workgroups) nwg: vec3<u32>,
                     @builtin(local_invocation_id) lid: vec3<u32>) {
    let linear = wid.x + wid.y * nwg.x;
    if (linear >= p.nb * p.nh * p.ntiles) {
        return;
    }
    let tile = query_tile(linear);
    let b = tile.x;
    let h = tile.y;
    let i0 = tile.z * BR;
    let tid = lid.x;

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
        workgroupBarrier();
        for (var e = tid; e < BC * HD4; e += WG) {
            let r = e / HD4;
            let d4 = e % HD4;
            sh_b[r * HDP + d4] = k4(b, h, j0 + r, d4);
            sh_b2[r * HDP + d4] = v4(b, h, j0 + r, d4);
        }
        workgroupBarrier();

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
                let pr = exp2(s[i * CS + c] - mx);
                sh_p[row * BC + sc + SC * c] = pr;
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
        let base = row_start(p.o, b, h, i);
        for (var v = 0u; v < DV; v++) {
            let val = acc[o * DV + v] * inv;
            let d4 = tc + TC * v;
            for (var c = 0u; c < 4u; c++) {
                let d = 4u * d4 + c;
                if (d < p.hs) {
                    out[base + d] = val[c];
                }
            }
        }
        if (tc == 0u && p.write_lse != 0u) {
            lse_out[(b * p.nh + h) * p.tq + i] = (sh_row[row] + log2(lsum)) * LN2;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// kv_append: k_cache, v_cache (B, NH, Tmax, HS) at positions pos0 .. pos0 + Tq receive the k and
// v of the Tq new tokens of qkv (B, Tq, 3C) (read through p.k and p.v); overwrites those rows.
// One thread per element; p.tk holds Tmax.
// Bindings: 1 = qkv (read, f32), 2 = k_cache (read_write, f16), 3 = v_cache (read_write, f16).
// Each f16 store is its own memory location: neighbouring threads write the two halves of a
// word without a race.
@group(0) @binding(2) var<storage, read_write> kc_out: array<f16>;
@group(0) @binding(3) var<storage, read_write> vc_out: array<f16>;

@compute @workgroup_size(WG)
fn kv_append(@builtin(workgroup_id) wid: vec3<u32>,
             @builtin(num_workgroups) nwg: vec3<u32>,
             @builtin(local_invocation_id) lid: vec3<u32>) {
    let idx = (wid.x + wid.y * nwg.x) * WG + lid.x;
    if (idx >= p.nb * p.tq * p.nh * p.hs) {
        return;
    }
    let d = idx % p.hs;
    let r = idx / p.hs;
    let h = r % p.nh;
    let bt = r / p.nh;
    let i = bt % p.tq;
    let b = bt / p.tq;
    let dst = ((b * p.nh + h) * p.tk + p.pos0 + i) * p.hs + d;
    kc_out[dst] = f16(q_in[row_start(p.k, b, h, i) + d]);
    vc_out[dst] = f16(q_in[row_start(p.v, b, h, i) + d]);
}

