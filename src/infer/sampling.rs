//! Choosing the next token from logits: greedy, or temperature with top-k and top-p (nucleus)
//! filtering, from a seeded generator.

use crate::error::{Error, Result};
use crate::rng::Rng;

#[derive(Clone, Debug)]
pub struct SampleOptions {
    pub greedy: bool,
    pub temperature: f32,
    /// Keep only the k most likely tokens (None: all).
    pub top_k: Option<usize>,
    /// Keep the smallest set of most likely tokens whose probability reaches p (1: all).
    pub top_p: f32,
}

impl Default for SampleOptions {
    fn default() -> Self {
        SampleOptions {
            greedy: false,
            temperature: 1.0,
            top_k: None,
            top_p: 1.0,
        }
    }
}

impl SampleOptions {
    pub fn validate(&self) -> Result<()> {
        if !(self.greedy || self.temperature > 0.0 && self.temperature.is_finite()) {
            return Err(Error::invalid(
                "--temperature",
                format!(
                    "{} must be > 0 (use --greedy for argmax decoding)",
                    self.temperature
                ),
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(Error::invalid(
                "--top-p",
                format!("{} must be in (0, 1]", self.top_p),
            ));
        }
        if self.top_k == Some(0) {
            return Err(Error::invalid("--top-k", "must be at least 1"));
        }
        Ok(())
    }
}

/// The index of the largest logit (the first one on ties).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// Picks the next token from `logits` (the real vocabulary only).
pub fn sample(logits: &[f32], opts: &SampleOptions, rng: &mut Rng) -> u32 {
    if opts.greedy {
        return argmax(logits);
    }
    // Candidates sorted by logit, best first (stable: ties keep id order).
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    if let Some(k) = opts.top_k {
        order.truncate(k.max(1));
    }
    let max = logits[order[0]] as f64;
    let t = opts.temperature as f64;
    let mut probs: Vec<f64> = order
        .iter()
        .map(|&i| ((logits[i] as f64 - max) / t).exp())
        .collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= total);
    if opts.top_p < 1.0 {
        let mut acc = 0.0;
        let mut keep = probs.len();
        for (j, p) in probs.iter().enumerate() {
            acc += p;
            if acc >= opts.top_p as f64 {
                keep = j + 1;
                break;
            }
        }
        probs.truncate(keep);
        order.truncate(keep);
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
    }
    let mut u = rng.uniform();
    for (j, p) in probs.iter().enumerate() {
        if u < *p {
            return order[j] as u32;
        }
        u -= p;
    }
    order[probs.len() - 1] as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_and_greedy() {
        let logits = [0.0, 3.0, 1.0, 2.9];
        let mut rng = Rng::new(0);
        let greedy = SampleOptions {
            greedy: true,
            ..Default::default()
        };
        assert_eq!(sample(&logits, &greedy, &mut rng), 1);
        let top1 = SampleOptions {
            top_k: Some(1),
            ..Default::default()
        };
        for _ in 0..20 {
            assert_eq!(sample(&logits, &top1, &mut rng), 1);
        }
        let top2 = SampleOptions {
            top_k: Some(2),
            ..Default::default()
        };
        for _ in 0..50 {
            let s = sample(&logits, &top2, &mut rng);
            assert!(s == 1 || s == 3);
        }
        let nucleus = SampleOptions {
            top_p: 0.3,
            ..Default::default()
        };
        for _ in 0..20 {
            assert_eq!(sample(&logits, &nucleus, &mut rng), 1);
        }
        assert!(
            SampleOptions {
                temperature: 0.0,
                ..Default::default()
            }
            .validate()
            .is_err()
        );
        assert!(
            SampleOptions {
                top_p: 1.5,
                ..Default::default()
            }
            .validate()
            .is_err()
        );
    }
}
