//! A training session on N simulated ranks: one [`RankState`] per rank, each step run as N
//! threads exchanging data through [`Loopback`](crate::comm::Loopback) (the CPU test backend
//! and the correctness oracle: N ranks must equal one device).
//!
//! Rank states live between steps behind one mutex each (a rank's thread is the only one that
//! locks it during a step); tensors are `Send` and never shared between threads.

use crate::comm::{run_ranks, RankFailure};
use crate::exec::{ExecError, OptimizerConfig, RankState};
use crate::weights::{self, NamedTensor};
use autopar_analyzer::graph::{Graph, ValueId};
use autopar_analyzer::Tensor as RefTensor;
use autopar_generator::Program;
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tch::Device;

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error(transparent)]
    Rank(#[from] RankFailure),
    #[error("rank {rank}: {source}")]
    Setup {
        rank: usize,
        #[source]
        source: ExecError,
    },
    #[error("{0}")]
    Gather(String),
}

/// One step's result, gathered over the ranks.
#[derive(Debug, Clone)]
pub struct StepReport {
    /// The loss (every rank holds the same value; rank 0's).
    pub loss: f64,
    /// Wall-clock seconds of the step (all ranks).
    pub seconds: f64,
    /// The most seconds any rank spent in collectives.
    pub comm_seconds: f64,
    /// With `keep_grads`: every parameter's full gradient, by name, in update order.
    pub grads: Vec<NamedTensor>,
    /// The most bytes any rank's computed values held at once ([`StepOutput::peak_bytes`]).
    ///
    /// [`StepOutput::peak_bytes`]: crate::exec::StepOutput::peak_bytes
    pub peak_bytes: u64,
}

pub struct Session {
    program: Arc<Program>,
    states: Vec<Mutex<RankState>>,
}

impl Session {
    /// Loads every rank's blocks (see [`RankState::new`]).
    pub fn new(
        program: Arc<Program>,
        graph: &Graph,
        base_dir: &Path,
        seed: u64,
        optimizer: OptimizerConfig,
    ) -> Result<Session, SessionError> {
        let states = (0..program.world_size())
            .map(|rank| {
                RankState::new(
                    program.clone(),
                    graph,
                    rank,
                    Device::Cpu,
                    base_dir,
                    seed,
                    optimizer,
                )
                .map(Mutex::new)
                .map_err(|source| SessionError::Setup { rank, source })
            })
            .collect::<Result<_, _>>()?;
        Ok(Session { program, states })
    }

    pub fn program(&self) -> &Program {
        &self.program
    }

    /// Runs one step on all ranks. A failing rank stops every rank with its error.
    pub fn step(
        &self,
        feeds: &HashMap<ValueId, RefTensor>,
        keep_grads: bool,
    ) -> Result<StepReport, SessionError> {
        let t0 = Instant::now();
        let outs = run_ranks(self.program.world_size(), |mut comm| {
            let rank = crate::comm::Communicator::rank(&comm);
            let mut st = self.states[rank].lock().unwrap_or_else(|e| e.into_inner());
            let out = st
                .step(&mut comm, feeds, keep_grads)
                .map_err(|e| e.to_string())?;
            let grads: Vec<Vec<f32>> = out.grads.iter().map(to_f32).collect::<Result<_, _>>()?;
            Ok((out.loss, grads, out.comm_seconds, out.peak_bytes))
        })?;
        let seconds = t0.elapsed().as_secs_f64();
        let loss = outs.first().map(|o| o.0).unwrap_or(f64::NAN);
        let comm_seconds = outs.iter().map(|o| o.2).fold(0.0, f64::max);
        let peak_bytes = outs.iter().map(|o| o.3).max().unwrap_or(0);
        let mut grads = vec![];
        if keep_grads {
            for (k, u) in self.program.updates.iter().enumerate() {
                let blocks: Vec<Vec<f32>> = outs.iter().map(|o| o.1[k].clone()).collect();
                grads.push(self.gather(u.param, &blocks)?);
            }
        }
        Ok(StepReport {
            loss,
            seconds,
            comm_seconds,
            grads,
            peak_bytes,
        })
    }

    /// Every parameter's current full value, by name, in update order.
    pub fn params(&self) -> Result<Vec<NamedTensor>, SessionError> {
        let mut out = vec![];
        for u in &self.program.updates {
            let blocks: Vec<Vec<f32>> = self
                .states
                .iter()
                .map(|s| {
                    let s = s.lock().unwrap_or_else(|e| e.into_inner());
                    s.leaf(u.param)
                        .ok_or_else(|| "parameter block missing".to_string())
                        .and_then(to_f32)
                })
                .collect::<Result<_, _>>()
                .map_err(SessionError::Gather)?;
            out.push(self.gather(u.param, &blocks)?);
        }
        Ok(out)
    }

    /// Saves the gathered parameters as safetensors (a plan-independent checkpoint).
    pub fn save(&self, path: &Path) -> Result<(), SessionError> {
        let params = self.params()?;
        weights::save_safetensors(path, &params).map_err(|e| SessionError::Gather(e.to_string()))
    }

    fn gather(
        &self,
        slot: autopar_generator::SlotId,
        blocks: &[Vec<f32>],
    ) -> Result<NamedTensor, SessionError> {
        let s = self.program.slot(slot);
        let full = weights::unshard(blocks, &s.global.shape, &s.spec, &self.program.mesh)
            .map_err(|e| SessionError::Gather(e.to_string()))?;
        Ok((s.name.clone(), s.global.shape.clone(), full))
    }
}

fn to_f32(t: &tch::Tensor) -> Result<Vec<f32>, String> {
    t.f_to_kind(tch::Kind::Float)
        .and_then(|t| t.f_contiguous())
        .and_then(|t| t.f_flatten(0, -1))
        .and_then(|t| Vec::<f32>::try_from(&t))
        .map_err(|e| e.to_string())
}
