//! The rotary embedding's inverse frequencies, computed on the CPU where the scalings live, as
//! transformers' `modeling_rope_utils` computes them: inv_freq[i] = 1 / theta^(2i / D) for
//! i < D/2, then the checkpoint's scaling. The kernel reads them from a small buffer.

use serde_json::Value;

use crate::error::{Error, Result};

/// How a checkpoint scales the rotary frequencies (`rope_scaling` in transformers 4.x configs,
/// `rope_parameters` in 5.x).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Scaling {
    /// No scaling ("default").
    None,
    /// "linear": positions divided by `factor`, i.e. every inverse frequency divided by it.
    Linear { factor: f64 },
    /// "llama3" (Llama 3.1 and 3.2): low frequencies divided by `factor`, high ones kept, and a
    /// smooth blend between, by wavelength against the original context
    /// (transformers' `_compute_llama3_parameters`).
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
}

impl Scaling {
    /// The scaling a config's `rope_scaling` (or `rope_parameters`) object names, read from its
    /// `rope_type` (or the older `type`) and the fields that type takes; a null or absent object
    /// is no scaling. Any other rope type is an error naming it: the frequencies would be wrong.
    pub fn from_config(what: &str, v: &Value) -> Result<Scaling> {
        if v.is_null() {
            return Ok(Scaling::None);
        }
        let kind = v
            .get("rope_type")
            .or_else(|| v.get("type"))
            .and_then(Value::as_str)
            .unwrap_or("default");
        let field = |name: &str| -> Result<f64> {
            v.get(name).and_then(Value::as_f64).ok_or_else(|| {
                Error::invalid(
                    format!("{what}.{name}"),
                    format!("rope type '{kind}' needs a number {name}"),
                )
            })
        };
        let s = match kind {
            "default" => Scaling::None,
            "linear" => Scaling::Linear {
                factor: field("factor")?,
            },
            "llama3" => Scaling::Llama3 {
                factor: field("factor")?,
                low_freq_factor: field("low_freq_factor")?,
                high_freq_factor: field("high_freq_factor")?,
                original_max_position_embeddings: field("original_max_position_embeddings")?,
            },
            other => {
                return Err(Error::invalid(
                    format!("{what}.rope_type"),
                    format!(
                        "rope type '{other}' is not supported (supported: default, linear, llama3)"
                    ),
                ));
            }
        };
        s.validate(what)?;
        Ok(s)
    }

    /// Fails on factors that would give infinite or meaningless frequencies, naming the field.
    pub fn validate(&self, what: &str) -> Result<()> {
        let at_least = |name: &str, x: f64, min: f64| {
            if x.is_finite() && x >= min && x > 0.0 {
                Ok(())
            } else {
                Err(Error::invalid(
                    format!("{what}.{name}"),
                    format!("{name} = {x} must be finite and at least {min}, above 0"),
                ))
            }
        };
        // A factor of at least 1 keeps every inverse frequency at most 1, which the kernel's
        // angle reduction counts on.
        let factor_ok = |x: f64| at_least("factor", x, 1.0);
        let positive = |name: &str, x: f64| at_least(name, x, 0.0);
        match *self {
            Scaling::None => Ok(()),
            Scaling::Linear { factor } => factor_ok(factor),
            Scaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                factor_ok(factor)?;
                positive("low_freq_factor", low_freq_factor)?;
                positive("high_freq_factor", high_freq_factor)?;
                positive(
                    "original_max_position_embeddings",
                    original_max_position_embeddings,
                )?;
                if high_freq_factor <= low_freq_factor {
                    return Err(Error::invalid(
                        format!("{what}.high_freq_factor"),
                        format!(
                            "high_freq_factor {high_freq_factor} must exceed low_freq_factor \
                             {low_freq_factor}"
                        ),
                    ));
                }
                Ok(())
            }
        }
    }
}

/// The D/2 inverse frequencies of a head of size `head_dim` with base `theta` and `scaling`,
/// computed in f64 and rounded once to f32 (transformers computes them in f32, so its values may
/// differ from these in the last bit). An odd head_dim or a theta that is not finite and above 1
/// is an error.
pub fn inv_freq(head_dim: usize, theta: f64, scaling: Scaling) -> Result<Vec<f32>> {
    if head_dim == 0 || !head_dim.is_multiple_of(2) {
        return Err(Error::invalid(
            "head_dim",
            format!("rotary embedding needs an even head_dim, got {head_dim}"),
        ));
    }
    if !(theta.is_finite() && theta > 1.0) {
        return Err(Error::invalid(
            "rope_theta",
            format!("rope_theta = {theta} must be finite and above 1"),
        ));
    }
    scaling.validate("rope_scaling")?;
    let d = head_dim as f64;
    Ok((0..head_dim / 2)
        .map(|i| {
            let f = 1.0 / theta.powf((2 * i) as f64 / d);
            scale(f, scaling) as f32
        })
        .collect())
}

/// One inverse frequency after `scaling`.
fn scale(inv_freq: f64, scaling: Scaling) -> f64 {
    match scaling {
        Scaling::None => inv_freq,
        Scaling::Linear { factor } => inv_freq / factor,
        Scaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings: old_context,
        } => {
            let low_freq_wavelen = old_context / low_freq_factor;
            let high_freq_wavelen = old_context / high_freq_factor;
            let wavelen = 2.0 * std::f64::consts::PI / inv_freq;
            if wavelen < high_freq_wavelen {
                inv_freq
            } else if wavelen > low_freq_wavelen {
                inv_freq / factor
            } else {
                let smooth = (old_context / wavelen - low_freq_factor)
                    / (high_freq_factor - low_freq_factor);
                (1.0 - smooth) * inv_freq / factor + smooth * inv_freq
            }
        }
    }
}
