//! Resharding: the one place that decides how a tensor goes from one [`ShardingSpec`] to
//! another. The solver prices edges with it, the generator emits its steps, the runtime runs
//! them; nothing else may invent a resharding path (design.md, point 6).
//!
//! # Moves
//! A path is a sequence of five moves, each over one mesh axis `a` (a group of
//! `n = mesh.shape[a]` devices that differ only in their coordinate on `a`):
//! - **all-gather(dim d, axis a)**: `a` is the *last* (minor) axis of `dims[d]`; it is removed,
//!   so the tensor becomes replicated over `a`. Only the minor axis can go in one collective:
//!   the devices of a group then hold adjacent blocks.
//! - **reduce-scatter(dim d, axis a)**: the tensor is a partial sum over `a`; the sum is
//!   scattered along `d`, `a` appended as the last axis of `dims[d]`.
//! - **all-reduce(axis a)**: partial over `a` -> replicated over `a`.
//! - **all-to-all(dim d -> dim e, axis a)**: the last axis of `dims[d]` moves to the end of
//!   `dims[e]`.
//! - **slice(dim d, axis a)**: local. `a` is unused (no dim, not partial); each device keeps
//!   the part of `dims[d]` its coordinate on `a` selects; `a` appended to `dims[d]`.
//!
//! Every intermediate spec is *valid*: each dim divisible by its number of parts. Partial sums
//! can be reduced but never created, so `to` may only be partial over axes `from` is partial
//! over. Any valid `to` is reachable: all-reduce the partial axes `to` drops, all-gather every
//! split (minor first), slice into `to` in its axis order.
//!
//! # Cost (alpha-beta, ring collectives)
//! Over axis `a` with link latency `alpha` and bandwidth `bw = link.bandwidth * comm_efficiency`
//! (or, where the cluster was profiled for the axis, the move's measured alpha and achieved
//! bandwidth: [`Link::alpha_beta`]), for a payload of `B` bytes per device (what nccl-tests
//! calls its size):
//! - all-gather: `B` = the result per device; `(n-1) alpha + (n-1)/n B / bw`.
//! - reduce-scatter: `B` = the input per device (before scattering); same form.
//! - all-reduce: `B` = the buffer; `2(n-1) alpha + 2(n-1)/n B / bw` (reduce-scatter +
//!   all-gather).
//! - all-to-all: `B` = the buffer per device; `(n-1) alpha + (n-1)/n B / bw`. Assumption: each
//!   device sends `(n-1)/n` of its buffer and receives as much, as `n-1` pairwise exchanges at
//!   the same bus bandwidth and per-step latency as a ring (NCCL runs it as grouped
//!   send/recv; on a full-bisection NVSwitch or fat-tree network that is what it achieves).
//! - slice: no communication (`bytes` 0); it costs [`SLICE_COST_S`], a token epsilon, so that
//!   among equally cheap paths the search prefers fewer local copies. The mesh carries no HBM
//!   rate, and a slice is far cheaper than any collective.
//! - a move over an axis of size 1 moves no data and costs 0.
//!
//! # Search
//! Shortest path over valid specs, exact for this cost model: Dijkstra guided by a consistent
//! lower bound (A*, see `Search`), which leaves the result unchanged and visits far fewer
//! states. Paths are ranked by cost, then by number of steps (among paths whose float costs
//! are equal); remaining ties go to the smaller state, so results are deterministic. States
//! are small `Copy` arrays (owner and position of each mesh axis); rank r on k axes has at most
//! (r+2)^k k! of them (1296 for a 4-D tensor on a 3-D mesh), and the bound prunes most (about
//! 6 us per transition over every pair of specs of a 4-D tensor on a 2x2x2 mesh). [`Resharder`]
//! memoizes results per (from, to, shape, element size) on one mesh.

use crate::cluster::CollectiveKind;
use crate::mesh::{Link, Mesh, MeshAxis};
use crate::spec::ShardingSpec;
use serde::{Deserialize, Serialize};
use std::cmp::{Ordering, Reverse};
use std::collections::{BinaryHeap, HashMap};
use std::fmt;
use std::hash::{BuildHasherDefault, Hash, Hasher};
use std::sync::Mutex;

