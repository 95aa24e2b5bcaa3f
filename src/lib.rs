//! autopar: an automatic parallelism compiler for deep-learning training.
//!
//! This crate is the pipeline as a library; the `autopar` binary is a thin layer over it.
//! [`autoparallelize`] is the one call: model and input shapes in; plan, per-rank programs and
//! a training handle out. Its stages are public too: [`load_model`] (a built-in name, an ONNX
//! or TorchScript file), [`build_training`] (forward + loss + backward), [`inspect`] (the
//! meta-shape profile of a training step), [`plan_model`] (the sharding plan on a device mesh,
//! see [`planner`]), then the generator and the runtime (see ARCHITECTURE.md).

pub mod auto;
pub mod bench;
pub mod bench_checkpoint;
pub mod checkpointing;
pub mod data;
pub mod launch;
pub mod planner;
pub mod profile;

pub use auto::{autoparallelize, AutoOptions, Parallelized, Trainer};
pub use autopar_analyzer as analyzer;
pub use autopar_generator as generator;
pub use autopar_models as models;
pub use autopar_runtime as runtime;
pub use autopar_solver as solver;

use analyzer::onnx::{ImportOptions, InputOverride};
use analyzer::profile::Profile;
use analyzer::train::{DTypePolicy, LossSpec, Optimizer, TrainOptions, TrainingGraph};
use analyzer::{AnalyzerError, Graph, ValueId};
use models::{ModelError, Overrides};
use serde::Serialize;
use std::path::Path;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum Error {
    #[error(transparent)]
    Analyzer(#[from] AnalyzerError),
    #[error(transparent)]
    Model(#[from] ModelError),
    /// Options that do not fit the model (named in the message).
    #[error("{0}")]
    Usage(String),
    /// A training step or its setup failed (the rank and the node are named in the message).
    #[error("{0}")]
    Run(String),
    /// No sharding plan fits the memory budget; `least_bytes` is the smallest per-device
    /// memory any plan of the family needs (before activation checkpointing).
    #[error("{message}")]
    NoFit { message: String, least_bytes: f64 },
}

/// Where a model comes from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelSource {
    Builtin,
    Onnx,
    /// A TorchScript archive (`torch.jit.save`).
    TorchScript,
}

/// How the training loss is chosen.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum LossChoice {
    /// The model's own loss (built-ins; ONNX exports with `SoftmaxCrossEntropyLoss` or an
    /// output named `loss`); an error when it has none.
    #[default]
    Auto,
    /// Mean cross entropy of the named output (logits `[.., C]`) against a new `labels` input.
    CrossEntropy { output: String },
    /// The mean of the named output.
    Mean { output: String },
}

impl std::str::FromStr for LossChoice {
    type Err = String;
    /// `auto`, `ce:OUTPUT` or `mean:OUTPUT`.
    fn from_str(s: &str) -> Result<Self, String> {
        match s.split_once(':') {
            None if s == "auto" => Ok(LossChoice::Auto),
            Some(("ce", o)) if !o.is_empty() => Ok(LossChoice::CrossEntropy { output: o.into() }),
            Some(("mean", o)) if !o.is_empty() => Ok(LossChoice::Mean { output: o.into() }),
            _ => Err(format!(
                "bad loss {s:?}: expected auto, ce:OUTPUT or mean:OUTPUT"
            )),
        }
    }
}

/// Options of [`load_model`] and [`build_training`].
#[derive(Clone, Debug, Default)]
pub struct LoadOptions {
    /// Built-in models: size and shape overrides (`batch`, `seq`, `layers`, ...).
    pub overrides: Overrides,
    /// Model files: input shapes (`--input NAME=8x1024:i64`).
    pub inputs: Vec<InputOverride>,
    /// Parameters whose name matches become frozen buffers.
    pub frozen: Option<String>,
    pub loss: LossChoice,
}

