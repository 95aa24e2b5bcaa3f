//! Activation checkpointing of a linearized training step: which activations the forward
//! keeps, which it drops and recomputes in the backward, under a memory budget.
//!
//! Plain numbers only (no graph types): the caller linearizes a training step into a
//! [`Chain`] of `n` stages, a solver returns a [`Schedule`], and [`simulate`] replays a schedule
//! on the chain's memory model. The model and the optimal dynamic program follow Rotor
//! (Beaumont, Eyraud-Dubois, Herrmann, Joly, Shilova, "Optimal checkpointing for heterogeneous
//! chains: how to train deep neural networks with limited memory", 2019); the formulation
//! below is our own and [`simulate`] is its definition.
//!
//! # The model
//! Stage `i` (0-based, `0 <= i < n`) maps activation `a_i` to `a_{i+1}`; `a_0` is the chain's
//! input, `a_n` its output (size [`Chain::output_bytes`]); `x_i` = `input_bytes[i]` is the size
//! of `a_i`. Gradients `d_i` have the size of `a_i`. Memory holds three kinds of tensors:
//! - `A(i)`, `0 <= i <= n`: activation `a_i`, `x_i` bytes;
//! - `S(i)`, `0 <= i < n`: what stage `i`'s backward needs beyond its input, `x̄_i` =
//!   `saved_bytes[i]` bytes. **Convention: `x̄_i` excludes the stage's input `a_i` and its
//!   output `a_{i+1}`**, which are the tensors `A(i)` / `A(i+1)` (if the backward needs the
//!   output, as after a sigmoid, the cost model counts it in `x̄_i`);
//! - `G(i)`, `0 <= i <= n`: gradient `d_i`, `x_i` bytes.
//!
//! Operations ([`Op`]); "peak" is the memory while the op runs, on top of what is held before:
//! - `ForwardAll(i)` (Rotor's F_all): needs `A(i)`; creates `A(i+1)` and `S(i)`, keeps `A(i)`.
//!   Peak `+ x_{i+1} + x̄_i + fwd_overhead_i`. Time `fwd_s[i]`.
//! - `ForwardCheckpoint(i)` (F_ck): needs `A(i)`; creates `A(i+1)`, keeps `A(i)` until B(i)
//!   (a checkpoint to re-run from). Peak `+ x_{i+1} + fwd_overhead_i`. Time `fwd_s[i]`.
//! - `ForwardNoSave(i)` (F_n): as F_ck, then frees `A(i)`.
//! - `Loss`: needs `A(n)`; creates `G(n)`, frees `A(n)`. Peak `+ x_n`. Time 0 (the loss is
//!   part of the last stage's cost).
//! - `Backward(i)`: needs `A(i)`, `S(i)`, `G(i+1)`; creates `G(i)`; frees `S(i)`, `G(i+1)`,
//!   `A(i)` and `A(i+1)` if present (nothing can use them any more). Peak `+ x_i +
//!   bwd_overhead_i`. Time `bwd_s[i]`.
//!
//! A schedule starts with `A(0)` in memory and must end with exactly `G(0)`. An op that
//! needs an absent tensor, or creates one already present, is an error.
//!
//! **Persistence** (Rotor's restriction): once F_ck(i) or F_all(i) has kept `A(i)`, it stays
//! until B(i); F_n(i) before then is an error. For F_all this is physical (the saved graph
//! of the stage references its input). For F_ck it is what makes the DP exact: the exhaustive
//! test finds non-persistent schedules that drop a checkpoint after re-running a segment
//! from it and rebuild it later from an earlier one, occasionally a little faster than any
//! persistent schedule; Rotor's DP (and this one) is optimal among persistent schedules only.
//!
//! # The dynamic program
//! Treat the loss as stage `n` (no forward, no `S`). Subproblem `C(s, t, m)`, `s <= t <= n`:
//! memory holds `A(s)` and, if `t < n`, `G(t+1)` (size `g = x_{t+1}`, else `g = 0`); run
//! stages `s..=t` forward and backward so that only `G(s)` remains, with at most `m` bytes
//! used by the subproblem's own tensors (its inputs and output included) at any time;
//! `C` is the least time. Base cases:
//! - `C(n, n, m) = 0` if `m >= 2 x_n` (Loss);
//! - `C(t, t, m) = f_t + b_t` if `m >= x_t + 2 x_{t+1} + x̄_t + max(fo_t, x_t + bo_t)`
//!   (F_all(t), B(t));
//!
//! and for `s < t` the best of
//! - **F_all(s)** ("chain" checkpoint): `f_s + b_s + C(s+1, t, m - x_s - x̄_s)`, needing
//!   `m >= x_s + g + x_{s+1} + x̄_s + fo_s` (the forward) and `m >= 2 x_s + x̄_s + x_{s+1} +
//!   bo_s` (the backward);
//! - **F_ck(s), F_n(s+1), ..., F_n(j-1)** for `s < j <= t` ("leaf" checkpoint at `a_j`):
//!   `sum_{k=s}^{j-1} f_k + C(j, t, m - x_s) + C(s, j-1, m)`, needing the forward sweep to fit:
//!   `m >= x_s + g + max(x_{s+1} + fo_s, max_{s<k<j} x_k + x_{k+1} + fo_k)`.
//!
//! The answer is `C(0, n, budget)`; the memory accounting is exactly [`simulate`]'s, so the
//! DP's peak is the simulated one (tested against an exhaustive search over all persistent
//! schedules of chains up to 8 stages).
//!
//! Cost: O(n^2 slots) table entries (f64, one row of `slots + 1` per subproblem) and O(n^3
//! slots) time in the worst case. The leaf choice is a min over `j` whose sweep peak is kept
//! incrementally; the loop over `m` is innermost on contiguous rows (a vectorized `min`),
//! restricted to where the option can win: `C` is non-increasing in `m`, so each row is
//! infinite below one index (`lo`); above the `m` where F_all everywhere fits, nothing that
//! recomputes can be faster (`sat`); and an option costs at least its recomputed forwards
//! plus the no-recomputation time of its two parts, so it stops where the row is already
//! below that bound. Subproblems are visited in blocks of consecutive `t` so that the rows
//! read stay in cache (memory traffic, not arithmetic, bounds this loop). No argmin table:
//! backtracking (an explicit stack) re-evaluates one subproblem's options at a time and takes
//! the first equal to the stored minimum.
//!
//! # Discretization
//! The DP indexes memory in `slots` units of `budget / slots` bytes. Every size rounds **up**
//! (`ceil(bytes * slots / budget)`, in exact integer arithmetic), so the slot count of any
//! set of tensors is at least its bytes divided by the unit: a schedule whose discretized peak
//! fits in `slots` really fits in `budget`. The price is that rounding can make a schedule
//! that fits in bytes look infeasible to the DP; so [`rotor`] also considers the schedule of
//! least peak (an exact DP on bytes, [`min_peak_schedule`]) and [`none`], each if it fits the
//! budget in bytes, and returns the fastest candidate. The candidate set only grows with the
//! budget (rounded sizes shrink as the unit grows, a fitting schedule keeps fitting), so the
//! returned time is non-increasing in the budget, and reaches `none`'s once `none` fits.
//!
//! The exact minimum-peak DP has the same recurrence with `max` for the memory and `min` over
//! the choices (ties broken by time); a budget below it is reported with that minimum.
//!
//! # Chen
//! [`chen`] is Chen et al.'s sqrt(n) heuristic ("Training deep nets with sublinear memory
//! cost", 2016): checkpoint `a_c` every `ceil(sqrt n)` stages in the forward (F_ck then F_n),
//! run the last segment with F_all, and in the backward re-run each segment with F_all before
//! its backwards. Its peak is whatever it is; above a budget it is an error, not a silent
//! overrun.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// Default number of memory slots of the discretized DP.
pub const DEFAULT_SLOTS: usize = 500;

