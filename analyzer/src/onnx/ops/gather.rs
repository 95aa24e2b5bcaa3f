//! `Gather` (13: `axis`, negative indices count from the end) and `GatherND` (13:
//! `batch_dims`), lowered to the IR `gather` / `gather_nd` ops. Indices may be run-time values;
//! with constant data and indices the builder folds the result.

use crate::graph::ValueId;
use crate::onnx::lower::{bail, LResult, Lowering};
use crate::ops::{Gather, GatherNd};

pub fn gather(n: &mut Lowering<'_>) -> LResult<Vec<ValueId>> {
    let data = n.input(0)?;
    let idx = n.input(1)?;
    let axis = n.axis(n.attr_i("axis", 0)?, n.rank(data))?;
    Ok(vec![n.emit(Gather { axis }, &[data, idx])?])
}

pub fn gather_nd(n: &mut Lowering<'_>) -> LResult<Vec<ValueId>> {
    let data = n.input(0)?;
    let idx = n.input(1)?;
    let Ok(batch_dims) = usize::try_from(n.attr_i("batch_dims", 0)?) else {
        bail!("batch_dims must not be negative");
    };
    Ok(vec![n.emit(GatherNd { batch_dims }, &[data, idx])?])
}
