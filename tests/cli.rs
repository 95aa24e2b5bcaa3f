//! The `autopar` binary: `inspect` output and its errors.

mod common;
use common::autopar;

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

const TINY_GPT2: [&str; 11] = [
    "gpt2", "--batch", "2", "--seq", "16", "--layers", "2", "--hidden", "64", "--heads", "4",
];

fn tiny_gpt2_with(extra: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = vec!["run".into()];
    v.extend(TINY_GPT2.iter().map(|s| s.to_string()));
    v.extend(["--vocab".into(), "128".into()]);
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

fn autopar_owned(args: &[String]) -> (bool, String, String) {
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    autopar(&refs)
}

#[test]
fn run_trains_and_verifies_against_one_device() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ckpt = dir.path().join("ckpt.safetensors");
    let args = tiny_gpt2_with(&[
        "--mesh",
        "2x2",
        "--steps",
        "3",
        "--verify",
        "--lr",
        "1e-2",
        "--save",
        ckpt.to_str().expect("utf8"),
    ]);
    let (ok, out, err) = autopar_owned(&args);
    assert!(ok, "{out}{err}");
    assert!(out.contains("max_rel_err"), "{out}");
    let losses: Vec<f64> = out
        .lines()
        .filter(|l| l.starts_with("step"))
        .map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            assert!(
                l.contains("tokens/s") && l.contains("measured") && l.contains("predicted"),
                "{l}"
            );
            w[3].parse().expect("loss")
        })
        .collect();
    assert_eq!(losses.len(), 3, "{out}");
    assert!(
        losses[2] < losses[0],
        "the loss falls on a repeated batch: {losses:?}"
    );
    // resume on another mesh: the first loss there is the trained model's
    let args = tiny_gpt2_with(&[
        "--mesh",
        "4",
        "--steps",
        "1",
        "--resume",
        ckpt.to_str().expect("utf8"),
    ]);
    let (ok, out2, err) = autopar_owned(&args);
    assert!(ok, "{out2}{err}");
    let first: f64 = out2
        .lines()
        .find(|l| l.starts_with("step"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|w| w.parse().ok())
        .expect("a step line");
    assert!(
        first < losses[0],
        "resumed from the trained parameters: {first} vs {}",
        losses[0]
    );
}

#[test]
fn run_refuses_a_plan_for_another_mesh_or_model() {
    let dir = tempfile::tempdir().expect("tempdir");
    let plan = dir.path().join("plan.json");
    let mut args = vec!["plan".to_string()];
    args.extend(TINY_GPT2.iter().map(|s| s.to_string()));
    args.extend(
        [
            "--vocab",
            "128",
            "--mesh",
            "2x2",
            "-o",
            plan.to_str().expect("utf8"),
        ]
        .map(String::from),
    );
    let (ok, out, err) = autopar_owned(&args);
    assert!(ok, "{out}{err}");
    let other_mesh = tiny_gpt2_with(&["--mesh", "4", "--plan", plan.to_str().expect("utf8")]);
    let (ok, _, err) = autopar_owned(&other_mesh);
    assert!(!ok);
    assert!(err.contains("the plan is for mesh 2x2, not 4"), "{err}");
    let other_model: Vec<String> = [
        "run",
        "llama-1b",
        "--batch",
        "2",
        "--seq",
        "16",
        "--layers",
        "2",
        "--hidden",
        "64",
        "--heads",
        "4",
        "--kv-heads",
        "2",
        "--ffn",
        "128",
        "--vocab",
        "128",
        "--mesh",
        "2x2",
        "--plan",
        plan.to_str().expect("utf8"),
    ]
    .map(String::from)
    .to_vec();
    let (ok, _, err) = autopar_owned(&other_model);
    assert!(!ok);
    assert!(err.contains("the plan does not match the model"), "{err}");
}

#[test]
fn plan_dump_rank_prints_that_ranks_program() {
    let mut args = vec!["plan".to_string()];
    args.extend(TINY_GPT2.iter().map(|s| s.to_string()));
    args.extend(
        [
            "--vocab",
            "128",
            "--mesh",
            "2x2",
            "--strategy",
            "tp",
            "--dump-rank",
            "2",
        ]
        .map(String::from),
    );
    let (ok, out, err) = autopar_owned(&args);
    assert!(ok, "{err}");
    assert!(
        out.starts_with("program rank 2 of 4 on mesh 2x2 (coordinates [1, 0])"),
        "{out}"
    );
    // rank 2's tensor-parallel partner is rank 3, its data-parallel partner rank 0
    assert!(
        out.contains("group [2, 3]") && out.contains("group [0, 2]"),
        "{out}"
    );
    assert!(out.contains("update "), "{out}");
    args.pop();
    args.push("4".into());
    let (ok, _, err) = autopar_owned(&args);
    assert!(
        !ok && err.contains("--dump-rank 4: mesh 2x2 has ranks 0 to 3"),
        "{err}"
    );
}

#[test]
fn run_names_a_missing_weight_file() {
    let corpus = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/corpus");
    let model = corpus.join("gpt2_tiny/gpt2_tiny.ts.onnx");
    if !model.is_file() {
        eprintln!("corpus not found: skipped");
        return;
    }
    let (ok, _, err) = autopar(&["run", model.to_str().expect("utf8"), "--mesh", "2"]);
    assert!(!ok);
    assert!(err.contains("gpt2_tiny.ts.onnx.data"), "{err}");
}

#[test]
fn run_refuses_a_model_that_does_not_fit() {
    let args = tiny_gpt2_with(&["--mesh", "2", "--memory", "1KiB"]);
    let (ok, _, err) = autopar_owned(&args);
    assert!(!ok);
    assert!(
        err.contains("fits 1.00 KiB per device")
            && err.contains("even with activation checkpointing")
            && err.contains("least memory found"),
        "{err}"
    );
}

#[test]
fn plan_reports_a_checkpoint_schedule() {
    let (ok, out, err) = autopar(&[
        "plan",
        "gpt2",
        "--batch",
        "4",
        "--seq",
        "256",
        "--layers",
        "4",
        "--mesh",
        "2",
        "--checkpoint",
        "chen",
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("checkpointing         chen over"), "{out}");
    let (ok, _, err) = autopar(&["plan", "gpt2", "--mesh", "2", "--checkpoint", "often"]);
    assert!(!ok && err.contains("--checkpoint often"), "{err}");
}

#[test]
fn run_executes_a_checkpoint_schedule() {
    // Chen recomputes whatever the budget; the step equals the one-device plain step
    let args = tiny_gpt2_with(&["--mesh", "2", "--checkpoint", "chen", "--verify"]);
    let (ok, out, err) = autopar_owned(&args);
    assert!(ok, "{out}{err}");
    assert!(out.contains("max_rel_err"), "{out}");
    let (ok, out, err) = autopar(&[
        "plan",
        "gpt2",
        "--batch",
        "2",
        "--seq",
        "16",
        "--layers",
        "2",
        "--hidden",
        "64",
        "--heads",
        "4",
        "--vocab",
        "128",
        "--mesh",
        "2",
        "--checkpoint",
        "chen",
        "--dump-rank",
        "1",
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("recompute stage"), "{out}");
}
