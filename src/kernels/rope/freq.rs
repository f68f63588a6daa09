//! The rotary embedding's inverse frequencies, computed on the CPU where the scalings live,
//! exactly as transformers 5 computes them (`modeling_rope_utils`): inv_freq[i] = 1 / theta^(2i / D)
//! for i < D/2 in f32, then the checkpoint's scaling. The kernel reads them from a small buffer;
//! the model description (`model::arch`) holds a `Rope` and the checkpoint readers fill it.

use crate::error::{Error, Result};

/// How RoPE's inverse frequencies are rescaled for a longer context.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum RopeScaling {
    /// transformers' rope_type "default".
    None,
    /// rope_type "linear": every inverse frequency divided by `factor`.
    Linear { factor: f64 },
    /// rope_type "llama3" (Llama 3.1 / 3.2): long wavelengths divided by `factor`, short ones
    /// kept, the band between interpolated.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: usize,
    },
}

/// Rotary position embedding in Hugging Face's rotate-half layout.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rope {
    pub theta: f64,
    pub scaling: RopeScaling,
}

/// The rope types this engine computes, as errors list them.
pub const ROPE_TYPES: &str = "default, linear, llama3";

impl RopeScaling {
    /// The scaling of transformers' `rope_type`; any type but default, linear and llama3 is
    /// refused naming it (`field` names where it was read).
    pub fn check_type(field: &str, rope_type: &str) -> Result<()> {
        match rope_type {
            "default" | "linear" | "llama3" => Ok(()),
            other => Err(Error::invalid(
                field,
                format!("rope type '{other}' is not supported (only {ROPE_TYPES})"),
            )),
        }
    }

    /// transformers' name of the scaling.
    pub fn rope_type(&self) -> &'static str {
        match self {
            RopeScaling::None => "default",
            RopeScaling::Linear { .. } => "linear",
            RopeScaling::Llama3 { .. } => "llama3",
        }
    }
}

impl Rope {
    /// Fails on a theta or factors that would give infinite, meaningless or (a factor below 1)
    /// above-1 frequencies, which the kernel's angle reduction does not take, naming the field.
    pub fn validate(&self) -> Result<()> {
        let bad = |what: &str, msg: String| Err(Error::invalid(format!("model: {what}"), msg));
        if !(self.theta.is_finite() && self.theta > 0.0) {
            return bad(
                "rope_theta",
                format!("{} is not a positive number", self.theta),
            );
        }
        let positive = |x: f64| x.is_finite() && x > 0.0;
        let at_least_one = |factor: f64| {
            if factor.is_finite() && factor >= 1.0 {
                Ok(())
            } else {
                bad(
                    "factor",
                    format!("{factor} is below 1 (it must be finite and at least 1)"),
                )
            }
        };
        if self.theta < 1.0 {
            return bad("rope_theta", format!("{} is below 1", self.theta));
        }
        match self.scaling {
            RopeScaling::None => Ok(()),
            RopeScaling::Linear { factor } => at_least_one(factor),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                at_least_one(factor)?;
                if !positive(low_freq_factor) {
                    bad(
                        "low_freq_factor",
                        format!("{low_freq_factor} is not a positive number"),
                    )
                } else if !(high_freq_factor.is_finite() && high_freq_factor > low_freq_factor) {
                    bad(
                        "high_freq_factor",
                        format!("{high_freq_factor} must exceed low_freq_factor {low_freq_factor}"),
                    )
                } else if original_max_position_embeddings == 0 {
                    bad(
                        "original_max_position_embeddings",
                        "must be at least 1".into(),
                    )
                } else {
                    Ok(())
                }
            }
        }
    }

    /// The head_dim / 2 inverse frequencies, computed in f32 step by step as transformers 5
    /// does (`_compute_default_rope_parameters`, then the linear or llama3 rescaling), each
    /// Python float rounded to f32 where it meets the float32 tensor.
    pub fn inv_freq(&self, head_dim: usize) -> Vec<f32> {
        let base = self.theta as f32;
        let dim = head_dim as f32;
        let default: Vec<f32> = (0..head_dim)
            .step_by(2)
            .map(|i| 1.0 / base.powf(i as f32 / dim))
            .collect();
        match self.scaling {
            RopeScaling::None => default,
            RopeScaling::Linear { factor } => default.iter().map(|&f| f / factor as f32).collect(),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                let old = original_max_position_embeddings as f64;
                let bands = Llama3Bands {
                    factor: factor as f32,
                    low_freq_factor: low_freq_factor as f32,
                    smooth_div: (high_freq_factor - low_freq_factor) as f32,
                    old_context: old as f32,
                    low_freq_wavelen: (old / low_freq_factor) as f32,
                    high_freq_wavelen: (old / high_freq_factor) as f32,
                };
                default.iter().map(|&f| bands.scale(f)).collect()
            }
        }
    }
}

/// The constants of transformers' `_compute_llama3_parameters`, rounded to f32.
struct Llama3Bands {
    factor: f32,
    low_freq_factor: f32,
    /// high_freq_factor - low_freq_factor, computed in Python (f64) first.
    smooth_div: f32,
    old_context: f32,
    low_freq_wavelen: f32,
    high_freq_wavelen: f32,
}

impl Llama3Bands {
    /// One inverse frequency: kept where its wavelength is short, divided by the factor where
    /// it is long, interpolated between (the same expressions, in the same order, as
    /// transformers). The negated comparisons are transformers' `~(a < b)`, NaN included.
    #[allow(clippy::neg_cmp_op_on_partial_ord)]
    fn scale(&self, inv_freq: f32) -> f32 {
        let wavelen = (2.0 * std::f64::consts::PI) as f32 / inv_freq;
        let long = if wavelen > self.low_freq_wavelen {
            inv_freq / self.factor
        } else {
            inv_freq
        };
        let medium = !(wavelen < self.high_freq_wavelen) && !(wavelen > self.low_freq_wavelen);
        if !medium {
            return long;
        }
        let smooth = (self.old_context / wavelen - self.low_freq_factor) / self.smooth_div;
        (1.0 - smooth) * long / self.factor + smooth * long
    }
}
