// Workgroup tree sums in a fixed order (no atomics: the same inputs give the same bits), for
// the families that sum across the invocations of a workgroup (reduce.wgsl, layernorm.wgsl;
// attention.wgsl may use them too).
//
// The includer declares `WG` (its workgroup size, an override or a const); the helpers sum in
// these workgroup arrays of WG slots, one per invocation, which only the entry points that reach
// a helper allocate:
var<workgroup> red_f32: array<f32, WG>;
var<workgroup> red_vec2: array<vec2<f32>, WG>;
//
// tree_sum_f32(slot, lane, lanes, stride), tree_sum_vec2(...): each invocation first stores its
// value in red_*[slot]; then `lanes` invocations (a power of two) whose slots lie `stride` apart
// form a group, `lane` the invocation's place in it (0 .. lanes). After the call the group's
// sum is in the slot of its lane 0: level by level, lane l < s adds slot + s · stride into its
// slot, for s = lanes / 2, lanes / 4, ..., 1. Every invocation of the workgroup must reach the
// call (uniform control flow): there is a barrier before the first level and after each.
//   The whole workgroup:              tree_sum_f32(lid, lid, WG, 1u)
//   Groups of TPR consecutive slots:  tree_sum_vec2(lid, lid % TPR, TPR, 1u)
//   Columns of a COLS-wide block:     tree_sum_vec2(lid, lid / COLS, WG / COLS, COLS)

fn tree_sum_f32(slot: u32, lane: u32, lanes: u32, stride: u32) {
    workgroupBarrier();
    for (var s = lanes / 2u; s > 0u; s = s / 2u) {
        if (lane < s) {
            red_f32[slot] += red_f32[slot + s * stride];
        }
        workgroupBarrier();
    }
}

fn tree_sum_vec2(slot: u32, lane: u32, lanes: u32, stride: u32) {
    workgroupBarrier();
    for (var s = lanes / 2u; s > 0u; s = s / 2u) {
        if (lane < s) {
            red_vec2[slot] += red_vec2[slot + s * stride];
        }
        workgroupBarrier();
    }
}
