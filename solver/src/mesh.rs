//! The logical device mesh: an N-D grid of devices, each axis with its own link model.
//!
//! `--mesh 2x4` is 8 devices in a 2 x 4 grid, row-major: device `d` has coordinates
//! `(d / 4, d % 4)`. Axes are mapped onto the physical hierarchy from the innermost outward:
//! the last axes span the GPUs of one node (NVLink) as long as their product divides the GPUs
//! per node; an axis that crosses nodes uses the inter-node network. Each axis gets an
//! alpha-beta link (latency, bandwidth) from the cluster, so collectives over different axes
//! cost differently. Where the cluster was profiled (`autopar profile`) for the axis's group
//! size and link kind, the link also carries the measured alpha-beta of each collective kind,
//! which replaces the link's own for that kind.

use crate::cluster::{Cluster, CollectiveKind};
use serde::{Deserialize, Serialize};

/// Index of a mesh axis.
pub type MeshAxis = usize;

/// Which physical link an axis runs over.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LinkKind {
    /// Inside a node (NVLink / NVSwitch).
    IntraNode,
    /// Across nodes (InfiniBand / Ethernet).
    InterNode,
}

/// Alpha-beta model of collectives over one mesh axis.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Link {
    pub kind: LinkKind,
    /// Latency per collective step, seconds.
    pub alpha_s: f64,
    /// Bus bandwidth per device, bytes per second.
    pub bandwidth: f64,
    /// Measured alpha-beta per collective kind (from the cluster's `collectives`), used
    /// instead of `alpha_s` and `bandwidth * comm_efficiency` for that kind.
    #[serde(default, skip_serializing_if = "LinkFits::is_empty")]
    pub measured: LinkFits,
}

/// A measured latency and achieved bandwidth.
#[derive(Copy, Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AlphaBeta {
    /// Latency per ring step, seconds.
    pub alpha_s: f64,
    /// Achieved bus bandwidth per device, bytes per second.
    pub bandwidth: f64,
}

/// Measured alpha-beta of each collective kind over one axis (none in presets).
#[derive(Copy, Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LinkFits {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub all_reduce: Option<AlphaBeta>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub all_gather: Option<AlphaBeta>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reduce_scatter: Option<AlphaBeta>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub all_to_all: Option<AlphaBeta>,
}

impl LinkFits {
    pub fn get(&self, op: CollectiveKind) -> Option<AlphaBeta> {
        match op {
            CollectiveKind::AllReduce => self.all_reduce,
            CollectiveKind::AllGather => self.all_gather,
            CollectiveKind::ReduceScatter => self.reduce_scatter,
            CollectiveKind::AllToAll => self.all_to_all,
        }
    }
    pub fn set(&mut self, op: CollectiveKind, fit: Option<AlphaBeta>) {
        match op {
            CollectiveKind::AllReduce => self.all_reduce = fit,
            CollectiveKind::AllGather => self.all_gather = fit,
            CollectiveKind::ReduceScatter => self.reduce_scatter = fit,
            CollectiveKind::AllToAll => self.all_to_all = fit,
        }
    }
    pub fn is_empty(&self) -> bool {
        CollectiveKind::ALL.iter().all(|&op| self.get(op).is_none())
    }
    /// The cluster's fits for groups of `group_size` devices on `link`.
    pub fn from_cluster(cluster: &Cluster, group_size: usize, link: LinkKind) -> LinkFits {
        let mut fits = LinkFits::default();
        for op in CollectiveKind::ALL {
            fits.set(
                op,
                cluster
                    .collective_fit(op, group_size, link)
                    .map(|f| AlphaBeta {
                        alpha_s: f.alpha_s,
                        bandwidth: f.bandwidth,
                    }),
            );
        }
        fits
    }
}