/// Seconds charged for a [`Collective::Slice`] over an axis of more than one device.
pub const SLICE_COST_S: f64 = 1e-9;
/// Largest mesh rank the search handles.
pub const MAX_MESH_AXES: usize = 8;
/// Largest tensor rank the search handles.
pub const MAX_RANK: usize = 250;

/// One move of a resharding path (see the module doc for their exact meaning).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Collective {
    /// Removes `axis`, the last axis of `dims[dim]`: replicated over it.
    AllGather { dim: usize, axis: MeshAxis },
    /// Partial over `axis` -> `axis` appended as the last axis of `dims[dim]`.
    ReduceScatter { dim: usize, axis: MeshAxis },
    /// Partial over `axis` -> replicated over it.
    AllReduce { axis: MeshAxis },
    /// The last axis of `dims[from_dim]` (`axis`) moves to the end of `dims[to_dim]`.
    AllToAll {
        from_dim: usize,
        to_dim: usize,
        axis: MeshAxis,
    },
    /// Local: replicated over `axis` (unused, not partial) -> appended to `dims[dim]`.
    Slice { dim: usize, axis: MeshAxis },
}

impl Collective {
    /// The mesh axis the move runs over.
    pub fn axis(&self) -> MeshAxis {
        match *self {
            Collective::AllGather { axis, .. }
            | Collective::ReduceScatter { axis, .. }
            | Collective::AllReduce { axis }
            | Collective::AllToAll { axis, .. }
            | Collective::Slice { axis, .. } => axis,
        }
    }
    /// False for [`Collective::Slice`], the one local move.
    pub fn communicates(&self) -> bool {
        !matches!(self, Collective::Slice { .. })
    }
}

impl fmt::Display for Collective {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Collective::AllGather { dim, axis } => write!(f, "all-gather(dim {dim}, axis {axis})"),
            Collective::ReduceScatter { dim, axis } => {
                write!(f, "reduce-scatter(dim {dim}, axis {axis})")
            }
            Collective::AllReduce { axis } => write!(f, "all-reduce(axis {axis})"),
            Collective::AllToAll {
                from_dim,
                to_dim,
                axis,
            } => {
                write!(f, "all-to-all(dim {from_dim} -> dim {to_dim}, axis {axis})")
            }
            Collective::Slice { dim, axis } => write!(f, "slice(dim {dim}, axis {axis})"),
        }
    }
}

/// One move and the spec it leaves.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Step {
    pub op: Collective,
    pub after: ShardingSpec,
    /// The collective's payload `B` per device in the cost formula (module doc): all-gather
    /// result, reduce-scatter input, all-reduce / all-to-all buffer. 0 for a slice and for
    /// axes of size 1.
    pub bytes: f64,
    pub cost_s: f64,
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} -> {} ({:.0} B, {:.3} us)",
            self.op,
            self.after,
            self.bytes,
            self.cost_s * 1e6
        )
    }
}

/// A cheapest path; `cost_s` is the sum of the steps' costs (0 with no steps).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Transition {
    pub steps: Vec<Step>,
    pub cost_s: f64,
}

impl fmt::Display for Transition {
    /// One step per line, then the total.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for s in &self.steps {
            writeln!(f, "{s}")?;
        }
        write!(
            f,
            "total {:.3} us in {} steps",
            self.cost_s * 1e6,
            self.steps.len()
        )
    }
}

