//! The weights of a Llama-family checkpoint: `model.safetensors`, or shards listed by
//! `model.safetensors.index.json`, in f32, bf16 or f16 (widened to f32 on load), checked against
//! the parameter table; and our checkpoints written back in the same layout (f32), one file or
//! sharded, each file atomically.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::hf::{self, CONFIG_FILE, WEIGHTS_FILE};
use super::hf_llama::{self, LlamaConfig};
use crate::error::{Error, Result};
use crate::model::llama_params::LlamaParams;

pub const INDEX_FILE: &str = "model.safetensors.index.json";
pub const GENERATION_FILE: &str = "generation_config.json";
/// Where a checkpoint's files are written before each is renamed into place.
const STAGING_DIR: &str = ".shaderformer.staging";

/// model.safetensors.index.json.
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct Index {
    #[allow(dead_code)]
    metadata: Option<Map<String, Value>>,
    weight_map: BTreeMap<String, String>,
}

/// Tensors transformers drops on load: RoPE's inverse frequencies, which old checkpoints stored
/// and which are computed from config.json.
fn dropped_on_load(name: &str) -> bool {
    name.ends_with(".rotary_emb.inv_freq")
}

fn bad(path: &Path, msg: impl Into<String>) -> Error {
    Error::invalid(path.display().to_string(), msg)
}

/// Loads every parameter of `table` from `dir`: model.safetensors if present, else the shards
/// of model.safetensors.index.json.
pub fn load_weights(dir: &Path, table: &LlamaParams) -> Result<Vec<Vec<f32>>> {
    weights_from_files(dir, table, |name| {
        let path = dir.join(name);
        match fs::read(&path) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io(&path, e)),
        }
    })
}

/// `load_weights` over any source of files (a directory, a browser's file picker): `read(name)`
/// gives a file's bytes, or `None` where there is no such file; `dir` names them in errors.
pub fn weights_from_files(
    dir: &Path,
    table: &LlamaParams,
    mut read: impl FnMut(&str) -> Result<Option<Vec<u8>>>,
) -> Result<Vec<Vec<f32>>> {
    let mut found: HashMap<String, Vec<f32>> = HashMap::new();
    if let Some(bytes) = read(WEIGHTS_FILE)? {
        read_file(&dir.join(WEIGHTS_FILE), &bytes, table, None, &mut found)?;
    } else if let Some(bytes) = read(INDEX_FILE)? {
        let index_path = dir.join(INDEX_FILE);
        let index: Index = serde_json::from_slice(&bytes)
            .map_err(|e| bad(&index_path, format!("not a valid index: {e}")))?;
        check_index(&index_path, &index, table)?;
        let shards: std::collections::BTreeSet<&String> = index.weight_map.values().collect();
        for shard in shards {
            let path = dir.join(shard);
            let bytes = read(shard)?.ok_or_else(|| {
                bad(
                    &path,
                    format!("is missing: {INDEX_FILE} places tensors in it"),
                )
            })?;
            read_file(&path, &bytes, table, Some((shard, &index)), &mut found)?;
        }
    } else {
        return Err(bad(
            origin(dir),
            format!("has neither {WEIGHTS_FILE} nor {INDEX_FILE}"),
        ));
    }
    let mut out = Vec::with_capacity(table.specs.len());
    for spec in &table.specs {
        let data = found.remove(&spec.name).ok_or_else(|| {
            bad(
                origin(dir),
                format!("tensor {} {:?} is missing", spec.name, spec.shape),
            )
        })?;
        out.push(data);
    }
    check_tied_head(origin(dir), table, &found, &out)?;
    Ok(out)
}

/// How errors about the whole checkpoint name it: its directory, or where its files came
/// without one (an empty `dir`), the words "the checkpoint".
fn origin(dir: &Path) -> &Path {
    if dir.as_os_str().is_empty() {
        Path::new("the checkpoint")
    } else {
        dir
    }
}

