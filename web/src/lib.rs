//! shaderformer in a browser tab: the same kernels, graph and checkpoints as the native binary,
//! run on the page's WebGPU device. JavaScript drives (one `step` call per optimizer step, so it
//! can draw, stop and continue between steps); every GPU wait is awaited, never blocked on.
//!
//! Values cross into JavaScript as JSON text and byte arrays, nothing fancier.
#![cfg(target_arch = "wasm32")]

use std::collections::HashMap;

use js_sys::{Array, Function, Uint8Array};
use serde_json::{Value, json};
use shaderformer::error::Error;
use shaderformer::gpu::{DType, Gpu, GpuOptions, TuneMode};
use shaderformer::graph::{ExecOptions, Executor, MicroBatch, ParamStore, Shard, StepResult};
use shaderformer::infer::chat::{self, ChatTemplate};
use shaderformer::infer::llama::LlamaRunner;
use shaderformer::infer::{self, Engine, Generation, SampleOptions};
use shaderformer::io::hf_llama::LlamaConfig;
use shaderformer::io::vocab::{self, Vocab};
use shaderformer::io::{hf, hf_llama, hf_weights};
use shaderformer::kernels::measure;
use shaderformer::model::gpt::{self, Mode};
use shaderformer::model::llama_params::LlamaParams;
use shaderformer::model::lora::{AdapterFiles, LoraPlan};
use shaderformer::model::{GptConfig, ParamTable, llama};
use shaderformer::rng::Rng;
use shaderformer::train::adapter::{self, LoraFlags};
use shaderformer::train::data::{Dataset, Loader};
use shaderformer::train::{self, FreshLlama, TrainConfig, addition, checkpoint};
use wasm_bindgen::prelude::*;

type JsResult<T> = std::result::Result<T, JsValue>;

/// Errors reach the page as one line of words.
fn err(e: Error) -> JsValue {
    JsValue::from_str(&e.to_string())
}

/// The page's one device, opened at the first call and kept for the page's life (executors
/// borrow it).
async fn gpu() -> JsResult<&'static Gpu> {
    thread_local! {
        static GPU: std::cell::Cell<Option<&'static Gpu>> = const { std::cell::Cell::new(None) };
    }
    if let Some(g) = GPU.with(|g| g.get()) {
        return Ok(g);
    }
    // Kernels are chosen by measurement as natively, in memory for the page's life: a problem
    // first met is computed by the fixed rule and measured by `tune` (the page cannot block on
    // the GPU while building a graph).
    let opts = GpuOptions {
        tune: TuneMode::On,
        ..GpuOptions::default()
    };
    let g: &'static Gpu = Box::leak(Box::new(Gpu::new_async(&opts).await.map_err(err)?));
    GPU.with(|c| c.set(Some(g)));
    Ok(g)
}

/// Measures every kernel problem met since the last call and not measured before (see
/// `kernels::measure`); returns how many. What is built afterwards uses the winners.
#[wasm_bindgen]
pub async fn tune_kernels() -> JsResult<u32> {
    let gpu = gpu().await?;
    let n = measure::tune_pending(gpu).await.map_err(err)?;
    Ok(n as u32)
}

/// The kernel variant of every problem computed so far, by "family: problem": JSON.
#[wasm_bindgen]
pub async fn kernels() -> JsResult<String> {
    let gpu = gpu().await?;
    Ok(serde_json::to_string(&gpu.tuner.used()).unwrap_or_default())
}

/// The adapter and the limits that bound what the page can train: JSON.
#[wasm_bindgen]
pub async fn adapter() -> JsResult<String> {
    let g = gpu().await?;
    Ok(json!({
        "name": g.adapter_name(),
        "max_storage_binding": g.limits.max_storage_buffer_binding_size,
        "max_buffer": g.limits.max_buffer_size,
        "workgroup_storage": g.limits.max_compute_workgroup_storage_size,
        "timestamps": g.has_timestamps(),
        "f16": g.has_f16(),
        "subgroups": g.has_subgroups(),
    })
    .to_string())
}

/// The training settings the page starts from: the addition problems' (`shaderformer train`
/// without --data) or, for a text, `shaderformer train --data`'s (nanoGPT's small character
/// model).
fn base_config(text: bool) -> TrainConfig {
    let mut c = if text {
        TrainConfig::default()
    } else {
        addition::defaults()
    };
    c.verbose = false;
    c
}

/// The form's starting values for the addition problems or a text (JSON, the names
/// `train_config` takes), so the page shows what a run would use.
#[wasm_bindgen]
pub fn defaults(text: bool) -> String {
    let c = base_config(text);
    json!({
        "seed": c.seed, "steps": c.max_iters, "lr": c.schedule.lr, "n_layer": c.n_layer,
        "n_head": c.n_head, "n_embd": c.n_embd, "batch_size": c.batch_size,
        "block_size": c.block_size,
    })
    .to_string()
}

