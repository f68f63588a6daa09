//! Lowering: each graph op to its kernels' dispatches, one function per op.

use super::super::ir::{Node, Op, TensorId, TensorKind};
use super::super::store;
use super::Executor;
use super::split::{SplitLinearBackwardTensors, split_linear_backward, split_linear_forward};
use crate::error::{Error, Result};
use crate::gpu::{DType, Dispatch, Gpu, View};
use crate::kernels::{
    adamw, attention, convert, cross_entropy, dropout, embedding, gelu, gemm, layernorm, qkv_pack,
    reduce, residual, rmsnorm, rope, swiglu,
};

impl Executor<'_> {
    /// The dispatches of one node: its operands checked, then lowered by its op's function.
    pub(super) fn node(&self, node: &Node) -> Result<Vec<Dispatch>> {
        self.check_splits(node)?;
        let x = Lowering { ex: self, node };
        let one = |d: Result<Dispatch>| d.map(|d| vec![d]);
        let (gpu, i, o) = (self.gpu, |k| x.i(k), |k| x.o(k));
        match node.op {
            Op::Embedding { b, t, c } => x.embedding(b, t, c),
            Op::LayerNorm { n, c } => x.layernorm(n, c),
            Op::Linear { m, k, n, bias } => x.linear(m, k, n, bias),
            Op::LinearGelu { m, k, n, bias } => x.linear_gelu((m, k, n, bias)),
            Op::LinearResidual { m, k, n, bias } => x.linear_residual((m, k, n, bias)),
            Op::Attention {
                b,
                t,
                nh,
                nkv,
                hs,
                p,
                site,
            } => x.attention(attention::Dims { b, t, nh, nkv, hs }, p, site),
            Op::AttentionCached {
                b,
                tq,
                nh,
                nkv,
                hs,
                tmax,
            } => x.attention_cached(decoding(b, tq, (nh, nkv), hs), tmax),
            Op::KvAppend {
                b,
                tq,
                nh,
                nkv,
                hs,
                tmax,
            } => x.kv_append(decoding(b, tq, (nh, nkv), hs), tmax),
            Op::RmsNorm { n, c, eps } => x.rmsnorm(rmsnorm::Dims { n, c }, eps),
            Op::Rope { b, t, heads, d } => one(rope::forward_at(
                gpu,
                o(0),
                i(0),
                i(1),
                rope_dims(b, t, heads, d),
                self.step_view(),
            )),
            Op::PackQkv { b, t, nh, nkv, hs } => {
                let dims = qkv_pack::Dims { b, t, nh, nkv, hs };
                one(qkv_pack::forward(gpu, o(0), (i(0), i(1), i(2)), dims))
            }
            Op::Gelu { n } => one(gelu::forward(gpu, o(0), i(0), n)),
            Op::SwiGlu { n } => one(swiglu::forward(gpu, o(0), i(0), i(1), n)),
            Op::Add { .. } => one(residual::forward(gpu, o(0), i(0), i(1))),
            Op::Dropout { n, p, site } => x.dropout(n, p, site),
            Op::CrossEntropy { n, v, vp } => x.cross_entropy(n, v, vp),
            Op::Mean { n } => reduce::sum(gpu, o(0), i(0), n, 1.0 / n as f32),
            Op::EmbeddingBackward { b, t, c } => x.embedding_backward(b, t, c),
            Op::LayerNormBackward { n, c, acc, bias } => x.layernorm_backward(n, c, acc, bias),
            Op::LinearBackward {
                m,
                k,
                n,
                acc,
                dx,
                dw,
                bias,
                gelu,
            } => x.linear_backward((m, k, n, bias), acc, (dx, dw), gelu),
            Op::AttentionBackward {
                b,
                t,
                nh,
                nkv,
                hs,
                p,
                site,
            } => x.attention_backward(attention::Dims { b, t, nh, nkv, hs }, p, site),
            Op::RmsNormBackward { n, c, acc } => x.rmsnorm_backward(rmsnorm::Dims { n, c }, acc),
            Op::RopeBackward { b, t, heads, d } => one(rope::backward_at(
                gpu,
                o(0),
                i(0),
                i(1),
                rope_dims(b, t, heads, d),
                self.step_view(),
            )),
            Op::PackQkvBackward {
                b,
                t,
                nh,
                nkv,
                hs,
                acc,
            } => x.pack_qkv_backward(qkv_pack::Dims { b, t, nh, nkv, hs }, acc),
            Op::GeluBackward { n, acc } => one(gelu::backward(gpu, o(0), i(1), i(0), n, acc)),
            Op::SwiGluBackward { n, acc } => x.swiglu_backward(n, acc),
            Op::Accumulate { acc, .. } => one(residual::accumulate(gpu, o(0), i(0), acc)),
            Op::ToBf16 { .. } => one(convert::to_bf16(gpu, o(0), i(0))),
            Op::FromBf16 { .. } => one(convert::from_bf16(gpu, o(0), i(0))),
            Op::DropoutBackward { n, p, site, acc } => x.dropout_backward(n, p, site, acc),
            Op::LmHeadLoss { n, c, v, vp, rows } => x.lm_head_loss(n, c, (v, vp), rows),
            Op::LmHeadLossBackward {
                n,
                c,
                v,
                vp,
                rows,
                acc,
                dw,
            } => x.lm_head_loss_backward(n, c, (v, vp), rows, (acc, dw)),
            Op::Lora { m, k, r, n, scale } => x.lora((m, k, r, n), scale),
            Op::LoraBackward {
                m,
                k,
                r,
                n,
                scale,
                acc,
            } => x.lora_backward((m, k, r, n), scale, acc),
            Op::CrossEntropyBackward { n, v, vp } => x.cross_entropy_backward(n, v, vp),
            Op::Fill { value } => self.lower_fill(node, value),
            Op::GlobalNorm => self.lower_global_norm(node),
            Op::AdamW { decay } => self.lower_adamw(node, decay),
        }
    }

    /// y (M, N) = x (M, K) · w (N, K)ᵀ (+ bias) with `epilogue` (inputs [x, w, bias?, ...],
    /// output [y, ...]).
    fn lower_fused_linear(
        &self,
        node: &Node,
        (m, k, n, bias): (usize, usize, usize, bool),
        epilogue: gemm::Epilogue,
    ) -> Result<Vec<Dispatch>> {
        let (x, w, y) = (
            self.view(node.inputs[0]),
            self.view(node.inputs[1]),
            self.view(node.outputs[0]),
        );
        let mm = gemm::Matmul {
            trans_b: true,
            epilogue,
            ..gemm::Matmul::new(m, n, k)
        };
        let bias = bias.then(|| self.view(node.inputs[2]));
        let (y, x, w) = (
            gemm::Operand::new(y, n),
            gemm::Operand::new(x, k),
            gemm::Operand::new(w, k),
        );
        gemm::matmul(self.gpu, &mm, y, x, w, bias, gemm::Variant::Tiled)
    }

    /// A linear layer's backward whose input is gelu(pre): d.pre (M, K) = (dy · w) ⊙ gelu'(pre)
    /// in one GEMM (inputs [dy, x, w, pre], outputs [d.pre, dw, dbias?]), then dw and dbias.
    fn lower_linear_backward_gelu(
        &self,
        node: &Node,
        (m, k, n, bias): (usize, usize, usize, bool),
        dw: bool,
    ) -> Result<Vec<Dispatch>> {
        let [dy, x, w, pre] = [0, 1, 2, 3].map(|j| self.view(node.inputs[j]));
        let out = |j: usize| self.view(node.outputs[j]);
        let mm = gemm::Matmul {
            epilogue: gemm::Epilogue::GeluBackward { pre },
            ..gemm::Matmul::new(m, k, n)
        };
        let (dpre, dy_op, w_op) = (
            gemm::Operand::new(out(0), k),
            gemm::Operand::new(dy, n),
            gemm::Operand::new(w, k),
        );
        let mut ds = gemm::matmul(self.gpu, &mm, dpre, dy_op, w_op, None, gemm::Variant::Tiled)?;
        if !dw {
            return Ok(ds);
        }
        let tensors = gemm::LinearBackwardTensors {
            dinp: None,
            dw: out(1),
            dbias: bias.then(|| out(2)),
            dout: dy,
            inp: x,
            w,
        };
        let dims = gemm::LinearDims { m, k, n };
        ds.extend(gemm::linear_backward(self.gpu, tensors, dims, false)?);
        Ok(ds)
    }

    /// The per-step uniform that dispatches reading lr, t, dropout counters or the decoding
    /// position bind.
    fn step_view(&self) -> &View {
        &self.step_uniform.view
    }

    /// Every chunk of the tensors `ids`, merged into spans of the store's flat buffers.
    pub(super) fn spans_of(&self, ids: &[TensorId]) -> Vec<View> {
        let all: Vec<&View> = ids.iter().flat_map(|&t| self.chunks(t)).collect();
        let align = self.gpu.limits.min_storage_buffer_offset_alignment as u64;
        store::spans(&all, align.max(4))
    }

    /// outputs = value: one fill per span (the whole of a flat buffer for the gradients).
    fn lower_fill(&self, node: &Node, value: f32) -> Result<Vec<Dispatch>> {
        let spans = self.spans_of(&node.outputs);
        spans
            .iter()
            .map(|v| reduce::fill(self.gpu, v, value))
            .collect()
    }

    /// norm = sqrt(Σ g²) over every input: one stage-1 dispatch per span, then one to finish.
    fn lower_global_norm(&self, node: &Node) -> Result<Vec<Dispatch>> {
        let grads = self.spans_of(&node.inputs);
        let lens: Vec<usize> = grads.iter().map(|g| g.len).collect();
        let partials = self.gpu.zeros(
            "grad_norm.partials",
            DType::F32,
            reduce::partials_len(self.gpu, &lens),
        )?;
        let grads: Vec<&View> = grads.iter().collect();
        let norm = self.view(node.outputs[0]);
        reduce::global_norm(self.gpu, norm, &partials, &grads)
    }

    /// One AdamW dispatch per span of the parameters (the gradients and moments share their
    /// layout, so their spans line up).
    fn lower_adamw(&self, node: &Node, decay: bool) -> Result<Vec<Dispatch>> {
        let k = node.inputs.len() - 1;
        let norm = self.view(node.inputs[k]);
        let grads = self.spans_of(&node.inputs[..k]);
        let [params, ms, vs] = [0, 1, 2].map(|j| self.spans_of(&node.outputs[j * k..(j + 1) * k]));
        let same = |a: &View, b: &View| a.offset == b.offset && a.len == b.len;
        let lined_up = [&grads, &ms, &vs]
            .iter()
            .all(|l| l.len() == params.len() && l.iter().zip(&params).all(|(a, b)| same(a, b)));
        if !lined_up {
            return Err(Error::invalid(
                "adamw",
                "parameters, gradients and moments are not laid out alike",
            ));
        }
        (0..params.len())
            .map(|j| {
                let tensors = adamw::Tensors {
                    param: &params[j],
                    grad: &grads[j],
                    m: &ms[j],
                    v: &vs[j],
                };
                // lr and t come from the per-step uniform.
                let (n, hyper, step) = (params[j].len, &self.opts.adamw, self.step_view());
                adamw::step_at(self.gpu, tensors, norm, n, hyper, decay, step)
            })
            .collect()
    }
}

