//! Elementwise functions of one tensor.
//!
//! Spec: <https://onnx.ai/onnx/operators/> `Abs, Neg, Exp, Log, Sqrt, Reciprocal, Sin, Cos,
//! Tanh, Sigmoid, Relu, Erf, Floor, Ceil, Sign` (opsets 13+), `Not` (1+), `IsNaN` (13/20),
//! `IsInf` (10/20, both signs only), `Gelu` (20, `approximate` none / tanh), `Softplus` (1+).
//! Each lowers to the IR `unary` op; `Softplus` to `log(exp(x) + 1)`.

use crate::graph::ValueId;
use crate::onnx::lower::{bail, LResult, Lowering};
use crate::ops::binary::BinaryKind;
use crate::ops::unary::UnaryKind;
use crate::ops::{Binary, Unary};

fn unary(n: &mut Lowering<'_>, kind: UnaryKind) -> LResult<Vec<ValueId>> {
    let x = n.input(0)?;
    Ok(vec![n.emit(Unary { kind }, &[x])?])
}

macro_rules! unary_ops {
    ($($f:ident => $kind:ident),* $(,)?) => {
        $(pub fn $f(n: &mut Lowering<'_>) -> LResult<Vec<ValueId>> { unary(n, UnaryKind::$kind) })*
    };
}

unary_ops! {
    abs => Abs, neg => Neg, exp => Exp, log => Log, sqrt => Sqrt, reciprocal => Reciprocal,
    sin => Sin, cos => Cos, tanh => Tanh, sigmoid => Sigmoid, relu => Relu, erf => Erf,
    floor => Floor, ceil => Ceil, sign => Sign, not => Not, is_nan => IsNan,
}

pub fn is_inf(n: &mut Lowering<'_>) -> LResult<Vec<ValueId>> {
    if n.attr_i("detect_negative", 1)? == 0 || n.attr_i("detect_positive", 1)? == 0 {
        bail!("IsInf detecting one sign only is not supported");
    }
    unary(n, UnaryKind::IsInf)
}

pub fn gelu(n: &mut Lowering<'_>) -> LResult<Vec<ValueId>> {
    let kind = match n.attr_s("approximate", "none")?.as_str() {
        "none" => UnaryKind::Gelu,
        "tanh" => UnaryKind::GeluTanh,
        other => bail!("unknown approximate={other:?} (expected none or tanh)"),
    };
    unary(n, kind)
}

pub fn softplus(n: &mut Lowering<'_>) -> LResult<Vec<ValueId>> {
    let x = n.input(0)?;
    let e = n.emit(
        Unary {
            kind: UnaryKind::Exp,
        },
        &[x],
    )?;
    let one = n.scalar(n.dtype(x), 1.0);
    let s = n.emit(
        Binary {
            kind: BinaryKind::Add,
        },
        &[e, one],
    )?;
    Ok(vec![n.emit(
        Unary {
            kind: UnaryKind::Log,
        },
        &[s],
    )?])
}