/// `base_config(text)` with the page's choices in `settings` (JSON: seed, steps, lr, n_layer,
/// n_head, n_embd, batch_size, block_size, warmup_iters, lr_decay_iters, eval_iters; arch
/// ("gpt2" or "llama") and for a Llama model n_kv_head, intermediate_size, rope_theta;
/// recompute ("none" or "block") and activation_dtype ("f32" or "bf16"); and for a LoRA run
/// lora_r, lora_alpha, lora_dropout, lora_targets (comma-separated); each optional),
/// applied as the command line applies its flags. An unknown field is an error naming it.
fn train_config(settings: &str, text: bool) -> JsResult<TrainConfig> {
    let v: Value = serde_json::from_str(settings)
        .map_err(|e| JsValue::from_str(&format!("settings are not JSON: {e}")))?;
    let obj = v
        .as_object()
        .ok_or_else(|| JsValue::from_str("settings must be a JSON object"))?;
    let mut c = base_config(text);
    let mut lr_decay = None;
    let mut lora = LoraFlags::default();
    let (mut llama, mut n_kv_head, mut intermediate, mut rope_theta) = (false, None, None, None);
    for (k, x) in obj {
        let uint = || {
            x.as_u64()
                .ok_or_else(|| JsValue::from_str(&format!("{k}: {x} is not a whole number")))
        };
        let float = || {
            x.as_f64()
                .map(|f| f as f32)
                .ok_or_else(|| JsValue::from_str(&format!("{k}: {x} is not a number")))
        };
        match k.as_str() {
            "seed" => c.seed = uint()?,
            "steps" => c.max_iters = uint()?,
            "lr" => {
                c.schedule.lr = float()?;
                c.schedule.min_lr = c.schedule.lr / 10.0;
            }
            "n_layer" => c.n_layer = uint()? as usize,
            "n_head" => c.n_head = uint()? as usize,
            "n_embd" => c.n_embd = uint()? as usize,
            "batch_size" => c.batch_size = uint()? as usize,
            "block_size" => c.block_size = uint()? as usize,
            "warmup_iters" => c.schedule.warmup_iters = uint()?,
            "lr_decay_iters" => lr_decay = Some(uint()?),
            "eval_iters" => c.eval_iters = uint()? as usize,
            "arch" => {
                llama = match x.as_str() {
                    Some("gpt2") => false,
                    Some("llama") => true,
                    _ => return Err(JsValue::from_str(&format!("{k}: {x} is not gpt2 or llama"))),
                }
            }
            "n_kv_head" => n_kv_head = Some(uint()? as usize),
            "intermediate_size" => intermediate = Some(uint()? as usize),
            "rope_theta" => rope_theta = Some(float()? as f64),
            // Named as the command line names them (the enums' lowercase serde names).
            "recompute" => {
                c.recompute = serde_json::from_value(x.clone())
                    .map_err(|_| JsValue::from_str(&format!("{k}: {x} is not none or block")))?
            }
            "activation_dtype" => {
                c.activation_dtype = serde_json::from_value(x.clone())
                    .map_err(|_| JsValue::from_str(&format!("{k}: {x} is not f32 or bf16")))?
            }
            "lora_r" => lora.r = Some(uint()? as usize),
            "lora_alpha" => lora.alpha = Some(float()?),
            "lora_dropout" => lora.dropout = Some(float()?),
            "lora_targets" => {
                let names = x.as_str().ok_or_else(|| {
                    JsValue::from_str(&format!("{k}: {x} is not a comma-separated list"))
                })?;
                lora.targets = Some(names.split(',').map(|t| t.trim().to_string()).collect());
            }
            other => return Err(JsValue::from_str(&format!("unknown setting '{other}'"))),
        }
    }
    // As the command line does: the cosine ends at the last step unless told otherwise.
    c.schedule.lr_decay_iters = lr_decay.unwrap_or(c.max_iters);
    c.lora = (lora != LoraFlags::default()).then_some(lora);
    // The Llama settings default as `train --arch llama`'s flags do.
    if !llama && (n_kv_head.is_some() || intermediate.is_some() || rope_theta.is_some()) {
        return Err(JsValue::from_str(
            "n_kv_head, intermediate_size and rope_theta apply to a Llama model (arch: llama)",
        ));
    }
    c.llama = llama.then(|| FreshLlama {
        n_kv_head: n_kv_head.unwrap_or(c.n_head),
        intermediate: intermediate.unwrap_or_else(|| FreshLlama::default_intermediate(c.n_embd)),
        rope_theta: rope_theta.unwrap_or(10000.0),
    });
    Ok(c)
}

