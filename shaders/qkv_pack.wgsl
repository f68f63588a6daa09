// Grouped-query attention's operand: q, k and v packed into one row per token, each key/value
// head repeated for the query heads of its group (transformers' repeat_kv), and the backward.
//
// q (B·T, NH, HS); k, v (B·T, NKV, HS); qkv (B·T, 3, NH, HS); G = NH / NKV; query head h reads
// key/value head h / G.
// qkv_pack_forward:     qkv = [q, k[h / G], v[h / G]]                              overwrites qkv
// qkv_pack_backward_q:  dq (B·T, NH, HS) = dqkv's q part
// qkv_pack_backward_kv: dk, dv (B·T, NKV, HS) = Σ_{r < G} dqkv's k (v) part of head j·G + r,
//                       summed in head order (no atomics: one thread per output element)
//                       backwards overwrite when p.accumulate = 0, add to (+=) when 1
//
// One thread per output element; the 1-D grid may be folded into 2-D for large N (see gpu::grid).

struct Params {
    n: u32,          // elements the dispatch writes (of qkv, dq, or dk)
    nh: u32,
    nkv: u32,
    hs: u32,
    accumulate: u32, // backward: 0 overwrites, 1 adds
    zero: u32,
}

override WG: u32 = 256u;

@group(0) @binding(0) var<uniform> p: Params;

fn index(wid: vec3<u32>, nwg: vec3<u32>, lid: vec3<u32>) -> u32 {
    return (wid.x + wid.y * nwg.x) * WG + lid.x;
}

// Bindings for qkv_pack_forward: 1 = q, 2 = k, 3 = v (read), 4 = qkv (read_write).
@group(0) @binding(1) var<storage, read> fw_q: array<f32>;
@group(0) @binding(2) var<storage, read> fw_k: array<f32>;
@group(0) @binding(3) var<storage, read> fw_v: array<f32>;
@group(0) @binding(4) var<storage, read_write> fw_qkv: array<f32>;

@compute @workgroup_size(WG)
fn qkv_pack_forward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                    @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = index(wid, nwg, lid);
    if (i >= p.n) {
        return;
    }
    let e = i % p.hs;
    let h = (i / p.hs) % p.nh;
    let which = (i / (p.hs * p.nh)) % 3u;
    let row = i / (3u * p.nh * p.hs);
    let kv = (row * p.nkv + h / (p.nh / p.nkv)) * p.hs + e;
    if (which == 0u) {
        fw_qkv[i] = fw_q[(row * p.nh + h) * p.hs + e];
    } else if (which == 1u) {
        fw_qkv[i] = fw_k[kv];
    } else {
        fw_qkv[i] = fw_v[kv];
    }
}

// Bindings for qkv_pack_backward_q: 1 = dqkv (read), 2 = dq (read_write).
@group(0) @binding(1) var<storage, read> bq_dqkv: array<f32>;
@group(0) @binding(2) var<storage, read_write> bq_dq: array<f32>;

@compute @workgroup_size(WG)
fn qkv_pack_backward_q(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                       @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = index(wid, nwg, lid);
    if (i >= p.n) {
        return;
    }
    let width = p.nh * p.hs;
    let row = i / width;
    var d = bq_dqkv[row * 3u * width + i % width];
    if (p.accumulate != 0u) {
        d += bq_dq[i];
    }
    bq_dq[i] = d;
}

// Bindings for qkv_pack_backward_kv: 1 = dqkv (read), 2 = dk, 3 = dv (read_write).
@group(0) @binding(1) var<storage, read> bkv_dqkv: array<f32>;
@group(0) @binding(2) var<storage, read_write> bkv_dk: array<f32>;
@group(0) @binding(3) var<storage, read_write> bkv_dv: array<f32>;

@compute @workgroup_size(WG)
fn qkv_pack_backward_kv(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                        @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = index(wid, nwg, lid);
    if (i >= p.n) {
        return;
    }
    let e = i % p.hs;
    let j = (i / p.hs) % p.nkv;
    let row = i / (p.nkv * p.hs);
    let g = p.nh / p.nkv;
    let width = p.nh * p.hs;
    // k's part of the row starts at width, v's at 2 · width.
    let base = row * 3u * width + j * g * p.hs + e;
    var sk = 0.0;
    var sv = 0.0;
    for (var r = 0u; r < g; r++) {
        sk += bkv_dqkv[base + width + r * p.hs];
        sv += bkv_dqkv[base + 2u * width + r * p.hs];
    }
    if (p.accumulate != 0u) {
        sk += bkv_dk[i];
        sv += bkv_dv[i];
    }
    bkv_dk[i] = sk;
    bkv_dv[i] = sv;
}
