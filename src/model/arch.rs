//! One transformer, described: the architecture value that GPT-2 and the Llama family (Llama,
//! Mistral, Qwen2, Qwen3, SmolLM2) share. A family is a description, not a second model: norm
//! kind, positions, MLP kind, heads and key/value heads, head size, biases, per-head q/k norms
//! and whether the lm head is tied to the token embedding.
//!
//! Scalars (epsilons, RoPE theta and factors) are kept as the f64 the config file holds, so a
//! config written back says what it read; computation rounds them to f32 as PyTorch does when
//! a Python float meets a float32 tensor.

use crate::error::{Error, Result};
pub use crate::kernels::rope::{ROPE_TYPES, Rope, RopeScaling};
use crate::model::config::GptConfig;

/// The normalization before attention, before the MLP and at the end of the stack.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Norm {
    /// (x - mean) / sqrt(var + eps) · w (+ b when the model has norm biases): GPT-2.
    LayerNorm { eps: f64 },
    /// x / sqrt(mean(x²) + eps) · w: the Llama family.
    RmsNorm { eps: f64 },
}

/// Where positions enter the model.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Positions {
    /// A learned table of `context` rows added to the token embedding (GPT-2's wpe).
    Learned,
    /// Rotary embedding of q and k in every attention layer.
    Rotary(Rope),
}

/// The feed-forward block.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Mlp {
    /// c_proj(GELU_tanh(c_fc(x))) with 4 · hidden inner units (GPT-2).
    Gelu,
    /// down(SiLU(gate(x)) · up(x)) with `intermediate` inner units (the Llama family).
    GatedSilu { intermediate: usize },
}

/// Which layers carry an additive bias.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Biases {
    /// The q, k and v projections (GPT-2's c_attn; Qwen2's q/k/v_proj).
    pub qkv: bool,
    /// The attention output projection.
    pub o: bool,
    /// The MLP's projections.
    pub mlp: bool,
    /// The norms (LayerNorm's b).
    pub norm: bool,
}

impl Biases {
    pub const NONE: Biases = Biases {
        qkv: false,
        o: false,
        mlp: false,
        norm: false,
    };
}

/// The model family, which fixes the names on disk and config.json's `model_type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    Gpt2,
    Llama,
    Mistral,
    Qwen2,
    Qwen3,
}

impl Family {
    /// config.json's `model_type`.
    pub fn model_type(self) -> &'static str {
        match self {
            Family::Gpt2 => "gpt2",
            Family::Llama => "llama",
            Family::Mistral => "mistral",
            Family::Qwen2 => "qwen2",
            Family::Qwen3 => "qwen3",
        }
    }

    /// config.json's `architectures` entry of the causal-LM class.
    pub fn architecture(self) -> &'static str {
        match self {
            Family::Gpt2 => "GPT2LMHeadModel",
            Family::Llama => "LlamaForCausalLM",
            Family::Mistral => "MistralForCausalLM",
            Family::Qwen2 => "Qwen2ForCausalLM",
            Family::Qwen3 => "Qwen3ForCausalLM",
        }
    }
}

/// One transformer. Legend: hidden = C, n_head = NH, n_kv_head = the key/value heads (each
/// serves n_head / n_kv_head query heads), head_dim = HS (not necessarily C / NH: Qwen3).
#[derive(Clone, Debug, PartialEq)]
pub struct Arch {
    pub family: Family,
    pub n_layer: usize,
    pub hidden: usize,
    pub n_head: usize,
    pub n_kv_head: usize,
    pub head_dim: usize,
    /// Real vocabulary (rows of the token embedding on disk).
    pub vocab: usize,
    /// Context length: the most positions the model is run on.
    pub context: usize,
    pub norm: Norm,
    pub positions: Positions,
    pub mlp: Mlp,
    pub biases: Biases,
    /// RMSNorm of every q and k head over head_dim before RoPE (Qwen3), with the norm's eps.
    pub qk_norm: bool,
    /// The lm head is the token embedding (no lm_head.weight of its own).
    pub tied_head: bool,
    /// Dropout on embeddings, attention probabilities and residual branches (training only).
    pub dropout: f32,
}

