//! Running the bound graph: a training step recorded into one command buffer (or two around a
//! gradient sync), its results read back through a ring of mapped buffers, and the forward-only
//! calls of evaluation and decoding.

use super::super::ir::{Input, Op, Phase};
use super::{Executor, GradientSync, MicroBatch, Shard, StepResult};
use crate::error::{Error, Result};
use crate::gpu::{Dispatch, Gpu, Signal, View};
use crate::kernels::embedding;
use crate::kernels::step::Step;

/// How long a step's result buffer may take to map once the queue is idle: the callback is
/// immediate unless another thread holds it, so waiting longer means the device is gone.
const CALLBACK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// One mapped buffer of the readback ring and the step whose results it holds.
pub(super) struct Readback {
    buffer: wgpu::Buffer,
    step: Option<u64>,
    /// Set by the map callback: whether mapping succeeded.
    ready: Signal<bool>,
}

/// Readbacks kept in flight: the CPU runs at most this many steps ahead of the GPU.
const RING: usize = 2;

/// The `RING` mapped buffers that step results (`results`) are copied into for reading back.
pub(super) fn readback_ring(gpu: &Gpu, results: &View) -> Result<Vec<Readback>> {
    let mut ring = Vec::new();
    for i in 0..RING {
        let buffer = gpu.scoped("readback", results.bytes(), || {
            gpu.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(&format!("step_results.readback.{i}")),
                size: results.bytes(),
                usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            })
        })?;
        ring.push(Readback {
            buffer,
            step: None,
            ready: Signal::new(),
        });
    }
    Ok(ring)
}

