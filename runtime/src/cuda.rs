//! The CUDA runtime (feature `cuda`): one rank per GPU, NCCL between them.
//!
//! - libtorch's CUDA kernels live in `libtorch_cuda.so`, which a binary linked against
//!   `libtorch_cpu` does not load: [`load_torch_cuda`] opens it at start-up (its static
//!   initialisers register the CUDA backend), so the same binary runs on machines with and
//!   without GPUs, and builds where no CUDA is installed.
//! - NCCL comes through cudarc, loaded at run time. Exactly one NCCL library may be in the
//!   process (two give "corrupted comm object"): put the copy libtorch uses first on the library
//!   path under the name `libnccl.so` (see docs/gpu.md).
//! - One communicator per (rank, group): the groups are the rank sets the program's collectives
//!   run on ([`Program::groups`]); their NCCL ids are drawn on the launching thread and every
//!   rank thread initialises its communicators in the same global order, so initialisation
//!   cannot deadlock.
//! - Collectives run on the legacy default stream, the stream libtorch's kernels use, so they
//!   are ordered with the computation without host synchronisation.
//!
//! `unsafe` is confined to this module: the `dlopen`, and NCCL calls on the device pointers of
//! contiguous tensors that outlive the calls (the default stream orders any later reuse).
#![allow(unsafe_code)]

use crate::collective::{CollectiveError, TensorComm};
use crate::exec::{ExecError, OptimizerConfig, RankState};
use autopar_analyzer::graph::{Graph, ValueId};
use autopar_generator::Program;
use cudarc::nccl::result as nccl;
use cudarc::nccl::sys;
use std::collections::HashMap;
use std::ffi::c_void;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;
use tch::{Device, Kind, Tensor};

/// Opens `libtorch_cuda.so` (from the library path) and returns the number of GPUs libtorch sees.
pub fn load_torch_cuda() -> Result<usize, String> {
    static LOADED: Mutex<bool> = Mutex::new(false);
    let mut loaded = LOADED.lock().unwrap_or_else(|e| e.into_inner());
    if !*loaded {
        // SAFETY: loading a shared library runs its initialisers; libtorch_cuda's only
        // register the CUDA backend with the libtorch already loaded in the process.
        let lib = unsafe {
            libloading::os::unix::Library::open(
                Some("libtorch_cuda.so"),
                libloading::os::unix::RTLD_NOW | libloading::os::unix::RTLD_GLOBAL,
            )
        }
        .map_err(|e| {
            format!(
                "cannot load libtorch_cuda.so (put PyTorch's torch/lib on LD_LIBRARY_PATH): {e}"
            )
        })?;
        // stays loaded for the life of the process
        std::mem::forget(lib);
        *loaded = true;
    }
    let n = tch::Cuda::device_count();
    if n < 1 {
        return Err("libtorch sees no CUDA device".into());
    }
    Ok(n as usize)
}

/// The NCCL ids of every group of a program, drawn on the launching thread.
pub struct NcclIds {
    ids: Vec<(Vec<usize>, sys::ncclUniqueId)>,
}

impl NcclIds {
    pub fn new(groups: &[Vec<usize>]) -> Result<Self, String> {
        let ids = groups
            .iter()
            .map(|g| {
                nccl::get_uniqueid()
                    .map(|id| (g.clone(), id))
                    .map_err(|e| format!("NCCL unique id: {e:?}"))
            })
            .collect::<Result<_, _>>()?;
        Ok(NcclIds { ids })
    }
}

/// One rank's NCCL communicators, one per group it belongs to. Lives on its rank thread.
pub struct NcclComm {
    rank: usize,
    comms: HashMap<Vec<usize>, sys::ncclComm_t>,
    _ctx: Arc<cudarc::driver::CudaContext>,
}

