//! From a training graph to a sharding plan: the bridge between the analyzer's graph and the
//! solver's plain-number `Problem` (the solver itself never sees a graph).
//!
//! Steps:
//! 1. **Strategies.** Every forward node gets the strategies of its op on the mesh, enumerated
//!    generically from its `DimMap` (`solver::strategy::enumerate`). Parameters and data
//!    inputs are decisions too: their storage layout (replicated, or sharded ZeRO-3 / FSDP
//!    style, which puts all-gathers before use and reduce-scatters of gradients on the edges).
//! 2. **Followers.** An elementwise node whose only non-constant input comes from another
//!    forward node takes that input's layout: it is merged into the producer's decision and
//!    adds its compute to it.
//! 3. **Shared layers.** Nodes in repeated blocks (names with a `.N` layer segment, same op,
//!    same types, same position in their block) share one decision: costs and memory are
//!    counted once per copy, edges between copies become edges (or self-edges) of the shared
//!    decisions. `PlanOptions::share_layers` turns this off.
//! 4. **Edges.** For each input of each node: forward, the transition from the producer's
//!    layout to the layout the consumer's strategy needs; backward, the transition of the
//!    gradient (a partial sum over the axes the consumer's strategy leaves it partial on) back
//!    to the producer's layout; for a sharded parameter, its all-gather once more in the
//!    backward (FSDP frees gathered parameters after the forward). All priced by the one
//!    resharding function, `Resharder::transition`.
//!    Parameter traffic (FSDP all-gathers, gradient all-reduce / reduce-scatter) runs on its
//!    own stream, overlapped with compute as DDP and FSDP2 do: the problem marks it hideable
//!    and the compute as cover, so only what exceeds the compute is exposed. Activation
//!    collectives (tensor / sequence parallel) stay on the critical path.
//! 5. **Memory rows** at the liveness points where the single-device step holds the most
//!    bytes: every value live there costs its per-device size under the chosen layouts, plus
//!    parameters, gradients and optimizer state in their storage layouts.
//! 6. **Solve** the ILP, then read the plan back: every node's specs, every collective with its
//!    bytes and seconds, the predicted step time and peak memory.

use crate::Error;
use autopar_analyzer::graph::{Graph, NodeId, ValueDef, ValueId};
use autopar_analyzer::ops::Cost;
use autopar_analyzer::profile::Profile;
use autopar_analyzer::train::{param_bytes_per_element, DTypePolicy, Optimizer, TrainingGraph};
use autopar_generator::bridge::{compute_seconds, op_axes, sharded_seconds};
use autopar_solver::cluster::Cluster;
use autopar_solver::ilp::{self, Backend, SolveOptions};
use autopar_solver::mesh::Mesh;
use autopar_solver::plan::{
    Phase as PlanPhase, Plan, PlanCollective, PlanNode, PlanTensor, Prediction, SolverReport,
    TensorRole, PLAN_SCHEMA_VERSION,
};
use autopar_solver::problem::{MemoryRow, Overlap, Problem, ProblemEdge, ProblemNode, Solution};
use autopar_solver::reshard::Resharder;
use autopar_solver::spec::ShardingSpec;
use autopar_solver::strategy::{self, AxisKind, Strategy};
use std::collections::HashMap;
use std::time::Instant;

/// Which plans the solver may pick.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub enum Family {
    /// Any strategy (the ILP's choice).
    #[default]
    Auto,
    /// Pure data parallel: every op split on its batch axis over all mesh axes, parameters
    /// replicated (gradients all-reduced).
    Dp,
    /// Megatron-style tensor parallel on the last mesh axis, data parallel on the others:
    /// the tensor-parallel axis may split weights, heads and features but never the batch or
    /// the token sequence; the ILP places the splits (column / row parallel) at least cost;
    /// parameters are replicated over the data-parallel axes.
    Tp,
    /// Fully sharded data parallel: data parallel compute, parameters stored sharded over all
    /// mesh axes (all-gathered before use, gradients reduce-scattered).
    Fsdp,
    /// Megatron tensor parallel plus sequence parallelism: as [`Family::Tp`] for ops that
    /// contract (matmuls), while the ops between them (norms, dropout, residual adds,
    /// softmax: no contracted axis) split the token sequence on the tensor-parallel axis
    /// wherever it divides, instead of running replicated there.
    Sp,
}

impl Family {
    pub fn name(self) -> &'static str {
        match self {
            Family::Auto => "auto",
            Family::Dp => "dp",
            Family::Tp => "tp",
            Family::Fsdp => "fsdp",
            Family::Sp => "sp",
        }
    }
}

impl std::str::FromStr for Family {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Family::Auto),
            "dp" => Ok(Family::Dp),
            "tp" => Ok(Family::Tp),
            "fsdp" => Ok(Family::Fsdp),
            "sp" => Ok(Family::Sp),
            _ => Err(format!(
                "unknown strategy {s:?}: expected auto, dp, tp, fsdp or sp"
            )),
        }
    }
}

/// Options of [`plan`].
#[derive(Clone, Debug)]
pub struct PlanOptions {
    pub mesh_shape: Vec<usize>,
    pub cluster: Cluster,
    /// GPUs per node (defaults to the cluster's).
    pub gpus_per_node: Option<usize>,
    /// Per-device memory budget in bytes (`None`: the cluster's HBM size).
    pub memory_budget: Option<f64>,
    pub family: Family,
    pub backend: Backend,
    pub time_limit_s: Option<f64>,
    pub share_layers: bool,
    pub policy: DTypePolicy,
    pub optimizer: Optimizer,
    /// Liveness points checked by memory rows.
    pub memory_rows: usize,
    /// Write the solver's input (the `Problem`, with a label per strategy) and its solution to
    /// this file as JSON: for debugging the solver apart from the graph.
    pub dump_problem: Option<std::path::PathBuf>,
    /// Activation checkpointing (see [`crate::checkpointing::plan_with_checkpointing`]):
    /// `None` checkpoints only when no plan fits the memory otherwise (with rotor),
    /// `Some(Strategy::None)` never, `Some(rotor | chen)` always.
    pub checkpoint: Option<autopar_solver::checkpoint::Strategy>,
}

impl PlanOptions {
    pub fn new(mesh_shape: Vec<usize>, cluster: Cluster) -> Self {
        PlanOptions {
            mesh_shape,
            cluster,
            gpus_per_node: None,
            memory_budget: None,
            family: Family::Auto,
            backend: Backend::default(),
            time_limit_s: None,
            share_layers: true,
            policy: DTypePolicy::Fp32,
            optimizer: Optimizer::AdamW,
            memory_rows: 4,
            dump_problem: None,
            checkpoint: None,
        }
    }
}

