// Fused softmax cross-entropy over rows of logits, and its in-place backward.
//
// cross_entropy_forward:  losses (N) = logsumexp(logits[i, :V]) - logits[i, targets[i]]   overwrites
//                         lse (N) = logsumexp(logits[i, :V]), saved for the backward    overwrites
// cross_entropy_backward: logits (N, Vp) := dloss · (exp(logits[i, :V] - lse[i]) - onehot(targets[i]))
//                         in place: overwrites the logits with dlogits; columns [V, Vp) and
//                         ignored rows become 0
// cross_entropy_forward_vec4, cross_entropy_backward_vec4: the same with 16-byte loads and stores,
//                         for Vp % 4 == 0 and 16-byte aligned logits
//   logits (N, Vp) f32 whose columns [V, Vp) are padding: their values never matter (the vec4
//   kernels load them and mask them out); targets (N) u32; lse (N) f32.
//   A target of IGNORE (0xffffffff) excludes the row: loss 0, gradient row 0. Any other target >= V
//   is invalid: its loss and the columns [0, V) of its gradient row are NaN, so the caller can
//   report it; nothing is read or written out of bounds.
//
// One workgroup of WG threads (a power of two) per row; rows fold into a 2-D grid for large N (see
// gpu::grid), recovered by workgroup_index (include/grid.wgsl). The forward reads each logit once: every thread
// keeps an online softmax (running max m and Σ exp(x - m)) over its share of the row (columns
// j ≡ lid mod WG, or vec4s q ≡ lid mod WG), several loads in flight at a time, then the WG pairs (m, s) are combined by a fixed tree in workgroup memory,
// so results are the same bits every run and stable for logits of any magnitude. The backward
// recomputes exp(logit - lse) per element.
// Legend: N rows (B·T), V vocabulary, Vp padded vocabulary (row stride).

struct Params {
    n: u32,
    v: u32,
    vp: u32,
    dloss: f32, // cross_entropy_backward only; rewritten between steps by set_dloss
}

override WG: u32 = 256u;

const IGNORE: u32 = 0xffffffffu;
// The most negative finite f32: the running max starts here, so max - max is never inf - inf.
const LOWEST: f32 = -3.4028234663852886e38;

@group(0) @binding(0) var<uniform> p: Params;

#include "include/grid.wgsl"

// A NaN the compiler cannot fold away (WGSL has no NaN constant).
fn nan_from(x: u32) -> f32 {
    return bitcast<f32>(0x7fc00000u | (x & 1u));
}

// Bindings for cross_entropy_forward: 1 = logits (read), 2 = targets (read), 3 = losses
// (read_write), 4 = lse (read_write).
@group(0) @binding(1) var<storage, read> fw_logits: array<f32>;
@group(0) @binding(2) var<storage, read> fw_targets: array<u32>;
@group(0) @binding(3) var<storage, read_write> fw_losses: array<f32>;
@group(0) @binding(4) var<storage, read_write> fw_lse: array<f32>;

var<workgroup> red_m: array<f32, WG>;
var<workgroup> red_s: array<f32, WG>;

// Combines the threads' (max, Σ exp(x - max)) pairs by a fixed tree; the row's pair ends in slot 0.
fn reduce_softmax(lid: u32, m: f32, s: f32) {
    red_m[lid] = m;
    red_s[lid] = s;
    workgroupBarrier();
    for (var stride = WG / 2u; stride > 0u; stride >>= 1u) {
        if (lid < stride) {
            let m1 = red_m[lid];
            let m2 = red_m[lid + stride];
            let mx = max(m1, m2);
            red_s[lid] = red_s[lid] * exp(m1 - mx) + red_s[lid + stride] * exp(m2 - mx);
            red_m[lid] = mx;
        }
        workgroupBarrier();
    }
}

// The epilogue of a row whose (max, Σ exp(x - max)) is (mx, s): the loss (from the target logit
// `xt`, read only for a valid target) and lse.
fn write_loss(row: u32, tgt: u32, xt: f32, mx: f32, s: f32) {
    let log_s = log(s);
    var loss = 0.0;
    if (tgt != IGNORE) {
        // (max - x) + log Σ keeps full precision for large logits
        loss = select(nan_from(tgt), (mx - xt) + log_s, tgt < p.v);
    }
    fw_losses[row] = loss;
    fw_lse[row] = mx + log_s;
}

