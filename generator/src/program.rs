//! The generator's output: one SPMD program that every rank runs, each on its own blocks.
//!
//! Why one program and not N: every rank executes the same instructions on tensors of the same
//! local shapes (specs only ever split dims that divide evenly). What differs per rank is only
//! *which* block it holds and *which* ranks it talks to, and both follow from the rank's mesh
//! coordinates ([`Program::block_offsets`], [`Program::group`]). [`Program::rank_view`] spells
//! a rank's program out (what `autopar plan --dump-rank R` prints), and the verifier checks the
//! spelled-out programs of all ranks against each other.
//!
//! A *slot* is one layout of one training-graph value: a value may live in several layouts at
//! once (a parameter in its ZeRO-sharded storage and gathered for use; an activation and its
//! re-layout for a consumer).

use autopar_analyzer::graph::{NodeId, Phase, ValueId};
use autopar_analyzer::ops::Op;
use autopar_analyzer::TensorType;
use autopar_solver::reshard::Collective;
use autopar_solver::{Mesh, MeshAxis, ShardingSpec};
use std::fmt::{self, Write as _};

/// Index of a slot in [`Program::slots`] (printed `%12`).
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SlotId(pub u32);

impl fmt::Display for SlotId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "%{}", self.0)
    }
}

/// One layout of one value.
#[derive(Clone, Debug, PartialEq)]
pub struct Slot {
    pub value: ValueId,
    pub name: String,
    /// The whole (unsharded) type.
    pub global: TensorType,
    pub spec: ShardingSpec,
    /// What each rank holds: `spec.local_shape(global)`.
    pub local: TensorType,
}

/// Where a leaf slot's data comes from; the runtime fills it with the rank's block.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum LeafKind {
    /// Data fed each step (tokens, labels, images).
    Input,
    /// A trainable weight, in its storage layout.
    Param,
    /// A weight without gradient (frozen, BatchNorm running statistics).
    Buffer,
    /// A constant of the graph.
    Const,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Leaf {
    pub slot: SlotId,
    pub kind: LeafKind,
}

/// One node of the training graph on local blocks.
#[derive(Clone, Debug, PartialEq)]
pub struct Compute {
    pub node: NodeId,
    pub name: String,
    pub phase: Phase,
    pub op: Op,
    pub inputs: Vec<SlotId>,
    /// The outputs as computed: partial sums over the mesh axes of split contracted axes.
    pub outputs: Vec<SlotId>,
    /// Per mesh axis, the op axis it splits (the strategy).
    pub assignment: Vec<Option<usize>>,
    /// Mesh axes over which the op's own reductions are split (BatchNorm statistics, the
    /// cross-entropy label count): the lowering sums those over the group of these axes.
    pub sync_axes: Vec<MeshAxis>,
}

