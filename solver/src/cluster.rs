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
//!
//! What a profile run (`autopar profile`) adds, all optional so that presets and older files
//! stay valid:
//! - `collectives`: per collective kind, group size and link kind, an alpha-beta fit in the
//!   convention of the resharding cost formulas ([`CollectiveKind::seconds`], the one formula
//!   the solver prices and the profiler fits with). A fit's bandwidth is what the collective
//!   achieved, so `comm_efficiency` no longer applies to it; axes without a fit keep the
//!   link's latency and `bandwidth * comm_efficiency`.
//! - The measured bf16 matmul, fp32 matmul and copy rates become `matmul_efficiency`,
//!   `matmul_efficiency_fp32` and `memory_efficiency` against the base preset's peaks: the
//!   roofline keeps one rule (peak times efficiency) and MFU keeps the data-sheet peak.
//! - `op_overhead_s`: the time of a tiny kernel (launch and framework dispatch), which every
//!   op pays however small its shard; 0 in presets.

use crate::mesh::LinkKind;
use serde::{Deserialize, Serialize};
use std::fmt;
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
    /// Fraction of link bandwidth collectives reach (not applied to measured `collectives`).
    pub comm_efficiency: f64,
    /// Fraction of `peak_flops_fp32` fp32 matmuls reach, where it differs from
    /// `matmul_efficiency` (a profile run measures both); absent: `matmul_efficiency`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub matmul_efficiency_fp32: Option<f64>,
    /// Seconds every op costs on top of its roofline time (kernel launch and dispatch), which
    /// sharding does not divide. Measured by a profile run; 0 in presets.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub op_overhead_s: f64,
    /// Measured alpha-beta fits of collectives (`autopar profile`); empty in presets.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub collectives: Vec<CollectiveFit>,
}

fn is_zero(x: &f64) -> bool {
    *x == 0.0
}

/// The collectives of resharding that communicate; the kinds a profile run fits.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CollectiveKind {
    AllReduce,
    AllGather,
    ReduceScatter,
    AllToAll,
}

impl CollectiveKind {
    pub const ALL: [CollectiveKind; 4] = [
        CollectiveKind::AllReduce,
        CollectiveKind::AllGather,
        CollectiveKind::ReduceScatter,
        CollectiveKind::AllToAll,
    ];

    /// `all-reduce`, `all-gather`, `reduce-scatter`, `all-to-all`.
    pub fn name(self) -> &'static str {
        match self {
            CollectiveKind::AllReduce => "all-reduce",
            CollectiveKind::AllGather => "all-gather",
            CollectiveKind::ReduceScatter => "reduce-scatter",
            CollectiveKind::AllToAll => "all-to-all",
        }
    }

    /// Ring passes: 2 for all-reduce (reduce-scatter then all-gather), else 1.
    pub fn rounds(self) -> f64 {
        match self {
            CollectiveKind::AllReduce => 2.0,
            _ => 1.0,
        }
    }

    /// One ring pass over `n` devices: `(n-1) alpha + (n-1)/n * bytes / bandwidth`.
    pub fn round_seconds(n: usize, alpha_s: f64, bandwidth: f64, bytes: f64) -> f64 {
        let n = n as f64;
        (n - 1.0) * alpha_s + (n - 1.0) / n * bytes / bandwidth
    }

    /// Seconds of this collective over `n` devices for a payload of `bytes` per device (the
    /// all-gather result, reduce-scatter input, all-reduce or all-to-all buffer): `rounds` ring
    /// passes. The one formula behind the resharding prices (`reshard.rs`) and the profiler's
    /// fits, so that a fit plugs straight in.
    pub fn seconds(self, n: usize, alpha_s: f64, bandwidth: f64, bytes: f64) -> f64 {
        self.rounds() * CollectiveKind::round_seconds(n, alpha_s, bandwidth, bytes)
    }
}

