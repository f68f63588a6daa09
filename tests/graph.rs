//! Properties of the graph layer, without a GPU: the memory planner over random schedules (two
//! tensors that share a buffer are never live at once, every buffer holds its tenants), and
//! autodiff over small random graphs (the backward nodes it appends, run through the CPU
//! references, give the gradients that finite differences of the forward loss give).

use shaderformer::gpu::DType;
use shaderformer::graph::autodiff::append_backward;
use shaderformer::graph::planner::plan;
use shaderformer::graph::validate::{Context, Data, reference};
use shaderformer::graph::{Graph, Input, Op, Phase, StepOutput, TensorId, TensorKind};
use shaderformer::rng::Rng;

fn below(rng: &mut Rng, n: usize) -> usize {
    rng.below(n as u64) as usize
}

// ---------------------------------------------------------------------------------------------
// Memory planner.

/// A random schedule: tensors of random sizes and kinds, nodes in all four phases reading and
/// writing random tensors (planned tensors only in the micro-step phases, as the model builds).
fn random_schedule(rng: &mut Rng) -> Graph {
    let mut g = Graph::default();
    let tensors = 2 + below(rng, 40);
    for i in 0..tensors {
        let kind = match below(rng, 6) {
            0 => TensorKind::Param(i),
            1 => TensorKind::Input(Input::Tokens),
            2 | 3 => TensorKind::Gradient,
            _ => TensorKind::Activation,
        };
        let shape = [1 + below(rng, 64), 1 + below(rng, 8)];
        let dtype = if below(rng, 8) == 0 {
            DType::U32
        } else {
            DType::F32
        };
        g.tensor(format!("t{i}"), &shape, dtype, kind);
    }
    let unplanned: Vec<TensorId> = (0..tensors)
        .filter(|&t| !g.tensors[t].kind.planned())
        .collect();
    let nodes = 1 + below(rng, 30);
    let mut phase = Phase::Zero;
    for i in 0..nodes {
        // Phases in schedule order: Zero, Forward, Backward, Optimizer.
        if below(rng, 4) == 0 {
            phase = match phase {
                Phase::Zero => Phase::Forward,
                Phase::Forward => Phase::Backward,
                _ => Phase::Optimizer,
            };
        }
        let micro = matches!(phase, Phase::Forward | Phase::Backward);
        let pool = if micro || unplanned.is_empty() {
            (0..tensors).collect::<Vec<_>>()
        } else {
            unplanned.clone()
        };
        if !micro && unplanned.is_empty() {
            continue;
        }
        let pick = |rng: &mut Rng, k: usize| -> Vec<TensorId> {
            (0..k).map(|_| pool[below(rng, pool.len())]).collect()
        };
        let k = below(rng, 4);
        let inputs = pick(rng, k);
        let k = 1 + below(rng, 2);
        let outputs = pick(rng, k);
        g.push(
            phase,
            format!("n{i}"),
            Op::Fill { value: 0.0 },
            inputs,
            outputs,
        );
    }
    g
}

/// Live range (first, last micro-step node touching it) of every tensor, computed here apart
/// from the planner.
fn live_ranges(g: &Graph) -> Vec<Option<(usize, usize)>> {
    let mut r: Vec<Option<(usize, usize)>> = vec![None; g.tensors.len()];
    let micro = g
        .nodes
        .iter()
        .filter(|n| matches!(n.phase, Phase::Forward | Phase::Backward));
    for (i, n) in micro.enumerate() {
        for &t in n.inputs.iter().chain(&n.outputs) {
            r[t] = Some(match r[t] {
                None => (i, i),
                Some((a, b)) => (a.min(i), b.max(i)),
            });
        }
    }
    r
}

