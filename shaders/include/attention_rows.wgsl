// The row kernels of attention.wgsl, included at their place there (after the fused backward,
// whose bindings, Params and helpers they use): a part of that file, kept apart for its length.
//
// Row kernels: the fused forward and backward again, with one invocation per row (a query, or a
// key for dK/dV) and no workgroup memory or barriers. Each invocation streams the keys (or
// queries) its row sees straight from the storage buffers and keeps its row's vectors and
// accumulators in private arrays of HD4 vec4s. Nothing is shared between rows, which a GPU
// wants (the tiles above), but a CPU-like adapter (lavapipe) runs every barrier as the end of a
// loop over the workgroup's invocations, and a short sequence leaves most of a BR-row tile
// empty: there these kernels do less. Same bindings and Params as the tiled kernels; override
// constants WG and HD only. The launcher picks between them by measurement.
// Results agree with the tiled kernels to rounding: the softmax rescales after every key here
// instead of after every tile, and the row sum is added in another order.

const RMAX: u32 = 32u;   // MAX_HS / 4: capacity of the private row arrays

// attention_forward_rows: attention_forward's outputs, one invocation per (b, h, query i), rows of
// one (b, h) adjacent.
@compute @workgroup_size(WG)
fn attention_forward_rows(@builtin(workgroup_id) wid: vec3<u32>,
                          @builtin(num_workgroups) nwg: vec3<u32>,
                          @builtin(local_invocation_id) lid: vec3<u32>) {
    let at = row_of(global_index(wid, nwg, WG, lid.x), p.tq, p.nh);
    if (at.x < p.nb) {
        forward_row(at.x, at.y, at.z);
    }
}

// attention_forward_rows's work for row i of (b, h).
fn forward_row(b: u32, h: u32, i: u32) {
    var qr: array<vec4<f32>, RMAX>;
    var acc: array<vec4<f32>, RMAX>;
    for (var d4 = 0u; d4 < HD4; d4++) {
        qr[d4] = q4(b, h, i, d4);
        acc[d4] = vec4<f32>(0.0);
    }
    var m = NEG;
    var l = 0.0;
    let kh = h / p.group;
    let nk = key_end(i, 1u);
    for (var j = 0u; j < nk; j++) {
        var s = 0.0;
        for (var d4 = 0u; d4 < HD4; d4++) {
            s += dot(qr[d4], k4(b, kh, j, d4));
        }
        s *= p.scale2;
        let mx = max(m, s);
        let alpha = exp2(m - mx);
        let pr = exp2(s - mx);
        l = l * alpha + pr;
        m = mx;
        let pf = pr * drop_factor(b, h, i, j);
        for (var d4 = 0u; d4 < HD4; d4++) {
            acc[d4] = acc[d4] * alpha + pf * v4(b, kh, j, d4);
        }
    }

    let inv = 1.0 / l;
    for (var d4 = 0u; d4 < HD4; d4++) {
        store_out(b, h, i, d4, acc[d4] * inv);
    }
    if (p.write_lse != 0u) {
        lse_out[(b * p.nh + h) * p.tq + i] = (m + log2(l)) * LN2;
    }
}

// attention_backward_dkdv_rows: dk and dv of key j, one invocation per (b, key/value head, j),
// looping over the queries of each query head of the group, in head order, that see it.
@compute @workgroup_size(WG)
fn attention_backward_dkdv_rows(@builtin(workgroup_id) wid: vec3<u32>,
                                @builtin(num_workgroups) nwg: vec3<u32>,
                                @builtin(local_invocation_id) lid: vec3<u32>) {
    let at = row_of(global_index(wid, nwg, WG, lid.x), tk(), nkv());
    if (at.x < p.nb) {
        dkdv_row(at.x, at.y, at.z);
    }
}

