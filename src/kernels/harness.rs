//! The kernel harness behind `shaderformer kernels list|check|bench`: every kernel family registers
//! a `Family` with a check (GPU against the CPU reference, forward and backward) and a bench
//! (GPU time per call, throughput, variant), in the spirit of llm.c's dev/cuda.

use std::sync::atomic::{AtomicBool, Ordering};

use crate::error::{Error, Result};
use crate::gpu::{Cost, Dispatch, Gpu, TimingMethod};
use crate::reference::{Comparison, Real, compare};

/// One kernel family, i.e. one shader file, as the harness sees it.
pub struct Family {
    pub name: &'static str,
    pub about: &'static str,
    /// How `--shape` is written for this family, e.g. "MxKxN".
    pub shape_help: &'static str,
    /// The awkward shapes `check` runs when no shape is given.
    pub default_shapes: &'static [&'static [usize]],
    /// The shape `bench` runs when no shape is given.
    pub bench_shape: &'static [usize],
    pub check: fn(&Gpu, &[usize]) -> Result<Vec<CheckReport>>,
    pub bench: fn(&Gpu, &[usize], &BenchOptions) -> Result<Vec<BenchReport>>,
}

/// Whether checks sweep every variant over every layout (`kernels check --exhaustive`) rather
/// than each variant over the layouts that build its pipelines once. Families without such a
/// sweep ignore it.
static EXHAUSTIVE: AtomicBool = AtomicBool::new(false);

/// Asks the checks that run after it for their exhaustive sweeps (or not).
pub fn set_exhaustive(on: bool) {
    EXHAUSTIVE.store(on, Ordering::Relaxed);
}

/// Whether `set_exhaustive` asked for exhaustive sweeps.
pub fn exhaustive() -> bool {
    EXHAUSTIVE.load(Ordering::Relaxed)
}

/// Every family, in the order `kernels list` prints them.
pub fn families() -> Vec<&'static Family> {
    use super::*;
    vec![
        &gemm::FAMILY,
        &layernorm::FAMILY,
        &rmsnorm::FAMILY,
        &gelu::FAMILY,
        &swiglu::FAMILY,
        &rope::FAMILY,
        &qkv_pack::FAMILY,
        &embedding::FAMILY,
        &cross_entropy::FAMILY,
        &residual::FAMILY,
        &convert::FAMILY,
        &dropout::FAMILY,
        &adamw::FAMILY,
        &reduce::FAMILY,
        &attention::FAMILY,
    ]
}

/// The shapes `kernels check` runs after a family's default ones when `exhaustive` is on: the
/// sweeps whose every shape would compile and run every variant again (attention's).
pub fn exhaustive_shapes(f: &Family) -> &'static [&'static [usize]] {
    match f.name {
        "attention" if exhaustive() => super::attention::check::EXHAUSTIVE_SHAPES,
        _ => &[],
    }
}

pub fn find(name: &str) -> Result<&'static Family> {
    families()
        .into_iter()
        .find(|f| f.name == name)
        .ok_or_else(|| {
            let names: Vec<&str> = families().iter().map(|f| f.name).collect();
            Error::invalid(
                "kernel",
                format!("unknown kernel '{name}' (known: {})", names.join(", ")),
            )
        })
}

/// Parses "1024x1024x1024" or "4,12,256,64" into dimensions.
pub fn parse_shape(s: &str) -> Result<Vec<usize>> {
    s.split(['x', 'X', ',', '*'])
        .map(|d| {
            d.trim()
                .parse::<usize>()
                .ok()
                .filter(|&v| v > 0)
                .ok_or_else(|| {
                    Error::invalid(
                        "--shape",
                        format!("'{s}' is not a list of positive integers like 64x128x256"),
                    )
                })
        })
        .collect()
}

