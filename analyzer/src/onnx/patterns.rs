//! Exporter patterns rewritten into the IR the TorchScript importer produces for the same
//! PyTorch module.
//!
//! Why: PyTorch's ONNX exporters spell out ops that a TorchScript graph keeps whole (GELU as its
//! erf formula, RMSNorm's `rsqrt` as `1 / sqrt`, SiLU as `x * sigmoid(x)`, scaled dot-product
//! attention with a materialised `K^T`, scale factors on both operands, an additive mask and a
//! NaN guard). Every extra kernel is priced (its bytes, forward and backward), so the same model
//! planned from its `.onnx` came out 2.6 to 4.8 % slower than from its `.jit.pt`, and the
//! attention fusion (`crate::fuse`), which matches attention in the TorchScript importer's form
//! (`einsum(q, k) -> mul scale -> [mask] -> softmax -> einsum(p, v)`), would not see the ONNX
//! form at all. This pass brings the ONNX graph to that form.
//!
//! It runs once on the imported graph, after every node is lowered and before unread constants
//! are dropped. Each rule looks at one node, the last of its pattern (the *root*), and returns
//! replacement nodes whose last output takes the place of the root's output (same value, same
//! name), or an existing value that replaces it. A pattern's intermediate values must have no
//! reader outside it and must not be graph outputs, so nothing is computed twice; nodes a rule
//! only read (a shared transpose, a mask built once for every layer) are dropped when nothing
//! reads them any more. A replacement that does not infer to the root's type is not applied.
//! The rules run in order, each over the whole graph, so later ones see the earlier results.
//!
//! The rules and why each keeps the graph's meaning:
//! - **gelu**: `x * 0.5 * (1 + erf(x / sqrt 2))` (products in any order and association,
//!   `x / sqrt 2` or `x * (1 / sqrt 2)`) -> `unary gelu(x)`: the definition of exact GELU.
//! - **silu**: `x * sigmoid(x)` -> `unary silu(x)`: its definition.
//! - **rsqrt**: `1 / sqrt(x)` and `reciprocal(sqrt(x))` -> `unary rsqrt(x)`: its definition
//!   (RMSNorm as the exporters write it; TorchScript keeps `aten::rsqrt`).
//! - **einsum operands**: a matrix transpose (of the last two dims) feeding an einsum is folded
//!   into the operand's subscripts (an einsum of `x` permuted is the einsum of `x` with its
//!   labels permuted: the same sums of the same products), and so is `reshape -> transpose ->
//!   reshape` when the reshapes only merge and split leading dims the transpose keeps in place
//!   (the dynamo exporter's `K^T` over `[b*h, s, d]`; when the split differs from the merge,
//!   as after a grouped-query head repeat, one reshape to the split dims stays, the
//!   TorchScript graph's reshape). These are the transposes the exporters add: SDPA's `K^T`,
//!   a tied weight's `W^T` where TorchScript's `linear` reads `W` as is. Other permutations
//!   (attention's head transposes) are the model's own and stay, as in the TorchScript graph;
//!   where the TorchScript-based exporter merged one with `K^T` (`[0,2,3,1]`), the key keeps
//!   the head transpose (`[0,2,1,3]`) and only the swap folds. When the einsum computes attention scores (its
//!   result reaches a softmax through masks and scalings), scalar factors on its operands
//!   (`q * sqrt(scale)`, `k^T * sqrt(scale)`, as both exporters write SDPA's scale) move behind
//!   it as one multiply by their product, `(a q)(b k)^T = ab (q k^T)`: equal in real arithmetic,
//!   the rounding differs in the last bits (TorchScript's SDPA scales the scores the same way).
//! - **additive mask**: `s + where(m, 0, f)` read only by a softmax -> `where(m, s, f)`, for a
//!   fill `f` of -inf (the TorchScript-based exporter) or the dtype's lowest finite value (the
//!   dynamo exporter's `finfo.min`): `s + 0 = s`, and `s + f` is `f` for every finite `s`
//!   when `f` is -inf, and rounds to `f` in f32 / bf16 / f64 for every `|s|` below 2^103
//!   (f16, where it would not, is left alone). Equal for every finite score.
//! - **NaN guard**: `where(isnan(p), 0, p)` after `p = softmax(x)` (PyTorch's "safe softmax"
//!   inside SDPA: a row masked entirely with -inf is NaN, the guard makes it zeros) is dropped
//!   only when no row of `x` can be entirely -inf for finite inputs, so that `p` has no NaN
//!   and the guard returns `p` unchanged: `x` is finite (scores, scaled by finite constants,
//!   masked with a finite fill such as `finfo.min` or a `causal_mask`), or
//!   `where(m, s, -inf)` with finite scores `s` and a constant `m` that keeps an entry of every
//!   row. A -inf mask computed from run-time inputs (a padding mask from `attention_mask`) can
//!   mask a whole row, so there the guard stays.
//! - **attention letters**: the score and output einsums of attention get the TorchScript
//!   importer's subscripts (`..le,..se->..ls`, `..ls,..sv->..lv`); letters are names only.
//!
//! Left as exported, because the TorchScript graph has the same ops: formulas a model writes
//! in Python (GPT-2's tanh GELU, Hugging Face's RMSNorm up to its `rsqrt`, rotary embeddings),
//! and the head transposes around attention.

use super::compact::renumber_values;
use crate::dtype::{DType, TensorType};
use crate::graph::{Graph, NodeData, NodeId, ValueData, ValueDef, ValueId};
use crate::ops::binary::BinaryKind;
use crate::ops::unary::UnaryKind;
use crate::ops::{Binary, Einsum, Op, Unary, Where};
use crate::tensor::Tensor;
use std::collections::HashMap;
use std::sync::Arc;

/// Rewrites every exporter pattern the rules know; returns the graph and where each old value
/// went (`None`: it belonged to a pattern that was replaced).
pub fn normalize(g: Graph) -> (Graph, Vec<Option<ValueId>>) {
    let mut g = g;
    let mut map: Vec<Option<ValueId>> = g.values.iter().map(|(v, _)| Some(v)).collect();
    for &(_, rule) in RULES {
        let (next, m) = apply(g, rule);
        for slot in map.iter_mut() {
            *slot = slot.and_then(|v| m.get(v.0 as usize).copied().flatten());
        }
        g = next;
    }
    (g, map)
}

/// One rule: the rewrite of the pattern ending at a node, if it matches there.
type Rule = fn(&Ctx<'_>, NodeId) -> Option<Rewrite>;

/// The rules, in the order they run (see the module doc).
const RULES: &[(&str, Rule)] = &[
    ("gelu", gelu),
    ("silu", silu),
    ("rsqrt", rsqrt),
    ("einsum operands", einsum_operands),
    ("additive mask", additive_mask),
    ("NaN guard", nan_guard),
    ("attention letters", attention_letters),
];

/// An input of a replacement node.
#[derive(Clone, Debug)]
enum Arg {
    /// A value of the graph being rewritten.
    Old(ValueId),
    /// The output of an earlier node of the same replacement.
    New(usize),
    /// A new constant.
    Const(Tensor),
}

#[derive(Clone, Debug)]
struct NewNode {
    op: Op,
    args: Vec<Arg>,
}

/// What replaces a matched pattern.
#[derive(Clone, Debug, Default)]
struct Rewrite {
    /// Replacement nodes in order; the last one's output takes over the root's output value.
    nodes: Vec<NewNode>,
    /// Instead of nodes: the existing value that replaces the root's output.
    alias: Option<ValueId>,
    /// Nodes of the pattern besides the root that only the pattern reads: removed with it.
    removed: Vec<NodeId>,
    /// Nodes the pattern reads that may have other readers: removed once nothing reads them.
    maybe_dead: Vec<NodeId>,
}

impl Rewrite {
    fn unary(kind: UnaryKind, x: ValueId, removed: Vec<NodeId>) -> Rewrite {
        Rewrite {
            nodes: vec![NewNode {
                op: Unary { kind }.into(),
                args: vec![Arg::Old(x)],
            }],
            removed,
            ..Rewrite::default()
        }
    }

    /// The types of the replacement's outputs, if every node infers and the last one (or the
    /// alias) has the root's type.
    fn types(&self, g: &Graph, root: NodeId) -> Option<Vec<TensorType>> {
        let [out] = g.node(root).outputs.as_slice() else {
            return None;
        };
        let want = g.ty(*out);
        if let Some(a) = self.alias {
            return (g.ty(a) == want).then(Vec::new);
        }
        let mut tys: Vec<TensorType> = vec![];
        for n in &self.nodes {
            let ins: Vec<TensorType> = n
                .args
                .iter()
                .map(|a| match a {
                    Arg::Old(v) => Some(g.ty(*v).clone()),
                    Arg::New(i) => tys.get(*i).cloned(),
                    Arg::Const(t) => Some(t.ty()),
                })
                .collect::<Option<_>>()?;
            let refs: Vec<&TensorType> = ins.iter().collect();
            let outs = n.op.spec().infer(&refs).ok()?;
            let [ty] = outs.as_slice() else {
                return None;
            };
            tys.push(ty.clone());
        }
        (tys.last() == Some(want)).then_some(tys)
    }
}

/// What the rules read of the graph.
struct Ctx<'g> {
    g: &'g Graph,
    /// For each value, the nodes that read it.
    users: Vec<Vec<NodeId>>,
    is_output: Vec<bool>,
}

