//! Algebra of resharding on random meshes, shapes and specs: paths reach their target through
//! valid specs (checked against an independent `apply`), identity is free, no path costs more
//! than the naive one, and costs obey the triangle inequality.

use autopar_solver::mesh::{Link, LinkKind, Mesh};
use autopar_solver::reshard::{collective_cost, transition, Collective, Resharder, Transition};
use autopar_solver::ShardingSpec;
use proptest::prelude::*;

const ELEM: usize = 2;
const EFF: f64 = 0.8;

/// Axes alternate between a fast and a slow link so that axis choice matters.
fn mesh(shape: &[usize]) -> Mesh {
    let links = (0..shape.len())
        .map(|a| {
            if a % 2 == 0 {
                Link {
                    kind: LinkKind::InterNode,
                    alpha_s: 10e-6,
                    bandwidth: 50e9,
                    measured: Default::default(),
                }
            } else {
                Link {
                    kind: LinkKind::IntraNode,
                    alpha_s: 5e-6,
                    bandwidth: 450e9,
                    measured: Default::default(),
                }
            }
        })
        .collect();
    Mesh {
        shape: shape.to_vec(),
        links,
    }
}

/// Per mesh axis: (owner choice, priority). Choice `< rank` = that dim, `rank` = partial,
/// otherwise unused. Axes are placed in priority order; one that would break divisibility, or
/// be partial where `allowed_partial` forbids it, stays unused.
type Raw = Vec<(usize, u8)>;

fn build(
    raw: &Raw,
    shape: &[usize],
    mesh: &Mesh,
    allowed_partial: Option<&[usize]>,
) -> ShardingSpec {
    let rank = shape.len();
    let mut spec = ShardingSpec::replicated(rank);
    let mut order: Vec<usize> = (0..raw.len()).collect();
    order.sort_by_key(|&a| (raw[a].1, a));
    for a in order {
        let c = raw[a].0;
        if c < rank {
            if shape[c] % (spec.dim_parts(c, mesh) * mesh.shape[a]) == 0 {
                spec.dims[c].push(a);
            }
        } else if c == rank && allowed_partial.is_none_or(|p| p.contains(&a)) {
            spec.partial.push(a);
        }
    }
    spec.partial.sort_unstable();
    assert!(spec.is_valid(shape, mesh), "{spec} on {shape:?}");
    spec
}

/// Reference semantics of one move, written independently of the search: `None` when the
/// move's precondition does not hold.
fn apply(op: &Collective, s: &ShardingSpec) -> Option<ShardingSpec> {
    let mut t = s.clone();
    let used = |a| s.used_axes().any(|u| u == a);
    match *op {
        Collective::AllGather { dim, axis } => {
            if t.dims.get(dim)?.last() != Some(&axis) {
                return None;
            }
            t.dims[dim].pop();
        }
        Collective::ReduceScatter { dim, axis } => {
            let i = t.partial.iter().position(|&p| p == axis)?;
            t.partial.remove(i);
            t.dims.get_mut(dim)?.push(axis);
        }
        Collective::AllReduce { axis } => {
            let i = t.partial.iter().position(|&p| p == axis)?;
            t.partial.remove(i);
        }
        Collective::AllToAll {
            from_dim,
            to_dim,
            axis,
        } => {
            if from_dim == to_dim || t.dims.get(from_dim)?.last() != Some(&axis) {
                return None;
            }
            t.dims[from_dim].pop();
            t.dims.get_mut(to_dim)?.push(axis);
        }
        Collective::Slice { dim, axis } => {
            if used(axis) {
                return None;
            }
            t.dims.get_mut(dim)?.push(axis);
        }
    }
    Some(t)
}

/// Follows the steps with `apply`, checking each `after`, each step's price and the total.
fn check_path(t: &Transition, from: &ShardingSpec, to: &ShardingSpec, shape: &[usize], m: &Mesh) {
    let mut cur = from.clone();
    let mut total = 0.0;
    for s in &t.steps {
        let next = apply(&s.op, &cur).unwrap_or_else(|| panic!("{} does not apply to {cur}", s.op));
        assert_eq!(next, s.after, "{} on {cur}", s.op);
        assert!(next.is_valid(shape, m), "{next} invalid on {shape:?}");
        let (bytes, cost) = collective_cost(&s.op, &cur, shape, ELEM, m, EFF);
        assert_eq!((bytes, cost), (s.bytes, s.cost_s), "{} on {cur}", s.op);
        total += cost;
        cur = next;
    }
    assert_eq!(&cur, to, "path ends at {cur}, not {to}");
    assert!(
        (total - t.cost_s).abs() <= 1e-12 * total.max(1e-9),
        "{total} vs {}",
        t.cost_s
    );
}

/// All-reduce every partial axis `to` drops, all-gather every split (minor first), slice into
/// `to`.
fn naive_cost(from: &ShardingSpec, to: &ShardingSpec, shape: &[usize], m: &Mesh) -> f64 {
    let mut ops = vec![];
    for &a in from.partial.iter().filter(|a| !to.partial.contains(a)) {
        ops.push(Collective::AllReduce { axis: a });
    }
    for (d, axes) in from.dims.iter().enumerate() {
        for &a in axes.iter().rev() {
            ops.push(Collective::AllGather { dim: d, axis: a });
        }
    }
    for (d, axes) in to.dims.iter().enumerate() {
        for &a in axes {
            ops.push(Collective::Slice { dim: d, axis: a });
        }
    }
    let mut cur = from.clone();
    let mut cost = 0.0;
    for op in ops {
        cost += collective_cost(&op, &cur, shape, ELEM, m, EFF).1;
        cur = apply(&op, &cur).expect("naive move applies");
    }
    assert_eq!(&cur, to);
    cost
}

