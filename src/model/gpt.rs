//! The GPT-2 forward graph, readable in one sitting, and its training extension.

use std::collections::HashMap;

use super::config::GptConfig;
use super::lora::LoraPlan;
use super::params::{BlockParams, ParamSpec, ParamTable};
use crate::gpu::DType;
use crate::graph::autodiff::{self, Backward};
use crate::graph::ir::{Graph, Input, Op, Phase, StepOutput, TensorId, TensorKind};

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
    build_adapted(cfg, table, None, (b, t), mode, max_binding)
}

/// `build_for` with a LoRA adapter `lora` on the linear layers it targets: the base parameters
/// frozen (training updates the adapter alone), parameter i of the graph being `lora.specs[i]`.
pub fn build_adapted(
    cfg: &GptConfig,
    table: &ParamTable,
    lora: Option<&LoraPlan>,
    (b, t): (usize, usize),
    mode: Mode,
    max_binding: u64,
) -> GptGraph {
    let specs = lora.map_or(&table.specs[..], |p| &p.specs[..]);
    let mut m = Builder::new(cfg, specs, b, t, mode);
    if let Some(plan) = lora {
        m.adapt(plan);
    }
    let (tokens, x) = m.embed(table);
    let mut x = m.dropout(x, "embed".into());
    for (l, bp) in table.blocks.iter().enumerate() {
        let first = m.g.nodes.len();
        x = m.block(l, bp, x);
        m.g.blocks.push(first..m.g.nodes.len());
    }
    let lnf = m.layernorm(x, (table.ln_f_w, table.ln_f_b), "ln_f".into());
    // The lm head shares the token embedding (tied weights).
    let chunk_rows = match mode {
        Mode::Train | Mode::Eval => logits_chunk_rows(m.bt, cfg.padded_vocab(), max_binding),
        Mode::Logits | Mode::Decode { .. } => None,
    };
    let logits = m.lm_head(lnf, table.wte, chunk_rows);
    let with_loss = match mode {
        Mode::Train | Mode::Eval => true,
        Mode::Logits => false,
        Mode::Decode { loss, .. } => loss,
    };
    let loss = with_loss.then(|| m.loss(lnf, table.wte, logits, chunk_rows));
    m.finish((tokens, logits, loss), mode, |i| specs[i].decay)
}

/// The loss tensors of a graph: targets (B, T), per-position losses (B·T) and, except when
/// decoding, their mean.
#[derive(Clone, Copy)]
pub(super) struct Loss {
    pub(super) targets: TensorId,
    pub(super) losses: TensorId,
    pub(super) mean: Option<TensorId>,
}

/// The sizes and settings of a model that its builder needs: hidden C, query heads, key/value
/// heads, head size, the vocabulary and its padded width, the dropout when training, and whether
/// the layer norms need a zero bias.
pub(super) struct Setup {
    pub c: usize,
    pub nh: usize,
    pub nkv: usize,
    pub hs: usize,
    pub v: usize,
    pub vp: usize,
    pub dropout: f32,
    pub zero_bias: bool,
}

/// A GPT graph under construction, with the sizes and settings every op of it shares. Its
/// methods are the model's layers, each appending its forward ops in order (the Llama family's
/// builder adds its own in `model::llama`).
pub(super) struct Builder {
    pub(super) g: Graph,
    pub(super) b: usize,
    pub(super) t: usize,
    pub(super) bt: usize,
    pub(super) c: usize,
    pub(super) nh: usize,
    /// Key/value heads (NH for GPT-2; fewer with grouped-query attention).
    pub(super) nkv: usize,
    pub(super) hs: usize,
    v: usize,
    vp: usize,
    /// The KV cache's positions when decoding.
    decode: Option<usize>,
    /// Dropout probability (zero unless training).
    p: f32,
    /// Training fuses the MLP's GELU into its first GEMM and, without dropout, the residual adds
    /// into the projections' GEMMs (their epilogues: f32 weights only, so inference, which may
    /// hold f16 weights, keeps the separate ops).
    fuse: bool,
    /// The last dropout site given out (the residual dropouts' sites are 1, 2, 3, ...).
    site: u32,
    /// The graph tensor of parameter i.
    pub(super) params: Vec<TensorId>,
    /// The zeros standing in for layer norm biases in a model without biases.
    zero_bias: Option<TensorId>,
    /// A LoRA adapter: (A, B) of each adapted weight tensor, its scale, and its dropout (zero
    /// unless training).
    lora: HashMap<TensorId, (TensorId, TensorId)>,
    lora_scale: f32,
    lora_p: f32,
    /// Training: whether the model has dropout anywhere (its own or the adapter's).
    train: bool,
}

