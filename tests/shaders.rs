//! Every file in shaders/ parses and validates with naga, and is registered: a broken shader fails
//! here even on a machine without a GPU.

use shaderformer::gpu::shaders::{Shader, ShaderSource, source_dir, validate_wgsl};

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
fn a_shader_dir_replaces_the_embedded_copy_and_falls_back_for_missing_files() {
    // The embedded copies are include_str! of these very files, so comparing the two could never
    // fail; what can go wrong is the lookup: a registered name that no file carries, or a
    // --shader-dir replacement that is not the text loaded.
    let dir = std::env::temp_dir().join(format!("shaderformer-shader-dir-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let replaced = Shader::ALL[0];
    let text = format!("// edited copy\n{}", replaced.embedded_source());
    std::fs::write(dir.join(replaced.file_name()), &text).unwrap();
    let source = ShaderSource::Dir(dir.clone());
    for &s in Shader::ALL {
        let on_disk = source_dir().join(s.file_name());
        assert!(
            on_disk.is_file(),
            "{} is registered but missing",
            on_disk.display()
        );
        let (name, loaded) = source.load(s).unwrap();
        if s == replaced {
            assert_eq!(loaded, text, "{name}");
            assert!(name.starts_with(&dir.display().to_string()), "{name}");
        } else {
            assert_eq!(loaded, s.embedded_source(), "{name}");
            assert_eq!(name, format!("shaders/{}", s.file_name()));
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_broken_shader_names_file_and_line() {
    let src = "fn f() -> f32 {\n    return 1.0\n}\n";
    let err = validate_wgsl("broken.wgsl", src).unwrap_err().to_string();
    assert!(err.starts_with("broken.wgsl:"), "{err}");
    assert!(err.contains(":3:") || err.contains(":2:"), "{err}");
}
