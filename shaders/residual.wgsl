// Residual connection: out = a + b over N elements, and its backward.
//
// residual_forward:  out (N) = a (N) + b (N)                 overwrites out
// residual_backward: da (N) += dout (N); db (N) += dout (N)   accumulates into da and db
//                    (the gradient of a sum reaches both inputs unchanged)
// accumulate:        dst (N) = src (N), or dst += src when p.accumulate != 0
//                    (routes a gradient through a sum: overwrite for the first contribution,
//                    add for the later ones)
//
// One thread per element; the 1-D grid may be folded into 2-D for large N (see gpu::grid).

struct Params {
    n: u32,
    // accumulate only: 0 overwrites dst, 1 adds to it.
    accumulate: u32,
}

override WG: u32 = 256u;

@group(0) @binding(0) var<uniform> p: Params;

#include "include/grid.wgsl"

@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

@compute @workgroup_size(WG)
fn residual_forward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                    @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = global_index(wid, nwg, WG, lid.x);
    if (i < p.n) {
        out[i] = a[i] + b[i];
    }
}

// Bindings for residual_backward: 1 = dout (read), 2 = da (read_write), 3 = db (read_write).
@group(0) @binding(1) var<storage, read> bw_dout: array<f32>;
@group(0) @binding(2) var<storage, read_write> bw_da: array<f32>;
@group(0) @binding(3) var<storage, read_write> bw_db: array<f32>;

@compute @workgroup_size(WG)
fn residual_backward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                     @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = global_index(wid, nwg, WG, lid.x);
    if (i < p.n) {
        let g = bw_dout[i];
        bw_da[i] += g;
        bw_db[i] += g;
    }
}

// Bindings for accumulate: 1 = src (read), 2 = dst (read_write).
@group(0) @binding(1) var<storage, read> acc_src: array<f32>;
@group(0) @binding(2) var<storage, read_write> acc_dst: array<f32>;

@compute @workgroup_size(WG)
fn accumulate(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = global_index(wid, nwg, WG, lid.x);
    if (i < p.n) {
        if (p.accumulate != 0u) {
            acc_dst[i] += acc_src[i];
        } else {
            acc_dst[i] = acc_src[i];
        }
    }
}
