//! The GEMM path (attention.wgsl's "The GEMM path"): the products by the GEMM family's tuned
//! kernels, a group of (b, h) pairs at a time, and the score kernels between them.

use super::super::bytes_of;
use super::super::gemm::{self, Matmul, Operand};
use super::{BackwardTensors, Dims, Params, SCORES_BACKWARD, SCORES_SOFTMAX, product_flops};
use crate::error::{Error, Result};
use crate::gpu::{Cost, DType, Dispatch, Gpu, KernelSpec, View, grid};

/// Invocations per workgroup of the score kernels.
const SCORES_WG: u32 = 64;

/// The shortest sequence the tuner offers the GEMM path for. Below it the products are too small
/// to pay for their dispatches (lavapipe, B 32, NH 4, T 10: 2-6x slower than the row kernels; T
/// 32: even with them; T 64: 1.6-1.7x faster than the fixed rule), and measuring them would
/// first build and tune GEMM candidates for three more problems.
pub(super) const GEMM_PATH_MIN_T: usize = 32;

/// How the GEMM path groups the B·NH (b, h) pairs: each group is one batched product per
/// matrix, its entries heads of one sequence or one head of each of the B sequences, whichever
/// makes fewer groups (fewer, larger dispatches) while the group's T × T scores fit one binding.
/// Only these orders give the entries of qkv a single batch stride: over heads, the query heads
/// of a sequence go in G = NH / NKV groups, group r holding heads r, r + G, r + 2G, ..., one
/// for each key/value head in order (without grouping, G = 1: every head in one group).
#[derive(Clone, Copy, Debug)]
pub(super) struct Groups {
    dims: Dims,
    /// The entries are sequences (one group per query head), not heads (G groups per sequence).
    over_b: bool,
}

impl Groups {
    pub(super) fn new(gpu: &Gpu, dims: Dims) -> Result<Groups> {
        let Dims { b, t, nh, nkv, .. } = dims;
        let fits = |entries: usize| {
            let len = (entries as u128) * (t as u128) * (t as u128);
            len <= u32::MAX as u128 && 4 * len <= gpu.limits.max_storage_buffer_binding_size as u128
        };
        // Fewer groups first (NH over sequences, B·G over heads), the other order where only it
        // fits.
        let orders = if nh <= b * dims.group() {
            [true, false]
        } else {
            [false, true]
        };
        let entries = |over_b: bool| if over_b { b } else { nkv };
        match orders.into_iter().find(|&over_b| fits(entries(over_b))) {
            Some(over_b) => Ok(Groups { dims, over_b }),
            None => Err(Error::invalid(
                "attention gemm path",
                format!(
                    "min(B, NKV)·T² = {} scores exceed the adapter's storage binding limit of {} \
                     bytes",
                    b.min(nkv) * t * t,
                    gpu.limits.max_storage_buffer_binding_size
                ),
            )),
        }
    }

    /// Batch entries per group.
    pub(super) fn entries(&self) -> usize {
        if self.over_b {
            self.dims.b
        } else {
            self.dims.nkv
        }
    }

    /// Groups in all.
    fn count(&self) -> usize {
        self.dims.b * self.dims.nh / self.entries()
    }