/// The run's data: `text` with a character vocabulary built from it (as `train --data` builds
/// one from a text file), else the embedded addition problems.
fn dataset(cfg: &TrainConfig, text: Option<(&str, &str)>) -> JsResult<Dataset> {
    let Some((name, text)) = text else {
        return train::load_data(cfg, None).map_err(err);
    };
    let data = Dataset::from_text(name, text, None).map_err(err)?;
    data.check_fits(name, cfg.block_size).map_err(err)?;
    Ok(data)
}

fn results_json(results: &[StepResult]) -> String {
    Value::from(
        results
            .iter()
            .map(|r| json!({"step": r.step, "loss": r.loss(), "grad_norm": r.grad_norm}))
            .collect::<Vec<_>>(),
    )
    .to_string()
}

/// A training run, advanced one step per `step` call.
#[wasm_bindgen]
pub struct Trainer {
    gpu: &'static Gpu,
    cfg: TrainConfig,
    net: TrainNet,
    data: Dataset,
    store: ParamStore,
    exec: Executor<'static>,
    eval: Executor<'static>,
    loader: Loader,
    step: u64,
}

/// What a page run trains: GPT-2 or a Llama model from scratch, or a LoRA adapter on a
/// checkpoint opened from files (its base frozen).
enum TrainNet {
    Scratch(GptConfig),
    ScratchLlama(Box<(LlamaConfig, LlamaParams)>),
    Lora {
        base: Base,
        plan: LoraPlan,
        /// The base's name, for adapter_config.json.
        name: String,
    },
}

/// The base checkpoint of a LoRA run (its parameters live in the store).
enum Base {
    Gpt(GptConfig),
    Llama(Box<hf_weights::LlamaCheckpoint>),
}

/// Builds the model, its parameters (initialized from the seed as natively) and the training
/// and evaluation graphs, for the addition problems or (given) the text `text` named `name`.
/// Fails in words when the model does not fit the adapter or the text is too short.
#[wasm_bindgen]
pub async fn trainer(
    settings: String,
    text: Option<String>,
    name: Option<String>,
) -> JsResult<Trainer> {
    let cfg = train_config(&settings, text.is_some())?;
    let name = name.unwrap_or_else(|| "the text".to_string());
    let data = dataset(&cfg, text.as_deref().map(|t| (name.as_str(), t)))?;
    let gpu = gpu().await?;
    if cfg.lora.is_some() {
        return Err(JsValue::from_str(
            "LoRA settings apply to fine-tuning a checkpoint (lora_trainer)",
        ));
    }
    check_run(&cfg)?;
    if let Some(fresh) = &cfg.llama {
        // As `train --arch llama`: the vocabulary from the data, weights drawn from the seed as
        // transformers' LlamaPreTrainedModel draws them.
        let config = fresh.config(&cfg, data.vocab.size()).map_err(err)?;
        let table = LlamaParams::new(&config.arch, config.initializer_range as f32).map_err(err)?;
        let init = table.init(cfg.seed);
        let store = ParamStore::new(gpu, &table.store_specs(), &init, true).map_err(err)?;
        let net = TrainNet::ScratchLlama(Box::new((config, table)));
        return Trainer::start(gpu, cfg, net, data, store);
    }
    let model = GptConfig {
        n_layer: cfg.n_layer,
        n_head: cfg.n_head,
        n_embd: cfg.n_embd,
        block_size: cfg.block_size,
        vocab_size: data.vocab.size(),
        dropout: cfg.dropout,
        bias: cfg.bias,
    };
    model.validate().map_err(err)?;
    let table = ParamTable::new(&model);
    let init = table.init(&model, cfg.seed);
    let store = ParamStore::new(gpu, &table.store_specs(), &init, true).map_err(err)?;
    Trainer::start(gpu, cfg, TrainNet::Scratch(model), data, store)
}

/// A run needs a batch and a step.
fn check_run(cfg: &TrainConfig) -> JsResult<()> {
    if cfg.batch_size == 0 || cfg.max_iters == 0 {
        return Err(JsValue::from_str("batch size and steps must be at least 1"));
    }
    Ok(())
}

/// The files a file picker gave, by name.
fn file_map(names: Vec<String>, contents: Vec<Uint8Array>) -> HashMap<String, Vec<u8>> {
    names
        .into_iter()
        .zip(contents)
        .map(|(n, c)| (n, c.to_vec()))
        .collect()
}

