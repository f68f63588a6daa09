// The unrolled register-blocked kernel of gemm.wgsl (gemm_ureg and its entry forms), included by
// it after gemm_reg, whose work split, reg_range, reg_origin and split-K layout it shares; it
// reads gemm.wgsl's Params, bindings, overrides and epilogue (finish).

// gemm_ureg, gemm_ureg_vb, gemm_ureg_vab: gemm_reg's work split (REG_M = 8 or 16 rows, REG_NV =
// 1, 2 or 4 column vec4s, REG_WG invocations side by side along N, split-K as there) with the
// register block written out: named vec4 sums and row addresses instead of arrays indexed in
// loops. Compilers for CPU adapters (lavapipe's LLVM) keep named values in registers but spill
// arrays indexed by loop counters to memory, and the runtime checks of array indices cost as much
// again; this form ran several times faster than gemm_reg there (BENCHMARKS.md).
// K runs in chunks of 4. Each chunk's operands are read once, op(a) as a UregA per 8 rows and
// op(b) as a mat4x4 per column vec4, and each 8 × 4 part of the block (a UregSums) takes its fma
// chain from them: the sums are the same fma chains in k order as every other kernel's, so the
// results are the same bits. lavapipe loads memory lane by lane (a loop over the 8 lanes of a
// vector, with a bounds check per component), whatever the address, so a read costs far more
// than the fmas it feeds: per chunk an 8 × 4 block reads 12 vec4s for 128 fmas, a 16 × 8 one
// 24 for 512 and a 16 × 16 one 32 for 1024, and the bigger blocks ran faster at large shapes
// (BENCHMARKS.md). They spill their sums to the stack, which costs far less.
// How each entry reads: gemm_ureg reads op(a) and op(b) as scalars; gemm_ureg_vb reads op(b) as
// vec4 (along N when b is (K, N); when b is (N, K), one vec4 along K per column, transposed in
// registers); gemm_ureg_vab reads op(a) as vec4 too (a's vec4 rules as the tiled kernels':
// every row start and the row stride multiples of 4). A shader reads an operand either as
// scalars or as vec4s, never both.
struct UregSums {
    r0: vec4<f32>, r1: vec4<f32>, r2: vec4<f32>, r3: vec4<f32>,
    r4: vec4<f32>, r5: vec4<f32>, r6: vec4<f32>, r7: vec4<f32>,
}

// The block's sums: rows 0-7 and 8-15 (s1*: REG_M = 16 only) by column vec4 0 to 3 (s*1:
// REG_NV 2 or 4, s*2 and s*3: REG_NV = 4 only). Unused parts stay zero and are never stored.
struct UregBlock {
    s00: UregSums, s01: UregSums, s02: UregSums, s03: UregSums,
    s10: UregSums, s11: UregSums, s12: UregSums, s13: UregSums,
}

// One k chunk of eight rows of op(a): two mat4x4, lo for rows 0-3 and hi for rows 4-7, column q
// holding the rows at k + q.
struct UregA {
    lo: mat4x4<f32>,
    hi: mat4x4<f32>,
}

// Where op(a)(i0 + r, k) lies: at row[r] + k · step (rows past M clamped to the last).
struct UregRows {
    r0: u32, r1: u32, r2: u32, r3: u32, r4: u32, r5: u32, r6: u32, r7: u32,
    step: u32,
}

fn ureg_rows(z: u32, i0: u32) -> UregRows {
    let base = p.a_off + z * p.a_bs;
    var stride = p.lda;
    var step = 1u;
    if (TRANS_A) {
        stride = 1u;
        step = p.lda;
    }
    let last = p.m - 1u;
    return UregRows(
        base + min(i0, last) * stride, base + min(i0 + 1u, last) * stride,
        base + min(i0 + 2u, last) * stride, base + min(i0 + 3u, last) * stride,
        base + min(i0 + 4u, last) * stride, base + min(i0 + 5u, last) * stride,
        base + min(i0 + 6u, last) * stride, base + min(i0 + 7u, last) * stride,
        step);
}

