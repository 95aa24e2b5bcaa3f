//! The rendezvous of a multi-process run: a small TCP store that the ranks of a world (one
//! process each, started by `torchrun` or by hand) meet at before and while they train.
//!
//! Why our own: NCCL needs its unique ids carried from the rank that draws them to the other
//! members of each group, the CPU backend ([`crate::tcp_comm`]) needs the ranks' addresses, and
//! a rank that fails must tell every other rank *why*, at once, so that nobody waits for it
//! (NCCL itself never tells a peer that a rank is gone: its kernels wait forever). torchrun's
//! own store speaks PyTorch's private protocol; this one is a few hundred lines of std.
//!
//! - Topology: a star. Rank 0 listens on `MASTER_ADDR:port`, the others connect (retrying until
//!   the deadline: they may start before rank 0) and say who they are; rank 0 checks the world
//!   (sizes agree, every rank once) and welcomes everyone when all have arrived.
//! - Operations: [`Rendezvous::all_gather`] of byte blobs (every rank gets every blob, in rank
//!   order), [`Rendezvous::gather`] (rank 0 gets them), [`Rendezvous::broadcast`] and
//!   [`Rendezvous::barrier`]. Every rank calls the same operations in the same order; each is
//!   numbered, so a late reply never answers the wrong call.
//! - Frames are length-prefixed (a magic, a kind byte, a 64-bit length, then the body), read by
//!   one thread per connection, so that failures arrive while the rank's own thread computes.
//! - Failure: [`Rendezvous::fail`] sends "rank r failed: reason" to rank 0, which forwards it to
//!   everyone; a connection that closes without a goodbye (a killed process) is a failure of
//!   that rank, seen by rank 0 and forwarded the same way; rank 0's connection closing is rank
//!   0's failure. Only the first failure is kept and forwarded: later ones are (almost always)
//!   reactions to it. Every wait has a deadline and returns at once when a failure is known;
//!   [`Rendezvous::on_failure`] and [`Rendezvous::failure_watch`] let a communicator or a
//!   watchdog hear of it without waiting on the rendezvous.
//! - [`Rendezvous::finish`] ends a run cleanly: a last barrier (everyone is done), then goodbyes,
//!   after which closed connections are no longer failures. Dropping a rendezvous that did not
//!   finish reports this rank as failed.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::io::{self, Read, Write};
use std::net::ToSocketAddrs;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// How long connecting, and each operation, waits for the other ranks.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);

/// `AUTOPAR_TIMEOUT` (seconds, a positive number) or `default`: how long a multi-process run
/// waits for a peer (connecting, each rendezvous operation, each collective or GPU step).
pub fn timeout_from_env(default: Duration) -> Result<Duration, String> {
    match std::env::var("AUTOPAR_TIMEOUT") {
        Err(_) => Ok(default),
        Ok(v) => parse_timeout(&v),
    }
}

/// A timeout given in seconds (the value of `AUTOPAR_TIMEOUT`).
pub fn parse_timeout(v: &str) -> Result<Duration, String> {
    v.trim()
        .parse::<f64>()
        .ok()
        .filter(|s| s.is_finite() && *s > 0.0 && *s < 1e9)
        .map(Duration::from_secs_f64)
        .ok_or_else(|| format!("AUTOPAR_TIMEOUT={v:?}: expected a positive number of seconds"))
}

/// A rank that failed, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub rank: usize,
    pub reason: String,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "rank {} failed: {}", self.rank, self.reason)
    }
}

/// Why a rendezvous operation failed. Every variant names the ranks involved.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RendezvousError {
    #[error("rank 0: cannot listen for the other ranks on {addr}: {reason}")]
    Listen { addr: String, reason: String },
    #[error("rank {rank}: no rendezvous at {addr} within {timeout:?} (is rank 0 running, and are MASTER_ADDR and MASTER_PORT the same for every rank?): {reason}")]
    Unreachable {
        rank: usize,
        addr: String,
        timeout: Duration,
        reason: String,
    },
    #[error(
        "rank 0: ranks {missing:?} of {world_size} did not join the rendezvous within {timeout:?}"
    )]
    Missing {
        missing: Vec<usize>,
        world_size: usize,
        timeout: Duration,
    },
    #[error("rank {rank}: the rendezvous refused this rank: {reason}")]
    Rejected { rank: usize, reason: String },
    #[error("{0}")]
    Failed(Failure),
    #[error("rank {rank}: {what} timed out after {timeout:?} waiting for ranks {waiting_for:?}")]
    Timeout {
        rank: usize,
        what: String,
        timeout: Duration,
        waiting_for: Vec<usize>,
    },
    #[error("rank {rank}: {reason}")]
    Usage { rank: usize, reason: String },
}

/// Where the rendezvous is and who this rank is.
#[derive(Debug, Clone)]
pub struct RendezvousConfig {
    /// Rank 0's host (a name or an address), the same for every rank.
    pub master_addr: String,
    pub master_port: u16,
    pub rank: usize,
    pub world_size: usize,
    /// How long connecting, and each operation, waits.
    pub timeout: Duration,
}

// ---------------------------------------------------------------------------------------------
// Frames (shared with the TCP communicator)

