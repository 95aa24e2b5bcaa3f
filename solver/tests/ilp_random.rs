//! The ILP against brute force on random small problems: same optimum, objective equal to
//! `evaluate` of the returned plan, infeasible exactly when brute force finds nothing. For a
//! longer soak: `ILP_SEED=1 ILP_CASES=3000 cargo test -p autopar-solver --test ilp_random`.

#![allow(clippy::unwrap_used)]

use autopar_solver::ilp::{solve, Backend, BoundSource, SolveError, SolveOptions, SolveStatus};
use autopar_solver::problem::{
    brute_force, evaluate, MemoryRow, Overlap, Problem, ProblemEdge, ProblemNode, Solution,
};

/// splitmix64: deterministic, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + self.below(hi - lo + 1)
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Seconds: a few exact ties (multiples of 1 ms) mixed with arbitrary values.
    fn seconds(&mut self) -> f64 {
        if self.below(3) == 0 {
            self.below(4) as f64 * 1e-3
        } else {
            self.unit() * 1e-2
        }
    }
}

fn random_problem(rng: &mut Rng) -> Problem {
    let n = rng.range(2, 6);
    let nodes: Vec<ProblemNode> = (0..n)
        .map(|i| ProblemNode {
            name: format!("n{i}"),
            costs: (0..rng.range(1, 4)).map(|_| rng.seconds()).collect(),
        })
        .collect();
    let mut edges = vec![];
    for _ in 0..rng.range(0, 8) {
        let src = rng.below(n);
        let dst = if rng.below(5) == 0 { src } else { rng.below(n) };
        let (ns, nd) = (nodes[src].costs.len(), nodes[dst].costs.len());
        let (rows, cols) = (rng.range(1, ns), rng.range(1, nd));
        let src_class: Vec<usize> = (0..ns).map(|_| rng.below(rows)).collect();
        let dst_class: Vec<usize> = (0..nd).map(|_| rng.below(cols)).collect();
        let kind = rng.below(5);
        let u: Vec<f64> = (0..rows).map(|_| rng.seconds()).collect();
        let v: Vec<f64> = (0..cols).map(|_| rng.seconds()).collect();
        let c0 = rng.seconds();
        let cost = (0..rows)
            .map(|a| {
                (0..cols)
                    .map(|b| match kind {
                        0 => c0,          // constant
                        1 => u[a],        // source side only
                        2 => u[a] + v[b], // separable
                        3 if a == b => 0.0,
                        _ => rng.seconds(),
                    })
                    .collect()
            })
            .collect();
        edges.push(ProblemEdge {
            src,
            dst,
            src_class,
            dst_class,
            cost,
        });
    }
    let mut p = Problem {
        nodes,
        edges,
        ..Problem::default()
    };
    if rng.below(3) == 0 {
        // Overlap: a random part of each cost may hide behind random compute.
        let part = |c: f64, rng: &mut Rng| {
            if rng.below(2) == 0 {
                0.0
            } else {
                c * rng.unit()
            }
        };
        p.overlap = Some(Overlap {
            node_hideable: p
                .nodes
                .iter()
                .map(|n| n.costs.iter().map(|&c| part(c, rng)).collect())
                .collect(),
            edge_hideable: p
                .edges
                .iter()
                .map(|e| {
                    e.cost
                        .iter()
                        .map(|row| row.iter().map(|&c| part(c, rng)).collect())
                        .collect()
                })
                .collect(),
            node_cover: p
                .nodes
                .iter()
                .map(|n| n.costs.iter().map(|_| rng.seconds()).collect())
                .collect(),
        });
    }
    let n_rows = rng.range(0, 3);
    for r in 0..n_rows {
        let terms = (0..rng.range(1, 4))
            .map(|_| {
                let node = rng.below(n);
                (
                    node,
                    (0..p.nodes[node].costs.len())
                        .map(|_| rng.range(1, 40) as f64 * 1e8)
                        .collect(),
                )
            })
            .collect();
        p.memory_rows.push(MemoryRow {
            label: format!("row {r}"),
            constant: rng.range(0, 20) as f64 * 1e8,
            terms,
        });
    }
    if n_rows > 0 {
        // Budget: the peak of a random plan (tight, feasible), or a random fraction of it (often
        // infeasible), or a little above it.
        let plan = Solution {
            choice: p
                .nodes
                .iter()
                .map(|node| rng.below(node.costs.len()))
                .collect(),
        };
        let peak = evaluate(&p, &plan).peak_memory;
        p.memory_budget = Some(match rng.below(3) {
            0 => peak,
            1 => peak * (0.5 + 0.5 * rng.unit()),
            _ => peak * 1.1,
        });
    }
    p
}

