//! The import driver: graph inputs (shapes from the example inputs `torch.jit.trace` stored, or
//! the user's overrides), one lowering per node in order (an inlined TorchScript graph is
//! straight-line and topologically ordered), graph outputs, the loss.

use crate::dump::{dtype_of, Dump, DumpValue, Node, TensorInfo};
use crate::ffi::Archive;
use crate::lower::{Cx, LowerError, Val};
use crate::ops;
use crate::TorchScriptModel;
use autopar_analyzer::builder::FOLD_MAX_ELEMENTS;
use autopar_analyzer::dtype::TensorType;
use autopar_analyzer::graph::WeightData;
use autopar_analyzer::onnx::compact::drop_unused_constants;
use autopar_analyzer::onnx::ImportOptions;
use autopar_analyzer::{AnalyzerError, DType, GraphBuilder, Tensor, ValueId};
use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;

/// `input_ids.1` -> `input_ids`: libtorch's uniquing suffix dropped.
pub fn clean_name(debug: &str) -> &str {
    match debug.rsplit_once('.') {
        Some((base, n)) if !base.is_empty() && n.chars().all(|c| c.is_ascii_digit()) => base,
        _ => debug,
    }
}

fn node_error(node: &Node, reason: String) -> AnalyzerError {
    AnalyzerError::Node {
        node: node.label(),
        op: node.schema.clone().unwrap_or_else(|| node.kind.clone()),
        reason,
    }
}

/// Reads the bytes of tensor-table entry `i` (`len` bytes).
pub type TensorBytes<'a> = &'a dyn Fn(usize, usize) -> Result<Vec<u8>, String>;

struct Importer<'a> {
    bytes: TensorBytes<'a>,
    dump: &'a Dump,
    b: GraphBuilder,
    vals: HashMap<u64, Val>,
    /// IR value of each entry of the tensor table, once used.
    tensors: HashMap<usize, ValueId>,
    /// Tensor-table entries used as BatchNorm running statistics (they stay buffers).
    running_stats: HashSet<usize>,
}

