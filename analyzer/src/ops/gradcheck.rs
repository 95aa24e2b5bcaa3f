//! Finite-difference check of an op's vjp, in f64 through the reference evaluator.
//!
//! `check(op, inputs)` builds a graph `loss = sum(op(inputs)[o] * w_o)` with fixed random
//! weights `w_o` per float output, emits the op's vjp, evaluates the analytic input gradients
//! and compares each with central differences. Used by every op's tests.

use crate::builder::GraphBuilder;
use crate::eval;
use crate::graph::{Phase, ValueDef, ValueId};
use crate::ops::{Op, VjpCtx};
use crate::tensor::Tensor;
use std::collections::HashMap;

/// Deterministic pseudo-random values in [-1, 1).
pub fn rand_tensor(shape: &[usize], seed: u64) -> Tensor {
    Tensor::pseudo_random(shape, seed)
}

fn loss_of(op: &Op, inputs: &[Tensor], weights: &[Option<Tensor>]) -> f64 {
    let refs: Vec<&Tensor> = inputs.iter().collect();
    let outs = op.spec().eval(&refs).expect("eval");
    outs.iter()
        .zip(weights)
        .filter_map(|(o, w)| {
            w.as_ref()
                .map(|w| o.data.iter().zip(&w.data).map(|(a, b)| a * b).sum::<f64>())
        })
        .sum()
}

/// Checks op's vjp against central differences for every differentiable float input.
/// Integer inputs (indices, labels) are passed through unchanged. Panics with a message on a
/// mismatch (test helper).
pub fn check(op: impl Into<Op>, inputs: &[Tensor], tol: f64) {
    let op: Op = op.into();
    let refs: Vec<&Tensor> = inputs.iter().collect();
    let outs = op.spec().eval(&refs).expect("eval forward");
    let weights: Vec<Option<Tensor>> = outs
        .iter()
        .enumerate()
        .map(|(i, o)| {
            if o.dtype.is_float() {
                Some(rand_tensor(&o.shape, 1000 + i as u64))
            } else {
                None
            }
        })
        .collect();

    // analytic: build graph with inputs as graph inputs, node, vjp with the weights as grads
    let mut b = GraphBuilder::new();
    let ins: Vec<ValueId> = inputs
        .iter()
        .enumerate()
        .map(|(i, t)| b.input(format!("x{i}"), t.ty()))
        .collect();
    let outs_v = b.node(op.clone(), &ins).expect("add op");
    let node = crate::graph::NodeId(0);
    let grads: Vec<Option<ValueId>> = weights
        .iter()
        .map(|w| w.as_ref().map(|w| b.constant(w.clone())))
        .collect();
    let needs: Vec<bool> = inputs
        .iter()
        .enumerate()
        .map(|(i, t)| t.dtype.is_float() && op.spec().differentiable(i))
        .collect();
    b.phase = Phase::Backward;
    b.origin = Some(node);
    let din = {
        let mut cx = VjpCtx {
            b: &mut b,
            inputs: &ins,
            outputs: &outs_v,
            grads: &grads,
            needs: &needs,
        };
        op.spec().vjp(&mut cx).expect("vjp")
    };
    let g = b.finish();
    crate::verify::verify(&g).expect("vjp graph verifies");
    let feeds: HashMap<ValueId, Tensor> = ins.iter().copied().zip(inputs.iter().cloned()).collect();
    let vals = eval::run(&g, &feeds).expect("eval vjp graph");
    let h = 1e-6;
    for (i, t) in inputs.iter().enumerate() {
        if !needs[i] {
            continue;
        }
        let Some(dv) = din.get(i).copied().flatten() else {
            panic!("{}: no gradient for input {i}", op.name())
        };
        assert!(
            !matches!(g.values[dv].def, ValueDef::Input) || dv != ins[i],
            "gradient is the input itself"
        );
        let analytic = vals[dv.0 as usize].clone().expect("grad computed");
        assert_eq!(
            analytic.shape,
            t.shape,
            "{}: grad shape of input {i}",
            op.name()
        );
        for k in 0..t.numel() {
            let mut plus = inputs.to_vec();
            plus[i].data[k] += h;
            let mut minus = inputs.to_vec();
            minus[i].data[k] -= h;
            let num = (loss_of(&op, &plus, &weights) - loss_of(&op, &minus, &weights)) / (2.0 * h);
            let a = analytic.data[k];
            let err = (a - num).abs() / a.abs().max(num.abs()).max(1.0);
            assert!(
                err <= tol,
                "{}: d/dx{i}[{k}] analytic {a} numeric {num} (rel err {err})",
                op.name()
            );
        }
    }
}