#[test]
fn planned_tensors_sharing_a_buffer_are_never_live_at_once() {
    let mut rng = Rng::new(7);
    let mut shared = 0;
    for case in 0..3000 {
        let g = random_schedule(&mut rng);
        let reuse = below(&mut rng, 4) != 0;
        let p = plan(&g, reuse, u64::MAX).unwrap();
        let live = live_ranges(&g);
        let ctx = || format!("case {case} (reuse {reuse}):\n{g}");
        assert_eq!(p.slot_of.len(), g.tensors.len(), "{}", ctx());
        for (t, slot) in p.slot_of.iter().enumerate() {
            let wanted = g.tensors[t].kind.planned() && live[t].is_some();
            assert_eq!(slot.is_some(), wanted, "tensor {t}: {}", ctx());
            if let Some(s) = *slot {
                assert!(
                    p.slots[s] >= g.tensors[t].bytes(),
                    "tensor {t} ({} bytes) in slot {s} of {} bytes: {}",
                    g.tensors[t].bytes(),
                    p.slots[s],
                    ctx()
                );
            }
        }
        for a in 0..g.tensors.len() {
            for b in a + 1..g.tensors.len() {
                let (Some(sa), Some(sb)) = (p.slot_of[a], p.slot_of[b]) else {
                    continue;
                };
                if sa != sb {
                    continue;
                }
                shared += 1;
                assert!(
                    reuse,
                    "tensors {a} and {b} share slot {sa} without reuse: {}",
                    ctx()
                );
                let ((a0, a1), (b0, b1)) = (live[a].unwrap(), live[b].unwrap());
                assert!(
                    a1 < b0 || b1 < a0,
                    "tensors {a} ({a0}..={a1}) and {b} ({b0}..={b1}) share slot {sa}: {}",
                    ctx()
                );
            }
        }
        assert_eq!(p.planned_bytes, p.slots.iter().sum::<u64>(), "{}", ctx());
        let unplanned: u64 = (0..g.tensors.len())
            .filter(|&t| p.slot_of[t].is_some())
            .map(|t| g.tensors[t].bytes())
            .sum();
        assert_eq!(p.unplanned_bytes, unplanned, "{}", ctx());
        assert!(p.planned_bytes <= p.unplanned_bytes, "{}", ctx());
    }
    // The property was exercised, not vacuously true.
    assert!(shared > 1000, "only {shared} shared pairs");
}

#[test]
fn a_tensor_over_the_binding_limit_is_an_error_naming_it() {
    let mut g = Graph::default();
    let a = g.activation("small", &[4]);
    let b = g.activation("too_big", &[1024]);
    g.push(
        Phase::Forward,
        "n",
        Op::Fill { value: 0.0 },
        vec![a],
        vec![b],
    );
    let e = plan(&g, true, 1024).unwrap_err().to_string();
    assert!(e.contains("too_big"), "{e}");
    assert!(plan(&g, true, 4096).is_ok());
}

// ---------------------------------------------------------------------------------------------
// Autodiff against finite differences.

/// Dimensions of the random graphs: N rows of C channels; logits over V (padded to VP) classes.
const N: usize = 3;
const C: usize = 4;
const V: usize = 5;
const VP: usize = 8;

struct Built {
    g: Graph,
    params: Vec<TensorId>,
    targets: TensorId,
    loss: TensorId,
}