// The chunk at k of the eight rows, read as scalars (k past kend read the last k).
fn ureg_a1(rows: UregRows, k: u32, kend: u32) -> UregA {
    let last = kend - 1u;
    let k0 = k * rows.step;
    let k1 = min(k + 1u, last) * rows.step;
    let k2 = min(k + 2u, last) * rows.step;
    let k3 = min(k + 3u, last) * rows.step;
    return UregA(
        mat4x4<f32>(vec4<f32>(a[rows.r0 + k0], a[rows.r1 + k0], a[rows.r2 + k0], a[rows.r3 + k0]),
                    vec4<f32>(a[rows.r0 + k1], a[rows.r1 + k1], a[rows.r2 + k1], a[rows.r3 + k1]),
                    vec4<f32>(a[rows.r0 + k2], a[rows.r1 + k2], a[rows.r2 + k2], a[rows.r3 + k2]),
                    vec4<f32>(a[rows.r0 + k3], a[rows.r1 + k3], a[rows.r2 + k3], a[rows.r3 + k3])),
        mat4x4<f32>(vec4<f32>(a[rows.r4 + k0], a[rows.r5 + k0], a[rows.r6 + k0], a[rows.r7 + k0]),
                    vec4<f32>(a[rows.r4 + k1], a[rows.r5 + k1], a[rows.r6 + k1], a[rows.r7 + k1]),
                    vec4<f32>(a[rows.r4 + k2], a[rows.r5 + k2], a[rows.r6 + k2], a[rows.r7 + k2]),
                    vec4<f32>(a[rows.r4 + k3], a[rows.r5 + k3], a[rows.r6 + k3], a[rows.r7 + k3])));
}

// The chunk at k (k a multiple of 4) of the eight rows from i0 (a multiple of 8), read as vec4
// (rows and k past the edge read clamped rows or the row stride's padding, never stored).
fn ureg_a4(z: u32, i0: u32, k: u32, kend: u32) -> UregA {
    let base = p.a_off + z * p.a_bs;
    if (TRANS_A) {
        // Element (i, k) at base + k · lda + i: rows i0 .. i0 + 3 and i0 + 4 .. i0 + 7 of row k
        // of the stored matrix are two aligned vec4s (each clamped to the last one that holds a
        // row below M); k past kend read the last k.
        let edge = (p.m - 1u) & ~3u;
        let lo = base + min(i0, edge);
        let hi = base + min(i0 + 4u, edge);
        let last = kend - 1u;
        let k1 = min(k + 1u, last) * p.lda;
        let k2 = min(k + 2u, last) * p.lda;
        let k3 = min(k + 3u, last) * p.lda;
        return UregA(
            mat4x4<f32>(a4[(lo + k * p.lda) / 4u], a4[(lo + k1) / 4u], a4[(lo + k2) / 4u],
                        a4[(lo + k3) / 4u]),
            mat4x4<f32>(a4[(hi + k * p.lda) / 4u], a4[(hi + k1) / 4u], a4[(hi + k2) / 4u],
                        a4[(hi + k3) / 4u]));
    }
    // Element (i, k) at base + i · lda + k: four k of a row are one aligned vec4 (past K inside
    // the row stride); rows past M clamped to the last.
    let last = p.m - 1u;
    let r = base + k;
    return UregA(
        transpose(mat4x4<f32>(a4[(r + min(i0, last) * p.lda) / 4u],
                              a4[(r + min(i0 + 1u, last) * p.lda) / 4u],
                              a4[(r + min(i0 + 2u, last) * p.lda) / 4u],
                              a4[(r + min(i0 + 3u, last) * p.lda) / 4u])),
        transpose(mat4x4<f32>(a4[(r + min(i0 + 4u, last) * p.lda) / 4u],
                              a4[(r + min(i0 + 5u, last) * p.lda) / 4u],
                              a4[(r + min(i0 + 6u, last) * p.lda) / 4u],
                              a4[(r + min(i0 + 7u, last) * p.lda) / 4u])));
}