fn exact(backend: Backend) -> SolveOptions {
    SolveOptions {
        backend,
        mip_gap: 0.0,
        ..SolveOptions::default()
    }
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-6 * a.abs().max(b.abs()) + 1e-12
}

fn against_brute_force(backend: Backend, cases: usize) {
    let seed = std::env::var("ILP_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x5eed);
    let cases = std::env::var("ILP_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(cases);
    let mut rng = Rng(seed);
    let (mut feasible, mut infeasible) = (0, 0);
    let mut sources = std::collections::BTreeMap::new();
    for case in 0..cases {
        let p = random_problem(&mut rng);
        let best = brute_force(&p);
        let got = solve(&p, &exact(backend));
        match (best, got) {
            (Some((_, ev)), Ok(r)) => {
                feasible += 1;
                *sources.entry(format!("{:?}", r.bound_source)).or_insert(0) += 1;
                let check = evaluate(&p, &r.solution);
                assert!(
                    check.violations.is_empty(),
                    "case {case}: {:?}\n{p:?}",
                    check.violations
                );
                assert_eq!(r.objective, check.objective, "case {case}");
                assert!(
                    close(r.objective, ev.objective),
                    "case {case}: ilp {} vs brute force {}\n{p:?}",
                    r.objective,
                    ev.objective
                );
                assert_eq!(r.status, SolveStatus::Optimal, "case {case}");
                assert!(r.lower_bound <= r.objective, "case {case}");
                // The bound is the backend's, within its tolerances.
                assert!(
                    r.gap <= 1e-5,
                    "case {case}: bound {} vs {}, gap {}",
                    r.lower_bound,
                    ev.objective,
                    r.gap
                );
            }
            (None, Err(SolveError::Infeasible { reason })) => {
                infeasible += 1;
                *sources
                    .entry(
                        if reason.contains("proved") {
                            "infeasible (solver)"
                        } else {
                            "infeasible (reduction)"
                        }
                        .to_string(),
                    )
                    .or_insert(0) += 1;
            }
            (best, got) => panic!("case {case}: brute force {best:?}, ilp {got:?}\n{p:?}"),
        }
    }
    eprintln!("{backend}: {feasible} feasible, {infeasible} infeasible cases agree with brute force; {sources:?}");
    assert!(
        feasible > cases / 3 && infeasible > cases / 20,
        "{feasible} feasible, {infeasible} infeasible"
    );
}

#[test]
fn cbc_matches_brute_force() {
    against_brute_force(Backend::Cbc, 300);
}

#[cfg(feature = "highs")]
#[test]
fn highs_matches_brute_force() {
    against_brute_force(Backend::Highs, 300);
}

fn node(name: &str, costs: &[f64]) -> ProblemNode {
    ProblemNode {
        name: name.into(),
        costs: costs.to_vec(),
    }
}

#[test]
fn separable_edges_need_no_pair_variables() {
    // a -> b constant, b -> c depends on b only, c -> c self-edge: all linear.
    let p = Problem {
        nodes: vec![
            node("a", &[1.0, 2.0]),
            node("b", &[3.0, 1.0, 2.0]),
            node("c", &[0.5, 0.25]),
        ],
        edges: vec![
            ProblemEdge {
                src: 0,
                dst: 1,
                src_class: vec![0, 1],
                dst_class: vec![0, 0, 1],
                cost: vec![vec![4.0, 4.0], vec![4.0, 4.0]],
            },
            ProblemEdge {
                src: 1,
                dst: 2,
                src_class: vec![0, 1, 1],
                dst_class: vec![0, 1],
                cost: vec![vec![0.0, 0.0], vec![5.0, 5.0]],
            },
            ProblemEdge {
                src: 2,
                dst: 2,
                src_class: vec![0, 1],
                dst_class: vec![1, 0],
                cost: vec![vec![0.0, 9.0], vec![9.0, 0.0]],
            },
        ],
        ..Problem::default()
    };
    let r = solve(&p, &SolveOptions::default()).unwrap();
    // No pair and no memory row: every node takes its cheapest strategy without a solver.
    assert_eq!(
        (r.variables, r.constraints, r.bound_source),
        (0, 0, BoundSource::Exact)
    );
    assert_eq!(r.solution.choice, vec![0, 0, 1]);
    assert_eq!(r.objective, brute_force(&p).unwrap().1.objective);
}

#[test]
fn coupled_pair_uses_class_pairs() {
    // Two nodes, 4 strategies each, 2 classes each side, a non-separable matrix: x 8 + y 4.
    let p = Problem {
        nodes: vec![
            node("a", &[1.0, 1.0, 1.0, 0.0]),
            node("b", &[0.0, 1.0, 1.0, 1.0]),
        ],
        edges: vec![ProblemEdge {
            src: 0,
            dst: 1,
            src_class: vec![0, 0, 1, 1],
            dst_class: vec![1, 0, 1, 0],
            cost: vec![vec![0.0, 3.0], vec![3.0, 0.0]],
        }],
        ..Problem::default()
    };
    let r = solve(&p, &exact(Backend::Cbc)).unwrap();
    assert_eq!(r.variables, 12);
    assert_eq!(r.constraints, 2 + 2 + 2);
    assert_eq!(r.objective, 0.0);
    assert_eq!(r.objective, brute_force(&p).unwrap().1.objective);
}

#[test]
fn memory_row_that_no_plan_fits_is_named() {
    let p = Problem {
        nodes: vec![node("a", &[1.0, 2.0])],
        edges: vec![],
        memory_budget: Some(1e9),
        memory_rows: vec![MemoryRow {
            label: "after a".into(),
            constant: 5e8,
            terms: vec![(0, vec![7e8, 6e8])],
        }],
        ..Problem::default()
    };
    match solve(&p, &SolveOptions::default()) {
        Err(SolveError::Infeasible { reason }) => assert!(reason.contains("after a"), "{reason}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn invalid_problem_and_options_are_errors() {
    let bad = Problem {
        nodes: vec![node("a", &[])],
        ..Problem::default()
    };
    assert!(
        matches!(solve(&bad, &SolveOptions::default()), Err(SolveError::Invalid(m)) if m.contains("\"a\""))
    );
    let p = Problem {
        nodes: vec![node("a", &[1.0, 2.0])],
        ..Problem::default()
    };
    for opts in [
        SolveOptions {
            mip_gap: -1.0,
            ..SolveOptions::default()
        },
        SolveOptions {
            time_limit_s: Some(f64::NAN),
            ..SolveOptions::default()
        },
        SolveOptions {
            threads: Some(0),
            ..SolveOptions::default()
        },
    ] {
        assert!(
            matches!(solve(&p, &opts), Err(SolveError::InvalidOptions(_))),
            "{opts:?}"
        );
    }
}

#[test]
fn backend_names() {
    assert_eq!(Backend::parse("cbc").unwrap(), Backend::Cbc);
    assert_eq!(Backend::parse("CBC").unwrap(), Backend::Cbc);
    assert!(matches!(
        Backend::parse("gurobi"),
        Err(SolveError::UnknownBackend { .. })
    ));
    #[cfg(feature = "highs")]
    assert_eq!(Backend::parse("highs").unwrap(), Backend::Highs);
    #[cfg(not(feature = "highs"))]
    {
        let e = Backend::parse("highs").unwrap_err();
        assert!(matches!(e, SolveError::BackendNotBuilt { .. }));
        assert!(e.to_string().contains("--features highs"), "{e}");
    }
}

#[test]
fn time_limit_and_options_are_accepted() {
    let mut rng = Rng(7);
    let p = loop {
        let p = random_problem(&mut rng);
        if brute_force(&p).is_some() {
            break p;
        }
    };
    let best = brute_force(&p).unwrap().1.objective;
    for backend in Backend::available()
        .iter()
        .map(|b| Backend::parse(b).unwrap())
    {
        let opts = SolveOptions {
            backend,
            time_limit_s: Some(5.0),
            threads: Some(1),
            ..exact(backend)
        };
        let r = solve(&p, &opts).unwrap();
        assert!(
            close(r.objective, best),
            "{backend}: {} vs {best}",
            r.objective
        );
    }
}
