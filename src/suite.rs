//! `shaderformer bench --suite quick|full`: every headline benchmark in one process, one JSON and
//! one table. `quick` measures the headline figures at small shapes, few kernels each (GEMM: the
//! tuned winner, the fixed rule and the best of each kind, in the forward's NT layout;
//! attention: the tuned forward and backward), two timed runs and a short generation, so that it
//! fits in three minutes on a CPU adapter (on lavapipe, timing every GEMM candidate at 1024^3 in
//! each layout alone took over ten); `full` is what a real GPU runs: every GEMM candidate in
//! every layout, every attention candidate with dropout and decoding, GEMM at 4096^3, attention
//! at T 1024, the training steps of GPT-2 124M and SmolLM2-135M at B 4 T 1024, 128 new tokens.
//!
//! Each section runs on its own: one that fails (an adapter without f16, a shape past a limit)
//! records its error in the JSON and the table, and the others still run.

use serde_json::{Value, json};

use crate::bench::{self, InferSetup};
use crate::error::Result;
use crate::gpu::{DType, Gpu};
use crate::kernels::harness::{self, BenchOptions, BenchReport};
use crate::model::{Arch, GptConfig};

/// A family's bench: the variants it times at a shape.
type BenchFn = fn(&Gpu, &[usize], &BenchOptions) -> Result<Vec<BenchReport>>;

/// Which suite.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Suite {
    Quick,
    Full,
}

impl Suite {
    pub fn name(self) -> &'static str {
        match self {
            Suite::Quick => "quick",
            Suite::Full => "full",
        }
    }
}

/// A model whose training step a suite times.
#[derive(Clone, Debug)]
pub enum TrainModel {
    Gpt(GptConfig),
    Llama(Arch),
}

/// A training step to time: a model shape and its batch.
#[derive(Clone, Debug)]
pub struct TrainCase {
    pub label: &'static str,
    pub model: TrainModel,
    pub b: usize,
    pub t: usize,
}

/// What a suite measures.
#[derive(Clone, Debug)]
pub struct Plan {
    pub suite: Suite,
    /// GEMM problems (M, K, N).
    pub gemm: Vec<[usize; 3]>,
    /// Whether every GEMM candidate is timed in every layout and every attention candidate
    /// with dropout and decoding (`kernels bench gemm|attention`), or only the headline kernels
    /// (`gemm::bench_headline`, `attention::bench_headline`).
    pub every_candidate: bool,
    /// Attention shapes (B, NH, T, HS), causal, forward and backward.
    pub attention: Vec<[usize; 4]>,
    pub train: Vec<TrainCase>,
    /// The inference model (GPT-2 124M's shape) and its prompt and decoded tokens.
    pub infer_cfg: GptConfig,
    pub prompt_len: usize,
    pub new_tokens: usize,
    /// Timed runs and warm-up runs of every measurement.
    pub runs: usize,
    pub warmup: usize,
    /// Timed runs and warm-up runs of prefill and decoding (each run a whole generation).
    pub infer_runs: usize,
    pub infer_warmup: usize,
}

/// The 4-layer model the peers (burn, PyTorch) time too: nanoGPT blocks, C 128, T 64, B 8,
/// vocabulary 65.
pub fn tiny_model() -> GptConfig {
    let mut cfg = GptConfig::preset("gpt2").expect("gpt2 is a preset");
    cfg.n_layer = 4;
    cfg.n_head = 4;
    cfg.n_embd = 128;
    cfg.vocab_size = 65;
    cfg.block_size = 64;
    cfg
}