/// A LoRA fine-tuning run on the checkpoint opened from its files (as `open_model` takes them:
/// GPT-2 or the Llama family, with its tokenizer), named `base_name` in the adapter's config,
/// on `text` (named `name`) encoded with the checkpoint's tokenizer: the base frozen, the
/// adapter of the settings' lora_* fields trained, as `shaderformer train --init BASE --lora-r`
/// trains it (A drawn from the seed, B zero).
#[wasm_bindgen]
pub async fn lora_trainer(
    names: Vec<String>,
    contents: Vec<Uint8Array>,
    settings: String,
    text: String,
    name: String,
    base_name: String,
) -> JsResult<Trainer> {
    let files = file_map(names, contents);
    let mut cfg = train_config(&settings, true)?;
    check_run(&cfg)?;
    let flags = cfg.lora.clone().unwrap_or_default();
    let gpu = gpu().await?;
    let llama = text_of(&files, hf::CONFIG_FILE)?.is_some_and(hf_llama::is_llama_config);
    let (base, values, vocab, context) = if llama {
        let mut ck = hf_weights::from_files(&files).map_err(err)?;
        ck.cfg.arch.dropout = cfg.dropout;
        let vocab = llama_vocab(&files)?;
        let values = std::mem::take(&mut ck.params);
        let context = ck.cfg.arch.context;
        (Base::Llama(Box::new(ck)), values, vocab, context)
    } else {
        let ck = checkpoint::from_files(&files).map_err(err)?;
        let vocab = ck.vocab.clone().ok_or_else(|| {
            JsValue::from_str(
                "the checkpoint has no tokenizer.json or vocab.json to encode the text",
            )
        })?;
        let model = GptConfig {
            dropout: cfg.dropout,
            ..ck.cfg.clone()
        };
        (Base::Gpt(model), ck.params, vocab, ck.cfg.block_size)
    };
    if cfg.block_size > context {
        return Err(JsValue::from_str(&format!(
            "context {} is beyond the checkpoint's {context} positions",
            cfg.block_size
        )));
    }
    let data = Dataset::from_text(&name, &text, Some(&vocab)).map_err(err)?;
    data.check_fits(&name, cfg.block_size).map_err(err)?;
    let lora = adapter::fresh_config(&flags, matches!(base, Base::Gpt(_)));
    let gpt_table;
    let (specs, linear) = match &base {
        Base::Gpt(c) => {
            gpt_table = ParamTable::new(c);
            (&gpt_table.specs, gpt_table.linear_weights())
        }
        Base::Llama(ck) => (&ck.table.specs, ck.table.linear_weights()),
    };
    let plan = LoraPlan::new(&lora, specs, &linear).map_err(err)?;
    let mut values = values;
    values.extend(plan.init(cfg.seed));
    let store_specs = plan.store_specs();
    let store =
        ParamStore::with_frozen(gpu, &store_specs, &values, &plan.trained()).map_err(err)?;
    drop(values);
    cfg.lora = Some(flags);
    let net = TrainNet::Lora {
        base,
        plan,
        name: base_name,
    };
    Trainer::start(gpu, cfg, net, data, store)
}

/// A Llama-family checkpoint's tokenizer, from its files.
fn llama_vocab(files: &HashMap<String, Vec<u8>>) -> JsResult<Vocab> {
    let bytes = files
        .get(vocab::TOKENIZER_FILE)
        .ok_or_else(|| JsValue::from_str("the checkpoint has no tokenizer.json to encode text"))?;
    Vocab::from_file(std::path::Path::new(vocab::TOKENIZER_FILE), bytes).map_err(err)
}

/// The training and evaluation executors of `net` over `store`.
fn executors(
    gpu: &'static Gpu,
    cfg: &TrainConfig,
    net: &TrainNet,
    store: &ParamStore,
) -> JsResult<(Executor<'static>, Executor<'static>)> {
    let (b, t) = (cfg.batch_size, cfg.block_size);
    let opts = ExecOptions {
        reuse: true,
        grad_accum: cfg.grad_accum,
        adamw: cfg.adamw(),
        seed: cfg.seed as u32,
        // The page is one rank.
        shard: Shard::default(),
    };
    let max = gpu.max_binding();
    let graph = |mode| match net {
        TrainNet::Scratch(model) => Ok(gpt::build_for(
            model,
            &ParamTable::new(model),
            b,
            t,
            mode,
            max,
        )),
        TrainNet::ScratchLlama(m) => llama::build_for(&m.0.arch, &m.1, (b, t), mode, max),
        TrainNet::Lora { base, plan, .. } => match base {
            Base::Gpt(c) => Ok(gpt::build_adapted(
                c,
                &ParamTable::new(c),
                Some(plan),
                (b, t),
                mode,
                max,
            )),
            Base::Llama(ck) => {
                llama::build_adapted(&ck.cfg.arch, &ck.table, Some(plan), (b, t), mode, max)
            }
        },
    };
    let mut g = graph(Mode::Train).map_err(err)?;
    shaderformer::graph::save_memory(&mut g.graph, cfg.recompute, cfg.activation_dtype);
    let exec = Executor::new(gpu, g.graph, store, opts.clone()).map_err(err)?;
    let g = graph(Mode::Eval).map_err(err)?;
    let eval = Executor::new(gpu, g.graph, store, opts).map_err(err)?;
    Ok((exec, eval))
}

