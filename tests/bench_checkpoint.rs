//! `autopar bench checkpoint` end to end on a tiny GPT-2: the Markdown has a row per budget
//! and strategy, the plot has a series per strategy, peaks never exceed budgets, and rotor's
//! relative step time does not increase with the budget.

use std::process::Command;

const TINY: &[&str] = &[
    "gpt2", "--layers", "2", "--hidden", "64", "--heads", "2", "--vocab", "128", "--batch", "2",
    "--seq", "32",
];

/// Bytes of `autopar::format_bytes` text (`1.50 KiB`).
fn bytes(text: &str) -> f64 {
    let (num, unit) = text.trim().split_once(' ').expect("number and unit");
    let mult = match unit {
        "B" => 1.0,
        "KiB" => 1024.0,
        "MiB" => 1024.0f64.powi(2),
        "GiB" => 1024.0f64.powi(3),
        "TiB" => 1024.0f64.powi(4),
        u => panic!("unit {u}"),
    };
    num.parse::<f64>().expect("number") * mult
}

#[test]
fn bench_checkpoint_writes_the_table_and_the_plot() {
    let dir = tempfile::tempdir().expect("temp dir");
    let md_path = dir.path().join("ck.md");
    let out = Command::new(env!("CARGO_BIN_EXE_autopar"))
        .args(["bench", "checkpoint"])
        .args(TINY)
        .arg("-o")
        .arg(&md_path)
        .output()
        .expect("run autopar");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let md = std::fs::read_to_string(&md_path).expect("report");
    let svg = std::fs::read_to_string(dir.path().join("ck.svg")).expect("plot");

    // header: the command and the chain
    assert!(
        md.contains("Command: `autopar bench checkpoint gpt2 --layers 2"),
        "{md}"
    );
    assert!(md.contains("A = "), "{md}");
    assert!(md.contains("stages"), "{md}");
    assert!(md.contains("![relative step time"), "{md}");

    // one row per budget and strategy: | budget | bytes | strategy | fits | peak | peak/budget |
    // relative | step | recomputed | solve |
    let rows: Vec<Vec<String>> = md
        .lines()
        .filter(|l| l.starts_with("| ") && !l.starts_with("| budget (of A)"))
        .map(|l| {
            l.trim_matches('|')
                .split('|')
                .map(|c| c.trim().to_string())
                .collect()
        })
        .collect();
    let mut budgets: Vec<String> = (1..=10).map(|p| format!("{} %", p * 10)).collect();
    budgets.push("least peak".into());
    for b in &budgets {
        for s in ["rotor", "chen", "none"] {
            let n = rows
                .iter()
                .filter(|r| r[2] == s && (r[0] == *b || (b == "least peak" && r[0].starts_with(b))))
                .count();
            assert_eq!(n, 1, "budget {b}, strategy {s}:\n{md}");
        }
    }
    assert_eq!(rows.len(), 33, "{md}");

    // peaks never exceed budgets; rotor's relative time does not increase with the budget
    // (rows are by increasing budget); none fits at 100 % only... and at the budgets above
    // its peak, which is A
    let mut last_rotor = f64::INFINITY;
    let mut last_budget = 0.0;
    for r in &rows {
        let budget = bytes(&r[1]);
        if r[2] == "rotor" {
            assert!(budget >= last_budget, "rows sorted by budget:\n{md}");
            last_budget = budget;
        }
        if r[3] != "yes" {
            assert!(
                r[3] == "- (below minimum)" || r[3] == "- (over budget)",
                "reason class: {r:?}"
            );
            continue;
        }
        let ratio: f64 = r[5].trim_end_matches(" %").parse().expect("peak / budget");
        assert!(ratio <= 100.0 + 1e-9, "peak above budget: {r:?}");
        let rel: f64 = r[6].parse().expect("relative time");
        assert!(rel >= 1.0 - 1e-9, "{r:?}");
        if r[2] == "rotor" {
            assert!(
                rel <= last_rotor + 1e-9,
                "rotor slower with more memory: {r:?}\n{md}"
            );
            last_rotor = rel;
        }
        if r[2] == "none" {
            assert!((rel - 1.0).abs() < 1e-9, "{r:?}");
        }
    }
    let at = |b: &str, s: &str| {
        rows.iter()
            .find(|r| r[0] == b && r[2] == s)
            .unwrap_or_else(|| panic!("{b} {s}"))
    };
    assert_eq!(at("100 %", "none")[3], "yes", "none fits A");
    assert_eq!(at("100 %", "rotor")[6], "1.000", "rotor is none at A");
    assert_eq!(at("90 %", "none")[3], "- (over budget)");
    let least = rows
        .iter()
        .find(|r| r[0].starts_with("least peak") && r[2] == "rotor")
        .expect("least peak row");
    assert_eq!(least[3], "yes", "rotor fits the least peak: {least:?}");
    assert!(
        rows.iter()
            .any(|r| r[2] == "rotor" && r[3] == "yes" && r[8] != "0"),
        "some budget makes rotor recompute:\n{md}"
    );

    // the plot: an SVG with a line per strategy in each panel
    assert!(svg.starts_with("<svg "), "{svg}");
    assert!(svg.trim_end().ends_with("</svg>"));
    for s in ["rotor", "chen", "none"] {
        assert_eq!(
            svg.matches(&format!("<polyline class=\"{s}\"")).count(),
            2,
            "{s}: one series per panel"
        );
        assert!(
            svg.contains(&format!("<circle class=\"{s}\"")),
            "{s} points"
        );
    }
    assert_eq!(
        svg.matches('<').count(),
        svg.matches('>').count(),
        "balanced tags"
    );
}

