// General matrix multiply (batched, strided, transposable) and the bias gradient of a linear layer.
//
// gemm_*:        c[z] (M, N) = alpha · op(a[z]) (M, K) · op(b[z]) (K, N)
//                              (+ bias (N) on every row when HAS_BIAS)
//                              (+ c[z] (M, N) when ACCUMULATE)
//                a, bias, c f32; b of BElem (below), widened to f32 on load; products, sums f32.
//                ACCUMULATE false overwrites c and never reads it; true adds into c (+=).
//                op(a) is a stored (M, K), or aᵀ with a stored (K, M) when TRANS_A;
//                op(b) is b stored (K, N), or bᵀ with b stored (N, K) when TRANS_B.
//                Every matrix is row-major inside its flat buffer: element (r, col) of batch entry
//                z sits at off + z·batch_stride + r·ld + col (in elements of its own type, so in
//                the F16 variant b's offsets count f16s). A batch stride of 0 shares one matrix
//                across the batch; ldc > N makes c a column block of a wider matrix (the
//                vocabulary chunks of the lm head).
// bias_backward: dbias (N) += Σ_m dout (M, N)                accumulates into dbias
//
// Every output element is summed by one invocation over k = 0, 1, ..., K-1 with fma (the same
// order in every kernel and tile configuration, gemm_gemv and split-K excepted), with no atomics:
// results repeat bit for bit.
//
// Variants (see src/gpu/shaders.rs): the loader's prelude declares BElem, the element type of
// b. Base: BElem = f32. F16 (the inference forward with f16 weights; adapters with SHADER_F16):
// BElem = f16. Every read of b goes through read_b / read_b4, which widen to f32 (a no-op in f32),
// so given the same f16-rounded weights both variants compute the same sums. In the F16 variant
// the vec4 reads of b are vec4<f16> (8 bytes): b's view must start at a multiple of 8 bytes.
//
// Entry points:
//   gemm_naive       one output per invocation, operands read straight from memory: the baseline.
//   gemm_gemv        few rows of a against b stored (N, K): matrix-vector products (see below).
//   gemm_gemvc, gemm_gemvc_vab
//                    the same problems, one output column per invocation (for CPU adapters; see
//                    below), scalar or vec4 reads.
//   gemm_tiled       BM × BN output tiles per workgroup; the K loop stages BK-deep slices of op(a)
//                    and op(b) in workgroup memory, and each invocation keeps a (4·RM) × (4·RN)
//                    register block. Tails in M, N and K are zero-filled, so any shape works.
//   gemm_tiled_va, gemm_tiled_vb, gemm_tiled_vab
//                    the same with a, b or both read as vec4: gemm_tiled compiled with VEC_A,
//                    VEC_B or both defined (entry forms, src/gpu/shaders.rs). The launcher picks
//                    these only when the operand's view holds a whole number of vec4s and its
//                    offset, ld and batch stride are multiples of 4, so every vec4 read lies
//                    inside the binding; the lanes past the operand's edge are zeroed. For GPUs
//                    (workgroup memory is fast there); 8 × 8 blocks on 64 × 64 and 128 × 64 tiles
//                    as gpu.cpp's kernel.
//   gemm_reg, gemm_reg_vb
//                    register blocks straight from memory, no workgroup memory or barriers, b read
//                    as scalars or vec4: meant for CPU adapters (lavapipe), see below.
//   gemm_ureg, gemm_ureg_vb, gemm_ureg_vab
//                    gemm_reg's 8 × 4 to 16 × 8 blocks written out with named registers (see
//                    there), b or both operands read as vec4 (entry forms of gemm_ureg).
//   gemm_pack_b      the first pass of the packed-B kernel: bᵀ into a scratch buffer, so that
//                    gemm_ureg_vb or gemm_ureg_vab reads it along K (see there).
//   gemm_splitk_reduce
//                    the second pass of split-K (weight gradients: long K, small output); it sums
//                    per-slice partials, so its summation order differs from the others.
// Grid: workgroups over output tiles folded into x and y (tile = workgroup_index, from
// include/grid.wgsl; row-major over (ceil(M / BM), ceil(N / BN)) tiles), batch entries over z
// (looping when the batch exceeds the per-dimension limit).
//
// Bindings for gemm_*: 1 = a (read), 2 = b (read, BElem), 3 = bias (read; any f32 view without
// HAS_BIAS), 4 = c (read_write), 5 = aux (the epilogue's tensor, laid out as c; see finish).

struct Params {
    m: u32,
    n: u32,
    k: u32,
    batch: u32,
    a_off: u32,
    lda: u32,
    a_bs: u32,
    b_off: u32,
    ldb: u32,
    b_bs: u32,
    c_off: u32,
    ldc: u32,
    c_bs: u32,
    alpha: f32,
    // Output tiles along N, and in all, per batch entry (bias_backward: column blocks in all).
    tiles_n: u32,
    tiles: u32,
    // gemm_reg*: 0, or the K slice per batch entry of a split-K partial pass (see there).
    split_k: u32,
}

