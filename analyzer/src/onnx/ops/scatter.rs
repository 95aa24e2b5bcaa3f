//! `ScatterElements` (13, 16/18: `reduction`) and `ScatterND` (13, 16/18: `reduction`),
//! lowered to the IR `scatter_elements` / `scatter_nd` ops.

use crate::graph::ValueId;
use crate::onnx::lower::{bail, LResult, Lowering};
use crate::ops::scatter_elements::ScatterReduction;
use crate::ops::{ScatterElements, ScatterNd};

fn reduction(n: &Lowering<'_>) -> LResult<ScatterReduction> {
    Ok(match n.attr_s("reduction", "none")?.as_str() {
        "none" => ScatterReduction::None,
        "add" => ScatterReduction::Add,
        "mul" => ScatterReduction::Mul,
        "max" => ScatterReduction::Max,
        "min" => ScatterReduction::Min,
        other => bail!("unknown reduction {other:?}"),
    })
}

pub fn scatter_elements(n: &mut Lowering<'_>) -> LResult<Vec<ValueId>> {
    let (data, idx, upd) = (n.input(0)?, n.input(1)?, n.input(2)?);
    let axis = n.axis(n.attr_i("axis", 0)?, n.rank(data))?;
    let reduction = reduction(n)?;
    Ok(vec![n.emit(
        ScatterElements { axis, reduction },
        &[data, idx, upd],
    )?])
}

pub fn scatter_nd(n: &mut Lowering<'_>) -> LResult<Vec<ValueId>> {
    let (data, idx, upd) = (n.input(0)?, n.input(1)?, n.input(2)?);
    let reduction = reduction(n)?;
    Ok(vec![n.emit(ScatterNd { reduction }, &[data, idx, upd])?])
}