const FRAME_MAGIC: [u8; 2] = *b"AP";

/// Writes one frame: magic, kind, body length (u64 LE), body.
pub(crate) fn write_frame(w: &mut impl Write, kind: u8, body: &[u8]) -> io::Result<()> {
    let mut head = Vec::with_capacity(11 + body.len().min(4096));
    head.extend_from_slice(&FRAME_MAGIC);
    head.push(kind);
    head.extend_from_slice(&(body.len() as u64).to_le_bytes());
    if body.len() <= 4096 {
        head.extend_from_slice(body);
        w.write_all(&head)
    } else {
        w.write_all(&head)?;
        w.write_all(body)
    }
}

/// Reads one frame; an error for a stream that is not ours (bad magic) or ends mid-frame.
pub(crate) fn read_frame(r: &mut impl Read) -> io::Result<(u8, Vec<u8>)> {
    let mut head = [0u8; 11];
    r.read_exact(&mut head)?;
    if head[..2] != FRAME_MAGIC {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "not an autopar frame (another program on this port?)",
        ));
    }
    let mut len_bytes = [0u8; 8];
    len_bytes.copy_from_slice(&head[3..11]);
    let len = u64::from_le_bytes(len_bytes);
    // the body grows as it arrives: a bogus length cannot allocate more than was sent
    let mut body = Vec::with_capacity(len.min(1 << 26) as usize);
    r.take(len).read_to_end(&mut body)?;
    if body.len() as u64 != len {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("the connection closed in the middle of a {len}-byte message"),
        ));
    }
    Ok((head[2], body))
}

/// Why a connection ended, as its peer's failure: a process that exited or was killed closes
/// (or resets) its connections without the goodbye that ends a run.
pub(crate) fn lost_reason(e: &io::Error) -> String {
    use io::ErrorKind::*;
    match e.kind() {
        UnexpectedEof => {
            "its connection closed without notice (the process exited or was killed)".into()
        }
        ConnectionReset | ConnectionAborted | BrokenPipe => {
            format!("its connection closed without notice (the process exited or was killed): {e}")
        }
        _ => format!("its connection broke: {e}"),
    }
}

/// Builds a frame body.
#[derive(Default)]
pub(crate) struct Body(pub(crate) Vec<u8>);

impl Body {
    pub(crate) fn u8(mut self, x: u8) -> Self {
        self.0.push(x);
        self
    }
    pub(crate) fn u32(mut self, x: u32) -> Self {
        self.0.extend_from_slice(&x.to_le_bytes());
        self
    }
    pub(crate) fn u64(mut self, x: u64) -> Self {
        self.0.extend_from_slice(&x.to_le_bytes());
        self
    }
    pub(crate) fn bytes(self, b: &[u8]) -> Self {
        let mut s = self.u64(b.len() as u64);
        s.0.extend_from_slice(b);
        s
    }
    pub(crate) fn str(self, s: &str) -> Self {
        self.bytes(s.as_bytes())
    }
}

/// Reads a frame body; errors say what was missing.
pub(crate) struct Parse<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Parse<'a> {
    pub(crate) fn new(b: &'a [u8]) -> Self {
        Parse { b, at: 0 }
    }
    pub(crate) fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.b.len());
        let Some(end) = end else {
            return Err(format!(
                "a message ends early ({} bytes, needed {} more at byte {})",
                self.b.len(),
                n,
                self.at
            ));
        };
        let s = &self.b[self.at..end];
        self.at = end;
        Ok(s)
    }
    pub(crate) fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }
    pub(crate) fn u32(&mut self) -> Result<u32, String> {
        let mut a = [0u8; 4];
        a.copy_from_slice(self.take(4)?);
        Ok(u32::from_le_bytes(a))
    }
    pub(crate) fn u64(&mut self) -> Result<u64, String> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(a))
    }
    pub(crate) fn bytes(&mut self) -> Result<&'a [u8], String> {
        let n = self.u64()?;
        let n = usize::try_from(n).map_err(|_| format!("a length of {n} bytes"))?;
        self.take(n)
    }
    pub(crate) fn str(&mut self) -> Result<String, String> {
        Ok(String::from_utf8_lossy(self.bytes()?).into_owned())
    }
    /// The bytes not read yet.
    pub(crate) fn rest(&self) -> &'a [u8] {
        &self.b[self.at..]
    }
}

// ---------------------------------------------------------------------------------------------
// The rendezvous

const HELLO: u8 = 1;
const WELCOME: u8 = 2;
const REJECT: u8 = 3;
const GATHER: u8 = 4;
const GATHERED: u8 = 5;
const FAIL: u8 = 6;
const BYE: u8 = 7;

/// Sent in the hello, so that a stray connection is not taken for a rank.
const HELLO_MAGIC: u32 = 0x4150_5244; // "APRD"

type Listener = Box<dyn Fn(&Failure) + Send>;

