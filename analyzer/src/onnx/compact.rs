//! Drops the constants nothing reads any more, and renumbers values after a rewrite.
//!
//! Folding leaves every intermediate of the exporters' shape arithmetic behind as a constant
//! value (`Shape` -> `Gather` -> `Concat` -> the one shape a `Reshape` uses), and the pattern
//! rewrites ([`super::patterns`]) leave the scalars of the formulas they replace. Renumbering the
//! values without the unread ones keeps dumps, golden tests and memory small.

use crate::graph::{Graph, ValueDef, ValueId};

/// The graph without unread constants, and where each old value went (`None`: dropped).
pub fn drop_unused_constants(g: Graph) -> (Graph, Vec<Option<ValueId>>) {
    let mut used = vec![false; g.values.len()];
    for (_, n) in g.nodes.iter() {
        for &v in &n.inputs {
            used[v.0 as usize] = true;
        }
    }
    for &v in g.outputs.iter().chain(&g.inputs) {
        used[v.0 as usize] = true;
    }
    let keep: Vec<bool> = g
        .values
        .iter()
        .map(|(v, d)| used[v.0 as usize] || !matches!(d.def, ValueDef::Const(_)))
        .collect();
    retain_values(g, &keep)
}

/// The graph with only the values `keep` marks, renumbered in their order, and where each old
/// value went (`None`: dropped). The caller keeps every value a node, an input or an output
/// refers to.
pub(crate) fn retain_values(g: Graph, keep: &[bool]) -> (Graph, Vec<Option<ValueId>>) {
    let kept = |v: ValueId| keep.get(v.0 as usize).copied().unwrap_or(true);
    if g.values.iter().all(|(v, _)| kept(v)) {
        let map = g.values.iter().map(|(v, _)| Some(v)).collect();
        return (g, map);
    }
    let order: Vec<ValueId> = g.values.keys().filter(|&v| kept(v)).collect();
    renumber_values(g, &order)
}

/// The graph with the values `order` lists, numbered in that order, and where each old value
/// went (`None`: not listed). `order` lists every value a node, an input or an output refers
/// to, each once.
pub(crate) fn renumber_values(g: Graph, order: &[ValueId]) -> (Graph, Vec<Option<ValueId>>) {
    let mut out = Graph::new();
    let mut map: Vec<Option<ValueId>> = vec![None; g.values.len()];
    for &v in order {
        map[v.0 as usize] = Some(out.values.push(g.values[v].clone()));
    }
    // Every value a node, input or output refers to is listed, so the lookups below succeed.
    let m = |v: ValueId| map[v.0 as usize].unwrap_or(v);
    for (_, n) in g.nodes.iter() {
        let mut n = n.clone();
        n.inputs.iter_mut().for_each(|v| *v = m(*v));
        n.outputs.iter_mut().for_each(|v| *v = m(*v));
        out.nodes.push(n);
    }
    out.inputs = g.inputs.iter().map(|&v| m(v)).collect();
    out.outputs = g.outputs.iter().map(|&v| m(v)).collect();
    (out, map)
}
