//! LoRA adapters (Hu et al., 2021) in the layout peft writes: a linear layer y = x·Wᵀ keeps its
//! frozen W and adds scale · (x·Aᵀ)·Bᵀ, with A (r, in) and B (out, r) trained and scale =
//! lora_alpha / r. The graph computes the low-rank product beside the base layer (`Op::Lora`)
//! without ever forming W + scale·B·A.
//!
//! On disk an adapter is peft's: adapter_config.json and adapter_model.safetensors, whose tensors
//! are `base_model.model.<module path>.lora_A.weight` (r, in) and `...lora_B.weight` (out, r),
//! the module path being the base weight's name without `.weight` (GPT-2's Conv1D layers too:
//! peft's A and B are plain linear layers, `fan_in_fan_out` only says how W is stored).

use std::path::Path;

use serde_json::{Value, json};

use super::params::{Init, ParamSpec};
use crate::error::{Error, Result};
use crate::rng::Rng;

pub const CONFIG_FILE: &str = "adapter_config.json";
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";

/// peft's default target modules for GPT-2.
pub const GPT2_TARGETS: [&str; 1] = ["c_attn"];
/// peft's default target modules for the Llama family (Llama, Mistral, Qwen2, Qwen3).
pub const LLAMA_TARGETS: [&str; 2] = ["q_proj", "v_proj"];

/// An adapter's settings (adapter_config.json's fields that shape the computation).
#[derive(Clone, Debug, PartialEq)]
pub struct LoraConfig {
    pub r: usize,
    pub alpha: f32,
    /// Dropout on the adapter's input while training.
    pub dropout: f32,
    /// The last component of each adapted module's name (`c_attn`, `q_proj`, ...).
    pub targets: Vec<String>,
}

impl LoraConfig {
    /// scale = lora_alpha / r.
    pub fn scale(&self) -> f32 {
        self.alpha / self.r as f32
    }

