//! `Where` (opsets 9, 16): elementwise select with numpy broadcasting of all three inputs;
//! lowers to the IR `where` op.

use crate::graph::ValueId;
use crate::onnx::lower::{LResult, Lowering};
use crate::ops::Where;

pub fn where_(n: &mut Lowering<'_>) -> LResult<Vec<ValueId>> {
    let c = n.input(0)?;
    let x = n.input(1)?;
    let y = n.input(2)?;
    Ok(vec![n.emit(Where {}, &[c, x, y])?])
}