/// One node being lowered to its dispatches, with its operands as views of GPU memory. Its
/// methods lower one op (or one op's variants) each, `Executor::node` choosing by op.
#[derive(Clone, Copy)]
struct Lowering<'s> {
    ex: &'s Executor<'s>,
    node: &'s Node,
}

impl<'s> Lowering<'s> {
    /// Input k (the first chunk of a split one).
    fn i(self, k: usize) -> &'s View {
        self.ex.view(self.node.inputs[k])
    }

    /// Output k (the first chunk of a split one).
    fn o(self, k: usize) -> &'s View {
        self.ex.view(self.node.outputs[k])
    }

    /// Every row chunk of input k.
    fn ic(self, k: usize) -> &'s [View] {
        self.ex.chunks(self.node.inputs[k])
    }

    /// Every row chunk of output k.
    fn oc(self, k: usize) -> &'s [View] {
        self.ex.chunks(self.node.outputs[k])
    }

    fn gpu(self) -> &'s Gpu {
        self.ex.gpu
    }

    /// Token rows plus position rows: one dispatch per row chunk of the token table.
    fn embedding(self, b: usize, t: usize, c: usize) -> Result<Vec<Dispatch>> {
        let (i, o) = (|k| self.i(k), |k| self.o(k));
        let dims = embedding::Dims { b, t, c };
        // A model without position rows (the Llama family) adds a zero table, declared f32: with
        // the token table in f16 (inference), its zeros in f16 serve instead (the kernel reads
        // both tables in one element type).
        let table = self.ic(1)[0].dtype;
        let zeros = match self.ex.graph.tensors[self.node.inputs[2]].kind {
            TensorKind::Constant(0) if i(2).dtype != table => {
                Some(self.gpu().zeros("no_positions", table, i(2).len)?)
            }
            _ => None,
        };
        let wpe = zeros.as_ref().unwrap_or(i(2));
        let mut row0 = 0;
        let mut out = Vec::new();
        for view in self.ic(1) {
            let wte = embedding::TableChunk { view, row0 };
            out.push(embedding::forward(self.gpu(), o(0), i(0), wte, wpe, dims)?);
            row0 += view.len / c;
        }
        Ok(out)
    }

    /// The embedding's backward: each row chunk of the token table's gradient gets its rows, the
    /// first chunk's dispatch also the position table's gradient.
    fn embedding_backward(self, b: usize, t: usize, c: usize) -> Result<Vec<Dispatch>> {
        let (i, o) = (|k| self.i(k), |k| self.o(k));
        let dims = embedding::Dims { b, t, c };
        let mut row0 = 0;
        let mut out = Vec::new();
        for (k, view) in self.oc(0).iter().enumerate() {
            let dwte = embedding::TableChunk { view, row0 };
            let dwpe = (k == 0 && self.node.outputs.len() > 1).then(|| o(1));
            out.extend(embedding::backward(
                self.gpu(),
                dwte,
                dwpe,
                i(0),
                i(1),
                i(2),
                dims,
            )?);
            row0 += view.len / c;
        }
        Ok(out)
    }

    fn layernorm(self, n: usize, c: usize) -> Result<Vec<Dispatch>> {
        let (i, o) = (|k| self.i(k), |k| self.o(k));
        let tensors = layernorm::ForwardTensors {
            out: o(0),
            mean: o(1),
            rstd: o(2),
            inp: i(0),
            weight: i(1),
            bias: i(2),
        };
        let d = layernorm::forward(self.gpu(), tensors, layernorm::Dims { n, c })?;
        Ok(vec![d])
    }

    /// The layer norm's backward; without a bias, its gradient goes to a scratch buffer.
    fn layernorm_backward(
        self,
        n: usize,
        c: usize,
        acc: bool,
        bias: bool,
    ) -> Result<Vec<Dispatch>> {
        let (i, o) = (|k| self.i(k), |k| self.o(k));
        let scratch;
        let dbias = if bias {
            o(2)
        } else {
            scratch = self.gpu().zeros("unused dbias", DType::F32, c)?;
            &scratch
        };
        let tensors = layernorm::BackwardTensors {
            dinp: o(0),
            dweight: o(1),
            dbias,
            dout: i(0),
            inp: i(1),
            weight: i(2),
            mean: i(3),
            rstd: i(4),
        };
        layernorm::backward(self.gpu(), tensors, layernorm::Dims { n, c }, acc)
    }

    /// y (M, N) = x (M, K) · w (N, K)ᵀ (+ bias).
    fn linear(self, m: usize, k: usize, n: usize, bias: bool) -> Result<Vec<Dispatch>> {
        let (i, o) = (|j| self.i(j), |j| self.o(j));
        if self.ic(1).len() == 1 {
            let dims = gemm::LinearDims { m, k, n };
            return gemm::linear_forward(self.gpu(), o(0), i(0), i(1), bias.then(|| i(2)), dims);
        }
        // A weight split into row chunks (the tied lm head): each chunk writes its block of
        // output columns.
        split_linear_forward(
            self.gpu(),
            gemm::Operand::new(o(0), n),
            gemm::Operand::new(i(0), k),
            self.ic(1),
            m,
            k,
        )
    }

    /// gelu(x · wᵀ + bias) in one GEMM, keeping the pre-activation (outputs [y, pre]).
    fn linear_gelu(self, dims: (usize, usize, usize, bool)) -> Result<Vec<Dispatch>> {
        let epilogue = gemm::Epilogue::Gelu { pre: self.o(1) };
        self.ex.lower_fused_linear(self.node, dims, epilogue)
    }

    /// res + x · wᵀ + bias in one GEMM, res being the last input.
    fn linear_residual(self, dims: (usize, usize, usize, bool)) -> Result<Vec<Dispatch>> {
        let res = self.i(self.node.inputs.len() - 1);
        let epilogue = gemm::Epilogue::Residual { res };
        self.ex.lower_fused_linear(self.node, dims, epilogue)
    }

    /// A linear layer's backward: over a split weight, fused with GELU's backward when its
    /// input is gelu(pre), or the plain one.
    fn linear_backward(
        self,
        (m, k, n, bias): (usize, usize, usize, bool),
        acc: bool,
        (dx, dw): (bool, bool),
        gelu: bool,
    ) -> Result<Vec<Dispatch>> {
        let (i, o) = (|j| self.i(j), |j| self.o(j));
        if self.ic(2).len() > 1 {
            let tensors = SplitLinearBackwardTensors {
                dx: dx.then(|| gemm::Operand::new(o(0), k)),
                dw: dw.then(|| self.oc(1)),
                dy: gemm::Operand::new(i(0), n),
                x: gemm::Operand::new(i(1), k),
                w: self.ic(2),
            };
            return split_linear_backward(self.gpu(), tensors, m, k, acc);
        }
        if gelu {
            return self
                .ex
                .lower_linear_backward_gelu(self.node, (m, k, n, bias), dw);
        }
        if !dw {
            // A frozen weight: dx (M, K) = dy (M, N) · w (N, K) alone.
            let mm = gemm::Matmul {
                accumulate: acc,
                ..gemm::Matmul::new(m, k, n)
            };
            let (dx, dy, w) = (
                gemm::Operand::new(o(0), k),
                gemm::Operand::new(i(0), n),
                gemm::Operand::new(i(2), k),
            );
            return gemm::matmul(self.gpu(), &mm, dx, dy, w, None, gemm::Variant::Tiled);
        }
        let tensors = gemm::LinearBackwardTensors {
            dinp: dx.then(|| o(0)),
            dw: o(1),
            dbias: bias.then(|| o(2)),
            dout: i(0),
            inp: i(1),
            w: i(2),
        };
        gemm::linear_backward(self.gpu(), tensors, gemm::LinearDims { m, k, n }, acc)
    }

    /// Causal self-attention over qkv (B, T, W) (W = 3C without grouped-query attention), with
    /// dropout on the probabilities at `site`.
    fn attention(self, dims: attention::Dims, p: f32, site: u32) -> Result<Vec<Dispatch>> {
        let (i, o) = (|k| self.i(k), |k| self.o(k));
        let opts = attention_options(self.ex.opts.seed, p, site);
        attention::forward_at(
            self.gpu(),
            o(0),
            o(1),
            i(0),
            dims,
            opts,
            self.ex.step_view(),
        )
    }

    fn attention_backward(self, dims: attention::Dims, p: f32, site: u32) -> Result<Vec<Dispatch>> {
        let (i, o) = (|k| self.i(k), |k| self.o(k));
        let tensors = attention::BackwardTensors {
            dqkv: o(0),
            dout: i(0),
            qkv: i(1),
            out: i(2),
            lse: i(3),
        };
        let opts = attention_options(self.ex.opts.seed, p, site);
        attention::backward_at(self.gpu(), tensors, dims, opts, self.ex.step_view())
    }

    /// Attention of the Tq = `dims.t` new tokens over a KV cache of `tmax` positions.
    fn attention_cached(self, dims: attention::Dims, tmax: usize) -> Result<Vec<Dispatch>> {
        let (i, o) = (|k| self.i(k), |k| self.o(k));
        let cache = attention::KvCache {
            k: i(1),
            v: i(2),
            tmax,
        };
        let step = self.ex.step_view();
        let d = attention::forward_cached_at(self.gpu(), o(0), i(0), cache, dims, step)?;
        Ok(vec![d])
    }

    /// Appends the keys and values of the Tq = `dims.t` new tokens to the KV cache.
    fn kv_append(self, dims: attention::Dims, tmax: usize) -> Result<Vec<Dispatch>> {
        let (i, o) = (|k| self.i(k), |k| self.o(k));
        let cache = attention::KvCache {
            k: o(0),
            v: o(1),
            tmax,
        };
        let d = attention::kv_append_at(self.gpu(), cache, i(0), dims, self.ex.step_view())?;
        Ok(vec![d])
    }

    /// RMSNorm: [x, weight] → [y, rstd].
    fn rmsnorm(self, dims: rmsnorm::Dims, eps: f32) -> Result<Vec<Dispatch>> {
        let (i, o) = (|k| self.i(k), |k| self.o(k));
        let tensors = rmsnorm::ForwardTensors {
            out: o(0),
            rstd: o(1),
            inp: i(0),
            weight: i(1),
        };
        Ok(vec![rmsnorm::forward(self.gpu(), tensors, dims, eps)?])
    }

    /// RMSNorm's backward: [dy, x, weight, rstd] → [dx (acc), dweight +=].
    fn rmsnorm_backward(self, dims: rmsnorm::Dims, acc: bool) -> Result<Vec<Dispatch>> {
        let (i, o) = (|k| self.i(k), |k| self.o(k));
        let tensors = rmsnorm::BackwardTensors {
            dinp: o(0),
            dweight: o(1),
            dout: i(0),
            inp: i(1),
            weight: i(2),
            rstd: i(3),
        };
        rmsnorm::backward(self.gpu(), tensors, dims, acc)
    }

    /// The packed operand's backward: [dqkv] → [dq, dk, dv].
    fn pack_qkv_backward(self, dims: qkv_pack::Dims, acc: bool) -> Result<Vec<Dispatch>> {
        let o = |k| self.o(k);
        let tensors = qkv_pack::BackwardTensors {
            dq: o(0),
            dk: o(1),
            dv: o(2),
            dqkv: self.i(0),
        };
        qkv_pack::backward(self.gpu(), tensors, dims, acc)
    }

    /// The gated MLP's backward: [dy, gate, up] → [dgate, dup].
    fn swiglu_backward(self, n: usize, acc: bool) -> Result<Vec<Dispatch>> {
        let tensors = swiglu::BackwardTensors {
            dgate: self.o(0),
            dup: self.o(1),
            gate: self.i(1),
            up: self.i(2),
            dout: self.i(0),
        };
        Ok(vec![swiglu::backward(self.gpu(), tensors, n, acc)?])
    }

    fn dropout(self, n: usize, p: f32, site: u32) -> Result<Vec<Dispatch>> {
        let seed = dropout_seed(self.ex.opts.seed, site);
        let d = dropout::Dropout { p, seed, step: 0 };
        let d = dropout::forward_at(self.gpu(), self.o(0), self.i(0), n, d, self.ex.step_view())?;
        Ok(vec![d])
    }

    fn dropout_backward(self, n: usize, p: f32, site: u32, acc: bool) -> Result<Vec<Dispatch>> {
        let seed = dropout_seed(self.ex.opts.seed, site);
        let d = dropout::Dropout { p, seed, step: 0 };
        let step = self.ex.step_view();
        let d = dropout::backward_at(self.gpu(), self.o(0), self.i(0), n, d, acc, step)?;
        Ok(vec![d])
    }

    fn cross_entropy(self, n: usize, v: usize, vp: usize) -> Result<Vec<Dispatch>> {
        let (i, o) = (|k| self.i(k), |k| self.o(k));
        let dims = cross_entropy::Dims { n, v, vp };
        let d = cross_entropy::forward(self.gpu(), o(0), o(1), i(0), i(1), dims)?;
        Ok(vec![d])
    }

    /// The loss's gradient, each position's scaled by 1 / (positions of the whole step).
    fn cross_entropy_backward(self, n: usize, v: usize, vp: usize) -> Result<Vec<Dispatch>> {
        let i = |k| self.i(k);
        let dloss = 1.0 / (n * self.ex.micro_per_step()) as f32;
        let dims = cross_entropy::Dims { n, v, vp };
        let d = cross_entropy::backward(self.gpu(), i(0), i(1), i(2), dims, dloss)?;
        Ok(vec![d])
    }

    /// The lm head and the loss in chunks of `rows` positions, each chunk's logits computed into
    /// the one chunk buffer and reduced to its losses.
    fn lm_head_loss(
        self,
        n: usize,
        c: usize,
        (v, vp): (usize, usize),
        rows: usize,
    ) -> Result<Vec<Dispatch>> {
        let (gpu, i, o) = (self.gpu(), |k| self.i(k), |k| self.o(k));
        let mut out = Vec::new();
        for r0 in (0..n).step_by(rows) {
            let m = rows.min(n - r0);
            let logits = o(2).slice(0, m * vp, "lm_head.logits chunk")?;
            out.extend(split_linear_forward(
                gpu,
                gemm::Operand::new(&logits, vp),
                gemm::Operand::new(i(0), c).at(r0 * c),
                self.ic(1),
                m,
                c,
            )?);
            out.push(cross_entropy::forward(
                gpu,
                &o(0).slice(r0, m, "losses chunk")?,
                &o(1).slice(r0, m, "lse chunk")?,
                &logits,
                &i(2).slice(r0, m, "targets chunk")?,
                cross_entropy::Dims { n: m, v, vp },
            )?);
        }
        Ok(out)
    }

    /// The chunked lm head and loss backward: each chunk's logits recomputed, turned into their
    /// gradient, and taken back through the lm head.
    fn lm_head_loss_backward(
        self,
        n: usize,
        c: usize,
        (v, vp): (usize, usize),
        rows: usize,
        (acc, dw): (bool, bool),
    ) -> Result<Vec<Dispatch>> {
        let (gpu, i, o) = (self.gpu(), |k| self.i(k), |k| self.o(k));
        let dloss = 1.0 / (n * self.ex.micro_per_step()) as f32;
        // Outputs [dx, dwte, logits], or [dx, logits] for a frozen wte.
        let (x, wte, dwte) = (i(0), self.ic(1), dw.then(|| self.oc(1)));
        let chunk = o(if dw { 2 } else { 1 });
        let mut out = Vec::new();
        for r0 in (0..n).step_by(rows) {
            let m = rows.min(n - r0);
            let logits = chunk.slice(0, m * vp, "lm_head.logits chunk")?;
            let xs = gemm::Operand::new(x, c).at(r0 * c);
            out.extend(split_linear_forward(
                gpu,
                gemm::Operand::new(&logits, vp),
                xs,
                wte,
                m,
                c,
            )?);
            out.push(cross_entropy::backward(
                gpu,
                &logits,
                &i(3).slice(r0, m, "lse chunk")?,
                &i(2).slice(r0, m, "targets chunk")?,
                cross_entropy::Dims { n: m, v, vp },
                dloss,
            )?);
            let tensors = SplitLinearBackwardTensors {
                dx: Some(gemm::Operand::new(o(0), c).at(r0 * c)),
                dw: dwte,
                dy: gemm::Operand::new(&logits, vp),
                x: xs,
                w: wte,
            };
            out.extend(split_linear_backward(gpu, tensors, m, c, acc)?);
        }
        Ok(out)
    }

    /// A LoRA adapter's forward: u (M, R) = x (M, K) · a (R, K)ᵀ, then y (M, N) = base +
    /// scale · u · b (N, R)ᵀ, the base added in the second GEMM's epilogue.
    fn lora(self, (m, k, r, n): (usize, usize, usize, usize), scale: f32) -> Result<Vec<Dispatch>> {
        let (gpu, i, o) = (self.gpu(), |j| self.i(j), |j| self.o(j));
        let op = gemm::Operand::new;
        let down = gemm::Matmul {
            trans_b: true,
            ..gemm::Matmul::new(m, r, k)
        };
        let mut out = tuned(gpu, &down, (op(o(1), r), op(i(0), k), op(i(1), k)))?;
        let up = gemm::Matmul {
            trans_b: true,
            alpha: scale,
            epilogue: gemm::Epilogue::Residual { res: i(3) },
            ..gemm::Matmul::new(m, n, r)
        };
        out.extend(tuned(gpu, &up, (op(o(0), n), op(o(1), r), op(i(2), r)))?);
        Ok(out)
    }

    /// A LoRA adapter's backward (inputs [dy, x, a, b, u], outputs [dx, da, db, du]):
    /// db (N, R) += scale · dyᵀ · u; du (M, R) = scale · dy · b; da (R, K) += duᵀ · x;
    /// dx (M, K) = du · a, or += with `acc`.
    fn lora_backward(
        self,
        (m, k, r, n): (usize, usize, usize, usize),
        scale: f32,
        acc: bool,
    ) -> Result<Vec<Dispatch>> {
        let (gpu, i, o) = (self.gpu(), |j| self.i(j), |j| self.o(j));
        let op = gemm::Operand::new;
        let (dy, x, a, b, u) = (
            op(i(0), n),
            op(i(1), k),
            op(i(2), k),
            op(i(3), r),
            op(i(4), r),
        );
        let du = || op(o(3), r);
        let db_mm = gemm::Matmul {
            trans_a: true,
            alpha: scale,
            accumulate: true,
            ..gemm::Matmul::new(n, r, m)
        };
        let mut out = tuned(gpu, &db_mm, (op(o(2), r), dy, u))?;
        let du_mm = gemm::Matmul {
            alpha: scale,
            ..gemm::Matmul::new(m, r, n)
        };
        out.extend(tuned(gpu, &du_mm, (du(), dy, b))?);
        let da_mm = gemm::Matmul {
            trans_a: true,
            accumulate: true,
            ..gemm::Matmul::new(r, k, m)
        };
        out.extend(tuned(gpu, &da_mm, (op(o(1), k), du(), x))?);
        let dx_mm = gemm::Matmul {
            accumulate: acc,
            ..gemm::Matmul::new(m, k, r)
        };
        out.extend(tuned(gpu, &dx_mm, (op(o(0), k), du(), a))?);
        Ok(out)
    }
}

