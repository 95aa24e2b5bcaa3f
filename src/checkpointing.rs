//! Activation checkpointing on top of a sharding plan: the training step as a chain of stages
//! for the checkpoint solvers (`autopar_solver::checkpoint`), and the schedule they choose.
//!
//! Linearization: the forward is cut after a node when exactly one activation (a value on a
//! differentiable path from a parameter) produced so far is still read by later forward nodes;
//! graph inputs, parameters, constants and what is computed from them alone (masks, position
//! tables) live throughout and do not count. In a transformer the one activation is the
//! residual stream between sub-blocks. Per stage, with each value at its per-device size under the plan's layouts:
//! the input activation, what its nodes save for the backward (from the profile), and its
//! forward and backward time (the plan's per-device compute split by the profile's forward and
//! backward roofline times). The activation budget is the memory budget (or the GPU's memory)
//! minus what the plan stores per device for parameters, gradients, optimizer state and inputs.

use crate::Error;
use autopar_analyzer::graph::{NodeId, ValueDef, ValueId};
use autopar_analyzer::profile::Profile;
use autopar_analyzer::train::{DTypePolicy, TrainingGraph};
use autopar_generator::bridge::compute_seconds;
use autopar_solver::checkpoint::{self, Chain, Strategy};
use autopar_solver::plan::{CheckpointPlan, Plan};
use std::collections::HashSet;

/// The chain of `tg` under `plan`, and the first node name of each stage.
pub fn chain_of(
    tg: &TrainingGraph,
    profile: &Profile,
    plan: &Plan,
    policy: DTypePolicy,
) -> Result<(Chain, Vec<String>), Error> {
    let g = &tg.graph;
    let fwd = tg.forward_nodes;
    let mesh = &plan.mesh;
    let producer_node = |v: ValueId| match g.value(v).def {
        ValueDef::Node { node, index } => Some((node, index)),
        _ => None,
    };
    // per-device bytes of a forward value under the plan
    let bytes = |v: ValueId| -> u64 {
        let ty = g.ty(v);
        let elem = policy.compute_dtype(ty.dtype).size_bytes() as u64;
        let numel = match producer_node(v) {
            Some((n, o)) if (n.0 as usize) < fwd => plan.nodes[n.0 as usize]
                .outputs
                .get(o)
                .map_or(ty.numel(), |s| s.local_numel(&ty.shape, mesh)),
            _ => ty.numel(),
        };
        numel as u64 * elem
    };
    // last forward reader of every value
    let mut last_read = vec![None; g.values.len()];
    for (n, node) in g.nodes.iter().take(fwd) {
        for &v in &node.inputs {
            last_read[v.0 as usize] = Some(n.0 as usize);
        }
    }
    // activations: values on a differentiable path from a parameter (masks and position tables
    // computed from inputs alone are not: they cross every cut and are small)
    let needs_grad = tg.needs_grad();
    // cuts: after node k, exactly one activation crosses
    let mut cuts: Vec<(usize, ValueId)> = vec![];
    let mut live: HashSet<ValueId> = HashSet::new();
    for (n, node) in g.nodes.iter().take(fwd) {
        let k = n.0 as usize;
        for &v in &node.outputs {
            if needs_grad[v.0 as usize] && last_read[v.0 as usize].is_some_and(|r| r > k) {
                live.insert(v);
            }
        }
        live.retain(|v| last_read[v.0 as usize].is_some_and(|r| r > k));
        if live.len() == 1 && k + 1 < fwd {
            if let Some(&v) = live.iter().next() {
                cuts.push((k, v));
            }
        }
    }
    let saved: HashSet<ValueId> = profile.saved_for_backward.iter().copied().collect();
    let ratio = |n: usize| {
        let row = &profile.nodes[n];
        let f = compute_seconds(
            &autopar_analyzer::ops::Cost {
                flops: row.flops,
                matmul_flops: row.matmul_flops,
                bytes_read: row.bytes_read,
                bytes_written: row.bytes_written,
            },
            &plan.cluster,
            policy,
        );
        let b = row
            .backward
            .map_or(0.0, |c| compute_seconds(&c, &plan.cluster, policy));
        let total = f + b;
        if total > 0.0 {
            (
                plan.nodes[n].compute_s * f / total,
                plan.nodes[n].compute_s * b / total,
            )
        } else {
            (0.0, 0.0)
        }
    };
    let data_in: u64 = g
        .inputs
        .iter()
        .filter(|&&v| matches!(g.value(v).def, ValueDef::Input))
        .map(|&v| bytes(v))
        .sum();
    let mut bounds: Vec<(usize, usize, u64)> = vec![]; // (first node, last node, input bytes)
    let mut start = 0;
    let mut input = data_in.max(1);
    for &(k, v) in &cuts {
        bounds.push((start, k, input));
        start = k + 1;
        input = bytes(v).max(1);
    }
    bounds.push((start, fwd - 1, input));
    let (mut fs, mut bs, mut xs, mut sv, mut names) = (vec![], vec![], vec![], vec![], vec![]);
    for (i, &(a, b, x)) in bounds.iter().enumerate() {
        let out_value = cuts.get(i).map(|c| c.1);
        let (mut f, mut bw, mut s) = (0.0, 0.0, 0u64);
        for n in a..=b {
            let (nf, nb) = ratio(n);
            f += nf;
            bw += nb;
            for &v in &g.node(NodeId(n as u32)).outputs {
                if saved.contains(&v) && Some(v) != out_value {
                    s += bytes(v);
                }
            }
        }
        fs.push(f);
        bs.push(bw);
        xs.push(x);
        sv.push(s);
        names.push(g.node(NodeId(a as u32)).name.clone());
    }
    let n = fs.len();
    let chain = Chain::new(
        fs,
        bs,
        xs,
        sv,
        vec![0; n],
        vec![0; n],
        bytes(tg.loss).max(1),
    )
    .map_err(|e| Error::Usage(format!("checkpoint chain: {e}")))?;
    Ok((chain, names))
}