pub(super) const FWD: Phase = Phase::Forward;

impl Builder {
    /// An empty graph holding the parameters `specs` (and the zero bias, if needed).
    fn new(cfg: &GptConfig, specs: &[ParamSpec], b: usize, t: usize, mode: Mode) -> Builder {
        let setup = Setup {
            c: cfg.n_embd,
            nh: cfg.n_head,
            nkv: cfg.n_head,
            hs: cfg.head_size(),
            v: cfg.vocab_size,
            vp: cfg.padded_vocab(),
            dropout: cfg.dropout,
            zero_bias: !cfg.bias,
        };
        Builder::with(specs, setup, b, t, mode)
    }

    /// An empty graph holding the parameters `specs` (and the zero bias, if asked for).
    pub(super) fn with(specs: &[ParamSpec], s: Setup, b: usize, t: usize, mode: Mode) -> Builder {
        let mut g = Graph::default();
        let params: Vec<TensorId> = specs
            .iter()
            .enumerate()
            .map(|(i, s)| g.tensor(s.name.clone(), &s.shape, DType::F32, TensorKind::Param(i)))
            .collect();
        let zero_bias = s
            .zero_bias
            .then(|| g.tensor("zero_bias", &[s.c], DType::F32, TensorKind::Constant(0)));
        Builder {
            g,
            b,
            t,
            bt: b * t,
            c: s.c,
            nh: s.nh,
            nkv: s.nkv,
            hs: s.hs,
            v: s.v,
            vp: s.vp,
            decode: match mode {
                Mode::Decode { tmax, .. } => Some(tmax),
                _ => None,
            },
            p: if mode == Mode::Train { s.dropout } else { 0.0 },
            fuse: mode == Mode::Train,
            site: 0,
            params,
            zero_bias,
            lora: HashMap::new(),
            lora_scale: 0.0,
            lora_p: 0.0,
            train: mode == Mode::Train,
        }
    }

    /// Lays the adapter `plan` onto the layers it targets and freezes the base parameters
    /// (their tensors become `Frozen`: no gradients, no AdamW).
    pub(super) fn adapt(&mut self, plan: &LoraPlan) {
        for i in 0..plan.base_len {
            self.g.tensors[self.params[i]].kind = TensorKind::Frozen(i);
        }
        for ad in &plan.adapted {
            let (a, b) = (self.params[ad.a], self.params[ad.b]);
            self.lora.insert(self.params[ad.weight], (a, b));
        }
        self.lora_scale = plan.cfg.scale();
        self.lora_p = if self.train { plan.cfg.dropout } else { 0.0 };
    }

    /// `base` (the output of a linear layer with weight `w` on input x) plus the adapter's
    /// scale · (dropout(x) · Aᵀ) · Bᵀ when `w` is adapted; `base` itself otherwise.
    fn adapter(&mut self, x: TensorId, w: TensorId, base: TensorId, name: &str) -> TensorId {
        let Some(&(a, b)) = self.lora.get(&w) else {
            return base;
        };
        let x = self.dropout_p(x, self.lora_p, format!("{name}.lora_dropout"));
        let g = &mut self.g;
        let (r, n) = (g.tensors[a].shape[0], g.tensors[b].shape[0]);
        let (m, k) = (self.bt, g.tensors[x].numel() / self.bt);
        let shape = g.tensors[base].shape.clone();
        let y = g.activation(format!("{name}.lora"), &shape);
        let u = g.activation(format!("{name}.lora_A"), &[m, r]);
        let scale = self.lora_scale;
        g.push(
            FWD,
            format!("{name}.lora"),
            Op::Lora { m, k, r, n, scale },
            vec![x, a, b, base],
            vec![y, u],
        );
        y
    }

