//! `autopar bench checkpoint MODEL`: what activation checkpointing frees and what it costs on
//! one model under its sharding plan, as a Markdown table and an SVG plot.
//!
//! Why a benchmark apart from the solver tests: those check that each schedule is valid and
//! that Rotor's is optimal on small chains; they say nothing about the trade-off on a real
//! training step, which is what a user choosing `--checkpoint` (or a budget) needs to see: how
//! far below the keep-everything peak each strategy goes, how much recomputation it pays for
//! that, where Chen's fixed sqrt(n) schedule stands against Rotor's optimum at each budget, and
//! how long the solvers take at real chain sizes. Every number in the report is computed in
//! the run that writes it.
//!
//! # The sweep
//! The model is planned as `autopar plan --checkpoint none` plans it (the sharding ILP with
//! every activation kept, the body of [`crate::plan_model`]); the chain of the plan's rank
//! program comes from [`crate::checkpointing::chain_of`]. `A`, the activation peak with every
//! activation kept, is [`checkpoint::simulate`] of [`checkpoint::none`]. Each strategy is
//! solved under budgets of 10 %, 20 %, ..., 100 % of `A`, and under the least peak any schedule
//! reaches ([`checkpoint::min_peak_bytes`], its own row), and each schedule is replayed by the
//! simulator: the peaks and times in the report are the simulator's, the same numbers
//! `autopar plan --checkpoint` records.
//!
//! Times: the chain's time is the compute (and collective) time of the rank program's stages,
//! so the relative step time (a schedule's chain time over none's) is the recomputation
//! overhead; the absolute predicted step adds the recomputed seconds to the plan's predicted
//! step, as the plan does.

use crate::bench::plot;
use crate::planner::PlanOptions;
use crate::{format_bytes, Error, LoadOptions};
use autopar_analyzer::train::DTypePolicy;
use autopar_solver::checkpoint::{self, Chain, CheckpointError, Strategy};
use std::fmt::Write;
use std::time::Instant;

/// The strategies compared, in report order.
pub const STRATEGIES: [Strategy; 3] = [Strategy::Rotor, Strategy::Chen, Strategy::None];

/// The budgets, in percent of the keep-everything activation peak.
pub const PERCENTS: [u32; 10] = [10, 20, 30, 40, 50, 60, 70, 80, 90, 100];

/// Which budget a row is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Budget {
    /// This percentage of the keep-everything activation peak.
    Percent(u32),
    /// The least peak any schedule reaches.
    LeastPeak,
}

/// A schedule that fits its budget, as the simulator replays it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Fit {
    pub peak_bytes: u64,
    /// The chain's time with this schedule, seconds.
    pub time_s: f64,
    /// Stage forwards run more than once (forward ops beyond one per stage).
    pub recomputed: usize,
}

/// Why a strategy has no schedule under a budget.
#[derive(Clone, Debug, PartialEq)]
pub enum Miss {
    /// The budget is below the least peak any schedule reaches (rotor says so).
    BelowMinimum { minimum_bytes: u64 },
    /// The strategy's schedule peaks above the budget (chen, none).
    OverBudget { peak_bytes: u64 },
    /// Any other solver error, as its message.
    Failed(String),
}

impl Miss {
    /// The reason class printed in the report.
    pub fn class(&self) -> &'static str {
        match self {
            Miss::BelowMinimum { .. } => "below minimum",
            Miss::OverBudget { .. } => "over budget",
            Miss::Failed(_) => "failed",
        }
    }
}

/// One strategy under one budget.
#[derive(Clone, Debug, PartialEq)]
pub struct Outcome {
    pub strategy: Strategy,
    /// Wall-clock seconds of the strategy's solver.
    pub solve_s: f64,
    pub result: Result<Fit, Miss>,
}

/// Every strategy under one budget.
#[derive(Clone, Debug, PartialEq)]
pub struct BudgetRow {
    pub budget: Budget,
    pub budget_bytes: u64,
    /// In [`STRATEGIES`] order.
    pub outcomes: Vec<Outcome>,
}