@group(0) @binding(0) var<uniform> p: Params;

#include "include/grid.wgsl"

override TRANS_A: bool = false;
override TRANS_B: bool = false;
// Output tile of one workgroup (multiples of 4·RM and 4·RN), depth of the K slice (multiple of 4).
override BM: u32 = 64u;
override BN: u32 = 64u;
override BK: u32 = 16u;
// Register block of one invocation: 4·RM rows × 4·RN columns, RM and RN at most 2.
override RM: u32 = 1u;
override RN: u32 = 1u;
override WG_M: u32 = BM / (4u * RM);
override WG_N: u32 = BN / (4u * RN);

@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(1) var<storage, read> a4: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> b: array<BElem>;
@group(0) @binding(2) var<storage, read> b4: array<vec4<BElem>>;
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(4) var<storage, read_write> c: array<f32>;

// Every read of b, widened to f32 (the identity when BElem is f32).
fn read_b(i: u32) -> f32 {
    return f32(b[i]);
}

fn read_b4(i: u32) -> vec4<f32> {
    return vec4<f32>(b4[i]);
}

// Element (i, kk) of op(a) and (kk, j) of op(b) for batch entry z.
fn op_a(z: u32, i: u32, kk: u32) -> f32 {
    let base = p.a_off + z * p.a_bs;
    if (TRANS_A) {
        return a[base + kk * p.lda + i];
    }
    return a[base + i * p.lda + kk];
}

fn op_b(z: u32, kk: u32, j: u32) -> f32 {
    let base = p.b_off + z * p.b_bs;
    if (TRANS_B) {
        return read_b(base + j * p.ldb + kk);
    }
    return read_b(base + kk * p.ldb + j);
}

@group(0) @binding(5) var<storage, read_write> aux: array<f32>;

// GPT-2's GELU as gelu.wgsl computes it (a fused epilogue gives that kernel's bits).
#include "include/gelu.wgsl"

// What finish does after the sum. Override constants rather than params: each dispatch's
// choice is fixed, and a branch on a uniform value still costs its untaken side on adapters
// that run invocations as SIMD lanes (lavapipe executes both sides of an if under a mask, and
// every read in them loops over the lanes), so code a dispatch never runs would still slow every
// output there (BENCHMARKS.md has the measurement).
override HAS_BIAS: bool = false;
override ACCUMULATE: bool = false;
// 0 nothing, 1 GELU, 2 GELU backward, 3 residual add (see finish).
override EPILOGUE: u32 = 0u;

// v = alpha · s (+ bias[j]) (+ c[z](i, j)), then the epilogue, then c[z](i, j) = v:
//   1 GELU:          aux[idx] = v (the pre-activation, for the backward); v = gelu(v)
//   2 GELU backward: v = v · gelu'(aux[idx]) (aux holds the pre-activation; v is its output's
//                    gradient, so c receives the pre-activation's)
//   3 residual:      v = v + aux[idx] (aux holds the residual stream)
// aux is laid out as c: element idx of c pairs with element idx of aux.
fn finish(z: u32, i: u32, j: u32, s: f32) {
    var v = p.alpha * s;
    if (HAS_BIAS) {
        v += bias[j];
    }
    let idx = p.c_off + z * p.c_bs + i * p.ldc + j;
    if (ACCUMULATE) {
        v += c[idx];
    }
    switch EPILOGUE {
        case 1u: {
            aux[idx] = v;
            v = gelu(v);
        }
        case 2u: {
            v = v * gelu_grad(aux[idx]);
        }
        case 3u: {
            v += aux[idx];
        }
        default: {}
    }
    c[idx] = v;
}

// The four lanes of v as output row i from column j, those inside the matrix: how every
// kernel that holds its sums as vec4s along N stores them.
fn store_row(z: u32, i: u32, j: u32, v: vec4<f32>) {
    if (i < p.m) {
        for (var lane = 0u; lane < 4u; lane++) {
            if (j + lane < p.n) {
                finish(z, i, j + lane, v[lane]);
            }
        }
    }
}

const NAIVE_WG: u32 = 16u;

@compute @workgroup_size(16, 16)
fn gemm_naive(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_id) lid: vec3<u32>) {
    let t = workgroup_index(wid, nwg);
    let i = (t / p.tiles_n) * NAIVE_WG + lid.y;
    let j = (t % p.tiles_n) * NAIVE_WG + lid.x;
    if (t >= p.tiles || i >= p.m || j >= p.n) {
        return;
    }
    for (var z = wid.z; z < p.batch; z += nwg.z) {
        var s = 0.0;
        for (var kk = 0u; kk < p.k; kk++) {
            s = fma(op_a(z, i, kk), op_b(z, kk, j), s);
        }
        finish(z, i, j, s);
    }
}

