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
