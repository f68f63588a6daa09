// Inverted dropout with a counter-based mask, and its backward.
//
// Element i is kept iff hash(seed, step, i) >= p.threshold (threshold = p · 2³², so it is kept
// with probability 1 - p); kept values are scaled by p.scale = 1 / (1 - p), dropped ones are 0.
// No mask is stored: the backward regenerates it from (seed, step, i). The hash is
// include/hash.wgsl's element_hash, mirrored bit for bit by src/hash.rs on the CPU. The counter
// step is the per-step uniform's dropout_step (include/step.wgsl): a new one every micro-step.
//
// dropout_forward:  out (N) = keep(i) ? inp (N) · scale : 0          overwrites out
// dropout_backward: dinp (N) = keep(i) ? dout (N) · scale : 0        overwrites dinp when
//                   p.accumulate = 0, adds to it (+=) when p.accumulate = 1
//
// One thread per element; the 1-D grid may be folded into 2-D for large N (see gpu::grid).

struct Params {
    seed: u32,       // of this site's stream
    n: u32,
    threshold: u32,  // keep iff hash >= threshold
    scale: f32,      // 1 / (1 - p)
    accumulate: u32, // backward: 0 overwrites dinp, 1 adds to it
}

override WG: u32 = 256u;

@group(0) @binding(0) var<uniform> p: Params;
#include "include/step.wgsl"

#include "include/grid.wgsl"

#include "include/hash.wgsl"

fn keep(i: u32) -> bool {
    return element_hash(mask_key(p.seed, step.dropout_step), i) >= p.threshold;
}

// Bindings for dropout_forward: 1 = inp (read), 2 = out (read_write).
@group(0) @binding(1) var<storage, read> fw_inp: array<f32>;
@group(0) @binding(2) var<storage, read_write> fw_out: array<f32>;

@compute @workgroup_size(WG)
fn dropout_forward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                   @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = global_index(wid, nwg, WG, lid.x);
    if (i < p.n) {
        fw_out[i] = select(0.0, fw_inp[i] * p.scale, keep(i));
    }
}

// Bindings for dropout_backward: 1 = dout (read), 2 = dinp (read_write).
@group(0) @binding(1) var<storage, read> bw_dout: array<f32>;
@group(0) @binding(2) var<storage, read_write> bw_dinp: array<f32>;

@compute @workgroup_size(WG)
fn dropout_backward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                    @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = global_index(wid, nwg, WG, lid.x);
    if (i < p.n) {
        var d = select(0.0, bw_dout[i] * p.scale, keep(i));
        if (p.accumulate != 0u) {
            d += bw_dinp[i];
        }
        bw_dinp[i] = d;
    }
}