/// Why a transition cannot be computed. Specs are named `from` / `to`.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum ReshardError {
    #[error("{which} spec {spec} has {rank} dims but the tensor has shape {shape:?}")]
    Rank {
        which: &'static str,
        spec: String,
        rank: usize,
        shape: Vec<usize>,
    },
    #[error("{which} spec {spec} uses mesh axis {axis}, but mesh {mesh} has {ndim} axes")]
    AxisOutOfRange {
        which: &'static str,
        spec: String,
        axis: MeshAxis,
        mesh: String,
        ndim: usize,
    },
    #[error("{which} spec {spec} uses mesh axis {axis} twice")]
    AxisReused {
        which: &'static str,
        spec: String,
        axis: MeshAxis,
    },
    #[error("{which} spec {spec}: partial axes {partial:?} are not sorted and distinct")]
    PartialUnsorted {
        which: &'static str,
        spec: String,
        partial: Vec<MeshAxis>,
    },
    #[error(
        "{which} spec {spec}: dim {dim} of size {size} does not split into {parts} parts \
         (mesh axes {axes:?} of mesh {mesh})"
    )]
    Indivisible {
        which: &'static str,
        spec: String,
        dim: usize,
        size: usize,
        parts: usize,
        axes: Vec<MeshAxis>,
        mesh: String,
    },
    #[error(
        "cannot reshard {from} to {to}: {to} is a pending partial sum over mesh axis {axis} and \
         {from} is not; communication cannot create a partial sum"
    )]
    CreatesPartial {
        from: String,
        to: String,
        axis: MeshAxis,
    },
    #[error("mesh {mesh}: {reason}")]
    BadMesh { mesh: String, reason: String },
    #[error("communication efficiency {0} is not in (0, 1]")]
    BadEfficiency(f64),
    #[error("tensor of rank {rank}: resharding handles at most {max} dims")]
    RankTooLarge { rank: usize, max: usize },
    #[error("no resharding path from {from} to {to} on shape {shape:?}")]
    Unreachable {
        from: String,
        to: String,
        shape: Vec<usize>,
    },
}

/// The collective kind a communicating move runs (`None` for a slice).
fn kind_of(op: &Collective) -> Option<CollectiveKind> {
    match op {
        Collective::AllGather { .. } => Some(CollectiveKind::AllGather),
        Collective::ReduceScatter { .. } => Some(CollectiveKind::ReduceScatter),
        Collective::AllReduce { .. } => Some(CollectiveKind::AllReduce),
        Collective::AllToAll { .. } => Some(CollectiveKind::AllToAll),
        Collective::Slice { .. } => None,
    }
}

/// Payload bytes and seconds of one move over an axis of `n` devices, given the bytes each
/// device holds before it. The single pricing rule behind [`collective_cost`] and the search:
/// [`CollectiveKind::seconds`] with the link's alpha-beta for the move's kind
/// ([`Link::alpha_beta`]: a measured fit where the cluster was profiled).
fn price(op: &Collective, n: usize, link: Option<&Link>, eff: f64, local_bytes: f64) -> (f64, f64) {
    if n <= 1 {
        return (0.0, 0.0);
    }
    let Some(kind) = kind_of(op) else {
        return (0.0, SLICE_COST_S);
    };
    let bytes = match kind {
        CollectiveKind::AllGather => local_bytes * n as f64,
        _ => local_bytes,
    };
    let Some(link) = link else {
        return (bytes, f64::INFINITY);
    };
    let (alpha_s, bw) = link.alpha_beta(kind, eff);
    (bytes, kind.seconds(n, alpha_s, bw, bytes))
}

/// The latency (alpha) part of `op`'s seconds on `mesh`: what batching several tensors into
/// one collective (gradient buckets) shares among them.
pub fn latency_part(op: &Collective, mesh: &Mesh) -> f64 {
    let (Some(&n), Some(link)) = (mesh.shape.get(op.axis()), mesh.links.get(op.axis())) else {
        return 0.0;
    };
    let Some(kind) = kind_of(op) else {
        return 0.0;
    };
    if n <= 1 {
        0.0
    } else {
        // the latency does not depend on the efficiency
        kind.rounds() * (n as f64 - 1.0) * link.alpha_beta(kind, 1.0).0
    }
}

/// Payload bytes and seconds of `op` applied to a tensor of `shape` laid out as
/// `spec_before` (module doc for the formulas). `spec_before` should be valid for `shape` and
/// `mesh`, as [`transition`] checks; an axis outside the mesh or without a link prices at
/// infinity rather than panicking.
pub fn collective_cost(
    op: &Collective,
    spec_before: &ShardingSpec,
    shape: &[usize],
    elem_bytes: usize,
    mesh: &Mesh,
    comm_efficiency: f64,
) -> (f64, f64) {
    let Some(&n) = mesh.shape.get(op.axis()) else {
        return (0.0, f64::INFINITY);
    };
    let mut parts = 1.0;
    for &a in spec_before.dims.iter().flatten() {
        match mesh.shape.get(a) {
            Some(&s) => parts *= s as f64,
            None => return (0.0, f64::INFINITY),
        }
    }
    let total: f64 = shape.iter().map(|&s| s as f64).product();
    price(
        op,
        n,
        mesh.links.get(op.axis()),
        comm_efficiency,
        total / parts * elem_bytes as f64,
    )
}

