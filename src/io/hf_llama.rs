//! config.json of the Llama family (`model_type` llama, mistral, qwen2, qwen3; SmolLM2 is
//! llama) in both layouts real files use: transformers 4.x (top-level `rope_theta`,
//! `rope_scaling`, `torch_dtype`) and 5.x (`rope_parameters`, `dtype`), read into an
//! architecture description, and written back in the 5.x layout.
//!
//! Every field is known: one that changes the computation and that this engine does not
//! compute is refused naming it, and a field we have never heard of is refused too, rather than
//! silently ignored. Sliding-window attention (Mistral 7B v0.1, Qwen with use_sliding_window) is
//! honoured only where it changes nothing: a window no shorter than the context; a shorter one
//! is refused.

use std::path::Path;

use serde::Deserialize;
use serde_json::{Map, Value, json};

use crate::error::{Error, Result};
use crate::model::arch::{Arch, Biases, Family, Mlp, Norm, Positions, Rope, RopeScaling};

/// A Llama-family config.json: the model, and what generation and initialization need.
#[derive(Clone, Debug, PartialEq)]
pub struct LlamaConfig {
    pub arch: Arch,
    pub bos_token_id: Option<u32>,
    /// One id or several; generation ends at any of them.
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: Option<u32>,
    /// Standard deviation of the initial weights.
    pub initializer_range: f64,
}

/// Fields transformers writes that do not change what the model computes.
const INERT: [&str; 9] = [
    "_name_or_path",
    "architectures",
    "transformers_version",
    "use_cache",
    "output_attentions",
    "output_hidden_states",
    "return_dict",
    "is_llama_config",
    "pretraining_tp",
];

/// config.json's fields that matter, as both layouts spell them.
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    model_type: String,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    max_position_embeddings: usize,
    rms_norm_eps: f64,
    hidden_act: Option<String>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
    attention_dropout: Option<f64>,
    rope_theta: Option<f64>,
    rope_scaling: Option<Map<String, Value>>,
    rope_parameters: Option<Map<String, Value>>,
    rope_interleaved: Option<bool>,
    sliding_window: Option<usize>,
    use_sliding_window: Option<bool>,
    max_window_layers: Option<usize>,
    layer_types: Option<Vec<String>>,
    bos_token_id: Option<u32>,
    eos_token_id: Option<TokenIds>,
    pad_token_id: Option<u32>,
    initializer_range: Option<f64>,
    dtype: Option<String>,
    torch_dtype: Option<String>,
}

/// An id or a list of ids (`eos_token_id`).
#[derive(Deserialize, Debug, Clone)]
#[serde(untagged)]
pub enum TokenIds {
    One(u32),
    Many(Vec<u32>),
}

impl TokenIds {
    pub fn into_vec(self) -> Vec<u32> {
        match self {
            TokenIds::One(id) => vec![id],
            TokenIds::Many(ids) => ids,
        }
    }
}

fn bad(path: &Path, field: &str, msg: impl std::fmt::Display) -> Error {
    Error::invalid(format!("{}: {field}", path.display()), msg.to_string())
}

/// The model type of a parsed config.json, if it has one.
pub fn model_type(v: &Value) -> Option<&str> {
    v.get("model_type").and_then(Value::as_str)
}

/// Whether `dir` holds a config.json whose model_type is one of the Llama family's (a directory
/// for `hf_weights::load`); false when it has none, or one that is not such JSON.
pub fn is_llama_checkpoint(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join(super::hf::CONFIG_FILE))
        .is_ok_and(|text| is_llama_config(&text))
}

/// Whether `text` is a config.json whose model_type is one of the Llama family's.
pub fn is_llama_config(text: &str) -> bool {
    serde_json::from_str::<Value>(text)
        .ok()
        .as_ref()
        .and_then(model_type)
        .is_some_and(is_llama_family)
}

/// Whether `model_type` is one of the Llama family's.
pub fn is_llama_family(model_type: &str) -> bool {
    family(model_type).is_some()
}