/// Largest DP table [`rotor`] allocates, in entries (8 bytes each): 2 GiB.
const MAX_TABLE_ENTRIES: u128 = 1 << 28;

/// Errors of chain validation, simulation and the solvers.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CheckpointError {
    #[error("invalid chain: {0}")]
    InvalidChain(String),
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error(
        "memory budget of {budget_bytes} bytes is below {minimum_bytes} bytes, the smallest peak \
         any schedule of this chain reaches"
    )]
    BudgetTooSmall {
        budget_bytes: u64,
        minimum_bytes: u64,
    },
    #[error(
        "{strategy} schedule peaks at {peak_bytes} bytes, above the budget of {budget_bytes} bytes"
    )]
    OverBudget {
        strategy: Strategy,
        peak_bytes: u64,
        budget_bytes: u64,
    },
    #[error("schedule op #{index} ({op}): {reason}")]
    InvalidSchedule {
        index: usize,
        op: Op,
        reason: String,
    },
    #[error("schedule does not complete the step: {0}")]
    Incomplete(String),
    #[error(
        "rotor DP table for {stages} stages x {slots} slots has {entries} entries (limit {limit}); \
         use fewer slots"
    )]
    TableTooLarge {
        stages: usize,
        slots: usize,
        entries: u128,
        limit: u128,
    },
    #[error("unknown checkpointing strategy '{0}' (expected rotor, chen or none)")]
    UnknownStrategy(String),
    #[error("internal error in the checkpoint solver: {0}")]
    Internal(String),
}

/// A training step linearized into `n` stages (see the module doc for the memory model).
/// Per-stage vectors all have length `n >= 1`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "ChainData")]
pub struct Chain {
    /// Forward time of each stage, seconds.
    pub fwd_s: Vec<f64>,
    /// Backward time of each stage, seconds.
    pub bwd_s: Vec<f64>,
    /// `x_i`: size of stage `i`'s input activation (stage `i-1`'s output), bytes.
    pub input_bytes: Vec<u64>,
    /// `x̄_i`: what stage `i`'s backward needs after a keep-all forward, excluding the
    /// stage's input and output activations, bytes.
    pub saved_bytes: Vec<u64>,
    /// Transient memory of the forward beyond its inputs and outputs, bytes.
    pub fwd_overhead_bytes: Vec<u64>,
    /// Transient memory of the backward beyond its inputs and outputs, bytes.
    pub bwd_overhead_bytes: Vec<u64>,
    /// `x_n`: size of the chain's final output (the loss input), bytes.
    pub output_bytes: u64,
}