/// A cheapest path from `from` to `to` for a tensor of `shape` with `elem_bytes`-byte
/// elements on `mesh`. Errors name the bad spec and what is wrong with it.
pub fn transition(
    from: &ShardingSpec,
    to: &ShardingSpec,
    shape: &[usize],
    elem_bytes: usize,
    mesh: &Mesh,
    comm_efficiency: f64,
) -> Result<Transition, ReshardError> {
    check_mesh(mesh, comm_efficiency)?;
    check_spec("from", from, shape, mesh)?;
    check_spec("to", to, shape, mesh)?;
    if let Some(&axis) = to.partial.iter().find(|a| !from.partial.contains(a)) {
        return Err(ReshardError::CreatesPartial {
            from: from.to_string(),
            to: to.to_string(),
            axis,
        });
    }
    Search::new(shape, elem_bytes, mesh, comm_efficiency, to).run(from, to)
}

type Key = (ShardingSpec, ShardingSpec, Vec<usize>, usize);

/// [`transition`] on one mesh with a memo: the solver asks for the same few transitions many
/// times (every layer of a model repeats them). Shareable across threads.
#[derive(Debug)]
pub struct Resharder {
    mesh: Mesh,
    comm_efficiency: f64,
    cache: Mutex<HashMap<Key, Transition>>,
}

impl Resharder {
    pub fn new(mesh: Mesh, comm_efficiency: f64) -> Self {
        Resharder {
            mesh,
            comm_efficiency,
            cache: Mutex::new(HashMap::new()),
        }
    }
    pub fn mesh(&self) -> &Mesh {
        &self.mesh
    }
    pub fn comm_efficiency(&self) -> f64 {
        self.comm_efficiency
    }

