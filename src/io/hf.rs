//! Hugging Face GPT-2 checkpoints: `config.json` and `model.safetensors` in the layout of
//! `GPT2LMHeadModel` (Conv1D weights stored (in, out); names with or without `transformer.`).

use std::collections::HashMap;
use std::path::Path;

use serde_json::{Value, json};

use crate::error::{Error, Result};
use crate::model::config::GptConfig;
use crate::model::params::ParamTable;

pub const CONFIG_FILE: &str = "config.json";
pub const WEIGHTS_FILE: &str = "model.safetensors";

fn ckpt_err(path: &Path, msg: impl Into<String>) -> Error {
    Error::invalid(path.display().to_string(), msg)
}

/// Reads and checks `DIR/config.json`. Only the GPT-2 architecture is supported.
pub fn read_config(dir: &Path) -> Result<GptConfig> {
    let path = dir.join(CONFIG_FILE);
    if !dir.is_dir() {
        return Err(ckpt_err(dir, "checkpoint directory does not exist"));
    }
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    parse_config(&path, &text)
}

/// Parses and checks the text of a config.json (`path` names it in errors).
pub fn parse_config(path: &Path, text: &str) -> Result<GptConfig> {
    let path = path.to_path_buf();
    let v: Value =
        serde_json::from_str(text).map_err(|e| ckpt_err(&path, format!("not valid JSON: {e}")))?;
    check_architecture(&path, &v)?;
    let get = |k: &str| -> Result<usize> {
        v.get(k)
            .and_then(Value::as_u64)
            .map(|x| x as usize)
            .ok_or_else(|| ckpt_err(&path, format!("missing or non-integer field '{k}'")))
    };
    let n_embd = get("n_embd")?;
    refuse_variations(&path, &v, n_embd)?;
    let dropout = v.get("resid_pdrop").and_then(Value::as_f64).unwrap_or(0.0) as f32;
    let cfg = GptConfig {
        n_layer: get("n_layer")?,
        n_head: get("n_head")?,
        n_embd,
        block_size: get("n_positions")?,
        vocab_size: get("vocab_size")?,
        dropout,
        bias: v.get("bias").and_then(Value::as_bool).unwrap_or(true),
    };
    cfg.validate().map_err(|e| ckpt_err(&path, e.to_string()))?;
    Ok(cfg)
}

/// Refuses a config whose model type and architectures are not GPT-2's.
fn check_architecture(path: &Path, v: &Value) -> Result<()> {
    let model_type = v.get("model_type").and_then(Value::as_str).unwrap_or("");
    let archs: Vec<&str> = v
        .get("architectures")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    if model_type != "gpt2" && !archs.iter().any(|a| a.starts_with("GPT2")) {
        return Err(ckpt_err(
            path,
            format!(
                "unsupported architecture (model_type '{model_type}', architectures {archs:?}); \
                 only GPT-2 (model_type \"gpt2\") is supported"
            ),
        ));
    }
    Ok(())
}

/// Refuses the variations of GPT-2 that `transformers` can configure and this engine does not
/// compute (another activation or MLP width, LayerNorm epsilon, attention scaling, untied lm
/// head), so such a checkpoint is an error rather than a silently different model.
fn refuse_variations(path: &Path, v: &Value, n_embd: usize) -> Result<()> {
    if let Some(act) = v.get("activation_function").and_then(Value::as_str)
        && act != "gelu_new"
        && act != "gelu_pytorch_tanh"
    {
        return Err(ckpt_err(
            path,
            format!("activation_function '{act}' is not supported (only gelu_new)"),
        ));
    }
    if let Some(inner) = v.get("n_inner").and_then(Value::as_u64)
        && n_embd.checked_mul(4) != Some(inner as usize)
    {
        return Err(ckpt_err(
            path,
            format!("n_inner {inner} is not supported (only 4 * n_embd, n_embd = {n_embd})"),
        ));
    }
    if let Some(eps) = v.get("layer_norm_epsilon").and_then(Value::as_f64)
        && (eps - 1e-5).abs() > 1e-12
    {
        return Err(ckpt_err(
            path,
            format!("layer_norm_epsilon {eps} is not supported (only 1e-5)"),
        ));
    }
    for flag in ["scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"] {
        if v.get(flag).and_then(Value::as_bool) == Some(true) {
            return Err(ckpt_err(path, format!("{flag} = true is not supported")));
        }
    }
    if v.get("scale_attn_weights").and_then(Value::as_bool) == Some(false) {
        return Err(ckpt_err(
            path,
            "scale_attn_weights = false is not supported",
        ));
    }
    if v.get("tie_word_embeddings").and_then(Value::as_bool) == Some(false) {
        return Err(ckpt_err(
            path,
            "tie_word_embeddings = false (a separate lm_head.weight) is not supported; only \
             GPT-2's lm head tied to the token embedding is",
        ));
    }
    Ok(())
}

