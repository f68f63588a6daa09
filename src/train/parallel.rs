//! Data-parallel training over the ranks of a `Comm`: the gradient sum at the executor's seam
//! between backward and update, the checks that keep the ranks in step (same settings, same
//! weights), and the loader states a checkpoint keeps for every rank.

use std::time::{Duration, Instant};

use serde_json::{Map, Value};

use super::TrainConfig;
use crate::dist::Comm;
use crate::error::{Error, Result};
use crate::gpu::{Gpu, View};
use crate::graph::{GradientSync, ParamStore};

/// Floats per bucket of the gradient read-back and reduction (16 MiB): a bucket is read, reduced
/// and written back before the next is read, so host memory stays at a few buckets.
pub const BUCKET: usize = 4 << 20;

/// Time spent in the gradient sum, over the steps synced so far.
#[derive(Clone, Debug, Default)]
pub struct SyncTiming {
    pub steps: u64,
    /// Gradient bytes reduced per step.
    pub bytes: u64,
    /// Waiting for the slowest rank to finish its backward (load imbalance, not transfer).
    pub wait: Duration,
    pub read_back: Duration,
    pub reduce: Duration,
    pub write_back: Duration,
}

impl SyncTiming {
    /// One line: per-step bytes and the mean ms of each part.
    pub fn summary(&self, ms_per_step: f64) -> String {
        let per = |d: Duration| d.as_secs_f64() * 1e3 / self.steps.max(1) as f64;
        let (r, m, w) = (per(self.read_back), per(self.reduce), per(self.write_back));
        let q = per(self.wait);
        let share = |x: f64| 100.0 * x / ms_per_step.max(1e-9);
        format!(
            "gradient sum: {:.2} MB per step; read-back {r:.1} ms ({:.1}%), MPI reduction {m:.1} ms \
             ({:.1}%), write-back {w:.1} ms ({:.1}%) of {ms_per_step:.1} ms per step; waiting for \
             the slowest rank {q:.1} ms ({:.1}%)",
            self.bytes as f64 / 1e6,
            share(r),
            share(m),
            share(w),
            share(q)
        )
    }
}

/// Sums the gradients across ranks: read back bucket by bucket, summed in rank order by
/// `Comm::sum_f32` (the loss scale already divides by the global number of micro-steps, so the
/// sum is the mean), written back. Every rank then holds the same bits.
pub struct GradientSum<'c> {
    pub comm: &'c Comm,
    pub timing: SyncTiming,
}

impl GradientSync for GradientSum<'_> {
    fn sync(&mut self, gpu: &Gpu, grads: &[View], losses: &mut Vec<f32>) -> Result<()> {
        let t = Instant::now();
        self.comm.barrier()?;
        self.timing.wait += t.elapsed();
        let mut bytes = 0;
        for span in grads {
            for start in (0..span.len).step_by(BUCKET) {
                let part = span.slice(start, BUCKET.min(span.len - start), "gradient bucket")?;
                let t0 = Instant::now();
                let mut x = gpu.read_f32(&part)?;
                let t1 = Instant::now();
                self.comm.sum_f32(&mut x)?;
                let t2 = Instant::now();
                gpu.write(&part, &x)?;
                self.timing.read_back += t1 - t0;
                self.timing.reduce += t2 - t1;
                self.timing.write_back += t2.elapsed();
                bytes += part.len as u64 * 4;
            }
        }
        // The writes reach the GPU with the next submission: time them to completion here.
        let t = Instant::now();
        gpu.queue.submit([]);
        gpu.wait()?;
        self.timing.write_back += t.elapsed();
        self.timing.bytes = bytes;
        self.timing.steps += 1;
        // Rank r's micro-step k is global micro-step k·N + r.
        let n = self.comm.size();
        let accum = losses.len();
        let all = self.comm.all_gather_f32(losses)?;
        *losses = (0..accum)
            .flat_map(|k| (0..n).map(move |r| (r, k)))
            .map(|(r, k)| all[r * accum + k])
            .collect();
        Ok(())
    }
}

/// The flag each setting comes from, with its value, for comparing ranks.
fn flags(cfg: &TrainConfig) -> Map<String, Value> {
    let mut m = match serde_json::to_value(cfg.settings()) {
        Ok(Value::Object(m)) => m,
        _ => Map::new(),
    };
    let extra = [
        ("n_layer", Value::from(cfg.n_layer)),
        ("n_head", cfg.n_head.into()),
        ("n_embd", cfg.n_embd.into()),
        ("no_bias", (!cfg.bias).into()),
        (
            "init",
            cfg.init.as_ref().map(|p| p.display().to_string()).into(),
        ),
        (
            "resume",
            cfg.resume.as_ref().map(|p| p.display().to_string()).into(),
        ),
        ("out", cfg.out.display().to_string().into()),
        ("no_reuse", cfg.no_reuse.into()),
    ];
    for (k, v) in extra {
        m.insert(k.to_string(), v);
    }
    m.into_iter()
        .map(|(k, v)| (format!("--{}", k.replace('_', "-")), v))
        .collect()
}