    /// [`transition`], memoized per (from, to, shape, elem_bytes). Errors are not cached.
    pub fn transition(
        &self,
        from: &ShardingSpec,
        to: &ShardingSpec,
        shape: &[usize],
        elem_bytes: usize,
    ) -> Result<Transition, ReshardError> {
        let key: Key = (from.clone(), to.clone(), shape.to_vec(), elem_bytes);
        // A poisoned lock only means another thread panicked mid-insert; the map is still a
        // valid memo, so keep using it.
        if let Some(t) = self
            .cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
        {
            return Ok(t.clone());
        }
        // Search without holding the lock: two threads may compute the same entry, never block.
        let t = transition(
            from,
            to,
            shape,
            elem_bytes,
            &self.mesh,
            self.comm_efficiency,
        )?;
        self.cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key, t.clone());
        Ok(t)
    }

    /// Seconds of the cheapest path.
    pub fn cost(
        &self,
        from: &ShardingSpec,
        to: &ShardingSpec,
        shape: &[usize],
        elem_bytes: usize,
    ) -> Result<f64, ReshardError> {
        self.transition(from, to, shape, elem_bytes)
            .map(|t| t.cost_s)
    }

    /// Number of memoized transitions.
    pub fn cached(&self) -> usize {
        self.cache.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

fn check_mesh(mesh: &Mesh, eff: f64) -> Result<(), ReshardError> {
    let bad = |reason: String| {
        Err(ReshardError::BadMesh {
            mesh: mesh.name(),
            reason,
        })
    };
    if mesh.ndim() > MAX_MESH_AXES {
        return bad(format!(
            "{} axes; resharding handles at most {MAX_MESH_AXES}",
            mesh.ndim()
        ));
    }
    if let Some(a) = mesh.shape.iter().position(|&n| n == 0) {
        return bad(format!("axis {a} has no device"));
    }
    if mesh.links.len() != mesh.ndim() {
        return bad(format!(
            "{} links for {} axes",
            mesh.links.len(),
            mesh.ndim()
        ));
    }
    for (a, l) in mesh.links.iter().enumerate() {
        if !(l.bandwidth.is_finite() && l.bandwidth > 0.0) {
            return bad(format!(
                "axis {a} link bandwidth {} is not positive and finite",
                l.bandwidth
            ));
        }
        if !(l.alpha_s.is_finite() && l.alpha_s >= 0.0) {
            return bad(format!(
                "axis {a} link latency {} is negative or not finite",
                l.alpha_s
            ));
        }
        for k in CollectiveKind::ALL {
            if let Some(f) = l.measured.get(k) {
                if !(f.bandwidth.is_finite()
                    && f.bandwidth > 0.0
                    && f.alpha_s.is_finite()
                    && f.alpha_s >= 0.0)
                {
                    return bad(format!(
                        "axis {a} measured {k}: latency {} and bandwidth {} must be finite, \
                         not negative and a positive bandwidth",
                        f.alpha_s, f.bandwidth
                    ));
                }
            }
        }
    }
    if !(eff > 0.0 && eff <= 1.0) {
        return Err(ReshardError::BadEfficiency(eff));
    }
    Ok(())
}

fn check_spec(
    which: &'static str,
    spec: &ShardingSpec,
    shape: &[usize],
    mesh: &Mesh,
) -> Result<(), ReshardError> {
    let name = || spec.to_string();
    if spec.rank() != shape.len() {
        return Err(ReshardError::Rank {
            which,
            spec: name(),
            rank: spec.rank(),
            shape: shape.to_vec(),
        });
    }
    if shape.len() > MAX_RANK {
        return Err(ReshardError::RankTooLarge {
            rank: shape.len(),
            max: MAX_RANK,
        });
    }
    let mut seen = vec![false; mesh.ndim()];
    for axis in spec.used_axes() {
        match seen.get_mut(axis) {
            None => {
                return Err(ReshardError::AxisOutOfRange {
                    which,
                    spec: name(),
                    axis,
                    mesh: mesh.name(),
                    ndim: mesh.ndim(),
                })
            }
            Some(true) => {
                return Err(ReshardError::AxisReused {
                    which,
                    spec: name(),
                    axis,
                })
            }
            Some(s) => *s = true,
        }
    }
    if spec.partial.windows(2).any(|w| w[0] >= w[1]) {
        return Err(ReshardError::PartialUnsorted {
            which,
            spec: name(),
            partial: spec.partial.clone(),
        });
    }
    for (dim, (axes, &size)) in spec.dims.iter().zip(shape).enumerate() {
        let parts = axes
            .iter()
            .try_fold(1usize, |p, &a| p.checked_mul(mesh.shape[a]));
        if parts.is_none_or(|p| size % p != 0) {
            return Err(ReshardError::Indivisible {
                which,
                spec: name(),
                dim,
                size,
                parts: parts.unwrap_or(usize::MAX),
                axes: axes.clone(),
                mesh: mesh.name(),
            });
        }
    }
    Ok(())
}

const UNUSED: u8 = u8::MAX;
const PARTIAL: u8 = u8::MAX - 1;

/// A spec as the owner of each mesh axis (a dim, [`PARTIAL`] or [`UNUSED`]) and its position
/// in that dim's list: `Copy`, no allocation, cheap to hash.
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct State {
    owner: [u8; MAX_MESH_AXES],
    pos: [u8; MAX_MESH_AXES],
}

impl Hash for State {
    fn hash<H: Hasher>(&self, h: &mut H) {
        h.write_u64(u64::from_le_bytes(self.owner));
        h.write_u64(u64::from_le_bytes(self.pos));
    }
}

/// Multiply-rotate hashing (as rustc's FxHasher) of the two words of a [`State`]: the search
/// hashes every state it relaxes, and SipHash would dominate its time.
#[derive(Default)]
struct StateHasher(u64);

impl StateHasher {
    fn add(&mut self, w: u64) {
        self.0 = (self.0.rotate_left(5) ^ w).wrapping_mul(0x517c_c1b7_2722_0a95);
    }
}

impl Hasher for StateHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.add(u64::from(b));
        }
    }
    fn write_u64(&mut self, w: u64) {
        self.add(w);
    }
}