impl fmt::Display for CollectiveKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A measured alpha-beta model of one collective kind over groups of `group_size` devices on
/// one kind of link: `seconds(bytes) = op.seconds(group_size, alpha_s, bandwidth, bytes)`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CollectiveFit {
    pub op: CollectiveKind,
    pub group_size: usize,
    pub link: LinkKind,
    /// Latency per ring step, seconds.
    pub alpha_s: f64,
    /// Achieved bus bandwidth per device, bytes/s (`comm_efficiency` does not apply).
    pub bandwidth: f64,
    /// Largest `|model - measured| / measured` over the measured sizes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_rel_residual: Option<f64>,
    /// Smallest and largest payload measured, bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_range: Option<[f64; 2]>,
    /// The measured `[bytes, seconds]` the fit came from (for checking and refitting).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub samples: Vec<[f64; 2]>,
}

/// An alpha-beta least-squares fit ([`fit_alpha_beta`]).
#[derive(Copy, Clone, Debug, PartialEq)]
pub struct AlphaBetaFit {
    pub alpha_s: f64,
    pub bandwidth: f64,
    /// Largest `|model - measured| / measured` over the samples.
    pub max_rel_residual: f64,
    /// The times did not grow with the size (all latency, within noise): the bandwidth is then
    /// the lower bound the largest sample implies (all of its time spent moving bytes), not a
    /// fitted value.
    pub bandwidth_bounded: bool,
}

/// Why samples could not be fitted.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum FitError {
    #[error("{op} over {n} devices: a fit needs a group of at least 2 devices")]
    GroupSize { op: CollectiveKind, n: usize },
    #[error("{op} over {n} devices: a fit needs at least 2 distinct sizes, got {sizes}")]
    TooFewSizes {
        op: CollectiveKind,
        n: usize,
        sizes: usize,
    },
    #[error("{op} over {n} devices: sample ({bytes} B, {seconds} s) is not positive and finite")]
    BadSample {
        op: CollectiveKind,
        n: usize,
        bytes: f64,
        seconds: f64,
    },
}