impl<'g> Ctx<'g> {
    fn new(g: &'g Graph) -> Self {
        let mut is_output = vec![false; g.values.len()];
        for &v in &g.outputs {
            is_output[v.0 as usize] = true;
        }
        Ctx {
            g,
            users: g.users(),
            is_output,
        }
    }
    /// The node computing `v` and its data.
    fn producer(&self, v: ValueId) -> Option<(NodeId, &'g NodeData)> {
        self.g.producer(v).map(|n| (n, self.g.node(n)))
    }
    /// Whether `v` is read by `reader` alone and is not a graph output.
    fn only_read_by(&self, v: ValueId, reader: NodeId) -> bool {
        !self.is_output[v.0 as usize] && self.users[v.0 as usize] == [reader]
    }
    /// The one reader of `v`, if it has exactly one and is not a graph output.
    fn sole_reader(&self, v: ValueId) -> Option<(NodeId, &'g NodeData)> {
        match self.users[v.0 as usize].as_slice() {
            [n] if !self.is_output[v.0 as usize] => Some((*n, self.g.node(*n))),
            _ => None,
        }
    }
    /// The value of a one-element float constant.
    fn scalar(&self, v: ValueId) -> Option<f64> {
        let t = self.g.const_value(v)?;
        (t.dtype.is_float() && t.numel() == 1).then(|| t.data[0])
    }
    /// `v = a <kind> b`: the node and its two inputs.
    fn binary(&self, v: ValueId, kind: BinaryKind) -> Option<(NodeId, ValueId, ValueId)> {
        let (n, d) = self.producer(v)?;
        match (&d.op, d.inputs.as_slice()) {
            (Op::Binary(b), &[x, y]) if b.kind == kind => Some((n, x, y)),
            _ => None,
        }
    }
    /// `v = <kind>(x)`: the node and its input.
    fn unary(&self, v: ValueId, kind: UnaryKind) -> Option<(NodeId, ValueId)> {
        let (n, d) = self.producer(v)?;
        match (&d.op, d.inputs.as_slice()) {
            (Op::Unary(u), &[x]) if u.kind == kind => Some((n, x)),
            _ => None,
        }
    }
    /// Whether `v` is attention scores: it flows into a softmax over its last axis through
    /// single-reader scalings, additions and selections, and the probabilities (through a NaN
    /// guard or dropout) are the first operand of an einsum.
    fn is_scores(&self, mut v: ValueId) -> bool {
        for _ in 0..4 {
            let Some((_, d)) = self.sole_reader(v) else {
                return false;
            };
            let [out] = d.outputs.as_slice() else {
                return false;
            };
            match &d.op {
                Op::Softmax(s) => {
                    return !s.log && s.axis + 1 == self.g.ty(v).rank() && self.weighs_values(*out)
                }
                Op::Binary(b) if matches!(b.kind, BinaryKind::Mul | BinaryKind::Add) => {}
                Op::Where(_) => {}
                _ => return false,
            }
            v = *out;
        }
        false
    }

    /// Whether the probabilities `p` are, through a NaN guard or dropout, the first operand of
    /// an einsum (attention's `p . v`).
    fn weighs_values(&self, p: ValueId) -> bool {
        let mut p = p;
        for _ in 0..3 {
            let readers = &self.users[p.0 as usize];
            // a NaN guard reads p twice: isnan(p) and where(isnan(p), 0, p)
            let guard = readers.iter().find_map(|&n| {
                let d = self.g.node(n);
                match (&d.op, d.inputs.as_slice(), d.outputs.as_slice()) {
                    (Op::Where(_), &[c, _, y], &[out])
                        if y == p && self.unary(c, UnaryKind::IsNan).is_some() =>
                    {
                        Some(out)
                    }
                    _ => None,
                }
            });
            if let Some(out) = guard.filter(|_| readers.len() == 2) {
                p = out;
                continue;
            }
            let Some((_, d)) = self.sole_reader(p) else {
                return false;
            };
            match (&d.op, d.inputs.first(), d.outputs.first()) {
                (Op::Einsum(_), Some(&first), _) => return first == p && d.inputs.len() == 2,
                (Op::Dropout(_), _, Some(&out)) => p = out,
                _ => return false,
            }
        }
        false
    }
}

/// Relative closeness of a constant to the number a formula has (f32 rounding passes).
fn close(x: f64, want: f64) -> bool {
    (x - want).abs() <= 1e-6 * want.abs()
}

fn gelu(cx: &Ctx<'_>, root: NodeId) -> Option<Rewrite> {
    let d = cx.g.node(root);
    let (Op::Binary(b), &[p, q]) = (&d.op, d.inputs.as_slice()) else {
        return None;
    };
    if b.kind != BinaryKind::Mul {
        return None;
    }
    // the three factors, each with the node that multiplies it in
    for (inner, other) in [(p, q), (q, p)] {
        let Some((m, a, c)) = cx.binary(inner, BinaryKind::Mul) else {
            continue;
        };
        if !cx.only_read_by(inner, root) {
            continue;
        }
        let factors = [(a, m), (c, m), (other, root)];
        for half in 0..3 {
            for one_plus in 0..3 {
                if half == one_plus || !cx.scalar(factors[half].0).is_some_and(|h| close(h, 0.5)) {
                    continue;
                }
                let (x, _) = factors[3 - half - one_plus];
                let (opv, reader) = factors[one_plus];
                if let Some(mut removed) = one_plus_erf(cx, opv, reader, x) {
                    removed.push(m);
                    return Some(Rewrite::unary(UnaryKind::Gelu, x, removed));
                }
            }
        }
    }
    None
}

/// If `v = 1 + erf(x / sqrt 2)` (read only by `reader`), the nodes computing it.
fn one_plus_erf(cx: &Ctx<'_>, v: ValueId, reader: NodeId, x: ValueId) -> Option<Vec<NodeId>> {
    if !cx.only_read_by(v, reader) {
        return None;
    }
    let (add, a, b) = cx.binary(v, BinaryKind::Add)?;
    let e = [(a, b), (b, a)]
        .into_iter()
        .find(|&(_, one)| cx.scalar(one).is_some_and(|c| close(c, 1.0)))?
        .0;
    let (erf, t) = cx.unary(e, UnaryKind::Erf)?;
    if !cx.only_read_by(e, add) || !cx.only_read_by(t, erf) {
        return None;
    }
    let scaled = if let Some((div, y, c)) = cx.binary(t, BinaryKind::Div) {
        (y == x
            && cx
                .scalar(c)
                .is_some_and(|c| close(c, std::f64::consts::SQRT_2)))
        .then_some(div)
    } else if let Some((mul, y, z)) = cx.binary(t, BinaryKind::Mul) {
        let inv = std::f64::consts::FRAC_1_SQRT_2;
        let ok = (y == x && cx.scalar(z).is_some_and(|c| close(c, inv)))
            || (z == x && cx.scalar(y).is_some_and(|c| close(c, inv)));
        ok.then_some(mul)
    } else {
        None
    }?;
    Some(vec![add, erf, scaled])
}