/// Refuses a job whose ranks were started with different settings, naming the first flag that
/// differs and the ranks' values.
pub fn check_same_settings(comm: &Comm, cfg: &TrainConfig) -> Result<()> {
    if comm.size() == 1 {
        return Ok(());
    }
    let mine = flags(cfg);
    let all = comm.all_gather_bytes(&serde_json::to_vec(&mine).expect("JSON of settings"))?;
    let ranks: Vec<Map<String, Value>> = all
        .iter()
        .map(|b| serde_json::from_slice(b).unwrap_or_default())
        .collect();
    for (flag, v0) in &ranks[0] {
        for (r, other) in ranks.iter().enumerate().skip(1) {
            let v = other.get(flag).unwrap_or(&Value::Null);
            if v != v0 {
                return Err(Error::invalid(
                    flag,
                    format!(
                        "the ranks were started with different values: rank 0 has {v0}, rank {r} has {v}"
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// The ranks that differ from rank 0 in `all`, as "rank 1, rank 3".
fn ranks_unlike_root(all: &[Vec<u8>]) -> Option<String> {
    let differ: Vec<String> = all
        .iter()
        .enumerate()
        .skip(1)
        .filter(|(_, b)| *b != &all[0])
        .map(|(r, _)| format!("rank {r}"))
        .collect();
    (!differ.is_empty()).then(|| differ.join(", "))
}

/// Refuses a job whose ranks load different shader sources (another `--shader-dir`, an edited
/// file): their gradients would be summed as if computed alike. Compares the hash of every
/// source as each rank loaded it.
pub fn check_same_shaders(comm: &Comm, gpu: &Gpu) -> Result<()> {
    if comm.size() == 1 {
        return Ok(());
    }
    let all = comm.all_gather_bytes(gpu.tuner.identity().shaders.as_bytes())?;
    let Some(ranks) = ranks_unlike_root(&all) else {
        return Ok(());
    };
    let other = all.iter().find(|b| *b != &all[0]).expect("a rank differs");
    Err(Error::invalid(
        "--shader-dir",
        format!(
            "the ranks load different shader sources: {ranks} (shader hash {}) against rank 0 \
             ({}); start every rank with the same --shader-dir and the same files",
            String::from_utf8_lossy(other),
            String::from_utf8_lossy(&all[0])
        ),
    ))
}

/// Refuses a job whose ranks compute with different kernel variants (tuning choices), naming
/// the ranks and the first problem where they differ.
pub fn check_same_kernels(comm: &Comm, gpu: &Gpu) -> Result<()> {
    if comm.size() == 1 {
        return Ok(());
    }
    let used = gpu.tuner.used();
    let all = comm.all_gather_bytes(&serde_json::to_vec(&used).expect("JSON of kernel choices"))?;
    let Some(ranks) = ranks_unlike_root(&all) else {
        return Ok(());
    };
    let root: std::collections::BTreeMap<String, String> =
        serde_json::from_slice(&all[0]).unwrap_or_default();
    let other = all.iter().find(|b| *b != &all[0]).expect("a rank differs");
    let other: std::collections::BTreeMap<String, String> =
        serde_json::from_slice(other).unwrap_or_default();
    let first = root.iter().find(|(k, v)| other.get(*k) != Some(v)).map_or(
        "a problem only one rank computes".to_string(),
        |(k, v)| {
            format!(
                "{k}: rank 0 uses {v}, {}",
                other.get(k).map_or("the other none", |s| s)
            )
        },
    );
    Err(Error::invalid(
        "kernel tuning",
        format!(
            "the ranks compute with different kernel variants: {ranks} differ from rank 0 \
             ({first}); run every rank on the same kind of adapter, or with --tune off"
        ),
    ))
}

/// A checksum of every parameter's bits (FNV-1a over the f32 words).
pub fn weights_checksum(gpu: &Gpu, store: &ParamStore) -> Result<u64> {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for p in store.read_params(gpu)? {
        for x in p {
            h = (h ^ x.to_bits() as u64).wrapping_mul(0x0100_0000_01b3);
        }
    }
    Ok(h)
}

/// Stops the run when the ranks' weights are not bit-identical, naming the ranks that differ
/// from rank 0. Returns the checksum they share (none for a single rank, which has nothing to
/// compare).
pub fn check_same_weights(
    comm: &Comm,
    gpu: &Gpu,
    store: &ParamStore,
    when: &str,
) -> Result<Option<u64>> {
    if comm.size() == 1 {
        return Ok(None);
    }
    let all = comm.all_gather_u64(weights_checksum(gpu, store)?)?;
    let differ: Vec<String> = all
        .iter()
        .enumerate()
        .filter(|&(_, &h)| h != all[0])
        .map(|(r, h)| format!("rank {r} has {h:016x}"))
        .collect();
    if differ.is_empty() {
        return Ok(Some(all[0]));
    }
    Err(Error::invalid(
        "train",
        format!(
            "the ranks' weights differ {when}: rank 0 has checksum {:016x}, {}",
            all[0],
            differ.join(", ")
        ),
    ))
}

/// Every rank's sum, added in rank order.
pub fn sum_over_ranks(comm: &Comm, x: f64) -> Result<f64> {
    Ok(comm
        .all_gather_u64(x.to_bits())?
        .into_iter()
        .map(f64::from_bits)
        .sum())
}
