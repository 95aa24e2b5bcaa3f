//! The import driver: opset check, initializers, graph inputs, one lowering per node in file
//! order (ONNX graphs are topologically sorted), graph outputs.
//!
//! Without input overrides every value's inferred type is checked against the type the file
//! declares for it (graph outputs and `value_info`), so a lowering that disagrees with the
//! exporter fails at the node that went wrong rather than somewhere downstream.

use super::classify::{classify, Class};
use super::compact::drop_unused_constants;
use super::lower::{LowerError, Lowering};
use super::ops;
use super::proto::{GraphProto, ModelProto, NodeProto, TypeProto, ValueInfoProto};
use super::weights::{self, declared_type, dtype_or_err, Payload};
use super::{ImportOptions, ImportedModel, MAX_OPSET, MIN_OPSET};
use crate::dtype::TensorType;
use crate::error::AnalyzerError;
use crate::graph::ValueId;
use std::collections::{HashMap, HashSet};
use std::path::Path;

fn is_default_domain(d: &str) -> bool {
    d.is_empty() || d == "ai.onnx"
}

/// How errors name a node: `node "/h.0/attn/MatMul"`, or `node #12` when unnamed.
fn node_label(node: &NodeProto, index: usize) -> String {
    if node.name.is_empty() {
        format!("node #{index}")
    } else {
        format!("node {:?}", node.name)
    }
}

fn node_error(node: &NodeProto, index: usize, reason: String) -> AnalyzerError {
    AnalyzerError::Node {
        node: node_label(node, index),
        op: node.op_type.clone(),
        reason,
    }
}