/// Where a forward value's layout comes from.
#[derive(Clone, Copy, Debug)]
enum Source {
    /// Output `o` of root node `r`.
    Root(NodeId, usize),
    /// A tensor decision (parameter or data input).
    Tensor(ValueId),
    /// Constants and buffers: replicated, no decision.
    Fixed,
}

/// One decision of the problem.
enum Decision {
    Op {
        root: NodeId,
        strategies: Vec<Strategy>,
    },
    Tensor {
        value: ValueId,
        specs: Vec<ShardingSpec>,
        role: TensorRole,
    },
}

impl Decision {
    fn len(&self) -> usize {
        match self {
            Decision::Op { strategies, .. } => strategies.len(),
            Decision::Tensor { specs, .. } => specs.len(),
        }
    }
}

struct Builder<'a> {
    g: &'a Graph,
    tg: &'a TrainingGraph,
    profile: &'a Profile,
    mesh: Mesh,
    cluster: &'a Cluster,
    opts: &'a PlanOptions,
    resharder: Resharder,
    /// Per forward node: its group root (itself for a root).
    root_of: Vec<NodeId>,
    /// Per value: its layout source.
    source: Vec<Source>,
    decisions: Vec<Decision>,
    /// Per root node / tensor value: its decision index.
    decision_of_node: HashMap<NodeId, usize>,
    decision_of_value: HashMap<ValueId, usize>,
    /// Number of copies each decision stands for.
    copies: Vec<usize>,
    needs_grad: Vec<bool>,
    /// Per forward node: op axis of the data batch, if any.
    batch_axis: Vec<Option<usize>>,
    /// Per forward node: op axis of the token sequence, if any.
    sequence_axis: Vec<Option<usize>>,
    /// Per (value, dim): dims carrying the data batch.
    batch_dim: Vec<Option<usize>>,
}

/// `h.3.attn` -> `h.#.attn` and the layer index text `3`; `None` without a layer segment
/// (`.N`, or `_N` followed by a separator).
fn layer_pattern(name: &str) -> Option<(String, String)> {
    let bytes = name.as_bytes();
    let mut out = String::new();
    let mut layer = String::new();
    let mut i = 0;
    let mut found = false;
    while i < bytes.len() {
        let c = bytes[i] as char;
        if (c == '.' || c == '_') && i + 1 < bytes.len() && bytes[i + 1].is_ascii_digit() {
            let mut j = i + 1;
            while j < bytes.len() && bytes[j].is_ascii_digit() {
                j += 1;
            }
            // `h.3`, `layers.3.`, `encoder_layer_3.`; not an exporter's counter (`node_Gemm_12`)
            let segment_end = if c == '.' {
                j == bytes.len() || matches!(bytes[j], b'.' | b'/' | b':')
            } else {
                j < bytes.len() && matches!(bytes[j], b'.' | b'/')
            };
            if segment_end {
                out.push(c);
                out.push('#');
                layer.push_str(&name[i + 1..j]);
                layer.push(',');
                found = true;
                i = j;
                continue;
            }
        }
        out.push(c);
        i += 1;
    }
    found.then_some((out, layer))
}

impl<'a> Builder<'a> {
    fn is_fixed(&self, v: ValueId) -> bool {
        matches!(
            self.g.value(v).def,
            ValueDef::Const(_) | ValueDef::Buffer { .. }
        )
    }

    /// Followers: elementwise forward nodes whose non-constant inputs are one value produced
    /// by a forward node, and whose outputs all have that value's shape and axes.
    fn follower_input(&self, n: NodeId) -> Option<ValueId> {
        let node = self.g.node(n);
        let live: Vec<ValueId> = node
            .inputs
            .iter()
            .copied()
            .filter(|&v| !self.is_fixed(v))
            .collect();
        let &u = live.first()?;
        if live.iter().any(|&v| v != u) || self.g.producer(u).is_none() {
            return None;
        }
        let shape = &self.g.ty(u).shape;
        if node.outputs.iter().any(|&o| &self.g.ty(o).shape != shape) {
            return None;
        }
        let axes = op_axes(self.g, n);
        let slot = node.inputs.iter().position(|&v| v == u)?;
        let in_dims = &axes.inputs[slot];
        let ok = axes.outputs.iter().all(|out| {
            out.len() == in_dims.len()
                && out.iter().zip(in_dims).all(|(a, b)| match (a, b) {
                    (Some(a), Some(b)) => a == b && axes.axes[*a].1 == AxisKind::Parallel,
                    _ => false,
                })
        });
        ok.then_some(u)
    }

    fn spec_of(&self, v: ValueId, s: usize) -> ShardingSpec {
        match self.source[v.0 as usize] {
            Source::Root(r, o) => match &self.decisions[self.decision_of_node[&r]] {
                Decision::Op { strategies, .. } => strategies[s].outputs[o].clone(),
                Decision::Tensor { .. } => ShardingSpec::replicated(self.g.ty(v).rank()),
            },
            Source::Tensor(t) => match &self.decisions[self.decision_of_value[&t]] {
                Decision::Tensor { specs, .. } => specs[s].clone(),
                Decision::Op { .. } => ShardingSpec::replicated(self.g.ty(v).rank()),
            },
            Source::Fixed => ShardingSpec::replicated(self.g.ty(v).rank()),
        }
    }

    /// Decision owning a value's layout.
    fn decision_of_source(&self, v: ValueId) -> Option<usize> {
        match self.source[v.0 as usize] {
            Source::Root(r, _) => self.decision_of_node.get(&r).copied(),
            Source::Tensor(t) => self.decision_of_value.get(&t).copied(),
            Source::Fixed => None,
        }
    }

    fn elem_bytes(&self, v: ValueId) -> usize {
        self.opts
            .policy
            .compute_dtype(self.g.ty(v).dtype)
            .size_bytes()
    }