// op(b)(k, j + lane) for the four lanes, columns past N clamped to the last.
fn ureg_b(z: u32, k: u32, j: u32) -> vec4<f32> {
    let last = p.n - 1u;
    return vec4<f32>(op_b(z, k, min(j, last)), op_b(z, k, min(j + 1u, last)),
                     op_b(z, k, min(j + 2u, last)), op_b(z, k, min(j + 3u, last)));
}

// op(b)(k + q, j + lane) at [q][lane], read as scalars (k past kend read the last k).
fn ureg_b1(z: u32, j: u32, k: u32, kend: u32) -> mat4x4<f32> {
    let last = kend - 1u;
    return mat4x4<f32>(ureg_b(z, k, j), ureg_b(z, min(k + 1u, last), j),
                       ureg_b(z, min(k + 2u, last), j), ureg_b(z, min(k + 3u, last), j));
}

// op(b)(k + q, j + lane) at [q][lane] for q, lane < 4, b (N, K) with column j + lane starting at
// cols[lane], read as one vec4 along K per column and transposed.
fn ureg_bt(cols: vec4<u32>, k: u32) -> mat4x4<f32> {
    return transpose(mat4x4<f32>(read_b4((cols.x + k) / 4u), read_b4((cols.y + k) / 4u),
                                 read_b4((cols.z + k) / 4u), read_b4((cols.w + k) / 4u)));
}

// op(b)(k + q, j + lane) at [q][lane] for q, lane < 4, b (K, N) with element (k, j) at
// col + k · ldb: one vec4 along N per row, rows from kend on clamped to the last.
fn ureg_bn(col: u32, k: u32, kend: u32) -> mat4x4<f32> {
    let last = kend - 1u;
    return mat4x4<f32>(read_b4((col + k * p.ldb) / 4u),
                       read_b4((col + min(k + 1u, last) * p.ldb) / 4u),
                       read_b4((col + min(k + 2u, last) * p.ldb) / 4u),
                       read_b4((col + min(k + 3u, last) * p.ldb) / 4u));
}

// op(b)(k + q, j + lane) at [q][lane] for the four columns from j (a multiple of 4) and the
// four k from k (a multiple of 4), b read as vec4 (kend: the end of the K range).
fn ureg_b4(base: u32, j: u32, k: u32, kend: u32) -> mat4x4<f32> {
    if (TRANS_B) {
        // b (N, K): four k of a column are one vec4 (k and every row start multiples of 4; the
        // row stride, a multiple of 4 too, holds the last chunk's lanes past K, read but never
        // used); columns past N clamped to the last.
        let last = p.n - 1u;
        let cols = base + vec4<u32>(min(j, last), min(j + 1u, last), min(j + 2u, last),
                                    min(j + 3u, last)) * p.ldb;
        return ureg_bt(cols, k);
    }
    // b (K, N): row k's four columns are one vec4 (a vec4 that starts before N lies inside the row
    // stride); rows past K read the last row instead and are never used.
    return ureg_bn(base + min(j, (p.n - 1u) & ~3u), k, kend);
}

// s + op(a)(i0 + r, k) · y for the block's eight rows, lo and hi holding rows 0-3 and 4-7 at k.
fn ureg_fma_cols(s: UregSums, lo: vec4<f32>, hi: vec4<f32>, y: vec4<f32>) -> UregSums {
    return UregSums(
        fma(vec4<f32>(lo.x), y, s.r0), fma(vec4<f32>(lo.y), y, s.r1),
        fma(vec4<f32>(lo.z), y, s.r2), fma(vec4<f32>(lo.w), y, s.r3),
        fma(vec4<f32>(hi.x), y, s.r4), fma(vec4<f32>(hi.y), y, s.r5),
        fma(vec4<f32>(hi.z), y, s.r6), fma(vec4<f32>(hi.w), y, s.r7));
}

