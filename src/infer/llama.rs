//! Inference for the Llama family, one sequence at a time: decoding against a KV cache (the
//! prompt in one pass, then one pass per token, as GPT-2's `Engine` does; the cache holds each
//! key/value head's keys and values once, NKV of them, not NH), or by full recomputation, which
//! reruns the whole sequence for each token. Recomputation builds graphs for lengths in steps of
//! `LENGTH_STEP` and keeps them: a shorter sequence is padded at the end, which the causal
//! attention keeps from every position before it, and only its own positions are read.
//! Generation ends at the checkpoint's eos ids (generation_config.json's, else config.json's)
//! or at the context.

use std::collections::HashMap;
use std::collections::hash_map::Entry;

use super::sampling::{self, SampleOptions};
use super::{Generation, Score};
use crate::error::{Error, Result};
use crate::gpu::{DType, Gpu};
use crate::graph::{ExecOptions, Executor, MicroBatch, ParamStore, TensorId};
use crate::io::hf_weights::LlamaCheckpoint;
use crate::model::gpt::Mode;
use crate::model::llama;
use crate::model::{Arch, llama_params::LlamaParams};
use crate::rng::Rng;

/// Graph lengths are multiples of this (or the whole context).
const LENGTH_STEP: usize = 32;

/// One compiled forward graph of one sequence of fixed length.
struct Forward<'a> {
    /// Positions of the graph.
    t: usize,
    exec: Executor<'a>,
    logits: TensorId,
    losses: Option<TensorId>,
}

/// A Llama-family model on the host: its description, parameter table and f32 values in table
/// order.
#[derive(Clone, Copy)]
pub struct Model<'m> {
    pub arch: &'m Arch,
    pub table: &'m LlamaParams,
    pub params: &'m [Vec<f32>],
}

/// A Llama-family model on the GPU, run one sequence at a time.
pub struct LlamaRunner<'a> {
    gpu: &'a Gpu,
    pub arch: Arch,
    table: LlamaParams,
    store: ParamStore,
    /// The weights' and the KV cache's element type (f32, or f16 on adapters with SHADER_F16).
    dtype: DType,
    /// The ids that end generation.
    pub eos: Vec<u32>,
    /// Graphs by (length, with loss).
    graphs: HashMap<(usize, bool), Forward<'a>>,
    /// With a KV cache: the decoding graphs by tokens per call, and the tokens in the cache.
    cache: Option<(HashMap<usize, Forward<'a>>, usize)>,
}

impl<'a> LlamaRunner<'a> {
    /// Uploads the checkpoint's weights, the matrices stored as `dtype` (f32, or f16 where the
    /// adapter has SHADER_F16; the norms' weights and the biases stay f32).
    pub fn new(gpu: &'a Gpu, ck: &LlamaCheckpoint, dtype: DType) -> Result<Self> {
        let model = Model {
            arch: &ck.cfg.arch,
            table: &ck.table,
            params: &ck.params,
        };
        Self::upload(gpu, model, ck.eos_token_ids.clone(), dtype)
    }

    /// Uploads the weights of `model` as `new` does, generation ending at the ids `eos`.
    pub fn upload(gpu: &'a Gpu, model: Model, eos: Vec<u32>, dtype: DType) -> Result<Self> {
        let store =
            ParamStore::with_dtype(gpu, &model.table.store_specs(), model.params, false, dtype)?;
        Ok(LlamaRunner {
            gpu,
            arch: model.arch.clone(),
            table: model.table.clone(),
            store,
            dtype,
            eos,
            graphs: HashMap::new(),
            cache: None,
        })
    }

    /// `new`, with a KV cache of the whole context: `next` then runs only the new tokens.
    pub fn with_cache(gpu: &'a Gpu, ck: &LlamaCheckpoint, dtype: DType) -> Result<Self> {
        let mut r = Self::new(gpu, ck, dtype)?;
        r.add_cache()?;
        Ok(r)
    }

    /// Allocates a KV cache of the whole context (the keys and values of each key/value head,
    /// once, in the weights' element type): `next` then runs only the new tokens.
    pub fn add_cache(&mut self) -> Result<()> {
        let a = &self.arch;
        let shape = [1, a.n_kv_head, a.context, a.head_dim];
        self.store
            .alloc_kv(self.gpu, a.n_layer, shape, self.dtype)?;
        self.cache = Some((HashMap::new(), 0));
        Ok(())
    }

    /// Bytes of the KV cache `add_cache` allocates for `arch` in `dtype`.
    pub fn cache_bytes(arch: &Arch, dtype: DType) -> u128 {
        let per_layer = 2 * (arch.n_kv_head * arch.context * arch.head_dim) as u128;
        per_layer * arch.n_layer as u128 * dtype.size() as u128
    }

    /// Forgets the cached positions (a new sequence starts).
    pub fn reset(&mut self) {
        if let Some((_, pos)) = &mut self.cache {
            *pos = 0;
        }
    }

