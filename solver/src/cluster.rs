//! Cluster descriptions: a device's peak rates and memory, and the links between devices.
//! Presets come from vendor data sheets (named in `source`); a JSON file (measured by
//! `autopar profile`, issue 6) can replace them.

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Cluster {
    /// `h100`, `a100`, or the file's name.
    pub name: String,
    /// Where the numbers come from (data sheet, or "measured by autopar profile on ...").
    pub source: String,
    /// Dense bf16 tensor-core peak, FLOP/s.
    pub peak_flops_bf16: f64,
    /// fp32 peak without TF32 (PyTorch's default for matmul), FLOP/s.
    pub peak_flops_fp32: f64,
    /// HBM bandwidth, bytes/s.
    pub hbm_bandwidth: f64,
    /// HBM capacity, bytes.
    pub hbm_bytes: f64,
    pub gpus_per_node: usize,
    /// Per-GPU bus bandwidth inside a node (one direction), bytes/s.
    pub intra_node_bandwidth: f64,
    pub intra_node_latency_s: f64,
    /// Per-GPU network bandwidth across nodes (one direction), bytes/s.
    pub inter_node_bandwidth: f64,
    pub inter_node_latency_s: f64,
    /// Fraction of peak FLOP/s matmuls reach (roofline efficiency factor).
    pub matmul_efficiency: f64,
    /// Fraction of peak FLOP/s other arithmetic reaches.
    pub vector_efficiency: f64,
    /// Fraction of HBM bandwidth memory-bound kernels reach.
    pub memory_efficiency: f64,
    /// Fraction of link bandwidth collectives reach.
    pub comm_efficiency: f64,
}