// attention_backward_dkdv_rows's work for row j of (b, kh), kh a key/value head.
fn dkdv_row(b: u32, kh: u32, j: u32) {
    var kr: array<vec4<f32>, RMAX>;
    var vr: array<vec4<f32>, RMAX>;
    var dk: array<vec4<f32>, RMAX>;
    var dv: array<vec4<f32>, RMAX>;
    for (var d4 = 0u; d4 < HD4; d4++) {
        kr[d4] = k4(b, kh, j, d4);
        vr[d4] = v4(b, kh, j, d4);
        dk[d4] = vec4<f32>(0.0);
        dv[d4] = vec4<f32>(0.0);
    }
    // Queries i see key j when j <= i (pos0 = 0 here).
    var i0 = 0u;
    if (p.causal != 0u) {
        i0 = j;
    }
    // The queries i0 .. Tq of each query head of the group, head after head.
    let per_head = p.tq - i0;
    for (var hi = 0u; hi < per_head * p.group; hi++) {
        let h = kh * p.group + hi / per_head;
        let i = i0 + hi % per_head;
        let r = (b * p.nh + h) * p.tq + i;
        var s = 0.0;
        var dp = 0.0;
        for (var d4 = 0u; d4 < HD4; d4++) {
            s += dot(kr[d4], q4(b, h, i, d4));
            dp += dot(vr[d4], do4(b, h, i, d4));
        }
        let pr = exp2(s * p.scale2 - bw_lse[r] * LOG2E);
        let f = drop_factor(b, h, i, j);
        let ds = pr * (dp * f - bw_d[r]);
        let pf = pr * f;
        for (var d4 = 0u; d4 < HD4; d4++) {
            dv[d4] += pf * do4(b, h, i, d4);
            dk[d4] += ds * q4(b, h, i, d4);
        }
    }
    for (var d4 = 0u; d4 < HD4; d4++) {
        store_dqkv(p.k, b, kh, j, d4, dk[d4] * p.scale);
        store_dqkv(p.v, b, kh, j, d4, dv[d4]);
    }
}

// attention_backward_dq_rows: dq of query i, one invocation per (b, h, i), looping over the keys
// it sees.
@compute @workgroup_size(WG)
fn attention_backward_dq_rows(@builtin(workgroup_id) wid: vec3<u32>,
                              @builtin(num_workgroups) nwg: vec3<u32>,
                              @builtin(local_invocation_id) lid: vec3<u32>) {
    let at = row_of(global_index(wid, nwg, WG, lid.x), p.tq, p.nh);
    if (at.x < p.nb) {
        dq_row(at.x, at.y, at.z);
    }
}

// attention_backward_dq_rows's work for row i of (b, h).
fn dq_row(b: u32, h: u32, i: u32) {
    var qr: array<vec4<f32>, RMAX>;
    var orow: array<vec4<f32>, RMAX>;
    var dq: array<vec4<f32>, RMAX>;
    for (var d4 = 0u; d4 < HD4; d4++) {
        qr[d4] = q4(b, h, i, d4);
        orow[d4] = do4(b, h, i, d4);
        dq[d4] = vec4<f32>(0.0);
    }
    let r = (b * p.nh + h) * p.tq + i;
    let lq = bw_lse[r] * LOG2E;
    let dd = bw_d[r];
    let kh = h / p.group;
    let nk = key_end(i, 1u);
    for (var j = 0u; j < nk; j++) {
        var s = 0.0;
        var dp = 0.0;
        for (var d4 = 0u; d4 < HD4; d4++) {
            s += dot(qr[d4], k4(b, kh, j, d4));
            dp += dot(orow[d4], v4(b, kh, j, d4));
        }
        let pr = exp2(s * p.scale2 - lq);
        let ds = pr * (dp * drop_factor(b, h, i, j) - dd);
        for (var d4 = 0u; d4 < HD4; d4++) {
            dq[d4] += ds * k4(b, kh, j, d4);
        }
    }
    for (var d4 = 0u; d4 < HD4; d4++) {
        store_dqkv(p.q, b, h, i, d4, dq[d4] * p.scale);
    }
}