    fn family_allows_op(&self, n: NodeId, s: &Strategy) -> bool {
        let last = self.mesh.ndim().saturating_sub(1);
        let batch = self.batch_axis[n.0 as usize];
        let dp_axes_ok = |axes: std::ops::Range<usize>| {
            let mut axes = axes;
            // every listed mesh axis on the batch axis, when the batch axis can take it
            let mut parts = 1;
            axes.all(|m| {
                let size = self.mesh.axis_size(m);
                match (batch, s.assignment[m]) {
                    (_, _) if size == 1 => true,
                    (Some(b), Some(a)) if a == b => {
                        parts *= size;
                        true
                    }
                    (Some(b), None) => {
                        // allowed only if the batch axis could not take this axis too
                        let full = s
                            .assignment
                            .iter()
                            .enumerate()
                            .filter(|(_, x)| **x == Some(b))
                            .map(|(mm, _)| self.mesh.axis_size(mm))
                            .product::<usize>();
                        self.batch_size(n, b) % (full * size) != 0
                    }
                    (None, None) => true,
                    _ => false,
                }
            })
        };
        match self.opts.family {
            Family::Auto => true,
            Family::Dp | Family::Fsdp => dp_axes_ok(0..self.mesh.ndim()),
            Family::Tp => {
                dp_axes_ok(0..last)
                    // the tensor-parallel axis splits weights, heads or features: never the
                    // batch, nor the sequence (that would be sequence parallelism)
                    && match s.assignment.get(last).copied().flatten() {
                        Some(a) => Some(a) != batch && Some(a) != self.sequence_axis[n.0 as usize],
                        None => true,
                    }
            }
            Family::Sp => {
                let axes = op_axes(self.g, n);
                let contracts = axes
                    .axes
                    .iter()
                    .any(|&(size, k)| k == AxisKind::Contracted && size > 1);
                let seq = self.sequence_axis[n.0 as usize];
                let tp = s.assignment.get(last).copied().flatten();
                let size = self.mesh.axis_size(last);
                let seq_splits = size > 1 && seq.is_some_and(|q| axes.axes[q].0 % size == 0);
                dp_axes_ok(0..last)
                    && if contracts || !seq_splits {
                        // tensor parallel, as Tp
                        tp.is_none_or(|a| Some(a) != batch && Some(a) != seq)
                    } else {
                        // between the tensor-parallel regions: the sequence
                        tp == seq
                    }
            }
        }
    }

    fn batch_size(&self, n: NodeId, axis: usize) -> usize {
        op_axes(self.g, n).axes[axis].0
    }

    fn family_allows_storage(&self, v: ValueId, spec: &ShardingSpec, role: &TensorRole) -> bool {
        let last = self.mesh.ndim().saturating_sub(1);
        match (role, self.opts.family) {
            (_, Family::Auto) => true,
            (TensorRole::Param, Family::Dp) => spec.used_axes().next().is_none(),
            (TensorRole::Param, Family::Tp | Family::Sp) => spec.used_axes().all(|m| m == last),
            (TensorRole::Param, Family::Fsdp) => {
                // sharded over every mesh axis of size > 1 when some dim allows it
                let wanted: usize = self.mesh.num_devices();
                let shape = &self.g.ty(v).shape;
                let possible = shape.iter().any(|&d| d % wanted == 0);
                if possible {
                    spec.shard_count(&self.mesh) == wanted
                } else {
                    true
                }
            }
            (TensorRole::Input, _) => {
                // data inputs: split on their batch dim as the family's compute wants
                let bd = self.batch_dim[v.0 as usize];
                spec.dims
                    .iter()
                    .enumerate()
                    .all(|(d, axes)| axes.is_empty() || Some(d) == bd)
            }
        }
    }
}

/// Follows dims of the graph inputs through every forward node's dim map: starting from the
/// `seeds` (input value, dim), the op axis each forward node carries them on and the dim of
/// each value that carries them. Used for the data batch (dim 0 of every input) and the token
/// sequence (dim 1 of integer token inputs).
fn propagate_dim(
    g: &Graph,
    forward_nodes: usize,
    seeds: &[(ValueId, usize)],
) -> (Vec<Option<usize>>, Vec<Option<usize>>) {
    let mut value_dim: Vec<Option<usize>> = vec![None; g.values.len()];
    for &(v, d) in seeds {
        value_dim[v.0 as usize] = Some(d);
    }
    let mut node_axis = vec![None; g.nodes.len()];
    for (n, node) in g.nodes.iter().take(forward_nodes) {
        let axes = op_axes(g, n);
        let mut axis = None;
        for (i, &v) in node.inputs.iter().enumerate() {
            if let Some(d) = value_dim[v.0 as usize] {
                if let Some(Some(a)) = axes.inputs.get(i).and_then(|dims| dims.get(d)) {
                    if axes.axes[*a].1 != AxisKind::Whole {
                        axis = Some(*a);
                        break;
                    }
                }
            }
        }
        node_axis[n.0 as usize] = axis;
        if let Some(a) = axis {
            for (o, &v) in node.outputs.iter().enumerate() {
                value_dim[v.0 as usize] = axes.outputs[o].iter().position(|x| *x == Some(a));
            }
        }
    }
    (node_axis, value_dim)
}