/// Checks a `--shape` against its family's constraints before anything is allocated: the
/// number of dimensions, relations between them, and the memory the check or benchmark would
/// take (its largest tensors, on the CPU and the GPU, with their gradients) against what the
/// machine has. Errors are one line naming the family's shape syntax.
pub fn validate_shape(f: &Family, shape: &[usize]) -> Result<()> {
    let bad = |msg: String| {
        Err(Error::invalid(
            "--shape",
            format!("{}: {msg} (shape {})", f.name, f.shape_help),
        ))
    };
    let d: Vec<u128> = shape.iter().map(|&x| x as u128).collect();
    let ok_dims: &[usize] = match f.name {
        "gemm" => &[3],
        "attention" => &[4, 5],
        "layernorm" | "rmsnorm" => &[2],
        "cross_entropy" => &[2, 3],
        "embedding" => &[4, 5],
        "rope" | "qkv_pack" => &[5],
        _ => &[1],
    };
    if !ok_dims.contains(&d.len()) {
        let n: Vec<String> = ok_dims.iter().map(|n| n.to_string()).collect();
        return bad(format!(
            "takes {} dimensions, got {}",
            n.join(" or "),
            d.len()
        ));
    }
    // The largest tensors a check holds, in elements.
    let elements = match (f.name, d.as_slice()) {
        ("gemm", [m, k, n]) => sum(&[mul(&[*m, *k]), mul(&[*k, *n]), mul(&[*m, *n])]),
        ("layernorm" | "rmsnorm", [n, c]) => mul(&[*n, *c]),
        ("cross_entropy", [n, v, rest @ ..]) => {
            let vp = rest.first().copied().unwrap_or(v.div_ceil(64) * 64);
            if vp < *v {
                return bad(format!("Vp {vp} is smaller than V {v}"));
            }
            mul(&[*n, vp])
        }
        ("embedding", [b, t, c, v, rest @ ..]) => {
            if let Some(&k) = rest.first()
                && k > *v
            {
                return bad(format!("K {k} table chunks is more than V {v} rows"));
            }
            sum(&[mul(&[*b, *t, *c]), mul(&[*v, *c])])
        }
        ("attention", [_, nh, _, _, nkv]) if *nkv == 0 || nh % nkv != 0 => {
            return bad(format!("NKV {nkv} key/value heads must divide NH {nh}"));
        }
        ("attention", [b, nh, t, hs, ..]) => mul(&[*b, *nh, *t, sum(&[mul(&[3, *hs]), *t])]),
        ("rope", [_, _, h, r, _]) if r > h || *r == 0 => {
            return bad(format!("R {r} rotated heads must be between 1 and H {h}"));
        }
        ("rope", [b, t, h, _, d]) => mul(&[*b, *t, *h, *d]),
        ("qkv_pack", [_, _, nh, nkv, _]) if *nkv == 0 || nh % nkv != 0 => {
            return bad(format!("NKV {nkv} key/value heads must divide NH {nh}"));
        }
        ("qkv_pack", [b, t, nh, _, hs]) => mul(&[6, *b, *t, *nh, *hs]),
        (_, [n]) => *n,
        _ => unreachable!("dimension counts checked above"),
    };
    // f32 inputs, outputs and gradients, on the CPU and on the GPU.
    crate::memory::check(
        &format!("--shape {}", f.name),
        elements.saturating_mul(4 * 8),
    )
}

fn mul(x: &[u128]) -> u128 {
    x.iter().fold(1, |a, &b| a.saturating_mul(b))
}

fn sum(x: &[u128]) -> u128 {
    x.iter().fold(0, |a, &b| a.saturating_add(b))
}

/// Checks that a shape has exactly N dimensions.
pub fn dims<const N: usize>(family: &str, shape: &[usize]) -> Result<[usize; N]> {
    shape.try_into().map_err(|_| {
        let help = find(family).map(|f| f.shape_help).unwrap_or("?");
        Error::invalid(
            "--shape",
            format!(
                "{family} takes {N} dimensions ({help}), got {}",
                shape.len()
            ),
        )
    })
}

/// One tensor compared against its reference.
#[derive(Clone, Debug)]
pub struct CheckReport {
    pub shape: String,
    pub comparison: Comparison,
}

impl CheckReport {
    /// Compares `got` with the reference `want`; `what` names the kernel direction and tensor,
    /// e.g. "backward dweight".
    pub fn new<A: Real, B: Real>(
        shape: &str,
        what: &str,
        got: &[A],
        want: &[B],
        atol: f64,
        rtol: f64,
    ) -> CheckReport {
        CheckReport {
            shape: shape.to_string(),
            comparison: compare(what, got, want, atol, rtol),
        }
    }

