//! [`autoparallelize`]: the one library call of the pipeline. Model + the shapes of its
//! inputs + a cluster and mesh in; the sharding plan, the per-rank programs and a handle that
//! runs training steps out.

use crate::planner::PlanOptions;
use crate::{build_training, load_model, Error, LoadOptions, LoadedModel};
use autopar_analyzer::graph::{Graph, ValueDef, ValueId};
use autopar_analyzer::train::TrainingGraph;
use autopar_analyzer::Tensor;
use autopar_generator::Program;
use autopar_runtime::exec::OptimizerConfig;
use autopar_runtime::session::{Session, StepReport};
use autopar_solver::plan::Plan;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// What [`autoparallelize`] needs beyond the model and its input shapes.
#[derive(Clone, Debug)]
pub struct AutoOptions {
    /// Mesh, cluster, memory budget, strategy family, precision, solver.
    pub plan: PlanOptions,
    /// Run this plan instead of solving (it must match the model and the mesh).
    pub use_plan: Option<Plan>,
    /// The optimizer the training steps apply.
    pub optimizer: OptimizerConfig,
    /// Seed of the weights' initialisation where the model has none of its own.
    pub seed: u64,
}

impl AutoOptions {
    /// Defaults for `mesh` on the H100 preset: the solver's own plan, fp32, AdamW.
    pub fn new(mesh: &[usize]) -> Self {
        let cluster =
            autopar_solver::cluster::Cluster::preset("h100").expect("the h100 preset is built in");
        AutoOptions {
            plan: PlanOptions::new(mesh.to_vec(), cluster),
            use_plan: None,
            optimizer: OptimizerConfig::default(),
            seed: 0,
        }
    }
}

/// A model made parallel: its plan, the program every rank runs, and how to train with it.
pub struct Parallelized {
    pub model: LoadedModel,
    pub training: TrainingGraph,
    pub plan: Plan,
    pub program: Arc<Program>,
    optimizer: OptimizerConfig,
    seed: u64,
    weights_dir: PathBuf,
}

/// Loads `model` (a built-in name or a model file) with the input shapes of `meta_inputs`,
/// builds its training step, plans it (or checks the given plan), generates the per-rank
/// program and verifies it.
///
/// ```
/// use autopar::{autoparallelize, AutoOptions, LoadOptions, models};
///
/// // a tiny GPT-2 on 4 simulated ranks, as a 2x2 mesh
/// let inputs = LoadOptions { overrides: models::tiny("gpt2")?, ..Default::default() };
/// let par = autoparallelize("gpt2", &inputs, &AutoOptions::new(&[2, 2]))?;
/// assert_eq!(par.program.world_size(), 4);
/// println!("{}", par.rank_program(3));
///
/// let trainer = par.trainer()?;
/// let batch = par.synthetic_batch(0);
/// let first = trainer.step(&batch)?.loss;
/// for _ in 0..3 {
///     trainer.step(&batch)?;
/// }
/// assert!(trainer.step(&batch)?.loss < first, "training on one batch lowers its loss");
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn autoparallelize(
    model: &str,
    meta_inputs: &LoadOptions,
    options: &AutoOptions,
) -> Result<Parallelized, Error> {
    let loaded = load_model(model, meta_inputs)?;
    let training = build_training(&loaded, meta_inputs)?;
    let plan = match &options.use_plan {
        Some(p) => {
            if p.mesh.shape != options.plan.mesh_shape {
                return Err(Error::Usage(format!(
                    "the plan is for mesh {}, not {}",
                    p.mesh.name(),
                    options
                        .plan
                        .mesh_shape
                        .iter()
                        .map(|n| n.to_string())
                        .collect::<Vec<_>>()
                        .join("x")
                )));
            }
            p.clone()
        }
        None => {
            let profile = autopar_analyzer::profile::profile(
                &training,
                options.plan.optimizer,
                options.plan.policy,
            );
            crate::checkpointing::plan_with_checkpointing(
                &loaded.name,
                &training,
                &profile,
                &options.plan,
            )?
        }
    };
    let program =
        autopar_generator::generate(&training, &plan).map_err(|e| Error::Usage(e.to_string()))?;
    autopar_generator::verify(&program).map_err(|e| Error::Usage(e.to_string()))?;
    // importers record external weight files as opened from the working directory
    let weights_dir = PathBuf::new();
    Ok(Parallelized {
        model: loaded,
        training,
        plan,
        program: Arc::new(program),
        optimizer: options.optimizer,
        seed: options.seed,
        weights_dir,
    })
}