/// c = a · b as `mm` describes (no bias), with the variant the tuner chose for the problem.
fn tuned(
    gpu: &Gpu,
    mm: &gemm::Matmul,
    (c, a, b): (gemm::Operand, gemm::Operand, gemm::Operand),
) -> Result<Vec<Dispatch>> {
    gemm::matmul(gpu, mm, c, a, b, None, gemm::Variant::Tiled)
}

/// The attention shape of a decoding op: Tq new tokens, NH query and NKV key/value heads.
fn decoding(b: usize, tq: usize, (nh, nkv): (usize, usize), hs: usize) -> attention::Dims {
    attention::Dims {
        b,
        t: tq,
        nh,
        nkv,
        hs,
    }
}

/// A rotary embedding over every head of (B, T, H, D).
fn rope_dims(b: usize, t: usize, heads: usize, d: usize) -> rope::Dims {
    rope::Dims {
        b,
        t,
        heads,
        rotated: heads,
        d,
    }
}

/// The seed of one dropout site's random stream.
pub(super) fn dropout_seed(seed: u32, site: u32) -> u32 {
    seed ^ site.wrapping_mul(0x9E37_79B9)
}

/// An attention node's options: causal, with dropout (its counter read from the per-step uniform),
/// or none for p = 0.
fn attention_options(seed: u32, p: f32, site: u32) -> attention::Options {
    attention::Options {
        dropout: (p > 0.0).then(|| attention::Dropout {
            p,
            seed: dropout_seed(seed, site),
            step: 0,
        }),
        ..attention::Options::CAUSAL
    }
}
