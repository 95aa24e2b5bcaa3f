//! `TopK` (11): constant `K` input, `axis` (default -1), `largest`, `sorted`; outputs
//! `Values, Indices`. Lowers to the IR `top_k` op.

use crate::graph::ValueId;
use crate::onnx::lower::{bail, LResult, Lowering};
use crate::ops::TopK;

pub fn top_k(n: &mut Lowering<'_>) -> LResult<Vec<ValueId>> {
    let x = n.input(0)?;
    let k = n.const_ints(1)?;
    let [k] = k[..] else {
        bail!("K must hold one value, got {k:?}");
    };
    let Ok(k) = usize::try_from(k) else {
        bail!("K = {k} is negative");
    };
    let axis = n.axis(n.attr_i("axis", -1)?, n.rank(x))?;
    let largest = n.attr_i("largest", 1)? != 0;
    let sorted = n.attr_i("sorted", 1)? != 0;
    n.emit_n(
        TopK {
            axis,
            k,
            largest,
            sorted,
        },
        &[x],
    )
}
