//! The `autopar` command line: a thin layer over the library's pipeline.

use anyhow::{Context, Result};
use autopar::analyzer::train::{DTypePolicy, Optimizer};
use autopar::{LoadOptions, LossChoice};
use clap::{Args, Parser, Subcommand, ValueEnum};
use std::io::IsTerminal;
use std::time::Instant;

#[derive(Parser)]
#[command(
    name = "autopar",
    version,
    about = "Automatic parallelism compiler for deep-learning training"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Import a model, build its training step and print its meta-shape profile.
    Inspect(InspectArgs),
    /// Find how to shard the training step of a model over a device mesh.
    Plan(PlanArgs),
    /// Train a model with its plan on simulated ranks (CPU), on synthetic data.
    Run(RunArgs),
    /// Benchmarks that write reports.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Measure this machine's collectives, matmuls, memory bandwidth and launch overhead, and
    /// write a cluster file for `plan --cluster`.
    Profile(ProfileArgs),
}

#[derive(Args)]
struct ProfileArgs {
    /// Where to measure: cuda (one thread per GPU, NCCL), or cpu (threads with in-process
    /// collectives, smaller sizes: tests the pipeline).
    #[arg(long, default_value = "cuda")]
    device: String,
    /// Devices to measure collectives over (default: every GPU; 2 threads on the CPU).
    #[arg(long)]
    gpus: Option<usize>,
    /// Largest collective payload, e.g. 1GiB or 64KiB (default: 1GiB on GPUs, 16MiB on the CPU).
    #[arg(long = "max-bytes")]
    max_bytes: Option<String>,
    /// The preset (h100, h200, a100) or cluster file for what is not measured: peaks (for
    /// MFU), memory capacity, the inter-node network.
    #[arg(long, default_value = "h100")]
    base: String,
    /// Write the cluster JSON here.
    #[arg(short = 'o', long = "output")]
    output: std::path::PathBuf,
}

fn profile(a: &ProfileArgs) -> Result<()> {
    use autopar::runtime::measure::MeasureDevice;
    let device = match a.device.as_str() {
        "cpu" => MeasureDevice::Cpu,
        "cuda" => MeasureDevice::Cuda,
        d => anyhow::bail!("--device {d}: expected cpu or cuda"),
    };
    let max_bytes = match &a.max_bytes {
        Some(s) => Some(autopar::parse_bytes(s).map_err(anyhow::Error::msg)? as usize),
        None => None,
    };
    let opts = autopar::profile::ProfileOptions {
        device,
        gpus: a.gpus,
        max_bytes,
        base: a.base.clone(),
    };
    let p = autopar::profile::profile(&opts)?;
    std::fs::write(&a.output, p.cluster.to_json() + "\n")
        .with_context(|| format!("writing {}", a.output.display()))?;
    println!("{}", p.table());
    println!("wrote {}", a.output.display());
    Ok(())
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Planning speed and plan quality on the built-in models (Markdown report + SVG plot).
    Solver(BenchSolverArgs),
    /// Activation checkpointing on one model: rotor, chen and none under budgets from 10 % to
    /// 100 % of the activation memory (Markdown report + SVG plot).
    Checkpoint(Box<BenchCheckpointArgs>),
}

#[derive(Args)]
struct BenchCheckpointArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Logical device mesh of the sharding plan: 1, 8, 2x4.
    #[arg(long, default_value = "1")]
    mesh: String,
    /// Cluster preset (h100, h200, a100) or a cluster JSON file.
    #[arg(long, default_value = "h100")]
    cluster: String,
    /// Per-device memory budget of the sharding plan, e.g. 40GiB (default: the GPU's memory).
    #[arg(long)]
    memory: Option<String>,
    #[arg(long, value_enum, default_value = "fp32")]
    dtype: DTypeArg,
    #[arg(long, value_enum, default_value = "adamw")]
    optimizer: OptimizerArg,
    /// Memory slots of rotor's dynamic program.
    #[arg(long, default_value_t = autopar::solver::checkpoint::DEFAULT_SLOTS)]
    slots: usize,
    /// Write the Markdown report here (and the plot next to it, as .svg); default: stdout.
    #[arg(short = 'o', long = "output")]
    output: Option<std::path::PathBuf>,
}

#[derive(Args)]
struct BenchSolverArgs {
    /// Write the Markdown report here (and the plot next to it, as .svg); default: stdout.
    #[arg(short = 'o', long = "output")]
    output: Option<std::path::PathBuf>,
    /// Cluster preset or JSON file.
    #[arg(long, default_value = "h100")]
    cluster: String,
    /// Also solve without layer sharing, with this ILP time limit in seconds (0: skip).
    #[arg(long = "unshared-time-limit", default_value_t = 60.0)]
    unshared_time_limit: f64,
    /// Skip the unshared comparison for training graphs with more nodes than this.
    #[arg(long = "unshared-max-nodes", default_value_t = 2500)]
    unshared_max_nodes: usize,
    /// Only the cases whose model name contains this text.
    #[arg(long)]
    only: Option<String>,
}