impl Plan {
    pub fn new(suite: Suite) -> Plan {
        let gpt2 = GptConfig::preset("gpt2").expect("gpt2 is a preset");
        let mut train = vec![TrainCase {
            label: "4-layer (C 128, T 64, B 8, V 65)",
            model: TrainModel::Gpt(tiny_model()),
            b: 8,
            t: 64,
        }];
        match suite {
            Suite::Quick => Plan {
                suite,
                gemm: vec![[1024, 1024, 1024]],
                every_candidate: false,
                attention: vec![[1, 12, 256, 64]],
                train,
                infer_cfg: gpt2,
                // On lavapipe GPT-2 124M prefills about 15 tokens/s and decodes 1.6 (an order
                // of magnitude less on a busy host).
                prompt_len: 16,
                new_tokens: 4,
                runs: 2,
                warmup: 1,
                infer_runs: 1,
                infer_warmup: 0,
            },
            Suite::Full => {
                train.push(TrainCase {
                    label: "GPT-2 124M (B 4, T 1024)",
                    model: TrainModel::Gpt(gpt2.clone()),
                    b: 4,
                    t: 1024,
                });
                let smollm2 = Arch::preset("smollm2-135m").expect("smollm2-135m is a preset");
                train.push(TrainCase {
                    label: "SmolLM2-135M (B 4, T 1024)",
                    model: TrainModel::Llama(smollm2),
                    b: 4,
                    t: 1024,
                });
                Plan {
                    suite,
                    gemm: vec![[1024, 1024, 1024], [4096, 4096, 4096]],
                    every_candidate: true,
                    attention: vec![[1, 12, 256, 64], [1, 12, 1024, 64]],
                    train,
                    infer_cfg: gpt2,
                    prompt_len: 128,
                    new_tokens: 128,
                    runs: 5,
                    warmup: 2,
                    infer_runs: 5,
                    infer_warmup: 1,
                }
            }
        }
    }

    fn bench_options(&self) -> BenchOptions {
        BenchOptions {
            warmup: self.warmup,
            runs: self.runs,
            only: None,
        }
    }
}

/// One line of the summary table: a section, what was measured, the figure and its unit.
#[derive(Clone, Debug)]
pub struct Row {
    pub section: &'static str,
    pub case: String,
    pub figure: String,
}

/// What a suite measured: the JSON document and the table's rows.
pub struct Outcome {
    pub json: Value,
    pub rows: Vec<Row>,
    /// Sections that failed, with their errors.
    pub failures: Vec<(String, String)>,
}

/// The adapter: name, backend, driver, features and limits.
pub fn device_json(gpu: &Gpu) -> Value {
    let info = &gpu.info;
    let l = &gpu.limits;
    let features: Vec<String> = gpu
        .features
        .iter_names()
        .map(|(name, _)| name.to_string())
        .collect();
    json!({
        "name": info.name,
        "backend": format!("{:?}", info.backend),
        "device_type": format!("{:?}", info.device_type),
        "vendor": info.vendor,
        "device": info.device,
        "driver": info.driver,
        "driver_info": info.driver_info,
        "timing": gpu.timing_method().name(),
        "features": features,
        "limits": {
            "max_storage_buffer_binding_size": l.max_storage_buffer_binding_size,
            "max_buffer_size": l.max_buffer_size,
            "max_compute_workgroup_storage_size": l.max_compute_workgroup_storage_size,
            "max_compute_invocations_per_workgroup": l.max_compute_invocations_per_workgroup,
            "max_compute_workgroup_size_x": l.max_compute_workgroup_size_x,
            "max_compute_workgroups_per_dimension": l.max_compute_workgroups_per_dimension,
            "max_storage_buffers_per_shader_stage": l.max_storage_buffers_per_shader_stage,
        },
        "subgroup_size": [info.subgroup_min_size, info.subgroup_max_size],
    })
}

/// Runs every section of `plan` on `gpu`, printing each as it goes (`progress`).
pub fn run(gpu: &Gpu, plan: &Plan, progress: &mut dyn FnMut(&str)) -> Outcome {
    let mut out = Outcome {
        json: json!({
            "suite": plan.suite.name(),
            "device": device_json(gpu),
        }),
        rows: Vec::new(),
        failures: Vec::new(),
    };
    let mut sections = serde_json::Map::new();
    for s in &plan.gemm {
        let label = format!("{}x{}x{}", s[0], s[1], s[2]);
        let bench = if plan.every_candidate {
            progress(&format!("gemm {label}: every candidate, every layout"));
            crate::kernels::gemm::FAMILY.bench
        } else {
            progress(&format!(
                "gemm {label}: the tuned, fixed-rule and best kernel of each kind, NT"
            ));
            crate::kernels::gemm::bench_headline
        };
        let r = kernel_section(gpu, ("gemm", bench), s, plan, "gemm", &label, &mut out);
        push(&mut sections, "gemm", label, r);
    }
    for s in &plan.attention {
        let label = format!("B {} NH {} T {} HS {}", s[0], s[1], s[2], s[3]);
        progress(&format!("attention {label}"));
        let bench = if plan.every_candidate {
            crate::kernels::attention::FAMILY.bench
        } else {
            crate::kernels::attention::bench_headline
        };
        let r = kernel_section(
            gpu,
            ("attention", bench),
            s,
            plan,
            "attention",
            &label,
            &mut out,
        );
        push(&mut sections, "attention", label, r);
    }
    for case in &plan.train {
        progress(&format!("training step, {}", case.label));
        let r = train_section(gpu, case, plan, &mut out, progress);
        push(&mut sections, "train", case.label.to_string(), r);
    }
    for dtype in [DType::F32, DType::F16] {
        let label = format!(
            "GPT-2 124M, {}, prompt {}, {} new",
            dtype.name(),
            plan.prompt_len,
            plan.new_tokens
        );
        progress(&format!("prefill and decode, {label}"));
        let r = infer_section(gpu, dtype, plan, &label, &mut out);
        push(&mut sections, "infer", label, r);
    }
    let obj = out.json.as_object_mut().expect("an object");
    for (k, v) in sections {
        obj.insert(k, v);
    }
    obj.insert(
        "failures".into(),
        out.failures
            .iter()
            .map(|(s, e)| json!({"section": s, "error": e}))
            .collect::<Vec<_>>()
            .into(),
    );
    out
}

