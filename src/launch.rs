//! Multi-process runs: one rank per process, started by `torchrun` (or anything that sets the
//! same environment: `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`).
//!
//! Why: one process driving every GPU of a host stops at the host; several hosts need one
//! process per GPU, and the tool people already launch those with is torchrun:
//! `torchrun --nproc-per-node 4 --no-python autopar run ... --mesh 4 --device cuda`.
//!
//! How a run goes (every rank the same):
//! 1. [`World::from_env`] reads the environment and meets the other ranks at the
//!    [`Rendezvous`] (rank 0 hosts it on `MASTER_ADDR`). Under torchrun, torchrun's own agent
//!    already listens on `MASTER_PORT` (`TORCHELASTIC_USE_AGENT_STORE=True`), so ours takes the
//!    next port; `AUTOPAR_MASTER_PORT` chooses another.
//! 2. [`World::autoparallelize`]: `WORLD_SIZE` must be the mesh's device count; rank 0 plans
//!    and sends its plan to the others, which generate their programs from it (an ILP with a
//!    time limit need not give every process the same plan).
//! 3. [`train`]: the ranks compare their settings (steps, seed, optimizer, device, program), set
//!    up their collectives (sockets for `--device cpu`, NCCL on GPU `LOCAL_RANK` for
//!    `--device cuda`), load their blocks and train; rank 0 prints the step lines, the other
//!    ranks print nothing but errors. `--save` gathers the blocks on rank 0, which writes the
//!    checkpoint. `--verify` is refused ([`NO_VERIFY`]).
//! 4. [`World::run`] wraps it all: an error on any rank is sent through the rendezvous, so every
//!    other rank stops with an error naming that rank (their collectives are aborted: sockets
//!    carry the abort, NCCL communicators are aborted by their watchdog). `AUTOPAR_TIMEOUT`
//!    (seconds, default 300) bounds every wait: connecting, each collective, each GPU step.

use crate::{autoparallelize, AutoOptions, Error, LoadOptions, Parallelized};
use autopar_analyzer::graph::{Graph, ValueId};
use autopar_analyzer::Tensor;
use autopar_runtime::exec::{OptimizerConfig, RankState};
use autopar_runtime::rendezvous::{self, Rendezvous, RendezvousConfig};
use autopar_runtime::tch::{self, Device};
use autopar_runtime::tcp_comm::TcpComm;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Why `--verify` is refused under a multi-process launch.
pub const NO_VERIFY: &str = "--verify compares against one device inside one process; under a multi-process launch, compare the losses with those of the same command run without torchrun (one process, the same --mesh)";

/// One rank's launch environment.
#[derive(Debug, Clone, PartialEq)]
pub struct LaunchEnv {
    pub rank: usize,
    pub world_size: usize,
    /// The GPU of this rank (`--device cuda`).
    pub local_rank: usize,
    /// Processes on this host (CPU threads are shared among them).
    pub local_world_size: usize,
    pub master_addr: String,
    /// The port of autopar's rendezvous (see the module doc).
    pub port: u16,
    /// How long any wait lasts (`AUTOPAR_TIMEOUT`).
    pub timeout: Duration,
}

fn usage(msg: impl Into<String>) -> Error {
    Error::Usage(msg.into())
}