/// A random forward graph over (N, C) activations ending in the mean cross-entropy: LayerNorm,
/// RMSNorm, Linear (with or without bias), GELU, SwiGLU, RoPE, residual Add (also of a tensor
/// with itself), and attention blocks: one with its own qkv projection (attention's backward
/// needs qkv used once), one with grouped-query heads (q from the pool, one key/value head of
/// its own, RoPE on q and k or not, packed by `PackQkv`).
fn random_model(rng: &mut Rng) -> Built {
    let mut g = Graph::default();
    let mut params = Vec::new();
    let mut param = |g: &mut Graph, name: String, shape: &[usize]| {
        let id = g.tensor(name, shape, DType::F32, TensorKind::Param(params.len()));
        params.push(id);
        id
    };
    let x = param(&mut g, "x".into(), &[N, C]);
    let mut pool = vec![x];
    let ops = 2 + below(rng, 6);
    for i in 0..ops {
        let a = pool[below(rng, pool.len())];
        let y = g.activation(format!("y{i}"), &[N, C]);
        match below(rng, 9) {
            6 => {
                let w = param(&mut g, format!("rms{i}.w"), &[C]);
                let rstd = g.activation(format!("rms{i}.rstd"), &[N]);
                let op = Op::RmsNorm {
                    n: N,
                    c: C,
                    eps: 1e-5,
                };
                g.push(
                    Phase::Forward,
                    format!("rms{i}"),
                    op,
                    vec![a, w],
                    vec![y, rstd],
                );
            }
            7 => {
                // One sequence of N tokens, one head of C or two of C/2.
                let heads = 1 + below(rng, 2);
                rope(&mut g, a, y, (heads, C / heads), format!("rope{i}"));
            }
            8 => gqa_attention(&mut g, &mut param, rng, (a, y), i),
            0 => {
                let w = param(&mut g, format!("ln{i}.w"), &[C]);
                let b = param(&mut g, format!("ln{i}.b"), &[C]);
                let mean = g.activation(format!("ln{i}.mean"), &[N]);
                let rstd = g.activation(format!("ln{i}.rstd"), &[N]);
                let op = Op::LayerNorm { n: N, c: C };
                g.push(
                    Phase::Forward,
                    format!("ln{i}"),
                    op,
                    vec![a, w, b],
                    vec![y, mean, rstd],
                );
            }
            1 => {
                let bias = below(rng, 2) == 0;
                let w = param(&mut g, format!("fc{i}.w"), &[C, C]);
                let mut ins = vec![a, w];
                if bias {
                    ins.push(param(&mut g, format!("fc{i}.b"), &[C]));
                }
                let op = Op::Linear {
                    m: N,
                    k: C,
                    n: C,
                    bias,
                };
                g.push(Phase::Forward, format!("fc{i}"), op, ins, vec![y]);
            }
            2 => {
                let op = Op::Gelu { n: N * C };
                g.push(Phase::Forward, format!("gelu{i}"), op, vec![a], vec![y]);
            }
            3 => {
                let b = pool[below(rng, pool.len())];
                let op = Op::Add { n: N * C };
                g.push(Phase::Forward, format!("add{i}"), op, vec![a, b], vec![y]);
            }
            // The gated MLP's activation reads two distinct tensors (gate and up projections).
            4 if pool.len() > 1 => {
                let b = *pool.iter().find(|&&t| t != a).unwrap();
                let op = Op::SwiGlu { n: N * C };
                g.push(
                    Phase::Forward,
                    format!("swiglu{i}"),
                    op,
                    vec![a, b],
                    vec![y],
                );
            }
            _ => {
                // One sequence of N tokens, two heads of C/2.
                let w = param(&mut g, format!("attn{i}.w"), &[3 * C, C]);
                let qkv = g.activation(format!("attn{i}.qkv"), &[1, N, 3 * C]);
                let op = Op::Linear {
                    m: N,
                    k: C,
                    n: 3 * C,
                    bias: false,
                };
                g.push(
                    Phase::Forward,
                    format!("attn{i}.qkv"),
                    op,
                    vec![a, w],
                    vec![qkv],
                );
                let lse = g.activation(format!("attn{i}.lse"), &[1, 2, N]);
                let op = Op::Attention {
                    b: 1,
                    t: N,
                    nh: 2,
                    nkv: 2,
                    hs: C / 2,
                    p: 0.0,
                    site: 0,
                };
                g.push(
                    Phase::Forward,
                    format!("attn{i}"),
                    op,
                    vec![qkv],
                    vec![y, lse],
                );
            }
        }
        pool.push(y);
    }
    // The head reads the last tensor, and sometimes also an earlier one (a second path).
    let mut last = *pool.last().unwrap();
    if below(rng, 2) == 0 {
        let other = pool[below(rng, pool.len())];
        let y = g.activation("mix", &[N, C]);
        let op = Op::Add { n: N * C };
        g.push(Phase::Forward, "mix", op, vec![last, other], vec![y]);
        last = y;
    }
    let w = param(&mut g, "head.w".into(), &[VP, C]);
    let logits = g.activation("logits", &[N, VP]);
    let op = Op::Linear {
        m: N,
        k: C,
        n: VP,
        bias: false,
    };
    g.push(Phase::Forward, "head", op, vec![last, w], vec![logits]);
    let targets = g.tensor(
        "targets",
        &[N],
        DType::U32,
        TensorKind::Input(Input::Targets),
    );
    let losses = g.activation("losses", &[N]);
    let lse = g.activation("lse", &[N]);
    let op = Op::CrossEntropy { n: N, v: V, vp: VP };
    g.push(
        Phase::Forward,
        "ce",
        op,
        vec![logits, targets],
        vec![losses, lse],
    );
    let loss = g.tensor(
        "loss",
        &[1],
        DType::F32,
        TensorKind::Result(StepOutput::Loss),
    );
    g.push(
        Phase::Forward,
        "mean",
        Op::Mean { n: N },
        vec![losses],
        vec![loss],
    );
    Built {
        g,
        params,
        targets,
        loss,
    }
}

