//! The parameter table of GPT-2: names in the Hugging Face `GPT2LMHeadModel` layout, shapes in
//! ours, initialization, and which tensors take weight decay.
//!
//! Linear weights are stored (out, in) here, the transpose of Hugging Face's Conv1D (in, out);
//! the token embedding is stored with the padded vocabulary (Vp, C), its extra rows zero.

use super::config::GptConfig;
use crate::rng::Rng;

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Init {
    Normal(f32),
    Zeros,
    Ones,
}

#[derive(Clone, Debug)]
pub struct ParamSpec {
    /// Hugging Face name, e.g. `transformer.h.0.attn.c_attn.weight`.
    pub name: String,
    /// Our shape: linear weights (out, in); wte (Vp, C).
    pub shape: Vec<usize>,
    pub init: Init,
    /// nanoGPT's rule: tensors of two or more dimensions decay, the rest does not.
    pub decay: bool,
    /// Stored transposed (Conv1D orientation) in Hugging Face checkpoints.
    pub hf_transposed: bool,
}

impl ParamSpec {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// (name, shape) of each of `specs`: what a `graph::ParamStore` lays out.
pub fn store_specs(specs: &[ParamSpec]) -> Vec<(String, Vec<usize>)> {
    specs
        .iter()
        .map(|s| (s.name.clone(), s.shape.clone()))
        .collect()
}

/// Indices into the parameter table for one transformer block.
#[derive(Clone, Copy, Debug)]
pub struct BlockParams {
    pub ln_1_w: usize,
    pub ln_1_b: Option<usize>,
    pub c_attn_w: usize,
    pub c_attn_b: Option<usize>,
    pub attn_proj_w: usize,
    pub attn_proj_b: Option<usize>,
    pub ln_2_w: usize,
    pub ln_2_b: Option<usize>,
    pub c_fc_w: usize,
    pub c_fc_b: Option<usize>,
    pub mlp_proj_w: usize,
    pub mlp_proj_b: Option<usize>,
}

/// The whole table, with the index of every tensor by role.
#[derive(Clone, Debug)]
pub struct ParamTable {
    pub specs: Vec<ParamSpec>,
    pub wte: usize,
    pub wpe: usize,
    pub blocks: Vec<BlockParams>,
    pub ln_f_w: usize,
    pub ln_f_b: Option<usize>,
}

/// The standard deviation of the initial weights.
const STD: f32 = 0.02;

/// The table being built, in Hugging Face order.
struct Specs {
    list: Vec<ParamSpec>,
    /// Whether the linear layers and LayerNorms have biases.
    bias: bool,
}

impl Specs {
    /// Appends a tensor and returns its index; tensors of two or more dimensions decay.
    fn add(&mut self, name: String, shape: Vec<usize>, init: Init, transposed: bool) -> usize {
        let decay = shape.len() >= 2;
        self.list.push(ParamSpec {
            name,
            shape,
            init,
            decay,
            hf_transposed: transposed,
        });
        self.list.len() - 1
    }

    /// Appends a zero-initialized bias of `n` values, if the model has biases.
    fn bias(&mut self, name: String, n: usize) -> Option<usize> {
        self.bias
            .then(|| self.add(name, vec![n], Init::Zeros, false))
    }

