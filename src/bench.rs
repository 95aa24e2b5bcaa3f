//! `autopar bench solver`: how fast the planner is and what its choices cost, on the built-in
//! models at real sizes, as a Markdown report with an SVG plot of solve time against graph
//! size. Every number in the report is measured in the run that writes it.

use crate::planner::{Family, PlanOptions};
use crate::{load_model, LoadOptions};
use autopar_analyzer::train::{DTypePolicy, Optimizer};
use autopar_solver::cluster::Cluster;
use autopar_solver::plan::Plan;
use std::fmt::Write;
use std::time::Instant;

/// One benchmark case: a built-in model with overrides on a mesh.
#[derive(Clone, Debug)]
pub struct Case {
    pub model: &'static str,
    pub sets: &'static [(&'static str, &'static str)],
    pub mesh: &'static [usize],
}

/// The default cases: the issue's targets and the sizes around them.
pub const CASES: &[Case] = &[
    Case {
        model: "gpt2",
        sets: &[("batch", "8"), ("seq", "1024")],
        mesh: &[2, 2],
    },
    Case {
        model: "gpt2",
        sets: &[("batch", "8"), ("seq", "1024")],
        mesh: &[2, 4],
    },
    Case {
        model: "gpt2-medium",
        sets: &[("batch", "8"), ("seq", "1024")],
        mesh: &[2, 4],
    },
    Case {
        model: "bert-base",
        sets: &[],
        mesh: &[2, 2],
    },
    Case {
        model: "vit-b16",
        sets: &[],
        mesh: &[4],
    },
    Case {
        model: "resnet50",
        sets: &[],
        mesh: &[8],
    },
    Case {
        model: "llama-1b",
        sets: &[("batch", "8"), ("seq", "2048")],
        mesh: &[2, 4],
    },
    Case {
        model: "llama-8b",
        sets: &[("batch", "8"), ("seq", "2048")],
        mesh: &[2, 4],
    },
    Case {
        model: "llama-8b",
        sets: &[("batch", "8"), ("seq", "2048")],
        mesh: &[2, 2, 2],
    },
    Case {
        model: "llama-8b",
        sets: &[("batch", "8"), ("seq", "2048")],
        mesh: &[8, 8],
    },
];

/// Measured results of one case.
#[derive(Clone, Debug)]
pub struct Row {
    pub case: Case,
    pub graph_nodes: usize,
    pub load_s: f64,
    pub auto: Result<Plan, String>,
    /// End to end: load, training graph, profile, plan.
    pub end_to_end_s: f64,
    pub unshared: Option<Result<Plan, String>>,
    pub families: Vec<(Family, Result<Plan, String>)>,
}

fn mesh_name(m: &[usize]) -> String {
    m.iter()
        .map(|x| x.to_string())
        .collect::<Vec<_>>()
        .join("x")
}

/// Runs one case. `unshared_limit_s`: time limit of the ILP without layer sharing (skipped
/// when `None`, or when the training graph has more than `unshared_max_nodes` nodes: without
/// sharing, building the ILP of the largest models alone takes minutes).
pub fn run_case(
    case: &Case,
    cluster: &Cluster,
    unshared_limit_s: Option<f64>,
    unshared_max_nodes: usize,
) -> Result<Row, crate::Error> {
    let mut opts = LoadOptions::default();
    for (k, v) in case.sets {
        opts.overrides.set(k, v)?;
    }
    let t0 = Instant::now();
    let model = load_model(case.model, &opts)?;
    let tg = crate::build_training(&model, &opts)?;
    let profile = autopar_analyzer::profile::profile(&tg, Optimizer::AdamW, DTypePolicy::Bf16Mixed);
    let load_s = t0.elapsed().as_secs_f64();
    let mut po = PlanOptions::new(case.mesh.to_vec(), cluster.clone());
    po.policy = DTypePolicy::Bf16Mixed;
    let auto = crate::planner::plan(case.model, &tg, &profile, &po).map_err(|e| e.to_string());
    let end_to_end_s = t0.elapsed().as_secs_f64();
    let unshared = unshared_limit_s
        .filter(|_| tg.graph.nodes.len() <= unshared_max_nodes)
        .map(|limit| {
            let mut p = po.clone();
            p.share_layers = false;
            p.time_limit_s = Some(limit);
            crate::planner::plan(case.model, &tg, &profile, &p).map_err(|e| e.to_string())
        });
    let families = [Family::Dp, Family::Tp, Family::Fsdp]
        .into_iter()
        .map(|f| {
            let mut p = po.clone();
            p.family = f;
            (
                f,
                crate::planner::plan(case.model, &tg, &profile, &p).map_err(|e| e.to_string()),
            )
        })
        .collect();
    Ok(Row {
        case: case.clone(),
        graph_nodes: tg.graph.nodes.len(),
        load_s,
        auto,
        end_to_end_s,
        unshared,
        families,
    })
}

