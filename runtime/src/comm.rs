//! Collectives between ranks: the [`Communicator`] trait and its in-process [`Loopback`] backend.
//!
//! Why a trait: the solver's resharding (`Sharding::transition`) emits collectives over *mesh
//! axes*, and the runtime must execute them the same way whether the ranks are threads of one
//! test process ([`Loopback`]) or one process per GPU (NCCL, later). A collective runs within a
//! *group*: the sorted world ranks that differ only in the coordinate of one mesh axis (on a 2x2
//! mesh, axis 0 gives the groups `[0, 2]`, `[1, 3]` and axis 1 gives `[0, 1]`, `[2, 3]`). The
//! caller is always a member of the group it passes, and every member passes the same list.
//!
//! Design choices:
//! - A communicator belongs to one rank thread: the trait requires `Send` (it is moved into its
//!   thread) but not `Sync`, and there is no `unsafe` anywhere (contrast candle's
//!   `unsafe impl Sync` around NCCL).
//! - Data is `f32` for now; other dtypes come with the tch runtime, whose tensors carry their own.
//! - Errors never hang. Every wait has a deadline ([`DEFAULT_TIMEOUT`], configurable with
//!   [`LoopbackComm::set_timeout`]); a rank that fails broadcasts an abort, so the other ranks'
//!   pending and later collectives return [`CommError::Aborted`] naming it at once; an endpoint
//!   dropped while another rank still waits for its data gives [`CommError::PeerLeft`].
//! - After any error a communicator is *poisoned*: later collectives return the same error,
//!   because the ranks no longer agree on which collective comes next. An error found locally
//!   (bad group, size mismatch, timeout) is broadcast as an abort so that peers fail fast too.
//! - Loopback exchanges real data: each rank sends its parts to the other members over std
//!   channels and computes its own result. Messages are tagged with the group and a per-group
//!   sequence number, so collectives on different groups, or consecutive collectives on one
//!   group, never mix up even when they arrive out of order. Sums add the members'
//!   contributions in group order on every rank, so all members get bitwise-identical results.
//!
//! [`run_ranks`] spawns one scoped thread per rank, catches errors and panics, aborts the other
//! ranks when one fails and returns the first failure with its rank and message.

use std::collections::HashMap;
use std::fmt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long a collective waits for its peers before failing with [`CommError::Timeout`].
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// The collectives, named in errors (and checked: members of a group must call the same one).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Collective {
    AllReduceSum,
    AllGather,
    ReduceScatterSum,
    AllToAll,
    Barrier,
}

impl fmt::Display for Collective {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Collective::AllReduceSum => "all_reduce_sum",
            Collective::AllGather => "all_gather",
            Collective::ReduceScatterSum => "reduce_scatter_sum",
            Collective::AllToAll => "all_to_all",
            Collective::Barrier => "barrier",
        })
    }
}

/// Why a collective failed. Every variant names the ranks involved.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CommError {
    /// `rank` failed (returned an error, panicked, or hit a communication error) and aborted.
    #[error("rank {rank} aborted: {reason}")]
    Aborted { rank: usize, reason: String },
    /// `rank` dropped its endpoint before sending its part of this collective.
    #[error("rank {rank} left (dropped its communicator) without taking part in {op} on group {group:?}")]
    PeerLeft {
        rank: usize,
        op: Collective,
        group: Vec<usize>,
    },
    /// The peers in `waiting_for` did not send their parts within `timeout`.
    #[error("{op} on group {group:?} timed out after {timeout:?} at rank {rank}, waiting for ranks {waiting_for:?}")]
    Timeout {
        rank: usize,
        op: Collective,
        group: Vec<usize>,
        timeout: Duration,
        waiting_for: Vec<usize>,
    },
    /// `rank` expected `expected` elements from `peer` but received `got`.
    #[error("{op} on group {group:?}: rank {rank} expected {expected} elements from rank {peer} but got {got}")]
    SizeMismatch {
        rank: usize,
        peer: usize,
        op: Collective,
        group: Vec<usize>,
        expected: usize,
        got: usize,
    },
    /// Members of one group called different collectives at the same position in the sequence.
    #[error("collective mismatch on group {group:?}: rank {rank} called {op} but rank {peer} called {peer_op}")]
    CollectiveMismatch {
        rank: usize,
        peer: usize,
        group: Vec<usize>,
        op: Collective,
        peer_op: Collective,
    },
    /// A reduce-scatter or all-to-all buffer that does not split into group-size equal chunks.
    #[error("{op} on group {group:?}: rank {rank} has {len} elements, not divisible by the group size {}", group.len())]
    Indivisible {
        rank: usize,
        op: Collective,
        group: Vec<usize>,
        len: usize,
    },
    /// The group is empty, unsorted, out of range, or does not contain the caller.
    #[error("{op}: bad group {group:?} for rank {rank} in a world of {world_size}: {reason}")]
    BadGroup {
        rank: usize,
        world_size: usize,
        op: Collective,
        group: Vec<usize>,
        reason: String,
    },
}