impl Importer<'_> {
    /// The IR value of tensor-table entry `i`: a parameter, a buffer or a constant.
    fn tensor(&mut self, i: usize) -> Result<ValueId, String> {
        if let Some(&v) = self.tensors.get(&i) {
            return Ok(v);
        }
        let Some(info) = self.dump.tensors.get(i) else {
            return Err(format!("tensor #{i} is not in the archive's table"));
        };
        let v = self.new_tensor(i, info)?;
        self.tensors.insert(i, v);
        Ok(v)
    }

    fn new_tensor(&mut self, i: usize, info: &TensorInfo) -> Result<ValueId, String> {
        let what = format!("tensor {:?}", info.name);
        let dtype = dtype_of(&info.dtype)
            .ok_or_else(|| format!("{what} has dtype {} (not supported)", info.dtype))?;
        let shape: Vec<usize> = info
            .shape
            .iter()
            .map(|&d| usize::try_from(d).map_err(|_| format!("{what} has shape {:?}", info.shape)))
            .collect::<Result<_, _>>()?;
        let ty = TensorType::new(dtype, shape.clone());
        let nbytes = ty.size_bytes();
        let read = self.bytes;
        let bytes =
            || -> Result<Vec<u8>, String> { read(i, nbytes).map_err(|e| format!("{what}: {e}")) };
        let data = || -> Result<WeightData, String> {
            Ok(if info.stripped {
                WeightData::Absent
            } else {
                WeightData::Inline(Arc::new(bytes()?))
            })
        };
        let name = info.name.clone();
        let keep_buffer = info.role == "buffer" && self.running_stats.contains(&i);
        Ok(match info.role.as_str() {
            "param" if dtype.is_float() => self.b.param_with(name, ty, data()?),
            "param" => self.b.buffer_with(name, ty, data()?),
            _ if keep_buffer => self.b.buffer_with(name, ty, data()?),
            _ if info.stripped || ty.numel() > FOLD_MAX_ELEMENTS => {
                self.b.buffer_with(name, ty, data()?)
            }
            _ => {
                let t = Tensor::from_le_bytes(dtype, shape, &bytes()?)
                    .ok_or_else(|| format!("{what}: its bytes do not match its shape"))?;
                self.b.named_constant(name, t)
            }
        })
    }

    fn value(&mut self, v: &DumpValue) -> Result<Val, String> {
        Ok(match v {
            DumpValue::None => Val::None,
            DumpValue::Bool(b) => Val::Bool(*b),
            DumpValue::Int(i) => Val::Int(*i),
            DumpValue::Float(f) => Val::Float(f.value()),
            DumpValue::Str(s) => Val::Str(s.clone()),
            DumpValue::Device(d) => Val::Device(d.clone()),
            DumpValue::Tensor(i) => Val::Tensor(self.tensor(*i)?),
            DumpValue::List(items) => Val::List(
                items
                    .iter()
                    .map(|x| self.value(x))
                    .collect::<Result<_, _>>()?,
            ),
            DumpValue::Tuple(items) => Val::Tuple(
                items
                    .iter()
                    .map(|x| self.value(x))
                    .collect::<Result<_, _>>()?,
            ),
            DumpValue::Unsupported(t) => Val::Unsupported(t.clone()),
        })
    }

    fn inputs(&mut self, opts: &ImportOptions) -> Result<(), AnalyzerError> {
        let names: Vec<&str> = self
            .dump
            .inputs
            .iter()
            .map(|i| clean_name(&i.name))
            .collect();
        for o in &opts.input_overrides {
            let known = self
                .dump
                .inputs
                .iter()
                .any(|i| i.name == o.name || clean_name(&i.name) == o.name);
            if !known {
                return Err(AnalyzerError::Input {
                    name: o.name.clone(),
                    reason: format!(
                        "no graph input has this name (inputs: {})",
                        names.join(", ")
                    ),
                });
            }
        }
        for inp in &self.dump.inputs {
            let name = clean_name(&inp.name).to_string();
            let err = |reason: String| AnalyzerError::Input {
                name: name.clone(),
                reason,
            };
            if inp.ty != "Tensor" {
                return Err(err(format!(
                    "inputs of type {} are not supported (only tensors)",
                    inp.ty
                )));
            }
            let ov = opts
                .input_overrides
                .iter()
                .find(|o| o.name == inp.name || o.name == name);
            let traced = inp.traced.as_ref().filter(|t| !t.dtype.is_empty());
            let shape = match (ov, traced) {
                (Some(o), _) => o.shape.clone(),
                (None, Some(t)) => t
                    .shape
                    .iter()
                    .map(|&d| usize::try_from(d))
                    .collect::<Result<_, _>>()
                    .map_err(|_| err(format!("recorded shape {:?} is negative", t.shape)))?,
                (None, None) => {
                    return Err(err(format!(
                        "the archive records no example shape for it (not saved by \
                         torch.jit.trace): give one with --input {name}=DIMS[:dtype]"
                    )))
                }
            };
            let dtype = match (ov.and_then(|o| o.dtype), traced) {
                (Some(d), _) => d,
                (None, Some(t)) => dtype_of(&t.dtype)
                    .ok_or_else(|| err(format!("recorded dtype {} is not supported", t.dtype)))?,
                (None, None) => DType::F32,
            };
            let v = self.b.input(name, TensorType::new(dtype, shape));
            self.vals.insert(inp.id, Val::Tensor(v));
        }
        Ok(())
    }

    fn node(&mut self, index: usize, node: &Node) -> Result<Option<ValueId>, AnalyzerError> {
        let err = |reason: String| node_error(node, reason);
        if let Some(n) = node.blocks {
            return Err(err(format!(
                "control flow ({n} sub-blocks) is not supported: trace the model with \
                 torch.jit.trace so the graph is straight-line"
            )));
        }
        if node.kind == "prim::Constant" || node.kind == "prim::GetAttr" {
            let Some(v) = &node.value else {
                return Err(err(
                    "reads an attribute of a value that is not a module of the archive".into(),
                ));
            };
            let val = self.value(v).map_err(err)?;
            if let (Some(&id), Some(name)) = (node.outputs.first(), node.out_names.first()) {
                if let Val::Tensor(t) = val {
                    let d = &mut self.b.graph.values[t];
                    if d.name.is_empty() {
                        d.name = name.clone();
                    }
                }
                self.vals.insert(id, val);
            }
            return Ok(None);
        }
        let (lower, in_place) = match ops::lookup(&node.kind) {
            Some(f) => (f, false),
            None => match ops::out_of_place(&node.kind).and_then(ops::lookup) {
                Some(f) => (f, true),
                None => {
                    return Err(err(format!(
                        "unsupported op {}",
                        node.schema.as_deref().unwrap_or(&node.kind)
                    )))
                }
            },
        };
        let mut args = Vec::with_capacity(node.inputs.len());
        for id in &node.inputs {
            match self.vals.get(id) {
                Some(v) => args.push(v.clone()),
                None => return Err(err(format!("input value %{id} is never defined"))),
            }
        }
        if let Some((i, Val::Unsupported(t))) = args
            .iter()
            .enumerate()
            .find(|(_, a)| matches!(a, Val::Unsupported(_)))
        {
            return Err(err(format!(
                "argument {i} is a value of type {t}, which the importer cannot represent"
            )));
        }
        let first_new = self.b.graph.values.len();
        let scoped = !node.scope.is_empty();
        if scoped {
            self.b.push_scope(node.scope.clone());
        }
        let mut cx = Cx {
            b: &mut self.b,
            node,
            args,
            index,
        };
        let result = lower(&mut cx);
        let args = std::mem::take(&mut cx.args);
        if scoped {
            self.b.pop_scope();
        }
        let outs = result.map_err(|e| {
            err(match e {
                LowerError::Msg(m) => m,
                LowerError::Builder(e) => e.to_string(),
            })
        })?;
        if outs.len() != node.outputs.len() {
            return Err(err(format!(
                "the lowering produced {} values for {} outputs",
                outs.len(),
                node.outputs.len()
            )));
        }
        for ((val, &id), name) in outs.iter().zip(&node.outputs).zip(&node.out_names) {
            if let Val::Tensor(v) = val {
                let d = &mut self.b.graph.values[*v];
                let numeric = |s: &str| clean_name(s).chars().all(|c| c.is_ascii_digit());
                // new values take the TorchScript name; a value passed through (a no-op `to`)
                // takes a meaningful name over a numbered one
                let pass_through = matches!(d.def, autopar_analyzer::ValueDef::Node { .. })
                    && numeric(&d.name)
                    && !numeric(name);
                if v.0 as usize >= first_new || pass_through {
                    d.name = name.clone();
                }
            }
            self.vals.insert(id, val.clone());
        }
        if in_place {
            // the mutated input now holds the result
            if let (Some(&id), Some(Val::Tensor(_)), Some(out)) =
                (node.inputs.first(), args.first(), outs.first())
            {
                self.vals.insert(id, out.clone());
            }
        }
        if node.kind == "aten::cross_entropy_loss" {
            if let Some(Val::Tensor(v)) = outs.first() {
                let ty = self.b.ty(*v);
                if ty.numel() == 1 && ty.dtype.is_float() {
                    return Ok(Some(*v));
                }
            }
        }
        Ok(None)
    }

    /// Graph outputs: tensors of the returned value, tuples and lists flattened.
    fn outputs(&mut self, v: &Val, out: &mut Vec<ValueId>) -> Result<(), AnalyzerError> {
        match v {
            Val::Tensor(t) => out.push(*t),
            Val::Tuple(items) | Val::List(items) => {
                for x in items {
                    self.outputs(x, out)?;
                }
            }
            Val::None => {}
            Val::Int(i) => out.push(self.b.scalar(DType::I64, *i as f64)),
            Val::Float(f) => out.push(self.b.scalar(DType::F32, *f)),
            Val::Bool(x) => out.push(self.b.scalar(DType::Bool, *x as i64 as f64)),
            other => {
                return Err(AnalyzerError::Other(format!(
                    "forward returns {}, which is not a tensor",
                    other.kind()
                )))
            }
        }
        Ok(())
    }
}

