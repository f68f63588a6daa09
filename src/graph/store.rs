//! The GPU tensors that outlive any one graph: parameters and, for training, their gradients and
//! AdamW moments, indexed by parameter number.
//!
//! Flat layout (llm.c's): the tensors of each class (weights, vectors) are packed one after the
//! other into a few large buffers, each at most the device's largest storage binding, every tensor
//! starting at the device's storage-offset alignment; each tensor is a view into them. Gradients
//! and moments share the parameters' layout, so zeroing, the gradient norm and AdamW run over
//! whole buffers (`spans`) in a handful of dispatches instead of one or more per tensor.
//!
//! A tensor larger than the device's largest storage binding (GPT-2's token embedding is 154 MB
//! in f32; many adapters bind at most 128 MiB) is stored as row chunks, each in a buffer of its
//! own or shared with others; the kernels that touch such tensors (embedding, lm head, optimizer)
//! take the chunks one by one.

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

/// The classes of parameters, each laid out in flat buffers of its own: weights (two or more
/// dimensions: they take weight decay, and may be stored as f16 for inference) and vectors
/// (biases and LayerNorm parameters: no decay, always f32), each either trained or frozen (the
/// base model under a LoRA adapter: no gradients, no moments). AdamW then covers each trained
/// class with a few dispatches of one weight-decay setting.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Class {
    Weights,
    Vectors,
    FrozenWeights,
    FrozenVectors,
}

impl Class {
    const ALL: [Class; 4] = [
        Class::Weights,
        Class::Vectors,
        Class::FrozenWeights,
        Class::FrozenVectors,
    ];

    fn of(shape: &[usize], trained: bool) -> Class {
        match (shape.len() >= 2, trained) {
            (true, true) => Class::Weights,
            (false, true) => Class::Vectors,
            (true, false) => Class::FrozenWeights,
            (false, false) => Class::FrozenVectors,
        }
    }

    fn dtype(self, weights: DType) -> DType {
        match self {
            Class::Weights | Class::FrozenWeights => weights,
            Class::Vectors | Class::FrozenVectors => DType::F32,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Class::Weights => "weights",
            Class::Vectors => "vectors",
            Class::FrozenWeights => "frozen_weights",
            Class::FrozenVectors => "frozen_vectors",
        }
    }

    fn frozen(self) -> bool {
        matches!(self, Class::FrozenWeights | Class::FrozenVectors)
    }
}

/// One tensor chunk's place in the flat layout: flat buffer `buffer`, `offset` bytes in.
struct Place {
    buffer: usize,
    offset: u64,
    len: usize,
    label: String,
}

/// The flat layout of one class of tensors (one dtype): row chunks packed in order into buffers
/// of at most `cap` bytes, each chunk starting at a multiple of `align` bytes. Returns the places
/// of each tensor's chunks and the bytes of each buffer.
fn pack(
    specs: &[(usize, &str, &[usize])],
    dtype: DType,
    cap: u64,
    align: u64,
    chunk_limit: &dyn Fn(usize) -> u64,
) -> Result<(Vec<Vec<Place>>, Vec<u64>)> {
    let mut places = Vec::new();
    let mut sizes: Vec<u64> = Vec::new();
    for &(i, name, shape) in specs {
        let rows = shape.first().copied().unwrap_or(1).max(1);
        let cols = shape.iter().product::<usize>() / rows;
        let per = rows_per_chunk(name, shape, dtype, chunk_limit(i).min(cap))?;
        let mut chunks = Vec::new();
        for (k, r0) in (0..rows).step_by(per).enumerate() {
            let len = (per.min(rows - r0)) * cols;
            let bytes = (len as u64 * dtype.size()).div_ceil(4).max(1) * 4;
            let at = sizes.last().map(|&s| s.next_multiple_of(align));
            let (buffer, offset) = match at {
                Some(at) if at + bytes <= cap => (sizes.len() - 1, at),
                _ => {
                    sizes.push(0);
                    (sizes.len() - 1, 0)
                }
            };
            sizes[buffer] = offset + bytes;
            let label = if per >= rows {
                name.to_string()
            } else {
                format!("{name}[chunk {k}]")
            };
            chunks.push(Place {
                buffer,
                offset,
                len,
                label,
            });
        }
        places.push(chunks);
    }
    Ok((places, sizes))
}

/// Views at `places` onto the flat buffers `buffers`, their names prefixed with `prefix`.
fn views_at(buffers: &[wgpu::Buffer], places: &[Place], dtype: DType, prefix: &str) -> Vec<View> {
    places
        .iter()
        .map(|p| View {
            buffer: buffers[p.buffer].clone(),
            offset: p.offset,
            len: p.len,
            dtype,
            name: format!("{prefix}{}", p.label).into(),
        })
        .collect()
}

