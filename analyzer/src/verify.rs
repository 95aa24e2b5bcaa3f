//! The IR verifier: run after every pass in debug builds and in tests.
//!
//! Checks: ids in range; every value defined once and before use (nodes in topological order);
//! each node's outputs point back at it; output types equal what the op infers from the input
//! types; graph inputs are `Input` values and graph outputs exist; constants match their type.

use crate::error::AnalyzerError;
use crate::graph::{Graph, ValueDef};

pub fn verify(g: &Graph) -> Result<(), AnalyzerError> {
    let err = |m: String| Err(AnalyzerError::Verify(m));
    let nv = g.values.len();
    let mut defined = vec![false; nv];
    for (v, d) in g.values.iter() {
        match &d.def {
            ValueDef::Node { node, index } => {
                let Some(nd) = g.nodes.get(*node) else {
                    return err(format!("{v} is defined by missing node {node}"));
                };
                if nd.outputs.get(*index) != Some(&v) {
                    return err(format!(
                        "{v} claims to be output {index} of {node}, which disagrees"
                    ));
                }
            }
            ValueDef::Const(t) => {
                if t.shape != d.ty.shape || t.dtype != d.ty.dtype || t.data.len() != d.ty.numel() {
                    return err(format!(
                        "constant {v} holds {:?} {:?} but is typed {}",
                        t.dtype, t.shape, d.ty
                    ));
                }
                defined[v.0 as usize] = true;
            }
            _ => defined[v.0 as usize] = true,
        }
    }
    for &v in &g.inputs {
        if v.0 as usize >= nv || !matches!(g.values[v].def, ValueDef::Input) {
            return err(format!("graph input {v} is not an input value"));
        }
    }
    for (n, node) in g.nodes.iter() {
        for &v in &node.inputs {
            if v.0 as usize >= nv {
                return err(format!("{} reads missing value {v}", g.node_label(n)));
            }
            if !defined[v.0 as usize] {
                return err(format!(
                    "{} reads {} before it is defined",
                    g.node_label(n),
                    g.value_label(v)
                ));
            }
        }
        let in_tys: Vec<_> = node.inputs.iter().map(|&v| g.ty(v)).collect();
        let inferred = node
            .op
            .spec()
            .infer(&in_tys)
            .map_err(|e| AnalyzerError::Node {
                node: g.node_label(n),
                op: node.op.name().into(),
                reason: e.0,
            })?;
        if inferred.len() != node.outputs.len() {
            return err(format!(
                "{} has {} outputs, its op infers {}",
                g.node_label(n),
                node.outputs.len(),
                inferred.len()
            ));
        }
        for (i, (&v, ty)) in node.outputs.iter().zip(&inferred).enumerate() {
            if v.0 as usize >= nv {
                return err(format!("{} writes missing value {v}", g.node_label(n)));
            }
            if defined[v.0 as usize] {
                return err(format!(
                    "{} redefines {}",
                    g.node_label(n),
                    g.value_label(v)
                ));
            }
            if g.values[v].def != (ValueDef::Node { node: n, index: i }) {
                return err(format!(
                    "{} output {i} is {v}, which is not defined by it",
                    g.node_label(n)
                ));
            }
            if &g.values[v].ty != ty {
                return err(format!(
                    "{} output {} is typed {}, its op infers {ty}",
                    g.node_label(n),
                    g.value_label(v),
                    g.values[v].ty
                ));
            }
            defined[v.0 as usize] = true;
        }
        if let Some(o) = node.origin {
            if o.0 as usize >= g.nodes.len() {
                return err(format!("{} has a missing origin {o}", g.node_label(n)));
            }
        }
    }
    for &v in &g.outputs {
        if v.0 as usize >= nv || !defined[v.0 as usize] {
            return err(format!("graph output {v} is not defined"));
        }
    }
    Ok(())
}

/// Verifies in debug builds only: cheap insurance between passes.
pub fn debug_verify(g: &Graph) -> Result<(), AnalyzerError> {
    if cfg!(debug_assertions) {
        verify(g)
    } else {
        Ok(())
    }
}
