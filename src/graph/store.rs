//! The GPU tensors that outlive any one graph: parameters and, for training, their gradients and
//! AdamW moments, indexed by parameter number.
//!
//! A tensor larger than the device's largest storage binding (GPT-2's token embedding is 154 MB
//! in f32; many adapters bind at most 128 MiB) is stored as row chunks, each its own buffer; the
//! kernels that touch such tensors (embedding, lm head, optimizer) take the chunks one by one.

use crate::error::{Error, Result};
use crate::gpu::{DType, Gpu, View};

pub struct ParamStore {
    pub names: Vec<String>,
    pub shapes: Vec<Vec<usize>>,
    /// Row chunks of each parameter (one chunk unless the tensor exceeds a binding).
    pub params: Vec<Vec<View>>,
    pub grads: Vec<Vec<View>>,
    pub m: Vec<Vec<View>>,
    pub v: Vec<Vec<View>>,
    /// Key and value caches of each layer for decoding, (B, NH, Tmax, HS) each.
    pub kv: Vec<[View; 2]>,
}

/// Rows per chunk for a (rows, cols) tensor of `dtype` so that each chunk holds at most `limit`
/// bytes.
fn rows_per_chunk(name: &str, shape: &[usize], dtype: DType, limit: u64) -> Result<usize> {
    let rows = shape.first().copied().unwrap_or(1);
    let row_bytes = (shape.iter().skip(1).product::<usize>() as u64 * dtype.size()).max(1);
    let fit = (limit / row_bytes) as usize;
    if fit == 0 {
        return Err(Error::TooLarge {
            tensor: name.to_string(),
            bytes: row_bytes,
            limit: "max_storage_buffer_binding_size (one row)",
            max: limit,
        });
    }
    Ok(fit.min(rows).max(1))
}

/// Splits `data` (row-major, `shape`) into row chunks and uploads them as `dtype`.
fn upload_chunks(
    gpu: &Gpu,
    name: &str,
    shape: &[usize],
    data: &[f32],
    dtype: DType,
    limit: u64,
) -> Result<Vec<View>> {
    let rows = shape.first().copied().unwrap_or(1).max(1);
    let cols = data.len() / rows;
    let per = rows_per_chunk(name, shape, dtype, limit)?;
    let mut out = Vec::new();
    for (k, r0) in (0..rows).step_by(per).enumerate() {
        let r1 = (r0 + per).min(rows);
        let part = &data[r0 * cols..r1 * cols];
        let label = if per >= rows {
            name.to_string()
        } else {
            format!("{name}[chunk {k}]")
        };
        out.push(match dtype {
            DType::F32 => gpu.upload_f32(&label, part)?,
            DType::F16 => {
                let h: Vec<half::f16> = part.iter().map(|&x| half::f16::from_f32(x)).collect();
                gpu.upload(&label, DType::F16, &h)?
            }
            other => {
                return Err(Error::invalid(
                    name,
                    format!("parameters cannot be stored as {}", other.name()),
                ));
            }
        });
    }
    Ok(out)
}

fn zeros_like(gpu: &Gpu, prefix: &str, chunks: &[View]) -> Result<Vec<View>> {
    chunks
        .iter()
        .map(|c| gpu.zeros(&format!("{prefix}.{}", c.name), DType::F32, c.len))
        .collect()
}

impl ParamStore {
    /// Uploads `values` (f32, in `specs` order: name and shape); with `train`, also zeroed
    /// gradients and AdamW moments with the same chunking.
    pub fn new(
        gpu: &Gpu,
        specs: &[(String, Vec<usize>)],
        values: &[Vec<f32>],
        train: bool,
    ) -> Result<Self> {
        Self::with_dtype(gpu, specs, values, train, DType::F32)
    }

    /// Like `new`, with every tensor of two or more dimensions (the weights) stored as `dtype`
    /// (f32 or f16); vectors stay f32. Inference only when `dtype` is not f32.
    pub fn with_dtype(
        gpu: &Gpu,
        specs: &[(String, Vec<usize>)],
        values: &[Vec<f32>],
        train: bool,
        dtype: DType,
    ) -> Result<Self> {
        Self::build(gpu, specs, values, train, dtype, &|_| u64::MAX)
    }

