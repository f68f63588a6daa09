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

    /// The names of its tensors that start with `prefix`.
    #[allow(dead_code)]
    pub fn names(&self, prefix: &str) -> Vec<&str> {
        let mut v: Vec<&str> = self
            .tensors
            .keys()
            .map(String::as_str)
            .filter(|n| n.starts_with(prefix))
            .collect();
        v.sort();
        v
    }

    /// The metadata number `key`.
    pub fn num(&self, key: &str) -> f64 {
        self.meta[key].parse().unwrap()
    }
}

/// Runs the fixture's ten AdamW steps on `batch` through `exec` (each step's loss is that of its
/// forward, before its update) and compares their losses and gradient norms with the fixture's;
/// `tag` names the model in the log.
pub fn check_adamw_steps(
    exec: &mut shaderformer::graph::Executor,
    batch: &shaderformer::graph::MicroBatch,
    fx: &Fixture,
    tag: &str,
) {
    use shaderformer::reference::compare;
    let lr = fx.num("lr") as f32;
    for step in 1..=10u32 {
        exec.step(std::slice::from_ref(batch), lr, step).unwrap();
    }
    let results = exec.wait_results().unwrap();
    let losses: Vec<f32> = results.iter().map(|r| r.loss()).collect();
    let norms: Vec<f32> = results.iter().map(|r| r.grad_norm).collect();
    eprintln!("{tag}: losses {losses:?}\nnorms {norms:?}");
    for c in [
        compare("grad norms", &norms, &fx.f32("grad_norms"), 1e-4, 1e-3),
        compare(
            "10 AdamW step losses",
            &losses,
            &fx.f32("losses"),
            1e-4,
            0.0,
        ),
    ] {
        eprintln!("{tag}: {c}");
        c.assert();
    }
}
