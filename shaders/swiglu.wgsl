// The gated MLP's activation, SiLU(gate) · up, and its backward.
//
// swiglu_forward:  out (N) = silu(gate (N)) · up (N), silu(x) = x · sigmoid(x)   overwrites out
// swiglu_backward: dgate (N) = dout (N) · up · silu'(gate), silu'(x) = s · (1 + x · (1 - s)),
//                  s = sigmoid(x); dup (N) = dout · silu(gate)
//                  overwrite dgate and dup when p.accumulate = 0, add to them (+=) when 1
//
// gate and up are separate tensors (the outputs of gate_proj and up_proj).
// One thread per element; the 1-D grid may be folded into 2-D for large N (see gpu::grid).

struct Params {
    n: u32,
    accumulate: u32, // backward: 0 overwrites dgate and dup, 1 adds to them
}

override WG: u32 = 256u;

@group(0) @binding(0) var<uniform> p: Params;

fn index(wid: vec3<u32>, nwg: vec3<u32>, lid: vec3<u32>) -> u32 {
    return (wid.x + wid.y * nwg.x) * WG + lid.x;
}

// 1 / (1 + e^-x), with the exponential of a non-positive number only, so that it never
// overflows.
fn sigmoid(x: f32) -> f32 {
    let e = exp(-abs(x));
    let s = 1.0 / (1.0 + e);
    return select(e * s, s, x >= 0.0);
}

// Bindings for swiglu_forward: 1 = gate, 2 = up (read), 3 = out (read_write).
@group(0) @binding(1) var<storage, read> fw_gate: array<f32>;
@group(0) @binding(2) var<storage, read> fw_up: array<f32>;
@group(0) @binding(3) var<storage, read_write> fw_out: array<f32>;

@compute @workgroup_size(WG)
fn swiglu_forward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                  @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = index(wid, nwg, lid);
    if (i < p.n) {
        let g = fw_gate[i];
        fw_out[i] = g * sigmoid(g) * fw_up[i];
    }
}

// Bindings for swiglu_backward: 1 = gate, 2 = up, 3 = dout (read);
// 4 = dgate, 5 = dup (read_write).
@group(0) @binding(1) var<storage, read> bw_gate: array<f32>;
@group(0) @binding(2) var<storage, read> bw_up: array<f32>;
@group(0) @binding(3) var<storage, read> bw_dout: array<f32>;
@group(0) @binding(4) var<storage, read_write> bw_dgate: array<f32>;
@group(0) @binding(5) var<storage, read_write> bw_dup: array<f32>;

@compute @workgroup_size(WG)
fn swiglu_backward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                   @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = index(wid, nwg, lid);
    if (i < p.n) {
        let g = bw_gate[i];
        let s = sigmoid(g);
        let d = bw_dout[i];
        var dg = d * bw_up[i] * (s * (1.0 + g * (1.0 - s)));
        var du = d * (g * s);
        if (p.accumulate != 0u) {
            dg += bw_dgate[i];
            du += bw_dup[i];
        }
        bw_dgate[i] = dg;
        bw_dup[i] = du;
    }
}
