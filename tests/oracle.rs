//! The correctness oracle: one training step on N simulated ranks (Loopback, CPU) gives the
//! same loss, gradients and updated parameters as the single-device step, for the built-ins
//! and every strategy family, on meshes 2, 4, 2x2 and 2x4.
#![allow(clippy::unwrap_used)]

use autopar::planner::{Family, PlanOptions};
use autopar::solver::cluster::Cluster;
use autopar::{autoparallelize, build_training, load_model, models, AutoOptions, LoadOptions};
use autopar_analyzer::graph::ValueDef;
use autopar_generator::generate;
use autopar_runtime::exec::OptimizerConfig;
use autopar_runtime::session::Session;
use autopar_runtime::weights::NamedTensor;
use std::sync::Arc;

struct Outcome {
    loss: f64,
    grads: Vec<NamedTensor>,
    params: Vec<NamedTensor>,
}

fn tiny(model: &str) -> LoadOptions {
    LoadOptions {
        overrides: models::tiny(model).unwrap(),
        ..Default::default()
    }
}

/// One training step of `model` on `mesh` under `family`, through `autoparallelize`.
fn run_with(
    model: &str,
    opts: &LoadOptions,
    mesh: &[usize],
    family: Family,
    opt: OptimizerConfig,
) -> Outcome {
    autopar_runtime::tch::set_num_threads(1);
    let mut auto = AutoOptions::new(mesh);
    auto.plan.family = family;
    auto.optimizer = opt;
    auto.seed = 1;
    let par = autoparallelize(model, opts, &auto)
        .unwrap_or_else(|e| panic!("{model} on {mesh:?} {family:?}: {e}"));
    if mesh.iter().product::<usize>() > 1 && family != Family::Auto {
        assert!(
            !par.program.issued(0).is_empty(),
            "{model} {mesh:?} {family:?} communicates nothing"
        );
    }
    let batch = par.synthetic_batch(7);
    let trainer = par.trainer().unwrap();
    let r = trainer
        .step_with_grads(&batch)
        .unwrap_or_else(|e| panic!("{model} on {mesh:?} {family:?}: {e}"));
    Outcome {
        loss: r.loss,
        grads: r.grads,
        params: trainer.params().unwrap(),
    }
}

fn run(model: &str, mesh: &[usize], family: Family, opt: OptimizerConfig) -> Outcome {
    run_with(model, &tiny(model), mesh, family, opt)
}

fn max_rel(a: &[NamedTensor], b: &[NamedTensor]) -> (f64, String) {
    assert_eq!(a.len(), b.len());
    for ((na, _, _), (nb, _, _)) in a.iter().zip(b) {
        assert_eq!(na, nb);
    }
    autopar_runtime::weights::max_rel_err(a, b)
}

const SGD: OptimizerConfig = OptimizerConfig::Sgd {
    lr: 0.1,
    momentum: 0.9,
    weight_decay: 0.01,
};

fn check(model: &str, meshes: &[&[usize]], families: &[Family]) {
    check_with(model, &tiny(model), meshes, families)
}

fn check_with(model: &str, opts: &LoadOptions, meshes: &[&[usize]], families: &[Family]) {
    let one = run_with(model, opts, &[1], Family::Auto, SGD);
    for &mesh in meshes {
        for &family in families {
            let many = run_with(model, opts, mesh, family, SGD);
            let loss_err = (many.loss - one.loss).abs() / one.loss.abs().max(1e-12);
            let (g, gname) = max_rel(&many.grads, &one.grads);
            let (p, pname) = max_rel(&many.params, &one.params);
            eprintln!("{model} {mesh:?} {family:?}: loss {loss_err:.2e} grads {g:.2e} ({gname}) params {p:.2e} ({pname})");
            assert!(
                loss_err <= 1e-4,
                "{model} {mesh:?} {family:?}: loss {} vs {}",
                many.loss,
                one.loss
            );
            assert!(
                g <= 1e-4,
                "{model} {mesh:?} {family:?}: gradient of {gname} off by {g:.2e}"
            );
            assert!(
                p <= 1e-4,
                "{model} {mesh:?} {family:?}: updated {pname} off by {p:.2e}"
            );
        }
    }
}

