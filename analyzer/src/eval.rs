//! Reference execution of a whole graph on [`Tensor`]s (f64), node by node through each op's
//! `eval`. For tests and small models only: it is the correctness oracle, not the runtime.

use crate::error::AnalyzerError;
use crate::graph::{Graph, ValueDef, ValueId};
use crate::tensor::Tensor;
use std::collections::HashMap;

/// Runs `graph` with values for its inputs and weights (params and buffers by `ValueId`);
/// returns every value computed, indexed by `ValueId`.
pub fn run(
    graph: &Graph,
    feeds: &HashMap<ValueId, Tensor>,
) -> Result<Vec<Option<Tensor>>, AnalyzerError> {
    let mut vals: Vec<Option<Tensor>> = vec![None; graph.values.len()];
    for (v, d) in graph.values.iter() {
        match &d.def {
            ValueDef::Const(t) => vals[v.0 as usize] = Some(t.as_ref().clone()),
            ValueDef::Node { .. } => {}
            _ => match feeds.get(&v) {
                Some(t) if t.shape == d.ty.shape => vals[v.0 as usize] = Some(t.clone()),
                Some(t) => {
                    return Err(AnalyzerError::Input {
                        name: graph.value_label(v),
                        reason: format!("fed shape {:?}, expected {}", t.shape, d.ty),
                    })
                }
                None => {
                    return Err(AnalyzerError::Input {
                        name: graph.value_label(v),
                        reason: "no value fed".into(),
                    })
                }
            },
        }
    }
    for (n, node) in graph.nodes.iter() {
        let ins: Vec<&Tensor> = node
            .inputs
            .iter()
            .map(|&v| vals[v.0 as usize].as_ref())
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| AnalyzerError::Node {
                node: graph.node_label(n),
                op: node.op.name().into(),
                reason: "input not computed".into(),
            })?;
        let outs = node.op.spec().eval(&ins).map_err(|e| AnalyzerError::Node {
            node: graph.node_label(n),
            op: node.op.name().into(),
            reason: e.0,
        })?;
        for (&v, t) in node.outputs.iter().zip(outs) {
            vals[v.0 as usize] = Some(t);
        }
    }
    Ok(vals)
}