/// Merges views into the flat buffers of a `ParamStore` into as few views as cover them: views of
/// the same buffer that follow one another with less than `align` bytes between them (alignment
/// padding, which holds zeros) become one view over the whole range. Buffers keep the order of
/// their first appearance in `views`, and the views of one buffer are taken in offset order, so
/// lists laid out alike (parameters, gradients, moments) give matching spans.
///
/// Only for views into a store's flat buffers, where every tensor chunk starts at a multiple of
/// `align`: a gap shorter than that cannot hold another tensor.
pub fn spans(views: &[&View], align: u64) -> Vec<View> {
    let mut buffers: Vec<&wgpu::Buffer> = Vec::new();
    let mut sorted: Vec<(usize, &View)> = views
        .iter()
        .map(|v| {
            let b = match buffers.iter().position(|&b| *b == v.buffer) {
                Some(b) => b,
                None => {
                    buffers.push(&v.buffer);
                    buffers.len() - 1
                }
            };
            (b, *v)
        })
        .collect();
    sorted.sort_by_key(|&(b, v)| (b, v.offset));
    let mut out: Vec<(usize, View)> = Vec::new();
    for (b, v) in sorted {
        if let Some((lb, last)) = out.last_mut() {
            let end = last.offset + last.len as u64 * last.dtype.size();
            if *lb == b && last.dtype == v.dtype && v.offset >= end && v.offset - end < align {
                last.len = ((v.offset - last.offset) / v.dtype.size()) as usize + v.len;
                last.name = format!("{} ..", last.name.trim_end_matches(" ..")).into();
                continue;
            }
        }
        out.push((b, v.clone()));
    }
    out.into_iter().map(|(_, v)| v).collect()
}

/// The flat buffers of a store being built, created class by class. Counts what it allocates, so
/// that running out of device memory part way says what the whole store needs.
struct FlatBuffers<'a> {
    gpu: &'a Gpu,
    specs: &'a [(String, Vec<usize>)],
    /// Whether the store is for training, and which parameters are then trained (have
    /// gradients and moments); all of them for inference, which lays them out as trained ones.
    train: bool,
    trained: Vec<bool>,
    /// The dtype of the weights.
    dtype: DType,
    /// Bytes the whole store needs, and bytes allocated so far.
    total: u64,
    allocated: u64,
}

impl<'a> FlatBuffers<'a> {
    fn new(
        gpu: &'a Gpu,
        specs: &'a [(String, Vec<usize>)],
        (train, trained): (bool, Vec<bool>),
        dtype: DType,
    ) -> Self {
        let total: u64 = specs
            .iter()
            .zip(&trained)
            .map(|((_, shape), &trained)| {
                let n: usize = shape.iter().product();
                let copies = if train && trained { 4 } else { 1 };
                n as u64 * Class::of(shape, trained).dtype(dtype).size() * copies
            })
            .sum();
        FlatBuffers {
            gpu,
            specs,
            train,
            trained,
            dtype,
            total,
            allocated: 0,
        }
    }

    /// Packs the tensors of `class` and creates their flat buffers once per prefix (parameters,
    /// then gradients and moments), setting each member's views in the prefix's list of `lists`.
    fn lay_out(
        &mut self,
        class: Class,
        chunk_limit: &dyn Fn(usize) -> u64,
        prefixes: &[&str],
        lists: &mut [Vec<Vec<View>>],
    ) -> Result<()> {
        let align = (self.gpu.limits.min_storage_buffer_offset_alignment as u64).max(4);
        let members: Vec<(usize, &str, &[usize])> = self
            .specs
            .iter()
            .enumerate()
            .filter(|&(i, (_, shape))| Class::of(shape, self.trained[i]) == class)
            .map(|(i, (name, shape))| (i, name.as_str(), shape.as_slice()))
            .collect();
        let dt = class.dtype(self.dtype);
        let (places, sizes) = pack(&members, dt, self.gpu.max_binding(), align, chunk_limit)?;
        // A frozen class has parameters only.
        let copies = if class.frozen() { 1 } else { prefixes.len() };
        for (prefix, list) in prefixes.iter().zip(lists).take(copies) {
            let mut buffers = Vec::with_capacity(sizes.len());
            for (b, &bytes) in sizes.iter().enumerate() {
                buffers.push(self.create(&format!("{prefix}{}.flat{b}", class.name()), bytes)?);
            }
            for (&(i, ..), places) in members.iter().zip(&places) {
                list[i] = views_at(&buffers, places, dt, prefix);
            }
        }
        Ok(())
    }

    fn create(&mut self, label: &str, bytes: u64) -> Result<wgpu::Buffer> {
        let buffer = self
            .gpu
            .create_storage(label, bytes)
            .map_err(|e| self.out_of_memory(e))?;
        self.allocated += bytes;
        Ok(buffer)
    }