    /// Like `with_dtype`, splitting tensor i into row chunks of at most `chunk_limit(i)` bytes
    /// (and never more than the device's binding limit). Small limits exercise split tensors in
    /// tests.
    pub fn build(
        gpu: &Gpu,
        specs: &[(String, Vec<usize>)],
        values: &[Vec<f32>],
        train: bool,
        dtype: DType,
        chunk_limit: &dyn Fn(usize) -> u64,
    ) -> Result<Self> {
        if dtype == DType::F16 && !gpu.has_f16() {
            return Err(Error::invalid(
                "--dtype f16",
                format!(
                    "the adapter {} lacks the SHADER_F16 feature",
                    gpu.adapter_name()
                ),
            ));
        }
        assert!(
            !(train && dtype != DType::F32),
            "training keeps f32 parameters"
        );
        let mut s = ParamStore {
            names: Vec::new(),
            shapes: Vec::new(),
            params: Vec::new(),
            grads: Vec::new(),
            m: Vec::new(),
            v: Vec::new(),
            kv: Vec::new(),
        };
        // What the whole store needs, to say so if the device runs out of memory part way.
        let copies = if train { 4 } else { 1 };
        let total: u64 = specs
            .iter()
            .map(|(_, shape)| {
                let dt = if shape.len() >= 2 { dtype } else { DType::F32 };
                let n: usize = shape.iter().product();
                n as u64 * dt.size() * copies
            })
            .sum();
        let out_of_memory = |e: Error, s: &ParamStore| match e {
            Error::OutOfMemory { context, .. } => Error::OutOfMemory {
                context: format!(
                    "{context}: the model needs {:.1} MiB for parameters{}, and the device ran out \
                     after {:.1} MiB",
                    total as f64 / 1048576.0,
                    if train {
                        ", gradients and AdamW moments"
                    } else {
                        ""
                    },
                    s.bytes() as f64 / 1048576.0
                ),
                bytes: total,
            },
            other => other,
        };
        for (i, ((name, shape), data)) in specs.iter().zip(values).enumerate() {
            let dt = if shape.len() >= 2 { dtype } else { DType::F32 };
            let limit = chunk_limit(i).min(gpu.max_binding());
            let chunks = upload_chunks(gpu, name, shape, data, dt, limit)
                .map_err(|e| out_of_memory(e, &s))?;
            if train {
                let zeros = |prefix| zeros_like(gpu, prefix, &chunks);
                let (g, m, v) = (zeros("d"), zeros("m"), zeros("v"));
                s.grads.push(g.map_err(|e| out_of_memory(e, &s))?);
                s.m.push(m.map_err(|e| out_of_memory(e, &s))?);
                s.v.push(v.map_err(|e| out_of_memory(e, &s))?);
            }
            s.params.push(chunks);
            s.names.push(name.clone());
            s.shapes.push(shape.clone());
        }
        Ok(s)
    }

    /// Allocates the KV caches for decoding: `layers` pairs of (B, NH, Tmax, HS) in `dtype`.
    pub fn alloc_kv(
        &mut self,
        gpu: &Gpu,
        layers: usize,
        shape: [usize; 4],
        dtype: DType,
    ) -> Result<()> {
        let len: usize = shape.iter().product();
        self.kv = (0..layers)
            .map(|l| {
                Ok([
                    gpu.zeros(&format!("h.{l}.k_cache"), dtype, len)?,
                    gpu.zeros(&format!("h.{l}.v_cache"), dtype, len)?,
                ])
            })
            .collect::<Result<_>>()?;
        Ok(())
    }

    /// Reads whole tensors (chunks joined) back as f32.
    pub fn read(gpu: &Gpu, list: &[Vec<View>]) -> Result<Vec<Vec<f32>>> {
        list.iter()
            .map(|chunks| Self::read_chunks(gpu, chunks))
            .collect()
    }

    /// Reads one tensor's chunks (f32 or f16) back as one f32 vector.
    pub fn read_chunks(gpu: &Gpu, chunks: &[View]) -> Result<Vec<f32>> {
        let mut out = Vec::new();
        for c in chunks {
            match c.dtype {
                DType::F16 => {
                    let h: Vec<half::f16> = bytemuck::pod_collect_to_vec(&gpu.read_bytes(c)?);
                    out.extend(h.iter().map(|x| x.to_f32()));
                }
                _ => out.extend(gpu.read_f32(c)?),
            }
        }
        Ok(out)
    }

    /// Overwrites whole f32 tensors (split across their chunks).
    pub fn write(gpu: &Gpu, list: &[Vec<View>], values: &[Vec<f32>]) -> Result<()> {
        for (chunks, data) in list.iter().zip(values) {
            let mut at = 0;
            for c in chunks {
                gpu.write(c, &data[at..at + c.len])?;
                at += c.len;
            }
        }
        Ok(())
    }

    pub fn read_params(&self, gpu: &Gpu) -> Result<Vec<Vec<f32>>> {
        Self::read(gpu, &self.params)
    }

    pub fn bytes(&self) -> u64 {
        [&self.params, &self.grads, &self.m, &self.v]
            .iter()
            .flat_map(|l| l.iter().flatten())
            .map(|v| v.bytes())
            .sum()
    }
}