impl Trainer {
    /// The run of `net` over the uploaded `store`, before its first step.
    fn start(
        gpu: &'static Gpu,
        cfg: TrainConfig,
        net: TrainNet,
        data: Dataset,
        store: ParamStore,
    ) -> JsResult<Trainer> {
        let (exec, eval) = executors(gpu, &cfg, &net, &store)?;
        let loader = Loader::new(cfg.loader, cfg.batch_size, cfg.block_size, cfg.seed);
        // Errors of pipeline creation arrive from the event loop: let them in before training.
        gpu.check("building the model").map_err(err)?;
        Ok(Trainer {
            gpu,
            cfg,
            net,
            data,
            store,
            exec,
            eval,
            loader,
            step: 0,
        })
    }

    /// The model as it is now, ready to sample: the adapter merged into its base for a LoRA run.
    async fn model_now(&mut self) -> JsResult<Model> {
        let params = self.params().await?;
        let vocab = self.data.vocab.clone();
        let net = match &self.net {
            TrainNet::Scratch(cfg) => gpt_net(self.gpu, cfg, &params)?,
            TrainNet::ScratchLlama(m) => llama_net(self.gpu, (&m.0, &m.1), params, Vec::new())?,
            TrainNet::Lora { base, plan, .. } => {
                let merged = plan.merge(&params);
                match base {
                    Base::Gpt(cfg) => gpt_net(self.gpu, cfg, &merged)?,
                    Base::Llama(ck) => {
                        let eos = ck.eos_token_ids.clone();
                        llama_net(self.gpu, (&ck.cfg, &ck.table), merged, eos)?
                    }
                }
            }
        };
        Ok(Model { net, vocab })
    }
}

/// A Llama-family runner of `cfg` over `params`, for sampling, ending at the ids `eos`.
fn llama_net(
    gpu: &'static Gpu,
    (cfg, table): (&LlamaConfig, &LlamaParams),
    params: Vec<Vec<f32>>,
    eos: Vec<u32>,
) -> JsResult<Net> {
    let ck = hf_weights::LlamaCheckpoint {
        cfg: cfg.clone(),
        table: table.clone(),
        params,
        eos_token_ids: eos,
    };
    let runner = LlamaRunner::with_cache(gpu, &ck, DType::F32).map_err(err)?;
    Ok(Net::Llama {
        runner,
        template: None,
    })
}

/// A GPT-2 engine of `cfg` over `params`, for sampling.
fn gpt_net(gpu: &'static Gpu, cfg: &GptConfig, params: &[Vec<f32>]) -> JsResult<Net> {
    let engine = Engine::new(gpu, cfg, params, DType::F32, 1).map_err(err)?;
    Ok(Net::Gpt {
        engine,
        cfg: cfg.clone(),
    })
}

#[wasm_bindgen]
impl Trainer {
    /// Measures the kernels the training and evaluation graphs met for the first time (they
    /// were built with the fixed rules) and rebuilds both graphs with the winners; returns how
    /// many problems were measured. Before the first step only: the run's steps all use the
    /// same kernels, as a native run's do.
    pub async fn tune(&mut self) -> JsResult<u32> {
        if self.step > 0 {
            return Err(JsValue::from_str("kernels are tuned before the first step"));
        }
        let n = tune_kernels().await?;
        if n > 0 {
            (self.exec, self.eval) = executors(self.gpu, &self.cfg, &self.net, &self.store)?;
            self.gpu.check("rebuilding the model").map_err(err)?;
        }
        Ok(n)
    }

    /// A one-line description of the data and the model: JSON {data, params, vocab,
    /// tokens_per_step, max_iters, adapter, and for a LoRA run lora: {r, alpha, targets,
    /// layers, trainable}}.
    pub fn describe(&self) -> String {
        let (params, lora) = match &self.net {
            TrainNet::Scratch(m) => (m.num_params(), Value::Null),
            TrainNet::ScratchLlama(m) => (m.1.specs.iter().map(|s| s.numel()).sum(), Value::Null),
            TrainNet::Lora { plan, .. } => (
                plan.base_numel(),
                json!({
                    "r": plan.cfg.r,
                    "alpha": plan.cfg.alpha,
                    "targets": plan.cfg.targets,
                    "layers": plan.adapted.len(),
                    "trainable": plan.trainable_numel(),
                }),
            ),
        };
        json!({
            "data": self.data.description,
            "params": params,
            "vocab": self.data.vocab.size(),
            "tokens_per_step": self.tokens_per_step(),
            "max_iters": self.cfg.max_iters,
            "adapter": self.gpu.adapter_name(),
            "lora": lora,
        })
        .to_string()
    }

    pub fn tokens_per_step(&self) -> usize {
        self.cfg.batch_size * self.cfg.block_size * self.cfg.grad_accum
    }

    /// Steps queued so far, as a JavaScript number (a u64 would arrive as a BigInt, which the
    /// page's arithmetic cannot mix with numbers).
    pub fn steps(&self) -> f64 {
        self.step as f64
    }

