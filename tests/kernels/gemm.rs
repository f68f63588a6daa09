//! gemm: to be written.