pub fn import(path: &Path, opts: &ImportOptions) -> Result<TorchScriptModel, AnalyzerError> {
    let file_err = |reason: String| AnalyzerError::File {
        path: path.display().to_string(),
        reason,
    };
    check_zip(path).map_err(file_err)?;
    let archive = Archive::load(path).map_err(|e| {
        file_err(format!(
            "libtorch could not load it as a TorchScript archive: {}",
            first_lines(&e)
        ))
    })?;
    let dump: Dump = serde_json::from_str(&archive.json)
        .map_err(|e| file_err(format!("the shim's graph description is malformed: {e}")))?;
    import_dump(&dump, &|i, len| archive.tensor_bytes(i, len), opts)
}

/// Imports a graph description; `bytes` reads tensor data.
pub(crate) fn import_dump(
    dump: &Dump,
    bytes: TensorBytes<'_>,
    opts: &ImportOptions,
) -> Result<TorchScriptModel, AnalyzerError> {
    let mut b = GraphBuilder::new();
    b.fold_constants = true;
    let mut im = Importer {
        bytes,
        dump,
        b,
        vals: HashMap::new(),
        tensors: HashMap::new(),
        running_stats: running_stats(dump),
    };
    im.inputs(opts)?;
    let mut loss = None;
    for (index, node) in dump.nodes.iter().enumerate() {
        if let Some(l) = im.node(index, node)? {
            loss = loss.or(Some(l));
        }
    }
    let mut outs = vec![];
    for id in &dump.outputs {
        let Some(v) = im.vals.get(id).cloned() else {
            return Err(AnalyzerError::Other(format!(
                "graph output %{id} is never defined"
            )));
        };
        im.outputs(&v, &mut outs)?;
    }
    // name the outputs: the loss `loss`, others after the value they return (`logits`)
    let mut used = std::collections::HashSet::new();
    for (i, &v) in outs.iter().enumerate() {
        let d = &im.b.graph.values[v];
        let is_node = matches!(d.def, autopar_analyzer::ValueDef::Node { .. });
        let base = if Some(v) == loss {
            "loss".to_string()
        } else {
            let c = clean_name(&d.name);
            if c.is_empty() || c.chars().all(|ch| ch.is_ascii_digit()) {
                format!("output{i}")
            } else {
                c.to_string()
            }
        };
        if is_node && used.insert(base.clone()) {
            im.b.graph.values[v].name = base;
        }
        im.b.output(v);
    }
    let (g, map) = drop_unused_constants(im.b.finish());
    let loss = loss.and_then(|v| map.get(v.0 as usize).copied().flatten());
    autopar_analyzer::verify::debug_verify(&g)?;
    Ok(TorchScriptModel { graph: g, loss })
}