/// A forward graph with its loss, as loaded.
#[derive(Clone, Debug)]
pub struct LoadedModel {
    /// The built-in name or the file path.
    pub name: String,
    pub source: ModelSource,
    pub graph: Graph,
    /// The model's own loss, if it has one.
    pub loss: Option<ValueId>,
}

/// Loads a built-in model (`gpt2-medium`) or a model file (`model.onnx`), its composed
/// attention fused into `attention` nodes ([`analyzer::fuse`]).
pub fn load_model(model: &str, opts: &LoadOptions) -> Result<LoadedModel, Error> {
    let m = load_unfused(model, opts)?;
    let (graph, map) = analyzer::fuse::fuse_attention(m.graph)?;
    let loss = match m.loss {
        Some(l) => Some(map[l.0 as usize].ok_or_else(|| {
            Error::Usage(format!("{model}: its loss {l} is inside a fused attention"))
        })?),
        None => None,
    };
    Ok(LoadedModel { graph, loss, ..m })
}

/// [`load_model`] without the attention fusion.
fn load_unfused(model: &str, opts: &LoadOptions) -> Result<LoadedModel, Error> {
    if models::is_builtin(model) {
        if !opts.inputs.is_empty() {
            return Err(Error::Usage(format!(
                "--input applies to model files; {model} is built in: use --batch, --seq and the size flags"
            )));
        }
        let built = models::build(model, &opts.overrides)?;
        return Ok(LoadedModel {
            name: models::canonical_name(model).unwrap_or(model).to_string(),
            source: ModelSource::Builtin,
            graph: built.graph,
            loss: Some(built.loss),
        });
    }
    let path = Path::new(model);
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    if opts.overrides != Overrides::default() {
        return Err(Error::Usage(format!(
            "--batch, --seq and the size flags apply to built-in models; for {model} set input shapes with --input NAME=DIMS[:dtype]"
        )));
    }
    match ext.as_str() {
        "onnx" => {
            let imported = analyzer::onnx::import_onnx(
                path,
                &ImportOptions {
                    input_overrides: opts.inputs.clone(),
                },
            )?;
            Ok(LoadedModel {
                name: model.to_string(),
                source: ModelSource::Onnx,
                graph: imported.graph,
                loss: imported.loss,
            })
        }
        "pt" | "pth" | "ts" => {
            let imported = autopar_torchscript::import_torchscript(
                path,
                &ImportOptions {
                    input_overrides: opts.inputs.clone(),
                },
            )?;
            Ok(LoadedModel {
                name: model.to_string(),
                source: ModelSource::TorchScript,
                graph: imported.graph,
                loss: imported.loss,
            })
        }
        _ if !path.exists() => Err(Error::Usage(format!(
            "{model:?} is neither a built-in model ({}) nor an existing file",
            models::builtin_names().join(", ")
        ))),
        _ => Err(Error::Usage(format!(
            "{model}: unknown model file type (expected .onnx, or .pt for TorchScript)"
        ))),
    }
}

/// Builds the training graph (forward + loss + backward) of a loaded model.
pub fn build_training(model: &LoadedModel, opts: &LoadOptions) -> Result<TrainingGraph, Error> {
    let find_output = |name: &str| -> Result<ValueId, Error> {
        model
            .graph
            .outputs
            .iter()
            .copied()
            .find(|&v| model.graph.value(v).name == name)
            .or_else(|| model.graph.find_value(name))
            .ok_or_else(|| {
                let outs: Vec<String> = model
                    .graph
                    .outputs
                    .iter()
                    .map(|&v| model.graph.value(v).name.clone())
                    .collect();
                Error::Usage(format!(
                    "{}: no output named {name:?} (outputs: {})",
                    model.name,
                    outs.join(", ")
                ))
            })
    };
    let loss = match &opts.loss {
        LossChoice::Auto => match model.loss {
            Some(l) => LossSpec::Given(l),
            None => {
                return Err(Error::Usage(format!(
                "{}: the model has no loss; choose one with --loss ce:OUTPUT or --loss mean:OUTPUT",
                model.name
            )))
            }
        },
        LossChoice::CrossEntropy { output } => LossSpec::CrossEntropy {
            logits: find_output(output)?,
            labels_name: "labels".into(),
        },
        LossChoice::Mean { output } => LossSpec::MeanOfOutput(find_output(output)?),
    };
    let mut train = TrainOptions::new(loss);
    if let Some(re) = &opts.frozen {
        let re =
            regex::Regex::new(re).map_err(|e| Error::Usage(format!("--frozen {re:?}: {e}")))?;
        train = train.with_frozen(re);
    }
    Ok(analyzer::train::build_training_graph(&model.graph, &train)?)
}

