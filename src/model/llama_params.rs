//! The parameter table of the Llama family (Llama, Mistral, Qwen2, Qwen3): Hugging Face's names
//! (`model.layers.N.self_attn.q_proj.weight`) and shapes, in the order transformers'
//! `state_dict` lists them, from an architecture description.
//!
//! Shapes are those on disk: linear weights (out, in) as nn.Linear stores them, the token
//! embedding (V, C) with the real vocabulary. A tied head has no lm_head.weight.

use super::arch::{Arch, Mlp, Norm, Positions};
use super::params::{Init, ParamSpec};
use crate::error::{Error, Result};
use crate::rng::Rng;

/// Indices into the table for one decoder layer.
#[derive(Clone, Copy, Debug)]
pub struct LlamaBlock {
    pub input_norm: usize,
    pub q: usize,
    pub q_b: Option<usize>,
    pub k: usize,
    pub k_b: Option<usize>,
    pub v: usize,
    pub v_b: Option<usize>,
    pub o: usize,
    pub o_b: Option<usize>,
    /// Per-head RMSNorm weights of q and k, (head_dim) each (Qwen3).
    pub q_norm: Option<usize>,
    pub k_norm: Option<usize>,
    pub post_norm: usize,
    pub gate: usize,
    pub gate_b: Option<usize>,
    pub up: usize,
    pub up_b: Option<usize>,
    pub down: usize,
    pub down_b: Option<usize>,
}

/// The whole table, with the index of every tensor by role.
#[derive(Clone, Debug)]
pub struct LlamaParams {
    pub specs: Vec<ParamSpec>,
    pub embed: usize,
    pub blocks: Vec<LlamaBlock>,
    pub norm: usize,
    /// `None` when the head is tied to the embedding.
    pub lm_head: Option<usize>,
}

/// The table being built.
struct Specs {
    list: Vec<ParamSpec>,
    /// Standard deviation of the weights (config.json's initializer_range).
    std: f32,
}

impl Specs {
    fn add(&mut self, name: String, shape: Vec<usize>, init: Init) -> usize {
        let decay = shape.len() >= 2;
        self.list.push(ParamSpec {
            name,
            shape,
            init,
            decay,
            hf_transposed: false,
        });
        self.list.len() - 1
    }

    /// An (out, in) linear weight.
    fn linear(&mut self, name: String, out: usize, inp: usize) -> usize {
        let std = self.std;
        self.add(name, vec![out, inp], Init::Normal(std))
    }

    /// A zero bias of `n` values when `on`.
    fn bias(&mut self, on: bool, name: String, n: usize) -> Option<usize> {
        on.then(|| self.add(name, vec![n], Init::Zeros))
    }

    fn norm(&mut self, name: String, n: usize) -> usize {
        self.add(name, vec![n], Init::Ones)
    }

    /// The tensors of decoder layer `l`, in transformers' order.
    fn block(&mut self, arch: &Arch, l: usize) -> LlamaBlock {
        let (c, hs, b) = (arch.hidden, arch.head_dim, arch.biases);
        let (q_out, kv_out) = (arch.n_head * hs, arch.n_kv_head * hs);
        let inner = arch.intermediate();
        let p = format!("model.layers.{l}.");
        let a = format!("{p}self_attn.");
        let input_norm = self.norm(format!("{p}input_layernorm.weight"), c);
        let q = self.linear(format!("{a}q_proj.weight"), q_out, c);
        let q_b = self.bias(b.qkv, format!("{a}q_proj.bias"), q_out);
        let k = self.linear(format!("{a}k_proj.weight"), kv_out, c);
        let k_b = self.bias(b.qkv, format!("{a}k_proj.bias"), kv_out);
        let v = self.linear(format!("{a}v_proj.weight"), kv_out, c);
        let v_b = self.bias(b.qkv, format!("{a}v_proj.bias"), kv_out);
        let o = self.linear(format!("{a}o_proj.weight"), c, q_out);
        let o_b = self.bias(b.o, format!("{a}o_proj.bias"), c);
        let q_norm = arch
            .qk_norm
            .then(|| self.norm(format!("{a}q_norm.weight"), hs));
        let k_norm = arch
            .qk_norm
            .then(|| self.norm(format!("{a}k_norm.weight"), hs));
        let m = format!("{p}mlp.");
        let gate = self.linear(format!("{m}gate_proj.weight"), inner, c);
        let gate_b = self.bias(b.mlp, format!("{m}gate_proj.bias"), inner);
        let up = self.linear(format!("{m}up_proj.weight"), inner, c);
        let up_b = self.bias(b.mlp, format!("{m}up_proj.bias"), inner);
        let down = self.linear(format!("{m}down_proj.weight"), c, inner);
        let down_b = self.bias(b.mlp, format!("{m}down_proj.bias"), c);
        let post_norm = self.norm(format!("{p}post_attention_layernorm.weight"), c);
        LlamaBlock {
            input_norm,
            q,
            q_b,
            k,
            k_b,
            v,
            v_b,
            o,
            o_b,
            q_norm,
            k_norm,
            post_norm,
            gate,
            gate_b,
            up,
            up_b,
            down,
            down_b,
        }
    }
}

