//! Elementwise functions of two (or, for the variadic ones, any number of) tensors with numpy
//! broadcasting.
//!
//! Spec: `Add, Sub, Mul, Div` (14), `Pow` (15; the exponent is cast to the base's type when
//! they differ), `Mod` (13, `fmod=0` only), `Equal, Less, LessOrEqual, Greater,
//! GreaterOrEqual` (13-19), `And, Or, Xor` (7), variadic `Max, Min, Sum` (13) and `Mean`
//! (13, as the sum divided by the count). All lower to the IR `binary` op.

use crate::graph::ValueId;
use crate::onnx::lower::{bail, LResult, Lowering};
use crate::ops::binary::BinaryKind;
use crate::ops::{Binary, Cast};

fn binary(n: &mut Lowering<'_>, kind: BinaryKind) -> LResult<Vec<ValueId>> {
    let a = n.input(0)?;
    let b = n.input(1)?;
    Ok(vec![n.emit(Binary { kind }, &[a, b])?])
}

macro_rules! binary_ops {
    ($($f:ident => $kind:ident),* $(,)?) => {
        $(pub fn $f(n: &mut Lowering<'_>) -> LResult<Vec<ValueId>> { binary(n, BinaryKind::$kind) })*
    };
}

binary_ops! {
    add => Add, sub => Sub, mul => Mul, div => Div, equal => Equal, less => Less,
    less_or_equal => LessOrEqual, greater => Greater, greater_or_equal => GreaterOrEqual,
    and => And, or => Or, xor => Xor,
}

pub fn pow(n: &mut Lowering<'_>) -> LResult<Vec<ValueId>> {
    let a = n.input(0)?;
    let mut b = n.input(1)?;
    if n.dtype(b) != n.dtype(a) {
        b = n.emit(Cast { to: n.dtype(a) }, &[b])?;
    }
    Ok(vec![n.emit(
        Binary {
            kind: BinaryKind::Pow,
        },
        &[a, b],
    )?])
}

pub fn modulo(n: &mut Lowering<'_>) -> LResult<Vec<ValueId>> {
    if n.attr_i("fmod", 0)? != 0 {
        bail!("Mod with fmod=1 (C fmod semantics) is not supported");
    }
    binary(n, BinaryKind::Mod)
}

fn variadic(n: &mut Lowering<'_>, kind: BinaryKind) -> LResult<ValueId> {
    let xs = n.all_inputs();
    let Some((&first, rest)) = xs.split_first() else {
        bail!("needs at least one input");
    };
    let mut acc = first;
    for &x in rest {
        acc = n.emit(Binary { kind }, &[acc, x])?;
    }
    Ok(acc)
}

pub fn max(n: &mut Lowering<'_>) -> LResult<Vec<ValueId>> {
    Ok(vec![variadic(n, BinaryKind::Max)?])
}
pub fn min(n: &mut Lowering<'_>) -> LResult<Vec<ValueId>> {
    Ok(vec![variadic(n, BinaryKind::Min)?])
}
pub fn sum(n: &mut Lowering<'_>) -> LResult<Vec<ValueId>> {
    Ok(vec![variadic(n, BinaryKind::Add)?])
}
pub fn mean(n: &mut Lowering<'_>) -> LResult<Vec<ValueId>> {
    let s = variadic(n, BinaryKind::Add)?;
    let count = n.all_inputs().len();
    if count == 1 {
        return Ok(vec![s]);
    }
    let c = n.scalar(n.dtype(s), count as f64);
    Ok(vec![n.emit(
        Binary {
            kind: BinaryKind::Div,
        },
        &[s, c],
    )?])
}