impl Link {
    /// The latency and bandwidth `op` sees on this link: the measured fit when there is one
    /// (its bandwidth already achieved), else `alpha_s` and `bandwidth * comm_efficiency`.
    pub fn alpha_beta(&self, op: CollectiveKind, comm_efficiency: f64) -> (f64, f64) {
        match self.measured.get(op) {
            Some(f) => (f.alpha_s, f.bandwidth),
            None => (self.alpha_s, self.bandwidth * comm_efficiency),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Mesh {
    pub shape: Vec<usize>,
    pub links: Vec<Link>,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum MeshError {
    #[error("bad mesh {0:?}: expected sizes separated by 'x', e.g. 8, 2x4 or 2x2x2")]
    Syntax(String),
    #[error("bad mesh {0:?}: every axis must have at least 1 device")]
    Empty(String),
    #[error("mesh {mesh} has {devices} devices: with {gpus_per_node} GPUs per node, an axis must fit within a node or span whole nodes")]
    Hierarchy {
        mesh: String,
        devices: usize,
        gpus_per_node: usize,
    },
}

impl Mesh {
    /// Parses `8`, `2x4`, `2x2x2` (sizes only; links from [`Mesh::on_cluster`]).
    pub fn parse_shape(s: &str) -> Result<Vec<usize>, MeshError> {
        let shape: Vec<usize> = s
            .trim()
            .split(['x', 'X'])
            .map(|p| p.trim().parse::<usize>())
            .collect::<Result<_, _>>()
            .map_err(|_| MeshError::Syntax(s.to_string()))?;
        if shape.is_empty() {
            return Err(MeshError::Syntax(s.to_string()));
        }
        if shape.contains(&0) {
            return Err(MeshError::Empty(s.to_string()));
        }
        Ok(shape)
    }

    /// A mesh of `shape` on `cluster` with `gpus_per_node` GPUs per node: axes are assigned to
    /// NVLink from the last axis inward while they fit in a node, the rest to the network.
    /// Each axis takes the cluster's measured fits for its size and link kind, if any.
    pub fn on_cluster(
        shape: Vec<usize>,
        cluster: &Cluster,
        gpus_per_node: usize,
    ) -> Result<Mesh, MeshError> {
        let name = shape
            .iter()
            .map(|s| s.to_string())
            .collect::<Vec<_>>()
            .join("x");
        let gpn = gpus_per_node.max(1);
        let mut inner = 1usize;
        let mut links = vec![];
        let mut crossed = false;
        for &n in shape.iter().rev() {
            let kind = if !crossed && inner * n <= gpn {
                // fits in one node (a mesh may use fewer GPUs than a node has)
                inner *= n;
                LinkKind::IntraNode
            } else {
                // an axis that crosses nodes must span whole nodes
                if !crossed && n > 1 && (inner * n) % gpn != 0 {
                    return Err(MeshError::Hierarchy {
                        mesh: name.clone(),
                        devices: shape.iter().product(),
                        gpus_per_node: gpn,
                    });
                }
                crossed = crossed || n > 1;
                LinkKind::InterNode
            };
            let (alpha_s, bandwidth) = match kind {
                LinkKind::IntraNode => (cluster.intra_node_latency_s, cluster.intra_node_bandwidth),
                LinkKind::InterNode => (cluster.inter_node_latency_s, cluster.inter_node_bandwidth),
            };
            links.push(Link {
                kind,
                alpha_s,
                bandwidth,
                measured: LinkFits::from_cluster(cluster, n, kind),
            });
        }
        links.reverse();
        Ok(Mesh { shape, links })
    }

    pub fn num_devices(&self) -> usize {
        self.shape.iter().product()
    }
    pub fn ndim(&self) -> usize {
        self.shape.len()
    }
    pub fn axis_size(&self, a: MeshAxis) -> usize {
        self.shape[a]
    }
    /// Coordinates of device `d` (row-major).
    pub fn coords(&self, d: usize) -> Vec<usize> {
        let mut c = vec![0; self.shape.len()];
        let mut r = d;
        for i in (0..self.shape.len()).rev() {
            c[i] = r % self.shape[i];
            r /= self.shape[i];
        }
        c
    }
    /// `2x4`.
    pub fn name(&self) -> String {
        self.shape
            .iter()
            .map(|s| s.to_string())
            .collect::<Vec<_>>()
            .join("x")
    }
}
