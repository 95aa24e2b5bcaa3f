//! `reshape`: a row-major change of shape with the same element count. ONNX `Reshape`,
//! `Flatten`, `Squeeze` and `Unsqueeze` lower to it (the importer resolves `0` and `-1`), and
//! the vjps of several ops use it to add or drop size-1 dims.
//!
//! Its dim map decides whether a sharding survives an attention head split
//! (`[b, s, h*d] -> [b, s, h, d]`) and merge, so it is built with care: input and output dims
//! (size-1 dims left out) are cut into the smallest contiguous groups with equal element
//! counts. Within a group, the major (first) input dim and the major output dim share one
//! parallel axis when one size divides the other: splitting that axis `k` ways (`k` divides
//! both sizes) cuts the group's row-major range into the same `k` contiguous blocks on both
//! sides, so no data moves. The axis carries the smaller of the two sizes; the other tensor dim
//! is a multiple of it. Every other dim of a group is a whole axis (a split there would
//! interleave elements), and size-1 dims are tied to no axis.

use super::*;
use crate::dtype::TensorType;
use crate::error::{AnalyzerError, OpError};
use crate::graph::ValueId;
use crate::op_err;
use crate::tensor::Tensor;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
/// Reshape to a concrete shape with the same element count (row-major).
pub struct Reshape {
    pub shape: Vec<usize>,
}

impl Reshape {
    pub fn new(shape: impl Into<Vec<usize>>) -> Self {
        Reshape {
            shape: shape.into(),
        }
    }
}

/// Product of `dims`, or an error naming the shape when it overflows `usize`.
pub(crate) fn checked_numel(dims: &[usize]) -> Result<usize, OpError> {
    dims.iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| op_err!("shape {dims:?} has more elements than fit in memory"))
}

impl OpSpec for Reshape {
    fn infer(&self, inputs: &[&TensorType]) -> Result<Vec<TensorType>, OpError> {
        let [x] = inputs else {
            return Err(op_err!("reshape takes 1 input, got {}", inputs.len()));
        };
        let n = checked_numel(&x.shape)?;
        let m = checked_numel(&self.shape)?;
        if n != m {
            return Err(op_err!(
                "cannot reshape {x} ({n} elements) to {:?} ({m} elements)",
                self.shape
            ));
        }
        Ok(vec![TensorType::new(x.dtype, self.shape.clone())])
    }

    fn dims(&self, inputs: &[&TensorType], outputs: &[&TensorType]) -> DimMap {
        let (Some(x), Some(y)) = (inputs.first(), outputs.first()) else {
            return DimMap::opaque(inputs, outputs);
        };
        reshape_dims(&x.shape, &y.shape).unwrap_or_else(|| DimMap::opaque(inputs, outputs))
    }

    fn cost(&self, inputs: &[&TensorType], outputs: &[&TensorType]) -> Cost {
        Cost::data_movement(inputs, outputs)
    }

    fn vjp(&self, cx: &mut VjpCtx<'_>) -> Result<Vec<Option<ValueId>>, OpError> {
        let Some(dy) = cx.grads.first().copied().flatten() else {
            return Ok(vec![None; cx.inputs.len()]);
        };
        if !cx.needs.first().copied().unwrap_or(false) {
            return Ok(vec![None]);
        }
        let x = cx.input_ty(0);
        Ok(vec![Some(cx.b.emit(Reshape::new(x.shape), &[dy])?)])
    }

    fn eval(&self, inputs: &[&Tensor]) -> Result<Vec<Tensor>, OpError> {
        let tys: Vec<TensorType> = inputs.iter().map(|t| t.ty()).collect();
        let out = self.infer(&tys.iter().collect::<Vec<_>>())?.remove(0);
        Ok(vec![Tensor::new(
            out.dtype,
            out.shape,
            inputs[0].data.clone(),
        )])
    }
}