#[derive(Args)]
struct PlanArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Logical device mesh: 8, 2x4, 2x2x2.
    #[arg(long)]
    mesh: String,
    /// Cluster preset (h100, h200, a100) or a cluster JSON file.
    #[arg(long, default_value = "h100")]
    cluster: String,
    /// GPUs per node (default: the cluster's).
    #[arg(long = "gpus-per-node")]
    gpus_per_node: Option<usize>,
    /// Per-device memory budget, e.g. 40GiB (default: the GPU's memory).
    #[arg(long)]
    memory: Option<String>,
    /// auto (the solver's choice) or a hand-written family priced by the same model: dp, tp, fsdp, sp.
    #[arg(long, default_value = "auto")]
    strategy: String,
    /// ILP backend: cbc, or highs (when built with the `highs` feature).
    #[arg(long, default_value = "cbc")]
    solver: String,
    /// ILP time limit in seconds.
    #[arg(long = "time-limit")]
    time_limit: Option<f64>,
    /// Do not share decisions between repeated layers (slower, for comparison).
    #[arg(long = "no-share-layers")]
    no_share_layers: bool,
    #[arg(long, value_enum, default_value = "fp32")]
    dtype: DTypeArg,
    #[arg(long, value_enum, default_value = "adamw")]
    optimizer: OptimizerArg,
    /// Print one JSON object (summary and solver report) instead of tables.
    #[arg(long)]
    json: bool,
    /// Write the full plan (versioned JSON) to this file.
    #[arg(short = 'o', long = "output")]
    output: Option<std::path::PathBuf>,
    /// Write the solver's input problem (plain numbers, a label per strategy) and its solution
    /// as JSON, for debugging the solver apart from the graph.
    #[arg(long = "dump-problem")]
    dump_problem: Option<std::path::PathBuf>,
    /// Print rank R's program (the generator's output, in text form) instead of the tables.
    #[arg(long = "dump-rank", value_name = "R")]
    dump_rank: Option<usize>,
    /// Activation checkpointing: rotor (optimal under the budget), chen (sqrt(n) segments),
    /// none, or auto (rotor when no plan fits the budget with every activation kept; the
    /// sharding is then solved again with the memory checkpointing frees).
    #[arg(long, default_value = "auto")]
    checkpoint: String,
}

#[derive(Args)]
struct RunArgs {
    #[command(flatten)]
    plan: PlanArgs,
    /// Where the ranks run: cpu (one thread per rank, in-process collectives).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Training steps.
    #[arg(long, default_value_t = 3)]
    steps: usize,
    /// Run this plan (from `autopar plan -o`) instead of solving.
    #[arg(long = "plan")]
    plan_file: Option<std::path::PathBuf>,
    /// Learning rate.
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    /// Seed of the synthetic data and of the weights the model does not carry.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Also run the first step on one device and compare loss, gradients and updated
    /// parameters; exit non-zero when the relative error exceeds --tolerance.
    #[arg(long)]
    verify: bool,
    #[arg(long, default_value_t = 1e-4)]
    tolerance: f64,
    /// Write the trained parameters (whole, safetensors) here.
    #[arg(long)]
    save: Option<std::path::PathBuf>,
    /// Start from these parameters (a --save checkpoint of the same model, any mesh).
    #[arg(long)]
    resume: Option<std::path::PathBuf>,
}

/// How a model is chosen and shaped (shared by the commands that load one).
#[derive(Args)]
struct ModelArgs {
    /// A built-in model (gpt2, gpt2-medium, llama-8b, resnet50, ...) or a model file (.onnx, or
    /// a TorchScript archive .pt).
    model: String,
    /// Batch size (built-in models).
    #[arg(long)]
    batch: Option<usize>,
    /// Sequence length (built-in language models).
    #[arg(long)]
    seq: Option<usize>,
    /// Number of layers (built-in models).
    #[arg(long)]
    layers: Option<usize>,
    /// Hidden size (built-in models).
    #[arg(long)]
    hidden: Option<usize>,
    /// Attention heads (built-in models).
    #[arg(long)]
    heads: Option<usize>,
    /// Key/value heads for grouped-query attention (built-in LLaMA).
    #[arg(long = "kv-heads")]
    kv_heads: Option<usize>,
    /// Feed-forward size (built-in models).
    #[arg(long)]
    ffn: Option<usize>,
    /// Vocabulary size (built-in language models).
    #[arg(long)]
    vocab: Option<usize>,
    /// Any other built-in config key, as KEY=VALUE (e.g. tie_embeddings=false); repeatable.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Shape (and dtype) of a model file's input: NAME=8x1024[:i64]; repeatable.
    #[arg(long = "input", value_name = "NAME=DIMS[:DTYPE]")]
    inputs: Vec<String>,
    /// Freeze the parameters whose name matches this regex (no gradient, no optimizer state).
    #[arg(long)]
    frozen: Option<String>,
    /// The training loss: auto (the model's own), ce:OUTPUT (cross entropy vs a new labels
    /// input) or mean:OUTPUT.
    #[arg(long, default_value = "auto")]
    loss: String,
}

