//! Graph + plan -> [`Program`].
//!
//! Every node of the training graph runs under one strategy (a mesh-axis assignment of its op
//! axes, from the solver's generic enumeration):
//! - **forward nodes** run the strategy the plan chose, and resolve its partial sums the way the
//!   plan says (all-reduce or reduce-scatter);
//! - **backward nodes** are not in the plan (the solver prices them as mirrors of the forward);
//!   each takes the strategy that is cheapest given the layouts its inputs already have: the
//!   resharding of its inputs, its share of the compute and the reduction of the partial sums it
//!   leaves, in the cost model's seconds. The mirror of the forward costs no resharding, so it is
//!   what comes out whenever it exists.
//!
//! Between producer and consumer, every layout change is a path of the solver's one resharding
//! function (`Resharder::transition`), emitted step by step. Partial sums stay partial until a
//! consumer needs the value whole, so a gradient that only flows into the optimizer is reduced
//! once, straight into the parameter's storage layout: an all-reduce for a replicated parameter
//! (data parallel), a reduce-scatter for a sharded one (ZeRO / FSDP). That is the gradient
//! synchronisation; nothing else decides it.

use crate::bridge::{compute_seconds, op_axes};
use crate::program::*;
use autopar_analyzer::graph::{Graph, NodeId, Phase, ValueDef, ValueId};
use autopar_analyzer::ops::Op;
use autopar_analyzer::profile::op_label;
use autopar_analyzer::train::{DTypePolicy, TrainingGraph};
use autopar_analyzer::TensorType;
use autopar_solver::plan::{Plan, TensorRole};
use autopar_solver::reshard::Resharder;
use autopar_solver::strategy::{self, AxisKind, Strategy};
use autopar_solver::ShardingSpec;
use std::collections::HashMap;

#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    /// The plan was made for another model, another version of it, or another mesh.
    #[error("the plan does not match the model: {0}")]
    PlanMismatch(String),
    #[error(
        "node {node} ({name}): no strategy of its op fits the layouts of its inputs on mesh {mesh}"
    )]
    NoStrategy {
        node: NodeId,
        name: String,
        mesh: String,
    },
    #[error("cannot reshard value {value} ({name}) from {from} to {to}: {reason}")]
    Reshard {
        value: ValueId,
        name: String,
        from: String,
        to: String,
        reason: String,
    },
    /// The checkpoint schedule does not fit the program's stages.
    #[error("activation checkpointing: {0}")]
    Recompute(String),
}

/// Builds the SPMD program of `tg` under `plan` (see the module doc), with the recompute
/// blocks of the plan's checkpoint schedule if it has one.
pub fn generate(tg: &TrainingGraph, plan: &Plan) -> Result<Program, GenerateError> {
    let program = generate_plain(tg, plan)?;
    let Some(ck) = &plan.checkpoint else {
        return Ok(program);
    };
    let stages = crate::recompute::stages(&program, tg)?;
    if stages.names != ck.stages {
        return Err(GenerateError::PlanMismatch(format!(
            "the checkpoint schedule is over {} stages ({}...), the program cuts into {} ({}...)",
            ck.stages.len(),
            ck.stages.first().map_or("", |s| s.as_str()),
            stages.len(),
            stages.names.first().map_or("", |s| s.as_str())
        )));
    }
    if ck.schedule.forward_count() == stages.len() {
        // nothing is recomputed: the plain program is the schedule
        return Ok(program);
    }
    crate::recompute::apply_schedule(&program, &stages, &ck.schedule)
}

