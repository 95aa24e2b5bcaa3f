//! Expected resharding paths on small meshes (snapshots of the printed steps), the errors users
//! see, and the speed the solver relies on.
//!
//! Links: 1 us latency, 1 GB/s, efficiency 1, so costs read off the formulas by hand: an
//! all-to-all of a 128 B buffer over 2 devices is 1 us + 1/2 * 128 B / 1 GB/s = 1.064 us.

use autopar_solver::cluster::Cluster;
use autopar_solver::mesh::{Link, LinkKind, Mesh};
use autopar_solver::reshard::{transition, Resharder};
use autopar_solver::ShardingSpec;
use expect_test::{expect, Expect};

fn mesh(shape: &[usize]) -> Mesh {
    let links = shape
        .iter()
        .map(|_| Link {
            kind: LinkKind::IntraNode,
            alpha_s: 1e-6,
            bandwidth: 1e9,
            measured: Default::default(),
        })
        .collect();
    Mesh {
        shape: shape.to_vec(),
        links,
    }
}

fn spec(s: &str) -> ShardingSpec {
    s.parse().expect("spec")
}

/// fp32 tensor of `shape`.
fn check(mesh_shape: &[usize], shape: &[usize], from: &str, to: &str, want: Expect) {
    let t =
        transition(&spec(from), &spec(to), shape, 4, &mesh(mesh_shape), 1.0).expect("transition");
    want.assert_eq(&format!("{from} -> {to}\n{t}"));
}

fn error(mesh_shape: &[usize], shape: &[usize], from: &str, to: &str, want: Expect) {
    let e =
        transition(&spec(from), &spec(to), shape, 4, &mesh(mesh_shape), 1.0).expect_err("error");
    want.assert_eq(&e.to_string());
}

