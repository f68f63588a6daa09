//! The inference engine: a GPT-2 with its KV caches on the GPU. A prompt is prefilled in one pass
//! (in chunks of at most `chunk` tokens, so the logits stay within one binding), then tokens are
//! decoded one at a time against the caches; only the last position's logits come back to the
//! CPU. The same engine scores text (per-position losses, summed on the CPU in f64) and, reset
//! and refed, decodes by full recomputation for comparison.

use std::collections::HashMap;

use crate::error::{Error, Result};
use crate::gpu::{DType, Gpu};
use crate::graph::{ExecOptions, Executor, MicroBatch, ParamStore, TensorId};
use crate::model::gpt::{self, Mode};
use crate::model::{GptConfig, ParamTable};

/// One compiled decoding graph, for a fixed number of new tokens per call.
struct Decoder<'a> {
    exec: Executor<'a>,
    logits: TensorId,
    losses: Option<TensorId>,
}

pub struct Engine<'a> {
    gpu: &'a Gpu,
    pub cfg: GptConfig,
    table: ParamTable,
    store: ParamStore,
    /// Sequences decoded side by side (rows of the caches).
    pub batch: usize,
    /// Positions the caches hold (the model's context).
    pub tmax: usize,
    /// Tokens already in the caches.
    pub pos: usize,
    /// Largest number of tokens fed in one call.
    pub chunk: usize,
    decoders: HashMap<(usize, bool), Decoder<'a>>,
}

impl<'a> Engine<'a> {
    /// Uploads `params` (f32, parameter-table order) with weights stored as `dtype` (f32, or f16
    /// where the adapter has SHADER_F16), and caches for `batch` sequences of the full context.
    pub fn new(
        gpu: &'a Gpu,
        cfg: &GptConfig,
        params: &[Vec<f32>],
        dtype: DType,
        batch: usize,
    ) -> Result<Self> {
        let table = ParamTable::new(cfg);
        let mut store = ParamStore::with_dtype(gpu, &table.store_specs(), params, false, dtype)?;
        let tmax = cfg.block_size;
        store.alloc_kv(
            gpu,
            cfg.n_layer,
            [batch, cfg.n_head, tmax, cfg.head_size()],
            dtype,
        )?;
        // Prefill chunks: at most 256 tokens, and their logits within one binding.
        let row_bytes = (batch * cfg.padded_vocab()) as u64 * 4;
        let chunk = ((gpu.max_binding() / row_bytes) as usize).clamp(1, 256);
        Ok(Engine {
            gpu,
            cfg: cfg.clone(),
            table,
            store,
            batch,
            tmax,
            pos: 0,
            chunk,
            decoders: HashMap::new(),
        })
    }