/// Plans `tg` (see the module doc).
pub fn plan(
    model: &str,
    tg: &TrainingGraph,
    profile: &Profile,
    opts: &PlanOptions,
) -> Result<Plan, Error> {
    let t0 = Instant::now();
    let g = &tg.graph;
    let cluster = &opts.cluster;
    let gpn = opts.gpus_per_node.unwrap_or(cluster.gpus_per_node);
    let mesh = Mesh::on_cluster(opts.mesh_shape.clone(), cluster, gpn)
        .map_err(|e| Error::Usage(e.to_string()))?;
    let fwd = tg.forward_nodes;
    let batch_seeds: Vec<(ValueId, usize)> = g
        .inputs
        .iter()
        .filter(|&&v| g.ty(v).rank() >= 1)
        .map(|&v| (v, 0))
        .collect();
    let (batch_axis, batch_dim) = propagate_dim(g, fwd, &batch_seeds);
    let token_seeds: Vec<(ValueId, usize)> = g
        .inputs
        .iter()
        .filter(|&&v| g.ty(v).rank() >= 2 && g.ty(v).dtype.is_int())
        .map(|&v| (v, 1))
        .collect();
    let (sequence_axis, _) = propagate_dim(g, fwd, &token_seeds);

    let needs_grad = tg.needs_grad();

    let mut b = Builder {
        g,
        tg,
        profile,
        mesh: mesh.clone(),
        cluster,
        opts,
        resharder: Resharder::new(mesh.clone(), cluster.comm_efficiency),
        root_of: (0..g.nodes.len()).map(|i| NodeId(i as u32)).collect(),
        source: vec![Source::Fixed; g.values.len()],
        decisions: vec![],
        decision_of_node: HashMap::new(),
        decision_of_value: HashMap::new(),
        copies: vec![],
        needs_grad,
        batch_axis,
        sequence_axis,
        batch_dim,
    };

    // tensor decisions: parameters and data inputs; sharing by layer pattern
    let mut share_key: HashMap<String, usize> = HashMap::new();
    for (v, d) in g.values.iter() {
        let role = match d.def {
            ValueDef::Param { .. } => TensorRole::Param,
            ValueDef::Input => TensorRole::Input,
            _ => continue,
        };
        b.source[v.0 as usize] = Source::Tensor(v);
        let key = match (opts.share_layers, &role, layer_pattern(&d.name)) {
            (true, TensorRole::Param, Some((pat, _))) => Some(format!("param|{pat}|{}", d.ty)),
            _ => None,
        };
        if let Some(&k) = key.as_ref().and_then(|k| share_key.get(k)) {
            b.decision_of_value.insert(v, k);
            b.copies[k] += 1;
            continue;
        }
        let specs: Vec<ShardingSpec> = strategy::storage_specs(&d.ty.shape, &mesh)
            .into_iter()
            .filter(|s| b.family_allows_storage(v, s, &role))
            .collect();
        let specs = if specs.is_empty() {
            vec![ShardingSpec::replicated(d.ty.rank())]
        } else {
            specs
        };
        b.decisions.push(Decision::Tensor {
            value: v,
            specs,
            role,
        });
        b.copies.push(1);
        let idx = b.decisions.len() - 1;
        b.decision_of_value.insert(v, idx);
        if let Some(k) = key {
            share_key.insert(k, idx);
        }
    }

    // op decisions: roots, followers, shared layers
    let t_strat = Instant::now();
    let mut ordinal: HashMap<(String, String), usize> = HashMap::new();
    let mut strategy_cache: HashMap<String, Vec<Strategy>> = HashMap::new();
    for (n, node) in g.nodes.iter().take(fwd) {
        if let Some(u) = b.follower_input(n) {
            let src = b.source[u.0 as usize];
            if let Source::Root(r, _) = src {
                b.root_of[n.0 as usize] = r;
                for &o in &node.outputs {
                    b.source[o.0 as usize] = src;
                }
                continue;
            }
        }
        for (o, &v) in node.outputs.iter().enumerate() {
            b.source[v.0 as usize] = Source::Root(n, o);
        }
        let op_json = serde_json::to_string(&node.op).unwrap_or_default();
        let types: Vec<String> = node
            .inputs
            .iter()
            .chain(&node.outputs)
            .map(|&v| g.ty(v).to_string())
            .collect();
        let signature = format!("{op_json}|{}", types.join(","));
        let key = match (opts.share_layers, layer_pattern(&node.name)) {
            (true, Some((pat, layer))) => {
                let k = ordinal.entry((pat.clone(), layer)).or_insert(0);
                *k += 1;
                Some(format!("op|{pat}|{k}|{signature}"))
            }
            _ => None,
        };
        if let Some(&k) = key.as_ref().and_then(|k| share_key.get(k)) {
            b.decision_of_node.insert(n, k);
            b.copies[k] += 1;
            continue;
        }
        let strategies = match strategy_cache.get(&signature) {
            Some(s) => s.clone(),
            None => {
                let shapes: Vec<Vec<usize>> = node
                    .outputs
                    .iter()
                    .map(|&v| g.ty(v).shape.clone())
                    .collect();
                let all = strategy::enumerate(&op_axes(g, n), &shapes, &mesh);
                strategy_cache.insert(signature.clone(), all.clone());
                all
            }
        };
        let allowed: Vec<Strategy> = strategies
            .iter()
            .filter(|s| b.family_allows_op(n, s))
            .cloned()
            .collect();
        let strategies = if allowed.is_empty() {
            strategies.into_iter().take(1).collect()
        } else {
            allowed
        };
        b.decisions.push(Decision::Op {
            root: n,
            strategies,
        });
        b.copies.push(1);
        let idx = b.decisions.len() - 1;
        b.decision_of_node.insert(n, idx);
        if let Some(k) = key {
            share_key.insert(k, idx);
        }
    }
    let strategies_s = t_strat.elapsed().as_secs_f64();

    let t_build = Instant::now();
    let problem = build_problem(&b)?;
    problem
        .problem
        .check()
        .map_err(|e| Error::Usage(format!("internal: malformed problem: {e}")))?;
    let build_s = t_build.elapsed().as_secs_f64();

    let solve_opts = SolveOptions {
        backend: opts.backend,
        time_limit_s: opts.time_limit_s,
        ..SolveOptions::default()
    };
    let result = match ilp::solve(&problem.problem, &solve_opts) {
        Ok(r) => r,
        Err(ilp::SolveError::Infeasible { .. }) => {
            let min = autopar_solver::min_memory::min_peak_memory(
                &problem.problem,
                Some(opts.time_limit_s.unwrap_or(60.0)),
            )
            .map_err(Error::Usage)?;
            return Err(Error::NoFit {
                message: format!(
                    "no {} plan of {model} on mesh {} fits {} per device: the smallest per-device memory any such plan needs is {}",
                    opts.family.name(),
                    mesh.name(),
                    crate::format_bytes(problem.problem.memory_budget.unwrap_or(0.0)),
                    crate::format_bytes(min)
                ),
                least_bytes: min,
            });
        }
        Err(e) => return Err(Error::Usage(e.to_string())),
    };
    if let Some(path) = &opts.dump_problem {
        let labels: Vec<Vec<String>> = b
            .decisions
            .iter()
            .map(|d| match d {
                Decision::Op { strategies, .. } => strategies
                    .iter()
                    .map(|s| format!("{} {:?}", s.notation(), s.assignment))
                    .collect(),
                Decision::Tensor { specs, .. } => specs.iter().map(|s| s.to_string()).collect(),
            })
            .collect();
        let dump = serde_json::json!({ "problem": problem.problem, "labels": labels, "solution": result.solution });
        std::fs::write(path, dump.to_string())
            .map_err(|e| Error::Usage(format!("writing {}: {e}", path.display())))?;
    }
    let mut plan = read_plan(&b, &problem, &result.solution, model)?;
    plan.solver = SolverReport {
        backend: format!("{:?}", opts.backend).to_lowercase(),
        objective_s: result.objective,
        lower_bound_s: result.lower_bound,
        gap: result.gap,
        status: format!("{:?}", result.status).to_lowercase(),
        graph_nodes: g.nodes.len(),
        problem_nodes: problem.problem.nodes.len(),
        problem_edges: problem.problem.edges.len(),
        strategies: problem.problem.nodes.iter().map(|n| n.costs.len()).sum(),
        memory_rows: problem.problem.memory_rows.len(),
        ilp_variables: result.variables,
        ilp_constraints: result.constraints,
        shared_layers: opts.share_layers,
        strategies_s,
        build_s,
        solve_s: result.solve_s,
        total_s: t0.elapsed().as_secs_f64(),
    };
    Ok(plan)
}

/// The problem plus the bookkeeping needed to read a solution back.
struct Built {
    problem: Problem,
    /// Per decision and strategy: compute seconds (the rest of the node cost is communication).
    compute: Vec<Vec<f64>>,
}

