//! The GPT-2 forward graph, readable in one sitting, and its training extension.

use super::config::GptConfig;
use super::params::ParamTable;
use crate::gpu::DType;
use crate::graph::autodiff::{self, Backward};
use crate::graph::ir::{Graph, Op, Phase, TensorId, TensorKind};

/// What the graph computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Forward, backward and AdamW, with dropout.
    Train,
    /// Forward to the mean loss, no dropout.
    Eval,
    /// Forward to the logits only.
    Logits,
    /// Incremental decoding: `t` new tokens per sequence at a position set per call, attending
    /// to a KV cache of `tmax` positions; with `loss`, also the per-position losses against
    /// targets (scoring).
    Decode { tmax: usize, loss: bool },
}

/// A built graph and the tensors callers need by role.
#[derive(Clone, Debug)]
pub struct GptGraph {
    pub graph: Graph,
    pub b: usize,
    pub t: usize,
    pub tokens: TensorId,
    pub targets: Option<TensorId>,
    pub logits: TensorId,
    /// Per-position losses (B·T), when the graph has a loss.
    pub losses: Option<TensorId>,
    pub loss: Option<TensorId>,
    pub backward: Option<Backward>,
    pub grad_norm: Option<TensorId>,
    /// The graph tensor of parameter i.
    pub params: Vec<TensorId>,
}

/// The dropout site of layer l's attention probabilities is ATTENTION_SITES + l.
const ATTENTION_SITES: u32 = 1 << 16;

/// Builds GPT-2 for batches of `b` sequences of `t` tokens, with no limit on a binding's size.
pub fn build(cfg: &GptConfig, table: &ParamTable, b: usize, t: usize, mode: Mode) -> GptGraph {
    build_for(cfg, table, b, t, mode, u64::MAX)
}

/// Rows per chunk of the lm head and loss when the logits (`n`, `vp`) would exceed `max_binding`
/// bytes: the most that fit, in multiples of 64 (so chunk offsets into the per-row tensors stay
/// aligned for binding); None when the whole logits fit.
pub fn logits_chunk_rows(n: usize, vp: usize, max_binding: u64) -> Option<usize> {
    let row = vp as u64 * 4;
    if n as u64 * row <= max_binding {
        return None;
    }
    Some(((max_binding / row) as usize / 64 * 64).max(64))
}

