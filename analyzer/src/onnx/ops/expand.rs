//! `Expand` (13): bidirectional numpy broadcast of the input with the constant `shape` input
//! (the output is the broadcast of both, which may be larger than `shape`), lowered to the IR
//! `expand` op with the resulting concrete shape; no node when nothing grows.

use crate::dtype::broadcast_shapes;
use crate::graph::ValueId;
use crate::onnx::lower::{bail, checked_numel, to_dims, LResult, Lowering};
use crate::ops::Expand;

pub fn expand(n: &mut Lowering<'_>) -> LResult<Vec<ValueId>> {
    let x = n.input(0)?;
    let target = to_dims(&n.const_ints(1)?, "shape")?;
    let s = n.shape(x);
    let Some(shape) = broadcast_shapes(&s, &target) else {
        bail!("{s:?} does not broadcast to {target:?}");
    };
    checked_numel(&shape)?;
    if shape == s {
        return Ok(vec![x]);
    }
    Ok(vec![n.emit(Expand { shape }, &[x])?])
}