/// y (1, N, H, D) = x rotated, token t at position t, through inverse frequencies of the
/// node's own.
fn rope(g: &mut Graph, x: TensorId, y: TensorId, (heads, d): (usize, usize), label: String) {
    let inv: Vec<f32> = (0..d / 2).map(|k| 1.3f32.powi(-(k as i32))).collect();
    let inv = g.table(format!("{label}.inv_freq"), inv);
    let op = Op::Rope {
        b: 1,
        t: N,
        heads,
        d,
    };
    g.push(Phase::Forward, label, op, vec![x, inv], vec![y]);
}

type ParamFn<'a> = &'a mut dyn FnMut(&mut Graph, String, &[usize]) -> TensorId;

/// A projection of x (N, C) to (N, n) with a weight of its own.
fn project(g: &mut Graph, param: ParamFn, x: TensorId, n: usize, name: String) -> TensorId {
    let w = param(g, format!("{name}.w"), &[n, C]);
    let out = g.activation(name.clone(), &[N, n]);
    let op = Op::Linear {
        m: N,
        k: C,
        n,
        bias: false,
    };
    g.push(Phase::Forward, name, op, vec![x, w], vec![out]);
    out
}

/// Grouped-query attention of two query heads of C/2 over one key/value head: q = a, k and v
/// projections of a, RoPE on q and k half of the time, then `PackQkv` and attention into y.
fn gqa_attention(
    g: &mut Graph,
    param: ParamFn,
    rng: &mut Rng,
    (a, y): (TensorId, TensorId),
    i: usize,
) {
    let (nh, nkv, hs) = (2, 1, C / 2);
    let mut k = project(g, param, a, nkv * hs, format!("gqa{i}.k"));
    let v = project(g, param, a, nkv * hs, format!("gqa{i}.v"));
    let mut q = a;
    if below(rng, 2) == 0 {
        let qr = g.activation(format!("gqa{i}.q.rope"), &[N, C]);
        rope(g, q, qr, (nh, hs), format!("gqa{i}.q.rope"));
        let kr = g.activation(format!("gqa{i}.k.rope"), &[N, nkv * hs]);
        rope(g, k, kr, (nkv, hs), format!("gqa{i}.k.rope"));
        (q, k) = (qr, kr);
    }
    let qkv = g.activation(format!("gqa{i}.qkv"), &[1, N, (nh + 2 * nkv) * hs]);
    let op = Op::PackQkv {
        b: 1,
        t: N,
        nh,
        nkv,
        hs,
    };
    g.push(
        Phase::Forward,
        format!("gqa{i}.pack"),
        op,
        vec![q, k, v],
        vec![qkv],
    );
    let lse = g.activation(format!("gqa{i}.lse"), &[1, nh, N]);
    let op = Op::Attention {
        b: 1,
        t: N,
        nh,
        nkv,
        hs,
        p: 0.0,
        site: 0,
    };
    g.push(
        Phase::Forward,
        format!("gqa{i}"),
        op,
        vec![qkv],
        vec![y, lse],
    );
}

