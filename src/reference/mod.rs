//! Plain-Rust CPU references: the specification every shader is tested against.
//!
//! One module per shader file, llm.c style: outputs first, then inputs, then dimensions; the
//! obvious loops. Functions are generic over `Real` so the same code runs in f32 (to compare with
//! the GPU) and in f64 (to check backward passes against finite differences).

pub mod adamw;
pub mod attention;
pub mod bf16;
pub mod cross_entropy;
pub mod dropout;
pub mod embedding;
pub mod gelu;
pub mod gemm;
pub mod layernorm;
pub mod qkv_pack;
pub mod reduce;
pub mod residual;
pub mod rmsnorm;
pub mod rope;
pub mod swiglu;

use std::fmt;
use std::ops::{Add, AddAssign, Div, DivAssign, Mul, MulAssign, Neg, Sub, SubAssign};

/// The floating-point operations the references need, for f32 and f64.
pub trait Real:
    Copy
    + Default
    + PartialOrd
    + fmt::Debug
    + fmt::Display
    + Send
    + Sync
    + 'static
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + Neg<Output = Self>
    + AddAssign
    + SubAssign
    + MulAssign
    + DivAssign
{
    fn from_f64(x: f64) -> Self;
    fn to_f64(self) -> f64;
    fn exp(self) -> Self;
    fn ln(self) -> Self;
    fn tanh(self) -> Self;
    fn sqrt(self) -> Self;
    fn abs(self) -> Self;
    fn max(self, other: Self) -> Self;
    fn min(self, other: Self) -> Self;
    fn zero() -> Self {
        Self::from_f64(0.0)
    }
    fn one() -> Self {
        Self::from_f64(1.0)
    }
}

macro_rules! impl_real {
    ($t:ty) => {
        impl Real for $t {
            fn from_f64(x: f64) -> Self {
                x as $t
            }
            fn to_f64(self) -> f64 {
                self as f64
            }
            fn exp(self) -> Self {
                <$t>::exp(self)
            }
            fn ln(self) -> Self {
                <$t>::ln(self)
            }
            fn tanh(self) -> Self {
                <$t>::tanh(self)
            }
            fn sqrt(self) -> Self {
                <$t>::sqrt(self)
            }
            fn abs(self) -> Self {
                <$t>::abs(self)
            }
            fn max(self, other: Self) -> Self {
                <$t>::max(self, other)
            }
            fn min(self, other: Self) -> Self {
                <$t>::min(self, other)
            }
        }
    };
}
impl_real!(f32);
impl_real!(f64);

/// Converts a slice between float types (f32 data into f64 for finite differences, and back).
pub fn convert<A: Real, B: Real>(x: &[A]) -> Vec<B> {
    x.iter().map(|v| B::from_f64(v.to_f64())).collect()
}

/// The result of comparing a computed tensor with its reference, element by element, with the
/// tolerance `|got - want| <= atol + rtol * |want|`.
#[derive(Clone, Debug)]
pub struct Comparison {
    pub name: String,
    pub len: usize,
    pub atol: f64,
    pub rtol: f64,
    /// Largest |got - want|, and where.
    pub max_abs: f64,
    pub max_abs_index: usize,
    /// First index outside the tolerance (NaN anywhere counts), with the two values.
    pub first_bad: Option<(usize, f64, f64)>,
    pub bad_count: usize,
}

impl Comparison {
    pub fn ok(&self) -> bool {
        self.first_bad.is_none()
    }

    /// Panics with the full report unless every element is within tolerance.
    #[track_caller]
    pub fn assert(&self) {
        assert!(self.ok(), "{self}");
    }
}

impl fmt::Display for Comparison {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {} of {} outside atol {:.0e} + rtol {:.0e}, max abs err {:.3e} at {}",
            self.name,
            self.bad_count,
            self.len,
            self.atol,
            self.rtol,
            self.max_abs,
            self.max_abs_index
        )?;
        if let Some((i, got, want)) = self.first_bad {
            write!(f, "; first mismatch at {i}: got {got:e}, want {want:e}")?;
        }
        Ok(())
    }
}

/// Compares `got` with `want`. A length mismatch or a NaN counts as a mismatch.
pub fn compare<A: Real, B: Real>(
    name: &str,
    got: &[A],
    want: &[B],
    atol: f64,
    rtol: f64,
) -> Comparison {
    let mut c = Comparison {
        name: name.to_string(),
        len: want.len(),
        atol,
        rtol,
        max_abs: 0.0,
        max_abs_index: 0,
        first_bad: None,
        bad_count: 0,
    };
    if got.len() != want.len() {
        c.first_bad = Some((got.len().min(want.len()), f64::NAN, f64::NAN));
        c.bad_count = got.len().abs_diff(want.len());
        c.name = format!("{name} (length {} vs reference {})", got.len(), want.len());
        return c;
    }
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let (g, w) = (g.to_f64(), w.to_f64());
        let err = (g - w).abs();
        let bad = err.is_nan() || err > atol + rtol * w.abs();
        if err > c.max_abs || (err.is_nan() && !c.max_abs.is_nan()) {
            c.max_abs = err;
            c.max_abs_index = i;
        }
        if bad {
            c.bad_count += 1;
            if c.first_bad.is_none() {
                c.first_bad = Some((i, g, w));
            }
        }
    }
    c
}

/// Central finite differences of a scalar function: d f / d x_i ≈ (f(x + h e_i) - f(x - h e_i)) / 2h.
pub fn numeric_grad(x: &[f64], h: f64, mut f: impl FnMut(&[f64]) -> f64) -> Vec<f64> {
    let mut x = x.to_vec();
    (0..x.len())
        .map(|i| {
            let orig = x[i];
            x[i] = orig + h;
            let fp = f(&x);
            x[i] = orig - h;
            let fm = f(&x);
            x[i] = orig;
            (fp - fm) / (2.0 * h)
        })
        .collect()
}

/// The scalar used to turn a tensor output into a loss for finite differences: Σ out_i · w_i,
/// so that the upstream gradient dout is exactly `w`.
pub fn dot(out: &[f64], w: &[f64]) -> f64 {
    out.iter().zip(w).map(|(a, b)| a * b).sum()
}