    /// The graph with, when training, its backward and optimizer (`decay(i)`: whether parameter
    /// i takes weight decay), and the tensors callers need.
    pub(super) fn finish(
        self,
        (tokens, logits, loss): (TensorId, TensorId, Option<Loss>),
        mode: Mode,
        decay: impl Fn(usize) -> bool,
    ) -> GptGraph {
        let (b, t) = (self.b, self.t);
        let mut g = self.g;
        let (backward, grad_norm) = if mode == Mode::Train {
            let bw = autodiff::append_backward(&mut g);
            let norm = autodiff::append_optimizer(&mut g, &bw, decay);
            (Some(bw), Some(norm))
        } else {
            (None, None)
        };
        GptGraph {
            graph: g,
            b,
            t,
            tokens,
            targets: loss.map(|l| l.targets),
            logits,
            losses: loss.map(|l| l.losses),
            loss: loss.and_then(|l| l.mean),
            backward,
            grad_norm,
            params: self.params,
        }
    }

    /// The graph tensors of a weight and its optional bias.
    pub(super) fn weights(
        &self,
        (w, bias): (usize, Option<usize>),
    ) -> (TensorId, Option<TensorId>) {
        (self.params[w], bias.map(|i| self.params[i]))
    }

    /// The tokens input (B, T) and their embedding (B, T, C): token rows plus position rows.
    fn embed(&mut self, table: &ParamTable) -> (TensorId, TensorId) {
        let (b, t, c) = (self.b, self.t, self.c);
        let g = &mut self.g;
        let tokens = g.tensor(
            "tokens",
            &[b, t],
            DType::U32,
            TensorKind::Input(Input::Tokens),
        );
        // Decoding adds the position rows of the current positions, gathered into a window.
        let positions = match self.decode {
            Some(_) => g.tensor(
                "wpe.window",
                &[t, c],
                DType::F32,
                TensorKind::PositionWindow(table.wpe),
            ),
            None => self.params[table.wpe],
        };
        let x = g.activation("embed", &[b, t, c]);
        g.push(
            FWD,
            "embed",
            Op::Embedding { b, t, c },
            vec![tokens, self.params[table.wte], positions],
            vec![x],
        );
        (tokens, x)
    }

    /// One transformer block: x + attn(ln_1(x)), then that + mlp(ln_2(that)).
    fn block(&mut self, l: usize, bp: &BlockParams, x: TensorId) -> TensorId {
        let (h, c) = (format!("h.{l}"), self.c);
        let ln1 = self.layernorm(x, (bp.ln_1_w, bp.ln_1_b), format!("{h}.ln_1"));
        let c_attn = self.weights((bp.c_attn_w, bp.c_attn_b));
        let qkv = self.linear(ln1, c_attn, 3 * c, format!("{h}.attn.c_attn"));
        let att = self.attention(l, qkv);
        let proj = self.weights((bp.attn_proj_w, bp.attn_proj_b));
        let x1 = self.project_residual(
            att,
            proj,
            x,
            format!("{h}.attn.c_proj"),
            format!("{h}.res_1"),
        );
        let ln2 = self.layernorm(x1, (bp.ln_2_w, bp.ln_2_b), format!("{h}.ln_2"));
        let gelu = self.mlp_gelu(ln2, self.weights((bp.c_fc_w, bp.c_fc_b)), &h);
        let proj = self.weights((bp.mlp_proj_w, bp.mlp_proj_b));
        self.project_residual(
            gelu,
            proj,
            x1,
            format!("{h}.mlp.c_proj"),
            format!("{h}.res_2"),
        )
    }

    /// x with the model's dropout (a new site each call), or x itself when there is none.
    pub(super) fn dropout(&mut self, x: TensorId, label: String) -> TensorId {
        self.dropout_p(x, self.p, label)
    }

    /// x with dropout `p` (a new site each call), or x itself when p is zero.
    fn dropout_p(&mut self, x: TensorId, p: f32, label: String) -> TensorId {
        if p == 0.0 {
            return x;
        }
        self.site += 1;
        let site = self.site;
        let g = &mut self.g;
        let (shape, n) = (g.tensors[x].shape.clone(), g.tensors[x].numel());
        let y = g.activation(format!("{label}.drop"), &shape);
        g.push(FWD, label, Op::Dropout { n, p, site }, vec![x], vec![y]);
        y
    }

    /// Layer norm of x (BT, C) with parameters (w, bias), keeping mean and rstd for the backward.
    fn layernorm(
        &mut self,
        x: TensorId,
        (w, bias): (usize, Option<usize>),
        name: String,
    ) -> TensorId {
        let (bt, c) = (self.bt, self.c);
        let w = self.params[w];
        let bias = bias.map(|i| self.params[i]).or(self.zero_bias).unwrap();
        let g = &mut self.g;
        let y = g.activation(name.clone(), &[bt, c]);
        let mean = g.activation(format!("{name}.mean"), &[bt]);
        let rstd = g.activation(format!("{name}.rstd"), &[bt]);
        g.push(
            FWD,
            name,
            Op::LayerNorm { n: bt, c },
            vec![x, w, bias],
            vec![y, mean, rstd],
        );
        y
    }

