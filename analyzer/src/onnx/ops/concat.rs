//! `Concat` (13): all inputs along `axis` (negative counts from the end), lowered to the IR
//! `concat` op; one input is no node.

use crate::graph::ValueId;
use crate::onnx::lower::{bail, LResult, Lowering};
use crate::ops::Concat;

pub fn concat(n: &mut Lowering<'_>) -> LResult<Vec<ValueId>> {
    let xs = n.all_inputs();
    let Some(&first) = xs.first() else {
        bail!("needs at least one input");
    };
    let Some(axis) = n.attr_opt_i("axis")? else {
        bail!("attribute \"axis\" is required");
    };
    let axis = n.axis(axis, n.rank(first))?;
    if xs.len() == 1 {
        return Ok(vec![first]);
    }
    Ok(vec![n.emit(Concat { axis }, &xs)?])
}