fn with_partial(spec: &ShardingSpec, partial: &[usize]) -> ShardingSpec {
    let mut s = spec.clone();
    s.partial = partial.to_vec();
    s.partial.sort_unstable();
    s
}

fn build_problem(b: &Builder) -> Result<Built, Error> {
    let g = b.g;
    let mesh = &b.mesh;
    let fwd = b.tg.forward_nodes;
    let reshard_err = |e: autopar_solver::reshard::ReshardError| {
        Error::Usage(format!("internal resharding error: {e}"))
    };
    let node_time = |n: NodeId| b.node_seconds(n);

    // node costs
    let per_elem = param_bytes_per_element(b.opts.optimizer, b.opts.policy);
    let optimizer_bytes_touched =
        (2 * per_elem.weights + per_elem.grads + 2 * per_elem.optimizer) as f64;
    let mut compute: Vec<Vec<f64>> = b.decisions.iter().map(|d| vec![0.0; d.len()]).collect();
    let mut comm: Vec<Vec<f64>> = b.decisions.iter().map(|d| vec![0.0; d.len()]).collect();
    for (k, d) in b.decisions.iter().enumerate() {
        match d {
            Decision::Tensor { value, specs, role } => {
                if *role == TensorRole::Param {
                    let shape = &g.ty(*value).shape;
                    for (s, spec) in specs.iter().enumerate() {
                        let local = spec.local_numel(shape, mesh) as f64;
                        compute[k][s] = local * optimizer_bytes_touched
                            / (b.cluster.hbm_bandwidth * b.cluster.memory_efficiency);
                    }
                }
            }
            Decision::Op { root, strategies } => {
                let base = node_time(*root);
                let followers: Vec<NodeId> = (0..fwd)
                    .map(|i| NodeId(i as u32))
                    .filter(|&f| f != *root && b.root_of[f.0 as usize] == *root)
                    .collect();
                for (s, st) in strategies.iter().enumerate() {
                    let mut t =
                        sharded_seconds(base, st.work_divisor, b.node_launches(*root), b.cluster);
                    for &f in &followers {
                        let out = g.node(f).outputs[0];
                        let parts = b.spec_of(out, s).shard_count(mesh);
                        t += sharded_seconds(node_time(f), parts, b.node_launches(f), b.cluster);
                    }
                    compute[k][s] = t;
                    let mut c = 0.0;
                    for (o, (raw, out)) in st.raw_outputs.iter().zip(&st.outputs).enumerate() {
                        if raw.is_partial() {
                            let v = g.node(*root).outputs[o];
                            let shape = &g.ty(v).shape;
                            let eb = b.elem_bytes(v);
                            c += b
                                .resharder
                                .transition(raw, out, shape, eb)
                                .map_err(reshard_err)?
                                .cost_s;
                            if b.needs_grad[v.0 as usize] {
                                c += b
                                    .resharder
                                    .transition(out, &raw.without_partial(), shape, eb)
                                    .map_err(reshard_err)?
                                    .cost_s;
                            }
                        }
                    }
                    if !st.statistics_axes.is_empty() {
                        // SyncBatchNorm-style: all-reduce statistics shaped like the op's rank-1
                        // operands, once forward and once backward
                        let stat_elems: usize = g
                            .node(*root)
                            .inputs
                            .iter()
                            .map(|&v| g.ty(v))
                            .filter(|t| t.rank() == 1)
                            .map(|t| t.numel())
                            .sum();
                        let partial = ShardingSpec {
                            dims: vec![vec![]],
                            partial: st.statistics_axes.clone(),
                        };
                        let t = b
                            .resharder
                            .transition(
                                &partial,
                                &ShardingSpec::replicated(1),
                                &[stat_elems.max(1)],
                                4,
                            )
                            .map_err(reshard_err)?;
                        c += 2.0 * t.cost_s;
                    }
                    comm[k][s] = c;
                }
            }
        }
    }
    // shared decisions are counted once per copy (copies of a shared decision are identical)
    let nodes: Vec<ProblemNode> = b
        .decisions
        .iter()
        .enumerate()
        .map(|(k, d)| {
            let name = match d {
                Decision::Op { root, .. } => g.node(*root).name.clone(),
                Decision::Tensor { value, .. } => g.value(*value).name.clone(),
            };
            let copies = b.copies[k] as f64;
            ProblemNode {
                name,
                costs: compute[k]
                    .iter()
                    .zip(&comm[k])
                    .map(|(a, c)| (a + c) * copies)
                    .collect(),
            }
        })
        .collect();
    let compute: Vec<Vec<f64>> = compute
        .iter()
        .enumerate()
        .map(|(k, c)| c.iter().map(|x| x * b.copies[k] as f64).collect())
        .collect();

    // edges, aggregated over identical copies
    #[derive(Hash, PartialEq, Eq)]
    struct EdgeKey {
        src: usize,
        dst: usize,
        src_specs: Vec<ShardingSpec>,
        dst_needs: Vec<(ShardingSpec, ShardingSpec)>,
        shape: Vec<usize>,
        elem_bytes: usize,
        grad: bool,
        param: bool,
    }
    let mut edges: HashMap<EdgeKey, usize> = HashMap::new();
    let mut order: Vec<EdgeKey> = vec![];
    for (n, node) in g.nodes.iter().take(fwd) {
        if b.root_of[n.0 as usize] != n {
            continue;
        }
        let dst = b.decision_of_node[&n];
        let Decision::Op { strategies, .. } = &b.decisions[dst] else {
            continue;
        };
        for (i, &v) in node.inputs.iter().enumerate() {
            let Some(src) = b.decision_of_source(v) else {
                continue;
            };
            let src_len = b.decisions[src].len();
            let src_specs: Vec<ShardingSpec> = (0..src_len).map(|s| b.spec_of(v, s)).collect();
            let dst_needs: Vec<(ShardingSpec, ShardingSpec)> = strategies
                .iter()
                .map(|st| {
                    (
                        st.inputs[i].clone(),
                        with_partial(&st.inputs[i], &st.input_grad_partial[i]),
                    )
                })
                .collect();
            let key = EdgeKey {
                src,
                dst,
                src_specs,
                dst_needs,
                shape: g.ty(v).shape.clone(),
                elem_bytes: b.elem_bytes(v),
                grad: b.needs_grad[v.0 as usize] && node.op.spec().differentiable(i),
                param: g.is_param(v),
            };
            match edges.get_mut(&key) {
                Some(c) => *c += 1,
                None => {
                    edges.insert(
                        EdgeKey {
                            src: key.src,
                            dst: key.dst,
                            src_specs: key.src_specs.clone(),
                            dst_needs: key.dst_needs.clone(),
                            shape: key.shape.clone(),
                            elem_bytes: key.elem_bytes,
                            grad: key.grad,
                            param: key.param,
                        },
                        1,
                    );
                    order.push(key);
                }
            }
        }
    }
    let mut problem_edges = vec![];
    let mut edge_hideable: Vec<Vec<Vec<f64>>> = vec![];
    for key in &order {
        let count = edges[key] as f64;
        let (src_class, src_reps) = classes(&key.src_specs);
        let (dst_class, dst_reps) = classes(&key.dst_needs);
        let mut cost = vec![vec![0.0; dst_reps.len()]; src_reps.len()];
        for (a, from) in src_reps.iter().enumerate() {
            for (c, (need, grad_in)) in dst_reps.iter().enumerate() {
                let fwd_t = b
                    .resharder
                    .transition(from, need, &key.shape, key.elem_bytes)
                    .map_err(reshard_err)?
                    .cost_s;
                let mut t = fwd_t;
                if key.param && from != need {
                    t += fwd_t; // FSDP gathers the parameter again for the backward
                }
                if key.grad {
                    let back = b
                        .resharder
                        .transition(grad_in, from, &key.shape, key.elem_bytes)
                        .map_err(reshard_err)?;
                    t += if key.param {
                        bucketed(&back, &b.mesh)
                    } else {
                        back.cost_s
                    };
                }
                cost[a][c] = t * count;
            }
        }
        if key.src == key.dst {
            // a self-edge: both ends take the same strategy, classes must be per strategy
            let n = b.decisions[key.src].len();
            let mut diag = vec![vec![0.0; n]; n];
            for (s, row) in diag.iter_mut().enumerate() {
                row[s] = cost[src_class[s]][dst_class[s]];
            }
            // parameter traffic overlaps compute (prefetched gathers, bucketed gradient sync)
            edge_hideable.push(if key.param {
                diag.clone()
            } else {
                vec![vec![0.0; n]; n]
            });
            problem_edges.push(ProblemEdge {
                src: key.src,
                dst: key.dst,
                src_class: (0..n).collect(),
                dst_class: (0..n).collect(),
                cost: diag,
            });
        } else {
            edge_hideable.push(if key.param {
                cost.clone()
            } else {
                vec![vec![0.0; cost.first().map_or(0, |r| r.len())]; cost.len()]
            });
            problem_edges.push(ProblemEdge {
                src: key.src,
                dst: key.dst,
                src_class,
                dst_class,
                cost,
            });
        }
    }
    let overlap = Overlap {
        node_hideable: nodes.iter().map(|n| vec![0.0; n.costs.len()]).collect(),
        edge_hideable,
        node_cover: b
            .decisions
            .iter()
            .enumerate()
            .map(|(k, d)| match d {
                Decision::Op { .. } => compute[k].clone(),
                Decision::Tensor { .. } => vec![0.0; d.len()],
            })
            .collect(),
    };

    let (memory_rows, budget) = memory_rows(b);
    Ok(Built {
        problem: Problem {
            nodes,
            edges: problem_edges,
            memory_budget: budget,
            memory_rows,
            overlap: Some(overlap),
        },
        compute,
    })
}