#[derive(Default)]
struct State {
    failure: Option<Failure>,
    listeners: Vec<Listener>,
    /// Rank 0: the other ranks' blobs of each operation, by sequence number and rank.
    parts: HashMap<u64, BTreeMap<usize, Vec<u8>>>,
    /// The other ranks: rank 0's replies, by sequence number.
    results: HashMap<u64, Vec<Vec<u8>>>,
    /// Ranks that said goodbye (their connection closing is then no failure).
    bye: Vec<bool>,
    /// This rank finished or is being dropped: closed connections are no longer failures.
    closing: bool,
}

struct Shared {
    rank: usize,
    state: Mutex<State>,
    cv: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records a failure; true when it is the first (the listeners then hear of it).
    fn record(&self, f: Failure) -> bool {
        self.record_with(f, |_| {})
    }

    /// As [`Shared::record`], running `first` (rank 0: forwarding the failure to every rank)
    /// before anyone here can see the failure, so that this rank cannot return its error and
    /// close its connections before the others have been told why.
    fn record_with(&self, f: Failure, first: impl FnOnce(&Failure)) -> bool {
        let mut st = self.lock();
        if st.failure.is_some() {
            return false;
        }
        first(&f);
        for l in &st.listeners {
            l(&f);
        }
        st.failure = Some(f);
        drop(st);
        self.cv.notify_all();
        true
    }
}

/// One connection's writing half (its reading half belongs to its reader thread).
struct Link {
    stream: Mutex<TcpStream>,
}

impl Link {
    fn send(&self, kind: u8, body: &[u8]) -> io::Result<()> {
        let mut s = self.stream.lock().unwrap_or_else(|e| e.into_inner());
        write_frame(&mut *s, kind, body)
    }
    fn shutdown(&self, how: Shutdown) {
        let s = self.stream.lock().unwrap_or_else(|e| e.into_inner());
        let _ = s.shutdown(how);
    }
}

/// A cheap handle that says whether (and how) a world has failed; for watchdog threads.
#[derive(Clone)]
pub struct FailureWatch(Arc<Shared>);

impl FailureWatch {
    pub fn failure(&self) -> Option<Failure> {
        self.0.lock().failure.clone()
    }
}

/// One rank's end of the rendezvous (see the module doc). Shareable between threads; its
/// operations are serialised.
pub struct Rendezvous {
    rank: usize,
    world_size: usize,
    timeout: Duration,
    shared: Arc<Shared>,
    /// By rank: rank 0 has a link to every other rank, the others one to rank 0.
    links: Arc<Vec<Option<Link>>>,
    /// The next operation's sequence number; held during an operation.
    next_op: Mutex<u64>,
    local_ip: IpAddr,
    finished: bool,
}

impl fmt::Debug for Rendezvous {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Rendezvous")
            .field("rank", &self.rank)
            .field("world_size", &self.world_size)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

fn resolve(host: &str, port: u16) -> Result<Vec<SocketAddr>, String> {
    (host, port)
        .to_socket_addrs()
        .map(|a| a.collect::<Vec<_>>())
        .map_err(|e| format!("cannot resolve {host}: {e}"))
        .and_then(|a| {
            if a.is_empty() {
                Err(format!("{host} has no address"))
            } else {
                Ok(a)
            }
        })
}

fn remaining(deadline: Instant) -> Duration {
    deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(1))
}

impl Rendezvous {
    /// Joins the world: rank 0 listens and waits for everyone, the others connect (retrying
    /// until `config.timeout`). Returns once every rank has joined.
    pub fn connect(config: &RendezvousConfig) -> Result<Rendezvous, RendezvousError> {
        let RendezvousConfig {
            rank, world_size, ..
        } = *config;
        if world_size == 0 || rank >= world_size {
            return Err(RendezvousError::Usage {
                rank,
                reason: format!("rank {rank} is not in a world of {world_size}"),
            });
        }
        let deadline = Instant::now() + config.timeout;
        let (links, local_ip) = if rank == 0 {
            Self::host(config, deadline)?
        } else {
            Self::join(config, deadline)?
        };
        let shared = Arc::new(Shared {
            rank,
            state: Mutex::new(State {
                bye: vec![false; world_size],
                ..State::default()
            }),
            cv: Condvar::new(),
        });
        let mut readers = vec![];
        for (peer, link) in links.iter().enumerate() {
            if let Some(link) = link {
                let s = link.stream.lock().unwrap_or_else(|e| e.into_inner());
                let stream = s.try_clone().map_err(|e| RendezvousError::Usage {
                    rank,
                    reason: format!("cannot share the connection to rank {peer}: {e}"),
                })?;
                readers.push((peer, stream));
            }
        }
        let links = Arc::new(links);
        for (peer, stream) in readers {
            let (shared, links) = (shared.clone(), links.clone());
            std::thread::Builder::new()
                .name(format!("rendezvous-{rank}-{peer}"))
                .spawn(move || reader(shared, links, peer, stream))
                .map_err(|e| RendezvousError::Usage {
                    rank,
                    reason: format!("cannot start a thread: {e}"),
                })?;
        }
        Ok(Rendezvous {
            rank,
            world_size,
            timeout: config.timeout,
            shared,
            links,
            next_op: Mutex::new(0),
            local_ip,
            finished: false,
        })
    }