    /// The group's scores: `entries` matrices of T × T in `view`.
    fn scores<'a>(&self, view: &'a View) -> Operand<'a> {
        let t = self.dims.t;
        Operand::new(view, t).batched(t * t)
    }

    /// Group `g`'s (T, HS) matrices of part `part` of qkv (0 = q, 1 = k, 2 = v; row stride W),
    /// or of a (B, T, C) tensor (`part` None), one per entry. Over sequences, group g is query
    /// head g, whose k and v are those of key/value head g / G; over heads, group g is the
    /// heads r = g mod G, r + G, ... of sequence g / G, whose k and v are key/value heads 0, 1, ...
    fn rows<'a>(&self, view: &'a View, g: usize, part: Option<usize>) -> Operand<'a> {
        let d = self.dims;
        let (ld, part) = match part {
            Some(part) => (d.width(), part),
            None => (d.c(), 0),
        };
        let op = Operand::new(view, ld);
        if self.over_b {
            return op.at(d.part_offset(part, g)).batched(d.t * ld);
        }
        let (seq, r) = (g / d.group(), g % d.group());
        let start = seq * d.t * ld;
        if part == 0 {
            op.at(start + r * d.hs).batched(d.group() * d.hs)
        } else {
            op.at(start + d.part_offset(part, 0)).batched(d.hs)
        }
    }

    /// Whether group `g`'s dk and dv add to those an earlier group wrote: the groups of query
    /// heads after the first of each key/value head's (in order, so the sum has a fixed order).
    fn adds_kv(&self, g: usize) -> bool {
        !g.is_multiple_of(self.dims.group())
    }

    /// `base` for the score kernels of group `g`.
    fn params(&self, base: &Params, g: usize) -> Params {
        let group = self.dims.group();
        let (b0, h0, step) = if self.over_b {
            (0, g, 1)
        } else {
            (g / group, g % group, group)
        };
        Params {
            grp: [
                b0 as u32,
                h0 as u32,
                self.over_b as u32,
                self.entries() as u32,
            ],
            grp_step: step as u32,
            ..*base
        }
    }

    /// `product_flops` of one group.
    fn flops(&self, causal: bool) -> u64 {
        let d = self.dims;
        product_flops(d, d.t, causal) / self.count() as u64
    }
}

/// The scratch for a group's scores (`Groups::scores`), shared by every GEMM-path launcher of
/// this size: each group's dispatches write it before they read it.
fn scores_scratch(gpu: &Gpu, tag: &str, groups: &Groups) -> Result<View> {
    let t = groups.dims.t;
    gpu.shared_scratch(tag, DType::F32, groups.entries() * t * t)
}

/// One batched product of a group, by the GEMM family's tuned kernel, its dispatches costed at
/// `useful` FLOPs in all (see `product_flops`).
fn group_product(
    gpu: &Gpu,
    mm: &Matmul,
    [c, a, b]: [Operand; 3],
    useful: u64,
) -> Result<Vec<Dispatch>> {
    let mut ds = gemm::matmul(gpu, mm, c, a, b, None, gemm::Variant::Tiled)?;
    for (i, d) in ds.iter_mut().rev().enumerate() {
        d.cost.flops = if i == 0 { useful } else { 0 };
    }
    Ok(ds)
}

/// S (T, T) = scale2 · q · kᵀ for each entry of group `g`: base-2 scores, masked ones included.
fn scores_product(
    gpu: &Gpu,
    scores: &View,
    qkv: &View,
    (groups, g): (&Groups, usize),
    params: &Params,
) -> Result<Vec<Dispatch>> {
    let Dims { t, hs, .. } = groups.dims;
    let mm = Matmul {
        batch: groups.entries(),
        trans_b: true,
        alpha: params.scale2,
        ..Matmul::new(t, t, hs)
    };
    let ops = [
        groups.scores(scores),
        groups.rows(qkv, g, Some(0)),
        groups.rows(qkv, g, Some(1)),
    ];
    group_product(gpu, &mm, ops, groups.flops(params.causal != 0))
}

/// A score kernel over group `g`: one invocation per score row (`per_row` 1) or per score
/// (`per_row` T).
fn scores_dispatch(
    gpu: &Gpu,
    (spec, args): (&KernelSpec, &[&View]),
    (groups, g): (&Groups, usize),
    params: &Params,
    per_row: usize,
    cost: Cost,
) -> Result<Dispatch> {
    let invocations = groups.entries() * groups.dims.t * per_row;
    gpu.dispatch(
        spec,
        &[("WG", SCORES_WG as f64)],
        bytes_of(&groups.params(params, g)),
        args,
        grid(
            (invocations as u32).div_ceil(SCORES_WG),
            gpu.limits.max_compute_workgroups_per_dimension,
        ),
        cost,
    )
}

