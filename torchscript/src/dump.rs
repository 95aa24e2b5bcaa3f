//! The graph description the shim writes (JSON): the inlined `forward` graph of the module with
//! its module-attribute reads already resolved, and a table of the tensors it references.
//!
//! Values are named by libtorch's unique value numbers. Node outputs that are module
//! attributes (`prim::GetAttr` of a parameter, buffer or constant) carry the attribute's value;
//! `prim::Constant` nodes carry theirs; every other node carries its schema when it has one.

use serde::Deserialize;

#[derive(Debug, Deserialize)]
pub struct Dump {
    pub inputs: Vec<Input>,
    pub nodes: Vec<Node>,
    pub outputs: Vec<u64>,
    pub tensors: Vec<TensorInfo>,
}

#[derive(Debug, Deserialize)]
pub struct Input {
    pub id: u64,
    /// libtorch's debug name (`input_ids.1`).
    pub name: String,
    /// TorchScript type (`Tensor`, `int`, ...).
    #[serde(rename = "type")]
    pub ty: String,
    /// dtype and shape of the example input `torch.jit.trace` stored, if any.
    pub traced: Option<Traced>,
}

#[derive(Debug, Deserialize)]
pub struct Traced {
    /// c10 scalar type name (`Float`, `Long`); empty when the example was not a tensor.
    pub dtype: String,
    pub shape: Vec<i64>,
}

#[derive(Debug, Deserialize)]
pub struct Node {
    /// `aten::linear`, `prim::ListConstruct`, ...
    pub kind: String,
    /// The operator schema, e.g. `aten::add.Tensor(Tensor self, Tensor other, *, Scalar
    /// alpha=1) -> Tensor`.
    pub schema: Option<String>,
    #[serde(default)]
    pub inputs: Vec<u64>,
    pub outputs: Vec<u64>,
    #[serde(default)]
    pub out_names: Vec<String>,
    /// The module path the node was inlined from (`model.transformer.0.attn`).
    #[serde(default)]
    pub scope: String,
    /// Original source `file.py:line`, when recorded.
    pub source: Option<String>,
    /// Number of sub-blocks (control flow), when any.
    pub blocks: Option<usize>,
    /// For `prim::Constant` and resolved `prim::GetAttr`: the value.
    pub value: Option<DumpValue>,
}

/// A constant or attribute value.
#[derive(Clone, Debug, Deserialize)]
#[serde(tag = "t", content = "v", rename_all = "lowercase")]
pub enum DumpValue {
    None,
    Bool(bool),
    Int(i64),
    Float(JsonFloat),
    Str(String),
    Device(String),
    /// Index into [`Dump::tensors`].
    Tensor(usize),
    List(Vec<DumpValue>),
    Tuple(Vec<DumpValue>),
    /// A value of a type the shim does not describe (its type name).
    Unsupported(String),
}

/// A float, with non-finite values spelled as strings (`"inf"`, `"-inf"`, `"nan"`).
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum JsonFloat {
    Num(f64),
    Text(String),
}

impl JsonFloat {
    pub fn value(&self) -> f64 {
        match self {
            JsonFloat::Num(v) => *v,
            JsonFloat::Text(s) => match s.as_str() {
                "inf" => f64::INFINITY,
                "-inf" => f64::NEG_INFINITY,
                _ => f64::NAN,
            },
        }
    }
}

#[derive(Debug, Deserialize)]
pub struct TensorInfo {
    /// Dotted attribute path (`model.transformer.wte.weight`) or `constant N`.
    pub name: String,
    /// `param` (an nn.Parameter), `buffer` (a registered buffer or other tensor attribute) or
    /// `constant` (a tensor constant of the code).
    pub role: String,
    /// c10 scalar type name.
    pub dtype: String,
    pub shape: Vec<i64>,
    /// The archive's record for it was emptied: only dtype and shape are known.
    pub stripped: bool,
}

impl Node {
    /// `aten::add.Tensor` from the schema (or the kind when there is none).
    pub fn qualified_name(&self) -> &str {
        match &self.schema {
            Some(s) => s.split('(').next().unwrap_or(&self.kind),
            None => &self.kind,
        }
    }
    /// The overload name (`Tensor` of `aten::add.Tensor`), empty when none.
    pub fn overload(&self) -> &str {
        let q = self.qualified_name();
        let base = q.rsplit("::").next().unwrap_or(q);
        base.split_once('.').map(|(_, o)| o).unwrap_or("")
    }
    /// How errors name the node: `%x.7 = aten::addmm (model.transformer.0.attn, file.py:119)`.
    pub fn label(&self) -> String {
        let outs: Vec<String> = self.out_names.iter().map(|n| format!("%{n}")).collect();
        let mut s = if outs.is_empty() {
            self.kind.clone()
        } else {
            format!("{} = {}", outs.join(", "), self.kind)
        };
        let mut at = vec![];
        if !self.scope.is_empty() {
            at.push(self.scope.clone());
        }
        if let Some(src) = &self.source {
            at.push(src.clone());
        }
        if !at.is_empty() {
            s.push_str(&format!(" ({})", at.join(", ")));
        }
        s
    }
}

/// The analyzer dtype of a c10 scalar type name.
pub fn dtype_of(name: &str) -> Option<autopar_analyzer::DType> {
    use autopar_analyzer::DType;
    Some(match name {
        "Float" => DType::F32,
        "Double" => DType::F64,
        "Half" => DType::F16,
        "BFloat16" => DType::BF16,
        "Long" => DType::I64,
        "Int" => DType::I32,
        "Short" => DType::I16,
        "Char" => DType::I8,
        "Byte" => DType::U8,
        "Bool" => DType::Bool,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_values_and_names() {
        let v: DumpValue = serde_json::from_str(
            r#"{"t":"list","v":[{"t":"int","v":3},{"t":"float","v":"-inf"},{"t":"none"}]}"#,
        )
        .unwrap();
        let DumpValue::List(items) = v else { panic!() };
        assert!(matches!(items[0], DumpValue::Int(3)));
        let DumpValue::Float(f) = &items[1] else {
            panic!()
        };
        assert_eq!(f.value(), f64::NEG_INFINITY);
        assert!(matches!(items[2], DumpValue::None));
        let n: Node = serde_json::from_str(
            r#"{"kind":"aten::add","schema":"aten::add.Tensor(Tensor self, Tensor other, *, Scalar alpha=1) -> Tensor","inputs":[1,2,3],"outputs":[4],"out_names":["x.1"],"scope":"h.0","source":"a.py:3"}"#,
        )
        .unwrap();
        assert_eq!(n.qualified_name(), "aten::add.Tensor");
        assert_eq!(n.overload(), "Tensor");
        assert_eq!(n.label(), "%x.1 = aten::add (h.0, a.py:3)");
    }
}