impl Executor<'_> {
    /// Queues one training step: `micro` holds `grad_accum` batches; `lr` and the AdamW step
    /// number `t` (1-based) apply to this step. Returns without waiting for the GPU; the step's
    /// losses arrive through `poll` or `wait_results`.
    pub fn step(&mut self, micro: &[MicroBatch], lr: f32, t: u32) -> Result<()> {
        self.step_synced(micro, lr, t, None)
    }

    /// `step`, with `sync` run between the backward and the optimizer update: the forward and
    /// backward are submitted, waited for, handed to `sync` (which sums the gradients across
    /// ranks), then the update is submitted. Without `sync`, the whole step is one submission.
    pub fn step_synced(
        &mut self,
        micro: &[MicroBatch],
        lr: f32,
        t: u32,
        sync: Option<&mut dyn GradientSync>,
    ) -> Result<()> {
        let accum = self.opts.grad_accum.max(1);
        if micro.len() != accum {
            return Err(Error::invalid(
                "step",
                format!("{} micro-batches given, grad_accum is {accum}", micro.len()),
            ));
        }
        self.write_inputs(micro)?;
        self.step_uniform
            .stage(self.gpu, &self.training_steps(lr, t));
        let slot = self.reserve_readback()?;
        match sync {
            None => self.submit("training step", |enc| {
                self.record_accumulate(enc);
                self.record_update(enc, slot);
            })?,
            Some(sync) => {
                self.submit("forward and backward", |enc| self.record_accumulate(enc))?;
                let mut losses = match &self.results {
                    Some(r) => self.gpu.read_f32(&r.slice(0, accum, "step_losses")?)?,
                    None => Vec::new(),
                };
                let grads = self.gradient_spans();
                sync.sync(self.gpu, &grads, &mut losses)?;
                self.synced_losses.push((t as u64, losses));
                self.submit("optimizer", |enc| self.record_update(enc, slot))?;
            }
        }
        if let Some(slot) = slot {
            let rb = &mut self.ring[slot];
            rb.step = Some(t as u64);
            let ready = rb.ready.clone();
            ready.clear();
            rb.buffer
                .slice(..)
                .map_async(wgpu::MapMode::Read, move |r| ready.set(r.is_ok()));
        }
        Ok(())
    }

    /// Every micro-step's `Step` of training step `t` at learning rate `lr`. Every micro-step of
    /// every step draws fresh dropout masks, keyed by the global micro-step:
    /// counter = t · accum · ranks + k · ranks + rank.
    fn training_steps(&self, lr: f32, t: u32) -> Vec<Step> {
        let Shard { rank, ranks } = self.opts.shard;
        let per_step = self.micro_per_step() as u32;
        (0..self.opts.grad_accum.max(1))
            .map(|k| Step {
                t: t.max(1),
                lr,
                dropout_step: t * per_step + (k * ranks + rank) as u32,
                ..Step::default()
            })
            .collect()
    }

    /// The flat spans of every gradient the optimizer reads (those of the gradient norm).
    pub fn gradient_spans(&self) -> Vec<View> {
        self.graph
            .nodes
            .iter()
            .find(|n| matches!(n.op, Op::GlobalNorm))
            .map_or_else(Vec::new, |n| self.spans_of(&n.inputs))
    }

    /// Records into one command buffer and submits it.
    fn submit(&self, label: &str, record: impl FnOnce(&mut wgpu::CommandEncoder)) -> Result<()> {
        let gpu = self.gpu;
        gpu.scoped(label, 0, || {
            let mut enc = gpu
                .device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some(label) });
            record(&mut enc);
            gpu.queue.submit([enc.finish()]);
        })
    }

    /// Zeroes the gradients and records every micro-step's forward and backward, each loss
    /// copied into the step's results.
    fn record_accumulate(&self, enc: &mut wgpu::CommandEncoder) {
        let gpu = self.gpu;
        gpu.record(enc, self.phase(Phase::Zero));
        for k in 0..self.opts.grad_accum.max(1) {
            self.record_micro_inputs(enc, k);
            gpu.record(enc, self.phase(Phase::Forward));
            gpu.record(enc, self.phase(Phase::Backward));
            if let (Some(loss), Some(r)) = (self.loss, &self.results) {
                let l = self.view(loss);
                enc.copy_buffer_to_buffer(
                    &l.buffer,
                    l.offset,
                    &r.buffer,
                    r.offset + 4 * k as u64,
                    4,
                );
            }
        }
    }

    /// Records the gradient norm and AdamW, and the copy of the step's results into ring `slot`.
    fn record_update(&self, enc: &mut wgpu::CommandEncoder, slot: Option<usize>) {
        let accum = self.opts.grad_accum.max(1);
        self.gpu.record(enc, self.phase(Phase::Optimizer));
        if let (Some(norm), Some(r)) = (self.norm, &self.results) {
            let nv = self.view(norm);
            enc.copy_buffer_to_buffer(
                &nv.buffer,
                nv.offset,
                &r.buffer,
                r.offset + 4 * accum as u64,
                4,
            );
        }
        if let (Some(slot), Some(r)) = (slot, &self.results) {
            enc.copy_buffer_to_buffer(&r.buffer, r.offset, &self.ring[slot].buffer, 0, r.bytes());
        }
    }

    pub(super) fn phase(&self, p: Phase) -> &[Dispatch] {
        self.dispatches.get(&p).map_or(&[], Vec::as_slice)
    }

    /// Stages every micro-step's values of every graph input.
    fn write_inputs(&self, micro: &[MicroBatch]) -> Result<()> {
        for staged in &self.inputs {
            let t = &self.graph.tensors[staged.tensor];
            let mut all: Vec<u32> = Vec::with_capacity(t.numel() * micro.len());
            for mb in micro {
                let part: Vec<u32> = match staged.input {
                    Input::Tokens => mb.tokens.clone(),
                    Input::Targets => mb.targets.clone(),
                    Input::EmbeddingIndex => embedding::backward_index(&mb.tokens),
                };
                if part.len() != t.numel() {
                    return Err(Error::Shape {
                        kernel: "step".into(),
                        tensor: t.name.clone(),
                        expected: format!("{} values", t.numel()),
                        got: format!("{} values", part.len()),
                    });
                }
                all.extend(part);
            }
            self.gpu
                .queue
                .write_buffer(&staged.staging, 0, bytemuck::cast_slice(&all));
        }
        Ok(())
    }

    /// Copies micro-step k's inputs and `Step` into place (between compute passes).
    pub(super) fn record_micro_inputs(&self, enc: &mut wgpu::CommandEncoder, k: usize) {
        for staged in &self.inputs {
            let v = self.view(staged.tensor);
            enc.copy_buffer_to_buffer(
                &staged.staging,
                v.bytes() * k as u64,
                &v.buffer,
                v.offset,
                v.bytes(),
            );
        }
        self.step_uniform.record_copy(enc, k);
    }

    /// Picks the ring slot for the next step's results, first collecting the step that used it.
    fn reserve_readback(&mut self) -> Result<Option<usize>> {
        if self.ring.is_empty() {
            return Ok(None);
        }
        let slot = self.next_ring;
        self.next_ring = (self.next_ring + 1) % self.ring.len();
        if self.ring[slot].step.is_some() {
            let done = self.collect(slot, true)?;
            self.pending.extend(done);
        }
        Ok(Some(slot))
    }

    fn collect(&mut self, slot: usize, block: bool) -> Result<Option<StepResult>> {
        let Some(step) = self.ring[slot].step else {
            return Ok(None);
        };
        let ready = |rb: &Readback| rb.ready.peek();
        let lost = |reason: String| Error::DeviceLost {
            reason: format!("while reading back the results of step {step}: {reason}"),
        };
        if block {
            self.gpu.wait().map_err(|e| lost(e.to_string()))?;
            // The queue is idle, but when another thread polls the same device, it may have
            // taken this buffer's map callback and not run it yet: wait for the callback, a
            // little, without spinning, and never past a lost device or a poll error.
            let deadline = std::time::Instant::now() + CALLBACK_TIMEOUT;
            while ready(&self.ring[slot]).is_none() {
                self.gpu
                    .check("readback")
                    .map_err(|e| lost(e.to_string()))?;
                if std::time::Instant::now() > deadline {
                    return Err(lost(format!(
                        "the queue is idle but the buffer was not mapped within {} s",
                        CALLBACK_TIMEOUT.as_secs()
                    )));
                }
                std::thread::sleep(std::time::Duration::from_millis(1));
                self.gpu
                    .device
                    .poll(wgpu::PollType::Poll)
                    .map_err(|e| lost(e.to_string()))?;
            }
        } else {
            self.gpu
                .device
                .poll(wgpu::PollType::Poll)
                .map_err(|e| lost(e.to_string()))?;
            self.gpu
                .check("readback")
                .map_err(|e| lost(e.to_string()))?;
        }
        let state = ready(&self.ring[slot]);
        match state {
            None => Ok(None),
            Some(false) => Err(lost("mapping the result buffer failed".into())),
            Some(true) => {
                let rb = &mut self.ring[slot];
                let data: Vec<f32> =
                    {
                        let view = rb.buffer.slice(..).get_mapped_range().map_err(|e| {
                            Error::Validation {
                                context: "step results".into(),
                                message: e.to_string(),
                            }
                        })?;
                        bytemuck::pod_collect_to_vec(&view)
                    };
                rb.buffer.unmap();
                rb.step = None;
                let accum = self.opts.grad_accum.max(1);
                let losses = match self.synced_losses.iter().position(|(s, _)| *s == step) {
                    Some(i) => self.synced_losses.swap_remove(i).1,
                    None => data[..accum].to_vec(),
                };
                Ok(Some(StepResult {
                    step,
                    losses,
                    grad_norm: data[accum],
                }))
            }
        }
    }

    /// Step results that have arrived, oldest first (never blocks).
    pub fn poll(&mut self) -> Result<Vec<StepResult>> {
        let mut out = std::mem::take(&mut self.pending);
        for k in 0..self.ring.len() {
            let slot = (self.next_ring + k) % self.ring.len();
            out.extend(self.collect(slot, false)?);
        }
        out.sort_by_key(|r| r.step);
        Ok(out)
    }

    /// Waits for every queued step and returns the results not yet returned.
    pub fn wait_results(&mut self) -> Result<Vec<StepResult>> {
        let mut out = std::mem::take(&mut self.pending);
        for k in 0..self.ring.len() {
            let slot = (self.next_ring + k) % self.ring.len();
            out.extend(self.collect(slot, true)?);
        }
        out.sort_by_key(|r| r.step);
        Ok(out)
    }

    /// `poll` for a caller that must not block (a browser): when every readback slot is taken,
    /// awaits the oldest, so that the next `step` finds a free slot; returns what has arrived.
    pub async fn poll_async(&mut self) -> Result<Vec<StepResult>> {
        if self.ring.iter().all(|rb| rb.step.is_some()) {
            let slot = self.next_ring;
            let done = self.collect_async(slot).await?;
            self.pending.extend(done);
        }
        self.poll()
    }

    /// `wait_results`, awaited.
    pub async fn wait_results_async(&mut self) -> Result<Vec<StepResult>> {
        let mut out = std::mem::take(&mut self.pending);
        for k in 0..self.ring.len() {
            let slot = (self.next_ring + k) % self.ring.len();
            out.extend(self.collect_async(slot).await?);
        }
        out.sort_by_key(|r| r.step);
        Ok(out)
    }

    /// Collects a slot, awaiting its mapping: natively by polling the device as `collect` does,
    /// in a browser by yielding to the event loop until the map callback has run.
    async fn collect_async(&mut self, slot: usize) -> Result<Option<StepResult>> {
        if cfg!(target_arch = "wasm32") {
            if self.ring[slot].step.is_some() {
                let ready = self.ring[slot].ready.clone();
                ready.wait().await;
            }
            self.collect(slot, false)
        } else {
            self.collect(slot, true)
        }
    }

    /// `forward_loss`, awaited (evaluation in a browser).
    pub async fn forward_loss_async(&mut self, batch: &MicroBatch) -> Result<f32> {
        self.submit_one("forward", batch, &[Phase::Forward])?;
        let loss = self
            .loss
            .ok_or_else(|| Error::invalid("forward_loss", "graph has no loss"))?;
        Ok(self.gpu.read_f32_async(self.view(loss)).await?[0])
    }

    /// Runs the forward pass on one batch and returns the mean loss (blocking; for evaluation).
    pub fn forward_loss(&mut self, batch: &MicroBatch) -> Result<f32> {
        self.forward(batch)?;
        let loss = self
            .loss
            .ok_or_else(|| Error::invalid("forward_loss", "graph has no loss"))?;
        Ok(self.gpu.read_f32(self.view(loss))?[0])
    }

    /// Decodes one batch of new tokens at positions pos0 .. pos0 + T against the KV caches
    /// (appending their keys and values), without waiting: read the logits or losses after.
    pub fn decode(&mut self, batch: &MicroBatch, pos0: usize) -> Result<()> {
        let at = Step {
            pos0: pos0 as u32,
            ..Step::default()
        };
        self.step_uniform.stage(self.gpu, &[at]);
        self.write_inputs(std::slice::from_ref(batch))?;
        let gpu = self.gpu;
        gpu.scoped("decode", 0, || {
            let mut enc = gpu
                .device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                    label: Some("decode"),
                });
            // The position rows pos0 .. pos0 + T, cut from the position table.
            for (window, table, cols) in &self.windows {
                let size = window.dtype.size();
                enc.copy_buffer_to_buffer(
                    &table.buffer,
                    table.offset + (pos0 * cols) as u64 * size,
                    &window.buffer,
                    window.offset,
                    window.len as u64 * size,
                );
            }
            self.record_micro_inputs(&mut enc, 0);
            gpu.record(&mut enc, self.phase(Phase::Forward));
            gpu.queue.submit([enc.finish()]);
        })
    }

    /// Runs the forward pass on one batch (targets may be empty for a logits-only graph) and
    /// waits for it.
    pub fn forward(&mut self, batch: &MicroBatch) -> Result<()> {
        self.submit_one("forward", batch, &[Phase::Forward])?;
        self.gpu.wait()
    }

    /// Writes `batch` as micro-step 0's inputs and submits, in one command buffer, the copies of
    /// those inputs into place and then `phases`. Does not wait.
    pub(super) fn submit_one(
        &self,
        label: &str,
        batch: &MicroBatch,
        phases: &[Phase],
    ) -> Result<()> {
        self.write_inputs(std::slice::from_ref(batch))?;
        let gpu = self.gpu;
        gpu.scoped(label, 0, || {
            let mut enc = gpu
                .device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some(label) });
            self.record_micro_inputs(&mut enc, 0);
            for &p in phases {
                gpu.record(&mut enc, self.phase(p));
            }
            gpu.queue.submit([enc.finish()]);
        })
    }

    /// Runs the Zero, Forward and Backward phases on one batch (no optimizer step) and waits:
    /// the parameter gradients are then those of this batch's mean loss.
    pub fn forward_backward(&mut self, batch: &MicroBatch) -> Result<()> {
        let phases = [Phase::Zero, Phase::Forward, Phase::Backward];
        self.submit_one("forward and backward", batch, &phases)?;
        self.gpu.wait()
    }

    /// Times every dispatch of one training step (one micro-step) with the GPU profiler, each
    /// in its own pass. Returns (dispatch name, seconds) in schedule order. Parameters are updated
    /// as by a real step with learning rate `lr` and step number `t`.
    pub fn profile_step(
        &mut self,
        batch: &MicroBatch,
        lr: f32,
        t: u32,
    ) -> Result<Vec<(String, f64)>> {
        self.step_uniform
            .stage(self.gpu, &self.training_steps(lr, t)[..1]);
        self.submit_one("profile inputs", batch, &[])?;
        self.profile_phases(&[
            Phase::Zero,
            Phase::Forward,
            Phase::Backward,
            Phase::Optimizer,
        ])
    }

    /// Times every dispatch of the forward pass with the GPU profiler, each in its own pass, on
    /// the inputs the last `forward` or `decode` call wrote (a decoding graph appends the same
    /// keys and values to its cache again). Returns (dispatch name, seconds) in schedule order.
    pub fn profile_forward(&self) -> Result<Vec<(String, f64)>> {
        self.profile_phases(&[Phase::Forward])
    }

    /// Every dispatch of `phases`, in order, timed each in its own pass: (name, seconds).
    fn profile_phases(&self, phases: &[Phase]) -> Result<Vec<(String, f64)>> {
        let all: Vec<Dispatch> = phases
            .iter()
            .flat_map(|&p| self.phase(p).iter().cloned())
            .collect();
        let times = self.gpu.profile(&all)?;
        Ok(all.into_iter().map(|d| d.name).zip(times).collect())
    }
}
