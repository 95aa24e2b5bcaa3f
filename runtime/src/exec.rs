//! The executor: runs the generator's [`Program`] on one rank, with tch kernels (the one
//! lowering in [`crate::lower`]) and a [`Communicator`] for the collectives.
//!
//! A [`RankState`] owns what outlives a step: the rank's blocks of parameters (in their storage
//! layout), buffers and constants, and the optimizer state of its parameter blocks. A step
//! fills the data inputs with the rank's blocks of the global batch, runs the instructions in
//! order, frees every intermediate after its last reader, and applies the optimizer to the
//! local blocks with the synchronised gradients. All ranks of a program run the same
//! instructions; only their blocks and groups differ (see `autopar_generator::program`).
//!
//! Collectives move the tensors' bytes as `f32` words (the [`Communicator`] carries `f32`): a
//! float tensor as is, 64-bit types as two words per element, the other integer and boolean
//! types widened to 64 bits first. Sums (all-reduce, reduce-scatter, statistics) apply to float
//! tensors only; the generator never leaves integers as partial sums.

use crate::collective::{run_move, sum_over, CollectiveError, TensorComm};
use crate::comm::CommError;
use crate::lower::{self, LowerCtx, LowerError};
use crate::weights::{self, WeightError};
use autopar_analyzer::graph::{Graph, ValueDef, ValueId};
use autopar_analyzer::TensorType;
use autopar_generator::program::{Instr, LeafKind, Program, SlotId};
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use tch::{Device, Kind, Tensor};

/// The optimizer applied to each rank's parameter blocks.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum OptimizerConfig {
    /// `p -= lr (g + wd p)`, with heavy-ball momentum when `momentum > 0`.
    Sgd {
        lr: f64,
        momentum: f64,
        weight_decay: f64,
    },
    /// AdamW (decoupled weight decay), bias-corrected moments.
    AdamW {
        lr: f64,
        beta1: f64,
        beta2: f64,
        eps: f64,
        weight_decay: f64,
    },
}