fn ms(s: f64) -> String {
    if s < 1.0 {
        format!("{:.1} ms", s * 1e3)
    } else {
        format!("{s:.2} s")
    }
}

/// The Markdown report of `rows` (cluster and command named in the header).
pub fn report(rows: &[Row], cluster: &Cluster, command: &str) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# autopar solver benchmark\n");
    let _ = writeln!(
        s,
        "Command: `{command}`. Cluster preset `{}` ({}), bf16 mixed precision, AdamW.",
        cluster.name, cluster.source
    );
    let _ = writeln!(
        s,
        "Machine: {} logical CPUs. Times are wall-clock seconds of this run; step times are the cost model's predictions.\n",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
    );
    let _ = writeln!(s, "## Planning time and plan quality\n");
    let _ = writeln!(s, "| model | mesh | graph nodes | decisions | strategies | ILP vars | load+profile | strategies | ILP build | solve | end to end | objective | gap |");
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for r in rows {
        match &r.auto {
            Ok(p) => {
                let v = &p.solver;
                let _ = writeln!(
                    s,
                    "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | **{}** | {} | {:.3} % |",
                    r.case.model,
                    mesh_name(r.case.mesh),
                    r.graph_nodes,
                    v.problem_nodes,
                    v.strategies,
                    v.ilp_variables,
                    ms(r.load_s),
                    ms(v.strategies_s),
                    ms(v.build_s),
                    ms(v.solve_s),
                    ms(r.end_to_end_s),
                    ms(p.predicted.step_s),
                    v.gap * 100.0
                );
            }
            Err(e) => {
                let _ = writeln!(
                    s,
                    "| {} | {} | {} | - | - | - | {} | - | - | - | - | failed: {e} | - |",
                    r.case.model,
                    mesh_name(r.case.mesh),
                    r.graph_nodes,
                    ms(r.load_s)
                );
            }
        }
    }
    let _ = writeln!(
        s,
        "\n## Auto against the hand-written plans (predicted step time, peak memory per device)\n"
    );
    let _ = writeln!(s, "| model | mesh | auto | dp | tp | fsdp |");
    let _ = writeln!(s, "|---|---|---|---|---|---|");
    let cell = |p: &Result<Plan, String>| match p {
        Ok(p) => format!(
            "{} / {:.1} GiB",
            ms(p.predicted.step_s),
            p.predicted.peak_memory_bytes / 1024f64.powi(3)
        ),
        Err(e) if e.contains("smallest per-device memory") => "does not fit".to_string(),
        Err(e) => format!("failed: {e}"),
    };
    for r in rows {
        let fam: Vec<String> = r.families.iter().map(|(_, p)| cell(p)).collect();
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} |",
            r.case.model,
            mesh_name(r.case.mesh),
            cell(&r.auto),
            fam.join(" | ")
        );
    }
    if rows.iter().any(|r| r.unshared.is_some()) {
        let _ = writeln!(s, "\n## Sharing decisions between repeated layers\n");
        let _ = writeln!(s, "Same model and mesh, ILP with and without shared layer decisions: the speed-up of sharing and what it costs in objective.\n");
        let _ = writeln!(s, "| model | mesh | shared: decisions / solve | unshared: decisions / solve / status | speed-up | objective shared vs unshared |");
        let _ = writeln!(s, "|---|---|---|---|---|---|");
        for r in rows {
            let (Ok(a), Some(Ok(u))) = (&r.auto, &r.unshared) else {
                continue;
            };
            let t_a = a.solver.strategies_s + a.solver.build_s + a.solver.solve_s;
            let t_u = u.solver.strategies_s + u.solver.build_s + u.solver.solve_s;
            let _ = writeln!(
                s,
                "| {} | {} | {} / {} | {} / {} / {} (gap {:.2} %) | {:.1}x | {:+.3} % |",
                r.case.model,
                mesh_name(r.case.mesh),
                a.solver.problem_nodes,
                ms(t_a),
                u.solver.problem_nodes,
                ms(t_u),
                u.solver.status,
                u.solver.gap * 100.0,
                t_u / t_a.max(1e-9),
                (a.predicted.step_s / u.predicted.step_s - 1.0) * 100.0
            );
        }
    }
    s
}