type StateMap<V> = HashMap<State, V, BuildHasherDefault<StateHasher>>;

impl State {
    /// `spec` must have passed [`check_spec`] (axes in range, rank <= MAX_RANK).
    fn of(spec: &ShardingSpec) -> State {
        let mut s = State {
            owner: [UNUSED; MAX_MESH_AXES],
            pos: [0; MAX_MESH_AXES],
        };
        for (d, axes) in spec.dims.iter().enumerate() {
            for (i, &a) in axes.iter().enumerate() {
                s.owner[a] = d as u8;
                s.pos[a] = i as u8;
            }
        }
        for &a in &spec.partial {
            s.owner[a] = PARTIAL;
        }
        s
    }

    fn spec(&self, rank: usize, k: usize) -> ShardingSpec {
        let mut dims: Vec<Vec<(u8, MeshAxis)>> = vec![vec![]; rank];
        let mut partial = vec![];
        for a in 0..k {
            match self.owner[a] {
                UNUSED => {}
                PARTIAL => partial.push(a),
                d => dims[d as usize].push((self.pos[a], a)),
            }
        }
        let dims = dims
            .into_iter()
            .map(|mut v| {
                v.sort_unstable();
                v.into_iter().map(|(_, a)| a).collect()
            })
            .collect();
        ShardingSpec { dims, partial }
    }
}

/// f64 with a total order, for the heap.
#[derive(Copy, Clone, Debug, PartialEq)]
struct Cost(f64);
impl Eq for Cost {}
impl PartialOrd for Cost {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Cost {
    fn cmp(&self, other: &Self) -> Ordering {
        self.0.total_cmp(&other.0)
    }
}

/// The best known way into a state: (cost, steps) and the move that got there.
struct Best {
    cost: f64,
    steps: u32,
    prev: Option<(State, Collective, f64, f64)>,
}

/// A heap entry, smallest first: estimated total (cost, steps), then the state for a
/// deterministic order, then the (cost, steps) it was reached with, to spot stale entries.
type Entry = Reverse<(Cost, u32, State, Cost, u32)>;

/// A* over states. The heuristic is a sum over mesh axes, each a lower bound on the moves that
/// axis still needs: an axis in the wrong place in a dim, or a partial axis `to` drops, needs
/// at least one collective over it (at least `(n-1) alpha + (n-1)/n * B_min / bw`, with
/// `B_min` the bytes a device holds when the tensor is split over every device); an unused axis
/// `to` splits needs a slice. A move changes one axis only and costs at least that axis's bound,
/// so the heuristic is consistent and the first time `to` is popped its path is cheapest (the
/// same holds for the step count, one per misplaced axis).
struct Search<'a> {
    shape: &'a [usize],
    mesh: &'a Mesh,
    eff: f64,
    elem_bytes: f64,
    total_elems: f64,
    goal: State,
    /// Per mesh axis, the cheapest collective over it can cost (0 for size 1).
    lower: [f64; MAX_MESH_AXES],
}

impl<'a> Search<'a> {
    fn new(
        shape: &'a [usize],
        elem_bytes: usize,
        mesh: &'a Mesh,
        eff: f64,
        to: &ShardingSpec,
    ) -> Self {
        let total_elems: f64 = shape.iter().map(|&s| s as f64).product();
        let min_bytes = total_elems * elem_bytes as f64 / mesh.num_devices() as f64;
        let mut lower = [0.0; MAX_MESH_AXES];
        for (a, l) in lower.iter_mut().enumerate().take(mesh.ndim()) {
            // the cheapest collective: one ring pass of the smallest possible payload, at the
            // cheapest kind's alpha-beta (they differ where the link has measured fits)
            *l = match (mesh.links.get(a), mesh.shape[a]) {
                (_, n) if n <= 1 => 0.0,
                (None, _) => f64::INFINITY,
                (Some(link), n) => CollectiveKind::ALL
                    .iter()
                    .map(|&k| {
                        let (alpha_s, bw) = link.alpha_beta(k, eff);
                        CollectiveKind::round_seconds(n, alpha_s, bw, min_bytes)
                    })
                    .fold(f64::INFINITY, f64::min),
            };
        }
        Search {
            shape,
            mesh,
            eff,
            elem_bytes: elem_bytes as f64,
            total_elems,
            goal: State::of(to),
            lower,
        }
    }