fn silu(cx: &Ctx<'_>, root: NodeId) -> Option<Rewrite> {
    let d = cx.g.node(root);
    let (Op::Binary(b), &[p, q]) = (&d.op, d.inputs.as_slice()) else {
        return None;
    };
    if b.kind != BinaryKind::Mul {
        return None;
    }
    [(p, q), (q, p)].into_iter().find_map(|(s, x)| {
        let (sig, y) = cx.unary(s, UnaryKind::Sigmoid)?;
        (y == x && cx.only_read_by(s, root)).then(|| Rewrite::unary(UnaryKind::Silu, x, vec![sig]))
    })
}

fn rsqrt(cx: &Ctx<'_>, root: NodeId) -> Option<Rewrite> {
    let d = cx.g.node(root);
    let s = match (&d.op, d.inputs.as_slice()) {
        (Op::Binary(b), &[one, s])
            if b.kind == BinaryKind::Div && cx.scalar(one).is_some_and(|c| c == 1.0) =>
        {
            s
        }
        (Op::Unary(u), &[s]) if u.kind == UnaryKind::Reciprocal => s,
        _ => return None,
    };
    let (sqrt, x) = cx.unary(s, UnaryKind::Sqrt)?;
    cx.only_read_by(s, root)
        .then(|| Rewrite::unary(UnaryKind::Rsqrt, x, vec![sqrt]))
}

/// A parsed einsum equation: operand labels and output labels.
fn parse_equation(eq: &str) -> Option<(Vec<Vec<char>>, Vec<char>)> {
    let (lhs, rhs) = eq.split_once("->")?;
    let ins = lhs.split(',').map(|s| s.trim().chars().collect()).collect();
    Some((ins, rhs.trim().chars().collect()))
}

fn join_equation(ins: &[Vec<char>], out: &[char]) -> String {
    let ins: Vec<String> = ins.iter().map(|l| l.iter().collect()).collect();
    format!("{}->{}", ins.join(","), out.iter().collect::<String>())
}

/// `v` as a permutation of `x` (possibly reshaped first): `v = transpose(reshape?(x), perm)`.
struct Permuted {
    x: ValueId,
    /// `v.dim[i] = w.dim[perm[i]]` for `w = reshape?(x)`.
    perm: Vec<usize>,
    /// The shape `x` is reshaped to first, if it is.
    reshape: Option<Vec<usize>>,
    /// The nodes from `v` back to `x`.
    nodes: Vec<NodeId>,
}

/// `v` as a permutation of an earlier value: `v = transpose(x)`, or
/// `reshape(transpose(reshape(x)))` where the first reshape merges leading dims into one, the
/// transpose keeps that dim first, and the last reshape splits it again (into the same dims,
/// or others of the same product: then `x` is reshaped to those first; the dynamo exporter's
/// `K^T` over `[b*h, s, d]`).
fn as_permuted(cx: &Ctx<'_>, v: ValueId) -> Option<Permuted> {
    let (n, d) = cx.producer(v)?;
    match (&d.op, d.inputs.as_slice()) {
        (Op::Transpose(t), &[x]) => Some(Permuted {
            x,
            perm: t.perm.clone(),
            reshape: None,
            nodes: vec![n],
        }),
        (Op::Reshape(_), &[y2]) => {
            let (t_node, t_data) = cx.producer(y2)?;
            let (Op::Transpose(t), &[y1]) = (&t_data.op, t_data.inputs.as_slice()) else {
                return None;
            };
            let (r1, r1_data) = cx.producer(y1)?;
            let (Op::Reshape(_), &[x]) = (&r1_data.op, r1_data.inputs.as_slice()) else {
                return None;
            };
            let s = &cx.g.ty(x).shape;
            let s1 = &cx.g.ty(y1).shape;
            let sv = &cx.g.ty(v).shape;
            let tail = s1.get(1..)?;
            if t.perm.len() != s1.len() || t.perm.first() != Some(&0) || tail.len() >= s.len() {
                return None;
            }
            let lead = s.len() - tail.len();
            let merged = s1[0];
            let nd = sv.len().checked_sub(tail.len()).filter(|&nd| nd >= 1)?;
            let dims = &sv[..nd];
            if s[lead..] != *tail
                || s[..lead].iter().product::<usize>() != merged
                || dims.iter().product::<usize>() != merged
            {
                return None;
            }
            let perm: Vec<usize> = (0..nd)
                .chain(t.perm[1..].iter().map(|&p| p + nd - 1))
                .collect();
            let shape: Vec<usize> = dims.iter().chain(tail).copied().collect();
            let want: Vec<usize> = perm
                .iter()
                .map(|&p| shape.get(p).copied())
                .collect::<Option<_>>()?;
            (*sv == want).then(|| Permuted {
                x,
                perm,
                reshape: (dims != &s[..lead]).then_some(shape),
                nodes: vec![n, t_node, r1],
            })
        }
        _ => None,
    }
}

/// Whether each node of `nodes` (a chain from a value back to its source) is read only by the
/// one before it.
fn chain_owned(cx: &Ctx<'_>, nodes: &[NodeId]) -> bool {
    nodes.iter().skip(1).zip(nodes).all(|(&inner, &outer)| {
        cx.g.node(inner)
            .outputs
            .iter()
            .all(|&o| cx.only_read_by(o, outer))
    })
}

fn einsum_operands(cx: &Ctx<'_>, root: NodeId) -> Option<Rewrite> {
    let d = cx.g.node(root);
    let Op::Einsum(e) = &d.op else {
        return None;
    };
    let (mut ins, out) = parse_equation(&e.equation)?;
    if ins.len() != d.inputs.len() {
        return None;
    }
    let [y] = d.outputs.as_slice() else {
        return None;
    };
    let scores = d.inputs.len() == 2 && cx.is_scores(*y);
    let mut args: Vec<Arg> = vec![];
    let mut pre: Vec<NewNode> = vec![];
    let mut scale = 1.0;
    let mut rw = Rewrite::default();
    let mut changed = false;
    for (i, labels) in ins.iter_mut().enumerate() {
        let mut v = d.inputs[i];
        let mut arg = None;
        // while every value passed so far is read only by the next node towards the root,
        // the nodes passed are the pattern's own (removed); after that they may be shared
        let mut reader = Some(root);
        loop {
            let own = reader.is_some_and(|r| cx.only_read_by(v, r));
            if let Some(f) = as_permuted(cx, v) {
                let r = f.perm.len();
                // `v = swap(u)` with `u = transpose(reshape?(x), rest)`: `rest` is the
                // permutation left once the swap of the last two dims folds into the labels
                let mut rest = f.perm.clone();
                if r >= 2 {
                    rest.swap(r - 2, r - 1);
                }
                let identity = rest.iter().enumerate().all(|(k, &p)| p == k);
                // the key of attention scores as `k^T` ([.., e, s]: its last label is the
                // output's, the one before contracted), by any permutation of the key
                let key_t = scores
                    && r >= 2
                    && out.contains(&labels[r - 1])
                    && !out.contains(&labels[r - 2]);
                let shared = !own || !chain_owned(cx, &f.nodes);
                // new nodes pay off only where the old ones go
                let needs_nodes = !identity || f.reshape.is_some();
                if r >= 2 && (identity || key_t) && !(shared && needs_nodes) {
                    labels.swap(r - 2, r - 1);
                    reader = if shared {
                        None
                    } else {
                        f.nodes.last().copied()
                    };
                    if shared {
                        rw.maybe_dead.extend(&f.nodes);
                    } else {
                        rw.removed.extend(&f.nodes);
                    }
                    changed = true;
                    let mut base = Arg::Old(f.x);
                    if let Some(shape) = f.reshape {
                        pre.push(NewNode {
                            op: crate::ops::Reshape { shape }.into(),
                            args: vec![base],
                        });
                        base = Arg::New(pre.len() - 1);
                    }
                    if !identity {
                        pre.push(NewNode {
                            op: crate::ops::Transpose { perm: rest }.into(),
                            args: vec![base],
                        });
                        base = Arg::New(pre.len() - 1);
                    }
                    if let Arg::Old(x) = base {
                        v = x;
                        continue;
                    }
                    // a new node is in between: the chain ends here
                    arg = Some(base);
                    break;
                }
            }
            if scores && own {
                if let Some((mul, a, b)) = cx.binary(v, BinaryKind::Mul) {
                    let split = [(a, b), (b, a)].into_iter().find_map(|(x, c)| {
                        let k = cx.scalar(c)?;
                        (k.is_finite() && cx.g.ty(x) == cx.g.ty(v)).then_some((x, k))
                    });
                    if let Some((x, k)) = split {
                        scale *= k;
                        rw.removed.push(mul);
                        reader = Some(mul);
                        v = x;
                        changed = true;
                        continue;
                    }
                }
            }
            break;
        }
        args.push(arg.unwrap_or(Arg::Old(v)));
    }
    if !changed {
        return None;
    }
    let dtype = cx.g.ty(*y).dtype;
    let einsum = pre.len();
    rw.nodes = pre;
    rw.nodes.push(NewNode {
        op: Einsum::new(join_equation(&ins, &out)).into(),
        args,
    });
    if scale != 1.0 {
        rw.nodes.push(NewNode {
            op: Binary {
                kind: BinaryKind::Mul,
            }
            .into(),
            args: vec![Arg::New(einsum), Arg::Const(Tensor::scalar(dtype, scale))],
        });
    }
    Some(rw)
}