/// What `autopar inspect` reports: the model, its training graph's size, and its profile.
#[derive(Clone, Debug, Serialize)]
pub struct InspectReport {
    pub model: String,
    pub source: ModelSource,
    /// Forward nodes as loaded.
    pub forward_nodes: usize,
    /// Nodes of the training step (forward + backward).
    pub nodes: usize,
    pub params: usize,
    pub flops_per_step: f64,
    pub matmul_flops_per_step: f64,
    pub activation_bytes: usize,
    pub peak_memory_bytes: usize,
    pub profile: Profile,
}

/// Profiles one training step of `model` (see [`analyzer::profile`]).
pub fn inspect(
    model: &LoadedModel,
    opts: &LoadOptions,
    optimizer: Optimizer,
    policy: DTypePolicy,
) -> Result<InspectReport, Error> {
    let tg = build_training(model, opts)?;
    let profile = analyzer::profile::profile(&tg, optimizer, policy);
    Ok(InspectReport {
        model: model.name.clone(),
        source: model.source.clone(),
        forward_nodes: model.graph.nodes.len(),
        nodes: profile.num_nodes,
        params: profile.params,
        flops_per_step: profile.flops_per_step,
        matmul_flops_per_step: profile.matmul_flops,
        activation_bytes: profile.activation_bytes,
        peak_memory_bytes: profile.peak_memory_bytes,
        profile,
    })
}

/// Plans `model` on a mesh: builds the training graph, profiles it and solves for the sharding
/// plan (see [`planner`]).
pub fn plan_model(
    model: &LoadedModel,
    opts: &LoadOptions,
    plan: &planner::PlanOptions,
) -> Result<solver::plan::Plan, Error> {
    let tg = build_training(model, opts)?;
    let profile = analyzer::profile::profile(&tg, plan.optimizer, plan.policy);
    checkpointing::plan_with_checkpointing(&model.name, &tg, &profile, plan)
}

/// A byte count for people: `512 B`, `1.50 KiB`, `33.10 GiB`.
pub fn format_bytes(b: f64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{v:.0} {}", UNITS[u])
    } else {
        format!("{v:.2} {}", UNITS[u])
    }
}

/// Parses a byte size: `40GiB`, `16GB`, `512MiB`, `1e9` (bytes); `G`/`M`/`K` alone are binary.
pub fn parse_bytes(s: &str) -> Result<f64, String> {
    let t = s.trim();
    let split = t.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("bad size {s:?}: expected e.g. 40GiB, 16GB or 512MiB"))?;
    let mult = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kib" => 1024.0,
        "kb" => 1e3,
        "m" | "mib" => 1024.0f64.powi(2),
        "mb" => 1e6,
        "g" | "gib" => 1024.0f64.powi(3),
        "gb" => 1e9,
        "t" | "tib" => 1024.0f64.powi(4),
        "tb" => 1e12,
        _ => return Err(format!("bad size {s:?}: unknown unit {unit:?}")),
    };
    if !(n.is_finite() && n > 0.0) {
        return Err(format!("bad size {s:?}: must be positive"));
    }
    Ok(n * mult)
}