    /// Queues the next step and returns the results that have arrived (JSON list of step, loss
    /// and gradient norm); awaits the oldest step in flight when the readback ring is full.
    pub async fn step(&mut self) -> JsResult<String> {
        if self.step >= self.cfg.max_iters {
            return Err(JsValue::from_str("every step of this run is done"));
        }
        self.step += 1;
        let micro: Vec<MicroBatch> = (0..self.cfg.grad_accum)
            .map(|_| self.loader.next(&self.data.train))
            .collect();
        let lr = self.cfg.schedule.at(self.step - 1);
        self.exec.step(&micro, lr, self.step as u32).map_err(err)?;
        let r = self.exec.poll_async().await.map_err(err)?;
        Ok(results_json(&r))
    }

    /// Destroys the GPU device, as a lost GPU or a driver reset would, so that what follows fails
    /// with the device-lost error (the page's test of how it reports one).
    pub fn lose_device(&self) {
        self.gpu.device.destroy();
    }

    /// Awaits every step in flight; returns their results as `step` does.
    pub async fn flush(&mut self) -> JsResult<String> {
        let r = self.exec.wait_results_async().await.map_err(err)?;
        Ok(results_json(&r))
    }

    /// The train and validation losses, each the mean over `eval_iters` batches drawn as
    /// natively (a loader started afresh at every evaluation): JSON {train, val}.
    pub async fn evaluate(&mut self) -> JsResult<String> {
        self.flush().await?;
        let (b, t, iters) = (
            self.cfg.batch_size,
            self.cfg.block_size,
            self.cfg.eval_iters,
        );
        let mut out = [0.0f32; 2];
        for (k, split) in [&self.data.train, &self.data.val].into_iter().enumerate() {
            let mut loader = Loader::new(self.cfg.loader, b, t, self.cfg.seed ^ 0xE7A1_0000);
            let mut sum = 0.0f64;
            for _ in 0..iters.max(1) {
                sum += self
                    .eval
                    .forward_loss_async(&loader.next(split))
                    .await
                    .map_err(err)? as f64;
            }
            out[k] = (sum / iters.max(1) as f64) as f32;
        }
        Ok(json!({"train": out[0], "val": out[1]}).to_string())
    }

    /// The parameters as they are now (after every queued step).
    async fn params(&mut self) -> JsResult<Vec<Vec<f32>>> {
        self.flush().await?;
        ParamStore::read_async(self.gpu, &self.store.params)
            .await
            .map_err(err)
    }

    /// The checkpoint's files as [name, bytes] pairs, for the page to offer as downloads:
    /// config.json, model.safetensors and vocab.json, or for a LoRA run the adapter's
    /// adapter_config.json and adapter_model.safetensors (peft's).
    pub async fn save(&mut self) -> JsResult<Array> {
        let params = self.params().await?;
        let files = match &self.net {
            TrainNet::Scratch(model) => checkpoint::to_files(model, &params, &self.data.vocab),
            TrainNet::ScratchLlama(m) => self.data.vocab.to_file().and_then(|(name, bytes)| {
                train::model::llama_files(&m.0, &m.1, &params, &[(name.to_string(), bytes)])
            }),
            TrainNet::Lora { base, plan, name } => {
                let gpt2 = matches!(base, Base::Gpt(_));
                plan.files(name, gpt2, &params[plan.base_len..])
            }
        }
        .map_err(err)?;
        Ok(files_to_js(files))
    }

    /// Completes `prompt` with the model as it is now: JSON as `Model::generate` returns.
    pub async fn sample(&mut self, prompt: String, options: String) -> JsResult<String> {
        let mut model = self.model_now().await?;
        model.generate(prompt, options, None).await
    }
}

fn files_to_js(files: Vec<(String, Vec<u8>)>) -> Array {
    files
        .into_iter()
        .map(|(name, bytes)| {
            let pair = Array::new();
            pair.push(&JsValue::from_str(&name));
            pair.push(&Uint8Array::from(bytes.as_slice()));
            JsValue::from(pair)
        })
        .collect()
}

/// Sampling choices as JSON: max_new_tokens, temperature, top_k, top_p, greedy, seed; and
/// chat (the prompt is a user message for the checkpoint's chat template) with an optional
/// system message.
struct Sampling {
    opts: SampleOptions,
    max_new: usize,
    seed: u64,
    chat: bool,
    system: Option<String>,
}