/// Whether `fill` is a mask value for which `s + fill` rounds to `fill` in `dtype` for every
/// score `s` of sensible size: -inf, or the lowest finite value (`torch.finfo(dtype).min`, as
/// the dynamo exporter's SDPA masks) where floats near it are 2^104 (f32), 2^120 (bf16) or
/// 2^971 (f64) apart, so any `|s|` below half that rounds away. Not f16 (32 apart).
fn is_mask_fill(fill: f64, dtype: DType) -> bool {
    fill == f64::NEG_INFINITY
        || (matches!(dtype, DType::F32 | DType::BF16 | DType::F64)
            && Some(fill) == crate::ops::causal_mask::lowest_finite(dtype))
}

fn additive_mask(cx: &Ctx<'_>, root: NodeId) -> Option<Rewrite> {
    let d = cx.g.node(root);
    let (Op::Binary(b), &[p, q], [out]) = (&d.op, d.inputs.as_slice(), d.outputs.as_slice()) else {
        return None;
    };
    if b.kind != BinaryKind::Add
        || cx.is_output[out.0 as usize]
        || cx.users[out.0 as usize].is_empty()
        || !cx.users[out.0 as usize]
            .iter()
            .all(|&n| matches!(&cx.g.node(n).op, Op::Softmax(s) if !s.log))
    {
        return None;
    }
    let dtype = cx.g.ty(*out).dtype;
    [(p, q), (q, p)].into_iter().find_map(|(s, w)| {
        let (wn, wd) = cx.producer(w)?;
        let (Op::Where(_), &[m, x, y]) = (&wd.op, wd.inputs.as_slice()) else {
            return None;
        };
        let args = match (cx.scalar(x)?, cx.scalar(y)?) {
            (z, fill) if z == 0.0 && is_mask_fill(fill, dtype) => [m, s, y],
            (fill, z) if z == 0.0 && is_mask_fill(fill, dtype) => [m, x, s],
            _ => return None,
        };
        Some(Rewrite {
            nodes: vec![NewNode {
                op: Where {}.into(),
                args: args.iter().map(|&v| Arg::Old(v)).collect(),
            }],
            maybe_dead: vec![wn],
            ..Rewrite::default()
        })
    })
}

fn nan_guard(cx: &Ctx<'_>, root: NodeId) -> Option<Rewrite> {
    let d = cx.g.node(root);
    let (Op::Where(_), &[c, z, p], [out]) = (&d.op, d.inputs.as_slice(), d.outputs.as_slice())
    else {
        return None;
    };
    if cx.is_output[out.0 as usize] || cx.scalar(z) != Some(0.0) {
        return None;
    }
    let (isnan, p2) = cx.unary(c, UnaryKind::IsNan)?;
    if p2 != p || !cx.only_read_by(c, root) {
        return None;
    }
    let (_, sd) = cx.producer(p)?;
    let (Op::Softmax(s), &[x]) = (&sd.op, sd.inputs.as_slice()) else {
        return None;
    };
    (!s.log && no_masked_row(cx, x, s.axis)).then(|| Rewrite {
        alias: Some(p),
        removed: vec![isnan],
        ..Rewrite::default()
    })
}

/// Whether every row (along `axis`) of `x` has an entry that is not -inf for finite inputs:
/// `x` is finite, or `where(m, s, -inf)` (either order) with finite `s` and a constant `m`
/// that keeps an entry of every row.
fn no_masked_row(cx: &Ctx<'_>, x: ValueId, axis: usize) -> bool {
    if finite(cx, x, 4) {
        return true;
    }
    let Some((_, d)) = cx.producer(x) else {
        return false;
    };
    let (Op::Where(_), &[m, a, b]) = (&d.op, d.inputs.as_slice()) else {
        return false;
    };
    let (keep_when, s) = match (cx.scalar(a), cx.scalar(b)) {
        (_, Some(f64::NEG_INFINITY)) => (true, a),
        (Some(f64::NEG_INFINITY), _) => (false, b),
        _ => return false,
    };
    let Some(mask) = cx.g.const_value(m) else {
        return false;
    };
    finite(cx, s, 4) && every_row_has(mask, keep_when, axis, cx.g.ty(x).rank())
}

/// Whether `v` is finite whenever the model's inputs are, as far as `depth` steps back show:
/// a constant of finite values, attention scores (an einsum of activations), a `causal_mask`
/// (its masked entries are the lowest finite value), and sums, products and selections of
/// those. Overflow of the scores themselves is left out (it would reach the TorchScript
/// graph's scores too).
fn finite(cx: &Ctx<'_>, v: ValueId, depth: usize) -> bool {
    if let Some(t) = cx.g.const_value(v) {
        return t.data.iter().all(|x| x.is_finite());
    }
    let Some((_, d)) = cx.producer(v) else {
        return false;
    };
    let up = |x: ValueId| depth > 0 && finite(cx, x, depth - 1);
    match (&d.op, d.inputs.as_slice()) {
        (Op::Einsum(_), _) | (Op::CausalMask(_), _) => true,
        (Op::Binary(b), &[x, y]) => {
            matches!(b.kind, BinaryKind::Mul | BinaryKind::Add) && up(x) && up(y)
        }
        (Op::Where(_), &[_, x, y]) => up(x) && up(y),
        _ => false,
    }
}

/// Whether the bool `mask`, broadcast to rank `rank`, has an entry equal to `want` in every
/// row along `axis`.
fn every_row_has(mask: &Tensor, want: bool, axis: usize, rank: usize) -> bool {
    if mask.dtype != DType::Bool || mask.rank() > rank || axis >= rank {
        return false;
    }
    let hit = |x: f64| (x != 0.0) == want;
    // the mask's own axis under `axis`, if it has one of size > 1
    let Some(ma) = (axis + mask.rank())
        .checked_sub(rank)
        .filter(|&a| mask.shape[a] > 1)
    else {
        // each row sees one mask entry, repeated
        return mask.data.iter().all(|&x| hit(x));
    };
    let len = mask.shape[ma];
    let inner: usize = mask.shape[ma + 1..].iter().product();
    let outer: usize = mask.shape[..ma].iter().product();
    (0..outer)
        .all(|o| (0..inner).all(|i| (0..len).any(|k| hit(mask.data[(o * len + k) * inner + i]))))
}