/// The budget sweep of one chain.
#[derive(Clone, Debug, PartialEq)]
pub struct Sweep {
    pub stages: usize,
    /// `A`: the activation peak with every activation kept.
    pub keep_all_bytes: u64,
    /// The chain's time with every activation kept, seconds.
    pub keep_all_time_s: f64,
    /// The least peak any schedule reaches.
    pub least_peak_bytes: u64,
    /// Chen's peak (the same under every budget).
    pub chen_peak_bytes: u64,
    /// Memory slots of Rotor's DP.
    pub slots: usize,
    /// By increasing budget.
    pub rows: Vec<BudgetRow>,
}

impl Sweep {
    /// `bytes` in percent of `A`.
    pub fn percent_of_a(&self, bytes: u64) -> f64 {
        bytes as f64 / (self.keep_all_bytes.max(1)) as f64 * 100.0
    }
}

fn solver_error(e: CheckpointError) -> Error {
    Error::Usage(format!("checkpointing: {e}"))
}

/// Solves `chain` with every strategy under every budget (module doc); `slots` is Rotor's
/// memory discretization ([`checkpoint::DEFAULT_SLOTS`] is the planner's).
pub fn sweep(chain: &Chain, slots: usize) -> Result<Sweep, Error> {
    if slots == 0 {
        return Err(Error::Usage(
            "--slots must be at least 1 (rotor's memory discretization)".into(),
        ));
    }
    let keep_all = checkpoint::simulate(chain, &checkpoint::none(chain).map_err(solver_error)?)
        .map_err(solver_error)?;
    let least = checkpoint::min_peak_bytes(chain).map_err(solver_error)?;
    let chen_peak = checkpoint::simulate(
        chain,
        &checkpoint::chen(chain, u64::MAX).map_err(solver_error)?,
    )
    .map_err(solver_error)?
    .peak_bytes;
    let a = keep_all.peak_bytes;
    let mut budgets: Vec<(Budget, u64)> = PERCENTS
        .iter()
        .map(|&p| {
            let b = u128::from(a) * u128::from(p) / 100;
            (Budget::Percent(p), u64::try_from(b).unwrap_or(u64::MAX))
        })
        .collect();
    budgets.push((Budget::LeastPeak, least));
    budgets.sort_by_key(|&(_, b)| b);
    let n = chain.len();
    let rows = budgets
        .into_iter()
        .map(|(budget, budget_bytes)| {
            let outcomes = STRATEGIES
                .iter()
                .map(|&strategy| {
                    let t = Instant::now();
                    let solved = strategy.solve(chain, budget_bytes, slots);
                    let solve_s = t.elapsed().as_secs_f64();
                    let result = match solved {
                        Ok(s) => match checkpoint::simulate(chain, &s) {
                            Ok(sim) if sim.peak_bytes <= budget_bytes => Ok(Fit {
                                peak_bytes: sim.peak_bytes,
                                time_s: sim.time_s,
                                recomputed: s.forward_count().saturating_sub(n),
                            }),
                            Ok(sim) => Err(Miss::Failed(format!(
                                "{strategy} returned a schedule peaking at {} bytes, above the budget of {budget_bytes}",
                                sim.peak_bytes
                            ))),
                            Err(e) => Err(Miss::Failed(e.to_string())),
                        },
                        Err(CheckpointError::BudgetTooSmall { minimum_bytes, .. }) => {
                            Err(Miss::BelowMinimum { minimum_bytes })
                        }
                        Err(CheckpointError::OverBudget { peak_bytes, .. }) => {
                            Err(Miss::OverBudget { peak_bytes })
                        }
                        Err(e) => Err(Miss::Failed(e.to_string())),
                    };
                    Outcome {
                        strategy,
                        solve_s,
                        result,
                    }
                })
                .collect();
            BudgetRow {
                budget,
                budget_bytes,
                outcomes,
            }
        })
        .collect();
    Ok(Sweep {
        stages: n,
        keep_all_bytes: a,
        keep_all_time_s: keep_all.time_s,
        least_peak_bytes: least,
        chen_peak_bytes: chen_peak,
        slots,
        rows,
    })
}

