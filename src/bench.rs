//! `shaderformer bench`: training-step and inference throughput on random weights of any GPT-2
//! shape (nothing to download), with the per-kernel GPU time of a training step; inference of
//! Llama-family shapes too.

use std::time::Instant;

use serde_json::{Value, json};

use crate::error::Result;
use crate::gpu::Gpu;
use crate::graph::recompute::Recompute;
use crate::graph::saved::ActivationDtype;
use crate::graph::{ExecOptions, Executor, MicroBatch, ParamStore};
use crate::infer::llama::{LlamaRunner, Model as LlamaModel};
use crate::kernels::harness::TimeStats;
use crate::model::gpt::{self, Mode};
use crate::model::llama_params::LlamaParams;
use crate::model::lora::{LoraConfig, LoraPlan};
use crate::model::params::ParamSpec;
use crate::model::{Arch, GptConfig, ParamTable};
use crate::rng::Rng;

/// One kernel's share of a training step or a decoded token.
#[derive(Clone, Debug)]
pub struct KernelRow {
    pub name: String,
    pub calls: usize,
    pub seconds: f64,
    pub share: f64,
}

impl KernelRow {
    pub fn to_json(&self) -> Value {
        json!({"name": self.name, "calls": self.calls, "ms": self.seconds * 1e3, "share": self.share})
    }
}

#[derive(Clone, Debug)]
pub struct TrainBench {
    pub b: usize,
    pub t: usize,
    /// Wall-clock time of a whole step (submit to results back), over runs.
    pub step: TimeStats,
    pub tokens_per_s: f64,
    /// nanoGPT's estimate: 6N + 12·L·H·Q·T FLOPs per token.
    pub flops_per_step: f64,
    pub tflops: f64,
    /// GPU time per kernel in one profiled step, largest share first.
    pub kernels: Vec<KernelRow>,
    pub kernel_total: f64,
    /// The device memory the step was planned with.
    pub memory: Memory,
    /// With a LoRA adapter: what it trains.
    pub lora: Option<AdapterSummary>,
    pub recompute: Recompute,
    pub activations: ActivationDtype,
}

/// How a benchmarked training step is set up beyond its shape: full training or a LoRA adapter
/// on the frozen weights, and whether block activations are recomputed in the backward.
#[derive(Clone, Debug, Default)]
pub struct StepSetup {
    pub lora: Option<LoraConfig>,
    pub recompute: Recompute,
    pub activations: ActivationDtype,
}

/// A benchmarked adapter: its settings, trainable parameters and adapter_model.safetensors's
/// size in bytes.
#[derive(Clone, Debug)]
pub struct AdapterSummary {
    pub cfg: LoraConfig,
    pub trainable: usize,
    pub file_bytes: u64,
}

impl AdapterSummary {
    pub fn to_json(&self) -> Value {
        json!({
            "r": self.cfg.r,
            "lora_alpha": self.cfg.alpha,
            "target_modules": self.cfg.targets,
            "trainable_parameters": self.trainable,
            "adapter_bytes": self.file_bytes,
        })
    }
}

/// The device memory a training run plans, in bytes: parameters, their gradients, AdamW's two
/// moments (the store), and the activations and their gradients (the planner's buffers).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Memory {
    pub params: u64,
    pub grads: u64,
    pub moments: u64,
    pub activations: u64,
}

impl Memory {
    /// Of a store and an executor built over it.
    pub fn of(store: &ParamStore, exec: &Executor) -> Memory {
        let bytes = |l: &[Vec<crate::gpu::View>]| l.iter().flatten().map(|v| v.bytes()).sum();
        Memory {
            params: bytes(&store.params),
            grads: bytes(&store.grads),
            moments: bytes(&store.m) + bytes(&store.v),
            activations: exec.plan.planned_bytes,
        }
    }

    pub fn total(&self) -> u64 {
        self.params + self.grads + self.moments + self.activations
    }

    pub fn to_json(&self) -> Value {
        json!({
            "parameters": self.params,
            "gradients": self.grads,
            "adamw_moments": self.moments,
            "activations": self.activations,
        })
    }
}