impl From<&GptConfig> for Arch {
    /// GPT-2 as a description: LayerNorm (eps 1e-5), learned positions, a GELU MLP of 4 C, the
    /// config's biases everywhere or nowhere, a tied head.
    fn from(cfg: &GptConfig) -> Arch {
        let b = cfg.bias;
        Arch {
            family: Family::Gpt2,
            n_layer: cfg.n_layer,
            hidden: cfg.n_embd,
            n_head: cfg.n_head,
            n_kv_head: cfg.n_head,
            head_dim: cfg.head_size(),
            vocab: cfg.vocab_size,
            context: cfg.block_size,
            norm: Norm::LayerNorm { eps: 1e-5 },
            positions: Positions::Learned,
            mlp: Mlp::Gelu,
            biases: Biases {
                qkv: b,
                o: b,
                mlp: b,
                norm: b,
            },
            qk_norm: false,
            tied_head: true,
            dropout: cfg.dropout,
        }
    }
}

impl Arch {
    /// The GPT-2 config this describes, or `None` when it is not GPT-2's shape (so a GPT-2
    /// builder is never handed a model it would compute differently).
    pub fn gpt_config(&self) -> Option<GptConfig> {
        let cfg = GptConfig {
            n_layer: self.n_layer,
            n_head: self.n_head,
            n_embd: self.hidden,
            block_size: self.context,
            vocab_size: self.vocab,
            dropout: self.dropout,
            bias: self.biases.qkv,
        };
        (cfg.n_head > 0 && cfg.n_embd.is_multiple_of(cfg.n_head) && Arch::from(&cfg) == *self)
            .then_some(cfg)
    }

    /// The model in one line: its type, shape and parameter count (`train` and `bench` print
    /// it).
    pub fn describe(&self) -> String {
        format!(
            "{}, {} layers, {} heads ({} kv heads, head_dim {}), hidden {}, intermediate {}, \
             vocab {}, context {} ({:.1}M parameters)",
            self.family.model_type(),
            self.n_layer,
            self.n_head,
            self.n_kv_head,
            self.head_dim,
            self.hidden,
            self.intermediate(),
            self.vocab,
            self.context,
            self.checked_num_params().unwrap_or(0) as f64 / 1e6
        )
    }

    /// Inner units of the MLP.
    pub fn intermediate(&self) -> usize {
        match self.mlp {
            Mlp::Gelu => 4 * self.hidden,
            Mlp::GatedSilu { intermediate } => intermediate,
        }
    }

    /// Query heads served by each key/value head.
    pub fn group(&self) -> usize {
        self.n_head / self.n_kv_head.max(1)
    }

    /// Checks the shape is buildable; errors name the field (config.json's names where the
    /// model is a Llama-family one).
    pub fn validate(&self) -> Result<()> {
        let bad = |what: &str, msg: String| Err(Error::invalid(format!("model: {what}"), msg));
        for (name, v) in [
            ("num_hidden_layers", self.n_layer),
            ("hidden_size", self.hidden),
            ("num_attention_heads", self.n_head),
            ("num_key_value_heads", self.n_kv_head),
            ("head_dim", self.head_dim),
            ("vocab_size", self.vocab),
            ("max_position_embeddings", self.context),
            ("intermediate_size", self.intermediate()),
        ] {
            if v == 0 {
                return bad(name, "must be at least 1".into());
            }
        }
        if !self.n_head.is_multiple_of(self.n_kv_head) {
            return bad(
                "num_key_value_heads",
                format!(
                    "{} does not divide num_attention_heads {}",
                    self.n_kv_head, self.n_head
                ),
            );
        }
        if matches!(self.positions, Positions::Rotary(_)) && !self.head_dim.is_multiple_of(2) {
            return bad(
                "head_dim",
                format!(
                    "{} is odd: rotary embedding pairs dimensions",
                    self.head_dim
                ),
            );
        }
        if let Positions::Rotary(rope) = self.positions {
            rope.validate()?;
        }
        let eps = match self.norm {
            Norm::LayerNorm { eps } | Norm::RmsNorm { eps } => eps,
        };
        if !(eps.is_finite() && eps > 0.0) {
            return bad("rms_norm_eps", format!("{eps} is not a positive number"));
        }
        if self.checked_num_params().is_none() {
            return bad(
                "num_hidden_layers",
                format!(
                    "{} layers of {} channels, vocabulary {}: the parameter count overflows",
                    self.n_layer, self.hidden, self.vocab
                ),
            );
        }
        Ok(())
    }

