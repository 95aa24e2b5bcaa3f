//! The text form of the IR: prints a [`Graph`] and parses it back.
//!
//! ```text
//! graph {
//!   input v0 "input_ids": i64[2,64]
//!   param v1 "wte": f32[1000,128]
//!   param v2 "big": f32[4096,4096] external("model.onnx.data", 0, 67108864)
//!   const v3: i64[2] = [1, 2]
//!   n0 "h.0.attn" = einsum(v4, v1) {"equation":"bmk,kn->bmn"} -> v5 "x": f32[2,64,128]
//!   n1 backward(n0) = reduce(v5) {"kind":"sum","axes":[0],"keepdims":false} -> v6: f32[64,128]
//!   output v5
//! }
//! ```
//! Ids are printed as they are (`v3`, `n12`, the same text as their `Display`), so a dump, an
//! error message and a golden test agree. Node attributes are the op's serde JSON. The text
//! form carries the location of external weights but not the bytes of inline ones (those parse
//! back as absent). Every value id in `0..n` must be declared exactly once.

use crate::dtype::{DType, TensorType};
use crate::error::AnalyzerError;
use crate::graph::{Graph, NodeData, NodeId, Phase, ValueData, ValueDef, ValueId, WeightData};
use crate::ops::Op;
use crate::tensor::Tensor;
use std::fmt::Write;
use std::sync::Arc;

fn quoted(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| format!("{s:?}"))
}

fn name_part(name: &str) -> String {
    if name.is_empty() {
        String::new()
    } else {
        format!(" {}", quoted(name))
    }
}

fn fmt_num(dtype: DType, v: f64) -> String {
    if dtype.is_float() {
        if v.is_finite() {
            format!("{v:?}")
        } else if v.is_nan() {
            "nan".into()
        } else if v > 0.0 {
            "inf".into()
        } else {
            "-inf".into()
        }
    } else {
        format!("{}", v as i64)
    }
}

/// Prints `graph` in the text form.
/// An op's attributes as the text form prints them after its arguments (` {"axis":0}`), or
/// nothing for an op without attributes.
pub fn op_attrs(op: &crate::ops::Op) -> String {
    match serde_json::to_value(op) {
        Ok(serde_json::Value::Object(mut m)) => {
            m.remove("op");
            if m.is_empty() {
                String::new()
            } else {
                format!(" {}", serde_json::Value::Object(m))
            }
        }
        _ => String::new(),
    }
}

pub fn print(g: &Graph) -> String {
    let mut s = String::from("graph {\n");
    for (v, d) in g.values.iter() {
        let head = |kw: &str| format!("  {kw} {v}{}: {}", name_part(&d.name), d.ty);
        match &d.def {
            ValueDef::Input => {
                let _ = writeln!(s, "{}", head("input"));
            }
            ValueDef::Param { data } | ValueDef::Buffer { data } => {
                let kw = if matches!(d.def, ValueDef::Param { .. }) {
                    "param"
                } else {
                    "buffer"
                };
                let w = match data {
                    WeightData::External {
                        path,
                        offset,
                        length,
                    } => format!(" external({}, {offset}, {length})", quoted(path)),
                    WeightData::Inline(_) => " inline".to_string(),
                    WeightData::Absent => String::new(),
                };
                let _ = writeln!(s, "{}{w}", head(kw));
            }
            ValueDef::Const(t) => {
                let nums: Vec<String> = t.data.iter().map(|&x| fmt_num(t.dtype, x)).collect();
                let _ = writeln!(s, "{} = [{}]", head("const"), nums.join(", "));
            }
            ValueDef::Node { .. } => {}
        }
    }
    for (n, node) in g.nodes.iter() {
        let phase = match (node.phase, node.origin) {
            (Phase::Forward, _) => String::new(),
            (Phase::Backward, Some(o)) => format!(" backward({o})"),
            (Phase::Backward, None) => " backward".into(),
        };
        let args: Vec<String> = node.inputs.iter().map(|v| v.to_string()).collect();
        let attrs = op_attrs(&node.op);
        let outs: Vec<String> = node
            .outputs
            .iter()
            .map(|&v| format!("{v}{}: {}", name_part(&g.values[v].name), g.values[v].ty))
            .collect();
        let _ = writeln!(
            s,
            "  {n}{}{phase} = {}({}){attrs} -> {}",
            name_part(&node.name),
            node.op.name(),
            args.join(", "),
            outs.join(", ")
        );
    }
    if !g.outputs.is_empty() {
        let outs: Vec<String> = g.outputs.iter().map(|v| v.to_string()).collect();
        let _ = writeln!(s, "  output {}", outs.join(", "));
    }
    s.push_str("}\n");
    s
}

struct Cursor<'a> {
    s: &'a str,
    pos: usize,
    line: usize,
}

