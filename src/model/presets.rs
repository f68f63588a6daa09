//! Named model shapes for benchmarks and training from scratch: GPT-2's four sizes and the
//! Llama-family checkpoints people run (SmolLM2, Qwen2.5, Llama 3.2), each with the exact
//! shape of its published config.json. One table, so `bench --model` and training share it.

use super::arch::{Arch, Biases, Family, Mlp, Norm, Positions, Rope, RopeScaling};
use super::config::GptConfig;

/// GPT-2's shapes, as `GptConfig::preset` knows them.
pub const GPT2_PRESETS: [&str; 4] = ["gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"];

/// The Llama family's shapes, as `Arch::preset` knows them.
pub const LLAMA_PRESETS: [&str; 3] = ["smollm2-135m", "qwen2.5-0.5b", "llama-3.2-1b"];

/// Every preset name, GPT-2's first, comma-separated (for error messages).
pub fn names() -> String {
    GPT2_PRESETS
        .iter()
        .chain(LLAMA_PRESETS.iter())
        .copied()
        .collect::<Vec<_>>()
        .join(", ")
}

/// A named shape of either kind.
#[derive(Clone, Debug, PartialEq)]
pub enum Preset {
    Gpt2(GptConfig),
    Llama(Arch),
}

impl Preset {
    /// The preset called `name`, or `None`.
    pub fn find(name: &str) -> Option<Preset> {
        GptConfig::preset(name)
            .map(Preset::Gpt2)
            .or_else(|| Arch::preset(name).map(Preset::Llama))
    }
}

/// The parts in which the Llama-family presets differ.
struct Shape {
    family: Family,
    n_layer: usize,
    hidden: usize,
    intermediate: usize,
    n_head: usize,
    n_kv_head: usize,
    vocab: usize,
    context: usize,
    eps: f64,
    rope: Rope,
    qkv_bias: bool,
}