impl NcclComm {
    /// Binds GPU `rank` to the calling thread and joins every group of `ids` containing `rank`.
    pub fn new(rank: usize, ids: &NcclIds) -> Result<Self, String> {
        let ctx = cudarc::driver::CudaContext::new(rank)
            .map_err(|e| format!("rank {rank}: CUDA device {rank}: {e:?}"))?;
        ctx.bind_to_thread()
            .map_err(|e| format!("rank {rank}: binding device {rank}: {e:?}"))?;
        let mut comms = HashMap::new();
        for (group, id) in &ids.ids {
            let Some(pos) = group.iter().position(|&r| r == rank) else {
                continue;
            };
            let mut comm: sys::ncclComm_t = std::ptr::null_mut();
            // SAFETY: `comm` is a valid out-pointer; every member calls this with the same id.
            unsafe { nccl::comm_init_rank(&mut comm, group.len() as i32, *id, pos as i32) }
                .map_err(|e| format!("rank {rank}: NCCL init of group {group:?}: {e:?}"))?;
            comms.insert(group.clone(), comm);
        }
        Ok(NcclComm {
            rank,
            comms,
            _ctx: ctx,
        })
    }

    fn comm(&self, group: &[usize]) -> Result<sys::ncclComm_t, CollectiveError> {
        self.comms.get(group).copied().ok_or_else(|| {
            CollectiveError::Other(format!(
                "rank {}: no NCCL communicator for group {group:?}",
                self.rank
            ))
        })
    }

    /// Aborts every communicator (after an error, so that peers' collectives fail too).
    /// Device memory in use on this rank's GPU (total minus free).
    pub fn device_bytes(&self) -> f64 {
        self._ctx
            .mem_get_info()
            .map(|(free, total)| total.saturating_sub(free) as f64)
            .unwrap_or(f64::NAN)
    }

    pub fn abort(&mut self) {
        for (_, c) in self.comms.drain() {
            // SAFETY: each communicator is aborted once and then forgotten.
            let _ = unsafe { nccl::comm_abort(c) };
        }
    }
}

impl Drop for NcclComm {
    fn drop(&mut self) {
        for (_, c) in self.comms.drain() {
            // SAFETY: each communicator is destroyed once; no collective is pending on the host.
            let _ = unsafe { nccl::comm_destroy(c) };
        }
    }
}

fn nccl_type(kind: Kind) -> Result<sys::ncclDataType_t, CollectiveError> {
    use sys::ncclDataType_t::*;
    Ok(match kind {
        Kind::Float => ncclFloat32,
        Kind::Double => ncclFloat64,
        Kind::Half => ncclFloat16,
        Kind::BFloat16 => ncclBfloat16,
        Kind::Int64 => ncclInt64,
        Kind::Int => ncclInt32,
        Kind::Int8 => ncclInt8,
        Kind::Uint8 | Kind::Bool => ncclUint8,
        k => {
            return Err(CollectiveError::Other(format!(
                "NCCL cannot move {k:?} tensors"
            )))
        }
    })
}

fn stream() -> sys::cudaStream_t {
    // the legacy default stream: libtorch's kernels run there
    std::ptr::null_mut()
}

fn nccl_err(what: &str, e: nccl::NcclError) -> CollectiveError {
    CollectiveError::Other(format!("NCCL {what}: {e:?}"))
}

