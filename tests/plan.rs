//! The sharding plans a user would sanity-check (issue 3): data parallel where it is right,
//! sharding where memory forces it, auto never worse than the hand-written families, and clear
//! errors for impossible budgets.

use autopar::planner::{Family, PlanOptions};
use autopar::solver::cluster::Cluster;
use autopar::solver::plan::{Plan, TensorRole};
use autopar::{load_model, plan_model, LoadOptions};

const GIB: f64 = 1024.0 * 1024.0 * 1024.0;

fn plan(
    model: &str,
    sets: &[(&str, &str)],
    mesh: &[usize],
    family: Family,
    memory: Option<f64>,
) -> Result<Plan, autopar::Error> {
    let mut opts = LoadOptions::default();
    for (k, v) in sets {
        opts.overrides.set(k, v).expect("override");
    }
    let m = load_model(model, &opts).expect("model loads");
    let mut po = PlanOptions::new(mesh.to_vec(), Cluster::preset("h100").expect("preset"));
    po.family = family;
    po.memory_budget = memory;
    // the sharding ILP alone (tests/checkpoint.rs covers the joint loop)
    po.checkpoint = Some(autopar::solver::checkpoint::Strategy::None);
    plan_model(&m, &opts, &po)
}

#[test]
fn resnet50_on_8_devices_is_data_parallel() {
    let p = plan("resnet50", &[], &[8], Family::Auto, None).expect("plans");
    // every convolution splits its batch over the whole mesh
    for n in p.nodes.iter().filter(|n| n.op == "conv") {
        assert_eq!(
            n.outputs[0].dims[0],
            vec![0],
            "{} is not batch-split: {}",
            n.name,
            n.notation
        );
    }
    // communication is parameter traffic (gradient sync, sharded storage); activations move
    // at most a negligible amount (e.g. the logits gathered for the loss)
    let params: std::collections::HashSet<u32> = p
        .tensors
        .iter()
        .filter(|t| t.role == TensorRole::Param)
        .map(|t| t.value)
        .collect();
    let (mut param_bytes, mut other_bytes) = (0.0, 0.0);
    for c in &p.collectives {
        if params.contains(&c.value) {
            param_bytes += c.bytes;
        } else {
            other_bytes += c.bytes;
        }
    }
    assert!(
        other_bytes <= 0.01 * param_bytes,
        "activation traffic {other_bytes} B vs parameter traffic {param_bytes} B"
    );
    // and it is at least as good as the hand-written data-parallel plan
    let dp = plan("resnet50", &[], &[8], Family::Dp, None).expect("dp plans");
    assert!(p.predicted.step_s <= dp.predicted.step_s);
}

#[test]
fn gpt2_xl_in_16_gib_needs_sharding() {
    // gpt2-xl's defaults: batch 4, seq 1024
    let sets = [];
    let e = plan("gpt2-xl", &sets, &[8], Family::Dp, Some(16.0 * GIB))
        .expect_err("dp cannot fit")
        .to_string();
    assert!(e.contains("smallest per-device memory"), "{e}");
    let p = plan("gpt2-xl", &sets, &[8], Family::Auto, Some(16.0 * GIB)).expect("auto fits");
    assert!(p.predicted.peak_memory_bytes <= 16.0 * GIB);
    let sharded_params = p
        .tensors
        .iter()
        .any(|t| t.role == TensorRole::Param && t.spec.shard_count(&p.mesh) > 1);
    let tensor_parallel = p
        .nodes
        .iter()
        .any(|n| n.op == "einsum" && n.inputs.get(1).is_some_and(|w| w.shard_count(&p.mesh) > 1));
    assert!(
        sharded_params || tensor_parallel,
        "gpt2-xl in 16 GiB must shard parameters or weights"
    );
}