// gemm_gemv: out = alpha · a · bᵀ (+ bias) (+ c) for few rows of a (M <= GEMV_MAX_M) and b
// stored (N, K), without transposes or batches: decoding's linear layers and lm head, where the
// weights are read once and the tiled kernel would waste its rows. A workgroup owns GEMV_COLS
// output columns; the GEMV_WG / GEMV_COLS invocations of a column stride over k so consecutive
// invocations read consecutive weights, keep one partial sum per row of a, and combine them
// with a fixed tree. The summation order therefore differs from the other entry points (results
// agree to rounding, and repeat bit for bit).
const GEMV_MAX_M: u32 = 8u;
const GEMV_WG: u32 = 256u;
override GEMV_COLS: u32 = 32u;
var<workgroup> gemv_part: array<f32, 2048>;

@compute @workgroup_size(256)
fn gemm_gemv(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
             @builtin(local_invocation_index) li: u32) {
    let t = workgroup_index(wid, nwg);
    let lanes = GEMV_WG / GEMV_COLS;
    let col = li / lanes;
    let lane = li % lanes;
    let j = t * GEMV_COLS + col;
    var s: array<f32, 8>;
    if (t < p.tiles && j < p.n) {
        for (var kk = lane; kk < p.k; kk += lanes) {
            let w = read_b(p.b_off + j * p.ldb + kk);
            for (var i = 0u; i < p.m; i++) {
                s[i] = fma(a[p.a_off + i * p.lda + kk], w, s[i]);
            }
        }
    }
    for (var i = 0u; i < GEMV_MAX_M; i++) {
        gemv_part[i * GEMV_WG + li] = s[i];
    }
    workgroupBarrier();
    for (var span = lanes / 2u; span > 0u; span /= 2u) {
        if (lane < span) {
            for (var i = 0u; i < p.m; i++) {
                gemv_part[i * GEMV_WG + li] += gemv_part[i * GEMV_WG + li + span];
            }
        }
        workgroupBarrier();
    }
    if (lane == 0u && t < p.tiles && j < p.n) {
        for (var i = 0u; i < p.m; i++) {
            finish(0u, i, j, gemv_part[i * GEMV_WG + li]);
        }
    }
}

// gemm_gemvc: gemm_gemv's problems with GEMVC_COLS adjacent output columns per invocation and
// no workgroup memory or barriers: each invocation streams its columns' weight rows along K once,
// side by side, reading each element of a once for all of them, and keeps one sum per row of a
// and column (GEMV_ROWS, the problem's M, fixed when the pipeline is built so that the loops over
// rows unroll and the sums stay in registers). Meant for CPU adapters, where a workgroup's
// invocations run as SIMD lanes of one thread, barriers cost more than reads a row apart, and
// every read costs a loop over the lanes: four columns per invocation read a's elements a
// quarter as often as one did. On GPUs those reads do not coalesce and gemm_gemv is the one to
// pick (the tuner measures both). gemm_gemvc_vab reads a and b as vec4 (its operands' offsets
// and leading dimensions multiples of 4, lanes past K zeroed), summing four interleaved partials
// per column; the scalar form sums along K in order, as gemm_naive does.
override GEMV_ROWS: u32 = 1u;
const GEMVC_WG: u32 = 64u;
const GEMVC_COLS: u32 = 4u;

// Column j + q of output row i, if it lies inside the output.
fn gemvc_put(i: u32, j: u32, q: u32, s: f32) {
    if (j + q < p.n) {
        finish(0u, i, j + q, s);
    }
}

