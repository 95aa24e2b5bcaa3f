//! `autopar profile` end to end on the CPU: measure, write a cluster file, plan with it.

mod common;
use common::autopar;

#[test]
fn profile_on_cpu_then_plan_with_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("cluster.json");
    let f = file.to_str().expect("utf-8 path");
    let (ok, out, err) = autopar(&[
        "profile",
        "--device",
        "cpu",
        "--gpus",
        "2",
        "--max-bytes",
        "64KiB",
        "-o",
        f,
    ]);
    assert!(ok, "{err}\n{out}");
    for want in [
        "all-reduce",
        "all-gather",
        "reduce-scatter",
        "all-to-all",
        "matmul bf16",
        "matmul fp32",
        "HBM copy",
        "us per op",
        "measured in",
    ] {
        assert!(out.contains(want), "missing {want:?} in\n{out}");
    }
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&file).expect("written")).expect("json");
    let fits = v["collectives"].as_array().expect("collectives");
    assert_eq!(fits.len(), 4, "{v}");
    for fit in fits {
        assert_eq!(fit["group_size"], 2);
        assert_eq!(fit["bytes_range"], serde_json::json!([1024.0, 65536.0]));
        assert!(fit["bandwidth"].as_f64().is_some_and(|b| b > 0.0), "{fit}");
    }
    assert!(v["op_overhead_s"].as_f64().is_some_and(|s| s > 0.0), "{v}");
    assert_eq!(v["name"], "h100+profile");

    let (ok, out, err) = autopar(&["plan", "mlp", "--mesh", "2", "--cluster", f]);
    assert!(ok, "{err}\n{out}");
    assert!(out.contains("h100+profile"), "{out}");
}

#[test]
fn profile_errors_are_clear() {
    let cases: &[(&[&str], &str)] = &[
        (
            &[
                "profile",
                "--device",
                "cpu",
                "--max-bytes",
                "2KiB",
                "-o",
                "x.json",
            ],
            "--max-bytes 2048",
        ),
        (
            &[
                "profile", "--device", "cpu", "--base", "v100", "-o", "x.json",
            ],
            "--base",
        ),
        (
            &["profile", "--device", "tpu", "-o", "x.json"],
            "expected cpu or cuda",
        ),
        (
            &["profile", "--device", "cpu", "--gpus", "0", "-o", "x.json"],
            "--gpus must be at least 1",
        ),
    ];
    for (args, want) in cases {
        let (ok, out, err) = autopar(args);
        assert!(!ok, "{args:?} succeeded: {out}");
        assert!(err.contains(want), "{args:?}: {err}");
    }
    if !cfg!(feature = "cuda") {
        let (ok, _, err) = autopar(&["profile", "-o", "x.json"]);
        assert!(
            !ok && err.contains("built without the CUDA runtime"),
            "{err}"
        );
    }
}