/// The TorchScript importer's batch letters for attention of rank `r` (`sdpa` in its nn ops).
fn sdpa_batch(r: usize) -> String {
    "abcdh".chars().skip(5 - (r - 2)).collect()
}

fn attention_letters(cx: &Ctx<'_>, root: NodeId) -> Option<Rewrite> {
    let d = cx.g.node(root);
    let (Op::Einsum(e), &[a, b], &[y]) = (&d.op, d.inputs.as_slice(), d.outputs.as_slice()) else {
        return None;
    };
    let (ins, out) = parse_equation(&e.equation)?;
    let [la, lb] = ins.as_slice() else {
        return None;
    };
    let r = la.len();
    if !(2..=6).contains(&r) || lb.len() != r || out.len() != r {
        return None;
    }
    // the equation inferred, so labels are distinct within each operand and the output
    if la[..r - 2] != lb[..r - 2] || la[..r - 2] != out[..r - 2] {
        return None;
    }
    let (l, x1) = (la[r - 2], la[r - 1]);
    let (y0, y1) = (lb[r - 2], lb[r - 1]);
    let (o0, o1) = (out[r - 2], out[r - 1]);
    let batch = sdpa_batch(r);
    let eq = if x1 == y1 && o0 == l && o1 == y0 && l != y0 && l != x1 && cx.is_scores(y) {
        // scores: q [.., l, e] . k [.., s, e] -> [.., l, s]
        format!("{batch}le,{batch}se->{batch}ls")
    } else if x1 == y0 && o0 == l && o1 == y1 && l != y1 && x1 != y1 && from_softmax(cx, a) {
        // output: p [.., l, s] . v [.., s, v] -> [.., l, v]
        format!("{batch}ls,{batch}sv->{batch}lv")
    } else {
        return None;
    };
    (eq != e.equation).then(|| Rewrite {
        nodes: vec![NewNode {
            op: Einsum::new(eq).into(),
            args: vec![Arg::Old(a), Arg::Old(b)],
        }],
        ..Rewrite::default()
    })
}

/// Whether `v` is a softmax over its last axis, possibly through dropout or a NaN guard.
fn from_softmax(cx: &Ctx<'_>, v: ValueId) -> bool {
    let Some((_, d)) = cx.producer(v) else {
        return false;
    };
    match (&d.op, d.inputs.as_slice()) {
        (Op::Softmax(s), _) => !s.log && s.axis + 1 == cx.g.ty(v).rank(),
        (Op::Dropout(_), &[p, ..]) => from_softmax(cx, p),
        (Op::Where(_), &[c, _, p]) => {
            cx.unary(c, UnaryKind::IsNan).is_some() && from_softmax(cx, p)
        }
        _ => false,
    }
}