/// The index names every tensor of the table, nothing unexpected, and only plain file names.
fn check_index(path: &Path, index: &Index, table: &LlamaParams) -> Result<()> {
    for spec in &table.specs {
        if !index.weight_map.contains_key(&spec.name) {
            return Err(bad(
                path,
                format!("tensor {} is missing from weight_map", spec.name),
            ));
        }
    }
    for (name, shard) in &index.weight_map {
        if table.find(name).is_none() && !dropped_on_load(name) && !is_tied_head(table, name) {
            return Err(bad(
                path,
                format!("tensor {name} (in {shard}) is not a parameter of this model"),
            ));
        }
        if shard.contains(['/', '\\']) || shard.starts_with('.') {
            return Err(bad(
                path,
                format!("shard '{shard}' of tensor {name} is not a file name in the directory"),
            ));
        }
    }
    Ok(())
}

/// A tied model may still store lm_head.weight (a copy of the embedding).
fn is_tied_head(table: &LlamaParams, name: &str) -> bool {
    table.lm_head.is_none() && name == "lm_head.weight"
}

/// Reads the tensors of one safetensors file into `found`, each checked against the table:
/// shape, dtype, finiteness, and (sharded) the index's placement.
fn read_file(
    path: &Path,
    bytes: &[u8],
    table: &LlamaParams,
    shard: Option<(&String, &Index)>,
    found: &mut HashMap<String, Vec<f32>>,
) -> Result<()> {
    let st = safetensors::SafeTensors::deserialize(bytes)
        .map_err(|e| bad(path, format!("not a valid safetensors file: {e}")))?;
    let mut names = st.names();
    names.sort();
    for name in names {
        if let Some((file, index)) = shard
            && index.weight_map.get(name) != Some(file)
        {
            return Err(bad(
                path,
                format!(
                    "holds tensor {name}, which {INDEX_FILE} places in {}",
                    index
                        .weight_map
                        .get(name)
                        .map_or("no shard", String::as_str)
                ),
            ));
        }
        if dropped_on_load(name) {
            continue;
        }
        let want = match table.find(name) {
            Some(i) => table.specs[i].shape.clone(),
            None if is_tied_head(table, name) => table.specs[table.embed].shape.clone(),
            None => {
                return Err(bad(
                    path,
                    format!("tensor {name} is not a parameter of this model"),
                ));
            }
        };
        let t = st
            .tensor(name)
            .map_err(|e| bad(path, format!("tensor {name}: {e}")))?;
        if t.shape() != want.as_slice() {
            return Err(bad(
                path,
                format!(
                    "tensor {name} has shape {:?}, expected {want:?} for this config",
                    t.shape()
                ),
            ));
        }
        let data = hf::to_f32(path, name, &t)?;
        if let Some((k, v)) = data.iter().enumerate().find(|(_, v)| !v.is_finite()) {
            return Err(bad(
                path,
                format!("tensor {name} holds a non-finite value ({v}) at element {k}"),
            ));
        }
        found.insert(name.to_string(), data);
    }
    Ok(())
}

/// A stored lm_head.weight of a tied model must be the embedding (it is not used).
fn check_tied_head(
    dir: &Path,
    table: &LlamaParams,
    rest: &HashMap<String, Vec<f32>>,
    params: &[Vec<f32>],
) -> Result<()> {
    if let Some(head) = rest.get("lm_head.weight")
        && *head != params[table.embed]
    {
        return Err(bad(
            dir,
            "tensor lm_head.weight differs from model.embed_tokens.weight, but config.json \
             ties them (tie_word_embeddings)",
        ));
    }
    Ok(())
}