    /// Rank 0: listen, accept every other rank, check the world, welcome everyone.
    fn host(
        config: &RendezvousConfig,
        deadline: Instant,
    ) -> Result<(Vec<Option<Link>>, IpAddr), RendezvousError> {
        let world_size = config.world_size;
        let mut links: Vec<Option<Link>> = (0..world_size).map(|_| None).collect();
        if world_size == 1 {
            return Ok((links, IpAddr::V4(Ipv4Addr::LOCALHOST)));
        }
        let shown = format!("{}:{}", config.master_addr, config.master_port);
        let listen_err = |reason: String| RendezvousError::Listen {
            addr: shown.clone(),
            reason,
        };
        // every interface of MASTER_ADDR's family, as torchrun's store does
        let family = resolve(&config.master_addr, config.master_port).map_err(listen_err)?;
        let any: IpAddr = if family[0].is_ipv6() {
            Ipv6Addr::UNSPECIFIED.into()
        } else {
            Ipv4Addr::UNSPECIFIED.into()
        };
        let listener = TcpListener::bind((any, config.master_port)).map_err(|e| {
            listen_err(format!(
                "{e} (another run, or torchrun's own store, on this port? set AUTOPAR_MASTER_PORT)"
            ))
        })?;
        listener
            .set_nonblocking(true)
            .map_err(|e| listen_err(e.to_string()))?;
        let mut local_ip = None;
        while links.iter().skip(1).any(Option::is_none) {
            if Instant::now() >= deadline {
                return Err(RendezvousError::Missing {
                    missing: (1..world_size).filter(|&r| links[r].is_none()).collect(),
                    world_size,
                    timeout: config.timeout,
                });
            }
            let stream = match listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(listen_err(e.to_string())),
            };
            // a connection that does not say hello properly is not one of ours: drop it
            let Ok(peer) = Self::greet(&stream, config, &links, deadline) else {
                continue;
            };
            local_ip.get_or_insert_with(|| stream.local_addr().map(|a| a.ip()));
            links[peer] = Some(Link {
                stream: Mutex::new(stream),
            });
        }
        for link in links.iter().flatten() {
            // a rank that cannot be welcomed finds out itself (it times out, or its peers fail)
            let _ = link.send(WELCOME, &[]);
        }
        let local_ip = local_ip
            .and_then(Result::ok)
            .unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST));
        Ok((links, local_ip))
    }

    /// Rank 0: reads a newcomer's hello and accepts it (its rank) or tells it why not.
    fn greet(
        stream: &TcpStream,
        config: &RendezvousConfig,
        links: &[Option<Link>],
        deadline: Instant,
    ) -> Result<usize, ()> {
        let setup = || -> io::Result<()> {
            stream.set_nonblocking(false)?;
            stream.set_nodelay(true)?;
            stream.set_read_timeout(Some(remaining(deadline).min(Duration::from_secs(10))))?;
            stream.set_write_timeout(Some(config.timeout))
        };
        setup().map_err(|_| ())?;
        let mut s = stream;
        let (kind, body) = read_frame(&mut s).map_err(|_| ())?;
        let mut p = Parse::new(&body);
        let (magic, rank, world) = match (kind, p.u32(), p.u32(), p.u32()) {
            (HELLO, Ok(m), Ok(r), Ok(w)) => (m, r as usize, w as usize),
            _ => return Err(()),
        };
        if magic != HELLO_MAGIC {
            return Err(());
        }
        let reason = if world != config.world_size {
            Some(format!(
                "rank {rank} has WORLD_SIZE {world} but rank 0 has {}",
                config.world_size
            ))
        } else if rank == 0 || rank >= world {
            Some(format!(
                "rank {rank} is not a rank other than 0 of a world of {world}"
            ))
        } else if links[rank].is_some() {
            Some(format!(
                "rank {rank} joined twice (two processes with RANK={rank}?)"
            ))
        } else {
            None
        };
        if let Some(reason) = reason {
            let _ = write_frame(&mut s, REJECT, &Body::default().str(&reason).0);
            return Err(());
        }
        stream.set_read_timeout(None).map_err(|_| ())?;
        Ok(rank)
    }

    /// A rank other than 0: connect to rank 0 (retrying), say hello, wait for the welcome.
    fn join(
        config: &RendezvousConfig,
        deadline: Instant,
    ) -> Result<(Vec<Option<Link>>, IpAddr), RendezvousError> {
        let rank = config.rank;
        let shown = format!("{}:{}", config.master_addr, config.master_port);
        let unreachable = |reason: String| RendezvousError::Unreachable {
            rank,
            addr: shown.clone(),
            timeout: config.timeout,
            reason,
        };
        let mut last = String::from("no attempt");
        let stream = loop {
            if Instant::now() >= deadline {
                return Err(unreachable(last));
            }
            match resolve(&config.master_addr, config.master_port) {
                Ok(addrs) => {
                    let mut got = None;
                    for a in addrs {
                        let t = remaining(deadline).min(Duration::from_secs(2));
                        match TcpStream::connect_timeout(&a, t) {
                            Ok(s) => {
                                got = Some(s);
                                break;
                            }
                            Err(e) => last = format!("{a}: {e}"),
                        }
                    }
                    if let Some(s) = got {
                        break s;
                    }
                }
                Err(e) => last = e,
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let io_err = |e: io::Error| unreachable(e.to_string());
        stream.set_nodelay(true).map_err(io_err)?;
        stream
            .set_write_timeout(Some(config.timeout))
            .map_err(io_err)?;
        let hello = Body::default()
            .u32(HELLO_MAGIC)
            .u32(rank as u32)
            .u32(config.world_size as u32);
        let mut s = &stream;
        write_frame(&mut s, HELLO, &hello.0).map_err(io_err)?;
        stream
            .set_read_timeout(Some(remaining(deadline)))
            .map_err(io_err)?;
        let (kind, body) = match read_frame(&mut s) {
            Ok(f) => f,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(RendezvousError::Timeout {
                    rank,
                    what: "waiting for every rank to join".into(),
                    timeout: config.timeout,
                    waiting_for: vec![0],
                })
            }
            Err(e) => return Err(unreachable(format!("rank 0 closed the connection: {e}"))),
        };
        match kind {
            WELCOME => {}
            REJECT => {
                return Err(RendezvousError::Rejected {
                    rank,
                    reason: Parse::new(&body).str().unwrap_or_default(),
                })
            }
            k => {
                return Err(unreachable(format!(
                    "unexpected message kind {k} from rank 0"
                )))
            }
        }
        stream.set_read_timeout(None).map_err(io_err)?;
        let local_ip = stream
            .local_addr()
            .map(|a| a.ip())
            .unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST));
        let mut links: Vec<Option<Link>> = (0..config.world_size).map(|_| None).collect();
        links[0] = Some(Link {
            stream: Mutex::new(stream),
        });
        Ok((links, local_ip))
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn world_size(&self) -> usize {
        self.world_size
    }

    /// How long each operation waits.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// This host's address as the other ranks reach it (the local end of the connection to
    /// rank 0; on rank 0, the address the others connected to).
    pub fn local_ip(&self) -> IpAddr {
        self.local_ip
    }

    /// The world's first failure, if any.
    pub fn failure(&self) -> Option<Failure> {
        self.shared.lock().failure.clone()
    }

    pub fn failure_watch(&self) -> FailureWatch {
        FailureWatch(self.shared.clone())
    }

    /// Calls `f` once with the world's first failure (at once if it is already known). `f`
    /// runs on a rendezvous thread and must not wait.
    pub fn on_failure(&self, f: impl Fn(&Failure) + Send + 'static) {
        let mut st = self.shared.lock();
        match &st.failure {
            Some(failure) => f(failure),
            None => st.listeners.push(Box::new(f)),
        }
    }

    /// Fails this rank: every other rank's pending and later operations return
    /// [`RendezvousError::Failed`] naming this rank with `reason` (unless another failure came
    /// first: this one is then taken as a reaction to it and not forwarded).
    pub fn fail(&self, reason: &str) {
        let f = Failure {
            rank: self.rank,
            reason: reason.to_string(),
        };
        if self.shared.record(f) {
            let body = Body::default().u32(self.rank as u32).str(reason).0;
            for link in self.links.iter().flatten() {
                let _ = link.send(FAIL, &body);
            }
        }
    }

    /// Every rank's `blob`, in rank order.
    pub fn all_gather(&self, blob: &[u8]) -> Result<Vec<Vec<u8>>, RendezvousError> {
        self.exchange(blob, false, "all-gather")
            .map(Option::unwrap_or_default)
    }

    /// Every rank's `blob`, in rank order, on rank 0 (`None` on the others).
    pub fn gather(&self, blob: &[u8]) -> Result<Option<Vec<Vec<u8>>>, RendezvousError> {
        self.exchange(blob, true, "gather")
    }

    /// Rank 0's `blob` on every rank (the others' `blob` is ignored).
    pub fn broadcast(&self, blob: &[u8]) -> Result<Vec<u8>, RendezvousError> {
        let mine: &[u8] = if self.rank == 0 { blob } else { &[] };
        let mut all = self.exchange(mine, false, "broadcast")?.unwrap_or_default();
        Ok(if all.is_empty() {
            vec![]
        } else {
            all.swap_remove(0)
        })
    }

    /// Returns once every rank has entered the barrier.
    pub fn barrier(&self) -> Result<(), RendezvousError> {
        self.exchange(&[], true, "barrier").map(|_| ())
    }

    fn failed(&self, st: &State) -> Option<RendezvousError> {
        st.failure.clone().map(RendezvousError::Failed)
    }

    /// One numbered operation: everyone's blob to rank 0, then rank 0's reply to everyone
    /// (every blob, or none when `root_only`).
    fn exchange(
        &self,
        blob: &[u8],
        root_only: bool,
        what: &str,
    ) -> Result<Option<Vec<Vec<u8>>>, RendezvousError> {
        let mut next = self.next_op.lock().unwrap_or_else(|e| e.into_inner());
        let seq = *next;
        *next += 1;
        let what = format!("rendezvous {what} #{seq}");
        if let Some(e) = self.failed(&self.shared.lock()) {
            return Err(e);
        }
        let deadline = Instant::now() + self.timeout;
        if self.rank == 0 {
            let mut st = self.shared.lock();
            let parts = loop {
                if let Some(e) = self.failed(&st) {
                    return Err(e);
                }
                let have = st.parts.get(&seq);
                let missing: Vec<usize> = (1..self.world_size)
                    .filter(|r| !have.is_some_and(|h| h.contains_key(r)))
                    .collect();
                if missing.is_empty() {
                    break st.parts.remove(&seq).unwrap_or_default();
                }
                if let Some(&r) = missing.iter().find(|&&r| st.bye[r]) {
                    return Err(RendezvousError::Failed(Failure {
                        rank: r,
                        reason: format!("finished without taking part in {what}"),
                    }));
                }
                let now = Instant::now();
                if now >= deadline {
                    return Err(RendezvousError::Timeout {
                        rank: 0,
                        what,
                        timeout: self.timeout,
                        waiting_for: missing,
                    });
                }
                st = self
                    .shared
                    .cv
                    .wait_timeout(st, deadline - now)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            };
            drop(st);
            let mut all = vec![blob.to_vec()];
            all.extend(parts.into_values());
            let mut reply = Body::default().u64(seq);
            if root_only {
                reply = reply.u32(0);
            } else {
                reply = reply.u32(all.len() as u32);
                for b in &all {
                    reply = reply.bytes(b);
                }
            }
            for (peer, link) in self.links.iter().enumerate() {
                if let Some(link) = link {
                    if let Err(e) = link.send(GATHERED, &reply.0) {
                        return Err(self.lost(peer, &e));
                    }
                }
            }
            Ok(Some(all))
        } else {
            let body = Body::default().u64(seq).u8(root_only as u8).bytes(blob).0;
            if let Some(link) = &self.links[0] {
                if let Err(e) = link.send(GATHER, &body) {
                    return Err(self.lost(0, &e));
                }
            }
            let mut st = self.shared.lock();
            loop {
                if let Some(got) = st.results.remove(&seq) {
                    return Ok((!root_only).then_some(got));
                }
                if let Some(e) = self.failed(&st) {
                    return Err(e);
                }
                let now = Instant::now();
                if now >= deadline {
                    // rank 0 answers once every rank has taken part
                    return Err(RendezvousError::Timeout {
                        rank: self.rank,
                        what: format!("{what} (rank 0 answers when every rank has joined it)"),
                        timeout: self.timeout,
                        waiting_for: vec![0],
                    });
                }
                st = self
                    .shared
                    .cv
                    .wait_timeout(st, deadline - now)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
        }
    }

    /// A send to `peer` failed: a timeout is the peer not reading (stopped), anything else
    /// means it is gone. Either way it is that rank's failure.
    fn lost(&self, peer: usize, e: &io::Error) -> RendezvousError {
        let reason = if matches!(
            e.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
        ) {
            format!(
                "did not read from rank {} for {:?}",
                self.rank, self.timeout
            )
        } else {
            format!("its connection from rank {} broke: {e}", self.rank)
        };
        let f = Failure { rank: peer, reason };
        let me = self.rank;
        self.shared.record_with(f.clone(), |f| {
            if me == 0 {
                forward(&self.links, f, peer);
            }
        });
        self.failure()
            .map(RendezvousError::Failed)
            .unwrap_or(RendezvousError::Failed(f))
    }

    /// Ends a successful run: a last barrier (every rank is done), then goodbyes.
    pub fn finish(mut self) -> Result<(), RendezvousError> {
        self.barrier()?;
        self.shared.lock().closing = true;
        for link in self.links.iter().flatten() {
            let _ = link.send(BYE, &[]);
            link.shutdown(Shutdown::Write);
        }
        self.finished = true;
        Ok(())
    }
}

