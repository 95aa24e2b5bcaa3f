//! Activation checkpointing joint with the sharding plan.
//!
//! The chain comes from the rank program of a plan (`autopar_generator::recompute`): stages
//! cut where one activation crosses, priced with the per-device compute and collective seconds
//! of the program, sized with local bytes. The activation budget is the memory budget (or the
//! GPU's memory) minus what the plan stores per device for parameters, gradients, optimizer
//! state and inputs. The checkpoint solvers (`autopar_solver::checkpoint`) pick the schedule,
//! which is recorded in the plan; the generator turns it into recompute blocks.
//!
//! # The joint loop ([`plan_with_checkpointing`])
//! The sharding ILP counts every activation as kept. When no plan fits the budget that way,
//! the ILP is solved again with the budget raised by an allowance `F`, the memory that
//! checkpointing will have to free: starting from the least any plan needs, then
//! `F <- F + (activation budget - least activation peak any schedule reaches)`, i.e. by the
//! slack (or the shortfall) checkpointing leaves under the plan just found. Each plan whose
//! checkpointed peak fits is a candidate; the loop stops when `F` changes by less than 1 % of
//! the budget or after a few rounds, and the candidate with the least predicted step time
//! (recompute included) wins. A budget no plan reaches even with the least-memory schedule is
//! an error stating the least memory seen.

use crate::planner::{self, PlanOptions};
use crate::Error;
use autopar_analyzer::profile::Profile;
use autopar_analyzer::train::TrainingGraph;
use autopar_generator::recompute;
use autopar_solver::checkpoint::{self, Chain, Strategy};
use autopar_solver::plan::{CheckpointPlan, Plan};

/// The chain of `tg`'s rank program under `plan`, and the first node name of each stage.
pub fn chain_of(tg: &TrainingGraph, plan: &Plan) -> Result<(Chain, Vec<String>), Error> {
    let mut plain = plan.clone();
    plain.checkpoint = None;
    let program = autopar_generator::generate_plain(tg, &plain)
        .map_err(|e| Error::Usage(format!("checkpointing: {e}")))?;
    let stages = recompute::stages(&program, tg).map_err(|e| Error::Usage(e.to_string()))?;
    let chain = recompute::chain(&program, &stages, &plan.cluster)
        .map_err(|e| Error::Usage(e.to_string()))?;
    Ok((chain, stages.names))
}

/// Per-device bytes `plan` holds outside activations: parameters, gradients, optimizer state
/// and inputs.
fn fixed_bytes(plan: &Plan) -> f64 {
    plan.tensors.iter().map(|t| t.bytes_per_device).sum()
}

/// What the memory budget leaves for activations under `plan`.
fn activation_budget(plan: &Plan) -> f64 {
    plan.memory_budget_bytes.unwrap_or(plan.cluster.hbm_bytes) - fixed_bytes(plan)
}

/// Chooses the checkpoint schedule of `plan` with `strategy` (`None`: rotor when keeping every
/// activation does not fit, else none) and records it in the plan.
pub fn checkpoint_plan(
    tg: &TrainingGraph,
    plan: &mut Plan,
    strategy: Option<Strategy>,
) -> Result<(), Error> {
    let (chain, names) = chain_of(tg, plan)?;
    record(plan, &chain, names, strategy)
}