/// `build` for a device whose storage bindings hold at most `max_binding` bytes: in Train and
/// Eval modes, logits (B·T, Vp) larger than that are computed with their loss in row chunks
/// (`Op::LmHeadLoss`, whose backward recomputes each chunk), so that no binding holds them whole;
/// `logits` is then the chunk buffer.
pub fn build_for(
    cfg: &GptConfig,
    table: &ParamTable,
    b: usize,
    t: usize,
    mode: Mode,
    max_binding: u64,
) -> GptGraph {
    let mut g = Graph::default();
    let (c, nh, hs) = (cfg.n_embd, cfg.n_head, cfg.head_size());
    let (v, vp, bt) = (cfg.vocab_size, cfg.padded_vocab(), b * t);
    let decode = match mode {
        Mode::Decode { tmax, .. } => Some(tmax),
        _ => None,
    };
    let p = if mode == Mode::Train {
        cfg.dropout
    } else {
        0.0
    };
    let params: Vec<TensorId> = table
        .specs
        .iter()
        .enumerate()
        .map(|(i, s)| g.tensor(s.name.clone(), &s.shape, DType::F32, TensorKind::Param(i)))
        .collect();
    let zero_bias =
        (!cfg.bias).then(|| g.tensor("zero_bias", &[c], DType::F32, TensorKind::Constant(0)));
    let bias_or_zero = |i: Option<usize>| i.map(|i| params[i]).or(zero_bias).unwrap();
    let fwd = Phase::Forward;

    let tokens = g.tensor("tokens", &[b, t], DType::U32, TensorKind::Input);
    // Decoding adds the position rows of the current positions, gathered into a window.
    let positions = match decode {
        Some(_) => g.tensor(
            "wpe.window",
            &[t, c],
            DType::F32,
            TensorKind::PositionWindow(table.wpe),
        ),
        None => params[table.wpe],
    };
    let mut x = g.activation("embed", &[b, t, c]);
    g.push(
        fwd,
        "embed",
        Op::Embedding { b, t, c },
        vec![tokens, params[table.wte], positions],
        vec![x],
    );
    let mut site = 0u32;
    let mut dropout = |g: &mut Graph, x: TensorId, label: String| -> TensorId {
        if p == 0.0 {
            return x;
        }
        site += 1;
        let (shape, n) = (g.tensors[x].shape.clone(), g.tensors[x].numel());
        let y = g.activation(format!("{label}.drop"), &shape);
        g.push(fwd, label, Op::Dropout { n, p, site }, vec![x], vec![y]);
        y
    };
    let layernorm = |g: &mut Graph, x: TensorId, w: TensorId, bias: TensorId, name: String| {
        let y = g.activation(name.clone(), &[bt, c]);
        let mean = g.activation(format!("{name}.mean"), &[bt]);
        let rstd = g.activation(format!("{name}.rstd"), &[bt]);
        g.push(
            fwd,
            name,
            Op::LayerNorm { n: bt, c },
            vec![x, w, bias],
            vec![y, mean, rstd],
        );
        y
    };
    let linear = |g: &mut Graph,
                  x: TensorId,
                  w: TensorId,
                  bias: Option<TensorId>,
                  n: usize,
                  name: String| {
        let y = g.activation(name.clone(), &[bt, n]);
        let k = g.tensors[x].numel() / bt;
        let mut ins = vec![x, w];
        ins.extend(bias);
        g.push(
            fwd,
            name,
            Op::Linear {
                m: bt,
                k,
                n,
                bias: bias.is_some(),
            },
            ins,
            vec![y],
        );
        y
    };

    // Training fuses the MLP's GELU into its first GEMM and, without dropout, the residual adds
    // into the projections' GEMMs (their epilogues: f32 weights only, so inference, which may
    // hold f16 weights, keeps the separate ops).
    let fuse = mode == Mode::Train;
    // y (BT, N) = gelu(x · wᵀ + bias), keeping the pre-activation for the backward.
    let linear_gelu =
        |g: &mut Graph, x: TensorId, (w, bias): (TensorId, Option<TensorId>), name: String| {
            let (k, n) = (g.tensors[x].numel() / bt, g.tensors[w].shape[0]);
            let y = g.activation(format!("{name}.gelu"), &[bt, n]);
            let pre = g.activation(format!("{name}.pre"), &[bt, n]);
            let mut ins = vec![x, w];
            ins.extend(bias);
            let bias = bias.is_some();
            g.push(
                fwd,
                name,
                Op::LinearGelu { m: bt, k, n, bias },
                ins,
                vec![y, pre],
            );
            y
        };
    // res + x · wᵀ + bias, the new residual stream (B, T, C).
    let linear_residual = |g: &mut Graph,
                           x: TensorId,
                           (w, bias): (TensorId, Option<TensorId>),
                           res: TensorId,
                           name: String| {
        let (k, n) = (g.tensors[x].numel() / bt, g.tensors[w].shape[0]);
        let y = g.activation(name.clone(), &[b, t, n]);
        let mut ins = vec![x, w];
        ins.extend(bias);
        ins.push(res);
        let bias = bias.is_some();
        g.push(
            fwd,
            name,
            Op::LinearResidual { m: bt, k, n, bias },
            ins,
            vec![y],
        );
        y
    };

    x = dropout(&mut g, x, "embed".into());
    for (l, bp) in table.blocks.iter().enumerate() {
        let h = format!("h.{l}");
        let ln1 = layernorm(
            &mut g,
            x,
            params[bp.ln_1_w],
            bias_or_zero(bp.ln_1_b),
            format!("{h}.ln_1"),
        );
        let qkv = linear(
            &mut g,
            ln1,
            params[bp.c_attn_w],
            bp.c_attn_b.map(|i| params[i]),
            3 * c,
            format!("{h}.attn.c_attn"),
        );
        let att = g.activation(format!("{h}.attn"), &[b, t, c]);
        if let Some(tmax) = decode {
            let cache = |g: &mut Graph, value: bool| {
                let name = format!("{h}.attn.{}_cache", if value { "v" } else { "k" });
                let kind = TensorKind::KvCache { layer: l, value };
                g.tensor(name, &[b, nh, tmax, hs], DType::F32, kind)
            };
            let (kc, vc) = (cache(&mut g, false), cache(&mut g, true));
            let (tq, attn) = (t, format!("{h}.attn"));
            g.push(
                fwd,
                format!("{attn}.kv_append"),
                Op::KvAppend {
                    b,
                    tq,
                    nh,
                    hs,
                    tmax,
                },
                vec![qkv],
                vec![kc, vc],
            );
            g.push(
                fwd,
                attn,
                Op::AttentionCached {
                    b,
                    tq,
                    nh,
                    hs,
                    tmax,
                },
                vec![qkv, kc, vc],
                vec![att],
            );
        } else {
            let lse = g.activation(format!("{h}.attn.lse"), &[b, nh, t]);
            g.push(
                fwd,
                format!("{h}.attn"),
                Op::Attention {
                    b,
                    t,
                    nh,
                    hs,
                    p,
                    // Streams apart from the residual dropouts' sites (1, 2, 3, ...).
                    site: ATTENTION_SITES + l as u32,
                },
                vec![qkv],
                vec![att, lse],
            );
        }
        let proj = (params[bp.attn_proj_w], bp.attn_proj_b.map(|i| params[i]));
        let x1 = if fuse && p == 0.0 {
            linear_residual(&mut g, att, proj, x, format!("{h}.res_1"))
        } else {
            let name = format!("{h}.attn.c_proj");
            let y = linear(&mut g, att, proj.0, proj.1, c, name.clone());
            let y = dropout(&mut g, y, name);
            let x1 = g.activation(format!("{h}.res_1"), &[b, t, c]);
            g.push(
                fwd,
                format!("{h}.res_1"),
                Op::Add { n: bt * c },
                vec![x, y],
                vec![x1],
            );
            x1
        };
        let ln2 = layernorm(
            &mut g,
            x1,
            params[bp.ln_2_w],
            bias_or_zero(bp.ln_2_b),
            format!("{h}.ln_2"),
        );
        let fc = (params[bp.c_fc_w], bp.c_fc_b.map(|i| params[i]));
        let gelu = if fuse {
            linear_gelu(&mut g, ln2, fc, format!("{h}.mlp.c_fc"))
        } else {
            let pre = linear(&mut g, ln2, fc.0, fc.1, 4 * c, format!("{h}.mlp.c_fc"));
            let gelu = g.activation(format!("{h}.mlp.gelu"), &[bt, 4 * c]);
            g.push(
                fwd,
                format!("{h}.mlp.gelu"),
                Op::Gelu { n: bt * 4 * c },
                vec![pre],
                vec![gelu],
            );
            gelu
        };
        let proj = (params[bp.mlp_proj_w], bp.mlp_proj_b.map(|i| params[i]));
        let x2 = if fuse && p == 0.0 {
            linear_residual(&mut g, gelu, proj, x1, format!("{h}.res_2"))
        } else {
            let name = format!("{h}.mlp.c_proj");
            let y = linear(&mut g, gelu, proj.0, proj.1, c, name.clone());
            let y = dropout(&mut g, y, name);
            let x2 = g.activation(format!("{h}.res_2"), &[b, t, c]);
            g.push(
                fwd,
                format!("{h}.res_2"),
                Op::Add { n: bt * c },
                vec![x1, y],
                vec![x2],
            );
            x2
        };
        x = x2;
    }
    let lnf = layernorm(
        &mut g,
        x,
        params[table.ln_f_w],
        bias_or_zero(table.ln_f_b),
        "ln_f".into(),
    );
    // The lm head shares the token embedding (tied weights).
    let chunk_rows = match mode {
        Mode::Train | Mode::Eval => logits_chunk_rows(bt, vp, max_binding),
        Mode::Logits | Mode::Decode { .. } => None,
    };
    let logits = match chunk_rows {
        Some(rows) => g.activation("lm_head", &[rows, vp]),
        None => linear(&mut g, lnf, params[table.wte], None, vp, "lm_head".into()),
    };

    let mut out = GptGraph {
        graph: Graph::default(),
        b,
        t,
        tokens,
        targets: None,
        logits,
        losses: None,
        loss: None,
        backward: None,
        grad_norm: None,
        params,
    };
    let with_loss = match mode {
        Mode::Train | Mode::Eval => true,
        Mode::Logits => false,
        Mode::Decode { loss, .. } => loss,
    };
    if with_loss {
        let targets = g.tensor("targets", &[b, t], DType::U32, TensorKind::Input);
        let losses = g.activation("losses", &[bt]);
        let lse = g.activation("logits.lse", &[bt]);
        match chunk_rows {
            Some(rows) => g.push(
                fwd,
                "lm_head.loss",
                Op::LmHeadLoss {
                    n: bt,
                    c,
                    v,
                    vp,
                    rows,
                },
                vec![lnf, out.params[table.wte], targets],
                vec![losses, lse, logits],
            ),
            None => g.push(
                fwd,
                "loss",
                Op::CrossEntropy { n: bt, v, vp },
                vec![logits, targets],
                vec![losses, lse],
            ),
        }
        out.targets = Some(targets);
        out.losses = Some(losses);
        if decode.is_none() {
            let loss = g.tensor("loss", &[1], DType::F32, TensorKind::Result);
            g.push(
                fwd,
                "loss.mean",
                Op::Mean { n: bt },
                vec![losses],
                vec![loss],
            );
            out.loss = Some(loss);
        }
    }
    if mode == Mode::Train {
        let bw = autodiff::append_backward(&mut g);
        let norm = autodiff::append_optimizer(&mut g, &bw, |i| table.specs[i].decay);
        out.backward = Some(bw);
        out.grad_norm = Some(norm);
    }
    out.graph = g;
    out
}
