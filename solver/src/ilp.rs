//! The sharding ILP: picks one strategy per node of a [`Problem`] at least total cost, within
//! the memory budget, and says how far from optimal the answer can be.
//!
//! Why an ILP: the choice of one node constrains its neighbours through resharding costs and all
//! nodes together through memory and overlap, so greedy or per-chain dynamic programming can be
//! far off; Alpa and XLA's auto-sharding solve the same kind of model exactly. The backend is
//! CBC (always built) or HiGHS (cargo feature `highs`), driven through `good_lp`.
//!
//! # Formulation
//!
//! Notation: `S_n` the strategies of node `n`; `F` the *free* nodes, those the reductions below
//! leave with two or more strategies; `P` the *coupled pairs* `p = {u, v}`, nodes joined by an
//! edge whose cost does not split into a part of `u` plus a part of `v`; `κ_p,u(s)` the class of
//! strategy `s` of `u` in pair `p` (strategies with the same cost row share a class). With
//! [`Overlap`](crate::problem::Overlap), `h` are the hideable seconds (node and edge tables),
//! `c` the cover seconds, `H = Σ h` and `C = Σ c` over the plan; `evaluate` subtracts
//! `min(H, C)`, i.e. the objective is `Σ cost - H + max(H - C, 0)`.
//!
//! Variables:
//! - `x[n][s] ∈ {0, 1}` for `n ∈ F`, `s ∈ S_n`: node `n` takes strategy `s`;
//! - `y[p][a][b] ≥ 0` (continuous) for `p ∈ P` and each pair of classes `(a, b)` of its ends:
//!   the pair takes classes `a` and `b`;
//! - `E ≥ 0` (continuous), only when `H - C` depends on the plan: the exposed overlap.
//!
//! Objective (seconds times `σ`, a power of two that brings the largest coefficient near 1;
//! `c̃` and `w` are costs less hideable seconds, after the reductions):
//!
//! ```text
//! min  K + Σ_{n∈F} Σ_s c̃[n][s]·x[n][s] + Σ_{p∈P} Σ_{a,b} w[p][a][b]·y[p][a][b] + E
//! ```
//!
//! Constraints, by family (the letters name the code that adds them, see [`Family`]):
//!
//! ```text
//! (A) Σ_s x[n][s] = 1                                   n ∈ F          one strategy per node
//! (B) Σ_b y[p][a][b] = Σ_{s: κ_p,u(s)=a} x[u][s]        p = {u,v}, a   rows of y: u's class
//! (C) Σ_a y[p][a][b] = Σ_{t: κ_p,v(t)=b} x[v][t]        p = {u,v}, b   columns of y: v's class
//! (D) Σ_{(n,s)} m[r][n][s]·x[n][s] ≤ β_r                  memory row r   bytes in GiB
//! (E) Σ_{n,s} g[n][s]·x[n][s] + Σ_{p,a,b} g[p][a][b]·y[p][a][b] + K_g ≤ E   E ≥ H - C
//! ```
//!
//! For binary `x`, (B) and (C) fix both marginals of `y[p]` to unit vectors, so `y[p]` is the
//! indicator of the chosen class pair and `Σ w·y` is exactly the pair's cost: no product of
//! variables is needed, and no `y` needs to be integer. (E) with `E ≥ 0` and `E` in the
//! objective makes `E = max(H - C, 0)` at the optimum; `g` and `K_g` are `H - C` split like
//! the objective. The overlap tables must be non-negative, so that `min(H, C) ≥ 0` as
//! `evaluate` assumes.
//!
//! # Reductions (each exact; they decide the model's size and hence the solve time)
//!
//! 1. A node with one strategy has no variable; its costs and bytes go to the constants.
//! 2. A self-edge (`src == dst`, both ends take the same strategy) is linear: its diagonal cost
//!    `cost[cls_src(s)][cls_dst(s)]` is added to `c̃[n][s]` (its hideable part to `g[n][s]`).
//! 3. All edges joining the same two nodes (either direction) are summed into one matrix over
//!    *joint* classes (the tuple of a strategy's classes across those edges).
//! 4. That matrix `W` (and its hideable twin) is split as `W[i][j] = r[i] + q[j] + R[i][j]` with
//!    `R`'s first row and column zero; `r` and `q` go to the nodes' linear terms. If `R = 0`
//!    (the cost is separable: constant, or dependent on one side only) the pair needs no `y`.
//!    Otherwise the classes are the distinct rows and columns of `R`, so `y` has as few entries
//!    as possible.
//! 5. Memory: a node's smallest byte count goes to the row's constant (exact under (A)); a row
//!    that no plan can break is dropped; a row that every plan breaks is [`SolveError::Infeasible`]
//!    before any solve; rows with the same terms keep the smallest budget.
//! 6. A free node left in no pair, no memory row and (with overlap) no term of (E) that depends
//!    on its strategy takes its cheapest strategy directly.
//! 7. Each node's least linear cost (and least `g`) moves into `K` (`K_g`), so the solver sees
//!    small non-negative numbers; `K` never reaches the solver.
//!
//! # Solving
//!
//! 1. The LP relaxation (`0 ≤ x ≤ 1`). Its optimum is a lower bound; if its solution is
//!    integral, that is the answer.
//! 2. A start plan by local search (see `Start`), from the LP's solution rounded and from the
//!    cheapest strategies; the better one. On the 2000-node chain of `tests/ilp_large.rs` with a
//!    tight memory budget, the LP-guided start is within 0.9% of the bound in under two seconds;
//!    CBC alone, with its default heuristics, was still 1% off after two minutes.
//! 3. Branch and bound from that start. CBC: the start is its incumbent and cutoff, its
//!    feasibility pump is off (it only spent time: 15 of 18 s on that chain without memory
//!    rows), and its "LP infeasible" answer then means that nothing beats the start. The
//!    answer is the better of the backend's plan and the start.
//!
//! [`SolveOptions::time_limit_s`] covers steps 1 and 3; the backends check it between their
//! own steps, so a run can overshoot it a little.
//!
//! # Lower bound and gap
//!
//! [`SolveResult::lower_bound`] is the larger of the backend's best bound at the end of branch
//! and bound (CBC `getBestPossibleObjValue`, HiGHS `mip_dual_bound`; [`BoundSource::Backend`])
//! and the LP relaxation's optimum ([`BoundSource::LpRelaxation`]), mapped back to seconds.
//! When the reductions fix every node no solver runs and the bound is the objective itself
//! ([`BoundSource::Exact`]). The reported objective is always recomputed by [`evaluate`] from
//! the decoded plan, never taken from the solver.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::time::Instant;

use good_lp::solvers::{ResolutionError, SolutionStatus};
use good_lp::{
    constraint, variable, Constraint, Expression, ProblemVariables, Solution as _, SolverModel,
    Variable, WithInitialSolution,
};

use crate::problem::{evaluate, Evaluation, Problem, ProblemEdge, Solution};

/// Bytes per unit of the memory rows given to the solver: bytes are ~1e9, so rows in bytes would
/// be far outside the solvers' tolerances' comfort zone.
const GIB: f64 = (1u64 << 30) as f64;
/// Relative slack on the budget that [`evaluate`] allows; the reductions use the same.
const BUDGET_SLACK: f64 = 1e-9;
/// Matrix entries closer than this (relative to the matrix's largest entry) count as equal when
/// classes are merged and separability is tested.
const MERGE_TOL: f64 = 1e-12;
/// Objective and row (E) coefficients smaller than this (relative to the largest of them) are
/// rounding residue of the reductions (`c - r[i] - q[j]` of reduction 4, `c - min` of
/// reduction 7, sums of edges), not costs: they are set to exactly 0. Why: CBC's simplex
/// (Clp) pivots on such entries (2e-19 next to 1 in row (E) of a real problem) and then calls
/// a vertex optimal that is not, so both the LP bound and branch and bound went wrong: a plan
/// 1.7% worse than a known feasible one came back as proven optimal.
const NOISE_TOL: f64 = 1e-12;
/// How far from 0 or 1 a decoded `x` may be and still count as integral.
const INTEGRALITY_TOL: f64 = 1e-5;

/// Which MIP solver runs the model.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Backend {
    /// COIN-OR CBC, always built (the system library `coinor-libcbc`).
    #[default]
    Cbc,
    /// HiGHS, built from source with the cargo feature `highs`.
    #[cfg(feature = "highs")]
    Highs,
}

