//! Llama-family checkpoints against the fixtures transformers saved (scripts/fixtures_llama.py):
//! config.json in both layouts, RoPE frequencies, f32 / bf16 / f16 and sharded weights, and
//! our own checkpoints written and read back.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use shaderformer::io::hf_llama::{self, LlamaConfig};
use shaderformer::io::hf_weights::{self, GenerationConfig};
use shaderformer::model::arch::{Family, Positions, RopeScaling};
use shaderformer::model::llama_params::LlamaParams;

const DIRS: [&str; 5] = [
    "llama-tiny",
    "qwen2-tiny",
    "qwen3-tiny",
    "llama-tiny-sharded",
    "qwen3-tiny-bf16",
];

fn asset(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("assets")
        .join(name)
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sf-llama-io-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn parse(path: &Path) -> shaderformer::Result<LlamaConfig> {
    hf_llama::parse_config(path, &std::fs::read_to_string(path).unwrap())
}

/// A fixture tensor as f32 (ids widened), by name.
fn fixture(dir: &str, name: &str) -> Vec<f32> {
    let bytes = std::fs::read(asset(dir).join("fixture.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor(name).unwrap();
    match t.dtype() {
        safetensors::Dtype::F32 => bytemuck::pod_collect_to_vec::<u8, f32>(t.data()),
        safetensors::Dtype::I32 => bytemuck::pod_collect_to_vec::<u8, i32>(t.data())
            .into_iter()
            .map(|x| x as f32)
            .collect(),
        d => panic!("{name}: dtype {d:?}"),
    }
}

#[test]
fn both_config_layouts_parse_to_the_same_description() {
    for dir in DIRS {
        let new = parse(&asset(dir).join("config.json")).unwrap();
        let old = parse(&asset(dir).join("config.4x.json")).unwrap();
        assert_eq!(new, old, "{dir}");
    }
    let llama = parse(&asset("llama-tiny/config.json")).unwrap().arch;
    assert_eq!(llama.family, Family::Llama);
    assert_eq!((llama.n_head, llama.n_kv_head, llama.head_dim), (6, 2, 10));
    assert!(!llama.tied_head && !llama.biases.qkv && !llama.qk_norm);
    let Positions::Rotary(rope) = llama.positions else {
        panic!("llama-tiny: positions {:?}", llama.positions)
    };
    assert_eq!(rope.theta, 20000.0);
    assert!(matches!(
        rope.scaling,
        RopeScaling::Llama3 { factor: 8.0, .. }
    ));
    let qwen2 = parse(&asset("qwen2-tiny/config.json")).unwrap();
    assert!(qwen2.arch.tied_head && qwen2.arch.biases.qkv && !qwen2.arch.biases.o);
    assert_eq!(qwen2.eos_token_ids, vec![2, 0]);
    let qwen3 = parse(&asset("qwen3-tiny/config.json")).unwrap().arch;
    assert!(qwen3.qk_norm && qwen3.head_dim == 18 && qwen3.hidden == 52);
}

#[test]
fn rope_frequencies_are_transformers_own_bit_for_bit() {
    for dir in ["llama-tiny", "qwen2-tiny", "qwen3-tiny"] {
        let arch = parse(&asset(dir).join("config.json")).unwrap().arch;
        let Positions::Rotary(rope) = arch.positions else {
            panic!("{dir}: not rotary")
        };
        let ours = rope.inv_freq(arch.head_dim);
        let want = fixture(dir, "rope.inv_freq");
        assert_eq!(ours.len(), want.len(), "{dir}");
        for (i, (a, b)) in ours.iter().zip(&want).enumerate() {
            assert_eq!(
                a.to_bits(),
                b.to_bits(),
                "{dir}: inv_freq[{i}] {a:e} vs {b:e}"
            );
        }
    }
}

/// Writes `edit` of a fixture config as config.json in a scratch directory and parses it.
fn mutated(src: &str, tag: &str, edit: impl FnOnce(&mut serde_json::Value)) -> String {
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(asset(src)).unwrap()).unwrap();
    edit(&mut v);
    let dir = scratch(tag);
    let path = dir.join("config.json");
    std::fs::write(&path, v.to_string()).unwrap();
    parse(&path).unwrap_err().to_string()
}

#[test]
fn configs_we_cannot_honour_are_refused_naming_the_field() {
    let e = mutated("llama-tiny/config.json", "yarn5", |v| {
        v["rope_parameters"]["rope_type"] = "yarn".into();
    });
    assert!(
        e.contains("rope_parameters.rope_type") && e.contains("'yarn'"),
        "{e}"
    );
    let e = mutated("llama-tiny/config.4x.json", "dyn4", |v| {
        v["rope_scaling"]["rope_type"] = "dynamic".into();
    });
    assert!(
        e.contains("rope_scaling.rope_type") && e.contains("'dynamic'"),
        "{e}"
    );
    let e = mutated("llama-tiny/config.json", "mistral", |v| {
        let o = v.as_object_mut().unwrap();
        o.insert("model_type".into(), "mistral".into());
        o.insert(
            "architectures".into(),
            serde_json::json!(["MistralForCausalLM"]),
        );
        o.remove("mlp_bias");
        o.insert("sliding_window".into(), 64.into());
    });
    assert!(e.contains("sliding_window") && e.contains("64"), "{e}");
    // 4.x: no layer_types, sliding from layer max_window_layers on.
    let e = mutated("qwen2-tiny/config.4x.json", "qwen2sw", |v| {
        v.as_object_mut().unwrap().remove("layer_types");
        v["use_sliding_window"] = true.into();
        v["sliding_window"] = 32.into();
        v["max_window_layers"] = 1.into();
    });
    assert!(e.contains("sliding_window") && e.contains("32"), "{e}");
    // 5.x: layer_types says which layers slide.
    let e = mutated("qwen3-tiny/config.json", "qwen3sw", |v| {
        v["layer_types"][1] = "sliding_attention".into();
        v["sliding_window"] = 32.into();
    });
    assert!(e.contains("sliding_window") && e.contains("32"), "{e}");
    let e = mutated("qwen3-tiny/config.json", "unknown", |v| {
        v["quantization_config"] = serde_json::json!({"bits": 4});
    });
    assert!(e.contains("quantization_config"), "{e}");
    let e = mutated("llama-tiny/config.json", "gpt2", |v| {
        v["model_type"] = "gpt_neox".into();
    });
    assert!(e.contains("model_type") && e.contains("gpt_neox"), "{e}");
}

#[test]
fn generation_config_eos_ids_one_or_a_list() {
    let g = GenerationConfig::read(&asset("qwen2-tiny"))
        .unwrap()
        .unwrap();
    assert_eq!(g.eos_token_ids, vec![2, 0]);
    let ck = hf_weights::load(&asset("llama-tiny")).unwrap();
    assert_eq!(ck.eos_token_ids, vec![82]);
    let ck = hf_weights::load(&asset("qwen3-tiny")).unwrap();
    assert_eq!(ck.eos_token_ids, vec![96]);
}

fn by_name(ck: &hf_weights::LlamaCheckpoint) -> HashMap<String, Vec<f32>> {
    ck.table
        .specs
        .iter()
        .map(|s| s.name.clone())
        .zip(ck.params.iter().cloned())
        .collect()
}

#[test]
fn sharded_and_bf16_checkpoints_load_to_the_fixture_weights() {
    let whole = hf_weights::load(&asset("llama-tiny")).unwrap();
    // Every parameter's gradient is in the fixture, by the same name and size.
    for (spec, p) in whole.table.specs.iter().zip(&whole.params) {
        assert_eq!(
            fixture("llama-tiny", &format!("grad.{}", spec.name)).len(),
            p.len()
        );
    }
    let sharded = hf_weights::load(&asset("llama-tiny-sharded")).unwrap();
    assert_eq!(by_name(&whole), by_name(&sharded));
    let f32s = hf_weights::load(&asset("qwen3-tiny")).unwrap();
    let bf16 = hf_weights::load(&asset("qwen3-tiny-bf16")).unwrap();
    for (name, want) in by_name(&f32s) {
        let got = &by_name(&bf16)[&name];
        let rounded: Vec<f32> = want
            .iter()
            .map(|&x| half::bf16::from_f32(x).to_f32())
            .collect();
        assert_eq!(got, &rounded, "{name}");
        assert_ne!(
            got, &want,
            "{name}: bf16 equal to f32, the test proves nothing"
        );
    }
}

/// A checkpoint given as files by name (a browser's file picker) loads as its directory does,
/// sharded included; a missing shard or config is named.
#[test]
fn checkpoints_opened_from_files_equal_their_directories() {
    let files_of = |dir: &Path| -> HashMap<String, Vec<u8>> {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .map(|p| {
                let name = p.file_name().unwrap().to_str().unwrap().to_string();
                (name, std::fs::read(&p).unwrap())
            })
            .collect()
    };
    for name in ["llama-tiny-sharded", "qwen2-tiny"] {
        let from_dir = hf_weights::load(&asset(name)).unwrap();
        let files = files_of(&asset(name));
        let opened = hf_weights::from_files(&files).unwrap();
        assert_eq!(by_name(&opened), by_name(&from_dir), "{name}");
        assert_eq!(opened.eos_token_ids, from_dir.eos_token_ids, "{name}");
        assert_eq!(opened.cfg.arch, from_dir.cfg.arch, "{name}");
    }
    let mut files = files_of(&asset("llama-tiny-sharded"));
    files.remove("model-00002-of-00003.safetensors");
    let e = hf_weights::from_files(&files).unwrap_err().to_string();
    assert!(
        e.contains("model-00002-of-00003.safetensors") && e.contains("missing"),
        "{e}"
    );
    files.remove("config.json");
    let e = hf_weights::from_files(&files).unwrap_err().to_string();
    assert!(e.contains("config.json") && e.contains("missing"), "{e}");
}

#[test]
fn f16_weights_are_widened_on_load() {
    let src = asset("qwen2-tiny");
    let ck = hf_weights::load(&src).unwrap();
    let dir = scratch("f16");
    std::fs::copy(src.join("config.json"), dir.join("config.json")).unwrap();
    let halves: Vec<Vec<u8>> = ck
        .params
        .iter()
        .map(|p| {
            p.iter()
                .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
                .collect()
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = ck
        .table
        .specs
        .iter()
        .zip(&halves)
        .map(|(s, d)| {
            let v =
                safetensors::tensor::TensorView::new(safetensors::Dtype::F16, s.shape.clone(), d);
            (s.name.clone(), v.unwrap())
        })
        .collect();
    let bytes = safetensors::serialize(views, None).unwrap();
    std::fs::write(dir.join("model.safetensors"), bytes).unwrap();
    let half = hf_weights::load(&dir).unwrap();
    for (p, q) in ck.params.iter().zip(&half.params) {
        let want: Vec<f32> = p.iter().map(|&x| half::f16::from_f32(x).to_f32()).collect();
        assert_eq!(q, &want);
    }
}

#[test]
fn written_checkpoints_read_back_whole_or_sharded() {
    let ck = hf_weights::load(&asset("llama-tiny")).unwrap();
    let dir = scratch("roundtrip");
    for shard in [None, Some(60_000), None] {
        hf_weights::save(&dir, &ck.cfg, &ck.table, &ck.params, shard).unwrap();
        let back = hf_weights::load(&dir).unwrap();
        assert_eq!(back.cfg, ck.cfg);
        assert_eq!(back.params, ck.params);
        assert_eq!(back.eos_token_ids, ck.eos_token_ids);
        let shards = std::fs::read_dir(&dir)
            .unwrap()
            .filter(|e| {
                let n = e.as_ref().unwrap().file_name();
                n.to_string_lossy().starts_with("model-")
            })
            .count();
        let whole = dir.join("model.safetensors").exists();
        let index = dir.join("model.safetensors.index.json").exists();
        match shard {
            None => assert!(whole && !index && shards == 0, "{shards} stale shards"),
            Some(_) => assert!(!whole && index && shards >= 3, "{shards} shards"),
        }
    }
    // The config we write is transformers 5.x's layout, read to the same description.
    let text = std::fs::read_to_string(dir.join("config.json")).unwrap();
    assert!(text.contains("rope_parameters") && !text.contains("rope_scaling"));
}

/// Writes llama-tiny's tensors, edited by `edit`, as the weights of a scratch checkpoint and
/// returns the load error.
fn load_error(tag: &str, edit: impl FnOnce(&mut Vec<(String, Vec<usize>, Vec<u8>)>)) -> String {
    let ck = hf_weights::load(&asset("llama-tiny")).unwrap();
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = ck
        .table
        .specs
        .iter()
        .zip(&ck.params)
        .map(|(s, p)| {
            (
                s.name.clone(),
                s.shape.clone(),
                bytemuck::cast_slice(p).to_vec(),
            )
        })
        .collect();
    edit(&mut tensors);
    let dir = scratch(tag);
    std::fs::copy(asset("llama-tiny/config.json"), dir.join("config.json")).unwrap();
    let path = dir.join("model.safetensors");
    shaderformer::io::hf::write_safetensors(&path, &tensors).unwrap();
    hf_weights::load(&dir).unwrap_err().to_string()
}

#[test]
fn missing_misshapen_and_unexpected_tensors_are_named() {
    let e = load_error("extra", |t| {
        t.push((
            "model.layers.0.mlp.extra.weight".into(),
            vec![2],
            vec![0; 8],
        ));
    });
    assert!(
        e.contains("model.layers.0.mlp.extra.weight") && e.contains("model.safetensors"),
        "{e}"
    );
    let e = load_error("missing", |t| {
        t.retain(|x| x.0 != "model.layers.1.self_attn.k_proj.weight");
    });
    assert!(
        e.contains("model.layers.1.self_attn.k_proj.weight") && e.contains("missing"),
        "{e}"
    );
    let e = load_error("shape", |t| {
        let k = t.iter_mut().find(|x| x.0 == "model.norm.weight").unwrap();
        k.1 = vec![6, 10];
    });
    assert!(
        e.contains("model.norm.weight") && e.contains("[6, 10]") && e.contains("[60]"),
        "{e}"
    );
    let table = LlamaParams::new(&parse(&asset("llama-tiny/config.json")).unwrap().arch, 0.1);
    assert!(table.unwrap().find("lm_head.weight").is_some());
}