/// Appends `{"case": label, ...result}` (or its error) to section `name`'s list.
fn push(
    sections: &mut serde_json::Map<String, Value>,
    name: &str,
    label: String,
    r: std::result::Result<Value, String>,
) {
    let entry = match r {
        Ok(v) => json!({"case": label, "result": v}),
        Err(e) => json!({"case": label, "error": e}),
    };
    match sections.get_mut(name) {
        Some(Value::Array(a)) => a.push(entry),
        _ => {
            sections.insert(name.to_string(), Value::Array(vec![entry]));
        }
    }
}

/// Records a failed section in `out` and returns its error text.
fn failed(out: &mut Outcome, section: &'static str, case: &str, e: crate::Error) -> String {
    let text = e.to_string();
    out.failures
        .push((format!("{section} {case}"), text.clone()));
    out.rows.push(Row {
        section,
        case: case.to_string(),
        figure: format!("failed: {text}"),
    });
    text
}

/// Times what `bench` (a kernel family's, by name) offers at `shape`.
fn kernel_section(
    gpu: &Gpu,
    (family, bench): (&str, BenchFn),
    shape: &[usize],
    plan: &Plan,
    section: &'static str,
    label: &str,
    out: &mut Outcome,
) -> std::result::Result<Value, String> {
    let reports = harness::find(family).and_then(|f| {
        harness::validate_shape(f, shape)?;
        bench(gpu, shape, &plan.bench_options())
    });
    match reports {
        Ok(reports) => {
            for r in &reports {
                out.rows.push(Row {
                    section,
                    case: format!("{label} {}", r.variant),
                    figure: figure_of(r),
                });
            }
            Ok(reports.iter().map(report_json).collect::<Vec<_>>().into())
        }
        Err(e) => Err(failed(out, section, label, e)),
    }
}

/// A kernel's time and, where it does arithmetic, its GFLOP/s (else its GB/s).
fn figure_of(r: &BenchReport) -> String {
    let rate = if r.cost.flops > 0 {
        format!("{:.2} GFLOP/s", r.gflops())
    } else {
        format!("{:.2} GB/s", r.gbps())
    };
    format!("{:.3} ms, {rate}", r.time.median * 1e3)
}

fn report_json(r: &BenchReport) -> Value {
    json!({
        "variant": r.variant,
        "shape": r.shape,
        "ms": r.time.ms_json(),
        "gflops": r.gflops(),
        "gbps": r.gbps(),
        "timing": r.method.name(),
    })
}

fn train_section(
    gpu: &Gpu,
    case: &TrainCase,
    plan: &Plan,
    out: &mut Outcome,
    progress: &mut dyn FnMut(&str),
) -> std::result::Result<Value, String> {
    let steps = (plan.warmup, plan.runs);
    let mut step_done = |what: &str| progress(&format!("  {what}"));
    let r = match &case.model {
        TrainModel::Gpt(cfg) => {
            crate::memory::check("the model", cfg.training_bytes()).and_then(|_| {
                bench::train(
                    gpu,
                    cfg,
                    (case.b, case.t),
                    steps,
                    &Default::default(),
                    &mut step_done,
                )
            })
        }
        TrainModel::Llama(arch) => {
            crate::memory::check("the model", bench::llama_train_bytes(arch)).and_then(|_| {
                bench::train_llama(
                    gpu,
                    arch,
                    (case.b, case.t),
                    steps,
                    &Default::default(),
                    &mut step_done,
                )
            })
        }
    };
    match r {
        Ok(r) => {
            out.rows.push(Row {
                section: "train",
                case: case.label.to_string(),
                figure: format!(
                    "{:.1} ms/step, {:.0} tokens/s, {:.4} TFLOP/s",
                    r.step.median * 1e3,
                    r.tokens_per_s,
                    r.tflops
                ),
            });
            Ok(r.to_json())
        }
        Err(e) => Err(failed(out, "train", case.label, e)),
    }
}