/// Runs the nodes of `phases` on the CPU references, in schedule order, over `values`.
fn run(g: &Graph, values: &mut [Data], phases: &[Phase]) {
    let ctx = Context {
        seed: 0,
        step: 1,
        dloss: 1.0 / N as f32,
    };
    for node in g.nodes.iter().filter(|n| phases.contains(&n.phase)) {
        let ins: Vec<Data> = node.inputs.iter().map(|&t| values[t].clone()).collect();
        let outs: Vec<Data> = node.outputs.iter().map(|&t| values[t].clone()).collect();
        let new = reference(node, &ins, &outs, ctx);
        for (&t, v) in node.outputs.iter().zip(new) {
            values[t] = Data::F32(v);
        }
    }
}

fn initial_values(b: &Built, rng: &mut Rng) -> Vec<Data> {
    let mut values: Vec<Data> =
        b.g.tensors
            .iter()
            .map(|t| Data::F32(vec![0.0; t.numel()]))
            .collect();
    for &p in &b.params {
        let n = b.g.tensors[p].numel();
        values[p] = Data::F32(rng.vec_uniform(n, -1.0, 1.0));
    }
    for (t, tensor) in b.g.tensors.iter().enumerate() {
        if let TensorKind::Table(i) = tensor.kind {
            values[t] = Data::F32(b.g.tables[i].clone());
        }
    }
    values[b.targets] = Data::U32((0..N).map(|_| rng.below(V as u64) as u32).collect());
    values
}

fn loss_at(b: &Built, values: &[Data]) -> f64 {
    let mut v = values.to_vec();
    run(&b.g, &mut v, &[Phase::Forward]);
    v[b.loss].f()[0] as f64
}

#[test]
fn autodiff_gradients_match_finite_differences() {
    let mut rng = Rng::new(11);
    let (mut checked, mut nonzero) = (0, 0);
    for case in 0..60 {
        let mut built = random_model(&mut rng);
        let forward = built.g.to_string();
        let bw = append_backward(&mut built.g);
        let values = initial_values(&built, &mut rng);
        let mut v = values.clone();
        run(&built.g, &mut v, &[Phase::Forward, Phase::Backward]);
        for &(p, d) in &bw.param_grads {
            let grad = v[d].f().to_vec();
            let n = grad.len();
            for _ in 0..3 {
                let k = below(&mut rng, n);
                let h = 1e-2f32;
                let mut plus = values.clone();
                let mut minus = values.clone();
                let (Data::F32(pp), Data::F32(mm)) = (&mut plus[p], &mut minus[p]) else {
                    unreachable!()
                };
                pp[k] += h;
                mm[k] -= h;
                let fd = (loss_at(&built, &plus) - loss_at(&built, &minus)) / (2.0 * h as f64);
                let an = grad[k] as f64;
                assert!(
                    (an - fd).abs() <= 2e-3 + 2e-2 * fd.abs(),
                    "case {case}: d loss / d {}[{k}]: autodiff {an}, finite differences {fd}\n{}",
                    built.g.tensors[p].name,
                    forward
                );
                checked += 1;
                nonzero += (fd.abs() > 1e-3) as usize;
            }
        }
    }
    assert!(checked > 500, "only {checked} gradient entries checked");
    // Most entries carry a real gradient, so agreement is not agreement on zero.
    assert!(
        nonzero > checked / 2,
        "{nonzero} of {checked} gradients are nonzero"
    );
}
