//! The solver's input and output as plain numbers: no graph types (XLA's
//! `auto_sharding_solver.h` request/response). Tests build problems by hand.
//!
//! A problem has decision *nodes*, each choosing one of its strategies; *edges* between nodes
//! whose cost depends on both choices (resharding); and optional *memory rows*, one per
//! liveness point of the training step, each bounding the bytes a device holds at that point.
//!
//! Edge costs are stored per *class*: many strategies of a node give its output (or need its
//! input) in the same sharding spec, so an edge stores a matrix over the classes of its two
//! ends rather than over their strategies. An edge may join a node to itself (`src == dst`,
//! a repeated block whose output feeds its next copy): then both ends take the same strategy.
//!
//! Objective (seconds): `sum_n cost_n[s_n] + sum_e cost_e[cls_src(s_src)][cls_dst(s_dst)] - hidden`.
//! Memory row r: `const_r + sum_(n, bytes) in terms_r bytes[s_n] <= budget`.
//!
//! **Overlap.** Some communication runs on its own stream while the devices compute (DDP's
//! bucketed gradient all-reduce, FSDP's prefetched all-gathers and gradient reduce-scatters).
//! [`Overlap`] marks, inside the node and edge costs, the seconds that may be hidden (`H`) and
//! the compute seconds that can hide them (`C`); then `hidden = min(H, C)`: only the part of
//! that communication longer than the compute is exposed. In an ILP this is one continuous
//! variable `E >= H - C, E >= 0` with `sum costs - H + E` as the objective.

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Problem {
    pub nodes: Vec<ProblemNode>,
    pub edges: Vec<ProblemEdge>,
    /// Per-device memory limit in bytes for the memory rows; `None`: unconstrained.
    pub memory_budget: Option<f64>,
    pub memory_rows: Vec<MemoryRow>,
    /// Communication that overlaps computation; `None`: everything adds up.
    pub overlap: Option<Overlap>,
}

/// Which seconds of the costs can overlap (see the module doc).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Overlap {
    /// Per node and strategy: seconds of its cost that may be hidden.
    pub node_hideable: Vec<Vec<f64>>,
    /// Per edge, like its `cost` matrix: seconds of the cost that may be hidden.
    pub edge_hideable: Vec<Vec<Vec<f64>>>,
    /// Per node and strategy: compute seconds during which hideable communication can run.
    pub node_cover: Vec<Vec<f64>>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ProblemNode {
    /// For messages (`h.0.attn.c_attn`).
    pub name: String,
    /// Seconds of each strategy (compute, and communication inside the op), already counted
    /// for every copy this node stands for.
    pub costs: Vec<f64>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ProblemEdge {
    pub src: usize,
    pub dst: usize,
    /// Class of each strategy of `src` (index into `cost`'s rows).
    pub src_class: Vec<usize>,
    /// Class of each strategy of `dst` (index into `cost`'s columns).
    pub dst_class: Vec<usize>,
    /// Seconds, `cost[src class][dst class]`, already counted for every copy of the edge.
    pub cost: Vec<Vec<f64>>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct MemoryRow {
    /// For messages: where in the step this row is (`after n812 "h.11.mlp.c_proj"`).
    pub label: String,
    /// Bytes that do not depend on any choice.
    pub constant: f64,
    /// `(node, bytes of each of its strategies)`.
    pub terms: Vec<(usize, Vec<f64>)>,
}

/// One strategy index per node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Solution {
    pub choice: Vec<usize>,
}

/// What [`evaluate`] finds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Evaluation {
    pub objective: f64,
    /// The node part of the objective.
    pub node_cost: f64,
    /// The edge part of the objective.
    pub edge_cost: f64,
    /// Seconds of communication hidden behind compute (subtracted from the sum).
    pub hidden: f64,
    /// The largest memory row, bytes (0 without rows).
    pub peak_memory: f64,
    /// Every broken rule, in words; empty for a feasible solution.
    pub violations: Vec<String>,
}

impl Problem {
    /// Structural checks: strategies exist, classes and matrices agree. Errors name the node
    /// or edge.
    pub fn check(&self) -> Result<(), String> {
        for (i, n) in self.nodes.iter().enumerate() {
            if n.costs.is_empty() {
                return Err(format!("node {i} {:?} has no strategy", n.name));
            }
            if n.costs.iter().any(|c| !c.is_finite()) {
                return Err(format!("node {i} {:?} has a non-finite cost", n.name));
            }
        }
        for (k, e) in self.edges.iter().enumerate() {
            let (Some(s), Some(d)) = (self.nodes.get(e.src), self.nodes.get(e.dst)) else {
                return Err(format!("edge {k} joins a missing node"));
            };
            if e.src_class.len() != s.costs.len() || e.dst_class.len() != d.costs.len() {
                return Err(format!(
                    "edge {k} ({:?} -> {:?}) classes do not match the strategies",
                    s.name, d.name
                ));
            }
            let rows = e.cost.len();
            let cols = e.cost.first().map_or(0, |r| r.len());
            if e.cost
                .iter()
                .any(|r| r.len() != cols || r.iter().any(|c| !c.is_finite()))
                || e.src_class.iter().any(|&c| c >= rows)
                || e.dst_class.iter().any(|&c| c >= cols)
            {
                return Err(format!(
                    "edge {k} ({:?} -> {:?}) has a bad cost matrix",
                    s.name, d.name
                ));
            }
        }
        if let Some(o) = &self.overlap {
            let bad = o.node_hideable.len() != self.nodes.len()
                || o.node_cover.len() != self.nodes.len()
                || o.edge_hideable.len() != self.edges.len()
                || self.nodes.iter().enumerate().any(|(i, n)| {
                    o.node_hideable[i].len() != n.costs.len()
                        || o.node_cover[i].len() != n.costs.len()
                })
                || self.edges.iter().enumerate().any(|(k, e)| {
                    o.edge_hideable[k].len() != e.cost.len()
                        || o.edge_hideable[k]
                            .iter()
                            .zip(&e.cost)
                            .any(|(h, c)| h.len() != c.len())
                });
            if bad {
                return Err("overlap tables do not match the nodes and edges".into());
            }
        }
        for r in &self.memory_rows {
            for (n, bytes) in &r.terms {
                if self
                    .nodes
                    .get(*n)
                    .is_none_or(|node| node.costs.len() != bytes.len())
                {
                    return Err(format!(
                        "memory row {:?} has a bad term for node {n}",
                        r.label
                    ));
                }
            }
        }
        Ok(())
    }

