//! The meta-shape profiler: the cost of a training step from shapes alone, without running it.
//!
//! Why from shapes: planning happens before any weight is loaded (graph-only exports, models too
//! large for the planning machine), and every number the solver needs is a function of the
//! types. Per node, the cost is the op's own `OpSpec::cost` (one source of truth; a backward
//! node is priced like any other node, and a forward node's backward cost is the sum over the
//! backward nodes whose `origin` it is). Over the step: FLOPs (forward, backward, matmul),
//! bytes moved, the activations saved for backward, the bytes of parameters, gradients and
//! optimizer state, and a liveness-based peak-memory estimate.
//!
//! Sizes follow the [`DTypePolicy`]: float activations and gradients take the policy's compute
//! dtype (fp32: 4 bytes, bf16 mixed: 2), parameters take [`param_bytes_per_element`], float
//! buffers stay fp32 (running statistics, frozen master weights), constants keep their dtype.
//! Node costs are priced on the policy's types too, so bytes moved halve under bf16.
//!
//! Peak memory of the single-device step: nodes run in graph order; a value is live from the
//! node that defines it to its last reader (graph inputs from the start; graph outputs, and so
//! parameter gradients, to the end, where the optimizer step reads them); parameters, their
//! optimizer state, buffers and constants are live throughout. While a node runs its inputs
//! and outputs are live together. The peak is the largest live total over the node steps and
//! the final optimizer step. No in-place reuse or allocator fragmentation is modelled.

use crate::dtype::TensorType;
use crate::entity::EntityId;
use crate::graph::{Graph, NodeId, Phase, ValueDef, ValueId};
use crate::ops::{Cost, Op};
use crate::train::{param_bytes_per_element, DTypePolicy, Optimizer, TrainingGraph};
use serde::Serialize;
use std::collections::BTreeMap;

/// Cost of one node.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct NodeProfile {
    pub node: NodeId,
    pub name: String,
    /// [`op_label`]: `einsum`, `unary.relu`, ...
    pub op: String,
    pub phase: Phase,
    /// For backward nodes: the forward node whose vjp emitted it.
    pub origin: Option<NodeId>,
    pub flops: f64,
    pub matmul_flops: f64,
    pub bytes_read: f64,
    pub bytes_written: f64,
    /// For forward nodes: the summed cost of the backward nodes it originated.
    pub backward: Option<Cost>,
}

/// Totals of one op type.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct OpTypeSummary {
    pub count: usize,
    pub flops: f64,
    pub matmul_flops: f64,
    /// Bytes read plus bytes written.
    pub bytes: f64,
}

/// The profile of a training step (or of a forward graph, with no gradients).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Profile {
    pub optimizer: Optimizer,
    pub policy: DTypePolicy,
    /// One row per node, in graph order.
    pub nodes: Vec<NodeProfile>,
    /// Keyed by [`op_label`].
    pub per_op_type: BTreeMap<String, OpTypeSummary>,
    pub forward_flops: f64,
    pub backward_flops: f64,
    /// Forward plus backward FLOPs.
    pub flops_per_step: f64,
    pub forward_matmul_flops: f64,
    pub backward_matmul_flops: f64,
    /// Forward plus backward matmul FLOPs (the count Megatron's formula gives).
    pub matmul_flops: f64,
    /// Bytes read plus written by every node.
    pub bytes_moved: f64,
    /// Values saved for backward: outputs of forward nodes and graph inputs that a backward
    /// node reads, in value order.
    pub saved_for_backward: Vec<ValueId>,
    /// Bytes of `saved_for_backward`.
    pub activation_bytes: usize,
    /// Trainable parameter elements.
    pub params: usize,
    /// Bytes of the parameters' weights (bf16 mixed: bf16 copy plus fp32 master).
    pub param_bytes: usize,
    /// Bytes of the parameter gradients.
    pub grad_bytes: usize,
    /// Bytes of the optimizer state of the parameters that get a gradient.
    pub optimizer_bytes: usize,
    /// Bytes of buffers and constants (live throughout).
    pub buffer_bytes: usize,
    /// Liveness-based peak of the single-device step (see the module doc).
    pub peak_memory_bytes: usize,
    /// The node running at the peak; `None` when the peak is the final optimizer step.
    pub peak_at: Option<NodeId>,
    /// Number of nodes (forward and backward).
    pub num_nodes: usize,
}

