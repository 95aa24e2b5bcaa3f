//! `Softmax` and `LogSoftmax` (13: one `axis`, default -1), lowered to the IR `softmax` op.

use crate::graph::ValueId;
use crate::onnx::lower::{LResult, Lowering};
use crate::ops::Softmax;

fn softmax_of(n: &mut Lowering<'_>, log: bool) -> LResult<Vec<ValueId>> {
    let x = n.input(0)?;
    let axis = n.axis(n.attr_i("axis", -1)?, n.rank(x))?;
    Ok(vec![n.emit(Softmax { axis, log }, &[x])?])
}

pub fn softmax(n: &mut Lowering<'_>) -> LResult<Vec<ValueId>> {
    softmax_of(n, false)
}
pub fn log_softmax(n: &mut Lowering<'_>) -> LResult<Vec<ValueId>> {
    softmax_of(n, true)
}
