//! What a lowering function sees of one ONNX node: its resolved inputs, typed attribute
//! accessors, constant inputs, and the builder to emit IR through.
//!
//! Lowering functions return [`LowerError`]s without naming the node: the driver adds the
//! node's name and op type once, so every message reads the same way.

use super::proto::{attribute_type, AttributeProto, NodeProto, TensorProto};
use crate::builder::GraphBuilder;
use crate::dtype::{DType, TensorType};
use crate::error::AnalyzerError;
use crate::graph::ValueId;
use crate::ops::{Op, Reshape};
use crate::tensor::Tensor;
use std::path::Path;
use std::sync::Arc;

/// Why a node could not be lowered (the node is named by the caller).
#[derive(Debug)]
pub enum LowerError {
    /// A reason in words.
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
    ($($t:tt)*) => { return Err($crate::onnx::LowerError::Msg(format!($($t)*))) };
}
pub(crate) use bail;

/// One ONNX node being lowered.
pub struct Lowering<'a> {
    pub b: &'a mut GraphBuilder,
    pub node: &'a NodeProto,
    /// Opset of the default domain.
    pub opset: i64,
    /// Position of the node in the ONNX graph (seeds dropout masks).
    pub index: usize,
    /// Directory that external data of `Constant` tensors is relative to.
    pub base_dir: &'a Path,
    /// `inputs[i]`: the value of input `i`, `None` for an omitted optional input.
    pub(crate) inputs: Vec<Option<ValueId>>,
}