@compute @workgroup_size(64)
fn gemm_gemvc(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_index) li: u32) {
    let t = workgroup_index(wid, nwg);
    let j = (t * GEMVC_WG + li) * GEMVC_COLS;
    if (t >= p.tiles || j >= p.n) {
        return;
    }
    // The columns' rows of b; columns past N read the last one's and are never stored.
    let last = p.n - 1u;
    let cols = vec4<u32>(j, min(j + 1u, last), min(j + 2u, last), min(j + 3u, last));
    let rows = p.b_off + cols * p.ldb;
#if VEC_A
    var s0: array<vec4<f32>, GEMV_MAX_M>;
    var s1: array<vec4<f32>, GEMV_MAX_M>;
    var s2: array<vec4<f32>, GEMV_MAX_M>;
    var s3: array<vec4<f32>, GEMV_MAX_M>;
    let b = rows / 4u;
    let full = p.k / 4u;
    for (var kk = 0u; kk < full; kk++) {
        let w0 = read_b4(b.x + kk);
        let w1 = read_b4(b.y + kk);
        let w2 = read_b4(b.z + kk);
        let w3 = read_b4(b.w + kk);
        for (var i = 0u; i < GEMV_ROWS; i++) {
            let x = a4[(p.a_off + i * p.lda) / 4u + kk];
            s0[i] = fma(x, w0, s0[i]);
            s1[i] = fma(x, w1, s1[i]);
            s2[i] = fma(x, w2, s2[i]);
            s3[i] = fma(x, w3, s3[i]);
        }
    }
    if (full * 4u < p.k) {
        let live = vec4<u32>(full * 4u) + vec4<u32>(0u, 1u, 2u, 3u) < vec4<u32>(p.k);
        let zero = vec4<f32>(0.0);
        let w0 = select(zero, read_b4(b.x + full), live);
        let w1 = select(zero, read_b4(b.y + full), live);
        let w2 = select(zero, read_b4(b.z + full), live);
        let w3 = select(zero, read_b4(b.w + full), live);
        for (var i = 0u; i < GEMV_ROWS; i++) {
            let x = select(zero, a4[(p.a_off + i * p.lda) / 4u + full], live);
            s0[i] = fma(x, w0, s0[i]);
            s1[i] = fma(x, w1, s1[i]);
            s2[i] = fma(x, w2, s2[i]);
            s3[i] = fma(x, w3, s3[i]);
        }
    }
    for (var i = 0u; i < GEMV_ROWS; i++) {
        gemvc_put(i, j, 0u, (s0[i].x + s0[i].y) + (s0[i].z + s0[i].w));
        gemvc_put(i, j, 1u, (s1[i].x + s1[i].y) + (s1[i].z + s1[i].w));
        gemvc_put(i, j, 2u, (s2[i].x + s2[i].y) + (s2[i].z + s2[i].w));
        gemvc_put(i, j, 3u, (s3[i].x + s3[i].y) + (s3[i].z + s3[i].w));
    }
#else
    var s0: array<f32, GEMV_MAX_M>;
    var s1: array<f32, GEMV_MAX_M>;
    var s2: array<f32, GEMV_MAX_M>;
    var s3: array<f32, GEMV_MAX_M>;
    for (var kk = 0u; kk < p.k; kk++) {
        let w = vec4<f32>(read_b(rows.x + kk), read_b(rows.y + kk), read_b(rows.z + kk),
                          read_b(rows.w + kk));
        for (var i = 0u; i < GEMV_ROWS; i++) {
            let x = a[p.a_off + i * p.lda + kk];
            s0[i] = fma(x, w.x, s0[i]);
            s1[i] = fma(x, w.y, s1[i]);
            s2[i] = fma(x, w.z, s2[i]);
            s3[i] = fma(x, w.w, s3[i]);
        }
    }
    for (var i = 0u; i < GEMV_ROWS; i++) {
        gemvc_put(i, j, 0u, s0[i]);
        gemvc_put(i, j, 1u, s1[i]);
        gemvc_put(i, j, 2u, s2[i]);
        gemvc_put(i, j, 3u, s3[i]);
    }
#endif
}

// Workgroup tiles, k-major with vec4s along the output dimension:
// tile_a[kk · BM/4 + ii/4][ii % 4] = op(a)(m0 + ii, k0 + kk), tile_b likewise with (k0 + kk, n0 + jj).
// 256 vec4s (4 KiB) each holds BK · BM / 4 and BK · BN / 4 for every configuration the launcher uses.
var<workgroup> tile_a: array<vec4<f32>, 256>;
var<workgroup> tile_b: array<vec4<f32>, 256>;
// Register block: row r (0 .. 4·RM) and column group g (0 .. RN) at acc[r · 2 + g].
var<private> acc: array<vec4<f32>, 16>;

fn put_a(kk: u32, ii: u32, v: f32) {
    tile_a[kk * (BM / 4u) + ii / 4u][ii % 4u] = v;
}

fn put_b(kk: u32, jj: u32, v: f32) {
    tile_b[kk * (BN / 4u) + jj / 4u][jj % 4u] = v;
}

// Zeroes the lanes of v from `left` on (the lanes past the operand's edge).
fn keep(v: vec4<f32>, left: u32) -> vec4<f32> {
    return select(vec4<f32>(0.0), v, vec4<u32>(0u, 1u, 2u, 3u) < vec4<u32>(left));
}

// Loads op(a)(m0 .. m0 + BM, k0 .. k0 + BK) into tile_a, zero outside (M, K). Consecutive
// invocations read consecutive addresses: along k when a is (M, K), along m when it is (K, M).
fn load_a(z: u32, m0: u32, k0: u32, li: u32) {
    for (var e = li; e < BM * BK; e += WG_M * WG_N) {
        var ii: u32;
        var kk: u32;
        if (TRANS_A) {
            ii = e % BM;
            kk = e / BM;
        } else {
            kk = e % BK;
            ii = e / BK;
        }
        var v = 0.0;
        if (m0 + ii < p.m && k0 + kk < p.k) {
            v = op_a(z, m0 + ii, k0 + kk);
        }
        put_a(kk, ii, v);
    }
}

