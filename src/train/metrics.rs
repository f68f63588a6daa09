//! The metrics file of a run (`--metrics`, JSON lines) and its picture in the output directory
//! (`loss.svg`), and the checks of both before anything is computed.

use std::io::Write;
use std::path::Path;

use serde_json::Value;

use super::TrainConfig;
use super::checkpoint;
use crate::error::{Error, Result};
use crate::io::files;

/// The loss picture a run keeps in its output directory.
pub const PLOT_FILE: &str = "loss.svg";

pub(super) struct Metrics {
    file: Option<std::fs::File>,
    /// Every record written (and, when resuming, those already in the file), for loss.svg.
    curves: crate::plot::Curves,
}

impl Metrics {
    pub(super) fn open(path: Option<&Path>, append: bool) -> Result<Metrics> {
        let curves = match path {
            Some(p) if append && p.exists() => crate::plot::Curves::read(p)?,
            _ => crate::plot::Curves::new("training"),
        };
        let file = match path {
            Some(p) => {
                // Checked again here: between the check at start-up and now, minutes of model
                // building and tuning may have passed.
                files::check_output(p, "--metrics", &[])?;
                Some(
                    std::fs::OpenOptions::new()
                        .create(true)
                        .write(true)
                        .append(append)
                        .truncate(!append)
                        .open(p)
                        .map_err(|e| Error::io(p, e))?,
                )
            }
            None => None,
        };
        Ok(Metrics { file, curves })
    }

    /// Draws the train and validation loss so far as `DIR/loss.svg`.
    pub(super) fn plot(&self, dir: &Path) -> Result<()> {
        let svg = crate::plot::svg(std::slice::from_ref(&self.curves));
        crate::plot::write_atomic(&dir.join(PLOT_FILE), &svg)
    }

    pub(super) fn write(&mut self, v: Value) -> Result<()> {
        self.curves.add(&v);
        if let Some(f) = &mut self.file {
            writeln!(f, "{v}").map_err(|e| Error::io("metrics", e))?;
        }
        Ok(())
    }
}

/// The files a run reads: its data, and the checkpoint files of `--init` and `--resume`.
fn inputs(cfg: &TrainConfig) -> Vec<std::path::PathBuf> {
    let mut inputs: Vec<std::path::PathBuf> = cfg.data.iter().cloned().collect();
    for dir in [&cfg.init, &cfg.resume].into_iter().flatten() {
        inputs.extend(checkpoint::FILES.iter().map(|f| dir.join(f)));
    }
    inputs
}

/// Refuses, before anything is built, a `--metrics` file that is one of the run's inputs, a
/// directory, a FIFO or a device, or in a directory that does not exist (but the `--out` the run
/// creates), and a `--out` that is one of the run's input files.
pub fn check_outputs(cfg: &TrainConfig) -> Result<()> {
    let inputs = inputs(cfg);
    let inputs: Vec<&Path> = inputs.iter().map(|p| p.as_path()).collect();
    if let Some(m) = &cfg.metrics {
        // A metrics file inside the checkpoint directory the run is about to create is checked
        // when it is opened, once that directory exists.
        let in_new_out = m.parent() == Some(cfg.out.as_path()) && !cfg.out.exists();
        if !in_new_out {
            files::check_output(m, "--metrics", &inputs)?;
        }
    }
    if let Some(input) = inputs.iter().find(|i| files::same_file(&cfg.out, i)) {
        return Err(Error::invalid(
            "--out",
            format!(
                "{} is an input of this run ({}); --out names the checkpoint directory",
                cfg.out.display(),
                input.display()
            ),
        ));
    }
    Ok(())
}

/// Whether `DIR/loss.svg` is the checkpoint's own (absent, or recorded as written by a run in
/// the directory's trainer state); otherwise it is the user's file and is left alone.
pub fn plot_is_ours(dir: &Path) -> bool {
    if std::fs::symlink_metadata(dir.join(PLOT_FILE)).is_err() {
        return true;
    }
    dir.join(checkpoint::STATE_FILE).exists()
        && checkpoint::read_state(dir).is_ok_and(|s| s.loss_svg)
}
