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

var<workgroup> shared_sum: array<f32, WG>;

// Sums shared_sum[0..WG) into shared_sum[0] as a fixed binary tree. Called from uniform control
// flow by every invocation of the workgroup.
fn tree_reduce(l: u32) {
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s = s / 2u) {
        if (l < s) {
            shared_sum[l] += shared_sum[l + s];
        }
        workgroupBarrier();
    }
}

// Bindings for fill: 1 = out (read_write).
@group(0) @binding(1) var<storage, read_write> fill_out: array<f32>;

@compute @workgroup_size(WG)
fn fill(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = (wid.x + wid.y * nwg.x) * WG + lid.x;
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
    let w = wid.x + wid.y * nwg.x;
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
    shared_sum[lid.x] = acc;
    tree_reduce(lid.x);
    if (lid.x == 0u) {
        part_out[p.base + w] = shared_sum[0];
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
    shared_sum[lid.x] = acc;
    tree_reduce(lid.x);
    if (lid.x == 0u) {
        let total = p.value * shared_sum[0];
        if (ROOT) {
            fin_out[0] = sqrt(total);
        } else {
            fin_out[0] = total;
        }
    }
}