impl LaunchEnv {
    /// From the process environment; `None` for a single-process run.
    pub fn from_env() -> Result<Option<LaunchEnv>, Error> {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    /// From `var` (the environment's lookup). A multi-process run when `RANK` and `WORLD_SIZE`
    /// are set and `WORLD_SIZE` > 1, or when `AUTOPAR_MULTIPROCESS=1`;
    /// `AUTOPAR_MULTIPROCESS=0` ignores a launcher's environment.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Option<LaunchEnv>, Error> {
        let forced = match var("AUTOPAR_MULTIPROCESS").as_deref().map(str::trim) {
            None | Some("") => false,
            Some("1") => true,
            Some("0") => return Ok(None),
            Some(v) => {
                return Err(usage(format!(
                    "AUTOPAR_MULTIPROCESS={v:?}: expected 1 (one rank per process) or 0 (ignore RANK and WORLD_SIZE)"
                )))
            }
        };
        let number = |name: &str| -> Result<Option<usize>, Error> {
            var(name)
                .map(|v| {
                    v.trim().parse::<usize>().map_err(|_| {
                        usage(format!("{name}={v:?}: expected a non-negative integer"))
                    })
                })
                .transpose()
        };
        let (rank, world_size) = match (number("RANK")?, number("WORLD_SIZE")?) {
            (None, None) if !forced => return Ok(None),
            (Some(r), Some(w)) => (r, w),
            (r, _) => {
                return Err(usage(format!(
                    "{} is set but {} is not: a multi-process run needs RANK and WORLD_SIZE (torchrun sets both)",
                    if r.is_some() { "RANK" } else { "WORLD_SIZE" },
                    if r.is_some() { "WORLD_SIZE" } else { "RANK" }
                )))
            }
        };
        if world_size == 0 || rank >= world_size {
            return Err(usage(format!(
                "RANK={rank} is not a rank of WORLD_SIZE={world_size} (ranks are 0 to WORLD_SIZE-1)"
            )));
        }
        if world_size == 1 && !forced {
            return Ok(None);
        }
        let master_addr = var("MASTER_ADDR")
            .filter(|a| !a.trim().is_empty())
            .ok_or_else(|| {
                usage("MASTER_ADDR is not set: a multi-process run meets at rank 0's host (torchrun sets it)")
            })?;
        let port_of = |name: &str, v: &str| -> Result<u16, Error> {
            v.trim()
                .parse::<u16>()
                .map_err(|_| usage(format!("{name}={v:?}: expected a port number")))
        };
        let master_port = var("MASTER_PORT").ok_or_else(|| {
            usage("MASTER_PORT is not set: a multi-process run meets at rank 0's port (torchrun sets it)")
        })?;
        let master_port = port_of("MASTER_PORT", &master_port)?;
        let port = match var("AUTOPAR_MASTER_PORT") {
            Some(p) => port_of("AUTOPAR_MASTER_PORT", &p)?,
            // torchrun's agent serves its own store on MASTER_PORT
            None if var("TORCHELASTIC_USE_AGENT_STORE").as_deref() == Some("True") => {
                master_port.checked_add(1).ok_or_else(|| {
                    usage("MASTER_PORT=65535: torchrun's store holds it and there is no next port; set AUTOPAR_MASTER_PORT")
                })?
            }
            None => master_port,
        };
        let local_rank = number("LOCAL_RANK")?.unwrap_or(rank);
        let local_world_size = number("LOCAL_WORLD_SIZE")?.unwrap_or(world_size).max(1);
        let timeout = match var("AUTOPAR_TIMEOUT") {
            Some(v) => rendezvous::parse_timeout(&v).map_err(usage)?,
            None => rendezvous::DEFAULT_TIMEOUT,
        };
        Ok(Some(LaunchEnv {
            rank,
            world_size,
            local_rank,
            local_world_size,
            master_addr: master_addr.trim().to_string(),
            port,
            timeout,
        }))
    }
}

/// This process's rank in a multi-process world, met at the rendezvous.
pub struct World {
    env: LaunchEnv,
    rdzv: Rendezvous,
}

impl World {
    /// `None` for a single-process run (see [`LaunchEnv::from_vars`]); otherwise meets the
    /// other ranks (waiting at most `AUTOPAR_TIMEOUT`).
    pub fn from_env() -> Result<Option<World>, Error> {
        LaunchEnv::from_env()?.map(World::connect).transpose()
    }

    pub fn connect(env: LaunchEnv) -> Result<World, Error> {
        let rdzv = Rendezvous::connect(&RendezvousConfig {
            master_addr: env.master_addr.clone(),
            master_port: env.port,
            rank: env.rank,
            world_size: env.world_size,
            timeout: env.timeout,
        })
        .map_err(|e| Error::Run(e.to_string()))?;
        Ok(World { env, rdzv })
    }

    pub fn rank(&self) -> usize {
        self.env.rank
    }

    pub fn world_size(&self) -> usize {
        self.env.world_size
    }

    pub fn env(&self) -> &LaunchEnv {
        &self.env
    }

    pub fn rendezvous(&self) -> &Rendezvous {
        &self.rdzv
    }

    /// Runs this rank's work. An error is sent to every other rank (theirs then fail naming
    /// this rank) and returned with this rank's number; success ends with a last barrier.
    pub fn run<T>(self, f: impl FnOnce(&World) -> anyhow::Result<T>) -> anyhow::Result<T> {
        let rank = self.env.rank;
        match f(&self) {
            Ok(v) => {
                self.rdzv
                    .finish()
                    .map_err(|e| anyhow::anyhow!("rank {rank}: {e}"))?;
                Ok(v)
            }
            Err(e) => {
                let msg = format!("{e:#}");
                self.rdzv.fail(&msg);
                if msg.starts_with(&format!("rank {rank}:")) {
                    Err(e)
                } else {
                    Err(e.context(format!("rank {rank}")))
                }
            }
        }
    }

