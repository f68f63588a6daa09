//! The one error type of the crate. Every variant carries the structured facts a user needs to act
//! (which kernel, which tensor, which file and line, which limit), and its message fits on one line.

use std::path::PathBuf;

pub type Result<T> = std::result::Result<T, Error>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no GPU adapter matches {wanted}; available: {available}")]
    NoAdapter { wanted: String, available: String },

    #[error("could not open a device on adapter '{adapter}': {message}")]
    RequestDevice { adapter: String, message: String },

    #[error("{file}:{line}:{column}: shader does not compile: {message}")]
    ShaderParse {
        file: String,
        line: u32,
        column: u32,
        message: String,
    },

    #[error("{file}: shader is invalid: {message}")]
    ShaderInvalid { file: String, message: String },

    #[error("{file}: cannot read shader: {source}")]
    ShaderRead {
        file: String,
        source: std::io::Error,
    },

    #[error("kernel {kernel}: pipeline creation failed: {message}")]
    Pipeline { kernel: String, message: String },

    #[error("{context}: GPU validation error: {message}")]
    Validation { context: String, message: String },

    #[error("{context}: GPU out of memory ({bytes} bytes requested)")]
    OutOfMemory { context: String, bytes: u64 },

    #[error("the GPU device was lost: {reason}")]
    DeviceLost { reason: String },

    #[error("tensor {tensor} needs {bytes} bytes, over the device's {limit} of {max} bytes")]
    TooLarge {
        tensor: String,
        bytes: u64,
        limit: &'static str,
        max: u64,
    },

    #[error("kernel {kernel}: tensor {tensor} has {got}, expected {expected}")]
    Shape {
        kernel: String,
        tensor: String,
        expected: String,
        got: String,
    },

    #[error("{what}: {message}")]
    Invalid { what: String, message: String },

    #[error("interrupted {during}")]
    Interrupted { during: String },

    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl Error {
    /// Shorthand for a bad argument or configuration value.
    pub fn invalid(what: impl Into<String>, message: impl Into<String>) -> Self {
        Error::Invalid {
            what: what.into(),
            message: message.into(),
        }
    }

    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}
