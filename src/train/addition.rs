//! The embedded default dataset: two-digit additions, one per line, generated in code so
//! `shaderformer train` runs offline with nothing to download and shows learning within minutes.
//!
//! Every number is written least-significant digit first, the order in which a left-to-right
//! model can carry: `47+85=132` is the line `74+58=231`. Lines are 10 characters with the newline,
//! and the defaults train on sequences of exactly one line read in order (`--loader sequential`
//! with block size 10), so every problem starts at position 0 and the model need not learn to
//! find the digits at every offset. Held-out problems (1 in 10 of all pairs, never in the text)
//! measure what it learned.

use super::TrainConfig;
use super::data::LoaderKind;
use super::schedule::LrSchedule;
use crate::rng::Rng;

/// Digits per operand.
pub const DIGITS: usize = 2;
/// Characters per line, newline included.
pub const LINE: usize = 3 * DIGITS + 4;

fn reversed(x: u32, width: usize) -> String {
    format!("{x:0width$}").chars().rev().collect()
}

/// One problem as a line (without the newline).
pub fn line(a: u32, b: u32) -> String {
    format!(
        "{}+{}={}",
        reversed(a, DIGITS),
        reversed(b, DIGITS),
        reversed(a + b, DIGITS + 1)
    )
}

/// The prompt for `a + b`: the line up to and including `=`.
pub fn prompt(a: u32, b: u32) -> String {
    format!("{}+{}=", reversed(a, DIGITS), reversed(b, DIGITS))
}

/// Reads the model's answer characters back as a number (None if they are not digits).
pub fn parse_answer(completion: &str) -> Option<u32> {
    let digits: String = completion.chars().take(DIGITS + 1).collect();
    if digits.len() != DIGITS + 1 || !digits.chars().all(|c| c.is_ascii_digit()) {
        return None;
    }
    digits.chars().rev().collect::<String>().parse().ok()
}

fn limit() -> u32 {
    10u32.pow(DIGITS as u32)
}

/// A problem drawn uniformly from all pairs of operands.
fn pair(rng: &mut Rng) -> (u32, u32) {
    let n = limit() as u64;
    (rng.below(n) as u32, rng.below(n) as u32)
}

/// Whether a problem is held out of the training text (a fixed 1 in 10 of all pairs), so the
/// final accuracy measures generalization, not recall.
pub fn held_out(a: u32, b: u32) -> bool {
    (a * limit() + b)
        .wrapping_mul(2_654_435_761)
        .is_multiple_of(10)
}

/// `n` training lines drawn from the problems not held out.
pub fn text(n: usize, seed: u64) -> String {
    let mut rng = Rng::new(seed);
    let mut s = String::with_capacity(n * LINE);
    let mut k = 0;
    while k < n {
        let (a, b) = pair(&mut rng);
        if held_out(a, b) {
            continue;
        }
        s.push_str(&line(a, b));
        s.push('\n');
        k += 1;
    }
    s
}

/// `n` held-out problems for evaluation.
pub fn test_problems(n: usize, seed: u64) -> Vec<(u32, u32)> {
    let mut rng = Rng::new(seed);
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let (a, b) = pair(&mut rng);
        if held_out(a, b) {
            out.push((a, b));
        }
    }
    out
}

/// The embedded addition dataset's settings: a small model that learns two-digit addition in a
/// few minutes on a software Vulkan device, fed one line-aligned problem per sequence.
pub fn defaults() -> TrainConfig {
    let d = TrainConfig::default();
    TrainConfig {
        n_layer: 2,
        n_head: 4,
        n_embd: 64,
        block_size: LINE,
        batch_size: 32,
        max_iters: 2000,
        schedule: LrSchedule {
            lr: 1e-3,
            min_lr: 1e-4,
            warmup_iters: 50,
            lr_decay_iters: 2000,
            ..d.schedule
        },
        weight_decay: 0.0,
        loader: LoaderKind::Sequential,
        eval_interval: 500,
        eval_iters: 10,
        log_interval: 100,
        ..d
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_and_answers_round_trip() {
        assert_eq!(line(47, 85), "74+58=231");
        assert_eq!(line(5, 7), "50+70=210");
        assert_eq!(prompt(47, 85), "74+58=");
        assert_eq!(line(47, 85).len() + 1, LINE);
        assert_eq!(parse_answer("231\n"), Some(132));
        assert_eq!(parse_answer("2x1"), None);
        let t = text(100, 1);
        assert_eq!(t.lines().count(), 100);
        assert_eq!(t.len(), 100 * LINE);
        for p in test_problems(50, 2) {
            assert!(held_out(p.0, p.1));
            assert!(!t.contains(&line(p.0, p.1)));
        }
    }
}