/// The config.json that `transformers` needs to load the model as `GPT2LMHeadModel`.
pub fn config_json(cfg: &GptConfig) -> Value {
    json!({
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "activation_function": "gelu_new",
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_embd": cfg.n_embd,
        "n_positions": cfg.block_size,
        "n_ctx": cfg.block_size,
        "n_inner": null,
        "vocab_size": cfg.vocab_size,
        "layer_norm_epsilon": 1e-5,
        "initializer_range": 0.02,
        "resid_pdrop": cfg.dropout,
        "embd_pdrop": cfg.dropout,
        "attn_pdrop": cfg.dropout,
        "scale_attn_weights": true,
        "scale_attn_by_inverse_layer_idx": false,
        "reorder_and_upcast_attn": false,
        "tie_word_embeddings": true,
        // Not a transformers field: our models without biases store theirs as zeros, so
        // transformers computes the same function; this keeps them absent when resumed.
        "bias": cfg.bias,
        "use_cache": true,
        "bos_token_id": cfg.vocab_size.saturating_sub(1),
        "eos_token_id": cfg.vocab_size.saturating_sub(1),
        "torch_dtype": "float32",
    })
}

pub fn write_config(dir: &Path, cfg: &GptConfig) -> Result<()> {
    let path = dir.join(CONFIG_FILE);
    let text = serde_json::to_string_pretty(&config_json(cfg)).expect("JSON of a config");
    std::fs::write(&path, text).map_err(|e| Error::io(&path, e))
}

/// Converts a safetensors tensor of f32, f16 or bf16 to f32.
pub fn to_f32(path: &Path, name: &str, t: &safetensors::tensor::TensorView) -> Result<Vec<f32>> {
    use safetensors::Dtype;
    let d = t.data();
    Ok(match t.dtype() {
        Dtype::F32 => d
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Dtype::F16 => d
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::BF16 => d
            .chunks_exact(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        other => {
            return Err(ckpt_err(
                path,
                format!("tensor {name} has dtype {other:?}; only F32, F16 and BF16 are supported"),
            ));
        }
    })
}

/// Transposes a row-major (rows, cols) matrix.
pub fn transpose(x: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0; x.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = x[r * cols + c];
        }
    }
    out
}

/// The shape a parameter has in a Hugging Face checkpoint.
fn hf_shape(table: &ParamTable, cfg: &GptConfig, i: usize) -> Vec<usize> {
    let s = &table.specs[i];
    if i == table.wte {
        vec![cfg.vocab_size, cfg.n_embd]
    } else if s.hf_transposed {
        vec![s.shape[1], s.shape[0]]
    } else {
        s.shape.clone()
    }
}

/// Converts parameter i from its Hugging Face layout to ours: Conv1D weights transposed, the
/// token embedding padded to the padded vocabulary with zero rows.
pub fn from_hf(table: &ParamTable, cfg: &GptConfig, i: usize, mut data: Vec<f32>) -> Vec<f32> {
    let spec = &table.specs[i];
    if spec.hf_transposed {
        let hf = hf_shape(table, cfg, i);
        data = transpose(&data, hf[0], hf[1]);
    }
    data.resize(spec.numel(), 0.0);
    data
}