/// An op's name, with its `kind` attribute when it has one (`unary.relu`, `reduce.mean`).
pub fn op_label(op: &Op) -> String {
    match serde_json::to_value(op) {
        Ok(serde_json::Value::Object(m)) => match m.get("kind") {
            Some(serde_json::Value::String(k)) => format!("{}.{k}", op.name()),
            _ => op.name().to_string(),
        },
        _ => op.name().to_string(),
    }
}

/// Profiles a training graph.
pub fn profile(tg: &TrainingGraph, optimizer: Optimizer, policy: DTypePolicy) -> Profile {
    profile_graph(&tg.graph, &tg.grads, optimizer, policy)
}

/// Profiles any graph; `grads` lists `(parameter, gradient)` pairs (empty for a forward graph).
pub fn profile_graph(
    g: &Graph,
    grads: &[(ValueId, ValueId)],
    optimizer: Optimizer,
    policy: DTypePolicy,
) -> Profile {
    let act_bytes = |ty: &TensorType| policy.compute_type(ty).size_bytes();

    // per-node costs
    let mut nodes: Vec<NodeProfile> = Vec::with_capacity(g.nodes.len());
    let mut per_op_type: BTreeMap<String, OpTypeSummary> = BTreeMap::new();
    let mut backward_of: Vec<Option<Cost>> = vec![None; g.nodes.len()];
    let mut fwd = Cost::default();
    let mut bwd = Cost::default();
    for (n, node) in g.nodes.iter() {
        let ins: Vec<TensorType> = node
            .inputs
            .iter()
            .map(|&v| policy.compute_type(g.ty(v)))
            .collect();
        let outs: Vec<TensorType> = node
            .outputs
            .iter()
            .map(|&v| policy.compute_type(g.ty(v)))
            .collect();
        let cost = node.op.spec().cost(
            &ins.iter().collect::<Vec<_>>(),
            &outs.iter().collect::<Vec<_>>(),
        );
        match node.phase {
            Phase::Forward => fwd += cost,
            Phase::Backward => {
                bwd += cost;
                if let Some(slot) = node.origin.and_then(|o| backward_of.get_mut(o.index())) {
                    *slot = Some(slot.unwrap_or_default() + cost);
                }
            }
        }
        let label = op_label(&node.op);
        let s = per_op_type.entry(label.clone()).or_default();
        s.count += 1;
        s.flops += cost.flops;
        s.matmul_flops += cost.matmul_flops;
        s.bytes += cost.bytes_read + cost.bytes_written;
        nodes.push(NodeProfile {
            node: n,
            name: node.name.clone(),
            op: label,
            phase: node.phase,
            origin: node.origin,
            flops: cost.flops,
            matmul_flops: cost.matmul_flops,
            bytes_read: cost.bytes_read,
            bytes_written: cost.bytes_written,
            backward: None,
        });
    }
    for row in &mut nodes {
        if row.phase == Phase::Forward {
            row.backward = Some(backward_of[row.node.index()].unwrap_or_default());
        }
    }

    // saved activations
    let mut saved = vec![false; g.values.len()];
    for (_, node) in g.nodes.iter() {
        if node.phase != Phase::Backward {
            continue;
        }
        for &v in &node.inputs {
            let keep = match g.values[v].def {
                ValueDef::Input => true,
                ValueDef::Node { node: p, .. } => {
                    g.nodes.get(p).is_some_and(|d| d.phase == Phase::Forward)
                }
                _ => false,
            };
            if keep {
                saved[v.index()] = true;
            }
        }
    }
    let saved_for_backward: Vec<ValueId> = g.values.keys().filter(|v| saved[v.index()]).collect();
    let activation_bytes = saved_for_backward.iter().map(|&v| act_bytes(g.ty(v))).sum();

    // parameter state
    let per_elem = param_bytes_per_element(optimizer, policy);
    let params = g.param_count();
    let param_bytes = per_elem.weights * params;
    let mut has_grad = vec![false; g.values.len()];
    let mut graded_elems = 0;
    for &(p, _) in grads {
        if let Some(slot) = has_grad.get_mut(p.index()) {
            if !*slot && g.is_param(p) {
                *slot = true;
                graded_elems += g.ty(p).numel();
            }
        }
    }
    let grad_bytes = per_elem.grads * graded_elems;
    let optimizer_bytes = per_elem.optimizer * graded_elems;

    // liveness: steps 0..n are the nodes, step n the optimizer step
    let n = g.nodes.len();
    let mut last_use: Vec<Option<usize>> = vec![None; g.values.len()];
    for (i, (_, node)) in g.nodes.iter().enumerate() {
        for &v in &node.inputs {
            last_use[v.index()] = Some(i);
        }
    }
    for &v in &g.outputs {
        if let Some(slot) = last_use.get_mut(v.index()) {
            *slot = Some(n);
        }
    }
    let mut delta = vec![0i128; n + 2];
    let mut persistent: usize = 0;
    let mut buffer_bytes: usize = 0;
    for (v, d) in g.values.iter() {
        let (start, bytes) = match &d.def {
            ValueDef::Param { .. } => {
                let mut b = per_elem.weights * d.ty.numel();
                if has_grad[v.index()] {
                    b += per_elem.optimizer * d.ty.numel();
                }
                persistent += b;
                continue;
            }
            ValueDef::Buffer { .. } | ValueDef::Const(_) => {
                let b = if d.ty.dtype.is_float() && matches!(d.def, ValueDef::Buffer { .. }) {
                    4 * d.ty.numel()
                } else {
                    d.ty.size_bytes()
                };
                buffer_bytes += b;
                persistent += b;
                continue;
            }
            ValueDef::Input => (0, act_bytes(&d.ty)),
            ValueDef::Node { node, .. } => (node.index(), act_bytes(&d.ty)),
        };
        let start = start.min(n);
        let end = last_use[v.index()].unwrap_or(start).max(start).min(n);
        delta[start] += bytes as i128;
        delta[end + 1] -= bytes as i128;
    }
    let mut live: i128 = 0;
    let mut peak: i128 = 0;
    let mut peak_step = n;
    for (t, d) in delta.iter().take(n + 1).enumerate() {
        live += d;
        if live > peak || t == 0 {
            peak = live;
            peak_step = t;
        }
    }
    let peak_memory_bytes = persistent + usize::try_from(peak.max(0)).unwrap_or(usize::MAX);
    let peak_at = (peak_step < n).then_some(NodeId(peak_step as u32));

    Profile {
        optimizer,
        policy,
        nodes,
        per_op_type,
        forward_flops: fwd.flops,
        backward_flops: bwd.flops,
        flops_per_step: fwd.flops + bwd.flops,
        forward_matmul_flops: fwd.matmul_flops,
        backward_matmul_flops: bwd.matmul_flops,
        matmul_flops: fwd.matmul_flops + bwd.matmul_flops,
        bytes_moved: fwd.bytes_read + fwd.bytes_written + bwd.bytes_read + bwd.bytes_written,
        saved_for_backward,
        activation_bytes,
        params,
        param_bytes,
        grad_bytes,
        optimizer_bytes,
        buffer_bytes,
        peak_memory_bytes,
        peak_at,
        num_nodes: n,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::builder::GraphBuilder;
    use crate::dtype::DType;
    use crate::train::{build_training_graph, LossSpec, TrainOptions};

    const B: usize = 4;
    const I: usize = 8;
    const H: usize = 16;
    const O: usize = 2;

    /// `loss = sum((x @ w1 @ w2) * t)` in f32, einsum only.
    fn linear_forward() -> (Graph, ValueId) {
        let f = |s: &[usize]| TensorType::new(DType::F32, s.to_vec());
        let mut b = GraphBuilder::new();
        let x = b.input("x", f(&[B, I]));
        let t = b.input("t", f(&[B, O]));
        let w1 = b.param("w1", f(&[I, H]));
        let w2 = b.param("w2", f(&[H, O]));
        b.name_next("fc1");
        let h = b.matmul(x, w1).unwrap();
        b.name_next("fc2");
        let y = b.matmul(h, w2).unwrap();
        b.name_next("loss");
        let l = b.einsum("ab,ab->", &[y, t]).unwrap();
        b.output(l);
        (b.finish(), l)
    }

    /// Its training graph: n0 h = x@w1, n1 y = h@w2, n2 loss; n3 dy, n4 dh, n5 dw2, n6 dw1.
    fn linear_step() -> TrainingGraph {
        let (g, l) = linear_forward();
        build_training_graph(&g, &TrainOptions::new(LossSpec::Given(l))).unwrap()
    }

    #[test]
    fn flops_are_exact() {
        let tg = linear_step();
        assert_eq!(tg.graph.nodes.len(), 7, "{}", crate::text::print(&tg.graph));
        let p = profile(&tg, Optimizer::AdamW, DTypePolicy::Fp32);
        let f = |n: usize| n as f64;
        let fc1 = 2.0 * f(B * I * H);
        let fc2 = 2.0 * f(B * H * O);
        let loss = 2.0 * f(B * O);
        assert_eq!(p.forward_matmul_flops, fc1 + fc2 + loss);
        // dy (like the loss), dh and dw2 (2 x fc2), dw1 only (x needs no gradient)
        assert_eq!(p.backward_matmul_flops, loss + 2.0 * fc2 + fc1);
        assert_eq!(p.flops_per_step, p.forward_flops + p.backward_flops);
        assert_eq!(p.nodes[1].backward.unwrap().matmul_flops, 2.0 * fc2);
        assert_eq!(p.nodes[0].backward.unwrap().matmul_flops, fc1);
        assert!(p.nodes[4].backward.is_none());
        assert_eq!(p.per_op_type["einsum"].count, 7);
        assert_eq!(p.params, I * H + H * O);
    }

    #[test]
    fn saved_activations_and_peak_memory_by_hand() {
        let tg = linear_step();
        let p = profile(&tg, Optimizer::AdamW, DTypePolicy::Fp32);
        let g = &tg.graph;
        let names: Vec<&str> = p
            .saved_for_backward
            .iter()
            .map(|&v| g.values[v].name.as_str())
            .collect();
        assert_eq!(names, ["x", "t", "fc1"]);
        let (x, t, h) = (4 * B * I, 4 * B * O, 4 * B * H);
        assert_eq!(p.activation_bytes, x + t + h);

        let w = I * H + H * O;
        assert_eq!(p.param_bytes, 4 * w);
        assert_eq!(p.grad_bytes, 4 * w);
        assert_eq!(p.optimizer_bytes, 8 * w);
        // persistent: weights + AdamW moments + the f32 dloss constant
        let persistent = 12 * w + 4;
        // at n6 (dw1 = dh^T x): x, loss, dh, dw2, dw1 live
        let (dh, dw2, dw1) = (4 * B * H, 4 * H * O, 4 * I * H);
        assert_eq!(p.peak_memory_bytes, persistent + x + 4 + dh + dw2 + dw1);
        assert_eq!(p.peak_at, Some(NodeId(6)));

        let mixed = profile(&tg, Optimizer::AdamW, DTypePolicy::Bf16Mixed);
        assert_eq!(mixed.activation_bytes, (x + t + h) / 2);
        assert_eq!(mixed.param_bytes, 6 * w);
        assert_eq!(mixed.grad_bytes, 2 * w);
        assert_eq!(mixed.bytes_moved * 2.0, p.bytes_moved);
    }

    #[test]
    fn forward_only_graph_and_serialization() {
        let (fwd, _) = linear_forward();
        let p = profile_graph(
            &fwd,
            &[],
            Optimizer::Sgd { momentum: false },
            DTypePolicy::Fp32,
        );
        assert_eq!(p.backward_flops, 0.0);
        assert_eq!(p.grad_bytes, 0);
        assert!(p.saved_for_backward.is_empty());
        let json = serde_json::to_value(&p).unwrap();
        assert_eq!(json["num_nodes"], 3);
        assert!(json["per_op_type"]["einsum"]["flops"].as_f64().unwrap() > 0.0);
    }
}
