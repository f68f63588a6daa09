// Token + position embedding with f16 tables: the inference forward of embedding.wgsl.
// Valid only where the adapter has SHADER_F16; embedding.wgsl is the f32 twin and the spec.
//
// embedding_forward:      out (B, T, C) = wte[tokens[b, t] - wte_row0] + wpe[t]      overwrites out
// embedding_forward_vec4: the same, four channels per thread (C % 4 == 0; wte and wpe read as
//                         vec4<f16>, 8-byte aligned views; out as vec4<f32>, 16-byte aligned)
//   tokens (B, T) u32; wte (V_chunk, C) f16 holds vocabulary rows [wte_row0, wte_row0 + V_chunk)
//   of a table that may be split into chunks; wpe (maxT, C) f16, T <= maxT; out f32. Both table
//   entries are widened to f32 and added in f32, so the result is exactly that of embedding.wgsl
//   on the f16-rounded tables. Positions whose token is outside the chunk are left untouched, so
//   one call per chunk writes every row exactly once; a token outside every chunk leaves its row
//   untouched (and never reads or writes out of bounds).
//
// Workgroups fold into a 2-D grid for large problems (see gpu::grid); shaders recover the linear
// workgroup index as wid.x + wid.y * nwg.x.
// Legend: B batch, T sequence, C channels, V vocabulary.

enable f16;

struct Params {
    bt: u32,       // B·T
    t: u32,        // T
    c: u32,        // C (in vec4 units for embedding_forward_vec4)
    row0: u32,     // first vocabulary row held by the wte chunk
    v_chunk: u32,  // rows in the wte chunk
    b: u32,        // B (unused here)
    groups: u32,   // unused here
}

override WG: u32 = 256u;

@group(0) @binding(0) var<uniform> p: Params;

fn linear_wg(wid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return wid.x + wid.y * nwg.x;
}

// Bindings for embedding_forward: 1 = tokens (read), 2 = wte (read, f16), 3 = wpe (read, f16),
// 4 = out (read_write, f32).
@group(0) @binding(1) var<storage, read> fw_tokens: array<u32>;
@group(0) @binding(2) var<storage, read> fw_wte: array<f16>;
@group(0) @binding(3) var<storage, read> fw_wpe: array<f16>;
@group(0) @binding(4) var<storage, read_write> fw_out: array<f32>;

// One thread per output element, consecutive threads on consecutive channels (coalesced).
@compute @workgroup_size(WG)
fn embedding_forward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                     @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = linear_wg(wid, nwg) * WG + lid.x;
    if (i >= p.bt * p.c) {
        return;
    }
    let bt = i / p.c;
    let ch = i - bt * p.c;
    let row = fw_tokens[bt] - p.row0; // wraps for tokens below the chunk
    if (row >= p.v_chunk) {
        return;
    }
    let t = bt % p.t;
    fw_out[i] = f32(fw_wte[row * p.c + ch]) + f32(fw_wpe[t * p.c + ch]);
}

// Bindings for embedding_forward_vec4: as embedding_forward, the tables viewed as vec4<f16> and
// out as vec4<f32>.
@group(0) @binding(1) var<storage, read> fv_tokens: array<u32>;
@group(0) @binding(2) var<storage, read> fv_wte: array<vec4<f16>>;
@group(0) @binding(3) var<storage, read> fv_wpe: array<vec4<f16>>;
@group(0) @binding(4) var<storage, read_write> fv_out: array<vec4<f32>>;

// p.c is C / 4 here.
@compute @workgroup_size(WG)
fn embedding_forward_vec4(@builtin(workgroup_id) wid: vec3<u32>,
                          @builtin(num_workgroups) nwg: vec3<u32>,
                          @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = linear_wg(wid, nwg) * WG + lid.x;
    if (i >= p.bt * p.c) {
        return;
    }
    let bt = i / p.c;
    let ch = i - bt * p.c;
    let row = fv_tokens[bt] - p.row0;
    if (row >= p.v_chunk) {
        return;
    }
    let t = bt % p.t;
    fv_out[i] = vec4<f32>(fv_wte[row * p.c + ch]) + vec4<f32>(fv_wpe[t * p.c + ch]);
}