#[test]
fn bench_checkpoint_prints_markdown_and_names_bad_options() {
    let out = Command::new(env!("CARGO_BIN_EXE_autopar"))
        .args(["bench", "checkpoint"])
        .args(TINY)
        .args(["--slots", "50"])
        .output()
        .expect("run autopar");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let md = String::from_utf8_lossy(&out.stdout);
    assert!(md.starts_with("# Activation checkpointing on gpt2"), "{md}");
    assert!(md.contains("rotor with 50 memory slots"), "{md}");
    assert!(!md.contains("!["), "no plot without -o");

    let out = Command::new(env!("CARGO_BIN_EXE_autopar"))
        .args(["bench", "checkpoint"])
        .args(TINY)
        .args(["--slots", "0"])
        .output()
        .expect("run autopar");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--slots"), "{err}");
}

/// The sweep on a hand-made chain: rows sorted by budget with the least peak among them, every
/// fitting peak within its budget, rotor never slower with more memory, the reason classes.
#[test]
fn sweep_of_a_chain() {
    use autopar::bench_checkpoint::{sweep, Budget, Miss, STRATEGIES};
    use autopar::solver::checkpoint::{Chain, Strategy, DEFAULT_SLOTS};
    let n = 9;
    let chain = Chain::new(
        (0..n).map(|i| 1.0 + (i % 3) as f64).collect(),
        (0..n).map(|i| 2.0 + (i % 2) as f64).collect(),
        (0..n).map(|i| 100 + 10 * (i as u64 % 4)).collect(),
        (0..n).map(|i| 300 + 50 * (i as u64 % 3)).collect(),
        vec![0; n],
        vec![0; n],
        100,
    )
    .expect("chain");
    let s = sweep(&chain, DEFAULT_SLOTS).expect("sweep");
    assert_eq!(s.stages, n);
    assert_eq!(s.rows.len(), 11);
    assert!(s.least_peak_bytes < s.chen_peak_bytes && s.chen_peak_bytes < s.keep_all_bytes);
    assert!(s
        .rows
        .windows(2)
        .all(|w| w[0].budget_bytes <= w[1].budget_bytes));
    let least = s
        .rows
        .iter()
        .find(|r| r.budget == Budget::LeastPeak)
        .expect("least-peak row");
    assert_eq!(least.budget_bytes, s.least_peak_bytes);
    let mut last = f64::INFINITY;
    for r in &s.rows {
        assert_eq!(r.outcomes.len(), STRATEGIES.len());
        for o in &r.outcomes {
            match &o.result {
                Ok(f) => {
                    assert!(
                        f.peak_bytes <= r.budget_bytes,
                        "{o:?} under {}",
                        r.budget_bytes
                    );
                    if o.strategy == Strategy::Rotor {
                        assert!(f.time_s <= last + 1e-12, "rotor monotone");
                        last = f.time_s;
                    }
                }
                Err(Miss::BelowMinimum { minimum_bytes }) => {
                    assert_eq!(o.strategy, Strategy::Rotor);
                    assert_eq!(*minimum_bytes, s.least_peak_bytes);
                    assert!(r.budget_bytes < s.least_peak_bytes);
                }
                Err(Miss::OverBudget { peak_bytes }) => {
                    assert!(*peak_bytes > r.budget_bytes);
                    assert_ne!(o.strategy, Strategy::Rotor);
                }
                Err(Miss::Failed(m)) => panic!("{m}"),
            }
        }
    }
    let full = s.rows.last().expect("100 %");
    assert_eq!(full.budget, Budget::Percent(100));
    assert!(full.outcomes.iter().all(|o| o.result.is_ok()), "all fit A");
    assert_eq!(last, s.keep_all_time_s, "rotor is none at A");
    assert!(sweep(&chain, 0).is_err(), "zero slots");
}