/// Every built-in model (sequence shortened to keep the test quick) on every mesh of the issue.
#[test]
fn auto_is_never_worse_than_the_hand_written_families() {
    let cases: &[(&str, &[(&str, &str)])] = &[
        ("mlp", &[]),
        ("gpt2", &[("batch", "8"), ("seq", "512")]),
        ("gpt2-medium", &[("batch", "8"), ("seq", "512")]),
        ("gpt2-large", &[("batch", "8"), ("seq", "512")]),
        ("gpt2-xl", &[("batch", "8"), ("seq", "512")]),
        ("llama-1b", &[("batch", "8"), ("seq", "512")]),
        ("llama-8b", &[("batch", "8"), ("seq", "512")]),
        ("bert-base", &[]),
        ("bert-large", &[]),
        ("vit-b16", &[]),
        ("resnet18", &[]),
        ("resnet50", &[]),
    ];
    for mesh in [&[4][..], &[2, 2], &[2, 4]] {
        for (model, sets) in cases {
            let auto = plan(model, sets, mesh, Family::Auto, None).expect("auto plans");
            for fam in [Family::Dp, Family::Tp, Family::Fsdp] {
                match plan(model, sets, mesh, fam, None) {
                    Ok(p) => assert!(
                        auto.predicted.step_s <= p.predicted.step_s * (1.0 + 1e-6) + 1e-12,
                        "{model} on {mesh:?}: auto {} s > {} {} s",
                        auto.predicted.step_s,
                        fam.name(),
                        p.predicted.step_s
                    ),
                    Err(e) => assert!(
                        e.to_string().contains("smallest per-device memory"),
                        "{model} {}: {e}",
                        fam.name()
                    ),
                }
            }
        }
    }
}

#[test]
fn gpt2_plans_on_2x4_although_12_heads_do_not_split_8_ways() {
    let p = plan(
        "gpt2",
        &[("batch", "8"), ("seq", "256")],
        &[2, 4],
        Family::Auto,
        None,
    )
    .expect("plans");
    assert!(p.predicted.step_s > 0.0);
    assert_eq!(p.schema_version, autopar::solver::plan::PLAN_SCHEMA_VERSION);
}

#[test]
fn a_mesh_that_divides_nothing_still_plans() {
    let p = plan("mlp", &[("batch", "6")], &[7], Family::Auto, None)
        .expect("plans replicated where it must");
    assert!(p
        .nodes
        .iter()
        .all(|n| n.outputs.iter().all(|s| s.shard_count(&p.mesh) == 1)));
}

#[test]
fn an_impossible_budget_states_the_minimum() {
    let e = plan(
        "gpt2",
        &[("batch", "8"), ("seq", "512")],
        &[2, 2],
        Family::Auto,
        Some(0.1 * GIB),
    )
    .expect_err("too small")
    .to_string();
    assert!(
        e.contains("smallest per-device memory any such plan needs is"),
        "{e}"
    );
    // the stated minimum is achievable
    let min_gib: f64 = e
        .rsplit("needs is ")
        .next()
        .and_then(|t| t.split(' ').next())
        .and_then(|t| t.parse().ok())
        .expect("number");
    plan(
        "gpt2",
        &[("batch", "8"), ("seq", "512")],
        &[2, 2],
        Family::Auto,
        Some((min_gib + 0.01) * GIB),
    )
    .expect("the minimum fits");
}

#[test]
fn plan_json_round_trips() {
    let p = plan("mlp", &[], &[2, 2], Family::Auto, None).expect("plans");
    let text = serde_json::to_string(&p).expect("serialises");
    let back: Plan = serde_json::from_str(&text).expect("parses");
    assert_eq!(back, p);
}

#[test]
fn tp_is_megatron_style_tensor_parallel() {
    // mesh 2x2: data parallel on axis 0, tensor parallel on axis 1
    let p = plan(
        "gpt2",
        &[("batch", "8"), ("seq", "256")],
        &[2, 2],
        Family::Tp,
        None,
    )
    .expect("plans");
    let node = |name: &str| {
        p.nodes
            .iter()
            .find(|n| n.name == name)
            .unwrap_or_else(|| panic!("no node {name}"))
    };
    // the QKV projection is column parallel: its weight split on the output features over axis 1
    let c_attn = node("h.0.attn.c_attn");
    assert_eq!(
        c_attn.inputs[1].dims,
        vec![vec![], vec![1]],
        "{}",
        c_attn.notation
    );
    // attention is split by heads over axis 1, the batch over axis 0
    let scores = node("h.0.attn.scores");
    assert!(
        scores.outputs[0].dims.iter().any(|d| d == &vec![1]),
        "{}",
        scores.notation
    );
    assert_eq!(scores.outputs[0].dims[0], vec![0], "{}", scores.notation);
    // no op splits the batch or the sequence over the tensor-parallel axis
    for n in p.nodes.iter().filter(|n| n.op == "einsum") {
        assert!(
            !n.outputs[0].dims[0].contains(&1),
            "{} splits the batch over axis 1: {}",
            n.name,
            n.notation
        );
        if n.outputs[0].dims.len() == 3 {
            assert!(
                n.outputs[0].dims[1].is_empty(),
                "{} splits the sequence: {}",
                n.name,
                n.notation
            );
        }
    }
}

