//! [`TcpComm`]: the [`Communicator`] of a multi-process CPU run, one process per rank.
//!
//! Why: without GPUs (tests, CI, users trying a plan) a multi-process run still needs
//! collectives between processes. This is not about speed; it is the same contract as the
//! in-process [`Loopback`](crate::comm::Loopback), over sockets, so that a multi-process run
//! gives bitwise the losses of the in-process one:
//!
//! - Topology: a full mesh. Every rank listens on a port of its own, the addresses go round
//!   through the [`Rendezvous`], and rank `i` connects to every rank below it. Each connection
//!   has a reader thread that files what arrives into the rank's inbox, so sends never wait
//!   for the receiver to be in a collective.
//! - Messages carry the sender, the group, a per-group sequence number and the collective, and
//!   every rank sums the members' parts in group order: the same results, bit for bit, as
//!   [`Loopback`](crate::comm::Loopback) (and the same across members).
//! - Errors are [`CommError`]s with the Loopback semantics: every wait has a deadline
//!   ([`TcpComm::set_timeout`]); an error found here is sent to every peer as an abort naming
//!   this rank; a peer whose connection closes without its goodbye (the process died) is an
//!   abort of that rank; one that said goodbye and is then waited for is [`CommError::PeerLeft`];
//!   a failure announced through the rendezvous (a rank that failed outside a collective)
//!   aborts too. After an error the communicator is poisoned.

use crate::comm::{Collective, CommError, Communicator, DEFAULT_TIMEOUT};
use crate::rendezvous::{read_frame, write_frame, Body, Parse, Rendezvous, RendezvousError};
use std::collections::HashMap;
use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const DATA: u8 = 1;
const ABORT: u8 = 2;
const BYE: u8 = 3;
const HELLO: u8 = 4;

/// Sent in the hello, so that a stray connection is not taken for a rank.
const HELLO_MAGIC: u32 = 0x4150_4d53; // "APMS"

/// Why the mesh could not be set up.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConnectError {
    #[error(transparent)]
    Rendezvous(#[from] RendezvousError),
    #[error("rank {rank}: connecting the ranks' sockets: {reason}")]
    Io { rank: usize, reason: String },
}

/// What the reader threads file into a rank's inbox.
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

fn op_code(op: Collective) -> u8 {
    match op {
        Collective::AllReduceSum => 0,
        Collective::AllGather => 1,
        Collective::ReduceScatterSum => 2,
        Collective::AllToAll => 3,
        Collective::Barrier => 4,
    }
}

fn op_of(code: u8) -> Result<Collective, String> {
    Ok(match code {
        0 => Collective::AllReduceSum,
        1 => Collective::AllGather,
        2 => Collective::ReduceScatterSum,
        3 => Collective::AllToAll,
        4 => Collective::Barrier,
        c => return Err(format!("unknown collective {c}")),
    })
}

type Link = Arc<Mutex<TcpStream>>;

/// Parts received for one collective instance, by sender rank.
type Parts = HashMap<usize, (Collective, Vec<f32>)>;

/// One rank's endpoint of a multi-process world (see the module doc). `Send`, not `Sync`.
pub struct TcpComm {
    rank: usize,
    world_size: usize,
    /// Connections by peer rank (none to ourselves).
    links: Vec<Option<Link>>,
    inbox: Receiver<Msg>,
    /// Data that arrived before its collective was called, keyed by (group, sequence number).
    pending: HashMap<(Vec<usize>, u64), Parts>,
    /// Next sequence number per group.
    seqs: HashMap<Vec<usize>, u64>,
    /// Ranks that said goodbye.
    left: Vec<bool>,
    failure: Option<CommError>,
    timeout: Duration,
}

impl fmt::Debug for TcpComm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TcpComm")
            .field("rank", &self.rank)
            .field("world_size", &self.world_size)
            .field("failure", &self.failure)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

fn unspecified(like: IpAddr) -> IpAddr {
    match like {
        IpAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
        IpAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
    }
}