/// `Variant::Gemm`'s forward: per group, S = scale2·q·kᵀ, then P ∘ M / l and lse from S in
/// place, then out = P·v.
pub(super) fn gemm_forward(
    gpu: &Gpu,
    [out, lse, qkv, step]: [&View; 4],
    dims: Dims,
    params: &Params,
) -> Result<Vec<Dispatch>> {
    let groups = Groups::new(gpu, dims)?;
    let scores = scores_scratch(gpu, "attention.scores", &groups)?;
    let square = (groups.entries() * dims.t * dims.t) as u64;
    let useful = groups.flops(params.causal != 0);
    let softmax_cost = Cost {
        flops: 5 * square,
        bytes: 8 * square,
    };
    // out = P · v
    let mm = Matmul {
        batch: groups.entries(),
        ..Matmul::new(dims.t, dims.hs, dims.t)
    };
    let mut all = Vec::new();
    for g in 0..groups.count() {
        all.extend(scores_product(gpu, &scores, qkv, (&groups, g), params)?);
        let kernel = (&SCORES_SOFTMAX, &[&scores, lse, step][..]);
        all.push(scores_dispatch(
            gpu,
            kernel,
            (&groups, g),
            params,
            1,
            softmax_cost,
        )?);
        let ops = [
            groups.rows(out, g, None),
            groups.scores(&scores),
            groups.rows(qkv, g, Some(2)),
        ];
        all.extend(group_product(gpu, &mm, ops, useful)?);
    }
    Ok(all)
}

/// `Variant::Gemm`'s backward after D: per group, S and dP = dout·vᵀ, then P ∘ M and dS from
/// them in place, then dv = (P ∘ M)ᵀ·dout, dq = scale·dS·k and dk = scale·dSᵀ·q.
pub(super) fn gemm_backward(
    gpu: &Gpu,
    tensors: BackwardTensors,
    dims: Dims,
    params: &Params,
    (d, step): (&View, &View),
) -> Result<Vec<Dispatch>> {
    let BackwardTensors {
        dqkv,
        dout,
        qkv,
        lse,
        ..
    } = tensors;
    let Dims { t, hs, .. } = dims;
    let groups = Groups::new(gpu, dims)?;
    let scores = scores_scratch(gpu, "attention.scores", &groups)?;
    let dscores = scores_scratch(gpu, "attention.dscores", &groups)?;
    let square = (groups.entries() * t * t) as u64;
    let useful = groups.flops(params.causal != 0);
    let batch = groups.entries();
    // dP = dout · vᵀ
    let dp_mm = Matmul {
        batch,
        trans_b: true,
        ..Matmul::new(t, t, hs)
    };
    let grad_cost = Cost {
        flops: 6 * square,
        bytes: 16 * square,
    };
    let mut all = Vec::new();
    for g in 0..groups.count() {
        all.extend(scores_product(gpu, &scores, qkv, (&groups, g), params)?);
        let ops = [
            groups.scores(&dscores),
            groups.rows(dout, g, None),
            groups.rows(qkv, g, Some(2)),
        ];
        all.extend(group_product(gpu, &dp_mm, ops, useful)?);
        let kernel = (&SCORES_BACKWARD, &[&scores, &dscores, lse, d, step][..]);
        all.push(scores_dispatch(
            gpu,
            kernel,
            (&groups, g),
            params,
            t,
            grad_cost,
        )?);
        // dv = (P ∘ M)ᵀ · dout, dq = scale · dS · k, dk = scale · dSᵀ · q; dv and dk of a
        // key/value head sum over its query heads (`adds_kv`).
        let kv_acc = groups.adds_kv(g);
        let products = [
            (&scores, true, 1.0, (dout, None), (2, kv_acc)),
            (&dscores, false, params.scale, (qkv, Some(1)), (0, false)),
            (&dscores, true, params.scale, (qkv, Some(0)), (1, kv_acc)),
        ];
        for (a, trans_a, alpha, (bv, b_part), (c_part, accumulate)) in products {
            let mm = Matmul {
                batch,
                trans_a,
                alpha,
                accumulate,
                ..Matmul::new(t, hs, t)
            };
            let ops = [
                groups.rows(dqkv, g, Some(c_part)),
                groups.scores(a),
                groups.rows(bv, g, b_part),
            ];
            all.extend(group_product(gpu, &mm, ops, useful)?);
        }
    }
    Ok(all)
}
