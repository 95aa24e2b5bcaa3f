//! The graph IR: ops over tensor values, in one topologically ordered node list.
//!
//! A `Graph` owns its values and nodes (`PrimaryMap`s keyed by `ValueId` / `NodeId`). A value is
//! defined exactly once: a graph input, a parameter or buffer (weights), a constant, or the output
//! of a node. Nodes are stored in execution order; passes append or rebuild, never reorder in
//! place. Types (dtype + concrete shape) are inferred when a node is added, so every value always
//! has a type.

use crate::dtype::TensorType;
use crate::entity::PrimaryMap;
use crate::ops::Op;
use crate::tensor::Tensor;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

crate::entity_id!(
    /// A tensor value of the graph (`v3`).
    ValueId,
    "v"
);
crate::entity_id!(
    /// An op node of the graph (`n12`).
    NodeId,
    "n"
);

/// Where the bytes of a weight live.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum WeightData {
    /// Raw little-endian bytes held in memory (ONNX inline initializer).
    Inline(#[serde(skip)] Arc<Vec<u8>>),
    /// Bytes in an external file (ONNX external data), read when the weights are needed.
    External {
        path: String,
        offset: u64,
        length: u64,
    },
    /// Only dims and dtype are known (graph-only exports, built-in models): planning still works,
    /// running initialises the weight deterministically.
    Absent,
}

/// How a value comes into being.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum ValueDef {
    /// A graph input (data fed per step: tokens, images, labels).
    Input,
    /// A trainable weight: gets a gradient and optimizer state.
    Param { data: WeightData },
    /// A weight that gets no gradient: frozen by the user, BatchNorm running statistics, or a
    /// float initializer that only reaches non-differentiable inputs.
    Buffer { data: WeightData },
    /// A constant with known values (folded shape arithmetic, small tables).
    Const(Arc<Tensor>),
    /// Output `index` of `node`.
    Node { node: NodeId, index: usize },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ValueData {
    pub ty: TensorType,
    /// Source name (ONNX value name, parameter path); may be empty.
    pub name: String,
    pub def: ValueDef,
}

/// Which part of the training step a node belongs to.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Phase {
    #[default]
    Forward,
    Backward,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NodeData {
    pub op: Op,
    pub inputs: Vec<ValueId>,
    pub outputs: Vec<ValueId>,
    /// Source name (ONNX node name, module path); may be empty.
    pub name: String,
    pub phase: Phase,
    /// For backward nodes: the forward node whose vjp created this node.
    pub origin: Option<NodeId>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Graph {
    pub values: PrimaryMap<ValueId, ValueData>,
    pub nodes: PrimaryMap<NodeId, NodeData>,
    /// Graph inputs in signature order (each has `ValueDef::Input`).
    pub inputs: Vec<ValueId>,
    /// Graph outputs in signature order.
    pub outputs: Vec<ValueId>,
}

impl Graph {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn ty(&self, v: ValueId) -> &TensorType {
        &self.values[v].ty
    }
    pub fn value(&self, v: ValueId) -> &ValueData {
        &self.values[v]
    }
    pub fn node(&self, n: NodeId) -> &NodeData {
        &self.nodes[n]
    }
    /// `n12 "h.0.attn.c_attn"` (or `n12` when unnamed): how errors and dumps name a node.
    pub fn node_label(&self, n: NodeId) -> String {
        let name = &self.nodes[n].name;
        if name.is_empty() {
            n.to_string()
        } else {
            format!("{n} {name:?}")
        }
    }
    pub fn value_label(&self, v: ValueId) -> String {
        let name = &self.values[v].name;
        if name.is_empty() {
            v.to_string()
        } else {
            format!("{v} {name:?}")
        }
    }
    /// The node defining `v`, if a node does.
    pub fn producer(&self, v: ValueId) -> Option<NodeId> {
        match self.values[v].def {
            ValueDef::Node { node, .. } => Some(node),
            _ => None,
        }
    }
    pub fn is_param(&self, v: ValueId) -> bool {
        matches!(self.values[v].def, ValueDef::Param { .. })
    }
    /// Parameters in value order.
    pub fn params(&self) -> impl Iterator<Item = ValueId> + '_ {
        self.values
            .iter()
            .filter(|(_, d)| matches!(d.def, ValueDef::Param { .. }))
            .map(|(v, _)| v)
    }
    /// Buffers in value order.
    pub fn buffers(&self) -> impl Iterator<Item = ValueId> + '_ {
        self.values
            .iter()
            .filter(|(_, d)| matches!(d.def, ValueDef::Buffer { .. }))
            .map(|(v, _)| v)
    }
    /// Number of trainable parameter elements.
    pub fn param_count(&self) -> usize {
        self.params().map(|v| self.values[v].ty.numel()).sum()
    }
    /// For each value, the nodes that read it, in node order.
    pub fn users(&self) -> Vec<Vec<NodeId>> {
        let mut users = vec![Vec::new(); self.values.len()];
        for (n, node) in self.nodes.iter() {
            for &v in &node.inputs {
                if users[v.0 as usize].last() != Some(&n) {
                    users[v.0 as usize].push(n);
                }
            }
        }
        users
    }
    pub fn const_value(&self, v: ValueId) -> Option<&Arc<Tensor>> {
        match &self.values[v].def {
            ValueDef::Const(t) => Some(t),
            _ => None,
        }
    }
    pub fn find_value(&self, name: &str) -> Option<ValueId> {
        self.values
            .iter()
            .find(|(_, d)| d.name == name)
            .map(|(v, _)| v)
    }
}