impl Backend {
    /// The backends this build can run, by the names [`Backend::parse`] accepts.
    pub fn available() -> &'static [&'static str] {
        #[cfg(feature = "highs")]
        {
            &["cbc", "highs"]
        }
        #[cfg(not(feature = "highs"))]
        {
            &["cbc"]
        }
    }

    /// `"cbc"` or `"highs"` (any case). `"highs"` in a build without the `highs` feature is an
    /// error that says how to get it.
    pub fn parse(name: &str) -> Result<Backend, SolveError> {
        match name.to_ascii_lowercase().as_str() {
            "cbc" | "coin_cbc" | "coin-cbc" => Ok(Backend::Cbc),
            #[cfg(feature = "highs")]
            "highs" => Ok(Backend::Highs),
            #[cfg(not(feature = "highs"))]
            "highs" => Err(SolveError::BackendNotBuilt {
                name: "highs".into(),
                feature: "highs",
            }),
            _ => Err(SolveError::UnknownBackend {
                name: name.into(),
                available: Backend::available().join(", "),
            }),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Backend::Cbc => "cbc",
            #[cfg(feature = "highs")]
            Backend::Highs => "highs",
        }
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// How to run the solver.
#[derive(Clone, Debug, PartialEq)]
pub struct SolveOptions {
    pub backend: Backend,
    /// Wall-clock limit of the backend (LP relaxation and branch and bound together), seconds;
    /// `None`: until proven within `mip_gap`.
    pub time_limit_s: Option<f64>,
    /// Relative gap at which the backend may stop and call the plan optimal (`0`: exact).
    pub mip_gap: f64,
    /// Threads the backend may use; `None`: its default.
    pub threads: Option<usize>,
    /// Print the backend's log to the console.
    pub verbose: bool,
}

impl Default for SolveOptions {
    fn default() -> Self {
        SolveOptions {
            backend: Backend::Cbc,
            time_limit_s: None,
            mip_gap: 1e-4,
            threads: None,
            verbose: false,
        }
    }
}

/// How the search ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SolveStatus {
    /// Proven optimal within [`SolveOptions::mip_gap`].
    Optimal,
    /// The time limit stopped the search; the plan is the best feasible one found.
    TimeLimit,
}

/// Where [`SolveResult::lower_bound`] comes from (see the module doc).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BoundSource {
    /// No search was needed: the reductions fixed every node.
    Exact,
    /// The backend's best bound at the end of branch and bound.
    Backend,
    /// The optimum of the LP relaxation.
    LpRelaxation,
    /// The time limit stopped the backend before it had any bound (`lower_bound` is `-inf`).
    Unavailable,
}