/// The weight files of `params` in the Hugging Face layout, f32: one model.safetensors, or with
/// `max_shard_bytes` as many `model-0000i-of-0000n.safetensors` as needed (tensors in table
/// order, a shard closed when the next tensor would take it past the limit) and the index.
pub fn weight_files(
    table: &LlamaParams,
    params: &[Vec<f32>],
    max_shard_bytes: Option<u64>,
) -> Result<Vec<(String, Vec<u8>)>> {
    if params.len() != table.specs.len() {
        return Err(Error::invalid(
            "checkpoint",
            format!(
                "{} parameter tensors for a table of {}",
                params.len(),
                table.specs.len()
            ),
        ));
    }
    let mut tensors = Vec::with_capacity(params.len());
    for (spec, data) in table.specs.iter().zip(params) {
        if data.len() != spec.numel() {
            return Err(Error::invalid(
                &spec.name,
                format!("{} values for shape {:?}", data.len(), spec.shape),
            ));
        }
        tensors.push((
            spec.name.clone(),
            spec.shape.clone(),
            bytemuck::cast_slice::<f32, u8>(data).to_vec(),
        ));
    }
    let Some(max) = max_shard_bytes else {
        let bytes = hf::safetensors_bytes(Path::new(WEIGHTS_FILE), &tensors)?;
        return Ok(vec![(WEIGHTS_FILE.to_string(), bytes)]);
    };
    let groups = shard_groups(&tensors, max);
    let n = groups.len();
    let mut files = Vec::with_capacity(n + 1);
    let mut weight_map = BTreeMap::new();
    for (k, group) in groups.into_iter().enumerate() {
        let name = format!("model-{:05}-of-{n:05}.safetensors", k + 1);
        for t in &group {
            weight_map.insert(t.0.clone(), name.clone());
        }
        files.push((
            name.clone(),
            hf::safetensors_bytes(Path::new(&name), &group)?,
        ));
    }
    let total_size: usize = tensors.iter().map(|t| t.2.len()).sum();
    let total_parameters: usize = table.specs.iter().map(|s| s.numel()).sum();
    let index = json!({
        "metadata": {"total_parameters": total_parameters, "total_size": total_size},
        "weight_map": weight_map,
    });
    let text = serde_json::to_vec_pretty(&index).expect("JSON of an index");
    files.push((INDEX_FILE.to_string(), text));
    Ok(files)
}

type Tensor = (String, Vec<usize>, Vec<u8>);

/// Tensors in order, split greedily into groups of at most `max` bytes (a tensor larger than
/// `max` alone in its group, as transformers does).
fn shard_groups(tensors: &[Tensor], max: u64) -> Vec<Vec<Tensor>> {
    let mut groups: Vec<Vec<Tensor>> = vec![Vec::new()];
    let mut size = 0u64;
    for t in tensors {
        let len = t.2.len() as u64;
        if size + len > max && !groups.last().is_some_and(Vec::is_empty) {
            groups.push(Vec::new());
            size = 0;
        }
        size += len;
        groups
            .last_mut()
            .expect("one group at least")
            .push(t.clone());
    }
    groups
}

/// generation_config.json: what generation needs of it (bos, eos and pad ids). Its sampling
/// defaults (temperature, top_p, ...) are not applied: sample's flags decide those.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GenerationConfig {
    pub bos_token_id: Option<u32>,
    /// Generation ends at any of these.
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: Option<u32>,
}

#[derive(Deserialize)]
struct RawGeneration {
    bos_token_id: Option<u32>,
    eos_token_id: Option<hf_llama::TokenIds>,
    pad_token_id: Option<u32>,
}

impl GenerationConfig {
    /// Parses a generation_config.json (`path` names it in errors).
    pub fn parse(path: &Path, text: &str) -> Result<GenerationConfig> {
        let raw: RawGeneration = serde_json::from_str(text)
            .map_err(|e| bad(path, format!("not a valid generation config: {e}")))?;
        Ok(GenerationConfig {
            bos_token_id: raw.bos_token_id,
            eos_token_ids: raw
                .eos_token_id
                .map(hf_llama::TokenIds::into_vec)
                .unwrap_or_default(),
            pad_token_id: raw.pad_token_id,
        })
    }

