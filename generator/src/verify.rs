//! The program verifier: run after generation (and on any program before it executes).
//!
//! Checks, with errors naming the instruction:
//! - every slot's layout is valid on the mesh and its local type is the layout's block;
//! - every instruction reads slots defined before it, and defines each slot once;
//! - compute instructions read whole values (never pending partial sums), and their outputs
//!   have the types the op infers from the local inputs (ops whose attributes hold a global
//!   target shape, [`has_target_shape`], produce the local block of it instead: their lowering
//!   reads the local output type);
//! - each move's output layout is exactly its collective applied to its input layout;
//! - across ranks: for every group, all members issue the same collectives (kind and size) at
//!   the same instructions, so the ranks agree on every collective and cannot deadlock.

use crate::program::*;
use autopar_analyzer::ops::Op;
use autopar_solver::reshard::Collective;
use autopar_solver::ShardingSpec;
use std::collections::HashMap;

#[derive(Debug, thiserror::Error)]
#[error("program verification failed at {place}: {reason}")]
pub struct VerifyError {
    pub place: String,
    pub reason: String,
}

fn fail<T>(place: impl Into<String>, reason: impl Into<String>) -> Result<T, VerifyError> {
    Err(VerifyError {
        place: place.into(),
        reason: reason.into(),
    })
}

/// The layout a collective leaves, or why it cannot apply to `spec`.
pub fn apply(spec: &ShardingSpec, op: &Collective) -> Result<ShardingSpec, String> {
    let mut s = spec.clone();
    let used = |s: &ShardingSpec, a| s.used_axes().any(|x| x == a);
    match *op {
        Collective::AllGather { dim, axis } => {
            if s.dims.get(dim).and_then(|d| d.last()) != Some(&axis) {
                return Err(format!(
                    "axis {axis} is not the minor split of dim {dim} in {spec}"
                ));
            }
            s.dims[dim].pop();
        }
        Collective::ReduceScatter { dim, axis } => {
            if !s.partial.contains(&axis) || dim >= s.dims.len() {
                return Err(format!("{spec} is not partial over axis {axis}"));
            }
            s.partial.retain(|&a| a != axis);
            s.dims[dim].push(axis);
        }
        Collective::AllReduce { axis } => {
            if !s.partial.contains(&axis) {
                return Err(format!("{spec} is not partial over axis {axis}"));
            }
            s.partial.retain(|&a| a != axis);
        }
        Collective::AllToAll {
            from_dim,
            to_dim,
            axis,
        } => {
            if s.dims.get(from_dim).and_then(|d| d.last()) != Some(&axis) || to_dim >= s.dims.len()
            {
                return Err(format!(
                    "axis {axis} is not the minor split of dim {from_dim} in {spec}"
                ));
            }
            s.dims[from_dim].pop();
            s.dims[to_dim].push(axis);
        }
        Collective::Slice { dim, axis } => {
            if used(&s, axis) || dim >= s.dims.len() {
                return Err(format!("axis {axis} is already used in {spec}"));
            }
            s.dims[dim].push(axis);
        }
    }
    Ok(s)
}

/// Ops whose attributes name a global shape they produce (reshape and expand targets, the
/// table of an embedding gradient, the operand of a convolution gradient): run on a block, they
/// produce the block of that shape.
pub fn has_target_shape(op: &Op) -> bool {
    matches!(
        op,
        Op::Reshape(_) | Op::Expand(_) | Op::GatherGrad(_) | Op::ConvGrad(_)
    )
}

