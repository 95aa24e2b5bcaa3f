//! Attention fusion: the composed scaled dot-product attention of every model source becomes
//! one [`Attention`] node.
//!
//! Why a pass and not the frontends: the built-in models, the TorchScript importer and the ONNX
//! importer all spell attention as the same chain of core ops, so one matcher serves them all
//! and each frontend stays a literal translation (and the composed form stays available as the
//! reference the fused op is tested against). Fused, a layer's attention saves q, k, v, its
//! output and a small log-sum-exp for the backward instead of the `Lq x Lk` probabilities, and
//! runs as one flash / memory-efficient kernel instead of five or more; the profiler and the
//! solver see this through the op's cost and dim map, with no special case.
//!
//! The pattern, walked upwards from the context einsum (every intermediate read by the next op
//! only, no graph output among them; forward nodes only):
//!
//! ```text
//! scores = einsum(q, k)            one contracted head dim, q and k in the same layout
//! scaled = mul(scores, c)          optional; c a one-element constant (the scale)
//! masked = add(scaled, causal_mask) optional; a CausalMask [Lq, Lk] over the trailing
//!                                   dims, Lq <= Lk
//! probs  = softmax(masked)         over the key axis, not log-softmax
//! probs  = dropout(probs)          optional; only when inactive (ratio 0 or not training)
//! out    = einsum(probs, v)        v and out in q's layout
//! ```
//!
//! Dropout on the probabilities with a ratio above 0 is left composed: the fused kernels draw
//! their mask from libtorch's own generator, while the IR's dropout mask is a pure function of
//! a seed and global element indices ([`dropout_keep`](crate::ops::dropout::dropout_keep)),
//! which is what makes a sharded run drop exactly the single-device elements and lets the f64
//! reference check the runtime. Fusing it would trade that away.
//!
//! Masks other than a `CausalMask` (a padding mask, a bool mask through `Where`) are left
//! composed too. A `CausalMask` or scale constant left without readers is dropped; values are
//! renumbered, and the returned map says where each old value went.

use crate::error::AnalyzerError;
use crate::graph::{Graph, NodeData, NodeId, Phase, ValueData, ValueDef, ValueId};
use crate::ops::{Attention, Op, OpSpec};

/// One matched attention chain.
struct Match {
    /// The context einsum, replaced by the `Attention` node.
    context: NodeId,
    /// The scores einsum, scale, mask add, softmax and dropout nodes, removed.
    removed: Vec<NodeId>,
    /// q, k, v.
    inputs: [ValueId; 3],
    op: Attention,
}

/// Einsum operand labels: `(inputs, output)`.
fn labels(equation: &str) -> Option<(Vec<Vec<char>>, Vec<char>)> {
    let eq: String = equation.chars().filter(|c| !c.is_whitespace()).collect();
    let (lhs, rhs) = eq.split_once("->")?;
    Some((
        lhs.split(',').map(|s| s.chars().collect()).collect(),
        rhs.chars().collect(),
    ))
}

/// What a letter of the scores' einsum stands for.
#[derive(Copy, Clone, PartialEq, Eq, Debug)]
enum Role {
    /// the batch-like axis at this position of q
    Batch(usize),
    Query,
    Key,
}

struct Matcher<'g> {
    g: &'g Graph,
    users: Vec<Vec<NodeId>>,
    is_output: Vec<bool>,
}

