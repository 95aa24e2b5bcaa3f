//! TorchScript archives load wherever model files do (`load_model`), and the TorchScript and
//! ONNX exports of the same corpus model (eval mode both, the same parameters) give the same
//! parameter count, the same FLOPs within 1 % and plans whose predicted steps agree within 1 %
//! (the ONNX importer rewrites the exporters' decompositions into the TorchScript form; see
//! `compare`).

use autopar::analyzer::train::{DTypePolicy, Optimizer};
use autopar::planner::PlanOptions;
use autopar::solver::cluster::Cluster;
use autopar::{inspect, load_model, plan_model, LoadOptions, LossChoice, ModelSource};
use std::path::{Path, PathBuf};

fn corpus() -> Option<PathBuf> {
    autopar::analyzer::reference::find_corpus(Path::new(env!("CARGO_MANIFEST_DIR")))
}

struct Side {
    params: usize,
    flops: f64,
    step_s: f64,
}

/// Loads `rel`, profiles a training step and plans it on `mesh`.
fn measure(dir: &Path, rel: &str, loss: LossChoice, mesh: &[usize]) -> Side {
    let path = dir.join(rel);
    let opts = LoadOptions {
        loss,
        ..LoadOptions::default()
    };
    let m = load_model(path.to_str().expect("utf-8 path"), &opts)
        .unwrap_or_else(|e| panic!("{rel}: {e}"));
    let r = inspect(&m, &opts, Optimizer::AdamW, DTypePolicy::Fp32)
        .unwrap_or_else(|e| panic!("{rel}: {e}"));
    let po = PlanOptions::new(mesh.to_vec(), Cluster::preset("h100").expect("preset"));
    let p = plan_model(&m, &opts, &po).unwrap_or_else(|e| panic!("{rel}: {e}"));
    Side {
        params: r.params,
        flops: r.flops_per_step,
        step_s: p.predicted.step_s,
    }
}

fn compare(jit: &str, onnx: &str, loss: (LossChoice, LossChoice), mesh: &[usize]) {
    let Some(dir) = corpus() else {
        eprintln!("shared/corpus not found: skipped");
        return;
    };
    if !dir.join(jit).is_file() || !dir.join(onnx).is_file() {
        eprintln!("{jit} or {onnx} not in the corpus: skipped");
        return;
    }
    let a = measure(&dir, jit, loss.0, mesh);
    let b = measure(&dir, onnx, loss.1, mesh);
    eprintln!(
        "{jit} vs {onnx} on {mesh:?}: params {} / {}, FLOPs {:.4e} / {:.4e}, step {:.4e} s / {:.4e} s",
        a.params, b.params, a.flops, b.flops, a.step_s, b.step_s
    );
    assert_eq!(a.params, b.params, "{jit} vs {onnx}: parameters");
    let rel = |x: f64, y: f64| (x - y).abs() / x.abs().max(y.abs()).max(f64::MIN_POSITIVE);
    assert!(
        rel(a.flops, b.flops) <= 0.01,
        "{jit} vs {onnx}: FLOPs {:.6e} vs {:.6e}",
        a.flops,
        b.flops
    );
    // The ONNX exporters spell out GELU, SiLU and rsqrt, write attention with a materialised
    // K^T, split scale factors and an additive mask (analyzer/src/onnx/patterns.rs rewrites all
    // of those into the TorchScript form). What is left: a NaN guard after softmax where a -inf
    // mask comes from run-time data (llama_tiny.ts.onnx: the guard is not a no-op there, so it
    // stays; 0.7 %), and a second reshape the TorchScript graph keeps before c_proj (gpt2: the
    // ONNX plan 0.2-0.4 % faster). So neither side is always the cheaper: 1 % both ways.
    assert!(
        rel(a.step_s, b.step_s) <= 0.01,
        "{jit} vs {onnx}: predicted step {:.6e} s vs {:.6e} s",
        a.step_s,
        b.step_s
    );
}

#[test]
fn mlp_tiny_torchscript_matches_onnx() {
    for onnx in ["mlp_tiny/mlp_tiny.ts.onnx", "mlp_tiny/mlp_tiny.dynamo.onnx"] {
        compare(
            "mlp_tiny/mlp_tiny.jit.pt",
            onnx,
            (
                LossChoice::Mean {
                    output: "output0".into(),
                },
                LossChoice::Mean { output: "y".into() },
            ),
            &[4],
        );
    }
}

#[test]
fn gpt2_tiny_torchscript_matches_onnx() {
    compare(
        "gpt2_tiny/gpt2_tiny.jit.pt",
        "gpt2_tiny/gpt2_tiny.dynamo.onnx",
        (LossChoice::Auto, LossChoice::Auto),
        &[2, 2],
    );
}

#[test]
fn llama_tiny_torchscript_matches_onnx() {
    compare(
        "llama_tiny/llama_tiny.jit.pt",
        "llama_tiny/llama_tiny.ts.onnx",
        (LossChoice::Auto, LossChoice::Auto),
        &[4],
    );
}

#[test]
fn gpt2_small_torchscript_matches_onnx() {
    compare(
        "gpt2_small/gpt2_small.jit.pt",
        "gpt2_small/gpt2_small.dynamo.onnx",
        (LossChoice::Auto, LossChoice::Auto),
        &[2, 4],
    );
}

#[test]
fn torchscript_files_load_as_models() {
    let Some(dir) = corpus() else {
        eprintln!("shared/corpus not found: skipped");
        return;
    };
    let path = dir.join("gpt2_tiny/gpt2_tiny.jit.pt");
    if !path.is_file() {
        eprintln!("gpt2_tiny.jit.pt not in the corpus: skipped");
        return;
    }
    let m = load_model(path.to_str().expect("utf-8"), &LoadOptions::default()).expect("loads");
    assert_eq!(m.source, ModelSource::TorchScript);
    assert!(m.loss.is_some());
    let outs: Vec<&str> = m
        .graph
        .outputs
        .iter()
        .map(|&v| m.graph.value(v).name.as_str())
        .collect();
    assert_eq!(outs, ["loss", "logits"]);
    // --loss ce:logits picks the named output
    let opts = LoadOptions {
        loss: LossChoice::CrossEntropy {
            output: "logits".into(),
        },
        ..LoadOptions::default()
    };
    let r = inspect(&m, &opts, Optimizer::AdamW, DTypePolicy::Fp32).expect("inspect");
    assert_eq!(r.params, 655_872);
}