#[derive(Clone, Debug, PartialEq)]
pub struct SolveResult {
    pub solution: Solution,
    /// Seconds, recomputed by [`evaluate`] from `solution`.
    pub objective: f64,
    /// Seconds; no plan costs less (see [`BoundSource`]).
    pub lower_bound: f64,
    pub bound_source: BoundSource,
    /// `(objective - lower_bound) / max(|objective|, 1e-12)`.
    pub gap: f64,
    pub status: SolveStatus,
    pub backend: Backend,
    /// Columns of the model given to the backend (after the reductions).
    pub variables: usize,
    /// Rows of the model given to the backend (after the reductions).
    pub constraints: usize,
    /// Seconds spent on the reductions and building the backend's model.
    pub build_s: f64,
    /// Seconds spent solving: the LP relaxation, the start heuristic, branch and bound.
    pub solve_s: f64,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SolveError {
    #[error("invalid problem: {0}")]
    Invalid(String),
    #[error("invalid solver options: {0}")]
    InvalidOptions(String),
    #[error("no plan fits the memory budget: {reason}")]
    Infeasible { reason: String },
    #[error("the time limit of {limit_s} s was hit before any feasible plan was found")]
    TimeLimitNoPlan { limit_s: f64 },
    #[error("unknown ILP backend {name:?} (available: {available})")]
    UnknownBackend { name: String, available: String },
    #[error("ILP backend {name:?} is not built in; rebuild with `--features {feature}`")]
    BackendNotBuilt { name: String, feature: &'static str },
    #[error("ILP backend {backend} failed: {message}")]
    Backend {
        backend: &'static str,
        message: String,
    },
}

/// The constraint families of the module doc; each row of the model belongs to one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Family {
    /// (A) one strategy per node.
    A,
    /// (B) rows of a pair's `y` sum to the first end's class indicator.
    B,
    /// (C) columns of a pair's `y` sum to the second end's class indicator.
    C,
    /// (D) a memory row.
    D,
    /// (E) the exposed part of overlappable communication.
    E,
}

/// Solves `p`: the best plan found, its cost, a lower bound and the model's size.
///
/// Steps: reductions and model (module doc); the LP relaxation (its optimum is a lower bound;
/// if its solution is integral it is the answer); a start plan by local search from the LP's
/// solution and from the cheapest strategies; branch and bound from that start.
/// [`SolveOptions::time_limit_s`] covers the LP and branch and bound together.
pub fn solve(p: &Problem, opts: &SolveOptions) -> Result<SolveResult, SolveError> {
    check_options(opts)?;
    let t0 = Instant::now();
    let ilp = formulate(p)?;
    let feasible = |sol: Solution| {
        let ev = evaluate(p, &sol);
        ev.violations.is_empty().then_some((sol, ev))
    };
    let result = |(solution, ev): (Solution, Evaluation),
                  lower_bound: f64,
                  bound_source,
                  status,
                  build_s,
                  solve_s| {
        let objective = ev.objective;
        // The bound is the backend's, within its tolerances: slightly above a feasible plan's
        // cost it is tolerance noise; clearly above, the backend went wrong and its bound
        // proves nothing, so none is reported.
        let (lower_bound, bound_source) =
            if lower_bound > objective + 1e-6 * objective.abs().max(1e-9) {
                (f64::NEG_INFINITY, BoundSource::Unavailable)
            } else {
                (f64::min(lower_bound, objective), bound_source)
            };
        let gap = ((objective - lower_bound) / objective.abs().max(1e-12)).max(0.0);
        SolveResult {
            solution,
            objective,
            lower_bound,
            bound_source,
            gap,
            status,
            backend: opts.backend,
            variables: ilp.n_cols,
            constraints: ilp.rows.len(),
            build_s,
            solve_s,
        }
    };
    if ilp.n_cols == 0 {
        let solution = Solution {
            choice: ilp
                .node_vars
                .iter()
                .map(|v| v.fixed().unwrap_or(0))
                .collect(),
        };
        let ev = evaluate(p, &solution);
        if !ev.violations.is_empty() {
            return Err(SolveError::Infeasible {
                reason: ev.violations.join("; "),
            });
        }
        let objective = ev.objective;
        let build_s = t0.elapsed().as_secs_f64();
        return Ok(result(
            (solution, ev),
            objective,
            BoundSource::Exact,
            SolveStatus::Optimal,
            build_s,
            0.0,
        ));
    }
    let lp_model = LpModel::new(&ilp, true);
    let mip_model = LpModel::new(&ilp, false);
    let build_s = t0.elapsed().as_secs_f64();

    let t1 = Instant::now();
    let remaining = || SolveOptions {
        time_limit_s: opts
            .time_limit_s
            .map(|t| (t - t1.elapsed().as_secs_f64()).max(0.0)),
        ..opts.clone()
    };
    let to_seconds = |scaled: f64| scaled / ilp.scale + ilp.offset;
    let usable = |b: Option<f64>| b.filter(|b| b.is_finite() && b.abs() < 1e30);

    // The LP relaxation.
    let lp = run_backend(lp_model, None, &remaining())?;
    let lp_bound = if lp.status == SolveStatus::Optimal {
        usable(lp.objective).map(to_seconds)
    } else {
        None
    };
    if let (Some(bound), Some(plan)) = (
        lp_bound,
        lp.values
            .as_deref()
            .and_then(|v| ilp.decode(v))
            .and_then(feasible),
    ) {
        let solve_s = t1.elapsed().as_secs_f64();
        return Ok(result(
            plan,
            bound,
            BoundSource::LpRelaxation,
            SolveStatus::Optimal,
            build_s,
            solve_s,
        ));
    }

    // The start: the better of local search from the LP's solution and from scratch.
    let mut start = start_plan(&ilp, None)
        .map(|choice| Solution { choice })
        .and_then(feasible);
    if let Some(guided) = lp
        .values
        .as_deref()
        .and_then(|v| start_plan(&ilp, Some(v)))
        .map(|choice| Solution { choice })
        .and_then(feasible)
    {
        if start
            .as_ref()
            .is_none_or(|(_, ev)| guided.1.objective < ev.objective)
        {
            start = Some(guided);
        }
    }
    let start_vals = start.as_ref().map(|(s, _)| start_values(&ilp, &s.choice));
    let start_cols = start_vals.as_deref().map(|v| StartCols {
        values: v,
        objective: ilp.obj.iter().zip(v).map(|(c, x)| c * x).sum(),
    });

    // Branch and bound.
    let out = run_backend(mip_model, start_cols, &remaining())?;
    let bad = |message: String| SolveError::Backend {
        backend: opts.backend.name(),
        message,
    };
    let found = match out.values.as_deref().map(|v| ilp.decode(v)) {
        Some(Some(sol)) => {
            let ev = evaluate(p, &sol);
            if ev.violations.is_empty() {
                Some((sol, ev))
            } else if out.status == SolveStatus::Optimal {
                return Err(bad(format!(
                    "returned a plan that breaks the problem: {}",
                    ev.violations.join("; ")
                )));
            } else {
                None
            }
        }
        Some(None) if out.status == SolveStatus::Optimal => {
            return Err(bad(
                "reported a solution whose strategy variables are not 0/1 with one 1 per node"
                    .into(),
            ));
        }
        None if out.status == SolveStatus::Optimal => {
            return Err(bad("reported optimality without a solution".into()))
        }
        _ => None,
    };
    // The backend's plan, or the start if the backend found nothing better.
    let plan = match (found, start) {
        (Some(f), Some(st)) => {
            if st.1.objective < f.1.objective {
                st
            } else {
                f
            }
        }
        (Some(f), None) => f,
        (None, Some(st)) => st,
        (None, None) => {
            return Err(SolveError::TimeLimitNoPlan {
                limit_s: opts.time_limit_s.unwrap_or(f64::INFINITY),
            })
        }
    };
    let mip_bound = usable(out.bound).map(to_seconds);
    let (lower_bound, bound_source) = match (mip_bound, lp_bound) {
        (Some(m), Some(l)) if l > m => (l, BoundSource::LpRelaxation),
        (Some(m), _) => (m, BoundSource::Backend),
        (None, Some(l)) => (l, BoundSource::LpRelaxation),
        (None, None) => (f64::NEG_INFINITY, BoundSource::Unavailable),
    };
    let solve_s = t1.elapsed().as_secs_f64();
    Ok(result(
        plan,
        lower_bound,
        bound_source,
        out.status,
        build_s,
        solve_s,
    ))
}

fn check_options(opts: &SolveOptions) -> Result<(), SolveError> {
    if !(opts.mip_gap.is_finite() && opts.mip_gap >= 0.0) {
        return Err(SolveError::InvalidOptions(format!(
            "mip_gap {} is not a finite number >= 0",
            opts.mip_gap
        )));
    }
    if let Some(t) = opts.time_limit_s {
        if t.is_nan() || t < 0.0 {
            return Err(SolveError::InvalidOptions(format!(
                "time limit {t} s is not >= 0"
            )));
        }
    }
    if opts.threads == Some(0) {
        return Err(SolveError::InvalidOptions(
            "threads must be at least 1".into(),
        ));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The model after the reductions.

/// How one node's choice appears in the model.
#[derive(Clone, Debug, PartialEq)]
enum NodeVars {
    /// Decided by the reductions.
    Fixed(usize),
    /// `x[n][s]` is column `first + s`.
    Free { first: usize, count: usize },
}

impl NodeVars {
    fn fixed(&self) -> Option<usize> {
        match self {
            NodeVars::Fixed(s) => Some(*s),
            NodeVars::Free { .. } => None,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
enum Sense {
    Eq,
    Le,
}

#[derive(Clone, Debug, PartialEq)]
struct Row {
    family: Family,
    terms: Vec<(usize, f64)>,
    sense: Sense,
    rhs: f64,
}

/// The reduced, scaled model: plain columns and rows, ready for any backend.
#[derive(Clone, Debug)]
struct Ilp {
    node_vars: Vec<NodeVars>,
    n_cols: usize,
    /// Objective coefficient of each column, scaled by `scale`.
    obj: Vec<f64>,
    /// Coefficient of each column in `H - C` (scaled; zero without overlap).
    hc: Vec<f64>,
    /// The constant part of `H - C` (scaled).
    k_hc: f64,
    /// The column `E` of row (E), if any.
    e_col: Option<usize>,
    /// The kind of each column.
    kind: Vec<ColKind>,
    rows: Vec<Row>,
    /// `K` of the module doc, seconds (unscaled).
    offset: f64,
    /// `σ` of the module doc.
    scale: f64,
    /// The coupled pairs, for the start heuristic.
    pairs: Vec<PairCols>,
    /// The memory rows (D) by node, for the start heuristic.
    mem: Vec<MemCols>,
}

/// Where a coupled pair's `y` lives: `y[a][b]` is column `y0 + a * nb + b`.
#[derive(Clone, Debug)]
struct PairCols {
    u: usize,
    v: usize,
    u_class: Vec<usize>,
    v_class: Vec<usize>,
    y0: usize,
    nb: usize,
}

/// A row (D) by node: `(node, GiB of each strategy)`, and its right-hand side in GiB.
#[derive(Clone, Debug)]
struct MemCols {
    terms: Vec<(usize, Vec<f64>)>,
    rhs: f64,
}

impl Ilp {
    /// The plan in `values` (one per column), if every `x` is 0/1 with one 1 per node.
    fn decode(&self, values: &[f64]) -> Option<Solution> {
        let mut choice = Vec::with_capacity(self.node_vars.len());
        for v in &self.node_vars {
            match *v {
                NodeVars::Fixed(s) => choice.push(s),
                NodeVars::Free { first, count } => {
                    let xs = values.get(first..first + count)?;
                    let mut best = 0;
                    for (s, &x) in xs.iter().enumerate() {
                        if (x - x.round()).abs() > INTEGRALITY_TOL {
                            return None;
                        }
                        if x > xs[best] {
                            best = s;
                        }
                    }
                    let ones = xs.iter().filter(|&&x| x > 0.5).count();
                    if ones != 1 {
                        return None;
                    }
                    choice.push(best);
                }
            }
        }
        Some(Solution { choice })
    }
}

/// What values a column takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ColKind {
    /// `x`: 0 or 1 (in the LP relaxation, `[0, 1]`).
    Binary,
    /// `y`, `E`: `≥ 0`.
    NonNegative,
}

/// A coupled pair after reduction 4: `y` over `cost`'s entries.
struct Coupling {
    u: usize,
    v: usize,
    /// Class of each strategy of `u` (row of `cost`).
    u_class: Vec<usize>,
    /// Class of each strategy of `v` (column of `cost`).
    v_class: Vec<usize>,
    /// Objective part `w` of each class pair, seconds.
    cost: Vec<Vec<f64>>,
    /// `H - C` part of each class pair, seconds (zero without overlap).
    hide: Vec<Vec<f64>>,
}

/// A memory row after reduction 5, bytes.
struct MemRow {
    /// `(node, extra bytes of each strategy over its smallest)`, nodes ascending.
    terms: Vec<(usize, Vec<f64>)>,
    /// Budget minus the row's least bytes.
    rhs: f64,
}

fn formulate(p: &Problem) -> Result<Ilp, SolveError> {
    p.check().map_err(SolveError::Invalid)?;
    check_overlap(p)?;
    let n_nodes = p.nodes.len();
    let mut fixed: Vec<Option<usize>> = p
        .nodes
        .iter()
        .map(|n| (n.costs.len() == 1).then_some(0))
        .collect();
    // Per node and strategy: the objective part `cost - h` and the `H - C` part `h - c`.
    let (mut lin, mut hc): (Vec<Vec<f64>>, Vec<Vec<f64>>) = match &p.overlap {
        None => (
            p.nodes.iter().map(|n| n.costs.clone()).collect(),
            p.nodes.iter().map(|n| vec![0.0; n.costs.len()]).collect(),
        ),
        Some(o) => (
            p.nodes
                .iter()
                .zip(&o.node_hideable)
                .map(|(n, h)| n.costs.iter().zip(h).map(|(c, h)| c - h).collect())
                .collect(),
            o.node_hideable
                .iter()
                .zip(&o.node_cover)
                .map(|(h, c)| h.iter().zip(c).map(|(h, c)| h - c).collect())
                .collect(),
        ),
    };

    // Reduction 2: self-edges. Reduction 3: group the others by node pair.
    let mut pairs: BTreeMap<(usize, usize), Vec<usize>> = BTreeMap::new();
    for (k, e) in p.edges.iter().enumerate() {
        if e.src == e.dst {
            let diagonal = Oriented::new(e, p.overlap.as_ref().map(|o| &o.edge_hideable[k]), e.src);
            for s in 0..lin[e.src].len() {
                let (c, h) = diagonal.parts(s, s);
                lin[e.src][s] += c;
                hc[e.src][s] += h;
            }
        } else {
            pairs
                .entry((e.src.min(e.dst), e.src.max(e.dst)))
                .or_default()
                .push(k);
        }
    }
    // Reduction 4.
    let mut couplings = vec![];
    for (&(u, v), edges) in &pairs {
        if let Some(c) = reduce_pair(p, u, v, edges, &mut lin, &mut hc) {
            couplings.push(c);
        }
    }

    // Reduction 5.
    let mem_rows = match p.memory_budget {
        Some(budget) => reduce_memory(p, budget, &fixed)?,
        None => {
            if let Some(r) = p.memory_rows.iter().find(|r| !r.constant.is_finite()) {
                return Err(SolveError::Invalid(format!(
                    "memory row {:?} has a non-finite constant",
                    r.label
                )));
            }
            vec![]
        }
    };

    // Reduction 6. With overlap, a node whose `h - c` depends on its strategy meets the others
    // in row (E).
    let varies = |xs: &[f64]| xs.iter().any(|&x| x != xs[0]);
    let mut involved = vec![false; n_nodes];
    for c in &couplings {
        involved[c.u] = true;
        involved[c.v] = true;
    }
    for r in &mem_rows {
        for (n, _) in &r.terms {
            involved[*n] = true;
        }
    }
    let overlap_varies = couplings
        .iter()
        .any(|c| c.hide.iter().flatten().any(|&h| h != 0.0))
        || (0..n_nodes).any(|n| fixed[n].is_none() && varies(&hc[n]));
    for n in 0..n_nodes {
        if fixed[n].is_none() && !involved[n] && !(overlap_varies && varies(&hc[n])) {
            fixed[n] = Some(argmin(&lin[n]));
        }
    }

    // Reduction 7 and the columns.
    let mut offset = 0.0;
    let mut k_hc = 0.0;
    let mut node_vars = Vec::with_capacity(n_nodes);
    let mut obj = vec![];
    let mut hc_col = vec![];
    let mut kind = vec![];
    for n in 0..n_nodes {
        match fixed[n] {
            Some(s) => {
                offset += lin[n][s];
                k_hc += hc[n][s];
                node_vars.push(NodeVars::Fixed(s));
            }
            None => {
                let m = lin[n][argmin(&lin[n])];
                let mh = hc[n][argmin(&hc[n])];
                offset += m;
                k_hc += mh;
                node_vars.push(NodeVars::Free {
                    first: obj.len(),
                    count: lin[n].len(),
                });
                obj.extend(lin[n].iter().map(|c| c - m));
                hc_col.extend(hc[n].iter().map(|h| h - mh));
                kind.extend(std::iter::repeat_n(ColKind::Binary, lin[n].len()));
            }
        }
    }
    let x_col = |n: usize, s: usize| match node_vars[n] {
        NodeVars::Free { first, .. } => Some(first + s),
        NodeVars::Fixed(_) => None,
    };

    let mut rows = vec![];
    for nv in &node_vars {
        if let NodeVars::Free { first, count } = *nv {
            rows.push(Row {
                family: Family::A,
                terms: (first..first + count).map(|c| (c, 1.0)).collect(),
                sense: Sense::Eq,
                rhs: 1.0,
            });
        }
    }
    let mut pairs = Vec::with_capacity(couplings.len());
    for c in couplings {
        let (na, nb) = (c.cost.len(), c.cost.first().map_or(0, |r| r.len()));
        let y0 = obj.len();
        obj.extend(c.cost.iter().flatten().copied());
        hc_col.extend(c.hide.iter().flatten().copied());
        kind.extend(std::iter::repeat_n(ColKind::NonNegative, na * nb));
        for a in 0..na {
            let mut terms: Vec<(usize, f64)> = (0..nb).map(|b| (y0 + a * nb + b, 1.0)).collect();
            for (s, _) in c.u_class.iter().enumerate().filter(|(_, &k)| k == a) {
                terms.extend(x_col(c.u, s).map(|col| (col, -1.0)));
            }
            rows.push(Row {
                family: Family::B,
                terms,
                sense: Sense::Eq,
                rhs: 0.0,
            });
        }
        for b in 0..nb {
            let mut terms: Vec<(usize, f64)> = (0..na).map(|a| (y0 + a * nb + b, 1.0)).collect();
            for (t, _) in c.v_class.iter().enumerate().filter(|(_, &k)| k == b) {
                terms.extend(x_col(c.v, t).map(|col| (col, -1.0)));
            }
            rows.push(Row {
                family: Family::C,
                terms,
                sense: Sense::Eq,
                rhs: 0.0,
            });
        }
        pairs.push(PairCols {
            u: c.u,
            v: c.v,
            u_class: c.u_class,
            v_class: c.v_class,
            y0,
            nb,
        });
    }
    let mut mem = Vec::with_capacity(mem_rows.len());
    for r in mem_rows {
        let mut terms = vec![];
        for (n, extra) in &r.terms {
            for (s, &b) in extra.iter().enumerate() {
                if b != 0.0 {
                    if let Some(col) = x_col(*n, s) {
                        terms.push((col, b / GIB));
                    }
                }
            }
        }
        rows.push(Row {
            family: Family::D,
            terms,
            sense: Sense::Le,
            rhs: r.rhs / GIB,
        });
        let by_node = r
            .terms
            .into_iter()
            .map(|(n, extra)| (n, extra.iter().map(|b| b / GIB).collect()))
            .collect();
        mem.push(MemCols {
            terms: by_node,
            rhs: r.rhs / GIB,
        });
    }

    // σ: a power of two, so scaling is exact.
    let largest = obj.iter().fold(0.0f64, |m, c| m.max(c.abs()));
    let scale = if largest > 0.0 && largest.is_finite() {
        (-largest.log2().round()).exp2()
    } else {
        1.0
    };
    for c in obj.iter_mut().chain(hc_col.iter_mut()) {
        *c *= scale;
    }
    // Rounding residue to exact zeros (see `NOISE_TOL`); after scaling the largest is near 1.
    let noise = NOISE_TOL
        * obj
            .iter()
            .chain(&hc_col)
            .fold(0.0f64, |m, c| m.max(c.abs()));
    for c in obj.iter_mut().chain(hc_col.iter_mut()) {
        if c.abs() <= noise {
            *c = 0.0;
        }
    }
    k_hc *= scale;

    // (E): the exposed overlap `E >= H - C`, in scaled seconds, when `H - C` depends on the plan.
    let e_col = if hc_col.iter().any(|&h| h != 0.0) {
        let e = obj.len();
        obj.push(1.0);
        hc_col.push(0.0);
        kind.push(ColKind::NonNegative);
        let mut terms: Vec<(usize, f64)> = hc_col
            .iter()
            .enumerate()
            .filter(|(_, &h)| h != 0.0)
            .map(|(c, &h)| (c, h))
            .collect();
        terms.push((e, -1.0));
        rows.push(Row {
            family: Family::E,
            terms,
            sense: Sense::Le,
            rhs: -k_hc,
        });
        Some(e)
    } else {
        // `E = max(0, H - C)` is a constant.
        offset += (k_hc / scale).max(0.0);
        None
    };
    Ok(Ilp {
        node_vars,
        n_cols: obj.len(),
        obj,
        hc: hc_col,
        k_hc,
        e_col,
        kind,
        rows,
        offset,
        scale,
        pairs,
        mem,
    })
}

/// The overlap tables: finite and non-negative (then `evaluate`'s `max(0, min(H, C))` is the
/// `min(H, C)` that (E) models).
fn check_overlap(p: &Problem) -> Result<(), SolveError> {
    let Some(o) = &p.overlap else {
        return Ok(());
    };
    let bad = |xs: &[f64]| xs.iter().any(|x| !(x.is_finite() && *x >= 0.0));
    for (i, n) in p.nodes.iter().enumerate() {
        if bad(&o.node_hideable[i]) || bad(&o.node_cover[i]) {
            return Err(SolveError::Invalid(format!(
                "node {i} {:?}: overlap seconds must be finite and >= 0",
                n.name
            )));
        }
    }
    for (k, e) in p.edges.iter().enumerate() {
        if o.edge_hideable[k].iter().any(|row| bad(row)) {
            return Err(SolveError::Invalid(format!(
                "edge {k} ({:?} -> {:?}): hideable seconds must be finite and >= 0",
                p.nodes[e.src].name, p.nodes[e.dst].name
            )));
        }
    }
    Ok(())
}

fn argmin(xs: &[f64]) -> usize {
    let mut best = 0;
    for (i, &x) in xs.iter().enumerate() {
        if x < xs[best] {
            best = i;
        }
    }
    best
}

/// Groups strategies whose keys are equal (by `eq`); returns the group of each item and one
/// representative per group.
fn group_by<K>(keys: &[K], eq: impl Fn(&K, &K) -> bool) -> (Vec<usize>, Vec<usize>) {
    let mut group = Vec::with_capacity(keys.len());
    let mut reps: Vec<usize> = vec![];
    for (i, k) in keys.iter().enumerate() {
        match reps.iter().position(|&r| eq(&keys[r], k)) {
            Some(g) => group.push(g),
            None => {
                group.push(reps.len());
                reps.push(i);
            }
        }
    }
    (group, reps)
}

/// An edge seen from `u` to `v`, whichever way it points.
struct Oriented<'a> {
    u_class: &'a [usize],
    v_class: &'a [usize],
    edge: &'a ProblemEdge,
    /// Its hideable seconds, like `edge.cost`, with overlap.
    hideable: Option<&'a Vec<Vec<f64>>>,
    /// `edge.src` is `v`.
    flipped: bool,
}

impl<'a> Oriented<'a> {
    fn new(edge: &'a ProblemEdge, hideable: Option<&'a Vec<Vec<f64>>>, u: usize) -> Self {
        if edge.src == u {
            Oriented {
                u_class: &edge.src_class,
                v_class: &edge.dst_class,
                edge,
                hideable,
                flipped: false,
            }
        } else {
            Oriented {
                u_class: &edge.dst_class,
                v_class: &edge.src_class,
                edge,
                hideable,
                flipped: true,
            }
        }
    }

    /// `(cost - hideable, hideable)` when `u` takes strategy `s` and `v` strategy `t`.
    fn parts(&self, s: usize, t: usize) -> (f64, f64) {
        let (a, b) = (self.u_class[s], self.v_class[t]);
        let (a, b) = if self.flipped { (b, a) } else { (a, b) };
        let h = self.hideable.map_or(0.0, |h| h[a][b]);
        (self.edge.cost[a][b] - h, h)
    }
}

/// `W[i][j] = r[i] + q[j] + R[i][j]` with `R`'s first row and column zero: `(r, q, R)`.
fn split(w: &[Vec<f64>]) -> (Vec<f64>, Vec<f64>, Vec<Vec<f64>>) {
    let r: Vec<f64> = w.iter().map(|row| row[0]).collect();
    let q: Vec<f64> = w[0].iter().map(|&c| c - w[0][0]).collect();
    let rest = w
        .iter()
        .enumerate()
        .map(|(i, row)| {
            row.iter()
                .enumerate()
                .map(|(j, &c)| c - r[i] - q[j])
                .collect()
        })
        .collect();
    (r, q, rest)
}

/// Reductions 3 and 4 for the edges joining `u < v`: adds the separable parts to `lin` (the
/// objective) and `hc` (`H - C`), and returns what is left, if anything.
fn reduce_pair(
    p: &Problem,
    u: usize,
    v: usize,
    edges: &[usize],
    lin: &mut [Vec<f64>],
    hc: &mut [Vec<f64>],
) -> Option<Coupling> {
    let hideable = |k: usize| p.overlap.as_ref().map(|o| &o.edge_hideable[k]);
    let oriented: Vec<Oriented> = edges
        .iter()
        .map(|&k| Oriented::new(&p.edges[k], hideable(k), u))
        .collect();
    let u_keys: Vec<Vec<usize>> = (0..p.nodes[u].costs.len())
        .map(|s| oriented.iter().map(|o| o.u_class[s]).collect())
        .collect();
    let v_keys: Vec<Vec<usize>> = (0..p.nodes[v].costs.len())
        .map(|t| oriented.iter().map(|o| o.v_class[t]).collect())
        .collect();
    let (u_joint, u_reps) = group_by(&u_keys, |a, b| a == b);
    let (v_joint, v_reps) = group_by(&v_keys, |a, b| a == b);
    let sums: Vec<Vec<(f64, f64)>> = u_reps
        .iter()
        .map(|&s| {
            v_reps
                .iter()
                .map(|&t| {
                    oriented
                        .iter()
                        .map(|o| o.parts(s, t))
                        .fold((0.0, 0.0), |acc, x| (acc.0 + x.0, acc.1 + x.1))
                })
                .collect()
        })
        .collect();
    let w_obj: Vec<Vec<f64>> = sums
        .iter()
        .map(|row| row.iter().map(|x| x.0).collect())
        .collect();
    let w_hc: Vec<Vec<f64>> = sums
        .iter()
        .map(|row| row.iter().map(|x| x.1).collect())
        .collect();
    let (r_obj, q_obj, big_obj) = split(&w_obj);
    let (r_hc, q_hc, big_hc) = split(&w_hc);
    for s in 0..u_joint.len() {
        lin[u][s] += r_obj[u_joint[s]];
        hc[u][s] += r_hc[u_joint[s]];
    }
    for t in 0..v_joint.len() {
        lin[v][t] += q_obj[v_joint[t]];
        hc[v][t] += q_hc[v_joint[t]];
    }
    let tol_of =
        |w: &[Vec<f64>]| MERGE_TOL * w.iter().flatten().fold(0.0f64, |m, c| m.max(c.abs()));
    let (tol_obj, tol_hc) = (tol_of(&w_obj), tol_of(&w_hc));
    // Residue of the split is not a cost (see `NOISE_TOL`).
    let snap = |m: Vec<Vec<f64>>, tol: f64| -> Vec<Vec<f64>> {
        m.into_iter()
            .map(|row| {
                row.into_iter()
                    .map(|c| if c.abs() <= tol { 0.0 } else { c })
                    .collect()
            })
            .collect()
    };
    let (big_obj, big_hc) = (snap(big_obj, tol_obj), snap(big_hc, tol_hc));
    let zero = |m: &[Vec<f64>], tol: f64| m.iter().flatten().all(|c| c.abs() <= tol);
    if zero(&big_obj, tol_obj) && zero(&big_hc, tol_hc) {
        return None;
    }
    // Classes: the distinct rows (columns) of both remainders together.
    let close = |a: &(Vec<f64>, Vec<f64>), b: &(Vec<f64>, Vec<f64>)| {
        a.0.iter().zip(&b.0).all(|(x, y)| (x - y).abs() <= tol_obj)
            && a.1.iter().zip(&b.1).all(|(x, y)| (x - y).abs() <= tol_hc)
    };
    let rows: Vec<(Vec<f64>, Vec<f64>)> = big_obj
        .iter()
        .cloned()
        .zip(big_hc.iter().cloned())
        .collect();
    let (row_class, row_reps) = group_by(&rows, close);
    let column = |m: &[Vec<f64>], j: usize| m.iter().map(|row| row[j]).collect::<Vec<f64>>();
    let cols: Vec<(Vec<f64>, Vec<f64>)> = (0..v_reps.len())
        .map(|j| (column(&big_obj, j), column(&big_hc, j)))
        .collect();
    let (col_class, col_reps) = group_by(&cols, close);
    let pick = |m: &[Vec<f64>]| {
        row_reps
            .iter()
            .map(|&i| col_reps.iter().map(|&j| m[i][j]).collect())
            .collect()
    };
    Some(Coupling {
        u,
        v,
        u_class: u_joint.iter().map(|&i| row_class[i]).collect(),
        v_class: v_joint.iter().map(|&j| col_class[j]).collect(),
        cost: pick(&big_obj),
        hide: pick(&big_hc),
    })
}

/// Reduction 5. `fixed` marks the nodes with one strategy.
fn reduce_memory(
    p: &Problem,
    budget: f64,
    fixed: &[Option<usize>],
) -> Result<Vec<MemRow>, SolveError> {
    if !budget.is_finite() {
        return Err(SolveError::Invalid(format!(
            "memory budget {budget} is not finite"
        )));
    }
    let mut by_terms: HashMap<Vec<(usize, Vec<u64>)>, usize> = HashMap::new();
    let mut rows: Vec<MemRow> = vec![];
    for r in &p.memory_rows {
        if !r.constant.is_finite() {
            return Err(SolveError::Invalid(format!(
                "memory row {:?} has a non-finite constant",
                r.label
            )));
        }
        let mut least = r.constant;
        let mut per_node: BTreeMap<usize, Vec<f64>> = BTreeMap::new();
        for (n, bytes) in &r.terms {
            if bytes.iter().any(|b| !b.is_finite()) {
                return Err(SolveError::Invalid(format!(
                    "memory row {:?}: non-finite bytes for node {n} {:?}",
                    r.label, p.nodes[*n].name
                )));
            }
            match fixed[*n] {
                Some(s) => least += bytes[s],
                None => {
                    let acc = per_node.entry(*n).or_insert_with(|| vec![0.0; bytes.len()]);
                    for (a, b) in acc.iter_mut().zip(bytes) {
                        *a += b;
                    }
                }
            }
        }
        let mut terms = vec![];
        let mut most_extra = 0.0;
        for (n, bytes) in per_node {
            let m = bytes[argmin(&bytes)];
            least += m;
            let extra: Vec<f64> = bytes.iter().map(|b| b - m).collect();
            let top = extra.iter().fold(0.0f64, |a, &b| a.max(b));
            if top > 0.0 {
                most_extra += top;
                terms.push((n, extra));
            }
        }
        if least > budget * (1.0 + BUDGET_SLACK) {
            return Err(SolveError::Infeasible {
                reason: format!("memory row {:?} holds at least {least:.0} bytes under any plan, over the budget {budget:.0}", r.label),
            });
        }
        if least + most_extra <= budget {
            continue; // no plan can break it
        }
        // `least` may pass the budget by `evaluate`'s slack (or by rounding): the row then
        // forces every node to its least bytes.
        let rhs = (budget - least).max(0.0);
        let key: Vec<(usize, Vec<u64>)> = terms
            .iter()
            .map(|(n, e)| (*n, e.iter().map(|b| b.to_bits()).collect()))
            .collect();
        match by_terms.get(&key) {
            Some(&i) => rows[i].rhs = rows[i].rhs.min(rhs),
            None => {
                by_terms.insert(key, rows.len());
                rows.push(MemRow { terms, rhs });
            }
        }
    }
    Ok(rows)
}

// ---------------------------------------------------------------------------------------------
// The start heuristic.

/// Local search for a feasible plan, in the reduced model's terms. Why: CBC otherwise spends most
/// of its time on large models in its feasibility pump looking for a first plan, and a time limit
/// can stop it before it has any; the start is given to the backend as its first incumbent and
/// is the answer if the backend finds nothing better.
///
/// Iterated conditional modes: each node in turn takes the strategy cheapest given its
/// neighbours' current ones. Memory is repaired greedily (in the most violated row (D), the
/// change that removes the most excess per unit of extra cost), from the cheapest plan and,
/// failing that, from the plan of least memory; then a last round of changes that keep every
/// row (D) lowers the cost.
struct Start<'a> {
    ilp: &'a Ilp,
    /// Pairs at each node.
    pairs_at: Vec<Vec<usize>>,
    /// `(row, term)` of each node in the rows (D).
    rows_at: Vec<Vec<(usize, usize)>>,
    free: Vec<usize>,
    choice: Vec<usize>,
    /// GiB of each row (D) under `choice`.
    load: Vec<f64>,
    /// `H - C` under `choice` (scaled).
    hc_total: f64,
}

/// GiB by which a row (D) may exceed its right-hand side in the start (a byte).
const START_MEM_TOL: f64 = 1.0 / GIB;

impl<'a> Start<'a> {
    fn new(ilp: &'a Ilp) -> Self {
        let n = ilp.node_vars.len();
        let mut pairs_at = vec![vec![]; n];
        for (k, p) in ilp.pairs.iter().enumerate() {
            pairs_at[p.u].push(k);
            pairs_at[p.v].push(k);
        }
        let mut rows_at = vec![vec![]; n];
        for (r, row) in ilp.mem.iter().enumerate() {
            for (t, (node, _)) in row.terms.iter().enumerate() {
                rows_at[*node].push((r, t));
            }
        }
        let free = (0..n)
            .filter(|&i| ilp.node_vars[i].fixed().is_none())
            .collect();
        let choice = ilp
            .node_vars
            .iter()
            .map(|v| v.fixed().unwrap_or(0))
            .collect();
        Start {
            ilp,
            pairs_at,
            rows_at,
            free,
            choice,
            load: vec![0.0; ilp.mem.len()],
            hc_total: 0.0,
        }
    }

    fn strategies(&self, n: usize) -> usize {
        match self.ilp.node_vars[n] {
            NodeVars::Free { count, .. } => count,
            NodeVars::Fixed(_) => 1,
        }
    }

    /// Objective and `H - C` parts (scaled) of node `n` taking `s` given the others' current
    /// strategies: its `x` and the `y` of its pairs.
    fn local(&self, n: usize, s: usize) -> (f64, f64) {
        let NodeVars::Free { first, .. } = self.ilp.node_vars[n] else {
            return (0.0, 0.0);
        };
        let (mut o, mut h) = (self.ilp.obj[first + s], self.ilp.hc[first + s]);
        for &k in &self.pairs_at[n] {
            let p = &self.ilp.pairs[k];
            let (a, b) = if p.u == n {
                (p.u_class[s], p.v_class[self.choice[p.v]])
            } else {
                (p.u_class[self.choice[p.u]], p.v_class[s])
            };
            o += self.ilp.obj[p.y0 + a * p.nb + b];
            h += self.ilp.hc[p.y0 + a * p.nb + b];
        }
        (o, h)
    }

    /// Scaled cost of node `n` taking `s` given the others' current strategies, up to a
    /// constant: differences are exact changes of the objective, `E` included.
    fn cost(&self, n: usize, s: usize) -> f64 {
        let (o, h) = self.local(n, s);
        match self.ilp.e_col {
            None => o,
            Some(_) => o + (self.hc_total - self.local(n, self.choice[n]).1 + h).max(0.0),
        }
    }

    fn bytes(&self, r: usize, t: usize, s: usize) -> f64 {
        self.ilp.mem[r].terms[t].1[s]
    }

    fn reload(&mut self) {
        for (r, row) in self.ilp.mem.iter().enumerate() {
            self.load[r] = row.terms.iter().map(|(n, b)| b[self.choice[*n]]).sum();
        }
        if self.ilp.e_col.is_some() {
            let values = start_values(self.ilp, &self.choice);
            self.hc_total = self.ilp.k_hc
                + self
                    .ilp
                    .hc
                    .iter()
                    .zip(&values)
                    .map(|(h, v)| h * v)
                    .sum::<f64>();
        }
    }

    fn set(&mut self, n: usize, s: usize) {
        let cur = self.choice[n];
        if self.ilp.e_col.is_some() {
            self.hc_total += self.local(n, s).1 - self.local(n, cur).1;
        }
        for &(r, t) in &self.rows_at[n] {
            self.load[r] += self.bytes(r, t, s) - self.bytes(r, t, cur);
        }
        self.choice[n] = s;
    }

    fn excess_change(&self, n: usize, s: usize) -> f64 {
        let cur = self.choice[n];
        let mut d = 0.0;
        for &(r, t) in &self.rows_at[n] {
            let rhs = self.ilp.mem[r].rhs;
            let now = self.load[r];
            let then = now + self.bytes(r, t, s) - self.bytes(r, t, cur);
            d += (then - rhs).max(0.0) - (now - rhs).max(0.0);
        }
        d
    }

    fn fits(&self, n: usize, s: usize) -> bool {
        let cur = self.choice[n];
        self.rows_at[n].iter().all(|&(r, t)| {
            self.load[r] + self.bytes(r, t, s) - self.bytes(r, t, cur)
                <= self.ilp.mem[r].rhs + START_MEM_TOL
        })
    }

    /// One pass over the nodes; whether anything changed.
    fn sweep(&mut self, keep_memory: bool) -> bool {
        let mut changed = false;
        for i in 0..self.free.len() {
            let n = self.free[i];
            let cur = self.choice[n];
            let mut best = (self.cost(n, cur), cur);
            for s in 0..self.strategies(n) {
                let c = self.cost(n, s);
                if c < best.0 - 1e-12 * best.0.abs().max(1e-9) && (!keep_memory || self.fits(n, s))
                {
                    best = (c, s);
                }
            }
            if best.1 != cur {
                self.set(n, best.1);
                changed = true;
            }
        }
        changed
    }

    fn improve(&mut self, keep_memory: bool) {
        for _ in 0..10 {
            let swept = self.sweep(keep_memory);
            let traded = keep_memory && !self.ilp.mem.is_empty() && self.trade();
            if !swept && !traded {
                break;
            }
        }
    }

    /// One pass of trades: a node takes a cheaper strategy that breaks some rows (D), and one
    /// other node of those rows changes to mend them, when the two together lower the cost.
    fn trade(&mut self) -> bool {
        let mut changed = false;
        for i in 0..self.free.len() {
            let n = self.free[i];
            let cur = self.choice[n];
            let c_cur = self.cost(n, cur);
            for s in 0..self.strategies(n) {
                let dn = self.cost(n, s) - c_cur;
                if s == cur || dn >= -1e-12 * c_cur.abs().max(1e-9) || self.fits(n, s) {
                    continue;
                }
                self.set(n, s);
                let broken: Vec<usize> = self.rows_at[n]
                    .iter()
                    .map(|&(r, _)| r)
                    .filter(|&r| self.load[r] > self.ilp.mem[r].rhs + START_MEM_TOL)
                    .collect();
                let mut best: Option<(f64, usize, usize)> = None;
                if let Some(&r0) = broken.first() {
                    for &(m, _) in &self.ilp.mem[r0].terms {
                        if m == n {
                            continue;
                        }
                        let cm = self.choice[m];
                        let c_m = self.cost(m, cm);
                        for t in 0..self.strategies(m) {
                            if t == cm || !self.fits(m, t) || !self.mends(m, t, &broken) {
                                continue;
                            }
                            let d = dn + self.cost(m, t) - c_m;
                            if d < -1e-12 * c_cur.abs().max(1e-9) && best.is_none_or(|b| d < b.0) {
                                best = Some((d, m, t));
                            }
                        }
                    }
                }
                match best {
                    Some((_, m, t)) => {
                        self.set(m, t);
                        changed = true;
                        break;
                    }
                    None => self.set(n, cur),
                }
            }
        }
        changed
    }

    /// Whether `m` taking `t` brings every row of `broken` within its right-hand side.
    fn mends(&self, m: usize, t: usize, broken: &[usize]) -> bool {
        let cur = self.choice[m];
        broken.iter().all(|&r| {
            let delta: f64 = self.rows_at[m]
                .iter()
                .filter(|&&(r2, _)| r2 == r)
                .map(|&(_, k)| self.bytes(r, k, t) - self.bytes(r, k, cur))
                .sum();
            self.load[r] + delta <= self.ilp.mem[r].rhs + START_MEM_TOL
        })
    }

    /// Moves until every row (D) holds; false if stuck.
    fn repair(&mut self) -> bool {
        let limit = 8
            * self.free.len().max(1)
            * self
                .free
                .iter()
                .map(|&n| self.strategies(n))
                .max()
                .unwrap_or(1);
        for _ in 0..limit {
            let worst = (0..self.ilp.mem.len())
                .map(|r| (self.load[r] - self.ilp.mem[r].rhs, r))
                .filter(|&(e, _)| e > START_MEM_TOL)
                .max_by(|a, b| a.0.total_cmp(&b.0));
            let Some((_, r)) = worst else {
                return true;
            };
            let mut best: Option<(f64, usize, usize)> = None;
            for &(n, _) in &self.ilp.mem[r].terms {
                let cur = self.choice[n];
                let c0 = self.cost(n, cur);
                for s in 0..self.strategies(n) {
                    let dv = self.excess_change(n, s);
                    if s == cur || dv >= -START_MEM_TOL * 1e-3 {
                        continue;
                    }
                    let score = (self.cost(n, s) - c0) / -dv;
                    if best.is_none_or(|b| score < b.0) {
                        best = Some((score, n, s));
                    }
                }
            }
            match best {
                Some((_, n, s)) => self.set(n, s),
                None => return false,
            }
        }
        false
    }
}

/// A plan (a strategy per node) for the backend to start from, if the heuristic finds one.
fn start_plan(ilp: &Ilp, guide: Option<&[f64]>) -> Option<Vec<usize>> {
    let mut st = Start::new(ilp);
    if let Some(g) = guide {
        for i in 0..st.free.len() {
            let n = st.free[i];
            if let NodeVars::Free { first, count } = ilp.node_vars[n] {
                st.choice[n] = (0..count)
                    .max_by(|&a, &b| g[first + a].total_cmp(&g[first + b]))
                    .unwrap_or(0);
            }
        }
        st.reload();
        if !st.repair() {
            return None;
        }
        st.improve(true);
        st.reload();
        let fits = st
            .ilp
            .mem
            .iter()
            .zip(&st.load)
            .all(|(row, &l)| l <= row.rhs + START_MEM_TOL);
        return fits.then_some(st.choice);
    }
    for i in 0..st.free.len() {
        let n = st.free[i];
        st.choice[n] = (0..st.strategies(n))
            .min_by(|&a, &b| st.cost_alone(n, a).total_cmp(&st.cost_alone(n, b)))
            .unwrap_or(0);
    }
    st.reload();
    st.improve(false);
    if !st.repair() {
        for i in 0..st.free.len() {
            let n = st.free[i];
            let bytes = |s: usize| {
                st.rows_at[n]
                    .iter()
                    .map(|&(r, t)| st.bytes(r, t, s))
                    .sum::<f64>()
            };
            st.choice[n] = (0..st.strategies(n))
                .min_by(|&a, &b| bytes(a).total_cmp(&bytes(b)))
                .unwrap_or(0);
        }
        st.reload();
        if !st.repair() {
            return None;
        }
    }
    st.improve(true);
    st.reload();
    let fits = st
        .ilp
        .mem
        .iter()
        .zip(&st.load)
        .all(|(row, &l)| l <= row.rhs + START_MEM_TOL);
    fits.then_some(st.choice)
}

impl Start<'_> {
    /// Linear cost of `n` taking `s`, ignoring its pairs.
    fn cost_alone(&self, n: usize, s: usize) -> f64 {
        match self.ilp.node_vars[n] {
            NodeVars::Free { first, .. } => self.ilp.obj[first + s],
            NodeVars::Fixed(_) => 0.0,
        }
    }
}

/// Column values of the plan `choice`.
fn start_values(ilp: &Ilp, choice: &[usize]) -> Vec<f64> {
    let mut values = vec![0.0; ilp.n_cols];
    for (n, v) in ilp.node_vars.iter().enumerate() {
        if let NodeVars::Free { first, .. } = *v {
            values[first + choice[n]] = 1.0;
        }
    }
    for p in &ilp.pairs {
        values[p.y0 + p.u_class[choice[p.u]] * p.nb + p.v_class[choice[p.v]]] = 1.0;
    }
    if let Some(e) = ilp.e_col {
        let hc: f64 = ilp.hc.iter().zip(&values).map(|(h, v)| h * v).sum();
        values[e] = (hc + ilp.k_hc).max(0.0);
    }
    values
}

// ---------------------------------------------------------------------------------------------
// Backends.

/// The model in `good_lp` terms.
struct LpModel {
    vars: ProblemVariables,
    cols: Vec<Variable>,
    objective: Expression,
    constraints: Vec<Constraint>,
    /// The LP relaxation rather than the MIP (HiGHS picks its LP method by it).
    #[cfg_attr(not(feature = "highs"), allow(dead_code))]
    relaxed: bool,
}

impl LpModel {
    /// `relax`: `x` continuous in `[0, 1]` (the LP relaxation).
    fn new(ilp: &Ilp, relax: bool) -> LpModel {
        let mut vars = ProblemVariables::new();
        let cols: Vec<Variable> = ilp
            .kind
            .iter()
            .map(|&k| {
                vars.add(match (k, relax) {
                    (ColKind::Binary, false) => variable().binary(),
                    (ColKind::Binary, true) => variable().min(0.0).max(1.0),
                    (ColKind::NonNegative, _) => variable().min(0.0),
                })
            })
            .collect();
        let mut objective = Expression::with_capacity(ilp.n_cols);
        for (&c, &col) in ilp.obj.iter().zip(&cols) {
            if c != 0.0 {
                objective.add_mul(c, col);
            }
        }
        let constraints = ilp
            .rows
            .iter()
            .map(|r| {
                let mut e = Expression::with_capacity(r.terms.len());
                for &(col, c) in &r.terms {
                    e.add_mul(c, cols[col]);
                }
                match r.sense {
                    Sense::Eq => constraint::eq(e, r.rhs),
                    Sense::Le => constraint::leq(e, r.rhs),
                }
            })
            .collect();
        LpModel {
            vars,
            cols,
            objective,
            constraints,
            relaxed: relax,
        }
    }
}

/// What a backend run gives back, in the scaled model's units.
struct Outcome {
    /// A value per column, when the backend has a solution (not checked here).
    values: Option<Vec<f64>>,
    status: SolveStatus,
    /// The backend's best bound on the scaled objective (without `K`).
    bound: Option<f64>,
    /// The backend's objective value (scaled, without `K`).
    objective: Option<f64>,
}

/// A feasible plan for the backend's first incumbent: a value per column and the scaled
/// objective without `K`.
#[derive(Clone, Copy)]
struct StartCols<'a> {
    values: &'a [f64],
    objective: f64,
}

/// CBC's secondary status "linear relaxation not feasible (or worse than cutoff)".
const CBC_LP_INFEASIBLE_OR_CUTOFF: i32 = 1;

fn run_backend(
    m: LpModel,
    start: Option<StartCols<'_>>,
    opts: &SolveOptions,
) -> Result<Outcome, SolveError> {
    match opts.backend {
        Backend::Cbc => run_cbc(m, start, opts),
        #[cfg(feature = "highs")]
        Backend::Highs => run_highs(m, start, opts),
    }
}

fn run_cbc(
    m: LpModel,
    start: Option<StartCols<'_>>,
    opts: &SolveOptions,
) -> Result<Outcome, SolveError> {
    let LpModel {
        vars,
        cols,
        objective,
        constraints,
        ..
    } = m;
    let mut model = vars.minimise(objective).using(good_lp::coin_cbc);
    if let Some(st) = start {
        model = model.with_initial_solution(cols.iter().copied().zip(st.values.iter().copied()));
        // With a start, CBC's feasibility pump only spends time (15 of 18 s on the 2000-node
        // chain of the tests) looking for plans it rarely improves on.
        model.set_parameter("feasibilityPump", "off");
    }
    let verbose = opts.verbose;
    model.set_log_level(if verbose { 1 } else { 0 });
    // Clp's own messages (presolve notes) print even at CBC log level 0.
    model.set_parameter("slogLevel", if verbose { "1" } else { "0" });
    model.set_parameter("ratioGap", &opts.mip_gap.to_string());
    if let Some(t) = opts.time_limit_s.filter(|t| t.is_finite()) {
        model.set_parameter("seconds", &t.to_string());
    }
    if let Some(n) = opts.threads {
        model.set_parameter("threads", &n.to_string());
    }
    // A start's objective is CBC's cutoff; this keeps plans better by any amount admissible.
    model.set_parameter("increment", "1e-9");
    for c in constraints {
        model.add_constraint(c);
    }
    let fail = |message: String| SolveError::Backend {
        backend: "cbc",
        message,
    };
    // With a start, "infeasible" means that no plan beats the start (CBC's cutoff) by more than
    // `increment`: the start is optimal, and its objective the bound (CBC's own best bound is
    // then stale).
    let start_is_optimal = |st: StartCols<'_>| Outcome {
        values: Some(st.values.to_vec()),
        status: SolveStatus::Optimal,
        bound: Some(st.objective),
        objective: Some(st.objective),
    };
    match model.solve() {
        Ok(sol) => {
            let raw = sol.model();
            if raw.secondary_status() as i32 == CBC_LP_INFEASIBLE_OR_CUTOFF {
                return match start {
                    Some(st) => Ok(start_is_optimal(st)),
                    None => Err(SolveError::Infeasible {
                        reason: "CBC proved that no plan satisfies every memory row".into(),
                    }),
                };
            }
            let status = match sol.status() {
                SolutionStatus::TimeLimit => SolveStatus::TimeLimit,
                _ => SolveStatus::Optimal,
            };
            let values = cols.iter().map(|&c| sol.value(c)).collect();
            Ok(Outcome {
                values: Some(values),
                status,
                bound: Some(raw.best_possible_value()),
                objective: Some(raw.obj_value()),
            })
        }
        Err(ResolutionError::Infeasible) => match start {
            Some(st) => Ok(start_is_optimal(st)),
            None => Err(SolveError::Infeasible {
                reason: "CBC proved that no plan satisfies every memory row".into(),
            }),
        },
        Err(e) => Err(fail(e.to_string())),
    }
}