/// Gradients of parameters are synchronised in buckets (DDP and FSDP put ~25 MiB of gradients
/// in one collective), so a gradient's collective pays only its share of the latency.
pub const GRADIENT_BUCKET_BYTES: f64 = 25.0 * 1024.0 * 1024.0;

fn bucketed(t: &autopar_solver::reshard::Transition, mesh: &Mesh) -> f64 {
    t.steps
        .iter()
        .map(|st| {
            let alpha = autopar_solver::reshard::latency_part(&st.op, mesh);
            st.cost_s - alpha + alpha * (st.bytes / GRADIENT_BUCKET_BYTES).min(1.0)
        })
        .sum()
}

/// Distinct items and each item's class index.
fn classes<T: Clone + PartialEq>(items: &[T]) -> (Vec<usize>, Vec<T>) {
    let mut reps: Vec<T> = vec![];
    let idx = items
        .iter()
        .map(|it| match reps.iter().position(|r| r == it) {
            Some(p) => p,
            None => {
                reps.push(it.clone());
                reps.len() - 1
            }
        })
        .collect();
    (idx, reps)
}

/// Memory rows at the `opts.memory_rows` liveness points where the single-device step holds the
/// most bytes, and the budget.
fn memory_rows(b: &Builder) -> (Vec<MemoryRow>, Option<f64>) {
    let g = b.g;
    let mesh = &b.mesh;
    let fwd = b.tg.forward_nodes;
    let nn = g.nodes.len();
    let budget = Some(b.opts.memory_budget.unwrap_or(b.cluster.hbm_bytes));
    // liveness: [def, last use] in node time
    let mut last_use: Vec<Option<usize>> = vec![None; g.values.len()];
    for (n, node) in g.nodes.iter() {
        for &v in &node.inputs {
            last_use[v.0 as usize] = Some(n.0 as usize);
        }
    }
    for &v in &g.outputs {
        last_use[v.0 as usize] = Some(nn);
    }
    let grad_values: HashMap<ValueId, ValueId> =
        b.tg.grads.iter().map(|&(p, gr)| (gr, p)).collect();
    // per activation value: its (decision, per-strategy bytes) and its interval
    struct Live {
        def: usize,
        end: usize,
        decision: Option<usize>,
        bytes: Vec<f64>,
        replicated: f64,
    }
    let mut lives: Vec<Live> = vec![];
    for (v, d) in g.values.iter() {
        let Some(end) = last_use[v.0 as usize] else {
            continue;
        };
        let eb = b.elem_bytes(v) as f64;
        let full = d.ty.numel() as f64 * eb;
        let (def, decision, bytes) = match d.def {
            ValueDef::Input => {
                let k = b.decision_of_value[&v];
                (
                    0,
                    Some(k),
                    (0..b.decisions[k].len())
                        .map(|s| b.spec_of(v, s).local_numel(&d.ty.shape, mesh) as f64 * eb)
                        .collect(),
                )
            }
            ValueDef::Node { node, .. } if (node.0 as usize) < fwd => {
                let k = b.decision_of_source(v);
                let bytes = match k {
                    Some(k) => (0..b.decisions[k].len())
                        .map(|s| b.spec_of(v, s).local_numel(&d.ty.shape, mesh) as f64 * eb)
                        .collect(),
                    None => vec![],
                };
                (node.0 as usize, k, bytes)
            }
            ValueDef::Node { node, .. } => {
                // backward values: laid out like the matching operand of their forward origin
                if let Some(&p) = grad_values.get(&v) {
                    let k = b.decision_of_value[&p];
                    let bytes = (0..b.decisions[k].len())
                        .map(|s| b.spec_of(p, s).local_numel(&d.ty.shape, mesh) as f64 * eb)
                        .collect();
                    (node.0 as usize, Some(k), bytes)
                } else {
                    match g.node(node).origin.map(|o| b.root_of[o.0 as usize]) {
                        Some(r) => {
                            let k = b.decision_of_node.get(&r).copied();
                            let bytes = match k.map(|k| &b.decisions[k]) {
                                Some(Decision::Op { strategies, .. }) => {
                                    let origin = g.node(node).origin.unwrap_or(r);
                                    strategies
                                        .iter()
                                        .enumerate()
                                        .map(|(s, st)| {
                                            let on = g.node(origin);
                                            let matching = on
                                                .inputs
                                                .iter()
                                                .chain(&on.outputs)
                                                .find(|&&x| {
                                                    g.ty(x).shape == d.ty.shape && !b.is_fixed(x)
                                                })
                                                .map(|&x| b.spec_of_operand(origin, x, s, st));
                                            match matching {
                                                Some(spec) => {
                                                    spec.local_numel(&d.ty.shape, mesh) as f64 * eb
                                                }
                                                None => full / st.work_divisor as f64,
                                            }
                                        })
                                        .collect()
                                }
                                _ => vec![],
                            };
                            (node.0 as usize, k, bytes)
                        }
                        None => (node.0 as usize, None, vec![]),
                    }
                }
            }
            _ => continue,
        };
        let decision = if bytes.is_empty() { None } else { decision };
        lives.push(Live {
            def,
            end,
            decision,
            bytes,
            replicated: full,
        });
    }
    // pick the liveness points where the single-device step holds the most
    let mut delta = vec![0.0f64; nn + 2];
    for l in &lives {
        delta[l.def] += l.replicated;
        delta[(l.end + 1).min(nn + 1)] -= l.replicated;
    }
    let mut live_at = vec![0.0; nn + 1];
    let mut acc = 0.0;
    for t in 0..=nn {
        acc += delta[t];
        live_at[t] = acc;
    }
    let mut times: Vec<usize> = (0..=nn).collect();
    times.sort_by(|&a, &c| live_at[c].total_cmp(&live_at[a]).then(a.cmp(&c)));
    let mut chosen: Vec<usize> = vec![];
    let min_sep = (nn / (4 * b.opts.memory_rows.max(1))).max(1);
    for t in times {
        if chosen.len() >= b.opts.memory_rows {
            break;
        }
        if chosen.iter().all(|&c| c.abs_diff(t) >= min_sep) {
            chosen.push(t);
        }
    }
    chosen.sort_unstable();
    let per_elem = param_bytes_per_element(b.opts.optimizer, b.opts.policy);
    let fixed: f64 = g
        .values
        .iter()
        .filter(|(_, d)| matches!(d.def, ValueDef::Const(_) | ValueDef::Buffer { .. }))
        .map(|(_, d)| d.ty.size_bytes() as f64)
        .sum();
    let rows = chosen
        .into_iter()
        .map(|t| {
            let mut terms: HashMap<usize, Vec<f64>> = HashMap::new();
            let mut constant = fixed;
            for l in lives.iter().filter(|l| l.def <= t && t <= l.end) {
                match l.decision {
                    Some(k) => {
                        let e = terms
                            .entry(k)
                            .or_insert_with(|| vec![0.0; b.decisions[k].len()]);
                        for (x, y) in e.iter_mut().zip(&l.bytes) {
                            *x += y;
                        }
                    }
                    None => constant += l.replicated,
                }
            }
            // parameters: weights and optimizer state always, gradients accounted as values
            for (k, d) in b.decisions.iter().enumerate() {
                if let Decision::Tensor {
                    value,
                    specs,
                    role: TensorRole::Param,
                } = d
                {
                    let shape = &g.ty(*value).shape;
                    let e = terms.entry(k).or_insert_with(|| vec![0.0; specs.len()]);
                    for (s, spec) in specs.iter().enumerate() {
                        e[s] += spec.local_numel(shape, mesh) as f64
                            * (per_elem.weights + per_elem.optimizer) as f64
                            * b.copies[k] as f64;
                    }
                }
            }
            let mut terms: Vec<(usize, Vec<f64>)> = terms.into_iter().collect();
            terms.sort_by_key(|(k, _)| *k);
            let label = if t < nn {
                format!("at {}", g.node_label(NodeId(t as u32)))
            } else {
                "at the optimizer step".into()
            };
            MemoryRow {
                label,
                constant,
                terms,
            }
        })
        .collect();
    (rows, budget)
}