fn record(
    plan: &mut Plan,
    chain: &Chain,
    names: Vec<String>,
    strategy: Option<Strategy>,
) -> Result<(), Error> {
    let budget = activation_budget(plan);
    let err = |e: checkpoint::CheckpointError| Error::Usage(format!("checkpointing: {e}"));
    if budget <= 0.0 {
        return Err(Error::Usage(format!(
            "checkpointing: parameters, gradients and optimizer state alone take {} per device, more than the budget",
            crate::format_bytes(fixed_bytes(plan))
        )));
    }
    let keep_all = checkpoint::none(chain).map_err(err)?;
    let keep_all_sim = checkpoint::simulate(chain, &keep_all).map_err(err)?;
    let strategy = strategy.unwrap_or(if keep_all_sim.peak_bytes as f64 > budget {
        Strategy::Rotor
    } else {
        Strategy::None
    });
    let schedule = strategy
        .solve(chain, budget as u64, checkpoint::DEFAULT_SLOTS)
        .map_err(err)?;
    let sim = checkpoint::simulate(chain, &schedule).map_err(err)?;
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

/// Most ILP rounds of the joint loop.
const JOINT_ROUNDS: usize = 6;

/// Sharding, then checkpointing, as `opts.checkpoint` asks (see the module doc): with `None`
/// (auto) the plan is checkpointed only when it does not fit otherwise, and then the ILP is
/// re-solved with the memory checkpointing frees.
pub fn plan_with_checkpointing(
    model: &str,
    tg: &TrainingGraph,
    profile: &Profile,
    opts: &PlanOptions,
) -> Result<Plan, Error> {
    let forced = opts.checkpoint;
    if forced == Some(Strategy::None) {
        return planner::plan(model, tg, profile, opts);
    }
    let least = match planner::plan(model, tg, profile, opts) {
        Ok(mut p) => {
            if let Some(s) = forced {
                checkpoint_plan(tg, &mut p, Some(s))?;
            }
            return Ok(p);
        }
        Err(Error::NoFit { least_bytes, .. }) => least_bytes,
        Err(e) => return Err(e),
    };
    let budget = opts.memory_budget.unwrap_or(opts.cluster.hbm_bytes);
    let strategy = match forced {
        Some(s @ Strategy::Chen) => s,
        _ => Strategy::Rotor,
    };
    // the least any plan needs with every activation kept, a hair above for the solver's
    // tolerance
    let mut allowance = (least - budget).max(0.0) * 1.001 + 1.0;
    let mut best: Option<Plan> = None;
    let mut closest: Option<(f64, Plan)> = None; // (least checkpointed memory, plan)
    for _ in 0..JOINT_ROUNDS {
        let mut o = opts.clone();
        o.memory_budget = Some(budget + allowance);
        o.checkpoint = Some(Strategy::None);
        let mut p = match planner::plan(model, tg, profile, &o) {
            Ok(p) => p,
            Err(Error::NoFit { least_bytes, .. }) => {
                allowance = (least_bytes - budget).max(allowance) * 1.01;
                continue;
            }
            Err(e) => return Err(e),
        };
        p.memory_budget_bytes = Some(budget);
        let (chain, names) = chain_of(tg, &p)?;
        let least_peak = checkpoint::min_peak_bytes(&chain)
            .map_err(|e| Error::Usage(format!("checkpointing: {e}")))?
            as f64;
        let slack = activation_budget(&p) - least_peak;
        if slack >= 0.0 && record(&mut p, &chain, names, Some(strategy)).is_ok() {
            let step = |p: &Plan| p.checkpoint.as_ref().map_or(f64::INFINITY, |c| c.step_s);
            if best.as_ref().is_none_or(|b| step(&p) < step(b)) {
                best = Some(p.clone());
            }
        } else {
            let need = fixed_bytes(&p) + least_peak;
            if closest.as_ref().is_none_or(|(m, _)| need < *m) {
                closest = Some((need, p.clone()));
            }
        }
        let next = (allowance + slack).max(0.0);
        if (next - allowance).abs() < 0.01 * budget {
            break;
        }
        allowance = next;
    }
    if let Some(mut p) = best {
        p.solver.status = format!("{} (joint with checkpointing)", p.solver.status);
        return Ok(p);
    }
    let least_seen = closest.map_or(least, |(m, _)| m);
    Err(Error::Usage(format!(
        "no {} plan of {model} on mesh {} fits {} per device, even with activation checkpointing: the least memory found is {} (parameters, gradients, optimizer state and inputs, plus the smallest peak of activations any checkpoint schedule reaches); without checkpointing the smallest per-device memory any such plan needs is {}",
        opts.family.name(),
        opts.mesh_shape
            .iter()
            .map(|n| n.to_string())
            .collect::<Vec<_>>()
            .join("x"),
        crate::format_bytes(budget),
        crate::format_bytes(least_seen),
        crate::format_bytes(least)
    )))
}
