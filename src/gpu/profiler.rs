//! Per-dispatch GPU timing: timestamp queries around each dispatch where the adapter has them,
//! wall clock around a submission of each dispatch alone where it does not.

// std's Instant panics in a browser; web_time's is std's natively and performance.now() there.
use web_time::Instant;

use super::{Dispatch, Gpu};
use crate::error::Result;

/// How `Gpu::profile` measured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimingMethod {
    /// GPU timestamps written at the start and end of each dispatch's pass.
    Timestamps,
    /// CPU time around submitting each dispatch alone and waiting (includes submission overhead).
    WallClock,
}

impl TimingMethod {
    pub fn name(self) -> &'static str {
        match self {
            TimingMethod::Timestamps => "timestamps",
            TimingMethod::WallClock => "wall clock",
        }
    }
}

/// Queries per query set allowed by WebGPU.
const MAX_QUERIES: usize = 4096;

impl Gpu {
    pub fn timing_method(&self) -> TimingMethod {
        if self.has_timestamps() {
            TimingMethod::Timestamps
        } else {
            TimingMethod::WallClock
        }
    }

    /// Runs `dispatches` in order, each in its own compute pass, and returns the GPU time of each
    /// in seconds.
    pub fn profile(&self, dispatches: &[Dispatch]) -> Result<Vec<f64>> {
        super::block_on("profiling", self.profile_async(dispatches))
    }

    /// `profile`, awaited (a browser reads timestamps back, or learns the queue is done, from
    /// its event loop).
    pub async fn profile_async(&self, dispatches: &[Dispatch]) -> Result<Vec<f64>> {
        match self.timing_method() {
            TimingMethod::Timestamps => {
                let mut out = Vec::with_capacity(dispatches.len());
                for chunk in dispatches.chunks(MAX_QUERIES / 2) {
                    out.extend(self.profile_timestamps(chunk).await?);
                }
                Ok(out)
            }
            TimingMethod::WallClock => {
                self.wait_async().await?;
                let mut out = Vec::with_capacity(dispatches.len());
                for d in dispatches {
                    let t = Instant::now();
                    self.run_async(std::slice::from_ref(d)).await?;
                    out.push(t.elapsed().as_secs_f64());
                }
                Ok(out)
            }
        }
    }

    async fn profile_timestamps(&self, dispatches: &[Dispatch]) -> Result<Vec<f64>> {
        let n = dispatches.len() as u32 * 2;
        let bytes = n as u64 * 8;
        let (query_set, resolve, staging) = self.scoped("profiler", bytes, || {
            let qs = self.device.create_query_set(&wgpu::QuerySetDescriptor {
                label: Some("profiler"),
                ty: wgpu::QueryType::Timestamp,
                count: n,
            });
            let resolve = self.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("profiler resolve"),
                size: bytes,
                usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
                mapped_at_creation: false,
            });
            let staging = self.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("profiler readback"),
                size: bytes,
                usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            });
            (qs, resolve, staging)
        })?;
        self.scoped("profiler", 0, || {
            let mut enc = self
                .device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                    label: Some("profiler"),
                });
            for (i, d) in dispatches.iter().enumerate() {
                let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                    label: Some(&d.name),
                    timestamp_writes: Some(wgpu::ComputePassTimestampWrites {
                        query_set: &query_set,
                        beginning_of_pass_write_index: Some(2 * i as u32),
                        end_of_pass_write_index: Some(2 * i as u32 + 1),
                    }),
                });
                pass.set_pipeline(&d.pipeline);
                pass.set_bind_group(0, &d.bind_group, &[]);
                pass.dispatch_workgroups(d.workgroups[0], d.workgroups[1], d.workgroups[2]);
            }
            enc.resolve_query_set(&query_set, 0..n, &resolve, 0);
            enc.copy_buffer_to_buffer(&resolve, 0, &staging, 0, bytes);
            self.queue.submit([enc.finish()]);
        })?;
        let ticks: Vec<u64> = bytemuck::pod_collect_to_vec(&self.map_read_async(&staging).await?);
        let period_ns = self.queue.get_timestamp_period() as f64;
        Ok(ticks
            .chunks(2)
            .map(|t| t[1].saturating_sub(t[0]) as f64 * period_ns * 1e-9)
            .collect())
    }
}
