//! LayerNorm over the channels of each row (GPT-2's ln_1, ln_2 and ln_f), llm.c style.

use super::Real;

/// The epsilon added to the variance.
pub const EPS: f64 = 1e-5;

/// The shape of a LayerNorm: N rows of C channels, normalized row by row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dims {
    pub n: usize,
    pub c: usize,
}

/// out (N, C) = (inp - mean) · rstd · weight + bias, with per row
/// mean (N) = Σ_c inp / C, var = Σ_c (inp - mean)² / C (biased, like PyTorch),
/// rstd (N) = 1 / sqrt(var + eps). Overwrites out, mean and rstd.
/// inp (N, C), weight (C), bias (C).
pub fn forward<T: Real>(
    out: &mut [T],
    mean: &mut [T],
    rstd: &mut [T],
    inp: &[T],
    weight: &[T],
    bias: &[T],
    dims: Dims,
) {
    let Dims { n, c } = dims;
    let eps = T::from_f64(EPS);
    let cf = T::from_f64(c as f64);
    for row in 0..n {
        let x = &inp[row * c..(row + 1) * c];
        let mut m = T::zero();
        for &v in x {
            m += v;
        }
        m /= cf;
        let mut var = T::zero();
        for &v in x {
            let d = v - m;
            var += d * d;
        }
        var /= cf;
        let s = T::one() / (var + eps).sqrt();
        for i in 0..c {
            out[row * c + i] = (x[i] - m) * s * weight[i] + bias[i];
        }
        mean[row] = m;
        rstd[row] = s;
    }
}

/// Backward of `forward`, accumulating into every output:
/// dinp (N, C) += rstd · (dnorm - mean_c(dnorm) - xhat · mean_c(dnorm · xhat)),
/// dweight (C) += Σ_rows dout · xhat, dbias (C) += Σ_rows dout,
/// where xhat = (inp - mean) · rstd and dnorm = weight · dout.
/// dout (N, C), inp (N, C), weight (C), mean (N), rstd (N) as saved by `forward`.
// The reference keeps llm.c's plain list (outputs, then inputs, then the shape) so that it reads
// as the specification; a struct of these slices would only rename the tensors listed here.
#[allow(clippy::too_many_arguments)]
pub fn backward<T: Real>(
    dinp: &mut [T],
    dweight: &mut [T],
    dbias: &mut [T],
    dout: &[T],
    inp: &[T],
    weight: &[T],
    mean: &[T],
    rstd: &[T],
    dims: Dims,
) {
    let Dims { n, c } = dims;
    let cf = T::from_f64(c as f64);
    for row in 0..n {
        let (m, s) = (mean[row], rstd[row]);
        // The two row means the input gradient needs.
        let mut dnorm_mean = T::zero();
        let mut dnorm_xhat_mean = T::zero();
        for i in 0..c {
            let xhat = (inp[row * c + i] - m) * s;
            let dnorm = weight[i] * dout[row * c + i];
            dnorm_mean += dnorm;
            dnorm_xhat_mean += dnorm * xhat;
        }
        dnorm_mean /= cf;
        dnorm_xhat_mean /= cf;
        for i in 0..c {
            let g = dout[row * c + i];
            let xhat = (inp[row * c + i] - m) * s;
            let dnorm = weight[i] * g;
            dweight[i] += g * xhat;
            dbias[i] += g;
            dinp[row * c + i] += s * (dnorm - dnorm_mean - xhat * dnorm_xhat_mean);
        }
    }
}
