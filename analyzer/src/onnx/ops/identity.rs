//! `Identity` (13+): the output is the input value itself; no node.

use crate::graph::ValueId;
use crate::onnx::lower::{LResult, Lowering};

pub fn identity(n: &mut Lowering<'_>) -> LResult<Vec<ValueId>> {
    Ok(vec![n.input(0)?])
}
