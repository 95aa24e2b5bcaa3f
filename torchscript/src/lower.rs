//! What a lowering function sees of one TorchScript node: its arguments as [`Val`]s (tensors
//! are IR values, everything else is known at import time), typed accessors that explain what
//! was expected, PyTorch's type promotion, and the builder to emit IR through.
//!
//! Lowerings return [`LowerError`]s without naming the node: the driver adds the node's label
//! and schema once.

use crate::dump::Node;
use autopar_analyzer::dtype::TensorType;
use autopar_analyzer::ops::{Cast, Op, Reshape};
use autopar_analyzer::{AnalyzerError, DType, GraphBuilder, Tensor, ValueId};
use std::sync::Arc;

/// A TorchScript value during import: a tensor is an IR value; ints, floats, lists and the
/// rest are known at import time (shapes are static), which is how `aten::size` arithmetic and
/// `prim::ListConstruct` plumbing fold away.
#[derive(Clone, Debug, PartialEq)]
pub enum Val {
    Tensor(ValueId),
    Int(i64),
    Float(f64),
    Bool(bool),
    Str(String),
    Device(String),
    None,
    List(Vec<Val>),
    Tuple(Vec<Val>),
    /// A value the importer cannot represent (named by its TorchScript type).
    Unsupported(String),
}

impl Val {
    /// What kind of value this is, for messages.
    pub fn kind(&self) -> String {
        match self {
            Val::Tensor(_) => "a tensor".into(),
            Val::Int(i) => format!("int {i}"),
            Val::Float(f) => format!("float {f}"),
            Val::Bool(b) => format!("bool {b}"),
            Val::Str(s) => format!("str {s:?}"),
            Val::Device(d) => format!("device {d:?}"),
            Val::None => "None".into(),
            Val::List(v) => format!("a list of {}", v.len()),
            Val::Tuple(v) => format!("a tuple of {}", v.len()),
            Val::Unsupported(t) => format!("a value of type {t}"),
        }
    }
}

/// Why a node could not be lowered (the node is named by the caller).
#[derive(Debug)]
pub enum LowerError {
    Msg(String),
    /// The builder rejected an emitted IR node (shape inference failed).
    Builder(AnalyzerError),
}

impl From<AnalyzerError> for LowerError {
    fn from(e: AnalyzerError) -> Self {
        LowerError::Builder(e)
    }
}

impl std::fmt::Display for LowerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LowerError::Msg(m) => f.write_str(m),
            LowerError::Builder(e) => write!(f, "{e}"),
        }
    }
}

pub type LResult<T> = Result<T, LowerError>;

/// `return Err(LowerError::Msg(format!(..)))`.
macro_rules! bail {
    ($($t:tt)*) => { return Err($crate::lower::LowerError::Msg(format!($($t)*))) };
}
pub(crate) use bail;

/// How an operand takes part in type promotion (PyTorch's rules: dimensioned tensors decide
/// the dtype; a zero-dim tensor or a Python number only raises its category).
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Priority {
    /// A Python number (int, float, bool) passed where a tensor or scalar is expected.
    Number,
    ZeroDim,
    Dimensioned,
}

/// A tensor operand with its promotion priority.
#[derive(Copy, Clone, Debug)]
pub struct Operand {
    pub v: ValueId,
    pub priority: Priority,
}

fn category(d: DType) -> u8 {
    if d == DType::Bool {
        0
    } else if d.is_int() {
        1
    } else {
        2
    }
}

/// The common dtype of two dtypes of the same priority (`torch.promote_types`).
pub fn promote_types(a: DType, b: DType) -> DType {
    if a == b {
        return a;
    }
    let (ca, cb) = (category(a), category(b));
    if ca != cb {
        return if ca > cb { a } else { b };
    }
    match (a, b) {
        (DType::F16, DType::BF16) | (DType::BF16, DType::F16) => DType::F32,
        (DType::U8, DType::I8) | (DType::I8, DType::U8) => DType::I16,
        _ if a.size_bytes() >= b.size_bytes() => a,
        _ => b,
    }
}

/// One TorchScript node being lowered.
pub struct Cx<'a> {
    pub b: &'a mut GraphBuilder,
    pub node: &'a Node,
    pub args: Vec<Val>,
    /// Position of the node in the graph (seeds dropout masks).
    pub index: usize,
}