    fn k(&self) -> usize {
        self.mesh.ndim()
    }

    /// Lower bounds on the (cost, steps) still needed from `s` to the goal.
    fn heuristic(&self, s: &State) -> (f64, u32) {
        let (mut cost, mut steps) = (0.0, 0);
        for a in 0..self.k() {
            let (now, want) = (s.owner[a], self.goal.owner[a]);
            if now == want && (now == UNUSED || now == PARTIAL || s.pos[a] == self.goal.pos[a]) {
                continue;
            }
            steps += 1;
            if self.mesh.shape[a] > 1 {
                cost += if now == UNUSED {
                    SLICE_COST_S
                } else {
                    self.lower[a]
                };
            }
        }
        (cost, steps)
    }

    /// (parts, number of axes) of each dim, into `info`.
    fn dim_info(&self, s: &State, info: &mut Vec<(usize, u8)>) {
        info.clear();
        info.resize(self.shape.len(), (1, 0));
        for a in 0..self.k() {
            if let Some(i) = info.get_mut(s.owner[a] as usize) {
                i.0 = i.0.saturating_mul(self.mesh.shape[a]);
                i.1 += 1;
            }
        }
    }

    /// Every move out of `s` into a valid state, in a fixed order. Moves that reduce a partial
    /// sum `to` keeps lead nowhere (partial sums are never created) and are left out.
    fn moves(&self, s: &State, info: &mut Vec<(usize, u8)>, out: &mut Vec<(Collective, State)>) {
        out.clear();
        self.dim_info(s, info);
        let info = &*info;
        let rank = self.shape.len();
        let fits = |d: usize, n: usize| self.shape[d] % info[d].0.saturating_mul(n) == 0;
        for a in 0..self.k() {
            let n = self.mesh.shape[a];
            let with = |owner: u8, pos: u8| {
                let mut t = *s;
                t.owner[a] = owner;
                t.pos[a] = pos;
                t
            };
            match s.owner[a] {
                UNUSED => {
                    for d in (0..rank).filter(|&d| fits(d, n)) {
                        let op = Collective::Slice { dim: d, axis: a };
                        out.push((op, with(d as u8, info[d].1)));
                    }
                }
                PARTIAL => {
                    if self.goal.owner[a] == PARTIAL {
                        continue;
                    }
                    out.push((Collective::AllReduce { axis: a }, with(UNUSED, 0)));
                    for d in (0..rank).filter(|&d| fits(d, n)) {
                        let op = Collective::ReduceScatter { dim: d, axis: a };
                        out.push((op, with(d as u8, info[d].1)));
                    }
                }
                owner => {
                    let from_dim = owner as usize;
                    if s.pos[a] + 1 != info[from_dim].1 {
                        continue; // not the minor axis of its dim
                    }
                    let op = Collective::AllGather {
                        dim: from_dim,
                        axis: a,
                    };
                    out.push((op, with(UNUSED, 0)));
                    for d in (0..rank).filter(|&d| d != from_dim && fits(d, n)) {
                        let op = Collective::AllToAll {
                            from_dim,
                            to_dim: d,
                            axis: a,
                        };
                        out.push((op, with(d as u8, info[d].1)));
                    }
                }
            }
        }
    }

    fn local_bytes(&self, s: &State) -> f64 {
        let rank = self.shape.len();
        let parts: f64 = (0..self.k())
            .filter(|&a| (s.owner[a] as usize) < rank)
            .map(|a| self.mesh.shape[a] as f64)
            .product();
        self.total_elems / parts * self.elem_bytes
    }

    fn entry(&self, s: State, cost: f64, steps: u32) -> Entry {
        let (hc, hs) = self.heuristic(&s);
        Reverse((Cost(cost + hc), steps + hs, s, Cost(cost), steps))
    }

