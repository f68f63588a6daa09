//! Inference: sampling from logits, and generation.

pub mod sampling;

use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::graph::{ExecOptions, Executor, MicroBatch, ParamStore};
use crate::model::gpt::{self, Mode};
use crate::model::{GptConfig, ParamTable};
use crate::rng::Rng;
pub use sampling::SampleOptions;

/// Generation by full recomputation: every new token runs the whole context through the model.
/// Simple and exact; the reference the KV-cache decoder is checked against.
pub struct Recompute<'a> {
    gpu: &'a Gpu,
    cfg: GptConfig,
    exec: Executor<'a>,
    logits: usize,
    _store: ParamStore,
}

impl<'a> Recompute<'a> {
    pub fn new(gpu: &'a Gpu, cfg: &GptConfig, params: &[Vec<f32>]) -> Result<Self> {
        let table = ParamTable::new(cfg);
        let store = ParamStore::new(gpu, &table.store_specs(), params, false)?;
        let g = gpt::build(cfg, &table, 1, cfg.block_size, Mode::Logits);
        let logits = g.logits;
        let exec = Executor::new(gpu, g.graph, &store, ExecOptions::default())?;
        Ok(Recompute {
            gpu,
            cfg: cfg.clone(),
            exec,
            logits,
            _store: store,
        })
    }

    /// The logits (the real vocabulary, without padding) at the last position of `context`.
    pub fn next_logits(&mut self, context: &[u32]) -> Result<Vec<f32>> {
        let t = self.cfg.block_size;
        if context.is_empty() || context.len() > t {
            return Err(Error::invalid(
                "generate",
                format!("context of {} tokens must hold 1..={t}", context.len()),
            ));
        }
        let mut tokens = context.to_vec();
        // Causal attention: the padding after the context cannot change its logits.
        tokens.resize(t, 0);
        self.exec.forward(&MicroBatch {
            tokens,
            targets: Vec::new(),
        })?;
        let vp = self.cfg.padded_vocab();
        let row = self.exec.view(self.logits).slice(
            (context.len() - 1) * vp,
            self.cfg.vocab_size,
            "logits.last",
        );
        self.gpu.read_f32(&row)
    }

    /// Appends up to `max_new` tokens to `prompt`, calling `on_token` as each is produced. When the
    /// context is full, the window slides (the oldest tokens drop out).
    pub fn generate(
        &mut self,
        prompt: &[u32],
        max_new: usize,
        opts: &SampleOptions,
        rng: &mut Rng,
        mut on_token: impl FnMut(u32) -> Result<()>,
    ) -> Result<Vec<u32>> {
        let mut ids = prompt.to_vec();
        let t = self.cfg.block_size;
        for _ in 0..max_new {
            let start = ids.len().saturating_sub(t);
            let logits = self.next_logits(&ids[start..])?;
            let next = sampling::sample(&logits, opts, rng);
            ids.push(next);
            on_token(next)?;
        }
        Ok(ids[prompt.len()..].to_vec())
    }
}