impl TcpComm {
    /// Connects this rank to every other rank of `rdzv`'s world (a collective call: every rank
    /// calls it). Waits at most the rendezvous timeout; the collectives' timeout starts as
    /// [`DEFAULT_TIMEOUT`].
    pub fn connect(rdzv: &Rendezvous) -> Result<TcpComm, ConnectError> {
        let (rank, world_size) = (rdzv.rank(), rdzv.world_size());
        let io_err = |what: &str, e: io::Error| ConnectError::Io {
            rank,
            reason: format!("{what}: {e}"),
        };
        let listener = TcpListener::bind((unspecified(rdzv.local_ip()), 0))
            .map_err(|e| io_err("listening", e))?;
        let port = listener
            .local_addr()
            .map_err(|e| io_err("listening", e))?
            .port();
        let me = SocketAddr::new(rdzv.local_ip(), port).to_string();
        let addrs = rdzv.all_gather(me.as_bytes())?;
        let deadline = Instant::now() + rdzv.timeout();
        let mut streams: Vec<Option<TcpStream>> = (0..world_size).map(|_| None).collect();
        for (peer, addr) in addrs.iter().enumerate().take(rank) {
            let text = String::from_utf8_lossy(addr);
            let addr: SocketAddr = text.parse().map_err(|e| ConnectError::Io {
                rank,
                reason: format!("rank {peer} sent the address {text:?}: {e}"),
            })?;
            let t = deadline
                .saturating_duration_since(Instant::now())
                .max(Duration::from_millis(1));
            let mut s = TcpStream::connect_timeout(&addr, t)
                .map_err(|e| io_err(&format!("connecting to rank {peer} at {addr}"), e))?;
            let hello = Body::default()
                .u32(HELLO_MAGIC)
                .u32(rank as u32)
                .u32(world_size as u32);
            write_frame(&mut s, HELLO, &hello.0)
                .map_err(|e| io_err(&format!("greeting rank {peer}"), e))?;
            streams[peer] = Some(s);
        }
        listener
            .set_nonblocking(true)
            .map_err(|e| io_err("listening", e))?;
        while streams.iter().skip(rank + 1).any(Option::is_none) {
            if Instant::now() >= deadline {
                let missing: Vec<usize> = (rank + 1..world_size)
                    .filter(|&r| streams[r].is_none())
                    .collect();
                return Err(ConnectError::Io {
                    rank,
                    reason: format!(
                        "ranks {missing:?} did not connect within {:?}",
                        rdzv.timeout()
                    ),
                });
            }
            let mut s = match listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if let Some(f) = rdzv.failure() {
                        return Err(RendezvousError::Failed(f).into());
                    }
                    std::thread::sleep(Duration::from_millis(2));
                    continue;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(io_err("accepting", e)),
            };
            // anything but a proper hello from a higher rank is not ours: drop it
            let greeted = s
                .set_nonblocking(false)
                .and_then(|()| s.set_read_timeout(Some(Duration::from_secs(10))))
                .and_then(|()| read_frame(&mut s));
            let Ok((HELLO, body)) = greeted else {
                continue;
            };
            let mut p = Parse::new(&body);
            let (Ok(HELLO_MAGIC), Ok(peer), Ok(w)) = (p.u32(), p.u32(), p.u32()) else {
                continue;
            };
            let peer = peer as usize;
            if w as usize == world_size
                && peer > rank
                && peer < world_size
                && streams[peer].is_none()
            {
                streams[peer] = Some(s);
            }
        }
        let (tx, inbox) = channel();
        let mut links = vec![];
        for (peer, s) in streams.into_iter().enumerate() {
            let Some(s) = s else {
                links.push(None);
                continue;
            };
            let setup = s
                .set_nodelay(true)
                .and_then(|()| s.set_read_timeout(None))
                .and_then(|()| s.set_write_timeout(Some(DEFAULT_TIMEOUT)))
                .and_then(|()| s.try_clone());
            let read_half = setup.map_err(|e| io_err(&format!("connection to rank {peer}"), e))?;
            let tx = tx.clone();
            std::thread::Builder::new()
                .name(format!("tcp-comm-{rank}-{peer}"))
                .spawn(move || reader(read_half, peer, tx))
                .map_err(|e| io_err("starting a reader thread", e))?;
            links.push(Some(Arc::new(Mutex::new(s))));
        }
        // a rank that fails outside a collective says so through the rendezvous
        rdzv.on_failure(move |f| {
            let _ = tx.send(Msg::Abort {
                from: f.rank,
                reason: f.reason.clone(),
            });
        });
        Ok(TcpComm {
            rank,
            world_size,
            links,
            inbox,
            pending: HashMap::new(),
            seqs: HashMap::new(),
            left: vec![false; world_size],
            failure: None,
            timeout: DEFAULT_TIMEOUT,
        })
    }

    /// How long each collective waits for its peers (and a send for a peer to read).
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
        for link in self.links.iter().flatten() {
            let s = link.lock().unwrap_or_else(|e| e.into_inner());
            let _ = s.set_write_timeout(Some(timeout));
        }
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
        self.broadcast_abort(reason);
    }

    fn broadcast_abort(&self, reason: &str) {
        let body = Body::default().str(reason).0;
        for link in self.links.iter().flatten() {
            let mut s = link.lock().unwrap_or_else(|e| e.into_inner());
            // a peer that is gone needs no notice
            let _ = write_frame(&mut *s, ABORT, &body);
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
    /// (sending an abort when the error was found here rather than reported by a peer).
    fn collective<R>(
        &mut self,
        op: Collective,
        group: &[usize],
        body: impl FnOnce(&mut Self, usize) -> Result<R, CommError>,
    ) -> Result<R, CommError> {
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
                self.broadcast_abort(&e.to_string());
            }
        }
        result
    }

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
        let (rank, timeout) = (self.rank, self.timeout);
        let timeout_err = |waiting_for: Vec<usize>| CommError::Timeout {
            rank,
            op,
            group: group.to_vec(),
            timeout,
            waiting_for,
        };
        for (j, (&peer, part)) in group.iter().zip(parts).enumerate() {
            if j == me {
                continue;
            }
            let mut body = Body::default()
                .u32(self.rank as u32)
                .u32(group.len() as u32);
            for &r in group {
                body = body.u32(r as u32);
            }
            let mut body = body.u64(seq).u8(op_code(op)).0;
            body.reserve(part.len() * 4);
            for x in part.iter() {
                body.extend_from_slice(&x.to_le_bytes());
            }
            let Some(link) = &self.links[peer] else {
                continue;
            };
            let mut s = link.lock().unwrap_or_else(|e| e.into_inner());
            match write_frame(&mut *s, DATA, &body) {
                Ok(()) => {}
                // the peer stopped reading (a stopped process): as good as a timeout
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return Err(timeout_err(vec![peer]))
                }
                // the peer is gone: its reader thread reports it, by name, in the wait below
                Err(_) => {}
            }
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
            let now = Instant::now();
            if now >= deadline {
                return Err(timeout_err(missing));
            }
            match self.inbox.recv_timeout(deadline - now) {
                Ok(msg) => self.accept(msg),
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => {
                    return Err(timeout_err(missing))
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

/// Element-wise sum of equal-length parts, added in group order (as Loopback does).
fn sum_in_order(parts: &[Vec<f32>], len: usize) -> Vec<f32> {
    let mut acc = vec![0.0f32; len];
    for part in parts {
        for (a, x) in acc.iter_mut().zip(part) {
            *a += x;
        }
    }
    acc
}

fn parse_data(from: usize, body: &[u8]) -> Result<Msg, String> {
    let mut p = Parse::new(body);
    let sender = p.u32()? as usize;
    if sender != from {
        return Err(format!(
            "data from rank {from} claims to come from rank {sender}"
        ));
    }
    let n = p.u32()? as usize;
    let mut group = Vec::with_capacity(n.min(1 << 16));
    for _ in 0..n {
        group.push(p.u32()? as usize);
    }
    let seq = p.u64()?;
    let op = op_of(p.u8()?)?;
    let rest = p.rest();
    if rest.len() % 4 != 0 {
        return Err(format!(
            "a payload of {} bytes is not f32 words",
            rest.len()
        ));
    }
    let payload = rest
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    Ok(Msg::Data {
        from,
        group,
        seq,
        op,
        payload,
    })
}

/// Files everything `peer` sends into the inbox until its connection closes.
fn reader(mut stream: TcpStream, peer: usize, inbox: Sender<Msg>) {
    let mut said_bye = false;
    loop {
        let msg = match read_frame(&mut stream) {
            Ok((DATA, body)) => parse_data(peer, &body),
            Ok((ABORT, body)) => Parse::new(&body)
                .str()
                .map(|reason| Msg::Abort { from: peer, reason }),
            Ok((BYE, _)) => {
                said_bye = true;
                Ok(Msg::Left { from: peer })
            }
            Ok((k, _)) => Err(format!("unexpected message kind {k}")),
            Err(e) => {
                if !said_bye {
                    let reason = crate::rendezvous::lost_reason(&e);
                    let _ = inbox.send(Msg::Abort { from: peer, reason });
                }
                return;
            }
        };
        let msg = msg.unwrap_or_else(|e| Msg::Abort {
            from: peer,
            reason: format!("sent a malformed message: {e}"),
        });
        if inbox.send(msg).is_err() {
            // the endpoint is gone: nothing more to file
            return;
        }
    }
}

impl Communicator for TcpComm {
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

impl Drop for TcpComm {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.broadcast_abort("rank thread panicked");
        }
        for link in self.links.iter().flatten() {
            let mut s = link.lock().unwrap_or_else(|e| e.into_inner());
            let _ = write_frame(&mut *s, BYE, &[]);
            // what was sent still arrives; the reader threads end when the peers close
            let _ = s.shutdown(Shutdown::Write);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::comm::{run_ranks, Communicator};
    use crate::rendezvous::RendezvousConfig;

    fn free_port() -> u16 {
        TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .unwrap()
    }

    /// Runs `f` on `n` ranks (threads of this process talking over localhost sockets).
    fn world<T: Send>(
        n: usize,
        timeout_ms: u64,
        f: impl Fn(&Rendezvous, TcpComm) -> T + Sync,
    ) -> Vec<T> {
        let port = free_port();
        let outs: Vec<(T, Rendezvous)> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..n)
                .map(|rank| {
                    let f = &f;
                    s.spawn(move || {
                        let rz = Rendezvous::connect(&RendezvousConfig {
                            master_addr: "127.0.0.1".into(),
                            master_port: port,
                            rank,
                            world_size: n,
                            timeout: Duration::from_secs(20),
                        })
                        .unwrap();
                        let mut c = TcpComm::connect(&rz).unwrap();
                        c.set_timeout(Duration::from_millis(timeout_ms));
                        // the rendezvous outlives every rank's work: dropping it unfinished
                        // would announce a failure
                        (f(&rz, c), rz)
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        outs.into_iter().map(|(t, _)| t).collect()
    }

    /// The collectives a 2x2 mesh runs, on distinct data per rank.
    fn script(c: &mut dyn Communicator) -> Vec<Vec<f32>> {
        let r = c.rank();
        let data: Vec<f32> = (0..8).map(|i| (r * 10 + i) as f32 * 0.1 + 1e-3).collect();
        let mut out = vec![];
        let rows = if r < 2 { vec![0, 1] } else { vec![2, 3] };
        let cols = if r % 2 == 0 { vec![0, 2] } else { vec![1, 3] };
        let mut d = data.clone();
        c.all_reduce_sum(&[0, 1, 2, 3], &mut d).unwrap();
        out.push(d);
        out.push(c.all_gather(&rows, &data).unwrap());
        out.push(c.reduce_scatter_sum(&cols, &data).unwrap());
        out.push(c.all_to_all(&[0, 1, 2, 3], &data).unwrap());
        c.barrier(&rows).unwrap();
        // consecutive collectives on one group, and a one-member group
        let mut d = data.clone();
        c.all_reduce_sum(&cols, &mut d).unwrap();
        c.all_reduce_sum(&cols, &mut d).unwrap();
        out.push(d);
        out.push(c.all_gather(&[r], &data).unwrap());
        out
    }

    #[test]
    fn collectives_equal_loopback_bit_for_bit() {
        let tcp = world(4, 10_000, |_, mut c| script(&mut c));
        let lb = run_ranks(4, |mut c| Ok(script(&mut c))).unwrap();
        assert_eq!(tcp, lb);
    }

    #[test]
    fn large_payloads_cross_in_both_directions() {
        // both ranks send megabytes at once: the reader threads keep the sockets drained
        let out = world(2, 10_000, |_, mut c| {
            let r = c.rank();
            let data: Vec<f32> = (0..2_000_000)
                .map(|i| (i % 1000) as f32 + r as f32)
                .collect();
            c.all_to_all(&[0, 1], &data).unwrap()
        });
        let data = |r: usize| -> Vec<f32> {
            (0..2_000_000)
                .map(|i| (i % 1000) as f32 + r as f32)
                .collect()
        };
        for (me, got) in out.iter().enumerate() {
            let want: Vec<f32> = (0..2)
                .flat_map(|r| data(r)[me * 1_000_000..(me + 1) * 1_000_000].to_vec())
                .collect();
            assert!(got == &want, "rank {me}");
        }
    }

    #[test]
    fn an_abort_names_the_failed_rank_everywhere() {
        let out = world(3, 20_000, |_, mut c| {
            if c.rank() == 1 {
                c.abort("out of memory on rank 1");
                return String::new();
            }
            let t0 = Instant::now();
            let mut d = vec![1.0f32; 4];
            let e = c.all_reduce_sum(&[0, 1, 2], &mut d).unwrap_err();
            assert!(t0.elapsed() < Duration::from_secs(10));
            e.to_string()
        });
        assert_eq!(out[0], "rank 1 aborted: out of memory on rank 1");
        assert_eq!(out[2], out[0]);
    }

    #[test]
    fn a_failure_announced_by_the_rendezvous_aborts_collectives() {
        let out = world(2, 20_000, |rz, mut c| {
            if c.rank() == 1 {
                // failed before its first collective (a bad input, say)
                rz.fail("no data for input ids");
                std::thread::sleep(Duration::from_millis(200));
                return String::new();
            }
            let mut d = vec![1.0f32; 4];
            c.all_reduce_sum(&[0, 1], &mut d).unwrap_err().to_string()
        });
        assert_eq!(out[0], "rank 1 aborted: no data for input ids");
    }

    #[test]
    fn local_errors_poison_and_reach_the_peers() {
        let out = world(2, 20_000, |_, mut c| {
            let data: Vec<f32> = vec![1.0; 3];
            if c.rank() == 0 {
                // 3 elements do not split over 2 ranks
                let e = c.reduce_scatter_sum(&[0, 1], &data).unwrap_err();
                assert!(matches!(e, CommError::Indivisible { .. }), "{e}");
                let again = c.barrier(&[0, 1]).unwrap_err();
                assert_eq!(again, e);
                e.to_string()
            } else {
                let e = c.all_gather(&[0, 1], &data).unwrap_err();
                assert!(matches!(e, CommError::Aborted { rank: 0, .. }), "{e}");
                e.to_string()
            }
        });
        assert!(out[1].contains(&out[0]), "{out:?}");
    }

    #[test]
    fn silence_times_out_and_a_dead_peer_is_named() {
        let out = world(3, 300, |_, mut c| match c.rank() {
            // rank 2 stays away from the collective for longer than the timeout
            2 => {
                std::thread::sleep(Duration::from_millis(800));
                String::new()
            }
            _ => {
                let mut d = vec![1.0f32; 4];
                c.all_reduce_sum(&[0, 1, 2], &mut d)
                    .unwrap_err()
                    .to_string()
            }
        });
        // whoever times out first aborts the other: either way rank 2 or the timeout is named
        assert!(
            out[0].contains("waiting for ranks [2]") || out[0].contains("rank 1 aborted"),
            "{}",
            out[0]
        );
        assert!(out[0].contains("timed out"), "{}", out[0]);

        let out = world(2, 20_000, |_, mut c| {
            if c.rank() == 1 {
                // a process that dies: its connections close without a goodbye
                for link in c.links.iter().flatten() {
                    let _ = link.lock().unwrap().shutdown(Shutdown::Both);
                }
                std::mem::forget(c);
                return String::new();
            }
            let mut d = vec![1.0f32; 4];
            c.all_reduce_sum(&[0, 1], &mut d).unwrap_err().to_string()
        });
        assert_eq!(
            out[0],
            "rank 1 aborted: its connection closed without notice (the process exited or was killed)"
        );
    }

    #[test]
    fn a_peer_that_left_is_named_when_waited_for() {
        let out = world(2, 20_000, |_, mut c| {
            if c.rank() == 1 {
                drop(c);
                return String::new();
            }
            std::thread::sleep(Duration::from_millis(100));
            let mut d = vec![1.0f32; 4];
            c.all_reduce_sum(&[0, 1], &mut d).unwrap_err().to_string()
        });
        assert!(out[0].starts_with("rank 1 left"), "{}", out[0]);
    }

    #[test]
    fn the_group_is_checked() {
        let out = world(2, 5_000, |_, mut c| {
            let mut d = vec![1.0f32; 2];
            if c.rank() == 0 {
                c.all_reduce_sum(&[1, 0], &mut d).unwrap_err().to_string()
            } else {
                c.all_reduce_sum(&[0, 1], &mut d).unwrap_err().to_string()
            }
        });
        assert!(out[0].contains("must be sorted"), "{}", out[0]);
        assert!(out[1].starts_with("rank 0 aborted"), "{}", out[1]);
    }
}
