//! embedding.wgsl launchers: to be written.

use super::harness::{BenchOptions, BenchReport, CheckReport, Family};
use crate::error::{Error, Result};
use crate::gpu::Gpu;

pub const FAMILY: Family = Family {
    name: "embedding",
    about: "not yet written",
    shape_help: "N",
    default_shapes: &[],
    bench_shape: &[1],
    check,
    bench,
};

fn check(_gpu: &Gpu, _shape: &[usize]) -> Result<Vec<CheckReport>> {
    Err(Error::invalid("embedding", "not yet written"))
}

fn bench(_gpu: &Gpu, _shape: &[usize], _opts: &BenchOptions) -> Result<Vec<BenchReport>> {
    Err(Error::invalid("embedding", "not yet written"))
}
