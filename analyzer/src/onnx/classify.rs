//! Which initializers are trainable parameters, buffers or constants: the corpus's
//! "graph_params rule" (`shared/corpus/MANIFEST.md`), decided from the graph alone.
//!
//! A main-graph initializer of a float type with more than one element is a **parameter**,
//! unless every use of it (node inputs, subgraphs included) is a non-differentiable input:
//! BatchNormalization's running mean / var (those are **buffers**), a shape / index / axes /
//! pads / bounds operand (the table in [`non_differentiable`]), or any input of an op without
//! a gradient (comparisons, logic, `Shape`, ...). Everything else (scalars, integer tensors,
//! float tensors with only non-differentiable uses, unused ones) is a **constant**. Uses by ops
//! of a non-default domain count as differentiable. The exporters store trainable weights as
//! initializers and nothing else marks them, so this rule is what recovers the parameter set.

use super::proto::{GraphProto, NodeProto, TensorProto};
use super::weights::dtype_of;
use std::collections::HashMap;

/// What an initializer becomes.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Class {
    /// Trainable parameter (gets a gradient).
    Param,
    /// Non-trainable state (BatchNorm running statistics).
    Buffer,
    /// A constant: folded when its values are known.
    Constant,
}

/// Whether input `i` of `op_type` (default domain) gets no gradient.
pub fn non_differentiable(op_type: &str, i: usize) -> bool {
    match op_type {
        "Shape" | "Size" | "Equal" | "Less" | "Greater" | "LessOrEqual" | "GreaterOrEqual"
        | "And" | "Or" | "Not" | "Xor" | "IsNaN" | "IsInf" | "NonZero" | "ArgMax" | "ArgMin"
        | "EyeLike" => true,
        "Reshape"
        | "Expand"
        | "Gather"
        | "GatherElements"
        | "GatherND"
        | "ScatterND"
        | "ScatterElements"
        | "Scatter"
        | "Tile"
        | "TopK"
        | "Split"
        | "Unsqueeze"
        | "Squeeze"
        | "CumSum"
        | "Trilu"
        | "Upsample"
        | "SoftmaxCrossEntropyLoss"
        | "NegativeLogLikelihoodLoss" => i == 1,
        "Slice" => (1..=4).contains(&i),
        "Pad" => i == 1 || i == 3,
        "ConstantOfShape" | "Where" => i == 0,
        "Range" => i <= 2,
        "OneHot" => i <= 1,
        "Resize" => (1..=3).contains(&i),
        "Dropout" => i == 1 || i == 2,
        "BatchNormalization" => i == 3 || i == 4,
        op if op.starts_with("Reduce") => i == 1,
        _ => false,
    }
}

fn is_default_domain(d: &str) -> bool {
    d.is_empty() || d == "ai.onnx"
}

#[derive(Default, Clone, Copy)]
struct Uses {
    differentiable: bool,
    running_stat: bool,
}

fn collect_uses(nodes: &[NodeProto], uses: &mut HashMap<&str, Uses>) {
    for n in nodes {
        for (i, name) in n.input.iter().enumerate() {
            if let Some(u) = uses.get_mut(name.as_str()) {
                let default = is_default_domain(&n.domain);
                if !default || !non_differentiable(&n.op_type, i) {
                    u.differentiable = true;
                } else if n.op_type == "BatchNormalization" {
                    u.running_stat = true;
                }
            }
        }
        for a in &n.attribute {
            if let Some(g) = &a.g {
                collect_uses(&g.node, uses);
            }
            for g in &a.graphs {
                collect_uses(&g.node, uses);
            }
        }
    }
}

fn numel(t: &TensorProto) -> i128 {
    t.dims.iter().map(|&d| d as i128).product()
}

/// The class of every initializer of `graph`, by name.
pub fn classify(graph: &GraphProto) -> HashMap<String, Class> {
    let mut uses: HashMap<&str, Uses> = graph
        .initializer
        .iter()
        .map(|t| (t.name.as_str(), Uses::default()))
        .collect();
    collect_uses(&graph.node, &mut uses);
    graph
        .initializer
        .iter()
        .map(|t| {
            let float = dtype_of(t.data_type).is_some_and(|d| d.is_float());
            let u = uses.get(t.name.as_str()).copied().unwrap_or_default();
            let class = if !float || numel(t) <= 1 {
                Class::Constant
            } else if u.differentiable {
                Class::Param
            } else if u.running_stat {
                Class::Buffer
            } else {
                Class::Constant
            };
            (t.name.clone(), class)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onnx::proto::data_type;

    fn node(op: &str, inputs: &[&str]) -> NodeProto {
        NodeProto {
            op_type: op.into(),
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![format!("{op}_out")],
            ..Default::default()
        }
    }
    fn init(name: &str, dims: &[i64], dt: i32) -> TensorProto {
        TensorProto {
            name: name.into(),
            dims: dims.to_vec(),
            data_type: dt,
            ..Default::default()
        }
    }

    #[test]
    fn follows_the_graph_params_rule() {
        let g = GraphProto {
            node: vec![
                node("MatMul", &["x", "w"]),
                node("BatchNormalization", &["x", "s", "b", "mean", "var"]),
                node("Where", &["cond_f", "x", "y"]),
                node("Shape", &["w_shape_only"]),
                node("Mul", &["x", "scalar"]),
                node("Reshape", &["x", "shape"]),
                node("Pad", &["x", "pads_f", "padval"]),
            ],
            initializer: vec![
                init("w", &[4, 4], data_type::FLOAT),
                init("s", &[4], data_type::FLOAT),
                init("b", &[4], data_type::FLOAT),
                init("mean", &[4], data_type::FLOAT),
                init("var", &[4], data_type::FLOAT16),
                init("cond_f", &[4], data_type::FLOAT),
                init("w_shape_only", &[4, 4], data_type::FLOAT),
                init("scalar", &[], data_type::FLOAT),
                init("shape", &[2], data_type::INT64),
                init("pads_f", &[4], data_type::FLOAT),
                init("padval", &[2], data_type::FLOAT),
                init("unused", &[2], data_type::FLOAT),
            ],
            ..Default::default()
        };
        let c = classify(&g);
        let want = [
            ("w", Class::Param),
            ("s", Class::Param),
            ("b", Class::Param),
            ("mean", Class::Buffer),
            ("var", Class::Buffer),
            ("cond_f", Class::Constant),
            ("w_shape_only", Class::Constant),
            ("scalar", Class::Constant),
            ("shape", Class::Constant),
            ("pads_f", Class::Constant),
            ("padval", Class::Param),
            ("unused", Class::Constant),
        ];
        for (name, class) in want {
            assert_eq!(c[name], class, "{name}");
        }
    }

    #[test]
    fn non_default_domain_uses_are_differentiable() {
        let mut n = node("Shape", &["w"]);
        n.domain = "com.example".into();
        let g = GraphProto {
            node: vec![n],
            initializer: vec![init("w", &[2, 2], data_type::FLOAT)],
            ..Default::default()
        };
        assert_eq!(classify(&g)["w"], Class::Param);
    }
}