/// One resharding step (from the solver's one resharding function).
#[derive(Clone, Debug, PartialEq)]
pub struct Move {
    pub op: Collective,
    pub input: SlotId,
    pub output: SlotId,
    /// Payload per device, as the cost model counts it (0 for a local slice).
    pub bytes: f64,
    pub phase: Phase,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Instr {
    Compute(Compute),
    Move(Move),
}

/// A parameter and its synchronised gradient, both in the parameter's storage layout: the
/// optimizer updates the local block in place.
#[derive(Clone, Debug, PartialEq)]
pub struct Update {
    pub param: SlotId,
    pub grad: SlotId,
}

/// The per-rank training step (see the module doc).
#[derive(Clone, Debug, PartialEq)]
pub struct Program {
    pub mesh: Mesh,
    pub slots: Vec<Slot>,
    pub leaves: Vec<Leaf>,
    pub instrs: Vec<Instr>,
    /// The loss, replicated on every rank.
    pub loss: SlotId,
    pub updates: Vec<Update>,
    /// `(buffer leaf, its new value)`, in the buffer's layout (BatchNorm running statistics).
    pub buffer_updates: Vec<(SlotId, SlotId)>,
    /// bf16 mixed precision (the plan's `bf16_mixed`): float values are computed in bf16 from
    /// fp32 master weights, which the optimizer updates in fp32.
    pub mixed_bf16: bool,
    /// Ranges of `instrs` that re-run a stage's forward for activation checkpointing (see
    /// [`crate::recompute`]); empty without a checkpoint schedule.
    pub recompute: Vec<RecomputeBlock>,
}

/// Instructions that re-run stage `stage`'s forward (a copy with fresh slots).
#[derive(Clone, Debug, PartialEq)]
pub struct RecomputeBlock {
    pub stage: usize,
    pub instrs: std::ops::Range<usize>,
}

/// A collective as one rank issues it: the verifier compares these across ranks.
#[derive(Clone, Debug, PartialEq)]
pub struct Issued {
    pub instr: usize,
    pub kind: &'static str,
    pub group: Vec<usize>,
    /// Elements the rank contributes.
    pub elements: usize,
}

impl Program {
    pub fn slot(&self, s: SlotId) -> &Slot {
        &self.slots[s.0 as usize]
    }
    pub fn world_size(&self) -> usize {
        self.mesh.num_devices()
    }

    /// The ranks that share `rank`'s coordinates on every mesh axis but `axes`, sorted (a
    /// collective over those axes runs among them).
    pub fn group(&self, rank: usize, axes: &[MeshAxis]) -> Vec<usize> {
        let me = self.mesh.coords(rank);
        (0..self.world_size())
            .filter(|&r| {
                let c = self.mesh.coords(r);
                (0..self.mesh.ndim()).all(|a| axes.contains(&a) || c[a] == me[a])
            })
            .collect()
    }

    /// Where `rank`'s block of a tensor of `shape` under `spec` starts, per dim: a dim split
    /// over axes `[a, b]` (major first) is cut into `|a| |b|` blocks and the rank holds block
    /// `coord[a] |b| + coord[b]`.
    pub fn block_offsets(&self, spec: &ShardingSpec, shape: &[usize], rank: usize) -> Vec<usize> {
        let coords = self.mesh.coords(rank);
        spec.dims
            .iter()
            .zip(shape)
            .enumerate()
            .map(|(d, (axes, &n))| {
                let parts = spec.dim_parts(d, &self.mesh).max(1);
                let mut index = 0;
                for &a in axes {
                    index = index * self.mesh.axis_size(a) + coords[a];
                }
                index * (n / parts)
            })
            .collect()
    }

    /// The collectives `rank` issues, in order (local slices are not collectives).
    pub fn issued(&self, rank: usize) -> Vec<Issued> {
        let mut out = vec![];
        for (i, instr) in self.instrs.iter().enumerate() {
            match instr {
                Instr::Move(m) if m.op.communicates() => {
                    let group = self.group(rank, &[m.op.axis()]);
                    if group.len() > 1 {
                        out.push(Issued {
                            instr: i,
                            kind: collective_kind(&m.op),
                            group,
                            elements: self.slot(m.input).local.numel(),
                        });
                    }
                }
                Instr::Compute(c) if !c.sync_axes.is_empty() => {
                    let group = self.group(rank, &c.sync_axes);
                    if group.len() > 1 && needs_group_sum(&c.op) {
                        out.push(Issued {
                            instr: i,
                            kind: "group_sum",
                            group,
                            elements: 0,
                        });
                    }
                }
                _ => {}
            }
        }
        out
    }

    /// Every group any rank issues a collective on, sorted (what a backend creates
    /// communicators for).
    pub fn groups(&self) -> Vec<Vec<usize>> {
        let mut all: Vec<Vec<usize>> = (0..self.world_size())
            .flat_map(|r| self.issued(r).into_iter().map(|c| c.group))
            .collect();
        all.sort();
        all.dedup();
        all
    }

