//! `GraphBuilder`: the one way nodes are added to a graph (importers, built-in models, vjps).
//!
//! Adding a node infers its output types at once, so a graph under construction is always
//! typed; a failure names the node and its op. With `fold_constants` on (the importers), a node
//! whose inputs are all constants and whose outputs are small is evaluated on the spot and its
//! outputs become constants: this is how exporters' shape arithmetic disappears.
//! Op-specific helpers (`b.einsum(..)`, `b.reshape(..)`) live in each op's file.

use crate::dtype::{DType, TensorType};
use crate::error::{AnalyzerError, OpError};
use crate::graph::{Graph, NodeData, NodeId, Phase, ValueData, ValueDef, ValueId, WeightData};
use crate::ops::Op;
use crate::tensor::Tensor;
use std::sync::Arc;

/// Outputs up to this many elements are folded when all inputs are constant.
pub const FOLD_MAX_ELEMENTS: usize = 1 << 16;

#[derive(Clone, Debug, Default)]
pub struct GraphBuilder {
    pub graph: Graph,
    /// Phase stamped on new nodes.
    pub phase: Phase,
    /// Origin stamped on new nodes (the forward node whose vjp is being emitted).
    pub origin: Option<NodeId>,
    /// Fold nodes with constant inputs into constants.
    pub fold_constants: bool,
    scope: Vec<String>,
    /// Name given to the next node (then cleared); otherwise the scope path is used.
    next_name: Option<String>,
}

impl GraphBuilder {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn from_graph(graph: Graph) -> Self {
        Self {
            graph,
            ..Self::default()
        }
    }
    pub fn finish(self) -> Graph {
        self.graph
    }
    pub fn ty(&self, v: ValueId) -> &TensorType {
        self.graph.ty(v)
    }

    /// Enters a name scope (`h.0`, `attn`): nodes are named by the joined path.
    pub fn push_scope(&mut self, name: impl Into<String>) {
        self.scope.push(name.into());
    }
    pub fn pop_scope(&mut self) {
        self.scope.pop();
    }
    /// Runs `f` inside a name scope.
    pub fn scoped<T>(&mut self, name: impl Into<String>, f: impl FnOnce(&mut Self) -> T) -> T {
        self.push_scope(name);
        let r = f(self);
        self.pop_scope();
        r
    }
    /// The dotted scope path joined with `leaf`.
    pub fn path(&self, leaf: &str) -> String {
        let mut parts: Vec<&str> = self.scope.iter().map(|s| s.as_str()).collect();
        if !leaf.is_empty() {
            parts.push(leaf);
        }
        parts.join(".")
    }
    /// Names the next node added.
    pub fn name_next(&mut self, name: impl Into<String>) -> &mut Self {
        self.next_name = Some(name.into());
        self
    }

    fn add_value(&mut self, name: String, ty: TensorType, def: ValueDef) -> ValueId {
        self.graph.values.push(ValueData { ty, name, def })
    }
    /// A graph input (appended to the signature).
    pub fn input(&mut self, name: impl Into<String>, ty: TensorType) -> ValueId {
        let v = self.add_value(name.into(), ty, ValueDef::Input);
        self.graph.inputs.push(v);
        v
    }
    /// A trainable parameter named by the scope path + `leaf`, data absent.
    pub fn param(&mut self, leaf: &str, ty: TensorType) -> ValueId {
        let name = self.path(leaf);
        self.add_value(
            name,
            ty,
            ValueDef::Param {
                data: WeightData::Absent,
            },
        )
    }
    pub fn param_with(
        &mut self,
        name: impl Into<String>,
        ty: TensorType,
        data: WeightData,
    ) -> ValueId {
        self.add_value(name.into(), ty, ValueDef::Param { data })
    }
    pub fn buffer(&mut self, leaf: &str, ty: TensorType) -> ValueId {
        let name = self.path(leaf);
        self.add_value(
            name,
            ty,
            ValueDef::Buffer {
                data: WeightData::Absent,
            },
        )
    }
    pub fn buffer_with(
        &mut self,
        name: impl Into<String>,
        ty: TensorType,
        data: WeightData,
    ) -> ValueId {
        self.add_value(name.into(), ty, ValueDef::Buffer { data })
    }
    pub fn constant(&mut self, t: Tensor) -> ValueId {
        let ty = t.ty();
        self.add_value(String::new(), ty, ValueDef::Const(Arc::new(t)))
    }
    pub fn named_constant(&mut self, name: impl Into<String>, t: Tensor) -> ValueId {
        let ty = t.ty();
        self.add_value(name.into(), ty, ValueDef::Const(Arc::new(t)))
    }
    pub fn scalar(&mut self, dtype: DType, value: f64) -> ValueId {
        self.constant(Tensor::scalar(dtype, value))
    }
    pub fn output(&mut self, v: ValueId) {
        self.graph.outputs.push(v);
    }

