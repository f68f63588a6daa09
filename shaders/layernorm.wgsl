// LayerNorm over the channels of each row, and its backward. eps = p.eps (1e-5); the variance is
// biased (divided by C), like PyTorch.
//
// Two variants of this one source (see src/gpu/shaders.rs) compute the row reductions: the
// forward's mean and variance and the backward's two row sums.
//   Base:     trees in workgroup memory; every adapter.
//   Subgroup: subgroupAdd, then one workgroup slot per subgroup (the `#if SUBGROUP` sections);
//             adapters with SUBGROUP only. WGSL spells the feature `enable subgroups;`, but naga 30
//             (wgpu 30's front end) rejects that directive as not yet supported and accepts the
//             subgroup built-ins without it, checking them against the device's capabilities
//             instead: so no prelude enables it, and wgpu refuses this variant on adapters
//             without SUBGROUP.
// layernorm_backward_params is the same in both.
//
// Base: row reductions use a group of TPR consecutive threads per row (WG / TPR rows side by
// side in a workgroup): the group walks its row with stride TPR, so consecutive threads read
// consecutive channels, then meets in a tree in workgroup memory. The barriers are shared by all
// rows of the workgroup, and the tree is only log2(TPR) deep.
//
// Subgroup: how a workgroup sums a value over its invocations (wg_sum, wg_sum2):
//   1. every invocation sums its own strided elements in a fixed order;
//   2. subgroupAdd sums those within each subgroup;
//   3. one invocation per subgroup (its first active one) stores the subgroup's total in
//      workgroup memory at slot subgroup_id;
//   4. after one barrier, every invocation adds slots 0, 1, ..., num_subgroups - 1 in that order.
// Every invocation of the workgroup reduces the SAME row (or rows, one after another), so a
// subgroup never mixes rows, whichever invocations the adapter puts into which subgroup and
// whatever the subgroup size (1 to the workgroup size, partial subgroups included). Correctness
// needs only what WGSL promises: subgroup_id is the same for the invocations of one subgroup,
// differs between subgroups, and is below num_subgroups (at most the workgroup size). That is why
// the subgroup forward takes one row per workgroup rather than TPR-thread row groups: no rule of
// WebGPU keeps a subgroup inside a row group.
// Determinism: steps 1 and 4 have a fixed order; step 2's order is the hardware's. We assume, as
// for any reproducible GPU reduction, that the same adapter and driver forms the same subgroups
// of the same pipeline and sums them in the same order each time: then the same inputs give the
// same bits. Slots are written by one invocation each; no atomics.
//
// layernorm_forward:
//   inp (N, C), weight (C), bias (C)
//   out (N, C) = (inp - mean) · rstd · weight + bias                    overwrites out
//   mean (N) = Σ inp / C; rstd (N) = 1 / sqrt(Σ (inp - mean)² / C + eps)  overwrites mean, rstd
//   Workgroups fold over x and y (see gpu::grid).
//   Base: WG / TPR rows per workgroup. Each thread takes two passes over its own channels (their
//   mean, then their centred squares), and one tree merges the threads' (count, mean, M2) with
//   Chan's parallel-variance formula: sound for rows far from zero, with a single reduction per
//   row.
//   Subgroup: one row per workgroup, WG invocations over its channels (lid, lid + WG, ...);
//   row = workgroup_index (include/grid.wgsl). The corrected two-pass algorithm (Björck; Chan, Golub and
//   LeVeque): m0 = Σ x / C, then one reduction of (Σ d, Σ d²) with d = x - m0 gives
//   mean = m0 + Σ d / C and var = (Σ d² - (Σ d)² / C) / C. d is exact wherever x lies within a
//   factor of two of m0 (rows far from zero), so the row's offset costs neither the mean (rounded
//   once, to f32) nor the variance; two reductions, two barriers per row.
//
// layernorm_backward_rows: one workgroup per block of p.rows_per_block consecutive rows;
//   P = p.blocks blocks, folded over x and y.
//   dout (N, C), inp (N, C), weight (C), mean (N), rstd (N)
//   dinp (N, C) = rstd · (dnorm - mean_c(dnorm) - xhat · mean_c(dnorm · xhat))
//     with xhat = (inp - mean) · rstd, dnorm = weight · dout;
//     overwrites dinp when p.accumulate = 0, adds to it (+=) when p.accumulate = 1
//   partials (2, P, C): [0, b, c] = Σ_{rows of block b} dout · xhat,
//                       [1, b, c] = Σ_{rows of block b} dout                overwrites partials
//   First the two row means of every row of the block (Base: WG / TPR rows at a time; Subgroup:
//   the whole workgroup walks the block's rows one after another, each subgroup keeping one
//   (Σ dnorm, Σ dnorm · xhat) slot per row, so the rows of a chunk share one barrier). Then each
//   thread walks its channels down the block's rows, writing dinp and summing the block's column
//   partials in registers. The second walk re-reads the block just read, from cache.
//
// layernorm_backward_params: COLS channels per workgroup, WG / COLS lanes per channel.
//   partials (2, P, C)
//   dweight (C) += Σ_b partials[0, b, c]; dbias (C) += Σ_b partials[1, b, c]   accumulates (+=)
//   Lane l sums blocks l, l + lanes, ... in order, then the lanes meet in a fixed tree: the same
//   inputs give the same bits.