/// Refuses a config whose parameters cannot be in `DIR/model.safetensors` before anything of
/// their size is allocated: every parameter takes at least 2 bytes (f16, bf16), so a smaller file
/// was not written for this config (a corrupted or mismatched config.json).
pub fn check_weights_fit(dir: &Path, cfg: &GptConfig) -> Result<()> {
    let path = dir.join(WEIGHTS_FILE);
    let len = std::fs::metadata(&path)
        .map_err(|e| Error::io(&path, e))?
        .len();
    let need = cfg.checked_num_params().and_then(|n| n.checked_mul(2));
    if need.is_none_or(|n| n as u64 > len) {
        return Err(ckpt_err(
            &path,
            format!(
                "holds {len} bytes, too few for the {} parameters config.json declares \
                 ({} layers, {} channels, vocabulary {}, block size {})",
                cfg.checked_num_params()
                    .map_or("overflowing".to_string(), |n| n.to_string()),
                cfg.n_layer,
                cfg.n_embd,
                cfg.vocab_size,
                cfg.block_size
            ),
        ));
    }
    Ok(())
}

/// Loads every parameter of `table` from `DIR/model.safetensors`, in our layout (transposing
/// Conv1D weights and padding the vocabulary). Errors name the file, the tensor and both shapes.
pub fn load_weights(dir: &Path, cfg: &GptConfig, table: &ParamTable) -> Result<Vec<Vec<f32>>> {
    let path = dir.join(WEIGHTS_FILE);
    let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
    weights_from_bytes(&path, &bytes, cfg, table)
}

/// `load_weights` from the bytes of a model.safetensors (`path` names it in errors).
pub fn weights_from_bytes(
    path: &Path,
    bytes: &[u8],
    cfg: &GptConfig,
    table: &ParamTable,
) -> Result<Vec<Vec<f32>>> {
    let path = path.to_path_buf();
    let st = safetensors::SafeTensors::deserialize(bytes)
        .map_err(|e| ckpt_err(&path, format!("not a valid safetensors file: {e}")))?;
    let names: HashMap<String, String> = st
        .names()
        .into_iter()
        .map(|n| {
            let key = n.strip_prefix("transformer.").unwrap_or(n).to_string();
            (key, n.to_string())
        })
        .collect();
    let mut out = Vec::with_capacity(table.specs.len());
    for (i, spec) in table.specs.iter().enumerate() {
        let key = spec.name.strip_prefix("transformer.").unwrap_or(&spec.name);
        let Some(stored) = names.get(key) else {
            return Err(ckpt_err(&path, format!("tensor {} is missing", spec.name)));
        };
        let t = st
            .tensor(stored)
            .map_err(|e| ckpt_err(&path, format!("tensor {stored}: {e}")))?;
        let want = hf_shape(table, cfg, i);
        if t.shape() != want.as_slice() {
            return Err(ckpt_err(
                &path,
                format!(
                    "tensor {stored} has shape {:?}, expected {want:?} for this config",
                    t.shape()
                ),
            ));
        }
        let data = to_f32(&path, stored, &t)?;
        if let Some((k, v)) = data.iter().enumerate().find(|(_, v)| !v.is_finite()) {
            return Err(ckpt_err(
                &path,
                format!("tensor {stored} holds a non-finite value ({v}) at element {k}"),
            ));
        }
        out.push(from_hf(table, cfg, i, data));
    }
    check_absent_biases(&path, &st, &names, cfg)?;
    if let Some(stored) = names.get("lm_head.weight") {
        let t = st
            .tensor(stored)
            .map_err(|e| ckpt_err(&path, format!("tensor {stored}: {e}")))?;
        let head = to_f32(&path, stored, &t)?;
        let wte = &out[table.wte][..cfg.vocab_size * cfg.n_embd];
        if head.as_slice() != wte {
            return Err(ckpt_err(
                &path,
                format!(
                    "tensor {stored} differs from the token embedding: an untied lm head is \
                     not supported"
                ),
            ));
        }
    }
    Ok(out)
}

