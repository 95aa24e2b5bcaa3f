//! The smallest per-device memory any plan needs: what a user is told when a budget is
//! infeasible.
//!
//! Memory rows do not depend on edges, so the question is a small ILP of its own:
//!
//! ```text
//! min  M
//! (A)  sum_s x[n][s] = 1                          every node n in some memory row
//! (M)  const_r + sum_(n,s) bytes_r[n][s] x[n][s] <= M     every memory row r
//!      x binary, M >= 0
//! ```
//! Solved with CBC (bytes scaled to GiB). Without memory rows the answer is 0.

use crate::problem::Problem;
use good_lp::{
    constraint, default_solver, variable, Expression, ProblemVariables, Solution as _, SolverModel,
    Variable,
};
use std::collections::BTreeMap;

const GIB: f64 = 1024.0 * 1024.0 * 1024.0;

/// Smallest peak over the memory rows of `p` that any choice of strategies reaches, bytes.
/// With `time_limit_s`, CBC stops there and the best peak found so far is returned (then it
/// may lie above the true minimum; it is always a peak some plan reaches).
pub fn min_peak_memory(p: &Problem, time_limit_s: Option<f64>) -> Result<f64, String> {
    if p.memory_rows.is_empty() {
        return Ok(0.0);
    }
    let mut vars = ProblemVariables::new();
    let mut x: BTreeMap<usize, Vec<Variable>> = BTreeMap::new();
    for r in &p.memory_rows {
        for (n, bytes) in &r.terms {
            if bytes.len() > 1 && !x.contains_key(n) {
                x.insert(
                    *n,
                    (0..bytes.len())
                        .map(|_| vars.add(variable().binary()))
                        .collect(),
                );
            }
        }
    }
    let m = vars.add(variable().min(0.0));
    let mut model = vars.minimise(m).using(default_solver);
    model.set_parameter("log", "0");
    if let Some(t) = time_limit_s {
        model.set_parameter("sec", &format!("{t}"));
    }
    for xs in x.values() {
        let sum: Expression = xs.iter().copied().sum();
        model = model.with(constraint!(sum == 1.0));
    }
    for r in &p.memory_rows {
        let mut e: Expression = (r.constant / GIB).into();
        for (n, bytes) in &r.terms {
            match x.get(n) {
                Some(xs) => {
                    for (v, b) in xs.iter().zip(bytes) {
                        e += *b / GIB * *v;
                    }
                }
                None => e += bytes.first().copied().unwrap_or(0.0) / GIB,
            }
        }
        model = model.with(constraint!(e <= m));
    }
    let sol = model
        .solve()
        .map_err(|e| format!("minimum-memory ILP failed: {e}"))?;
    // recompute the peak of the chosen strategies exactly, in bytes
    let choice = |n: usize| -> usize {
        x.get(&n).map_or(0, |xs| {
            xs.iter().position(|v| sol.value(*v) > 0.5).unwrap_or(0)
        })
    };
    let peak = p
        .memory_rows
        .iter()
        .map(|r| {
            r.constant
                + r.terms
                    .iter()
                    .map(|(n, b)| b.get(choice(*n)).copied().unwrap_or(0.0))
                    .sum::<f64>()
        })
        .fold(0.0, f64::max);
    Ok(peak)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::problem::{MemoryRow, ProblemNode};

    #[test]
    fn finds_the_smallest_peak() {
        // two nodes, two rows; the best mix puts row peaks at max(1+2, 1+3)=... see below
        let gib = GIB;
        let p = Problem {
            nodes: vec![
                ProblemNode {
                    name: "a".into(),
                    costs: vec![0.0, 0.0],
                },
                ProblemNode {
                    name: "b".into(),
                    costs: vec![0.0, 0.0],
                },
            ],
            edges: vec![],
            memory_budget: Some(gib),
            memory_rows: vec![
                MemoryRow {
                    label: "r0".into(),
                    constant: gib,
                    terms: vec![
                        (0, vec![4.0 * gib, 1.0 * gib]),
                        (1, vec![1.0 * gib, 3.0 * gib]),
                    ],
                },
                MemoryRow {
                    label: "r1".into(),
                    constant: 0.0,
                    terms: vec![(0, vec![0.0, 2.0 * gib]), (1, vec![5.0 * gib, 0.0])],
                },
            ],
            overlap: None,
        };
        // choices: (0,0): r0=6, r1=5 -> 6; (0,1): r0=8, r1=0 -> 8; (1,0): r0=3, r1=7 -> 7; (1,1): r0=5, r1=2 -> 5
        let m = min_peak_memory(&p, Some(10.0)).expect("solves");
        assert!((m - 5.0 * gib).abs() < 1.0, "{m}");
    }
}
