// GELU, GPT-2's tanh approximation (gelu_new), and its backward.
//
// gelu_forward:  out (N) = 0.5 · x · (1 + tanh(u)), u = sqrt(2/π) · (x + 0.044715 · x³), x = inp (N)
//                overwrites out
// gelu_backward: dinp (N) = dout (N) · gelu'(inp (N)), the exact derivative of the tanh form:
//                gelu'(x) = 0.5 · (1 + tanh u) + 0.5 · x · (1 - tanh² u) · du/dx,
//                du/dx = sqrt(2/π) · (1 + 3 · 0.044715 · x²)
//                overwrites dinp when p.accumulate = 0, adds to it (+=) when p.accumulate = 1
//
// The formulas live in include/gelu.wgsl, shared with gemm.wgsl's fused epilogues.
//
// One thread per element; the 1-D grid may be folded into 2-D for large N (see gpu::grid).

struct Params {
    n: u32,
    accumulate: u32, // backward: 0 overwrites dinp, 1 adds to it
}

override WG: u32 = 256u;

@group(0) @binding(0) var<uniform> p: Params;

#include "include/grid.wgsl"

#include "include/gelu.wgsl"

// Bindings for gelu_forward: 1 = inp (read), 2 = out (read_write).
@group(0) @binding(1) var<storage, read> fw_inp: array<f32>;
@group(0) @binding(2) var<storage, read_write> fw_out: array<f32>;

@compute @workgroup_size(WG)
fn gelu_forward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = global_index(wid, nwg, WG, lid.x);
    if (i < p.n) {
        let x = fw_inp[i];
        fw_out[i] = gelu(x);
    }
}

// Bindings for gelu_backward: 1 = inp, 2 = dout (read), 3 = dinp (read_write).
@group(0) @binding(1) var<storage, read> bw_inp: array<f32>;
@group(0) @binding(2) var<storage, read> bw_dout: array<f32>;
@group(0) @binding(3) var<storage, read_write> bw_dinp: array<f32>;

@compute @workgroup_size(WG)
fn gelu_backward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                 @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = global_index(wid, nwg, WG, lid.x);
    if (i < p.n) {
        var d = bw_dout[i] * gelu_grad(bw_inp[i]);
        if (p.accumulate != 0u) {
            d += bw_dinp[i];
        }
        bw_dinp[i] = d;
    }
}
