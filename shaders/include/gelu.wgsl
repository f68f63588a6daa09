// GPT-2's tanh GELU (gelu_new), included by gelu.wgsl and gemm.wgsl (its fused epilogues), so
// both compute it with the same operations and give the same bits.
//
// gelu(x) = 0.5 · x · (1 + tanh u), u = sqrt(2/π) · (x + 0.044715 · x³), through
// 0.5 · (1 + tanh u) = σ(2u) and 0.25 · (1 - tanh² u) = σ(2u) · σ(-2u), with σ evaluated from
// exp(-2|u|) ≤ 1: no overflow for large |u| and no cancellation in 1 + tanh u for large
// negative x.

// (σ(2u), σ(-2u)) for u = sqrt(2/π) · (x + 0.044715 · x³).
fn gelu_sigmoids(x: f32) -> vec2<f32> {
    let u = 0.7978845608028654 * (x + 0.044715 * x * x * x);
    let e = exp(-2.0 * abs(u));
    let big = 1.0 / (1.0 + e); // σ(2|u|)
    let small = e * big;       // σ(-2|u|)
    return select(vec2(small, big), vec2(big, small), u >= 0.0);
}

// gelu(x).
fn gelu(x: f32) -> f32 {
    return x * gelu_sigmoids(x).x;
}

// gelu'(x) = 0.5 · (1 + tanh u) + 0.5 · x · (1 - tanh² u) · du/dx,
// du/dx = sqrt(2/π) · (1 + 3 · 0.044715 · x²): the exact derivative of the tanh form.
fn gelu_grad(x: f32) -> f32 {
    let s = gelu_sigmoids(x);
    let du = 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * x * x);
    return s.x + 2.0 * x * s.x * s.y * du;
}
