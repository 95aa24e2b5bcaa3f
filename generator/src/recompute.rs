//! Activation checkpointing in the program: the training step as a chain of stages, and a
//! checkpoint schedule turned into recompute blocks.
//!
//! Why here and not on the graph: what a rank recomputes is its own instructions, collectives
//! included (a tensor-parallel layer re-issues its all-reduce, an FSDP layer re-gathers its
//! weights), and what it holds is its own blocks. So the chain is cut from the rank program,
//! priced with the cost model's per-device seconds for compute and collectives, and sized with
//! local bytes; and the schedule is applied to that same program.
//!
//! # Stages
//! The forward instructions form a prefix of the program. An *activation slot* is a layout of a
//! value that a forward node computes on a differentiable path from a parameter. The forward is
//! cut after instruction `k` when exactly one activation slot made so far is read by a later
//! forward instruction: that slot is the next stage's input `a_{i+1}`. Inputs, parameters
//! (gathered or not), and values computed from inputs alone (masks, position tables) may cross
//! cuts: they are not checkpointed, and a re-run stage recomputes the ones it makes.
//!
//! Each backward instruction belongs to one stage: a node's to the stage of the forward node
//! it differentiates (`NodeData::origin`), a collective's to the first stage that reads its
//! result (else to the stage that made its input), so that running the stages' backward blocks
//! from the last stage to the first keeps every read after its write.
//!
//! # Applying a schedule
//! [`apply_schedule`] writes the program out in the schedule's order: each forward op of stage
//! `i` emits a copy of the stage's forward instructions, each `B(i)` its backward ones. A copy
//! after the first gets fresh slots, and every later instruction reads the newest copy of a
//! value. Nothing else is needed for memory: the runtime frees a slot after its last reader, so
//! a forward that keeps nothing (`F_ck`, `F_n`) loses its intermediates as soon as its own
//! instructions are done, and a stage re-run with `F_all` right before its backward holds its
//! saved tensors only until that backward. Re-runs are deterministic (dropout masks depend on
//! the node, the step and the element, not on how often a node runs), so a checkpointed step
//! computes what the plain step computes.

use crate::bridge::compute_seconds;
use crate::program::{Instr, Program, RecomputeBlock, SlotId};
use crate::GenerateError;
use autopar_analyzer::graph::{NodeId, Phase, ValueDef};
use autopar_analyzer::train::{DTypePolicy, TrainingGraph};
use autopar_analyzer::TensorType;
use autopar_solver::checkpoint::{Chain, Op as CkOp, Schedule};
use autopar_solver::cluster::Cluster;
use autopar_solver::reshard::collective_cost;
use std::collections::{HashMap, HashSet};
use std::ops::Range;

/// The program's training step as a chain (see the module doc).
#[derive(Clone, Debug, PartialEq)]
pub struct Stages {
    /// Per stage, its forward instructions (a range of `program.instrs`).
    pub forward: Vec<Range<usize>>,
    /// Per stage, its input activation slot (`None` for the first stage: the data).
    pub inputs: Vec<Option<SlotId>>,
    /// Per stage, its backward instructions in program order.
    pub backward: Vec<Vec<usize>>,
    /// Per stage, the name of its first forward node (what plans record).
    pub names: Vec<String>,
}

impl Stages {
    pub fn len(&self) -> usize {
        self.forward.len()
    }
    pub fn is_empty(&self) -> bool {
        self.forward.is_empty()
    }
}

fn recompute_err(m: String) -> GenerateError {
    GenerateError::Recompute(m)
}

fn reads(instr: &Instr) -> &[SlotId] {
    match instr {
        Instr::Compute(c) => &c.inputs,
        Instr::Move(m) => std::slice::from_ref(&m.input),
    }
}

fn writes(instr: &Instr) -> &[SlotId] {
    match instr {
        Instr::Compute(c) => &c.outputs,
        Instr::Move(m) => std::slice::from_ref(&m.output),
    }
}

/// Ops whose output the runtime makes as a view of their first input (no storage of its own).
fn is_view(op: &autopar_analyzer::Op) -> bool {
    use autopar_analyzer::Op;
    matches!(
        op,
        Op::Reshape(_) | Op::Transpose(_) | Op::Expand(_) | Op::Slice(_)
    )
}

