//! `shaderformer plot`: loss curves of metrics files, side by side, as SVG.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use shaderformer::Result;
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
