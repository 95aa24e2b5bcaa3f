//! The CUDA runtime (feature `cuda`): one rank per GPU, NCCL between them; the ranks are the
//! threads of one process ([`train_cuda`]) or one process each ([`CudaRank`], under torchrun).
//!
//! - libtorch's CUDA kernels live in `libtorch_cuda.so`, which a binary linked against
//!   `libtorch_cpu` does not load: [`load_torch_cuda`] opens it at start-up (its static
//!   initialisers register the CUDA backend), so the same binary runs on machines with and
//!   without GPUs, and builds where no CUDA is installed.
//! - NCCL comes through cudarc, loaded at run time. Exactly one NCCL library may be in the
//!   process (two give "corrupted comm object"): put the copy libtorch uses first on the library
//!   path under the name `libnccl.so` (see docs/gpu.md).
//! - One communicator per (rank, group): the groups are the rank sets the program's collectives
//!   run on ([`Program::groups`]); their NCCL ids are drawn on the launching thread
//!   ([`NcclIds::new`]) or, with one process per rank, by each group's lowest member and carried
//!   by the rendezvous ([`NcclIds::exchange`]). Every rank initialises its communicators in the
//!   same global order, so initialisation cannot deadlock.
//! - Collectives run on the legacy default stream, the stream libtorch's kernels use, so they
//!   are ordered with the computation without host synchronisation.
//!
//! No hang. NCCL never tells a rank that a peer is gone: its kernels spin, and the host blocks
//! in the next synchronisation. So:
//! - Communicators are *non-blocking* (`ncclConfig_t.blocking = 0`): no NCCL call blocks the
//!   host (initialisation included); a call that answers "in progress" is polled, with a
//!   deadline, until it completes, fails or is aborted.
//! - Each rank has a watchdog thread. It aborts the rank's communicators (`ncclCommAbort`, which
//!   makes the spinning kernels return, so the blocked synchronisation returns too) when the
//!   step it watches runs past the timeout, when `ncclCommGetAsyncError` reports an error, or
//!   when another rank failed (the rendezvous, or the in-process barrier, says so). The rank
//!   then returns an error naming the cause instead of its (meaningless) result.
//! - A communicator handle is used only under its table's mutex, and the abort takes the
//!   handles out of the table, so no call ever sees an aborted (freed) communicator.
//! - The price: NCCL runs each non-blocking call on a thread of its own, tens of microseconds
//!   of host time per collective (docs/gpu.md has the numbers). `NCCL_COMM_BLOCKING=1`
//!   (NCCL's variable, which overrides the configuration) gives blocking communicators: the
//!   watchdog still aborts a step stuck in its synchronisation, but no longer a call stuck
//!   inside NCCL (a peer that dies during initialisation or a first connection).
//!
//! `unsafe` is confined to this module: the `dlopen`, and NCCL calls on the device pointers of
//! contiguous tensors that outlive the calls (the default stream orders any later reuse).
#![allow(unsafe_code)]

use crate::collective::{CollectiveError, TensorComm};
use crate::exec::{ExecError, OptimizerConfig, RankState};
use crate::rendezvous::Rendezvous;
use autopar_analyzer::graph::{Graph, ValueId};
use autopar_generator::Program;
use cudarc::nccl::result::{self as nccl, NcclError, NcclStatus};
use cudarc::nccl::sys;
use std::collections::HashMap;
use std::ffi::{c_void, CStr};
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tch::{Device, Kind, Tensor};

/// How long a step (or an NCCL call still in progress) may take before the watchdog aborts.
pub const DEFAULT_STEP_TIMEOUT: Duration = Duration::from_secs(300);

/// How often the watchdog looks.
const WATCH_PERIOD: Duration = Duration::from_millis(50);

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

