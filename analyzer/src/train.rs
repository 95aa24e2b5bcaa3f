//! The training-graph builder: forward graph + loss -> forward + backward, by reverse-mode AD
//! over each op's `vjp`.
//!
//! Why a graph and not a tape: the solver shards the backward nodes like any others, the
//! profiler prices them from their shapes, and the generator lowers them per rank; so the
//! backward pass must be ordinary IR, emitted once, with each node tagged by the forward node
//! whose `vjp` produced it (`origin`), which is what lets the profiler charge backward cost to
//! forward nodes and the checkpointing pass recompute a forward segment.
//!
//! The recipe:
//! 1. clone the forward graph; parameters whose name matches `frozen` become buffers;
//! 2. add the loss ([`LossSpec`]): a given scalar, softmax cross entropy against a new labels
//!    input, or the mean of an output (so a model without a loss can still be planned);
//! 3. mark the values that need a gradient: float values on a path from a parameter to the
//!    loss through differentiable inputs (`OpSpec::differentiable`); inputs, buffers, constants
//!    and integer tensors get none;
//! 4. seed `dloss = 1` and walk the forward nodes in reverse, calling each node's `vjp` with
//!    the gradients of its outputs; contributions to a value read by several nodes are summed
//!    with elementwise adds;
//! 5. outputs: `[loss] + parameter gradients + BatchNorm running-statistics updates`.
//!
//! Optimizer and mixed-precision choices ([`Optimizer`], [`DTypePolicy`]) do not change the
//! graph, only the bytes each parameter costs ([`param_bytes_per_element`]); the profiler and
//! the solver read them from here so that there is one definition of those sizes.

use crate::builder::GraphBuilder;
use crate::dtype::{DType, TensorType};
use crate::entity::EntityId;
use crate::error::AnalyzerError;
use crate::graph::{Graph, NodeId, Phase, ValueDef, ValueId};
use crate::ops::binary::{Binary, BinaryKind};
use crate::ops::cross_entropy::{LossReduction, SoftmaxCrossEntropy};
use crate::ops::reduce::{Reduce, ReduceKind};
use crate::ops::{Op, Reshape, VjpCtx};
use crate::tensor::Tensor;
use regex::Regex;
use serde::{Deserialize, Serialize};

/// Which scalar the training step minimises.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LossSpec {
    /// A scalar float value of the forward graph.
    Given(ValueId),
    /// Mean softmax cross entropy of `logits [.., C]` against a new graph input named
    /// `labels_name`, typed `i64[logits.shape[..-1]]` (reused when the graph already has an
    /// input of that name and type). Logits of rank other than 2 are reshaped to `[N, C]`.
    CrossEntropy {
        logits: ValueId,
        labels_name: String,
    },
    /// The mean over all elements of a float value.
    MeanOfOutput(ValueId),
}

/// Options of [`build_training_graph`].
#[derive(Clone, Debug)]
pub struct TrainOptions {
    /// Parameters whose name matches become buffers (frozen: no gradient, no optimizer state).
    pub frozen: Option<Regex>,
    pub loss: LossSpec,
}

impl TrainOptions {
    pub fn new(loss: LossSpec) -> Self {
        Self { frozen: None, loss }
    }
    pub fn with_frozen(mut self, frozen: Regex) -> Self {
        self.frozen = Some(frozen);
        self
    }
}

/// A forward + backward graph with its parameters and gradients made explicit.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainingGraph {
    /// Forward nodes (in their original order, then the loss nodes), then backward nodes.
    /// Outputs: `[loss] + grads' gradient values + buffer_updates' new values`.
    pub graph: Graph,
    /// The scalar loss.
    pub loss: ValueId,
    /// `(parameter, its gradient)` for every trainable parameter that reaches the loss, in
    /// parameter (value) order. The gradient has the parameter's type.
    pub grads: Vec<(ValueId, ValueId)>,
    /// `(buffer, its new value)`: running statistics of training-mode BatchNorm, to be written
    /// back after the step.
    pub buffer_updates: Vec<(ValueId, ValueId)>,
    /// Parameters with no gradient: they do not reach the loss (or reach it only through
    /// non-differentiable inputs).
    pub unused_params: Vec<ValueId>,
    /// The labels input added by [`LossSpec::CrossEntropy`].
    pub labels: Option<ValueId>,
    /// Number of forward nodes (nodes `0..forward_nodes` are forward, the rest backward).
    pub forward_nodes: usize,
}