    /// `DIR/generation_config.json`, or `None` where there is none.
    pub fn read(dir: &Path) -> Result<Option<GenerationConfig>> {
        let path = dir.join(GENERATION_FILE);
        match fs::read_to_string(&path) {
            Ok(text) => Self::parse(&path, &text).map(Some),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io(&path, e)),
        }
    }

    /// The ids that end generation: generation_config.json's where it names any, else
    /// config.json's (as transformers' `generate` falls back).
    pub fn eos_or(this: Option<&GenerationConfig>, cfg: &LlamaConfig) -> Vec<u32> {
        match this {
            Some(g) if !g.eos_token_ids.is_empty() => g.eos_token_ids.clone(),
            _ => cfg.eos_token_ids.clone(),
        }
    }

    /// The generation_config.json transformers writes beside a model of `cfg`.
    pub fn json_of(cfg: &LlamaConfig) -> Value {
        let eos = match cfg.eos_token_ids.as_slice() {
            [] => Value::Null,
            [one] => json!(one),
            many => json!(many),
        };
        json!({
            "_from_model_config": true,
            "bos_token_id": cfg.bos_token_id,
            "eos_token_id": eos,
            "pad_token_id": cfg.pad_token_id,
            "use_cache": true,
        })
    }
}

/// Writes a Llama-family model into `dir` as transformers' save_pretrained lays it out:
/// config.json (5.x layout), generation_config.json, and the weights in f32, sharded when
/// `max_shard_bytes` is given. Every file is written and synced in a hidden staging directory,
/// then renamed over its old copy; weight files of the other layout (a stale index or
/// model.safetensors, old shards) are removed after, so the directory holds one model.
pub fn save(
    dir: &Path,
    cfg: &LlamaConfig,
    table: &LlamaParams,
    params: &[Vec<f32>],
    max_shard_bytes: Option<u64>,
) -> Result<()> {
    let mut files = weight_files(table, params, max_shard_bytes)?;
    let config = hf_llama::config_json(cfg)?;
    files.push((
        CONFIG_FILE.to_string(),
        serde_json::to_vec_pretty(&config).expect("JSON of a config"),
    ));
    files.push((
        GENERATION_FILE.to_string(),
        serde_json::to_vec_pretty(&GenerationConfig::json_of(cfg)).expect("JSON"),
    ));
    write_atomically(dir, &files)?;
    remove_stale_weights(dir, &files)
}

fn io<T>(path: &Path, r: std::io::Result<T>) -> Result<T> {
    r.map_err(|e| Error::io(path, e))
}

/// Writes `files` into `dir`: all staged and synced first, then renamed into place; on failure
/// the staging directory is removed and the old files stay.
pub fn write_atomically(dir: &Path, files: &[(String, Vec<u8>)]) -> Result<()> {
    io(dir, fs::create_dir_all(dir))?;
    let staging = dir.join(STAGING_DIR);
    let result = stage(&staging, files).and_then(|()| {
        for (name, _) in files {
            let to = dir.join(name);
            io(&to, fs::rename(staging.join(name), &to))?;
        }
        sync_dir(dir);
        Ok(())
    });
    if staging.exists() {
        let _ = fs::remove_dir_all(&staging);
    }
    result
}

fn stage(staging: &Path, files: &[(String, Vec<u8>)]) -> Result<()> {
    if staging.exists() {
        io(staging, fs::remove_dir_all(staging))?;
    }
    io(staging, fs::create_dir(staging))?;
    for (name, bytes) in files {
        let path = staging.join(name);
        io(&path, fs::write(&path, bytes))?;
        io(&path, fs::File::open(&path).and_then(|f| f.sync_all()))?;
    }
    sync_dir(staging);
    Ok(())
}

fn sync_dir(path: &Path) {
    // Durability of the renames; not every platform can open a directory, which is fine.
    if let Ok(f) = fs::File::open(path) {
        let _ = f.sync_all();
    }
}

