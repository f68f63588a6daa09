// Attention's operand: q, k and v packed into one row per token (the layout attention.wgsl
// reads, which serves query head h with key/value head h / G itself), and the backward.
//
// q (B·T, NH, HS); k, v (B·T, NKV, HS); qkv (B·T, W), W = (NH + 2·NKV)·HS: each row the token's
// NH query heads, then its NKV key heads, then its NKV value heads.
// qkv_pack_forward:     qkv = [q, k, v] row by row                                  overwrites qkv
// qkv_pack_backward_q:  dq (B·T, NH, HS) = dqkv's q part
// qkv_pack_backward_kv: dk, dv (B·T, NKV, HS) = dqkv's k and v parts
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

// Widths of a row's parts: its query heads (x) and its key heads, as its value heads (y).
fn part_widths() -> vec2<u32> {
    return vec2<u32>(p.nh, p.nkv) * p.hs;
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
    let parts = part_widths();
    let cq = parts.x;
    let ckv = parts.y;
    let width = cq + 2u * ckv;
    let row = i / width;
    let e = i % width;
    if (e < cq) {
        fw_qkv[i] = fw_q[row * cq + e];
    } else if (e < cq + ckv) {
        fw_qkv[i] = fw_k[row * ckv + e - cq];
    } else {
        fw_qkv[i] = fw_v[row * ckv + e - cq - ckv];
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
    let parts = part_widths();
    let width = parts.x + 2u * parts.y;
    var d = bq_dqkv[i / parts.x * width + i % parts.x];
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
    // k's part of the row starts after the query heads (parts.x), v's parts.y later.
    let parts = part_widths();
    let ckv = parts.y;
    let at = i / ckv * (parts.x + 2u * ckv) + parts.x + i % ckv;
    var sk = bkv_dqkv[at];
    var sv = bkv_dqkv[at + ckv];
    if (p.accumulate != 0u) {
        sk += bkv_dk[i];
        sv += bkv_dv[i];
    }
    bkv_dk[i] = sk;
    bkv_dv[i] = sv;
}
