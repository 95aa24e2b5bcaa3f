//! Cluster descriptions: a device's peak rates and memory, and the links between devices.
//! Presets come from vendor data sheets (named in `source`); a JSON file (measured by
//! `autopar profile`, issue 6) can replace them.
//!
//! Why presets at all: the solver prices strategies in seconds and bytes, so it needs rates;
//! a user without a profile run still gets plans ranked by the hardware they name.
//!
//! What is data sheet and what is estimate:
//! - Peak FLOP/s, HBM bandwidth and capacity, NVLink and NIC rates are the vendor's numbers.
//!   Memory is in bytes with the data sheets' decimal GB (1 GB = 1e9 bytes): `80 GB` is
//!   `80e9`. The usable capacity `nvidia-smi` reports is a little larger (81559 MiB on an H100
//!   80GB), so the preset is slightly conservative.
//! - NVLink is quoted as total bidirectional bandwidth (900 GB/s on H100); a collective's bus
//!   bandwidth is one direction, so the presets use half (450 GB/s). The network is one NIC per
//!   GPU (ConnectX-7 400 Gb/s = 50 GB/s on H100/H200, HDR 200 Gb/s = 25 GB/s on A100).
//! - Latencies and efficiency factors are *estimates*, not data-sheet numbers (`source` says
//!   so). Latency is per ring step, and only matters for small messages, for which NCCL
//!   picks its LL protocol: its tuning model (`src/graph/tuning.cc`) charges about 0.6 us per
//!   LL step on NVLink and 5 us on the network, plus a 6.8 us base per call; spreading the
//!   base over the 14 steps of an 8-GPU ring all-reduce gives about 1.1 us intra-node and
//!   5.5 us inter-node. Efficiencies: large bf16 GEMMs reach about 70% of dense peak with cuBLAS
//!   (matmul 0.7); elementwise and reduction kernels are memory-bound and rarely near peak
//!   arithmetic (vector 0.5); streaming kernels reach about 80% of HBM bandwidth (memory 0.8);
//!   nccl-tests bus bandwidth on NVLink and InfiniBand is about 80% of the link rate
//!   (comm 0.8). A profile run replaces all of these with measurements.

use serde::{Deserialize, Serialize};
use std::path::Path;

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

/// Why a cluster description could not be had.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("cluster file {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// Malformed JSON, a missing field (serde names it) or a value of the wrong type.
    #[error("cluster {origin}: {message}")]
    Parse { origin: String, message: String },
    /// A field out of range: a rate or capacity that is not positive, a negative latency, an
    /// efficiency outside (0, 1].
    #[error("cluster {name:?}: {field} = {value} {reason}")]
    Invalid {
        name: String,
        field: &'static str,
        value: f64,
        reason: &'static str,
    },
    #[error("{name:?} is neither a cluster preset ({presets}) nor a readable cluster file")]
    NotFound { name: String, presets: String },
}

/// Estimated, shared by every preset (see the module doc for the reasoning).
const INTRA_NODE_LATENCY_S: f64 = 1.1e-6;
const INTER_NODE_LATENCY_S: f64 = 5.5e-6;
const MATMUL_EFFICIENCY: f64 = 0.7;
const VECTOR_EFFICIENCY: f64 = 0.5;
const MEMORY_EFFICIENCY: f64 = 0.8;
const COMM_EFFICIENCY: f64 = 0.8;
const ESTIMATES: &str =
    "latencies (1.1 us intra-node, 5.5 us inter-node per ring step, NCCL LL) and \
     efficiencies (matmul 0.7, vector 0.5, memory 0.8, comm 0.8) are estimates";

