//! Helpers shared by the tests that run the `shaderformer` binary: the command with the
//! environment every run needs, a fresh scratch folder per test, a run's output as one text, and
//! the losses of a metrics file. Each test binary uses some of them.
#![allow(dead_code)]

pub mod fixture;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The binary's path, for a command that starts it through another (mpirun).
pub const BIN: &str = env!("CARGO_BIN_EXE_shaderformer");

/// The binary, with a runtime directory (lavapipe and wgpu warn without one).
pub fn bin() -> Command {
    let mut c = Command::new(BIN);
    runtime_env(&mut c);
    c
}

/// The environment every run of the binary needs, set on `c` (which may start it indirectly).
pub fn runtime_env(c: &mut Command) {
    c.env("XDG_RUNTIME_DIR", std::env::temp_dir());
}

/// An empty folder `shaderformer-{suite}-{pid}-{name}` in the temporary directory (emptied if a
/// run of the same process left it).
pub fn scratch(suite: &str, name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "shaderformer-{suite}-{}-{name}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// stdout then stderr of a finished run.
pub fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// (step, loss) of every line of a metrics file (`--metrics`) that has a loss.
pub fn losses(metrics: &Path) -> Vec<(u64, f64)> {
    std::fs::read_to_string(metrics)
        .unwrap_or_else(|e| panic!("{}: {e}", metrics.display()))
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| Some((v["step"].as_u64()?, v.get("loss")?.as_f64()?)))
        .collect()
}