fn sample_options(options: &str) -> JsResult<Sampling> {
    let v: Value = serde_json::from_str(options)
        .map_err(|e| JsValue::from_str(&format!("sampling options are not JSON: {e}")))?;
    let mut s = Sampling {
        opts: SampleOptions::default(),
        max_new: 100,
        seed: 1337,
        chat: false,
        system: None,
    };
    for (k, x) in v.as_object().into_iter().flatten() {
        let bad = || JsValue::from_str(&format!("{k}: {x} is not valid"));
        match k.as_str() {
            "max_new_tokens" => s.max_new = x.as_u64().ok_or_else(bad)? as usize,
            "temperature" => s.opts.temperature = x.as_f64().ok_or_else(bad)? as f32,
            "top_k" => s.opts.top_k = x.as_u64().map(|k| k as usize),
            "top_p" => s.opts.top_p = x.as_f64().ok_or_else(bad)? as f32,
            "greedy" => s.opts.greedy = x.as_bool().ok_or_else(bad)?,
            "seed" => s.seed = x.as_u64().ok_or_else(bad)?,
            "chat" => s.chat = x.as_bool().ok_or_else(bad)?,
            "system" => {
                let text = x.as_str().ok_or_else(bad)?;
                s.system = (!text.is_empty()).then(|| text.to_string());
            }
            other => return Err(JsValue::from_str(&format!("unknown option '{other}'"))),
        }
    }
    s.opts.validate().map_err(err)?;
    if s.system.is_some() && !s.chat {
        return Err(JsValue::from_str("a system message needs chat"));
    }
    Ok(s)
}

/// The prompt's tokens: `prompt` itself, or with chat the template's rendering of it as a user
/// message; they must leave room in a context of `context` positions.
fn encode_prompt(
    vocab: &Vocab,
    template: Option<&ChatTemplate>,
    prompt: &str,
    s: &Sampling,
    context: usize,
) -> JsResult<Vec<u32>> {
    let text = if s.chat {
        let t = template.ok_or_else(|| {
            JsValue::from_str("this checkpoint has no chat template (no chat_template in tokenizer_config.json, no chat_template.jinja)")
        })?;
        t.render(prompt, s.system.as_deref()).map_err(err)?
    } else {
        prompt.to_string()
    };
    let ids = vocab.encode(&text, "prompt").map_err(err)?;
    if ids.is_empty() || ids.len() >= context {
        return Err(JsValue::from_str(&format!(
            "the prompt is {} tokens; it must be 1 to {} (the model's context less one)",
            ids.len(),
            context - 1
        )));
    }
    Ok(ids)
}

/// What the page shows of a generation: JSON {prompt, prompt_ids, ids, text,
/// stopped_at_context_limit}, as `shaderformer sample --json` prints.
fn generation_json(vocab: &Vocab, prompt: &str, ids: &[u32], g: &Generation) -> String {
    json!({
        "prompt": prompt,
        "prompt_ids": ids,
        "ids": g.ids[0],
        "text": vocab.decode(&g.ids[0]),
        "stopped_at_context_limit": g.hit_context,
    })
    .to_string()
}

/// Calls the page's `on_text(piece)`, if it gave one, with a token's text.
fn stream(on_text: Option<&Function>, vocab: &Vocab, id: u32) {
    if let Some(f) = on_text {
        let _ = f.call1(&JsValue::NULL, &JsValue::from_str(&vocab.decode(&[id])));
    }
}

/// Encodes `prompt`, generates with the KV cache, calls `on_text(piece)` per token; returns
/// JSON as `generation_json`.
async fn generate(
    engine: &mut Engine<'static>,
    vocab: &Vocab,
    prompt: &str,
    options: &str,
    on_text: Option<&Function>,
) -> JsResult<String> {
    let s = sample_options(options)?;
    let ids = encode_prompt(vocab, None, prompt, &s, engine.tmax)?;
    let mut rng = Rng::new(s.seed);
    let g = infer::generate_async(engine, &ids, s.max_new, &s.opts, &mut rng, |_, id| {
        stream(on_text, vocab, id);
        Ok(())
    })
    .await
    .map_err(err)?;
    Ok(generation_json(vocab, prompt, &ids, &g))
}

/// A checkpoint opened from local files: GPT-2's, or one of the Llama family's (llama,
/// mistral, qwen2, qwen3), ready to sample.
#[wasm_bindgen]
pub struct Model {
    net: Net,
    vocab: Vocab,
}

enum Net {
    Gpt {
        engine: Engine<'static>,
        cfg: GptConfig,
    },
    Llama {
        runner: LlamaRunner<'static>,
        template: Option<ChatTemplate>,
    },
}

/// The file `name` of `files` as text, `None` where it is absent.
fn text_of<'f>(files: &'f HashMap<String, Vec<u8>>, name: &str) -> JsResult<Option<&'f str>> {
    hf_weights::text_of(files, name).map_err(err)
}

