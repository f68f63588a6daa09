//! Kernels against their CPU references on awkward sizes, and the references' backward passes
//! against finite differences. One module per shader family.

mod adamw;
mod attention;
mod convert;
mod cross_entropy;
mod dropout;
mod embedding;
mod gelu;
mod gemm;
mod layernorm;
mod qkv_pack;
mod reduce;
mod residual;
mod rmsnorm;
mod rope;
mod swiglu;

use shaderformer::gpu::test_gpu;
use shaderformer::kernels::harness::Family;

/// Runs the family's check on each of its default (awkward) shapes and asserts every comparison.
pub fn check_family(f: &Family) {
    let Some(gpu) = test_gpu() else { return };
    assert!(
        !f.default_shapes.is_empty(),
        "{} has no check shapes",
        f.name
    );
    for shape in f.default_shapes {
        let reports = (f.check)(gpu, shape).unwrap_or_else(|e| panic!("{} {shape:?}: {e}", f.name));
        assert!(!reports.is_empty());
        for r in reports {
            eprintln!("{} {} {}", f.name, r.shape, r.comparison);
            r.comparison.assert();
        }
    }
}