impl Builder<'_> {
    /// Kernels forward node `n` launches: its forward, and its backward where it has one (each
    /// pays the cluster's per-op overhead, see `bridge::sharded_seconds`).
    fn node_launches(&self, n: NodeId) -> usize {
        1 + usize::from(self.profile.nodes[n.0 as usize].backward.is_some())
    }

    /// Forward plus backward compute seconds of forward node `n` on one device, unsharded.
    fn node_seconds(&self, n: NodeId) -> f64 {
        let row = &self.profile.nodes[n.0 as usize];
        let f = Cost {
            flops: row.flops,
            matmul_flops: row.matmul_flops,
            bytes_read: row.bytes_read,
            bytes_written: row.bytes_written,
        };
        compute_seconds(&f, self.cluster, self.opts.policy)
            + row
                .backward
                .map_or(0.0, |c| compute_seconds(&c, self.cluster, self.opts.policy))
    }

    /// The spec of operand `x` (an input or output of forward node `n`) under strategy `st`
    /// of `n`'s decision (index `s`).
    fn spec_of_operand(&self, n: NodeId, x: ValueId, s: usize, st: &Strategy) -> ShardingSpec {
        let node = self.g.node(n);
        if self.root_of[n.0 as usize] == n {
            if let Some(i) = node.inputs.iter().position(|&v| v == x) {
                return st.inputs[i].clone();
            }
            if let Some(o) = node.outputs.iter().position(|&v| v == x) {
                return st.outputs[o].clone();
            }
        }
        self.spec_of(x, s)
    }
}