/// The program of `tg` under `plan`'s layouts, every activation kept for the backward.
pub fn generate_plain(tg: &TrainingGraph, plan: &Plan) -> Result<Program, GenerateError> {
    let g = &tg.graph;
    check_plan(tg, plan)?;
    let policy = match plan.dtype_policy.as_str() {
        "bf16_mixed" => DTypePolicy::Bf16Mixed,
        _ => DTypePolicy::Fp32,
    };
    let mut gen = Gen {
        g,
        plan,
        policy,
        resharder: Resharder::new(plan.mesh.clone(), plan.cluster.comm_efficiency),
        program: Program {
            mesh: plan.mesh.clone(),
            slots: vec![],
            leaves: vec![],
            instrs: vec![],
            loss: SlotId(0),
            updates: vec![],
            buffer_updates: vec![],
            mixed_bf16: policy == DTypePolicy::Bf16Mixed,
            recompute: vec![],
        },
        layouts: HashMap::new(),
        strategies: HashMap::new(),
        phase: Phase::Forward,
    };
    let storage: HashMap<u32, &ShardingSpec> =
        plan.tensors.iter().map(|t| (t.value, &t.spec)).collect();
    let storage_of = |v: ValueId| -> Result<ShardingSpec, GenerateError> {
        storage.get(&v.0).map(|s| (*s).clone()).ok_or_else(|| {
            GenerateError::PlanMismatch(format!(
                "the plan gives no layout for {v} ({})",
                g.value(v).name
            ))
        })
    };
    for (v, d) in g.values.iter() {
        let (kind, spec) = match &d.def {
            ValueDef::Input => (LeafKind::Input, storage_of(v)?),
            ValueDef::Param { .. } => (LeafKind::Param, storage_of(v)?),
            ValueDef::Buffer { .. } => (LeafKind::Buffer, ShardingSpec::replicated(d.ty.rank())),
            ValueDef::Const(_) => (LeafKind::Const, ShardingSpec::replicated(d.ty.rank())),
            ValueDef::Node { .. } => continue,
        };
        let slot = gen.new_slot(v, spec);
        gen.program.leaves.push(Leaf { slot, kind });
    }
    let grad_of: HashMap<ValueId, ValueId> = tg.grads.iter().map(|&(p, gr)| (gr, p)).collect();
    for (n, node) in g.nodes.iter() {
        gen.phase = node.phase;
        let forward = n.0 < tg.forward_nodes as u32;
        let st = if forward {
            gen.planned_strategy(n)?
        } else {
            gen.cheapest_strategy(n)?
        };
        let mut inputs = vec![];
        for (i, &v) in node.inputs.iter().enumerate() {
            inputs.push(gen.ensure(v, &st.inputs[i])?);
        }
        let outputs: Vec<SlotId> = node
            .outputs
            .iter()
            .zip(&st.raw_outputs)
            .map(|(&v, spec)| gen.new_slot(v, spec.clone()))
            .collect();
        let sync_axes = sync_axes(g, n, &st);
        gen.program.instrs.push(Instr::Compute(Compute {
            node: n,
            name: node.name.clone(),
            phase: node.phase,
            op: node.op.clone(),
            inputs,
            outputs,
            assignment: st.assignment.clone(),
            sync_axes,
        }));
        if forward {
            // the plan's own resolution of the partial sums (all-reduce or reduce-scatter)
            for (&v, spec) in node.outputs.iter().zip(&st.outputs) {
                gen.ensure(v, spec)?;
            }
        }
        for &v in &node.outputs {
            if let Some(&p) = grad_of.get(&v) {
                // gradient synchronisation as soon as the gradient is final
                gen.ensure(v, &storage_of(p)?)?;
            }
        }
    }
    gen.phase = Phase::Backward;
    gen.program.loss = gen.ensure(tg.loss, &ShardingSpec::replicated(g.ty(tg.loss).rank()))?;
    for &(p, gr) in &tg.grads {
        let param = gen.layouts[&p][0];
        let grad = gen.ensure(gr, &storage_of(p)?)?;
        gen.program.updates.push(Update { param, grad });
    }
    for &(b, new) in &tg.buffer_updates {
        let buffer = gen.layouts[&b][0];
        let value = gen.ensure(new, &ShardingSpec::replicated(g.ty(new).rank()))?;
        gen.program.buffer_updates.push((buffer, value));
    }
    Ok(gen.program)
}

/// Mesh axes over which node `n`'s own reductions are split under `st`: the axes of its split
/// contracted and statistics axes, and for cross entropy (and its gradient, where the batch is
/// a parallel axis) the axes that split the labels, whose valid count the mean divides by.
fn sync_axes(g: &Graph, n: NodeId, st: &Strategy) -> Vec<usize> {
    let axes = op_axes(g, n);
    let labels = match g.node(n).op {
        Op::SoftmaxCrossEntropy(_) => Some(1),
        Op::SoftmaxCrossEntropyGrad(_) => Some(2),
        _ => None,
    };
    st.assignment
        .iter()
        .enumerate()
        .filter(|(_, a)| {
            a.is_some_and(|a| {
                matches!(axes.axes[a].1, AxisKind::Contracted | AxisKind::Statistics)
                    || labels.is_some_and(|l| axes.inputs[l].contains(&Some(a)))
            })
        })
        .map(|(m, _)| m)
        .collect()
}

