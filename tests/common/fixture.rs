//! A parity fixture (scripts/make_fixtures.py, scripts/fixtures_llama.py): the reference values
//! that PyTorch and transformers computed, as safetensors, with scalar results in its metadata.

use std::collections::HashMap;
use std::path::Path;

pub struct Fixture {
    tensors: HashMap<String, (Vec<u8>, safetensors::Dtype)>,
    meta: HashMap<String, String>,
}

impl Fixture {
    pub fn load(path: &Path) -> Fixture {
        let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let tensors = st
            .tensors()
            .into_iter()
            .map(|(n, t)| (n, (t.data().to_vec(), t.dtype())))
            .collect();
        Fixture {
            tensors,
            meta: meta.metadata().clone().unwrap_or_default(),
        }
    }

    /// The f32 tensor `name`.
    pub fn f32(&self, name: &str) -> Vec<f32> {
        let (d, dt) = &self.tensors[name];
        assert_eq!(*dt, safetensors::Dtype::F32, "{name}");
        bytemuck::pod_collect_to_vec(d)
    }

    /// The i32 tensor `name` (token ids), as u32.
    pub fn u32(&self, name: &str) -> Vec<u32> {
        let (d, dt) = &self.tensors[name];
        assert_eq!(*dt, safetensors::Dtype::I32, "{name}");
        let v: Vec<i32> = bytemuck::pod_collect_to_vec(d);
        v.into_iter().map(|x| x as u32).collect()
    }

    /// The metadata number `key`.
    pub fn num(&self, key: &str) -> f64 {
        self.meta[key].parse().unwrap()
    }
}