/// Plain Dijkstra over specs with the reference `apply`, every move of every kind, no pruning
/// and no heuristic: the cost the search must match.
fn reference_cost(from: &ShardingSpec, to: &ShardingSpec, shape: &[usize], m: &Mesh) -> f64 {
    use std::collections::BTreeMap;
    let rank = shape.len();
    let k = m.ndim();
    let mut dist: BTreeMap<ShardingSpec, f64> = BTreeMap::new();
    let mut done: BTreeMap<ShardingSpec, ()> = BTreeMap::new();
    dist.insert(from.clone(), 0.0);
    loop {
        let Some((s, d)) = dist
            .iter()
            .filter(|(s, _)| !done.contains_key(*s))
            .min_by(|a, b| a.1.total_cmp(b.1))
            .map(|(s, d)| (s.clone(), *d))
        else {
            panic!("{to} unreachable from {from}");
        };
        if &s == to {
            return d;
        }
        done.insert(s.clone(), ());
        let mut ops = vec![];
        for axis in 0..k {
            ops.push(Collective::AllReduce { axis });
            for dim in 0..rank {
                ops.push(Collective::AllGather { dim, axis });
                ops.push(Collective::ReduceScatter { dim, axis });
                ops.push(Collective::Slice { dim, axis });
                for to_dim in 0..rank {
                    ops.push(Collective::AllToAll {
                        from_dim: dim,
                        to_dim,
                        axis,
                    });
                }
            }
        }
        for op in ops {
            let Some(t) = apply(&op, &s) else { continue };
            if !t.is_valid(shape, m) {
                continue;
            }
            let nd = d + collective_cost(&op, &s, shape, ELEM, m, EFF).1;
            if dist.get(&t).is_none_or(|&old| nd < old) {
                dist.insert(t, nd);
            }
        }
    }
}

fn case() -> impl Strategy<Value = (Vec<usize>, Vec<usize>, Raw, Raw, Raw)> {
    let sizes = prop::collection::vec(prop::sample::select(vec![1usize, 2, 4]), 1..=3);
    let dims = prop::collection::vec(prop::sample::select(vec![1usize, 2, 4, 6, 8, 12]), 1..=4);
    (sizes, dims).prop_flat_map(|(mesh, shape)| {
        let raw = prop::collection::vec((0..shape.len() + 2, any::<u8>()), mesh.len());
        (Just(mesh), Just(shape), raw.clone(), raw.clone(), raw)
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn paths_reach_the_target_and_beat_the_naive_path((ms, shape, ra, rb, _rc) in case()) {
        let m = mesh(&ms);
        let a = build(&ra, &shape, &m, None);
        let b = build(&rb, &shape, &m, Some(&a.partial));
        let t = transition(&a, &b, &shape, ELEM, &m, EFF).expect("transition");
        check_path(&t, &a, &b, &shape, &m);
        let naive = naive_cost(&a, &b, &shape, &m);
        prop_assert!(t.cost_s <= naive * (1.0 + 1e-12), "{a} -> {b}: {} > naive {naive}\n{t}", t.cost_s);

        let exact = reference_cost(&a, &b, &shape, &m);
        prop_assert!((t.cost_s - exact).abs() <= 1e-9 * exact, "{a} -> {b}: {} vs exact {exact}\n{t}", t.cost_s);

        let id = transition(&a, &a, &shape, ELEM, &m, EFF).expect("identity");
        prop_assert!(id.steps.is_empty() && id.cost_s == 0.0, "{a} -> {a}: {id}");
    }

    #[test]
    fn triangle_inequality((ms, shape, ra, rb, rc) in case()) {
        let m = mesh(&ms);
        let a = build(&ra, &shape, &m, None);
        let b = build(&rb, &shape, &m, Some(&a.partial));
        let c = build(&rc, &shape, &m, Some(&b.partial));
        let r = Resharder::new(m.clone(), EFF);
        let ac = r.cost(&a, &c, &shape, ELEM).expect("a -> c");
        let ab = r.cost(&a, &b, &shape, ELEM).expect("a -> b");
        let bc = r.cost(&b, &c, &shape, ELEM).expect("b -> c");
        prop_assert!(ac <= (ab + bc) * (1.0 + 1e-12), "{a} -> {c}: {ac} > {ab} via {b} + {bc}");
        // the memo gives what the free function gives
        prop_assert_eq!(r.transition(&a, &c, &shape, ELEM).expect("memo"), transition(&a, &c, &shape, ELEM, &m, EFF).expect("free"));
    }

    #[test]
    fn creating_a_partial_sum_is_an_error((ms, shape, ra, rb, _rc) in case()) {
        let m = mesh(&ms);
        let a = build(&ra, &shape, &m, None);
        let b = build(&rb, &shape, &m, None);
        let r = transition(&a, &b, &shape, ELEM, &m, EFF);
        match b.partial.iter().find(|p| !a.partial.contains(p)) {
            Some(p) => {
                let e = r.expect_err("creates a partial sum").to_string();
                prop_assert!(e.contains(&format!("mesh axis {p}")), "{e}");
            }
            None => prop_assert!(r.is_ok()),
        }
    }
}