impl<'a> Cursor<'a> {
    fn err<T>(&self, reason: impl Into<String>) -> Result<T, AnalyzerError> {
        Err(AnalyzerError::Parse {
            line: self.line,
            reason: format!(
                "{} (at {:?})",
                reason.into(),
                self.rest().chars().take(30).collect::<String>()
            ),
        })
    }
    fn rest(&self) -> &'a str {
        &self.s[self.pos..]
    }
    fn ws(&mut self) {
        let t = self.rest().trim_start_matches([' ', '\t']);
        self.pos = self.s.len() - t.len();
    }
    fn eat(&mut self, tok: &str) -> bool {
        self.ws();
        if self.rest().starts_with(tok) {
            self.pos += tok.len();
            true
        } else {
            false
        }
    }
    fn expect(&mut self, tok: &str) -> Result<(), AnalyzerError> {
        if self.eat(tok) {
            Ok(())
        } else {
            self.err(format!("expected {tok:?}"))
        }
    }
    fn word(&mut self) -> &'a str {
        self.ws();
        let r = self.rest();
        let n = r
            .find(|c: char| {
                !(c.is_ascii_alphanumeric() || c == '_' || c == '.' || c == '-' || c == '+')
            })
            .unwrap_or(r.len());
        self.pos += n;
        &r[..n]
    }
    fn id(&mut self, prefix: char) -> Result<u32, AnalyzerError> {
        self.ws();
        let w = self.word();
        match w.strip_prefix(prefix).and_then(|d| d.parse().ok()) {
            Some(i) => Ok(i),
            None => self.err(format!("expected an id like {prefix}3, got {w:?}")),
        }
    }
    fn string(&mut self) -> Result<Option<String>, AnalyzerError> {
        self.ws();
        if !self.rest().starts_with('"') {
            return Ok(None);
        }
        let r = self.rest();
        let mut end = 1;
        let b = r.as_bytes();
        while end < b.len() && b[end] != b'"' {
            end += if b[end] == b'\\' { 2 } else { 1 };
        }
        let lit = &r[..(end + 1).min(r.len())];
        match serde_json::from_str::<String>(lit) {
            Ok(s) => {
                self.pos += lit.len();
                Ok(Some(s))
            }
            Err(e) => self.err(format!("bad string: {e}")),
        }
    }
    fn json_object(
        &mut self,
    ) -> Result<Option<serde_json::Map<String, serde_json::Value>>, AnalyzerError> {
        self.ws();
        if !self.rest().starts_with('{') {
            return Ok(None);
        }
        let mut de =
            serde_json::Deserializer::from_str(self.rest()).into_iter::<serde_json::Value>();
        match de.next() {
            Some(Ok(serde_json::Value::Object(m))) => {
                self.pos += de.byte_offset();
                Ok(Some(m))
            }
            _ => self.err("bad attribute object"),
        }
    }
    fn ty(&mut self) -> Result<TensorType, AnalyzerError> {
        let w = self.word();
        let Some(dtype) = DType::parse(w) else {
            return self.err(format!("unknown dtype {w:?}"));
        };
        self.expect("[")?;
        let mut shape = vec![];
        if !self.eat("]") {
            loop {
                let w = self.word();
                match w.parse() {
                    Ok(d) => shape.push(d),
                    Err(_) => return self.err(format!("bad dim {w:?}")),
                }
                if self.eat("]") {
                    break;
                }
                self.expect(",")?;
            }
        }
        Ok(TensorType::new(dtype, shape))
    }
    fn u64(&mut self) -> Result<u64, AnalyzerError> {
        let w = self.word();
        w.parse()
            .or_else(|_| self.err(format!("expected an integer, got {w:?}")))
    }
    fn end(&mut self) -> Result<(), AnalyzerError> {
        self.ws();
        if self.rest().is_empty() {
            Ok(())
        } else {
            self.err("unexpected text at end of line")
        }
    }
}

fn parse_num(w: &str) -> Option<f64> {
    match w {
        "nan" => Some(f64::NAN),
        "inf" => Some(f64::INFINITY),
        "-inf" => Some(f64::NEG_INFINITY),
        _ => w.parse().ok(),
    }
}