/// Per slot, the slot whose storage it uses: itself, or for a view the root of what it views.
fn storage_roots(program: &Program) -> Vec<SlotId> {
    let mut root: Vec<SlotId> = (0..program.slots.len() as u32).map(SlotId).collect();
    for instr in &program.instrs {
        if let Instr::Compute(c) = instr {
            if let (true, Some(&x), Some(&y)) =
                (is_view(&c.op), c.inputs.first(), c.outputs.first())
            {
                root[y.0 as usize] = root[x.0 as usize];
            }
        }
    }
    root
}

fn is_forward(instr: &Instr, forward_nodes: usize) -> bool {
    match instr {
        Instr::Compute(c) => (c.node.0 as usize) < forward_nodes,
        Instr::Move(m) => m.phase == Phase::Forward,
    }
}

/// Cuts `program` (generated from `tg` without a schedule) into stages.
pub fn stages(program: &Program, tg: &TrainingGraph) -> Result<Stages, GenerateError> {
    let g = &tg.graph;
    let fwd_nodes = tg.forward_nodes;
    let instrs = &program.instrs;
    let fwd_end = instrs
        .iter()
        .position(|i| !is_forward(i, fwd_nodes))
        .unwrap_or(instrs.len());
    if let Some(k) = instrs[fwd_end..]
        .iter()
        .position(|i| is_forward(i, fwd_nodes))
    {
        return Err(recompute_err(format!(
            "instruction {} is a forward instruction after the backward began at {fwd_end}",
            fwd_end + k
        )));
    }
    if fwd_end == 0 {
        return Err(recompute_err(
            "the program has no forward instruction".into(),
        ));
    }
    let needs_grad = tg.needs_grad();
    let activation = |s: SlotId| {
        let v = program.slot(s).value;
        matches!(g.value(v).def, ValueDef::Node { node, .. } if (node.0 as usize) < fwd_nodes)
            && needs_grad[v.0 as usize]
    };
    // last forward reader of each slot
    let mut last_fwd_read = vec![None; program.slots.len()];
    for (k, instr) in instrs[..fwd_end].iter().enumerate() {
        for &s in reads(instr) {
            last_fwd_read[s.0 as usize] = Some(k);
        }
    }
    let crosses = |s: SlotId, k: usize| last_fwd_read[s.0 as usize].is_some_and(|r| r > k);
    let mut forward = vec![];
    let mut inputs = vec![None];
    let mut start = 0;
    let mut live: HashSet<SlotId> = HashSet::new();
    for (k, instr) in instrs[..fwd_end].iter().enumerate() {
        let mut makes_activation = false;
        for &s in writes(instr) {
            makes_activation |= activation(s);
            if activation(s) && crosses(s, k) {
                live.insert(s);
            }
        }
        live.retain(|&s| crosses(s, k));
        // a stage ends with what makes its output, not with a view of it (which shares its
        // storage) nor with a weight's gathering (which belongs to the stage that uses it)
        let view = matches!(instr, Instr::Compute(c) if is_view(&c.op));
        if live.len() == 1 && k + 1 < fwd_end && makes_activation && !view {
            if let Some(&s) = live.iter().next() {
                forward.push(start..k + 1);
                inputs.push(Some(s));
                start = k + 1;
            }
        }
    }
    forward.push(start..fwd_end);
    let n = forward.len();
    // stage of each forward node and of each slot a forward instruction writes
    let mut stage_of_node: HashMap<NodeId, usize> = HashMap::new();
    let mut stage_of_slot: HashMap<SlotId, usize> = HashMap::new();
    for (i, r) in forward.iter().enumerate() {
        for instr in &instrs[r.clone()] {
            if let Instr::Compute(c) = instr {
                stage_of_node.insert(c.node, i);
            }
            for &s in writes(instr) {
                stage_of_slot.insert(s, i);
            }
        }
    }
    // backward: nodes by origin; collectives by their first reader, else by their input
    let mut stage_of_instr: Vec<Option<usize>> = vec![None; instrs.len()];
    let mut readers: HashMap<SlotId, Vec<usize>> = HashMap::new();
    for (k, instr) in instrs.iter().enumerate().skip(fwd_end) {
        for &s in reads(instr) {
            readers.entry(s).or_default().push(k);
        }
    }
    for k in (fwd_end..instrs.len()).rev() {
        let by_origin = match &instrs[k] {
            Instr::Compute(c) => g
                .node(c.node)
                .origin
                .and_then(|o| stage_of_node.get(&o).copied()),
            Instr::Move(_) => None,
        };
        let by_readers = writes(&instrs[k])
            .iter()
            .flat_map(|s| readers.get(s).into_iter().flatten())
            .filter_map(|&r| stage_of_instr[r])
            .max();
        stage_of_instr[k] = by_origin.or(by_readers);
    }
    let mut stage_of_backward_slot: HashMap<SlotId, usize> = HashMap::new();
    for k in fwd_end..instrs.len() {
        if stage_of_instr[k].is_none() {
            // a collective nothing in the backward reads (gradient synchronisation, the loss):
            // with the stage that made its input
            let from_input = reads(&instrs[k])
                .iter()
                .filter_map(|s| {
                    stage_of_backward_slot
                        .get(s)
                        .or_else(|| stage_of_slot.get(s))
                        .copied()
                })
                .min();
            stage_of_instr[k] = Some(from_input.unwrap_or(n - 1));
        }
        for &s in writes(&instrs[k]) {
            stage_of_backward_slot.insert(s, stage_of_instr[k].unwrap_or(n - 1));
        }
    }
    let mut backward = vec![vec![]; n];
    for (k, stage) in stage_of_instr.iter().enumerate().skip(fwd_end) {
        backward[stage.unwrap_or(n - 1)].push(k);
    }
    let names = forward
        .iter()
        .map(|r| {
            instrs[r.clone()]
                .iter()
                .find_map(|i| match i {
                    Instr::Compute(c) => Some(g.node(c.node).name.clone()),
                    Instr::Move(_) => None,
                })
                .unwrap_or_default()
        })
        .collect();
    Ok(Stages {
        forward,
        inputs,
        backward,
        names,
    })
}