/// Serde shadow of [`Chain`]: deserialization goes through [`Chain::validate`].
#[derive(Deserialize)]
struct ChainData {
    fwd_s: Vec<f64>,
    bwd_s: Vec<f64>,
    input_bytes: Vec<u64>,
    saved_bytes: Vec<u64>,
    fwd_overhead_bytes: Vec<u64>,
    bwd_overhead_bytes: Vec<u64>,
    output_bytes: u64,
}

impl TryFrom<ChainData> for Chain {
    type Error = CheckpointError;
    fn try_from(d: ChainData) -> Result<Self, Self::Error> {
        let c = Chain {
            fwd_s: d.fwd_s,
            bwd_s: d.bwd_s,
            input_bytes: d.input_bytes,
            saved_bytes: d.saved_bytes,
            fwd_overhead_bytes: d.fwd_overhead_bytes,
            bwd_overhead_bytes: d.bwd_overhead_bytes,
            output_bytes: d.output_bytes,
        };
        c.validate()?;
        Ok(c)
    }
}

impl Chain {
    /// A validated chain.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        fwd_s: Vec<f64>,
        bwd_s: Vec<f64>,
        input_bytes: Vec<u64>,
        saved_bytes: Vec<u64>,
        fwd_overhead_bytes: Vec<u64>,
        bwd_overhead_bytes: Vec<u64>,
        output_bytes: u64,
    ) -> Result<Self, CheckpointError> {
        Chain::try_from(ChainData {
            fwd_s,
            bwd_s,
            input_bytes,
            saved_bytes,
            fwd_overhead_bytes,
            bwd_overhead_bytes,
            output_bytes,
        })
    }

    /// Number of stages `n`.
    pub fn len(&self) -> usize {
        self.fwd_s.len()
    }

    /// Whether the chain has no stage (never true of a validated chain).
    pub fn is_empty(&self) -> bool {
        self.fwd_s.is_empty()
    }

    /// `x_i` for `0 <= i <= n` (`x_n` is the output).
    fn x(&self, i: usize) -> u64 {
        self.input_bytes
            .get(i)
            .copied()
            .unwrap_or(self.output_bytes)
    }

    /// Checks lengths and times (finite, non-negative).
    pub fn validate(&self) -> Result<(), CheckpointError> {
        let n = self.fwd_s.len();
        if n == 0 {
            return Err(CheckpointError::InvalidChain(
                "the chain has no stage".into(),
            ));
        }
        let lens = [
            ("bwd_s", self.bwd_s.len()),
            ("input_bytes", self.input_bytes.len()),
            ("saved_bytes", self.saved_bytes.len()),
            ("fwd_overhead_bytes", self.fwd_overhead_bytes.len()),
            ("bwd_overhead_bytes", self.bwd_overhead_bytes.len()),
        ];
        for (name, len) in lens {
            if len != n {
                return Err(CheckpointError::InvalidChain(format!(
                    "{name} has {len} entries, fwd_s has {n}"
                )));
            }
        }
        for (name, v) in [("fwd_s", &self.fwd_s), ("bwd_s", &self.bwd_s)] {
            for (i, &t) in v.iter().enumerate() {
                if !t.is_finite() || t < 0.0 {
                    return Err(CheckpointError::InvalidChain(format!(
                        "{name}[{i}] = {t}: times must be finite and non-negative"
                    )));
                }
            }
        }
        Ok(())
    }

    /// Sum of all forward and backward times: the time of [`none`]'s schedule.
    pub fn compute_time_s(&self) -> f64 {
        self.fwd_s.iter().sum::<f64>() + self.bwd_s.iter().sum::<f64>()
    }
}

/// One operation of a [`Schedule`] (see the module doc for what each needs, creates, frees).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Op {
    /// F_all: forward keeping everything the backward needs.
    ForwardAll(usize),
    /// F_ck: forward keeping only its input (a checkpoint).
    ForwardCheckpoint(usize),
    /// F_n: forward keeping nothing (its input is freed).
    ForwardNoSave(usize),
    /// The loss: `A(n)` -> `G(n)`.
    Loss,
    /// Backward of a stage.
    Backward(usize),
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Op::ForwardAll(i) => write!(f, "F_all({i})"),
            Op::ForwardCheckpoint(i) => write!(f, "F_ck({i})"),
            Op::ForwardNoSave(i) => write!(f, "F_n({i})"),
            Op::Loss => write!(f, "Loss"),
            Op::Backward(i) => write!(f, "B({i})"),
        }
    }
}

/// A sequence of operations over a chain.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Schedule {
    pub ops: Vec<Op>,
}

impl Schedule {
    /// Number of forward ops, recomputations included.
    pub fn forward_count(&self) -> usize {
        self.ops
            .iter()
            .filter(|o| {
                matches!(
                    o,
                    Op::ForwardAll(_) | Op::ForwardCheckpoint(_) | Op::ForwardNoSave(_)
                )
            })
            .count()
    }
}

impl fmt::Display for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (k, op) in self.ops.iter().enumerate() {
            if k > 0 {
                write!(f, " ")?;
            }
            write!(f, "{op}")?;
        }
        Ok(())
    }
}

/// Result of [`simulate`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Simulated {
    /// Sum of the times of the ops.
    pub time_s: f64,
    /// Largest memory in use at any time, the initial `A(0)` included.
    pub peak_bytes: u64,
}

