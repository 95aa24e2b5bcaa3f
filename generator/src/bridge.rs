//! The two translations between the analyzer's graph and the solver's plain numbers, shared by
//! the planner (which prices strategies) and the generator (which runs them), so that both see
//! the same strategies and the same compute times.

use autopar_analyzer::graph::{Graph, NodeId};
use autopar_analyzer::ops::{AxisKind as OpAxisKind, Cost};
use autopar_analyzer::train::DTypePolicy;
use autopar_analyzer::TensorType;
use autopar_solver::cluster::Cluster;
use autopar_solver::strategy::{AxisKind, OpAxes};

/// The axes of node `n` (its op's `DimMap` on its global types), as the solver's [`OpAxes`].
pub fn op_axes(g: &Graph, n: NodeId) -> OpAxes {
    let node = g.node(n);
    let ins: Vec<&TensorType> = node.inputs.iter().map(|&v| g.ty(v)).collect();
    let outs: Vec<&TensorType> = node.outputs.iter().map(|&v| g.ty(v)).collect();
    let dims = node.op.spec().dims(&ins, &outs);
    OpAxes {
        axes: dims
            .axes
            .iter()
            .map(|a| {
                let k = match a.kind {
                    OpAxisKind::Parallel => AxisKind::Parallel,
                    OpAxisKind::Contracted => AxisKind::Contracted,
                    OpAxisKind::Whole => AxisKind::Whole,
                    OpAxisKind::Statistics => AxisKind::Statistics,
                };
                (a.size, k)
            })
            .collect(),
        inputs: dims.inputs,
        outputs: dims.outputs,
    }
}

/// Roofline time of `cost` on one device of `cluster`: matmuls at the tensor-core rate of the
/// policy's dtype, other arithmetic at the fp32 vector rate, each scaled by the cluster's
/// efficiency factors (measured ones after `autopar profile`: bf16 and fp32 matmuls have their
/// own), against the HBM time of the bytes moved; the larger wins. The per-op overhead is not
/// in it: see [`sharded_seconds`].
pub fn compute_seconds(cost: &Cost, cluster: &Cluster, policy: DTypePolicy) -> f64 {
    let (peak, efficiency) = match policy {
        DTypePolicy::Fp32 => (cluster.peak_flops_fp32, cluster.matmul_efficiency_of(true)),
        DTypePolicy::Bf16Mixed => (cluster.peak_flops_bf16, cluster.matmul_efficiency_of(false)),
    };
    let vector_peak = cluster.peak_flops_fp32;
    let math = cost.matmul_flops / (peak * efficiency)
        + (cost.flops - cost.matmul_flops).max(0.0) / (vector_peak * cluster.vector_efficiency);
    let memory = (cost.bytes_read + cost.bytes_written)
        / (cluster.hbm_bandwidth * cluster.memory_efficiency);
    math.max(memory)
}

/// Seconds of one op on one device with its work split `divisor` ways: its roofline seconds
/// ([`compute_seconds`], forward plus backward) divided, plus the cluster's per-op overhead
/// (`op_overhead_s`: kernel launch and dispatch, 0 in presets) for each of its `launches`
/// (the forward, and the backward where there is one), which sharding does not divide. The
/// one rule the planner prices compute with.
pub fn sharded_seconds(roofline_s: f64, divisor: usize, launches: usize, cluster: &Cluster) -> f64 {
    roofline_s / divisor.max(1) as f64 + launches as f64 * cluster.op_overhead_s
}