    fn run(&self, from: &ShardingSpec, to: &ShardingSpec) -> Result<Transition, ReshardError> {
        let start = State::of(from);
        let mut best: StateMap<Best> = StateMap::default();
        let mut heap = BinaryHeap::new();
        best.insert(
            start,
            Best {
                cost: 0.0,
                steps: 0,
                prev: None,
            },
        );
        heap.push(self.entry(start, 0.0, 0));
        let (mut moves, mut info) = (vec![], vec![]);
        while let Some(Reverse((_, _, s, Cost(cost), steps))) = heap.pop() {
            if best
                .get(&s)
                .is_some_and(|b| (Cost(b.cost), b.steps) != (Cost(cost), steps))
            {
                continue; // stale: a cheaper way in was found after this entry was pushed
            }
            if s == self.goal {
                return Ok(self.path(&best, cost));
            }
            let local = self.local_bytes(&s);
            self.moves(&s, &mut info, &mut moves);
            for (op, t) in moves.drain(..) {
                let a = op.axis();
                let (bytes, c) = price(
                    &op,
                    self.mesh.shape[a],
                    self.mesh.links.get(a),
                    self.eff,
                    local,
                );
                let (nc, ns) = (cost + c, steps + 1);
                if best
                    .get(&t)
                    .is_none_or(|b| (Cost(nc), ns) < (Cost(b.cost), b.steps))
                {
                    best.insert(
                        t,
                        Best {
                            cost: nc,
                            steps: ns,
                            prev: Some((s, op, bytes, c)),
                        },
                    );
                    heap.push(self.entry(t, nc, ns));
                }
            }
        }
        Err(ReshardError::Unreachable {
            from: from.to_string(),
            to: to.to_string(),
            shape: self.shape.to_vec(),
        })
    }

    fn path(&self, best: &StateMap<Best>, cost_s: f64) -> Transition {
        let mut steps = vec![];
        let mut at = self.goal;
        while let Some(Best {
            prev: Some((p, op, bytes, c)),
            ..
        }) = best.get(&at)
        {
            steps.push(Step {
                op: op.clone(),
                after: at.spec(self.shape.len(), self.k()),
                bytes: *bytes,
                cost_s: *c,
            });
            at = *p;
        }
        steps.reverse();
        Transition { steps, cost_s }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mesh::LinkKind;

    fn mesh(shape: &[usize]) -> Mesh {
        let links = shape
            .iter()
            .map(|_| Link {
                kind: LinkKind::IntraNode,
                alpha_s: 1e-6,
                bandwidth: 1e9,
                measured: Default::default(),
            })
            .collect();
        Mesh {
            shape: shape.to_vec(),
            links,
        }
    }

    #[test]
    fn state_round_trips_specs() {
        for s in ["S01R", "RS10", "S2S0+P1", "RR+P02", "R"] {
            let spec: ShardingSpec = s.parse().expect("spec");
            assert_eq!(State::of(&spec).spec(spec.rank(), 3).to_string(), s);
        }
    }

    #[test]
    fn collective_cost_follows_the_ring_formulas() {
        let m = mesh(&[4]);
        let spec: ShardingSpec = "S0".parse().expect("spec");
        // local 2 elems * 4 B = 8 B; all-gather result 32 B: 3 us + 3/4 * 32 B / 1e9
        let (b, s) = collective_cost(
            &Collective::AllGather { dim: 0, axis: 0 },
            &spec,
            &[8],
            4,
            &m,
            1.0,
        );
        assert_eq!(b, 32.0);
        assert!((s - (3e-6 + 0.75 * 32.0 / 1e9)).abs() < 1e-15);
        let p: ShardingSpec = "R+P0".parse().expect("spec");
        let (b, s) = collective_cost(&Collective::AllReduce { axis: 0 }, &p, &[8], 4, &m, 0.5);
        assert_eq!(b, 32.0);
        assert!((s - 2.0 * (3e-6 + 0.75 * 32.0 / 0.5e9)).abs() < 1e-15);
        let one = mesh(&[1]);
        assert_eq!(
            collective_cost(&Collective::AllReduce { axis: 0 }, &p, &[8], 4, &one, 1.0),
            (0.0, 0.0)
        );
        assert_eq!(
            collective_cost(&Collective::AllReduce { axis: 3 }, &p, &[8], 4, &m, 1.0).1,
            f64::INFINITY
        );
    }
}