/// FLOPs of one training step per nanoGPT's `estimate_mfu`: N counts the parameters without the
/// position table.
pub fn train_flops(cfg: &GptConfig, b: usize, t: usize) -> f64 {
    let n = (cfg.num_params() - cfg.block_size * cfg.n_embd) as f64;
    let (l, h, q) = (
        cfg.n_layer as f64,
        cfg.n_head as f64,
        cfg.head_size() as f64,
    );
    let per_token = 6.0 * n + 12.0 * l * h * q * t as f64;
    per_token * (b * t) as f64
}

/// Random GPT-2 weights of `cfg`'s shape.
pub fn random_params(cfg: &GptConfig, seed: u64) -> Vec<Vec<f32>> {
    ParamTable::new(cfg).init(cfg, seed)
}

/// nanoGPT's estimate for a Llama-family model: 6N + 12·L·H·Q·T per token, N every parameter
/// (the tied head's table counted once; no position table), H the query heads, Q head_dim.
pub fn llama_train_flops(arch: &Arch, b: usize, t: usize) -> f64 {
    let n = arch.checked_num_params().unwrap_or(0) as f64;
    let (l, h, q) = (
        arch.n_layer as f64,
        arch.n_head as f64,
        arch.head_dim as f64,
    );
    (6.0 * n + 12.0 * l * h * q * t as f64) * (b * t) as f64
}

/// A batch of `b` × `t` random tokens and targets of `cfg`'s vocabulary.
pub fn random_batch(cfg: &GptConfig, b: usize, t: usize, rng: &mut Rng) -> MicroBatch {
    random_tokens(cfg.vocab_size, b, t, rng)
}

/// A batch of `b` × `t` random tokens and targets below `vocab`.
fn random_tokens(vocab: usize, b: usize, t: usize, rng: &mut Rng) -> MicroBatch {
    let mut ids = || (0..b * t).map(|_| rng.below(vocab as u64) as u32).collect();
    MicroBatch {
        tokens: ids(),
        targets: ids(),
    }
}

/// Random parameters of `cfg` on the GPU and a training executor over them for batch `b` × `t`
/// (building it chooses, and with tuning on measures, every kernel a training step runs).
pub fn build_training<'a>(
    gpu: &'a Gpu,
    cfg: &GptConfig,
    b: usize,
    t: usize,
) -> Result<(ParamStore, Executor<'a>)> {
    let (store, exec, _) = build_training_adapted(gpu, cfg, (b, t), &StepSetup::default())?;
    Ok((store, exec))
}

/// `build_training` as `setup` says: with its LoRA adapter (A random, B zero, as peft starts
/// one) on the frozen random weights when given, and its recomputation; returns the adapter's
/// plan too.
pub fn build_training_adapted<'a>(
    gpu: &'a Gpu,
    cfg: &GptConfig,
    (b, t): (usize, usize),
    setup: &StepSetup,
) -> Result<(ParamStore, Executor<'a>, Option<LoraPlan>)> {
    let table = ParamTable::new(cfg);
    let plan = (setup.lora.as_ref())
        .map(|l| LoraPlan::new(l, &table.specs, &table.linear_weights()))
        .transpose()?;
    let store = adapted_store(gpu, &table.specs, random_params(cfg, 1), plan.as_ref())?;
    let max = gpu.max_binding();
    let mut g = gpt::build_adapted(cfg, &table, plan.as_ref(), (b, t), Mode::Train, max);
    crate::graph::save_memory(&mut g.graph, setup.recompute, setup.activations);
    let exec = Executor::new(gpu, g.graph, &store, ExecOptions::default())?;
    Ok((store, exec, plan))
}

/// A training store of `base` parameters `values`, with a fresh adapter after them when `plan`
/// is given (the base frozen).
fn adapted_store(
    gpu: &Gpu,
    base: &[ParamSpec],
    mut values: Vec<Vec<f32>>,
    plan: Option<&LoraPlan>,
) -> Result<ParamStore> {
    match plan {
        None => ParamStore::new(gpu, &crate::model::params::store_specs(base), &values, true),
        Some(p) => {
            values.extend(p.init(1));
            ParamStore::with_frozen(gpu, &p.store_specs(), &values, &p.trained())
        }
    }
}

