//! Criterion benches of planning speed. Guards against regressions of the issue-3 targets
//! (on a 2-core machine): `gpt2` on 2x2 within 0.5 s end to end, `llama-8b` (batch 8, seq 2048)
//! on 2x4 within 2 s and on 8x8 within 10 s; and of the resharding search that every edge
//! cost goes through. `autopar bench solver` writes the full report.

use autopar::planner::{plan, PlanOptions};
use autopar::solver::cluster::Cluster;
use autopar::solver::mesh::Mesh;
use autopar::solver::reshard::Resharder;
use autopar::solver::spec::ShardingSpec;
use autopar::{build_training, load_model, LoadOptions};
use criterion::{criterion_group, criterion_main, Criterion};

fn plan_case(c: &mut Criterion, name: &str, model: &str, sets: &[(&str, &str)], mesh: &[usize]) {
    let mut opts = LoadOptions::default();
    for (k, v) in sets {
        opts.overrides.set(k, v).expect("override");
    }
    let cluster = Cluster::preset("h100").expect("preset");
    c.bench_function(name, |b| {
        b.iter(|| {
            let m = load_model(model, &opts).expect("model");
            let tg = build_training(&m, &opts).expect("training graph");
            let po = PlanOptions::new(mesh.to_vec(), cluster.clone());
            let profile = autopar::analyzer::profile::profile(&tg, po.optimizer, po.policy);
            plan(model, &tg, &profile, &po).expect("plan")
        })
    });
}

fn planning(c: &mut Criterion) {
    plan_case(
        c,
        "gpt2_2x2",
        "gpt2",
        &[("batch", "8"), ("seq", "1024")],
        &[2, 2],
    );
    plan_case(
        c,
        "llama8b_2x4",
        "llama-8b",
        &[("batch", "8"), ("seq", "2048")],
        &[2, 4],
    );
}

fn resharding(c: &mut Criterion) {
    let cluster = Cluster::preset("h100").expect("preset");
    let mesh = Mesh::on_cluster(vec![2, 2, 2], &cluster, 8).expect("mesh");
    let specs: Vec<ShardingSpec> =
        autopar::solver::strategy::storage_specs(&[16, 16, 16, 16], &mesh);
    c.bench_function("reshard_all_pairs_4d_on_2x2x2_uncached", |b| {
        b.iter(|| {
            let r = Resharder::new(mesh.clone(), 0.8);
            let mut total = 0.0;
            for f in specs.iter().take(40) {
                for t in specs.iter().take(40) {
                    total += r
                        .transition(f, t, &[16, 16, 16, 16], 2)
                        .expect("path")
                        .cost_s;
                }
            }
            total
        })
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(10);
    targets = planning, resharding
}
criterion_main!(benches);
