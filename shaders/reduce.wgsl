// Reductions and utilities: fill, and deterministic multi-stage sums (global gradient norm, sum).
//
// fill:     out (N) = value                                        overwrites out
// partials: partials[base + w] = Σ f(x[i]) over the elements i that workgroup w of G visits,
//           f(x) = x² when SQUARE (the norm), x otherwise (a plain sum)
//           x (N), partials (P >= base + G)                        overwrites slots base..base+G
// finish:   out[0] = scale · Σ_{j < count} partials[j], then sqrt when ROOT
//           partials (P >= count), out (1)                         overwrites out
//
// Determinism: no atomics. In `partials`, thread l of workgroup w reads x[w·WG + l + k·G·WG] for
// k = 0, 1, ... in order (a grid-stride loop, so G stays small for any N), then the workgroup
// reduces its WG sums as a tree in workgroup memory. `finish` is one workgroup doing the same over
// the partial slots. The order depends only on N, G and WG, so the same inputs give the same bits.
// WG must be a power of two.
//
// A global norm over many tensors runs `partials` once per tensor or span of tensors (the graph
// passes whole flat gradient buffers), each into its own slot range [base, base + G), then
// `finish` once over all the slots.

struct Params {
    n: u32,       // fill, partials: elements in x / out; finish: number of partial slots
    base: u32,    // partials: first slot of this tensor
    groups: u32,  // partials: workgroups G of this tensor
    value: f32,   // fill: the value; finish: the scale
}

override WG: u32 = 256u;
// partials: sum squares (true) or plain values (false).
override SQUARE: bool = true;
// finish: take the square root of the scaled total.
override ROOT: bool = true;

@group(0) @binding(0) var<uniform> p: Params;

#include "include/grid.wgsl"

// red_f32 and tree_sum_f32: the workgroup's values summed into red_f32[0] by a fixed tree.
#include "include/reduce_wg.wgsl"

// Bindings for fill: 1 = out (read_write).
@group(0) @binding(1) var<storage, read_write> fill_out: array<f32>;

@compute @workgroup_size(WG)
fn fill(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = global_index(wid, nwg, WG, lid.x);
    if (i < p.n) {
        fill_out[i] = p.value;
    }
}

// Bindings for partials: 1 = x (read), 2 = partials (read_write).
@group(0) @binding(1) var<storage, read> part_x: array<f32>;
@group(0) @binding(2) var<storage, read_write> part_out: array<f32>;

@compute @workgroup_size(WG)
fn partials(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
            @builtin(local_invocation_id) lid: vec3<u32>) {
    let w = workgroup_index(wid, nwg);
    if (w >= p.groups) {
        return;  // whole workgroups only: the barriers below stay in uniform control flow
    }
    let stride = p.groups * WG;
    var acc = 0.0;
    for (var i = w * WG + lid.x; i < p.n; i += stride) {
        let x = part_x[i];
        if (SQUARE) {
            acc += x * x;
        } else {
            acc += x;
        }
    }
    red_f32[lid.x] = acc;
    tree_sum_f32(lid.x, lid.x, WG, 1u);
    if (lid.x == 0u) {
        part_out[p.base + w] = red_f32[0];
    }
}

// Bindings for finish: 1 = partials (read), 2 = out (read_write).
@group(0) @binding(1) var<storage, read> fin_partials: array<f32>;
@group(0) @binding(2) var<storage, read_write> fin_out: array<f32>;

@compute @workgroup_size(WG)
fn finish(@builtin(local_invocation_id) lid: vec3<u32>) {
    var acc = 0.0;
    for (var j = lid.x; j < p.n; j += WG) {
        acc += fin_partials[j];
    }
    red_f32[lid.x] = acc;
    tree_sum_f32(lid.x, lid.x, WG, 1u);
    if (lid.x == 0u) {
        let total = p.value * red_f32[0];
        if (ROOT) {
            fin_out[0] = sqrt(total);
        } else {
            fin_out[0] = total;
        }
    }
}