/// Executes `schedule` on `chain`'s memory model (module doc): the reference the solvers are
/// checked against. Errors on an op that needs an absent tensor, creates a present one or
/// names a stage out of range, and on a schedule that does not end with exactly `G(0)`.
pub fn simulate(chain: &Chain, schedule: &Schedule) -> Result<Simulated, CheckpointError> {
    chain.validate()?;
    let n = chain.len();
    let x = |i: usize| u128::from(chain.x(i));
    let mut act = vec![false; n + 1];
    let mut saved = vec![false; n];
    let mut grad = vec![false; n + 1];
    // A(i) kept by F_ck(i) / F_all(i): it may not be freed before B(i).
    let mut pinned = vec![false; n];
    act[0] = true;
    let mut cur: u128 = x(0);
    let mut peak = cur;
    let mut time = 0.0;
    for (index, &op) in schedule.ops.iter().enumerate() {
        let fail = |reason: String| CheckpointError::InvalidSchedule { index, op, reason };
        let stage = |i: usize| {
            if i < n {
                Ok(i)
            } else {
                Err(fail(format!("stage {i} out of range (chain has {n})")))
            }
        };
        match op {
            Op::ForwardAll(i) | Op::ForwardCheckpoint(i) | Op::ForwardNoSave(i) => {
                let i = stage(i)?;
                if !act[i] {
                    return Err(fail(format!("input activation A({i}) is not in memory")));
                }
                if act[i + 1] {
                    return Err(fail(format!(
                        "output activation A({}) already in memory",
                        i + 1
                    )));
                }
                if matches!(op, Op::ForwardNoSave(_)) && pinned[i] {
                    return Err(fail(format!(
                        "A({i}) was kept by an earlier F_ck({i}) or F_all({i}) and stays until \
                         B({i}) (schedules are persistent)"
                    )));
                }
                let keep_all = matches!(op, Op::ForwardAll(_));
                if keep_all && saved[i] {
                    return Err(fail(format!("saved data S({i}) already in memory")));
                }
                let made = x(i + 1)
                    + if keep_all {
                        u128::from(chain.saved_bytes[i])
                    } else {
                        0
                    };
                peak = peak.max(cur + made + u128::from(chain.fwd_overhead_bytes[i]));
                cur += made;
                act[i + 1] = true;
                saved[i] |= keep_all;
                if matches!(op, Op::ForwardNoSave(_)) {
                    act[i] = false;
                    cur -= x(i);
                } else {
                    pinned[i] = true;
                }
                time += chain.fwd_s[i];
            }
            Op::Loss => {
                if !act[n] {
                    return Err(fail(format!("output activation A({n}) is not in memory")));
                }
                if grad[n] {
                    return Err(fail(format!("gradient G({n}) already in memory")));
                }
                peak = peak.max(cur + x(n));
                grad[n] = true;
                act[n] = false;
            }
            Op::Backward(i) => {
                let i = stage(i)?;
                if !act[i] {
                    return Err(fail(format!("input activation A({i}) is not in memory")));
                }
                if !saved[i] {
                    return Err(fail(format!("saved data S({i}) is not in memory")));
                }
                if !grad[i + 1] {
                    return Err(fail(format!("gradient G({}) is not in memory", i + 1)));
                }
                if grad[i] {
                    return Err(fail(format!("gradient G({i}) already in memory")));
                }
                peak = peak.max(cur + x(i) + u128::from(chain.bwd_overhead_bytes[i]));
                // Creates G(i); frees S(i), G(i+1), A(i) and A(i+1) if present.
                cur += x(i);
                grad[i] = true;
                cur -= u128::from(chain.saved_bytes[i]) + x(i + 1) + x(i);
                saved[i] = false;
                grad[i + 1] = false;
                act[i] = false;
                pinned[i] = false;
                if act[i + 1] {
                    cur -= x(i + 1);
                    act[i + 1] = false;
                }
                time += chain.bwd_s[i];
            }
        }
    }
    if !grad[0] {
        return Err(CheckpointError::Incomplete(
            "the gradient G(0) of the chain's input is never computed".into(),
        ));
    }
    let mut left: Vec<String> = Vec::new();
    left.extend((0..=n).filter(|&i| act[i]).map(|i| format!("A({i})")));
    left.extend((0..n).filter(|&i| saved[i]).map(|i| format!("S({i})")));
    left.extend((1..=n).filter(|&i| grad[i]).map(|i| format!("G({i})")));
    if !left.is_empty() {
        return Err(CheckpointError::Incomplete(format!(
            "left in memory at the end: {}",
            left.join(", ")
        )));
    }
    Ok(Simulated {
        time_s: time,
        peak_bytes: u64::try_from(peak).unwrap_or(u64::MAX),
    })
}

/// Which checkpointing solver to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Strategy {
    /// [`rotor`]: optimal DP under the budget.
    Rotor,
    /// [`chen`]: sqrt(n) segments.
    Chen,
    /// [`none`]: keep everything.
    None,
}

impl FromStr for Strategy {
    type Err = CheckpointError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "rotor" => Ok(Strategy::Rotor),
            "chen" => Ok(Strategy::Chen),
            "none" => Ok(Strategy::None),
            _ => Err(CheckpointError::UnknownStrategy(s.to_string())),
        }
    }
}