/// Per-device seconds of one instruction in the cost model: a node's roofline time on its local
/// blocks, a collective's alpha-beta time.
pub fn instr_seconds(program: &Program, instr: &Instr, cluster: &Cluster) -> f64 {
    let policy = policy_of(program);
    match instr {
        Instr::Compute(c) => {
            let ins: Vec<TensorType> = c
                .inputs
                .iter()
                .map(|&s| policy.compute_type(&program.slot(s).local))
                .collect();
            let outs: Vec<TensorType> = c
                .outputs
                .iter()
                .map(|&s| policy.compute_type(&program.slot(s).local))
                .collect();
            let ins: Vec<&TensorType> = ins.iter().collect();
            let outs: Vec<&TensorType> = outs.iter().collect();
            compute_seconds(&c.op.spec().cost(&ins, &outs), cluster, policy)
        }
        Instr::Move(m) => {
            let slot = program.slot(m.input);
            let elem = policy.compute_dtype(slot.global.dtype).size_bytes();
            collective_cost(
                &m.op,
                &slot.spec,
                &slot.global.shape,
                elem,
                &program.mesh,
                cluster.comm_efficiency,
            )
            .1
        }
    }
}

fn policy_of(program: &Program) -> DTypePolicy {
    if program.mixed_bf16 {
        DTypePolicy::Bf16Mixed
    } else {
        DTypePolicy::Fp32
    }
}

/// Bytes one rank holds for `s` while the step runs (16-bit under mixed precision).
pub fn slot_bytes(program: &Program, s: SlotId) -> u64 {
    let local = &program.slot(s).local;
    (local.numel() * policy_of(program).compute_dtype(local.dtype).size_bytes()) as u64
}

