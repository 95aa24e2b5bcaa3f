//! The profiler on a 2-layer MLP trained with cross entropy: matmul FLOPs exactly (forward
//! `2*B*in*out` per layer; backward twice that, less the first layer's input gradient), the
//! activations saved for backward, and the parameter / gradient / optimizer bytes.

#![allow(clippy::unwrap_used)]

use autopar_analyzer::ops::unary::{Unary, UnaryKind};
use autopar_analyzer::profile::profile;
use autopar_analyzer::train::{
    build_training_graph, DTypePolicy, LossSpec, Optimizer, TrainOptions,
};
use autopar_analyzer::{DType, GraphBuilder, Phase, TensorType};

const B: usize = 8;
const IN: usize = 16;
const HID: usize = 32;
const OUT: usize = 10;

#[test]
fn two_layer_mlp_profile() {
    let f32t = |s: &[usize]| TensorType::new(DType::F32, s.to_vec());
    let mut b = GraphBuilder::new();
    let x = b.input("x", f32t(&[B, IN]));
    let w1 = b.param("fc1.w", f32t(&[IN, HID]));
    let w2 = b.param("fc2.w", f32t(&[HID, OUT]));
    b.name_next("fc1");
    let h = b.matmul(x, w1).unwrap();
    b.name_next("act");
    let a = b
        .node1(
            Unary {
                kind: UnaryKind::Relu,
            },
            &[h],
        )
        .unwrap();
    b.name_next("fc2");
    let y = b.matmul(a, w2).unwrap();
    let opts = TrainOptions::new(LossSpec::CrossEntropy {
        logits: y,
        labels_name: "labels".into(),
    });
    let tg = build_training_graph(&b.finish(), &opts).unwrap();
    let p = profile(&tg, Optimizer::AdamW, DTypePolicy::Fp32);

    let fc1 = 2.0 * (B * IN * HID) as f64;
    let fc2 = 2.0 * (B * HID * OUT) as f64;
    assert_eq!(p.forward_matmul_flops, fc1 + fc2);
    // dW2 and dA for fc2, dW1 only for fc1 (x is an input)
    assert_eq!(p.backward_matmul_flops, 2.0 * fc2 + fc1);
    assert_eq!(p.matmul_flops, 2.0 * fc1 + 3.0 * fc2);
    assert!(
        p.forward_flops > p.forward_matmul_flops,
        "relu and the loss cost vector flops"
    );
    assert_eq!(p.flops_per_step, p.forward_flops + p.backward_flops);
    let fc2_row = p.nodes.iter().find(|r| r.name == "fc2").unwrap();
    assert_eq!(fc2_row.backward.unwrap().matmul_flops, 2.0 * fc2);
    assert_eq!(p.per_op_type["einsum"].matmul_flops, p.matmul_flops);
    assert_eq!(p.per_op_type["unary.relu"].count, 1);

    // saved for backward: the input x (for dW1), the labels (for the loss gradient), and the
    // hidden activation (for dW2 and relu's gradient); never a parameter
    let g = &tg.graph;
    let saved = &p.saved_for_backward;
    assert!(saved.contains(&x));
    assert!(saved.contains(&tg.labels.unwrap()));
    assert!(saved.contains(&a), "relu output feeds dW2");
    assert!(saved.iter().all(|&v| !g.is_param(v)));
    assert!(saved.iter().all(|&v| match g.producer(v) {
        Some(n) => g.nodes[n].phase == Phase::Forward,
        None => true,
    }));
    let saved_bytes: usize = saved.iter().map(|&v| g.ty(v).size_bytes()).sum();
    assert_eq!(p.activation_bytes, saved_bytes);

    let w = IN * HID + HID * OUT;
    assert_eq!(p.params, w);
    assert_eq!(
        (p.param_bytes, p.grad_bytes, p.optimizer_bytes),
        (4 * w, 4 * w, 8 * w)
    );
    // at the optimizer step weights, moments and gradients are all live
    assert!(p.peak_memory_bytes >= 16 * w);
    assert!(p.peak_memory_bytes <= 16 * w + 4 * 64 * (B * HID + B * OUT + B * IN));
}