/// Collectives of one rank. `group` is the sorted list of participating world ranks and contains
/// the caller; every member must call the same collectives on the same group in the same order.
pub trait Communicator: Send {
    /// This endpoint's world rank.
    fn rank(&self) -> usize;
    /// Number of ranks in the world.
    fn world_size(&self) -> usize;
    /// Element-wise sum over the group, in place; every member must pass the same length.
    fn all_reduce_sum(&mut self, group: &[usize], data: &mut [f32]) -> Result<(), CommError>;
    /// The members' `local` buffers (equal lengths) concatenated in group order.
    fn all_gather(&mut self, group: &[usize], local: &[f32]) -> Result<Vec<f32>, CommError>;
    /// `data` (equal lengths, divisible by the group size) is split into group-size chunks;
    /// returns the element-wise sum over members of the chunk at the caller's group position.
    fn reduce_scatter_sum(&mut self, group: &[usize], data: &[f32]) -> Result<Vec<f32>, CommError>;
    /// `data` (equal lengths, divisible by the group size) is split into group-size chunks and
    /// chunk `j` goes to member `j`; returns the received chunks concatenated in group order.
    fn all_to_all(&mut self, group: &[usize], data: &[f32]) -> Result<Vec<f32>, CommError>;
    /// Returns once every member of the group has entered the barrier.
    fn barrier(&mut self, group: &[usize]) -> Result<(), CommError>;
}

/// A message between loopback ranks. Data from one sender arrives in send order (one channel
/// per receiver), so a `Left` or `Abort` always follows the data its sender sent before it.
enum Msg {
    Data {
        from: usize,
        group: Vec<usize>,
        seq: u64,
        op: Collective,
        payload: Vec<f32>,
    },
    Abort {
        from: usize,
        reason: String,
    },
    Left {
        from: usize,
    },
}

/// Builds the endpoints of an in-process world: N ranks as N threads exchanging CPU data.
pub struct Loopback;

impl Loopback {
    /// One endpoint per rank, in rank order; move each into its own rank thread.
    // `Loopback` is only a namespace for building a world, so `new` returns its endpoints.
    #[allow(clippy::new_ret_no_self)]
    pub fn new(world_size: usize) -> Vec<LoopbackComm> {
        let (senders, receivers): (Vec<Sender<Msg>>, Vec<Receiver<Msg>>) =
            (0..world_size).map(|_| channel()).unzip();
        receivers
            .into_iter()
            .enumerate()
            .map(|(rank, inbox)| LoopbackComm {
                rank,
                world_size,
                senders: senders.clone(),
                inbox,
                pending: HashMap::new(),
                seqs: HashMap::new(),
                left: vec![false; world_size],
                failure: None,
                timeout: DEFAULT_TIMEOUT,
                notify_on_drop: true,
            })
            .collect()
    }
}

/// Parts received for one collective instance, by sender rank.
type Parts = HashMap<usize, (Collective, Vec<f32>)>;

/// One rank's loopback endpoint. `Send` but not `Sync`: it lives in its rank thread.
///
/// Dropping it tells the other ranks that this rank left (or aborted, if the thread is
/// panicking), so nobody waits for data it will never send.
pub struct LoopbackComm {
    rank: usize,
    world_size: usize,
    /// Senders to every rank's inbox, indexed by rank (our own included, unused).
    senders: Vec<Sender<Msg>>,
    inbox: Receiver<Msg>,
    /// Data that arrived before its collective was called, keyed by (group, sequence number).
    pending: HashMap<(Vec<usize>, u64), Parts>,
    /// Next sequence number per group.
    seqs: HashMap<Vec<usize>, u64>,
    /// Ranks whose endpoint was dropped.
    left: Vec<bool>,
    /// Set on the first error; later collectives return it.
    failure: Option<CommError>,
    timeout: Duration,
    /// False under [`run_ranks`], which notifies the peers itself once it knows the outcome.
    notify_on_drop: bool,
}