    /// Refuses what no adapter can be: a rank of zero, a dropout outside [0, 1), no targets.
    pub fn check(&self, what: &str) -> Result<()> {
        if self.r == 0 {
            return Err(Error::invalid(what, "the rank r must be at least 1"));
        }
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            return Err(Error::invalid(
                what,
                format!("lora_alpha {} must be positive", self.alpha),
            ));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(Error::invalid(
                what,
                format!("lora_dropout {} is outside [0, 1)", self.dropout),
            ));
        }
        if self.targets.is_empty() {
            return Err(Error::invalid(what, "no target modules"));
        }
        Ok(())
    }

    /// adapter_config.json as peft writes it, for a base at `base` (`fan_in_fan_out`: the base
    /// stores W as (in, out), GPT-2's Conv1D).
    pub fn to_json(&self, base: &str, fan_in_fan_out: bool) -> Value {
        json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base,
            "r": self.r,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "target_modules": self.targets,
            "fan_in_fan_out": fan_in_fan_out,
            "bias": "none",
            "use_dora": false,
            "use_rslora": false,
            "lora_bias": false,
            "init_lora_weights": true,
            "inference_mode": true,
            "modules_to_save": null,
            "layers_to_transform": null,
            "layers_pattern": null,
            "rank_pattern": {},
            "alpha_pattern": {},
            "revision": null,
        })
    }

    /// Reads peft's adapter_config.json (`path` names it in errors), refusing every setting that
    /// would make the adapter compute something else than plain LoRA on the listed modules.
    pub fn parse(path: &Path, text: &str) -> Result<(LoraConfig, Option<String>)> {
        let bad = |msg: String| Error::invalid(path.display().to_string(), msg);
        let v: Value = serde_json::from_str(text).map_err(|e| bad(format!("not JSON: {e}")))?;
        let field = |name: &str| v.get(name).filter(|x| !x.is_null());
        match field("peft_type").and_then(Value::as_str) {
            Some("LORA") => {}
            other => {
                return Err(bad(format!(
                    "peft_type is {}, only LORA adapters are supported",
                    other.map_or("missing".into(), |s| format!("{s:?}"))
                )));
            }
        }
        let unsupported = |name: &str, why: &str| bad(format!("{name}: {why} is not supported"));
        for flag in [
            "use_dora",
            "use_rslora",
            "lora_bias",
            "use_qalora",
            "use_bdlora",
        ] {
            if field(flag).is_some_and(|x| x.as_bool() != Some(false)) {
                return Err(unsupported(flag, "anything but false"));
            }
        }
        if let Some(b) = field("bias")
            && b.as_str() != Some("none")
        {
            return Err(unsupported(
                "bias",
                "training biases (anything but \"none\")",
            ));
        }
        for name in ["rank_pattern", "alpha_pattern"] {
            if field(name).is_some_and(|x| x.as_object().is_none_or(|o| !o.is_empty())) {
                return Err(unsupported(name, "a per-module rank or alpha"));
            }
        }
        for name in [
            "modules_to_save",
            "layers_to_transform",
            "layers_pattern",
            "target_parameters",
            "trainable_token_indices",
            "exclude_modules",
            "layer_replication",
        ] {
            let empty = |x: &Value| x.as_array().is_some_and(Vec::is_empty);
            if field(name).is_some_and(|x| !empty(x)) {
                return Err(unsupported(name, "a value"));
            }
        }
        let r = field("r")
            .and_then(Value::as_u64)
            .ok_or_else(|| bad("r is missing or not a whole number".into()))?;
        let alpha = field("lora_alpha")
            .and_then(Value::as_f64)
            .ok_or_else(|| bad("lora_alpha is missing or not a number".into()))?;
        let dropout = field("lora_dropout").and_then(Value::as_f64).unwrap_or(0.0);
        let targets = match field("target_modules") {
            Some(Value::Array(a)) => a
                .iter()
                .map(|t| {
                    t.as_str()
                        .map(str::to_string)
                        .ok_or_else(|| bad(format!("target_modules holds {t}, not a name")))
                })
                .collect::<Result<Vec<_>>>()?,
            Some(Value::String(s)) => {
                return Err(unsupported(
                    "target_modules",
                    &format!("a regular expression ({s:?}) instead of a list of names"),
                ));
            }
            _ => return Err(bad("target_modules is missing".into())),
        };
        let cfg = LoraConfig {
            r: r as usize,
            alpha: alpha as f32,
            dropout: dropout as f32,
            targets,
        };
        cfg.check(&path.display().to_string())?;
        let base = field("base_model_name_or_path")
            .and_then(Value::as_str)
            .map(str::to_string);
        Ok((cfg, base))
    }

    /// Reads `dir`/adapter_config.json: the settings and the base model it names, if any.
    pub fn read(dir: &Path) -> Result<(LoraConfig, Option<String>)> {
        let path = dir.join(CONFIG_FILE);
        let text = crate::io::files::read(&path, crate::io::files::Kind::Json)?;
        LoraConfig::parse(&path, &text)
    }
}

/// A peft adapter as read from its two files: its settings and its tensors (not yet laid on a
/// model), and where it came from, for messages.
#[derive(Clone, Debug)]
pub struct AdapterFiles {
    pub cfg: LoraConfig,
    /// adapter_config.json's base_model_name_or_path.
    pub base: Option<String>,
    pub tensors: std::collections::HashMap<String, crate::io::hf::ShapedTensor>,
    /// adapter_model.safetensors's path (or name).
    pub weights: std::path::PathBuf,
}

impl AdapterFiles {
    /// The adapter in directory `dir`.
    pub fn read(dir: &Path) -> Result<AdapterFiles> {
        let (cfg, base) = LoraConfig::read(dir)?;
        let weights = dir.join(WEIGHTS_FILE);
        let tensors = crate::io::hf::read_safetensors(&weights)?;
        Ok(AdapterFiles {
            cfg,
            base,
            tensors,
            weights,
        })
    }

    /// The adapter among `files` (name to bytes, as a file picker gives them), if they hold
    /// adapter_config.json; its weights file must be there too.
    pub fn from_files(
        files: &std::collections::HashMap<String, Vec<u8>>,
    ) -> Result<Option<AdapterFiles>> {
        let Some(text) = crate::io::hf_weights::text_of(files, CONFIG_FILE)? else {
            return Ok(None);
        };
        let (cfg, base) = LoraConfig::parse(Path::new(CONFIG_FILE), text)?;
        let weights = std::path::PathBuf::from(WEIGHTS_FILE);
        let bytes = files.get(WEIGHTS_FILE).ok_or_else(|| {
            Error::invalid(
                WEIGHTS_FILE,
                "is missing: an adapter is adapter_config.json and adapter_model.safetensors",
            )
        })?;
        let tensors = crate::io::hf::parse_safetensors(&weights, bytes)?;
        Ok(Some(AdapterFiles {
            cfg,
            base,
            tensors,
            weights,
        }))
    }
}

