// The folded workgroup grid: a launcher whose workgroup count exceeds the adapter's
// per-dimension limit folds it into x and y (src/gpu: `grid`), nwg.x workgroups to a row, and the
// shader recovers the flat index with these helpers. z stays free for batch entries (gemm.wgsl).
// Included by every family that folds its grid; attention.wgsl may include it too.
//
//   workgroup_index(wid, nwg)              wid.x + wid.y · nwg.x
//   global_index(wid, nwg, size, local)    workgroup_index · size + local: item `local` of the
//                                          `size` consecutive items each workgroup covers
//
// Call them with the @builtin(workgroup_id) and @builtin(num_workgroups) values of the entry point.

fn workgroup_index(wid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return wid.x + wid.y * nwg.x;
}

fn global_index(wid: vec3<u32>, nwg: vec3<u32>, size: u32, local: u32) -> u32 {
    return workgroup_index(wid, nwg) * size + local;
}