const FAMILIES: [Family; 5] = [
    Family::Auto,
    Family::Dp,
    Family::Tp,
    Family::Fsdp,
    Family::Sp,
];

#[test]
fn mlp_matches_single_device() {
    check("mlp", &MESHES, &FAMILIES);
}

#[test]
fn gpt2_matches_single_device() {
    check("gpt2", &MESHES, &FAMILIES);
}

#[test]
fn llama_matches_single_device() {
    check("llama-1b", &MESHES, &FAMILIES);
}

/// The single-device runtime against the analyzer's f64 reference evaluator: loss and every
/// gradient (so the oracle's reference is itself right).
fn check_reference(model: &str) {
    autopar_runtime::tch::set_num_threads(1);
    let opts = LoadOptions {
        overrides: models::tiny(model).unwrap(),
        ..Default::default()
    };
    let m = load_model(model, &opts).unwrap();
    let tg = build_training(&m, &opts).unwrap();
    let built = models::build(model, &opts.overrides).unwrap();
    let feeds = models::random_feeds(&tg.graph, &built.config, 7);
    let reference = autopar_analyzer::eval::run(&tg.graph, &feeds).unwrap();
    let sgd = OptimizerConfig::Sgd {
        lr: 0.0,
        momentum: 0.0,
        weight_decay: 0.0,
    };
    let plan = autopar::plan_model(
        &m,
        &opts,
        &PlanOptions::new(vec![1], Cluster::preset("h100").unwrap()),
    )
    .unwrap();
    let p = generate(&tg, &plan).unwrap();
    let mut inputs = feeds.clone();
    inputs.retain(|v, _| matches!(tg.graph.value(*v).def, ValueDef::Input));
    // the reference's weights are the feeds' values: hand them to the session as its init
    let mut g = tg.graph.clone();
    for (v, t) in &feeds {
        let d = &mut g.values[*v];
        let bytes: Vec<u8> = t
            .data
            .iter()
            .flat_map(|&x| (x as f32).to_le_bytes())
            .collect();
        match &mut d.def {
            ValueDef::Param { data } | ValueDef::Buffer { data } => {
                *data = autopar_analyzer::graph::WeightData::Inline(Arc::new(bytes))
            }
            _ => {}
        }
    }
    let s = Session::new(Arc::new(p), &g, std::path::Path::new("."), 1, sgd).unwrap();
    let r = s.step(&inputs, true).unwrap();
    let want_loss = reference[tg.loss.0 as usize].as_ref().unwrap().data[0];
    assert!(
        (r.loss - want_loss).abs() <= 1e-4 * want_loss.abs(),
        "{model}: loss {} vs {want_loss}",
        r.loss
    );
    for ((p, gv), (name, _, got)) in tg.grads.iter().zip(&r.grads) {
        assert_eq!(&tg.graph.value(*p).name, name);
        let want = &reference[gv.0 as usize].as_ref().unwrap().data;
        let scale = want.iter().fold(0.0f64, |m, x| m.max(x.abs())).max(1e-12);
        let diff = got
            .iter()
            .zip(want)
            .fold(0.0f64, |m, (&a, &b)| m.max((a as f64 - b).abs()));
        assert!(
            diff / scale <= 1e-4,
            "{model}: gradient of {name} off by {:.2e}",
            diff / scale
        );
    }
}

#[test]
fn single_device_matches_reference() {
    for model in ["mlp", "gpt2", "llama-1b"] {
        check_reference(model);
    }
}

const MESHES: [&[usize]; 4] = [&[2], &[4], &[2, 2], &[2, 4]];

fn corpus() -> Option<std::path::PathBuf> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/corpus");
    dir.is_dir().then_some(dir)
}

