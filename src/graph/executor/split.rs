//! Parameters split into row chunks to fit the device's bindings: which operands may be split,
//! and the linear layer over a split weight (the tied lm head).

use super::super::ir::{Node, Op};
use super::Executor;
use crate::error::{Error, Result};
use crate::gpu::{Dispatch, Gpu, View};
use crate::kernels::gemm;

impl Executor<'_> {
    /// Refuses a node with an operand split into row chunks where its op cannot take one: only
    /// the token table in the embedding and the lm head, and everything the optimizer touches,
    /// may be split parameters.
    pub(super) fn check_splits(&self, node: &Node) -> Result<()> {
        let splittable = |input: bool, k: usize| match node.op {
            Op::Embedding { .. } => input && k == 1,
            Op::EmbeddingBackward { .. } => !input && k == 0,
            Op::Linear { bias, .. } => input && k == 1 && !bias,
            Op::LinearBackward { bias, dw, .. } => {
                (input && k == 2) || (!input && k == 1 && dw && !bias)
            }
            Op::LmHeadLoss { .. } => input && k == 1,
            Op::LmHeadLossBackward { dw, .. } => k == 1 && (input || dw),
            Op::Fill { .. } | Op::GlobalNorm | Op::AdamW { .. } => true,
            _ => false,
        };
        let operands = node
            .inputs
            .iter()
            .enumerate()
            .map(|(k, &t)| (true, k, t))
            .chain(node.outputs.iter().enumerate().map(|(k, &t)| (false, k, t)));
        for (input, k, t) in operands {
            if !splittable(input, k) && self.views[t].len() > 1 {
                return Err(Error::invalid(
                    node.op.name(),
                    format!(
                        "tensor {} is split into {} chunks to fit the device's storage bindings \
                         (max_storage_buffer_binding_size {} bytes), which this op does not \
                         support",
                        self.graph.tensors[t].name,
                        self.views[t].len(),
                        self.gpu.max_binding()
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// y (M, ·) = x (M, K) · wᵀ for a weight w split into row chunks: chunk j (rows_j, K) writes
/// columns [v_j, v_j + rows_j) of y, v_j being the rows of the chunks before it.
pub(super) fn split_linear_forward(
    gpu: &Gpu,
    y: gemm::Operand,
    x: gemm::Operand,
    w: &[View],
    m: usize,
    k: usize,
) -> Result<Vec<Dispatch>> {
    let mut out = Vec::with_capacity(w.len());
    let mut v0 = 0;
    for w in w {
        let rows = w.len / k;
        let mm = gemm::Matmul {
            trans_b: true,
            ..gemm::Matmul::new(m, rows, k)
        };
        let y = y.at(y.offset + v0);
        let w = gemm::Operand::new(w, k);
        out.extend(gemm::matmul(gpu, &mm, y, x, w, None, gemm::Variant::Tiled)?);
        v0 += rows;
    }
    Ok(out)
}

/// The tensors of `split_linear_backward`: dx (M, K) written when given, the chunks dw_j
/// (rows_j, K) of the weight's gradient added to when given (not for a frozen weight); dy (M, ·),
/// x (M, K) and the weight's chunks w_j read.
pub(super) struct SplitLinearBackwardTensors<'a> {
    pub(super) dx: Option<gemm::Operand<'a>>,
    pub(super) dw: Option<&'a [View]>,
    pub(super) dy: gemm::Operand<'a>,
    pub(super) x: gemm::Operand<'a>,
    pub(super) w: &'a [View],
}

/// The backward of `split_linear_forward`: dx (M, K) (= or += with `acc`) Σ_j dy[:, cols_j] ·
/// w_j (skipped without dx) and dw_j (rows_j, K) += dy[:, cols_j]ᵀ · x, chunk by chunk.
pub(super) fn split_linear_backward(
    gpu: &Gpu,
    tensors: SplitLinearBackwardTensors,
    m: usize,
    k: usize,
    acc: bool,
) -> Result<Vec<Dispatch>> {
    let SplitLinearBackwardTensors { dx, dw, dy, x, w } = tensors;
    let mut out = Vec::with_capacity(2 * w.len());
    let mut v0 = 0;
    for (j, w) in w.iter().enumerate() {
        let rows = w.len / k;
        let dy = dy.at(dy.offset + v0);
        if let Some(dx) = dx {
            let mm = gemm::Matmul {
                accumulate: acc || j > 0,
                ..gemm::Matmul::new(m, k, rows)
            };
            let w = gemm::Operand::new(w, k);
            out.extend(gemm::matmul(
                gpu,
                &mm,
                dx,
                dy,
                w,
                None,
                gemm::Variant::Tiled,
            )?);
        }
        let Some(dw) = dw.map(|dw| &dw[j]) else {
            v0 += rows;
            continue;
        };
        let mm = gemm::Matmul {
            trans_a: true,
            accumulate: true,
            ..gemm::Matmul::new(rows, k, m)
        };
        let dw = gemm::Operand::new(dw, k);
        out.extend(gemm::matmul(
            gpu,
            &mm,
            dw,
            dy,
            x,
            None,
            gemm::Variant::Tiled,
        )?);
        v0 += rows;
    }
    Ok(out)
}