/// Opens a checkpoint from its files' names and contents: config.json, the weights
/// (model.safetensors, or for the Llama family the index and its shards), tokenizer.json or
/// vocab.json, and for the Llama family generation_config.json (its eos ids end generation)
/// and tokenizer_config.json (its chat template) where given; with a peft adapter's
/// adapter_config.json and adapter_model.safetensors among them, the adapter merged in. Fails in words on a file that is
/// not a checkpoint and on a model larger than the adapter's limits.
#[wasm_bindgen]
pub async fn open_model(names: Vec<String>, contents: Vec<Uint8Array>) -> JsResult<Model> {
    let files = file_map(names, contents);
    let lora = AdapterFiles::from_files(&files).map_err(err)?;
    if text_of(&files, hf::CONFIG_FILE)?.is_some_and(hf_llama::is_llama_config) {
        return open_llama(&files, lora).await;
    }
    let mut ck = checkpoint::from_files(&files).map_err(err)?;
    if let Some(a) = lora {
        adapter::merge_gpt(&mut ck, a).map_err(err)?;
    }
    let vocab = ck.vocab.clone().ok_or_else(|| {
        JsValue::from_str("the checkpoint has no tokenizer.json or vocab.json to encode a prompt")
    })?;
    let gpu = gpu().await?;
    let engine = Engine::new(gpu, &ck.cfg, &ck.params, DType::F32, 1).map_err(err)?;
    gpu.check("uploading the model").map_err(err)?;
    Ok(Model {
        net: Net::Gpt {
            engine,
            cfg: ck.cfg,
        },
        vocab,
    })
}

/// `open_model` for a Llama-family checkpoint: the weights in f32 (with the adapter `lora`
/// merged in, if given) and a KV cache of the whole context, as `shaderformer sample` runs it.
async fn open_llama(
    files: &HashMap<String, Vec<u8>>,
    lora: Option<AdapterFiles>,
) -> JsResult<Model> {
    let mut ck = hf_weights::from_files(files).map_err(err)?;
    if let Some(a) = lora {
        adapter::merge_llama(&mut ck, a).map_err(err)?;
    }
    let vocab = llama_vocab(files)?;
    let template = ChatTemplate::from_texts(
        std::path::Path::new("the checkpoint"),
        text_of(files, chat::TOKENIZER_CONFIG_FILE)?,
        text_of(files, chat::TEMPLATE_FILE)?,
    )
    .map_err(err)?;
    let gpu = gpu().await?;
    let runner = LlamaRunner::with_cache(gpu, &ck, DType::F32).map_err(err)?;
    gpu.check("uploading the model").map_err(err)?;
    Ok(Model {
        net: Net::Llama { runner, template },
        vocab,
    })
}

#[wasm_bindgen]
impl Model {
    /// The model's shape as JSON: model_type, n_layer, n_head, n_kv_head, n_embd, block_size,
    /// vocab_size, params, vocab (the tokenizer's kind) and chat (whether it has a template).
    pub fn describe(&self) -> String {
        let vocab = self.vocab.kind();
        match &self.net {
            Net::Gpt { cfg, .. } => json!({
                "model_type": "gpt2",
                "n_layer": cfg.n_layer,
                "n_head": cfg.n_head,
                "n_kv_head": cfg.n_head,
                "n_embd": cfg.n_embd,
                "block_size": cfg.block_size,
                "vocab_size": cfg.vocab_size,
                "params": cfg.num_params(),
                "vocab": vocab,
                "chat": false,
            }),
            Net::Llama { runner, template } => {
                let a = &runner.arch;
                json!({
                    "model_type": a.family.model_type(),
                    "n_layer": a.n_layer,
                    "n_head": a.n_head,
                    "n_kv_head": a.n_kv_head,
                    "n_embd": a.hidden,
                    "block_size": a.context,
                    "vocab_size": a.vocab,
                    "params": a.checked_num_params(),
                    "vocab": vocab,
                    "chat": template.is_some(),
                })
            }
        }
        .to_string()
    }

    /// Completes `prompt` (options as JSON, see `sample_options`), streaming each token's text
    /// to `on_text`; returns JSON as `shaderformer sample --json` prints. A Llama-family model
    /// stops after one of its eos ids.
    pub async fn generate(
        &mut self,
        prompt: String,
        options: String,
        on_text: Option<Function>,
    ) -> JsResult<String> {
        let vocab = &self.vocab;
        match &mut self.net {
            Net::Gpt { engine, .. } => {
                generate(engine, vocab, &prompt, &options, on_text.as_ref()).await
            }
            Net::Llama {
                runner, template, ..
            } => {
                let s = sample_options(&options)?;
                let context = runner.arch.context;
                let ids = encode_prompt(vocab, template.as_ref(), &prompt, &s, context)?;
                let mut rng = Rng::new(s.seed);
                let g = infer::llama::generate_async(
                    runner,
                    &ids,
                    s.max_new,
                    &s.opts,
                    &mut rng,
                    |id| {
                        stream(on_text.as_ref(), vocab, id);
                        Ok(())
                    },
                )
                .await
                .map_err(err)?;
                Ok(generation_json(vocab, &prompt, &ids, &g))
            }
        }
    }
}