#[test]
fn sp_splits_the_sequence_between_tensor_parallel_regions() {
    let p = plan(
        "gpt2",
        &[("batch", "4"), ("seq", "256")],
        &[2, 2],
        Family::Sp,
        None,
    )
    .expect("plan");
    let norm = p
        .nodes
        .iter()
        .find(|n| n.name == "h.0.ln_2")
        .expect("h.0.ln_2 is planned");
    // [batch, seq, hidden]: batch over axis 0, sequence over the tensor-parallel axis 1
    assert_eq!(
        norm.outputs[0].dims,
        vec![vec![0], vec![1], vec![]],
        "{}",
        norm.notation
    );
    let qkv = p
        .nodes
        .iter()
        .find(|n| n.name == "h.0.attn.c_attn")
        .expect("qkv");
    assert!(
        qkv.outputs[0].dims[1].is_empty(),
        "the QKV projection is column parallel, not sequence split: {}",
        qkv.notation
    );
}

#[test]
fn checkpointing_fits_activations_in_what_the_budget_leaves() {
    use autopar::solver::checkpoint::Strategy;
    let mut opts = LoadOptions::default();
    for (k, v) in [("batch", "4"), ("seq", "256"), ("layers", "4")] {
        opts.overrides.set(k, v).expect("override");
    }
    let m = load_model("gpt2", &opts).expect("model loads");
    let tg = autopar::build_training(&m, &opts).expect("training graph");
    let po = PlanOptions::new(vec![2], Cluster::preset("h100").expect("preset"));
    let base = plan_model(&m, &opts, &po).expect("plan");
    let checkpointed = |strategy, budget: Option<f64>| {
        let mut p = base.clone();
        p.memory_budget_bytes = budget;
        autopar::checkpointing::checkpoint_plan(&tg, &mut p, strategy)
            .map(|()| p.checkpoint.expect("recorded"))
    };
    let free = checkpointed(Some(Strategy::None), None).expect("keep all");
    assert!(
        free.stages.len() >= 8,
        "a stage per sub-block: {:?}",
        free.stages
    );
    assert_eq!(free.recompute_s, 0.0);
    // a budget between the least any schedule needs and keeping everything
    let fixed: f64 = base.tensors.iter().map(|t| t.bytes_per_device).sum();
    let (chain, _) = autopar::checkpointing::chain_of(&tg, &base).expect("chain");
    let least = autopar::solver::checkpoint::min_peak_bytes(&chain).expect("minimum") as f64;
    assert!(least < free.activation_peak_bytes);
    let budget = fixed + (least + free.activation_peak_bytes) / 2.0;
    let rotor = checkpointed(Some(Strategy::Rotor), Some(budget)).expect("rotor fits");
    assert!(rotor.activation_peak_bytes <= rotor.activation_budget_bytes);
    assert!(rotor.recompute_s > 0.0 && rotor.step_s > base.predicted.step_s);
    // auto picks rotor when keeping everything does not fit
    let auto = checkpointed(None, Some(budget)).expect("auto");
    assert_eq!(auto.strategy, "rotor");
    // keeping everything does not fit: an error naming the peak and the budget
    let err = checkpointed(Some(Strategy::None), Some(budget)).expect_err("over budget");
    assert!(err.to_string().contains("budget"), "{err}");
    // below any schedule: the error states the minimum
    let err = checkpointed(Some(Strategy::Rotor), Some(fixed + 1024.0)).expect_err("too small");
    assert!(
        err.to_string().contains("smallest peak any schedule"),
        "{err}"
    );
}