/// Tensor-table entries read as a BatchNorm's running mean / variance: the buffers a training
/// step updates. Every other buffer (rotary `inv_freq`, attention masks) is not trained and
/// becomes a constant when its data is there, so what is computed from it folds at import,
/// as the exporters' constant folding does (the ONNX importer's classification rule).
fn running_stats(dump: &Dump) -> HashSet<usize> {
    let mut attr: HashMap<u64, usize> = HashMap::new();
    for n in &dump.nodes {
        if let (Some(DumpValue::Tensor(i)), Some(&id)) = (&n.value, n.outputs.first()) {
            attr.insert(id, *i);
        }
    }
    let mut out = HashSet::new();
    for n in dump.nodes.iter().filter(|n| n.kind.ends_with("batch_norm")) {
        for id in n.inputs.iter().skip(3).take(2) {
            if let Some(&i) = attr.get(id) {
                out.insert(i);
            }
        }
    }
    out
}

/// TorchScript archives are zip files: say so before libtorch does, in fewer words.
fn check_zip(path: &Path) -> Result<(), String> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).map_err(|e| format!("cannot read: {e}"))?;
    let mut magic = [0u8; 4];
    let n = f
        .read(&mut magic)
        .map_err(|e| format!("cannot read: {e}"))?;
    if n < 4 || &magic != b"PK\x03\x04" {
        return Err(
            "not a TorchScript archive (torch.jit.save writes a zip file; this is not one)".into(),
        );
    }
    Ok(())
}