    /// [`autoparallelize`] for this rank: checks that the mesh has one device per process,
    /// then rank 0 plans (or takes `options.use_plan`) and every other rank generates its
    /// program from rank 0's plan.
    pub fn autoparallelize(
        &self,
        model: &str,
        meta_inputs: &LoadOptions,
        options: &AutoOptions,
    ) -> Result<Parallelized, Error> {
        let shape = &options.plan.mesh_shape;
        let devices: usize = shape.iter().product();
        if devices != self.env.world_size {
            let mesh = shape
                .iter()
                .map(|n| n.to_string())
                .collect::<Vec<_>>()
                .join("x");
            return Err(usage(format!(
                "WORLD_SIZE is {} but the mesh {mesh} has {devices} devices: start one process per device of the mesh (torchrun --nproc-per-node {devices} on one host)",
                self.env.world_size
            )));
        }
        let run_err = |e: rendezvous::RendezvousError| Error::Run(e.to_string());
        if self.env.rank == 0 {
            let par = autoparallelize(model, meta_inputs, options)?;
            let text = serde_json::to_vec(&par.plan).map_err(|e| {
                Error::Run(format!("cannot write the plan for the other ranks: {e}"))
            })?;
            self.rdzv.broadcast(&text).map_err(run_err)?;
            Ok(par)
        } else {
            let text = self.rdzv.broadcast(&[]).map_err(run_err)?;
            let plan = serde_json::from_slice(&text)
                .map_err(|e| Error::Run(format!("cannot read rank 0's plan: {e}")))?;
            let mut options = options.clone();
            options.use_plan = Some(plan);
            autoparallelize(model, meta_inputs, &options)
        }
    }
}

/// What a multi-process training run does, beside the model.
#[derive(Debug, Clone)]
pub struct RunSettings<'a> {
    /// `cpu` or `cuda`.
    pub device: &'a str,
    pub steps: usize,
    pub seed: u64,
    pub optimizer: OptimizerConfig,
    /// Where rank 0 writes the trained parameters (whole, safetensors).
    pub save: Option<&'a Path>,
    /// The batch's size in the unit the throughput counts (tokens, samples).
    pub units: (usize, &'static str),
    /// The plan's predicted step time (printed beside the measured one).
    pub predicted_step_s: f64,
}

/// One step's numbers from every rank, gathered on rank 0.
struct StepStats {
    loss: f64,
    seconds: f64,
    comm_seconds: f64,
    device_bytes: f64,
}

impl StepStats {
    fn encode(&self) -> Vec<u8> {
        [
            self.loss,
            self.seconds,
            self.comm_seconds,
            self.device_bytes,
        ]
        .iter()
        .flat_map(|x| x.to_le_bytes())
        .collect()
    }
    fn decode(b: &[u8]) -> Option<StepStats> {
        if b.len() != 32 {
            return None;
        }
        let f = |k: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[8 * k..8 * k + 8]);
            f64::from_le_bytes(a)
        };
        Some(StepStats {
            loss: f(0),
            seconds: f(1),
            comm_seconds: f(2),
            device_bytes: f(3),
        })
    }
}

/// The collectives and device of one rank.
enum Backend {
    Cpu(TcpComm),
    #[cfg(feature = "cuda")]
    Cuda(autopar_runtime::cuda::CudaRank),
}

impl Backend {
    fn device(&self) -> Device {
        match self {
            Backend::Cpu(_) => Device::Cpu,
            #[cfg(feature = "cuda")]
            Backend::Cuda(c) => c.device(),
        }
    }

    fn step(
        &mut self,
        state: &mut RankState,
        batch: &HashMap<ValueId, Tensor>,
        k: usize,
    ) -> Result<StepStats, String> {
        match self {
            Backend::Cpu(comm) => {
                let t0 = Instant::now();
                match state.step(comm, batch, false) {
                    Ok(out) => Ok(StepStats {
                        loss: out.loss,
                        seconds: t0.elapsed().as_secs_f64(),
                        comm_seconds: out.comm_seconds,
                        device_bytes: f64::NAN,
                    }),
                    Err(e) => {
                        let reason = format!("step {k}: {e}");
                        comm.abort(&reason);
                        Err(reason)
                    }
                }
            }
            #[cfg(feature = "cuda")]
            Backend::Cuda(c) => c.step(state, batch).map(|s| StepStats {
                loss: s.loss,
                seconds: s.seconds,
                comm_seconds: f64::NAN,
                device_bytes: s.device_bytes,
            }),
        }
    }

