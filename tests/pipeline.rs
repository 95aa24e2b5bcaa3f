//! End-to-end checks of the analyzer pipeline through the library API: FLOP counts against
//! Megatron-LM's closed form, the corpus's ONNX exports against the built-in models of the same
//! config, and the loss options.

use autopar::analyzer::train::{DTypePolicy, Optimizer};
use autopar::{inspect, load_model, InspectReport, LoadOptions, LossChoice};
use std::path::PathBuf;

/// ../shared/corpus seen from the project root (found by walking up from this crate).
fn corpus() -> PathBuf {
    let mut dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    loop {
        let c = dir.join("shared/corpus");
        if c.is_dir() {
            return c;
        }
        let c = dir.join("../shared/corpus");
        if c.is_dir() {
            return c;
        }
        assert!(
            dir.pop(),
            "shared/corpus not found above {}",
            env!("CARGO_MANIFEST_DIR")
        );
    }
}

fn builtin(name: &str, sets: &[(&str, &str)]) -> InspectReport {
    let mut opts = LoadOptions::default();
    for (k, v) in sets {
        opts.overrides.set(k, v).expect("override");
    }
    let m = load_model(name, &opts).expect("load built-in");
    inspect(&m, &opts, Optimizer::AdamW, DTypePolicy::Fp32).expect("inspect built-in")
}

fn onnx(rel: &str, loss: LossChoice) -> InspectReport {
    let path = corpus().join(rel);
    let opts = LoadOptions {
        loss,
        ..LoadOptions::default()
    };
    let m = load_model(path.to_str().expect("utf-8 path"), &opts).expect("import");
    inspect(&m, &opts, Optimizer::AdamW, DTypePolicy::Fp32).expect("inspect onnx")
}

fn megatron(b: f64, s: f64, l: f64, h: f64, v: f64) -> f64 {
    72.0 * b * s * l * h * h * (1.0 + s / (6.0 * h) + v / (12.0 * l * h))
}

fn assert_close(what: &str, got: f64, want: f64, rel: f64) {
    let err = (got - want).abs() / want.abs();
    assert!(
        err <= rel,
        "{what}: got {got:.6e}, want {want:.6e} (rel err {err:.4})"
    );
}

#[test]
fn gpt2_matmul_flops_match_megatron() {
    let r = builtin("gpt2", &[("batch", "8"), ("seq", "1024")]);
    assert_eq!(r.params, 124_439_808);
    assert_close(
        "gpt2 matmul FLOPs",
        r.matmul_flops_per_step,
        megatron(8.0, 1024.0, 12.0, 768.0, 50257.0),
        0.005,
    );
}

#[test]
fn gpt2_medium_matmul_flops_match_megatron() {
    let r = builtin("gpt2-medium", &[("batch", "4"), ("seq", "1024")]);
    assert_eq!(r.params, 354_823_168);
    assert_close(
        "gpt2-medium matmul FLOPs",
        r.matmul_flops_per_step,
        megatron(4.0, 1024.0, 24.0, 1024.0, 50257.0),
        0.005,
    );
}

#[test]
fn llama_8b_has_llama3_parameter_count() {
    let m = load_model("llama-8b", &LoadOptions::default()).expect("llama-8b");
    assert_eq!(m.graph.param_count(), 8_030_261_248);
}

#[test]
fn gpt2_export_matches_builtin() {
    let b = builtin("gpt2", &[("batch", "8"), ("seq", "1024")]);
    for file in [
        "gpt2_small/gpt2_small.train.ts.onnx",
        "gpt2_small/gpt2_small.dynamo.onnx",
    ] {
        let o = onnx(file, LossChoice::Auto);
        assert_close(file, o.matmul_flops_per_step, b.matmul_flops_per_step, 0.01);
        if file.contains(".train.ts.") {
            assert_eq!(o.params, b.params, "{file}");
        }
    }
}