pub fn import_model(
    mut model: ModelProto,
    base_dir: &Path,
    opts: &ImportOptions,
) -> Result<ImportedModel, AnalyzerError> {
    let opset = default_opset(&model)?;
    let producer = format!("{} {}", model.producer_name, model.producer_version)
        .trim()
        .to_string();
    let Some(mut graph) = model.graph.take() else {
        return Err(AnalyzerError::Other(
            "not an ONNX model: it has no graph".into(),
        ));
    };
    let functions: HashSet<(String, String)> = model
        .functions
        .iter()
        .map(|f| (f.domain.clone(), f.name.clone()))
        .collect();

    let mut b = super::importer_builder();
    let mut values: HashMap<String, ValueId> = HashMap::new();

    // Initializers first: they may shadow graph inputs of the same name (IR version < 4).
    let classes = classify(&graph);
    for mut t in std::mem::take(&mut graph.initializer) {
        let class = classes.get(&t.name).copied().unwrap_or(Class::Constant);
        let name = t.name.clone();
        let v = add_initializer(&mut b, &mut t, class, base_dir).map_err(AnalyzerError::Other)?;
        values.insert(name, v);
    }

    add_inputs(&mut b, &graph, opts, &mut values)?;

    // Declared types are checked only when the inputs have the file's own shapes.
    let declared: HashMap<&str, &TypeProto> = if opts.input_overrides.is_empty() {
        graph
            .value_info
            .iter()
            .chain(&graph.output)
            .filter_map(|vi| vi.r#type.as_ref().map(|t| (vi.name.as_str(), t)))
            .collect()
    } else {
        HashMap::new()
    };

    let mut sce_loss: Option<ValueId> = None;
    for (index, node) in graph.node.iter().enumerate() {
        lower_node(
            &mut b,
            node,
            index,
            opset,
            base_dir,
            &functions,
            &mut values,
            &declared,
        )?;
        if node.op_type == "SoftmaxCrossEntropyLoss" && sce_loss.is_none() {
            sce_loss = node.output.first().and_then(|o| values.get(o)).copied();
        }
    }

    let mut loss = None;
    for vi in &graph.output {
        let Some(&v) = values.get(&vi.name) else {
            return Err(AnalyzerError::Other(format!(
                "graph output {:?} is never produced (no node, input or initializer has that name)",
                vi.name
            )));
        };
        if let Some(tp) = vi
            .r#type
            .as_ref()
            .filter(|_| opts.input_overrides.is_empty())
        {
            if let Some(why) = type_mismatch(b.ty(v), tp) {
                return Err(AnalyzerError::Other(format!(
                    "graph output {:?}: {why}",
                    vi.name
                )));
            }
        }
        if vi.name == "loss" && b.ty(v).dtype.is_float() && b.ty(v).numel() == 1 {
            loss = Some(v);
        }
        b.output(v);
    }
    let loss = loss.or(sce_loss);

    // the exporters' decompositions become the ops TorchScript keeps whole, then the
    // constants nothing reads any more (folded shape arithmetic, the rewritten formulas'
    // scalars) go
    let (g, rewritten) = super::patterns::normalize(b.finish());
    let (g, compacted) = drop_unused_constants(g);
    let loss = loss
        .and_then(|v| rewritten.get(v.0 as usize).copied().flatten())
        .and_then(|v| compacted.get(v.0 as usize).copied().flatten());
    crate::verify::debug_verify(&g)?;
    Ok(ImportedModel {
        graph: g,
        loss,
        opset,
        producer,
    })
}

/// The opset of the default domain, within the supported range.
fn default_opset(model: &ModelProto) -> Result<i64, AnalyzerError> {
    let Some(op) = model
        .opset_import
        .iter()
        .find(|o| is_default_domain(&o.domain))
    else {
        return Err(AnalyzerError::Other(
            "the model imports no opset of the default ONNX domain".into(),
        ));
    };
    if !(MIN_OPSET..=MAX_OPSET).contains(&op.version) {
        return Err(AnalyzerError::Other(format!(
            "opset {} of the default ONNX domain is not supported (supported: {MIN_OPSET} to \
             {MAX_OPSET}); re-export with torch.onnx.export(..., opset_version=17 or 18)",
            op.version
        )));
    }
    Ok(op.version)
}

fn add_initializer(
    b: &mut crate::GraphBuilder,
    t: &mut super::proto::TensorProto,
    class: Class,
    base_dir: &Path,
) -> Result<ValueId, String> {
    let ty = weights::tensor_type(t)?;
    let what = format!("initializer {:?}", t.name);
    let payload = weights::take_payload(t, &ty, base_dir)?;
    let name = std::mem::take(&mut t.name);
    Ok(match class {
        Class::Param => b.param_with(name, ty, weights::weight_data(payload)),
        Class::Buffer => b.buffer_with(name, ty, weights::weight_data(payload)),
        Class::Constant => match payload {
            Payload::Inline(bytes) => b.named_constant(name, weights::decode(&ty, &bytes, &what)?),
            Payload::External {
                path,
                offset,
                length,
            } if length <= weights::CONST_READ_MAX_BYTES => {
                let bytes = weights::read_external(&path, offset, length)?;
                b.named_constant(name, weights::decode(&ty, &bytes, &what)?)
            }
            p => b.buffer_with(name, ty, weights::weight_data(p)),
        },
    })
}

fn add_inputs(
    b: &mut crate::GraphBuilder,
    graph: &GraphProto,
    opts: &ImportOptions,
    values: &mut HashMap<String, ValueId>,
) -> Result<(), AnalyzerError> {
    let real: Vec<&ValueInfoProto> = graph
        .input
        .iter()
        .filter(|vi| !values.contains_key(&vi.name))
        .collect();
    for o in &opts.input_overrides {
        if !real.iter().any(|vi| vi.name == o.name) {
            let names: Vec<&str> = real.iter().map(|vi| vi.name.as_str()).collect();
            return Err(AnalyzerError::Input {
                name: o.name.clone(),
                reason: format!(
                    "no graph input has this name (inputs: {})",
                    names.join(", ")
                ),
            });
        }
    }
    for vi in real {
        let err = |reason: String| AnalyzerError::Input {
            name: vi.name.clone(),
            reason,
        };
        let declared = vi.r#type.as_ref().and_then(declared_type);
        let over = opts.input_overrides.iter().find(|o| o.name == vi.name);
        let dtype = match (over.and_then(|o| o.dtype), &declared) {
            (Some(d), _) => d,
            (None, Some((code, _))) => dtype_or_err(*code, "it").map_err(err)?,
            (None, None) => {
                return Err(err(
                    "its type is not a tensor of known rank; give its shape and dtype with \
                     --input NAME=SHAPE:DTYPE"
                        .into(),
                ))
            }
        };
        let shape = match over {
            Some(o) => o.shape.clone(),
            None => {
                let dims = declared
                    .as_ref()
                    .map(|(_, d)| d.as_slice())
                    .unwrap_or_default();
                let mut shape = Vec::with_capacity(dims.len());
                for (i, d) in dims.iter().enumerate() {
                    match d {
                        Some(n) => shape.push(*n as usize),
                        None => {
                            let sym = symbolic_dim(vi, i);
                            return Err(err(format!(
                                "dim {i}{sym} is dynamic; give the shape with --input {}=SHAPE",
                                vi.name
                            )));
                        }
                    }
                }
                shape
            }
        };
        if shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .is_none()
        {
            return Err(err(format!("shape {shape:?} has too many elements")));
        }
        let v = b.input(vi.name.clone(), TensorType::new(dtype, shape));
        values.insert(vi.name.clone(), v);
    }
    Ok(())
}

/// ` ("batch")` when the dim has a symbolic name.
fn symbolic_dim(vi: &ValueInfoProto, i: usize) -> String {
    use super::proto::tensor_shape_proto::dimension::Value;
    use super::proto::type_proto::Value as T;
    let name = vi.r#type.as_ref().and_then(|t| match &t.value {
        Some(T::TensorType(tt)) => {
            tt.shape
                .as_ref()
                .and_then(|s| s.dim.get(i))
                .and_then(|d| match &d.value {
                    Some(Value::DimParam(p)) if !p.is_empty() => Some(p.clone()),
                    _ => None,
                })
        }
        _ => None,
    });
    name.map(|n| format!(" ({n:?})")).unwrap_or_default()
}

