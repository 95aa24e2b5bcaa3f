//! Attention fusion on the built-in models: `load_model` fuses every layer's attention, and the
//! fused training step (loss and every parameter gradient, through `Attention`'s vjp) equals the
//! composed one under the f64 reference evaluator.
#![allow(clippy::unwrap_used)]

use autopar::{load_model, models, LoadOptions};
use autopar_analyzer::fuse::fuse_attention;
use autopar_analyzer::train::{build_training_graph, LossSpec, TrainOptions};
use autopar_analyzer::{eval, DType, Op, Tensor, ValueId};
use std::collections::HashMap;

fn count(g: &autopar_analyzer::Graph, name: &str) -> usize {
    g.nodes.iter().filter(|(_, n)| n.op.name() == name).count()
}

/// Loss and named parameter gradients of one training step under the f64 reference.
fn step(
    g: &autopar_analyzer::Graph,
    loss: ValueId,
    feeds: &HashMap<ValueId, Tensor>,
) -> (f64, Vec<(String, Tensor)>) {
    let tg = build_training_graph(g, &TrainOptions::new(LossSpec::Given(loss))).unwrap();
    let vals = eval::run(&tg.graph, feeds).unwrap();
    let l = vals[tg.loss.0 as usize].as_ref().unwrap().data[0];
    let grads = tg
        .grads
        .iter()
        .map(|&(p, gv)| {
            let t = vals[gv.0 as usize].clone().unwrap();
            (tg.graph.value(p).name.clone(), t)
        })
        .collect();
    (l, grads)
}

#[test]
fn fused_builtins_equal_composed_under_the_reference() {
    for model in ["gpt2", "llama-1b"] {
        let mut overrides = models::tiny(model).unwrap();
        overrides.dtype = Some(DType::F64);
        let built = models::build(model, &overrides).unwrap();
        let layers = built.config.layers;
        assert_eq!(count(&built.graph, "softmax"), layers, "{model}");
        let (fused, map) = fuse_attention(built.graph.clone()).unwrap();
        assert_eq!(count(&fused, "attention"), layers, "{model}");
        assert_eq!(count(&fused, "softmax"), 0, "{model}");
        assert_eq!(count(&fused, "causal_mask"), 0, "{model}");
        let causal = fused
            .nodes
            .iter()
            .all(|(_, n)| !matches!(&n.op, Op::Attention(a) if !a.causal || a.seq_axis != 1));
        assert!(causal, "{model}: causal [B, S, H, D] attention");

        let feeds = models::random_feeds(&built.graph, &built.config, 3);
        let (want_loss, want) = step(&built.graph, built.loss, &feeds);
        let fused_feeds: HashMap<ValueId, Tensor> = feeds
            .iter()
            .map(|(v, t)| (map[v.0 as usize].unwrap(), t.clone()))
            .collect();
        let loss = map[built.loss.0 as usize].unwrap();
        let (got_loss, got) = step(&fused, loss, &fused_feeds);
        assert!(
            (got_loss - want_loss).abs() <= 1e-12 * want_loss.abs(),
            "{model}: loss {got_loss} vs {want_loss}"
        );
        assert_eq!(got.len(), want.len());
        for ((gn, g), (wn, w)) in got.iter().zip(&want) {
            assert_eq!(gn, wn);
            let e = g.max_rel_err(w, 1e-9);
            assert!(e <= 1e-9, "{model}: gradient of {gn} off by {e:e}");
        }
    }
}

#[test]
fn load_model_fuses_unless_attention_dropout_is_active() {
    let mut opts = LoadOptions {
        overrides: models::tiny("gpt2").unwrap(),
        ..Default::default()
    };
    let m = load_model("gpt2", &opts).unwrap();
    assert_eq!(count(&m.graph, "attention"), 2);
    assert!(m.loss.is_some_and(|l| m.graph.ty(l).shape.is_empty()));
    // dropout on the probabilities stays composed (its mask is the IR's, not the kernel's)
    opts.overrides.dropout = Some(0.1);
    let m = load_model("gpt2", &opts).unwrap();
    assert_eq!(count(&m.graph, "attention"), 0);
    assert_eq!(count(&m.graph, "softmax"), 2);
}