fn load_a_vec4(z: u32, m0: u32, k0: u32, li: u32) {
    let base = p.a_off + z * p.a_bs;
    for (var e = li; e < BM * BK / 4u; e += WG_M * WG_N) {
        if (TRANS_A) {
            // a (K, M): one vec4 is 4 consecutive rows of op(a) at one k.
            let iq = e % (BM / 4u);
            let kk = e / (BM / 4u);
            let i = m0 + 4u * iq;
            let kg = k0 + kk;
            var v = vec4<f32>(0.0);
            if (i < p.m && kg < p.k) {
                v = keep(a4[(base + kg * p.lda + i) / 4u], p.m - i);
            }
            tile_a[kk * (BM / 4u) + iq] = v;
        } else {
            // a (M, K): one vec4 is 4 consecutive k of one row.
            let kq = e % (BK / 4u);
            let ii = e / (BK / 4u);
            let i = m0 + ii;
            let kg = k0 + 4u * kq;
            var v = vec4<f32>(0.0);
            if (i < p.m && kg < p.k) {
                v = keep(a4[(base + i * p.lda + kg) / 4u], p.k - kg);
            }
            for (var q = 0u; q < 4u; q++) {
                put_a(4u * kq + q, ii, v[q]);
            }
        }
    }
}

fn load_b(z: u32, n0: u32, k0: u32, li: u32) {
    for (var e = li; e < BN * BK; e += WG_M * WG_N) {
        var jj: u32;
        var kk: u32;
        if (TRANS_B) {
            kk = e % BK;
            jj = e / BK;
        } else {
            jj = e % BN;
            kk = e / BN;
        }
        var v = 0.0;
        if (n0 + jj < p.n && k0 + kk < p.k) {
            v = op_b(z, k0 + kk, n0 + jj);
        }
        put_b(kk, jj, v);
    }
}

fn load_b_vec4(z: u32, n0: u32, k0: u32, li: u32) {
    let base = p.b_off + z * p.b_bs;
    for (var e = li; e < BN * BK / 4u; e += WG_M * WG_N) {
        if (TRANS_B) {
            // b (N, K): one vec4 is 4 consecutive k of one column of op(b).
            let kq = e % (BK / 4u);
            let jj = e / (BK / 4u);
            let j = n0 + jj;
            let kg = k0 + 4u * kq;
            var v = vec4<f32>(0.0);
            if (j < p.n && kg < p.k) {
                v = keep(read_b4((base + j * p.ldb + kg) / 4u), p.k - kg);
            }
            for (var q = 0u; q < 4u; q++) {
                put_b(4u * kq + q, jj, v[q]);
            }
        } else {
            // b (K, N): one vec4 is 4 consecutive columns at one k.
            let jq = e % (BN / 4u);
            let kk = e / (BN / 4u);
            let j = n0 + 4u * jq;
            let kg = k0 + kk;
            var v = vec4<f32>(0.0);
            if (j < p.n && kg < p.k) {
                v = keep(read_b4((base + kg * p.ldb + j) / 4u), p.n - j);
            }
            tile_b[kk * (BN / 4u) + jq] = v;
        }
    }
}

fn clear_acc() {
    for (var r = 0u; r < 16u; r++) {
        acc[r] = vec4<f32>(0.0);
    }
}

// Invocation (tx, ty) owns rows 4·(u·WG_M + ty) + q and columns 4·(g·WG_N + tx) + lane, so the
// vec4 reads of a warp from tile_b are consecutive and those from tile_a are broadcasts.
fn multiply(lid: vec3<u32>) {
    for (var kk = 0u; kk < BK; kk++) {
        var av: array<vec4<f32>, 2>;
        var bv: array<vec4<f32>, 2>;
        for (var u = 0u; u < RM; u++) {
            av[u] = tile_a[kk * (BM / 4u) + u * WG_M + lid.y];
        }
        for (var g = 0u; g < RN; g++) {
            bv[g] = tile_b[kk * (BN / 4u) + g * WG_N + lid.x];
        }
        for (var u = 0u; u < RM; u++) {
            for (var q = 0u; q < 4u; q++) {
                let x = vec4<f32>(av[u][q]);
                for (var g = 0u; g < RN; g++) {
                    let r = (4u * u + q) * 2u + g;
                    acc[r] = fma(x, bv[g], acc[r]);
                }
            }
        }
    }
}