/// The plan must describe this graph's forward nodes and tensors, on a mesh with valid specs.
fn check_plan(tg: &TrainingGraph, plan: &Plan) -> Result<(), GenerateError> {
    let g = &tg.graph;
    let mismatch = |m: String| Err(GenerateError::PlanMismatch(m));
    if plan.schema_version != autopar_solver::plan::PLAN_SCHEMA_VERSION {
        return mismatch(format!(
            "plan schema version {} (this autopar reads {})",
            plan.schema_version,
            autopar_solver::plan::PLAN_SCHEMA_VERSION
        ));
    }
    if plan.nodes.len() != tg.forward_nodes {
        return mismatch(format!(
            "the plan has {} forward nodes, the model {}",
            plan.nodes.len(),
            tg.forward_nodes
        ));
    }
    for (i, p) in plan.nodes.iter().enumerate() {
        let n = NodeId(i as u32);
        let node = g.node(n);
        if p.node != n.0 || p.name != node.name || p.op != op_label(&node.op) {
            return mismatch(format!(
                "node {n} is {:?} ({}) in the model but {:?} ({}) in the plan",
                node.name,
                op_label(&node.op),
                p.name,
                p.op
            ));
        }
        if p.inputs.len() != node.inputs.len() || p.outputs.len() != node.outputs.len() {
            return mismatch(format!(
                "node {n} ({}) has other operands in the plan",
                node.name
            ));
        }
    }
    let mut seen = 0;
    for t in &plan.tensors {
        let v = ValueId(t.value);
        let d = match g.values.get(v) {
            Some(d) => d,
            None => return mismatch(format!("tensor {v} ({}) is not in the model", t.name)),
        };
        let role_ok = matches!(
            (&d.def, &t.role),
            (ValueDef::Param { .. }, TensorRole::Param) | (ValueDef::Input, TensorRole::Input)
        );
        if !role_ok || d.name != t.name || d.ty.shape != t.shape {
            return mismatch(format!(
                "tensor {v} is {:?} {} in the model but {:?} {:?} in the plan",
                d.name, d.ty, t.name, t.shape
            ));
        }
        if !t.spec.is_valid(&t.shape, &plan.mesh) {
            return mismatch(format!(
                "tensor {} has layout {} that is not valid for shape {:?} on mesh {}",
                t.name,
                t.spec,
                t.shape,
                plan.mesh.name()
            ));
        }
        seen += 1;
    }
    let wanted = g
        .values
        .iter()
        .filter(|(_, d)| matches!(d.def, ValueDef::Param { .. } | ValueDef::Input))
        .count();
    if seen != wanted {
        return mismatch(format!(
            "the plan lays out {seen} parameters and inputs, the model has {wanted}"
        ));
    }
    Ok(())
}

struct Gen<'a> {
    g: &'a Graph,
    plan: &'a Plan,
    policy: DTypePolicy,
    resharder: Resharder,
    program: Program,
    /// The slots holding each value, in creation order.
    layouts: HashMap<ValueId, Vec<SlotId>>,
    /// Strategies per op signature (op attributes and types).
    strategies: HashMap<String, std::rc::Rc<Vec<Strategy>>>,
    phase: Phase,
}