#[test]
fn llama_export_matches_builtin_with_the_same_config() {
    let sets = [
        ("batch", "2"),
        ("seq", "2048"),
        ("layers", "16"),
        ("hidden", "2048"),
        ("heads", "16"),
        ("kv_heads", "4"),
        ("ffn", "5632"),
        ("vocab", "32000"),
        ("tie_embeddings", "false"),
    ];
    let b = builtin("llama-1b", &sets);
    assert!(b.profile.per_op_type.contains_key("attention"), "fused");
    // the fused attention's backward recomputes the scores (as flash attention does): one more
    // q k^T matmul per layer than the composed ops, 2 b h l s e FLOPs
    let (batch, heads, seq, head_dim, layers) = (2.0, 16.0, 2048.0, 128.0, 16.0);
    let recompute = 2.0 * batch * heads * seq * seq * head_dim * layers;
    for file in [
        "llama_1b/llama_1b.train.ts.onnx",
        "llama_1b/llama_1b.dynamo.onnx",
    ] {
        let o = onnx(file, LossChoice::Auto);
        // an export whose attention has a run-time mask (training export) stays composed
        let want = if o.profile.per_op_type.contains_key("attention") {
            b.matmul_flops_per_step
        } else {
            b.matmul_flops_per_step - recompute
        };
        assert_close(file, o.matmul_flops_per_step, want, 0.01);
        if file.contains(".train.ts.") {
            assert_eq!(o.params, b.params, "{file}");
        }
    }
}

#[test]
fn resnet_export_matches_builtin() {
    let b = builtin("resnet18", &[("batch", "64")]);
    let ce = || LossChoice::CrossEntropy {
        output: "logits".into(),
    };
    let o = onnx("resnet18/resnet18.train.ts.onnx", ce());
    assert_eq!(o.params, b.params);
    assert_close(
        "resnet18 conv+matmul FLOPs",
        o.matmul_flops_per_step,
        b.matmul_flops_per_step,
        0.01,
    );
    // the eval dynamo export folded BatchNorm into the convolutions: same convolution FLOPs
    let d = onnx("resnet18/resnet18.dynamo.onnx", ce());
    assert_close(
        "resnet18 dynamo",
        d.profile.forward_matmul_flops,
        b.profile.forward_matmul_flops,
        0.01,
    );
}

#[test]
fn models_without_a_loss_need_one_chosen() {
    let path = corpus().join("mlp_tiny/mlp_tiny.dynamo.onnx");
    let opts = LoadOptions::default();
    let m = load_model(path.to_str().expect("utf-8"), &opts).expect("import");
    let e = inspect(&m, &opts, Optimizer::AdamW, DTypePolicy::Fp32)
        .expect_err("no loss")
        .to_string();
    assert!(e.contains("--loss"), "{e}");
    let out = m.graph.value(m.graph.outputs[0]).name.clone();
    let r = onnx(
        "mlp_tiny/mlp_tiny.dynamo.onnx",
        LossChoice::Mean { output: out },
    );
    assert_eq!(r.params, 164_672);
    let e = onnx_err(
        "mlp_tiny/mlp_tiny.dynamo.onnx",
        LossChoice::Mean {
            output: "nope".into(),
        },
    );
    assert!(e.contains("no output named \"nope\""), "{e}");
}

fn onnx_err(rel: &str, loss: LossChoice) -> String {
    let path = corpus().join(rel);
    let opts = LoadOptions {
        loss,
        ..LoadOptions::default()
    };
    let m = load_model(path.to_str().expect("utf-8 path"), &opts).expect("import");
    inspect(&m, &opts, Optimizer::AdamW, DTypePolicy::Fp32)
        .expect_err("error")
        .to_string()
}

#[test]
fn bf16_mixed_policy_changes_memory_not_flops() {
    let mut opts = LoadOptions::default();
    opts.overrides.set("seq", "128").expect("seq");
    opts.overrides.set("batch", "2").expect("batch");
    let m = load_model("gpt2", &opts).expect("gpt2");
    let f = inspect(&m, &opts, Optimizer::AdamW, DTypePolicy::Fp32).expect("fp32");
    let h = inspect(&m, &opts, Optimizer::AdamW, DTypePolicy::Bf16Mixed).expect("bf16");
    assert_eq!(f.flops_per_step, h.flops_per_step);
    assert!(h.activation_bytes < f.activation_bytes);
    // AdamW fp32: 4 (w) + 4 (g) + 8 (m, v) bytes per parameter at least
    assert!(f.peak_memory_bytes >= 16 * f.params);
}