/// Fits `seconds = op.seconds(n, alpha, bandwidth, bytes)` to `(bytes, seconds)` samples.
///
/// The model is linear in `alpha` and `1 / bandwidth` once the ring factors are applied:
/// `t = a + c x` with `a = rounds (n-1) alpha`, `x = rounds (n-1)/n bytes`, `c = 1/bandwidth`.
/// Least squares weighted by `1/t^2`, i.e. on *relative* residuals: sizes span six orders of
/// magnitude, and plain least squares would fit the large sizes and ignore the latency the
/// small ones measure. Both coefficients are clamped to be non-negative (a negative intercept
/// refits the slope alone; a slope that is not positive, i.e. times flat within noise, takes
/// the largest sample's rate as a lower bound on the bandwidth, see
/// [`AlphaBetaFit::bandwidth_bounded`]).
pub fn fit_alpha_beta(
    op: CollectiveKind,
    n: usize,
    samples: &[(f64, f64)],
) -> Result<AlphaBetaFit, FitError> {
    if n < 2 {
        return Err(FitError::GroupSize { op, n });
    }
    for &(bytes, seconds) in samples {
        if !(bytes.is_finite() && bytes > 0.0 && seconds.is_finite() && seconds > 0.0) {
            return Err(FitError::BadSample {
                op,
                n,
                bytes,
                seconds,
            });
        }
    }
    let mut sizes: Vec<f64> = samples.iter().map(|s| s.0).collect();
    sizes.sort_by(f64::total_cmp);
    sizes.dedup();
    if sizes.len() < 2 {
        return Err(FitError::TooFewSizes {
            op,
            n,
            sizes: sizes.len(),
        });
    }
    let nf = n as f64;
    let ka = op.rounds() * (nf - 1.0);
    let kx = op.rounds() * (nf - 1.0) / nf;
    let (mut s0, mut s1, mut s2, mut t0, mut t1) = (0.0, 0.0, 0.0, 0.0, 0.0);
    for &(bytes, y) in samples {
        let (x, w) = (kx * bytes, 1.0 / (y * y));
        s0 += w;
        s1 += w * x;
        s2 += w * x * x;
        t0 += w * y;
        t1 += w * x * y;
    }
    let det = s0 * s2 - s1 * s1;
    let (mut a, mut c) = if det > 0.0 {
        ((s2 * t0 - s1 * t1) / det, (s0 * t1 - s1 * t0) / det)
    } else {
        (t0 / s0, 0.0)
    };
    if a < 0.0 {
        a = 0.0;
        c = t1 / s2;
    }
    let mut bounded = false;
    if c <= 0.0 || !c.is_finite() {
        // flat times: the largest sample bounds the bandwidth from below
        bounded = true;
        let (bytes, y) = samples
            .iter()
            .fold((0.0, 0.0), |m, &p| if p.0 > m.0 { p } else { m });
        c = y / (kx * bytes);
        a = ((t0 - c * s1) / s0).max(0.0);
    }
    let alpha_s = a / ka;
    let bandwidth = 1.0 / c;
    let max_rel_residual = samples
        .iter()
        .map(|&(bytes, y)| (op.seconds(n, alpha_s, bandwidth, bytes) - y).abs() / y)
        .fold(0.0, f64::max);
    Ok(AlphaBetaFit {
        alpha_s,
        bandwidth,
        max_rel_residual,
        bandwidth_bounded: bounded,
    })
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
    /// A measured collective fit out of range (`collectives[index]`).
    #[error("cluster {name:?}: collectives[{index}] ({op} over {group_size} devices, {link:?}): {field} = {value} {reason}")]
    InvalidFit {
        name: String,
        index: usize,
        op: CollectiveKind,
        group_size: usize,
        link: LinkKind,
        field: &'static str,
        value: f64,
        reason: &'static str,
    },
    /// Two fits for the same collective, group size and link kind.
    #[error("cluster {name:?}: collectives[{index}] repeats collectives[{first}] ({op} over {group_size} devices, {link:?})")]
    DuplicateFit {
        name: String,
        index: usize,
        first: usize,
        op: CollectiveKind,
        group_size: usize,
        link: LinkKind,
    },
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
            matmul_efficiency_fp32: None,
            op_overhead_s: 0.0,
            collectives: vec![],
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

    /// The measured fit for `op` over groups of `group_size` devices on `link`, if any.
    pub fn collective_fit(
        &self,
        op: CollectiveKind,
        group_size: usize,
        link: LinkKind,
    ) -> Option<&CollectiveFit> {
        self.collectives
            .iter()
            .find(|f| f.op == op && f.group_size == group_size && f.link == link)
    }

    /// The fraction of peak FLOP/s matmuls reach in fp32 (`matmul_efficiency_fp32`, else
    /// `matmul_efficiency`) or in bf16 (`matmul_efficiency`).
    pub fn matmul_efficiency_of(&self, fp32: bool) -> f64 {
        match self.matmul_efficiency_fp32 {
            Some(e) if fp32 => e,
            _ => self.matmul_efficiency,
        }
    }

    /// Range checks: rates and capacities positive and finite, latencies and the op overhead
    /// finite and not negative, efficiencies in (0, 1], at least one GPU per node, measured
    /// fits over at least 2 devices with a positive bandwidth and no two for the same
    /// collective, group size and link. The error names the field.
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
            ("op_overhead_s", self.op_overhead_s),
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
        let fp32 = self
            .matmul_efficiency_fp32
            .map(|e| ("matmul_efficiency_fp32", e));
        for (field, value) in fractions.into_iter().chain(fp32) {
            if !(value > 0.0 && value <= 1.0) {
                return bad(field, value, "must be in (0, 1]");
            }
        }
        if self.gpus_per_node == 0 {
            return bad("gpus_per_node", 0.0, "must be at least 1");
        }
        for (index, f) in self.collectives.iter().enumerate() {
            let bad = |field: &'static str, value: f64, reason: &'static str| {
                Err(ClusterError::InvalidFit {
                    name: self.name.clone(),
                    index,
                    op: f.op,
                    group_size: f.group_size,
                    link: f.link,
                    field,
                    value,
                    reason,
                })
            };
            if f.group_size < 2 {
                return bad("group_size", f.group_size as f64, "must be at least 2");
            }
            if !(f.alpha_s.is_finite() && f.alpha_s >= 0.0) {
                return bad("alpha_s", f.alpha_s, "must be finite and not negative");
            }
            if !(f.bandwidth.is_finite() && f.bandwidth > 0.0) {
                return bad("bandwidth", f.bandwidth, "must be positive and finite");
            }
            if let Some(r) = f.max_rel_residual {
                if !(r.is_finite() && r >= 0.0) {
                    return bad("max_rel_residual", r, "must be finite and not negative");
                }
            }
            if let Some([lo, hi]) = f.bytes_range {
                if !(lo.is_finite() && hi.is_finite() && 0.0 < lo && lo <= hi) {
                    return bad(
                        "bytes_range",
                        lo,
                        "must be finite sizes with 0 < smallest <= largest",
                    );
                }
            }
            if let Some(&[b, t]) = f
                .samples
                .iter()
                .find(|p| !(p[0].is_finite() && p[0] > 0.0 && p[1].is_finite() && p[1] > 0.0))
            {
                return bad(
                    "samples",
                    if b.is_finite() && b > 0.0 { t } else { b },
                    "must be positive and finite [bytes, seconds] pairs",
                );
            }
            if let Some(first) = self.collectives[..index]
                .iter()
                .position(|g| (g.op, g.group_size, g.link) == (f.op, f.group_size, f.link))
            {
                return Err(ClusterError::DuplicateFit {
                    name: self.name.clone(),
                    index,
                    first,
                    op: f.op,
                    group_size: f.group_size,
                    link: f.link,
                });
            }
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
    fn measured(base: &str) -> Cluster {
        let mut c = Cluster::preset(base).expect("preset");
        c.name = "lab".into();
        c.matmul_efficiency_fp32 = Some(0.6);
        c.op_overhead_s = 4e-6;
        c.collectives = vec![
            CollectiveFit {
                op: CollectiveKind::AllReduce,
                group_size: 2,
                link: LinkKind::IntraNode,
                alpha_s: 8e-6,
                bandwidth: 100e9,
                max_rel_residual: Some(0.05),
                bytes_range: Some([1024.0, 1073741824.0]),
                samples: vec![[1024.0, 8.2e-6], [1073741824.0, 0.0107]],
            },
            CollectiveFit {
                op: CollectiveKind::AllGather,
                group_size: 2,
                link: LinkKind::IntraNode,
                alpha_s: 3e-6,
                bandwidth: 200e9,
                max_rel_residual: None,
                bytes_range: None,
                samples: vec![],
            },
        ];
        c
    }

    #[test]
    fn fit_recovers_alpha_and_bandwidth() {
        for op in CollectiveKind::ALL {
            for n in [2, 4, 8] {
                let (alpha, bw) = (7e-6, 150e9);
                let samples: Vec<(f64, f64)> = (0..11)
                    .map(|k| {
                        let b = 1024.0 * 4f64.powi(k);
                        (b, op.seconds(n, alpha, bw, b))
                    })
                    .collect();
                let f = fit_alpha_beta(op, n, &samples).expect("fit");
                assert!((f.alpha_s - alpha).abs() / alpha < 1e-9, "{op} {n}: {f:?}");
                assert!((f.bandwidth - bw).abs() / bw < 1e-9, "{op} {n}: {f:?}");
                assert!(f.max_rel_residual < 1e-9 && !f.bandwidth_bounded);
            }
        }
        // +-5% noise, alternating: the fit stays close and reports the residual
        let op = CollectiveKind::AllReduce;
        let samples: Vec<(f64, f64)> = (0..11)
            .map(|k| {
                let b = 1024.0 * 4f64.powi(k);
                let noise = if k % 2 == 0 { 1.05 } else { 0.95 };
                (b, op.seconds(4, 10e-6, 300e9, b) * noise)
            })
            .collect();
        let f = fit_alpha_beta(op, 4, &samples).expect("fit");
        assert!((f.alpha_s - 10e-6).abs() / 10e-6 < 0.1, "{f:?}");
        assert!((f.bandwidth - 300e9).abs() / 300e9 < 0.1, "{f:?}");
        assert!(
            f.max_rel_residual > 0.04 && f.max_rel_residual < 0.1,
            "{f:?}"
        );
    }

    #[test]
    fn fit_clamps_to_non_negative() {
        let op = CollectiveKind::AllGather;
        // pure bandwidth with a negative-looking intercept: alpha clamps to 0
        let samples = [(1e3, 0.9e-8), (1e6, 1e-5), (1e9, 1e-2)];
        let f = fit_alpha_beta(op, 2, &samples).expect("fit");
        assert_eq!(f.alpha_s, 0.0);
        assert!(f.bandwidth > 0.0 && f.bandwidth.is_finite(), "{f:?}");
        // flat (latency-bound) times: a finite bandwidth bound from the largest sample
        let samples = [(1e3, 2.1e-5), (4e3, 2e-5), (16e3, 1.9e-5)];
        let f = fit_alpha_beta(op, 2, &samples).expect("fit");
        assert!(f.bandwidth_bounded, "{f:?}");
        assert_eq!(f.bandwidth, 0.5 * 16e3 / 1.9e-5);
        assert!(f.alpha_s >= 0.0 && f.alpha_s.is_finite());
        // errors name the collective
        let e = fit_alpha_beta(op, 2, &[(1e3, 1e-5), (1e3, 2e-5)]).expect_err("one size");
        assert!(e.to_string().contains("all-gather over 2 devices"), "{e}");
        assert!(fit_alpha_beta(op, 1, &samples).is_err());
        assert!(fit_alpha_beta(op, 2, &[(1e3, 0.0), (2e3, 1e-5)]).is_err());
    }

    #[test]
    fn measured_fields_round_trip_and_old_files_load() {
        let c = measured("h100");
        c.validate().expect("valid");
        let back = Cluster::from_json(&c.to_json(), "<json>").expect("round trip");
        assert_eq!(back, c);
        // a file without the new fields (as written before profiling existed) still loads
        let old = Cluster::preset("h100").expect("preset");
        let mut v: serde_json::Value = serde_json::from_str(&old.to_json()).expect("json");
        for f in ["matmul_efficiency_fp32", "op_overhead_s", "collectives"] {
            assert!(v.get(f).is_none(), "presets write no {f}");
        }
        v.as_object_mut().expect("object").remove("collectives");
        assert_eq!(
            Cluster::from_json(&v.to_string(), "old.json").expect("old"),
            old
        );
        assert_eq!(c.matmul_efficiency_of(true), 0.6);
        assert_eq!(c.matmul_efficiency_of(false), 0.7);
        assert_eq!(old.matmul_efficiency_of(true), 0.7);
    }

    #[test]
    fn bad_measured_values_are_named() {
        let c = measured("h100");
        let v: serde_json::Value = serde_json::from_str(&c.to_json()).expect("json");
        let cases: [(&str, serde_json::Value); 7] = [
            ("/op_overhead_s", serde_json::json!(-1e-6)),
            ("/matmul_efficiency_fp32", serde_json::json!(1.5)),
            ("/collectives/1/bandwidth", serde_json::json!(0.0)),
            ("/collectives/0/alpha_s", serde_json::json!(-1.0)),
            ("/collectives/1/group_size", serde_json::json!(1)),
            ("/collectives/0/max_rel_residual", serde_json::json!(-0.5)),
            (
                "/collectives/0/samples",
                serde_json::json!([[1024.0, -1.0]]),
            ),
        ];
        for (ptr, value) in cases {
            let mut w = v.clone();
            *w.pointer_mut(ptr).expect("field") = value;
            let e = Cluster::from_json(&w.to_string(), "x.json").expect_err(ptr);
            let field = ptr.rsplit('/').next().expect("name");
            assert!(e.to_string().contains(field), "{ptr}: {e}");
            if ptr == "/collectives/1/bandwidth" {
                assert!(
                    e.to_string()
                        .contains("collectives[1] (all-gather over 2 devices"),
                    "{e}"
                );
            }
        }
        let mut w = v.clone();
        w["collectives"][1]["op"] = serde_json::json!("all_reduce");
        let e = Cluster::from_json(&w.to_string(), "x.json").expect_err("duplicate");
        assert!(
            e.to_string()
                .contains("collectives[1] repeats collectives[0]"),
            "{e}"
        );
        let mut w = v.clone();
        w["collectives"][0]["op"] = serde_json::json!("broadcast");
        let e = Cluster::from_json(&w.to_string(), "x.json").expect_err("unknown kind");
        assert!(e.to_string().contains("broadcast"), "{e}");
    }

    #[test]
    fn pricing_uses_the_measured_fit() {
        use crate::mesh::Mesh;
        use crate::reshard::{collective_cost, latency_part, Collective};
        use crate::ShardingSpec;
        let c = measured("h100");
        let preset = Cluster::preset("h100").expect("preset");
        let m = Mesh::on_cluster(vec![2], &c, 8).expect("mesh");
        let p = Mesh::on_cluster(vec![2], &preset, 8).expect("mesh");
        let partial: ShardingSpec = "R+P0".parse().expect("spec");
        let split: ShardingSpec = "S0".parse().expect("spec");
        let eff = c.comm_efficiency;
        let shape = [1 << 20];
        let bytes = 4.0 * (1 << 20) as f64;
        // all-reduce: the fit (8 us, 100 GB/s achieved, no efficiency on top)
        let ar = Collective::AllReduce { axis: 0 };
        let (b, s) = collective_cost(&ar, &partial, &shape, 4, &m, eff);
        assert_eq!(b, bytes);
        let want = 2.0 * (8e-6 + 0.5 * bytes / 100e9);
        assert!((s - want).abs() < 1e-15, "{s} vs {want}");
        assert_eq!(latency_part(&ar, &m), 2.0 * 8e-6);
        // all-gather: its own fit
        let ag = Collective::AllGather { dim: 0, axis: 0 };
        let (b, s) = collective_cost(&ag, &split, &shape, 4, &m, eff);
        assert!((s - (3e-6 + 0.5 * b / 200e9)).abs() < 1e-15);
        // reduce-scatter: no fit, the preset's link
        let rs = Collective::ReduceScatter { dim: 0, axis: 0 };
        assert_eq!(
            collective_cost(&rs, &partial, &shape, 4, &m, eff),
            collective_cost(&rs, &partial, &shape, 4, &p, eff)
        );
        // a 4-device axis has no fit (only group size 2 was measured): the preset everywhere
        let m4 = Mesh::on_cluster(vec![4], &c, 8).expect("mesh");
        let p4 = Mesh::on_cluster(vec![4], &preset, 8).expect("mesh");
        assert_eq!(m4, p4);
        // nor does an inter-node axis of 2
        let m2x8 = Mesh::on_cluster(vec![2, 8], &c, 8).expect("mesh");
        assert!(m2x8.links[0].measured.is_empty());
        assert_eq!(m2x8.links[0].kind, LinkKind::InterNode);
        // the search prices paths with the fit too
        let t = crate::reshard::transition(&partial, &split, &shape, 4, &m, eff).expect("path");
        let tp = crate::reshard::transition(&partial, &split, &shape, 4, &p, eff).expect("path");
        assert_eq!(t.steps.len(), 1);
        assert_eq!(t.cost_s, tp.cost_s, "reduce-scatter has no fit");
        // the measured all-reduce (58 us) is slower than the preset's reduce-scatter plus the
        // measured all-gather: the cheapest path to replicated changes with the fits
        let r = ShardingSpec::replicated(1);
        let t = crate::reshard::transition(&partial, &r, &shape, 4, &m, eff).expect("path");
        let tp = crate::reshard::transition(&partial, &r, &shape, 4, &p, eff).expect("path");
        assert_eq!(tp.steps.len(), 1, "{tp}");
        assert_eq!(t.steps.len(), 2, "{t}");
        let rs_s = collective_cost(&rs, &partial, &shape, 4, &p, eff).1;
        let ag_s = 3e-6 + 0.5 * bytes / 200e9;
        assert!(
            (t.cost_s - (rs_s + ag_s)).abs() < 1e-15 && t.cost_s < want,
            "{t}"
        );
    }
}