/// What `autopar bench checkpoint` measured.
#[derive(Clone, Debug)]
pub struct Report {
    pub model: String,
    pub mesh: String,
    pub cluster: String,
    pub cluster_source: String,
    pub policy: DTypePolicy,
    pub graph_nodes: usize,
    /// The sharding plan's predicted step with every activation kept, seconds.
    pub plan_step_s: f64,
    /// Wall-clock seconds: model and training graph with its profile; the sharding plan; the
    /// chain; the whole sweep.
    pub load_s: f64,
    pub plan_s: f64,
    pub chain_s: f64,
    pub sweep_s: f64,
    pub sweep: Sweep,
}

impl Report {
    /// The predicted step of `fit`: the plan's step plus what the schedule recomputes.
    pub fn predicted_step_s(&self, fit: &Fit) -> f64 {
        self.plan_step_s + (fit.time_s - self.sweep.keep_all_time_s).max(0.0)
    }

    /// `fit`'s chain time over none's.
    pub fn relative_time(&self, fit: &Fit) -> f64 {
        if self.sweep.keep_all_time_s > 0.0 {
            fit.time_s / self.sweep.keep_all_time_s
        } else {
            1.0
        }
    }
}

/// Loads `model`, plans it on `po`'s mesh with every activation kept, and sweeps the budgets
/// (module doc). `po.checkpoint` is overridden (none); its memory budget, if any, is kept.
pub fn run(
    model: &str,
    load: &LoadOptions,
    po: &PlanOptions,
    slots: usize,
) -> Result<Report, Error> {
    let t0 = Instant::now();
    let loaded = crate::load_model(model, load)?;
    let tg = crate::build_training(&loaded, load)?;
    let profile = autopar_analyzer::profile::profile(&tg, po.optimizer, po.policy);
    let load_s = t0.elapsed().as_secs_f64();
    let mut po = po.clone();
    po.checkpoint = Some(Strategy::None);
    let t = Instant::now();
    let plan = crate::checkpointing::plan_with_checkpointing(&loaded.name, &tg, &profile, &po)
        .map_err(|e| match e {
            Error::NoFit { message, .. } => Error::Usage(format!(
                "{message}; the benchmark plans with every activation kept: use a larger --mesh or --memory"
            )),
            e => e,
        })?;
    let plan_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let (chain, _) = crate::checkpointing::chain_of(&tg, &plan)?;
    let chain_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let sweep = sweep(&chain, slots)?;
    let sweep_s = t.elapsed().as_secs_f64();
    Ok(Report {
        model: loaded.name,
        mesh: plan.mesh.name(),
        cluster: plan.cluster.name.clone(),
        cluster_source: plan.cluster.source.clone(),
        policy: po.policy,
        graph_nodes: tg.graph.nodes.len(),
        plan_step_s: plan.predicted.step_s,
        load_s,
        plan_s,
        chain_s,
        sweep_s,
        sweep,
    })
}

fn ms(s: f64) -> String {
    if s < 1e-3 {
        format!("{:.1} µs", s * 1e6)
    } else if s < 1.0 {
        format!("{:.1} ms", s * 1e3)
    } else {
        format!("{s:.2} s")
    }
}

fn budget_label(s: &Sweep, r: &BudgetRow) -> String {
    match r.budget {
        Budget::Percent(p) => format!("{p} %"),
        Budget::LeastPeak => format!("least peak ({:.1} %)", s.percent_of_a(r.budget_bytes)),
    }
}