impl TensorComm for NcclComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn all_reduce_sum(&mut self, group: &[usize], t: &Tensor) -> Result<Tensor, CollectiveError> {
        let x = t.f_contiguous()?;
        let out = x.f_empty_like()?;
        let comm = self.comm(group)?;
        // SAFETY: both buffers are contiguous device tensors of `numel` elements, alive here.
        unsafe {
            nccl::all_reduce(
                x.data_ptr() as *const c_void,
                out.data_ptr(),
                x.numel(),
                nccl_type(x.kind())?,
                sys::ncclRedOp_t::ncclSum,
                comm,
                stream(),
            )
        }
        .map_err(|e| nccl_err("all-reduce", e))?;
        Ok(out)
    }

    fn all_gather(&mut self, group: &[usize], t: &Tensor) -> Result<Tensor, CollectiveError> {
        let x = t.f_contiguous()?;
        let out = Tensor::f_empty(
            [x.numel() as i64 * group.len() as i64],
            (x.kind(), x.device()),
        )?;
        let comm = self.comm(group)?;
        // SAFETY: `out` holds group-size times the elements of `x`, both contiguous on device.
        unsafe {
            nccl::all_gather(
                x.data_ptr() as *const c_void,
                out.data_ptr(),
                x.numel(),
                nccl_type(x.kind())?,
                comm,
                stream(),
            )
        }
        .map_err(|e| nccl_err("all-gather", e))?;
        Ok(out)
    }

    fn reduce_scatter_sum(
        &mut self,
        group: &[usize],
        t: &Tensor,
    ) -> Result<Tensor, CollectiveError> {
        let x = t.f_contiguous()?;
        let n = group.len();
        if x.numel() % n != 0 {
            return Err(CollectiveError::Other(format!(
                "reduce-scatter of {} elements over {n} ranks",
                x.numel()
            )));
        }
        let out = Tensor::f_empty([(x.numel() / n) as i64], (x.kind(), x.device()))?;
        let comm = self.comm(group)?;
        // SAFETY: `x` holds n chunks of `out`'s size, both contiguous on device.
        unsafe {
            nccl::reduce_scatter(
                x.data_ptr() as *const c_void,
                out.data_ptr(),
                x.numel() / n,
                nccl_type(x.kind())?,
                sys::ncclRedOp_t::ncclSum,
                comm,
                stream(),
            )
        }
        .map_err(|e| nccl_err("reduce-scatter", e))?;
        Ok(out)
    }

    fn all_to_all(&mut self, group: &[usize], t: &Tensor) -> Result<Tensor, CollectiveError> {
        let x = t.f_contiguous()?;
        let n = group.len();
        if x.numel() % n != 0 {
            return Err(CollectiveError::Other(format!(
                "all-to-all of {} elements over {n} ranks",
                x.numel()
            )));
        }
        let out = x.f_empty_like()?;
        let chunk = x.numel() / n;
        let dtype = nccl_type(x.kind())?;
        let elem = x.kind().elt_size_in_bytes();
        let comm = self.comm(group)?;
        nccl::group_start().map_err(|e| nccl_err("group start", e))?;
        for peer in 0..n {
            // SAFETY: chunk `peer` of `x` and of `out` are in bounds of contiguous device tensors.
            unsafe {
                let send = (x.data_ptr() as *const u8).add(peer * chunk * elem) as *const c_void;
                let recv = (out.data_ptr() as *mut u8).add(peer * chunk * elem) as *mut c_void;
                nccl::send(send, chunk, dtype, peer as i32, comm, stream())
                    .map_err(|e| nccl_err("send", e))?;
                nccl::recv(recv, chunk, dtype, peer as i32, comm, stream())
                    .map_err(|e| nccl_err("recv", e))?;
            }
        }
        nccl::group_end().map_err(|e| nccl_err("group end", e))?;
        Ok(out)
    }
}

/// A barrier that a failing rank can break: waiters then return an error instead of waiting
/// for a rank that will never come.
struct FailBarrier {
    state: Mutex<(usize, u64, Option<String>)>,
    cv: Condvar,
    n: usize,
}

impl FailBarrier {
    fn new(n: usize) -> Self {
        FailBarrier {
            state: Mutex::new((0, 0, None)),
            cv: Condvar::new(),
            n,
        }
    }
    fn wait(&self) -> Result<(), String> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = &st.2 {
            return Err(e.clone());
        }
        let generation = st.1;
        st.0 += 1;
        if st.0 == self.n {
            st.0 = 0;
            st.1 += 1;
            self.cv.notify_all();
            return Ok(());
        }
        while st.1 == generation && st.2.is_none() {
            st = self.cv.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        match &st.2 {
            Some(e) if st.1 == generation => Err(e.clone()),
            _ => Ok(()),
        }
    }
    fn fail(&self, why: &str) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.2.get_or_insert_with(|| why.to_string());
        self.cv.notify_all();
    }
}