fn infer_section(
    gpu: &Gpu,
    dtype: DType,
    plan: &Plan,
    label: &str,
    out: &mut Outcome,
) -> std::result::Result<Value, String> {
    let r = infer_one(gpu, dtype, plan);
    match r {
        Ok(r) => {
            out.rows.push(Row {
                section: "infer",
                case: label.to_string(),
                figure: format!(
                    "prefill {:.1} tok/s, decode {:.2} tok/s",
                    r.prefill_tokens_per_s(),
                    r.decode_tokens_per_s()
                ),
            });
            Ok(r.to_json())
        }
        Err(e) => Err(failed(out, "infer", label, e)),
    }
}

fn infer_one(gpu: &Gpu, dtype: DType, plan: &Plan) -> Result<bench::InferBench> {
    if dtype == DType::F16 && !gpu.has_f16() {
        return Err(crate::Error::invalid(
            "bench --suite",
            format!(
                "adapter {} lacks SHADER_F16: no f16 weights",
                gpu.adapter_name()
            ),
        ));
    }
    let params = bench::random_params(&plan.infer_cfg, 1);
    let setup = InferSetup {
        dtype,
        prompt_len: plan.prompt_len,
        new_tokens: plan.new_tokens,
        warmup: plan.infer_warmup,
        runs: plan.infer_runs,
        recompute_tokens: 0,
    };
    bench::infer(gpu, &plan.infer_cfg, &params, setup)
}

/// The summary as an aligned text table.
pub fn table(rows: &[Row]) -> String {
    let case_w = rows.iter().map(|r| r.case.len()).max().unwrap_or(4).max(4);
    let mut s = format!("{:<10} {:<case_w$} figure\n", "section", "case");
    for r in rows {
        s.push_str(&format!(
            "{:<10} {:<case_w$} {}\n",
            r.section, r.case, r.figure
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_measures_what_quick_does_and_more() {
        let (q, f) = (Plan::new(Suite::Quick), Plan::new(Suite::Full));
        assert!(q.gemm.iter().all(|s| f.gemm.contains(s)));
        assert!(f.gemm.contains(&[4096, 4096, 4096]));
        assert!(f.attention.iter().any(|s| s[2] == 1024));
        assert!(f.train.iter().any(|c| c.b == 4 && c.t == 1024));
        assert_eq!(q.train.len() + 2, f.train.len());
        let llama = |c: &TrainCase| matches!(&c.model, TrainModel::Llama(a) if a.n_kv_head == 3);
        assert!(f.train.iter().any(llama));
        assert_eq!(f.new_tokens, 128);
        assert!(f.every_candidate && !q.every_candidate);
        assert!(q.attention.iter().all(|s| f.attention.contains(s)));
        assert!(q.prompt_len <= f.prompt_len && q.new_tokens <= f.new_tokens);
        assert!(q.infer_runs <= f.infer_runs && q.runs <= f.runs);
    }

    #[test]
    fn the_tiny_model_is_the_peers_shape() {
        let cfg = tiny_model();
        cfg.validate().unwrap();
        assert_eq!(
            (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.vocab_size),
            (4, 4, 128, 65)
        );
    }

    #[test]
    fn the_table_aligns_its_columns() {
        let rows = vec![
            Row {
                section: "gemm",
                case: "a".into(),
                figure: "1".into(),
            },
            Row {
                section: "train",
                case: "longer case".into(),
                figure: "2".into(),
            },
        ];
        let t = table(&rows);
        let cols: Vec<usize> = t.lines().map(|l| l.rfind(' ').unwrap()).collect();
        assert!(cols.windows(2).all(|w| w[0] == w[1]), "{t}");
    }
}
