//! `OneHot` (11): inputs `indices, depth, values` (`values = [off, on]`); `depth` must be a
//! constant. `axis` (default -1) counts in the output's rank. Lowers to the IR `one_hot` op.

use crate::graph::ValueId;
use crate::onnx::lower::{bail, checked_numel, LResult, Lowering};
use crate::ops::OneHot;

pub fn one_hot(n: &mut Lowering<'_>) -> LResult<Vec<ValueId>> {
    let idx = n.input(0)?;
    let depth = n.const_scalar(1)?;
    let values = n.input(2)?;
    if !(depth >= 1.0 && depth.fract() == 0.0 && depth < 9.0e15) {
        bail!("depth {depth} is not a positive integer");
    }
    let axis = n.axis(n.attr_i("axis", -1)?, n.rank(idx) + 1)?;
    let mut out = n.shape(idx);
    out.push(depth as usize);
    checked_numel(&out)?;
    Ok(vec![n.emit(
        OneHot {
            depth: depth as usize,
            axis,
        },
        &[idx, values],
    )?])
}