    /// Parameters as stored on disk (a tied head counted once, learned positions included), or
    /// `None` when the count overflows usize: a config read from a file can declare any size.
    pub fn checked_num_params(&self) -> Option<usize> {
        let c = self.hidden as u128;
        let (nh, nkv, hs) = (
            self.n_head as u128,
            self.n_kv_head as u128,
            self.head_dim as u128,
        );
        let inner = self.intermediate() as u128;
        let b = |on: bool| on as u128;
        let norm = c * (1 + b(self.biases.norm));
        let qkv = c * (nh + 2 * nkv) * hs + b(self.biases.qkv) * (nh + 2 * nkv) * hs;
        let o = nh * hs * c + b(self.biases.o) * c;
        let mlp_in = if matches!(self.mlp, Mlp::GatedSilu { .. }) {
            2
        } else {
            1
        };
        let mlp = (mlp_in + 1) * c * inner + b(self.biases.mlp) * (mlp_in * inner + c);
        let qk_norm = if self.qk_norm { 2 * hs } else { 0 };
        let per_layer = 2 * norm + qkv + o + mlp + qk_norm;
        let embed = (self.vocab as u128).checked_mul(c)?;
        let positions = match self.positions {
            Positions::Learned => self.context as u128 * c,
            Positions::Rotary(_) => 0,
        };
        let head = if self.tied_head { 0 } else { embed };
        let n = embed
            .checked_add(positions)?
            .checked_add((self.n_layer as u128).checked_mul(per_layer)?)?
            .checked_add(norm)?
            .checked_add(head)?;
        usize::try_from(n).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gpt(bias: bool) -> GptConfig {
        GptConfig {
            n_layer: 2,
            n_head: 3,
            n_embd: 48,
            block_size: 64,
            vocab_size: 77,
            dropout: 0.1,
            bias,
        }
    }

    #[test]
    fn gpt2_maps_into_the_description_and_back() {
        for bias in [true, false] {
            let cfg = gpt(bias);
            let arch = Arch::from(&cfg);
            assert_eq!(arch.head_dim, 16);
            assert_eq!(arch.n_kv_head, 3);
            assert_eq!(arch.intermediate(), 192);
            assert_eq!(arch.gpt_config(), Some(cfg.clone()));
            // The description counts what GPT-2 counts.
            assert_eq!(arch.checked_num_params(), cfg.checked_num_params());
            arch.validate().unwrap();
        }
        let mut llama_like = Arch::from(&gpt(true));
        llama_like.norm = Norm::RmsNorm { eps: 1e-5 };
        assert_eq!(llama_like.gpt_config(), None);
    }

    #[test]
    fn linear_scaling_divides_the_default_frequencies() {
        let plain = Rope {
            theta: 10000.0,
            scaling: RopeScaling::None,
        };
        let linear = Rope {
            theta: 10000.0,
            scaling: RopeScaling::Linear { factor: 4.0 },
        };
        let (a, b) = (plain.inv_freq(64), linear.inv_freq(64));
        assert_eq!(a.len(), 32);
        assert_eq!(a[0], 1.0);
        for (x, y) in a.iter().zip(&b) {
            assert_eq!(x / 4.0, *y);
        }
    }

    #[test]
    fn bad_shapes_name_the_field() {
        let mut arch = Arch::from(&gpt(true));
        arch.n_kv_head = 2;
        let e = arch.validate().unwrap_err().to_string();
        assert!(e.contains("num_key_value_heads"), "{e}");
        let mut arch = Arch::from(&gpt(true));
        arch.positions = Positions::Rotary(Rope {
            theta: 1e4,
            scaling: RopeScaling::None,
        });
        arch.head_dim = 15;
        let e = arch.validate().unwrap_err().to_string();
        assert!(e.contains("head_dim"), "{e}");
        let e = RopeScaling::check_type("rope_scaling.rope_type", "yarn")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("yarn") && e.contains("rope_scaling.rope_type"),
            "{e}"
        );
    }
}
