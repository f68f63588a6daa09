// Grid indices. Launchers fold a long 1-D grid of workgroups into x and y (src/gpu's `grid`,
// which keeps each dimension within the adapter's limit): workgroup (x, y) is number
// x + y·nwg.x, and the grid's last workgroups may lie past the end, so kernels check the index.

// The linear index of this workgroup.
fn linear_wg(wid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return wid.x + wid.y * nwg.x;
}

// The linear index of this invocation: WG (the including file's override) per workgroup.
fn index(wid: vec3<u32>, nwg: vec3<u32>, lid: vec3<u32>) -> u32 {
    return linear_wg(wid, nwg) * WG + lid.x;
}
