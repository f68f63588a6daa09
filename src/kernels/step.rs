//! The per-step uniform (shaders/include/step.wgsl): everything that changes from one training
//! step, micro-step or decoded token to the next, in one struct, so that a built dispatch never
//! needs rewriting. Kernels that read it list `Binding::Step` and take the uniform's view.
//!
//! Who writes what: the graph executor stages every micro-step's `Step` of a training step at
//! once and copies each into its uniform before that micro-step (AdamW reads the last one's t
//! and lr); decoding writes `pos0` once per call. A launcher called on its own (tests, the
//! harness) binds a uniform of its own holding the values it was given.

use bytemuck::{Pod, Zeroable};

use crate::error::Result;
use crate::gpu::{Gpu, View};

/// Mirrors `Step` in shaders/include/step.wgsl.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Pod, Zeroable)]
pub struct Step {
    /// AdamW's step number, from 1.
    pub t: u32,
    /// The learning rate of this step.
    pub lr: f32,
    /// The counter of this micro-step's dropout masks (see `crate::hash`).
    pub dropout_step: u32,
    /// Decoding: the absolute position of the first new token.
    pub pos0: u32,
    /// The loss's scale: 1 (room for reduced-precision training's loss scaling).
    pub loss_scale: f32,
    pub pad0: u32,
    pub pad1: u32,
    pub pad2: u32,
}

impl Default for Step {
    fn default() -> Self {
        Step {
            t: 1,
            lr: 0.0,
            dropout_step: 0,
            pos0: 0,
            loss_scale: 1.0,
            pad0: 0,
            pad1: 0,
            pad2: 0,
        }
    }
}

impl Step {
    /// The struct's words, as the uniform holds them.
    pub fn words(&self) -> &[u32] {
        bytemuck::cast_slice(std::slice::from_ref(self))
    }
}

/// The layout of `Step`, for the test that compares it with `Step` in the shader.
pub fn params_layout() -> super::ParamsLayout {
    super::params_layout!(Step {
        t,
        lr,
        dropout_step,
        pos0,
        loss_scale,
        pad0,
        pad1,
        pad2
    })
}

/// A uniform holding `step`, for kernels to bind.
pub fn uniform(gpu: &Gpu, name: &str, step: &Step) -> Result<View> {
    gpu.uniform(name, step.words())
}

/// Rewrites the uniform `view` (queued: takes effect at the next submission).
pub fn write(gpu: &Gpu, view: &View, step: &Step) -> Result<()> {
    gpu.write(view, step.words())
}