impl Drop for Rendezvous {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        if self.failure().is_none() {
            self.fail(if std::thread::panicking() {
                "panicked"
            } else {
                "stopped before the end of the run"
            });
        }
        self.shared.lock().closing = true;
        for link in self.links.iter().flatten() {
            // what was sent still arrives; the reader threads end with the process
            link.shutdown(Shutdown::Write);
        }
    }
}

/// Rank 0: tells every rank but `except` (and the failed one) about a failure.
fn forward(links: &[Option<Link>], f: &Failure, except: usize) {
    let body = Body::default().u32(f.rank as u32).str(&f.reason).0;
    for (r, link) in links.iter().enumerate() {
        if r != except && r != f.rank {
            if let Some(link) = link {
                let _ = link.send(FAIL, &body);
            }
        }
    }
}

/// Reads one connection until it closes, filing what arrives.
fn reader(shared: Arc<Shared>, links: Arc<Vec<Option<Link>>>, peer: usize, mut stream: TcpStream) {
    let me = shared.rank;
    let lost = |reason: String| {
        let st = shared.lock();
        if st.closing || st.bye[peer] {
            return;
        }
        drop(st);
        let f = Failure { rank: peer, reason };
        shared.record_with(f, |f| {
            if me == 0 {
                forward(&links, f, peer);
            }
        });
    };
    loop {
        let (kind, body) = match read_frame(&mut stream) {
            Ok(f) => f,
            Err(e) => {
                let reason = lost_reason(&e);
                lost(reason);
                return;
            }
        };
        let filed = file(&shared, &links, peer, kind, &body);
        shared.cv.notify_all();
        if let Err(e) = filed {
            lost(format!("sent a malformed message: {e}"));
            return;
        }
    }
}