impl fmt::Display for Strategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Strategy::Rotor => "rotor",
            Strategy::Chen => "chen",
            Strategy::None => "none",
        })
    }
}

impl Strategy {
    /// Runs the strategy under `budget_bytes` (`slots` is used by rotor only). Chen and none
    /// return [`CheckpointError::OverBudget`] when their peak exceeds the budget.
    pub fn solve(
        self,
        chain: &Chain,
        budget_bytes: u64,
        slots: usize,
    ) -> Result<Schedule, CheckpointError> {
        match self {
            Strategy::Rotor => rotor(chain, budget_bytes, slots),
            Strategy::Chen => chen(chain, budget_bytes),
            Strategy::None => {
                let s = none(chain)?;
                check_budget(chain, &s, Strategy::None, budget_bytes)?;
                Ok(s)
            }
        }
    }
}

fn check_budget(
    chain: &Chain,
    s: &Schedule,
    strategy: Strategy,
    budget_bytes: u64,
) -> Result<Simulated, CheckpointError> {
    let sim = simulate(chain, s)?;
    if sim.peak_bytes > budget_bytes {
        return Err(CheckpointError::OverBudget {
            strategy,
            peak_bytes: sim.peak_bytes,
            budget_bytes,
        });
    }
    Ok(sim)
}

/// Store everything: F_all every stage, the loss, every backward. Fastest, largest peak.
pub fn none(chain: &Chain) -> Result<Schedule, CheckpointError> {
    chain.validate()?;
    let n = chain.len();
    let mut ops: Vec<Op> = (0..n).map(Op::ForwardAll).collect();
    ops.push(Op::Loss);
    ops.extend((0..n).rev().map(Op::Backward));
    Ok(Schedule { ops })
}

/// Chen et al.'s sqrt(n) schedule (module doc). Errors with [`CheckpointError::OverBudget`]
/// (stating its peak) when its peak exceeds `budget_bytes`; pass `u64::MAX` for no budget.
pub fn chen(chain: &Chain, budget_bytes: u64) -> Result<Schedule, CheckpointError> {
    let s = chen_schedule(chain)?;
    check_budget(chain, &s, Strategy::Chen, budget_bytes)?;
    Ok(s)
}

fn chen_schedule(chain: &Chain) -> Result<Schedule, CheckpointError> {
    chain.validate()?;
    let n = chain.len();
    let mut k = n.isqrt();
    if k * k < n {
        k += 1;
    }
    let starts: Vec<usize> = (0..n).step_by(k.max(1)).collect();
    let last = starts.last().copied().unwrap_or(0);
    let mut ops = Vec::with_capacity(4 * n + 1);
    for (&c, &next) in starts.iter().zip(starts.iter().skip(1)) {
        ops.push(Op::ForwardCheckpoint(c));
        ops.extend((c + 1..next).map(Op::ForwardNoSave));
    }
    ops.extend((last..n).map(Op::ForwardAll));
    ops.push(Op::Loss);
    ops.extend((last..n).rev().map(Op::Backward));
    for (&c, &next) in starts.iter().zip(starts.iter().skip(1)).rev() {
        ops.extend((c..next).map(Op::ForwardAll));
        ops.extend((c..next).rev().map(Op::Backward));
    }
    Ok(Schedule { ops })
}

/// Sizes of the DP (bytes for the exact DP, slots for the discretized one), stage `n` = loss.
struct Sizes {
    n: usize,
    /// `x_0..=x_n`.
    x: Vec<u64>,
    xb: Vec<u64>,
    fo: Vec<u64>,
    bo: Vec<u64>,
}

impl Sizes {
    fn new(chain: &Chain, round: impl Fn(u64) -> u64) -> Self {
        let n = chain.len();
        Sizes {
            n,
            x: (0..=n).map(|i| round(chain.x(i))).collect(),
            xb: chain.saved_bytes.iter().map(|&b| round(b)).collect(),
            fo: chain.fwd_overhead_bytes.iter().map(|&b| round(b)).collect(),
            bo: chain.bwd_overhead_bytes.iter().map(|&b| round(b)).collect(),
        }
    }

    /// `g`: the incoming gradient `G(t+1)` held by subproblem `(s, t)`.
    fn g(&self, t: usize) -> u64 {
        if t < self.n {
            self.x[t + 1]
        } else {
            0
        }
    }

    /// Memory of the base case `C(t, t)`.
    fn base(&self, t: usize) -> u64 {
        if t == self.n {
            return self.x[t].saturating_mul(2);
        }
        let held = add(&[self.x[t], self.x[t + 1], self.x[t + 1], self.xb[t]]);
        held.saturating_add(self.fo[t].max(self.x[t].saturating_add(self.bo[t])))
    }

    /// F_all(s) in `(s, t)`: (memory of its forward and backward, memory held during the
    /// subproblem `(s+1, t)`).
    fn chain_cost(&self, s: usize, t: usize) -> (u64, u64) {
        let (xs, xb) = (self.x[s], self.xb[s]);
        let fwd = add(&[xs, self.g(t), self.x[s + 1], xb, self.fo[s]]);
        let bwd = add(&[xs, xs, xb, self.x[s + 1], self.bo[s]]);
        (fwd.max(bwd), xs.saturating_add(xb))
    }

