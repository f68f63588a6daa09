//! Buffers and views. A `View` is a typed window (offset, length) onto a `wgpu::Buffer`: a tensor
//! of its own, or one region of a buffer the memory planner shares among many tensors.

use std::sync::Arc;

use wgpu::util::DeviceExt;

use super::Gpu;
use crate::error::{Error, Result};

/// Element types stored in GPU buffers. f16 and bf16 are stored two to a 32-bit word (bf16 as
/// the upper halves of f32 patterns, read and written through u32 words: convert.wgsl).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F16,
    BF16,
    U32,
    I32,
}

impl DType {
    pub fn size(self) -> u64 {
        match self {
            DType::F16 | DType::BF16 => 2,
            _ => 4,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::U32 => "u32",
            DType::I32 => "i32",
        }
    }
}

/// A typed window onto a GPU buffer: `len` elements of `dtype` starting `offset` bytes in.
#[derive(Clone, Debug)]
pub struct View {
    pub buffer: wgpu::Buffer,
    /// Byte offset; a multiple of the device's storage-offset alignment when bound.
    pub offset: u64,
    /// Number of elements.
    pub len: usize,
    pub dtype: DType,
    /// The tensor's name, for error messages and labels.
    pub name: Arc<str>,
}

/// Rounds `bytes` up to wgpu's copy and binding granularity (4 bytes).
pub(crate) fn padded(bytes: u64) -> u64 {
    bytes.div_ceil(4).max(1) * 4
}

impl View {
    /// Bytes covered by the view, padded to a whole number of 32-bit words.
    pub fn bytes(&self) -> u64 {
        padded(self.len as u64 * self.dtype.size())
    }

    /// A sub-view of `len` elements starting `start` elements in (for copies and readback; a
    /// binding also needs its byte offset aligned to the device's storage-offset alignment).
    pub fn slice(&self, start: usize, len: usize, name: impl Into<Arc<str>>) -> Result<View> {
        if start.checked_add(len).is_none_or(|end| end > self.len) {
            return Err(Error::Shape {
                kernel: "slice".into(),
                tensor: self.name.to_string(),
                expected: format!("at least {} elements", start.saturating_add(len)),
                got: format!("{} elements", self.len),
            });
        }
        Ok(View {
            buffer: self.buffer.clone(),
            offset: self.offset + start as u64 * self.dtype.size(),
            len,
            dtype: self.dtype,
            name: name.into(),
        })
    }

    pub(crate) fn binding(&self) -> wgpu::BindingResource<'_> {
        wgpu::BindingResource::Buffer(wgpu::BufferBinding {
            buffer: &self.buffer,
            offset: self.offset,
            size: wgpu::BufferSize::new(self.bytes()),
        })
    }
}

const STORAGE: wgpu::BufferUsages = wgpu::BufferUsages::STORAGE
    .union(wgpu::BufferUsages::COPY_SRC)
    .union(wgpu::BufferUsages::COPY_DST);

impl Gpu {
    /// Checks that `bytes` can be one buffer and one binding on this device.
    pub fn check_fits(&self, name: &str, bytes: u64) -> Result<()> {
        if bytes > self.limits.max_buffer_size {
            return Err(Error::TooLarge {
                tensor: name.to_string(),
                bytes,
                limit: "max_buffer_size",
                max: self.limits.max_buffer_size,
            });
        }
        if bytes > self.limits.max_storage_buffer_binding_size {
            return Err(Error::TooLarge {
                tensor: name.to_string(),
                bytes,
                limit: "max_storage_buffer_binding_size",
                max: self.limits.max_storage_buffer_binding_size,
            });
        }
        Ok(())
    }

