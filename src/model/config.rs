//! GPT-2 model configuration (nanoGPT's names) and the padded vocabulary.

use crate::error::{Error, Result};

/// The vocabulary is padded internally to a multiple of this, so GEMM tiles and rows stay aligned.
pub const VOCAB_PAD: usize = 64;

#[derive(Clone, Debug, PartialEq)]
pub struct GptConfig {
    pub n_layer: usize,
    pub n_head: usize,
    pub n_embd: usize,
    /// Context length: rows of the position table.
    pub block_size: usize,
    /// Real vocabulary size (tokens 0..vocab_size).
    pub vocab_size: usize,
    /// Dropout probability on the embeddings, the attention probabilities and the residual branches.
    pub dropout: f32,
    /// Biases in the linear layers and LayerNorms (GPT-2 has them).
    pub bias: bool,
}

impl GptConfig {
    /// The vocabulary rounded up to a multiple of `VOCAB_PAD`; rows beyond `vocab_size` stay zero,
    /// and their logits are ignored by the loss and by sampling.
    pub fn padded_vocab(&self) -> usize {
        self.vocab_size.div_ceil(VOCAB_PAD) * VOCAB_PAD
    }

    pub fn head_size(&self) -> usize {
        self.n_embd / self.n_head
    }

    /// Checks the shape is buildable; errors name the offending field.
    pub fn validate(&self) -> Result<()> {
        let bad =
            |what: &str, msg: String| Err(Error::invalid(format!("model config: {what}"), msg));
        for (name, v) in [
            ("n_layer", self.n_layer),
            ("n_head", self.n_head),
            ("n_embd", self.n_embd),
            ("block_size", self.block_size),
            ("vocab_size", self.vocab_size),
        ] {
            if v == 0 {
                return bad(name, "must be at least 1".into());
            }
        }
        if !self.n_embd.is_multiple_of(self.n_head) {
            return bad(
                "n_embd",
                format!("{} is not divisible by n_head {}", self.n_embd, self.n_head),
            );
        }
        if self.checked_num_params().is_none() {
            return bad(
                "n_layer",
                format!(
                    "{} layers of {} channels, vocabulary {}, block size {}: the parameter \
                     count overflows",
                    self.n_layer, self.n_embd, self.vocab_size, self.block_size
                ),
            );
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return bad("dropout", format!("{} is not in [0, 1)", self.dropout));
        }
        Ok(())
    }

    /// Number of parameters (with the tied lm head counted once, the real vocabulary, and the
    /// position table), as GPT-2 papers count them.
    pub fn num_params(&self) -> usize {
        self.checked_num_params()
            .expect("a validated config's parameter count fits in usize")
    }

    /// `num_params`, or `None` when the count (or the padded vocabulary) overflows usize: a
    /// config read from a file can declare any size.
    pub fn checked_num_params(&self) -> Option<usize> {
        let c = self.n_embd as u128;
        let b = if self.bias { 1 } else { 0 };
        let per_layer = 2 * (c + b * c)      // ln_1, ln_2
            + c * 3 * c + b * 3 * c           // c_attn
            + c * c + b * c                   // attn c_proj
            + c * 4 * c + b * 4 * c           // c_fc
            + 4 * c * c + b * c; //               mlp c_proj
        let n = (self.vocab_size as u128 * c)
            .checked_add(self.block_size as u128 * c)?
            .checked_add((self.n_layer as u128).checked_mul(per_layer)?)?
            .checked_add(c + b * c)?;
        // The padded token table is the largest tensor; it must be addressable too.
        let padded = self.vocab_size.checked_next_multiple_of(VOCAB_PAD)? as u128 * c;
        usize::try_from(n.max(padded)).ok()?;
        usize::try_from(n).ok()
    }

    /// Parameters as stored (the padded vocabulary, biases if any), counted without overflow
    /// for any field values.
    pub fn stored_params(&self) -> u128 {
        let (c, l) = (self.n_embd as u128, self.n_layer as u128);
        let b = self.bias as u128;
        let per_layer = 2 * c + 12 * c * c + 11 * b * c;
        let vp = (self.vocab_size as u128).div_ceil(VOCAB_PAD as u128) * VOCAB_PAD as u128;
        vp * c + self.block_size as u128 * c + l * per_layer + c + b * c
    }

    /// Bytes training holds for the parameters: f32 values, gradients and both AdamW moments.
    pub fn training_bytes(&self) -> u128 {
        self.stored_params() * 4 * 4
    }

    /// Named GPT-2 shapes (`gpt2`, `gpt2-medium`, `gpt2-large`, `gpt2-xl`) for benchmarks.
    pub fn preset(name: &str) -> Option<GptConfig> {
        let (n_layer, n_head, n_embd) = match name {
            "gpt2" => (12, 12, 768),
            "gpt2-medium" => (24, 16, 1024),
            "gpt2-large" => (36, 20, 1280),
            "gpt2-xl" => (48, 25, 1600),
            _ => return None,
        };
        Some(GptConfig {
            n_layer,
            n_head,
            n_embd,
            block_size: 1024,
            vocab_size: 50257,
            dropout: 0.0,
            bias: true,
        })
    }
}