impl fmt::Debug for LoopbackComm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoopbackComm")
            .field("rank", &self.rank)
            .field("world_size", &self.world_size)
            .field("failure", &self.failure)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl LoopbackComm {
    /// How long each collective waits for its peers (default [`DEFAULT_TIMEOUT`]).
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Fails this rank: every other rank's pending and later collectives return
    /// [`CommError::Aborted`] naming this rank with `reason`, and so do this endpoint's own.
    pub fn abort(&mut self, reason: &str) {
        if self.failure.is_none() {
            self.failure = Some(CommError::Aborted {
                rank: self.rank,
                reason: reason.to_string(),
            });
        }
        broadcast_abort(&self.senders, self.rank, reason);
    }

    fn notifier(&self) -> Notifier {
        Notifier {
            rank: self.rank,
            senders: self.senders.clone(),
        }
    }

    /// Checks the group and returns the caller's position in it.
    fn validate(&self, op: Collective, group: &[usize]) -> Result<usize, CommError> {
        let bad = |reason: String| CommError::BadGroup {
            rank: self.rank,
            world_size: self.world_size,
            op,
            group: group.to_vec(),
            reason,
        };
        if group.is_empty() {
            return Err(bad("the group is empty".into()));
        }
        if let Some(&r) = group.iter().find(|&&r| r >= self.world_size) {
            return Err(bad(format!("rank {r} is out of range")));
        }
        if group.windows(2).any(|w| w[0] >= w[1]) {
            return Err(bad("ranks must be sorted and distinct".into()));
        }
        group
            .iter()
            .position(|&r| r == self.rank)
            .ok_or_else(|| bad("the caller is not a member".into()))
    }

    /// Runs one collective: refuses if poisoned, validates the group, and poisons on error
    /// (broadcasting an abort when the error was found here rather than reported by a peer).
    fn collective<R>(
        &mut self,
        op: Collective,
        group: &[usize],
        body: impl FnOnce(&mut Self, usize) -> Result<R, CommError>,
    ) -> Result<R, CommError> {
        // See notices that already arrived, so a later collective fails even if it would not
        // need to wait (a one-member group, or data that is already here).
        while let Ok(msg) = self.inbox.try_recv() {
            self.accept(msg);
        }
        if let Some(e) = &self.failure {
            return Err(e.clone());
        }
        let result = self.validate(op, group).and_then(|me| body(self, me));
        if let Err(e) = &result {
            let from_peer = match e {
                CommError::Aborted { rank, .. } => *rank != self.rank,
                CommError::PeerLeft { .. } => true,
                _ => false,
            };
            if self.failure.is_none() {
                self.failure = Some(e.clone());
            }
            if !from_peer {
                broadcast_abort(&self.senders, self.rank, &e.to_string());
            }
        }
        result
    }

    /// Files an incoming message.
    fn accept(&mut self, msg: Msg) {
        match msg {
            Msg::Data {
                from,
                group,
                seq,
                op,
                payload,
            } => {
                self.pending
                    .entry((group, seq))
                    .or_default()
                    .insert(from, (op, payload));
            }
            Msg::Abort { from, reason } => {
                if self.failure.is_none() {
                    self.failure = Some(CommError::Aborted { rank: from, reason });
                }
            }
            Msg::Left { from } => {
                if let Some(l) = self.left.get_mut(from) {
                    *l = true;
                }
            }
        }
    }

    /// Sends `parts[j]` to member `j` and returns what each member sent us, in group order
    /// (our own part at our position). Every received part must have `parts[me].len()` elements.
    fn exchange(
        &mut self,
        op: Collective,
        group: &[usize],
        me: usize,
        parts: &[&[f32]],
    ) -> Result<Vec<Vec<f32>>, CommError> {
        let counter = self.seqs.entry(group.to_vec()).or_insert(0);
        let seq = *counter;
        *counter += 1;
        for (j, (&peer, part)) in group.iter().zip(parts).enumerate() {
            if j == me {
                continue;
            }
            let msg = Msg::Data {
                from: self.rank,
                group: group.to_vec(),
                seq,
                op,
                payload: part.to_vec(),
            };
            // A closed inbox means the peer is gone; its Left or Abort notice is on its way
            // (an endpoint announces itself before its inbox closes, and run_ranks notifies
            // after), so the wait below reports it by name. Its part may even have arrived.
            let _ = self.senders[peer].send(msg);
        }

        let key = (group.to_vec(), seq);
        let deadline = Instant::now() + self.timeout;
        loop {
            if let Some(e) = &self.failure {
                return Err(e.clone());
            }
            let have = self.pending.get(&key);
            let missing: Vec<usize> = group
                .iter()
                .enumerate()
                .filter(|&(j, peer)| j != me && !have.is_some_and(|h| h.contains_key(peer)))
                .map(|(_, &peer)| peer)
                .collect();
            if missing.is_empty() {
                break;
            }
            if let Some(&gone) = missing.iter().find(|&&r| self.left[r]) {
                return Err(CommError::PeerLeft {
                    rank: gone,
                    op,
                    group: group.to_vec(),
                });
            }
            let timeout = || CommError::Timeout {
                rank: self.rank,
                op,
                group: group.to_vec(),
                timeout: self.timeout,
                waiting_for: missing.clone(),
            };
            let now = Instant::now();
            if now >= deadline {
                return Err(timeout());
            }
            match self.inbox.recv_timeout(deadline - now) {
                Ok(msg) => self.accept(msg),
                // Our own sender keeps the channel open, so only the deadline can end the wait.
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => {
                    return Err(timeout())
                }
            }
        }

        let mut received = self.pending.remove(&key).unwrap_or_default();
        let expected = parts[me].len();
        let mut out = Vec::with_capacity(group.len());
        for (j, &peer) in group.iter().enumerate() {
            if j == me {
                out.push(parts[me].to_vec());
                continue;
            }
            let Some((peer_op, payload)) = received.remove(&peer) else {
                return Err(CommError::PeerLeft {
                    rank: peer,
                    op,
                    group: group.to_vec(),
                });
            };
            if peer_op != op {
                return Err(CommError::CollectiveMismatch {
                    rank: self.rank,
                    peer,
                    group: group.to_vec(),
                    op,
                    peer_op,
                });
            }
            if payload.len() != expected {
                return Err(CommError::SizeMismatch {
                    rank: self.rank,
                    peer,
                    op,
                    group: group.to_vec(),
                    expected,
                    got: payload.len(),
                });
            }
            out.push(payload);
        }
        Ok(out)
    }

    /// Splits `data` into `group.len()` equal chunks.
    fn chunks<'a>(
        &self,
        op: Collective,
        group: &[usize],
        data: &'a [f32],
    ) -> Result<Vec<&'a [f32]>, CommError> {
        let n = group.len();
        if data.len() % n != 0 {
            return Err(CommError::Indivisible {
                rank: self.rank,
                op,
                group: group.to_vec(),
                len: data.len(),
            });
        }
        let c = data.len() / n;
        Ok((0..n).map(|j| &data[j * c..(j + 1) * c]).collect())
    }
}