    /// Stops this rank's collectives after an error outside a step.
    fn abort(&mut self, reason: &str) {
        match self {
            Backend::Cpu(comm) => comm.abort(reason),
            #[cfg(feature = "cuda")]
            Backend::Cuda(c) => c.abort(reason),
        }
    }
}

/// What every rank must agree on beyond the plan, as text (compared across ranks).
fn settings_text(par: &Parallelized, s: &RunSettings) -> String {
    let mut h = std::hash::DefaultHasher::new();
    par.program.rank_view(0).hash(&mut h);
    format!(
        "{} steps, seed {}, {:?}, device {}, program #{:016x}",
        s.steps,
        s.seed,
        s.optimizer,
        s.device,
        h.finish()
    )
}

/// Trains this rank of `par` (see the module doc). `graph` carries the weights (the training
/// graph, or a checkpoint applied to it), `batch` the global batch.
pub fn train(
    world: &World,
    par: &Parallelized,
    graph: &Graph,
    batch: &HashMap<ValueId, Tensor>,
    s: &RunSettings,
) -> Result<(), Error> {
    let world_size = world.world_size();
    let rdzv = world.rendezvous();
    let run_err = |e: rendezvous::RendezvousError| Error::Run(e.to_string());
    if par.program.world_size() != world_size {
        return Err(usage(format!(
            "WORLD_SIZE is {world_size} but the program has {} ranks",
            par.program.world_size()
        )));
    }
    if s.steps == 0 {
        return Err(usage("--steps must be at least 1"));
    }

    // the same settings everywhere: a rank started with other flags would run other steps
    let mine = settings_text(par, s);
    let all = rdzv.all_gather(mine.as_bytes()).map_err(run_err)?;
    let differ: Vec<String> = all
        .iter()
        .enumerate()
        .filter(|(_, t)| t.as_slice() != all[0].as_slice())
        .map(|(r, t)| format!("rank {r}: {}", String::from_utf8_lossy(t)))
        .collect();
    if !differ.is_empty() {
        return Err(usage(format!(
            "the ranks were started with different settings (rank 0: {}; {})",
            String::from_utf8_lossy(&all[0]),
            differ.join("; ")
        )));
    }

    let program = par.program.clone();
    let mut backend = match s.device {
        "cpu" => {
            // the host's cores are shared by its ranks (as torchrun's OMP_NUM_THREADS=1 does)
            if std::env::var_os("OMP_NUM_THREADS").is_none() {
                let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
                tch::set_num_threads((cores / world.env().local_world_size).max(1) as i32);
            }
            let mut comm = TcpComm::connect(rdzv).map_err(|e| Error::Run(e.to_string()))?;
            comm.set_timeout(world.env().timeout);
            Backend::Cpu(comm)
        }
        #[cfg(feature = "cuda")]
        "cuda" => Backend::Cuda(
            autopar_runtime::cuda::CudaRank::join(
                rdzv,
                &program.groups(),
                world.env().local_rank,
                world.env().timeout,
            )
            .map_err(Error::Run)?,
        ),
        d => {
            return Err(usage(format!(
                "--device {d}: this autopar runs cpu{} under a multi-process launch",
                if cfg!(feature = "cuda") {
                    " or cuda"
                } else {
                    ""
                }
            )))
        }
    };
    let result = train_steps(world, par, graph, batch, s, &mut backend, program);
    if let Err(e) = &result {
        backend.abort(&e.to_string());
    }
    result
}