impl Cluster {
    /// Names [`Cluster::preset`] knows.
    pub const PRESETS: [&'static str; 3] = ["h100", "h200", "a100"];

    /// A preset by name (case-insensitive): `h100` (H100 SXM5 80GB), `h200` (H200 SXM 141GB),
    /// `a100` (A100 SXM4 80GB); 8 GPUs per node, one NIC per GPU.
    pub fn preset(name: &str) -> Option<Cluster> {
        let base = |name: &str, source: String| Cluster {
            name: name.to_string(),
            source,
            peak_flops_bf16: 0.0,
            peak_flops_fp32: 0.0,
            hbm_bandwidth: 0.0,
            hbm_bytes: 0.0,
            gpus_per_node: 8,
            intra_node_bandwidth: 0.0,
            intra_node_latency_s: INTRA_NODE_LATENCY_S,
            inter_node_bandwidth: 0.0,
            inter_node_latency_s: INTER_NODE_LATENCY_S,
            matmul_efficiency: MATMUL_EFFICIENCY,
            vector_efficiency: VECTOR_EFFICIENCY,
            memory_efficiency: MEMORY_EFFICIENCY,
            comm_efficiency: COMM_EFFICIENCY,
        };
        match name.trim().to_ascii_lowercase().as_str() {
            "h100" => Some(Cluster {
                peak_flops_bf16: 989.4e12,
                peak_flops_fp32: 67e12,
                hbm_bandwidth: 3.35e12,
                hbm_bytes: 80e9,
                intra_node_bandwidth: 450e9,
                inter_node_bandwidth: 50e9,
                ..base(
                    "h100",
                    format!(
                        "NVIDIA H100 Tensor Core GPU datasheet (SXM5): bf16 dense 989.4 TFLOP/s, fp32 67 \
                         TFLOP/s, HBM3 3.35 TB/s, 80 GB (1e9 bytes), NVLink 4 900 GB/s bidirectional (450 \
                         GB/s per direction); NVIDIA ConnectX-7 400 Gb/s per GPU; {ESTIMATES}"
                    ),
                )
            }),
            "h200" => Some(Cluster {
                peak_flops_bf16: 989.4e12,
                peak_flops_fp32: 67e12,
                hbm_bandwidth: 4.8e12,
                hbm_bytes: 141e9,
                intra_node_bandwidth: 450e9,
                inter_node_bandwidth: 50e9,
                ..base(
                    "h200",
                    format!(
                        "NVIDIA H200 Tensor Core GPU datasheet (SXM): bf16 dense 989.4 TFLOP/s, fp32 67 \
                         TFLOP/s, HBM3e 4.8 TB/s, 141 GB (1e9 bytes), NVLink 4 900 GB/s bidirectional (450 \
                         GB/s per direction); NVIDIA ConnectX-7 400 Gb/s per GPU; {ESTIMATES}"
                    ),
                )
            }),
            "a100" => Some(Cluster {
                peak_flops_bf16: 312e12,
                peak_flops_fp32: 19.5e12,
                hbm_bandwidth: 2.039e12,
                hbm_bytes: 80e9,
                intra_node_bandwidth: 300e9,
                inter_node_bandwidth: 25e9,
                ..base(
                    "a100",
                    format!(
                        "NVIDIA A100 Tensor Core GPU datasheet (SXM4 80GB): bf16 dense 312 TFLOP/s, fp32 \
                         19.5 TFLOP/s, HBM2e 2.039 TB/s, 80 GB (1e9 bytes), NVLink 3 600 GB/s bidirectional \
                         (300 GB/s per direction); HDR InfiniBand 200 Gb/s per GPU; {ESTIMATES}"
                    ),
                )
            }),
            _ => None,
        }
    }

    /// Parses and checks a cluster from JSON text; `origin` names it in errors (a path, or
    /// `"<json>"`).
    pub fn from_json(text: &str, origin: &str) -> Result<Cluster, ClusterError> {
        let cluster: Cluster = serde_json::from_str(text).map_err(|e| ClusterError::Parse {
            origin: origin.to_string(),
            message: e.to_string(),
        })?;
        cluster.validate()?;
        Ok(cluster)
    }

    /// Reads and checks a cluster file (the format [`Cluster::to_json`] writes).
    pub fn from_json_file(path: impl AsRef<Path>) -> Result<Cluster, ClusterError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| ClusterError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Cluster::from_json(&text, &path.display().to_string())
    }

    /// A preset name (`h100`), else the path of a cluster file.
    pub fn load(name_or_path: &str) -> Result<Cluster, ClusterError> {
        if let Some(c) = Cluster::preset(name_or_path) {
            return Ok(c);
        }
        if Path::new(name_or_path).is_file() {
            return Cluster::from_json_file(name_or_path);
        }
        Err(ClusterError::NotFound {
            name: name_or_path.to_string(),
            presets: Cluster::PRESETS.join(", "),
        })
    }

    /// Pretty JSON, the format [`Cluster::from_json_file`] reads.
    pub fn to_json(&self) -> String {
        // Serializing a struct of strings and numbers into a String cannot fail (serde_json
        // writes non-finite floats as null); the fallback only keeps this function total.
        serde_json::to_string_pretty(self)
            .unwrap_or_else(|e| format!("{{\"error\": {:?}}}", e.to_string()))
    }