/// Element-wise sum of equal-length parts, added in order (the same order on every rank).
fn sum_in_order(parts: &[Vec<f32>], len: usize) -> Vec<f32> {
    let mut acc = vec![0.0f32; len];
    for part in parts {
        for (a, x) in acc.iter_mut().zip(part) {
            *a += x;
        }
    }
    acc
}

fn broadcast_abort(senders: &[Sender<Msg>], from: usize, reason: &str) {
    for (r, s) in senders.iter().enumerate() {
        if r != from {
            // A rank that already dropped its inbox needs no notice.
            let _ = s.send(Msg::Abort {
                from,
                reason: reason.to_string(),
            });
        }
    }
}

fn broadcast_left(senders: &[Sender<Msg>], from: usize) {
    for (r, s) in senders.iter().enumerate() {
        if r != from {
            let _ = s.send(Msg::Left { from });
        }
    }
}

impl Communicator for LoopbackComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world_size
    }

    fn all_reduce_sum(&mut self, group: &[usize], data: &mut [f32]) -> Result<(), CommError> {
        self.collective(Collective::AllReduceSum, group, |c, me| {
            let parts = vec![&*data; group.len()];
            let got = c.exchange(Collective::AllReduceSum, group, me, &parts)?;
            let sum = sum_in_order(&got, data.len());
            data.copy_from_slice(&sum);
            Ok(())
        })
    }

    fn all_gather(&mut self, group: &[usize], local: &[f32]) -> Result<Vec<f32>, CommError> {
        self.collective(Collective::AllGather, group, |c, me| {
            let parts = vec![local; group.len()];
            let got = c.exchange(Collective::AllGather, group, me, &parts)?;
            Ok(got.concat())
        })
    }

    fn reduce_scatter_sum(&mut self, group: &[usize], data: &[f32]) -> Result<Vec<f32>, CommError> {
        self.collective(Collective::ReduceScatterSum, group, |c, me| {
            let parts = c.chunks(Collective::ReduceScatterSum, group, data)?;
            let got = c.exchange(Collective::ReduceScatterSum, group, me, &parts)?;
            Ok(sum_in_order(&got, parts[me].len()))
        })
    }

    fn all_to_all(&mut self, group: &[usize], data: &[f32]) -> Result<Vec<f32>, CommError> {
        self.collective(Collective::AllToAll, group, |c, me| {
            let parts = c.chunks(Collective::AllToAll, group, data)?;
            let got = c.exchange(Collective::AllToAll, group, me, &parts)?;
            Ok(got.concat())
        })
    }

    fn barrier(&mut self, group: &[usize]) -> Result<(), CommError> {
        self.collective(Collective::Barrier, group, |c, me| {
            let parts: Vec<&[f32]> = vec![&[]; group.len()];
            c.exchange(Collective::Barrier, group, me, &parts)?;
            Ok(())
        })
    }
}