/// One step's result on the GPUs.
#[derive(Clone, Debug)]
pub struct CudaStep {
    pub loss: f64,
    /// Wall-clock seconds of the step, the devices synchronised at both ends.
    pub seconds: f64,
    /// The most device memory any rank's process holds after the step (total minus free, as
    /// the driver reports it): libtorch's caching allocator keeps what it reserved at its peak,
    /// so this is the step's reserved peak, plus the CUDA context and NCCL buffers.
    pub device_bytes: f64,
}

/// Trains `steps` steps of `program` with one thread per rank, rank r on GPU r, NCCL between
/// them; returns each step's loss and time. A rank that fails aborts its communicators.
pub fn train_cuda(
    program: Arc<Program>,
    graph: &Graph,
    base_dir: &Path,
    seed: u64,
    optimizer: OptimizerConfig,
    batch: &HashMap<ValueId, autopar_analyzer::Tensor>,
    steps: usize,
) -> Result<Vec<CudaStep>, String> {
    let gpus = load_torch_cuda()?;
    let world = program.world_size();
    if world > gpus {
        return Err(format!(
            "the mesh has {world} ranks but libtorch sees {gpus} GPUs"
        ));
    }
    let ids = NcclIds::new(&program.groups())?;
    let barrier = FailBarrier::new(world);
    let peak: Vec<Mutex<Vec<f64>>> = (0..world).map(|_| Mutex::new(vec![])).collect();
    let results: Vec<Result<Vec<CudaStep>, String>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..world)
            .map(|rank| {
                let (program, ids, barrier, peak) = (program.clone(), &ids, &barrier, &peak);
                s.spawn(move || -> Result<Vec<CudaStep>, String> {
                    let run = || -> Result<Vec<CudaStep>, String> {
                        let mut comm = NcclComm::new(rank, ids)?;
                        let device = Device::Cuda(rank);
                        let mut state =
                            RankState::new(program, graph, rank, device, base_dir, seed, optimizer)
                                .map_err(|e: ExecError| format!("rank {rank}: {e}"))?;
                        let mut out = vec![];
                        for _ in 0..steps {
                            tch::Cuda::synchronize(rank as i64);
                            barrier.wait()?;
                            let t0 = Instant::now();
                            let r = match state.step(&mut comm, batch, false) {
                                Ok(r) => r,
                                Err(e) => {
                                    comm.abort();
                                    return Err(format!("rank {rank}: {e}"));
                                }
                            };
                            tch::Cuda::synchronize(rank as i64);
                            barrier.wait()?;
                            let seconds = t0.elapsed().as_secs_f64();
                            let bytes = comm.device_bytes();
                            peak[rank]
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .push(bytes);
                            out.push(CudaStep {
                                loss: r.loss,
                                seconds,
                                device_bytes: bytes,
                            });
                        }
                        Ok(out)
                    };
                    let r = run();
                    if let Err(e) = &r {
                        barrier.fail(e);
                    }
                    r
                })
            })
            .collect();
        handles
            .into_iter()
            .enumerate()
            .map(|(rank, h)| {
                h.join()
                    .unwrap_or_else(|_| Err(format!("rank {rank} panicked")))
            })
            .collect()
    });
    let mut first = None;
    let mut steps_of_rank0 = vec![];
    for (rank, r) in results.into_iter().enumerate() {
        match r {
            Ok(s) if rank == 0 => steps_of_rank0 = s,
            Ok(_) => {}
            Err(e) => {
                first.get_or_insert(e);
            }
        }
    }
    if let Some(e) = first {
        return Err(e);
    }
    // each step's memory: the largest over the ranks
    for (k, step) in steps_of_rank0.iter_mut().enumerate() {
        for p in &peak {
            let p = p.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(&b) = p.get(k) {
                step.device_bytes = step.device_bytes.max(b);
            }
        }
    }
    Ok(steps_of_rank0)
}