/// What an adapter changes in nanoGPT's FLOP estimate: the frozen base's weights take no
/// gradient (4 of the 6 FLOPs per parameter and token), the adapter's take all 6. Returns the
/// FLOPs per token to subtract, and the adapter's summary for the report.
fn adapter_terms(plan: Option<&LoraPlan>) -> Result<(f64, Option<AdapterSummary>)> {
    let Some(p) = plan else {
        return Ok((0.0, None));
    };
    let adapter = p.trainable_numel();
    // The base's weight gradients skipped, the adapter's products added.
    let saved = 2.0 * p.base_numel() as f64 - 6.0 * adapter as f64;
    let zeros: Vec<Vec<f32>> = p
        .adapter_specs()
        .iter()
        .map(|s| vec![0.0; s.numel()])
        .collect();
    let file = crate::io::hf::safetensors_bytes(
        std::path::Path::new(crate::model::lora::WEIGHTS_FILE),
        &p.tensors(&zeros),
    )?;
    let summary = AdapterSummary {
        cfg: p.cfg.clone(),
        trainable: adapter,
        file_bytes: file.len() as u64,
    };
    Ok((saved, Some(summary)))
}

/// Times training steps of batch `b` × `t` tokens: `warmup` untimed steps, then `runs` timed ones,
/// then one step profiled per kernel; `progress` hears of each step as it ends (a large model's
/// step on a CPU adapter takes minutes).
pub fn train(
    gpu: &Gpu,
    cfg: &GptConfig,
    (b, t): (usize, usize),
    (warmup, runs): (usize, usize),
    setup: &StepSetup,
    progress: &mut dyn FnMut(&str),
) -> Result<TrainBench> {
    let built = build_training_adapted(gpu, cfg, (b, t), setup)?;
    let flops = train_flops(cfg, b, t);
    time_built(
        built,
        cfg.vocab_size,
        (b, t),
        (warmup, runs),
        (flops, setup),
        progress,
    )
}

/// The device memory a training step of `cfg` at batch `b` × `t` plans (with the adapter `lora`
/// when given), without running it; and the adapter's summary.
pub fn plan_train(
    gpu: &Gpu,
    cfg: &GptConfig,
    shape: (usize, usize),
    setup: &StepSetup,
) -> Result<(Memory, Option<AdapterSummary>)> {
    planned(build_training_adapted(gpu, cfg, shape, setup)?)
}

/// `plan_train` for a Llama-family shape.
pub fn plan_train_llama(
    gpu: &Gpu,
    arch: &Arch,
    shape: (usize, usize),
    setup: &StepSetup,
) -> Result<(Memory, Option<AdapterSummary>)> {
    planned(build_training_llama_adapted(gpu, arch, shape, setup)?)
}

/// The planned memory of a built training step and its adapter's summary.
fn planned(
    (store, exec, plan): (ParamStore, Executor, Option<LoraPlan>),
) -> Result<(Memory, Option<AdapterSummary>)> {
    Ok((Memory::of(&store, &exec), adapter_terms(plan.as_ref())?.1))
}

/// The JSON of a planned step: `device_memory_bytes`, its parts, the recomputation, the saved
/// activations' storage and the adapter.
pub fn plan_json(memory: &Memory, lora: Option<&AdapterSummary>, setup: &StepSetup) -> Value {
    json!({
        "device_memory_bytes": memory.total(),
        "device_memory": memory.to_json(),
        "recompute": setup.recompute.name(),
        "activation_dtype": setup.activations.name(),
        "lora": lora.map(AdapterSummary::to_json),
    })
}