fn store_c(z: u32, m0: u32, n0: u32, lid: vec3<u32>) {
    for (var u = 0u; u < RM; u++) {
        for (var q = 0u; q < 4u; q++) {
            let i = m0 + 4u * (u * WG_M + lid.y) + q;
            for (var g = 0u; g < RN; g++) {
                let j = n0 + 4u * (g * WG_N + lid.x);
                store_row(z, i, j, acc[(4u * u + q) * 2u + g]);
            }
        }
    }
}

// The built-in values every tiled entry point takes, the workgroup's (uniform) apart from the
// invocation's: a struct holding both would make every value read from it non-uniform to
// WGSL's uniformity analysis (Chrome's compiler applies it to the barriers below), and the
// batch loop around the barriers must stay uniform.
struct Wg {
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
}

struct Inv {
    @builtin(local_invocation_id) lid: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
}

// The origin (m0, n0) of this workgroup's output tile; m0 = p.m (past the end) when there is none.
fn tile_origin(w: Wg) -> vec2<u32> {
    let tile = workgroup_index(w.wid, w.nwg);
    if (tile >= p.tiles) {
        return vec2<u32>(p.m, 0u);
    }
    return vec2<u32>((tile / p.tiles_n) * BM, (tile % p.tiles_n) * BN);
}

// The first batch entry this workgroup computes: p.batch (none) when it has no tile. The entries
// it computes are that one and every nwg.z-th after it.
fn first_entry(w: Wg, o: vec2<u32>) -> u32 {
    return select(w.wid.z, p.batch, o.x >= p.m);
}

// One BK slice of the product, once both tiles are loaded: every invocation's register block
// takes the slice's products, between barriers (the loads before and after touch the tiles).
fn multiply_slice(lid: vec3<u32>) {
    workgroupBarrier();
    multiply(lid);
    workgroupBarrier();
}

// The tile loads: op(a) and op(b) as scalars, or as vec4 where the entry form defines VEC_A,
// VEC_B (gemm_tiled_va, _vb, _vab: gemm_tiled compiled with those names, src/gpu/shaders.rs).
// An entry point reads one of the aliased bindings a / a4 and b / b4, never both.
fn tile_load_a(z: u32, m0: u32, k0: u32, li: u32) {
#if VEC_A
    load_a_vec4(z, m0, k0, li);
#else
    load_a(z, m0, k0, li);
#endif
}

fn tile_load_b(z: u32, n0: u32, k0: u32, li: u32) {
#if VEC_B
    load_b_vec4(z, n0, k0, li);
#else
    load_b(z, n0, k0, li);
#endif
}

@compute @workgroup_size(WG_N, WG_M)
fn gemm_tiled(w: Wg, t: Inv) {
    let o = tile_origin(w);
    for (var z = first_entry(w, o); z < p.batch; z += w.nwg.z) {
        clear_acc();
        for (var k0 = 0u; k0 < p.k; k0 += BK) {
            tile_load_a(z, o.x, k0, t.li);
            tile_load_b(z, o.y, k0, t.li);
            multiply_slice(t.lid);
        }
        store_c(z, o.x, o.y, t.lid);
    }
}

// gemm_reg, gemm_reg_vb: register blocks straight from memory, without workgroup memory or
// barriers (for CPU adapters such as lavapipe, where the invocations of a workgroup are the SIMD
// lanes of one thread, a barrier is a coroutine switch and a load whose address differs per lane
// is done lane by lane). A workgroup owns REG_M rows of C and REG_WG · 4 · REG_NV columns; its
// REG_WG invocations sit side by side along N and each keeps REG_M × (4 · REG_NV) sums.
// Invocation l owns columns 4 · (g · REG_WG + l) + lane of the tile (g < REG_NV, lane < 4). The
// rows of op(a) it reads depend only on the workgroup and the loop counter, the same address for
// every lane (one load feeds the whole workgroup); op(b) is read per lane, as vec4 by gemm_reg_vb
// (along N when b is (K, N), along K when b is (N, K): the launcher's vec4 rules for b apply).
// K runs in chunks of 4, the last 1 to 3 k through the same loads, each output summed over k in
// order with fma, so the results are those of every other kernel here, bit for bit. Rows and columns past the edge
// read a clamped (valid) row or column and are never stored.
// Split-K (p.split_k != 0, one batch entry): batch entry z sums k in [z · split_k, (z + 1) ·
// split_k) of the single matrix product and writes its partial sums to c[z]; gemm_splitk_reduce
// then adds the partials. Grid: tiles of (ceil(M / REG_M), ceil(N / (REG_WG · 4 · REG_NV))).
override REG_M: u32 = 8u;
// Column vec4s per invocation: 1 or 2 (gemm_ureg*: also 4).
override REG_NV: u32 = 1u;
override REG_WG: u32 = 64u;
// The sums: racc[r · 4 + g] holds row r, column group g.
var<private> racc: array<vec4<f32>, 64>;
// One k chunk of the block's operands: ra[r][q] = op(a)(i0 + r, k0 + q) and
// rb[q · 2 + g][lane] = op(b)(k0 + q, j_g + lane).
var<private> ra: array<vec4<f32>, 16>;
var<private> rb: array<vec4<f32>, 8>;

