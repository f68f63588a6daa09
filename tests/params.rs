//! Every uniform struct a shader declares is mirrored, member by member (name, byte offset, byte
//! size) and in total size, by the `#[repr(C)]` params struct its launcher writes. A field added,
//! moved or retyped on one side only fails here, without a GPU.

use shaderformer::gpu::shaders::{Shader, ShaderSource, ShaderVariant, validate, validate_wgsl};
use shaderformer::kernels::{self, ParamsLayout};

/// (shader file, WGSL struct, the launcher's layout). A file listed here that no longer exists is
/// passed over (families merge files); a uniform struct found in a file but not listed fails.
fn mirrors() -> Vec<(&'static str, &'static str, ParamsLayout)> {
    use kernels::*;
    vec![
        ("adamw.wgsl", "Params", adamw::params_layout()),
        ("attention.wgsl", "Params", attention::params_layout()),
        ("attention_f16.wgsl", "Params", attention::params_layout()),
        (
            "cross_entropy.wgsl",
            "Params",
            cross_entropy::params_layout(),
        ),
        ("dropout.wgsl", "Params", dropout::params_layout()),
        ("embedding.wgsl", "Params", embedding::params_layout()),
        ("embedding_f16.wgsl", "Params", embedding::params_layout()),
        ("gelu.wgsl", "Params", gelu::params_layout()),
        ("gemm.wgsl", "Params", gemm::params_layout()),
        ("gemm_f16.wgsl", "Params", gemm::params_layout()),
        ("layernorm.wgsl", "Params", layernorm::params_layout()),
        (
            "layernorm_subgroup.wgsl",
            "Params",
            layernorm::params_layout(),
        ),
        ("reduce.wgsl", "Params", reduce::params_layout()),
        ("rmsnorm.wgsl", "Params", rmsnorm::params_layout()),
        ("rope.wgsl", "Params", rope::params_layout()),
        ("residual.wgsl", "Params", residual::params_layout()),
        ("convert.wgsl", "Params", convert::params_layout()),
        ("swiglu.wgsl", "Params", swiglu::params_layout()),
        ("qkv_pack.wgsl", "Params", qkv_pack::params_layout()),
        // The per-step uniform (include/step.wgsl), in every family that includes it.
        ("adamw.wgsl", "Step", step::params_layout()),
        ("attention.wgsl", "Step", step::params_layout()),
        ("attention_f16.wgsl", "Step", step::params_layout()),
        ("dropout.wgsl", "Step", step::params_layout()),
        ("rope.wgsl", "Step", step::params_layout()),
    ]
}

/// The layout naga computes for each struct bound as a uniform in `file`, by struct name.
fn uniform_structs(file: &str, module: &naga::Module) -> Vec<(String, ParamsLayout)> {
    let mut out = Vec::new();
    for (_, var) in module.global_variables.iter() {
        if var.space != naga::AddressSpace::Uniform {
            continue;
        }
        let ty = &module.types[var.ty];
        let naga::TypeInner::Struct { members, span } = &ty.inner else {
            panic!("{file}: uniform {:?} is not a struct", var.name);
        };
        let name = ty.name.clone().unwrap_or_default();
        if out.iter().any(|(n, _)| *n == name) {
            continue;
        }
        let fields = members
            .iter()
            .map(|m| {
                // Leaked: ParamsLayout names fields with 'static strings, and a test is short.
                let member: &'static str = m.name.clone().unwrap_or_default().leak();
                let size = module.types[m.ty].inner.size(module.to_ctx()) as usize;
                (member, m.offset as usize, size)
            })
            .collect();
        let layout = ParamsLayout {
            size: *span as usize,
            fields,
        };
        out.push((name, layout));
    }
    out
}

/// A readable diff of two layouts: one line per field that differs.
fn differences(rust: &ParamsLayout, wgsl: &ParamsLayout) -> Vec<String> {
    let mut d = Vec::new();
    let n = rust.fields.len().max(wgsl.fields.len());
    for i in 0..n {
        let (r, w) = (rust.fields.get(i), wgsl.fields.get(i));
        if r != w {
            d.push(format!(
                "  field {i}: rust {r:?}, wgsl {w:?}  (name, offset, size)"
            ));
        }
    }
    if rust.size != wgsl.size {
        d.push(format!(
            "  struct size: rust {} bytes, wgsl {} bytes",
            rust.size, wgsl.size
        ));
    }
    d
}

#[test]
fn every_launcher_params_struct_mirrors_its_wgsl_struct() {
    let mirrors = mirrors();
    // Every family's source as the loader expands it (its includes in place).
    let mut failures = Vec::new();
    let mut compared = 0;
    for &shader in Shader::ALL {
        let file = &shader.file_name().to_string();
        let src = ShaderSource::Embedded
            .load(shader, ShaderVariant::Base)
            .unwrap_or_else(|e| panic!("{e}"));
        let module = validate(&src).unwrap_or_else(|e| panic!("{e}"));
        for (name, wgsl) in uniform_structs(file, &module) {
            let Some((_, _, rust)) = mirrors.iter().find(|(f, s, _)| f == file && *s == name)
            else {
                failures.push(format!(
                    "{file}: uniform struct {name} has no launcher layout in tests/params.rs"
                ));
                continue;
            };
            let d = differences(rust, &wgsl);
            if !d.is_empty() {
                failures.push(format!("{file}: {name} differs\n{}", d.join("\n")));
            }
            compared += 1;
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(
        compared >= 10,
        "only {compared} uniform structs were compared"
    );
}

#[test]
fn every_rust_layout_tiles_its_struct_without_gaps() {
    // The launchers upload the struct's bytes as they are, so a hole (padding the compiler
    // inserted) would be bytes the shader reads as a field the launcher never wrote.
    for (file, name, layout) in mirrors() {
        let mut end = 0;
        for &(field, offset, size) in &layout.fields {
            assert_eq!(
                offset, end,
                "{file} {name}: field {field} starts after a gap"
            );
            end = offset + size;
        }
        assert_eq!(
            end, layout.size,
            "{file} {name}: padding after the last field"
        );
    }
}

#[test]
fn a_drifted_field_is_reported() {
    let wgsl = "struct Params { n: u32, scale: f32, extra: vec2<u32> }\n\
                @group(0) @binding(0) var<uniform> p: Params;\n\
                @compute @workgroup_size(1) fn main() { _ = p.n; }\n";
    let module = validate_wgsl("drift.wgsl", wgsl).unwrap();
    let found = uniform_structs("drift.wgsl", &module);
    assert_eq!(found.len(), 1);
    let (name, layout) = &found[0];
    assert_eq!(name, "Params");
    assert_eq!(
        layout.fields,
        vec![("n", 0, 4), ("scale", 4, 4), ("extra", 8, 8)]
    );
    let rust = ParamsLayout {
        size: 12,
        fields: vec![("n", 0, 4), ("scale", 4, 4), ("extra", 8, 4)],
    };
    let d = differences(&rust, layout);
    assert_eq!(d.len(), 2, "{d:?}");
}
