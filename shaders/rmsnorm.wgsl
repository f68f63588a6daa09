// RMSNorm over the channels of each row (transformers' LlamaRMSNorm), and its backward.
// eps = p.eps (the checkpoint's rms_norm_eps); the mean square is taken in f32 and the weight
// multiplies after normalising.
//
// Row reductions use a group of TPR consecutive threads per row (WG / TPR rows side by side in a
// workgroup): the group walks its row with stride TPR, so consecutive threads read consecutive
// channels, then meets in a tree in workgroup memory (row_sum). Every order is fixed: the same
// inputs give the same bits. No atomics.
//
// rmsnorm_forward: rows folded over x and y (see gpu::grid), WG / TPR rows per workgroup.
//   inp (N, C), weight (C)
//   out (N, C) = inp · rstd · weight                          overwrites out
//   rstd (N) = 1 / sqrt(Σ inp² / C + eps)                     overwrites rstd
//
// rmsnorm_residual_forward: the residual add fused in front of rmsnorm_forward, saving the pass
//   that would write resid and read it back. Same grid.
//   a (N, C), b (N, C), weight (C)
//   resid (N, C) = a + b                                      overwrites resid
//   out (N, C), rstd (N) as rmsnorm_forward of resid          overwrites out, rstd
//
// rmsnorm_backward_rows: one workgroup per block of p.rows_per_block consecutive rows;
//   P = p.blocks blocks, folded over x and y.
//   dout (N, C), inp (N, C), weight (C), rstd (N)
//   dinp (N, C) = rstd · (dnorm - xhat · mean_c(dnorm · xhat)), xhat = inp · rstd,
//     dnorm = weight · dout; overwrites dinp when p.accumulate = 0, adds to it (+=) when 1
//   partials (P, C): [b, c] = Σ_{rows of block b} dout · xhat   overwrites partials
//   First the row mean of every row of the block, WG / TPR rows at a time; then each thread walks
//   its channels down the block's rows, writing dinp and summing the block's column partial.
//
// rmsnorm_backward_params: COLS channels per workgroup, WG / COLS lanes per channel.
//   partials (P, C)
//   dweight (C) += Σ_b partials[b, c]                          accumulates (+=)
//   Lane l sums blocks l, l + lanes, ... in order, then the lanes meet in a fixed tree.

#include "include/row_norm.wgsl"

// Per row of a backward block: (rstd, mean_c(dnorm · xhat)).
var<workgroup> row_stats: array<vec2<f32>, MAX_ROWS>;

// The sum of `v` over the TPR threads of this thread's row group, returned to each of them.
// Must be reached by every thread of the workgroup.
fn row_sum(lid: u32, v: f32) -> f32 {
    let lane = lid % TPR;
    red_f32[lid] = v;
    tree_sum_f32(lid, lane, TPR, 1u);
    let total = red_f32[lid - lane];
    // Everyone has read its total before red_f32 is written again.
    workgroupBarrier();
    return total;
}

// Where a forward thread works: its row group's row (rows fold over the grid's x and y), its
// lane in the group, and whether the row exists (every thread takes part in the reduction, rows
// past N compute nothing).
struct RowLane {
    row: u32,
    lane: u32,
    base: u32, // the row's first element
    in_range: bool,
}

fn row_lane(wid: vec3<u32>, nwg: vec3<u32>, lid: u32) -> RowLane {
    let row = workgroup_index(wid, nwg) * (WG / TPR) + lid / TPR;
    return RowLane(row, lid % TPR, row * p.c, row < p.n);
}

// rstd from a row's Σ x².
fn rstd_of(sum_sq: f32) -> f32 {
    return 1.0 / sqrt(sum_sq / f32(p.c) + p.eps);
}

// Bindings for rmsnorm_forward: 1 = inp, 2 = weight (read); 3 = out, 4 = rstd (read_write).
@group(0) @binding(1) var<storage, read> fw_inp: array<f32>;
@group(0) @binding(2) var<storage, read> fw_weight: array<f32>;
@group(0) @binding(3) var<storage, read_write> fw_out: array<f32>;
@group(0) @binding(4) var<storage, read_write> fw_rstd: array<f32>;

@compute @workgroup_size(WG)
fn rmsnorm_forward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                   @builtin(local_invocation_id) lid: vec3<u32>) {
    let r = row_lane(wid, nwg, lid.x);
    var own = 0.0;
    if (r.in_range) {
        for (var i = r.lane; i < p.c; i += TPR) {
            let x = fw_inp[r.base + i];
            own += x * x;
        }
    }
    let s = rstd_of(row_sum(lid.x, own));
    if (r.in_range) {
        for (var i = r.lane; i < p.c; i += TPR) {
            fw_out[r.base + i] = fw_inp[r.base + i] * s * fw_weight[i];
        }
        if (r.lane == 0u) {
            fw_rstd[r.row] = s;
        }
    }
}