fn family(model_type: &str) -> Option<Family> {
    Some(match model_type {
        "llama" => Family::Llama,
        "mistral" => Family::Mistral,
        "qwen2" => Family::Qwen2,
        "qwen3" => Family::Qwen3,
        _ => return None,
    })
}

/// Parses the text of a Llama-family config.json (`path` names it in errors).
pub fn parse_config(path: &Path, text: &str) -> Result<LlamaConfig> {
    let v: Value = serde_json::from_str(text)
        .map_err(|e| Error::invalid(path.display().to_string(), format!("not valid JSON: {e}")))?;
    let Value::Object(mut map) = v else {
        return Err(Error::invalid(
            path.display().to_string(),
            "is not a JSON object",
        ));
    };
    check_architectures(path, &map)?;
    for k in INERT {
        map.remove(k);
    }
    let raw: RawConfig = serde_json::from_value(Value::Object(map)).map_err(|e| {
        Error::invalid(
            path.display().to_string(),
            format!("{e} (every field must be one this engine knows, so none is ignored)"),
        )
    })?;
    from_raw(path, raw)
}

/// Reads `DIR/config.json` as a Llama-family config.
pub fn read_config(dir: &Path) -> Result<LlamaConfig> {
    let path = dir.join(super::hf::CONFIG_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    parse_config(&path, &text)
}

/// `architectures`, when given, must be the family's causal LM.
fn check_architectures(path: &Path, map: &Map<String, Value>) -> Result<()> {
    let mt = map.get("model_type").and_then(Value::as_str).unwrap_or("");
    let Some(fam) = family(mt) else {
        return Err(bad(
            path,
            "model_type",
            format!("'{mt}' is not a Llama-family model (llama, mistral, qwen2, qwen3)"),
        ));
    };
    if let Some(archs) = map.get("architectures").and_then(Value::as_array)
        && let Some(a) = archs
            .iter()
            .filter_map(Value::as_str)
            .find(|a| *a != fam.architecture())
    {
        return Err(bad(
            path,
            "architectures",
            format!("'{a}' is not supported (only {})", fam.architecture()),
        ));
    }
    Ok(())
}

fn from_raw(path: &Path, raw: RawConfig) -> Result<LlamaConfig> {
    let fam = family(&raw.model_type).expect("checked by check_architectures");
    refuse_unsupported(path, &raw)?;
    check_sliding_window(path, fam, &raw)?;
    let n_head = raw.num_attention_heads;
    let head_dim = match raw.head_dim {
        Some(d) => d,
        None if n_head > 0 => raw.hidden_size / n_head,
        None => 0,
    };
    let attention_bias = raw.attention_bias.unwrap_or(false);
    let biases = match fam {
        // Qwen2 always has q/k/v biases and nothing else (no attention_bias field).
        Family::Qwen2 => Biases {
            qkv: true,
            ..Biases::NONE
        },
        _ => Biases {
            qkv: attention_bias,
            o: attention_bias,
            mlp: raw.mlp_bias.unwrap_or(false),
            norm: false,
        },
    };
    let arch = Arch {
        family: fam,
        n_layer: raw.num_hidden_layers,
        hidden: raw.hidden_size,
        n_head,
        n_kv_head: raw.num_key_value_heads.unwrap_or(n_head),
        head_dim,
        vocab: raw.vocab_size,
        context: raw.max_position_embeddings,
        norm: Norm::RmsNorm {
            eps: raw.rms_norm_eps,
        },
        positions: Positions::Rotary(rope(path, &raw)?),
        mlp: Mlp::GatedSilu {
            intermediate: raw.intermediate_size,
        },
        biases,
        qk_norm: fam == Family::Qwen3,
        tied_head: raw.tie_word_embeddings.unwrap_or(false),
        dropout: 0.0,
    };
    arch.validate()
        .map_err(|e| Error::invalid(path.display().to_string(), e.to_string()))?;
    Ok(LlamaConfig {
        arch,
        bos_token_id: raw.bos_token_id,
        eos_token_ids: raw.eos_token_id.map(TokenIds::into_vec).unwrap_or_default(),
        pad_token_id: raw.pad_token_id,
        initializer_range: raw.initializer_range.unwrap_or(0.02),
    })
}

/// Refuses the fields whose values change the computation in a way not computed here.
fn refuse_unsupported(path: &Path, raw: &RawConfig) -> Result<()> {
    if let Some(act) = &raw.hidden_act
        && act != "silu"
    {
        return Err(bad(
            path,
            "hidden_act",
            format!("'{act}' is not supported (only silu)"),
        ));
    }
    if raw.rope_interleaved == Some(true) {
        return Err(bad(
            path,
            "rope_interleaved",
            "true is not supported (only the rotate-half layout)",
        ));
    }
    if let Some(p) = raw.attention_dropout
        && p != 0.0
    {
        return Err(bad(
            path,
            "attention_dropout",
            format!("{p} is not supported (only 0)"),
        ));
    }
    if raw.model_type == "qwen2" && raw.attention_bias.is_some() {
        return Err(bad(
            path,
            "attention_bias",
            "is not a Qwen2 field (Qwen2 always has q/k/v biases)",
        ));
    }
    if raw.mlp_bias.is_some() && raw.model_type != "llama" {
        return Err(bad(path, "mlp_bias", "is only a Llama field"));
    }
    for (field, dtype) in [("dtype", &raw.dtype), ("torch_dtype", &raw.torch_dtype)] {
        if let Some(d) = dtype
            && !["float32", "bfloat16", "float16"].contains(&d.as_str())
        {
            return Err(bad(
                path,
                field,
                format!("'{d}' is not supported (float32, bfloat16, float16)"),
            ));
        }
    }
    Ok(())
}

/// Sliding-window attention limits each query to the last `sliding_window` keys. With a window
/// no shorter than the context that is every key, so it is accepted; a shorter window is
/// refused (it is not computed here).
fn check_sliding_window(path: &Path, fam: Family, raw: &RawConfig) -> Result<()> {
    let sliding_layers = match &raw.layer_types {
        Some(types) => {
            if types.len() != raw.num_hidden_layers {
                return Err(bad(
                    path,
                    "layer_types",
                    format!(
                        "has {} entries for {} layers",
                        types.len(),
                        raw.num_hidden_layers
                    ),
                ));
            }
            if let Some(t) = types
                .iter()
                .find(|t| !["full_attention", "sliding_attention"].contains(&t.as_str()))
            {
                return Err(bad(path, "layer_types", format!("'{t}' is not supported")));
            }
            types.iter().any(|t| t == "sliding_attention")
        }
        // Mistral slides whenever a window is given; Qwen only with use_sliding_window, and
        // then only from layer max_window_layers (transformers' default 28) on.
        None if fam == Family::Mistral => raw.sliding_window.is_some(),
        None => {
            raw.use_sliding_window == Some(true)
                && raw.sliding_window.is_some()
                && raw.num_hidden_layers > raw.max_window_layers.unwrap_or(28)
        }
    };
    if !sliding_layers {
        return Ok(());
    }
    match raw.sliding_window {
        Some(w) if w >= raw.max_position_embeddings => Ok(()),
        Some(w) => Err(bad(
            path,
            "sliding_window",
            format!(
                "{w} is shorter than the context (max_position_embeddings {}): sliding-window \
                 attention is not supported; a window no shorter than the context is",
                raw.max_position_embeddings
            ),
        )),
        None => Err(bad(
            path,
            "layer_types",
            "names sliding_attention layers but sliding_window is not given",
        )),
    }
}

/// The RoPE of either layout: 5.x's rope_parameters, or 4.x's rope_theta and rope_scaling.
fn rope(path: &Path, raw: &RawConfig) -> Result<Rope> {
    if let Some(params) = &raw.rope_parameters {
        for old in ["rope_theta", "rope_scaling"] {
            let given = match old {
                "rope_theta" => raw.rope_theta.is_some(),
                _ => raw.rope_scaling.is_some(),
            };
            if given {
                return Err(bad(
                    path,
                    old,
                    "is given beside rope_parameters: one layout or the other",
                ));
            }
        }
        let theta = params
            .get("rope_theta")
            .and_then(Value::as_f64)
            .ok_or_else(|| {
                bad(
                    path,
                    "rope_parameters.rope_theta",
                    "is missing or not a number",
                )
            })?;
        let scaling = rope_scaling(path, "rope_parameters", params)?;
        return Ok(Rope { theta, scaling });
    }
    // transformers 4.x's default theta.
    let theta = raw.rope_theta.unwrap_or(10000.0);
    let scaling = match &raw.rope_scaling {
        None => RopeScaling::None,
        Some(map) => rope_scaling(path, "rope_scaling", map)?,
    };
    Ok(Rope { theta, scaling })
}

/// The scaling of a rope_parameters / rope_scaling object (`field` names it in errors).
fn rope_scaling(path: &Path, field: &str, map: &Map<String, Value>) -> Result<RopeScaling> {
    let known = [
        "rope_type",
        "type",
        "rope_theta",
        "factor",
        "low_freq_factor",
        "high_freq_factor",
        "original_max_position_embeddings",
    ];
    if let Some(k) = map.keys().find(|k| !known.contains(&k.as_str())) {
        return Err(bad(
            path,
            &format!("{field}.{k}"),
            "is not supported by the rope types this engine computes",
        ));
    }
    let type_key = if map.contains_key("rope_type") {
        "rope_type"
    } else {
        "type"
    };
    let ty = map
        .get(type_key)
        .and_then(Value::as_str)
        .unwrap_or("default");
    let type_field = format!("{}: {field}.{type_key}", path.display());
    RopeScaling::check_type(&type_field, ty)?;
    let num = |k: &str| -> Result<f64> {
        map.get(k)
            .and_then(Value::as_f64)
            .ok_or_else(|| bad(path, &format!("{field}.{k}"), "is missing or not a number"))
    };
    Ok(match ty {
        "linear" => RopeScaling::Linear {
            factor: num("factor")?,
        },
        "llama3" => RopeScaling::Llama3 {
            factor: num("factor")?,
            low_freq_factor: num("low_freq_factor")?,
            high_freq_factor: num("high_freq_factor")?,
            original_max_position_embeddings: map
                .get("original_max_position_embeddings")
                .and_then(Value::as_u64)
                .ok_or_else(|| {
                    bad(
                        path,
                        &format!("{field}.original_max_position_embeddings"),
                        "is missing or not an integer",
                    )
                })? as usize,
        },
        _ => RopeScaling::None,
    })
}

/// config.json in transformers 5.x's layout, as its `save_pretrained` writes it for the family.
pub fn config_json(cfg: &LlamaConfig) -> Result<Value> {
    let a = &cfg.arch;
    let (Norm::RmsNorm { eps }, Positions::Rotary(rope)) = (a.norm, a.positions) else {
        return Err(Error::invalid(
            "config.json",
            "only a Llama-family model is written in this layout",
        ));
    };
    let mut rope_parameters =
        json!({"rope_theta": rope.theta, "rope_type": rope.scaling.rope_type()});
    match rope.scaling {
        RopeScaling::None => {}
        RopeScaling::Linear { factor } => rope_parameters["factor"] = json!(factor),
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        } => {
            rope_parameters["factor"] = json!(factor);
            rope_parameters["low_freq_factor"] = json!(low_freq_factor);
            rope_parameters["high_freq_factor"] = json!(high_freq_factor);
            rope_parameters["original_max_position_embeddings"] =
                json!(original_max_position_embeddings);
        }
    }
    let eos = match cfg.eos_token_ids.as_slice() {
        [] => Value::Null,
        [one] => json!(one),
        many => json!(many),
    };
    let mut v = json!({
        "architectures": [a.family.architecture()],
        "model_type": a.family.model_type(),
        "attention_dropout": 0.0,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": eos,
        "pad_token_id": cfg.pad_token_id,
        "dtype": "float32",
        "hidden_act": "silu",
        "hidden_size": a.hidden,
        "initializer_range": cfg.initializer_range,
        "intermediate_size": a.intermediate(),
        "max_position_embeddings": a.context,
        "num_attention_heads": a.n_head,
        "num_hidden_layers": a.n_layer,
        "num_key_value_heads": a.n_kv_head,
        "rms_norm_eps": eps,
        "rope_parameters": rope_parameters,
        "tie_word_embeddings": a.tied_head,
        "use_cache": true,
        "vocab_size": a.vocab,
    });
    family_fields(a, &mut v)?;
    Ok(v)
}