    /// Range checks: rates and capacities positive and finite, latencies finite and not
    /// negative, efficiencies in (0, 1], at least one GPU per node. The error names the field.
    pub fn validate(&self) -> Result<(), ClusterError> {
        let bad = |field: &'static str, value: f64, reason: &'static str| {
            Err(ClusterError::Invalid {
                name: self.name.clone(),
                field,
                value,
                reason,
            })
        };
        let positive = [
            ("peak_flops_bf16", self.peak_flops_bf16),
            ("peak_flops_fp32", self.peak_flops_fp32),
            ("hbm_bandwidth", self.hbm_bandwidth),
            ("hbm_bytes", self.hbm_bytes),
            ("intra_node_bandwidth", self.intra_node_bandwidth),
            ("inter_node_bandwidth", self.inter_node_bandwidth),
        ];
        for (field, value) in positive {
            if !(value.is_finite() && value > 0.0) {
                return bad(field, value, "must be positive and finite");
            }
        }
        for (field, value) in [
            ("intra_node_latency_s", self.intra_node_latency_s),
            ("inter_node_latency_s", self.inter_node_latency_s),
        ] {
            if !(value.is_finite() && value >= 0.0) {
                return bad(field, value, "must be finite and not negative");
            }
        }
        let fractions = [
            ("matmul_efficiency", self.matmul_efficiency),
            ("vector_efficiency", self.vector_efficiency),
            ("memory_efficiency", self.memory_efficiency),
            ("comm_efficiency", self.comm_efficiency),
        ];
        for (field, value) in fractions {
            if !(value > 0.0 && value <= 1.0) {
                return bad(field, value, "must be in (0, 1]");
            }
        }
        if self.gpus_per_node == 0 {
            return bad("gpus_per_node", 0.0, "must be at least 1");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_are_valid_and_round_trip() {
        for name in Cluster::PRESETS {
            let c = Cluster::preset(name).expect("preset");
            c.validate().expect("valid");
            assert_eq!(c.name, name);
            assert!(
                c.source.contains("datasheet") && c.source.contains("estimates"),
                "{}",
                c.source
            );
            let back = Cluster::from_json(&c.to_json(), "<json>").expect("round trip");
            assert_eq!(back, c);
        }
        assert_eq!(Cluster::preset("H100").map(|c| c.hbm_bytes), Some(80e9));
        assert!(Cluster::preset("v100").is_none());
        let h200 = Cluster::preset("h200").expect("preset");
        assert_eq!((h200.hbm_bandwidth, h200.hbm_bytes), (4.8e12, 141e9));
        let a100 = Cluster::preset("a100").expect("preset");
        assert_eq!(
            (
                a100.peak_flops_bf16,
                a100.intra_node_bandwidth,
                a100.inter_node_bandwidth
            ),
            (312e12, 300e9, 25e9)
        );
    }

    #[test]
    fn errors_name_the_field() {
        let c = Cluster::preset("h100").expect("preset");
        let mut v: serde_json::Value = serde_json::from_str(&c.to_json()).expect("json");
        v.as_object_mut().expect("object").remove("hbm_bytes");
        let e = Cluster::from_json(&v.to_string(), "x.json").expect_err("missing field");
        assert!(e.to_string().contains("missing field `hbm_bytes`"), "{e}");
        assert!(e.to_string().contains("x.json"), "{e}");

        for (field, value) in [
            ("intra_node_bandwidth", -1.0),
            ("peak_flops_fp32", 0.0),
            ("comm_efficiency", 1.5),
        ] {
            let mut v: serde_json::Value = serde_json::from_str(&c.to_json()).expect("json");
            v[field] = serde_json::json!(value);
            let e = Cluster::from_json(&v.to_string(), "x.json").expect_err("bad value");
            assert!(e.to_string().contains(field), "{e}");
        }
        let e = Cluster::load("no/such/cluster.json").expect_err("not found");
        assert!(e.to_string().contains("h100, h200, a100"), "{e}");
    }

    #[test]
    fn loads_a_file() {
        let mut c = Cluster::preset("a100").expect("preset");
        c.name = "lab".into();
        c.source = "measured by autopar profile on lab".into();
        let path =
            std::env::temp_dir().join(format!("autopar-cluster-test-{}.json", std::process::id()));
        std::fs::write(&path, c.to_json()).expect("write");
        let back = Cluster::load(&path.display().to_string());
        let _ = std::fs::remove_file(&path);
        assert_eq!(back.expect("loads"), c);
    }
}