impl Cx<'_> {
    pub fn arg(&self, i: usize) -> LResult<&Val> {
        match self.args.get(i) {
            Some(v) => Ok(v),
            None => bail!("argument {i} is missing ({} given)", self.args.len()),
        }
    }
    /// Argument `i`, or `None` when absent or `None`.
    pub fn opt_arg(&self, i: usize) -> Option<&Val> {
        match self.args.get(i) {
            None | Some(Val::None) => None,
            Some(v) => Some(v),
        }
    }
    pub fn ty(&self, v: ValueId) -> TensorType {
        self.b.ty(v).clone()
    }
    pub fn shape(&self, v: ValueId) -> Vec<usize> {
        self.b.ty(v).shape.clone()
    }
    pub fn dtype(&self, v: ValueId) -> DType {
        self.b.ty(v).dtype
    }
    pub fn rank(&self, v: ValueId) -> usize {
        self.b.ty(v).rank()
    }
    pub fn const_of(&self, v: ValueId) -> Option<Arc<Tensor>> {
        self.b.graph.const_value(v).cloned()
    }

    /// Argument `i` as a tensor.
    pub fn tensor(&self, i: usize) -> LResult<ValueId> {
        match self.arg(i)? {
            Val::Tensor(v) => Ok(*v),
            other => bail!("argument {i} must be a tensor, got {}", other.kind()),
        }
    }
    pub fn opt_tensor(&self, i: usize) -> LResult<Option<ValueId>> {
        match self.opt_arg(i) {
            None => Ok(None),
            Some(_) => self.tensor(i).map(Some),
        }
    }
    /// A list of tensors.
    pub fn tensors(&self, i: usize) -> LResult<Vec<ValueId>> {
        match self.arg(i)? {
            Val::List(items) | Val::Tuple(items) => items
                .iter()
                .map(|v| match v {
                    Val::Tensor(t) => Ok(*t),
                    other => bail!(
                        "argument {i} must be a list of tensors, holds {}",
                        other.kind()
                    ),
                })
                .collect(),
            other => bail!(
                "argument {i} must be a list of tensors, got {}",
                other.kind()
            ),
        }
    }

    /// An int known at import time: an int, a bool, or a one-element integer constant tensor.
    pub fn int(&self, i: usize) -> LResult<i64> {
        let v = self.arg(i)?;
        match self.as_int(v) {
            Some(x) => Ok(x),
            None => bail!(
                "argument {i} must be an int known at import time, got {}",
                self.describe(v)
            ),
        }
    }
    pub fn opt_int(&self, i: usize) -> LResult<Option<i64>> {
        match self.opt_arg(i) {
            None => Ok(None),
            Some(_) => self.int(i).map(Some),
        }
    }
    fn as_int(&self, v: &Val) -> Option<i64> {
        match v {
            Val::Int(x) => Some(*x),
            Val::Bool(b) => Some(*b as i64),
            Val::Tensor(t) => {
                let c = self.const_of(*t)?;
                (c.numel() == 1 && !c.dtype.is_float()).then(|| c.data[0] as i64)
            }
            _ => None,
        }
    }
    /// A list of ints (a single int stands for a one-element list, as for `int[1]`).
    pub fn ints(&self, i: usize) -> LResult<Vec<i64>> {
        let v = self.arg(i)?;
        match v {
            Val::List(items) | Val::Tuple(items) => items
                .iter()
                .map(|x| match self.as_int(x) {
                    Some(n) => Ok(n),
                    None => bail!(
                        "argument {i} must be a list of ints known at import time, holds {}",
                        self.describe(x)
                    ),
                })
                .collect(),
            other => match self.as_int(other) {
                Some(n) => Ok(vec![n]),
                None => bail!(
                    "argument {i} must be a list of ints, got {}",
                    self.describe(other)
                ),
            },
        }
    }
    pub fn opt_ints(&self, i: usize) -> LResult<Option<Vec<i64>>> {
        match self.opt_arg(i) {
            None => Ok(None),
            Some(_) => self.ints(i).map(Some),
        }
    }
    /// A number known at import time (int, float, bool or one-element constant tensor).
    pub fn float(&self, i: usize) -> LResult<f64> {
        let v = self.arg(i)?;
        match self.as_number(v) {
            Some(x) => Ok(x),
            None => bail!(
                "argument {i} must be a number known at import time, got {}",
                self.describe(v)
            ),
        }
    }
    pub fn opt_float(&self, i: usize) -> LResult<Option<f64>> {
        match self.opt_arg(i) {
            None => Ok(None),
            Some(_) => self.float(i).map(Some),
        }
    }
    pub fn as_number(&self, v: &Val) -> Option<f64> {
        match v {
            Val::Int(x) => Some(*x as f64),
            Val::Float(x) => Some(*x),
            Val::Bool(b) => Some(*b as i64 as f64),
            Val::Tensor(t) => {
                let c = self.const_of(*t)?;
                (c.numel() == 1).then(|| c.data[0])
            }
            _ => None,
        }
    }
    pub fn bool(&self, i: usize) -> LResult<bool> {
        match self.arg(i)? {
            Val::Bool(b) => Ok(*b),
            Val::Int(x) => Ok(*x != 0),
            other => bail!("argument {i} must be a bool, got {}", other.kind()),
        }
    }
    pub fn opt_bool(&self, i: usize) -> LResult<Option<bool>> {
        match self.opt_arg(i) {
            None => Ok(None),
            Some(_) => self.bool(i).map(Some),
        }
    }
    pub fn str(&self, i: usize) -> LResult<String> {
        match self.arg(i)? {
            Val::Str(s) => Ok(s.clone()),
            other => bail!("argument {i} must be a string, got {}", other.kind()),
        }
    }
    /// An optional `ScalarType` argument (an int code).
    pub fn opt_dtype(&self, i: usize) -> LResult<Option<DType>> {
        match self.opt_arg(i) {
            None => Ok(None),
            Some(Val::Int(code)) => match scalar_type(*code) {
                Some(d) => Ok(Some(d)),
                None => bail!("argument {i}: scalar type {code} is not supported"),
            },
            Some(other) => bail!("argument {i} must be a dtype, got {}", other.kind()),
        }
    }
    fn describe(&self, v: &Val) -> String {
        match v {
            Val::Tensor(t) if self.const_of(*t).is_none() => {
                format!("a tensor {} computed from run-time data", self.ty(*t))
            }
            Val::Tensor(t) => format!("a constant tensor {}", self.ty(*t)),
            other => other.kind(),
        }
    }

    /// A dim in `[-rank, rank)` made non-negative.
    pub fn dim(&self, d: i64, rank: usize) -> LResult<usize> {
        let r = rank as i64;
        let a = if d < 0 { d + r } else { d };
        if a < 0 || a >= r {
            bail!("dim {d} is out of range for rank {rank}");
        }
        Ok(a as usize)
    }

    /// Argument `i` as a tensor operand of an elementwise op: tensors as they are, numbers
    /// as scalar constants (of their Python type) that promotion then casts.
    pub fn operand(&mut self, i: usize) -> LResult<Operand> {
        let v = self.arg(i)?.clone();
        self.operand_of(&v, i)
    }
    pub fn operand_of(&mut self, v: &Val, i: usize) -> LResult<Operand> {
        let (v, priority) = match v {
            Val::Tensor(t) => {
                let p = if self.rank(*t) == 0 {
                    Priority::ZeroDim
                } else {
                    Priority::Dimensioned
                };
                (*t, p)
            }
            Val::Int(x) => (self.b.scalar(DType::I64, *x as f64), Priority::Number),
            Val::Float(x) => (self.b.scalar(DType::F64, *x), Priority::Number),
            Val::Bool(x) => (
                self.b.scalar(DType::Bool, *x as i64 as f64),
                Priority::Number,
            ),
            other => bail!(
                "argument {i} must be a tensor or a number, got {}",
                other.kind()
            ),
        };
        Ok(Operand { v, priority })
    }

    /// The dtype PyTorch computes an elementwise op of `ops` in.
    pub fn result_dtype(&self, ops: &[Operand]) -> DType {
        let top = ops
            .iter()
            .map(|o| o.priority)
            .max()
            .unwrap_or(Priority::Number);
        let mut dt: Option<DType> = None;
        for o in ops.iter().filter(|o| o.priority == top) {
            let d = self.dtype(o.v);
            dt = Some(dt.map_or(d, |x| promote_types(x, d)));
        }
        let mut dt = dt.unwrap_or(DType::F32);
        for o in ops.iter().filter(|o| o.priority < top) {
            let d = self.dtype(o.v);
            if category(d) > category(dt) {
                dt = match o.priority {
                    // a zero-dim tensor of a higher category keeps its own dtype
                    Priority::ZeroDim => d,
                    // a Python number takes the default dtype of its category
                    _ if d.is_float() => DType::F32,
                    _ => DType::I64,
                };
            }
        }
        dt
    }

    /// `x` cast to `dtype` (no node when it already is).
    pub fn cast(&mut self, x: ValueId, dtype: DType) -> LResult<ValueId> {
        if self.dtype(x) == dtype {
            return Ok(x);
        }
        self.emit(Cast { to: dtype }, &[x])
    }
    /// `x` reshaped (no node when the shape is unchanged).
    pub fn reshape(&mut self, x: ValueId, shape: Vec<usize>) -> LResult<ValueId> {
        if self.b.ty(x).shape == shape {
            return Ok(x);
        }
        self.emit(Reshape { shape }, &[x])
    }
    pub fn emit(&mut self, op: impl Into<Op>, inputs: &[ValueId]) -> LResult<ValueId> {
        Ok(self.b.node1(op, inputs)?)
    }
    pub fn emit_n(&mut self, op: impl Into<Op>, inputs: &[ValueId]) -> LResult<Vec<ValueId>> {
        Ok(self.b.node(op, inputs)?)
    }
    pub fn scalar(&mut self, dtype: DType, value: f64) -> ValueId {
        self.b.scalar(dtype, value)
    }
}

