//! The training-graph builder on small MLPs: the printed training graph (golden), and the
//! gradients it computes against finite differences of the forward loss, through the
//! reference evaluator in f64.

#![allow(clippy::unwrap_used)]

use autopar_analyzer::entity::EntityId;
use autopar_analyzer::eval;
use autopar_analyzer::ops::binary::{Binary, BinaryKind};
use autopar_analyzer::ops::unary::{Unary, UnaryKind};
use autopar_analyzer::text::print;
use autopar_analyzer::train::{build_training_graph, LossSpec, TrainOptions, TrainingGraph};
use autopar_analyzer::{DType, Graph, GraphBuilder, Tensor, TensorType, ValueDef, ValueId};
use std::collections::HashMap;

fn ty(dtype: DType, shape: &[usize]) -> TensorType {
    TensorType::new(dtype, shape.to_vec())
}

fn relu(b: &mut GraphBuilder, x: ValueId) -> ValueId {
    b.node1(
        Unary {
            kind: UnaryKind::Relu,
        },
        &[x],
    )
    .unwrap()
}

fn add(b: &mut GraphBuilder, x: ValueId, y: ValueId) -> ValueId {
    b.node1(
        Binary {
            kind: BinaryKind::Add,
        },
        &[x, y],
    )
    .unwrap()
}

/// Deterministic values in [-1, 1).
fn rand(shape: &[usize], seed: u64) -> Tensor {
    Tensor::pseudo_random(shape, seed)
}

/// Random feeds for every input and weight of `g`; integer inputs get labels in `0..classes`.
fn feeds_for(g: &Graph, classes: usize) -> HashMap<ValueId, Tensor> {
    let mut feeds = HashMap::new();
    for (v, d) in g.values.iter() {
        let t = match d.def {
            ValueDef::Input | ValueDef::Param { .. } | ValueDef::Buffer { .. } => {
                if d.ty.dtype.is_float() {
                    rand(&d.ty.shape, 7 + v.index() as u64)
                } else {
                    let n = d.ty.numel();
                    let labels: Vec<i64> = (0..n).map(|i| ((i * 7 + 3) % classes) as i64).collect();
                    Tensor::from_i64(d.ty.shape.clone(), &labels)
                }
            }
            _ => continue,
        };
        feeds.insert(v, t);
    }
    feeds
}

/// Every parameter gradient of `tg` equals central differences of its loss.
fn check_gradients(tg: &TrainingGraph, classes: usize) {
    let feeds = feeds_for(&tg.graph, classes);
    let vals = eval::run(&tg.graph, &feeds).unwrap();
    let loss_at = |feeds: &HashMap<ValueId, Tensor>| {
        eval::run(&tg.graph, feeds).unwrap()[tg.loss.index()]
            .clone()
            .unwrap()
            .data[0]
    };
    assert!(!tg.grads.is_empty());
    for &(p, gv) in &tg.grads {
        let analytic = vals[gv.index()].clone().unwrap();
        assert_eq!(analytic.shape, tg.graph.ty(p).shape);
        for k in 0..analytic.numel() {
            let h = 1e-6;
            let mut fp = feeds.clone();
            fp.get_mut(&p).unwrap().data[k] += h;
            let mut fm = feeds.clone();
            fm.get_mut(&p).unwrap().data[k] -= h;
            let num = (loss_at(&fp) - loss_at(&fm)) / (2.0 * h);
            let a = analytic.data[k];
            let err = (a - num).abs() / a.abs().max(num.abs()).max(1.0);
            assert!(
                err < 1e-6,
                "{} [{k}]: analytic {a}, numeric {num}",
                tg.graph.value_label(p)
            );
        }
    }
}