@compute @workgroup_size(WG)
fn cross_entropy_forward(@builtin(workgroup_id) wid: vec3<u32>,
                         @builtin(num_workgroups) nwg: vec3<u32>,
                         @builtin(local_invocation_id) lid: vec3<u32>) {
    let row = workgroup_index(wid, nwg);
    if (row >= p.n) {
        return;
    }
    let base = row * p.vp;
    let last = p.v - 1u;
    var m = LOWEST;
    var s = 0.0;
    for (var j = lid.x; j < p.v; j += 4u * WG) {
        // Four coalesced loads in flight. Columns past V read a clamped index and count as LOWEST:
        // exp(LOWEST - mx) is 0 once mx is any real logit, and whatever they add while mx is
        // still LOWEST is scaled by exp(LOWEST - max) = 0 when combined with a real maximum.
        let j1 = j + WG;
        let j2 = j + 2u * WG;
        let j3 = j + 3u * WG;
        let x0 = fw_logits[base + j];
        let x1 = select(LOWEST, fw_logits[base + min(j1, last)], j1 < p.v);
        let x2 = select(LOWEST, fw_logits[base + min(j2, last)], j2 < p.v);
        let x3 = select(LOWEST, fw_logits[base + min(j3, last)], j3 < p.v);
        let mx = max(max(m, x0), max(x1, max(x2, x3)));
        s = s * exp(m - mx) + ((exp(x0 - mx) + exp(x1 - mx)) + (exp(x2 - mx) + exp(x3 - mx)));
        m = mx;
    }
    reduce_softmax(lid.x, m, s);
    if (lid.x == 0u) {
        let tgt = fw_targets[row];
        write_loss(row, tgt, fw_logits[base + min(tgt, last)], red_m[0], red_s[0]);
    }
}

// Bindings for cross_entropy_forward_vec4: as cross_entropy_forward, logits viewed as vec4
// (Vp % 4 == 0, 16-byte aligned); losses and lse are shared with it.
@group(0) @binding(1) var<storage, read> fv_logits: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> fv_targets: array<u32>;

// Logits at vec4 index q of a row, with the columns >= V (padding, possibly garbage) as LOWEST.
fn masked4(base4: u32, q: u32) -> vec4<f32> {
    let last4 = (p.v - 1u) / 4u;
    let cols = vec4<u32>(4u * q) + vec4<u32>(0u, 1u, 2u, 3u);
    return select(vec4<f32>(LOWEST), fv_logits[base4 + min(q, last4)], cols < vec4<u32>(p.v));
}

@compute @workgroup_size(WG)
fn cross_entropy_forward_vec4(@builtin(workgroup_id) wid: vec3<u32>,
                              @builtin(num_workgroups) nwg: vec3<u32>,
                              @builtin(local_invocation_id) lid: vec3<u32>) {
    let row = workgroup_index(wid, nwg);
    if (row >= p.n) {
        return;
    }
    let base4 = row * (p.vp / 4u);
    let v4 = (p.v + 3u) / 4u;
    var m = LOWEST;
    var s = 0.0;
    for (var q = lid.x; q < v4; q += 2u * WG) {
        // Two 16-byte loads in flight; masked columns behave as in cross_entropy_forward.
        let xa = masked4(base4, q);
        let xb = masked4(base4, q + WG);
        let mv = max(xa, xb);
        let mx = max(m, max(max(mv.x, mv.y), max(mv.z, mv.w)));
        let ea = exp(xa - mx);
        let eb = exp(xb - mx);
        let e = ea + eb;
        s = s * exp(m - mx) + ((e.x + e.y) + (e.z + e.w));
        m = mx;
    }
    reduce_softmax(lid.x, m, s);
    if (lid.x == 0u) {
        let tgt = fv_targets[row];
        let tc = min(tgt, p.v - 1u);
        write_loss(row, tgt, fv_logits[base4 + tc / 4u][tc % 4u], red_m[0], red_s[0]);
    }
}