    /// y (BT, N) = x · wᵀ + bias.
    pub(super) fn linear(
        &mut self,
        x: TensorId,
        (w, bias): (TensorId, Option<TensorId>),
        n: usize,
        name: String,
    ) -> TensorId {
        let bt = self.bt;
        let g = &mut self.g;
        let y = g.activation(name.clone(), &[bt, n]);
        let k = g.tensors[x].numel() / bt;
        let mut ins = vec![x, w];
        ins.extend(bias);
        g.push(
            FWD,
            name.clone(),
            Op::Linear {
                m: bt,
                k,
                n,
                bias: bias.is_some(),
            },
            ins,
            vec![y],
        );
        self.adapter(x, w, y, &name)
    }

    /// y (BT, N) = gelu(x · wᵀ + bias), keeping the pre-activation for the backward.
    fn linear_gelu(
        &mut self,
        x: TensorId,
        (w, bias): (TensorId, Option<TensorId>),
        name: String,
    ) -> TensorId {
        let bt = self.bt;
        let g = &mut self.g;
        let (k, n) = (g.tensors[x].numel() / bt, g.tensors[w].shape[0]);
        let y = g.activation(format!("{name}.gelu"), &[bt, n]);
        let pre = g.activation(format!("{name}.pre"), &[bt, n]);
        let mut ins = vec![x, w];
        ins.extend(bias);
        let bias = bias.is_some();
        g.push(
            FWD,
            name,
            Op::LinearGelu { m: bt, k, n, bias },
            ins,
            vec![y, pre],
        );
        y
    }

    /// res + x · wᵀ + bias, the new residual stream (B, T, C).
    fn linear_residual(
        &mut self,
        x: TensorId,
        (w, bias): (TensorId, Option<TensorId>),
        res: TensorId,
        name: String,
    ) -> TensorId {
        let (b, t, bt) = (self.b, self.t, self.bt);
        let g = &mut self.g;
        let (k, n) = (g.tensors[x].numel() / bt, g.tensors[w].shape[0]);
        let y = g.activation(name.clone(), &[b, t, n]);
        let mut ins = vec![x, w];
        ins.extend(bias);
        ins.push(res);
        let bias = bias.is_some();
        g.push(
            FWD,
            name.clone(),
            Op::LinearResidual { m: bt, k, n, bias },
            ins,
            vec![y],
        );
        self.adapter(x, w, y, &name)
    }

    /// Causal self-attention over qkv (B, T, W) into (B, T, C): over the block's own tokens, or,
    /// when decoding, over layer l's KV cache (each key/value head once) after appending the new
    /// keys and values to it.
    pub(super) fn attention(&mut self, l: usize, qkv: TensorId) -> TensorId {
        let (b, t, nh, nkv, hs, p) = (self.b, self.t, self.nh, self.nkv, self.hs, self.p);
        let h = format!("h.{l}");
        let g = &mut self.g;
        let att = g.activation(format!("{h}.attn"), &[b, t, nh * hs]);
        if let Some(tmax) = self.decode {
            let cache = |g: &mut Graph, value: bool| {
                let name = format!("{h}.attn.{}_cache", if value { "v" } else { "k" });
                let kind = TensorKind::KvCache { layer: l, value };
                g.tensor(name, &[b, nkv, tmax, hs], DType::F32, kind)
            };
            let (kc, vc) = (cache(g, false), cache(g, true));
            let (tq, attn) = (t, format!("{h}.attn"));
            g.push(
                FWD,
                format!("{attn}.kv_append"),
                Op::KvAppend {
                    b,
                    tq,
                    nh,
                    nkv,
                    hs,
                    tmax,
                },
                vec![qkv],
                vec![kc, vc],
            );
            g.push(
                FWD,
                attn,
                Op::AttentionCached {
                    b,
                    tq,
                    nh,
                    nkv,
                    hs,
                    tmax,
                },
                vec![qkv, kc, vc],
                vec![att],
            );
        } else {
            let lse = g.activation(format!("{h}.attn.lse"), &[b, nh, t]);
            g.push(
                FWD,
                format!("{h}.attn"),
                Op::Attention {
                    b,
                    t,
                    nh,
                    nkv,
                    hs,
                    p,
                    // Streams apart from the residual dropouts' sites (1, 2, 3, ...).
                    site: ATTENTION_SITES + l as u32,
                },
                vec![qkv],
                vec![att, lse],
            );
        }
        att
    }