/// The Markdown report: header (the command, the model, the plan, the chain), the table, how to
/// read it, and the plot when `svg` names it (a path relative to the report).
pub fn markdown(r: &Report, command: &str, svg: Option<&str>) -> String {
    let s = &r.sweep;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# Activation checkpointing on {}: rotor, chen and none\n",
        r.model
    );
    let _ = writeln!(out, "Command: `{command}`\n");
    let dtype = match r.policy {
        DTypePolicy::Fp32 => "fp32",
        DTypePolicy::Bf16Mixed => "bf16 mixed precision",
    };
    let _ = writeln!(
        out,
        "- Model `{}`: {} training-graph nodes, {dtype}; mesh {}, cluster preset `{}` ({}).",
        r.model, r.graph_nodes, r.mesh, r.cluster, r.cluster_source
    );
    let _ = writeln!(
        out,
        "- Sharding plan with every activation kept: predicted step **{}**.",
        ms(r.plan_step_s)
    );
    let _ = writeln!(
        out,
        "- Chain: {} stages (the rank program cut where one activation crosses); its time with every activation kept, as the chain prices the stages (compute and collectives of the program): {}.",
        s.stages,
        ms(s.keep_all_time_s)
    );
    let _ = writeln!(
        out,
        "- Activation peak per device with every activation kept, **A = {}**; the least peak any schedule reaches: **{}** ({:.1} % of A); chen's peak: {} ({:.1} % of A).",
        format_bytes(s.keep_all_bytes as f64),
        format_bytes(s.least_peak_bytes as f64),
        s.percent_of_a(s.least_peak_bytes),
        format_bytes(s.chen_peak_bytes as f64),
        s.percent_of_a(s.chen_peak_bytes)
    );
    let _ = writeln!(
        out,
        "- Run times ({} logical CPUs): model, training graph and profile {}, sharding plan {}, chain {}, sweep ({} solves, rotor with {} memory slots) {}.\n",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        ms(r.load_s),
        ms(r.plan_s),
        ms(r.chain_s),
        s.rows.len() * STRATEGIES.len(),
        s.slots,
        ms(r.sweep_s)
    );
    let _ = writeln!(out, "| budget (of A) | budget | strategy | fits | predicted peak | peak / budget | relative step time | predicted step | recomputed forwards | solve time |");
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|---|");
    for row in &s.rows {
        let label = budget_label(s, row);
        for o in &row.outcomes {
            let cells = match &o.result {
                Ok(f) => format!(
                    "yes | {} | {:.1} % | {:.3} | {} | {} |",
                    format_bytes(f.peak_bytes as f64),
                    f.peak_bytes as f64 / row.budget_bytes.max(1) as f64 * 100.0,
                    r.relative_time(f),
                    ms(r.predicted_step_s(f)),
                    f.recomputed
                ),
                Err(m) => format!("- ({}) | - | - | - | - | - |", m.class()),
            };
            let _ = writeln!(
                out,
                "| {label} | {} | {} | {cells} {} |",
                format_bytes(row.budget_bytes as f64),
                o.strategy,
                ms(o.solve_s)
            );
        }
    }
    let failures: Vec<String> = s
        .rows
        .iter()
        .flat_map(|row| {
            row.outcomes.iter().filter_map(move |o| match &o.result {
                Err(Miss::Failed(m)) => Some(format!(
                    "- {} under {}: {m}",
                    o.strategy,
                    format_bytes(row.budget_bytes as f64)
                )),
                _ => None,
            })
        })
        .collect();
    if !failures.is_empty() {
        let _ = writeln!(out, "\nSolver failures:\n\n{}", failures.join("\n"));
    }
    let _ = writeln!(
        out,
        "\n**How to read.** Each budget is the memory per device left for activations, as a \
         fraction of A. *Predicted peak* is the simulator's replay of the strategy's schedule \
         (never above the budget when it fits). *Relative step time* is the chain's time with \
         the schedule over its time with every activation kept: the chain's compute (and \
         collective) time, so it is the recomputation overhead alone; *predicted step* adds the \
         recomputed seconds to the plan's predicted step, as `autopar plan --checkpoint` does. \
         *Recomputed forwards* counts stage forwards run a second time or more. \
         \"below minimum\": no schedule of this chain fits (rotor proves it); \"over budget\": the \
         strategy's own schedule peaks above the budget (chen's schedule does not depend on the \
         budget, none keeps everything). Rotor is optimal among persistent schedules up to its \
         memory discretization, so its time never increases with the budget and equals none's \
         once none fits; chen pays about one extra forward per stage wherever it fits."
    );
    if let Some(svg) = svg {
        let _ = writeln!(
            out,
            "\n![relative step time and peak against the budget, {}]({svg})",
            r.model
        );
    }
    out
}

