//! A `Dispatch` is one compute dispatch with everything bound: created once, recorded many times.

use wgpu::util::DeviceExt;

use super::{Gpu, KernelSpec, View};
use crate::error::{Error, Result};

/// Work done by one dispatch, for GFLOP/s and GB/s figures.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Cost {
    pub flops: u64,
    /// Bytes a perfect kernel would move to and from memory.
    pub bytes: u64,
}

/// A ready-to-record compute dispatch.
#[derive(Clone, Debug)]
pub struct Dispatch {
    /// "file.entry", used in labels and profiles.
    pub name: String,
    pub pipeline: wgpu::ComputePipeline,
    pub bind_group: wgpu::BindGroup,
    pub workgroups: [u32; 3],
    /// The uniform params buffer (binding 0); `Gpu::update_params` rewrites it between steps.
    pub params: wgpu::Buffer,
    pub cost: Cost,
}

/// Splits `n` workgroups over x and y so that neither exceeds `max_per_dim`. Shaders recover the
/// linear index as `wid.x + wid.y * nwg.x` and return when it is `>= n`.
pub fn grid(n: u32, max_per_dim: u32) -> [u32; 3] {
    let n = n.max(1);
    if n <= max_per_dim {
        [n, 1, 1]
    } else {
        let y = n.div_ceil(max_per_dim);
        [n.div_ceil(y), y, 1]
    }
}

impl Gpu {
    /// Binds `args` (after a fresh uniform holding `params`) for `spec` and returns the dispatch.
    /// Checks the argument count, each binding against the device's size and alignment limits,
    /// and the workgroup counts against the per-dimension limit.
    pub fn dispatch(
        &self,
        spec: &KernelSpec,
        constants: &[(&str, f64)],
        params: &[u8],
        args: &[&View],
        workgroups: [u32; 3],
        cost: Cost,
    ) -> Result<Dispatch> {
        let name = spec.name();
        self.check_args(&name, spec, args)?;
        let max = self.limits.max_compute_workgroups_per_dimension;
        if workgroups.iter().any(|&w| w > max) {
            return Err(Error::invalid(
                &name,
                format!(
                    "dispatch of {workgroups:?} workgroups exceeds the per-dimension limit {max}"
                ),
            ));
        }
        let pipeline = self.pipeline(spec, constants)?;
        let (params, bind_group) = self.bind(&name, spec, params, args)?;
        Ok(Dispatch {
            name,
            pipeline,
            bind_group,
            workgroups,
            params,
            cost,
        })
    }

    /// Checks that `args` are as many as `spec`'s bindings, and each within the device's binding
    /// size and at its storage-offset alignment.
    fn check_args(&self, name: &str, spec: &KernelSpec, args: &[&View]) -> Result<()> {
        if args.len() != spec.bindings.len() {
            return Err(Error::invalid(
                name,
                format!(
                    "expects {} buffers, got {}",
                    spec.bindings.len(),
                    args.len()
                ),
            ));
        }
        let align = self.limits.min_storage_buffer_offset_alignment as u64;
        for a in args {
            if a.bytes() > self.limits.max_storage_buffer_binding_size {
                return Err(Error::TooLarge {
                    tensor: a.name.to_string(),
                    bytes: a.bytes(),
                    limit: "max_storage_buffer_binding_size",
                    max: self.limits.max_storage_buffer_binding_size,
                });
            }
            if a.offset % align != 0 {
                return Err(Error::invalid(
                    name,
                    format!(
                        "tensor {} starts at byte {}, not a multiple of the device's storage \
                         offset alignment {align}",
                        a.name, a.offset
                    ),
                ));
            }
        }
        Ok(())
    }

    /// A uniform buffer holding `params` (padded to 16 bytes) and the bind group of it (binding
    /// 0) and `args` (bindings 1..).
    fn bind(
        &self,
        name: &str,
        spec: &KernelSpec,
        params: &[u8],
        args: &[&View],
    ) -> Result<(wgpu::Buffer, wgpu::BindGroup)> {
        let mut bytes = params.to_vec();
        bytes.resize(bytes.len().div_ceil(16).max(1) * 16, 0);
        let (bgl, _) = self.layout(spec.bindings);
        self.scoped(name, 0, || {
            let params_buf = self
                .device
                .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                    label: Some(name),
                    contents: &bytes,
                    usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
                });
            let mut entries = vec![wgpu::BindGroupEntry {
                binding: 0,
                resource: params_buf.as_entire_binding(),
            }];
            for (i, (a, b)) in args.iter().zip(spec.bindings).enumerate() {
                entries.push(wgpu::BindGroupEntry {
                    binding: b.number(i),
                    resource: a.binding(),
                });
            }
            let bind_group = self.device.create_bind_group(&wgpu::BindGroupDescriptor {
                label: Some(name),
                layout: &bgl,
                entries: &entries,
            });
            (params_buf, bind_group)
        })
    }

    /// Rewrites a dispatch's params (queued; takes effect at the next submission).
    pub fn update_params(&self, dispatch: &Dispatch, params: &[u8]) {
        self.queue.write_buffer(&dispatch.params, 0, params);
    }

    /// Records `dispatches` into one compute pass of `encoder`. wgpu orders dispatches that touch
    /// the same storage buffers, so no explicit barriers are needed.
    pub fn record(&self, encoder: &mut wgpu::CommandEncoder, dispatches: &[Dispatch]) {
        let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: Some("shaderformer"),
            timestamp_writes: None,
        });
        for d in dispatches {
            pass.set_pipeline(&d.pipeline);
            pass.set_bind_group(0, &d.bind_group, &[]);
            pass.dispatch_workgroups(d.workgroups[0], d.workgroups[1], d.workgroups[2]);
        }
    }

    /// Records, submits and waits for `dispatches`.
    pub fn run(&self, dispatches: &[Dispatch]) -> Result<()> {
        self.submit(dispatches)?;
        self.wait()
    }

    /// `run`, awaited (in a browser the queue's completion arrives from the event loop).
    pub async fn run_async(&self, dispatches: &[Dispatch]) -> Result<()> {
        self.submit(dispatches)?;
        self.wait_async().await
    }

    /// `run_async` inside a validation scope that is awaited: a dispatch the device refuses fails
    /// here, by name. In a browser a pipeline's creation error reaches only whoever built it
    /// first (the pipeline cache hands the same invalid pipeline to later builders), so a
    /// candidate measured with it must be refused by its run, not by a later, unrelated check.
    pub async fn run_checked_async(&self, dispatches: &[Dispatch]) -> Result<()> {
        let scope = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let ran = self.run_async(dispatches).await;
        if let Some(e) = scope.pop().await {
            return Err(Error::Validation {
                context: dispatches
                    .first()
                    .map_or("run".to_string(), |d| d.name.clone()),
                message: super::first_line(&e.to_string()),
            });
        }
        ran
    }

    /// Records and submits `dispatches` without waiting.
    pub fn submit(&self, dispatches: &[Dispatch]) -> Result<()> {
        let context = dispatches
            .first()
            .map_or("submit".to_string(), |d| d.name.clone());
        self.scoped(&context, 0, || {
            let mut encoder = self
                .device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                    label: Some(&context),
                });
            self.record(&mut encoder, dispatches);
            self.queue.submit([encoder.finish()]);
        })
    }
}