#[derive(Copy, Clone, ValueEnum)]
enum DTypeArg {
    Fp32,
    Bf16,
}

#[derive(Copy, Clone, ValueEnum)]
enum OptimizerArg {
    Adamw,
    Sgd,
    SgdMomentum,
}

#[derive(Args)]
struct InspectArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Precision policy: fp32, or bf16 mixed (bf16 compute, fp32 master weights and optimizer).
    #[arg(long, value_enum, default_value = "fp32")]
    dtype: DTypeArg,
    #[arg(long, value_enum, default_value = "adamw")]
    optimizer: OptimizerArg,
    /// Print one JSON object instead of tables.
    #[arg(long)]
    json: bool,
}

/// Prints the phases of long work on stderr when it is a terminal.
struct Progress {
    on: bool,
    start: Instant,
}

impl Progress {
    fn new() -> Self {
        Progress {
            on: std::io::stderr().is_terminal(),
            start: Instant::now(),
        }
    }
    fn phase<T>(&mut self, what: &str, f: impl FnOnce() -> T) -> T {
        if self.on {
            eprint!("{what}...");
        }
        self.start = Instant::now();
        let r = f();
        if self.on {
            eprintln!(" {:.2} s", self.start.elapsed().as_secs_f64());
        }
        r
    }
}

fn load_options(a: &ModelArgs) -> Result<LoadOptions> {
    let mut o = LoadOptions::default();
    let sizes = [
        ("batch", a.batch),
        ("seq", a.seq),
        ("layers", a.layers),
        ("hidden", a.hidden),
        ("heads", a.heads),
        ("kv_heads", a.kv_heads),
        ("ffn", a.ffn),
        ("vocab", a.vocab),
    ];
    for (k, v) in sizes {
        if let Some(v) = v {
            o.overrides.set(k, &v.to_string())?;
        }
    }
    for kv in &a.set {
        let (k, v) = kv
            .split_once('=')
            .with_context(|| format!("--set {kv:?}: expected KEY=VALUE"))?;
        o.overrides.set(k, v)?;
    }
    for i in &a.inputs {
        o.inputs
            .push(autopar::analyzer::onnx::parse_input_override(i)?);
    }
    o.frozen = a.frozen.clone();
    o.loss = a.loss.parse::<LossChoice>().map_err(anyhow::Error::msg)?;
    Ok(o)
}

use autopar::format_bytes as human_bytes;

fn human_flops(f: f64) -> String {
    const UNITS: [&str; 6] = ["", "K", "M", "G", "T", "P"];
    let mut v = f;
    let mut u = 0;
    while v >= 1000.0 && u + 1 < UNITS.len() {
        v /= 1000.0;
        u += 1;
    }
    format!("{v:.2} {}FLOP", UNITS[u])
}