    /// The logits (V) of the token after `ids`. With a KV cache, `ids` extend the sequence fed
    /// since the last `reset` and only the new tokens run; otherwise the whole sequence does.
    pub fn next(&mut self, ids: &[u32]) -> Result<Vec<f32>> {
        crate::gpu::block_on("reading logits", self.next_async(ids))
    }

    /// `next`, awaited (a browser reads the logits back through its event loop).
    pub async fn next_async(&mut self, ids: &[u32]) -> Result<Vec<f32>> {
        let Some((_, pos)) = &self.cache else {
            return self.next_logits_async(ids).await;
        };
        let pos = *pos;
        if ids.len() <= pos {
            return Err(Error::invalid(
                "decode",
                format!(
                    "{} tokens, {pos} of them already cached: none new",
                    ids.len()
                ),
            ));
        }
        self.check(ids, ids.len())?;
        let (gpu, v, tmax) = (self.gpu, self.arch.vocab, self.arch.context);
        let new = &ids[pos..];
        let tq = new.len();
        let decoders = &mut self.cache.as_mut().expect("checked above").0;
        let f = match decoders.entry(tq) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(e) => {
                let mode = Mode::Decode { tmax, loss: false };
                let g = llama::build(&self.arch, &self.table, 1, tq, mode)?;
                let exec = Executor::new(gpu, g.graph, &self.store, ExecOptions::default())?;
                e.insert(Forward {
                    t: tq,
                    exec,
                    logits: g.logits,
                    losses: None,
                })
            }
        };
        let batch = MicroBatch {
            tokens: new.to_vec(),
            targets: Vec::new(),
        };
        f.exec.decode(&batch, pos)?;
        let last = f
            .exec
            .view(f.logits)
            .slice((tq - 1) * v, v, "logits.last")?;
        let logits = gpu.read_f32_async(&last).await?;
        self.cache.as_mut().expect("checked above").1 = ids.len();
        Ok(logits)
    }

    /// Decodes the last token of `ids` (the others already cached) as `next` does, then times
    /// each dispatch of that token's pass (see `Executor::profile_forward`).
    pub fn profile_next(&mut self, ids: &[u32]) -> Result<Vec<(String, f64)>> {
        let before = self.cache.as_ref().map(|c| c.1);
        if before.is_none_or(|pos| pos + 1 != ids.len()) {
            return Err(Error::invalid(
                "profile",
                "profiling decodes one new token against the KV cache",
            ));
        }
        self.next(ids)?;
        let decoders = &self.cache.as_ref().expect("checked above").0;
        decoders[&1].exec.profile_forward()
    }

    /// The graph for sequences of `n` tokens: of the next multiple of `LENGTH_STEP`, at most
    /// the context.
    fn forward(&mut self, n: usize, loss: bool) -> Result<&mut Forward<'a>> {
        let t = n
            .next_multiple_of(LENGTH_STEP)
            .min(self.arch.context)
            .max(n);
        if !self.graphs.contains_key(&(t, loss)) {
            let mode = if loss { Mode::Eval } else { Mode::Logits };
            let g = llama::build(&self.arch, &self.table, 1, t, mode)?;
            let (logits, losses) = (g.logits, g.losses);
            let exec = Executor::new(self.gpu, g.graph, &self.store, ExecOptions::default())?;
            let f = Forward {
                t,
                exec,
                logits,
                losses,
            };
            self.graphs.insert((t, loss), f);
        }
        Ok(self.graphs.get_mut(&(t, loss)).expect("just inserted"))
    }

    /// Fails unless `ids` are within the vocabulary and `n` positions within the context.
    fn check(&self, ids: &[u32], n: usize) -> Result<()> {
        if let Some((pos, id)) = ids
            .iter()
            .enumerate()
            .find(|&(_, &id)| id as usize >= self.arch.vocab)
        {
            return Err(Error::invalid(
                "tokens",
                format!(
                    "token id {id} at position {pos} is outside the model's vocabulary of {}",
                    self.arch.vocab
                ),
            ));
        }
        if n == 0 || n > self.arch.context {
            return Err(Error::invalid(
                "context",
                format!(
                    "{n} positions: between 1 and the model's context of {} (max_position_embeddings)",
                    self.arch.context
                ),
            ));
        }
        Ok(())
    }

    /// The logits (V) of the token after `ids`, the whole sequence run.
    pub fn next_logits(&mut self, ids: &[u32]) -> Result<Vec<f32>> {
        crate::gpu::block_on("reading logits", self.next_logits_async(ids))
    }

    /// `next_logits`, awaited.
    pub async fn next_logits_async(&mut self, ids: &[u32]) -> Result<Vec<f32>> {
        self.check(ids, ids.len())?;
        let (gpu, v) = (self.gpu, self.arch.vocab);
        let n = ids.len();
        let f = self.forward(n, false)?;
        let batch = MicroBatch {
            tokens: padded(ids, f.t),
            targets: Vec::new(),
        };
        f.exec.forward(&batch)?;
        let last = f.exec.view(f.logits).slice((n - 1) * v, v, "logits.last")?;
        gpu.read_f32_async(&last).await
    }

    /// The summed negative log-likelihood of `targets` after each prefix of `inputs` (f64).
    fn nll(&mut self, inputs: &[u32], targets: &[u32]) -> Result<f64> {
        self.check(inputs, inputs.len())?;
        self.check(targets, targets.len())?;
        let gpu = self.gpu;
        let n = inputs.len();
        let f = self.forward(n, true)?;
        let batch = MicroBatch {
            tokens: padded(inputs, f.t),
            targets: padded(targets, f.t),
        };
        f.exec.forward(&batch)?;
        let losses = f.losses.expect("an Eval graph has per-position losses");
        let losses = gpu.read_f32(f.exec.view(losses))?;
        Ok(losses[..n].iter().map(|&l| l as f64).sum())
    }
}