/// Series colors, in [`STRATEGIES`] order.
const COLORS: [&str; 3] = ["#1f77b4", "#ff7f0e", "#2ca02c"];

/// A tick step for `span` giving at most about 6 ticks.
fn tick_step(span: f64) -> f64 {
    [0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0]
        .into_iter()
        .find(|&st| span / st <= 6.0)
        .unwrap_or(10.0)
}

fn r1(v: f64) -> f64 {
    (v * 10.0).round() / 10.0
}

/// One fitting schedule in the plot.
struct Point {
    /// The budget, in percent of A.
    budget_pct: f64,
    relative: f64,
    /// The peak, in percent of A.
    peak_pct: f64,
    /// Hover text.
    tip: String,
    /// The least-peak row (may sit off the time axis).
    least: bool,
}

/// The SVG plot: left, relative step time against the budget (one line per strategy; none is
/// the point at 100 %); right, predicted peak against the budget, with the line peak = budget.
pub fn svg(r: &Report) -> String {
    let s = &r.sweep;
    let (w, h) = (960.0, 460.0);
    let (top, bottom) = (80.0, h - 60.0);
    let panels = [(70.0, 450.0), (560.0, 940.0)];
    let px = |panel: usize, pct: f64| {
        let (l, rt) = panels[panel];
        r1(l + pct.clamp(0.0, 100.0) / 100.0 * (rt - l))
    };
    let series: Vec<Vec<Point>> = STRATEGIES
        .iter()
        .enumerate()
        .map(|(k, strategy)| {
            s.rows
                .iter()
                .filter_map(|row| match &row.outcomes.get(k)?.result {
                    Ok(f) => Some(Point {
                        budget_pct: s.percent_of_a(row.budget_bytes),
                        relative: r.relative_time(f),
                        peak_pct: s.percent_of_a(f.peak_bytes),
                        tip: format!(
                            "{strategy}, budget {}: peak {}, relative step time {:.3}",
                            format_bytes(row.budget_bytes as f64),
                            format_bytes(f.peak_bytes as f64),
                            r.relative_time(f)
                        ),
                        least: row.budget == Budget::LeastPeak,
                    }),
                    Err(_) => None,
                })
                .collect()
        })
        .collect();
    // the time axis fits the percentage budgets; at the least peak rotor can recompute a lot
    // more: such a point sits on the top edge, labelled with its value
    let ymax_raw = series
        .iter()
        .flatten()
        .filter(|p| !p.least)
        .map(|p| p.relative)
        .fold(1.0f64, f64::max)
        .max(1.02);
    let step = tick_step(ymax_raw - 1.0);
    let ymax = 1.0 + ((ymax_raw - 1.0) / step).ceil() * step;
    let py_time = |t: f64| r1(bottom - (t.min(ymax) - 1.0) / (ymax - 1.0) * (bottom - top));
    let py_peak = |pct: f64| r1(bottom - pct.clamp(0.0, 100.0) / 100.0 * (bottom - top));
    let mut out = String::new();
    plot::begin(
        &mut out,
        w,
        h,
        &format!(
            "{}: activation checkpointing under a budget (mesh {}, A = {}, {} stages)",
            r.model,
            r.mesh,
            format_bytes(s.keep_all_bytes as f64),
            s.stages
        ),
    );
    let decimals = if step < 0.1 { 2 } else { 1 };
    for (panel, &(l, rt)) in panels.iter().enumerate() {
        for p in (0..=100).step_by(10) {
            plot::vgrid(
                &mut out,
                px(panel, p as f64),
                top,
                bottom,
                &format!("{p} %"),
            );
        }
        if panel == 0 {
            let ticks = ((ymax - 1.0) / step).round() as usize;
            for i in 0..=ticks {
                let t = 1.0 + i as f64 * step;
                plot::hgrid(&mut out, py_time(t), l, rt, &format!("{t:.decimals$}"));
            }
            plot::vtext(
                &mut out,
                l - 48.0,
                (top + bottom) / 2.0,
                "relative step time",
            );
        } else {
            for p in (0..=100).step_by(20) {
                plot::hgrid(&mut out, py_peak(p as f64), l, rt, &format!("{p} %"));
            }
            plot::vtext(
                &mut out,
                l - 48.0,
                (top + bottom) / 2.0,
                "predicted peak (of A)",
            );
            let _ = writeln!(
                out,
                r##"<line class="budget" x1="{}" y1="{}" x2="{}" y2="{}" stroke="#888" stroke-dasharray="4 3"/>"##,
                px(1, 0.0),
                py_peak(0.0),
                px(1, 100.0),
                py_peak(100.0)
            );
            plot::text(&mut out, px(1, 60.0), py_peak(75.0), "end", "peak = budget");
        }
        plot::text(
            &mut out,
            (l + rt) / 2.0,
            bottom + 36.0,
            "middle",
            "activation budget (of A)",
        );
        // the least peak any schedule reaches
        let least = px(panel, s.percent_of_a(s.least_peak_bytes));
        let _ = writeln!(
            out,
            r##"<line class="least" x1="{least}" y1="{top}" x2="{least}" y2="{bottom}" stroke="#d62728" stroke-dasharray="2 3"/>"##
        );
    }
    plot::text(
        &mut out,
        (panels[0].0 + panels[0].1) / 2.0,
        top - 14.0,
        "middle",
        "relative step time (chain time over none's)",
    );
    plot::text(
        &mut out,
        (panels[1].0 + panels[1].1) / 2.0,
        top - 14.0,
        "middle",
        "predicted activation peak",
    );
    for (k, pts) in series.iter().enumerate() {
        let (name, color) = (STRATEGIES[k].to_string(), COLORS[k]);
        for panel in 0..2 {
            let xy: Vec<(f64, f64)> = pts
                .iter()
                .map(|p| {
                    let y = if panel == 0 {
                        py_time(p.relative)
                    } else {
                        py_peak(p.peak_pct)
                    };
                    (px(panel, p.budget_pct), y)
                })
                .collect();
            let points: Vec<String> = xy.iter().map(|(x, y)| format!("{x},{y}")).collect();
            let _ = writeln!(
                out,
                r#"<polyline class="{name}" points="{}" fill="none" stroke="{color}" stroke-width="2"/>"#,
                points.join(" ")
            );
            for ((x, y), p) in xy.iter().zip(pts) {
                let _ = writeln!(
                    out,
                    r#"<circle class="{name}" cx="{x}" cy="{y}" r="3.5" fill="{color}"><title>{}</title></circle>"#,
                    plot::escape(&p.tip)
                );
                if panel == 0 && p.relative > ymax {
                    plot::text(
                        &mut out,
                        x + 6.0,
                        y + 12.0,
                        "start",
                        &format!("{:.2} (off scale)", p.relative),
                    );
                }
            }
        }
    }
    // the legend, in a row under the title
    let lx = |k: usize| w / 2.0 - 170.0 + 90.0 * k as f64;
    for (k, strategy) in STRATEGIES.iter().enumerate() {
        plot::legend_dot(&mut out, lx(k), 42.0, COLORS[k], &strategy.to_string());
    }
    let _ = writeln!(
        out,
        r##"<line x1="{}" y1="42" x2="{}" y2="42" stroke="#d62728" stroke-dasharray="2 3"/>"##,
        lx(3) - 6.0,
        lx(3) + 6.0
    );
    plot::text(&mut out, lx(3) + 10.0, 46.0, "start", "least peak");
    plot::end(&mut out);
    out
}