/// `build_training` for a Llama-family shape, on random weights drawn as transformers draws them.
pub fn build_training_llama<'a>(
    gpu: &'a Gpu,
    arch: &Arch,
    (b, t): (usize, usize),
) -> Result<(ParamStore, Executor<'a>)> {
    let (store, exec, _) = build_training_llama_adapted(gpu, arch, (b, t), &StepSetup::default())?;
    Ok((store, exec))
}

/// `build_training_llama` with a LoRA adapter, as `build_training_adapted`.
pub fn build_training_llama_adapted<'a>(
    gpu: &'a Gpu,
    arch: &Arch,
    (b, t): (usize, usize),
    setup: &StepSetup,
) -> Result<(ParamStore, Executor<'a>, Option<LoraPlan>)> {
    let table = LlamaParams::new(arch, 0.02)?;
    let plan = (setup.lora.as_ref())
        .map(|l| LoraPlan::new(l, &table.specs, &table.linear_weights()))
        .transpose()?;
    let store = adapted_store(gpu, &table.specs, table.init(1), plan.as_ref())?;
    let max = gpu.max_binding();
    let mut g =
        crate::model::llama::build_adapted(arch, &table, plan.as_ref(), (b, t), Mode::Train, max)?;
    crate::graph::save_memory(&mut g.graph, setup.recompute, setup.activations);
    let exec = Executor::new(gpu, g.graph, &store, ExecOptions::default())?;
    Ok((store, exec, plan))
}

/// `train` for a Llama-family shape, on random weights drawn as transformers draws them.
pub fn train_llama(
    gpu: &Gpu,
    arch: &Arch,
    (b, t): (usize, usize),
    (warmup, runs): (usize, usize),
    setup: &StepSetup,
    progress: &mut dyn FnMut(&str),
) -> Result<TrainBench> {
    let built = build_training_llama_adapted(gpu, arch, (b, t), setup)?;
    let flops = llama_train_flops(arch, b, t);
    let steps = (warmup, runs);
    time_built(built, arch.vocab, (b, t), steps, (flops, setup), progress)
}

/// Times a built training step (`time_training`) whose full training costs `flops`, less what
/// an adapter, if any, spares; with its planned memory and the adapter's summary.
fn time_built(
    (store, mut exec, plan): (ParamStore, Executor, Option<LoraPlan>),
    vocab: usize,
    (b, t): (usize, usize),
    steps: (usize, usize),
    (flops, setup): (f64, &StepSetup),
    progress: &mut dyn FnMut(&str),
) -> Result<TrainBench> {
    let (saved, adapter) = adapter_terms(plan.as_ref())?;
    let flops = flops - saved * (b * t) as f64;
    let mut r = time_training(&mut exec, vocab, (b, t), steps, flops, progress)?;
    r.memory = Memory::of(&store, &exec);
    r.lora = adapter;
    r.recompute = setup.recompute;
    r.activations = setup.activations;
    Ok(r)
}

/// The timing of `train`: steps of random tokens below `vocab` through `exec`, and the kernels
/// of one more step, profiled.
fn time_training(
    exec: &mut Executor,
    vocab: usize,
    (b, t): (usize, usize),
    (warmup, runs): (usize, usize),
    flops: f64,
    progress: &mut dyn FnMut(&str),
) -> Result<TrainBench> {
    let mut rng = Rng::new(2);
    let mut step = 0u32;
    for k in 0..warmup {
        step += 1;
        let t0 = Instant::now();
        exec.step(&[random_tokens(vocab, b, t, &mut rng)], 1e-4, step)?;
        exec.wait_results()?;
        progress(&format!(
            "warm-up step {} of {warmup}: {:.1} s",
            k + 1,
            t0.elapsed().as_secs_f64()
        ));
    }
    let mut samples = Vec::new();
    let runs = runs.max(1);
    for k in 0..runs {
        step += 1;
        let batch = random_tokens(vocab, b, t, &mut rng);
        let t0 = Instant::now();
        exec.step(&[batch], 1e-4, step)?;
        exec.wait_results()?;
        samples.push(t0.elapsed().as_secs_f64());
        progress(&format!(
            "timed step {} of {runs}: {:.1} s",
            k + 1,
            samples[k]
        ));
    }
    let stats = TimeStats::from_samples(&samples);
    progress("one more step, each kernel timed on its own");
    step += 1;
    let profile = exec.profile_step(&random_tokens(vocab, b, t, &mut rng), 1e-4, step)?;
    let (rows, kernel_total) = kernel_rows(profile);
    Ok(TrainBench {
        b,
        t,
        step: stats,
        tokens_per_s: (b * t) as f64 / stats.median,
        flops_per_step: flops,
        tflops: flops / stats.median / 1e12,
        kernels: rows,
        kernel_total,
        memory: Memory::default(),
        lora: None,
        recompute: Recompute::None,
        activations: ActivationDtype::F32,
    })
}

