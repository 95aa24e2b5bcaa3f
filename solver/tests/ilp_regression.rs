//! Real problems on which the ILP once called a plan optimal while a cheaper feasible plan
//! existed. Each fixture holds the problem and that cheaper plan (`better`).
//!
//! `ilp_overlap_noise.json`: the auto-sharding problem of a 63-node transformer with overlap
//! tables (family (E)) and four memory rows. The reductions left rounding residue (~2e-19)
//! as coefficients of row (E) next to ones near 1; CBC's simplex pivoted on them and stopped at
//! a vertex it called optimal, so the LP bound (4.29 s) and branch and bound (1.09215 s,
//! "optimal") were both wrong; the plan mapped from the FSDP family costs 1.07341 s.

#![allow(clippy::unwrap_used)]

use autopar_solver::ilp::{solve, SolveOptions, SolveStatus};
use autopar_solver::problem::{evaluate, Problem, Solution};

#[derive(serde::Deserialize)]
struct Case {
    problem: Problem,
    /// A feasible plan: the optimum costs at most this much.
    better: Vec<usize>,
}

fn check(fixture: &str) {
    let path = format!("{}/tests/fixtures/{fixture}", env!("CARGO_MANIFEST_DIR"));
    let case: Case = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let better = evaluate(
        &case.problem,
        &Solution {
            choice: case.better,
        },
    );
    assert!(better.violations.is_empty(), "{:?}", better.violations);
    let r = solve(&case.problem, &SolveOptions::default()).unwrap();
    let ev = evaluate(&case.problem, &r.solution);
    assert!(ev.violations.is_empty(), "{:?}", ev.violations);
    assert_eq!(r.status, SolveStatus::Optimal);
    assert!(
        r.objective <= better.objective + 1e-9,
        "ILP plan {} s, a feasible plan costs {} s",
        r.objective,
        better.objective
    );
    assert!(
        r.lower_bound <= better.objective + 1e-9,
        "lower bound {} s above a feasible plan's {} s",
        r.lower_bound,
        better.objective
    );
}

#[test]
fn overlap_and_memory_rows_with_rounding_residue() {
    check("ilp_overlap_noise.json");
}