// (batch entry of a and b, first k, end of k) for batch entry z of c.
fn reg_range(z: u32) -> vec3<u32> {
    if (p.split_k == 0u) {
        return vec3<u32>(z, 0u, p.k);
    }
    let kb = min(z * p.split_k, p.k);
    return vec3<u32>(0u, kb, min(p.k, kb + p.split_k));
}

// The first column of group g of the invocation whose first column is j0.
fn reg_col(j0: u32, g: u32) -> u32 {
    return j0 + g * REG_WG * 4u;
}

// Loads op(a)(i0 + r, k0 + q) for q < nq into ra.
fn reg_load_a(z: u32, i0: u32, k0: u32, nq: u32) {
    for (var r = 0u; r < REG_M; r++) {
        let i = min(i0 + r, p.m - 1u);
        for (var q = 0u; q < nq; q++) {
            ra[r][q] = op_a(z, i, k0 + q);
        }
    }
}

fn reg_load_b(z: u32, j0: u32, k0: u32, nq: u32) {
    for (var g = 0u; g < REG_NV; g++) {
        let jg = reg_col(j0, g);
        for (var q = 0u; q < nq; q++) {
            for (var lane = 0u; lane < 4u; lane++) {
                rb[q * 2u + g][lane] = op_b(z, k0 + q, min(jg + lane, p.n - 1u));
            }
        }
    }
}

// The vec4 loads of a k chunk (k0 and every row start a multiple of 4). In the tail (fewer than
// 4 left) the lanes past K are read but never used: with b (N, K) the row stride is a multiple
// of 4, so the vec4 stays inside it.
fn reg_load_b_vec4(z: u32, j0: u32, k0: u32) {
    let base = p.b_off + z * p.b_bs;
    for (var g = 0u; g < REG_NV; g++) {
        let jg = reg_col(j0, g);
        if (TRANS_B) {
            for (var lane = 0u; lane < 4u; lane++) {
                let j = min(jg + lane, p.n - 1u);
                let v = read_b4((base + j * p.ldb + k0) / 4u);
                for (var q = 0u; q < 4u; q++) {
                    rb[q * 2u + g][lane] = v[q];
                }
            }
        } else {
            // jg is a multiple of 4: a vec4 that starts before N lies inside the row stride.
            // Rows past K (the tail's) read the last row instead.
            let j = min(jg, (p.n - 1u) & ~3u);
            for (var q = 0u; q < 4u; q++) {
                rb[q * 2u + g] = read_b4((base + min(k0 + q, p.k - 1u) * p.ldb + j) / 4u);
            }
        }
    }
}

// Adds op(a)(i, k0 + q) · op(b)(k0 + q, j) to every sum of the block.
fn reg_fma(q: u32) {
    for (var r = 0u; r < REG_M; r++) {
        let x = vec4<f32>(ra[r][q]);
        for (var g = 0u; g < REG_NV; g++) {
            racc[r * 4u + g] = fma(x, rb[q * 2u + g], racc[r * 4u + g]);
        }
    }
}

fn reg_store(z: u32, i0: u32, j0: u32) {
    for (var r = 0u; r < REG_M; r++) {
        for (var g = 0u; g < REG_NV; g++) {
            store_row(z, i0 + r, reg_col(j0, g), racc[r * 4u + g]);
        }
    }
}

// The tile's first row, and the first column of invocation l; the row is p.m when there is no tile.
fn reg_origin(wid: vec3<u32>, nwg: vec3<u32>, l: u32) -> vec2<u32> {
    let t = workgroup_index(wid, nwg);
    if (t >= p.tiles) {
        return vec2<u32>(p.m, 0u);
    }
    return vec2<u32>((t / p.tiles_n) * REG_M, (t % p.tiles_n) * REG_WG * 4u * REG_NV + 4u * l);
}

fn reg_clear() {
    for (var r = 0u; r < REG_M; r++) {
        for (var g = 0u; g < REG_NV; g++) {
            racc[r * 4u + g] = vec4<f32>(0.0);
        }
    }
}

// One k chunk of op(b) (nq = 4, or the last 1 to 3 k): as scalars, or as vec4 in the VEC_B form
// (gemm_reg_vb).
fn reg_load_b_form(z: u32, j0: u32, k0: u32, nq: u32) {
#if VEC_B
    reg_load_b_vec4(z, j0, k0);
#else
    reg_load_b(z, j0, k0, nq);
#endif
}