    /// Transient part of the forward sweep F_n(k), `s < k`: memory beyond `A(s)` and `G`.
    fn sweep_step(&self, k: usize) -> u64 {
        add(&[self.x[k], self.x[k + 1], self.fo[k]])
    }

    /// F_ck(s)'s transient memory beyond `A(s)` and `G`.
    fn sweep_first(&self, s: usize) -> u64 {
        self.x[s + 1].saturating_add(self.fo[s])
    }
}

fn add(v: &[u64]) -> u64 {
    v.iter().fold(0u64, |a, &b| a.saturating_add(b))
}

/// Index of subproblem `(s, t)`, `s <= t`, in triangular order (all `t' < t` first).
fn tri(s: usize, t: usize) -> usize {
    t * (t + 1) / 2 + s
}

/// Emits the schedule of subproblem `(0, n)` given a choice per subproblem: `choose(s, t, m)`
/// returns `s` for F_all(s) or `j` in `s+1..=t` for a leaf checkpoint at `a_j`. `m` is the
/// subproblem's memory (in the DP's unit), threaded down as in the recurrence.
fn backtrack(
    z: &Sizes,
    root_m: u64,
    choose: impl Fn(usize, usize, u64) -> Result<usize, CheckpointError>,
) -> Result<Schedule, CheckpointError> {
    enum Task {
        Solve(usize, usize, u64),
        Emit(Op),
    }
    let n = z.n;
    let mut ops = Vec::new();
    let mut stack = vec![Task::Solve(0, n, root_m)];
    while let Some(task) = stack.pop() {
        match task {
            Task::Emit(op) => ops.push(op),
            Task::Solve(s, t, _) if s == t => {
                if t == n {
                    ops.push(Op::Loss);
                } else {
                    ops.push(Op::ForwardAll(t));
                    ops.push(Op::Backward(t));
                }
            }
            Task::Solve(s, t, m) => {
                let c = choose(s, t, m)?;
                if c == s {
                    ops.push(Op::ForwardAll(s));
                    stack.push(Task::Emit(Op::Backward(s)));
                    let held = z.x[s].saturating_add(z.xb[s]);
                    stack.push(Task::Solve(s + 1, t, m.saturating_sub(held)));
                } else if c > s && c <= t {
                    ops.push(Op::ForwardCheckpoint(s));
                    ops.extend((s + 1..c).map(Op::ForwardNoSave));
                    stack.push(Task::Solve(s, c - 1, m));
                    stack.push(Task::Solve(c, t, m.saturating_sub(z.x[s])));
                } else {
                    return Err(CheckpointError::Internal(format!(
                        "no valid choice for stages {s}..={t} at memory {m}"
                    )));
                }
            }
        }
    }
    Ok(Schedule { ops })
}

/// Exact (bytes) minimum-peak DP: per subproblem, its least peak and the choice reaching it
/// (the fastest among equal peaks). O(n^2) memory, O(n^3) time.
struct MinPeak {
    peak: Vec<u64>,
    choice: Vec<u32>,
}

fn min_peak_dp(chain: &Chain, z: &Sizes) -> MinPeak {
    let n = z.n;
    let size = tri(n, n) + 1;
    let mut peak = vec![0u64; size];
    let mut time = vec![0f64; size];
    let mut choice = vec![0u32; size];
    let f = &chain.fwd_s;
    let b = &chain.bwd_s;
    // Order: (s, t) needs (s+1.., t) and (s, ..t). Blocks of BLOCK consecutive t, s
    // descending outside and t ascending inside each block: the rows (s, ..) read as left
    // parts stay in cache across the block's t, the rows (.., t) read as right parts across s.
    for t0 in (0..=n).step_by(BLOCK) {
        let t1 = (t0 + BLOCK).min(n + 1);
        for (s, t) in (0..t1)
            .rev()
            .flat_map(|s| (s.max(t0)..t1).map(move |t| (s, t)))
        {
            let id = tri(s, t);
            choice[id] = s as u32;
            if s == t {
                peak[id] = z.base(t);
                time[id] = if t < n { f[t] + b[t] } else { 0.0 };
                continue;
            }
            let (mem, held) = z.chain_cost(s, t);
            let sub = tri(s + 1, t);
            let mut best = (
                mem.max(held.saturating_add(peak[sub])),
                f[s] + b[s] + time[sub],
            );
            let mut inner = z.sweep_first(s);
            let mut fsum = f[s];
            let xs = z.x[s];
            let front = xs.saturating_add(z.g(t));
            for j in s + 1..=t {
                if j > s + 1 {
                    inner = inner.max(z.sweep_step(j - 1));
                    fsum += f[j - 1];
                }
                let (r, l) = (tri(j, t), tri(s, j - 1));
                let p = front
                    .saturating_add(inner)
                    .max(xs.saturating_add(peak[r]))
                    .max(peak[l]);
                let tm = fsum + time[r] + time[l];
                if p < best.0 || (p == best.0 && tm < best.1) {
                    best = (p, tm);
                    choice[id] = j as u32;
                }
            }
            peak[id] = best.0;
            time[id] = best.1;
        }
    }
    MinPeak { peak, choice }
}