impl TrainingGraph {
    /// Per value: whether it lies on a differentiable path from a parameter through the
    /// forward (a float value whose gradient the backward computes). Masks and position
    /// tables computed from inputs alone do not.
    pub fn needs_grad(&self) -> Vec<bool> {
        let g = &self.graph;
        let mut needs = vec![false; g.values.len()];
        for p in g.params() {
            needs[p.0 as usize] = true;
        }
        for (_, node) in g.nodes.iter().take(self.forward_nodes) {
            let any = node
                .inputs
                .iter()
                .enumerate()
                .any(|(i, v)| needs[v.0 as usize] && node.op.spec().differentiable(i));
            for &o in &node.outputs {
                needs[o.0 as usize] = any && g.ty(o).dtype.is_float();
            }
        }
        needs
    }

    /// The gradient of `param`, if it has one.
    pub fn grad_of(&self, param: ValueId) -> Option<ValueId> {
        self.grads
            .iter()
            .find(|(p, _)| *p == param)
            .map(|&(_, g)| g)
    }
}

/// Builds the training graph of `forward` (see the module doc). `forward` must be forward-only.
pub fn build_training_graph(
    forward: &Graph,
    opts: &TrainOptions,
) -> Result<TrainingGraph, AnalyzerError> {
    if let Some((n, _)) = forward
        .nodes
        .iter()
        .find(|(_, d)| d.phase == Phase::Backward)
    {
        return Err(AnalyzerError::Other(format!(
            "the graph already has backward nodes ({} is one): build the training graph from \
             the forward graph",
            forward.node_label(n)
        )));
    }
    let mut b = GraphBuilder::from_graph(forward.clone());
    b.phase = Phase::Forward;
    b.origin = None;

    // 1. freeze
    if let Some(re) = &opts.frozen {
        for v in b.graph.values.keys() {
            let d = &mut b.graph.values[v];
            if let ValueDef::Param { data } = &d.def {
                if re.is_match(&d.name) {
                    d.def = ValueDef::Buffer { data: data.clone() };
                }
            }
        }
    }

    // 2. loss
    let (loss, labels) = add_loss(&mut b, &opts.loss)?;
    let loss_ty = b.ty(loss).clone();
    if !loss_ty.shape.is_empty() {
        return Err(AnalyzerError::Other(format!(
            "loss {} is not a scalar: it is {loss_ty}; use LossSpec::MeanOfOutput to reduce it",
            b.graph.value_label(loss)
        )));
    }
    if !loss_ty.dtype.is_float() {
        return Err(AnalyzerError::Other(format!(
            "loss {} is {loss_ty}: a loss must be a float scalar",
            b.graph.value_label(loss)
        )));
    }
    let forward_nodes = b.graph.nodes.len();

    // 3. which values need a gradient
    let reach = needs_gradient(&b.graph, loss);

    // 4. reverse walk
    let nvals = b.graph.values.len();
    let mut grads: Vec<Option<ValueId>> = vec![None; nvals];
    if reach[loss.index()] {
        let seed = b.named_constant("dloss", Tensor::scalar(loss_ty.dtype, 1.0));
        grads[loss.index()] = Some(seed);
    }
    b.phase = Phase::Backward;
    for n in (0..forward_nodes).rev().map(|i| NodeId(i as u32)) {
        let node = b.graph.nodes[n].clone();
        let out_grads: Vec<Option<ValueId>> =
            node.outputs.iter().map(|&o| grads[o.index()]).collect();
        if out_grads.iter().all(Option::is_none) {
            continue;
        }
        let spec = node.op.spec();
        let needs: Vec<bool> = node
            .inputs
            .iter()
            .enumerate()
            .map(|(i, &v)| reach[v.index()] && spec.differentiable(i))
            .collect();
        if !needs.iter().any(|&x| x) {
            continue;
        }
        let label = b.graph.node_label(n);
        let node_err = |reason: String| AnalyzerError::Node {
            node: label.clone(),
            op: node.op.name().to_string(),
            reason,
        };
        let scope = if node.name.is_empty() {
            format!("{n}.grad")
        } else {
            format!("{}.grad", node.name)
        };
        b.origin = Some(n);
        b.push_scope(scope);
        let result = {
            let mut cx = VjpCtx {
                b: &mut b,
                inputs: &node.inputs,
                outputs: &node.outputs,
                grads: &out_grads,
                needs: &needs,
            };
            spec.vjp(&mut cx)
        };
        let din = match result {
            Ok(d) => d,
            Err(e) => {
                b.pop_scope();
                return Err(node_err(format!("vjp: {}", e.0)));
            }
        };
        if din.len() != node.inputs.len() {
            b.pop_scope();
            return Err(node_err(format!(
                "vjp returned {} gradients for {} inputs",
                din.len(),
                node.inputs.len()
            )));
        }
        for (i, (&v, g)) in node.inputs.iter().zip(din).enumerate() {
            let Some(g) = g else { continue };
            if !needs[i] {
                continue;
            }
            if b.ty(g) != b.ty(v) {
                let msg = format!(
                    "vjp gave input {i} ({}) a gradient typed {}, expected {}",
                    b.graph.value_label(v),
                    b.ty(g),
                    b.ty(v)
                );
                b.pop_scope();
                return Err(node_err(msg));
            }
            let acc = match grads[v.index()] {
                None => g,
                Some(prev) => match b.node1(
                    Binary {
                        kind: BinaryKind::Add,
                    },
                    &[prev, g],
                ) {
                    Ok(s) => s,
                    Err(e) => {
                        b.pop_scope();
                        return Err(node_err(format!(
                            "accumulating the gradient of input {i}: {e}"
                        )));
                    }
                },
            };
            grads[v.index()] = Some(acc);
        }
        b.pop_scope();
    }
    b.origin = None;
    b.phase = Phase::Forward;

    // 5. outputs
    let params: Vec<ValueId> = b.graph.params().collect();
    let mut pgrads = vec![];
    let mut unused_params = vec![];
    for p in params {
        match grads[p.index()] {
            Some(g) => pgrads.push((p, g)),
            None => unused_params.push(p),
        }
    }
    // name each parameter's gradient `<param>.grad` where the value is a node output that is
    // the gradient of this parameter only
    for &(p, g) in &pgrads {
        let shared = pgrads.iter().filter(|&&(_, h)| h == g).count() > 1;
        let from_node = matches!(b.graph.values[g].def, ValueDef::Node { .. });
        let pname = b.graph.values[p].name.clone();
        if from_node && !shared && !pname.is_empty() {
            b.graph.values[g].name = format!("{pname}.grad");
        }
    }
    let mut buffer_updates = vec![];
    for (_, node) in b.graph.nodes.iter().take(forward_nodes) {
        if let Op::BatchNorm(bn) = &node.op {
            if bn.training && node.inputs.len() >= 5 && node.outputs.len() >= 3 {
                for (k, o) in [(3, 1), (4, 2)] {
                    let buf = node.inputs[k];
                    if matches!(b.graph.values[buf].def, ValueDef::Buffer { .. }) {
                        buffer_updates.push((buf, node.outputs[o]));
                    }
                }
            }
        }
    }
    let mut outputs = vec![loss];
    outputs.extend(pgrads.iter().map(|&(_, g)| g));
    outputs.extend(buffer_updates.iter().map(|&(_, v)| v));
    b.graph.outputs = outputs;
    let graph = b.finish();
    crate::verify::debug_verify(&graph)?;
    Ok(TrainingGraph {
        graph,
        loss,
        grads: pgrads,
        buffer_updates,
        unused_params,
        labels,
        forward_nodes,
    })
}

