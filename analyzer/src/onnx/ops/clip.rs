//! `Clip` (13): `min(max(x, lo), hi)` with optional `lo` / `hi` inputs, lowered to the IR
//! `binary` max / min ops.

use crate::graph::ValueId;
use crate::onnx::lower::{LResult, Lowering};
use crate::ops::binary::BinaryKind;
use crate::ops::Binary;

pub fn clip(n: &mut Lowering<'_>) -> LResult<Vec<ValueId>> {
    let mut y = n.input(0)?;
    if let Some(lo) = n.opt_input(1) {
        y = n.emit(
            Binary {
                kind: BinaryKind::Max,
            },
            &[y, lo],
        )?;
    }
    if let Some(hi) = n.opt_input(2) {
        y = n.emit(
            Binary {
                kind: BinaryKind::Min,
            },
            &[y, hi],
        )?;
    }
    Ok(vec![y])
}