// cross_entropy_forward_rows: cross_entropy_forward's results with one invocation per row (WG rows
// per workgroup) and no workgroup memory or barriers, the online softmax running along the row
// in order. For short rows (a small vocabulary) and CPU-like adapters, where a tree of WG threads
// per row is mostly idle threads and barriers. Same bindings.
@compute @workgroup_size(WG)
fn cross_entropy_forward_rows(@builtin(workgroup_id) wid: vec3<u32>,
                              @builtin(num_workgroups) nwg: vec3<u32>,
                              @builtin(local_invocation_id) lid: vec3<u32>) {
    let row = global_index(wid, nwg, WG, lid.x);
    if (row >= p.n) {
        return;
    }
    let base = row * p.vp;
    var m = LOWEST;
    var s = 0.0;
    for (var j = 0u; j < p.v; j++) {
        let x = fw_logits[base + j];
        let mx = max(m, x);
        s = s * exp(m - mx) + exp(x - mx);
        m = mx;
    }
    let tgt = fw_targets[row];
    write_loss(row, tgt, fw_logits[base + min(tgt, p.v - 1u)], m, s);
}

// Bindings for cross_entropy_backward: 1 = lse (read), 2 = targets (read), 3 = logits (read_write,
// becomes dlogits).
@group(0) @binding(1) var<storage, read> bw_lse: array<f32>;
@group(0) @binding(2) var<storage, read> bw_targets: array<u32>;
@group(0) @binding(3) var<storage, read_write> bw_logits: array<f32>;

// dlogits of columns first, first + step, ... < Vp of `row` (the scalar kernels' shared body).
fn backward_columns(row: u32, first: u32, step: u32) {
    let base = row * p.vp;
    let tgt = bw_targets[row];
    let lse = bw_lse[row];
    let live = tgt != IGNORE;
    let invalid = live && tgt >= p.v;
    for (var j = first; j < p.vp; j += step) {
        var d = 0.0;
        if (live && j < p.v) {
            let prob = exp(bw_logits[base + j] - lse);
            d = select(p.dloss * (prob - select(0.0, 1.0, j == tgt)), nan_from(tgt), invalid);
        }
        bw_logits[base + j] = d;
    }
}

@compute @workgroup_size(WG)
fn cross_entropy_backward(@builtin(workgroup_id) wid: vec3<u32>,
                          @builtin(num_workgroups) nwg: vec3<u32>,
                          @builtin(local_invocation_id) lid: vec3<u32>) {
    let row = workgroup_index(wid, nwg);
    if (row >= p.n) {
        return;
    }
    backward_columns(row, lid.x, WG);
}

// cross_entropy_backward_rows: cross_entropy_backward with one invocation per row (WG rows per
// workgroup), the forward_rows kernel's twin. Same bindings.
@compute @workgroup_size(WG)
fn cross_entropy_backward_rows(@builtin(workgroup_id) wid: vec3<u32>,
                               @builtin(num_workgroups) nwg: vec3<u32>,
                               @builtin(local_invocation_id) lid: vec3<u32>) {
    let row = global_index(wid, nwg, WG, lid.x);
    if (row >= p.n) {
        return;
    }
    backward_columns(row, 0u, 1u);
}

// Bindings for cross_entropy_backward_vec4: as cross_entropy_backward, logits viewed as vec4
// (Vp % 4 == 0, 16-byte aligned).
@group(0) @binding(1) var<storage, read> bv_lse: array<f32>;
@group(0) @binding(2) var<storage, read> bv_targets: array<u32>;
@group(0) @binding(3) var<storage, read_write> bv_logits: array<vec4<f32>>;

@compute @workgroup_size(WG)
fn cross_entropy_backward_vec4(@builtin(workgroup_id) wid: vec3<u32>,
                               @builtin(num_workgroups) nwg: vec3<u32>,
                               @builtin(local_invocation_id) lid: vec3<u32>) {
    let row = workgroup_index(wid, nwg);
    if (row >= p.n) {
        return;
    }
    let vp4 = p.vp / 4u;
    let base4 = row * vp4;
    let tgt = bv_targets[row];
    let lse = bv_lse[row];
    let live = tgt != IGNORE;
    let invalid = live && tgt >= p.v;
    for (var q = lid.x; q < vp4; q += WG) {
        let cols = vec4<u32>(4u * q) + vec4<u32>(0u, 1u, 2u, 3u);
        let prob = exp(bv_logits[base4 + q] - lse);
        var d = p.dloss * (prob - select(vec4<f32>(0.0), vec4<f32>(1.0), cols == vec4<u32>(tgt)));
        d = select(d, vec4<f32>(nan_from(tgt)), vec4<bool>(invalid));
        // Padding (possibly garbage, so exp may be NaN there) and ignored rows become 0.
        bv_logits[base4 + q] = select(vec4<f32>(0.0), d, (cols < vec4<u32>(p.v)) & vec4<bool>(live));
    }
}