impl Drop for LoopbackComm {
    fn drop(&mut self) {
        if !self.notify_on_drop {
            return;
        }
        if std::thread::panicking() {
            broadcast_abort(&self.senders, self.rank, "rank thread panicked");
        } else {
            broadcast_left(&self.senders, self.rank);
        }
    }
}

/// Notifies the other ranks of a rank's outcome once [`run_ranks`] knows it.
struct Notifier {
    rank: usize,
    senders: Vec<Sender<Msg>>,
}

/// The first rank of a [`run_ranks`] world to fail, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("rank {rank} failed: {message}")]
pub struct RankFailure {
    pub rank: usize,
    pub message: String,
}

/// Runs `f` on `world` ranks, one scoped thread each, and returns their results in rank order.
///
/// When a rank returns an error or panics, the other ranks are aborted (their collectives
/// return [`CommError::Aborted`] naming it) and the first failure is returned, with the panic
/// message for a panic. The failure is recorded before the peers are notified, and only that
/// first failure is broadcast, so the returned failure and the rank named in every other rank's
/// error are the root cause, not a peer's reaction to it.
pub fn run_ranks<T: Send>(
    world: usize,
    f: impl Fn(LoopbackComm) -> Result<T, String> + Sync,
) -> Result<Vec<T>, RankFailure> {
    let first: Mutex<Option<RankFailure>> = Mutex::new(None);
    let results: Vec<Option<T>> = std::thread::scope(|s| {
        let handles: Vec<_> = Loopback::new(world)
            .into_iter()
            .map(|mut comm| {
                comm.notify_on_drop = false;
                let notifier = comm.notifier();
                let (f, first) = (&f, &first);
                s.spawn(move || {
                    let message = match catch_unwind(AssertUnwindSafe(|| f(comm))) {
                        Ok(Ok(value)) => {
                            broadcast_left(&notifier.senders, notifier.rank);
                            return Some(value);
                        }
                        Ok(Err(message)) => message,
                        Err(payload) => format!("panicked: {}", panic_message(payload.as_ref())),
                    };
                    let mut slot = first.lock().unwrap_or_else(|e| e.into_inner());
                    // Only the first failure aborts the others: later ones are (almost always)
                    // reactions to it, and must not race its abort to the remaining ranks.
                    if slot.is_none() {
                        *slot = Some(RankFailure {
                            rank: notifier.rank,
                            message: message.clone(),
                        });
                        drop(slot);
                        broadcast_abort(&notifier.senders, notifier.rank, &message);
                    }
                    None
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().ok().flatten())
            .collect()
    });
    if let Some(failure) = first.into_inner().unwrap_or_else(|e| e.into_inner()) {
        return Err(failure);
    }
    results
        .into_iter()
        .enumerate()
        .map(|(rank, r)| {
            r.ok_or_else(|| RankFailure {
                rank,
                message: "rank thread ended without a result".into(),
            })
        })
        .collect()
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_string()
    }
}