/// One adapted linear layer: indices into the extended parameter table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Adapted {
    /// The frozen base weight (out, in).
    pub weight: usize,
    /// A (r, in) and B (out, r).
    pub a: usize,
    pub b: usize,
}

/// An adapter laid onto a model's parameter table: the base parameters first (frozen), then A
/// and B of each adapted layer in the base table's order.
#[derive(Clone, Debug)]
pub struct LoraPlan {
    pub cfg: LoraConfig,
    /// The number of base parameters (the first `base_len` of `specs`).
    pub base_len: usize,
    /// The base parameters and the adapter's, A and B named as in adapter_model.safetensors.
    pub specs: Vec<ParamSpec>,
    pub adapted: Vec<Adapted>,
}

/// The module path of a weight (its name without `.weight`).
fn module_of(name: &str) -> &str {
    name.strip_suffix(".weight").unwrap_or(name)
}

impl LoraPlan {
    /// Adapts every linear layer among `linear` (indices into `base`) whose module name ends in
    /// one of the config's targets; a target that names no linear layer is refused, with the
    /// names that would do.
    pub fn new(cfg: &LoraConfig, base: &[ParamSpec], linear: &[usize]) -> Result<LoraPlan> {
        cfg.check("LoRA")?;
        let last = |i: usize| {
            let m = module_of(&base[i].name);
            m.rsplit('.').next().unwrap_or(m).to_string()
        };
        for t in &cfg.targets {
            if !linear.iter().any(|&i| last(i) == *t) {
                let mut names: Vec<String> = linear.iter().map(|&i| last(i)).collect();
                names.dedup();
                names.sort();
                names.dedup();
                return Err(Error::invalid(
                    "LoRA target modules",
                    format!(
                        "{t:?} names no linear layer of this model (its linear layers: {})",
                        names.join(", ")
                    ),
                ));
            }
        }
        let mut specs = base.to_vec();
        let mut adapted = Vec::new();
        for &w in linear {
            if !cfg.targets.contains(&last(w)) {
                continue;
            }
            let (out, inp) = (base[w].shape[0], base[w].shape[1]);
            let module = module_of(&base[w].name);
            let mut add = |part: &str, shape: Vec<usize>| {
                specs.push(ParamSpec {
                    name: format!("base_model.model.{module}.{part}.weight"),
                    shape,
                    init: Init::Zeros,
                    decay: true,
                    hf_transposed: false,
                });
                specs.len() - 1
            };
            let a = add("lora_A", vec![cfg.r, inp]);
            let b = add("lora_B", vec![out, cfg.r]);
            adapted.push(Adapted { weight: w, a, b });
        }
        Ok(LoraPlan {
            cfg: cfg.clone(),
            base_len: base.len(),
            specs,
            adapted,
        })
    }

    /// (name, shape) of every parameter, base and adapter, for `graph::ParamStore`.
    pub fn store_specs(&self) -> Vec<(String, Vec<usize>)> {
        super::params::store_specs(&self.specs)
    }

    /// The adapter's own parameters (A and B of each layer), in order.
    pub fn adapter_specs(&self) -> &[ParamSpec] {
        &self.specs[self.base_len..]
    }

    /// How many values the frozen base holds.
    pub fn base_numel(&self) -> usize {
        self.specs[..self.base_len]
            .iter()
            .map(ParamSpec::numel)
            .sum()
    }

    /// How many values the adapter trains.
    pub fn trainable_numel(&self) -> usize {
        self.adapter_specs().iter().map(ParamSpec::numel).sum()
    }

    /// Whether each parameter of `specs` is trained: the adapter's.
    pub fn trained(&self) -> Vec<bool> {
        (0..self.specs.len()).map(|i| i >= self.base_len).collect()
    }

    /// A fresh adapter as peft initializes one: A Kaiming-uniform with a = √5 (uniform in
    /// ±1/√in), B zero, so that the adapted model starts as the base.
    pub fn init(&self, seed: u64) -> Vec<Vec<f32>> {
        let mut rng = Rng::new(seed ^ 0x10AA);
        self.adapted
            .iter()
            .flat_map(|ad| {
                let (a, b) = (&self.specs[ad.a], &self.specs[ad.b]);
                let bound = 1.0 / (a.shape[1] as f32).sqrt();
                [
                    rng.vec_uniform(a.numel(), -bound, bound),
                    vec![0.0; b.numel()],
                ]
            })
            .collect()
    }