#include "include/row_norm.wgsl"

// Subgroup's per-subgroup slots.
const MAX_WG: u32 = 256u;
// Per row of a backward block: (mean, rstd, mean_c(dnorm), mean_c(dnorm · xhat)).
var<workgroup> row_stats: array<vec4<f32>, MAX_ROWS>;

#if SUBGROUP
// Backward: (row, subgroup) slots of one chunk of rows; a chunk holds SLOTS / num_subgroups
// rows (at least 4, as num_subgroups ≤ MAX_WG).
const SLOTS: u32 = 1024u;

// Forward: one slot per subgroup for each of the two reductions.
var<workgroup> sums: array<f32, MAX_WG>;
var<workgroup> dev_sums: array<vec2<f32>, MAX_WG>;
// Backward: slot (r, s) at r · num_subgroups + s holds subgroup s's (Σ dnorm, Σ dnorm · xhat) of
// row r of the chunk.
var<workgroup> row_slots: array<vec2<f32>, SLOTS>;

// The subgroup's identity within the workgroup.
struct Subgroup {
    id: u32,      // subgroup_id: distinct per subgroup, below count
    count: u32,   // num_subgroups
    leader: bool, // the first active invocation of its subgroup: the one that stores its slot
}

fn subgroup_of(sg_id: u32, sg_count: u32, sg_lane: u32) -> Subgroup {
    // Call where every invocation of the workgroup is active: in a partial subgroup the first
    // active invocation need not have subgroup_invocation_id 0.
    return Subgroup(sg_id, sg_count, subgroupBroadcastFirst(sg_lane) == sg_lane);
}

// The sum of `v` over every invocation of the workgroup, returned to each of them. Must be
// reached by every invocation; sums is not written again.
fn wg_sum(sg: Subgroup, v: f32) -> f32 {
    let t = subgroupAdd(v);
    if (sg.leader) {
        sums[sg.id] = t;
    }
    workgroupBarrier();
    var total = 0.0;
    for (var k = 0u; k < sg.count; k++) {
        total += sums[k];
    }
    return total;
}

// wg_sum for a vec2 into dev_sums, which is not written again.
fn wg_sum2(sg: Subgroup, v: vec2<f32>) -> vec2<f32> {
    let t = subgroupAdd(v);
    if (sg.leader) {
        dev_sums[sg.id] = t;
    }
    workgroupBarrier();
    var total = vec2(0.0);
    for (var k = 0u; k < sg.count; k++) {
        total += dev_sums[k];
    }
    return total;
}
#else
// Forward: per thread, then per row group, (count, mean, M2 = Σ (x - mean)²).
var<workgroup> moments: array<vec3<f32>, MAX_WG>;