    /// `rank`'s program in text form: leaves with the rank's block, then every instruction
    /// with its concrete group.
    pub fn rank_view(&self, rank: usize) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "program rank {rank} of {} on mesh {} (coordinates {:?}) {{",
            self.world_size(),
            self.mesh.name(),
            self.mesh.coords(rank)
        );
        for leaf in &self.leaves {
            let slot = self.slot(leaf.slot);
            let kind = match leaf.kind {
                LeafKind::Input => "input",
                LeafKind::Param => "param",
                LeafKind::Buffer => "buffer",
                LeafKind::Const => "const",
            };
            let _ = writeln!(
                s,
                "  {kind} {}{}: {} {} block at {:?} of {}",
                leaf.slot,
                name_part(&slot.name),
                slot.local,
                slot.spec,
                self.block_offsets(&slot.spec, &slot.global.shape, rank),
                slot.global
            );
        }
        for (k, instr) in self.instrs.iter().enumerate() {
            for b in self.recompute.iter().filter(|b| b.instrs.start == k) {
                let _ = writeln!(s, "  recompute stage {} {{", b.stage);
            }
            match instr {
                Instr::Compute(c) => {
                    let args: Vec<String> = c.inputs.iter().map(|v| v.to_string()).collect();
                    let outs: Vec<String> = c
                        .outputs
                        .iter()
                        .map(|&o| {
                            let slot = self.slot(o);
                            format!("{o}: {} {}", slot.local, slot.spec)
                        })
                        .collect();
                    let phase = match c.phase {
                        Phase::Forward => "",
                        Phase::Backward => " backward",
                    };
                    let sync = if c.sync_axes.is_empty() || !needs_group_sum(&c.op) {
                        String::new()
                    } else {
                        format!(" sum-statistics group {:?}", self.group(rank, &c.sync_axes))
                    };
                    let _ = writeln!(
                        s,
                        "  {}{}{phase} = {}({}){}{sync} -> {}",
                        c.node,
                        name_part(&c.name),
                        c.op.name(),
                        args.join(", "),
                        autopar_analyzer::text::op_attrs(&c.op),
                        outs.join(", ")
                    );
                }
                Instr::Move(m) => {
                    let out = self.slot(m.output);
                    let group = if m.op.communicates() {
                        format!(" group {:?}", self.group(rank, &[m.op.axis()]))
                    } else {
                        String::new()
                    };
                    let _ = writeln!(
                        s,
                        "  {}: {} {} = {}({}){group}",
                        m.output, out.local, out.spec, m.op, m.input
                    );
                }
            }
            for _ in self.recompute.iter().filter(|b| b.instrs.end == k + 1) {
                s.push_str("  }\n");
            }
        }
        let _ = writeln!(s, "  loss {}", self.loss);
        for u in &self.updates {
            let _ = writeln!(
                s,
                "  update {}{} with {}",
                u.param,
                name_part(&self.slot(u.param).name),
                u.grad
            );
        }
        for (b, v) in &self.buffer_updates {
            let _ = writeln!(s, "  write {b} <- {v}");
        }
        s.push_str("}\n");
        s
    }
}

/// Whether the lowering of `op` sums statistics over its sync group (the others ignore it).
pub fn needs_group_sum(op: &Op) -> bool {
    matches!(
        op,
        Op::BatchNorm(_)
            | Op::BatchNormGrad(_)
            | Op::SoftmaxCrossEntropy(_)
            | Op::SoftmaxCrossEntropyGrad(_)
    )
}

pub fn collective_kind(op: &Collective) -> &'static str {
    match op {
        Collective::AllGather { .. } => "all_gather",
        Collective::ReduceScatter { .. } => "reduce_scatter",
        Collective::AllReduce { .. } => "all_reduce",
        Collective::AllToAll { .. } => "all_to_all",
        Collective::Slice { .. } => "slice",
    }
}

fn name_part(name: &str) -> String {
    if name.is_empty() {
        String::new()
    } else {
        format!(" {name:?}")
    }
}
