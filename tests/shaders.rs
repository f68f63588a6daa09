//! Every file in shaders/ parses and validates with naga, and is registered: a broken shader fails
//! here even on a machine without a GPU.

use shaderformer::gpu::shaders::{Shader, source_dir, validate_wgsl};

#[test]
fn every_shader_file_validates() {
    let mut files: Vec<_> = std::fs::read_dir(source_dir())
        .expect("shaders/ exists")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "wgsl"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no .wgsl files found");
    let mut failures = Vec::new();
    for path in &files {
        let text = std::fs::read_to_string(path).unwrap();
        if let Err(e) = validate_wgsl(&path.display().to_string(), &text) {
            failures.push(e.to_string());
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn every_shader_file_is_registered() {
    for entry in std::fs::read_dir(source_dir()).unwrap() {
        let name = entry.unwrap().file_name().to_string_lossy().to_string();
        if name.ends_with(".wgsl") {
            assert!(
                Shader::ALL.iter().any(|s| s.file_name() == name),
                "shaders/{name} is not in the Shader registry"
            );
        }
    }
}

#[test]
fn embedded_copies_match_the_files() {
    for s in Shader::ALL {
        let on_disk = std::fs::read_to_string(source_dir().join(s.file_name())).unwrap();
        assert_eq!(on_disk, s.embedded_source(), "{} is stale", s.file_name());
    }
}

#[test]
fn a_broken_shader_names_file_and_line() {
    let src = "fn f() -> f32 {\n    return 1.0\n}\n";
    let err = validate_wgsl("broken.wgsl", src).unwrap_err().to_string();
    assert!(err.starts_with("broken.wgsl:"), "{err}");
    assert!(err.contains(":3:") || err.contains(":2:"), "{err}");
}