/// Removes weight files of `dir` that the checkpoint just written does not list.
pub fn remove_stale_weights(dir: &Path, written: &[(String, Vec<u8>)]) -> Result<()> {
    let keep: Vec<&str> = written.iter().map(|f| f.0.as_str()).collect();
    let mut stale: Vec<PathBuf> = Vec::new();
    for entry in io(dir, fs::read_dir(dir))? {
        let name = io(dir, entry)?.file_name().to_string_lossy().to_string();
        let weights = name == WEIGHTS_FILE || name == INDEX_FILE || is_shard_name(&name);
        if weights && !keep.contains(&name.as_str()) {
            stale.push(dir.join(name));
        }
    }
    for path in stale {
        io(&path, fs::remove_file(&path))?;
    }
    Ok(())
}

/// `model-00001-of-00003.safetensors`.
fn is_shard_name(name: &str) -> bool {
    let Some(rest) = name
        .strip_prefix("model-")
        .and_then(|r| r.strip_suffix(".safetensors"))
    else {
        return false;
    };
    let parts: Vec<&str> = rest.split("-of-").collect();
    parts.len() == 2
        && parts
            .iter()
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
}

/// A Llama-family checkpoint as read from its directory.
#[derive(Clone, Debug)]
pub struct LlamaCheckpoint {
    pub cfg: LlamaConfig,
    pub table: LlamaParams,
    /// Parameters in table order, f32.
    pub params: Vec<Vec<f32>>,
    /// The ids that end generation (generation_config.json's, else config.json's).
    pub eos_token_ids: Vec<u32>,
}

/// Reads config.json, generation_config.json and the weights of a Llama-family directory.
pub fn load(dir: &Path) -> Result<LlamaCheckpoint> {
    if !dir.is_dir() {
        return Err(bad(dir, "checkpoint directory does not exist"));
    }
    let cfg = hf_llama::read_config(dir)?;
    let table = LlamaParams::new(&cfg.arch, cfg.initializer_range as f32)?;
    let params = load_weights(dir, &table)?;
    let generation = GenerationConfig::read(dir)?;
    Ok(LlamaCheckpoint::assemble(cfg, table, params, generation))
}

/// `load` over files given by name (a browser's file picker): config.json, the weights
/// (model.safetensors or the index and its shards) and, if given, generation_config.json.
pub fn from_files(files: &HashMap<String, Vec<u8>>) -> Result<LlamaCheckpoint> {
    let text = |name: &str| text_of(files, name);
    let config = text(CONFIG_FILE)?.ok_or_else(|| {
        bad(
            Path::new(CONFIG_FILE),
            "is missing: a checkpoint is config.json and its weights",
        )
    })?;
    let cfg = hf_llama::parse_config(Path::new(CONFIG_FILE), config)?;
    let table = LlamaParams::new(&cfg.arch, cfg.initializer_range as f32)?;
    // Errors name each file alone (the files have no directory).
    let params = weights_from_files(Path::new(""), &table, |name| Ok(files.get(name).cloned()))?;
    let generation = text(GENERATION_FILE)?
        .map(|t| GenerationConfig::parse(Path::new(GENERATION_FILE), t))
        .transpose()?;
    Ok(LlamaCheckpoint::assemble(cfg, table, params, generation))
}

/// The file `name` of `files` as text, `None` where it is absent; an error names a file that is
/// not UTF-8.
pub fn text_of<'f>(files: &'f HashMap<String, Vec<u8>>, name: &str) -> Result<Option<&'f str>> {
    files
        .get(name)
        .map(|b| std::str::from_utf8(b).map_err(|_| bad(Path::new(name), "is not UTF-8 text")))
        .transpose()
}

impl LlamaCheckpoint {
    fn assemble(
        cfg: LlamaConfig,
        table: LlamaParams,
        params: Vec<Vec<f32>>,
        generation: Option<GenerationConfig>,
    ) -> LlamaCheckpoint {
        let eos_token_ids = GenerationConfig::eos_or(generation.as_ref(), &cfg);
        LlamaCheckpoint {
            cfg,
            table,
            params,
            eos_token_ids,
        }
    }
}