/// The chain of `stages` for the checkpoint solvers: per stage, forward and backward seconds
/// (collectives included), the input activation's bytes, what the backward reads of the
/// stage's forward, and the transient peaks of both directions.
pub fn chain(
    program: &Program,
    stages: &Stages,
    cluster: &Cluster,
) -> Result<Chain, GenerateError> {
    let instrs = &program.instrs;
    let n = stages.len();
    let root = storage_roots(program);
    let root_of = |s: SlotId| root[s.0 as usize];
    // a view costs nothing beyond the storage it shares
    let bytes = |s: SlotId| {
        if root_of(s) == s {
            slot_bytes(program, s)
        } else {
            0
        }
    };
    let fwd_end = stages.forward.last().map_or(0, |r| r.end);
    let mut read_by_backward: HashSet<SlotId> = HashSet::new();
    let mut last_read = vec![0usize; program.slots.len()];
    for (k, instr) in instrs.iter().enumerate() {
        for &s in reads(instr) {
            last_read[s.0 as usize] = k;
            if k >= fwd_end {
                read_by_backward.insert(s);
            }
        }
    }
    let kept: HashSet<SlotId> = std::iter::once(program.loss)
        .chain(program.updates.iter().map(|u| u.grad))
        .chain(program.buffer_updates.iter().map(|&(_, v)| v))
        .collect();
    let data: u64 = program
        .leaves
        .iter()
        .filter(|l| l.kind == crate::program::LeafKind::Input)
        .map(|l| bytes(l.slot))
        .sum();
    // per storage: its last reader through any view, and whether the backward reads it
    let mut last_read_root: Vec<Option<usize>> = vec![None; program.slots.len()];
    let mut backward_roots: HashSet<SlotId> = HashSet::new();
    for (k, instr) in instrs.iter().enumerate() {
        for &s in reads(instr) {
            let r = root_of(s);
            last_read_root[r.0 as usize] = Some(k);
            if k >= fwd_end {
                backward_roots.insert(r);
            }
        }
    }
    let kept_roots_all: HashSet<SlotId> = kept.iter().map(|&s| root_of(s)).collect();
    // the most bytes of `transient` storages live at once while `block` runs in order
    let transient_peak = |block: &[usize], transient: &dyn Fn(SlotId) -> bool| -> u64 {
        let (mut live, mut peak) = (0u64, 0u64);
        for &k in block {
            for &s in writes(&instrs[k]) {
                if transient(s) {
                    live += slot_bytes(program, s);
                }
            }
            peak = peak.max(live);
            let dying: HashSet<SlotId> = writes(&instrs[k])
                .iter()
                .chain(reads(&instrs[k]))
                .map(|&s| root_of(s))
                .filter(|&r| match last_read_root[r.0 as usize] {
                    Some(last) => last == k,
                    None => writes(&instrs[k]).contains(&r),
                })
                .filter(|&r| transient(r))
                .collect();
            for r in dying {
                live = live.saturating_sub(slot_bytes(program, r));
            }
        }
        peak
    };
    let (mut fs, mut bs, mut xs, mut saved, mut fo, mut bo) =
        (vec![], vec![], vec![], vec![], vec![], vec![]);
    for i in 0..n {
        let range = stages.forward[i].clone();
        let output = stages.inputs.get(i + 1).copied().flatten();
        let own: HashSet<SlotId> = instrs[range.clone()]
            .iter()
            .flat_map(|x| writes(x).iter().copied())
            .collect();
        fs.push(
            instrs[range.clone()]
                .iter()
                .map(|x| instr_seconds(program, x, cluster))
                .sum(),
        );
        bs.push(
            stages.backward[i]
                .iter()
                .map(|&k| instr_seconds(program, &instrs[k], cluster))
                .sum(),
        );
        let input = stages.inputs[i];
        xs.push(
            input
                .map_or(data, |x| slot_bytes(program, root_of(x)))
                .max(1),
        );
        // the storages the backward keeps alive: those made in this stage, not the input's
        // or the output's
        let kept_roots: HashSet<SlotId> = own
            .iter()
            .filter(|s| read_by_backward.contains(s))
            .map(|&s| root_of(s))
            .filter(|&r| {
                own.contains(&r) && Some(r) != input.map(root_of) && Some(r) != output.map(root_of)
            })
            .collect();
        saved.push(kept_roots.iter().map(|&r| slot_bytes(program, r)).sum());
        // forward transient: storages the stage makes that neither the backward nor the next
        // stage reads (through any view), while they live
        let transient_fwd = |r: SlotId| {
            root_of(r) == r
                && !backward_roots.contains(&r)
                && Some(r) != output.map(root_of)
                && !kept_roots_all.contains(&r)
        };
        fo.push(transient_peak(
            range.clone().collect::<Vec<_>>().as_slice(),
            &transient_fwd,
        ));
        // backward transient: storages the stage's backward makes and frees within itself
        // (not the weights' gradients kept for the optimizer, not the gradient it hands on)
        let block: HashSet<usize> = stages.backward[i].iter().copied().collect();
        let transient_bwd = |r: SlotId| {
            root_of(r) == r
                && !kept_roots_all.contains(&r)
                && last_read_root[r.0 as usize].is_none_or(|k| block.contains(&k))
        };
        bo.push(transient_peak(&stages.backward[i], &transient_bwd));
    }
    Chain::new(fs, bs, xs, saved, fo, bo, bytes(program.loss).max(1))
        .map_err(|e| recompute_err(format!("checkpoint chain: {e}")))
}