impl Default for OptimizerConfig {
    fn default() -> Self {
        OptimizerConfig::AdamW {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

/// Why a rank's step failed; names the instruction or tensor.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("{place}: {source}")]
    Lower {
        place: String,
        #[source]
        source: LowerError,
    },
    #[error("{place}: {source}")]
    Comm {
        place: String,
        #[source]
        source: CommError,
    },
    #[error(transparent)]
    Weight(#[from] WeightError),
    #[error("{place}: libtorch failed: {source}")]
    Torch {
        place: String,
        #[source]
        source: tch::TchError,
    },
    #[error("{0}")]
    Input(String),
}

/// What a step gives back.
pub struct StepOutput {
    pub loss: f64,
    /// Seconds this rank spent in collectives (resharding moves), waiting included.
    pub comm_seconds: f64,
    /// With `keep_grads`: each parameter's synchronised gradient block (storage layout), in
    /// the order of [`Program::updates`].
    pub grads: Vec<Tensor>,
    /// The most bytes this rank's computed values (every slot but the leaves) held at once
    /// during the step, counted per slot (a view counts as its own bytes).
    pub peak_bytes: u64,
}

/// One rank's persistent state (see the module doc).
pub struct RankState {
    program: Arc<Program>,
    rank: usize,
    device: Device,
    leaves: HashMap<SlotId, Tensor>,
    optimizer: OptimizerConfig,
    /// Per update: first and second moments (AdamW) or the momentum buffer (SGD).
    moments: Vec<Option<(Tensor, Tensor)>>,
    steps_done: u64,
    /// Per slot: the last instruction that reads it (`usize::MAX`: kept to the end,
    /// [`NEVER_READ`]: dropped as soon as it is made).
    last_use: Vec<usize>,
}

/// [`RankState::last_use`] of a slot no instruction reads (an output only a recomputed
/// forward's discarded copy makes, or a statistic nobody needs).
const NEVER_READ: usize = usize::MAX - 1;

/// Bytes of a tensor's elements.
fn tensor_bytes(t: &Tensor) -> u64 {
    (t.numel() * t.kind().elt_size_in_bytes()) as u64
}

fn torch_err(place: &str) -> impl FnOnce(tch::TchError) -> ExecError + '_ {
    move |source| ExecError::Torch {
        place: place.to_string(),
        source,
    }
}

/// Weight values (as the weights module reads them, f32) as a tensor of `shape`, `kind` on
/// `device`.
fn weight_tensor(
    values: &[f32],
    shape: &[usize],
    kind: Kind,
    device: Device,
) -> Result<Tensor, tch::TchError> {
    let shape: Vec<i64> = shape.iter().map(|&n| n as i64).collect();
    Tensor::from_slice(values)
        .f_reshape(&shape)?
        .f_to_kind(kind)?
        .f_to(device)
}

/// `t`'s block at `offsets` of `shape` (narrow per dim).
fn block(t: &Tensor, offsets: &[usize], shape: &[usize]) -> Result<Tensor, tch::TchError> {
    let mut b = t.shallow_clone();
    for (d, (&o, &n)) in offsets.iter().zip(shape).enumerate() {
        if b.size()[d] != n as i64 {
            b = b.f_narrow(d as i64, o as i64, n as i64)?;
        }
    }
    Ok(b)
}

impl RankState {
    /// Loads rank `rank`'s blocks of every parameter, buffer and constant of `graph` (the
    /// training graph `program` was generated from): the model's own weights where present
    /// (inline, or external files under `base_dir`), else the deterministic seeded init.
    pub fn new(
        program: Arc<Program>,
        graph: &Graph,
        rank: usize,
        device: Device,
        base_dir: &Path,
        seed: u64,
        optimizer: OptimizerConfig,
    ) -> Result<Self, ExecError> {
        let mut leaves = HashMap::new();
        for leaf in &program.leaves {
            let slot = program.slot(leaf.slot);
            let d = graph.value(slot.value);
            let kind = lower::kind_of(slot.global.dtype);
            let t = match (&leaf.kind, &d.def) {
                (LeafKind::Input, _) => continue,
                (_, ValueDef::Param { data } | ValueDef::Buffer { data }) => {
                    let full = weights::load_weight(&d.name, &d.ty, data, base_dir, seed)?;
                    let mine = weights::shard(&full, &d.ty.shape, &slot.spec, &program.mesh, rank)?;
                    weight_tensor(&mine, &slot.local.shape, kind, device)
                        .map_err(torch_err(&d.name))?
                }
                (_, ValueDef::Const(c)) => {
                    let full = lower::to_tch(c, device).map_err(|source| ExecError::Lower {
                        place: format!("constant {}", slot.value),
                        source,
                    })?;
                    let offsets = program.block_offsets(&slot.spec, &slot.global.shape, rank);
                    block(&full, &offsets, &slot.local.shape).map_err(torch_err(&d.name))?
                }
                _ => {
                    return Err(ExecError::Input(format!(
                        "leaf {} ({}) is not a weight or constant of the graph",
                        leaf.slot, d.name
                    )))
                }
            };
            leaves.insert(leaf.slot, t);
        }
        let mut last_use = vec![NEVER_READ; program.slots.len()];
        for (i, instr) in program.instrs.iter().enumerate() {
            let reads: Vec<SlotId> = match instr {
                Instr::Compute(c) => c.inputs.clone(),
                Instr::Move(m) => vec![m.input],
            };
            for s in reads {
                last_use[s.0 as usize] = i;
            }
        }
        let keep = std::iter::once(program.loss)
            .chain(program.updates.iter().flat_map(|u| [u.param, u.grad]))
            .chain(program.buffer_updates.iter().flat_map(|&(a, b)| [a, b]))
            .chain(program.leaves.iter().map(|l| l.slot));
        for s in keep {
            last_use[s.0 as usize] = usize::MAX;
        }
        let moments = program.updates.iter().map(|_| None).collect();
        Ok(RankState {
            program,
            rank,
            device,
            leaves,
            optimizer,
            moments,
            steps_done: 0,
            last_use,
        })
    }

    pub fn rank(&self) -> usize {
        self.rank
    }
    pub fn program(&self) -> &Program {
        &self.program
    }

    /// The rank's current block of each parameter, in the order of [`Program::updates`].
    pub fn param_blocks(&self) -> Vec<&Tensor> {
        self.program
            .updates
            .iter()
            .filter_map(|u| self.leaves.get(&u.param))
            .collect()
    }

    /// The rank's block of every leaf (parameters, buffers), by slot.
    pub fn leaf(&self, s: SlotId) -> Option<&Tensor> {
        self.leaves.get(&s)
    }

    /// Runs one training step. `feeds` holds the global batch (every data input); each rank
    /// takes its block.
    pub fn step(
        &mut self,
        comm: &mut dyn TensorComm,
        feeds: &HashMap<ValueId, autopar_analyzer::Tensor>,
        keep_grads: bool,
    ) -> Result<StepOutput, ExecError> {
        let _guard = tch::no_grad_guard();
        let p = self.program.clone();
        let mut slots: Vec<Option<Tensor>> = (0..p.slots.len()).map(|_| None).collect();
        // under bf16 mixed precision, every float value is computed in bf16: the leaves'
        // compute copies here, each node's float outputs below
        let compute = |t: Tensor| -> Result<Tensor, tch::TchError> {
            if p.mixed_bf16 && t.is_floating_point() && t.kind() != Kind::BFloat16 {
                t.f_to_kind(Kind::BFloat16)
            } else {
                Ok(t)
            }
        };
        for (s, t) in &self.leaves {
            slots[s.0 as usize] =
                Some(compute(t.shallow_clone()).map_err(torch_err("a weight's compute copy"))?);
        }
        for leaf in p.leaves.iter().filter(|l| l.kind == LeafKind::Input) {
            let slot = p.slot(leaf.slot);
            let global = feeds.get(&slot.value).ok_or_else(|| {
                ExecError::Input(format!("no data for input {} ({})", slot.value, slot.name))
            })?;
            if global.shape != slot.global.shape {
                return Err(ExecError::Input(format!(
                    "input {} has shape {:?}, the program expects {}",
                    slot.name, global.shape, slot.global
                )));
            }
            let global = lower::to_tch(global, Device::Cpu).map_err(|source| ExecError::Lower {
                place: format!("input {}", slot.name),
                source,
            })?;
            let offsets = p.block_offsets(&slot.spec, &slot.global.shape, self.rank);
            let t = block(&global, &offsets, &slot.local.shape)
                .and_then(|t| t.f_to_kind(lower::kind_of(slot.global.dtype)))
                .and_then(|t| t.f_to(self.device))
                .and_then(compute)
                .map_err(torch_err(&slot.name))?;
            slots[leaf.slot.0 as usize] = Some(t);
        }
        let mut comm_seconds = 0.0;
        let (mut held, mut peak_bytes) = (0u64, 0u64);
        for (i, instr) in p.instrs.iter().enumerate() {
            match instr {
                Instr::Compute(c) => {
                    let place = format!("node {} ({})", c.node, c.name);
                    let ins: Vec<&Tensor> = c
                        .inputs
                        .iter()
                        .map(|s| {
                            slots[s.0 as usize].as_ref().ok_or_else(|| {
                                ExecError::Input(format!("{place}: input {s} is not computed"))
                            })
                        })
                        .collect::<Result<_, _>>()?;
                    let outputs: Vec<TensorType> =
                        c.outputs.iter().map(|&s| p.slot(s).local.clone()).collect();
                    let global_inputs: Vec<TensorType> =
                        c.inputs.iter().map(|&s| p.slot(s).global.clone()).collect();
                    let global_outputs: Vec<TensorType> = c
                        .outputs
                        .iter()
                        .map(|&s| p.slot(s).global.clone())
                        .collect();
                    let offsets: Vec<Vec<usize>> = c
                        .inputs
                        .iter()
                        .map(|&s| {
                            let slot = p.slot(s);
                            p.block_offsets(&slot.spec, &slot.global.shape, self.rank)
                        })
                        .collect();
                    let group = p.group(self.rank, &c.sync_axes);
                    let mut group_sum = |t: Tensor| -> Result<Tensor, LowerError> {
                        if group.len() <= 1 {
                            return Ok(t);
                        }
                        sum_over(&mut *comm, &group, &t)
                            .map_err(|e| LowerError::GroupSum(e.to_string()))
                    };
                    let mut ctx = LowerCtx {
                        outputs: &outputs,
                        global_inputs: &global_inputs,
                        global_outputs: &global_outputs,
                        input_offsets: &offsets,
                        group_sum: &mut group_sum,
                        rng_step: self.steps_done,
                        device: self.device,
                    };
                    let outs = lower::lower(&c.op, &ins, &mut ctx)
                        .map_err(|source| ExecError::Lower { place, source })?;
                    for (&s, t) in c.outputs.iter().zip(outs) {
                        let t = compute(t).map_err(torch_err(&c.name))?;
                        held += tensor_bytes(&t);
                        slots[s.0 as usize] = Some(t);
                    }
                }
                Instr::Move(m) => {
                    let place = format!(
                        "{} of {} ({})",
                        m.op,
                        p.slot(m.input).name,
                        p.slot(m.input).value
                    );
                    let input = slots[m.input.0 as usize].as_ref().ok_or_else(|| {
                        ExecError::Input(format!("{place}: input {} is not computed", m.input))
                    })?;
                    let group = p.group(self.rank, &[m.op.axis()]);
                    let coord = self.program.mesh.coords(self.rank)[m.op.axis()];
                    let t0 = std::time::Instant::now();
                    let out =
                        run_move(&mut *comm, &m.op, &group, coord, input).map_err(|e| match e {
                            CollectiveError::Comm(source) => ExecError::Comm {
                                place: place.clone(),
                                source,
                            },
                            CollectiveError::Torch(source) => ExecError::Torch {
                                place: place.clone(),
                                source,
                            },
                            CollectiveError::Other(msg) => {
                                ExecError::Input(format!("{place}: {msg}"))
                            }
                        })?;
                    comm_seconds += t0.elapsed().as_secs_f64();
                    held += tensor_bytes(&out);
                    slots[m.output.0 as usize] = Some(out);
                }
            }
            peak_bytes = peak_bytes.max(held);
            let written: &[SlotId] = match instr {
                Instr::Compute(c) => &c.outputs,
                Instr::Move(m) => std::slice::from_ref(&m.output),
            };
            for s in written {
                if self.last_use[s.0 as usize] == NEVER_READ {
                    if let Some(t) = slots[s.0 as usize].take() {
                        held = held.saturating_sub(tensor_bytes(&t));
                    }
                }
            }
            let reads: &[SlotId] = match instr {
                Instr::Compute(c) => &c.inputs,
                Instr::Move(m) => std::slice::from_ref(&m.input),
            };
            for s in reads {
                if self.last_use[s.0 as usize] == i {
                    if let Some(t) = slots[s.0 as usize].take() {
                        if !self.leaves.contains_key(s) {
                            held = held.saturating_sub(tensor_bytes(&t));
                        }
                    }
                }
            }
        }
        let loss = slots[p.loss.0 as usize]
            .as_ref()
            .ok_or_else(|| ExecError::Input("the loss was not computed".into()))?
            .f_double_value(&[])
            .map_err(torch_err("the loss"))?;
        let mut grads = vec![];
        self.steps_done += 1;
        for (k, u) in p.updates.iter().enumerate() {
            let name = p.slot(u.param).name.clone();
            let g = slots[u.grad.0 as usize].take().ok_or_else(|| {
                ExecError::Input(format!("the gradient of {name} was not computed"))
            })?;
            let param = self
                .leaves
                .get_mut(&u.param)
                .ok_or_else(|| ExecError::Input(format!("parameter {name} is not loaded")))?;
            apply_optimizer(
                &self.optimizer,
                self.steps_done,
                param,
                &g,
                &mut self.moments[k],
            )
            .map_err(torch_err(&name))?;
            if keep_grads {
                grads.push(g);
            }
        }
        for &(b, v) in &p.buffer_updates {
            let name = p.slot(b).name.clone();
            let new = slots[v.0 as usize].take().ok_or_else(|| {
                ExecError::Input(format!("the new value of {name} was not computed"))
            })?;
            if let Some(t) = self.leaves.get_mut(&b) {
                t.f_copy_(&new).map_err(torch_err(&name))?;
            }
        }
        Ok(StepOutput {
            loss,
            comm_seconds,
            grads,
            peak_bytes,
        })
    }
}

fn apply_optimizer(
    opt: &OptimizerConfig,
    step: u64,
    param: &mut Tensor,
    grad: &Tensor,
    state: &mut Option<(Tensor, Tensor)>,
) -> Result<(), tch::TchError> {
    let g = grad.f_to_kind(param.kind())?;
    match *opt {
        OptimizerConfig::Sgd {
            lr,
            momentum,
            weight_decay,
        } => {
            let mut d = if weight_decay != 0.0 {
                g.f_add(&param.f_mul_scalar(weight_decay)?)?
            } else {
                g
            };
            if momentum != 0.0 {
                let buf = match state.take() {
                    None => d.f_detach_copy()?,
                    Some((buf, _)) => buf.f_mul_scalar(momentum)?.f_add(&d)?,
                };
                d = buf.shallow_clone();
                *state = Some((buf, Tensor::zeros([0], (Kind::Float, Device::Cpu))));
            }
            let _ = param.f_sub_(&d.f_mul_scalar(lr)?)?;
        }
        OptimizerConfig::AdamW {
            lr,
            beta1,
            beta2,
            eps,
            weight_decay,
        } => {
            let (m, v) = match state.take() {
                Some(s) => s,
                None => (g.f_zeros_like()?, g.f_zeros_like()?),
            };
            let m = m
                .f_mul_scalar(beta1)?
                .f_add(&g.f_mul_scalar(1.0 - beta1)?)?;
            let v = v
                .f_mul_scalar(beta2)?
                .f_add(&g.f_mul(&g)?.f_mul_scalar(1.0 - beta2)?)?;
            let t = step as i32;
            let m_hat = m.f_div_scalar(1.0 - beta1.powi(t))?;
            let v_hat = v.f_div_scalar(1.0 - beta2.powi(t))?;
            if weight_decay != 0.0 {
                let _ = param.f_mul_scalar_(1.0 - lr * weight_decay)?;
            }
            let upd = m_hat.f_div(&v_hat.f_sqrt()?.f_add_scalar(eps)?)?;
            let _ = param.f_sub_(&upd.f_mul_scalar(lr)?)?;
            *state = Some((m, v));
        }
    }
    Ok(())
}

/// Runs `graph` once on one device, without a plan: every node through the one lowering,
/// weights from the graph (inline, external files under `base_dir`, else the seeded init),
/// `feeds` for its data inputs. Returns the graph's outputs in order. What the runtime's
/// forward is checked with against reference outputs (onnxruntime, PyTorch).
pub fn run_graph(
    graph: &Graph,
    feeds: &HashMap<ValueId, autopar_analyzer::Tensor>,
    base_dir: &Path,
    seed: u64,
    device: Device,
) -> Result<Vec<Tensor>, ExecError> {
    let _guard = tch::no_grad_guard();
    let mut vals: Vec<Option<Tensor>> = (0..graph.values.len()).map(|_| None).collect();
    for (v, d) in graph.values.iter() {
        let kind = lower::kind_of(d.ty.dtype);
        let t = match &d.def {
            ValueDef::Input => {
                let t = feeds.get(&v).ok_or_else(|| {
                    ExecError::Input(format!("no data for input {v} ({})", d.name))
                })?;
                if t.shape != d.ty.shape {
                    return Err(ExecError::Input(format!(
                        "input {} has shape {:?}, the model expects {}",
                        d.name, t.shape, d.ty
                    )));
                }
                lower::to_tch(t, device).map_err(|source| ExecError::Lower {
                    place: format!("input {}", d.name),
                    source,
                })?
            }
            ValueDef::Param { data } | ValueDef::Buffer { data } => {
                let full = weights::load_weight(&d.name, &d.ty, data, base_dir, seed)?;
                weight_tensor(&full, &d.ty.shape, kind, device).map_err(torch_err(&d.name))?
            }
            ValueDef::Const(c) => lower::to_tch(c, device).map_err(|source| ExecError::Lower {
                place: format!("constant {v}"),
                source,
            })?,
            ValueDef::Node { .. } => continue,
        };
        vals[v.0 as usize] = Some(t);
    }
    for (n, node) in graph.nodes.iter() {
        let place = format!("node {n} ({})", node.name);
        let ins: Vec<&Tensor> = node
            .inputs
            .iter()
            .map(|v| {
                vals[v.0 as usize]
                    .as_ref()
                    .ok_or_else(|| ExecError::Input(format!("{place}: input {v} is not computed")))
            })
            .collect::<Result<_, _>>()?;
        let types: Vec<TensorType> = node.inputs.iter().map(|&v| graph.ty(v).clone()).collect();
        let outs: Vec<TensorType> = node.outputs.iter().map(|&v| graph.ty(v).clone()).collect();
        let offsets: Vec<Vec<usize>> = types.iter().map(|t| vec![0; t.rank()]).collect();
        let mut identity = lower::identity_sum;
        let mut ctx = LowerCtx {
            outputs: &outs,
            global_inputs: &types,
            global_outputs: &outs,
            input_offsets: &offsets,
            group_sum: &mut identity,
            rng_step: 0,
            device,
        };
        let results = lower::lower(&node.op, &ins, &mut ctx)
            .map_err(|source| ExecError::Lower { place, source })?;
        for (&v, t) in node.outputs.iter().zip(results) {
            vals[v.0 as usize] = Some(t);
        }
    }
    graph
        .outputs
        .iter()
        .map(|v| {
            vals[v.0 as usize]
                .as_ref()
                .map(Tensor::shallow_clone)
                .ok_or_else(|| ExecError::Input(format!("output {v} is not computed")))
        })
        .collect()
}