fn check_value(g: &Graph, v: ValueId, what: &str) -> Result<(), AnalyzerError> {
    if g.values.get(v).is_none() {
        return Err(AnalyzerError::Other(format!(
            "{what} {v} is not a value of the graph ({} values)",
            g.values.len()
        )));
    }
    Ok(())
}

/// Adds the loss nodes (forward phase); returns the loss value and the labels input if added.
fn add_loss(
    b: &mut GraphBuilder,
    spec: &LossSpec,
) -> Result<(ValueId, Option<ValueId>), AnalyzerError> {
    match spec {
        LossSpec::Given(v) => {
            check_value(&b.graph, *v, "loss")?;
            Ok((*v, None))
        }
        LossSpec::MeanOfOutput(v) => {
            check_value(&b.graph, *v, "output")?;
            let ty = b.ty(*v).clone();
            if !ty.dtype.is_float() {
                return Err(AnalyzerError::Other(format!(
                    "cannot take the mean of {} as a loss: it is {ty}, not float",
                    b.graph.value_label(*v)
                )));
            }
            if ty.shape.is_empty() {
                return Ok((*v, None));
            }
            b.name_next("loss");
            let l = b.node1(
                Reduce {
                    kind: ReduceKind::Mean,
                    axes: (0..ty.rank()).collect(),
                    keepdims: false,
                },
                &[*v],
            )?;
            Ok((l, None))
        }
        LossSpec::CrossEntropy {
            logits,
            labels_name,
        } => {
            check_value(&b.graph, *logits, "logits")?;
            let ty = b.ty(*logits).clone();
            let Some((&classes, lead)) = ty.shape.split_last() else {
                return Err(AnalyzerError::Other(format!(
                    "logits {} are a scalar: cross entropy needs [.., classes]",
                    b.graph.value_label(*logits)
                )));
            };
            if !ty.dtype.is_float() {
                return Err(AnalyzerError::Other(format!(
                    "logits {} are {ty}, not float",
                    b.graph.value_label(*logits)
                )));
            }
            let labels_ty = TensorType::new(DType::I64, lead.to_vec());
            let existing = b
                .graph
                .inputs
                .iter()
                .copied()
                .find(|&v| b.graph.values[v].name == *labels_name);
            let labels = match existing {
                Some(v) if *b.ty(v) == labels_ty => v,
                Some(v) => {
                    return Err(AnalyzerError::Input {
                        name: labels_name.clone(),
                        reason: format!(
                            "the graph already has an input of this name typed {}, cross \
                             entropy against {} needs {labels_ty}",
                            b.ty(v),
                            b.graph.value_label(*logits)
                        ),
                    })
                }
                None => b.input(labels_name.clone(), labels_ty),
            };
            let n: usize = lead.iter().product();
            let (scores, targets) = if ty.rank() == 2 {
                (*logits, labels)
            } else {
                b.name_next("loss.logits");
                let s = b.node1(
                    Reshape {
                        shape: vec![n, classes],
                    },
                    &[*logits],
                )?;
                b.name_next("loss.labels");
                let t = b.node1(Reshape { shape: vec![n] }, &[labels])?;
                (s, t)
            };
            b.name_next("loss");
            let l = b.node1(
                SoftmaxCrossEntropy {
                    reduction: LossReduction::Mean,
                    ignore_index: None,
                },
                &[scores, targets],
            )?;
            Ok((l, Some(labels)))
        }
    }
}

