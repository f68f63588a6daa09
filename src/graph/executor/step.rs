//! The per-step uniform of a bound graph (`kernels::step`): the one uniform that every kernel
//! reading step-dependent values binds, and a staging buffer of one `Step` per micro-step,
//! written once per step (or decoding call) and copied into the uniform before each micro-step.

use crate::error::Result;
use crate::gpu::{Gpu, View};
use crate::kernels::step::{self, Step};

/// Bytes of one `Step`.
const SIZE: u64 = std::mem::size_of::<Step>() as u64;

pub(super) struct StepUniform {
    /// The uniform the dispatches bind.
    pub(super) view: View,
    /// Micro-step k's `Step` at byte k · SIZE.
    staging: wgpu::Buffer,
}

impl StepUniform {
    /// A uniform and `slots` staged copies, all `Step::default()` until staged.
    pub(super) fn new(gpu: &Gpu, slots: usize) -> Result<StepUniform> {
        let view = step::uniform(gpu, "step", &Step::default())?;
        let staging = gpu.create_storage("step.staging", SIZE * slots as u64)?;
        let uniform = StepUniform { view, staging };
        uniform.stage(gpu, &vec![Step::default(); slots]);
        Ok(uniform)
    }

    /// Writes micro-step k's `Step` from `steps[k]` (queued: ordered before the next submission).
    pub(super) fn stage(&self, gpu: &Gpu, steps: &[Step]) {
        gpu.queue
            .write_buffer(&self.staging, 0, bytemuck::cast_slice(steps));
    }

    /// Records the copy of micro-step k's `Step` into the uniform (between compute passes).
    pub(super) fn record_copy(&self, enc: &mut wgpu::CommandEncoder, k: usize) {
        let buffer = &self.view.buffer;
        enc.copy_buffer_to_buffer(&self.staging, SIZE * k as u64, buffer, 0, SIZE);
    }
}
