//! Every variant of every shader family parses and validates with naga after prelude, `#include`
//! and `#if` expansion, and every file in shaders/ is used and embedded: a broken shader fails
//! here even on a machine without a GPU. Errors name the source file, line and column.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use shaderformer::gpu::shaders::{
    INCLUDES, Shader, ShaderSource, ShaderVariant, source_dir, validate, validate_wgsl,
};

/// Every `.wgsl` file under `dir`, as paths relative to it with `/` separators.
fn wgsl_files(dir: &Path) -> Vec<String> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(root, &path, out);
            } else if path.extension().is_some_and(|e| e == "wgsl") {
                let rel = path.strip_prefix(root).unwrap();
                let parts: Vec<_> = rel.iter().map(|p| p.to_string_lossy()).collect();
                out.push(parts.join("/"));
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

/// (family, variant) for every variant of every family.
fn all_variants() -> Vec<(Shader, ShaderVariant)> {
    Shader::ALL
        .iter()
        .flat_map(|&s| s.variants().iter().map(move |&v| (s, v)))
        .collect()
}

#[test]
fn every_variant_of_every_family_validates() {
    let mut failures = Vec::new();
    for source in [
        ShaderSource::Embedded,
        ShaderSource::Dir(source_dir().into()),
    ] {
        for (shader, variant) in all_variants() {
            for form in shader.form_defines() {
                let result = source
                    .load_form(shader, variant, form)
                    .and_then(|src| validate(&src).map(|_| ()));
                if let Err(e) = result {
                    let file = shader.file_name();
                    failures.push(format!("{file} ({variant:?}, {form:?}): {e}"));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Every entry form is a function of its family's module expanded with the form's names, and
/// that function reads one of each pair of variables bound at one slot (`a`/`a4`, `b`/`b4`):
/// the scalar reads without the names, the vec4 reads with them.
#[test]
fn entry_forms_read_the_operands_their_names_say() {
    let forms = [
        ("gemm_tiled", "gemm_tiled", false, false),
        ("gemm_tiled_va", "gemm_tiled", true, false),
        ("gemm_tiled_vb", "gemm_tiled", false, true),
        ("gemm_tiled_vab", "gemm_tiled", true, true),
        ("gemm_reg", "gemm_reg", false, false),
        ("gemm_reg_vb", "gemm_reg", false, true),
        ("gemm_ureg", "gemm_ureg", false, false),
        ("gemm_ureg_vb", "gemm_ureg", false, true),
        ("gemm_ureg_vab", "gemm_ureg", true, true),
    ];
    for (entry, function, vec_a, vec_b) in forms {
        let (f, names) = Shader::Gemm.entry_form(entry);
        assert_eq!(f, function, "{entry}");
        let src = ShaderSource::Embedded
            .load_form(Shader::Gemm, ShaderVariant::Base, names)
            .unwrap();
        let module = validate(&src).unwrap();
        let used = globals_used_by(&module, function);
        for (var, wanted) in [("a", !vec_a), ("a4", vec_a), ("b", !vec_b), ("b4", vec_b)] {
            let reads = used.contains(var);
            // gemm_reg reads a as scalars in every form.
            let wanted = wanted || (function == "gemm_reg" && var == "a");
            assert_eq!(reads, wanted, "{entry} reads {var}: {reads}");
        }
    }
}

/// The names of the global variables that entry point `entry` reaches, through the functions
/// it calls.
fn globals_used_by(m: &naga::Module, entry: &str) -> BTreeSet<String> {
    let ep = m.entry_points.iter().find(|e| e.name == entry).unwrap();
    let mut seen = BTreeSet::new();
    let mut todo = vec![&ep.function];
    let mut used = BTreeSet::new();
    while let Some(f) = todo.pop() {
        for (_, e) in f.expressions.iter() {
            match e {
                naga::Expression::GlobalVariable(g) => {
                    if let Some(name) = &m.global_variables[*g].name {
                        used.insert(name.clone());
                    }
                }
                naga::Expression::CallResult(h) if seen.insert(*h) => {
                    todo.push(&m.functions[*h]);
                }
                _ => {}
            }
        }
        for stmt in f.body.iter() {
            collect_calls(stmt, &mut |h| {
                if seen.insert(h) {
                    todo.push(&m.functions[h]);
                }
            });
        }
    }
    used
}

/// Calls `found` with every function a statement (and the blocks inside it) calls.
fn collect_calls(stmt: &naga::Statement, found: &mut dyn FnMut(naga::Handle<naga::Function>)) {
    use naga::Statement as S;
    match stmt {
        S::Call { function, .. } => found(*function),
        S::Block(b) => b.iter().for_each(|s| collect_calls(s, found)),
        S::If { accept, reject, .. } => {
            accept.iter().for_each(|s| collect_calls(s, found));
            reject.iter().for_each(|s| collect_calls(s, found));
        }
        S::Loop {
            body, continuing, ..
        } => {
            body.iter().for_each(|s| collect_calls(s, found));
            continuing.iter().for_each(|s| collect_calls(s, found));
        }
        S::Switch { cases, .. } => cases
            .iter()
            .for_each(|c| c.body.iter().for_each(|s| collect_calls(s, found))),
        _ => {}
    }
}

#[test]
fn every_file_in_shaders_is_used_and_embedded() {
    let files = wgsl_files(source_dir());
    assert!(!files.is_empty(), "no .wgsl files found");
    let source = ShaderSource::Dir(source_dir().into());
    let mut used = BTreeSet::new();
    for (shader, variant) in all_variants() {
        let src = source.load(shader, variant).unwrap();
        for f in src.files() {
            used.insert(PathBuf::from(f));
        }
    }
    for name in &files {
        assert!(
            used.contains(&source_dir().join(name)),
            "shaders/{name} is used by no variant of any family"
        );
        assert!(
            Shader::ALL.iter().any(|s| s.file_name() == name)
                || INCLUDES.iter().any(|(p, _)| p == name),
            "shaders/{name} is neither a registered family nor an embedded include"
        );
    }
    for (path, _) in INCLUDES {
        assert!(files.contains(&path.to_string()), "INCLUDES names {path}");
    }
}

/// The variants differ where they should: f16 storage in the F16 variant's module only, the
/// subgroup built-ins in the Subgroup variant's text only.
#[test]
fn variants_differ_only_as_their_preludes_say() {
    let has_f16_storage = |m: &naga::Module| {
        m.global_variables.iter().any(|(_, g)| {
            let mut ty = &m.types[g.ty].inner;
            if let naga::TypeInner::Array { base, .. } = ty {
                ty = &m.types[*base].inner;
            }
            matches!(g.space, naga::AddressSpace::Storage { .. })
                && ty.scalar().is_some_and(|s| s == naga::Scalar::F16)
        })
    };
    let uses_subgroups = |m: &naga::Module| {
        let bodies = m.functions.iter().map(|(_, f)| &f.body);
        let entries = m.entry_points.iter().map(|e| &e.function.body);
        bodies
            .chain(entries)
            .any(|b| format!("{b:?}").contains("SubgroupCollectiveOperation"))
    };
    for (shader, variant) in all_variants() {
        let src = ShaderSource::Embedded.load(shader, variant).unwrap();
        let module = validate(&src).unwrap();
        assert_eq!(
            has_f16_storage(&module),
            variant == ShaderVariant::F16,
            "{} ({variant:?}): f16 storage",
            shader.file_name()
        );
        assert_eq!(
            uses_subgroups(&module),
            variant == ShaderVariant::Subgroup,
            "{} ({variant:?}): subgroup built-ins",
            shader.file_name()
        );
    }
}

#[test]
fn a_broken_shader_names_file_and_line() {
    let src = "fn f() -> f32 {\n    return 1.0\n}\n";
    let err = validate_wgsl("broken.wgsl", src).unwrap_err().to_string();
    assert!(err.starts_with("broken.wgsl:"), "{err}");
    assert!(err.contains(":3:") || err.contains(":2:"), "{err}");
}

/// A scratch copy of nothing but the files a test writes, for `ShaderSource::Dir`.
fn scratch_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("shaderformer-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("include")).unwrap();
    dir
}

/// --shader-dir: an include in the directory replaces the embedded one, and a syntax error in it
/// is reported at its own file, line and column, through a family that includes it.
#[test]
fn a_broken_include_in_a_shader_dir_names_its_file_line_and_column() {
    let dir = scratch_dir("broken-include");
    let good = std::fs::read_to_string(source_dir().join("include/hash.wgsl")).unwrap();
    let lines = good.lines().count();
    // One line appended with an error at column 17, the `;` of `const BAD = 1u +;`.
    std::fs::write(
        dir.join("include/hash.wgsl"),
        format!("{good}const BAD = 1u +;\n"),
    )
    .unwrap();
    let source = ShaderSource::Dir(dir.clone());
    for shader in [Shader::Dropout, Shader::Attention] {
        let src = source.load(shader, shader.variants()[0]).unwrap();
        let err = validate(&src).unwrap_err().to_string();
        let want = format!(
            "{}:{}:17:",
            dir.join("include/hash.wgsl").display(),
            lines + 1
        );
        assert!(err.starts_with(&want), "expected {want}..., got {err}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// --shader-dir: a family's file there replaces the embedded one (its includes still come from
/// the embedded copies), and an include it names that exists nowhere is an error at the
/// `#include` line.
#[test]
fn a_shader_dir_replaces_a_family_and_reports_a_missing_include() {
    let dir = scratch_dir("family");
    let gelu = Shader::Gelu.embedded_source();
    std::fs::write(dir.join("gelu.wgsl"), format!("// edited\n{gelu}")).unwrap();
    let source = ShaderSource::Dir(dir.clone());
    let src = source.load(Shader::Gelu, ShaderVariant::Base).unwrap();
    assert!(src.text.starts_with("// edited\n"));
    validate(&src).unwrap();
    let src = source.load(Shader::Dropout, ShaderVariant::Base).unwrap();
    assert!(src.files().any(|f| f == "shaders/include/hash.wgsl"));

    std::fs::write(
        dir.join("gelu.wgsl"),
        format!("// edited\n\n#include \"include/missing.wgsl\"\n{gelu}"),
    )
    .unwrap();
    let err = source
        .load(Shader::Gelu, ShaderVariant::Base)
        .unwrap_err()
        .to_string();
    let want = format!("{}:3:", dir.join("gelu.wgsl").display());
    assert!(err.starts_with(&want), "expected {want}..., got {err}");
    assert!(err.contains("include/missing.wgsl"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}