#[cfg(feature = "highs")]
fn run_highs(
    m: LpModel,
    start: Option<StartCols<'_>>,
    opts: &SolveOptions,
) -> Result<Outcome, SolveError> {
    use highs::{HighsModelStatus as St, HighsSolutionStatus};
    let LpModel {
        vars,
        cols,
        objective,
        constraints,
        relaxed,
    } = m;
    let mut problem = vars.minimise(objective).using(good_lp::highs);
    for c in constraints {
        problem.add_constraint(c);
    }
    let fail = |message: String| SolveError::Backend {
        backend: "highs",
        message,
    };
    let mut model = problem.try_into_inner().map_err(|e| fail(e.to_string()))?;
    let set = |key: &str, r: Result<(), highs::TrySetOptionError>| {
        r.map_err(|e| fail(format!("setting {key}: {e:?}")))
    };
    if opts.verbose {
        set("output_flag", model.try_set_option("output_flag", true))?;
        set(
            "log_to_console",
            model.try_set_option("log_to_console", true),
        )?;
    }
    set(
        "mip_rel_gap",
        model.try_set_option("mip_rel_gap", opts.mip_gap),
    )?;
    if let Some(t) = opts.time_limit_s.filter(|t| t.is_finite()) {
        set("time_limit", model.try_set_option("time_limit", t))?;
    }
    if let Some(n) = opts.threads {
        let n = i32::try_from(n).map_err(|_| SolveError::InvalidOptions(format!("{n} threads")))?;
        set("threads", model.try_set_option("threads", n))?;
    }
    if relaxed {
        // HiGHS's interior point method with crossover: 1.9 s where its dual simplex took 9.4 s
        // on the LP of the 2000-node chain with overlap (and 2.2 s against 1.5 s without).
        set("solver", model.try_set_option("solver", "ipm"))?;
    }
    if let Some(st) = start {
        model
            .try_set_solution(Some(st.values), None, None, None)
            .map_err(|e| fail(format!("setting the start: {e:?}")))?;
    }
    let solved = model.try_solve().map_err(|e| fail(format!("{e:?}")))?;
    let status = match solved.status() {
        St::Optimal | St::ObjectiveBound | St::ObjectiveTarget => SolveStatus::Optimal,
        St::ReachedTimeLimit
        | St::ReachedIterationLimit
        | St::ReachedSolutionLimit
        | St::ReachedInterrupt => SolveStatus::TimeLimit,
        St::Infeasible | St::UnboundedOrInfeasible => {
            return Err(SolveError::Infeasible {
                reason: "HiGHS proved that no plan satisfies every memory row".into(),
            })
        }
        other => return Err(fail(format!("model status {other:?}"))),
    };
    if solved.primal_solution_status() != HighsSolutionStatus::Feasible {
        return Ok(Outcome {
            values: None,
            status,
            bound: None,
            objective: None,
        });
    }
    // good_lp creates HiGHS's columns in the order of `cols`.
    let values: Vec<f64> = solved.get_solution().columns().to_vec();
    if values.len() != cols.len() {
        return Err(fail(format!(
            "{} column values for {} columns",
            values.len(),
            cols.len()
        )));
    }
    let bound = solved.double_info_value(c"mip_dual_bound").ok();
    Ok(Outcome {
        values: Some(values),
        status,
        bound,
        objective: Some(solved.objective_value()),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::problem::{MemoryRow, Overlap, ProblemNode};

    /// Reduction 4 on decimal costs leaves residue like `0.4 - 0.3 - 0.1`; none may reach the
    /// solver (see `NOISE_TOL`), in the objective or in row (E).
    #[test]
    fn rounding_residue_never_reaches_the_model() {
        let a = [0.1, 0.7, 0.3];
        let b = [0.2, 0.9, 0.6];
        // Separable but for one entry, so the pair keeps its `y`.
        let mut cost: Vec<Vec<f64>> = a
            .iter()
            .map(|x| b.iter().map(|y| x + y).collect())
            .collect();
        cost[2][2] += 0.05;
        let hide: Vec<Vec<f64>> = a
            .iter()
            .map(|x| b.iter().map(|y| 0.3 * x + 0.7 * y).collect())
            .collect();
        let node = |name: &str| ProblemNode {
            name: name.into(),
            costs: vec![0.3, 0.1, 0.2],
        };
        let p = Problem {
            nodes: vec![node("u"), node("v")],
            edges: vec![ProblemEdge {
                src: 0,
                dst: 1,
                src_class: vec![0, 1, 2],
                dst_class: vec![0, 1, 2],
                cost,
            }],
            memory_budget: Some(3e9),
            memory_rows: vec![MemoryRow {
                label: "peak".into(),
                constant: 0.0,
                terms: vec![(0, vec![1e9, 2e9, 3e9]), (1, vec![1e9, 2e9, 3e9])],
            }],
            overlap: Some(Overlap {
                node_hideable: vec![vec![0.0; 3]; 2],
                edge_hideable: vec![hide],
                node_cover: vec![vec![0.01, 0.02, 0.03]; 2],
            }),
        };
        let ilp = formulate(&p).unwrap();
        assert!(!ilp.pairs.is_empty() && ilp.e_col.is_some());
        let largest = ilp
            .obj
            .iter()
            .chain(&ilp.hc)
            .fold(0.0f64, |m, c| m.max(c.abs()));
        for c in ilp.obj.iter().chain(&ilp.hc) {
            assert!(
                *c == 0.0 || c.abs() > 1e-9 * largest,
                "residue {c} in the model"
            );
        }
        for r in &ilp.rows {
            for (_, c) in &r.terms {
                assert!(c.abs() > 1e-9, "residue {c} in a row {:?}", r.family);
            }
        }
        let best = crate::problem::brute_force(&p).unwrap().1.objective;
        let got = solve(
            &p,
            &SolveOptions {
                mip_gap: 0.0,
                ..SolveOptions::default()
            },
        )
        .unwrap();
        assert!(
            (got.objective - best).abs() <= 1e-9,
            "{} vs {best}",
            got.objective
        );
    }
}
