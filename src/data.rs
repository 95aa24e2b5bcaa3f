//! Synthetic training batches for any training graph (what `autopar run` and the examples
//! train on): the values must be legal for the model, so integer inputs are bounded by what
//! consumes them.
//!
//! - float inputs: N(0, 1);
//! - integer inputs read as indices (gather / embedding tables, one-hot depth): uniform below
//!   the smallest table they index;
//! - labels of a cross entropy: uniform below the number of classes;
//! - other integer inputs (attention masks, token type ids without a table): ones.

use autopar_analyzer::graph::{Graph, ValueDef, ValueId};
use autopar_analyzer::ops::Op;
use autopar_analyzer::Tensor;
use std::collections::HashMap;

/// A batch for every data input of `graph`, drawn from `seed`.
pub fn synthetic_batch(graph: &Graph, seed: u64) -> HashMap<ValueId, Tensor> {
    let bounds = index_bounds(graph);
    let mut state = seed ^ 0x6A09_E667_F3BC_C909;
    let mut next = move || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    let mut out = HashMap::new();
    for &v in &graph.inputs {
        let d = graph.value(v);
        if !matches!(d.def, ValueDef::Input) {
            continue;
        }
        let n = d.ty.numel();
        let data: Vec<f64> = if d.ty.dtype.is_float() {
            (0..n)
                .map(|_| {
                    // Box-Muller from two uniforms in (0, 1]
                    let u1 = ((next() >> 11) as f64 + 1.0) / (1u64 << 53) as f64;
                    let u2 = (next() >> 11) as f64 / (1u64 << 53) as f64;
                    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
                })
                .collect()
        } else {
            match bounds.get(&v) {
                Some(&b) if b > 0 => (0..n).map(|_| (next() % b as u64) as f64).collect(),
                _ => vec![1.0; n],
            }
        };
        out.insert(v, Tensor::new(d.ty.dtype, d.ty.shape.clone(), data));
    }
    out
}

/// Per integer input: the exclusive upper bound of legal values, from its consumers.
fn index_bounds(graph: &Graph) -> HashMap<ValueId, usize> {
    let mut bounds: HashMap<ValueId, usize> = HashMap::new();
    let mut tighten = |v: ValueId, b: usize| {
        let e = bounds.entry(v).or_insert(b);
        *e = (*e).min(b);
    };
    for (_, node) in graph.nodes.iter() {
        match &node.op {
            Op::Gather(g) if node.inputs.len() == 2 => {
                let table = graph.ty(node.inputs[0]);
                if let Some(&n) = table.shape.get(g.axis) {
                    tighten(node.inputs[1], n);
                }
            }
            Op::SoftmaxCrossEntropy(_) if node.inputs.len() == 2 => {
                if let Some(&c) = graph.ty(node.inputs[0]).shape.last() {
                    tighten(node.inputs[1], c);
                }
            }
            Op::OneHot(o) if !node.inputs.is_empty() => tighten(node.inputs[0], o.depth),
            _ => {}
        }
    }
    bounds
}
