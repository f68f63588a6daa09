//! General matrix multiply and the linear layer (forward, backward, bias gradient).
//!
//! Matrices are row-major. A `Layout` places one inside a flat slice: element (r, col) of batch
//! entry z is at `offset + z * batch_stride + r * ld + col`.

use super::Real;

/// Where a (batched) row-major matrix sits in a flat slice, in elements.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    pub offset: usize,
    /// Row stride.
    pub ld: usize,
    /// Distance between batch entries; 0 shares one matrix across the batch.
    pub batch_stride: usize,
}

impl Layout {
    /// A single matrix at the start of its slice with row stride `ld`.
    pub fn new(ld: usize) -> Layout {
        Layout {
            offset: 0,
            ld,
            batch_stride: 0,
        }
    }

    /// Index of element (r, col) of batch entry z.
    pub fn at(&self, z: usize, r: usize, col: usize) -> usize {
        self.offset + z * self.batch_stride + r * self.ld + col
    }
}

/// Where `matmul`'s three matrices sit in their slices.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layouts {
    pub c: Layout,
    pub a: Layout,
    pub b: Layout,
}

/// The shape and scalars of one (batched) `matmul`: the kernels' `Matmul` without its epilogue.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Product<T> {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub batch: usize,
    /// a is stored (K, M) instead of (M, K).
    pub trans_a: bool,
    /// b is stored (N, K) instead of (K, N).
    pub trans_b: bool,
    pub alpha: T,
    /// Add into c instead of overwriting it.
    pub accumulate: bool,
}

impl<T: Real> Product<T> {
    /// c (M, N) = a (M, K) · b (K, N): one batch entry, no transposes, alpha 1, overwriting c.
    pub fn new(m: usize, n: usize, k: usize) -> Self {
        Product {
            m,
            n,
            k,
            batch: 1,
            trans_a: false,
            trans_b: false,
            alpha: T::one(),
            accumulate: false,
        }
    }
}

/// c[z] (M, N) = alpha · op(a[z]) (M, K) · op(b[z]) (K, N) (+ bias (N) on every row)
///               (+ c[z] when accumulate), for z in 0..batch, each matrix placed by `at`.
/// op(a) is a stored (M, K), or aᵀ with a stored (K, M) when `trans_a`; op(b) is b stored (K, N),
/// or bᵀ with b stored (N, K) when `trans_b`. Elements of `c` outside the M × N blocks are kept.
pub fn matmul<T: Real>(
    c: &mut [T],
    a: &[T],
    b: &[T],
    bias: Option<&[T]>,
    at: Layouts,
    p: Product<T>,
) {
    let Product {
        m,
        n,
        k,
        batch,
        trans_a,
        trans_b,
        alpha,
        accumulate,
    } = p;
    let Layouts {
        c: c_at,
        a: a_at,
        b: b_at,
    } = at;
    for z in 0..batch {
        for i in 0..m {
            for j in 0..n {
                let mut s = T::zero();
                for p in 0..k {
                    // op(a)(i, p) · op(b)(p, j)
                    let x = if trans_a {
                        a[a_at.at(z, p, i)]
                    } else {
                        a[a_at.at(z, i, p)]
                    };
                    let y = if trans_b {
                        b[b_at.at(z, j, p)]
                    } else {
                        b[b_at.at(z, p, j)]
                    };
                    s += x * y;
                }
                let mut v = alpha * s;
                if let Some(bias) = bias {
                    v += bias[j];
                }
                let idx = c_at.at(z, i, j);
                if accumulate {
                    v += c[idx];
                }
                c[idx] = v;
            }
        }
    }
}

/// The shape of a linear layer: M rows of K input features to N output features, the weight
/// stored (N, K) as in PyTorch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinearDims {
    pub m: usize,
    pub k: usize,
    pub n: usize,
}

/// out (M, N) = inp (M, K) · w (N, K)ᵀ + bias (N)
pub fn linear_forward<T: Real>(
    out: &mut [T],
    inp: &[T],
    w: &[T],
    bias: Option<&[T]>,
    dims: LinearDims,
) {
    let LinearDims { m, k, n } = dims;
    for i in 0..m {
        for j in 0..n {
            let mut s = T::zero();
            for p in 0..k {
                s += inp[i * k + p] * w[j * k + p];
            }
            if let Some(bias) = bias {
                s += bias[j];
            }
            out[i * n + j] = s;
        }
    }
}

/// dinp (M, K) = dout (M, N) · w (N, K)   (+= instead of = when `accumulate_dinp`; skipped if None)
/// dw (N, K) += dout (M, N)ᵀ · inp (M, K)
/// dbias (N) += Σ_m dout (M, N)           (skipped if None)
// The reference keeps llm.c's plain list (outputs, then inputs, then the shape) so that it reads
// as the specification; a struct of these slices would only rename the tensors listed here.
#[allow(clippy::too_many_arguments)]
pub fn linear_backward<T: Real>(
    dinp: Option<&mut [T]>,
    dw: &mut [T],
    dbias: Option<&mut [T]>,
    dout: &[T],
    inp: &[T],
    w: &[T],
    dims: LinearDims,
    accumulate_dinp: bool,
) {
    let LinearDims { m, k, n } = dims;
    if let Some(dinp) = dinp {
        for i in 0..m {
            for p in 0..k {
                let mut s = T::zero();
                for j in 0..n {
                    s += dout[i * n + j] * w[j * k + p];
                }
                if accumulate_dinp {
                    dinp[i * k + p] += s;
                } else {
                    dinp[i * k + p] = s;
                }
            }
        }
    }
    for j in 0..n {
        for p in 0..k {
            let mut s = T::zero();
            for i in 0..m {
                s += dout[i * n + j] * inp[i * k + p];
            }
            dw[j * k + p] += s;
        }
    }
    if let Some(dbias) = dbias {
        bias_backward(dbias, dout, m, n);
    }
}

/// dbias (N) += Σ_m dout (M, N)
pub fn bias_backward<T: Real>(dbias: &mut [T], dout: &[T], m: usize, n: usize) {
    for j in 0..n {
        let mut s = T::zero();
        for i in 0..m {
            s += dout[i * n + j];
        }
        dbias[j] += s;
    }
}