    /// Cost of edge `e` for the given strategies of its ends.
    pub fn edge_cost(&self, e: &ProblemEdge, s_src: usize, s_dst: usize) -> f64 {
        e.cost[e.src_class[s_src]][e.dst_class[s_dst]]
    }
}

/// Recomputes the objective of `sol` and lists its violations, independently of any solver.
pub fn evaluate(p: &Problem, sol: &Solution) -> Evaluation {
    let mut violations = vec![];
    if sol.choice.len() != p.nodes.len() {
        violations.push(format!(
            "solution has {} choices for {} nodes",
            sol.choice.len(),
            p.nodes.len()
        ));
        return Evaluation {
            objective: f64::INFINITY,
            node_cost: f64::INFINITY,
            edge_cost: 0.0,
            hidden: 0.0,
            peak_memory: 0.0,
            violations,
        };
    }
    let mut node_cost = 0.0;
    for (i, (n, &s)) in p.nodes.iter().zip(&sol.choice).enumerate() {
        match n.costs.get(s) {
            Some(c) => node_cost += c,
            None => violations.push(format!(
                "node {i} {:?}: strategy {s} of {}",
                n.name,
                n.costs.len()
            )),
        }
    }
    if !violations.is_empty() {
        return Evaluation {
            objective: f64::INFINITY,
            node_cost,
            edge_cost: 0.0,
            hidden: 0.0,
            peak_memory: 0.0,
            violations,
        };
    }
    let edge_cost: f64 = p
        .edges
        .iter()
        .map(|e| p.edge_cost(e, sol.choice[e.src], sol.choice[e.dst]))
        .sum();
    let hidden = match &p.overlap {
        None => 0.0,
        Some(o) => {
            let h: f64 = o
                .node_hideable
                .iter()
                .zip(&sol.choice)
                .map(|(h, &s)| h[s])
                .sum::<f64>()
                + p.edges
                    .iter()
                    .zip(&o.edge_hideable)
                    .map(|(e, h)| h[e.src_class[sol.choice[e.src]]][e.dst_class[sol.choice[e.dst]]])
                    .sum::<f64>();
            let c: f64 = o
                .node_cover
                .iter()
                .zip(&sol.choice)
                .map(|(c, &s)| c[s])
                .sum();
            h.min(c).max(0.0)
        }
    };
    let mut peak_memory: f64 = 0.0;
    for r in &p.memory_rows {
        let bytes = r.constant + r.terms.iter().map(|(n, b)| b[sol.choice[*n]]).sum::<f64>();
        peak_memory = peak_memory.max(bytes);
        if let Some(budget) = p.memory_budget {
            if bytes > budget * (1.0 + 1e-9) {
                violations.push(format!(
                    "memory at {}: {bytes:.0} bytes > budget {budget:.0}",
                    r.label
                ));
            }
        }
    }
    Evaluation {
        objective: node_cost + edge_cost - hidden,
        node_cost,
        edge_cost,
        hidden,
        peak_memory,
        violations,
    }
}

/// The optimum by enumeration, for tests on small problems (panics past 10^6 combinations).
pub fn brute_force(p: &Problem) -> Option<(Solution, Evaluation)> {
    let total: usize = p.nodes.iter().map(|n| n.costs.len()).product();
    assert!(total <= 1_000_000, "brute force over {total} combinations");
    let mut choice = vec![0; p.nodes.len()];
    let mut best: Option<(Solution, Evaluation)> = None;
    for _ in 0..total {
        let sol = Solution {
            choice: choice.clone(),
        };
        let ev = evaluate(p, &sol);
        if ev.violations.is_empty()
            && best
                .as_ref()
                .is_none_or(|(_, b)| ev.objective < b.objective - 1e-12)
        {
            best = Some((sol, ev));
        }
        for (i, c) in choice.iter_mut().enumerate() {
            *c += 1;
            if *c < p.nodes[i].costs.len() {
                break;
            }
            *c = 0;
        }
    }
    best
}
