//! `Shape` (13, 15: `start` / `end`) and `Size` (13): evaluated at import from the input's
//! type into `i64` constants, so the shape arithmetic that follows folds.

use crate::graph::ValueId;
use crate::onnx::lower::{LResult, Lowering};
use crate::tensor::Tensor;

pub fn shape(n: &mut Lowering<'_>) -> LResult<Vec<ValueId>> {
    let x = n.input(0)?;
    let s = n.shape(x);
    let r = s.len() as i64;
    let clamp = |i: i64| (if i < 0 { i + r } else { i }).clamp(0, r) as usize;
    let start = clamp(n.attr_i("start", 0)?);
    let end = clamp(n.attr_i("end", r)?).max(start);
    let dims: Vec<i64> = s[start..end].iter().map(|&d| d as i64).collect();
    Ok(vec![n.constant(Tensor::from_i64(vec![dims.len()], &dims))])
}

pub fn size(n: &mut Lowering<'_>) -> LResult<Vec<ValueId>> {
    let x = n.input(0)?;
    let numel = n.ty(x).numel() as i64;
    Ok(vec![
        n.constant(Tensor::from_i64(Vec::<usize>::new(), &[numel]))
    ])
}