// Bindings for rmsnorm_residual_forward: 1 = a, 2 = b, 3 = weight (read);
// 4 = resid, 5 = out, 6 = rstd (read_write).
@group(0) @binding(1) var<storage, read> rf_a: array<f32>;
@group(0) @binding(2) var<storage, read> rf_b: array<f32>;
@group(0) @binding(3) var<storage, read> rf_weight: array<f32>;
@group(0) @binding(4) var<storage, read_write> rf_resid: array<f32>;
@group(0) @binding(5) var<storage, read_write> rf_out: array<f32>;
@group(0) @binding(6) var<storage, read_write> rf_rstd: array<f32>;

@compute @workgroup_size(WG)
fn rmsnorm_residual_forward(@builtin(workgroup_id) wid: vec3<u32>,
                            @builtin(num_workgroups) nwg: vec3<u32>,
                            @builtin(local_invocation_id) lid: vec3<u32>) {
    let r = row_lane(wid, nwg, lid.x);
    // Each thread reads back only the channels it wrote itself.
    var own = 0.0;
    if (r.in_range) {
        for (var i = r.lane; i < p.c; i += TPR) {
            let x = rf_a[r.base + i] + rf_b[r.base + i];
            rf_resid[r.base + i] = x;
            own += x * x;
        }
    }
    let s = rstd_of(row_sum(lid.x, own));
    if (r.in_range) {
        for (var i = r.lane; i < p.c; i += TPR) {
            rf_out[r.base + i] = rf_resid[r.base + i] * s * rf_weight[i];
        }
        if (r.lane == 0u) {
            rf_rstd[r.row] = s;
        }
    }
}

// Bindings for rmsnorm_backward_rows: 1 = dout, 2 = inp, 3 = weight, 4 = rstd (read);
// 5 = dinp, 6 = partials (read_write).
@group(0) @binding(1) var<storage, read> bw_dout: array<f32>;
@group(0) @binding(2) var<storage, read> bw_inp: array<f32>;
@group(0) @binding(3) var<storage, read> bw_weight: array<f32>;
@group(0) @binding(4) var<storage, read> bw_rstd: array<f32>;
@group(0) @binding(5) var<storage, read_write> bw_dinp: array<f32>;
@group(0) @binding(6) var<storage, read_write> bw_partials: array<f32>;

@compute @workgroup_size(WG)
fn rmsnorm_backward_rows(@builtin(workgroup_id) wid: vec3<u32>,
                         @builtin(num_workgroups) nwg: vec3<u32>,
                         @builtin(local_invocation_id) lid: vec3<u32>) {
    let rb = row_block(wid, nwg);
    if (rb.rows == 0u) {
        return; // the whole workgroup: past the last block of a folded grid
    }
    let inv_c = 1.0 / f32(p.c);

    // The row mean of every row of the block, WG / TPR rows at a time.
    let lane = lid.x % TPR;
    for (var r0 = 0u; r0 < rb.rows; r0 += WG / TPR) {
        let r = r0 + lid.x / TPR;
        var s = 0.0;
        var acc = 0.0;
        if (r < rb.rows) {
            let row = rb.row0 + r;
            let base = row * p.c;
            s = bw_rstd[row];
            for (var i = lane; i < p.c; i += TPR) {
                acc += bw_weight[i] * bw_dout[base + i] * (bw_inp[base + i] * s);
            }
        }
        let mean = row_sum(lid.x, acc) * inv_c;
        if (r < rb.rows && lane == 0u) {
            row_stats[r] = vec2(s, mean);
        }
    }
    workgroupBarrier();

    // Each thread owns channels lid, lid + WG, ...: dinp down the block, and the column partial.
    for (var i = lid.x; i < p.c; i += WG) {
        let w = bw_weight[i];
        var dw = 0.0;
        for (var r = 0u; r < rb.rows; r++) {
            let st = row_stats[r];
            let idx = (rb.row0 + r) * p.c + i;
            let g = bw_dout[idx];
            let xhat = bw_inp[idx] * st.x;
            dw += g * xhat;
            var d = st.x * (w * g - xhat * st.y);
            if (p.accumulate != 0u) {
                d += bw_dinp[idx];
            }
            bw_dinp[idx] = d;
        }
        bw_partials[rb.index * p.c + i] = dw;
    }
}

// Bindings for rmsnorm_backward_params: 1 = partials (read); 2 = dweight (read_write).
@group(0) @binding(1) var<storage, read> pr_partials: array<f32>;
@group(0) @binding(2) var<storage, read_write> pr_dweight: array<f32>;

@compute @workgroup_size(WG)
fn rmsnorm_backward_params(@builtin(workgroup_id) wid: vec3<u32>,
                           @builtin(num_workgroups) nwg: vec3<u32>,
                           @builtin(local_invocation_id) lid: vec3<u32>) {
    let cl = col_lane(wid, nwg, lid.x);
    var acc = 0.0;
    if (cl.ch < p.c) {
        for (var b = cl.lane; b < p.blocks; b += WG / COLS) {
            acc += pr_partials[b * p.c + cl.ch];
        }
    }
    red_f32[lid.x] = acc;
    tree_sum_f32(lid.x, cl.lane, WG / COLS, COLS);
    if (cl.lane == 0u && cl.ch < p.c) {
        pr_dweight[cl.ch] += red_f32[cl.col];
    }
}
