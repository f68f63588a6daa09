//! The memory planner: activations and activation gradients share a pool of buffers.
//!
//! Each planned tensor lives from the first to the last node of a micro-step that touches it
//! (inclusive, so a node's inputs and outputs never share a buffer). Tensors are placed greedily,
//! largest first, into the first buffer whose occupants' lifetimes do not overlap; each buffer is
//! sized by its first (largest) tenant. Every pooled buffer is a separate wgpu buffer, so a
//! dispatch never binds one buffer both for reading and writing.

use super::ir::{Graph, Phase};
use crate::error::{Error, Result};

#[derive(Clone, Debug)]
pub struct Plan {
    /// The pool buffer of each planned tensor (`None` for tensors held outside the pool).
    pub slot_of: Vec<Option<usize>>,
    /// Size in bytes of each pool buffer.
    pub slots: Vec<u64>,
    /// Bytes the pool holds, against the sum over planned tensors without reuse.
    pub planned_bytes: u64,
    pub unplanned_bytes: u64,
}

/// Plans the pool for the Forward and Backward nodes of `g`. With `reuse` false every planned
/// tensor gets a buffer of its own (a debug switch to rule out aliasing bugs). `max_binding` is
/// the device's largest storage binding: a tensor beyond it is an error naming it.
pub fn plan(g: &Graph, reuse: bool, max_binding: u64) -> Result<Plan> {
    let n = g.tensors.len();
    let mut first = vec![usize::MAX; n];
    let mut last = vec![0usize; n];
    let micro = g
        .nodes
        .iter()
        .filter(|node| matches!(node.phase, Phase::Forward | Phase::Backward));
    for (i, node) in micro.enumerate() {
        for &t in node.inputs.iter().chain(&node.outputs) {
            first[t] = first[t].min(i);
            last[t] = last[t].max(i);
        }
    }
    let mut order: Vec<usize> = (0..n)
        .filter(|&t| g.tensors[t].kind.planned() && first[t] != usize::MAX)
        .collect();
    for &t in &order {
        let bytes = g.tensors[t].bytes();
        if bytes > max_binding {
            return Err(Error::TooLarge {
                tensor: g.tensors[t].name.clone(),
                bytes,
                limit: "max_storage_buffer_binding_size",
                max: max_binding,
            });
        }
    }
    // Largest first; ties by first use, so the plan is deterministic.
    order.sort_by_key(|&t| (std::cmp::Reverse(g.tensors[t].bytes()), first[t], t));
    let mut slot_of = vec![None; n];
    let mut slots: Vec<u64> = Vec::new();
    let mut tenants: Vec<Vec<(usize, usize)>> = Vec::new();
    for &t in &order {
        let span = (first[t], last[t]);
        let fits = |ts: &Vec<(usize, usize)>| ts.iter().all(|&(a, b)| span.1 < a || b < span.0);
        let slot = if reuse {
            tenants.iter().position(fits)
        } else {
            None
        };
        let slot = slot.unwrap_or_else(|| {
            slots.push(g.tensors[t].bytes());
            tenants.push(Vec::new());
            slots.len() - 1
        });
        tenants[slot].push(span);
        slot_of[t] = Some(slot);
    }
    let planned_bytes = slots.iter().sum();
    let unplanned_bytes = order.iter().map(|&t| g.tensors[t].bytes()).sum();
    Ok(Plan {
        slot_of,
        slots,
        planned_bytes,
        unplanned_bytes,
    })
}
