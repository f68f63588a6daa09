//! The Llama family's forward graph (Llama, Mistral, Qwen2, Qwen3, SmolLM2) from its
//! architecture description, on GPT-2's builder: the same linear layers, attention, fused
//! residual projections, loss and training extension, with RMSNorm, rotary q and k, grouped-query
//! attention (each key/value head held once, in the operand and in the KV cache) and the gated
//! SiLU MLP in place of GPT-2's parts.
//!
//! A decoder layer, as transformers' LlamaDecoderLayer computes it:
//!   h = x + o_proj(attention(rope(norm_q(q_proj(n))), rope(norm_k(k_proj(n))), v_proj(n))),
//!       n = input_layernorm(x), norm_q and norm_k Qwen3's per-head RMSNorms (else none)
//!   out = h + down_proj(silu(gate_proj(m)) · up_proj(m)), m = post_attention_layernorm(h)

use super::arch::{Arch, Norm, Positions};
use super::gpt::{Builder, FWD, GptGraph, Mode, Setup, logits_chunk_rows};
use super::llama_params::{LlamaBlock, LlamaParams};
use super::lora::LoraPlan;
use crate::error::{Error, Result};
use crate::gpu::DType;
use crate::graph::ir::{Input, Op, TensorId, TensorKind};

/// Builds the model `arch` with parameters `table` for batches of `b` sequences of `t` tokens.
/// Decoding (`Mode::Decode`) keeps the keys and values of the NKV key/value heads in the KV cache,
/// and rotates q and k at the positions set per call.
pub fn build(arch: &Arch, table: &LlamaParams, b: usize, t: usize, mode: Mode) -> Result<GptGraph> {
    build_for(arch, table, (b, t), mode, u64::MAX)
}

/// `build` for a device whose storage bindings hold at most `max_binding` bytes: in Train and
/// Eval modes, logits (B·T, V) larger than that are computed with their loss in row chunks, as
/// GPT-2's are (`gpt::build_for`).
pub fn build_for(
    arch: &Arch,
    table: &LlamaParams,
    (b, t): (usize, usize),
    mode: Mode,
    max_binding: u64,
) -> Result<GptGraph> {
    build_adapted(arch, table, None, (b, t), mode, max_binding)
}

/// `build_for` with a LoRA adapter on the linear layers it targets (`gpt::build_adapted`).
pub fn build_adapted(
    arch: &Arch,
    table: &LlamaParams,
    lora: Option<&LoraPlan>,
    (b, t): (usize, usize),
    mode: Mode,
    max_binding: u64,
) -> Result<GptGraph> {
    let (Norm::RmsNorm { eps }, Positions::Rotary(rope)) = (arch.norm, arch.positions) else {
        return Err(Error::invalid(
            "llama graph",
            "the description is not RMSNorm with rotary positions",
        ));
    };
    if t > arch.context {
        return Err(Error::invalid(
            "llama graph",
            format!("T = {t} is past the context of {} positions", arch.context),
        ));
    }
    let setup = Setup {
        c: arch.hidden,
        nh: arch.n_head,
        nkv: arch.n_kv_head,
        hs: arch.head_dim,
        v: arch.vocab,
        vp: arch.vocab,
        dropout: arch.dropout,
        zero_bias: false,
    };
    let specs = lora.map_or(&table.specs[..], |p| &p.specs[..]);
    let mut m = Llama {
        m: Builder::with(specs, setup, b, t, mode),
        inner: arch.intermediate(),
        eps: eps as f32,
        qk_norm: arch.qk_norm,
        inv_freq: 0,
    };
    if let Some(plan) = lora {
        m.m.adapt(plan);
    }
    m.inv_freq = m.m.g.table("rope.inv_freq", rope.inv_freq(arch.head_dim));
    let (tokens, x) = m.embed(table.embed);
    let mut x = m.m.dropout(x, "embed".into());
    for (l, bp) in table.blocks.iter().enumerate() {
        let first = m.m.g.nodes.len();
        x = m.block(l, bp, x);
        m.m.g.blocks.push(first..m.m.g.nodes.len());
    }
    let xf = m.rmsnorm(x, table.norm, (m.m.bt, m.m.c), "model.norm".into());
    let head = table.lm_head.unwrap_or(table.embed);
    let chunk_rows = match mode {
        Mode::Train | Mode::Eval => logits_chunk_rows(m.m.bt, arch.vocab, max_binding),
        Mode::Logits | Mode::Decode { .. } => None,
    };
    let logits = m.m.lm_head(xf, head, chunk_rows);
    let with_loss = match mode {
        Mode::Train | Mode::Eval => true,
        Mode::Logits => false,
        Mode::Decode { loss, .. } => loss,
    };
    let loss = with_loss.then(|| m.m.loss(xf, head, logits, chunk_rows));
    Ok(m.m.finish((tokens, logits, loss), mode, |i| specs[i].decay))
}

/// The Llama graph under construction: GPT-2's builder and what the family adds.
struct Llama {
    m: Builder,
    inner: usize,
    eps: f32,
    qk_norm: bool,
    /// RoPE's inverse frequencies (HS/2), shared by every layer.
    inv_freq: TensorId,
}

