//! A synthetic problem of realistic size (a 2000-node chain, 8 strategies per node, class-based
//! resharding edges, skip connections and sliding-window memory rows): the ILP solves it and the
//! plan is valid. Times are printed, not asserted (`cargo test --test ilp_large -- --nocapture`);
//! the memory-bound case is hard (a gap under 1% stays open for minutes), so it runs under a
//! 10 s limit.

#![allow(clippy::unwrap_used)]

use autopar_solver::ilp::{solve, Backend, SolveError, SolveOptions, SolveStatus};
use autopar_solver::problem::{
    evaluate, MemoryRow, Overlap, Problem, ProblemEdge, ProblemNode, Solution,
};

struct Rng(u64);

impl Rng {
    fn unit(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    }
}

const STRATEGIES: usize = 8;
const CLASSES: usize = 4;

/// Strategy `s` gives its output in spec `s % 4` and wants its input in spec `s / 2`; moving
/// between specs costs an off-diagonal entry. Strategies with a higher `s % 4` shard more: less
/// memory, more compute.
fn chain(n: usize, window: usize, seed: u64) -> Problem {
    let mut rng = Rng(seed);
    let nodes = (0..n)
        .map(|i| ProblemNode {
            name: format!("n{i}"),
            costs: (0..STRATEGIES)
                .map(|s| 1e-3 * (1.0 + 0.3 * (s % CLASSES) as f64 + rng.unit()))
                .collect(),
        })
        .collect();
    let reshard = |rng: &mut Rng| -> Vec<Vec<f64>> {
        (0..CLASSES)
            .map(|a| {
                (0..CLASSES)
                    .map(|b| {
                        if a == b {
                            0.0
                        } else {
                            2e-4 * (1.0 + rng.unit())
                        }
                    })
                    .collect()
            })
            .collect()
    };
    let src_class: Vec<usize> = (0..STRATEGIES).map(|s| s % CLASSES).collect();
    let dst_class: Vec<usize> = (0..STRATEGIES).map(|s| s / 2).collect();
    let mut edges = vec![];
    for i in 0..n.saturating_sub(1) {
        edges.push(ProblemEdge {
            src: i,
            dst: i + 1,
            src_class: src_class.clone(),
            dst_class: dst_class.clone(),
            cost: reshard(&mut rng),
        });
        if i % 5 == 0 && i + 3 < n {
            edges.push(ProblemEdge {
                src: i,
                dst: i + 3,
                src_class: src_class.clone(),
                dst_class: dst_class.clone(),
                cost: reshard(&mut rng),
            });
        }
    }
    let bytes: Vec<Vec<f64>> = (0..n)
        .map(|_| {
            (0..STRATEGIES)
                .map(|s| 2e9 * (1.0 + rng.unit()) / (1 + s % CLASSES) as f64)
                .collect()
        })
        .collect();
    let memory_rows = (window..=n)
        .step_by(window / 2)
        .map(|end| MemoryRow {
            label: format!("after n{}", end - 1),
            constant: 1e9,
            terms: (end - window..end).map(|i| (i, bytes[i].clone())).collect(),
        })
        .collect();
    let mut p = Problem {
        nodes,
        edges,
        memory_rows,
        ..Problem::default()
    };
    // Budget halfway between the least-memory plan and the cheapest-compute plan's peaks.
    let low = evaluate(&p, &Solution { choice: vec![3; n] }).peak_memory;
    let high = evaluate(&p, &Solution { choice: vec![0; n] }).peak_memory;
    p.memory_budget = Some(low + 0.5 * (high - low));
    p
}

/// The same with overlap: a third of each node's cost and half of each resharding may hide
/// behind half of the nodes' costs (compute).
fn with_overlap(p: &Problem) -> Problem {
    let overlap = Overlap {
        node_hideable: p
            .nodes
            .iter()
            .map(|n| n.costs.iter().map(|c| c / 3.0).collect())
            .collect(),
        edge_hideable: p
            .edges
            .iter()
            .map(|e| {
                e.cost
                    .iter()
                    .map(|row| row.iter().map(|c| c / 2.0).collect())
                    .collect()
            })
            .collect(),
        node_cover: p
            .nodes
            .iter()
            .map(|n| {
                n.costs
                    .iter()
                    .enumerate()
                    .map(|(s, c)| c * if s % 2 == 0 { 0.5 } else { 0.1 })
                    .collect()
            })
            .collect(),
    };
    Problem {
        overlap: Some(overlap),
        ..p.clone()
    }
}