/// For each value: whether it needs a gradient, i.e. it is a float value on a path from a
/// parameter to `loss` through differentiable inputs.
fn needs_gradient(g: &Graph, loss: ValueId) -> Vec<bool> {
    let nv = g.values.len();
    let float = |v: ValueId| g.values[v].ty.dtype.is_float();
    let mut from_param = vec![false; nv];
    for p in g.params() {
        from_param[p.index()] = float(p);
    }
    for (_, node) in g.nodes.iter() {
        let spec = node.op.spec();
        let any = node
            .inputs
            .iter()
            .enumerate()
            .any(|(i, &v)| from_param[v.index()] && spec.differentiable(i));
        if any {
            for &o in &node.outputs {
                from_param[o.index()] = float(o);
            }
        }
    }
    let mut reach = vec![false; nv];
    reach[loss.index()] = from_param[loss.index()];
    for (_, node) in g.nodes.iter().rev() {
        if !node.outputs.iter().any(|o| reach[o.index()]) {
            continue;
        }
        let spec = node.op.spec();
        for (i, &v) in node.inputs.iter().enumerate() {
            if from_param[v.index()] && spec.differentiable(i) {
                reach[v.index()] = true;
            }
        }
    }
    reach
}

/// The optimizer of the training step: it decides the state kept per parameter.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Optimizer {
    /// Plain SGD (no state) or with momentum (one fp32 buffer).
    Sgd { momentum: bool },
    /// AdamW: two fp32 moments.
    AdamW,
}