fn train_steps(
    world: &World,
    par: &Parallelized,
    graph: &Graph,
    batch: &HashMap<ValueId, Tensor>,
    s: &RunSettings,
    backend: &mut Backend,
    program: Arc<autopar_generator::Program>,
) -> Result<(), Error> {
    let (rank, world_size) = (world.rank(), world.world_size());
    let rdzv = world.rendezvous();
    let run_err = |e: rendezvous::RendezvousError| Error::Run(e.to_string());
    let mut state = RankState::new(
        program.clone(),
        graph,
        rank,
        backend.device(),
        Path::new(""),
        s.seed,
        s.optimizer,
    )
    .map_err(|e| Error::Run(e.to_string()))?;
    let plan = &par.plan;
    let cuda = s.device == "cuda";
    if rank == 0 {
        println!(
            "{} on {world_size} processes{} (mesh {}), strategy {}, predicted step {:.3} ms on {}",
            plan.model,
            if cuda { ", one GPU each" } else { "" },
            plan.mesh.name(),
            plan.family,
            s.predicted_step_s * 1e3,
            plan.cluster.name
        );
    }
    for k in 1..=s.steps {
        let stats = backend.step(&mut state, batch, k).map_err(Error::Run)?;
        // every rank's numbers to rank 0 (also a barrier: the step is over everywhere)
        let Some(all) = rdzv.gather(&stats.encode()).map_err(run_err)? else {
            continue;
        };
        let all: Vec<StepStats> = all.iter().filter_map(|b| StepStats::decode(b)).collect();
        let max = |f: fn(&StepStats) -> f64| all.iter().map(f).fold(f64::NAN, f64::max);
        let (units, unit) = s.units;
        if cuda {
            println!(
                "step {k:>4}  loss {:.6}  {:.0} {unit}/s  measured {:.2} ms  predicted {:.3} ms ({})  device memory {} (predicted peak {})",
                stats.loss,
                units as f64 / stats.seconds,
                stats.seconds * 1e3,
                s.predicted_step_s * 1e3,
                plan.cluster.name,
                crate::format_bytes(max(|x| x.device_bytes)),
                crate::format_bytes(plan.predicted.peak_memory_bytes)
            );
        } else {
            println!(
                "step {k:>4}  loss {:.6}  {:.0} {unit}/s  measured {:.1} ms (collectives {:.1} ms)  predicted {:.3} ms ({})",
                stats.loss,
                units as f64 / stats.seconds,
                stats.seconds * 1e3,
                max(|x| x.comm_seconds) * 1e3,
                s.predicted_step_s * 1e3,
                plan.cluster.name
            );
        }
    }
    if let Some(path) = s.save {
        save(world, &program, &state, path)?;
    }
    Ok(())
}