/// `ids` followed by zeros up to `t` tokens.
fn padded(ids: &[u32], t: usize) -> Vec<u32> {
    let mut v = ids.to_vec();
    v.resize(t, 0);
    v
}

/// Up to `max_new` tokens after `prompt`, each from the logits of the whole sequence so far;
/// stops after an eos id (kept in the output) or when the context is full (`hit_context`).
/// `on_token(id)` sees every token as it is produced.
pub fn generate(
    runner: &mut LlamaRunner,
    prompt: &[u32],
    max_new: usize,
    opts: &SampleOptions,
    rng: &mut Rng,
    on_token: impl FnMut(u32) -> Result<()>,
) -> Result<Generation> {
    crate::gpu::block_on(
        "generating",
        generate_async(runner, prompt, max_new, opts, rng, on_token),
    )
}

/// `generate`, awaited (a browser reads each token's logits back through its event loop).
pub async fn generate_async(
    runner: &mut LlamaRunner<'_>,
    prompt: &[u32],
    max_new: usize,
    opts: &SampleOptions,
    rng: &mut Rng,
    mut on_token: impl FnMut(u32) -> Result<()>,
) -> Result<Generation> {
    runner.reset();
    let mut ids = prompt.to_vec();
    let mut out = Generation {
        ids: vec![Vec::new()],
        hit_context: false,
    };
    for _ in 0..max_new {
        if ids.len() >= runner.arch.context {
            out.hit_context = true;
            break;
        }
        let logits = runner.next_async(&ids).await?;
        let id = sampling::sample(&logits, opts, rng);
        on_token(id)?;
        ids.push(id);
        out.ids[0].push(id);
        if runner.eos.contains(&id) {
            break;
        }
    }
    Ok(out)
}

/// `generate` `n` times from the same prompt, one sequence after another (the cache holds one),
/// the random draws continuing from sample to sample; `on_token(sample, id)` sees every token.
/// `hit_context` when any sample filled the context.
pub fn generate_samples(
    runner: &mut LlamaRunner,
    prompt: &[u32],
    (n, max_new): (usize, usize),
    opts: &SampleOptions,
    rng: &mut Rng,
    mut on_token: impl FnMut(usize, u32) -> Result<()>,
) -> Result<Generation> {
    let mut all = Generation {
        ids: Vec::with_capacity(n),
        hit_context: false,
    };
    for k in 0..n {
        let g = generate(runner, prompt, max_new, opts, rng, |id| on_token(k, id))?;
        all.ids.extend(g.ids);
        all.hit_context |= g.hit_context;
    }
    Ok(all)
}

/// `infer::score` for a Llama-family model: windows of `t + 1` tokens starting at 0, t, 2t, ...
/// (the last shorter), each predicting its tokens after the first.
pub fn score(runner: &mut LlamaRunner, ids: &[u32], t: usize) -> Result<Score> {
    if ids.len() < 2 {
        return Err(Error::invalid(
            "score",
            format!("{} tokens: at least 2 are needed to predict one", ids.len()),
        ));
    }
    if t == 0 || t > runner.arch.context {
        return Err(Error::invalid(
            "--block-size",
            format!(
                "{t} must be between 1 and the model's context {}",
                runner.arch.context
            ),
        ));
    }
    let mut s = Score {
        nll: 0.0,
        tokens: 0,
        windows: 0,
    };
    for start in (0..ids.len() - 1).step_by(t) {
        let end = (start + t + 1).min(ids.len());
        s.nll += runner.nll(&ids[start..end - 1], &ids[start + 1..end])?;
        s.tokens += end - start - 1;
        s.windows += 1;
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::LlamaRunner;
    use crate::gpu::DType;
    use crate::model::Arch;

    /// SmolLM2-135M's cache holds its 3 key/value heads, not its 9 query heads: 2 (k and v) ·
    /// 30 layers · 3 heads · 8192 positions · 64 · 4 bytes.
    #[test]
    fn the_cache_holds_the_key_value_heads() {
        let arch = Arch::preset("smollm2-135m").expect("a preset");
        assert_eq!((arch.n_head, arch.n_kv_head), (9, 3));
        let want = 2 * 30 * 3 * arch.context as u128 * 64 * 4;
        assert_eq!(LlamaRunner::cache_bytes(&arch, DType::F32), want);
        assert_eq!(LlamaRunner::cache_bytes(&arch, DType::F16), want / 2);
    }
}