impl TrainBench {
    pub fn to_json(&self) -> Value {
        json!({
            "batch_size": self.b,
            "block_size": self.t,
            "ms_per_step": self.step.ms_json(),
            "tokens_per_s": self.tokens_per_s,
            "flops_per_step": self.flops_per_step,
            "tflops": self.tflops,
            "kernels": self.kernels.iter().map(KernelRow::to_json).collect::<Vec<_>>(),
            "kernel_total_ms": self.kernel_total * 1e3,
            "device_memory_bytes": self.memory.total(),
            "recompute": self.recompute.name(),
            "activation_dtype": self.activations.name(),
            "device_memory": self.memory.to_json(),
            "lora": self.lora.as_ref().map(AdapterSummary::to_json),
        })
    }
}

/// (dispatch name, seconds) pairs summed by name, largest first, with their total.
fn kernel_rows(profile: Vec<(String, f64)>) -> (Vec<KernelRow>, f64) {
    let total: f64 = profile.iter().map(|(_, s)| s).sum();
    let mut rows: Vec<KernelRow> = Vec::new();
    for (name, s) in profile {
        match rows.iter_mut().find(|r| r.name == name) {
            Some(r) => {
                r.calls += 1;
                r.seconds += s;
            }
            None => rows.push(KernelRow {
                name,
                calls: 1,
                seconds: s,
                share: 0.0,
            }),
        }
    }
    for r in &mut rows {
        r.share = r.seconds / total.max(1e-12);
    }
    rows.sort_by(|a, b| b.seconds.total_cmp(&a.seconds));
    (rows, total)
}

/// Inference throughput of one weight format.
#[derive(Clone, Debug)]
pub struct InferBench {
    pub dtype: crate::gpu::DType,
    pub prompt_len: usize,
    pub new_tokens: usize,
    /// Time to prefill the prompt (logits of its last position back on the CPU), over runs.
    pub prefill: TimeStats,
    /// Time per decoded token with the KV cache (sampling included), over runs.
    pub decode: TimeStats,
    /// Time per decoded token by full recomputation of the growing sequence, over
    /// `recompute_tokens` tokens (one run; at most `new_tokens`).
    pub recompute: Option<TimeStats>,
    pub recompute_tokens: usize,
    /// GPU time per kernel of one token decoded with the KV cache after the prompt, largest
    /// share first.
    pub decode_kernels: Vec<KernelRow>,
    pub decode_kernel_total: f64,
}

impl InferBench {
    pub fn prefill_tokens_per_s(&self) -> f64 {
        self.prompt_len as f64 / self.prefill.median
    }

    pub fn decode_tokens_per_s(&self) -> f64 {
        1.0 / self.decode.median
    }

    pub fn to_json(&self) -> Value {
        json!({
            "dtype": self.dtype.name(),
            "prompt_len": self.prompt_len,
            "new_tokens": self.new_tokens,
            "prefill_ms": self.prefill.ms_json(),
            "prefill_tokens_per_s": self.prefill_tokens_per_s(),
            "decode_ms_per_token": self.decode.ms_json(),
            "decode_tokens_per_s": self.decode_tokens_per_s(),
            "recompute_ms_per_token": self.recompute.map(|r| json!({"median": r.median * 1e3, "min": r.min * 1e3, "max": r.max * 1e3, "tokens": self.recompute_tokens})),
            "recompute_tokens_per_s": self.recompute.map(|r| 1.0 / r.median),
            "decode_kernels": self.decode_kernels.iter().map(KernelRow::to_json).collect::<Vec<_>>(),
            "decode_kernel_total_ms": self.decode_kernel_total * 1e3,
        })
    }
}