/// An SVG scatter plot (log-log) of ILP solve time against graph nodes.
pub fn svg(rows: &[Row]) -> String {
    let pts: Vec<(f64, f64, String, bool)> = rows
        .iter()
        .flat_map(|r| {
            let label = format!("{} {}", r.case.model, mesh_name(r.case.mesh));
            let mut v = vec![];
            if let Ok(p) = &r.auto {
                v.push((
                    r.graph_nodes as f64,
                    (p.solver.build_s + p.solver.solve_s).max(1e-4),
                    label.clone(),
                    true,
                ));
            }
            if let Some(Ok(p)) = &r.unshared {
                v.push((
                    r.graph_nodes as f64,
                    (p.solver.build_s + p.solver.solve_s).max(1e-4),
                    label,
                    false,
                ));
            }
            v
        })
        .collect();
    let (w, h, m) = (720.0, 440.0, 60.0);
    let lx = |x: f64| x.log10();
    let (x0, x1) = (lx(100.0), lx(20000.0));
    let (y0, y1) = (-4.0f64, 2.0f64);
    let px = |x: f64| m + (lx(x) - x0) / (x1 - x0) * (w - 2.0 * m);
    let py = |y: f64| h - m - (y.log10() - y0) / (y1 - y0) * (h - 2.0 * m);
    let mut s = String::new();
    plot::begin(
        &mut s,
        w,
        h,
        "ILP build + solve time against training-graph size",
    );
    for e in 2..=4 {
        plot::vgrid(
            &mut s,
            px(10f64.powi(e)),
            m,
            h - m,
            &10u64.pow(e as u32).to_string(),
        );
    }
    for e in -4..=2 {
        plot::hgrid(&mut s, py(10f64.powi(e)), m, w - m, &format!("1e{e} s"));
    }
    plot::text(&mut s, w / 2.0, h - 18.0, "middle", "training-graph nodes");
    for (x, y, label, shared) in &pts {
        let color = if *shared { "#1f77b4" } else { "#d62728" };
        let _ = writeln!(
            s,
            r#"<circle cx="{:.1}" cy="{:.1}" r="4" fill="{color}"><title>{label}: {:.4} s</title></circle>"#,
            px(*x),
            py(*y),
            y
        );
    }
    plot::legend_dot(&mut s, w - 200.0, 40.0, "#1f77b4", "layers shared");
    plot::legend_dot(&mut s, w - 200.0, 58.0, "#d62728", "unshared");
    plot::end(&mut s);
    s
}

/// Small SVG drawing helpers shared by the benchmark plots (`bench solver`, `bench checkpoint`):
/// plain text, no dependency. Coordinates are SVG pixels; text is escaped.
pub mod plot {
    use std::fmt::Write;

    /// `text` with `&`, `<`, `>` and `"` escaped for SVG.
    pub fn escape(text: &str) -> String {
        text.replace('&', "&amp;")
            .replace('<', "&lt;")
            .replace('>', "&gt;")
            .replace('"', "&quot;")
    }

    /// Opens a `w` x `h` SVG document on a white background, `title` centred at the top.
    pub fn begin(s: &mut String, w: f64, h: f64, title: &str) {
        let _ = writeln!(
            s,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="11">"#
        );
        let _ = writeln!(s, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
        let _ = writeln!(
            s,
            r#"<text x="{}" y="20" text-anchor="middle" font-size="14">{}</text>"#,
            w / 2.0,
            escape(title)
        );
    }

    /// Closes the document [`begin`] opened.
    pub fn end(s: &mut String) {
        s.push_str("</svg>\n");
    }

    /// A vertical grid line at `x` from `top` to `bottom`, `label` under it.
    pub fn vgrid(s: &mut String, x: f64, top: f64, bottom: f64, label: &str) {
        let _ = writeln!(
            s,
            r##"<line x1="{x}" y1="{top}" x2="{x}" y2="{bottom}" stroke="#ddd"/><text x="{x}" y="{}" text-anchor="middle">{}</text>"##,
            bottom + 16.0,
            escape(label)
        );
    }

    /// A horizontal grid line at `y` from `left` to `right`, `label` left of it.
    pub fn hgrid(s: &mut String, y: f64, left: f64, right: f64, label: &str) {
        let _ = writeln!(
            s,
            r##"<line x1="{left}" y1="{y}" x2="{right}" y2="{y}" stroke="#ddd"/><text x="{}" y="{}" text-anchor="end">{}</text>"##,
            left - 6.0,
            y + 4.0,
            escape(label)
        );
    }

    /// `label` at (`x`, `y`), anchored `start`, `middle` or `end`.
    pub fn text(s: &mut String, x: f64, y: f64, anchor: &str, label: &str) {
        let _ = writeln!(
            s,
            r#"<text x="{x}" y="{y}" text-anchor="{anchor}">{}</text>"#,
            escape(label)
        );
    }

    /// `label` at (`x`, `y`) turned a quarter left (a y-axis title).
    pub fn vtext(s: &mut String, x: f64, y: f64, label: &str) {
        let _ = writeln!(
            s,
            r#"<text x="{x}" y="{y}" text-anchor="middle" transform="rotate(-90 {x} {y})">{}</text>"#,
            escape(label)
        );
    }

    /// A legend entry: a dot at (`x`, `y`), `label` right of it.
    pub fn legend_dot(s: &mut String, x: f64, y: f64, color: &str, label: &str) {
        let _ = writeln!(
            s,
            r#"<circle cx="{x}" cy="{y}" r="4" fill="{color}"/><text x="{}" y="{}">{}</text>"#,
            x + 10.0,
            y + 4.0,
            escape(label)
        );
    }
}