/// The `.full.onnx` and `.jit.full.pt` corpus files (real PyTorch exports with their weights):
/// the runtime's forward equals the reference outputs (onnxruntime's, checked against PyTorch),
/// and N ranks equal one device.
#[test]
fn corpus_full_onnx_forward_matches_onnxruntime() {
    let Some(dir) = corpus() else {
        eprintln!("shared/corpus not found: skipped");
        return;
    };
    autopar_runtime::tch::set_num_threads(1);
    for (file, reference, tol) in [
        (
            "mlp_tiny/mlp_tiny.dynamo.full.onnx",
            "mlp_tiny/mlp_tiny.dynamo.ref.json",
            1e-4,
        ),
        (
            "gpt2_tiny/gpt2_tiny.dynamo.full.onnx",
            "gpt2_tiny/gpt2_tiny.dynamo.ref.json",
            1e-3,
        ),
        (
            "gpt2_tiny/gpt2_tiny.train.ts.full.onnx",
            "gpt2_tiny/gpt2_tiny.train.ts.ref.json",
            1e-3,
        ),
        (
            "llama_tiny/llama_tiny.train.ts.full.onnx",
            "llama_tiny/llama_tiny.train.ts.ref.json",
            1e-3,
        ),
        // TorchScript archives with their weights, against the same model's reference outputs
        (
            "mlp_tiny/mlp_tiny.jit.full.pt",
            "mlp_tiny/mlp_tiny.dynamo.ref.json",
            1e-4,
        ),
        (
            "gpt2_tiny/gpt2_tiny.jit.full.pt",
            "gpt2_tiny/gpt2_tiny.dynamo.ref.json",
            1e-3,
        ),
    ] {
        let path = dir.join(file);
        let m = load_model(path.to_str().unwrap(), &LoadOptions::default()).unwrap();
        let r = autopar_analyzer::reference::read_reference(&dir.join(reference)).unwrap();
        let feeds = m
            .graph
            .inputs
            .iter()
            .map(|&v| {
                let name = &m.graph.value(v).name;
                let t = r
                    .inputs
                    .iter()
                    .find(|(n, _)| n == name)
                    // a one-input model's input may be named differently by each exporter
                    .or_else(|| (m.graph.inputs.len() == 1).then(|| &r.inputs[0]))
                    .unwrap_or_else(|| panic!("{file}: no reference input {name}"));
                (v, t.1.clone())
            })
            .collect();
        let outs = autopar_runtime::exec::run_graph(
            &m.graph,
            &feeds,
            path.parent().unwrap(),
            0,
            autopar_runtime::tch::Device::Cpu,
        )
        .unwrap();
        for (got, (name, want)) in outs.iter().zip(&r.outputs) {
            let got = autopar_runtime::lower::from_tch(got).unwrap();
            assert_eq!(got.shape, want.shape, "{file}: {name}");
            let err = got.max_rel_err(want, 1e-3);
            eprintln!("{file}: {name} max rel err {err:.2e}");
            assert!(
                err < tol,
                "{file}: output {name} differs from onnxruntime by {err:.2e}"
            );
        }
    }
}

fn corpus_oracle(file: &str, loss: autopar::LossChoice) {
    let Some(dir) = corpus() else {
        eprintln!("shared/corpus not found: skipped");
        return;
    };
    let path = dir.join(file);
    let opts = LoadOptions {
        loss,
        ..Default::default()
    };
    check_with(path.to_str().unwrap(), &opts, &MESHES, &FAMILIES);
}

#[test]
fn corpus_mlp_matches_single_device() {
    corpus_oracle(
        "mlp_tiny/mlp_tiny.dynamo.full.onnx",
        autopar::LossChoice::Mean { output: "y".into() },
    );
}

#[test]
fn corpus_gpt2_matches_single_device() {
    corpus_oracle(
        "gpt2_tiny/gpt2_tiny.train.ts.full.onnx",
        autopar::LossChoice::Auto,
    );
    corpus_oracle(
        "gpt2_tiny/gpt2_tiny.dynamo.full.onnx",
        autopar::LossChoice::Auto,
    );
}