/// Parses the text form; the result is verified.
pub fn parse(text: &str) -> Result<Graph, AnalyzerError> {
    let mut values: Vec<Option<ValueData>> = vec![];
    let mut nodes: Vec<NodeData> = vec![];
    let mut g = Graph::new();
    let put = |values: &mut Vec<Option<ValueData>>,
               v: u32,
               d: ValueData,
               c: &Cursor|
     -> Result<(), AnalyzerError> {
        let i = v as usize;
        if values.len() <= i {
            values.resize(i + 1, None);
        }
        if values[i].is_some() {
            return c.err(format!("v{v} declared twice"));
        }
        values[i] = Some(d);
        Ok(())
    };
    let mut started = false;
    let mut closed = false;
    for (lineno, raw) in text.lines().enumerate() {
        let mut c = Cursor {
            s: raw,
            pos: 0,
            line: lineno + 1,
        };
        c.ws();
        if c.rest().is_empty() || c.rest().starts_with("//") {
            continue;
        }
        if !started {
            c.expect("graph")?;
            c.expect("{")?;
            c.end()?;
            started = true;
            continue;
        }
        if closed {
            return c.err("text after the closing brace");
        }
        if c.eat("}") {
            closed = true;
            continue;
        }
        let kw_pos = c.pos;
        let kw = c.word();
        match kw {
            "input" | "param" | "buffer" | "const" => {
                let v = c.id('v')?;
                let name = c.string()?.unwrap_or_default();
                c.expect(":")?;
                let ty = c.ty()?;
                let def = match kw {
                    "input" => {
                        g.inputs.push(ValueId(v));
                        ValueDef::Input
                    }
                    "const" => {
                        c.expect("=")?;
                        c.expect("[")?;
                        let mut data = vec![];
                        if !c.eat("]") {
                            loop {
                                let w = c.word();
                                match parse_num(w) {
                                    Some(x) => data.push(x),
                                    None => return c.err(format!("bad number {w:?}")),
                                }
                                if c.eat("]") {
                                    break;
                                }
                                c.expect(",")?;
                            }
                        }
                        if data.len() != ty.numel() {
                            return c.err(format!(
                                "constant has {} values, its type {ty} needs {}",
                                data.len(),
                                ty.numel()
                            ));
                        }
                        ValueDef::Const(Arc::new(Tensor::new(ty.dtype, ty.shape.clone(), data)))
                    }
                    _ => {
                        let data = if c.eat("external") {
                            c.expect("(")?;
                            let path = match c.string()? {
                                Some(p) => p,
                                None => return c.err("expected a quoted path"),
                            };
                            c.expect(",")?;
                            let offset = c.u64()?;
                            c.expect(",")?;
                            let length = c.u64()?;
                            c.expect(")")?;
                            WeightData::External {
                                path,
                                offset,
                                length,
                            }
                        } else {
                            c.eat("inline");
                            WeightData::Absent
                        };
                        if kw == "param" {
                            ValueDef::Param { data }
                        } else {
                            ValueDef::Buffer { data }
                        }
                    }
                };
                c.end()?;
                put(&mut values, v, ValueData { ty, name, def }, &c)?;
            }
            "output" => {
                loop {
                    g.outputs.push(ValueId(c.id('v')?));
                    if !c.eat(",") {
                        break;
                    }
                }
                c.end()?;
            }
            _ => {
                c.pos = kw_pos;
                let n = c.id('n')?;
                if n as usize != nodes.len() {
                    return c.err(format!("node n{n} out of order: expected n{}", nodes.len()));
                }
                let name = c.string()?.unwrap_or_default();
                let (phase, origin) = if c.eat("backward") {
                    if c.eat("(") {
                        let o = c.id('n')?;
                        c.expect(")")?;
                        (Phase::Backward, Some(NodeId(o)))
                    } else {
                        (Phase::Backward, None)
                    }
                } else {
                    (Phase::Forward, None)
                };
                c.expect("=")?;
                let opname = c.word().to_string();
                c.expect("(")?;
                let mut inputs = vec![];
                if !c.eat(")") {
                    loop {
                        inputs.push(ValueId(c.id('v')?));
                        if c.eat(")") {
                            break;
                        }
                        c.expect(",")?;
                    }
                }
                let mut attrs = c.json_object()?.unwrap_or_default();
                if !Op::NAMES.contains(&opname.as_str()) {
                    return c.err(format!("unknown op {opname:?}"));
                }
                attrs.insert("op".into(), serde_json::Value::String(opname.clone()));
                let op: Op = match serde_json::from_value(serde_json::Value::Object(attrs)) {
                    Ok(op) => op,
                    Err(e) => return c.err(format!("bad attributes for {opname}: {e}")),
                };
                c.expect("->")?;
                let mut outputs = vec![];
                loop {
                    let v = c.id('v')?;
                    let vname = c.string()?.unwrap_or_default();
                    c.expect(":")?;
                    let ty = c.ty()?;
                    put(
                        &mut values,
                        v,
                        ValueData {
                            ty,
                            name: vname,
                            def: ValueDef::Node {
                                node: NodeId(n),
                                index: outputs.len(),
                            },
                        },
                        &c,
                    )?;
                    outputs.push(ValueId(v));
                    if !c.eat(",") {
                        break;
                    }
                }
                c.end()?;
                nodes.push(NodeData {
                    op,
                    inputs,
                    outputs,
                    name,
                    phase,
                    origin,
                });
            }
        }
    }
    if !closed {
        return Err(AnalyzerError::Parse {
            line: text.lines().count(),
            reason: "missing closing brace".into(),
        });
    }
    for (i, v) in values.into_iter().enumerate() {
        match v {
            Some(d) => {
                g.values.push(d);
            }
            None => {
                return Err(AnalyzerError::Parse {
                    line: 0,
                    reason: format!("v{i} is never declared"),
                })
            }
        }
    }
    for n in nodes {
        g.nodes.push(n);
    }
    crate::verify::verify(&g)?;
    Ok(g)
}