    /// Adds a node, inferring its output types. Errors name the node and its op.
    pub fn node(
        &mut self,
        op: impl Into<Op>,
        inputs: &[ValueId],
    ) -> Result<Vec<ValueId>, AnalyzerError> {
        let op = op.into();
        let name = self.next_name.take().unwrap_or_else(|| self.path(""));
        let in_tys: Vec<&TensorType> = inputs.iter().map(|&v| self.graph.ty(v)).collect();
        let out_tys = op.spec().infer(&in_tys).map_err(|e| AnalyzerError::Node {
            node: if name.is_empty() {
                format!("n{}", self.graph.nodes.len())
            } else {
                format!("n{} {name:?}", self.graph.nodes.len())
            },
            op: op.name().to_string(),
            reason: e.0,
        })?;
        if self.fold_constants
            && !inputs.is_empty()
            && out_tys.iter().all(|t| t.numel() <= FOLD_MAX_ELEMENTS)
        {
            let consts: Option<Vec<&Tensor>> = inputs
                .iter()
                .map(|&v| self.graph.const_value(v).map(|t| t.as_ref()))
                .collect();
            if let Some(consts) = consts {
                if let Ok(outs) = op.spec().eval(&consts) {
                    return Ok(outs
                        .into_iter()
                        .map(|t| self.named_constant(name.clone(), t))
                        .collect());
                }
            }
        }
        let node = NodeId(self.graph.nodes.len() as u32);
        let outputs: Vec<ValueId> = out_tys
            .into_iter()
            .enumerate()
            .map(|(index, ty)| {
                let vname = if name.is_empty() {
                    String::new()
                } else if index == 0 {
                    name.clone()
                } else {
                    format!("{name}:{index}")
                };
                self.add_value(vname, ty, ValueDef::Node { node, index })
            })
            .collect();
        self.graph.nodes.push(NodeData {
            op,
            inputs: inputs.to_vec(),
            outputs: outputs.clone(),
            name,
            phase: self.phase,
            origin: self.origin,
        });
        Ok(outputs)
    }

    /// Adds a single-output node (or takes the first output).
    pub fn node1(
        &mut self,
        op: impl Into<Op>,
        inputs: &[ValueId],
    ) -> Result<ValueId, AnalyzerError> {
        let outs = self.node(op, inputs)?;
        outs.first()
            .copied()
            .ok_or_else(|| AnalyzerError::Other("op produced no output".into()))
    }

    /// Like [`node1`](Self::node1) for use inside a vjp (error kept as an `OpError`).
    pub fn emit(&mut self, op: impl Into<Op>, inputs: &[ValueId]) -> Result<ValueId, OpError> {
        self.node1(op, inputs).map_err(|e| OpError(e.to_string()))
    }
    /// All outputs, inside a vjp.
    pub fn emit_n(
        &mut self,
        op: impl Into<Op>,
        inputs: &[ValueId],
    ) -> Result<Vec<ValueId>, OpError> {
        self.node(op, inputs).map_err(|e| OpError(e.to_string()))
    }

    /// Zeros of `ty`: a scalar constant broadcast by an `expand` node.
    pub fn zeros(&mut self, ty: &TensorType) -> Result<ValueId, OpError> {
        let z = self.scalar(ty.dtype, 0.0);
        if ty.shape.is_empty() {
            return Ok(z);
        }
        self.emit(
            crate::ops::Expand {
                shape: ty.shape.clone(),
            },
            &[z],
        )
    }
}