    fn decoder(&mut self, tq: usize, loss: bool) -> Result<&mut Decoder<'a>> {
        if !self.decoders.contains_key(&(tq, loss)) {
            let g = gpt::build(
                &self.cfg,
                &self.table,
                self.batch,
                tq,
                Mode::Decode {
                    tmax: self.tmax,
                    loss,
                },
            );
            let (logits, losses) = (g.logits, g.losses);
            let exec = Executor::new(self.gpu, g.graph, &self.store, ExecOptions::default())?;
            self.decoders.insert(
                (tq, loss),
                Decoder {
                    exec,
                    logits,
                    losses,
                },
            );
        }
        Ok(self.decoders.get_mut(&(tq, loss)).expect("just inserted"))
    }

    /// Decodes one chunk of `tq` new tokens per sequence at the current position (`batch` holds
    /// them, with targets when `loss`), advancing the position; returns the decoder to read
    /// logits or losses from.
    fn run_chunk(&mut self, batch: MicroBatch, tq: usize, loss: bool) -> Result<&Decoder<'a>> {
        let pos = self.pos;
        self.decoder(tq, loss)?.exec.decode(&batch, pos)?;
        self.pos += tq;
        Ok(&self.decoders[&(tq, loss)])
    }

    /// Decodes one token per sequence (`tokens`, one for each) as `feed` does, then times each
    /// dispatch of that pass (see `Executor::profile_forward`).
    pub fn profile_feed(&mut self, tokens: &[u32]) -> Result<Vec<(String, f64)>> {
        self.feed(tokens, 1)?;
        self.decoders[&(1, false)].exec.profile_forward()
    }

    /// Forgets the cached positions (the caches' contents are simply overwritten later).
    pub fn reset(&mut self) {
        self.pos = 0;
    }

    fn check_room(&self, n: usize) -> Result<()> {
        if self.pos + n > self.tmax {
            return Err(Error::invalid(
                "context",
                format!(
                    "{} tokens would exceed the model's context of {} (n_positions)",
                    self.pos + n,
                    self.tmax
                ),
            ));
        }
        Ok(())
    }

    /// Feeds `n` new tokens for each of the `batch` sequences (`tokens` is (batch, n)), appending
    /// them to the caches, and returns the logits at the last new position of each sequence
    /// (batch rows of the real vocabulary).
    pub fn feed(&mut self, tokens: &[u32], n: usize) -> Result<Vec<Vec<f32>>> {
        crate::gpu::block_on("reading logits", self.feed_async(tokens, n))
    }

    /// `feed`, awaited (a browser reads the logits back through its event loop).
    pub async fn feed_async(&mut self, tokens: &[u32], n: usize) -> Result<Vec<Vec<f32>>> {
        if n == 0 || tokens.len() != n * self.batch {
            return Err(Error::invalid(
                "feed",
                format!(
                    "{} tokens do not form {} sequences of {n}",
                    tokens.len(),
                    self.batch
                ),
            ));
        }
        self.check_room(n)?;
        let (v, vp) = (self.cfg.vocab_size, self.cfg.padded_vocab());
        if let Some((i, &t)) = tokens.iter().enumerate().find(|(_, t)| **t as usize >= v) {
            return Err(Error::invalid(
                "tokens",
                format!("token id {t} at position {i} is outside the vocabulary of {v}"),
            ));
        }
        let mut done = 0;
        let mut last = Vec::new();
        while done < n {
            let tq = (n - done).min(self.chunk);
            let b = self.batch;
            let part: Vec<u32> = (0..b)
                .flat_map(|r| tokens[r * n + done..r * n + done + tq].iter().copied())
                .collect();
            let gpu = self.gpu;
            let batch = MicroBatch {
                tokens: part,
                targets: Vec::new(),
            };
            let dec = self.run_chunk(batch, tq, false)?;
            if done + tq == n {
                let logits = dec.exec.view(dec.logits).clone();
                for r in 0..b {
                    let row = logits.slice((r * tq + tq - 1) * vp, v, "logits.last")?;
                    last.push(gpu.read_f32_async(&row).await?);
                }
            }
            done += tq;
        }
        Ok(last)
    }

    /// The summed negative log-likelihood of `targets` given `inputs` (one sequence, batch 1)
    /// starting from an empty cache, and the number of predicted tokens.
    pub fn nll(&mut self, inputs: &[u32], targets: &[u32]) -> Result<(f64, usize)> {
        assert_eq!(self.batch, 1, "scoring runs one sequence at a time");
        assert_eq!(inputs.len(), targets.len());
        self.reset();
        self.check_room(inputs.len())?;
        let mut sum = 0.0f64;
        let mut done = 0;
        while done < inputs.len() {
            let tq = (inputs.len() - done).min(self.chunk);
            let gpu = self.gpu;
            let batch = MicroBatch {
                tokens: inputs[done..done + tq].to_vec(),
                targets: targets[done..done + tq].to_vec(),
            };
            let dec = self.run_chunk(batch, tq, true)?;
            let losses = gpu.read_f32(dec.exec.view(dec.losses.expect("graph with losses")))?;
            sum += losses.iter().map(|&l| l as f64).sum::<f64>();
            done += tq;
        }
        if !sum.is_finite() {
            return Err(Error::invalid(
                "score",
                "the loss is not finite (a target outside the vocabulary?)",
            ));
        }
        Ok((sum, inputs.len()))
    }
}
