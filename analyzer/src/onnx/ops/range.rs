//! `Range` (11): `start, limit, delta` scalars, which must be constants; evaluated at import
//! into a 1-D constant of `start`'s type with `max(ceil((limit - start) / delta), 0)` elements.

use crate::graph::ValueId;
use crate::onnx::lower::{bail, LResult, Lowering};
use crate::tensor::Tensor;

/// Ranges longer than this are not held as constants.
const RANGE_MAX_ELEMENTS: f64 = (1u64 << 26) as f64;

pub fn range(n: &mut Lowering<'_>) -> LResult<Vec<ValueId>> {
    let dtype = n.dtype(n.input(0)?);
    let start = n.const_scalar(0)?;
    let limit = n.const_scalar(1)?;
    let delta = n.const_scalar(2)?;
    if delta == 0.0 || !delta.is_finite() || !start.is_finite() || !limit.is_finite() {
        bail!("range({start}, {limit}, {delta}) is not a finite sequence");
    }
    let count = ((limit - start) / delta).ceil().max(0.0);
    if count > RANGE_MAX_ELEMENTS {
        bail!("range({start}, {limit}, {delta}) has {count} elements, too many for a constant");
    }
    let count = count as usize;
    let data = (0..count).map(|i| start + i as f64 * delta).collect();
    Ok(vec![n.constant(Tensor::new(dtype, vec![count], data))])
}