    pub fn ok(&self) -> bool {
        self.comparison.ok()
    }
}

/// How many times to run a benchmark, and which of a family's candidates.
#[derive(Clone, Debug)]
pub struct BenchOptions {
    pub warmup: usize,
    pub runs: usize,
    /// Only the candidates whose name holds this text (families with many candidates honour it,
    /// so that one or two can be timed at a size where all of them would take minutes).
    pub only: Option<String>,
}

impl BenchOptions {
    /// Whether the candidate `name` is to be timed.
    pub fn wants(&self, name: &str) -> bool {
        self.only.as_deref().is_none_or(|o| name.contains(o))
    }
}

impl Default for BenchOptions {
    fn default() -> Self {
        BenchOptions {
            warmup: 2,
            runs: 10,
            only: None,
        }
    }
}

/// Median, min and max over runs, in seconds.
#[derive(Clone, Copy, Debug, Default)]
pub struct TimeStats {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub runs: usize,
}

impl TimeStats {
    /// {"median", "min", "max"} in milliseconds and "runs", for JSON reports.
    pub fn ms_json(&self) -> serde_json::Value {
        serde_json::json!({
            "median": self.median * 1e3,
            "min": self.min * 1e3,
            "max": self.max * 1e3,
            "runs": self.runs,
        })
    }

    pub fn from_samples(samples: &[f64]) -> TimeStats {
        let mut s = samples.to_vec();
        s.sort_by(|a, b| a.total_cmp(b));
        let n = s.len();
        if n == 0 {
            return TimeStats::default();
        }
        let median = if n % 2 == 1 {
            s[n / 2]
        } else {
            0.5 * (s[n / 2 - 1] + s[n / 2])
        };
        TimeStats {
            median,
            min: s[0],
            max: s[n - 1],
            runs: n,
        }
    }
}

/// One timed variant.
#[derive(Clone, Debug)]
pub struct BenchReport {
    /// Which kernel and variant, e.g. "forward tiled".
    pub variant: String,
    pub shape: String,
    pub time: TimeStats,
    pub cost: Cost,
    pub method: TimingMethod,
    /// Scratch memory the variant needs beyond its inputs and outputs, where that is the point.
    pub extra_bytes: Option<u64>,
}

impl BenchReport {
    pub fn gflops(&self) -> f64 {
        self.cost.flops as f64 / self.time.median / 1e9
    }

    pub fn gbps(&self) -> f64 {
        self.cost.bytes as f64 / self.time.median / 1e9
    }
}

/// Times `dispatches` as one unit: `opts.warmup` unrecorded runs, then `opts.runs` runs whose
/// per-dispatch GPU times are summed per run.
pub fn time(gpu: &Gpu, dispatches: &[Dispatch], opts: &BenchOptions) -> Result<TimeStats> {
    crate::gpu::block_on("timing kernels", time_async(gpu, dispatches, opts))
}

/// `time`, awaited (how a browser times: its GPU answers from the event loop).
pub async fn time_async(
    gpu: &Gpu,
    dispatches: &[Dispatch],
    opts: &BenchOptions,
) -> Result<TimeStats> {
    for _ in 0..opts.warmup {
        gpu.run_async(dispatches).await?;
    }
    let mut samples = Vec::with_capacity(opts.runs);
    for _ in 0..opts.runs.max(1) {
        let t = gpu.profile_async(dispatches).await?;
        samples.push(t.iter().sum());
    }
    Ok(TimeStats::from_samples(&samples))
}

/// Times one variant and wraps it in a report; the cost is the sum over its dispatches.
pub fn bench_one(
    gpu: &Gpu,
    opts: &BenchOptions,
    variant: &str,
    shape: &str,
    dispatches: &[Dispatch],
) -> Result<BenchReport> {
    let time = time(gpu, dispatches, opts)?;
    let cost = dispatches.iter().fold(Cost::default(), |c, d| Cost {
        flops: c.flops + d.cost.flops,
        bytes: c.bytes + d.cost.bytes,
    });
    Ok(BenchReport {
        variant: variant.to_string(),
        shape: shape.to_string(),
        time,
        cost,
        method: gpu.timing_method(),
        extra_bytes: None,
    })
}