/// Files one message from `peer`.
fn file(
    shared: &Shared,
    links: &[Option<Link>],
    peer: usize,
    kind: u8,
    body: &[u8],
) -> Result<(), String> {
    let me = shared.rank;
    let mut p = Parse::new(body);
    match kind {
        GATHER if me == 0 => {
            let seq = p.u64()?;
            let _root_only = p.u8()?;
            let blob = p.bytes()?.to_vec();
            shared
                .lock()
                .parts
                .entry(seq)
                .or_default()
                .insert(peer, blob);
        }
        GATHERED if me != 0 => {
            let seq = p.u64()?;
            let n = p.u32()?;
            let mut blobs = Vec::with_capacity((n as usize).min(1 << 16));
            for _ in 0..n {
                blobs.push(p.bytes()?.to_vec());
            }
            shared.lock().results.insert(seq, blobs);
        }
        FAIL => {
            let rank = p.u32()? as usize;
            let reason = p.str()?;
            let f = Failure { rank, reason };
            shared.record_with(f, |f| {
                if me == 0 {
                    forward(links, f, peer);
                }
            });
        }
        BYE => shared.lock().bye[peer] = true,
        k => return Err(format!("unexpected message kind {k}")),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn free_port() -> u16 {
        TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .unwrap()
    }

    fn config(port: u16, rank: usize, world_size: usize, timeout_ms: u64) -> RendezvousConfig {
        RendezvousConfig {
            master_addr: "127.0.0.1".into(),
            master_port: port,
            rank,
            world_size,
            timeout: Duration::from_millis(timeout_ms),
        }
    }

    /// Runs `f` on `n` ranks (threads), each with its connected rendezvous.
    fn world<T: Send>(n: usize, timeout_ms: u64, f: impl Fn(Rendezvous) -> T + Sync) -> Vec<T> {
        let port = free_port();
        std::thread::scope(|s| {
            let hs: Vec<_> = (0..n)
                .map(|r| {
                    let f = &f;
                    s.spawn(
                        move || f(Rendezvous::connect(&config(port, r, n, timeout_ms)).unwrap()),
                    )
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    #[test]
    fn all_gather_gather_broadcast_and_barrier() {
        let out = world(4, 10_000, |rz| {
            let r = rz.rank();
            let all = rz.all_gather(&[r as u8; 3]).unwrap();
            assert_eq!(all, (0..4).map(|k| vec![k as u8; 3]).collect::<Vec<_>>());
            // blobs of different sizes, and empty ones
            let all = rz.all_gather(&vec![7u8; r]).unwrap();
            assert_eq!(
                all.iter().map(Vec::len).collect::<Vec<_>>(),
                vec![0, 1, 2, 3]
            );
            let g = rz.gather(&[r as u8 * 10]).unwrap();
            if r == 0 {
                assert_eq!(g.unwrap(), vec![vec![0], vec![10], vec![20], vec![30]]);
            } else {
                assert!(g.is_none());
            }
            let b = rz
                .broadcast(if r == 0 { b"plan" } else { b"ignored" })
                .unwrap();
            assert_eq!(b, b"plan");
            for _ in 0..20 {
                rz.barrier().unwrap();
            }
            rz.finish().unwrap();
            r
        });
        assert_eq!(out, vec![0, 1, 2, 3]);
    }

    #[test]
    fn one_rank_is_a_world() {
        let rz = Rendezvous::connect(&config(free_port(), 0, 1, 1000)).unwrap();
        assert_eq!(rz.all_gather(b"x").unwrap(), vec![b"x".to_vec()]);
        rz.barrier().unwrap();
        rz.finish().unwrap();
    }

    #[test]
    fn a_failure_reaches_every_rank_with_its_reason() {
        let out = world(3, 20_000, |rz| {
            let first = rz.barrier();
            if rz.rank() == 2 {
                first.as_ref().unwrap();
                rz.fail("bad input on rank 2");
            }
            // the others wait in an operation that rank 2 never joins: they must not hang
            // (or learn of the failure while this barrier completes)
            let t0 = Instant::now();
            let e = match first {
                Err(e) => e,
                Ok(()) => rz.all_gather(b"x").unwrap_err(),
            };
            assert!(t0.elapsed() < Duration::from_secs(10), "{e}");
            e.to_string()
        });
        for e in out {
            assert_eq!(e, "rank 2 failed: bad input on rank 2");
        }
    }

    #[test]
    fn a_dropped_rank_is_a_failure_of_that_rank() {
        let out = world(3, 20_000, |rz| {
            // rank 1 may leave before a peer has seen this barrier complete: then the peer's
            // barrier already reports the failure
            let first = rz.barrier();
            if rz.rank() == 1 {
                first.unwrap();
                drop(rz);
                return String::new();
            }
            let e = match first {
                Err(e) => e,
                Ok(()) => rz.barrier().unwrap_err(),
            };
            e.to_string()
        });
        assert_eq!(out[0], "rank 1 failed: stopped before the end of the run");
        assert_eq!(out[2], out[0]);
    }

    #[test]
    fn a_vanished_connection_names_its_rank() {
        // a "process" that dies: its socket closes without a goodbye or a failure message
        let port = free_port();
        std::thread::scope(|s| {
            let root = s.spawn(move || {
                let rz = Rendezvous::connect(&config(port, 0, 2, 20_000)).unwrap();
                rz.barrier().unwrap_err().to_string()
            });
            let peer = s.spawn(move || {
                let mut stream = loop {
                    if let Ok(s) = TcpStream::connect(("127.0.0.1", port)) {
                        break s;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                };
                let hello = Body::default().u32(HELLO_MAGIC).u32(1).u32(2);
                write_frame(&mut stream, HELLO, &hello.0).unwrap();
                let (kind, _) = read_frame(&mut stream).unwrap();
                assert_eq!(kind, WELCOME);
                drop(stream);
            });
            peer.join().unwrap();
            let e = root.join().unwrap();
            assert!(
                e.starts_with("rank 1 failed: its connection closed without notice"),
                "{e}"
            );
        });
    }

    #[test]
    fn a_silent_rank_times_out_naming_the_ranks_waited_for() {
        // ranks 1 and 2 joined the world, then never call the barrier (stopped processes)
        let out = world(3, 400, |rz| {
            if rz.rank() == 0 {
                rz.barrier().unwrap_err().to_string()
            } else {
                std::thread::sleep(Duration::from_millis(1500));
                String::new()
            }
        });
        assert_eq!(
            out[0],
            "rank 0: rendezvous barrier #0 timed out after 400ms waiting for ranks [1, 2]"
        );
        // and the other way round: rank 0 is the silent one
        let out = world(2, 400, |rz| {
            if rz.rank() == 1 {
                rz.barrier().unwrap_err().to_string()
            } else {
                std::thread::sleep(Duration::from_millis(1500));
                String::new()
            }
        });
        assert!(
            out[1].starts_with("rank 1: rendezvous barrier #0")
                && out[1].ends_with("timed out after 400ms waiting for ranks [0]"),
            "{}",
            out[1]
        );
    }

    #[test]
    fn a_rank_that_never_comes_is_named() {
        let e = Rendezvous::connect(&config(free_port(), 0, 3, 300)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "rank 0: ranks [1, 2] of 3 did not join the rendezvous within 300ms"
        );
        let e = Rendezvous::connect(&config(free_port(), 1, 2, 300)).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("rank 1: no rendezvous at 127.0.0.1:"),
            "{e}"
        );
    }

    #[test]
    fn world_sizes_must_agree() {
        let port = free_port();
        std::thread::scope(|s| {
            let root = s.spawn(move || Rendezvous::connect(&config(port, 0, 2, 1500)).map(|_| ()));
            let bad = s.spawn(move || Rendezvous::connect(&config(port, 1, 3, 1500)).map(|_| ()));
            let e = bad.join().unwrap().unwrap_err().to_string();
            assert_eq!(
                e,
                "rank 1: the rendezvous refused this rank: rank 1 has WORLD_SIZE 3 but rank 0 has 2"
            );
            let e = root.join().unwrap().unwrap_err().to_string();
            assert!(e.contains("ranks [1] of 2 did not join"), "{e}");
        });
    }

    #[test]
    fn listeners_hear_of_a_failure_once() {
        let out = world(2, 10_000, |rz| {
            let (tx, rx) = std::sync::mpsc::channel();
            rz.on_failure(move |f| {
                let _ = tx.send(f.clone());
            });
            rz.barrier().unwrap();
            if rz.rank() == 0 {
                rz.fail("first");
                rz.fail("second");
            }
            let f = rx.recv_timeout(Duration::from_secs(5)).unwrap();
            assert!(rx.recv_timeout(Duration::from_millis(100)).is_err());
            assert_eq!(rz.failure_watch().failure(), Some(f.clone()));
            f
        });
        for f in out {
            assert_eq!(
                f,
                Failure {
                    rank: 0,
                    reason: "first".into()
                }
            );
        }
    }

    #[test]
    fn frames_round_trip_and_garbage_is_refused() {
        let mut buf = vec![];
        write_frame(&mut buf, 9, &[1, 2, 3]).unwrap();
        write_frame(&mut buf, 4, &vec![5u8; 10_000]).unwrap();
        let mut r = &buf[..];
        assert_eq!(read_frame(&mut r).unwrap(), (9, vec![1, 2, 3]));
        assert_eq!(read_frame(&mut r).unwrap(), (4, vec![5u8; 10_000]));
        assert!(read_frame(&mut r).is_err());
        let mut garbage: &[u8] = b"GET / HTTP/1.1\r\n\r\n";
        assert!(read_frame(&mut garbage).is_err());
        let mut short = &buf[..8];
        assert!(read_frame(&mut short).is_err());
        // a length larger than what follows is an error, not an allocation
        let mut lying = FRAME_MAGIC.to_vec();
        lying.push(1);
        lying.extend_from_slice(&u64::MAX.to_le_bytes());
        assert!(read_frame(&mut &lying[..]).is_err());
    }
}
