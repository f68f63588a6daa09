//! Inference: the KV-cache engine, sampling, and generation.

pub mod chat;
pub mod engine;
pub mod llama;
pub mod sampling;

pub use engine::Engine;
pub use sampling::SampleOptions;

use crate::error::Result;
use crate::rng::Rng;

/// What `generate` produced.
#[derive(Clone, Debug, Default)]
pub struct Generation {
    /// New tokens of each sample.
    pub ids: Vec<Vec<u32>>,
    /// Generation ended because the context was full.
    pub hit_context: bool,
}

/// Generates up to `max_new` tokens after `prompt` for each of the engine's `batch` samples:
/// one prefill pass over the prompt, then one decoding pass per token against the KV caches.
/// `on_token(sample, id)` sees every token as it is produced. Stops early at the context limit
/// (`hit_context`).
pub fn generate(
    engine: &mut Engine,
    prompt: &[u32],
    max_new: usize,
    opts: &SampleOptions,
    rng: &mut Rng,
    on_token: impl FnMut(usize, u32) -> Result<()>,
) -> Result<Generation> {
    crate::gpu::block_on(
        "generating",
        generate_async(engine, prompt, max_new, opts, rng, on_token),
    )
}

/// `generate`, awaited (a browser reads each token's logits back through its event loop).
pub async fn generate_async(
    engine: &mut Engine<'_>,
    prompt: &[u32],
    max_new: usize,
    opts: &SampleOptions,
    rng: &mut Rng,
    on_token: impl FnMut(usize, u32) -> Result<()>,
) -> Result<Generation> {
    let tokens: Vec<u32> = (0..engine.batch)
        .flat_map(|_| prompt.iter().copied())
        .collect();
    let pick = |l: &[f32]| sampling::sample(l, opts, rng);
    decode_async(engine, (&tokens, prompt.len()), max_new, pick, on_token).await
}

/// Up to `max_new` tokens after `tokens` ((batch, n): a prompt per sequence), each chosen from
/// its sequence's logits by `pick`: one prefill pass, then one decoding pass per token for the
/// whole batch. `on_token(sequence, id)` sees every token as it is produced.
async fn decode_async(
    engine: &mut Engine<'_>,
    (tokens, n): (&[u32], usize),
    max_new: usize,
    mut pick: impl FnMut(&[f32]) -> u32,
    mut on_token: impl FnMut(usize, u32) -> Result<()>,
) -> Result<Generation> {
    engine.reset();
    let mut out = Generation {
        ids: vec![Vec::new(); engine.batch],
        hit_context: false,
    };
    if max_new == 0 {
        return Ok(out);
    }
    let mut logits = engine.feed_async(tokens, n).await?;
    loop {
        let next: Vec<u32> = logits.iter().map(|l| pick(l)).collect();
        for (s, &id) in next.iter().enumerate() {
            out.ids[s].push(id);
            on_token(s, id)?;
        }
        if out.ids[0].len() == max_new {
            return Ok(out);
        }
        if engine.pos == engine.tmax {
            out.hit_context = true;
            return Ok(out);
        }
        logits = engine.feed_async(&next, 1).await?;
    }
}

/// Greedy continuations of `prompts` (one per sequence of the engine's batch, all of one
/// length), decoded side by side: one prefill pass over every prompt, then one pass per token
/// for the whole batch. Each row's tokens are those `generate` would give it alone, but for the
/// rounding of products over a batch of another size (the same sums, split over other tiles).
/// Stops early at the context limit.
pub fn greedy_each(
    engine: &mut Engine,
    prompts: &[Vec<u32>],
    max_new: usize,
) -> Result<Vec<Vec<u32>>> {
    let n = prompts.first().map_or(0, Vec::len);
    if prompts.len() != engine.batch || prompts.iter().any(|p| p.len() != n) || n == 0 {
        return Err(crate::error::Error::invalid(
            "prompts",
            format!(
                "{} prompts for a batch of {}: one per sequence, all of one non-zero length",
                prompts.len(),
                engine.batch
            ),
        ));
    }
    let tokens = prompts.concat();
    let greedy = decode_async(engine, (&tokens, n), max_new, sampling::argmax, |_, _| {
        Ok(())
    });
    Ok(crate::gpu::block_on("generating", greedy)?.ids)
}

/// What `score` measured.
#[derive(Clone, Copy, Debug)]
pub struct Score {
    /// Summed negative log-likelihood over every predicted token.
    pub nll: f64,
    pub tokens: usize,
    pub windows: usize,
}

impl Score {
    /// Mean cross-entropy in nats per token.
    pub fn loss(&self) -> f64 {
        self.nll / self.tokens.max(1) as f64
    }

    pub fn perplexity(&self) -> f64 {
        self.loss().exp()
    }
}

/// Scores `ids` in windows of `t + 1` tokens starting at 0, t, 2t, ... (consecutive windows share
/// their boundary token; the last may be shorter), each predicting its tokens after the first.
/// `on_window(done, total)` reports progress.
pub fn score(
    engine: &mut Engine,
    ids: &[u32],
    t: usize,
    mut on_window: impl FnMut(usize, usize),
) -> Result<Score> {
    if ids.len() < 2 {
        return Err(crate::Error::invalid(
            "score",
            format!("{} tokens: at least 2 are needed to predict one", ids.len()),
        ));
    }
    if t == 0 || t > engine.tmax {
        return Err(crate::Error::invalid(
            "--block-size",
            format!(
                "{t} must be between 1 and the model's context {}",
                engine.tmax
            ),
        ));
    }
    let starts: Vec<usize> = (0..ids.len() - 1).step_by(t).collect();
    let mut s = Score {
        nll: 0.0,
        tokens: 0,
        windows: 0,
    };
    for (k, &start) in starts.iter().enumerate() {
        let end = (start + t + 1).min(ids.len());
        let (nll, n) = engine.nll(&ids[start..end - 1], &ids[start + 1..end])?;
        s.nll += nll;
        s.tokens += n;
        s.windows += 1;
        on_window(k + 1, starts.len());
    }
    Ok(s)
}