/// Verifies `p` (see the module doc).
pub fn verify(p: &Program) -> Result<(), VerifyError> {
    let mesh = &p.mesh;
    for (i, slot) in p.slots.iter().enumerate() {
        let place = format!("slot %{i} ({})", slot.name);
        if !slot.spec.is_valid(&slot.global.shape, mesh) {
            return fail(
                place,
                format!(
                    "layout {} is not valid for {} on mesh {}",
                    slot.spec,
                    slot.global,
                    mesh.name()
                ),
            );
        }
        if slot.local.shape != slot.spec.local_shape(&slot.global.shape, mesh)
            || slot.local.dtype != slot.global.dtype
        {
            return fail(
                place,
                format!(
                    "local type {} is not the block of {} under {}",
                    slot.local, slot.global, slot.spec
                ),
            );
        }
    }
    let mut defined = vec![false; p.slots.len()];
    fn define(defined: &mut [bool], s: SlotId, place: &str) -> Result<(), VerifyError> {
        match defined.get_mut(s.0 as usize) {
            None => fail(place, format!("{s} does not exist")),
            Some(d) if *d => fail(place, format!("{s} is defined twice")),
            Some(d) => {
                *d = true;
                Ok(())
            }
        }
    }
    for leaf in &p.leaves {
        define(&mut defined, leaf.slot, "the leaves")?;
    }
    for (i, instr) in p.instrs.iter().enumerate() {
        match instr {
            Instr::Compute(c) => {
                let place = format!("instruction {i}, node {} ({})", c.node, c.name);
                for &s in &c.inputs {
                    if !defined.get(s.0 as usize).copied().unwrap_or(false) {
                        return fail(place, format!("reads {s} before it is defined"));
                    }
                    if p.slot(s).spec.is_partial() {
                        return fail(
                            place,
                            format!("reads {s}, a pending partial sum ({})", p.slot(s).spec),
                        );
                    }
                }
                let ins: Vec<_> = c.inputs.iter().map(|&s| &p.slot(s).local).collect();
                let outs: Vec<_> = c.outputs.iter().map(|&s| &p.slot(s).local).collect();
                let target_shape = has_target_shape(&c.op);
                if target_shape {
                    if matches!(c.op, Op::Reshape(_)) && ins[0].numel() != outs[0].numel() {
                        return fail(
                            place,
                            format!("reshape of {} elements to {}", ins[0].numel(), outs[0]),
                        );
                    }
                } else {
                    match c.op.spec().infer(&ins) {
                        Ok(inferred) => {
                            let same = inferred.len() == outs.len()
                                && inferred.iter().zip(&outs).all(|(a, b)| a == *b);
                            if !same {
                                let want: Vec<String> =
                                    outs.iter().map(|t| t.to_string()).collect();
                                let got: Vec<String> =
                                    inferred.iter().map(|t| t.to_string()).collect();
                                return fail(place, format!("{} on the local inputs gives [{}], the program expects [{}]", c.op.name(), got.join(", "), want.join(", ")));
                            }
                        }
                        Err(e) => {
                            return fail(
                                place,
                                format!("{} rejects the local inputs: {e}", c.op.name()),
                            )
                        }
                    }
                }
                for &s in &c.outputs {
                    define(&mut defined, s, &place)?;
                }
            }
            Instr::Move(m) => {
                let place = format!("instruction {i}, {} of {}", m.op, p.slot(m.input).name);
                if !defined.get(m.input.0 as usize).copied().unwrap_or(false) {
                    return fail(place, format!("reads {} before it is defined", m.input));
                }
                let (a, b) = (p.slot(m.input), p.slot(m.output));
                if a.value != b.value {
                    return fail(
                        place,
                        format!("moves {} into a slot of another value", m.input),
                    );
                }
                match apply(&a.spec, &m.op) {
                    Ok(s) if s == b.spec => {}
                    Ok(s) => {
                        return fail(place, format!("leaves {s}, the program expects {}", b.spec))
                    }
                    Err(e) => return fail(place, e),
                }
                define(&mut defined, m.output, &place)?;
            }
        }
    }
    let used = std::iter::once(p.loss)
        .chain(p.updates.iter().flat_map(|u| [u.param, u.grad]))
        .chain(p.buffer_updates.iter().flat_map(|&(a, b)| [a, b]));
    for s in used {
        if !defined.get(s.0 as usize).copied().unwrap_or(false) {
            return fail("the step's results", format!("{s} is never defined"));
        }
    }
    for u in &p.updates {
        let (a, b) = (p.slot(u.param), p.slot(u.grad));
        if a.spec != b.spec || a.global.shape != b.global.shape {
            return fail(
                format!("the update of {}", a.name),
                format!(
                    "gradient layout {} differs from the parameter's {}",
                    b.spec, a.spec
                ),
            );
        }
    }
    check_collectives_agree(p)
}

/// Every group's members issue the same collectives at the same instructions.
fn check_collectives_agree(p: &Program) -> Result<(), VerifyError> {
    type Seq = Vec<(usize, &'static str, usize)>;
    let mut by_group: HashMap<Vec<usize>, (usize, Seq)> = HashMap::new();
    for rank in 0..p.world_size() {
        let mut mine: HashMap<Vec<usize>, Seq> = HashMap::new();
        for c in p.issued(rank) {
            if !c.group.contains(&rank) {
                return fail(
                    format!("instruction {}", c.instr),
                    format!(
                        "rank {rank} issues {} on group {:?} without being in it",
                        c.kind, c.group
                    ),
                );
            }
            mine.entry(c.group)
                .or_default()
                .push((c.instr, c.kind, c.elements));
        }
        for (group, seq) in mine {
            match by_group.get(&group) {
                None => {
                    by_group.insert(group, (rank, seq));
                }
                Some((first, other)) if *other != seq => {
                    let k = other
                        .iter()
                        .zip(&seq)
                        .position(|(a, b)| a != b)
                        .unwrap_or(other.len().min(seq.len()));
                    return fail(
                        format!("group {group:?}"),
                        format!("rank {first} and rank {rank} disagree at their collective #{k}: {:?} vs {:?}", other.get(k), seq.get(k)),
                    );
                }
                Some(_) => {}
            }
        }
    }
    Ok(())
}
