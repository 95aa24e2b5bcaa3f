//! The `autopar` binary: `inspect` output and its errors.

use std::process::Command;

fn autopar(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_autopar"))
        .args(args)
        .output()
        .expect("run autopar");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn inspect_json_has_the_documented_keys() {
    let (ok, out, err) = autopar(&[
        "inspect", "gpt2", "--batch", "2", "--seq", "128", "--layers", "2", "--json",
    ]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("one JSON object");
    for key in [
        "nodes",
        "params",
        "flops_per_step",
        "activation_bytes",
        "peak_memory_bytes",
    ] {
        assert!(
            v.get(key).and_then(|x| x.as_f64()).is_some_and(|x| x > 0.0),
            "missing {key} in {out}"
        );
    }
}

#[test]
fn inspect_prints_a_table_and_totals() {
    let (ok, out, err) = autopar(&["inspect", "mlp", "--batch", "8", "--dtype", "bf16"]);
    assert!(ok, "{err}");
    for want in [
        "op type",
        "einsum",
        "parameters",
        "41,956,352",
        "training FLOPs/step",
        "estimated peak memory",
    ] {
        assert!(out.contains(want), "missing {want:?} in\n{out}");
    }
}

#[test]
fn user_errors_are_clear() {
    let cases: &[(&[&str], &str)] = &[
        (&["inspect", "gpt3"], "neither a built-in model"),
        (&["inspect", "gpt2", "--heads", "5"], "heads"),
        (
            &["inspect", "gpt2", "--input", "x=2x3"],
            "--input applies to model files",
        ),
        (&["inspect", "missing.onnx"], "missing.onnx"),
        (&["inspect", "gpt2", "--frozen", "("], "--frozen"),
        (&["inspect", "gpt2", "--loss", "bogus"], "bad loss"),
    ];
    for (args, want) in cases {
        let (ok, _out, err) = autopar(args);
        assert!(!ok, "{args:?} should fail");
        assert!(err.contains(want), "{args:?}: expected {want:?} in {err}");
        assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
    }
}

#[test]
fn plan_json_has_the_documented_keys_and_writes_the_plan() {
    let dir = std::env::temp_dir().join(format!("autopar-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let out_file = dir.join("plan.json");
    let out_str = out_file.to_str().expect("utf-8 path");
    let (ok, out, err) = autopar(&[
        "plan", "gpt2", "--batch", "2", "--seq", "128", "--mesh", "2x2", "--json", "-o", out_str,
    ]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("one JSON object");
    for key in [
        "objective_s",
        "lower_bound_s",
        "gap",
        "solve_s",
        "total_s",
        "peak_memory_bytes",
        "nodes",
        "ilp_variables",
    ] {
        assert!(
            v.get(key).and_then(|x| x.as_f64()).is_some(),
            "missing {key} in {out}"
        );
    }
    let plan: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&out_file).expect("plan written"))
            .expect("plan JSON");
    assert_eq!(plan["schema_version"], 1);
    assert!(plan["nodes"].as_array().is_some_and(|n| !n.is_empty()));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn plan_prints_strategies_in_the_usual_notation() {
    let (ok, out, err) = autopar(&["plan", "mlp", "--mesh", "4", "--strategy", "dp"]);
    assert!(ok, "{err}");
    for want in [
        "S0R = S0R x RR",
        "collectives:",
        "predicted step",
        "lower bound",
        "ILP build",
    ] {
        assert!(out.contains(want), "missing {want:?} in\n{out}");
    }
}

#[test]
fn plan_errors_are_clear() {
    let cases: &[(&[&str], &str)] = &[
        (&["plan", "mlp", "--mesh", "2x0"], "at least 1 device"),
        (&["plan", "mlp", "--mesh", "two"], "bad mesh"),
        (&["plan", "mlp", "--mesh", "4", "--cluster", "tpu"], "tpu"),
        (
            &["plan", "mlp", "--mesh", "4", "--memory", "lots"],
            "bad size",
        ),
        (
            &["plan", "mlp", "--mesh", "4", "--strategy", "zero"],
            "unknown strategy",
        ),
        (
            &["plan", "mlp", "--mesh", "4", "--time-limit=0"],
            "--time-limit",
        ),
        (
            &["plan", "mlp", "--mesh", "4", "--memory", "1MiB"],
            "smallest per-device memory",
        ),
    ];
    for (args, want) in cases {
        let (ok, _out, err) = autopar(args);
        assert!(!ok, "{args:?} should fail");
        assert!(err.contains(want), "{args:?}: expected {want:?} in {err}");
        assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
    }
    if !cfg!(feature = "highs") {
        let (ok, _out, err) = autopar(&["plan", "mlp", "--mesh", "4", "--solver", "highs"]);
        assert!(!ok && err.contains("--features highs"), "{err}");
    }
}