/// The grouped dim map described in the module doc; `None` when the shapes disagree in
/// element count or are empty.
fn reshape_dims(a: &[usize], b: &[usize]) -> Option<DimMap> {
    let (na, nb) = (checked_numel(a).ok()?, checked_numel(b).ok()?);
    if na != nb || na == 0 {
        return None;
    }
    let ia: Vec<usize> = (0..a.len()).filter(|&d| a[d] != 1).collect();
    let ib: Vec<usize> = (0..b.len()).filter(|&d| b[d] != 1).collect();
    let mut axes: Vec<Axis> = vec![];
    let mut ins = vec![None; a.len()];
    let mut outs = vec![None; b.len()];
    let mut new_axis = |size: usize, kind: AxisKind| {
        axes.push(Axis { size, kind });
        Some(axes.len() - 1)
    };
    let (mut i, mut j) = (0, 0);
    while i < ia.len() && j < ib.len() {
        let (gi, gj) = (i, j);
        let (mut pa, mut pb) = (a[ia[i]], b[ib[j]]);
        i += 1;
        j += 1;
        while pa != pb {
            if pa < pb {
                pa *= a[*ia.get(i)?];
                i += 1;
            } else {
                pb *= b[*ib.get(j)?];
                j += 1;
            }
        }
        let (ma, mb) = (a[ia[gi]], b[ib[gj]]);
        if ma % mb == 0 || mb % ma == 0 {
            let ax = new_axis(ma.min(mb), AxisKind::Parallel);
            ins[ia[gi]] = ax;
            outs[ib[gj]] = ax;
        } else {
            ins[ia[gi]] = new_axis(ma, AxisKind::Whole);
            outs[ib[gj]] = new_axis(mb, AxisKind::Whole);
        }
        for &d in &ia[gi + 1..i] {
            ins[d] = new_axis(a[d], AxisKind::Whole);
        }
        for &d in &ib[gj + 1..j] {
            outs[d] = new_axis(b[d], AxisKind::Whole);
        }
    }
    if i != ia.len() || j != ib.len() {
        return None;
    }
    Some(DimMap {
        axes,
        inputs: vec![ins],
        outputs: vec![outs],
    })
}

impl crate::builder::GraphBuilder {
    /// `x` reshaped (row-major) to `shape`, which must hold the same number of elements.
    pub fn reshape(&mut self, x: ValueId, shape: &[usize]) -> Result<ValueId, AnalyzerError> {
        self.node1(Reshape::new(shape), &[x])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::DType;
    use crate::ops::gradcheck::{check, rand_tensor};

    fn dims_of(from: &[usize], to: &[usize]) -> String {
        let x = TensorType::new(DType::F32, from);
        let op = Reshape::new(to);
        let y = op.infer(&[&x]).expect("infer").remove(0);
        op.dims(&[&x], &[&y]).to_einsum()
    }

    #[test]
    fn rejects_element_count_mismatch() {
        let x = TensorType::new(DType::F32, [2, 3]);
        let e = Reshape::new([4, 2]).infer(&[&x]).expect_err("6 vs 8");
        assert!(
            e.0.contains("6 elements") && e.0.contains("8 elements"),
            "{e}"
        );
        assert!(Reshape::new([usize::MAX, 3]).infer(&[&x]).is_err());
        assert!(Reshape::new([6]).infer(&[&x, &x]).is_err());
    }

    #[test]
    fn dim_maps_group_dims() {
        // head split and merge keep the head axis parallel
        assert_eq!(dims_of(&[2, 3, 8], &[2, 3, 2, 4]), "abc->abcD");
        assert_eq!(dims_of(&[2, 3, 2, 4], &[2, 3, 8]), "abcD->abc");
        // flatten of the batch into the rows
        assert_eq!(dims_of(&[2, 3, 4], &[6, 4]), "aBc->ac");
        // size-1 dims are untied; a scrambled group is whole
        assert_eq!(dims_of(&[1, 6, 4], &[4, 6, 1]), "_AC->BD_");
        assert_eq!(dims_of(&[3, 4], &[3, 4]), "ab->ab");
        assert_eq!(dims_of(&[1], &[]), "_->");
        let m = Reshape::new([2, 3, 2, 4]).dims(
            &[&TensorType::new(DType::F32, [2, 3, 8])],
            &[&TensorType::new(DType::F32, [2, 3, 2, 4])],
        );
        assert_eq!(m.axes[2].size, 2);
    }

    #[test]
    fn evaluates_and_differentiates() {
        let x = Tensor::new(DType::F64, vec![2, 3], (0..6).map(f64::from).collect());
        let y = Reshape::new([3, 2]).eval(&[&x]).expect("eval").remove(0);
        assert_eq!(y.shape, vec![3, 2]);
        assert_eq!(y.data, x.data);
        check(Reshape::new([3, 1, 4]), &[rand_tensor(&[2, 6], 1)], 1e-6);
    }
}
