//! Activation checkpointing end to end: a checkpointed training step (recompute blocks in the
//! program, run by the runtime on simulated ranks) computes what the plain step computes, and
//! holds less memory while doing it; the joint loop with the sharding ILP finds plans for
//! budgets no plan meets with every activation kept.

use autopar::planner::Family;
use autopar::solver::checkpoint::{self, Strategy};
use autopar::solver::plan::Plan;
use autopar::{autoparallelize, models, AutoOptions, LoadOptions, Parallelized};

/// A tiny config with more tokens, so that activations outweigh the weights' gradients (which
/// every schedule holds to the end).
fn tiny(model: &str, layers: usize) -> LoadOptions {
    let mut overrides = models::tiny(model).expect("tiny config");
    for (k, v) in [
        ("layers", layers.to_string()),
        ("batch", "16".into()),
        ("seq", "32".into()),
    ] {
        overrides.set(k, &v).expect("override");
    }
    LoadOptions {
        overrides,
        ..LoadOptions::default()
    }
}

fn parallelize(model: &str, opts: &LoadOptions, auto: &AutoOptions) -> Parallelized {
    autoparallelize(model, opts, auto).unwrap_or_else(|e| panic!("{model}: {e}"))
}

/// `plan` with a `strategy` schedule under a budget halfway between the least peak any
/// schedule reaches and keeping every activation.
fn checkpointed(par: &Parallelized, strategy: Strategy) -> Plan {
    let (chain, _) = autopar::checkpointing::chain_of(&par.training, &par.plan).expect("chain");
    let least = checkpoint::min_peak_bytes(&chain).expect("least peak") as f64;
    let all = checkpoint::simulate(&chain, &checkpoint::none(&chain).expect("none"))
        .expect("simulate")
        .peak_bytes as f64;
    assert!(
        least < all,
        "{} stages: checkpointing can save memory",
        chain.len()
    );
    let fixed: f64 = par.plan.tensors.iter().map(|t| t.bytes_per_device).sum();
    let mut plan = par.plan.clone();
    plan.memory_budget_bytes = Some(fixed + (least + all) / 2.0);
    autopar::checkpointing::checkpoint_plan(&par.training, &mut plan, Some(strategy))
        .expect("schedule");
    plan
}

fn rel(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs().max(1e-30)
}

/// One step of the plain program and one of the checkpointed one, from the same weights.
fn same_step(model: &str, layers: usize, mesh: &[usize], family: Family, strategy: Strategy) {
    let opts = tiny(model, layers);
    let mut auto = AutoOptions::new(mesh);
    auto.plan.family = family;
    let plain = parallelize(model, &opts, &auto);
    let plan = checkpointed(&plain, strategy);
    let ck = plan.checkpoint.clone().expect("recorded");
    assert!(
        ck.schedule.forward_count() > ck.stages.len(),
        "{model} {mesh:?} {strategy}: the schedule recomputes ({})",
        ck.schedule
    );
    auto.use_plan = Some(plan);
    let recomputing = parallelize(model, &opts, &auto);
    assert!(
        !recomputing.program.recompute.is_empty(),
        "the program has recompute blocks"
    );
    assert!(recomputing.rank_program(0).contains("recompute stage"));
    let batch = plain.synthetic_batch(7);
    let a = plain
        .trainer()
        .expect("plain trainer")
        .step_with_grads(&batch)
        .expect("plain step");
    let b = recomputing
        .trainer()
        .expect("checkpointed trainer")
        .step_with_grads(&batch)
        .expect("checkpointed step");
    let where_ = format!("{model} {mesh:?} {family:?} {strategy}");
    assert!(
        rel(b.loss, a.loss) <= 1e-6,
        "{where_}: loss {} vs {}",
        b.loss,
        a.loss
    );
    assert_eq!(a.grads.len(), b.grads.len());
    let (err, name) = autopar::runtime::weights::max_rel_err(&b.grads, &a.grads);
    assert!(err <= 1e-6, "{where_}: gradient of {name}: {err:e}");
    assert!(
        b.peak_bytes < a.peak_bytes,
        "{where_}: checkpointed peak {} not below the plain step's {}",
        b.peak_bytes,
        a.peak_bytes
    );
    eprintln!(
        "{where_}: {} stages, schedule {}; peak {} -> {} bytes",
        ck.stages.len(),
        ck.schedule,
        a.peak_bytes,
        b.peak_bytes
    );
}

#[test]
fn rotor_step_equals_plain_step_data_parallel() {
    same_step("gpt2", 4, &[2], Family::Dp, Strategy::Rotor);
}

#[test]
fn rotor_step_equals_plain_step_tensor_parallel() {
    // the recomputed forward re-issues the tensor-parallel all-reduces
    same_step("gpt2", 4, &[2], Family::Tp, Strategy::Rotor);
}

#[test]
fn chen_step_equals_plain_step_fsdp_llama() {
    // the recomputed forward re-gathers the sharded weights
    same_step("llama-1b", 4, &[2], Family::Fsdp, Strategy::Chen);
}

#[test]
fn rotor_step_equals_plain_step_on_2x2() {
    same_step("gpt2", 4, &[2, 2], Family::Auto, Strategy::Rotor);
}

#[test]
fn joint_loop_fits_a_budget_no_plan_meets_keeping_every_activation() {
    let model = "gpt2";
    let mut opts = LoadOptions::default();
    for (k, v) in [
        ("batch", "8"),
        ("seq", "512"),
        ("layers", "8"),
        ("vocab", "2048"),
    ] {
        opts.overrides.set(k, v).expect("override");
    }
    let m = autopar::load_model(model, &opts).expect("model");
    let mut po = autopar::planner::PlanOptions::new(
        vec![2],
        autopar::solver::cluster::Cluster::preset("h100").expect("preset"),
    );
    po.checkpoint = Some(Strategy::None);
    // the least any plan needs with every activation kept
    po.memory_budget = Some(1024.0);
    let least = match autopar::plan_model(&m, &opts, &po) {
        Err(autopar::Error::NoFit { least_bytes, .. }) => least_bytes,
        other => panic!(
            "expected no fit, got {:?}",
            other.map(|p| p.predicted.step_s)
        ),
    };
    // 80 % of that: only checkpointing makes it fit
    let budget = 0.8 * least;
    po.memory_budget = Some(budget);
    let err = autopar::plan_model(&m, &opts, &po).expect_err("none over budget");
    assert!(err.to_string().contains("fits"), "{err}");
    po.checkpoint = None;
    let plan = autopar::plan_model(&m, &opts, &po).expect("joint plan");
    let ck = plan.checkpoint.as_ref().expect("checkpointed");
    assert_eq!(ck.strategy, "rotor");
    let fixed: f64 = plan.tensors.iter().map(|t| t.bytes_per_device).sum();
    assert!(
        fixed + ck.activation_peak_bytes <= budget,
        "{} + {} over {budget}",
        fixed,
        ck.activation_peak_bytes
    );
    assert!(ck.recompute_s > 0.0 && ck.step_s > plan.predicted.step_s);
    // far below: an error stating the least memory found
    po.memory_budget = Some(0.05 * least);
    let err = autopar::plan_model(&m, &opts, &po).expect_err("too small");
    assert!(
        err.to_string()
            .contains("even with activation checkpointing"),
        "{err}"
    );
}