/// An NCCL result as text: its name, NCCL's description, and the communicator's last error.
fn nccl_text(e: &NcclError, comm: Option<sys::ncclComm_t>) -> String {
    // SAFETY: NCCL returns static strings (error names), or a string owned by the library
    // that stays valid until the next NCCL call on this thread; both are copied at once.
    let describe = |p: *const std::ffi::c_char| -> String {
        if p.is_null() {
            String::new()
        } else {
            unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
        }
    };
    let mut s = format!("{:?}", e.0);
    let what = describe(unsafe { sys::ncclGetErrorString(e.0) });
    if !what.is_empty() {
        s.push_str(&format!(" ({what})"));
    }
    if let Some(c) = comm {
        let last = describe(unsafe { sys::ncclGetLastError(c) });
        if !last.is_empty() {
            s.push_str(&format!(": {last}"));
        }
    }
    s
}

/// The NCCL ids of every group of a program.
pub struct NcclIds {
    ids: Vec<(Vec<usize>, sys::ncclUniqueId)>,
}

const ID_BYTES: usize = 128;

impl NcclIds {
    /// Draws every group's id here (one process, one thread per rank).
    pub fn new(groups: &[Vec<usize>]) -> Result<Self, String> {
        let ids = groups
            .iter()
            .map(|g| {
                nccl::get_uniqueid()
                    .map(|id| (g.clone(), id))
                    .map_err(|e| format!("NCCL unique id: {}", nccl_text(&e, None)))
            })
            .collect::<Result<_, _>>()?;
        Ok(NcclIds { ids })
    }