/// The smallest peak, in bytes, that any schedule of `chain` reaches (a budget below it has
/// no schedule).
pub fn min_peak_bytes(chain: &Chain) -> Result<u64, CheckpointError> {
    chain.validate()?;
    let z = Sizes::new(chain, |b| b);
    let mp = min_peak_dp(chain, &z);
    Ok(mp.peak[tri(0, z.n)])
}

/// A schedule reaching [`min_peak_bytes`] (the fastest among the DP's choices of equal peak).
pub fn min_peak_schedule(chain: &Chain) -> Result<Schedule, CheckpointError> {
    chain.validate()?;
    let z = Sizes::new(chain, |b| b);
    let mp = min_peak_dp(chain, &z);
    backtrack(&z, 0, |s, t, _| Ok(mp.choice[tri(s, t)] as usize))
}

/// Discretized Rotor DP: `cost[tri(s,t) * w + m]` with `w = slots + 1`. No argmin is
/// stored: backtracking re-evaluates a subproblem's options with the same floating-point
/// expressions and takes the first one equal to the stored minimum ([`RotorTable::choose`]),
/// which keeps the hot loop a pure vectorizable `min` and the table half the size.
struct RotorTable {
    w: usize,
    cost: Vec<f64>,
}

/// Number of consecutive `t` the DPs process together (cache blocking, see [`rotor_dp`]).
const BLOCK: usize = 8;

/// Sizes in slots are at most `w = slots + 1` (clamped on discretization), so sums of a few
/// of them cannot overflow.
fn slot(v: u64, w: usize) -> usize {
    usize::try_from(v).unwrap_or(usize::MAX).min(w)
}

fn rotor_dp(chain: &Chain, z: &Sizes, slots: usize) -> RotorTable {
    let n = z.n;
    let w = slots + 1;
    let count = tri(n, n) + 1;
    let mut cost = vec![f64::INFINITY; count * w];
    // First feasible m of each subproblem (w if none): rows are infinite below it.
    let mut lo = vec![w; count];
    // `all[id]`: the time of the subproblem with F_all everywhere (no recomputation), summed
    // in the DP's order; `sat[id]`: an m from which the row equals it. Beyond `sat` a leaf
    // option (which recomputes at least one forward) cannot be faster, so it is not tried.
    let mut all = vec![0f64; count];
    let mut sat = vec![w; count];
    let mut row = vec![f64::INFINITY; w];
    let f = &chain.fwd_s;
    let b = &chain.bwd_s;
    let u = |v: u64| slot(v, w);
    // Order: (s, t) needs (s+1.., t) and (s, ..t). Blocks of BLOCK consecutive t, s
    // descending outside and t ascending inside each block: the rows (s, ..) read as left
    // parts stay in cache across the block's t, the rows (.., t) read as right parts across s.
    for t0 in (0..=n).step_by(BLOCK) {
        let t1 = (t0 + BLOCK).min(n + 1);
        for (s, t) in (0..t1)
            .rev()
            .flat_map(|s| (s.max(t0)..t1).map(move |t| (s, t)))
        {
            let id = tri(s, t);
            row.fill(f64::INFINITY);
            if s == t {
                let thr = u(z.base(t));
                all[id] = if t < n { f[t] + b[t] } else { 0.0 };
                sat[id] = thr;
                if thr < w {
                    row[thr..].fill(all[id]);
                }
            } else {
                // F_all(s), then (s+1, t).
                let (mem, held) = z.chain_cost(s, t);
                let held = u(held);
                let sub_id = tri(s + 1, t);
                let base = f[s] + b[s];
                all[id] = base + all[sub_id];
                let thr = u(mem).max(held + lo[sub_id]);
                sat[id] = u(mem).max(held + sat[sub_id]).min(w);
                if thr < w {
                    let sub = &cost[sub_id * w..][..w];
                    for (o, &v) in row[thr..].iter_mut().zip(&sub[thr - held..w - held]) {
                        *o = base + v;
                    }
                }
                // F_ck(s), F_n(s+1..j), then (j, t), then (s, j-1).
                let end = sat[id];
                let xs = u(z.x[s]);
                let front = xs + u(z.g(t));
                let mut inner = u(z.sweep_first(s));
                let mut fsum = f[s];
                for j in s + 1..=t {
                    if j > s + 1 {
                        inner = inner.max(u(z.sweep_step(j - 1)));
                        fsum += f[j - 1];
                    }
                    let sweep = front + inner;
                    if sweep >= end {
                        break;
                    }
                    let (r, l) = (tri(j, t), tri(s, j - 1));
                    let thr = sweep.max(xs + lo[r]).max(lo[l]);
                    if thr >= end {
                        continue;
                    }
                    // No recomputation-free schedule beats `all`, so this option costs at least
                    // `lb`; the row is non-increasing in m, so it can only help below the first
                    // m where the row is already <= lb.
                    let lb = fsum + all[r] + all[l];
                    let stop = thr + row[thr..end].partition_point(|&v| v > lb);
                    if stop <= thr {
                        continue;
                    }
                    let len = stop - thr;
                    let right = &cost[r * w + thr - xs..][..len];
                    let left = &cost[l * w + thr..][..len];
                    for ((o, &a), &bb) in row[thr..stop].iter_mut().zip(right).zip(left) {
                        *o = o.min(fsum + a + bb);
                    }
                }
            }
            lo[id] = row.iter().position(|v| v.is_finite()).unwrap_or(w);
            cost[id * w..][..w].copy_from_slice(&row);
        }
    }
    RotorTable { w, cost }
}