// The sum of `v` over the TPR threads of this thread's row group, returned to each of them.
// Must be reached by every thread of the workgroup.
fn row_sum(lid: u32, v: vec2<f32>) -> vec2<f32> {
    let lane = lid % TPR;
    red_vec2[lid] = v;
    tree_sum_vec2(lid, lane, TPR, 1u);
    let total = red_vec2[lid - lane];
    // Everyone has read its total before red is written again.
    workgroupBarrier();
    return total;
}

// Chan et al.'s merge of the (count, mean, M2) of two disjoint sets into that of their union.
fn merge(a: vec3<f32>, b: vec3<f32>) -> vec3<f32> {
    if (b.x == 0.0) {
        return a;
    }
    if (a.x == 0.0) {
        return b;
    }
    let n = a.x + b.x;
    let d = b.y - a.y;
    let fb = b.x / n;
    return vec3(n, a.y + d * fb, a.z + b.z + d * d * a.x * fb);
}

// The (count, mean, M2) of this thread's row, from each thread's own, to every thread of the row
// group. Must be reached by every thread of the workgroup; moments is not reused afterwards.
fn row_moments(lid: u32, v: vec3<f32>) -> vec3<f32> {
    let lane = lid % TPR;
    moments[lid] = v;
    workgroupBarrier();
    for (var s = TPR / 2u; s > 0u; s = s / 2u) {
        if (lane < s) {
            moments[lid] = merge(moments[lid], moments[lid + s]);
        }
        workgroupBarrier();
    }
    return moments[lid - lane];
}
#endif

// Bindings for layernorm_forward: 1 = inp, 2 = weight, 3 = bias (read);
// 4 = out, 5 = mean, 6 = rstd (read_write).
@group(0) @binding(1) var<storage, read> fw_inp: array<f32>;
@group(0) @binding(2) var<storage, read> fw_weight: array<f32>;
@group(0) @binding(3) var<storage, read> fw_bias: array<f32>;
@group(0) @binding(4) var<storage, read_write> fw_out: array<f32>;
@group(0) @binding(5) var<storage, read_write> fw_mean: array<f32>;
@group(0) @binding(6) var<storage, read_write> fw_rstd: array<f32>;