fn read_plan(b: &Builder, built: &Built, sol: &Solution, model: &str) -> Result<Plan, Error> {
    let g = b.g;
    let mesh = &b.mesh;
    let fwd = b.tg.forward_nodes;
    let reshard_err = |e: autopar_solver::reshard::ReshardError| {
        Error::Usage(format!("internal resharding error: {e}"))
    };
    let ev = autopar_solver::problem::evaluate(&built.problem, sol);
    let mut nodes = vec![];
    let mut collectives = vec![];
    for (n, node) in g.nodes.iter().take(fwd) {
        let r = b.root_of[n.0 as usize];
        let k = b.decision_of_node[&r];
        let s = sol.choice[k];
        let Decision::Op { strategies, .. } = &b.decisions[k] else {
            continue;
        };
        let st = &strategies[s];
        let t = b.node_seconds(n);
        if r == n {
            nodes.push(PlanNode {
                node: n.0,
                name: node.name.clone(),
                op: autopar_analyzer::profile::op_label(&node.op),
                inputs: node
                    .inputs
                    .iter()
                    .enumerate()
                    .map(|(i, &v)| {
                        if b.is_fixed(v) {
                            b.spec_of(v, 0)
                        } else {
                            st.inputs[i].clone()
                        }
                    })
                    .collect(),
                outputs: st.outputs.clone(),
                notation: st.notation(),
                assignment: st.assignment.clone(),
                compute_s: sharded_seconds(t, st.work_divisor, b.node_launches(n), b.cluster),
                follows: None,
            });
            for (o, (raw, out)) in st.raw_outputs.iter().zip(&st.outputs).enumerate() {
                if raw.is_partial() {
                    let v = node.outputs[o];
                    push_steps(&mut collectives, b, PlanPhase::Forward, n, v, raw, out)
                        .map_err(reshard_err)?;
                    if b.needs_grad[v.0 as usize] {
                        push_steps(
                            &mut collectives,
                            b,
                            PlanPhase::Backward,
                            n,
                            v,
                            out,
                            &raw.without_partial(),
                        )
                        .map_err(reshard_err)?;
                    }
                }
            }
            for (i, &v) in node.inputs.iter().enumerate() {
                let Some(src) = b.decision_of_source(v) else {
                    continue;
                };
                let from = b.spec_of(v, sol.choice[src]);
                let need = &st.inputs[i];
                push_steps(&mut collectives, b, PlanPhase::Forward, n, v, &from, need)
                    .map_err(reshard_err)?;
                if b.needs_grad[v.0 as usize] && node.op.spec().differentiable(i) {
                    if g.is_param(v) && &from != need {
                        push_steps(&mut collectives, b, PlanPhase::Backward, n, v, &from, need)
                            .map_err(reshard_err)?;
                    }
                    push_steps(
                        &mut collectives,
                        b,
                        PlanPhase::Backward,
                        n,
                        v,
                        &with_partial(need, &st.input_grad_partial[i]),
                        &from,
                    )
                    .map_err(reshard_err)?;
                }
            }
        } else {
            let spec = b.spec_of(node.outputs[0], s);
            nodes.push(PlanNode {
                node: n.0,
                name: node.name.clone(),
                op: autopar_analyzer::profile::op_label(&node.op),
                inputs: node
                    .inputs
                    .iter()
                    .map(|&v| {
                        if b.is_fixed(v) {
                            b.spec_of(v, 0)
                        } else {
                            spec.clone()
                        }
                    })
                    .collect(),
                outputs: node.outputs.iter().map(|_| spec.clone()).collect(),
                notation: format!("{spec} = {spec}"),
                assignment: vec![],
                compute_s: sharded_seconds(
                    t,
                    spec.shard_count(mesh),
                    b.node_launches(n),
                    b.cluster,
                ),
                follows: Some(r.0),
            });
        }
    }
    let per_elem = param_bytes_per_element(b.opts.optimizer, b.opts.policy);
    let mut tensors = vec![];
    for (v, d) in g.values.iter() {
        let role = match d.def {
            ValueDef::Param { .. } => TensorRole::Param,
            ValueDef::Input => TensorRole::Input,
            _ => continue,
        };
        let k = b.decision_of_value[&v];
        let spec = b.spec_of(v, sol.choice[k]);
        let local = spec.local_numel(&d.ty.shape, mesh) as f64;
        let bytes = match role {
            TensorRole::Param => local * per_elem.total() as f64,
            TensorRole::Input => local * d.ty.dtype.size_bytes() as f64,
        };
        tensors.push(PlanTensor {
            value: v.0,
            name: d.name.clone(),
            role,
            shape: d.ty.shape.clone(),
            spec,
            bytes_per_device: bytes,
        });
    }
    let compute_s: f64 = built
        .compute
        .iter()
        .zip(&sol.choice)
        .map(|(c, &s)| c[s])
        .sum();
    Ok(Plan {
        schema_version: PLAN_SCHEMA_VERSION,
        model: model.to_string(),
        family: b.opts.family.name().to_string(),
        mesh: mesh.clone(),
        cluster: b.cluster.clone(),
        dtype_policy: serde_json::to_value(b.opts.policy)
            .ok()
            .and_then(|v| v.as_str().map(String::from))
            .unwrap_or_default(),
        optimizer: serde_json::to_string(&b.opts.optimizer).unwrap_or_default(),
        memory_budget_bytes: built.problem.memory_budget,
        nodes,
        tensors,
        collectives,
        predicted: Prediction {
            step_s: ev.objective,
            compute_s,
            communication_s: ev.objective - compute_s,
            overlapped_s: ev.hidden,
            peak_memory_bytes: ev.peak_memory,
        },
        solver: SolverReport::default(),
        checkpoint: None,
    })
}

fn push_steps(
    out: &mut Vec<PlanCollective>,
    b: &Builder,
    phase: PlanPhase,
    n: NodeId,
    v: ValueId,
    from: &ShardingSpec,
    to: &ShardingSpec,
) -> Result<(), autopar_solver::reshard::ReshardError> {
    if from == to {
        return Ok(());
    }
    let t = b
        .resharder
        .transition(from, to, &b.g.ty(v).shape, b.elem_bytes(v))?;
    let mut cur = from.clone();
    for step in t.steps {
        out.push(PlanCollective {
            phase: phase.clone(),
            node: n.0,
            value: v.0,
            from: cur.clone(),
            to: step.after.clone(),
            op: step.op.to_string(),
            bytes: step.bytes,
            time_s: step.cost_s,
        });
        cur = step.after;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::layer_pattern;

    #[test]
    fn layer_segments() {
        assert_eq!(
            layer_pattern("h.3.attn.c_attn"),
            Some(("h.#.attn.c_attn".into(), "3,".into()))
        );
        assert_eq!(
            layer_pattern("/transformer/h.11/attn/Gemm"),
            Some(("/transformer/h.#/attn/Gemm".into(), "11,".into()))
        );
        assert_eq!(
            layer_pattern("encoder.layers.encoder_layer_7.mlp.0"),
            Some(("encoder.layers.encoder_layer_#.mlp.#".into(), "7,0,".into()))
        );
        assert_eq!(layer_pattern("node_Gemm_12"), None);
        assert_eq!(layer_pattern("wte"), None);
    }
}