/// libtorch's messages carry a C++ backtrace after the first lines.
fn first_lines(msg: &str) -> String {
    msg.lines()
        .take_while(|l| !l.contains("Exception raised from") && !l.starts_with("frame #"))
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
        .trim()
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn cleans_names() {
        assert_eq!(clean_name("input_ids.1"), "input_ids");
        assert_eq!(clean_name("x"), "x");
        assert_eq!(clean_name("33"), "33");
        assert_eq!(clean_name("a.b"), "a.b");
    }
}

#[cfg(test)]
mod graph_tests {
    use super::*;
    use autopar_analyzer::onnx::InputOverride;

    /// A graph description as the shim writes it, with the given nodes (value 1 is input `x`).
    fn dump(nodes: &str, outputs: &str, tensors: &str) -> Dump {
        let json = format!(
            r#"{{"inputs":[{{"id":1,"name":"x.1","type":"Tensor","traced":{{"dtype":"Float","shape":[2,3]}}}}],
                "nodes":[{nodes}],"outputs":[{outputs}],"tensors":[{tensors}]}}"#
        );
        serde_json::from_str(&json).expect("dump json")
    }

    fn no_bytes(_: usize, _: usize) -> Result<Vec<u8>, String> {
        Err("no data in this test".into())
    }

    #[test]
    fn lowers_linear_in_place_relu_and_size_arithmetic() {
        let w =
            r#"{"name":"fc.weight","role":"param","dtype":"Float","shape":[4,3],"stripped":true}"#;
        let nodes = r#"
            {"kind":"prim::GetAttr","outputs":[2],"out_names":["weight.1"],"scope":"fc","value":{"t":"tensor","v":0}},
            {"kind":"prim::Constant","outputs":[3],"out_names":["3"],"value":{"t":"none"}},
            {"kind":"aten::linear","schema":"aten::linear(Tensor input, Tensor weight, Tensor? bias=None) -> Tensor","inputs":[1,2,3],"outputs":[4],"out_names":["h.1"],"scope":"fc"},
            {"kind":"aten::relu_","schema":"aten::relu_(Tensor(a!) self) -> Tensor(a!)","inputs":[4],"outputs":[5],"out_names":["5"]},
            {"kind":"prim::Constant","outputs":[6],"out_names":["6"],"value":{"t":"int","v":1}},
            {"kind":"aten::size","schema":"aten::size.int(Tensor self, int dim) -> int","inputs":[4,6],"outputs":[7],"out_names":["7"]},
            {"kind":"prim::Constant","outputs":[8],"out_names":["8"],"value":{"t":"int","v":2}},
            {"kind":"aten::floordiv","schema":"aten::floordiv.int(int a, int b) -> int","inputs":[7,8],"outputs":[9],"out_names":["9"]},
            {"kind":"prim::Constant","outputs":[10],"out_names":["10"],"value":{"t":"int","v":-1}},
            {"kind":"prim::ListConstruct","inputs":[10,9],"outputs":[11],"out_names":["11"]},
            {"kind":"aten::view","schema":"aten::view(Tensor(a) self, SymInt[] size) -> Tensor(a)","inputs":[4,11],"outputs":[12],"out_names":["y.1"]},
            {"kind":"prim::TupleConstruct","inputs":[12,4],"outputs":[13],"out_names":["13"]}"#;
        let d = dump(nodes, "13", w);
        let m = import_dump(&d, &no_bytes, &ImportOptions::default()).expect("imports");
        let g = &m.graph;
        assert_eq!(g.param_count(), 12);
        assert_eq!(g.outputs.len(), 2);
        assert_eq!(g.ty(g.outputs[0]).shape, vec![4, 2]);
        // the in-place relu rebinds %h.1: the second output is the relu, not the linear
        let relu = g.producer(g.outputs[1]).expect("node");
        assert_eq!(g.node(relu).op.name(), "unary");
        assert_eq!(g.value(g.outputs[0]).name, "y");
        assert_eq!(g.value(g.inputs[0]).name, "x");
        assert!(m.loss.is_none());
        // an override changes the traced shape
        let opts = ImportOptions {
            input_overrides: vec![InputOverride::new("x", [6, 3], None)],
        };
        let m = import_dump(&d, &no_bytes, &opts).expect("imports");
        assert_eq!(m.graph.ty(m.graph.outputs[0]).shape, vec![12, 2]);
    }

    #[test]
    fn unsupported_ops_and_control_flow_name_the_node() {
        let d = dump(
            r#"{"kind":"aten::unique_dim","schema":"aten::unique_dim(Tensor self, int dim, bool sorted=True, bool return_inverse=False, bool return_counts=False) -> (Tensor, Tensor, Tensor)","inputs":[1],"outputs":[2,3,4],"out_names":["u.1","3","4"],"scope":"block.0","source":"model.py:12"}"#,
            "2",
            "",
        );
        let e = import_dump(&d, &no_bytes, &ImportOptions::default())
            .expect_err("unsupported")
            .to_string();
        assert!(
            e.contains("unsupported op aten::unique_dim(Tensor self"),
            "{e}"
        );
        assert!(e.contains("%u.1"), "{e}");
        assert!(e.contains("block.0, model.py:12"), "{e}");

        let d = dump(
            r#"{"kind":"prim::If","inputs":[1],"outputs":[2],"out_names":["2"],"blocks":2}"#,
            "2",
            "",
        );
        let e = import_dump(&d, &no_bytes, &ImportOptions::default())
            .expect_err("control flow")
            .to_string();
        assert!(e.contains("control flow"), "{e}");

        // a tensor computed from data turned into a shape
        let d = dump(
            r#"{"kind":"aten::sum","schema":"aten::sum(Tensor self, *, ScalarType? dtype=None) -> Tensor","inputs":[1,99],"outputs":[2],"out_names":["s"]}"#,
            "2",
            "",
        );
        let e = import_dump(&d, &no_bytes, &ImportOptions::default())
            .expect_err("undefined input")
            .to_string();
        assert!(e.contains("%99 is never defined"), "{e}");
    }

    #[test]
    fn inputs_without_a_recorded_shape_need_an_override() {
        let json = r#"{"inputs":[{"id":1,"name":"x.1","type":"Tensor"}],"nodes":[],"outputs":[1],"tensors":[]}"#;
        let d: Dump = serde_json::from_str(json).expect("json");
        let e = import_dump(&d, &no_bytes, &ImportOptions::default())
            .expect_err("no shape")
            .to_string();
        assert!(e.contains("--input x=DIMS"), "{e}");
        let opts = ImportOptions {
            input_overrides: vec![InputOverride::new("x", [5], Some(DType::I64))],
        };
        let m = import_dump(&d, &no_bytes, &opts).expect("imports");
        assert_eq!(
            m.graph.ty(m.graph.inputs[0]),
            &TensorType::new(DType::I64, [5])
        );
    }
}