    /// adapter_model.safetensors's tensors: (name, shape, f32 bytes) of each adapter parameter.
    pub fn tensors(&self, values: &[Vec<f32>]) -> Vec<(String, Vec<usize>, Vec<u8>)> {
        self.adapter_specs()
            .iter()
            .zip(values)
            .map(|(s, v)| {
                (
                    s.name.clone(),
                    s.shape.clone(),
                    bytemuck::cast_slice(v).to_vec(),
                )
            })
            .collect()
    }

    /// The adapter's values from adapter_model.safetensors's tensors (any float dtype), in
    /// `adapter_specs` order: a tensor missing, of another shape, or one this plan has no place
    /// for is refused by name.
    pub fn values_from(
        &self,
        path: &Path,
        mut tensors: std::collections::HashMap<String, crate::io::hf::ShapedTensor>,
    ) -> Result<Vec<Vec<f32>>> {
        let bad = |msg: String| Error::invalid(path.display().to_string(), msg);
        let mut out = Vec::new();
        for s in self.adapter_specs() {
            // peft may keep the adapter's name in a key ("lora_A.default.weight").
            let named = s.name.replace(".weight", ".default.weight");
            let found = tensors.remove(&s.name).or_else(|| tensors.remove(&named));
            match found {
                Some((shape, data)) if shape == s.shape => out.push(data),
                Some((shape, _)) => {
                    return Err(bad(format!(
                        "tensor {} has shape {shape:?}, the model needs {:?} (r {})",
                        s.name, s.shape, self.cfg.r
                    )));
                }
                None => {
                    return Err(bad(format!(
                        "tensor {} is missing (target modules {:?})",
                        s.name, self.cfg.targets
                    )));
                }
            }
        }
        if let Some(extra) = tensors.keys().min() {
            return Err(bad(format!(
                "tensor {extra} belongs to no adapted layer of this model (target modules {:?})",
                self.cfg.targets
            )));
        }
        Ok(out)
    }

    /// Reads `dir`/adapter_model.safetensors for this plan.
    pub fn read_values(&self, dir: &Path) -> Result<Vec<Vec<f32>>> {
        let path = dir.join(WEIGHTS_FILE);
        self.values_from(&path, crate::io::hf::read_safetensors(&path)?)
    }

    /// The adapter's two files (adapter_config.json naming the base `base`, and
    /// adapter_model.safetensors of the adapter's `values`) as (name, bytes) pairs;
    /// `fan_in_fan_out`: the base stores its linear weights (in, out), as GPT-2's Conv1D.
    pub fn files(
        &self,
        base: &str,
        fan_in_fan_out: bool,
        values: &[Vec<f32>],
    ) -> Result<Vec<(String, Vec<u8>)>> {
        let config = self.cfg.to_json(base, fan_in_fan_out);
        let weights =
            crate::io::hf::safetensors_bytes(Path::new(WEIGHTS_FILE), &self.tensors(values))?;
        Ok(vec![
            (
                CONFIG_FILE.to_string(),
                serde_json::to_vec_pretty(&config).expect("JSON of an adapter config"),
            ),
            (WEIGHTS_FILE.to_string(), weights),
        ])
    }

    /// The base weights with the adapter merged in: W + scale · B·A for every adapted layer
    /// (`values` holds the base's parameters, then the adapter's).
    pub fn merge(&self, values: &[Vec<f32>]) -> Vec<Vec<f32>> {
        let mut merged = values[..self.base_len].to_vec();
        let (r, scale) = (self.cfg.r, self.cfg.scale());
        for ad in &self.adapted {
            let (a, b) = (&values[ad.a], &values[ad.b]);
            let inp = self.specs[ad.a].shape[1];
            let w = &mut merged[ad.weight];
            for (o, row) in w.chunks_mut(inp).enumerate() {
                for (i, x) in row.iter_mut().enumerate() {
                    let s: f32 = (0..r).map(|j| b[o * r + j] * a[j * inp + i]).sum();
                    *x += scale * s;
                }
            }
        }
        merged
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peft_config() -> String {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/assets/gpt2-tiny-lora/adapter_config.json"
        );
        std::fs::read_to_string(path).unwrap()
    }