    /// Appends the tensors of transformer block `l`.
    fn block(&mut self, cfg: &GptConfig, l: usize) -> BlockParams {
        let c = cfg.n_embd;
        // GPT-2 scales the residual projections by 1/sqrt(2 · n_layer).
        let proj_std = STD / (2.0 * cfg.n_layer as f32).sqrt();
        let p = format!("transformer.h.{l}.");
        let ln_1_w = self.add(format!("{p}ln_1.weight"), vec![c], Init::Ones, false);
        let ln_1_b = self.bias(format!("{p}ln_1.bias"), c);
        let c_attn_w = self.add(
            format!("{p}attn.c_attn.weight"),
            vec![3 * c, c],
            Init::Normal(STD),
            true,
        );
        let c_attn_b = self.bias(format!("{p}attn.c_attn.bias"), 3 * c);
        let attn_proj_w = self.add(
            format!("{p}attn.c_proj.weight"),
            vec![c, c],
            Init::Normal(proj_std),
            true,
        );
        let attn_proj_b = self.bias(format!("{p}attn.c_proj.bias"), c);
        let ln_2_w = self.add(format!("{p}ln_2.weight"), vec![c], Init::Ones, false);
        let ln_2_b = self.bias(format!("{p}ln_2.bias"), c);
        let c_fc_w = self.add(
            format!("{p}mlp.c_fc.weight"),
            vec![4 * c, c],
            Init::Normal(STD),
            true,
        );
        let c_fc_b = self.bias(format!("{p}mlp.c_fc.bias"), 4 * c);
        let mlp_proj_w = self.add(
            format!("{p}mlp.c_proj.weight"),
            vec![c, 4 * c],
            Init::Normal(proj_std),
            true,
        );
        let mlp_proj_b = self.bias(format!("{p}mlp.c_proj.bias"), c);
        BlockParams {
            ln_1_w,
            ln_1_b,
            c_attn_w,
            c_attn_b,
            attn_proj_w,
            attn_proj_b,
            ln_2_w,
            ln_2_b,
            c_fc_w,
            c_fc_b,
            mlp_proj_w,
            mlp_proj_b,
        }
    }
}

impl ParamTable {
    pub fn new(cfg: &GptConfig) -> ParamTable {
        let c = cfg.n_embd;
        let mut specs = Specs {
            list: Vec::new(),
            bias: cfg.bias,
        };
        let wte = specs.add(
            "transformer.wte.weight".into(),
            vec![cfg.padded_vocab(), c],
            Init::Normal(STD),
            false,
        );
        let wpe = specs.add(
            "transformer.wpe.weight".into(),
            vec![cfg.block_size, c],
            Init::Normal(STD),
            false,
        );
        let blocks = (0..cfg.n_layer).map(|l| specs.block(cfg, l)).collect();
        let ln_f_w = specs.add("transformer.ln_f.weight".into(), vec![c], Init::Ones, false);
        let ln_f_b = specs.bias("transformer.ln_f.bias".into(), c);
        ParamTable {
            specs: specs.list,
            wte,
            wpe,
            blocks,
            ln_f_w,
            ln_f_b,
        }
    }

    /// (name, shape) of every parameter, for `graph::ParamStore`.
    pub fn store_specs(&self) -> Vec<(String, Vec<usize>)> {
        store_specs(&self.specs)
    }

    /// The linear layers' weights (out, in), block by block: the layers an adapter may target
    /// (the tied lm head is the token embedding, not one of them).
    pub fn linear_weights(&self) -> Vec<usize> {
        self.blocks
            .iter()
            .flat_map(|b| [b.c_attn_w, b.attn_proj_w, b.c_fc_w, b.mlp_proj_w])
            .collect()
    }

    pub fn find(&self, name: &str) -> Option<usize> {
        self.specs.iter().position(|s| s.name == name)
    }

    /// Fresh GPT-2 initialization, reproducible from `seed`. The padded rows of wte stay zero.
    pub fn init(&self, cfg: &GptConfig, seed: u64) -> Vec<Vec<f32>> {
        let mut rng = Rng::new(seed);
        self.specs
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let n = s.numel();
                match s.init {
                    Init::Zeros => vec![0.0; n],
                    Init::Ones => vec![1.0; n],
                    Init::Normal(std) => {
                        let real = if i == self.wte {
                            cfg.vocab_size * cfg.n_embd
                        } else {
                            n
                        };
                        let mut v = rng.vec_normal(real, std);
                        v.resize(n, 0.0);
                        v
                    }
                }
            })
            .collect()
    }
}
