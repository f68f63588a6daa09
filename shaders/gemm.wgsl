// gemm: to be written.