    /// A storage buffer of `bytes` (which may hold many tensors), usable as a copy source and
    /// destination. Fails with a typed error when it exceeds a device limit or memory.
    pub fn create_storage(&self, name: &str, bytes: u64) -> Result<wgpu::Buffer> {
        let bytes = padded(bytes);
        if bytes > self.limits.max_buffer_size {
            return Err(Error::TooLarge {
                tensor: name.to_string(),
                bytes,
                limit: "max_buffer_size",
                max: self.limits.max_buffer_size,
            });
        }
        self.scoped(name, bytes, || {
            self.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(name),
                size: bytes,
                usage: STORAGE,
                mapped_at_creation: false,
            })
        })
    }

    /// A zero-filled tensor of its own.
    pub fn zeros(&self, name: &str, dtype: DType, len: usize) -> Result<View> {
        let bytes = padded(len as u64 * dtype.size());
        self.check_fits(name, bytes)?;
        let buffer = self.create_storage(name, bytes)?;
        Ok(View {
            buffer,
            offset: 0,
            len,
            dtype,
            name: name.into(),
        })
    }

    /// A tensor of its own holding `data`.
    pub fn upload<T: bytemuck::Pod>(&self, name: &str, dtype: DType, data: &[T]) -> Result<View> {
        let mut bytes: Vec<u8> = bytemuck::cast_slice(data).to_vec();
        let len = bytes.len() / dtype.size() as usize;
        bytes.resize(padded(bytes.len() as u64) as usize, 0);
        self.check_fits(name, bytes.len() as u64)?;
        let buffer = self.scoped(name, bytes.len() as u64, || {
            self.device
                .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                    label: Some(name),
                    contents: &bytes,
                    usage: STORAGE,
                })
        })?;
        Ok(View {
            buffer,
            offset: 0,
            len,
            dtype,
            name: name.into(),
        })
    }

    /// A uniform buffer of its own holding `data` (a struct of u32-sized fields), rewritten with
    /// `write` or by copies into it (`kernels::step` holds the one struct bound this way).
    pub fn uniform(&self, name: &str, data: &[u32]) -> Result<View> {
        let bytes: &[u8] = bytemuck::cast_slice(data);
        let buffer = self.scoped(name, bytes.len() as u64, || {
            self.device
                .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                    label: Some(name),
                    contents: bytes,
                    usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
                })
        })?;
        Ok(View {
            buffer,
            offset: 0,
            len: data.len(),
            dtype: DType::U32,
            name: name.into(),
        })
    }

    pub fn upload_f32(&self, name: &str, data: &[f32]) -> Result<View> {
        self.upload(name, DType::F32, data)
    }

    pub fn upload_u32(&self, name: &str, data: &[u32]) -> Result<View> {
        self.upload(name, DType::U32, data)
    }

    /// Overwrites the view's contents (queued; ordered before the next submission).
    pub fn write<T: bytemuck::Pod>(&self, view: &View, data: &[T]) -> Result<()> {
        let mut bytes: Vec<u8> = bytemuck::cast_slice(data).to_vec();
        if bytes.len() as u64 != view.len as u64 * view.dtype.size() {
            return Err(Error::Shape {
                kernel: "write".into(),
                tensor: view.name.to_string(),
                expected: format!("{} bytes", view.len as u64 * view.dtype.size()),
                got: format!("{} bytes", bytes.len()),
            });
        }
        bytes.resize(view.bytes() as usize, 0);
        self.queue.write_buffer(&view.buffer, view.offset, &bytes);
        Ok(())
    }

    /// Copies the view back to the CPU (waits for all queued work).
    pub fn read_bytes(&self, view: &View) -> Result<Vec<u8>> {
        super::block_on("a readback", self.read_bytes_async(view))
    }

    /// `read_bytes`, awaited: in a browser the mapping completes from the event loop.
    pub async fn read_bytes_async(&self, view: &View) -> Result<Vec<u8>> {
        let bytes = view.bytes();
        let staging = self.scoped(&view.name, bytes, || {
            self.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("readback"),
                size: bytes,
                usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            })
        })?;
        let mut enc = self
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("readback"),
            });
        enc.copy_buffer_to_buffer(&view.buffer, view.offset, &staging, 0, bytes);
        self.scoped(&view.name, 0, || self.queue.submit([enc.finish()]))?;
        let data = self.map_read_async(&staging).await?;
        let n = (view.len as u64 * view.dtype.size()) as usize;
        Ok(data[..n].to_vec())
    }

    /// Maps a MAP_READ buffer, waits, and returns its contents.
    pub fn map_read(&self, staging: &wgpu::Buffer) -> Result<Vec<u8>> {
        super::block_on("a readback", self.map_read_async(staging))
    }

    /// `map_read`, awaited. Natively the mapping is driven here by polling the device (so the
    /// future is ready when first polled); in a browser the event loop completes it.
    pub async fn map_read_async(&self, staging: &wgpu::Buffer) -> Result<Vec<u8>> {
        let slice = staging.slice(..);
        let done = super::Signal::new();
        let done2 = done.clone();
        slice.map_async(wgpu::MapMode::Read, move |r| done2.set(r.is_ok()));
        #[cfg(not(target_arch = "wasm32"))]
        self.drive_until(&done)?;
        let mapped = done.wait().await;
        self.check("readback")?;
        if !mapped {
            return Err(Error::DeviceLost {
                reason: "buffer mapping failed".into(),
            });
        }
        let data = slice
            .get_mapped_range()
            .map_err(|e| Error::Validation {
                context: "readback".into(),
                message: e.to_string(),
            })?
            .to_vec();
        staging.unmap();
        Ok(data)
    }

    /// Waits for the queue, then for `done`'s callback: a bounded time, checking for a lost
    /// device, never spinning (the queue is idle; the callback runs at once unless another
    /// thread's poll holds it).
    #[cfg(not(target_arch = "wasm32"))]
    fn drive_until(&self, done: &super::Signal<bool>) -> Result<()> {
        self.wait()?;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while done.peek().is_none() {
            self.check("readback")?;
            if std::time::Instant::now() > deadline {
                return Err(Error::DeviceLost {
                    reason: "the queue is idle but a readback buffer was not mapped within 5 s"
                        .into(),
                });
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
            self.device
                .poll(wgpu::PollType::Poll)
                .map_err(|e| Error::DeviceLost {
                    reason: e.to_string(),
                })?;
        }
        Ok(())
    }

    pub fn read_f32(&self, view: &View) -> Result<Vec<f32>> {
        super::block_on("a readback", self.read_f32_async(view))
    }

    pub async fn read_f32_async(&self, view: &View) -> Result<Vec<f32>> {
        if view.dtype != DType::F32 {
            return Err(Error::Shape {
                kernel: "read_f32".into(),
                tensor: view.name.to_string(),
                expected: "dtype f32".into(),
                got: format!("dtype {}", view.dtype.name()),
            });
        }
        Ok(bytemuck::pod_collect_to_vec(
            &self.read_bytes_async(view).await?,
        ))
    }

    pub fn read_u32(&self, view: &View) -> Result<Vec<u32>> {
        Ok(bytemuck::pod_collect_to_vec(&self.read_bytes(view)?))
    }
}
