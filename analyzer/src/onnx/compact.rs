//! Drops the constants nothing reads any more.
//!
//! Folding leaves every intermediate of the exporters' shape arithmetic behind as a constant
//! value (`Shape` -> `Gather` -> `Concat` -> the one shape a `Reshape` uses). Renumbering the
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
    let keep =
        |v: ValueId, def: &ValueDef| used[v.0 as usize] || !matches!(def, ValueDef::Const(_));
    if g.values.iter().all(|(v, d)| keep(v, &d.def)) {
        let map = g.values.iter().map(|(v, _)| Some(v)).collect();
        return (g, map);
    }
    let mut out = Graph::new();
    let mut map: Vec<Option<ValueId>> = vec![None; g.values.len()];
    for (v, d) in g.values.iter() {
        if keep(v, &d.def) {
            map[v.0 as usize] = Some(out.values.push(d.clone()));
        }
    }
    // Every value a node, input or output refers to is kept, so the lookups below succeed.
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