impl RotorTable {
    /// The option of subproblem `(s, t)` at `m` slots that [`rotor_dp`] kept: `s` for
    /// F_all(s), `j` for a leaf checkpoint at `a_j`; the first (in the DP's order) whose value
    /// equals the table's. `None` if the entry is infinite.
    fn choose(&self, chain: &Chain, z: &Sizes, s: usize, t: usize, m: usize) -> Option<usize> {
        let w = self.w;
        let u = |v: u64| slot(v, w);
        let m = m.min(w - 1);
        let target = self.cost[tri(s, t) * w + m];
        if !target.is_finite() {
            return None;
        }
        let (f, b) = (&chain.fwd_s, &chain.bwd_s);
        let (mem, held) = z.chain_cost(s, t);
        let held = u(held);
        if m >= u(mem) && m >= held {
            let v = (f[s] + b[s]) + self.cost[tri(s + 1, t) * w + m - held];
            if v == target {
                return Some(s);
            }
        }
        let xs = u(z.x[s]);
        let front = xs + u(z.g(t));
        let mut inner = u(z.sweep_first(s));
        let mut fsum = f[s];
        for j in s + 1..=t {
            if j > s + 1 {
                inner = inner.max(u(z.sweep_step(j - 1)));
                fsum += f[j - 1];
            }
            if m < front + inner {
                break;
            }
            if m < xs {
                continue;
            }
            let v = fsum + self.cost[tri(j, t) * w + m - xs] + self.cost[tri(s, j - 1) * w + m];
            if v == target {
                return Some(j);
            }
        }
        None
    }
}

/// The discretized DP's optimal schedule alone (`None` if no schedule fits in `slots` once
/// sizes are rounded up). Callers check the chain and the table size.
fn rotor_dp_schedule(
    chain: &Chain,
    budget_bytes: u64,
    slots: usize,
) -> Result<Option<Schedule>, CheckpointError> {
    // ceil(bytes * slots / budget) in exact integer arithmetic; a zero budget (possible only
    // for a chain of zero sizes) divides as 1.
    let budget = u128::from(budget_bytes.max(1));
    let cap = slots as u128 + 1;
    let disc = Sizes::new(chain, |b| {
        (u128::from(b) * slots as u128).div_ceil(budget).min(cap) as u64
    });
    let table = rotor_dp(chain, &disc, slots);
    if !table.cost[tri(0, disc.n) * table.w + slots].is_finite() {
        return Ok(None);
    }
    backtrack(&disc, slots as u64, |s, t, m| {
        let m = usize::try_from(m).unwrap_or(usize::MAX);
        table.choose(chain, &disc, s, t, m).ok_or_else(|| {
            CheckpointError::Internal(format!(
                "backtracking found no option for stages {s}..={t} at {m} slots"
            ))
        })
    })
    .map(Some)
}

/// Rotor's optimal checkpointing under `budget_bytes`, memory discretized in `slots` units
/// (module doc; [`DEFAULT_SLOTS`] is a good default). Returns the fastest of the DP's
/// optimum, [`min_peak_schedule`] and [`none`] among those whose exact peak fits the budget.
/// Errors with [`CheckpointError::BudgetTooSmall`] (stating [`min_peak_bytes`]) when no
/// schedule fits.
pub fn rotor(chain: &Chain, budget_bytes: u64, slots: usize) -> Result<Schedule, CheckpointError> {
    chain.validate()?;
    if slots == 0 {
        return Err(CheckpointError::InvalidArgument(
            "rotor needs at least one memory slot".into(),
        ));
    }
    let n = chain.len();
    let entries = (n as u128 + 1) * (n as u128 + 2) / 2 * (slots as u128 + 1);
    if entries > MAX_TABLE_ENTRIES {
        return Err(CheckpointError::TableTooLarge {
            stages: n,
            slots,
            entries,
            limit: MAX_TABLE_ENTRIES,
        });
    }
    let exact = Sizes::new(chain, |b| b);
    let mp = min_peak_dp(chain, &exact);
    let minimum = mp.peak[tri(0, n)];
    if budget_bytes < minimum {
        return Err(CheckpointError::BudgetTooSmall {
            budget_bytes,
            minimum_bytes: minimum,
        });
    }

    let mut candidates = vec![
        backtrack(&exact, 0, |s, t, _| Ok(mp.choice[tri(s, t)] as usize))?,
        none(chain)?,
    ];
    if let Some(dp) = rotor_dp_schedule(chain, budget_bytes, slots)? {
        candidates.insert(0, dp);
    }
    let mut best: Option<(f64, Schedule)> = None;
    for cand in candidates {
        let sim = simulate(chain, &cand)?;
        if sim.peak_bytes > budget_bytes {
            continue;
        }
        if best.as_ref().is_none_or(|(t, _)| sim.time_s < *t) {
            best = Some((sim.time_s, cand));
        }
    }
    best.map(|(_, s)| s).ok_or_else(|| {
        CheckpointError::Internal(format!(
            "the minimum-peak schedule exceeds the budget of {budget_bytes} bytes although its \
             peak {minimum} fits"
        ))
    })
}

#[cfg(test)]
mod tests;