#[test]
fn corpus_llama_matches_single_device() {
    corpus_oracle(
        "llama_tiny/llama_tiny.train.ts.full.onnx",
        autopar::LossChoice::Auto,
    );
}

/// AdamW on sharded parameter blocks (FSDP, and tensor parallel on 2x2) equals AdamW on one
/// device. eps is large enough that gradients at the rounding-noise floor (e.g. the key bias,
/// whose exact gradient is 0) do not turn into full normalised steps.
#[test]
fn adamw_on_shards_matches_single_device() {
    let adamw = OptimizerConfig::AdamW {
        lr: 1e-2,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-3,
        weight_decay: 0.1,
    };
    let one = run("gpt2", &[1], Family::Auto, adamw);
    for (mesh, family) in [(&[4][..], Family::Fsdp), (&[2, 2][..], Family::Tp)] {
        let many = run("gpt2", mesh, family, adamw);
        let (p, name) = max_rel(&many.params, &one.params);
        assert!(
            p <= 1e-4,
            "{mesh:?} {family:?}: updated {name} off by {p:.2e}"
        );
        let moved = max_rel(&many.params, &run_untrained_params());
        assert!(moved.0 > 1e-3, "AdamW moved the parameters");
    }
}

fn run_untrained_params() -> Vec<NamedTensor> {
    let zero = OptimizerConfig::Sgd {
        lr: 0.0,
        momentum: 0.0,
        weight_decay: 0.0,
    };
    run("gpt2", &[1], Family::Auto, zero).params
}

/// A rank that fails stops every rank with its error, naming the rank and the node: data
/// parallel on 2 ranks, with a token id out of the vocabulary in rank 1's half of the batch.
#[test]
fn a_failing_rank_stops_every_rank() {
    let mut auto = AutoOptions::new(&[2]);
    auto.plan.family = Family::Dp;
    let par = autoparallelize("gpt2", &tiny("gpt2"), &auto).unwrap();
    let mut batch = par.synthetic_batch(0);
    let g = &par.training.graph;
    let ids = g
        .inputs
        .iter()
        .find(|&&v| g.value(v).name == "input_ids")
        .unwrap();
    let t = batch.get_mut(ids).unwrap();
    let last = t.data.len() - 1;
    t.data[last] = 1e6;
    let err = par
        .trainer()
        .unwrap()
        .step(&batch)
        .map(|r| r.loss)
        .expect_err("the step fails")
        .to_string();
    assert!(err.contains("rank 1"), "{err}");
    assert!(err.contains("wte") && err.contains("out of range"), "{err}");
}

/// bf16 mixed precision (bf16 compute, fp32 master weights, f32 normalisations and losses):
/// the sharded bf16 step stays within bf16 accuracy of the fp32 one-device step.
#[test]
fn bf16_mixed_step_is_close_to_fp32() {
    let one = run("gpt2", &[1], Family::Auto, SGD);
    let mut auto = AutoOptions::new(&[2, 2]);
    auto.plan.family = Family::Tp;
    auto.plan.policy = autopar::analyzer::train::DTypePolicy::Bf16Mixed;
    auto.optimizer = SGD;
    auto.seed = 1;
    let par = autoparallelize("gpt2", &tiny("gpt2"), &auto).unwrap();
    assert!(par.program.mixed_bf16);
    let trainer = par.trainer().unwrap();
    let r = trainer.step_with_grads(&par.synthetic_batch(7)).unwrap();
    let loss_err = (r.loss - one.loss).abs() / one.loss.abs();
    assert!(loss_err < 1e-2, "bf16 loss {} vs fp32 {}", r.loss, one.loss);
    let (g, name) = max_rel(&r.grads, &one.grads);
    assert!(g < 0.1, "bf16 gradient of {name} off by {g:.2e}");
    // master weights stay fp32
    let (p, pname) = max_rel(&trainer.params().unwrap(), &one.params);
    assert!(p < 1e-2, "updated {pname} off by {p:.2e}");
}