/// Why `ty` disagrees with a declared type, if it does (unknown dims match anything).
fn type_mismatch(ty: &TensorType, tp: &TypeProto) -> Option<String> {
    let (code, dims) = declared_type(tp)?;
    let dtype_ok = weights::dtype_of(code).is_none_or(|d| d == ty.dtype);
    let shape_ok = dims.len() == ty.rank()
        && dims
            .iter()
            .zip(&ty.shape)
            .all(|(d, &n)| d.is_none_or(|d| d as usize == n));
    if dtype_ok && shape_ok {
        return None;
    }
    let dims_s: Vec<String> = dims
        .iter()
        .map(|d| d.map(|d| d.to_string()).unwrap_or_else(|| "?".into()))
        .collect();
    let dt = weights::dtype_of(code)
        .map(|d| d.to_string())
        .unwrap_or_else(|| super::proto::data_type::name(code));
    Some(format!(
        "inferred as {ty} but the model declares {dt}[{}]",
        dims_s.join(",")
    ))
}

#[allow(clippy::too_many_arguments)]
fn lower_node(
    b: &mut crate::GraphBuilder,
    node: &NodeProto,
    index: usize,
    opset: i64,
    base_dir: &Path,
    functions: &HashSet<(String, String)>,
    values: &mut HashMap<String, ValueId>,
    declared: &HashMap<&str, &TypeProto>,
) -> Result<(), AnalyzerError> {
    if !is_default_domain(&node.domain) {
        let why = if functions.contains(&(node.domain.clone(), node.op_type.clone())) {
            "calls a model-local function, which the importer does not inline"
        } else {
            "ops outside the default ONNX domain are not supported"
        };
        return Err(AnalyzerError::Node {
            node: node_label(node, index),
            op: format!("{}:{}", node.domain, node.op_type),
            reason: format!("domain {:?}: {why}", node.domain),
        });
    }
    let Some(lower) = ops::lookup(&node.op_type) else {
        return Err(node_error(
            node,
            index,
            format!("unsupported op {:?} (opset {opset})", node.op_type),
        ));
    };
    let mut inputs = Vec::with_capacity(node.input.len());
    for name in &node.input {
        if name.is_empty() {
            inputs.push(None);
            continue;
        }
        match values.get(name) {
            Some(&v) => inputs.push(Some(v)),
            None => {
                return Err(node_error(
                    node,
                    index,
                    format!(
                        "input {name:?} is never produced (no graph input, initializer or \
                         earlier node output has that name)"
                    ),
                ))
            }
        }
    }
    let first_new = b.graph.values.len();
    let scope = if node.name.is_empty() {
        format!("{}_{index}", node.op_type)
    } else {
        node.name.clone()
    };
    b.push_scope(scope);
    let mut cx = Lowering {
        b: &mut *b,
        node,
        opset,
        index,
        base_dir,
        inputs,
    };
    let result = lower(&mut cx);
    b.pop_scope();
    let outs = result.map_err(|e| {
        node_error(
            node,
            index,
            match e {
                LowerError::Msg(m) => m,
                LowerError::Builder(e) => e.to_string(),
            },
        )
    })?;
    for (i, name) in node.output.iter().enumerate() {
        if name.is_empty() {
            continue;
        }
        let Some(&v) = outs.get(i) else {
            return Err(node_error(
                node,
                index,
                format!("output {i} ({name:?}) is not supported by the importer"),
            ));
        };
        if v.0 as usize >= first_new {
            b.graph.values[v].name = name.clone();
        }
        if let Some(tp) = declared.get(name.as_str()) {
            if let Some(why) = type_mismatch(b.ty(v), tp) {
                return Err(node_error(node, index, format!("output {name:?} is {why}")));
            }
        }
        if values.insert(name.clone(), v).is_some() {
            return Err(node_error(
                node,
                index,
                format!("output {name:?} is defined twice (ONNX values are assigned once)"),
            ));
        }
    }
    Ok(())
}