    /// An out-of-memory error with what the store needs and what was allocated before it ran out.
    fn out_of_memory(&self, e: Error) -> Error {
        match e {
            Error::OutOfMemory { context, .. } => Error::OutOfMemory {
                context: format!(
                    "{context}: the model needs {:.1} MiB for parameters{}, and the device ran out \
                     after {:.1} MiB",
                    self.total as f64 / 1048576.0,
                    if self.train {
                        ", gradients and AdamW moments"
                    } else {
                        ""
                    },
                    self.allocated as f64 / 1048576.0
                ),
                bytes: self.total,
            },
            other => other,
        }
    }
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
        Self::build_trained(gpu, specs, values, train.then_some(&[]), dtype, chunk_limit)
    }

    /// For training only some parameters (the adapter on a frozen base): parameter i has
    /// gradients and moments when `trained[i]`; the others have empty lists of them.
    pub fn with_frozen(
        gpu: &Gpu,
        specs: &[(String, Vec<usize>)],
        values: &[Vec<f32>],
        trained: &[bool],
    ) -> Result<Self> {
        Self::build_trained(gpu, specs, values, Some(trained), DType::F32, &|_| u64::MAX)
    }

    /// `build`, training the parameters `trained` says (every one when it is empty), or none
    /// when it is None.
    fn build_trained(
        gpu: &Gpu,
        specs: &[(String, Vec<usize>)],
        values: &[Vec<f32>],
        trained: Option<&[bool]>,
        dtype: DType,
        chunk_limit: &dyn Fn(usize) -> u64,
    ) -> Result<Self> {
        let train = trained.is_some();
        let trained = match trained {
            None | Some([]) => vec![true; specs.len()],
            Some(t) => {
                assert_eq!(t.len(), specs.len(), "one trained flag per parameter");
                t.to_vec()
            }
        };
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
        let mut flat = FlatBuffers::new(gpu, specs, (train, trained), dtype);
        // Parameters, then (training) gradients and the two moments, all with the same layout.
        let prefixes: &[&str] = if train {
            &["", "d.", "m.", "v."]
        } else {
            &[""]
        };
        let mut lists = vec![vec![Vec::new(); specs.len()]; prefixes.len()];
        for class in Class::ALL {
            flat.lay_out(class, chunk_limit, prefixes, &mut lists)?;
        }
        let mut lists = lists.into_iter();
        let s = ParamStore {
            names: specs.iter().map(|(name, _)| name.clone()).collect(),
            shapes: specs.iter().map(|(_, shape)| shape.clone()).collect(),
            params: lists.next().unwrap_or_default(),
            grads: lists.next().unwrap_or_default(),
            m: lists.next().unwrap_or_default(),
            v: lists.next().unwrap_or_default(),
            kv: Vec::new(),
        };
        // New buffers hold zeros: gradients and moments start at zero, and so does the padding.
        s.upload(gpu, values)?;
        Ok(s)
    }

    /// Writes each parameter's f32 `values` into its chunks, converted to the chunks' dtype.
    fn upload(&self, gpu: &Gpu, values: &[Vec<f32>]) -> Result<()> {
        for (chunks, data) in self.params.iter().zip(values) {
            let mut at = 0;
            for c in chunks {
                let part = &data[at..at + c.len];
                match c.dtype {
                    DType::F16 => {
                        let h: Vec<half::f16> =
                            part.iter().map(|&x| half::f16::from_f32(x)).collect();
                        gpu.write(c, &h)?;
                    }
                    _ => gpu.write(c, part)?,
                }
                at += c.len;
            }
        }
        Ok(())
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
        crate::gpu::block_on("reading parameters", Self::read_async(gpu, list))
    }

    /// `read`, awaited.
    pub async fn read_async(gpu: &Gpu, list: &[Vec<View>]) -> Result<Vec<Vec<f32>>> {
        let mut out = Vec::with_capacity(list.len());
        for chunks in list {
            out.push(Self::read_chunks_async(gpu, chunks).await?);
        }
        Ok(out)
    }

    /// Reads one tensor's chunks (f32, f16 or bf16) back as one f32 vector.
    pub fn read_chunks(gpu: &Gpu, chunks: &[View]) -> Result<Vec<f32>> {
        crate::gpu::block_on("reading a tensor", Self::read_chunks_async(gpu, chunks))
    }

    /// `read_chunks`, awaited.
    pub async fn read_chunks_async(gpu: &Gpu, chunks: &[View]) -> Result<Vec<f32>> {
        let mut out = Vec::new();
        for c in chunks {
            match c.dtype {
                // Two to a word: the padding of an odd length is not a value.
                DType::F16 => {
                    let h: Vec<half::f16> =
                        bytemuck::pod_collect_to_vec(&gpu.read_bytes_async(c).await?);
                    out.extend(h[..c.len].iter().map(|x| x.to_f32()));
                }
                DType::BF16 => {
                    let h: Vec<half::bf16> =
                        bytemuck::pod_collect_to_vec(&gpu.read_bytes_async(c).await?);
                    out.extend(h[..c.len].iter().map(|x| x.to_f32()));
                }
                _ => out.extend(gpu.read_f32_async(c).await?),
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