/// The fields one family has and the others lack; a description the family cannot express
/// (a Qwen2 without q/k/v biases) is refused.
fn family_fields(a: &Arch, v: &mut Value) -> Result<()> {
    let b = a.biases;
    let refuse = |what: &str| {
        Err(Error::invalid(
            "config.json",
            format!("a {} model cannot have {what}", a.family.model_type()),
        ))
    };
    let attention_bias = b.qkv;
    if b.qkv != b.o && a.family != Family::Qwen2 {
        return refuse("biases on q/k/v but not on o_proj (or the reverse)");
    }
    if b.mlp && a.family != Family::Llama {
        return refuse("MLP biases");
    }
    if a.qk_norm != (a.family == Family::Qwen3) {
        return refuse(if a.qk_norm {
            "q/k norms"
        } else {
            "no q/k norms"
        });
    }
    let full = vec!["full_attention"; a.n_layer];
    match a.family {
        Family::Llama => {
            v["attention_bias"] = json!(attention_bias);
            v["mlp_bias"] = json!(b.mlp);
            v["head_dim"] = json!(a.head_dim);
            v["pretraining_tp"] = json!(1);
        }
        Family::Mistral => {
            if attention_bias {
                return refuse("attention biases");
            }
            v["head_dim"] = json!(a.head_dim);
            v["sliding_window"] = Value::Null;
        }
        Family::Qwen2 | Family::Qwen3 => {
            if a.family == Family::Qwen2 && (!b.qkv || b.o) {
                return refuse("other biases than on q/k/v");
            }
            if a.family == Family::Qwen2 && a.head_dim * a.n_head != a.hidden {
                return refuse("head_dim other than hidden_size / num_attention_heads");
            }
            if a.family == Family::Qwen3 {
                v["attention_bias"] = json!(attention_bias);
                v["head_dim"] = json!(a.head_dim);
            }
            v["layer_types"] = json!(full);
            v["max_window_layers"] = json!(a.n_layer);
            v["sliding_window"] = Value::Null;
            v["use_sliding_window"] = json!(false);
        }
        Family::Gpt2 => return refuse("this layout (it is GPT-2)"),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const QWEN3: &str = r#"{"model_type": "qwen3", "vocab_size": 97, "hidden_size": 52,
        "intermediate_size": 68, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 18, "max_position_embeddings": 128,
        "rms_norm_eps": 1e-6, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}"#;

    fn parse(text: &str) -> Result<LlamaConfig> {
        parse_config(Path::new("config.json"), text)
    }

    #[test]
    fn written_configs_read_back_to_the_same_description() {
        let cfg = parse(QWEN3).unwrap();
        assert!(cfg.arch.qk_norm && cfg.arch.head_dim == 18);
        let text = serde_json::to_string(&config_json(&cfg).unwrap()).unwrap();
        assert_eq!(parse(&text).unwrap(), cfg);
    }

    #[test]
    fn unknown_fields_and_short_windows_are_refused_by_name() {
        let with = |extra: &str| QWEN3.replacen('{', &format!("{{{extra},"), 1);
        let e = parse(&with(r#""rope_magic": 3"#)).unwrap_err().to_string();
        assert!(e.contains("rope_magic"), "{e}");
        let e = parse(&with(
            r#""use_sliding_window": true, "sliding_window": 64, "max_window_layers": 1"#,
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("sliding_window") && e.contains("64"), "{e}");
        // A window covering the whole context changes nothing.
        parse(&with(
            r#""use_sliding_window": true, "sliding_window": 128"#,
        ))
        .unwrap();
        let e = parse(&with(r#""hidden_act": "gelu""#))
            .unwrap_err()
            .to_string();
        assert!(e.contains("hidden_act"), "{e}");
        let e = parse(&QWEN3.replace("\"default\"", "\"yarn\""))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("rope_parameters.rope_type") && e.contains("yarn"),
            "{e}"
        );
    }
}
