//! The shader registry: one variant per `.wgsl` file in `shaders/`, embedded at build time and
//! optionally replaced by the files of a directory (`--shader-dir`) for experiments.

use std::borrow::Cow;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

macro_rules! shaders {
    ($($variant:ident => $file:literal),* $(,)?) => {
        /// One WGSL file of `shaders/`, i.e. one kernel family.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum Shader { $($variant),* }

        impl Shader {
            pub const ALL: &'static [Shader] = &[$(Shader::$variant),*];

            /// The file name under `shaders/` (or under `--shader-dir`).
            pub fn file_name(self) -> &'static str {
                match self { $(Shader::$variant => $file),* }
            }

            /// The copy compiled into the binary.
            pub fn embedded_source(self) -> &'static str {
                match self { $(Shader::$variant => include_str!(concat!("../../shaders/", $file))),* }
            }
        }
    };
}

shaders! {
    Gemm => "gemm.wgsl",
    GemmF16 => "gemm_f16.wgsl",
    LayerNorm => "layernorm.wgsl",
    LayerNormSubgroup => "layernorm_subgroup.wgsl",
    Gelu => "gelu.wgsl",
    Embedding => "embedding.wgsl",
    EmbeddingF16 => "embedding_f16.wgsl",
    CrossEntropy => "cross_entropy.wgsl",
    Residual => "residual.wgsl",
    Dropout => "dropout.wgsl",
    Adamw => "adamw.wgsl",
    Reduce => "reduce.wgsl",
    Attention => "attention.wgsl",
    AttentionF16 => "attention_f16.wgsl",
}

/// Where shader sources come from.
#[derive(Clone, Debug, Default)]
pub enum ShaderSource {
    /// The copies embedded at build time.
    #[default]
    Embedded,
    /// `<dir>/<file_name>` read at pipeline-creation time; files missing there fall back to the
    /// embedded copy, so a directory can hold only the shader being edited.
    Dir(PathBuf),
}

impl ShaderSource {
    /// The source text of `shader` and the name to report errors under.
    pub fn load(&self, shader: Shader) -> Result<(String, Cow<'static, str>)> {
        match self {
            ShaderSource::Embedded => Ok((
                format!("shaders/{}", shader.file_name()),
                Cow::Borrowed(shader.embedded_source()),
            )),
            ShaderSource::Dir(dir) => {
                let path = dir.join(shader.file_name());
                if !path.exists() {
                    return ShaderSource::Embedded.load(shader);
                }
                let text = std::fs::read_to_string(&path).map_err(|source| Error::ShaderRead {
                    file: path.display().to_string(),
                    source,
                })?;
                Ok((path.display().to_string(), Cow::Owned(text)))
            }
        }
    }
}

impl ShaderSource {
    /// A hash of every shader source as this source loads it (an unreadable file hashes its
    /// error), so measurements made with other shader text are not reused.
    pub fn hash(&self) -> u64 {
        let mut text = Vec::new();
        for &shader in Shader::ALL {
            match self.load(shader) {
                Ok((_, src)) => text.extend_from_slice(src.as_bytes()),
                Err(e) => text.extend_from_slice(e.to_string().as_bytes()),
            }
            text.push(0);
        }
        super::tune::fnv1a(&text)
    }
}

/// Parses and validates WGSL with naga, turning the first problem into a one-line error that
/// names the file, line and column. `file` is only used in messages.
pub fn validate_wgsl(file: &str, source: &str) -> Result<naga::Module> {
    let module = naga::front::wgsl::parse_str(source).map_err(|e| {
        let loc = e.location(source);
        Error::ShaderParse {
            file: file.to_string(),
            line: loc.map_or(0, |l| l.line_number),
            column: loc.map_or(0, |l| l.line_position),
            message: e.message().to_string(),
        }
    })?;
    let mut validator = naga::valid::Validator::new(
        naga::valid::ValidationFlags::all(),
        naga::valid::Capabilities::all(),
    );
    validator.validate(&module).map_err(|e| {
        let loc = e.location(source);
        let mut message = e.as_inner().to_string();
        let mut src: Option<&dyn std::error::Error> = std::error::Error::source(e.as_inner());
        while let Some(s) = src {
            message.push_str(": ");
            message.push_str(&s.to_string());
            src = s.source();
        }
        match loc {
            Some(l) => Error::ShaderParse {
                file: file.to_string(),
                line: l.line_number,
                column: l.line_position,
                message,
            },
            None => Error::ShaderInvalid {
                file: file.to_string(),
                message,
            },
        }
    })?;
    Ok(module)
}

/// The `shaders/` directory of the source tree (for tests and tools that read the files).
pub fn source_dir() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/shaders"))
}
