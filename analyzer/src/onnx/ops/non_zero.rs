//! `NonZero` (13): the indices of the non-zero elements, `i64 [rank, count]`. Its shape
//! depends on the data, so only a constant input is supported (evaluated at import); a
//! run-time input is an error.

use crate::graph::ValueId;
use crate::onnx::lower::{bail, LResult, Lowering};
use crate::tensor::{for_each_index, Tensor};

pub fn non_zero(n: &mut Lowering<'_>) -> LResult<Vec<ValueId>> {
    let x = n.input(0)?;
    let Some(t) = n.b.graph.const_value(x).cloned() else {
        bail!(
            "data-dependent output shape: the input is computed at run time, so the number of \
             non-zero elements is unknown at import"
        );
    };
    let mut hits: Vec<Vec<usize>> = vec![];
    let mut flat = 0;
    for_each_index(&t.shape, |idx| {
        if t.data[flat] != 0.0 {
            hits.push(idx.to_vec());
        }
        flat += 1;
    });
    let r = t.rank();
    let mut out = vec![0i64; r * hits.len()];
    for (j, idx) in hits.iter().enumerate() {
        for (d, &i) in idx.iter().enumerate() {
            out[d * hits.len() + j] = i as i64;
        }
    }
    Ok(vec![n.constant(Tensor::from_i64(vec![r, hits.len()], &out))])
}
