//! `shaderformer plot`: loss curves of metrics files, side by side, as SVG.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use shaderformer::Result;
use shaderformer::io::files;
use shaderformer::plot::{Curves, svg, write_atomic};

#[derive(Args, Debug)]
pub struct PlotArgs {
    /// Metrics files written by `train --metrics` (JSON lines), one panel each.
    #[arg(required = true, value_name = "METRICS.jsonl")]
    metrics: Vec<PathBuf>,
    /// The SVG to write.
    #[arg(long, default_value = "plot.svg")]
    out: PathBuf,
}

pub fn plot(args: &PlotArgs) -> Result<ExitCode> {
    let inputs: Vec<&std::path::Path> = args.metrics.iter().map(PathBuf::as_path).collect();
    files::check_output(&args.out, "--out", &inputs)?;
    let runs = args
        .metrics
        .iter()
        .map(|p| Curves::read(p))
        .collect::<Result<Vec<_>>>()?;
    write_atomic(&args.out, &svg(&runs))?;
    for r in &runs {
        println!(
            "{}: {} train points, {} evaluations",
            r.name,
            r.train.len(),
            r.val.len()
        );
    }
    println!("wrote {}", args.out.display());
    Ok(ExitCode::SUCCESS)
}
