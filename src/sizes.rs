//! Sizes computed from the user's numbers (batch, context, samples, micro-steps): checked
//! arithmetic throughout, so a product that would wrap is an error naming the flags, never a
//! size of zero that passes a check and then divides by zero or allocates at random.

use crate::error::{Error, Result};

/// The product of `factors`, each named by its flag (or by what it is), or an error naming them
/// when it overflows.
pub fn product(factors: &[(&str, u64)]) -> Result<u64> {
    factors
        .iter()
        .try_fold(1u64, |acc, &(_, x)| acc.checked_mul(x))
        .ok_or_else(|| {
            let named: Vec<String> = factors.iter().map(|(f, x)| format!("{f} {x}")).collect();
            let flag = factors
                .iter()
                .max_by_key(|(_, x)| *x)
                .map_or("size", |(f, _)| *f);
            Error::invalid(
                flag,
                format!(
                    "{} is too large: their product overflows 64 bits",
                    named.join(" x ")
                ),
            )
        })
}

/// `product`, also refused when it is over the host's available memory (`what` names it).
pub fn bytes(what: &str, factors: &[(&str, u64)]) -> Result<u64> {
    let n = product(factors)?;
    crate::memory::check(what, n as u128).map_err(|e| {
        let named: Vec<String> = factors.iter().map(|(f, x)| format!("{f} {x}")).collect();
        Error::invalid(
            factors
                .iter()
                .max_by_key(|(_, x)| *x)
                .map_or("size", |(f, _)| *f),
            format!("{} ({}): {e}", what, named.join(" x ")),
        )
    })?;
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_product_that_would_wrap_names_the_largest_flag() {
        assert_eq!(
            product(&[("--batch-size", 3), ("--block-size", 5)]).unwrap(),
            15
        );
        let e = product(&[("--batch-size", 1 << 60), ("--block-size", 64)])
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("--batch-size") && e.contains("overflows"),
            "{e}"
        );
        let e = bytes("the logits", &[("--num-samples", 1 << 40), ("bytes", 4)])
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("--num-samples") && e.contains("the logits"),
            "{e}"
        );
    }
}