    fn spec(name: &str, shape: &[usize]) -> ParamSpec {
        ParamSpec {
            name: name.into(),
            shape: shape.to_vec(),
            init: Init::Zeros,
            decay: shape.len() > 1,
            hf_transposed: false,
        }
    }

    #[test]
    fn peft_configs_parse_and_ours_round_trip() {
        let (cfg, base) = LoraConfig::parse(Path::new("a.json"), &peft_config()).unwrap();
        assert_eq!((cfg.r, cfg.alpha, cfg.dropout), (4, 8.0, 0.0));
        let mut targets = cfg.targets.clone();
        targets.sort();
        assert_eq!(targets, ["c_attn", "c_fc", "c_proj"]);
        assert_eq!(base.as_deref(), Some("../gpt2-tiny"));
        assert_eq!(cfg.scale(), 2.0);
        let ours = cfg.to_json("/models/gpt2", true).to_string();
        let (again, base) = LoraConfig::parse(Path::new("b.json"), &ours).unwrap();
        assert_eq!(again, cfg);
        assert_eq!(base.as_deref(), Some("/models/gpt2"));
    }

    #[test]
    fn what_plain_lora_cannot_compute_is_refused_by_field() {
        let text = peft_config();
        for (from, to, field) in [
            ("\"use_dora\": false", "\"use_dora\": true", "use_dora"),
            (
                "\"use_rslora\": false",
                "\"use_rslora\": true",
                "use_rslora",
            ),
            ("\"bias\": \"none\"", "\"bias\": \"all\"", "bias"),
            (
                "\"rank_pattern\": {}",
                "\"rank_pattern\": {\"c_fc\": 8}",
                "rank_pattern",
            ),
            (
                "\"modules_to_save\": null",
                "\"modules_to_save\": [\"lm_head\"]",
                "modules_to_save",
            ),
            (
                "\"peft_type\": \"LORA\"",
                "\"peft_type\": \"IA3\"",
                "peft_type",
            ),
            ("\"r\": 4", "\"r\": 0", "rank"),
        ] {
            assert!(text.contains(from), "{from}");
            let bad = text.replace(from, to);
            let e = LoraConfig::parse(Path::new("adapter_config.json"), &bad)
                .unwrap_err()
                .to_string();
            assert!(
                e.contains(field) && e.contains("adapter_config.json"),
                "{e}"
            );
        }
        let regex = r#"{"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ".*proj"}"#;
        let e = LoraConfig::parse(Path::new("c.json"), regex)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("target_modules") && e.contains("regular expression"),
            "{e}"
        );
    }

    #[test]
    fn a_plan_adapts_the_targets_and_merges_w_plus_scaled_ba() {
        let base = [
            spec("h.0.q_proj.weight", &[3, 2]),
            spec("h.0.norm.weight", &[2]),
            spec("h.0.o_proj.weight", &[2, 3]),
        ];
        let cfg = LoraConfig {
            r: 1,
            alpha: 2.0,
            dropout: 0.0,
            targets: vec!["q_proj".into()],
        };
        let plan = LoraPlan::new(&cfg, &base, &[0, 2]).unwrap();
        assert_eq!(
            plan.adapted,
            [Adapted {
                weight: 0,
                a: 3,
                b: 4
            }]
        );
        let names: Vec<&str> = plan
            .adapter_specs()
            .iter()
            .map(|s| s.name.as_str())
            .collect();
        assert_eq!(
            names,
            [
                "base_model.model.h.0.q_proj.lora_A.weight",
                "base_model.model.h.0.q_proj.lora_B.weight"
            ]
        );
        assert_eq!(plan.trained(), [false, false, false, true, true]);
        // W (3, 2) + 2 · B (3, 1) · A (1, 2).
        let values = vec![
            vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
            vec![1.0, 1.0],
            vec![0.0; 6],
            vec![0.5, -1.0],
            vec![1.0, 2.0, 3.0],
        ];
        let merged = plan.merge(&values);
        assert_eq!(merged.len(), 3);
        assert_eq!(merged[0], [2.0, 0.0, 5.0, 0.0, 8.0, 0.0]);
        assert_eq!(merged[1..], values[1..3]);
        let e = LoraPlan::new(
            &LoraConfig {
                targets: vec!["k_proj".into()],
                ..cfg
            },
            &base,
            &[0, 2],
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("\"k_proj\"") && e.contains("o_proj, q_proj"),
            "{e}"
        );
    }
}