impl Gen<'_> {
    fn new_slot(&mut self, v: ValueId, spec: ShardingSpec) -> SlotId {
        let d = self.g.value(v);
        let id = SlotId(self.program.slots.len() as u32);
        let local = TensorType::new(d.ty.dtype, spec.local_shape(&d.ty.shape, &self.plan.mesh));
        self.program.slots.push(Slot {
            value: v,
            name: d.name.clone(),
            global: d.ty.clone(),
            spec,
            local,
        });
        self.layouts.entry(v).or_default().push(id);
        id
    }

    fn elem_bytes(&self, v: ValueId) -> usize {
        self.policy.compute_dtype(self.g.ty(v).dtype).size_bytes()
    }

    fn is_fixed(&self, v: ValueId) -> bool {
        matches!(
            self.g.value(v).def,
            ValueDef::Const(_) | ValueDef::Buffer { .. }
        )
    }

    fn all_strategies(&mut self, n: NodeId) -> std::rc::Rc<Vec<Strategy>> {
        let node = self.g.node(n);
        let types: Vec<String> = node
            .inputs
            .iter()
            .chain(&node.outputs)
            .map(|&v| self.g.ty(v).to_string())
            .collect();
        let key = format!(
            "{}|{}",
            serde_json::to_string(&node.op).unwrap_or_default(),
            types.join(",")
        );
        if let Some(s) = self.strategies.get(&key) {
            return s.clone();
        }
        let shapes: Vec<Vec<usize>> = node
            .outputs
            .iter()
            .map(|&v| self.g.ty(v).shape.clone())
            .collect();
        let all = std::rc::Rc::new(strategy::enumerate(
            &op_axes(self.g, n),
            &shapes,
            &self.plan.mesh,
        ));
        self.strategies.insert(key, all.clone());
        all
    }

    /// The plan's strategy of forward node `n`.
    fn planned_strategy(&mut self, n: NodeId) -> Result<Strategy, GenerateError> {
        let p = &self.plan.nodes[n.0 as usize];
        let node = self.g.node(n);
        let all = self.all_strategies(n);
        let found = all.iter().find(|st| {
            (p.follows.is_some() || st.assignment == p.assignment)
                && st.outputs == p.outputs
                && node
                    .inputs
                    .iter()
                    .enumerate()
                    .all(|(i, &v)| self.is_fixed(v) || st.inputs[i] == p.inputs[i])
        });
        found.cloned().ok_or_else(|| {
            GenerateError::PlanMismatch(format!(
                "node {n} ({}): the plan's layout `{}` is not a strategy of its op on mesh {}",
                node.name,
                p.notation,
                self.plan.mesh.name()
            ))
        })
    }

    /// Seconds to bring value `v` into `want` from its cheapest existing layout.
    fn reshard_seconds(&self, v: ValueId, want: &ShardingSpec) -> Option<f64> {
        let shape = &self.g.ty(v).shape;
        let eb = self.elem_bytes(v);
        self.layouts
            .get(&v)?
            .iter()
            .filter_map(|&s| {
                self.resharder
                    .cost(&self.program.slot(s).spec, want, shape, eb)
                    .ok()
            })
            .min_by(f64::total_cmp)
    }

    /// The cheapest strategy of backward node `n` given its inputs' current layouts.
    fn cheapest_strategy(&mut self, n: NodeId) -> Result<Strategy, GenerateError> {
        let node = self.g.node(n);
        let all = self.all_strategies(n);
        let ins: Vec<&TensorType> = node.inputs.iter().map(|&v| self.g.ty(v)).collect();
        let outs: Vec<&TensorType> = node.outputs.iter().map(|&v| self.g.ty(v)).collect();
        let seconds = compute_seconds(
            &node.op.spec().cost(&ins, &outs),
            &self.plan.cluster,
            self.policy,
        );
        let mut best: Option<(f64, usize, usize)> = None;
        for (k, st) in all.iter().enumerate() {
            let mut cost = seconds / st.work_divisor.max(1) as f64;
            let mut ok = true;
            for (i, &v) in node.inputs.iter().enumerate() {
                match self.reshard_seconds(v, &st.inputs[i]) {
                    Some(c) => cost += c,
                    None => ok = false,
                }
            }
            for (o, &v) in node.outputs.iter().enumerate() {
                let raw = &st.raw_outputs[o];
                if raw.is_partial() {
                    let shape = &self.g.ty(v).shape;
                    match self.resharder.cost(
                        raw,
                        &raw.without_partial(),
                        shape,
                        self.elem_bytes(v),
                    ) {
                        Ok(c) => cost += c,
                        Err(_) => ok = false,
                    }
                }
            }
            if !ok {
                continue;
            }
            let better = match best {
                None => true,
                Some((c, w, _)) => cost < c || (cost == c && st.work_divisor > w),
            };
            if better {
                best = Some((cost, st.work_divisor, k));
            }
        }
        match best {
            Some((_, _, k)) => Ok(all[k].clone()),
            None => Err(GenerateError::NoStrategy {
                node: n,
                name: node.name.clone(),
                mesh: self.plan.mesh.name(),
            }),
        }
    }

    /// A slot holding `v` in `want`: an existing one, or a new one reached from the cheapest
    /// existing layout by the resharding function's path (one [`Move`] per step).
    fn ensure(&mut self, v: ValueId, want: &ShardingSpec) -> Result<SlotId, GenerateError> {
        let slots = self.layouts.get(&v).cloned().unwrap_or_default();
        if let Some(&s) = slots.iter().find(|&&s| &self.program.slot(s).spec == want) {
            return Ok(s);
        }
        let shape = self.g.ty(v).shape.clone();
        let eb = self.elem_bytes(v);
        let mut best = None;
        let mut last_err = String::from("the value has no layout yet");
        for &s in &slots {
            match self
                .resharder
                .transition(&self.program.slot(s).spec, want, &shape, eb)
            {
                Ok(t) => {
                    if best.as_ref().is_none_or(
                        |(_, b): &(SlotId, autopar_solver::reshard::Transition)| {
                            t.cost_s < b.cost_s
                        },
                    ) {
                        best = Some((s, t));
                    }
                }
                Err(e) => last_err = e.to_string(),
            }
        }
        let Some((mut from, path)) = best else {
            return Err(GenerateError::Reshard {
                value: v,
                name: self.g.value(v).name.clone(),
                from: slots
                    .first()
                    .map(|&s| self.program.slot(s).spec.to_string())
                    .unwrap_or_else(|| "nothing".into()),
                to: want.to_string(),
                reason: last_err,
            });
        };
        for step in path.steps {
            let to = self.new_slot(v, step.after.clone());
            self.program.instrs.push(Instr::Move(Move {
                op: step.op,
                input: from,
                output: to,
                bytes: step.bytes,
                phase: self.phase,
            }));
            from = to;
        }
        Ok(from)
    }
}