// s summed over the first n (1 to 4) k of a chunk: op(a)'s rows in x, op(b)'s row q in t[q].
fn ureg_chunk(s: UregSums, x: UregA, t: mat4x4<f32>, n: u32) -> UregSums {
    var r = ureg_fma_cols(s, x.lo[0], x.hi[0], t[0]);
    if (n > 1u) {
        r = ureg_fma_cols(r, x.lo[1], x.hi[1], t[1]);
    }
    if (n > 2u) {
        r = ureg_fma_cols(r, x.lo[2], x.hi[2], t[2]);
    }
    if (n > 3u) {
        r = ureg_fma_cols(r, x.lo[3], x.hi[3], t[3]);
    }
    return r;
}

// The block summed over the first n k of a chunk: op(a)'s rows 0-7 in x0 and 8-15 in x1,
// op(b)'s column vec4s in t.t0 to t.t3 (those the block has no part for unused).
fn ureg_step(s: UregBlock, x0: UregA, x1: UregA, t: UregB, n: u32) -> UregBlock {
    var r = s;
    r.s00 = ureg_chunk(s.s00, x0, t.t0, n);
    if (REG_NV >= 2u) {
        r.s01 = ureg_chunk(s.s01, x0, t.t1, n);
    }
    if (REG_NV == 4u) {
        r.s02 = ureg_chunk(s.s02, x0, t.t2, n);
        r.s03 = ureg_chunk(s.s03, x0, t.t3, n);
    }
    if (REG_M == 16u) {
        r.s10 = ureg_chunk(s.s10, x1, t.t0, n);
        if (REG_NV >= 2u) {
            r.s11 = ureg_chunk(s.s11, x1, t.t1, n);
        }
        if (REG_NV == 4u) {
            r.s12 = ureg_chunk(s.s12, x1, t.t2, n);
            r.s13 = ureg_chunk(s.s13, x1, t.t3, n);
        }
    }
    return r;
}

// One k chunk of op(b)'s column vec4s 0 to 3 (ureg_b1 or ureg_b4 of each).
struct UregB {
    t0: mat4x4<f32>, t1: mat4x4<f32>, t2: mat4x4<f32>, t3: mat4x4<f32>,
}

// The chunk at k of the block's columns from j, read as scalars (z: b's batch entry).
fn ureg_bs1(z: u32, j: u32, k: u32, kend: u32) -> UregB {
    var t: UregB;
    t.t0 = ureg_b1(z, j, k, kend);
    if (REG_NV >= 2u) {
        t.t1 = ureg_b1(z, reg_col(j, 1u), k, kend);
    }
    if (REG_NV == 4u) {
        t.t2 = ureg_b1(z, reg_col(j, 2u), k, kend);
        t.t3 = ureg_b1(z, reg_col(j, 3u), k, kend);
    }
    return t;
}

// The same read as vec4 (base: b's batch entry).
fn ureg_bs4(base: u32, j: u32, k: u32, kend: u32) -> UregB {
    var t: UregB;
    t.t0 = ureg_b4(base, j, k, kend);
    if (REG_NV >= 2u) {
        t.t1 = ureg_b4(base, reg_col(j, 1u), k, kend);
    }
    if (REG_NV == 4u) {
        t.t2 = ureg_b4(base, reg_col(j, 2u), k, kend);
        t.t3 = ureg_b4(base, reg_col(j, 3u), k, kend);
    }
    return t;
}