/// `program` (without recompute blocks) rewritten to run `schedule` over `stages` (module doc).
pub fn apply_schedule(
    program: &Program,
    stages: &Stages,
    schedule: &Schedule,
) -> Result<Program, GenerateError> {
    let n = stages.len();
    let mut out = Program {
        instrs: Vec::with_capacity(program.instrs.len()),
        recompute: vec![],
        ..program.clone()
    };
    let mut binding: Vec<SlotId> = (0..program.slots.len() as u32).map(SlotId).collect();
    let mut runs = vec![0usize; n];
    let mut defined = vec![false; program.slots.len()];
    for l in &program.leaves {
        defined[l.slot.0 as usize] = true;
    }
    let stage_ok = |i: usize| {
        if i < n {
            Ok(i)
        } else {
            Err(recompute_err(format!(
                "the schedule names stage {i}, the program has {n}"
            )))
        }
    };
    let mut backward_done = vec![false; n];
    for op in &schedule.ops {
        match *op {
            CkOp::ForwardAll(i) | CkOp::ForwardCheckpoint(i) | CkOp::ForwardNoSave(i) => {
                let i = stage_ok(i)?;
                let first = runs[i] == 0;
                runs[i] += 1;
                let start = out.instrs.len();
                for k in stages.forward[i].clone() {
                    let mut instr = program.instrs[k].clone();
                    remap_reads(&mut instr, &binding);
                    check_defined(&instr, &defined, &out, k)?;
                    if !first {
                        for s in writes_mut(&mut instr) {
                            let fresh = SlotId(out.slots.len() as u32);
                            out.slots.push(program.slot(*s).clone());
                            defined.push(false);
                            binding[s.0 as usize] = fresh;
                            *s = fresh;
                        }
                    }
                    for &s in writes(&instr) {
                        defined[s.0 as usize] = true;
                    }
                    out.instrs.push(instr);
                }
                if !first {
                    out.recompute.push(RecomputeBlock {
                        stage: i,
                        instrs: start..out.instrs.len(),
                    });
                }
            }
            CkOp::Loss => {}
            CkOp::Backward(i) => {
                let i = stage_ok(i)?;
                if backward_done[i] {
                    return Err(recompute_err(format!("the schedule runs B({i}) twice")));
                }
                backward_done[i] = true;
                for &k in &stages.backward[i] {
                    let mut instr = program.instrs[k].clone();
                    remap_reads(&mut instr, &binding);
                    check_defined(&instr, &defined, &out, k)?;
                    for &s in writes(&instr) {
                        defined[s.0 as usize] = true;
                    }
                    out.instrs.push(instr);
                }
            }
        }
    }
    if let Some(i) = (0..n).find(|&i| runs[i] == 0 || !backward_done[i]) {
        return Err(recompute_err(format!(
            "the schedule never runs stage {i} forward and backward"
        )));
    }
    let b = |s: SlotId| binding[s.0 as usize];
    out.loss = b(program.loss);
    for u in &mut out.updates {
        u.grad = b(u.grad);
    }
    for (_, v) in &mut out.buffer_updates {
        *v = b(*v);
    }
    for s in std::iter::once(out.loss)
        .chain(out.updates.iter().map(|u| u.grad))
        .chain(out.buffer_updates.iter().map(|&(_, v)| v))
    {
        if !defined[s.0 as usize] {
            return Err(recompute_err(format!(
                "{s} ({}) is never computed under the schedule",
                out.slot(s).name
            )));
        }
    }
    Ok(out)
}

fn remap_reads(instr: &mut Instr, binding: &[SlotId]) {
    match instr {
        Instr::Compute(c) => {
            for s in &mut c.inputs {
                *s = binding[s.0 as usize];
            }
        }
        Instr::Move(m) => m.input = binding[m.input.0 as usize],
    }
}

fn writes_mut(instr: &mut Instr) -> Vec<&mut SlotId> {
    match instr {
        Instr::Compute(c) => c.outputs.iter_mut().collect(),
        Instr::Move(m) => vec![&mut m.output],
    }
}

fn check_defined(
    instr: &Instr,
    defined: &[bool],
    out: &Program,
    original: usize,
) -> Result<(), GenerateError> {
    match reads(instr).iter().find(|s| !defined[s.0 as usize]) {
        None => Ok(()),
        Some(s) => Err(recompute_err(format!(
            "instruction {original} reads {s} ({}) before the schedule computes it",
            out.slot(*s).name
        ))),
    }
}
