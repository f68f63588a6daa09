// The per-step uniform: everything that changes from one training step (or decoded token) to the
// next, in one struct that the graph executor writes once per step (every micro-step's copy at
// once, each copied into place before its micro-step) or once per decoded token. Kernels that
// read it include this file; their launchers bind the buffer at STEP_BINDING
// (src/kernels/step.rs mirrors the struct and says who writes what).

struct Step {
    t: u32,            // AdamW's step number, from 1 (the bias corrections 1 - β^t follow from it)
    lr: f32,           // the learning rate of this step
    dropout_step: u32, // counter of this micro-step's dropout masks: the global micro-step
    pos0: u32,         // decoding: absolute position of the first new token
    loss_scale: f32,   // the loss's scale (1 until reduced-precision training scales it)
    pad0: u32,
    pad1: u32,
    pad2: u32,
}

@group(0) @binding(15) var<uniform> step: Step;