impl Matcher<'_> {
    /// The forward node defining `v` when `v` is read by one node only and is no graph output.
    fn sole_producer(&self, v: ValueId) -> Option<(NodeId, &NodeData)> {
        if self.is_output[v.0 as usize] || self.users[v.0 as usize].len() != 1 {
            return None;
        }
        let n = self.g.producer(v)?;
        let node = self.g.node(n);
        // the value is read once by its one user (not twice, as in mul(x, x))
        let user = self.g.node(self.users[v.0 as usize][0]);
        if node.phase != Phase::Forward || user.inputs.iter().filter(|&&u| u == v).count() != 1 {
            return None;
        }
        Some((n, node))
    }

    fn unused(&self, v: ValueId) -> bool {
        !self.is_output[v.0 as usize] && self.users[v.0 as usize].is_empty()
    }

    /// The chain ending at the einsum node `context`, if it is an attention.
    fn at(&self, context: NodeId) -> Option<Match> {
        let node = self.g.node(context);
        let Op::Einsum(e2) = &node.op else {
            return None;
        };
        if node.phase != Phase::Forward || node.inputs.len() != 2 {
            return None;
        }
        (0..2).find_map(|pi| self.match_probs(context, &e2.equation, pi))
    }

    /// The chain with the probabilities as operand `pi` of the context einsum.
    fn match_probs(&self, context: NodeId, eq2: &str, pi: usize) -> Option<Match> {
        let g = self.g;
        let cnode = g.node(context);
        let (probs, v) = (cnode.inputs[pi], cnode.inputs[1 - pi]);
        let mut removed = vec![];
        // optional inactive dropout
        let (mut n, mut node) = self.sole_producer(probs)?;
        if let Op::Dropout(d) = &node.op {
            if d.active() || node.outputs.get(1).is_some_and(|&m| !self.unused(m)) {
                return None;
            }
            removed.push(n);
            (n, node) = self.sole_producer(node.inputs[0])?;
        }
        let Op::Softmax(sm) = &node.op else {
            return None;
        };
        if sm.log {
            return None;
        }
        removed.push(n);
        let softmax_axis = sm.axis;
        let (mut n, mut node) = self.sole_producer(node.inputs[0])?;
        // optional causal mask add
        let mut mask = None;
        if let Op::Binary(b) = &node.op {
            if b.kind == crate::ops::binary::BinaryKind::Add {
                let is_mask = |x: ValueId| {
                    g.producer(x)
                        .and_then(|m| match &g.node(m).op {
                            Op::CausalMask(cm) => Some(cm.clone()),
                            _ => None,
                        })
                        .map(|cm| (x, cm))
                };
                let (other, cm) = match (is_mask(node.inputs[0]), is_mask(node.inputs[1])) {
                    (_, Some((_, cm))) => (node.inputs[0], cm),
                    (Some((_, cm)), None) => (node.inputs[1], cm),
                    (None, None) => return None,
                };
                if g.ty(node.outputs[0]) != g.ty(other) {
                    return None;
                }
                mask = Some(cm);
                removed.push(n);
                (n, node) = self.sole_producer(other)?;
            }
        }
        // optional scale by a one-element constant
        let mut scale = 1.0;
        if let Op::Binary(b) = &node.op {
            if b.kind != crate::ops::binary::BinaryKind::Mul {
                return None;
            }
            let konst = |x: ValueId| g.const_value(x).filter(|t| t.numel() == 1);
            let (other, c) = match (konst(node.inputs[0]), konst(node.inputs[1])) {
                (_, Some(c)) => (node.inputs[0], c),
                (Some(c), None) => (node.inputs[1], c),
                (None, None) => return None,
            };
            if g.ty(node.outputs[0]) != g.ty(other) {
                return None;
            }
            scale = c.data[0];
            removed.push(n);
            (n, node) = self.sole_producer(other)?;
        }
        let Op::Einsum(e1) = &node.op else {
            return None;
        };
        if node.inputs.len() != 2 {
            return None;
        }
        removed.push(n);
        let (q, k) = (node.inputs[0], node.inputs[1]);
        let (ins1, c) = labels(&e1.equation)?;
        let (ins2, o) = labels(eq2)?;
        let (a, b) = (&ins1[0], &ins1[1]);
        let r = a.len();
        if b.len() != r || c.len() != r {
            return None;
        }
        // q and k differ in one position (the sequence letters) and share one letter missing
        // from the scores (the head dim); every other letter is a batch axis kept in the scores
        let differ: Vec<usize> = (0..r).filter(|&p| a[p] != b[p]).collect();
        let [seq] = differ[..] else {
            return None;
        };
        let (l, s) = (a[seq], b[seq]);
        if b.contains(&l) || a.contains(&s) {
            return None;
        }
        let contracted: Vec<usize> = (0..r).filter(|&p| p != seq && !c.contains(&a[p])).collect();
        let [dim] = contracted[..] else {
            return None;
        };
        let role_of = |x: char| -> Option<Role> {
            if x == l {
                Some(Role::Query)
            } else if x == s {
                Some(Role::Key)
            } else {
                (0..r)
                    .find(|&p| p != seq && p != dim && a[p] == x)
                    .map(Role::Batch)
            }
        };
        let roles: Vec<Role> = c.iter().map(|&x| role_of(x)).collect::<Option<_>>()?;
        if c.iter().position(|&x| x == s) != Some(softmax_axis) {
            return None;
        }
        if let Some(cm) = &mask {
            let sizes = &g.ty(q).shape;
            let lk = g.ty(k).shape[seq];
            if c[r - 2] != l || c[r - 1] != s || cm.rows != sizes[seq] || cm.cols != lk {
                return None;
            }
            if cm.rows > cm.cols {
                return None;
            }
        }
        // the context einsum: probabilities in the scores' layout, v and out in q's
        let p = &ins2[pi];
        let vl = &ins2[1 - pi];
        if p.len() != r || vl.len() != r || o.len() != r {
            return None;
        }
        let letter = |role: Role| roles.iter().position(|&x| x == role).map(|i| p[i]);
        let e = vl[dim];
        if p.contains(&e) {
            return None;
        }
        for pos in 0..r {
            let (want_v, want_o) = if pos == seq {
                (letter(Role::Key)?, letter(Role::Query)?)
            } else if pos == dim {
                (e, e)
            } else {
                let x = letter(Role::Batch(pos))?;
                (x, x)
            };
            if vl[pos] != want_v || o[pos] != want_o {
                return None;
            }
        }
        let op = Attention {
            seq_axis: seq,
            dim_axis: dim,
            causal: mask.is_some(),
            scale,
        };
        // the fused node must type exactly as the einsum it replaces
        let tys = [g.ty(q), g.ty(k), g.ty(v)];
        let out = op.infer(&tys).ok()?;
        if &out[0] != g.ty(g.node(context).outputs[0]) {
            return None;
        }
        Some(Match {
            context,
            removed,
            inputs: [q, k, v],
            op,
        })
    }
}