impl Lowering<'_> {
    pub fn num_inputs(&self) -> usize {
        self.inputs.len()
    }
    /// Input `i`, which the op requires.
    pub fn input(&self, i: usize) -> LResult<ValueId> {
        match self.inputs.get(i).copied().flatten() {
            Some(v) => Ok(v),
            None => bail!("required input {i} is missing"),
        }
    }
    /// Input `i` if given (ONNX omits optional inputs with an empty name or by arity).
    pub fn opt_input(&self, i: usize) -> Option<ValueId> {
        self.inputs.get(i).copied().flatten()
    }
    /// Every given input, in order.
    pub fn all_inputs(&self) -> Vec<ValueId> {
        self.inputs.iter().flatten().copied().collect()
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
    /// The ONNX name of input `i` (for messages).
    pub fn input_name(&self, i: usize) -> &str {
        self.node.input.get(i).map(|s| s.as_str()).unwrap_or("")
    }

    /// The values of input `i`, which must be known at import time.
    pub fn const_input(&self, i: usize) -> LResult<Arc<Tensor>> {
        let v = self.input(i)?;
        match self.b.graph.const_value(v) {
            Some(t) => Ok(t.clone()),
            None => bail!(
                "input {i} ({:?}) must be a constant known at import time, but it is computed \
                 from run-time data",
                self.input_name(i)
            ),
        }
    }
    /// Like [`const_input`](Self::const_input) for an optional input.
    pub fn opt_const_input(&self, i: usize) -> LResult<Option<Arc<Tensor>>> {
        match self.opt_input(i) {
            Some(_) => self.const_input(i).map(Some),
            None => Ok(None),
        }
    }
    /// A constant integer list input (shape, axes, starts, ...).
    pub fn const_ints(&self, i: usize) -> LResult<Vec<i64>> {
        let t = self.const_input(i)?;
        if !t.dtype.is_int() {
            bail!(
                "input {i} ({:?}) must be integer, got {}",
                self.input_name(i),
                t.dtype
            );
        }
        if t.rank() > 1 {
            bail!(
                "input {i} ({:?}) must be a 1-D list, got shape {:?}",
                self.input_name(i),
                t.shape
            );
        }
        Ok(t.to_i64_vec())
    }
    /// A constant single number (a scalar or a one-element tensor).
    pub fn const_scalar(&self, i: usize) -> LResult<f64> {
        let t = self.const_input(i)?;
        if t.numel() != 1 {
            bail!(
                "input {i} ({:?}) must hold one value, got shape {:?}",
                self.input_name(i),
                t.shape
            );
        }
        Ok(t.data[0])
    }

    pub fn attr(&self, name: &str) -> Option<&AttributeProto> {
        self.node
            .attribute
            .iter()
            .find(|a| a.name == name && a.ref_attr_name.is_empty())
    }
    fn check_type(&self, a: &AttributeProto, want: i32, what: &str) -> LResult<()> {
        if a.r#type != 0 && a.r#type != want {
            bail!(
                "attribute {:?} must be {what} (attribute type {})",
                a.name,
                a.r#type
            );
        }
        Ok(())
    }
    pub fn attr_opt_i(&self, name: &str) -> LResult<Option<i64>> {
        match self.attr(name) {
            Some(a) => {
                self.check_type(a, attribute_type::INT, "an int")?;
                Ok(Some(a.i))
            }
            None => Ok(None),
        }
    }
    pub fn attr_i(&self, name: &str, default: i64) -> LResult<i64> {
        Ok(self.attr_opt_i(name)?.unwrap_or(default))
    }
    pub fn attr_opt_f(&self, name: &str) -> LResult<Option<f64>> {
        match self.attr(name) {
            Some(a) => {
                self.check_type(a, attribute_type::FLOAT, "a float")?;
                Ok(Some(a.f as f64))
            }
            None => Ok(None),
        }
    }
    pub fn attr_f(&self, name: &str, default: f64) -> LResult<f64> {
        Ok(self.attr_opt_f(name)?.unwrap_or(default))
    }
    pub fn attr_s(&self, name: &str, default: &str) -> LResult<String> {
        match self.attr(name) {
            Some(a) => {
                self.check_type(a, attribute_type::STRING, "a string")?;
                Ok(String::from_utf8_lossy(&a.s).into_owned())
            }
            None => Ok(default.to_string()),
        }
    }
    pub fn attr_ints(&self, name: &str) -> LResult<Option<Vec<i64>>> {
        match self.attr(name) {
            Some(a) => {
                self.check_type(a, attribute_type::INTS, "a list of ints")?;
                Ok(Some(a.ints.clone()))
            }
            None => Ok(None),
        }
    }
    pub fn attr_floats(&self, name: &str) -> LResult<Option<Vec<f32>>> {
        match self.attr(name) {
            Some(a) => {
                self.check_type(a, attribute_type::FLOATS, "a list of floats")?;
                Ok(Some(a.floats.clone()))
            }
            None => Ok(None),
        }
    }
    pub fn attr_t(&self, name: &str) -> LResult<Option<&TensorProto>> {
        match self.attr(name) {
            Some(a) => {
                self.check_type(a, attribute_type::TENSOR, "a tensor")?;
                match &a.t {
                    Some(t) => Ok(Some(t)),
                    None => bail!("attribute {name:?} holds no tensor"),
                }
            }
            None => Ok(None),
        }
    }

    pub fn num_outputs(&self) -> usize {
        self.node.output.len()
    }
    /// Whether output `i` is requested (present with a non-empty name).
    pub fn output_used(&self, i: usize) -> bool {
        self.node.output.get(i).is_some_and(|s| !s.is_empty())
    }

    /// A non-negative axis from ONNX's `[-rank, rank)` convention.
    pub fn axis(&self, axis: i64, rank: usize) -> LResult<usize> {
        let r = rank as i64;
        let a = if axis < 0 { axis + r } else { axis };
        if a < 0 || a >= r {
            bail!("axis {axis} is out of range for rank {rank}");
        }
        Ok(a as usize)
    }
    /// Normalised, sorted, distinct axes.
    pub fn axes(&self, axes: &[i64], rank: usize) -> LResult<Vec<usize>> {
        let mut out = axes
            .iter()
            .map(|&a| self.axis(a, rank))
            .collect::<LResult<Vec<_>>>()?;
        out.sort_unstable();
        let n = out.len();
        out.dedup();
        if out.len() != n {
            bail!("axes {axes:?} repeat an axis");
        }
        Ok(out)
    }

    /// Emits an IR node; the first output.
    pub fn emit(&mut self, op: impl Into<Op>, inputs: &[ValueId]) -> LResult<ValueId> {
        Ok(self.b.node1(op, inputs)?)
    }
    /// Emits an IR node; all outputs.
    pub fn emit_n(&mut self, op: impl Into<Op>, inputs: &[ValueId]) -> LResult<Vec<ValueId>> {
        Ok(self.b.node(op, inputs)?)
    }
    pub fn constant(&mut self, t: Tensor) -> ValueId {
        self.b.constant(t)
    }
    /// A scalar constant of `dtype`.
    pub fn scalar(&mut self, dtype: DType, value: f64) -> ValueId {
        self.b.scalar(dtype, value)
    }
    /// `x` reshaped to `shape` (no node when the shape is unchanged).
    pub fn reshape(&mut self, x: ValueId, shape: Vec<usize>) -> LResult<ValueId> {
        if self.b.ty(x).shape == shape {
            return Ok(x);
        }
        self.emit(Reshape { shape }, &[x])
    }
}

/// Element count of `shape`, or an error when it overflows.
pub fn checked_numel(shape: &[usize]) -> LResult<usize> {
    shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| LowerError::Msg(format!("shape {shape:?} has too many elements")))
}

/// Converts ONNX dims (i64) to sizes, rejecting negative ones.
pub fn to_dims(v: &[i64], what: &str) -> LResult<Vec<usize>> {
    v.iter()
        .map(|&d| {
            usize::try_from(d)
                .map_err(|_| LowerError::Msg(format!("{what} {v:?} has a negative dim")))
        })
        .collect()
}