#if SUBGROUP
@compute @workgroup_size(WG)
fn layernorm_forward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                     @builtin(local_invocation_id) lid: vec3<u32>,
                     @builtin(subgroup_id) sg_id: u32, @builtin(num_subgroups) sg_count: u32,
                     @builtin(subgroup_invocation_id) sg_lane: u32) {
    let sg = subgroup_of(sg_id, sg_count, sg_lane);
    let row = workgroup_index(wid, nwg);
    if (row >= p.n) {
        return; // the whole workgroup: past the last row of a folded grid
    }
    let base = row * p.c;
    let inv_c = 1.0 / f32(p.c);

    var sum = 0.0;
    for (var i = lid.x; i < p.c; i += WG) {
        sum += fw_inp[base + i];
    }
    let m0 = wg_sum(sg, sum) * inv_c;

    var dev = vec2(0.0);
    for (var i = lid.x; i < p.c; i += WG) {
        let d = fw_inp[base + i] - m0;
        dev += vec2(d, d * d);
    }
    let total = wg_sum2(sg, dev);
    let m = m0 + total.x * inv_c;
    let variance = max(total.y - total.x * total.x * inv_c, 0.0) * inv_c;
    let s = 1.0 / sqrt(variance + p.eps);

    for (var i = lid.x; i < p.c; i += WG) {
        fw_out[base + i] = (fw_inp[base + i] - m) * s * fw_weight[i] + fw_bias[i];
    }
    if (lid.x == 0u) {
        fw_mean[row] = m;
        fw_rstd[row] = s;
    }
}
#else
@compute @workgroup_size(WG)
fn layernorm_forward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                     @builtin(local_invocation_id) lid: vec3<u32>) {
    // No early return: every thread takes part in the reductions, rows past N compute nothing.
    let row = global_index(wid, nwg, WG / TPR, lid.x / TPR);
    let lane = lid.x % TPR;
    let in_range = row < p.n;
    let base = row * p.c;

    // Moments of the row shifted by its first element x0: the per-thread means that the tree
    // merges are then small, so rows far from zero keep their precision (a mean of values near
    // 1e4 would round to ulp(1e4) before the merge).
    var x0 = 0.0;
    if (in_range) {
        x0 = fw_inp[base];
    }
    // This thread's channels lane, lane + TPR, ...: their count, mean and M2 (shifted).
    var own = vec3(0.0);
    if (in_range && lane < p.c) {
        let count = f32((p.c - 1u - lane) / TPR + 1u);
        var sum = 0.0;
        for (var i = lane; i < p.c; i += TPR) {
            sum += fw_inp[base + i] - x0;
        }
        let own_mean = sum / count;
        var m2 = 0.0;
        for (var i = lane; i < p.c; i += TPR) {
            let d = (fw_inp[base + i] - x0) - own_mean;
            m2 += d * d;
        }
        own = vec3(count, own_mean, m2);
    }
    let total = row_moments(lid.x, own);
    let m = total.y;
    let s = 1.0 / sqrt(total.z / f32(p.c) + p.eps);

    if (in_range) {
        for (var i = lane; i < p.c; i += TPR) {
            fw_out[base + i] = ((fw_inp[base + i] - x0) - m) * s * fw_weight[i] + fw_bias[i];
        }
        if (lane == 0u) {
            fw_mean[row] = x0 + m;
            fw_rstd[row] = s;
        }
    }
}
#endif

// Bindings for layernorm_backward_rows: 1 = dout, 2 = inp, 3 = weight, 4 = mean, 5 = rstd (read);
// 6 = dinp, 7 = partials (read_write).
@group(0) @binding(1) var<storage, read> bw_dout: array<f32>;
@group(0) @binding(2) var<storage, read> bw_inp: array<f32>;
@group(0) @binding(3) var<storage, read> bw_weight: array<f32>;
@group(0) @binding(4) var<storage, read> bw_mean: array<f32>;
@group(0) @binding(5) var<storage, read> bw_rstd: array<f32>;
@group(0) @binding(6) var<storage, read_write> bw_dinp: array<f32>;
@group(0) @binding(7) var<storage, read_write> bw_partials: array<f32>;