fn report(what: &str, p: &Problem, opts: &SolveOptions) {
    let r = solve(p, opts).unwrap();
    let ev = evaluate(p, &r.solution);
    assert!(
        ev.violations.is_empty(),
        "{:?}",
        &ev.violations[..ev.violations.len().min(3)]
    );
    assert_eq!(r.objective, ev.objective);
    assert!(r.lower_bound <= r.objective);
    eprintln!(
        "{what} [{}]: {} vars, {} rows, build {:.3} s, solve {:.3} s, {:?}, objective {:.6} s, bound {:.6} s ({:?}), gap {:.2e}, peak {:.3e} of {:.3e} bytes",
        r.backend,
        r.variables,
        r.constraints,
        r.build_s,
        r.solve_s,
        r.status,
        r.objective,
        r.lower_bound,
        r.bound_source,
        r.gap,
        ev.peak_memory,
        p.memory_budget.unwrap_or(f64::INFINITY)
    );
}

fn backends() -> Vec<Backend> {
    Backend::available()
        .iter()
        .map(|b| Backend::parse(b).unwrap())
        .collect()
}

#[test]
fn chain_2000_by_8() {
    let p = chain(2000, 20, 1);
    let unconstrained = Problem {
        memory_budget: None,
        ..p.clone()
    };
    for backend in backends() {
        let opts = SolveOptions {
            backend,
            time_limit_s: Some(10.0),
            ..SolveOptions::default()
        };
        report("chain 2000x8, no memory budget", &unconstrained, &opts);
        report("chain 2000x8, memory budget", &p, &opts);
        report(
            "chain 2000x8, no memory budget, overlap",
            &with_overlap(&unconstrained),
            &opts,
        );
    }
}

#[test]
fn zero_time_limit_gives_a_plan_or_says_none_was_found() {
    let p = chain(300, 20, 2);
    for backend in backends() {
        let opts = SolveOptions {
            backend,
            time_limit_s: Some(0.0),
            mip_gap: 0.0,
            ..SolveOptions::default()
        };
        match solve(&p, &opts) {
            Ok(r) => {
                assert!(evaluate(&p, &r.solution).violations.is_empty());
                eprintln!("{backend}, 0 s limit: {:?}, gap {:.2e}", r.status, r.gap);
                assert!(r.status == SolveStatus::TimeLimit || r.gap <= 1e-6);
            }
            Err(e @ SolveError::TimeLimitNoPlan { .. }) => eprintln!("{backend}, 0 s limit: {e}"),
            Err(e) => panic!("{backend}: {e}"),
        }
    }
}

/// For measuring by hand: `N=2000 MEM=1 BACKEND=cbc TL=60 cargo test --release -p autopar-solver
/// --test ilp_large bench_chain -- --ignored --nocapture`.
#[test]
#[ignore]
fn bench_chain() {
    let var = |k: &str| std::env::var(k).ok();
    let n = var("N").and_then(|v| v.parse().ok()).unwrap_or(2000);
    let mut p = chain(n, 20, 1);
    if var("MEM").is_none() {
        p.memory_budget = None;
    }
    if var("OVERLAP").is_some() {
        p = with_overlap(&p);
    }
    let backend = Backend::parse(&var("BACKEND").unwrap_or_else(|| "cbc".into())).unwrap();
    let time_limit_s = Some(var("TL").and_then(|v| v.parse().ok()).unwrap_or(60.0));
    report(
        &format!("chain {n}x8"),
        &p,
        &SolveOptions {
            backend,
            time_limit_s,
            ..SolveOptions::default()
        },
    );
}
