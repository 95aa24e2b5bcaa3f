//! `ReduceSum` (13: axes input), `ReduceMean / ReduceMax / ReduceMin` (13: axes attribute;
//! 18: axes input), `ReduceSumSquare` and `ReduceL2` (13 / 18), all with `keepdims` and
//! `noop_with_empty_axes`. Lower to the IR `reduce` op (the last two after a square, L2 with a
//! square root). Axes come from the input when there is one, else from the attribute, so one
//! lowering serves both opset forms.

use crate::graph::ValueId;
use crate::onnx::lower::{LResult, Lowering};
use crate::ops::binary::BinaryKind;
use crate::ops::reduce::ReduceKind;
use crate::ops::unary::UnaryKind;
use crate::ops::{Binary, Reduce, Unary};

/// The reduction of `x` the node asks for (`None` axes when it is a no-op).
fn reduce_of(n: &mut Lowering<'_>, x: ValueId, kind: ReduceKind) -> LResult<ValueId> {
    let rank = n.rank(x);
    let axes = match n.opt_input(1) {
        Some(_) => Some(n.const_ints(1)?),
        None => n.attr_ints("axes")?,
    };
    let keepdims = n.attr_i("keepdims", 1)? != 0;
    let noop = n.attr_i("noop_with_empty_axes", 0)? != 0;
    let axes = match axes {
        Some(a) if !a.is_empty() => n.axes(&a, rank)?,
        _ if noop => return Ok(x),
        _ => (0..rank).collect(),
    };
    if axes.is_empty() {
        return Ok(x);
    }
    n.emit(
        Reduce {
            kind,
            axes,
            keepdims,
        },
        &[x],
    )
}

fn reduce(n: &mut Lowering<'_>, kind: ReduceKind) -> LResult<Vec<ValueId>> {
    let x = n.input(0)?;
    Ok(vec![reduce_of(n, x, kind)?])
}

pub fn reduce_sum(n: &mut Lowering<'_>) -> LResult<Vec<ValueId>> {
    reduce(n, ReduceKind::Sum)
}
pub fn reduce_mean(n: &mut Lowering<'_>) -> LResult<Vec<ValueId>> {
    reduce(n, ReduceKind::Mean)
}
pub fn reduce_max(n: &mut Lowering<'_>) -> LResult<Vec<ValueId>> {
    reduce(n, ReduceKind::Max)
}
pub fn reduce_min(n: &mut Lowering<'_>) -> LResult<Vec<ValueId>> {
    reduce(n, ReduceKind::Min)
}
pub fn reduce_sum_square(n: &mut Lowering<'_>) -> LResult<Vec<ValueId>> {
    let x = n.input(0)?;
    let sq = n.emit(
        Binary {
            kind: BinaryKind::Mul,
        },
        &[x, x],
    )?;
    Ok(vec![reduce_of(n, sq, ReduceKind::Sum)?])
}
pub fn reduce_l2(n: &mut Lowering<'_>) -> LResult<Vec<ValueId>> {
    let x = n.input(0)?;
    let sq = n.emit(
        Binary {
            kind: BinaryKind::Mul,
        },
        &[x, x],
    )?;
    let s = reduce_of(n, sq, ReduceKind::Sum)?;
    Ok(vec![n.emit(
        Unary {
            kind: UnaryKind::Sqrt,
        },
        &[s],
    )?])
}