/// Gathers every rank's parameter blocks on rank 0, which writes the whole parameters.
fn save(
    world: &World,
    program: &autopar_generator::Program,
    state: &RankState,
    path: &Path,
) -> Result<(), Error> {
    let mut blob = vec![];
    for u in &program.updates {
        let slot = program.slot(u.param);
        let t = state
            .leaf(u.param)
            .ok_or_else(|| Error::Run(format!("parameter {} is not loaded", slot.name)))?;
        let values = t
            .f_to_kind(tch::Kind::Float)
            .and_then(|t| t.f_to(Device::Cpu))
            .and_then(|t| t.f_contiguous())
            .and_then(|t| t.f_flatten(0, -1))
            .and_then(|t| Vec::<f32>::try_from(&t))
            .map_err(|e| Error::Run(format!("reading parameter {}: {e}", slot.name)))?;
        blob.extend(values.iter().flat_map(|x| x.to_le_bytes()));
    }
    let Some(blobs) = world
        .rendezvous()
        .gather(&blob)
        .map_err(|e| Error::Run(e.to_string()))?
    else {
        return Ok(());
    };
    let mut at = vec![0usize; blobs.len()];
    let mut params = vec![];
    for u in &program.updates {
        let slot = program.slot(u.param);
        let n = slot.local.numel() * 4;
        let blocks: Vec<Vec<f32>> = blobs
            .iter()
            .zip(at.iter_mut())
            .enumerate()
            .map(|(r, (b, at))| {
                let bytes = b.get(*at..*at + n).ok_or_else(|| {
                    Error::Run(format!(
                        "rank {r} sent {} bytes of parameters, fewer than its blocks need",
                        b.len()
                    ))
                })?;
                *at += n;
                Ok(bytes
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect())
            })
            .collect::<Result<_, Error>>()?;
        let full = autopar_runtime::weights::unshard(
            &blocks,
            &slot.global.shape,
            &slot.spec,
            &program.mesh,
        )
        .map_err(|e| Error::Run(e.to_string()))?;
        params.push((slot.name.clone(), slot.global.shape.clone(), full));
    }
    autopar_runtime::weights::save_safetensors(path, &params)
        .map_err(|e| Error::Run(e.to_string()))?;
    println!("saved the parameters to {}", path.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(vars: &[(&str, &str)]) -> Result<Option<LaunchEnv>, Error> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        LaunchEnv::from_vars(|k| map.get(k).cloned())
    }

    fn err(vars: &[(&str, &str)]) -> String {
        env(vars).unwrap_err().to_string()
    }

    const TORCHRUN: &[(&str, &str)] = &[
        ("RANK", "1"),
        ("WORLD_SIZE", "4"),
        ("LOCAL_RANK", "1"),
        ("LOCAL_WORLD_SIZE", "4"),
        ("MASTER_ADDR", "127.0.0.1"),
        ("MASTER_PORT", "29500"),
        ("TORCHELASTIC_USE_AGENT_STORE", "True"),
    ];

    #[test]
    fn torchrun_environment() {
        let e = env(TORCHRUN).unwrap().unwrap();
        assert_eq!(
            e,
            LaunchEnv {
                rank: 1,
                world_size: 4,
                local_rank: 1,
                local_world_size: 4,
                master_addr: "127.0.0.1".into(),
                // torchrun's agent holds MASTER_PORT
                port: 29501,
                timeout: rendezvous::DEFAULT_TIMEOUT,
            }
        );
        let mut v = TORCHRUN.to_vec();
        v.push(("AUTOPAR_MASTER_PORT", "40000"));
        v.push(("AUTOPAR_TIMEOUT", "2.5"));
        let e = env(&v).unwrap().unwrap();
        assert_eq!((e.port, e.timeout), (40000, Duration::from_millis(2500)));
        // by hand: MASTER_PORT itself, LOCAL_RANK defaults to RANK
        let e = env(&[
            ("RANK", "1"),
            ("WORLD_SIZE", "2"),
            ("MASTER_ADDR", "localhost"),
            ("MASTER_PORT", "1234"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!((e.port, e.local_rank, e.local_world_size), (1234, 1, 2));
    }

    #[test]
    fn single_process_unless_asked() {
        assert_eq!(env(&[]).unwrap(), None);
        assert_eq!(env(&[("RANK", "0"), ("WORLD_SIZE", "1")]).unwrap(), None);
        let mut v = TORCHRUN.to_vec();
        v.push(("AUTOPAR_MULTIPROCESS", "0"));
        assert_eq!(env(&v).unwrap(), None);
        let one = env(&[
            ("AUTOPAR_MULTIPROCESS", "1"),
            ("RANK", "0"),
            ("WORLD_SIZE", "1"),
            ("MASTER_ADDR", "127.0.0.1"),
            ("MASTER_PORT", "1234"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(one.world_size, 1);
    }

    #[test]
    fn bad_environments_are_named() {
        assert!(err(&[("RANK", "0")]).starts_with("RANK is set but WORLD_SIZE is not"));
        assert!(err(&[("WORLD_SIZE", "2")]).starts_with("WORLD_SIZE is set but RANK is not"));
        assert!(err(&[("AUTOPAR_MULTIPROCESS", "1")]).contains("needs RANK and WORLD_SIZE"));
        assert_eq!(
            err(&[("RANK", "2"), ("WORLD_SIZE", "2")]),
            "RANK=2 is not a rank of WORLD_SIZE=2 (ranks are 0 to WORLD_SIZE-1)"
        );
        assert!(err(&[("RANK", "x"), ("WORLD_SIZE", "2")]).starts_with("RANK=\"x\""));
        assert!(err(&[("RANK", "0"), ("WORLD_SIZE", "2")]).starts_with("MASTER_ADDR is not set"));
        assert!(
            err(&[("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "h")])
                .starts_with("MASTER_PORT is not set")
        );
        assert!(err(&[
            ("RANK", "0"),
            ("WORLD_SIZE", "2"),
            ("MASTER_ADDR", "h"),
            ("MASTER_PORT", "99999")
        ])
        .starts_with("MASTER_PORT=\"99999\": expected a port number"));
        let mut v = TORCHRUN.to_vec();
        v.push(("AUTOPAR_TIMEOUT", "-1"));
        assert!(err(&v).starts_with("AUTOPAR_TIMEOUT=\"-1\""));
        let mut v = TORCHRUN.to_vec();
        v.push(("AUTOPAR_MULTIPROCESS", "yes"));
        assert!(err(&v).starts_with("AUTOPAR_MULTIPROCESS=\"yes\""));
    }

    #[test]
    fn step_stats_round_trip() {
        let s = StepStats {
            loss: 5.25,
            seconds: 0.5,
            comm_seconds: f64::NAN,
            device_bytes: 1e9,
        };
        let d = StepStats::decode(&s.encode()).unwrap();
        assert_eq!((d.loss, d.seconds, d.device_bytes), (5.25, 0.5, 1e9));
        assert!(d.comm_seconds.is_nan());
        assert!(StepStats::decode(&[0; 31]).is_none());
    }
}