    /// res + dropout(x · wᵀ + bias): a projection `proj` back into the residual stream, whose
    /// sum is `sum` (B, T, C); one fused GEMM when training without dropout.
    pub(super) fn project_residual(
        &mut self,
        x: TensorId,
        w: (TensorId, Option<TensorId>),
        res: TensorId,
        proj: String,
        sum: String,
    ) -> TensorId {
        if self.fuse && self.p == 0.0 {
            return self.linear_residual(x, w, res, sum);
        }
        let (b, t, c) = (self.b, self.t, self.c);
        let y = self.linear(x, w, c, proj.clone());
        let y = self.dropout(y, proj);
        let out = self.g.activation(sum.clone(), &[b, t, c]);
        self.g
            .push(FWD, sum, Op::Add { n: b * t * c }, vec![res, y], vec![out]);
        out
    }

    /// The MLP's first half, gelu(x · wᵀ + bias) (BT, 4C), for block `h`.
    fn mlp_gelu(&mut self, x: TensorId, fc: (TensorId, Option<TensorId>), h: &str) -> TensorId {
        // An adapted layer adds its low-rank product before the GELU: no fused epilogue.
        if self.fuse && !self.lora.contains_key(&fc.0) {
            return self.linear_gelu(x, fc, format!("{h}.mlp.c_fc"));
        }
        let (bt, c) = (self.bt, self.c);
        let pre = self.linear(x, fc, 4 * c, format!("{h}.mlp.c_fc"));
        let gelu = self.g.activation(format!("{h}.mlp.gelu"), &[bt, 4 * c]);
        self.g.push(
            FWD,
            format!("{h}.mlp.gelu"),
            Op::Gelu { n: bt * 4 * c },
            vec![pre],
            vec![gelu],
        );
        gelu
    }

    /// The logits (BT, Vp) = lnf · wteᵀ, or, when computed in chunks of `chunk_rows` with the
    /// loss, the buffer of one chunk.
    pub(super) fn lm_head(
        &mut self,
        lnf: TensorId,
        wte: usize,
        chunk_rows: Option<usize>,
    ) -> TensorId {
        match chunk_rows {
            Some(rows) => self.g.activation("lm_head", &[rows, self.vp]),
            None => {
                let wte = (self.params[wte], None);
                self.linear(lnf, wte, self.vp, "lm_head".into())
            }
        }
    }

    /// The cross-entropy of the logits against the targets per position, and (except when
    /// decoding) its mean; in chunks of `chunk_rows`, with the lm head, when given.
    pub(super) fn loss(
        &mut self,
        lnf: TensorId,
        wte: usize,
        logits: TensorId,
        chunk_rows: Option<usize>,
    ) -> Loss {
        let (b, t, bt, c, v, vp) = (self.b, self.t, self.bt, self.c, self.v, self.vp);
        let wte = self.params[wte];
        let g = &mut self.g;
        let targets = TensorKind::Input(Input::Targets);
        let targets = g.tensor("targets", &[b, t], DType::U32, targets);
        let losses = g.activation("losses", &[bt]);
        let lse = g.activation("logits.lse", &[bt]);
        match chunk_rows {
            Some(rows) => g.push(
                FWD,
                "lm_head.loss",
                Op::LmHeadLoss {
                    n: bt,
                    c,
                    v,
                    vp,
                    rows,
                },
                vec![lnf, wte, targets],
                vec![losses, lse, logits],
            ),
            None => g.push(
                FWD,
                "loss",
                Op::CrossEntropy { n: bt, v, vp },
                vec![logits, targets],
                vec![losses, lse],
            ),
        }
        let mean = self.decode.is_none().then(|| {
            let loss = g.tensor(
                "loss",
                &[1],
                DType::F32,
                TensorKind::Result(StepOutput::Loss),
            );
            g.push(
                FWD,
                "loss.mean",
                Op::Mean { n: bt },
                vec![losses],
                vec![loss],
            );
            loss
        });
        Loss {
            targets,
            losses,
            mean,
        }
    }
}
