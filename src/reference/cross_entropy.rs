//! Softmax cross-entropy over rows of (padded) logits.

use super::Real;

/// The target value that excludes a row from the loss.
pub const IGNORE: u32 = u32::MAX;

/// The shape of a loss over padded logits: N rows of V logits each, stored with a row stride of
/// Vp >= V (the padded vocabulary, e.g. 50304 for 50257).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dims {
    pub n: usize,
    pub v: usize,
    pub vp: usize,
}

/// losses (N) = logsumexp(logits[i, :V]) - logits[i, targets[i]]; lse (N) = logsumexp(logits[i, :V]).
/// logits (N, Vp) with padding columns [V, Vp); targets (N). Loss 0 where the target is IGNORE,
/// NaN where it is another value >= V.
pub fn forward<T: Real>(
    losses: &mut [T],
    lse: &mut [T],
    logits: &[T],
    targets: &[u32],
    dims: Dims,
) {
    let Dims { n, v, vp } = dims;
    for i in 0..n {
        let row = &logits[i * vp..i * vp + v];
        let mut max = row[0];
        for &x in row {
            max = max.max(x);
        }
        let mut sum = T::zero();
        for &x in row {
            sum += (x - max).exp();
        }
        lse[i] = max + sum.ln();
        let target = targets[i];
        losses[i] = if target == IGNORE {
            T::zero()
        } else if (target as usize) < v {
            lse[i] - row[target as usize]
        } else {
            T::from_f64(f64::NAN)
        };
    }
}

/// dlogits (N, Vp) = dloss · (softmax(logits[i, :V]) - onehot(targets[i])), the gradient of
/// Σ_i dloss · losses[i]. Overwrites; 0 in columns [V, Vp) and in ignored rows, NaN in columns
/// [0, V) of rows with an invalid target.
pub fn backward<T: Real>(dlogits: &mut [T], logits: &[T], targets: &[u32], dloss: T, dims: Dims) {
    let Dims { n, v, vp } = dims;
    let (mut losses, mut lse) = (vec![T::zero(); n], vec![T::zero(); n]);
    forward(&mut losses, &mut lse, logits, targets, dims);
    for i in 0..n {
        let target = targets[i];
        for j in 0..vp {
            dlogits[i * vp + j] = if j >= v || target == IGNORE {
                T::zero()
            } else if target as usize >= v {
                T::from_f64(f64::NAN)
            } else {
                let prob = (logits[i * vp + j] - lse[i]).exp();
                let onehot = if j == target as usize {
                    T::one()
                } else {
                    T::zero()
                };
                dloss * (prob - onehot)
            };
        }
    }
}