/// What `infer` measures.
#[derive(Clone, Copy, Debug)]
pub struct InferSetup {
    pub dtype: crate::gpu::DType,
    pub prompt_len: usize,
    pub new_tokens: usize,
    pub warmup: usize,
    pub runs: usize,
    pub recompute_tokens: usize,
}

/// A model decoding one sequence, as `time_decoding` drives it.
trait Decode {
    /// Forgets the sequence (a new one starts).
    fn reset(&mut self);
    /// The logits after `seq`, whose last `new` tokens are not yet in the KV cache.
    fn extend(&mut self, seq: &[u32], new: usize) -> Result<Vec<f32>>;
    /// The logits after `seq`, recomputed over the whole of it.
    fn recompute(&mut self, seq: &[u32]) -> Result<Vec<f32>>;
    /// Decodes the last token of `seq` (the rest cached) and times each dispatch of its pass.
    fn profile(&mut self, seq: &[u32]) -> Result<Vec<(String, f64)>>;
}

impl Decode for crate::infer::Engine<'_> {
    fn reset(&mut self) {
        crate::infer::Engine::reset(self);
    }

    fn extend(&mut self, seq: &[u32], new: usize) -> Result<Vec<f32>> {
        Ok(self.feed(&seq[seq.len() - new..], new)?.remove(0))
    }

    fn recompute(&mut self, seq: &[u32]) -> Result<Vec<f32>> {
        crate::infer::Engine::reset(self);
        Ok(self.feed(seq, seq.len())?.remove(0))
    }

    fn profile(&mut self, seq: &[u32]) -> Result<Vec<(String, f64)>> {
        self.profile_feed(&seq[seq.len() - 1..])
    }
}

impl Decode for crate::infer::llama::LlamaRunner<'_> {
    fn reset(&mut self) {
        crate::infer::llama::LlamaRunner::reset(self);
    }

    fn extend(&mut self, seq: &[u32], _new: usize) -> Result<Vec<f32>> {
        self.next(seq)
    }

    fn recompute(&mut self, seq: &[u32]) -> Result<Vec<f32>> {
        self.next_logits(seq)
    }

    fn profile(&mut self, seq: &[u32]) -> Result<Vec<(String, f64)>> {
        self.profile_next(seq)
    }
}

/// Refuses lengths that do not fit `context` positions or leave the prompt empty.
fn check_lengths(s: &InferSetup, context: usize) -> Result<()> {
    if s.prompt_len == 0 || s.prompt_len.saturating_add(s.new_tokens) > context {
        return Err(crate::Error::invalid(
            "bench",
            format!(
                "prompt {} + new tokens {} must fit the context {context} (and the prompt hold a token)",
                s.prompt_len, s.new_tokens
            ),
        ));
    }
    Ok(())
}

/// Times prefill of a `prompt_len`-token prompt and decoding of `new_tokens` tokens (greedy) with
/// the KV cache, `warmup` + `runs` times; then `recompute_tokens` tokens decoded by recomputing
/// the whole sequence each time.
pub fn infer(gpu: &Gpu, cfg: &GptConfig, params: &[Vec<f32>], s: InferSetup) -> Result<InferBench> {
    check_lengths(&s, cfg.block_size)?;
    let mut engine = crate::infer::Engine::new(gpu, cfg, params, s.dtype, 1)?;
    time_decoding(&mut engine, cfg.vocab_size, s)
}