#[test]
fn moving_a_split_to_another_dim_is_one_all_to_all() {
    check(
        &[2],
        &[8, 8],
        "S0R",
        "RS0",
        expect![[r#"
            S0R -> RS0
            all-to-all(dim 0 -> dim 1, axis 0) -> RS0 (128 B, 1.064 us)
            total 1.064 us in 1 steps"#]],
    );
}

#[test]
fn a_partial_sum_split_on_a_dim_is_one_reduce_scatter() {
    check(
        &[2],
        &[8, 8],
        "RR+P0",
        "S0R",
        expect![[r#"
            RR+P0 -> S0R
            reduce-scatter(dim 0, axis 0) -> S0R (256 B, 1.128 us)
            total 1.128 us in 1 steps"#]],
    );
    check(
        &[2],
        &[8, 8],
        "RR+P0",
        "RR",
        expect![[r#"
            RR+P0 -> RR
            all-reduce(axis 0) -> RR (256 B, 2.256 us)
            total 2.256 us in 1 steps"#]],
    );
}

#[test]
fn gathering_two_axes_goes_inner_first() {
    check(
        &[2, 2],
        &[8, 8],
        "S01R",
        "RR",
        expect![[r#"
            S01R -> RR
            all-gather(dim 0, axis 1) -> S0R (128 B, 1.064 us)
            all-gather(dim 0, axis 0) -> RR (256 B, 1.128 us)
            total 2.192 us in 2 steps"#]],
    );
}

#[test]
fn splitting_a_replicated_tensor_is_a_local_slice() {
    check(
        &[2, 2],
        &[8, 8],
        "RR",
        "S1R",
        expect![[r#"
            RR -> S1R
            slice(dim 0, axis 1) -> S1R (0 B, 0.001 us)
            total 0.001 us in 1 steps"#]],
    );
    check(
        &[2, 2],
        &[8, 8],
        "S0R",
        "S0R",
        expect![[r#"
            S0R -> S0R
            total 0.000 us in 0 steps"#]],
    );
}

#[test]
fn mixed_paths() {
    // the same dim, another axis: gather then slice (no collective moves an axis in place)
    check(
        &[2, 2],
        &[8, 8],
        "S0R",
        "S1R",
        expect![[r#"
            S0R -> S1R
            all-gather(dim 0, axis 0) -> RR (256 B, 1.128 us)
            slice(dim 0, axis 1) -> S1R (0 B, 0.001 us)
            total 1.129 us in 2 steps"#]],
    );
    // a partial sum over one axis while split over the other
    check(
        &[2, 2],
        &[8, 8],
        "S0R+P1",
        "S01R",
        expect![[r#"
            S0R+P1 -> S01R
            reduce-scatter(dim 0, axis 1) -> S01R (128 B, 1.064 us)
            total 1.064 us in 1 steps"#]],
    );
    // reversing the axis order of a dim
    check(
        &[2, 2],
        &[8, 8],
        "S01R",
        "S10R",
        expect![[r#"
            S01R -> S10R
            all-gather(dim 0, axis 1) -> S0R (128 B, 1.064 us)
            all-gather(dim 0, axis 0) -> RR (256 B, 1.128 us)
            slice(dim 0, axis 1) -> S1R (0 B, 0.001 us)
            slice(dim 0, axis 0) -> S10R (0 B, 0.001 us)
            total 2.194 us in 4 steps"#]],
    );
    // axes of size 1 move no data
    check(
        &[1, 4],
        &[8, 8],
        "S0S1",
        "S1S0",
        expect![[r#"
            S0S1 -> S1S0
            all-gather(dim 0, axis 0) -> RS1 (0 B, 0.000 us)
            all-to-all(dim 1 -> dim 0, axis 1) -> S1R (64 B, 3.048 us)
            slice(dim 1, axis 0) -> S1S0 (0 B, 0.000 us)
            total 3.048 us in 3 steps"#]],
    );
}

#[test]
fn errors_name_what_is_wrong() {
    // 12 attention heads cannot be split over 8 devices
    error(
        &[2, 4],
        &[12, 64],
        "RR",
        "S01R",
        expect!["to spec S01R: dim 0 of size 12 does not split into 8 parts (mesh axes [0, 1] of mesh 2x4)"],
    );
    error(
        &[2, 4],
        &[12, 64],
        "S0R",
        "RR+P1",
        expect!["cannot reshard S0R to RR+P1: RR+P1 is a pending partial sum over mesh axis 1 and S0R is not; communication cannot create a partial sum"],
    );
    error(
        &[2, 4],
        &[12, 64],
        "S0",
        "RR",
        expect!["from spec S0 has 1 dims but the tensor has shape [12, 64]"],
    );
    error(
        &[2, 4],
        &[12, 64],
        "S2R",
        "RR",
        expect!["from spec S2R uses mesh axis 2, but mesh 2x4 has 2 axes"],
    );
    error(
        &[2, 4],
        &[12, 64],
        "S0S0",
        "RR",
        expect!["from spec S0S0 uses mesh axis 0 twice"],
    );
    let bad_eff = transition(&spec("R"), &spec("R"), &[4], 4, &mesh(&[2]), 0.0).expect_err("eff");
    expect!["communication efficiency 0 is not in (0, 1]"].assert_eq(&bad_eff.to_string());
    let no_links = Mesh {
        shape: vec![2],
        links: vec![],
    };
    let e = transition(&spec("R"), &spec("S0"), &[4], 4, &no_links, 1.0).expect_err("links");
    expect!["mesh 2: 0 links for 1 axes"].assert_eq(&e.to_string());
}

#[test]
fn the_memo_is_shared_across_threads() {
    let r = Resharder::new(mesh(&[2, 2]), 1.0);
    std::thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| {
                for (a, b) in [("S0R", "RS0"), ("S01R", "RR"), ("RR+P0", "S0R")] {
                    r.transition(&spec(a), &spec(b), &[8, 8], 4)
                        .expect("transition");
                }
            });
        }
    });
    assert_eq!(r.cached(), 3);
    let t = r
        .transition(&spec("S0R"), &spec("RS0"), &[8, 8], 4)
        .expect("cached");
    assert_eq!(t.steps.len(), 1);
}

/// Every pair of specs of a 4-D tensor on a 2x2x2 mesh of H100s: the average must stay far
/// below a millisecond even in a debug build (the solver asks for thousands of these).
#[test]
fn four_d_tensor_on_a_three_d_mesh_is_fast() {
    let h100 = Cluster::preset("h100").expect("preset");
    let m = Mesh::on_cluster(vec![2, 2, 2], &h100, h100.gpus_per_node).expect("mesh");
    let shape = [8, 16, 12, 64];
    // every valid spec without partial sums, plus a few partial ones as sources
    let mut specs = vec![];
    let rank = shape.len();
    for code in 0..(rank + 1).pow(3) {
        let mut s = ShardingSpec::replicated(rank);
        let mut c = code;
        for a in 0..3 {
            let d = c % (rank + 1);
            c /= rank + 1;
            if d < rank {
                s.dims[d].push(a);
            }
        }
        if s.is_valid(&shape, &m) {
            specs.push(s);
        }
    }
    let sources: Vec<ShardingSpec> = specs
        .iter()
        .cloned()
        .chain(["RRRR+P012", "S0RRR+P12", "RS1RR+P0"].map(spec))
        .collect();
    let start = std::time::Instant::now();
    let mut n = 0u32;
    for a in &sources {
        for b in &specs {
            transition(a, b, &shape, 2, &m, h100.comm_efficiency).expect("transition");
            n += 1;
        }
    }
    let per = start.elapsed().as_secs_f64() / f64::from(n);
    println!("{n} transitions, {:.1} us each", per * 1e6);
    assert!(per < 1e-3, "{:.1} us per transition", per * 1e6);
}