/// Replaces every composed attention of `g` (see the module doc) by one [`Attention`] node.
/// Returns the new graph and, for each old value, its new id (`None`: removed with a fused
/// intermediate, an unread causal mask or scale constant). The result is verified.
pub fn fuse_attention(g: Graph) -> Result<(Graph, Vec<Option<ValueId>>), AnalyzerError> {
    let mut is_output = vec![false; g.values.len()];
    for &v in &g.outputs {
        is_output[v.0 as usize] = true;
    }
    let m = Matcher {
        g: &g,
        users: g.users(),
        is_output,
    };
    let matches: Vec<Match> = g.nodes.keys().filter_map(|n| m.at(n)).collect();
    if matches.is_empty() {
        let map = g.values.keys().map(Some).collect();
        return Ok((g, map));
    }
    let nn = g.nodes.len();
    let mut removed = vec![false; nn];
    let mut fused: Vec<Option<usize>> = vec![None; nn];
    for (i, mt) in matches.iter().enumerate() {
        for &r in &mt.removed {
            removed[r.0 as usize] = true;
        }
        fused[mt.context.0 as usize] = Some(i);
    }
    // causal masks and scale constants read only by removed nodes go too
    let only_removed = |v: ValueId| {
        !m.is_output[v.0 as usize]
            && !m.users[v.0 as usize].is_empty()
            && m.users[v.0 as usize].iter().all(|u| removed[u.0 as usize])
    };
    let mut drop_value = vec![false; g.values.len()];
    let mut dead_masks = vec![];
    for (n, node) in g.nodes.iter() {
        if !removed[n.0 as usize] {
            continue;
        }
        for &v in &node.inputs {
            let mask = g
                .producer(v)
                .filter(|&p| matches!(g.node(p).op, Op::CausalMask(_)));
            if (mask.is_some() || g.const_value(v).is_some()) && only_removed(v) {
                drop_value[v.0 as usize] = true;
                dead_masks.extend(mask);
            }
        }
    }
    for p in dead_masks {
        removed[p.0 as usize] = true;
    }
    for (n, node) in g.nodes.iter() {
        if removed[n.0 as usize] {
            node.outputs
                .iter()
                .for_each(|&v| drop_value[v.0 as usize] = true);
        }
    }
    // new ids: nodes in order without the removed ones; values likewise, then one log-sum-exp
    // per fused node
    let mut node_map: Vec<Option<NodeId>> = vec![None; nn];
    let mut next = 0u32;
    for (n, _) in g.nodes.iter() {
        if !removed[n.0 as usize] {
            node_map[n.0 as usize] = Some(NodeId(next));
            next += 1;
        }
    }
    let remap_node = |n: NodeId| node_map[n.0 as usize];
    let mut out = Graph::new();
    let mut map: Vec<Option<ValueId>> = vec![None; g.values.len()];
    for (v, d) in g.values.iter() {
        if drop_value[v.0 as usize] {
            continue;
        }
        let def = match &d.def {
            ValueDef::Node { node, index } => match remap_node(*node) {
                Some(node) => ValueDef::Node {
                    node,
                    index: *index,
                },
                None => {
                    return Err(AnalyzerError::Other(format!(
                        "attention fusion: {} is kept but its node {node} is removed",
                        g.value_label(v)
                    )))
                }
            },
            other => other.clone(),
        };
        map[v.0 as usize] = Some(out.values.push(ValueData { def, ..d.clone() }));
    }
    let val = |v: ValueId| -> Result<ValueId, AnalyzerError> {
        map[v.0 as usize].ok_or_else(|| {
            AnalyzerError::Other(format!(
                "attention fusion: {} is read but was removed",
                g.value_label(v)
            ))
        })
    };
    for (n, node) in g.nodes.iter() {
        let Some(new_id) = remap_node(n) else {
            continue;
        };
        let mut nd = node.clone();
        nd.outputs = node
            .outputs
            .iter()
            .map(|&v| val(v))
            .collect::<Result<_, _>>()?;
        nd.origin = node.origin.and_then(remap_node);
        if let Some(i) = fused[n.0 as usize] {
            let mt = &matches[i];
            let q = g.ty(mt.inputs[0]);
            let v = g.ty(mt.inputs[2]);
            let (_, lse_ty) = mt.op.output_types(q, v);
            let name = if node.name.is_empty() {
                String::new()
            } else {
                format!("{}:1", node.name)
            };
            let lse = out.values.push(ValueData {
                ty: lse_ty,
                name,
                def: ValueDef::Node {
                    node: new_id,
                    index: 1,
                },
            });
            nd.op = Op::Attention(mt.op.clone());
            nd.inputs = mt
                .inputs
                .iter()
                .map(|&v| val(v))
                .collect::<Result<_, _>>()?;
            nd.outputs.push(lse);
        } else {
            nd.inputs = node
                .inputs
                .iter()
                .map(|&v| val(v))
                .collect::<Result<_, _>>()?;
        }
        out.nodes.push(nd);
    }
    out.inputs = g.inputs.iter().map(|&v| val(v)).collect::<Result<_, _>>()?;
    out.outputs = g
        .outputs
        .iter()
        .map(|&v| val(v))
        .collect::<Result<_, _>>()?;
    crate::verify::verify(&out)?;
    Ok((out, map))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::text::{parse, print};
    use expect_test::{expect, Expect};

    /// The text form of `before` after fusion.
    fn check(before: &str, after: Expect) {
        let g = parse(before).unwrap();
        let (f, _) = fuse_attention(g).unwrap();
        after.assert_eq(&print(&f));
    }

    /// The composed [B, S, H, D] attention of the built-in models (causal, scaled).
    const BUILTIN: &str = r#"graph {
  input v0 "q": f32[1,4,2,3]
  input v1 "k": f32[1,4,2,3]
  input v2 "v": f32[1,4,2,3]
  const v3: f32[] = [0.5]
  n0 "causal_mask" = causal_mask() {"rows":4,"cols":4,"dtype":"f32"} -> v4 "causal_mask": f32[4,4]
  n1 "attn.scores" = einsum(v0, v1) {"equation":"bqhd,bkhd->bhqk"} -> v5 "attn.scores": f32[1,2,4,4]
  n2 "attn.scale" = binary(v5, v3) {"kind":"mul"} -> v6 "attn.scale": f32[1,2,4,4]
  n3 "attn.mask" = binary(v6, v4) {"kind":"add"} -> v7 "attn.mask": f32[1,2,4,4]
  n4 "attn.softmax" = softmax(v7) {"axis":3,"log":false} -> v8 "attn.softmax": f32[1,2,4,4]
  n5 "attn.context" = einsum(v8, v2) {"equation":"bhqk,bkhd->bqhd"} -> v9 "attn.context": f32[1,4,2,3]
  output v9
}
"#;

    #[test]
    fn fuses_the_builtin_pattern() {
        check(
            BUILTIN,
            expect![[r#"
                graph {
                  input v0 "q": f32[1,4,2,3]
                  input v1 "k": f32[1,4,2,3]
                  input v2 "v": f32[1,4,2,3]
                  n0 "attn.context" = attention(v0, v1, v2) {"causal":true,"dim_axis":3,"scale":0.5,"seq_axis":1} -> v3 "attn.context": f32[1,4,2,3], v4 "attn.context:1": f32[1,4,2]
                  output v3
                }
            "#]],
        );
    }

    #[test]
    fn fuses_the_torchscript_pattern_with_inactive_dropout() {
        // [B, H, S, D], no mask, a dropout of ratio 0, the scale constant on the left,
        // fewer queries than keys
        check(
            r#"graph {
  input v0 "q": f32[2,3,4,8]
  input v1 "k": f32[2,3,6,8]
  input v2 "v": f32[2,3,6,5]
  const v3: f32[] = [0.25]
  n0 = einsum(v0, v1) {"equation":"dhle,dhse->dhls"} -> v4: f32[2,3,4,6]
  n1 = binary(v3, v4) {"kind":"mul"} -> v5: f32[2,3,4,6]
  n2 = softmax(v5) {"axis":3,"log":false} -> v6: f32[2,3,4,6]
  n3 = dropout(v6) {"ratio":0.0,"training":true,"seed":3} -> v7: f32[2,3,4,6], v8: bool[2,3,4,6]
  n4 "sdpa" = einsum(v7, v2) {"equation":"dhls,dhsv->dhlv"} -> v9: f32[2,3,4,5]
  output v9
}
"#,
            expect![[r#"
                graph {
                  input v0 "q": f32[2,3,4,8]
                  input v1 "k": f32[2,3,6,8]
                  input v2 "v": f32[2,3,6,5]
                  n0 "sdpa" = attention(v0, v1, v2) {"causal":false,"dim_axis":3,"scale":0.25,"seq_axis":2} -> v3: f32[2,3,4,5], v4 "sdpa:1": f32[2,3,4]
                  output v3
                }
            "#]],
        );
    }

    #[test]
    fn leaves_chains_with_other_readers_or_unsupported_parts() {
        // each case edits the built-in pattern; fusion must leave the graph as it is
        let cases = [
            // the probabilities are a graph output too
            ("  output v9\n", "  output v9, v8\n"),
            // another node reads the scores
            (
                "  output v9\n",
                "  n6 = reduce(v5) {\"kind\":\"sum\",\"axes\":[3],\"keepdims\":false} -> v10: f32[1,2,4]\n  output v9, v10\n",
            ),
            // log-softmax
            ("\"log\":false", "\"log\":true"),
            // a mask that is not a CausalMask: a graph input
            (
                "  const v3: f32[] = [0.5]\n",
                "  const v3: f32[] = [0.5]\n  input v10 \"mask\": f32[4,4]\n",
            ),
            // an active dropout on the probabilities
            (
                "  n5 \"attn.context\" = einsum(v8, v2)",
                "  n5 = dropout(v8) {\"ratio\":0.1,\"training\":true,\"seed\":3} -> v10: f32[1,2,4,4], v11: bool[1,2,4,4]\n  n6 \"attn.context\" = einsum(v10, v2)",
            ),
            // the scale is not a constant
            ("  const v3: f32[] = [0.5]\n", "  input v3: f32[]\n"),
        ];
        for (i, (from, to)) in cases.iter().enumerate() {
            let mut text = BUILTIN.replacen(from, to, 1);
            if i == 3 {
                text = text.replace("binary(v6, v4)", "binary(v6, v10)");
            }
            let g = parse(&text).unwrap_or_else(|e| panic!("case {i}: {e}\n{text}"));
            let (f, _) = fuse_attention(g.clone()).unwrap();
            assert_eq!(print(&f), print(&g), "case {i} was fused");
        }
    }

    #[test]
    fn a_mask_shared_with_an_unfused_chain_stays() {
        // two layers read one causal mask; the second layer's probabilities are an output
        let text = BUILTIN.replace(
            "  output v9\n",
            r#"  n6 "b.scores" = einsum(v9, v1) {"equation":"bqhd,bkhd->bhqk"} -> v10: f32[1,2,4,4]
  n7 "b.mask" = binary(v10, v4) {"kind":"add"} -> v11: f32[1,2,4,4]
  n8 "b.softmax" = softmax(v11) {"axis":3,"log":false} -> v12: f32[1,2,4,4]
  n9 "b.context" = einsum(v12, v2) {"equation":"bhqk,bkhd->bqhd"} -> v13: f32[1,4,2,3]
  output v13, v12
"#,
        );
        let g = parse(&text).unwrap();
        let (f, map) = fuse_attention(g).unwrap();
        expect![[r#"
            graph {
              input v0 "q": f32[1,4,2,3]
              input v1 "k": f32[1,4,2,3]
              input v2 "v": f32[1,4,2,3]
              n0 "causal_mask" = causal_mask() {"cols":4,"dtype":"f32","rows":4} -> v3 "causal_mask": f32[4,4]
              n1 "attn.context" = attention(v0, v1, v2) {"causal":true,"dim_axis":3,"scale":0.5,"seq_axis":1} -> v4 "attn.context": f32[1,4,2,3], v9 "attn.context:1": f32[1,4,2]
              n2 "b.scores" = einsum(v4, v1) {"equation":"bqhd,bkhd->bhqk"} -> v5: f32[1,2,4,4]
              n3 "b.mask" = binary(v5, v3) {"kind":"add"} -> v6: f32[1,2,4,4]
              n4 "b.softmax" = softmax(v6) {"axis":3,"log":false} -> v7: f32[1,2,4,4]
              n5 "b.context" = einsum(v7, v2) {"equation":"bhqk,bkhd->bqhd"} -> v8: f32[1,4,2,3]
              output v8, v7
            }
        "#]]
        .assert_eq(&print(&f));
        // the scale constant and the first chain's intermediates are gone; the rest moved
        assert_eq!(map[3], None);
        assert_eq!(map[4], Some(ValueId(3)));
        assert_eq!(map[5..9], [None, None, None, None]);
        assert_eq!(map[9], Some(ValueId(4)));
        assert_eq!(map[13], Some(ValueId(8)));
    }

    #[test]
    fn fused_equals_composed_under_the_reference() {
        use crate::eval;
        use crate::tensor::Tensor;
        use std::collections::HashMap;
        let g = parse(BUILTIN).unwrap();
        let (f, map) = fuse_attention(g.clone()).unwrap();
        let feeds: HashMap<ValueId, Tensor> = (0..3)
            .map(|i| {
                (
                    ValueId(i),
                    Tensor::pseudo_random(&[1, 4, 2, 3], i as u64 + 1),
                )
            })
            .map(|(v, t)| (v, t.cast(crate::dtype::DType::F32)))
            .collect();
        let want = eval::run(&g, &feeds).unwrap()[9].clone().unwrap();
        let fed: HashMap<ValueId, Tensor> = feeds
            .iter()
            .map(|(v, t)| (map[v.0 as usize].unwrap(), t.clone()))
            .collect();
        let got = eval::run(&f, &fed).unwrap()[map[9].unwrap().0 as usize]
            .clone()
            .unwrap();
        assert!(got.max_rel_err(&want, 1e-6) < 1e-6);
    }
}