// The eight rows of s, from row i and column j. The block is stored from its named sums, never
// through an array: lavapipe compiled a block passed through gemm_reg's private array (racc) in
// about 5 s per pipeline against under 2 s this way, for the same speed
// (docs/benchmarks-log.md, 2026-12-08).
fn ureg_put(z: u32, i: u32, j: u32, s: UregSums) {
    store_row(z, i, j, s.r0);
    store_row(z, i + 1u, j, s.r1);
    store_row(z, i + 2u, j, s.r2);
    store_row(z, i + 3u, j, s.r3);
    store_row(z, i + 4u, j, s.r4);
    store_row(z, i + 5u, j, s.r5);
    store_row(z, i + 6u, j, s.r6);
    store_row(z, i + 7u, j, s.r7);
}

// The block from row i0 and column j, as gemm_reg's reg_store lays it out.
fn ureg_store(z: u32, i0: u32, j: u32, s: UregBlock) {
    ureg_put(z, i0, j, s.s00);
    if (REG_NV >= 2u) {
        ureg_put(z, i0, reg_col(j, 1u), s.s01);
    }
    if (REG_NV == 4u) {
        ureg_put(z, i0, reg_col(j, 2u), s.s02);
        ureg_put(z, i0, reg_col(j, 3u), s.s03);
    }
    if (REG_M == 16u) {
        ureg_put(z, i0 + 8u, j, s.s10);
        if (REG_NV >= 2u) {
            ureg_put(z, i0 + 8u, reg_col(j, 1u), s.s11);
        }
        if (REG_NV == 4u) {
            ureg_put(z, i0 + 8u, reg_col(j, 2u), s.s12);
            ureg_put(z, i0 + 8u, reg_col(j, 3u), s.s13);
        }
    }
}

fn ureg_zero() -> UregBlock {
    let o = vec4<f32>(0.0);
    let s = UregSums(o, o, o, o, o, o, o, o);
    return UregBlock(s, s, s, s, s, s, s, s);
}

// The chunk at k of the block (o: its first row and column; rows: its row addresses, 0-7 and
// 8-15; base: b's batch entry): op(a) as scalars, or as vec4 in the VEC_A form; op(b) as scalars,
// or as vec4 in the VEC_B form (gemm_ureg_vb, gemm_ureg_vab: gemm_ureg compiled with those names).
fn ureg_k_chunk(s: UregBlock, z: u32, o: vec2<u32>, rows: array<UregRows, 2>, base: u32, k: u32,
                kend: u32, n: u32) -> UregBlock {
    var x1: UregA;
#if VEC_A
    if (REG_M == 16u) {
        x1 = ureg_a4(z, o.x + 8u, k, kend);
    }
    let x0 = ureg_a4(z, o.x, k, kend);
#else
    if (REG_M == 16u) {
        x1 = ureg_a1(rows[1], k, kend);
    }
    let x0 = ureg_a1(rows[0], k, kend);
#endif
#if VEC_B
    let t = ureg_bs4(base, o.y, k, kend);
#else
    let t = ureg_bs1(z, o.y, k, kend);
#endif
    return ureg_step(s, x0, x1, t, n);
}

@compute @workgroup_size(REG_WG)
fn gemm_ureg(w: Wg, t: Inv) {
    let o = reg_origin(w.wid, w.nwg, t.lid.x);
    if (o.x >= p.m) {
        return;
    }
    for (var z = w.wid.z; z < p.batch; z += w.nwg.z) {
        let zk = reg_range(z);
        let rows = array<UregRows, 2>(ureg_rows(zk.x, o.x), ureg_rows(zk.x, o.x + 8u));
        let base = p.b_off + zk.x * p.b_bs;
        var s = ureg_zero();
        // Whole chunks of 4, then the last 1 to 3 k through the same reads.
        var k = zk.y;
        for (; k + 4u <= zk.z; k += 4u) {
            s = ureg_k_chunk(s, zk.x, o, rows, base, k, zk.z, 4u);
        }
        if (k < zk.z) {
            s = ureg_k_chunk(s, zk.x, o, rows, base, k, zk.z, zk.z - k);
        }
        ureg_store(z, o.x, o.y, s);
    }
}