/// `x [2,3] @ w1 -> relu -> @ w2 -> cross entropy vs labels` (f32).
fn small_mlp() -> (Graph, ValueId) {
    let mut b = GraphBuilder::new();
    let x = b.input("x", ty(DType::F32, &[2, 3]));
    let w1 = b.param("fc1.w", ty(DType::F32, &[3, 4]));
    let w2 = b.param("fc2.w", ty(DType::F32, &[4, 3]));
    b.name_next("fc1");
    let h = b.matmul(x, w1).unwrap();
    b.name_next("act");
    let a = relu(&mut b, h);
    b.name_next("fc2");
    let y = b.matmul(a, w2).unwrap();
    b.output(y);
    (b.finish(), y)
}

#[test]
fn golden_training_graph_of_a_small_mlp() {
    let (g, y) = small_mlp();
    let opts = TrainOptions::new(LossSpec::CrossEntropy {
        logits: y,
        labels_name: "labels".into(),
    });
    let tg = build_training_graph(&g, &opts).unwrap();
    expect_test::expect![[r#"
        graph {
          input v0 "x": f32[2,3]
          param v1 "fc1.w": f32[3,4]
          param v2 "fc2.w": f32[4,3]
          input v6 "labels": i64[2]
          const v9 "dloss": f32[] = [1.0]
          const v13: f32[] = [0.0]
          n0 "fc1" = einsum(v0, v1) {"equation":"ay,yz->az"} -> v3 "fc1": f32[2,4]
          n1 "act" = unary(v3) {"kind":"relu"} -> v4 "act": f32[2,4]
          n2 "fc2" = einsum(v4, v2) {"equation":"ay,yz->az"} -> v5 "fc2": f32[2,3]
          n3 "loss" = softmax_cross_entropy(v5, v6) {"ignore_index":null,"reduction":"mean"} -> v7 "loss": f32[], v8 "loss:1": f32[2,3]
          n4 "loss.grad" backward(n3) = softmax_cross_entropy_grad(v9, v8, v6) {"ignore_index":null,"reduction":"mean"} -> v10 "loss.grad": f32[2,3]
          n5 "fc2.grad" backward(n2) = einsum(v10, v2) {"equation":"az,yz->ay"} -> v11 "fc2.grad": f32[2,4]
          n6 "fc2.grad" backward(n2) = einsum(v10, v4) {"equation":"az,ay->yz"} -> v12 "fc2.w.grad": f32[4,3]
          n7 "act.grad" backward(n1) = binary(v3, v13) {"kind":"greater"} -> v14 "act.grad": bool[2,4]
          n8 "act.grad" backward(n1) = where(v14, v11, v13) -> v15 "act.grad": f32[2,4]
          n9 "fc1.grad" backward(n0) = einsum(v15, v0) {"equation":"az,ay->yz"} -> v16 "fc1.w.grad": f32[3,4]
          output v7, v16, v12
        }
    "#]].assert_eq(&print(&tg.graph));
}

#[test]
fn mlp_gradients_match_finite_differences() {
    // x [3,4] @ w1 + b1 -> relu -> @ w2 + b2 -> cross entropy, in f64
    let mut b = GraphBuilder::new();
    let x = b.input("x", ty(DType::F64, &[3, 4]));
    let w1 = b.param("w1", ty(DType::F64, &[4, 5]));
    let b1 = b.param("b1", ty(DType::F64, &[5]));
    let w2 = b.param("w2", ty(DType::F64, &[5, 3]));
    let b2 = b.param("b2", ty(DType::F64, &[3]));
    let h = b.matmul(x, w1).unwrap();
    let h = add(&mut b, h, b1);
    let a = relu(&mut b, h);
    let y = b.matmul(a, w2).unwrap();
    let y = add(&mut b, y, b2);
    let opts = TrainOptions::new(LossSpec::CrossEntropy {
        logits: y,
        labels_name: "labels".into(),
    });
    let tg = build_training_graph(&b.finish(), &opts).unwrap();
    assert_eq!(
        tg.grads.iter().map(|g| g.0).collect::<Vec<_>>(),
        vec![w1, b1, w2, b2]
    );
    let labels = tg.labels.unwrap();
    assert_eq!(tg.graph.ty(labels), &ty(DType::I64, &[3]));
    check_gradients(&tg, 3);
}

#[test]
fn shared_weight_gradients_accumulate() {
    // y = relu(x @ w) @ w: w read twice, its gradient is the sum of two contributions
    let mut b = GraphBuilder::new();
    let x = b.input("x", ty(DType::F64, &[2, 3]));
    let w = b.param("w", ty(DType::F64, &[3, 3]));
    let h = b.matmul(x, w).unwrap();
    let a = relu(&mut b, h);
    let y = b.matmul(a, w).unwrap();
    let tg =
        build_training_graph(&b.finish(), &TrainOptions::new(LossSpec::MeanOfOutput(y))).unwrap();
    let adds = tg
        .graph
        .nodes
        .values()
        .filter(|n| n.origin.is_some() && n.op.name() == "binary")
        .count();
    assert!(adds >= 1, "{}", print(&tg.graph));
    check_gradients(&tg, 1);
}

#[test]
fn cross_entropy_over_a_sequence_reshapes_the_logits() {
    // logits [2, 3, 4] (batch, sequence, classes): labels i64[2, 3]
    let mut b = GraphBuilder::new();
    let x = b.input("x", ty(DType::F64, &[2, 3, 5]));
    let w = b.param("w", ty(DType::F64, &[5, 4]));
    let y = b.matmul(x, w).unwrap();
    let opts = TrainOptions::new(LossSpec::CrossEntropy {
        logits: y,
        labels_name: "targets".into(),
    });
    let tg = build_training_graph(&b.finish(), &opts).unwrap();
    let labels = tg.labels.unwrap();
    assert_eq!(tg.graph.values[labels].name, "targets");
    assert_eq!(tg.graph.ty(labels), &ty(DType::I64, &[2, 3]));
    check_gradients(&tg, 4);
}

#[test]
fn buffers_and_inputs_get_no_gradient() {
    let mut b = GraphBuilder::new();
    let x = b.input("x", ty(DType::F64, &[2, 3]));
    let w = b.param("w", ty(DType::F64, &[3, 3]));
    let s = b.buffer("shift", ty(DType::F64, &[3]));
    let h = b.matmul(x, w).unwrap();
    let y = add(&mut b, h, s);
    let tg =
        build_training_graph(&b.finish(), &TrainOptions::new(LossSpec::MeanOfOutput(y))).unwrap();
    assert_eq!(tg.grads.len(), 1);
    assert_eq!(tg.grads[0].0, w);
    assert!(tg.unused_params.is_empty());
    check_gradients(&tg, 1);
}

#[test]
fn training_batch_norm_running_stats_become_buffer_updates() {
    use autopar_analyzer::ops::BatchNorm;
    let mut b = GraphBuilder::new();
    let x = b.input("x", ty(DType::F64, &[4, 3]));
    let w = b.param("w", ty(DType::F64, &[3, 2]));
    let scale = b.param("bn.weight", ty(DType::F64, &[2]));
    let bias = b.param("bn.bias", ty(DType::F64, &[2]));
    let mean = b.buffer("bn.running_mean", ty(DType::F64, &[2]));
    let var = b.buffer("bn.running_var", ty(DType::F64, &[2]));
    let h = b.matmul(x, w).unwrap();
    let outs = b
        .node(
            BatchNorm {
                epsilon: 1e-5,
                momentum: 0.9,
                training: true,
            },
            &[h, scale, bias, mean, var],
        )
        .unwrap();
    let opts = TrainOptions::new(LossSpec::MeanOfOutput(outs[0]));
    let tg = build_training_graph(&b.finish(), &opts).unwrap();
    assert_eq!(tg.buffer_updates, vec![(mean, outs[1]), (var, outs[2])]);
    assert_eq!(
        tg.graph.outputs[tg.graph.outputs.len() - 2..],
        [outs[1], outs[2]]
    );
    assert_eq!(tg.grads.len(), 3);
    check_gradients(&tg, 1);
}