/// Where the step keeps which precision.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DTypePolicy {
    /// Everything float in fp32.
    #[default]
    Fp32,
    /// bf16 weights, activations and gradients, with an fp32 master copy of the weights and
    /// fp32 optimizer state (the usual mixed-precision recipe).
    Bf16Mixed,
}

impl DTypePolicy {
    /// The dtype a float tensor of the step (activation, gradient) has under this policy;
    /// integer and bool dtypes are unchanged.
    pub fn compute_dtype(self, d: DType) -> DType {
        if !d.is_float() {
            return d;
        }
        match self {
            DTypePolicy::Fp32 => DType::F32,
            DTypePolicy::Bf16Mixed => DType::BF16,
        }
    }
    /// `ty` with its dtype mapped by [`compute_dtype`](Self::compute_dtype).
    pub fn compute_type(self, ty: &TensorType) -> TensorType {
        ty.with_dtype(self.compute_dtype(ty.dtype))
    }
}

/// Bytes one parameter element costs, by kind.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParamBytes {
    /// The weight itself (bf16 mixed: the bf16 copy plus the fp32 master).
    pub weights: usize,
    pub grads: usize,
    pub optimizer: usize,
}

impl ParamBytes {
    pub fn total(&self) -> usize {
        self.weights + self.grads + self.optimizer
    }
    /// Each field multiplied by `n` elements.
    pub fn times(&self, n: usize) -> ParamBytes {
        ParamBytes {
            weights: self.weights * n,
            grads: self.grads * n,
            optimizer: self.optimizer * n,
        }
    }
}