impl LlamaParams {
    /// The table of a Llama-family description (RMSNorm without bias, rotary positions, gated
    /// SiLU MLP); `init_std` is the weights' initial standard deviation. Any other description
    /// is refused naming what does not fit.
    pub fn new(arch: &Arch, init_std: f32) -> Result<LlamaParams> {
        check_llama_shaped(arch)?;
        let mut specs = Specs {
            list: Vec::new(),
            std: init_std,
        };
        let c = arch.hidden;
        let embed = specs.linear("model.embed_tokens.weight".into(), arch.vocab, c);
        let blocks = (0..arch.n_layer).map(|l| specs.block(arch, l)).collect();
        let norm = specs.norm("model.norm.weight".into(), c);
        let lm_head =
            (!arch.tied_head).then(|| specs.linear("lm_head.weight".into(), arch.vocab, c));
        Ok(LlamaParams {
            specs: specs.list,
            embed,
            blocks,
            norm,
            lm_head,
        })
    }

    /// (name, shape) of every parameter, for `graph::ParamStore`.
    pub fn store_specs(&self) -> Vec<(String, Vec<usize>)> {
        super::params::store_specs(&self.specs)
    }

    /// The linear layers' weights (out, in), block by block: the layers an adapter may target
    /// (not the embedding nor the lm head).
    pub fn linear_weights(&self) -> Vec<usize> {
        self.blocks
            .iter()
            .flat_map(|b| [b.q, b.k, b.v, b.o, b.gate, b.up, b.down])
            .collect()
    }

    pub fn find(&self, name: &str) -> Option<usize> {
        self.specs.iter().position(|s| s.name == name)
    }

    /// Values as transformers' `_init_weights` draws them in distribution (normal weights,
    /// zero biases, unit norms), reproducible from `seed`.
    pub fn init(&self, seed: u64) -> Vec<Vec<f32>> {
        let mut rng = Rng::new(seed);
        self.specs
            .iter()
            .map(|s| match s.init {
                Init::Zeros => vec![0.0; s.numel()],
                Init::Ones => vec![1.0; s.numel()],
                Init::Normal(std) => rng.vec_normal(s.numel(), std),
            })
            .collect()
    }
}

/// Refuses a description the Llama table cannot hold, naming the part.
fn check_llama_shaped(arch: &Arch) -> Result<()> {
    let refuse = |what: &str| {
        Err(Error::invalid(
            format!("{:?} model", arch.family),
            format!("{what}: not a Llama-family model"),
        ))
    };
    if !matches!(arch.norm, Norm::RmsNorm { .. }) || arch.biases.norm {
        return refuse("its norm is not RMSNorm without bias");
    }
    if !matches!(arch.positions, Positions::Rotary(_)) {
        return refuse("its positions are not rotary");
    }
    if !matches!(arch.mlp, Mlp::GatedSilu { .. }) {
        return refuse("its MLP is not gated SiLU");
    }
    arch.validate()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::arch::{Biases, Family, Rope, RopeScaling};

    /// SmolLM2-135M's shape (issue 21's numbers).
    fn smollm2() -> Arch {
        Arch {
            family: Family::Llama,
            n_layer: 30,
            hidden: 576,
            n_head: 9,
            n_kv_head: 3,
            head_dim: 64,
            vocab: 49152,
            context: 8192,
            norm: Norm::RmsNorm { eps: 1e-5 },
            positions: Positions::Rotary(Rope {
                theta: 100000.0,
                scaling: RopeScaling::None,
            }),
            mlp: Mlp::GatedSilu { intermediate: 1536 },
            biases: Biases::NONE,
            qk_norm: false,
            tied_head: true,
            dropout: 0.0,
        }
    }

    #[test]
    fn smollm2_has_its_published_parameter_count() {
        let arch = smollm2();
        let t = LlamaParams::new(&arch, 0.02).unwrap();
        let n: usize = t.specs.iter().map(ParamSpec::numel).sum();
        // 134,515,008: SmolLM2-135M's count as transformers reports it.
        assert_eq!(n, 134_515_008);
        assert_eq!(arch.checked_num_params(), Some(n));
        assert!(t.lm_head.is_none() && t.find("lm_head.weight").is_none());
        assert_eq!(t.specs[t.blocks[0].k].shape, vec![192, 576]);
    }

    #[test]
    fn untied_biased_qk_normed_tables_count_what_the_description_counts() {
        let mut arch = smollm2();
        arch.n_layer = 2;
        arch.vocab = 101;
        arch.head_dim = 18;
        arch.tied_head = false;
        arch.qk_norm = true;
        arch.biases = Biases {
            qkv: true,
            o: true,
            mlp: true,
            norm: false,
        };
        let t = LlamaParams::new(&arch, 0.02).unwrap();
        let n: usize = t.specs.iter().map(ParamSpec::numel).sum();
        assert_eq!(arch.checked_num_params(), Some(n));
        assert_eq!(t.specs[t.lm_head.unwrap()].shape, vec![101, 576]);
        assert_eq!(t.specs[t.blocks[1].o].shape, vec![576, 9 * 18]);
        assert!(t.find("model.layers.1.self_attn.k_norm.weight").is_some());
        assert!(t.find("model.layers.1.mlp.down_proj.bias").is_some());
    }

    #[test]
    fn gpt2_is_refused_naming_what_differs() {
        let cfg = crate::model::GptConfig::preset("gpt2").unwrap();
        let e = LlamaParams::new(&Arch::from(&cfg), 0.02)
            .unwrap_err()
            .to_string();
        assert!(e.contains("RMSNorm"), "{e}");
    }
}