impl Llama {
    /// The tokens input (B, T) and their embedding rows (B, T, C): no position rows (the
    /// embedding op adds a zero table).
    fn embed(&mut self, embed: usize) -> (TensorId, TensorId) {
        let (b, t, c) = (self.m.b, self.m.t, self.m.c);
        let g = &mut self.m.g;
        let tokens = g.tensor(
            "tokens",
            &[b, t],
            DType::U32,
            TensorKind::Input(Input::Tokens),
        );
        let zeros = g.tensor("no_positions", &[t, c], DType::F32, TensorKind::Constant(0));
        let x = g.activation("embed", &[b, t, c]);
        let ins = vec![tokens, self.m.params[embed], zeros];
        g.push(FWD, "embed", Op::Embedding { b, t, c }, ins, vec![x]);
        (tokens, x)
    }

    /// One decoder layer: x + attn(input_layernorm(x)), then that + mlp(post_norm(that)).
    fn block(&mut self, l: usize, bp: &LlamaBlock, x: TensorId) -> TensorId {
        let (bt, c) = (self.m.bt, self.m.c);
        let p = format!("model.layers.{l}");
        let n = self.rmsnorm(x, bp.input_norm, (bt, c), format!("{p}.input_layernorm"));
        let qkv = self.qkv(l, bp, n);
        let att = self.m.attention(l, qkv);
        let o = self.m.weights((bp.o, bp.o_b));
        let sum = format!("{p}.res_1");
        let h = self
            .m
            .project_residual(att, o, x, format!("{p}.self_attn.o_proj"), sum);
        let n2 = self.rmsnorm(
            h,
            bp.post_norm,
            (bt, c),
            format!("{p}.post_attention_layernorm"),
        );
        let act = self.gated_mlp(bp, n2, &p);
        let down = self.m.weights((bp.down, bp.down_b));
        let (proj, sum) = (format!("{p}.mlp.down_proj"), format!("{p}.res_2"));
        self.m.project_residual(act, down, h, proj, sum)
    }

    /// q, k and v of the normed input n, q and k normed per head (Qwen3) and rotated, packed
    /// into the attention's (B, T, (NH + 2·NKV)·HS) operand.
    fn qkv(&mut self, l: usize, bp: &LlamaBlock, n: TensorId) -> TensorId {
        let (b, t, bt, nh, nkv, hs) = (
            self.m.b, self.m.t, self.m.bt, self.m.nh, self.m.nkv, self.m.hs,
        );
        let a = format!("model.layers.{l}.self_attn");
        let q = self.m.weights((bp.q, bp.q_b));
        let q = self.m.linear(n, q, nh * hs, format!("{a}.q_proj"));
        let k = self.m.weights((bp.k, bp.k_b));
        let k = self.m.linear(n, k, nkv * hs, format!("{a}.k_proj"));
        let v = self.m.weights((bp.v, bp.v_b));
        let v = self.m.linear(n, v, nkv * hs, format!("{a}.v_proj"));
        let (q, k) = match (bp.q_norm, bp.k_norm) {
            (Some(qn), Some(kn)) if self.qk_norm => (
                self.rmsnorm(q, qn, (bt * nh, hs), format!("{a}.q_norm")),
                self.rmsnorm(k, kn, (bt * nkv, hs), format!("{a}.k_norm")),
            ),
            _ => (q, k),
        };
        let q = self.rope(q, nh, format!("{a}.q_rope"));
        let k = self.rope(k, nkv, format!("{a}.k_rope"));
        let g = &mut self.m.g;
        let qkv = g.activation(format!("{a}.qkv"), &[b, t, (nh + 2 * nkv) * hs]);
        let op = Op::PackQkv { b, t, nh, nkv, hs };
        g.push(FWD, format!("{a}.qkv"), op, vec![q, k, v], vec![qkv]);
        qkv
    }

    /// silu(gate_proj(x)) · up_proj(x), (BT, intermediate).
    fn gated_mlp(&mut self, bp: &LlamaBlock, x: TensorId, p: &str) -> TensorId {
        let (bt, inner) = (self.m.bt, self.inner);
        let gate = self.m.weights((bp.gate, bp.gate_b));
        let gate = self.m.linear(x, gate, inner, format!("{p}.mlp.gate_proj"));
        let up = self.m.weights((bp.up, bp.up_b));
        let up = self.m.linear(x, up, inner, format!("{p}.mlp.up_proj"));
        let g = &mut self.m.g;
        let y = g.activation(format!("{p}.mlp.act"), &[bt, inner]);
        let op = Op::SwiGlu { n: bt * inner };
        g.push(FWD, format!("{p}.mlp.act"), op, vec![gate, up], vec![y]);
        y
    }

    /// RMSNorm of x as `rows` rows of `c` channels with weight parameter `w`, keeping rstd.
    fn rmsnorm(
        &mut self,
        x: TensorId,
        w: usize,
        (rows, c): (usize, usize),
        name: String,
    ) -> TensorId {
        let w = self.m.params[w];
        let g = &mut self.m.g;
        let shape = g.tensors[x].shape.clone();
        let y = g.activation(name.clone(), &shape);
        let rstd = g.activation(format!("{name}.rstd"), &[rows]);
        let op = Op::RmsNorm {
            n: rows,
            c,
            eps: self.eps,
        };
        g.push(FWD, name, op, vec![x, w], vec![y, rstd]);
        y
    }

    /// x (B, T, heads, HS) rotated, token t at position t (pos0 + t when decoding, pos0 set per
    /// call).
    fn rope(&mut self, x: TensorId, heads: usize, name: String) -> TensorId {
        let (b, t, d) = (self.m.b, self.m.t, self.m.hs);
        let g = &mut self.m.g;
        let y = g.activation(name.clone(), &[b * t, heads * d]);
        let op = Op::Rope { b, t, heads, d };
        g.push(FWD, name, op, vec![x, self.inv_freq], vec![y]);
        y
    }
}