/// Chooses the checkpoint schedule of `plan` with `strategy` (`None`: rotor when keeping every
/// activation does not fit, else none) and records it in the plan.
pub fn checkpoint_plan(
    tg: &TrainingGraph,
    profile: &Profile,
    plan: &mut Plan,
    policy: DTypePolicy,
    strategy: Option<Strategy>,
) -> Result<(), Error> {
    let (chain, names) = chain_of(tg, profile, plan, policy)?;
    let fixed: f64 = plan.tensors.iter().map(|t| t.bytes_per_device).sum();
    let budget = plan.memory_budget_bytes.unwrap_or(plan.cluster.hbm_bytes) - fixed;
    let err = |e: checkpoint::CheckpointError| Error::Usage(format!("checkpointing: {e}"));
    if budget <= 0.0 {
        return Err(Error::Usage(format!(
            "checkpointing: parameters, gradients and optimizer state alone take {} per device, more than the budget",
            crate::format_bytes(fixed)
        )));
    }
    let budget_u = budget as u64;
    let keep_all = checkpoint::none(&chain).map_err(err)?;
    let keep_all_sim = checkpoint::simulate(&chain, &keep_all).map_err(err)?;
    let strategy = strategy.unwrap_or(if keep_all_sim.peak_bytes as f64 > budget {
        Strategy::Rotor
    } else {
        Strategy::None
    });
    let schedule = strategy
        .solve(&chain, budget_u, checkpoint::DEFAULT_SLOTS)
        .map_err(err)?;
    let sim = checkpoint::simulate(&chain, &schedule).map_err(err)?;
    let recompute_s = (sim.time_s - keep_all_sim.time_s).max(0.0);
    plan.checkpoint = Some(CheckpointPlan {
        strategy: strategy.to_string(),
        stages: names,
        schedule,
        activation_budget_bytes: budget,
        activation_peak_bytes: sim.peak_bytes as f64,
        activation_peak_without_bytes: keep_all_sim.peak_bytes as f64,
        recompute_s,
        step_s: plan.predicted.step_s + recompute_s,
    });
    Ok(())
}
