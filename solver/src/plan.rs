//! The plan: what the solver decided, as versioned serde JSON (the contract with the generator
//! and with users' tools). Node and value ids are the training graph's (`n12`, `v3`).

use crate::cluster::Cluster;
use crate::mesh::Mesh;
use crate::spec::ShardingSpec;
use serde::{Deserialize, Serialize};

/// Bumped on any incompatible change of the JSON.
pub const PLAN_SCHEMA_VERSION: u32 = 1;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    pub schema_version: u32,
    /// The model as the user named it (built-in name or file).
    pub model: String,
    /// `auto`, `dp`, `tp` or `fsdp`.
    pub family: String,
    pub mesh: Mesh,
    pub cluster: Cluster,
    /// `fp32` or `bf16_mixed`.
    pub dtype_policy: String,
    pub optimizer: String,
    /// Per-device memory budget the plan was solved for, bytes.
    pub memory_budget_bytes: Option<f64>,
    /// One entry per forward node of the training graph, in graph order.
    pub nodes: Vec<PlanNode>,
    /// Storage layout of every parameter (and data input).
    pub tensors: Vec<PlanTensor>,
    /// Every collective the plan inserts, in the order of the step.
    pub collectives: Vec<PlanCollective>,
    pub predicted: Prediction,
    pub solver: SolverReport,
    /// The activation-checkpointing schedule chosen for this plan, if any was asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<CheckpointPlan>,
}

/// Activation checkpointing on top of a sharding plan: the training step linearized into
/// stages (cut where one activation alone crosses), and the schedule of forward modes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CheckpointPlan {
    /// `rotor`, `chen` or `none`.
    pub strategy: String,
    /// Per stage, the name of its first forward node.
    pub stages: Vec<String>,
    pub schedule: crate::checkpoint::Schedule,
    /// Bytes per device left for activations (budget minus parameters, gradients, optimizer
    /// state and inputs).
    pub activation_budget_bytes: f64,
    /// Activation peak per device with this schedule, and with none.
    pub activation_peak_bytes: f64,
    pub activation_peak_without_bytes: f64,
    /// Forward time run again in the backward.
    pub recompute_s: f64,
    /// The plan's predicted step time plus the recomputation.
    pub step_s: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PlanNode {
    /// Training-graph node index (`n12` is 12).
    pub node: u32,
    pub name: String,
    pub op: String,
    /// Spec each input is consumed in.
    pub inputs: Vec<ShardingSpec>,
    /// Spec of each output after the node's own collectives.
    pub outputs: Vec<ShardingSpec>,
    /// `S0R = S0R x RR`.
    pub notation: String,
    /// Per mesh axis: which op axis it splits (`None`: replicated).
    pub assignment: Vec<Option<usize>>,
    /// Predicted forward + backward compute seconds of this node on one device.
    pub compute_s: f64,
    /// When this node was merged into another's decision (an elementwise follower), that node.
    pub follows: Option<u32>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TensorRole {
    Param,
    Input,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PlanTensor {
    /// Training-graph value index (`v3` is 3).
    pub value: u32,
    pub name: String,
    pub role: TensorRole,
    pub shape: Vec<usize>,
    pub spec: ShardingSpec,
    /// Bytes each device keeps for it (parameters: weights, gradients and optimizer state).
    pub bytes_per_device: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Forward,
    Backward,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PlanCollective {
    pub phase: Phase,
    /// The node whose input (or own output, for in-strategy collectives) it reshards.
    pub node: u32,
    /// The value resharded (its gradient, in the backward phase).
    pub value: u32,
    pub from: ShardingSpec,
    pub to: ShardingSpec,
    /// e.g. `all-gather(dim 0, axis 1)`.
    pub op: String,
    pub bytes: f64,
    pub time_s: f64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Prediction {
    /// Compute plus the communication not hidden behind it.
    pub step_s: f64,
    pub compute_s: f64,
    /// Exposed communication (`step_s - compute_s`).
    pub communication_s: f64,
    /// Parameter communication hidden behind compute.
    pub overlapped_s: f64,
    /// Largest per-device memory over the liveness points the solver checked.
    pub peak_memory_bytes: f64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SolverReport {
    pub backend: String,
    pub objective_s: f64,
    pub lower_bound_s: f64,
    pub gap: f64,
    /// `optimal` or `time_limit`.
    pub status: String,
    pub graph_nodes: usize,
    /// Decision nodes after merging followers and sharing repeated layers.
    pub problem_nodes: usize,
    pub problem_edges: usize,
    pub strategies: usize,
    pub memory_rows: usize,
    pub ilp_variables: usize,
    pub ilp_constraints: usize,
    pub shared_layers: bool,
    pub strategies_s: f64,
    pub build_s: f64,
    pub solve_s: f64,
    pub total_s: f64,
}