    /// One process per rank: this rank draws the ids of the groups it leads (their lowest
    /// member) and the rendezvous carries every id to every rank. A collective call.
    pub fn exchange(rdzv: &Rendezvous, groups: &[Vec<usize>]) -> Result<Self, String> {
        let rank = rdzv.rank();
        let mut blob = vec![];
        for (k, g) in groups.iter().enumerate() {
            if g.first() == Some(&rank) {
                let id = nccl::get_uniqueid()
                    .map_err(|e| format!("NCCL unique id: {}", nccl_text(&e, None)))?;
                blob.extend_from_slice(&(k as u32).to_le_bytes());
                blob.extend(id.internal.iter().map(|&c| c as u8));
            }
        }
        let all = rdzv.all_gather(&blob).map_err(|e| e.to_string())?;
        let mut ids: Vec<Option<sys::ncclUniqueId>> = vec![None; groups.len()];
        for (from, b) in all.iter().enumerate() {
            if b.len() % (4 + ID_BYTES) != 0 {
                return Err(format!("rank {from} sent {} bytes of NCCL ids", b.len()));
            }
            for chunk in b.chunks_exact(4 + ID_BYTES) {
                let k = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]) as usize;
                let Some(g) = groups.get(k) else {
                    return Err(format!(
                        "rank {from} sent the NCCL id of group #{k}, but the program has {} groups (do all ranks run the same plan?)",
                        groups.len()
                    ));
                };
                if g.first() != Some(&from) {
                    return Err(format!(
                        "rank {from} sent the NCCL id of group {g:?}, which rank {} leads",
                        g.first().copied().unwrap_or(0)
                    ));
                }
                let mut id = sys::ncclUniqueId {
                    internal: [0; ID_BYTES],
                };
                for (d, &s) in id.internal.iter_mut().zip(&chunk[4..]) {
                    *d = s as std::ffi::c_char;
                }
                ids[k] = Some(id);
            }
        }
        let ids = groups
            .iter()
            .zip(ids)
            .map(|(g, id)| {
                id.map(|id| (g.clone(), id)).ok_or_else(|| {
                    format!(
                        "no NCCL id for group {g:?} (rank {} leads it)",
                        g.first().copied().unwrap_or(0)
                    )
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(NcclIds { ids })
    }
}

/// A communicator handle, movable to the watchdog thread.
struct Handle(sys::ncclComm_t);

// SAFETY: NCCL communicators may be used from any thread; every use of a handle happens under
// the mutex of the table that holds it, and an aborted handle leaves the table.
unsafe impl Send for Handle {}

#[derive(Default)]
struct Table {
    comms: Vec<(Vec<usize>, Handle)>,
    /// Why the communicators were aborted (set once).
    aborted: Option<String>,
}

impl Table {
    fn get(&self, group: &[usize]) -> Option<sys::ncclComm_t> {
        self.comms
            .iter()
            .find(|(g, _)| g == group)
            .map(|(_, h)| h.0)
    }
}

/// A rank's communicators, shared by the rank's thread and its watchdog.
struct Comms {
    rank: usize,
    table: Mutex<Table>,
}

impl Comms {
    fn lock(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Aborts every communicator (once) and records why; later calls fail with the reason.
    fn abort_all(&self, reason: &str) {
        let mut t = self.lock();
        t.aborted.get_or_insert_with(|| reason.to_string());
        for (_, h) in t.comms.drain(..) {
            // SAFETY: the handle leaves the table here, so it is aborted once and never used
            // again; aborting a communicator whose operations spin is what it is for.
            let _ = unsafe { nccl::comm_abort(h.0) };
        }
    }

    fn aborted(&self) -> Option<String> {
        self.lock().aborted.clone()
    }
}

/// The state of a communicator's last (non-blocking) operation.
fn async_state(comm: sys::ncclComm_t) -> Result<NcclStatus, NcclError> {
    let mut state = sys::ncclResult_t::ncclSuccess;
    // SAFETY: `comm` is a live communicator (its table holds it) and `state` an out-pointer.
    unsafe { sys::ncclCommGetAsyncError(comm, &mut state) }.result()?;
    state.result()
}

/// A non-blocking communicator configuration (NCCL_CONFIG_INITIALIZER with `blocking = 0`).
fn nonblocking_config() -> sys::ncclConfig_t {
    const UNDEF: i32 = i32::MIN;
    // the version of the NCCL actually loaded: it reads the fields it knows, up to `size`
    let version = nccl::get_nccl_version().unwrap_or(22800);
    sys::ncclConfig_t {
        size: std::mem::size_of::<sys::ncclConfig_t>(),
        magic: 0xcafe_beef,
        version: version as u32,
        blocking: 0,
        cgaClusterSize: UNDEF,
        minCTAs: UNDEF,
        maxCTAs: UNDEF,
        netName: std::ptr::null(),
        splitShare: UNDEF,
        trafficClass: UNDEF,
        commName: std::ptr::null(),
        collnetEnable: UNDEF,
        CTAPolicy: UNDEF,
        shrinkShare: UNDEF,
        nvlsCTAs: UNDEF,
        nChannelsPerNetPeer: UNDEF,
        nvlinkCentricSched: UNDEF,
        graphUsageMode: UNDEF,
        numRmaCtx: UNDEF,
        maxP2pPeers: UNDEF,
    }
}

/// Where a watchdog learns that another rank failed (the rendezvous, or the in-process
/// barrier): the failure as text, or `None`.
pub type PeerFailure = Arc<dyn Fn() -> Option<String> + Send + Sync>;

/// What the watchdog is watching now, and since when.
type Armed = Arc<Mutex<Option<(Instant, String)>>>;

/// The thread that aborts a rank's communicators (see the module doc).
struct Watchdog {
    stop: Arc<(Mutex<bool>, Condvar)>,
    armed: Armed,
    thread: Option<JoinHandle<()>>,
}

impl Watchdog {
    fn start(
        comms: Arc<Comms>,
        timeout: Duration,
        peer_failure: Option<PeerFailure>,
    ) -> Result<Watchdog, String> {
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let armed: Armed = Arc::new(Mutex::new(None));
        let (stop2, armed2) = (stop.clone(), armed.clone());
        let rank = comms.rank;
        let thread = std::thread::Builder::new()
            .name(format!("nccl-watchdog-{rank}"))
            .spawn(move || loop {
                {
                    let (lock, cv) = &*stop2;
                    let stopped = lock.lock().unwrap_or_else(|e| e.into_inner());
                    let (stopped, _) = cv
                        .wait_timeout(stopped, WATCH_PERIOD)
                        .unwrap_or_else(|e| e.into_inner());
                    if *stopped {
                        return;
                    }
                }
                if comms.aborted().is_some() {
                    continue;
                }
                if let Some(reason) = peer_failure.as_ref().and_then(|f| f()) {
                    comms.abort_all(&reason);
                    continue;
                }
                let overdue = armed2
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .as_ref()
                    .filter(|(t0, _)| t0.elapsed() > timeout)
                    .map(|(_, what)| what.clone());
                if let Some(what) = overdue {
                    comms.abort_all(&format!(
                        "rank {rank}: {what} did not finish within {timeout:?} (a peer stopped, or NCCL hangs); its NCCL communicators were aborted"
                    ));
                    continue;
                }
                let t = comms.lock();
                let error = t.comms.iter().find_map(|(g, h)| {
                    async_state(h.0)
                        .err()
                        .map(|e| format!("rank {rank}: NCCL error on group {g:?}: {}", nccl_text(&e, Some(h.0))))
                });
                drop(t);
                if let Some(reason) = error {
                    comms.abort_all(&reason);
                }
            })
            .map_err(|e| format!("rank {rank}: cannot start the NCCL watchdog: {e}"))?;
        Ok(Watchdog {
            stop,
            armed,
            thread: Some(thread),
        })
    }

    fn arm(&self, what: &str) {
        *self.armed.lock().unwrap_or_else(|e| e.into_inner()) = Some((Instant::now(), what.into()));
    }

    fn disarm(&self) {
        *self.armed.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        let (lock, cv) = &*self.stop;
        *lock.lock().unwrap_or_else(|e| e.into_inner()) = true;
        cv.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One rank's NCCL communicators, one per group it belongs to, and their watchdog. Lives on
/// its rank thread.
pub struct NcclComm {
    rank: usize,
    comms: Arc<Comms>,
    timeout: Duration,
    /// Stopped (taken) first when the communicator is dropped.
    watchdog: Option<Watchdog>,
    ctx: Arc<cudarc::driver::CudaContext>,
}

impl NcclComm {
    /// Binds GPU `rank` to the calling thread and joins every group of `ids` containing `rank`
    /// (the watchdog with [`DEFAULT_STEP_TIMEOUT`] and no peer to listen to).
    pub fn new(rank: usize, ids: &NcclIds) -> Result<Self, String> {
        Self::join(rank, rank, ids, DEFAULT_STEP_TIMEOUT, None)
    }

    /// Binds GPU `device` to the calling thread and joins, as `rank`, every group of `ids`
    /// containing it, in the order of `ids` (the same on every rank). An initialisation that
    /// runs past `timeout`, or a peer failure, aborts the communicators and is an error.
    pub fn join(
        rank: usize,
        device: usize,
        ids: &NcclIds,
        timeout: Duration,
        peer_failure: Option<PeerFailure>,
    ) -> Result<Self, String> {
        let ctx = cudarc::driver::CudaContext::new(device)
            .map_err(|e| format!("rank {rank}: CUDA device {device}: {e:?}"))?;
        ctx.bind_to_thread()
            .map_err(|e| format!("rank {rank}: binding device {device}: {e:?}"))?;
        let comms = Arc::new(Comms {
            rank,
            table: Mutex::new(Table::default()),
        });
        let watchdog = Watchdog::start(comms.clone(), timeout, peer_failure)?;
        let me = NcclComm {
            rank,
            comms,
            timeout,
            watchdog: Some(watchdog),
            ctx,
        };
        let n = ids.ids.iter().filter(|(g, _)| g.contains(&rank)).count();
        me.arm(&format!("the initialisation of {n} NCCL communicators"));
        for (group, id) in &ids.ids {
            let Some(pos) = group.iter().position(|&r| r == rank) else {
                continue;
            };
            let mut comm: sys::ncclComm_t = std::ptr::null_mut();
            let mut config = nonblocking_config();
            let deadline = Instant::now() + timeout;
            // SAFETY: `comm` and `config` are valid pointers; every member calls this with the
            // same id and group size.
            let r = unsafe {
                nccl::comm_init_rank_config(
                    &mut comm,
                    group.len() as i32,
                    *id,
                    pos as i32,
                    &mut config,
                )
            };
            if !comm.is_null() {
                // in the table at once, so that a hanging initialisation can be aborted
                me.comms.lock().comms.push((group.clone(), Handle(comm)));
            }
            let done = match r {
                Ok(NcclStatus::InProgress) => me.wait_ready(group, "initialisation", deadline),
                Ok(_) => Ok(()),
                Err(e) => {
                    let reason = format!(
                        "rank {rank}: NCCL initialisation of group {group:?}: {}",
                        nccl_text(&e, (!comm.is_null()).then_some(comm))
                    );
                    me.comms.abort_all(&reason);
                    Err(CollectiveError::Other(reason))
                }
            };
            done.map_err(|e| e.to_string())?;
        }
        me.disarm();
        Ok(me)
    }

    /// Device memory in use on this rank's GPU (total minus free).
    pub fn device_bytes(&self) -> f64 {
        self.ctx
            .mem_get_info()
            .map(|(free, total)| total.saturating_sub(free) as f64)
            .unwrap_or(f64::NAN)
    }

    /// Aborts every communicator (after an error, so that peers' collectives fail too).
    pub fn abort(&mut self) {
        self.abort_with(&format!(
            "rank {} aborted its NCCL communicators",
            self.rank
        ));
    }

    /// Aborts every communicator with `reason` (what later calls and [`Self::aborted`] say).
    pub fn abort_with(&self, reason: &str) {
        self.comms.abort_all(reason);
    }

    /// Why the communicators were aborted (by this rank, its watchdog or a peer's failure).
    pub fn aborted(&self) -> Option<String> {
        self.comms.aborted()
    }

    /// The watchdog aborts the communicators if `what` runs past the timeout; until
    /// [`Self::disarm`].
    pub fn arm(&self, what: &str) {
        if let Some(w) = &self.watchdog {
            w.arm(what);
        }
    }

    pub fn disarm(&self) {
        if let Some(w) = &self.watchdog {
            w.disarm();
        }
    }

    fn refused(&self, what: &str, group: &[usize], reason: &str) -> CollectiveError {
        CollectiveError::Other(format!(
            "rank {}: NCCL {what} on group {group:?} not run: {reason}",
            self.rank
        ))
    }

    /// Runs one NCCL call on `group`'s communicator, under the table's lock, and waits while
    /// it is in progress. An error aborts every communicator.
    fn run(
        &self,
        group: &[usize],
        what: &str,
        call: impl FnOnce(sys::ncclComm_t) -> Result<NcclStatus, NcclError>,
    ) -> Result<(), CollectiveError> {
        let deadline = Instant::now() + self.timeout;
        let t = self.comms.lock();
        if let Some(reason) = &t.aborted {
            return Err(self.refused(what, group, reason));
        }
        let Some(comm) = t.get(group) else {
            return Err(CollectiveError::Other(format!(
                "rank {}: no NCCL communicator for group {group:?}",
                self.rank
            )));
        };
        let status = call(comm);
        let status = status.map_err(|e| nccl_text(&e, Some(comm)));
        drop(t);
        match status {
            Ok(NcclStatus::InProgress) => self.wait_ready(group, what, deadline),
            Ok(_) => Ok(()),
            Err(text) => {
                let reason = format!("rank {}: NCCL {what} on group {group:?}: {text}", self.rank);
                self.comms.abort_all(&reason);
                Err(CollectiveError::Other(reason))
            }
        }
    }

    /// Polls `group`'s communicator until its operation is no longer in progress (non-blocking
    /// communicators: nothing else may be issued before), the deadline passes or it is aborted.
    fn wait_ready(
        &self,
        group: &[usize],
        what: &str,
        deadline: Instant,
    ) -> Result<(), CollectiveError> {
        // a collective's launch completes in microseconds (NCCL hands it to a thread of its
        // own): spin at first, since a sleep lasts at least the timer slack (about 50 us);
        // sleep only when it takes longer (initialisation, connections)
        let spin_until = Instant::now() + Duration::from_millis(2);
        let mut pause = Duration::from_micros(50);
        loop {
            {
                let t = self.comms.lock();
                if let Some(reason) = &t.aborted {
                    return Err(self.refused(what, group, reason));
                }
                let Some(comm) = t.get(group) else {
                    return Err(CollectiveError::Other(format!(
                        "rank {}: no NCCL communicator for group {group:?}",
                        self.rank
                    )));
                };
                match async_state(comm) {
                    Ok(NcclStatus::InProgress) => {}
                    Ok(_) => return Ok(()),
                    Err(e) => {
                        let reason = format!(
                            "rank {}: NCCL {what} on group {group:?}: {}",
                            self.rank,
                            nccl_text(&e, Some(comm))
                        );
                        drop(t);
                        self.comms.abort_all(&reason);
                        return Err(CollectiveError::Other(reason));
                    }
                }
            }
            if Instant::now() >= deadline {
                let reason = format!(
                    "rank {}: NCCL {what} on group {group:?} still in progress after {:?} (a peer stopped?); the NCCL communicators were aborted",
                    self.rank, self.timeout
                );
                self.comms.abort_all(&reason);
                return Err(CollectiveError::Other(reason));
            }
            if Instant::now() < spin_until {
                std::thread::yield_now();
            } else {
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(2));
            }
        }
    }
}

impl Drop for NcclComm {
    fn drop(&mut self) {
        // the watchdog first: nothing may abort a communicator while it is being destroyed
        drop(self.watchdog.take());
        let mut t = self.comms.lock();
        let deadline = Instant::now() + Duration::from_secs(10).min(self.timeout);
        for (_, h) in t.comms.drain(..) {
            // SAFETY: each handle leaves the table here and is finalised (waited for, with a
            // deadline) and destroyed once, or aborted when finalising fails.
            unsafe {
                let mut ok = nccl::comm_finalize(h.0).is_ok();
                while ok && Instant::now() < deadline {
                    match async_state(h.0) {
                        Ok(NcclStatus::InProgress) => std::thread::sleep(Duration::from_millis(1)),
                        Ok(_) => break,
                        Err(_) => ok = false,
                    }
                }
                if ok && Instant::now() < deadline {
                    let _ = nccl::comm_destroy(h.0);
                } else {
                    let _ = nccl::comm_abort(h.0);
                }
            }
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

impl TensorComm for NcclComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn all_reduce_sum(&mut self, group: &[usize], t: &Tensor) -> Result<Tensor, CollectiveError> {
        let x = t.f_contiguous()?;
        let out = x.f_empty_like()?;
        let dtype = nccl_type(x.kind())?;
        // SAFETY: both buffers are contiguous device tensors of `numel` elements, alive here.
        self.run(group, "all-reduce", |comm| unsafe {
            nccl::all_reduce(
                x.data_ptr() as *const c_void,
                out.data_ptr(),
                x.numel(),
                dtype,
                sys::ncclRedOp_t::ncclSum,
                comm,
                stream(),
            )
        })?;
        Ok(out)
    }

    fn all_gather(&mut self, group: &[usize], t: &Tensor) -> Result<Tensor, CollectiveError> {
        let x = t.f_contiguous()?;
        let out = Tensor::f_empty(
            [x.numel() as i64 * group.len() as i64],
            (x.kind(), x.device()),
        )?;
        let dtype = nccl_type(x.kind())?;
        // SAFETY: `out` holds group-size times the elements of `x`, both contiguous on device.
        self.run(group, "all-gather", |comm| unsafe {
            nccl::all_gather(
                x.data_ptr() as *const c_void,
                out.data_ptr(),
                x.numel(),
                dtype,
                comm,
                stream(),
            )
        })?;
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
        let dtype = nccl_type(x.kind())?;
        // SAFETY: `x` holds n chunks of `out`'s size, both contiguous on device.
        self.run(group, "reduce-scatter", |comm| unsafe {
            nccl::reduce_scatter(
                x.data_ptr() as *const c_void,
                out.data_ptr(),
                x.numel() / n,
                dtype,
                sys::ncclRedOp_t::ncclSum,
                comm,
                stream(),
            )
        })?;
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
        self.run(group, "all-to-all", |comm| {
            nccl::group_start()?;
            for peer in 0..n {
                // SAFETY: chunk `peer` of `x` and of `out` are in bounds of contiguous device
                // tensors.
                unsafe {
                    let send =
                        (x.data_ptr() as *const u8).add(peer * chunk * elem) as *const c_void;
                    let recv = (out.data_ptr() as *mut u8).add(peer * chunk * elem) as *mut c_void;
                    nccl::send(send, chunk, dtype, peer as i32, comm, stream())?;
                    nccl::recv(recv, chunk, dtype, peer as i32, comm, stream())?;
                }
            }
            nccl::group_end()
        })?;
        Ok(out)
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

/// Runs one watched step on `device`: the watchdog aborts the communicators if the step (its
/// synchronisation included) outlives the timeout, or a peer fails; the step's result counts
/// only if nothing was aborted. Returns the loss.
fn watched_step(
    comm: &mut NcclComm,
    state: &mut RankState,
    batch: &HashMap<ValueId, autopar_analyzer::Tensor>,
    device: usize,
    what: &str,
) -> Result<f64, String> {
    comm.arm(what);
    let mut r = state.step(comm, batch, false).map_err(|e| e.to_string());
    if r.is_ok() {
        // waits for the step's collectives: if a peer never joins them, the watchdog's abort
        // makes them return
        if let Err(e) = synchronize(device) {
            r = Err(e);
        }
    }
    comm.disarm();
    if let Some(reason) = comm.aborted() {
        // the watchdog's own reason already names the step
        return Err(if reason.contains(what) {
            reason
        } else {
            format!("{what}: {reason}")
        });
    }
    match r {
        Ok(out) => Ok(out.loss),
        Err(e) => {
            let reason = format!("rank {}: {what}: {e}", comm.rank);
            comm.abort_with(&reason);
            Err(reason)
        }
    }
}

/// Waits for `device`'s work; a CUDA error (tch panics on one) is an error.
fn synchronize(device: usize) -> Result<(), String> {
    std::panic::catch_unwind(|| tch::Cuda::synchronize(device as i64))
        .map_err(|_| format!("synchronising GPU {device} failed (see the message above)"))
}

/// One rank of a multi-process CUDA run (one process per GPU, under torchrun): its GPU, its
/// NCCL communicators (ids carried by the rendezvous) and a watchdog that also aborts when the
/// rendezvous reports another rank's failure.
pub struct CudaRank {
    comm: NcclComm,
    device: usize,
    steps: usize,
}

impl CudaRank {
    /// Joins the NCCL groups of `groups` (the program's, the same on every rank) on GPU
    /// `device`; a collective call. `timeout` bounds the initialisation and each step.
    pub fn join(
        rdzv: &Rendezvous,
        groups: &[Vec<usize>],
        device: usize,
        timeout: Duration,
    ) -> Result<CudaRank, String> {
        let rank = rdzv.rank();
        let gpus = load_torch_cuda()?;
        if device >= gpus {
            return Err(format!(
                "rank {rank}: LOCAL_RANK {device} names GPU {device}, but libtorch sees {gpus} GPUs"
            ));
        }
        let ids = NcclIds::exchange(rdzv, groups)?;
        let watch = rdzv.failure_watch();
        let peer: PeerFailure = Arc::new(move || watch.failure().map(|f| f.to_string()));
        let comm = NcclComm::join(rank, device, &ids, timeout, Some(peer))?;
        Ok(CudaRank {
            comm,
            device,
            steps: 0,
        })
    }

    /// The GPU this rank runs on.
    pub fn device(&self) -> Device {
        Device::Cuda(self.device)
    }

    /// Runs one training step of `state` (built on [`Self::device`]), watched; the device is
    /// synchronised at both ends.
    pub fn step(
        &mut self,
        state: &mut RankState,
        batch: &HashMap<ValueId, autopar_analyzer::Tensor>,
    ) -> Result<CudaStep, String> {
        self.steps += 1;
        synchronize(self.device)?;
        let t0 = Instant::now();
        let what = format!("step {}", self.steps);
        let loss = watched_step(&mut self.comm, state, batch, self.device, &what)?;
        Ok(CudaStep {
            loss,
            seconds: t0.elapsed().as_secs_f64(),
            device_bytes: self.comm.device_bytes(),
        })
    }

    /// Aborts this rank's communicators (it failed outside a step).
    pub fn abort(&self, reason: &str) {
        self.comm.abort_with(reason);
    }
}

/// A barrier that a failing rank can break: waiters then return an error instead of waiting
/// for a rank that will never come; the first failure is what every rank reports.
pub(crate) struct FailBarrier {
    state: Mutex<(usize, u64, Option<String>)>,
    cv: Condvar,
    n: usize,
}

impl FailBarrier {
    pub(crate) fn new(n: usize) -> Self {
        FailBarrier {
            state: Mutex::new((0, 0, None)),
            cv: Condvar::new(),
            n,
        }
    }
    pub(crate) fn wait(&self) -> Result<(), String> {
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
    pub(crate) fn fail(&self, why: &str) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.2.get_or_insert_with(|| why.to_string());
        self.cv.notify_all();
    }
    fn failure(&self) -> Option<String> {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .2
            .clone()
    }
}

/// Trains `steps` steps of `program` with one thread per rank, rank r on GPU r, NCCL between
/// them; returns each step's loss and time. A rank that fails breaks the barrier, and the
/// other ranks' watchdogs abort their communicators, so every rank returns; the first failure
/// is the error. `AUTOPAR_TIMEOUT` (seconds) bounds each step (default
/// [`DEFAULT_STEP_TIMEOUT`]).
pub fn train_cuda(
    program: Arc<Program>,
    graph: &Graph,
    base_dir: &Path,
    seed: u64,
    optimizer: OptimizerConfig,
    batch: &HashMap<ValueId, autopar_analyzer::Tensor>,
    steps: usize,
) -> Result<Vec<CudaStep>, String> {
    let timeout = crate::rendezvous::timeout_from_env(DEFAULT_STEP_TIMEOUT)?;
    let gpus = load_torch_cuda()?;
    let world = program.world_size();
    if world > gpus {
        return Err(format!(
            "the mesh has {world} ranks but libtorch sees {gpus} GPUs"
        ));
    }
    let ids = NcclIds::new(&program.groups())?;
    let barrier = Arc::new(FailBarrier::new(world));
    let peak: Vec<Mutex<Vec<f64>>> = (0..world).map(|_| Mutex::new(vec![])).collect();
    let results: Vec<Result<Vec<CudaStep>, String>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..world)
            .map(|rank| {
                let (program, ids, barrier, peak) = (program.clone(), &ids, barrier.clone(), &peak);
                s.spawn(move || -> Result<Vec<CudaStep>, String> {
                    let run = || -> Result<Vec<CudaStep>, String> {
                        let b = barrier.clone();
                        let peer: PeerFailure = Arc::new(move || b.failure());
                        let mut comm = NcclComm::join(rank, rank, ids, timeout, Some(peer))?;
                        let device = Device::Cuda(rank);
                        let mut state =
                            RankState::new(program, graph, rank, device, base_dir, seed, optimizer)
                                .map_err(|e: ExecError| format!("rank {rank}: {e}"))?;
                        let mut out = vec![];
                        for k in 0..steps {
                            synchronize(rank)?;
                            barrier.wait()?;
                            let t0 = Instant::now();
                            let what = format!("step {}", k + 1);
                            let loss = watched_step(&mut comm, &mut state, batch, rank, &what)?;
                            barrier.wait()?;
                            let seconds = t0.elapsed().as_secs_f64();
                            let bytes = comm.device_bytes();
                            peak[rank]
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .push(bytes);
                            out.push(CudaStep {
                                loss,
                                seconds,
                                device_bytes: bytes,
                            });
                        }
                        Ok(out)
                    };
                    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(run))
                        .unwrap_or_else(|_| Err(format!("rank {rank} panicked")));
                    if let Err(e) = &r {
                        // the other ranks' watchdogs abort their communicators
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
    // the first failure is the cause; the others' errors are reactions to it
    if let Some(e) = barrier.failure() {
        return Err(e);
    }
    let mut steps_of_rank0 = vec![];
    for (rank, r) in results.into_iter().enumerate() {
        match r {
            Ok(s) if rank == 0 => steps_of_rank0 = s,
            Ok(_) => {}
            Err(e) => return Err(e),
        }
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
