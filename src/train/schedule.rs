//! Learning-rate schedules, nanoGPT's `get_lr`.

/// Linear warmup then cosine decay to `min_lr`, or constant.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    Cosine,
    Constant,
}

#[derive(Clone, Copy, Debug)]
pub struct LrSchedule {
    pub kind: Schedule,
    pub lr: f32,
    pub min_lr: f32,
    pub warmup_iters: u64,
    pub lr_decay_iters: u64,
}

impl LrSchedule {
    /// The learning rate of iteration `it` (0-based): `lr · (it+1)/(warmup+1)` during warmup,
    /// then a cosine from `lr` down to `min_lr` at `lr_decay_iters`, then `min_lr`.
    pub fn at(&self, it: u64) -> f32 {
        if self.kind == Schedule::Constant {
            return self.lr;
        }
        if it < self.warmup_iters {
            return self.lr * (it + 1) as f32 / (self.warmup_iters + 1) as f32;
        }
        if it > self.lr_decay_iters {
            return self.min_lr;
        }
        let span = self.lr_decay_iters.saturating_sub(self.warmup_iters).max(1);
        let ratio = (it - self.warmup_iters) as f64 / span as f64;
        let coeff = 0.5 * (1.0 + (std::f64::consts::PI * ratio).cos());
        (self.min_lr as f64 + coeff * (self.lr - self.min_lr) as f64) as f32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_nanogpt() {
        let s = LrSchedule {
            kind: Schedule::Cosine,
            lr: 1e-3,
            min_lr: 1e-4,
            warmup_iters: 100,
            lr_decay_iters: 2000,
        };
        assert!((s.at(0) - 1e-3 / 101.0).abs() < 1e-9);
        assert!((s.at(99) - 1e-3 * 100.0 / 101.0).abs() < 1e-9);
        assert!((s.at(100) - 1e-3).abs() < 1e-9);
        assert!((s.at(1050) - 5.5e-4).abs() < 1e-7);
        assert!((s.at(2000) - 1e-4).abs() < 1e-9);
        assert_eq!(s.at(5000), 1e-4);
        let c = LrSchedule {
            kind: Schedule::Constant,
            ..s
        };
        assert_eq!(c.at(0), 1e-3);
    }
}