/// The analyzer dtype of a c10 `ScalarType` code.
pub fn scalar_type(code: i64) -> Option<DType> {
    Some(match code {
        0 => DType::U8,
        1 => DType::I8,
        2 => DType::I16,
        3 => DType::I32,
        4 => DType::I64,
        5 => DType::F16,
        6 => DType::F32,
        7 => DType::F64,
        11 => DType::Bool,
        15 => DType::BF16,
        _ => return None,
    })
}

/// The c10 `ScalarType` code of a dtype (what `prim::dtype` returns).
pub fn scalar_type_code(d: DType) -> i64 {
    match d {
        DType::U8 => 0,
        DType::I8 => 1,
        DType::I16 => 2,
        DType::I32 => 3,
        DType::I64 => 4,
        DType::F16 => 5,
        DType::F32 => 6,
        DType::F64 => 7,
        DType::Bool => 11,
        DType::BF16 => 15,
    }
}

/// Converts sizes from TorchScript ints, rejecting negative ones.
pub fn to_dims(v: &[i64], what: &str) -> LResult<Vec<usize>> {
    v.iter()
        .map(|&d| {
            usize::try_from(d)
                .map_err(|_| LowerError::Msg(format!("{what} {v:?} has a negative value")))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn promotes_like_pytorch() {
        assert_eq!(promote_types(DType::F16, DType::BF16), DType::F32);
        assert_eq!(promote_types(DType::I64, DType::F16), DType::F16);
        assert_eq!(promote_types(DType::Bool, DType::I32), DType::I32);
        let node: Node = serde_json::from_str(r#"{"kind":"aten::mul","outputs":[]}"#).unwrap();
        let mut b = GraphBuilder::new();
        let x = b.input("x", TensorType::new(DType::F32, [2, 3]));
        let i = b.input("i", TensorType::new(DType::I64, [2, 3]));
        let half = b.scalar(DType::F64, 0.5);
        let mut cx = Cx {
            b: &mut b,
            node: &node,
            args: vec![],
            index: 0,
        };
        let op = |v, priority| Operand { v, priority };
        // f32 tensor * f64 zero-dim constant stays f32
        assert_eq!(
            cx.result_dtype(&[op(x, Priority::Dimensioned), op(half, Priority::ZeroDim)]),
            DType::F32
        );
        // i64 tensor * Python float becomes the default float dtype
        let f = cx.operand_of(&Val::Float(0.5), 1).unwrap();
        assert_eq!(
            cx.result_dtype(&[op(i, Priority::Dimensioned), f]),
            DType::F32
        );
        // i64 tensor * f64 zero-dim tensor takes the zero-dim dtype
        assert_eq!(
            cx.result_dtype(&[op(i, Priority::Dimensioned), op(half, Priority::ZeroDim)]),
            DType::F64
        );
    }
}