/// `infer` for a Llama-family model `arch` (f32 weights), its KV cache holding the prompt and
/// the new tokens only: a rotary model's context bounds its positions, not its weights, so a
/// shorter one computes the same logits with a cache that fits in memory (Llama 3.2's full
/// context would need gigabytes).
pub fn infer_llama(
    gpu: &Gpu,
    arch: &Arch,
    table: &LlamaParams,
    params: &[Vec<f32>],
    s: InferSetup,
) -> Result<InferBench> {
    check_lengths(&s, arch.context)?;
    let arch = Arch {
        context: s.prompt_len + s.new_tokens,
        ..arch.clone()
    };
    let model = LlamaModel {
        arch: &arch,
        table,
        params,
    };
    let mut runner = LlamaRunner::upload(gpu, model, Vec::new(), s.dtype)?;
    runner.add_cache()?;
    time_decoding(&mut runner, arch.vocab, s)
}

/// Bytes a Llama-family training benchmark of `arch` holds: the random weights on the host, and
/// on the device the weights, their gradients and both AdamW moments (f32).
pub fn llama_train_bytes(arch: &Arch) -> u128 {
    let params = arch.checked_num_params().map_or(u128::MAX, |n| n as u128);
    params.saturating_mul(4 * 5)
}

/// Bytes a Llama-family inference benchmark of `arch` holds: the random weights on the host and
/// on the device (f32), and the KV cache of `tokens` positions.
pub fn llama_infer_bytes(arch: &Arch, tokens: usize) -> u128 {
    let params = arch.checked_num_params().map_or(u128::MAX, |n| n as u128);
    let cache = LlamaRunner::cache_bytes(
        &Arch {
            context: tokens,
            ..arch.clone()
        },
        crate::gpu::DType::F32,
    );
    params.saturating_mul(8).saturating_add(cache)
}

/// The timing loop of `infer`, for any model that decodes.
fn time_decoding(model: &mut dyn Decode, vocab: usize, s: InferSetup) -> Result<InferBench> {
    use crate::infer::sampling::argmax;
    let InferSetup {
        dtype,
        prompt_len,
        new_tokens,
        warmup,
        runs,
        recompute_tokens,
    } = s;
    let mut rng = Rng::new(3);
    let prompt: Vec<u32> = (0..prompt_len)
        .map(|_| rng.below(vocab as u64) as u32)
        .collect();
    let (mut prefill, mut decode) = (Vec::new(), Vec::new());
    for run in 0..warmup + runs.max(1) {
        model.reset();
        let mut seq = prompt.clone();
        let t0 = Instant::now();
        let mut logits = model.extend(&seq, prompt_len)?;
        let t1 = Instant::now();
        for _ in 0..new_tokens {
            seq.push(argmax(&logits));
            logits = model.extend(&seq, 1)?;
        }
        if run >= warmup {
            prefill.push((t1 - t0).as_secs_f64());
            decode.push(t1.elapsed().as_secs_f64() / new_tokens.max(1) as f64);
        }
    }
    // One token after the prompt, each dispatch timed.
    let (decode_kernels, decode_kernel_total) = if new_tokens > 0 {
        model.reset();
        let mut seq = prompt.clone();
        let logits = model.extend(&seq, prompt_len)?;
        seq.push(argmax(&logits));
        kernel_rows(model.profile(&seq)?)
    } else {
        (Vec::new(), 0.0)
    };
    // No more tokens recomputed than decoded.
    let recompute_tokens = recompute_tokens.min(new_tokens.max(1));
    let recompute = if recompute_tokens > 0 {
        // A fresh pass over the whole sequence for every token.
        let mut samples = Vec::new();
        let mut seq = prompt.clone();
        for _ in 0..recompute_tokens {
            let t0 = Instant::now();
            let logits = model.recompute(&seq)?;
            seq.push(argmax(&logits));
            samples.push(t0.elapsed().as_secs_f64());
        }
        Some(TimeStats::from_samples(&samples))
    } else {
        None
    };
    Ok(InferBench {
        dtype,
        prompt_len,
        new_tokens,
        prefill: TimeStats::from_samples(&prefill),
        decode: TimeStats::from_samples(&decode),
        recompute,
        recompute_tokens,
        decode_kernels,
        decode_kernel_total,
    })
}