/// Runs one rule over the graph and rebuilds it with the rewrites it found.
fn apply(g: Graph, rule: Rule) -> (Graph, Vec<Option<ValueId>>) {
    let identity = |g: &Graph| g.values.iter().map(|(v, _)| Some(v)).collect::<Vec<_>>();
    let found = {
        let cx = Ctx::new(&g);
        let mut taken = vec![false; g.nodes.len()];
        let mut found: HashMap<NodeId, (Rewrite, Vec<TensorType>)> = HashMap::new();
        for (n, _) in g.nodes.iter() {
            if taken[n.0 as usize] {
                continue;
            }
            let Some(rw) = rule(&cx, n) else {
                continue;
            };
            let mine = || rw.removed.iter().chain(std::iter::once(&n));
            if mine().any(|m| taken[m.0 as usize]) {
                continue;
            }
            let Some(tys) = rw.types(&g, n) else {
                continue;
            };
            for m in mine() {
                taken[m.0 as usize] = true;
            }
            found.insert(n, (rw, tys));
        }
        found
    };
    if found.is_empty() {
        let map = identity(&g);
        return (g, map);
    }
    let mut removed = vec![false; g.nodes.len()];
    let mut maybe_dead: Vec<NodeId> = vec![];
    for (rw, _) in found.values() {
        for m in &rw.removed {
            removed[m.0 as usize] = true;
        }
        maybe_dead.extend(&rw.maybe_dead);
    }
    let old_values = g.values.len();
    let Graph {
        mut values,
        nodes: old_nodes,
        inputs,
        outputs,
    } = g;
    // uses of a value replaced by an alias read the alias instead
    let mut subst: HashMap<ValueId, ValueId> = HashMap::new();
    let sub = |s: &HashMap<ValueId, ValueId>, v: ValueId| s.get(&v).copied().unwrap_or(v);
    // new values, by the root output they are numbered before
    let mut before: HashMap<ValueId, Vec<ValueId>> = HashMap::new();
    // (old id for copied nodes, node)
    let mut nodes: Vec<(Option<NodeId>, NodeData)> = Vec::with_capacity(old_nodes.len());
    for (n, node) in old_nodes.iter() {
        if removed[n.0 as usize] {
            continue;
        }
        let Some((rw, tys)) = found.get(&n) else {
            let mut node = node.clone();
            node.inputs.iter_mut().for_each(|v| *v = sub(&subst, *v));
            nodes.push((Some(n), node));
            continue;
        };
        let root_out = node.outputs[0];
        if let Some(a) = rw.alias {
            subst.insert(root_out, sub(&subst, a));
            continue;
        }
        let first_new = values.len();
        let mut made: Vec<ValueId> = vec![];
        for (i, (nn, ty)) in rw.nodes.iter().zip(tys).enumerate() {
            let mut args = Vec::with_capacity(nn.args.len());
            for a in &nn.args {
                args.push(match a {
                    Arg::Old(v) => sub(&subst, *v),
                    Arg::New(j) => made[*j],
                    Arg::Const(t) => values.push(ValueData {
                        ty: t.ty(),
                        name: String::new(),
                        def: ValueDef::Const(Arc::new(t.clone())),
                    }),
                });
            }
            let out = if i + 1 == rw.nodes.len() {
                root_out
            } else {
                values.push(ValueData {
                    ty: ty.clone(),
                    name: node.name.clone(),
                    // set below, once the node has its id
                    def: ValueDef::Input,
                })
            };
            made.push(out);
            nodes.push((
                None,
                NodeData {
                    op: nn.op.clone(),
                    inputs: args,
                    outputs: vec![out],
                    name: node.name.clone(),
                    phase: node.phase,
                    origin: node.origin,
                },
            ));
        }
        // the replacement's new values are numbered just before the root's output
        let new: Vec<ValueId> = values.keys().skip(first_new).collect();
        before.insert(root_out, new);
    }
    let outputs: Vec<ValueId> = outputs.iter().map(|&v| sub(&subst, v)).collect();

    // drop the shared nodes nothing reads any more, last first so chains go in one sweep
    let mut reads = vec![0usize; values.len()];
    for (_, node) in &nodes {
        for &v in &node.inputs {
            reads[v.0 as usize] += 1;
        }
    }
    for &v in &outputs {
        reads[v.0 as usize] += 1;
    }
    maybe_dead.sort_unstable();
    maybe_dead.dedup();
    let mut dead: Vec<bool> = vec![false; nodes.len()];
    let position: HashMap<NodeId, usize> = nodes
        .iter()
        .enumerate()
        .filter_map(|(i, (old, _))| old.map(|o| (o, i)))
        .collect();
    for m in maybe_dead.iter().rev() {
        let Some(&i) = position.get(m) else {
            continue;
        };
        if nodes[i].1.outputs.iter().all(|&o| reads[o.0 as usize] == 0) {
            dead[i] = true;
            for &v in &nodes[i].1.inputs {
                reads[v.0 as usize] -= 1;
            }
        }
    }

    let mut out = Graph {
        values: crate::entity::PrimaryMap::new(),
        nodes: crate::entity::PrimaryMap::new(),
        inputs,
        outputs,
    };
    let mut defined = vec![false; values.len()];
    for ((_, node), dead) in nodes.into_iter().zip(dead) {
        if dead {
            continue;
        }
        let id = out.nodes.push(node);
        for (index, &v) in out.nodes[id].outputs.iter().enumerate() {
            values[v].def = ValueDef::Node { node: id, index };
            defined[v.0 as usize] = true;
        }
    }
    let keep = |v: ValueId, d: &ValueData| {
        defined[v.0 as usize] || !matches!(d.def, ValueDef::Node { .. })
    };
    let mut order: Vec<ValueId> = vec![];
    for (v, d) in values.iter().take(old_values) {
        order.extend(before.get(&v).into_iter().flatten());
        if keep(v, d) {
            order.push(v);
        }
    }
    out.values = values;
    renumber_values(out, &order)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onnx::compact::drop_unused_constants;
    use crate::text::{parse, print};
    use expect_test::{expect, Expect};

    /// Parses `text`, normalizes it, drops unread constants; checks the printed result against
    /// `want` and that both graphs compute the same outputs on pseudo-random inputs.
    fn check(text: &str, want: Expect) {
        let g = parse(text).expect("parses");
        let (h, _) = normalize(g.clone());
        let (h, _) = drop_unused_constants(h);
        crate::verify::verify(&h).expect("verifies");
        want.assert_eq(&print(&h));
        assert_same_outputs(&g, &h);
    }

    /// Pseudo-random values for every input and weight, by name.
    fn feeds(g: &Graph) -> HashMap<String, Tensor> {
        let mut f = HashMap::new();
        for (i, (_, d)) in g.values.iter().enumerate() {
            if matches!(d.def, ValueDef::Const(_) | ValueDef::Node { .. }) {
                continue;
            }
            let ty = &d.ty;
            let mut t = Tensor::pseudo_random(&ty.shape, 7 + i as u64);
            t.dtype = ty.dtype;
            if ty.dtype == DType::Bool {
                // mostly true, the first row entirely false
                t.data
                    .iter_mut()
                    .for_each(|x| *x = if *x > -0.6 { 1.0 } else { 0.0 });
                let row = ty.shape.last().copied().unwrap_or(1);
                t.data[..row].iter_mut().for_each(|x| *x = 0.0);
            }
            f.insert(d.name.clone(), t);
        }
        f
    }

    fn run(g: &Graph, f: &HashMap<String, Tensor>) -> Vec<Tensor> {
        let by_id = g
            .values
            .iter()
            .filter_map(|(v, d)| f.get(&d.name).map(|t| (v, t.clone())))
            .filter(|(v, _)| !matches!(g.value(*v).def, ValueDef::Const(_) | ValueDef::Node { .. }))
            .collect();
        let vals = crate::eval::run(g, &by_id).expect("evaluates");
        g.outputs
            .iter()
            .map(|v| vals[v.0 as usize].clone().expect("computed"))
            .collect()
    }

    /// Equal up to f32 rounding (relative to the largest output), NaN where the other is NaN.
    fn assert_same_outputs(g: &Graph, h: &Graph) {
        let f = feeds(g);
        for (x, y) in run(g, &f).iter().zip(run(h, &f)) {
            assert_eq!(x.shape, y.shape);
            let scale = x.data.iter().fold(1e-3, |m: f64, v| m.max(v.abs()));
            for (p, q) in x.data.iter().zip(&y.data) {
                let tol = 1e-5 * scale;
                let same = (p.is_nan() && q.is_nan()) || (p - q).abs() <= tol;
                assert!(same, "{p} vs {q}");
            }
        }
    }

    #[test]
    fn gelu_of_the_torchscript_exporter() {
        check(
            r#"graph {
  input v0 "x": f32[2,3]
  const v1: f32[] = [1.4142135381698608]
  const v2: f32[] = [1.0]
  const v3: f32[] = [0.5]
  n0 "/1/Div" = binary(v0, v1) {"kind":"div"} -> v4: f32[2,3]
  n1 "/1/Erf" = unary(v4) {"kind":"erf"} -> v5: f32[2,3]
  n2 "/1/Add" = binary(v5, v2) {"kind":"add"} -> v6: f32[2,3]
  n3 "/1/Mul" = binary(v0, v6) {"kind":"mul"} -> v7: f32[2,3]
  n4 "/1/Mul_1" = binary(v7, v3) {"kind":"mul"} -> v8 "y": f32[2,3]
  output v8
}"#,
            expect![[r#"
                graph {
                  input v0 "x": f32[2,3]
                  n0 "/1/Mul_1" = unary(v0) {"kind":"gelu"} -> v1 "y": f32[2,3]
                  output v1
                }
            "#]],
        );
    }

    #[test]
    fn gelu_of_the_dynamo_exporter() {
        // 0.5 * (1 + erf) first, then x; and x * (1 / sqrt 2) instead of x / sqrt 2
        check(
            r#"graph {
  input v0 "x": f32[4]
  const v1: f32[] = [0.7071067690849304]
  const v2: f32[] = [1.0]
  const v3: f32[] = [0.5]
  n0 = binary(v1, v0) {"kind":"mul"} -> v4: f32[4]
  n1 = unary(v4) {"kind":"erf"} -> v5: f32[4]
  n2 = binary(v2, v5) {"kind":"add"} -> v6: f32[4]
  n3 = binary(v3, v6) {"kind":"mul"} -> v7: f32[4]
  n4 "gelu" = binary(v0, v7) {"kind":"mul"} -> v8 "gelu": f32[4]
  n5 = unary(v8) {"kind":"tanh"} -> v9 "y": f32[4]
  output v9
}"#,
            expect![[r#"
                graph {
                  input v0 "x": f32[4]
                  n0 "gelu" = unary(v0) {"kind":"gelu"} -> v1 "gelu": f32[4]
                  n1 = unary(v1) {"kind":"tanh"} -> v2 "y": f32[4]
                  output v2
                }
            "#]],
        );
    }

    #[test]
    fn a_formula_with_an_intermediate_read_elsewhere_stays() {
        // the erf is an output too: fusing would compute it twice
        let text = r#"graph {
  input v0 "x": f32[4]
  const v1: f32[] = [1.4142135381698608]
  const v2: f32[] = [1.0]
  const v3: f32[] = [0.5]
  n0 = binary(v0, v1) {"kind":"div"} -> v4: f32[4]
  n1 = unary(v4) {"kind":"erf"} -> v5: f32[4]
  n2 = binary(v5, v2) {"kind":"add"} -> v6: f32[4]
  n3 = binary(v0, v6) {"kind":"mul"} -> v7: f32[4]
  n4 = binary(v7, v3) {"kind":"mul"} -> v8 "y": f32[4]
  output v8, v5
}"#;
        let g = parse(text).expect("parses");
        let (h, _) = normalize(g.clone());
        assert_eq!(print(&h), print(&g));
        // and a 0.4 is not GELU's 0.5
        let g = parse(
            &text
                .replace("[0.5]", "[0.4]")
                .replace("output v8, v5", "output v8"),
        )
        .expect("parses");
        let (h, _) = normalize(g.clone());
        assert_eq!(print(&h), print(&g));
    }

    #[test]
    fn rms_norm_and_silu_of_the_exporters() {
        check(
            r#"graph {
  input v0 "x": f32[2,8]
  param v1 "w": f32[8]
  const v2: f32[] = [2.0]
  const v3: f32[] = [0.000001]
  const v4: f32[] = [1.0]
  n0 = binary(v0, v2) {"kind":"pow"} -> v5: f32[2,8]
  n1 = reduce(v5) {"kind":"mean","axes":[1],"keepdims":true} -> v6: f32[2,1]
  n2 = binary(v6, v3) {"kind":"add"} -> v7: f32[2,1]
  n3 = unary(v7) {"kind":"sqrt"} -> v8: f32[2,1]
  n4 = binary(v4, v8) {"kind":"div"} -> v9: f32[2,1]
  n5 = binary(v0, v9) {"kind":"mul"} -> v10: f32[2,8]
  n6 = binary(v1, v10) {"kind":"mul"} -> v11: f32[2,8]
  n7 = unary(v11) {"kind":"sigmoid"} -> v12: f32[2,8]
  n8 = binary(v11, v12) {"kind":"mul"} -> v13: f32[2,8]
  n9 = unary(v13) {"kind":"sqrt"} -> v14: f32[2,8]
  n10 = unary(v14) {"kind":"reciprocal"} -> v15 "y": f32[2,8]
  output v15
}"#,
            expect![[r#"
                graph {
                  input v0 "x": f32[2,8]
                  param v1 "w": f32[8]
                  const v2: f32[] = [2.0]
                  const v3: f32[] = [9.999999974752427e-7]
                  n0 = binary(v0, v2) {"kind":"pow"} -> v4: f32[2,8]
                  n1 = reduce(v4) {"axes":[1],"keepdims":true,"kind":"mean"} -> v5: f32[2,1]
                  n2 = binary(v5, v3) {"kind":"add"} -> v6: f32[2,1]
                  n3 = unary(v6) {"kind":"rsqrt"} -> v7: f32[2,1]
                  n4 = binary(v0, v7) {"kind":"mul"} -> v8: f32[2,8]
                  n5 = binary(v1, v8) {"kind":"mul"} -> v9: f32[2,8]
                  n6 = unary(v9) {"kind":"silu"} -> v10: f32[2,8]
                  n7 = unary(v10) {"kind":"rsqrt"} -> v11 "y": f32[2,8]
                  output v11
                }
            "#]],
        );
    }

    #[test]
    fn transposes_fold_into_einsum_subscripts() {
        // a weight transposed for a linear layer (the dynamo exporter's tied lm_head), and a
        // transpose another node reads too (it stays for that reader)
        check(
            r#"graph {
  input v0 "x": f32[2,3,4]
  param v1 "w": f32[5,4]
  n0 = transpose(v1) {"perm":[1,0]} -> v2: f32[4,5]
  n1 "lm_head" = einsum(v0, v2) {"equation":"amk,kn->amn"} -> v3 "logits": f32[2,3,5]
  n2 = transpose(v0) {"perm":[0,2,1]} -> v4: f32[2,4,3]
  n3 = einsum(v4) {"equation":"bkm->bk"} -> v5: f32[2,4]
  n4 = unary(v4) {"kind":"neg"} -> v6: f32[2,4,3]
  output v3, v5, v6
}"#,
            expect![[r#"
                graph {
                  input v0 "x": f32[2,3,4]
                  param v1 "w": f32[5,4]
                  n0 "lm_head" = einsum(v0, v1) {"equation":"amk,nk->amn"} -> v2 "logits": f32[2,3,5]
                  n1 = transpose(v0) {"perm":[0,2,1]} -> v3: f32[2,4,3]
                  n2 = einsum(v0) {"equation":"bmk->bk"} -> v4: f32[2,4]
                  n3 = unary(v3) {"kind":"neg"} -> v5: f32[2,4,3]
                  output v2, v4, v5
                }
            "#]],
        );
    }

    /// Attention as the dynamo exporter writes SDPA: `K^T` over `[b*h, s, d]`, the scale's
    /// square root on both operands, a mask made additive, softmax, its NaN guard.
    fn dynamo_attention(mask: &str) -> String {
        attention_with_fill(mask, "-inf")
    }

    fn attention_with_fill(mask: &str, fill: &str) -> String {
        format!(
            r#"graph {{
  input v0 "q": f32[1,2,4,3]
  input v1 "k": f32[1,2,4,3]
  input v2 "v": f32[1,2,4,3]
  {mask}
  const v4: f32[] = [0.7598356604576111]
  const v5: f32[] = [0.0]
  const v6: f32[] = [{fill}]
  n0 = reshape(v1) {{"shape":[2,4,3]}} -> v7: f32[2,4,3]
  n1 = transpose(v7) {{"perm":[0,2,1]}} -> v8: f32[2,3,4]
  n2 = reshape(v8) {{"shape":[1,2,3,4]}} -> v9: f32[1,2,3,4]
  n3 = binary(v0, v4) {{"kind":"mul"}} -> v10: f32[1,2,4,3]
  n4 = binary(v9, v4) {{"kind":"mul"}} -> v11: f32[1,2,3,4]
  n5 = where(v3, v5, v6) -> v12: f32[1,1,4,4]
  n6 = einsum(v10, v11) {{"equation":"abmk,abkn->abmn"}} -> v13: f32[1,2,4,4]
  n7 = binary(v13, v12) {{"kind":"add"}} -> v14: f32[1,2,4,4]
  n8 = softmax(v14) {{"axis":3,"log":false}} -> v15: f32[1,2,4,4]
  n9 = unary(v15) {{"kind":"is_nan"}} -> v16: bool[1,2,4,4]
  n10 = where(v16, v5, v15) -> v17: f32[1,2,4,4]
  n11 "sdpa" = einsum(v17, v2) {{"equation":"abmk,abkn->abmn"}} -> v18 "attn": f32[1,2,4,3]
  output v18
}}"#
        )
    }

    #[test]
    fn attention_with_a_run_time_mask_keeps_its_nan_guard() {
        // a padding mask can mask a whole row (the test feeds one): softmax is NaN there and the
        // guard makes it zeros, so it stays
        check(
            &dynamo_attention(r#"input v3 "mask": bool[1,1,4,4]"#),
            expect![[r#"
                graph {
                  input v0 "q": f32[1,2,4,3]
                  input v1 "k": f32[1,2,4,3]
                  input v2 "v": f32[1,2,4,3]
                  input v3 "mask": bool[1,1,4,4]
                  const v4: f32[] = [0.0]
                  const v5: f32[] = [-inf]
                  const v7: f32[] = [0.5773502588272095]
                  n0 = einsum(v0, v1) {"equation":"dhle,dhse->dhls"} -> v6: f32[1,2,4,4]
                  n1 = binary(v6, v7) {"kind":"mul"} -> v8: f32[1,2,4,4]
                  n2 = where(v3, v8, v5) -> v9: f32[1,2,4,4]
                  n3 = softmax(v9) {"axis":3,"log":false} -> v10: f32[1,2,4,4]
                  n4 = unary(v10) {"kind":"is_nan"} -> v11: bool[1,2,4,4]
                  n5 = where(v11, v4, v10) -> v12: f32[1,2,4,4]
                  n6 "sdpa" = einsum(v12, v2) {"equation":"dhls,dhsv->dhlv"} -> v13 "attn": f32[1,2,4,3]
                  output v13
                }
            "#]],
        );
    }

    #[test]
    fn attention_with_a_constant_causal_mask_drops_its_nan_guard() {
        let tril = "[1, 0, 0, 0, 1, 1, 0, 0, 1, 1, 1, 0, 1, 1, 1, 1]";
        check(
            &dynamo_attention(&format!("const v3: bool[1,1,4,4] = {tril}")),
            expect![[r#"
                graph {
                  input v0 "q": f32[1,2,4,3]
                  input v1 "k": f32[1,2,4,3]
                  input v2 "v": f32[1,2,4,3]
                  const v3: bool[1,1,4,4] = [1, 0, 0, 0, 1, 1, 0, 0, 1, 1, 1, 0, 1, 1, 1, 1]
                  const v4: f32[] = [-inf]
                  const v6: f32[] = [0.5773502588272095]
                  n0 = einsum(v0, v1) {"equation":"dhle,dhse->dhls"} -> v5: f32[1,2,4,4]
                  n1 = binary(v5, v6) {"kind":"mul"} -> v7: f32[1,2,4,4]
                  n2 = where(v3, v7, v4) -> v8: f32[1,2,4,4]
                  n3 = softmax(v8) {"axis":3,"log":false} -> v9: f32[1,2,4,4]
                  n4 "sdpa" = einsum(v9, v2) {"equation":"dhls,dhsv->dhlv"} -> v10 "attn": f32[1,2,4,3]
                  output v10
                }
            "#]],
        );
        // a constant mask with a row masked entirely keeps the guard
        let g = parse(&dynamo_attention(&format!(
            "const v3: bool[1,1,4,4] = {}",
            tril.replacen('1', "0", 1)
        )))
        .expect("parses");
        let (h, _) = normalize(g.clone());
        assert!(print(&h).contains("is_nan"));
        assert_same_outputs(&g, &h);
    }

    #[test]
    fn attention_with_a_finite_mask_fill_drops_its_nan_guard() {
        // the dynamo exporter masks with finfo(f32).min: no row is ever entirely -inf, softmax
        // is never NaN, the guard is a no-op even for the fed mask's entirely masked row
        check(
            &attention_with_fill(
                r#"input v3 "mask": bool[1,1,4,4]"#,
                "-3.4028234663852886e38",
            ),
            expect![[r#"
                graph {
                  input v0 "q": f32[1,2,4,3]
                  input v1 "k": f32[1,2,4,3]
                  input v2 "v": f32[1,2,4,3]
                  input v3 "mask": bool[1,1,4,4]
                  const v4: f32[] = [-3.4028234663852886e38]
                  const v6: f32[] = [0.5773502588272095]
                  n0 = einsum(v0, v1) {"equation":"dhle,dhse->dhls"} -> v5: f32[1,2,4,4]
                  n1 = binary(v5, v6) {"kind":"mul"} -> v7: f32[1,2,4,4]
                  n2 = where(v3, v7, v4) -> v8: f32[1,2,4,4]
                  n3 = softmax(v8) {"axis":3,"log":false} -> v9: f32[1,2,4,4]
                  n4 "sdpa" = einsum(v9, v2) {"equation":"dhls,dhsv->dhlv"} -> v10 "attn": f32[1,2,4,3]
                  output v10
                }
            "#]],
        );
    }

    #[test]
    fn a_key_transposed_with_its_heads_keeps_the_head_transpose() {
        // the TorchScript-based exporter's `k.permute(0, 2, 3, 1)` straight from [b, s, h, d]:
        // the head transpose stays (as in the TorchScript graph), the swap folds
        check(
            r#"graph {
  input v0 "q": f32[1,2,4,3]
  input v1 "k": f32[1,4,2,3]
  input v2 "v": f32[1,2,4,3]
  const v3: f32[] = [0.5773502588272095]
  n0 = transpose(v1) {"perm":[0,2,3,1]} -> v4: f32[1,2,3,4]
  n1 = einsum(v0, v4) {"equation":"abmk,abkn->abmn"} -> v5: f32[1,2,4,4]
  n2 = binary(v5, v3) {"kind":"mul"} -> v6: f32[1,2,4,4]
  n3 = softmax(v6) {"axis":3,"log":false} -> v7: f32[1,2,4,4]
  n4 = einsum(v7, v2) {"equation":"abmk,abkn->abmn"} -> v8 "attn": f32[1,2,4,3]
  output v8
}"#,
            expect![[r#"
                graph {
                  input v0 "q": f32[1,2,4,3]
                  input v1 "k": f32[1,4,2,3]
                  input v2 "v": f32[1,2,4,3]
                  const v3: f32[] = [0.5773502588272095]
                  n0 = transpose(v1) {"perm":[0,2,1,3]} -> v4: f32[1,2,4,3]
                  n1 = einsum(v0, v4) {"equation":"dhle,dhse->dhls"} -> v5: f32[1,2,4,4]
                  n2 = binary(v5, v3) {"kind":"mul"} -> v6: f32[1,2,4,4]
                  n3 = softmax(v6) {"axis":3,"log":false} -> v7: f32[1,2,4,4]
                  n4 = einsum(v7, v2) {"equation":"dhls,dhsv->dhlv"} -> v8 "attn": f32[1,2,4,3]
                  output v8
                }
            "#]],
        );
    }

    #[test]
    fn a_grouped_query_key_keeps_its_head_repeat_reshape() {
        // the dynamo exporter merges the head repeat [b, kv, g, s, d] straight into [b*h, s, d]
        // for `K^T`; the fold keeps one reshape to [b, h, s, d], as the TorchScript graph has
        check(
            r#"graph {
  input v0 "q": f32[1,4,3,2]
  input v1 "k": f32[1,2,2,3,2]
  input v2 "v": f32[1,4,3,2]
  const v3: f32[] = [0.8408964276313782]
  n0 = reshape(v1) {"shape":[4,3,2]} -> v4: f32[4,3,2]
  n1 = transpose(v4) {"perm":[0,2,1]} -> v5: f32[4,2,3]
  n2 = reshape(v5) {"shape":[1,4,2,3]} -> v6: f32[1,4,2,3]
  n3 = binary(v0, v3) {"kind":"mul"} -> v7: f32[1,4,3,2]
  n4 = binary(v6, v3) {"kind":"mul"} -> v8: f32[1,4,2,3]
  n5 = einsum(v7, v8) {"equation":"abmk,abkn->abmn"} -> v9: f32[1,4,3,3]
  n6 = softmax(v9) {"axis":3,"log":false} -> v10: f32[1,4,3,3]
  n7 = einsum(v10, v2) {"equation":"abmk,abkn->abmn"} -> v11 "attn": f32[1,4,3,2]
  output v11
}"#,
            expect![[r#"
                graph {
                  input v0 "q": f32[1,4,3,2]
                  input v1 "k": f32[1,2,2,3,2]
                  input v2 "v": f32[1,4,3,2]
                  const v5: f32[] = [0.7071068286895752]
                  n0 = reshape(v1) {"shape":[1,4,3,2]} -> v3: f32[1,4,3,2]
                  n1 = einsum(v0, v3) {"equation":"dhle,dhse->dhls"} -> v4: f32[1,4,3,3]
                  n2 = binary(v4, v5) {"kind":"mul"} -> v6: f32[1,4,3,3]
                  n3 = softmax(v6) {"axis":3,"log":false} -> v7: f32[1,4,3,3]
                  n4 = einsum(v7, v2) {"equation":"dhls,dhsv->dhlv"} -> v8 "attn": f32[1,4,3,2]
                  output v8
                }
            "#]],
        );
    }

    #[test]
    fn a_softmax_that_weighs_no_values_is_not_attention() {
        // a router: scaled input times a transposed weight, softmax, no `p . v` einsum after
        // it; the transpose folds, the scale stays where the model put it
        check(
            r#"graph {
  input v0 "x": f32[6,4]
  param v1 "w": f32[3,4]
  const v2: f32[] = [0.5]
  n0 = binary(v0, v2) {"kind":"mul"} -> v3: f32[6,4]
  n1 = transpose(v1) {"perm":[1,0]} -> v4: f32[4,3]
  n2 = einsum(v3, v4) {"equation":"mk,kn->mn"} -> v5: f32[6,3]
  n3 = softmax(v5) {"axis":1,"log":false} -> v6 "p": f32[6,3]
  output v6
}"#,
            expect![[r#"
                graph {
                  input v0 "x": f32[6,4]
                  param v1 "w": f32[3,4]
                  const v2: f32[] = [0.5]
                  n0 = binary(v0, v2) {"kind":"mul"} -> v3: f32[6,4]
                  n1 = einsum(v3, v1) {"equation":"mk,nk->mn"} -> v4: f32[6,3]
                  n2 = softmax(v4) {"axis":1,"log":false} -> v5 "p": f32[6,3]
                  output v5
                }
            "#]],
        );
    }

    #[test]
    fn rows_of_a_broadcast_mask() {
        let m = Tensor::new(
            DType::Bool,
            vec![2, 1, 3],
            vec![1.0, 1.0, 1.0, 0.0, 0.0, 1.0],
        );
        assert!(every_row_has(&m, true, 3, 4));
        assert!(!every_row_has(&m, false, 3, 4));
        // along axis 2 of [.., 2, 1, 3] the mask has size 1: every entry must hold
        assert!(!every_row_has(&m, true, 2, 4));
        assert!(!every_row_has(&m, true, 0, 4));
    }
}
