//! RMSNorm over the channels of each row (the Llama family's input_layernorm,
//! post_attention_layernorm and norm; transformers' LlamaRMSNorm), llm.c style.

use super::Real;

/// The shape of an RMSNorm: N rows of C channels, normalized row by row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dims {
    pub n: usize,
    pub c: usize,
}

/// out (N, C) = inp · rstd · weight, with per row rstd (N) = 1 / sqrt(Σ_c inp² / C + eps): the
/// mean square, no centring and no bias; the weight multiplies after normalising, as
/// LlamaRMSNorm does. Overwrites out and rstd. inp (N, C), weight (C).
pub fn forward<T: Real>(
    out: &mut [T],
    rstd: &mut [T],
    inp: &[T],
    weight: &[T],
    dims: Dims,
    eps: f64,
) {
    let Dims { n, c } = dims;
    let cf = T::from_f64(c as f64);
    for row in 0..n {
        let x = &inp[row * c..(row + 1) * c];
        let mut ms = T::zero();
        for &v in x {
            ms += v * v;
        }
        ms /= cf;
        let s = T::one() / (ms + T::from_f64(eps)).sqrt();
        for i in 0..c {
            out[row * c + i] = x[i] * s * weight[i];
        }
        rstd[row] = s;
    }
}

/// The residual add fused in front of `forward`: resid (N, C) = a (N, C) + b (N, C), then
/// out (N, C) and rstd (N) = `forward` of resid. Overwrites resid, out and rstd.
// Outputs, then inputs, then the shape: the reference's plain list (see layernorm::backward).
#[allow(clippy::too_many_arguments)]
pub fn forward_residual<T: Real>(
    resid: &mut [T],
    out: &mut [T],
    rstd: &mut [T],
    a: &[T],
    b: &[T],
    weight: &[T],
    dims: Dims,
    eps: f64,
) {
    for i in 0..dims.n * dims.c {
        resid[i] = a[i] + b[i];
    }
    forward(out, rstd, resid, weight, dims, eps);
}

/// Backward of `forward`, accumulating into both outputs:
/// dinp (N, C) += rstd · (dnorm - xhat · mean_c(dnorm · xhat)), dweight (C) += Σ_rows dout · xhat,
/// where xhat = inp · rstd and dnorm = weight · dout.
/// dout (N, C), inp (N, C), weight (C), rstd (N) as saved by `forward`.
pub fn backward<T: Real>(
    dinp: &mut [T],
    dweight: &mut [T],
    dout: &[T],
    inp: &[T],
    weight: &[T],
    rstd: &[T],
    dims: Dims,
) {
    let Dims { n, c } = dims;
    let cf = T::from_f64(c as f64);
    for row in 0..n {
        let s = rstd[row];
        // The one row mean the input gradient needs.
        let mut dnorm_xhat_mean = T::zero();
        for i in 0..c {
            let xhat = inp[row * c + i] * s;
            dnorm_xhat_mean += weight[i] * dout[row * c + i] * xhat;
        }
        dnorm_xhat_mean /= cf;
        for i in 0..c {
            let g = dout[row * c + i];
            let xhat = inp[row * c + i] * s;
            dweight[i] += g * xhat;
            dinp[row * c + i] += s * (weight[i] * g - xhat * dnorm_xhat_mean);
        }
    }
}