fn group_digits(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn policy_of(d: DTypeArg) -> DTypePolicy {
    match d {
        DTypeArg::Fp32 => DTypePolicy::Fp32,
        DTypeArg::Bf16 => DTypePolicy::Bf16Mixed,
    }
}

fn optimizer_of(o: OptimizerArg) -> Optimizer {
    match o {
        OptimizerArg::Adamw => Optimizer::AdamW,
        OptimizerArg::Sgd => Optimizer::Sgd { momentum: false },
        OptimizerArg::SgdMomentum => Optimizer::Sgd { momentum: true },
    }
}

/// Builds the planner options from the CLI flags.
fn plan_options(a: &PlanArgs) -> Result<autopar::planner::PlanOptions> {
    use autopar::planner::{Family, PlanOptions};
    use autopar::solver::cluster::Cluster;
    use autopar::solver::ilp::Backend;
    use autopar::solver::mesh::Mesh;
    let mesh = Mesh::parse_shape(&a.mesh)?;
    let cluster = Cluster::load(&a.cluster)?;
    let mut po = PlanOptions::new(mesh, cluster);
    po.gpus_per_node = a.gpus_per_node;
    po.memory_budget = a
        .memory
        .as_deref()
        .map(autopar::parse_bytes)
        .transpose()
        .map_err(anyhow::Error::msg)?;
    po.family = a.strategy.parse::<Family>().map_err(anyhow::Error::msg)?;
    po.backend = Backend::parse(&a.solver)?;
    if let Some(t) = a.time_limit {
        anyhow::ensure!(
            t > 0.0 && t.is_finite(),
            "--time-limit {t}: must be a positive number of seconds"
        );
    }
    po.time_limit_s = a.time_limit;
    po.share_layers = !a.no_share_layers;
    po.policy = policy_of(a.dtype);
    po.optimizer = optimizer_of(a.optimizer);
    po.dump_problem = a.dump_problem.clone();
    po.checkpoint = match a.checkpoint.as_str() {
        "auto" => None,
        s => Some(
            s.parse::<autopar::solver::checkpoint::Strategy>()
                .map_err(|e| {
                    anyhow::anyhow!("--checkpoint {s}: {e} (expected auto, rotor, chen or none)")
                })?,
        ),
    };
    Ok(po)
}

fn plan(a: &PlanArgs) -> Result<()> {
    let opts = load_options(&a.model)?;
    let po = plan_options(a)?;
    let mut progress = Progress::new();
    let model = progress.phase("loading model", || {
        autopar::load_model(&a.model.model, &opts)
    })?;
    let plan = progress.phase("planning", || autopar::plan_model(&model, &opts, &po))?;
    if let Some(rank) = a.dump_rank {
        anyhow::ensure!(
            rank < plan.mesh.num_devices(),
            "--dump-rank {rank}: mesh {} has ranks 0 to {}",
            plan.mesh.name(),
            plan.mesh.num_devices() - 1
        );
        let tg = autopar::build_training(&model, &opts)?;
        let program = autopar::generator::generate(&tg, &plan)?;
        autopar::generator::verify(&program)?;
        print!("{}", program.rank_view(rank));
        return Ok(());
    }
    if let Some(path) = &a.output {
        let text = serde_json::to_string_pretty(&plan)?;
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    let r = &plan.solver;
    if a.json {
        let json = serde_json::json!({
            "model": plan.model,
            "mesh": plan.mesh.name(),
            "cluster": plan.cluster.name,
            "strategy": plan.family,
            "objective_s": r.objective_s,
            "lower_bound_s": r.lower_bound_s,
            "gap": r.gap,
            "status": r.status,
            "step_s": plan.predicted.step_s,
            "compute_s": plan.predicted.compute_s,
            "communication_s": plan.predicted.communication_s,
            "peak_memory_bytes": plan.predicted.peak_memory_bytes,
            "memory_budget_bytes": plan.memory_budget_bytes,
            "nodes": r.graph_nodes,
            "problem_nodes": r.problem_nodes,
            "problem_edges": r.problem_edges,
            "strategies": r.strategies,
            "memory_rows": r.memory_rows,
            "ilp_variables": r.ilp_variables,
            "ilp_constraints": r.ilp_constraints,
            "shared_layers": r.shared_layers,
            "strategies_s": r.strategies_s,
            "build_s": r.build_s,
            "solve_s": r.solve_s,
            "total_s": r.total_s,
            "collectives": plan.collectives.len(),
        });
        println!("{}", serde_json::to_string_pretty(&json)?);
        return Ok(());
    }
    println!(
        "{} on mesh {} ({}), strategy {}",
        plan.model,
        plan.mesh.name(),
        plan.cluster.name,
        plan.family
    );
    println!();
    let roots: Vec<_> = plan.nodes.iter().filter(|n| n.follows.is_none()).collect();
    let width = roots
        .iter()
        .map(|n| n.name.len())
        .max()
        .unwrap_or(4)
        .clamp(4, 48);
    println!("{:<width$}  {:<26} strategy", "node", "op");
    for n in roots {
        let name = if n.name.is_empty() {
            format!("n{}", n.node)
        } else {
            n.name.clone()
        };
        println!("{name:<width$}  {:<26} {}", n.op, n.notation);
    }
    println!();
    println!("parameters (storage):");
    let mut by_spec: std::collections::BTreeMap<String, (usize, f64)> = Default::default();
    for t in plan
        .tensors
        .iter()
        .filter(|t| matches!(t.role, autopar::solver::plan::TensorRole::Param))
    {
        let e = by_spec.entry(t.spec.to_string()).or_default();
        e.0 += 1;
        e.1 += t.bytes_per_device;
    }
    for (spec, (count, bytes)) in by_spec {
        println!(
            "  {spec:<10} {count:>5} tensors, {} per device (weights, grads, optimizer)",
            human_bytes(bytes)
        );
    }
    println!();
    println!("collectives:");
    let mut by_op: std::collections::BTreeMap<(String, String), (usize, f64, f64)> =
        Default::default();
    for c in &plan.collectives {
        let kind = c.op.split('(').next().unwrap_or(&c.op).to_string();
        let e = by_op
            .entry((format!("{:?}", c.phase).to_lowercase(), kind))
            .or_default();
        e.0 += 1;
        e.1 += c.bytes;
        e.2 += c.time_s;
    }
    if by_op.is_empty() {
        println!("  none");
    }
    for ((phase, kind), (count, bytes, t)) in by_op {
        println!(
            "  {phase:<9} {kind:<16} {count:>6} x, {} moved, {:.3} ms",
            human_bytes(bytes),
            t * 1e3
        );
    }
    println!();
    println!(
        "predicted step        {:.3} ms (compute {:.3} ms, communication {:.3} ms)",
        plan.predicted.step_s * 1e3,
        plan.predicted.compute_s * 1e3,
        plan.predicted.communication_s * 1e3
    );
    println!(
        "peak memory / device  {}",
        human_bytes(plan.predicted.peak_memory_bytes)
    );
    if let Some(c) = &plan.checkpoint {
        let recomputed = c.schedule.forward_count().saturating_sub(c.stages.len());
        println!(
            "checkpointing         {} over {} stages: activations {} of {} available ({} without), {} stage forwards recomputed, +{:.3} ms -> step {:.3} ms",
            c.strategy,
            c.stages.len(),
            human_bytes(c.activation_peak_bytes),
            human_bytes(c.activation_budget_bytes),
            human_bytes(c.activation_peak_without_bytes),
            recomputed,
            c.recompute_s * 1e3,
            c.step_s * 1e3
        );
    }
    println!(
        "solver                {} {}, objective {:.6} s, lower bound {:.6} s, gap {:.3} %",
        r.backend,
        r.status,
        r.objective_s,
        r.lower_bound_s,
        r.gap * 100.0
    );
    println!(
        "problem               {} graph nodes -> {} decisions, {} edges, {} strategies, {} ILP variables",
        r.graph_nodes, r.problem_nodes, r.problem_edges, r.strategies, r.ilp_variables
    );
    println!(
        "time                  strategies {:.3} s, ILP build {:.3} s, solve {:.3} s, total {:.3} s",
        r.strategies_s, r.build_s, r.solve_s, r.total_s
    );
    Ok(())
}

/// `max_rel_err` of updated parameters, leaving out the elements whose reference gradient
/// is at the noise floor (|g| <= 1e-4 max |g| of its tensor): there AdamW's normalised update
/// `g / (|g| + eps)` turns rounding noise of either run into a full step of either sign.
fn max_rel_err_above_noise(
    a: &[autopar::runtime::weights::NamedTensor],
    b: &[autopar::runtime::weights::NamedTensor],
    grads: &[autopar::runtime::weights::NamedTensor],
) -> f64 {
    a.iter()
        .zip(b)
        .zip(grads)
        .map(|(((_, _, x), (_, _, y)), (_, _, g))| {
            let scale = y
                .iter()
                .fold(0.0f64, |m, &v| m.max(v.abs() as f64))
                .max(1e-12);
            let floor = 1e-4 * g.iter().fold(0.0f64, |m, &v| m.max(v.abs() as f64));
            let diff = x
                .iter()
                .zip(y)
                .zip(g)
                .filter(|(_, &gi)| (gi as f64).abs() > floor)
                .fold(0.0f64, |m, ((&p, &q), _)| {
                    m.max((p as f64 - q as f64).abs())
                });
            diff / scale
        })
        .fold(0.0, f64::max)
}

/// What a step's throughput counts: the tokens of the first 2-D integer input, else the
/// samples of the first input's batch.
fn batch_units(g: &autopar::analyzer::Graph) -> (usize, &'static str) {
    g.inputs
        .iter()
        .find(|&&v| g.ty(v).dtype.is_int() && g.ty(v).rank() == 2)
        .map(|&v| (g.ty(v).numel(), "tokens"))
        .or_else(|| {
            g.inputs
                .first()
                .and_then(|&v| g.ty(v).shape.first().map(|&b| (b, "samples")))
        })
        .unwrap_or((1, "steps"))
}

fn run(a: &RunArgs) -> Result<()> {
    // under torchrun (RANK, WORLD_SIZE, MASTER_ADDR, ...) this process is one rank: src/launch.rs
    match autopar::launch::World::from_env()? {
        Some(world) => world.run(|w| {
            anyhow::ensure!(!a.verify, "{}", autopar::launch::NO_VERIFY);
            run_on(a, Some(w))
        }),
        None => run_on(a, None),
    }
}

fn run_on(a: &RunArgs, world: Option<&autopar::launch::World>) -> Result<()> {
    use autopar::runtime::exec::OptimizerConfig;
    anyhow::ensure!(
        a.device == "cpu" || a.device == "cuda",
        "--device {}: expected cpu or cuda",
        a.device
    );
    anyhow::ensure!(
        a.device == "cpu" || cfg!(feature = "cuda"),
        "--device cuda: this autopar was built without the CUDA runtime (cargo build --features cuda)"
    );
    anyhow::ensure!(a.steps >= 1, "--steps must be at least 1");
    let opts = load_options(&a.plan.model)?;
    let po = plan_options(&a.plan)?;
    let optimizer = match a.plan.optimizer {
        OptimizerArg::Adamw => OptimizerConfig::AdamW {
            lr: a.lr,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        },
        OptimizerArg::Sgd => OptimizerConfig::Sgd {
            lr: a.lr,
            momentum: 0.0,
            weight_decay: 0.0,
        },
        OptimizerArg::SgdMomentum => OptimizerConfig::Sgd {
            lr: a.lr,
            momentum: 0.9,
            weight_decay: 0.0,
        },
    };
    let use_plan = match &a.plan_file {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading plan {}", path.display()))?;
            let plan: autopar::solver::plan::Plan = serde_json::from_str(&text)
                .with_context(|| format!("{} is not an autopar plan", path.display()))?;
            Some(plan)
        }
        None => None,
    };
    let mut auto = autopar::AutoOptions::new(&po.mesh_shape);
    auto.plan = po.clone();
    auto.use_plan = use_plan;
    auto.optimizer = optimizer;
    auto.seed = a.seed;
    let mut progress = Progress::new();
    progress.on &= world.is_none_or(|w| w.rank() == 0);
    let par = progress.phase("planning and generating", || match world {
        Some(w) => w.autoparallelize(&a.plan.model.model, &opts, &auto),
        None => autopar::autoparallelize(&a.plan.model.model, &opts, &auto),
    })?;
    let graph = match &a.resume {
        Some(path) => par.with_checkpoint(path)?,
        None => par.training.graph.clone(),
    };
    let batch = par.synthetic_batch(a.seed);
    if let Some(w) = world {
        let settings = autopar::launch::RunSettings {
            device: &a.device,
            steps: a.steps,
            seed: a.seed,
            optimizer,
            save: a.save.as_deref(),
            units: batch_units(&par.training.graph),
            predicted_step_s: predicted_step_s(&par.plan),
        };
        return Ok(autopar::launch::train(w, &par, &graph, &batch, &settings)?);
    }
    #[cfg(feature = "cuda")]
    if a.device == "cuda" {
        return run_cuda(a, &par, &graph, &batch, optimizer, &opts, &auto);
    }
    let trainer = progress.phase("loading weights", || par.trainer_with(&graph))?;
    let g = &par.training.graph;
    let tokens = batch_units(g);
    println!(
        "{} on {} simulated ranks (mesh {}), strategy {}, predicted step {:.3} ms on {}",
        par.plan.model,
        par.program.world_size(),
        par.plan.mesh.name(),
        par.plan.family,
        predicted_step_s(&par.plan) * 1e3,
        par.plan.cluster.name
    );
    let mut failed = None;
    for step in 1..=a.steps {
        let report = if a.verify && step == 1 {
            let r = trainer.step_with_grads(&batch)?;
            let mut one_opts = auto.clone();
            one_opts.plan.mesh_shape = vec![1];
            one_opts.use_plan = None;
            // the reference is the plain step: no recompute, no sharding
            one_opts.plan.checkpoint = Some(autopar::solver::checkpoint::Strategy::None);
            one_opts.plan.memory_budget = None;
            let one = autopar::autoparallelize(&a.plan.model.model, &opts, &one_opts)?;
            let one_trainer = one.trainer_with(&graph)?;
            let r1 = one_trainer.step_with_grads(&batch)?;
            let loss_err = (r.loss - r1.loss).abs() / r1.loss.abs().max(1e-12);
            let grad_err = autopar::runtime::weights::max_rel_err(&r.grads, &r1.grads).0;
            let (pn, p1) = (trainer.params()?, one_trainer.params()?);
            let param_all = autopar::runtime::weights::max_rel_err(&pn, &p1).0;
            let param_err = max_rel_err_above_noise(&pn, &p1, &r1.grads);
            let worst = loss_err.max(grad_err).max(param_err);
            println!(
                "verify: one device vs {} ranks: loss {loss_err:.2e}, gradients {grad_err:.2e}, updated parameters {param_err:.2e} ({param_all:.2e} with elements whose gradient is at the noise floor)",
                par.program.world_size()
            );
            println!("max_rel_err {worst:.3e} (tolerance {:.0e})", a.tolerance);
            if worst.is_nan() || worst > a.tolerance {
                failed = Some(worst);
            }
            r
        } else {
            trainer.step(&batch)?
        };
        println!(
            "step {step:>4}  loss {:.6}  {:.0} {}/s  measured {:.1} ms (collectives {:.1} ms)  predicted {:.3} ms ({})",
            report.loss,
            tokens.0 as f64 / report.seconds,
            tokens.1,
            report.seconds * 1e3,
            report.comm_seconds * 1e3,
            predicted_step_s(&par.plan) * 1e3,
            par.plan.cluster.name
        );
    }
    if let Some(path) = &a.save {
        trainer.save(path)?;
        println!("saved the parameters to {}", path.display());
    }
    if let Some(worst) = failed {
        anyhow::bail!(
            "verification failed: max_rel_err {worst:.3e} exceeds the tolerance {:.0e}",
            a.tolerance
        );
    }
    Ok(())
}

/// `run --device cuda`: one rank per GPU, NCCL between them.
#[cfg(feature = "cuda")]
fn run_cuda(
    a: &RunArgs,
    par: &autopar::Parallelized,
    graph: &autopar::analyzer::Graph,
    batch: &std::collections::HashMap<autopar::analyzer::ValueId, autopar::analyzer::Tensor>,
    optimizer: autopar::runtime::exec::OptimizerConfig,
    opts: &LoadOptions,
    auto: &autopar::AutoOptions,
) -> Result<()> {
    let g = &par.training.graph;
    let tokens = batch_units(g);
    println!(
        "{} on {} GPUs (mesh {}), strategy {}, predicted step {:.3} ms on {}",
        par.plan.model,
        par.program.world_size(),
        par.plan.mesh.name(),
        par.plan.family,
        predicted_step_s(&par.plan) * 1e3,
        par.plan.cluster.name
    );
    let steps = autopar::runtime::cuda::train_cuda(
        par.program.clone(),
        graph,
        std::path::Path::new(""),
        a.seed,
        optimizer,
        batch,
        a.steps,
    )
    .map_err(anyhow::Error::msg)?;
    for (i, s) in steps.iter().enumerate() {
        println!(
            "step {:>4}  loss {:.6}  {:.0} {}/s  measured {:.2} ms  predicted {:.3} ms ({})  device memory {} (predicted peak {})",
            i + 1,
            s.loss,
            tokens.0 as f64 / s.seconds,
            tokens.1,
            s.seconds * 1e3,
            predicted_step_s(&par.plan) * 1e3,
            par.plan.cluster.name,
            human_bytes(s.device_bytes),
            human_bytes(par.plan.predicted.peak_memory_bytes)
        );
    }
    if a.verify {
        // the first step's loss against one device on the CPU, same weights and batch
        let mut one_opts = auto.clone();
        one_opts.plan.mesh_shape = vec![1];
        one_opts.use_plan = None;
        let one = autopar::autoparallelize(&a.plan.model.model, opts, &one_opts)?;
        let r1 = one.trainer_with(graph)?.step(batch)?;
        let err =
            (steps.first().map_or(f64::NAN, |s| s.loss) - r1.loss).abs() / r1.loss.abs().max(1e-12);
        println!(
            "max_rel_err {err:.3e} (first-step loss against one CPU device; tolerance {:.0e})",
            a.tolerance
        );
        anyhow::ensure!(
            err <= a.tolerance,
            "verification failed: max_rel_err {err:.3e} exceeds the tolerance {:.0e}",
            a.tolerance
        );
    }
    Ok(())
}

fn bench_solver(a: &BenchSolverArgs) -> Result<()> {
    let cluster = autopar::solver::cluster::Cluster::load(&a.cluster)?;
    let unshared = (a.unshared_time_limit > 0.0).then_some(a.unshared_time_limit);
    let mut rows = vec![];
    for case in autopar::bench::CASES
        .iter()
        .filter(|c| a.only.as_deref().is_none_or(|o| c.model.contains(o)))
    {
        eprintln!("{} on {:?}...", case.model, case.mesh);
        rows.push(autopar::bench::run_case(
            case,
            &cluster,
            unshared,
            a.unshared_max_nodes,
        )?);
    }
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    let mut md = autopar::bench::report(&rows, &cluster, &command);
    match &a.output {
        Some(path) => {
            let svg_path = path.with_extension("svg");
            let name = svg_path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            md.push_str(&format!("\n![ILP time against graph size]({name})\n"));
            std::fs::write(path, &md).with_context(|| format!("writing {}", path.display()))?;
            std::fs::write(&svg_path, autopar::bench::svg(&rows))
                .with_context(|| format!("writing {}", svg_path.display()))?;
            eprintln!("wrote {} and {}", path.display(), svg_path.display());
        }
        None => print!("{md}"),
    }
    Ok(())
}

fn bench_checkpoint(a: &BenchCheckpointArgs) -> Result<()> {
    use autopar::solver::cluster::Cluster;
    use autopar::solver::mesh::Mesh;
    let opts = load_options(&a.model)?;
    let mut po =
        autopar::planner::PlanOptions::new(Mesh::parse_shape(&a.mesh)?, Cluster::load(&a.cluster)?);
    po.memory_budget = a
        .memory
        .as_deref()
        .map(autopar::parse_bytes)
        .transpose()
        .map_err(anyhow::Error::msg)?;
    po.policy = policy_of(a.dtype);
    po.optimizer = optimizer_of(a.optimizer);
    let mut progress = Progress::new();
    let report = progress.phase("planning and sweeping the budgets", || {
        autopar::bench_checkpoint::run(&a.model.model, &opts, &po, a.slots)
    })?;
    let mut args = std::env::args();
    let program = args
        .next()
        .and_then(|p| {
            std::path::Path::new(&p)
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
        })
        .unwrap_or_else(|| "autopar".into());
    let command = std::iter::once(program)
        .chain(args)
        .collect::<Vec<_>>()
        .join(" ");
    match &a.output {
        Some(path) => {
            let svg_path = path.with_extension("svg");
            anyhow::ensure!(
                svg_path != *path,
                "-o {}: the report is Markdown and its plot is written next to it as .svg; name the report .md",
                path.display()
            );
            let name = svg_path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let md = autopar::bench_checkpoint::markdown(&report, &command, Some(&name));
            std::fs::write(path, &md).with_context(|| format!("writing {}", path.display()))?;
            std::fs::write(&svg_path, autopar::bench_checkpoint::svg(&report))
                .with_context(|| format!("writing {}", svg_path.display()))?;
            eprintln!("wrote {} and {}", path.display(), svg_path.display());
        }
        None => print!(
            "{}",
            autopar::bench_checkpoint::markdown(&report, &command, None)
        ),
    }
    Ok(())
}

fn inspect(a: &InspectArgs) -> Result<()> {
    let opts = load_options(&a.model)?;
    let mut progress = Progress::new();
    let model = progress.phase("loading model", || {
        autopar::load_model(&a.model.model, &opts)
    })?;
    let policy = policy_of(a.dtype);
    let optimizer = optimizer_of(a.optimizer);
    let report = progress.phase("building and profiling the training step", || {
        autopar::inspect(&model, &opts, optimizer, policy)
    })?;
    let p = &report.profile;
    if a.json {
        let json = serde_json::json!({
            "model": report.model,
            "source": report.source,
            "dtype": policy,
            "optimizer": optimizer,
            "forward_nodes": report.forward_nodes,
            "nodes": report.nodes,
            "params": report.params,
            "flops_per_step": report.flops_per_step,
            "forward_flops": p.forward_flops,
            "backward_flops": p.backward_flops,
            "matmul_flops_per_step": report.matmul_flops_per_step,
            "bytes_moved": p.bytes_moved,
            "activation_bytes": report.activation_bytes,
            "param_bytes": p.param_bytes,
            "grad_bytes": p.grad_bytes,
            "optimizer_bytes": p.optimizer_bytes,
            "buffer_bytes": p.buffer_bytes,
            "peak_memory_bytes": report.peak_memory_bytes,
            "per_op_type": p.per_op_type,
        });
        println!("{}", serde_json::to_string_pretty(&json)?);
        return Ok(());
    }
    println!("{} ({:?})", report.model, report.source);
    println!();
    println!(
        "{:<34} {:>7} {:>14} {:>14} {:>12}",
        "op type", "nodes", "FLOPs", "matmul FLOPs", "bytes"
    );
    let mut rows: Vec<_> = p.per_op_type.iter().collect();
    rows.sort_by(|a, b| b.1.flops.total_cmp(&a.1.flops).then(a.0.cmp(b.0)));
    for (name, s) in rows {
        println!(
            "{:<34} {:>7} {:>14} {:>14} {:>12}",
            name,
            s.count,
            human_flops(s.flops),
            human_flops(s.matmul_flops),
            human_bytes(s.bytes)
        );
    }
    println!();
    let dt = match policy {
        DTypePolicy::Fp32 => "fp32",
        DTypePolicy::Bf16Mixed => "bf16 mixed",
    };
    println!(
        "nodes                 {} forward, {} in the training step",
        report.forward_nodes, report.nodes
    );
    println!("parameters            {}", group_digits(report.params));
    println!(
        "training FLOPs/step   {} (forward {}, backward {}; matmul {})",
        human_flops(report.flops_per_step),
        human_flops(p.forward_flops),
        human_flops(p.backward_flops),
        human_flops(report.matmul_flops_per_step)
    );
    println!(
        "activation memory     {} saved for backward ({dt})",
        human_bytes(report.activation_bytes as f64)
    );
    println!(
        "weights/grads/optim   {} / {} / {}",
        human_bytes(p.param_bytes as f64),
        human_bytes(p.grad_bytes as f64),
        human_bytes(p.optimizer_bytes as f64)
    );
    println!(
        "estimated peak memory {} on one device",
        human_bytes(report.peak_memory_bytes as f64)
    );
    Ok(())
}

fn main() {
    let cli = Cli::parse();
    let r = match &cli.command {
        Command::Inspect(a) => inspect(a),
        Command::Plan(a) => plan(a),
        Command::Run(a) => run(a),
        Command::Bench(BenchCommand::Solver(a)) => bench_solver(a),
        Command::Bench(BenchCommand::Checkpoint(a)) => bench_checkpoint(a),
        Command::Profile(a) => profile(a),
    };
    if let Err(e) = r {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// The plan's predicted step time, recompute included when it checkpoints.
fn predicted_step_s(plan: &autopar::solver::plan::Plan) -> f64 {
    plan.checkpoint
        .as_ref()
        .map_or(plan.predicted.step_s, |c| c.step_s)
}