@compute @workgroup_size(WG)
fn layernorm_backward_rows(@builtin(workgroup_id) wid: vec3<u32>,
                           @builtin(num_workgroups) nwg: vec3<u32>,
#if SUBGROUP
                           @builtin(local_invocation_id) lid: vec3<u32>,
                           @builtin(subgroup_id) sg_id: u32,
                           @builtin(num_subgroups) sg_count: u32,
                           @builtin(subgroup_invocation_id) sg_lane: u32) {
    let sg = subgroup_of(sg_id, sg_count, sg_lane);
#else
                           @builtin(local_invocation_id) lid: vec3<u32>) {
#endif
    let rb = row_block(wid, nwg);
    if (rb.rows == 0u) {
        return; // the whole workgroup: past the last block of a folded grid
    }
    let inv_c = 1.0 / f32(p.c);

#if SUBGROUP
    // The two row means of every row of the block, a chunk of rows per barrier.
    let chunk = SLOTS / sg.count;
    for (var r0 = 0u; r0 < rb.rows; r0 += chunk) {
        let rn = min(chunk, rb.rows - r0);
        for (var r = 0u; r < rn; r++) {
            let row = rb.row0 + r0 + r;
            let base = row * p.c;
            let m = bw_mean[row];
            let s = bw_rstd[row];
            var acc = vec2(0.0);
            for (var i = lid.x; i < p.c; i += WG) {
                let dnorm = bw_weight[i] * bw_dout[base + i];
                let xhat = (bw_inp[base + i] - m) * s;
                acc += vec2(dnorm, dnorm * xhat);
            }
            let t = subgroupAdd(acc);
            if (sg.leader) {
                row_slots[r * sg.count + sg.id] = t;
            }
        }
        workgroupBarrier();
        for (var r = lid.x; r < rn; r += WG) {
            var total = vec2(0.0);
            for (var k = 0u; k < sg.count; k++) {
                total += row_slots[r * sg.count + k];
            }
            let row = rb.row0 + r0 + r;
            row_stats[r0 + r] = vec4(bw_mean[row], bw_rstd[row], total * inv_c);
        }
        // row_stats complete, and row_slots read before the next chunk writes them.
        workgroupBarrier();
    }
#else
    // The two row means of every row of the block, WG / TPR rows at a time.
    let lane = lid.x % TPR;
    for (var r0 = 0u; r0 < rb.rows; r0 += WG / TPR) {
        let r = r0 + lid.x / TPR;
        var m = 0.0;
        var s = 0.0;
        var acc = vec2(0.0);
        if (r < rb.rows) {
            let row = rb.row0 + r;
            let base = row * p.c;
            m = bw_mean[row];
            s = bw_rstd[row];
            for (var i = lane; i < p.c; i += TPR) {
                let dnorm = bw_weight[i] * bw_dout[base + i];
                let xhat = (bw_inp[base + i] - m) * s;
                acc += vec2(dnorm, dnorm * xhat);
            }
        }
        let means = row_sum(lid.x, acc) * inv_c;
        if (r < rb.rows && lane == 0u) {
            row_stats[r] = vec4(m, s, means.x, means.y);
        }
    }
    workgroupBarrier();
#endif

    // Each thread owns channels lid, lid + WG, ...: dinp down the block, and the column partials.
    for (var i = lid.x; i < p.c; i += WG) {
        let w = bw_weight[i];
        var dw = 0.0;
        var db = 0.0;
        for (var r = 0u; r < rb.rows; r++) {
            let st = row_stats[r];
            let idx = (rb.row0 + r) * p.c + i;
            let g = bw_dout[idx];
            let xhat = (bw_inp[idx] - st.x) * st.y;
            dw += g * xhat;
            db += g;
            var d = st.y * (w * g - st.z - xhat * st.w);
            if (p.accumulate != 0u) {
                d += bw_dinp[idx];
            }
            bw_dinp[idx] = d;
        }
        bw_partials[rb.index * p.c + i] = dw;
        bw_partials[(p.blocks + rb.index) * p.c + i] = db;
    }
}

// Bindings for layernorm_backward_params: 1 = partials (read); 2 = dweight, 3 = dbias (read_write).
@group(0) @binding(1) var<storage, read> pr_partials: array<f32>;
@group(0) @binding(2) var<storage, read_write> pr_dweight: array<f32>;
@group(0) @binding(3) var<storage, read_write> pr_dbias: array<f32>;

@compute @workgroup_size(WG)
fn layernorm_backward_params(@builtin(workgroup_id) wid: vec3<u32>,
                             @builtin(num_workgroups) nwg: vec3<u32>,
                             @builtin(local_invocation_id) lid: vec3<u32>) {
    let cl = col_lane(wid, nwg, lid.x);
    var acc = vec2(0.0);
    if (cl.ch < p.c) {
        for (var b = cl.lane; b < p.blocks; b += WG / COLS) {
            acc += vec2(pr_partials[b * p.c + cl.ch], pr_partials[(p.blocks + b) * p.c + cl.ch]);
        }
    }
    red_vec2[lid.x] = acc;
    tree_sum_vec2(lid.x, cl.lane, WG / COLS, COLS);
    if (cl.lane == 0u && cl.ch < p.c) {
        let total = red_vec2[cl.col];
        pr_dweight[cl.ch] += total.x;
        pr_dbias[cl.ch] += total.y;
    }
}