/// A model without biases stores GPT-2's biases as zeros (so that transformers loads it as the
/// same function); any other value there would be silently dropped, so it is an error.
fn check_absent_biases(
    path: &Path,
    st: &safetensors::SafeTensors,
    names: &HashMap<String, String>,
    cfg: &GptConfig,
) -> Result<()> {
    if cfg.bias {
        return Ok(());
    }
    let full = ParamTable::new(&GptConfig {
        bias: true,
        ..cfg.clone()
    });
    for spec in full.specs.iter().filter(|s| s.name.ends_with(".bias")) {
        let key = spec.name.strip_prefix("transformer.").unwrap_or(&spec.name);
        let Some(stored) = names.get(key) else {
            continue;
        };
        let t = st
            .tensor(stored)
            .map_err(|e| ckpt_err(path, format!("tensor {stored}: {e}")))?;
        if to_f32(path, stored, &t)?.iter().any(|&x| x != 0.0) {
            return Err(ckpt_err(
                path,
                format!(
                    "tensor {stored} is not zero, but config.json says the model has no biases"
                ),
            ));
        }
    }
    Ok(())
}

/// Writes `params` (our layout) as `DIR/model.safetensors` in the Hugging Face layout, f32.
pub fn save_weights(
    dir: &Path,
    cfg: &GptConfig,
    table: &ParamTable,
    params: &[Vec<f32>],
) -> Result<()> {
    let path = dir.join(WEIGHTS_FILE);
    let bytes = weights_bytes(cfg, table, params)?;
    std::fs::write(&path, bytes).map_err(|e| Error::io(&path, e))
}

/// The bytes of the model.safetensors `save_weights` writes.
pub fn weights_bytes(cfg: &GptConfig, table: &ParamTable, params: &[Vec<f32>]) -> Result<Vec<u8>> {
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for (i, spec) in table.specs.iter().enumerate() {
        let shape = hf_shape(table, cfg, i);
        let data: Vec<f32> = if spec.hf_transposed {
            transpose(&params[i], spec.shape[0], spec.shape[1])
        } else {
            params[i][..shape.iter().product()].to_vec()
        };
        tensors.push((
            spec.name.clone(),
            shape,
            bytemuck::cast_slice(&data).to_vec(),
        ));
    }
    if !cfg.bias {
        // GPT-2 always has biases: store ours as zeros so the checkpoint loads anywhere.
        let full = ParamTable::new(&GptConfig {
            bias: true,
            ..cfg.clone()
        });
        for spec in full.specs.iter().filter(|s| s.name.ends_with(".bias")) {
            let zeros = vec![0.0f32; spec.numel()];
            tensors.push((
                spec.name.clone(),
                spec.shape.clone(),
                bytemuck::cast_slice(&zeros).to_vec(),
            ));
        }
    }
    safetensors_bytes(Path::new(WEIGHTS_FILE), &tensors)
}

/// Writes named f32 tensors `(name, shape, little-endian bytes)` with the `{"format": "pt"}`
/// metadata that `transformers` requires.
pub fn write_safetensors(path: &Path, tensors: &[(String, Vec<usize>, Vec<u8>)]) -> Result<()> {
    let bytes = safetensors_bytes(path, tensors)?;
    std::fs::write(path, bytes).map_err(|e| Error::io(path, e))
}

/// The bytes `write_safetensors` writes (`path` names the file in errors).
pub fn safetensors_bytes(
    path: &Path,
    tensors: &[(String, Vec<usize>, Vec<u8>)],
) -> Result<Vec<u8>> {
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(n, s, d)| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), d)
                .map(|v| (n.clone(), v))
                .map_err(|e| ckpt_err(path, format!("tensor {n}: {e}")))
        })
        .collect::<Result<_>>()?;
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize(views, Some(meta))
        .map_err(|e| ckpt_err(path, format!("cannot serialize: {e}")))
}

/// A tensor's shape and f32 values.
pub type ShapedTensor = (Vec<usize>, Vec<f32>);

/// Reads every tensor of a safetensors file as f32, by name, with its shape.
pub fn read_safetensors(path: &Path) -> Result<HashMap<String, ShapedTensor>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    parse_safetensors(path, &bytes)
}

/// `read_safetensors` of a file's bytes (`path` names it in errors).
pub fn parse_safetensors(path: &Path, bytes: &[u8]) -> Result<HashMap<String, ShapedTensor>> {
    let st = safetensors::SafeTensors::deserialize(bytes)
        .map_err(|e| ckpt_err(path, format!("not a valid safetensors file: {e}")))?;
    let mut out = HashMap::new();
    for (name, t) in st.tensors() {
        let data = to_f32(path, &name, &t)?;
        out.insert(name, (t.shape().to_vec(), data));
    }
    Ok(out)
}