/// Bytes per parameter element: weights (fp32: 4; bf16 mixed: 2 + 4 master), gradients (4 or 2),
/// optimizer state (SGD: 0, with momentum 4; AdamW: 8).
pub fn param_bytes_per_element(optimizer: Optimizer, policy: DTypePolicy) -> ParamBytes {
    let (weights, grads) = match policy {
        DTypePolicy::Fp32 => (4, 4),
        DTypePolicy::Bf16Mixed => (2 + 4, 2),
    };
    let optimizer = match optimizer {
        Optimizer::Sgd { momentum: false } => 0,
        Optimizer::Sgd { momentum: true } => 4,
        Optimizer::AdamW => 8,
    };
    ParamBytes {
        weights,
        grads,
        optimizer,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::eval;
    use crate::ops::gradcheck::rand_tensor;
    use std::collections::HashMap;

    fn f64t(shape: &[usize]) -> TensorType {
        TensorType::new(DType::F64, shape.to_vec())
    }

    /// `loss = sum((x @ w1 @ w2) * t)`: einsum only.
    fn linear_chain() -> (Graph, ValueId, [ValueId; 4]) {
        let mut b = GraphBuilder::new();
        let x = b.input("x", f64t(&[2, 3]));
        let t = b.input("t", f64t(&[2, 2]));
        let w1 = b.param("w1", f64t(&[3, 4]));
        let w2 = b.param("w2", f64t(&[4, 2]));
        b.name_next("fc1");
        let h = b.matmul(x, w1).unwrap();
        b.name_next("fc2");
        let y = b.matmul(h, w2).unwrap();
        b.name_next("loss");
        let l = b.einsum("ab,ab->", &[y, t]).unwrap();
        (b.finish(), l, [x, t, w1, w2])
    }

    #[test]
    fn einsum_chain_gradients_match_finite_differences() {
        let (g, l, [x, t, w1, w2]) = linear_chain();
        let tg = build_training_graph(&g, &TrainOptions::new(LossSpec::Given(l))).unwrap();
        assert_eq!(tg.grads.len(), 2);
        assert!(tg.unused_params.is_empty());
        let mut feeds: HashMap<ValueId, Tensor> = HashMap::new();
        for (i, v) in [x, t, w1, w2].into_iter().enumerate() {
            feeds.insert(v, rand_tensor(&g.ty(v).shape, 10 + i as u64));
        }
        let vals = eval::run(&tg.graph, &feeds).unwrap();
        let loss_at = |feeds: &HashMap<ValueId, Tensor>| {
            eval::run(&g, feeds).unwrap()[l.index()]
                .clone()
                .unwrap()
                .data[0]
        };
        for &(p, gv) in &tg.grads {
            let analytic = vals[gv.index()].clone().unwrap();
            assert_eq!(analytic.shape, g.ty(p).shape);
            for k in 0..analytic.numel() {
                let h = 1e-6;
                let mut fp = feeds.clone();
                fp.get_mut(&p).unwrap().data[k] += h;
                let mut fm = feeds.clone();
                fm.get_mut(&p).unwrap().data[k] -= h;
                let num = (loss_at(&fp) - loss_at(&fm)) / (2.0 * h);
                assert!((num - analytic.data[k]).abs() < 1e-6, "{p}[{k}]");
            }
        }
    }

    #[test]
    fn frozen_params_get_no_gradient_and_no_input_gradient_is_built() {
        let (g, l, [_, _, w1, w2]) = linear_chain();
        let opts = TrainOptions::new(LossSpec::Given(l)).with_frozen(Regex::new("^w1$").unwrap());
        let tg = build_training_graph(&g, &opts).unwrap();
        assert!(matches!(tg.graph.values[w1].def, ValueDef::Buffer { .. }));
        assert_eq!(tg.grads.len(), 1);
        assert_eq!(tg.grads[0].0, w2);
        assert_eq!(tg.graph.values[tg.grads[0].1].name, "w2.grad");
        // only dW2 is needed: w1 frozen and x an input, so no dh / dW1 node
        assert_eq!(tg.graph.nodes.len() - tg.forward_nodes, 2);
        assert_eq!(tg.graph.outputs, vec![l, tg.grads[0].1]);
    }

    #[test]
    fn unreachable_params_are_reported() {
        let (g, l, _) = linear_chain();
        let mut b = GraphBuilder::from_graph(g);
        let stray = b.param("stray", f64t(&[3]));
        let tg = build_training_graph(&b.finish(), &TrainOptions::new(LossSpec::Given(l))).unwrap();
        assert_eq!(tg.unused_params, vec![stray]);
        assert!(tg.grad_of(stray).is_none());
    }

    #[test]
    fn backward_nodes_carry_phase_origin_and_name() {
        let (g, l, _) = linear_chain();
        let tg = build_training_graph(&g, &TrainOptions::new(LossSpec::Given(l))).unwrap();
        for (n, node) in tg.graph.nodes.iter() {
            if n.index() < tg.forward_nodes {
                assert_eq!(node.phase, Phase::Forward);
                continue;
            }
            assert_eq!(node.phase, Phase::Backward);
            let o = node.origin.unwrap();
            assert_eq!(node.name, format!("{}.grad", tg.graph.nodes[o].name));
        }
    }

    #[test]
    fn non_scalar_loss_is_rejected() {
        let (g, _, [x, ..]) = linear_chain();
        let e = build_training_graph(&g, &TrainOptions::new(LossSpec::Given(x))).unwrap_err();
        assert!(e.to_string().contains("not a scalar"), "{e}");
        let e = build_training_graph(&g, &TrainOptions::new(LossSpec::Given(ValueId(999))))
            .unwrap_err();
        assert!(e.to_string().contains("v999"), "{e}");
    }

    #[test]
    fn param_bytes() {
        let p = param_bytes_per_element(Optimizer::AdamW, DTypePolicy::Fp32);
        assert_eq!((p.weights, p.grads, p.optimizer), (4, 4, 8));
        let p = param_bytes_per_element(Optimizer::AdamW, DTypePolicy::Bf16Mixed);
        assert_eq!((p.weights, p.grads, p.optimizer), (6, 2, 8));
        assert_eq!(p.total(), 16);
        let p = param_bytes_per_element(Optimizer::Sgd { momentum: true }, DTypePolicy::Fp32);
        assert_eq!(p.times(10).total(), 120);
        let p = param_bytes_per_element(Optimizer::Sgd { momentum: false }, DTypePolicy::Fp32);
        assert_eq!(p.optimizer, 0);
    }
}