impl Arch {
    /// The Llama-family shape called `name` (`LLAMA_PRESETS`), as its config.json on the Hugging
    /// Face Hub declares it (HuggingFaceTB/SmolLM2-135M, Qwen/Qwen2.5-0.5B,
    /// meta-llama/Llama-3.2-1B): every one has head_dim 64 and a tied head.
    pub fn preset(name: &str) -> Option<Arch> {
        let plain = |theta| Rope {
            theta,
            scaling: RopeScaling::None,
        };
        let s = match name {
            "smollm2-135m" => Shape {
                family: Family::Llama,
                n_layer: 30,
                hidden: 576,
                intermediate: 1536,
                n_head: 9,
                n_kv_head: 3,
                vocab: 49152,
                context: 8192,
                eps: 1e-5,
                rope: plain(100000.0),
                qkv_bias: false,
            },
            "qwen2.5-0.5b" => Shape {
                family: Family::Qwen2,
                n_layer: 24,
                hidden: 896,
                intermediate: 4864,
                n_head: 14,
                n_kv_head: 2,
                vocab: 151936,
                context: 32768,
                eps: 1e-6,
                rope: plain(1000000.0),
                qkv_bias: true,
            },
            "llama-3.2-1b" => Shape {
                family: Family::Llama,
                n_layer: 16,
                hidden: 2048,
                intermediate: 8192,
                n_head: 32,
                n_kv_head: 8,
                vocab: 128256,
                context: 131072,
                eps: 1e-5,
                rope: Rope {
                    theta: 500000.0,
                    scaling: RopeScaling::Llama3 {
                        factor: 32.0,
                        low_freq_factor: 1.0,
                        high_freq_factor: 4.0,
                        original_max_position_embeddings: 8192,
                    },
                },
                qkv_bias: false,
            },
            _ => return None,
        };
        Some(Arch {
            family: s.family,
            n_layer: s.n_layer,
            hidden: s.hidden,
            n_head: s.n_head,
            n_kv_head: s.n_kv_head,
            head_dim: 64,
            vocab: s.vocab,
            context: s.context,
            norm: Norm::RmsNorm { eps: s.eps },
            positions: Positions::Rotary(s.rope),
            mlp: Mlp::GatedSilu {
                intermediate: s.intermediate,
            },
            biases: Biases {
                qkv: s.qkv_bias,
                ..Biases::NONE
            },
            qk_norm: false,
            tied_head: true,
            dropout: 0.0,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::llama_params::LlamaParams;

    /// The fields a preset must hold, written out as the published config.json states them.
    struct Expected {
        hidden: usize,
        intermediate: usize,
        layers: usize,
        heads: usize,
        kv_heads: usize,
        vocab: usize,
        theta: f64,
        eps: f64,
        context: usize,
        qkv_bias: bool,
        scaling: RopeScaling,
    }

    fn check(name: &str, e: Expected) {
        let a = Arch::preset(name).unwrap_or_else(|| panic!("{name} is not a preset"));
        assert_eq!(a.hidden, e.hidden, "{name} hidden_size");
        assert_eq!(a.intermediate(), e.intermediate, "{name} intermediate_size");
        assert_eq!(a.n_layer, e.layers, "{name} num_hidden_layers");
        assert_eq!(a.n_head, e.heads, "{name} num_attention_heads");
        assert_eq!(a.n_kv_head, e.kv_heads, "{name} num_key_value_heads");
        assert_eq!(a.head_dim, 64, "{name} head_dim");
        assert_eq!(a.vocab, e.vocab, "{name} vocab_size");
        assert_eq!(a.context, e.context, "{name} max_position_embeddings");
        assert_eq!(a.norm, Norm::RmsNorm { eps: e.eps }, "{name} rms_norm_eps");
        let rope = Rope {
            theta: e.theta,
            scaling: e.scaling,
        };
        assert_eq!(a.positions, Positions::Rotary(rope), "{name} rope");
        assert!(a.tied_head, "{name} tie_word_embeddings");
        assert_eq!(a.biases.qkv, e.qkv_bias, "{name} q/k/v biases");
        assert!(
            !a.biases.o && !a.biases.mlp && !a.biases.norm,
            "{name} biases"
        );
        assert!(!a.qk_norm, "{name} q/k norms");
        a.validate().unwrap();
        LlamaParams::new(&a, 0.02).unwrap();
    }

    #[test]
    fn llama_presets_hold_their_published_shapes() {
        check(
            "smollm2-135m",
            Expected {
                hidden: 576,
                intermediate: 1536,
                layers: 30,
                heads: 9,
                kv_heads: 3,
                vocab: 49152,
                theta: 100000.0,
                eps: 1e-5,
                context: 8192,
                qkv_bias: false,
                scaling: RopeScaling::None,
            },
        );
        check(
            "qwen2.5-0.5b",
            Expected {
                hidden: 896,
                intermediate: 4864,
                layers: 24,
                heads: 14,
                kv_heads: 2,
                vocab: 151936,
                theta: 1000000.0,
                eps: 1e-6,
                context: 32768,
                qkv_bias: true,
                scaling: RopeScaling::None,
            },
        );
        check(
            "llama-3.2-1b",
            Expected {
                hidden: 2048,
                intermediate: 8192,
                layers: 16,
                heads: 32,
                kv_heads: 8,
                vocab: 128256,
                theta: 500000.0,
                eps: 1e-5,
                context: 131072,
                qkv_bias: false,
                scaling: RopeScaling::Llama3 {
                    factor: 32.0,
                    low_freq_factor: 1.0,
                    high_freq_factor: 4.0,
                    original_max_position_embeddings: 8192,
                },
            },
        );
    }

    #[test]
    fn presets_have_their_published_parameter_counts() {
        // As transformers counts them (a tied head once).
        for (name, n) in [
            ("smollm2-135m", 134_515_008),
            ("qwen2.5-0.5b", 494_032_768),
            ("llama-3.2-1b", 1_235_814_400),
        ] {
            let a = Arch::preset(name).unwrap();
            assert_eq!(a.checked_num_params(), Some(n), "{name}");
        }
    }

    #[test]
    fn every_name_is_found_and_listed() {
        for name in GPT2_PRESETS.iter().chain(LLAMA_PRESETS.iter()) {
            assert!(Preset::find(name).is_some(), "{name}");
            assert!(names().contains(name), "{name}");
        }
        assert!(matches!(Preset::find("gpt2"), Some(Preset::Gpt2(_))));
        assert!(matches!(
            Preset::find("smollm2-135m"),
            Some(Preset::Llama(_))
        ));
        assert_eq!(Preset::find("smollm2"), None);
    }
}