@compute @workgroup_size(REG_WG)
fn gemm_reg(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
            @builtin(local_invocation_id) lid: vec3<u32>) {
    let o = reg_origin(wid, nwg, lid.x);
    if (o.x >= p.m) {
        return;
    }
    for (var z = wid.z; z < p.batch; z += nwg.z) {
        let zk = reg_range(z);
        reg_clear();
        var k0 = zk.y;
        for (; k0 + 4u <= zk.z; k0 += 4u) {
            reg_load_a(zk.x, o.x, k0, 4u);
            reg_load_b_form(zk.x, o.y, k0, 4u);
            for (var q = 0u; q < 4u; q++) {
                reg_fma(q);
            }
        }
        // The last 1 to 3 k, in order.
        let left = zk.z - k0;
        if (left > 0u) {
            reg_load_a(zk.x, o.x, k0, left);
            reg_load_b_form(zk.x, o.y, k0, left);
            for (var q = 0u; q < left; q++) {
                reg_fma(q);
            }
        }
        reg_store(z, o.x, o.y);
    }
}

#include "include/gemm_ureg.wgsl"

// gemm_pack_b: c (N, KP) = bᵀ for b (K, N) (one batch entry, f32), columns K .. KP of c zero:
// the first pass of the packed-B kernel (src/kernels/gemm/), which then runs gemm_ureg_vb
// (or gemm_ureg_vab) with TRANS_B on c. Read down b's columns, gemm_ureg_vb's lanes would each
// step to a new row of b every k (ldb apart, a new memory page when ldb is 1024 floats or more),
// which ran slower on lavapipe than the run along k that bᵀ gives each lane. KP =
// p.ldc, a multiple of 4.
// Outputs in c's order, workgroups of 256 striding over them (the grid may hold fewer
// workgroups than outputs / 256 where the adapter's per-dimension limit is small).
@compute @workgroup_size(256)
fn gemm_pack_b(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
               @builtin(local_invocation_index) li: u32) {
    let stride = nwg.x * nwg.y * 256u;
    for (var e = global_index(wid, nwg, 256u, li); e < p.n * p.ldc; e += stride) {
        let j = e / p.ldc;
        let k = e % p.ldc;
        var v = 0.0;
        if (k < p.k) {
            v = read_b(p.b_off + k * p.ldb + j);
        }
        c[e] = v;
    }
}

// gemm_splitk_reduce: c (M, N) = alpha · Σ_s part[s] (+ bias) (+ c), with the partial sums of
// gemm_reg's split-K pass in a: p.batch slices (M, N) contiguous, p.a_bs apart, added in the
// order s = 0, 1, ... . Each output is thus the sum of per-slice fma chains: a summation order
// that differs from the other kernels (results agree to rounding and repeat bit for bit).
// One output per invocation, p.tiles workgroups of 256 in all.
@compute @workgroup_size(256)
fn gemm_splitk_reduce(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                      @builtin(local_invocation_index) li: u32) {
    let e = global_index(wid, nwg, 256u, li);
    if (e >= p.m * p.n) {
        return;
    }
    var s = a[p.a_off + e];
    for (var z = 1u; z < p.batch; z++) {
        s += a[p.a_off + z * p.a_bs + e];
    }
    finish(0u, e / p.n, e % p.n, s);
}

// bias_backward: dbias (N) += Σ_m dout (M, N), dout contiguous (row stride N).
// Bindings: 1 = dout (read), 2 = dbias (read_write). Uses p.m, p.n and p.tiles (column blocks).
// A workgroup owns BB_COLS columns: lane l of each column sums rows l, l + BB_LANES, ... in order,
// then a fixed tree over the lanes in workgroup memory finishes the column.
@group(0) @binding(1) var<storage, read> bb_dout: array<f32>;
@group(0) @binding(2) var<storage, read_write> bb_dbias: array<f32>;

const BB_COLS: u32 = 32u;
const BB_LANES: u32 = 8u;
var<workgroup> bb_part: array<f32, 256>;

@compute @workgroup_size(32, 8)
fn bias_backward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                 @builtin(local_invocation_id) lid: vec3<u32>) {
    let t = workgroup_index(wid, nwg);
    if (t >= p.tiles) {
        return;
    }
    let j = t * BB_COLS + lid.x;
    var s = 0.0;
    if (j < p.n) {
        for (var i = lid.y; i < p.m; i += BB_LANES) {
            s += bb_dout[i * p.n + j];
        }
    }
    bb_part[lid.y * BB_COLS + lid.x] = s;
    workgroupBarrier();
    for (var span = BB_LANES / 2u; span > 0u; span /= 2u) {
        if (lid.y < span) {
            bb_part[lid.y * BB_COLS + lid.x] += bb_part[(lid.y + span) * BB_COLS + lid.x];
        }
        workgroupBarrier();
    }
    if (lid.y == 0u && j < p.n) {
        bb_dbias[j] += bb_part[lid.x];
    }
}
