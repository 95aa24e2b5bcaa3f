//! `Cast` (13/19/21; `saturate` only matters for float8, which has no IR dtype) and
//! `CastLike` (15+). Lower to the IR `cast` op; a cast to the same type is no node.

use crate::dtype::DType;
use crate::graph::ValueId;
use crate::onnx::lower::{bail, LResult, Lowering};
use crate::onnx::proto::data_type;
use crate::onnx::weights::dtype_of;
use crate::ops::Cast;

fn cast_to(n: &mut Lowering<'_>, to: DType) -> LResult<Vec<ValueId>> {
    let x = n.input(0)?;
    if n.dtype(x) == to {
        return Ok(vec![x]);
    }
    Ok(vec![n.emit(Cast { to }, &[x])?])
}

pub fn cast(n: &mut Lowering<'_>) -> LResult<Vec<ValueId>> {
    let Some(code) = n.attr_opt_i("to")? else {
        bail!("attribute \"to\" is required");
    };
    let code = i32::try_from(code).unwrap_or(-1);
    let Some(to) = dtype_of(code) else {
        bail!("cast to {} is not supported", data_type::name(code));
    };
    cast_to(n, to)
}

pub fn cast_like(n: &mut Lowering<'_>) -> LResult<Vec<ValueId>> {
    let like = n.input(1)?;
    let to = n.dtype(like);
    cast_to(n, to)
}