impl Parallelized {
    /// Rank `rank`'s program as text (what `autopar plan --dump-rank R` prints).
    pub fn rank_program(&self, rank: usize) -> String {
        self.program.rank_view(rank)
    }

    /// A synthetic batch for the model's data inputs (see [`crate::data`]).
    pub fn synthetic_batch(&self, seed: u64) -> HashMap<ValueId, Tensor> {
        crate::data::synthetic_batch(&self.training.graph, seed)
    }

    /// Loads every rank's weights and returns the handle that runs training steps (CPU, one
    /// thread per rank, Loopback collectives).
    pub fn trainer(&self) -> Result<Trainer, Error> {
        self.trainer_with(&self.training.graph)
    }

    /// As [`Parallelized::trainer`], with the weights of `graph` (the training graph with
    /// other weight data, e.g. a checkpoint applied).
    pub fn trainer_with(&self, graph: &Graph) -> Result<Trainer, Error> {
        let session = Session::new(
            self.program.clone(),
            graph,
            &self.weights_dir,
            self.seed,
            self.optimizer,
        )
        .map_err(|e| Error::Run(e.to_string()))?;
        Ok(Trainer { session })
    }

    /// The training graph with its weights replaced by a checkpoint's (safetensors written by
    /// [`Trainer::save`]); every parameter must be in it, with its shape.
    pub fn with_checkpoint(&self, path: &Path) -> Result<Graph, Error> {
        let tensors = autopar_runtime::weights::load_safetensors(path)
            .map_err(|e| Error::Usage(e.to_string()))?;
        let mut by_name: HashMap<String, (Vec<usize>, Vec<f32>)> =
            tensors.into_iter().map(|(n, s, d)| (n, (s, d))).collect();
        let mut g = self.training.graph.clone();
        let ids: Vec<ValueId> = g.params().collect();
        for v in ids {
            let d = &mut g.values[v];
            let Some((shape, data)) = by_name.remove(&d.name) else {
                return Err(Error::Usage(format!(
                    "{}: no tensor for parameter {:?}",
                    path.display(),
                    d.name
                )));
            };
            if shape != d.ty.shape {
                return Err(Error::Usage(format!(
                    "{}: parameter {:?} has shape {:?} in the checkpoint but {} in the model",
                    path.display(),
                    d.name,
                    shape,
                    d.ty
                )));
            }
            if d.ty.dtype != autopar_analyzer::DType::F32 {
                return Err(Error::Usage(format!(
                    "{}: parameter {:?} is {}, checkpoints hold f32 parameters",
                    path.display(),
                    d.name,
                    d.ty.dtype
                )));
            }
            let bytes: Vec<u8> = data.iter().flat_map(|&x| x.to_le_bytes()).collect();
            if let ValueDef::Param { data } = &mut d.def {
                *data = autopar_analyzer::graph::WeightData::Inline(Arc::new(bytes));
            }
        }
        Ok(g)
    }
}

/// Runs training steps of a [`Parallelized`] model on its ranks.
pub struct Trainer {
    session: Session,
}

impl Trainer {
    /// One training step on `batch` (the global batch: every data input, whole).
    pub fn step(&self, batch: &HashMap<ValueId, Tensor>) -> Result<StepReport, Error> {
        self.session
            .step(batch, false)
            .map_err(|e| Error::Run(e.to_string()))
    }

    /// One step that also returns every parameter's synchronised gradient, whole.
    pub fn step_with_grads(&self, batch: &HashMap<ValueId, Tensor>) -> Result<StepReport, Error> {
        self.session
            .step(batch, true)
            .map_err(|e| Error::Run(e.to_string()))
    }

    /// Every parameter's current value, whole: `(name, shape, values)`.
    pub fn params(&self) -> Result<Vec<autopar_runtime::weights::NamedTensor>, Error> {
        self.session.params().map_err(|e| Error::Run(e.to_string()))
    }

    /// Writes the whole parameters as safetensors (resumable with
    /// [`Parallelized::with_checkpoint`], on any mesh).
    pub fn save(&self, path: &Path) -> Result<(), Error> {
        self.session
            .save(path)
            .map_err(|e| Error::Run(e.to_string()))
    }
}
