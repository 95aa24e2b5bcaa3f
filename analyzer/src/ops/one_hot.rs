//! `one_hot`: ONNX OneHot with a constant depth: a new axis of size `depth` at `axis` of the
//! output, holding `values[1]` where the class equals the index (negative indices wrap by
//! `depth`) and `values[0]` elsewhere, including for indices out of `[-depth, depth)`.
//!
//! The index dims are parallel axes; the class axis exists only in the output and is `Whole`
//! (a shard of it would need its global offset). Indices and the on/off values get no
//! gradient: exporters make the values constants.

use super::*;
use crate::dtype::{DType, TensorType};
use crate::error::OpError;
use crate::graph::ValueId;
use crate::op_err;
use crate::tensor::{for_each_index, Tensor};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
/// ONNX OneHot: inputs `indices, values` (values = `[off, on]`); a new axis of size `depth`
/// inserted at `axis` of the output.
pub struct OneHot {
    pub depth: usize,
    pub axis: usize,
}

impl OpSpec for OneHot {
    fn infer(&self, inputs: &[&TensorType]) -> Result<Vec<TensorType>, OpError> {
        let [indices, values] = inputs else {
            return Err(op_err!(
                "takes 2 inputs (indices, values), got {}",
                inputs.len()
            ));
        };
        if indices.dtype == DType::Bool {
            return Err(op_err!("indices must be numeric, got bool"));
        }
        if values.shape != [2] {
            return Err(op_err!(
                "values must be [off, on] of shape [2], got {:?}",
                values.shape
            ));
        }
        if self.axis > indices.rank() {
            return Err(op_err!(
                "axis {} is out of range for indices of rank {} (at most {})",
                self.axis,
                indices.rank(),
                indices.rank()
            ));
        }
        let mut shape = indices.shape.clone();
        shape.insert(self.axis, self.depth);
        Ok(vec![TensorType::new(values.dtype, shape)])
    }

    fn dims(&self, inputs: &[&TensorType], outputs: &[&TensorType]) -> DimMap {
        if self.infer(inputs).is_err() {
            return DimMap::opaque(inputs, outputs);
        }
        let indices = inputs[0];
        let r = indices.rank();
        let mut axes: Vec<Axis> = indices
            .shape
            .iter()
            .map(|&size| Axis {
                size,
                kind: AxisKind::Parallel,
            })
            .collect();
        axes.push(Axis {
            size: self.depth,
            kind: AxisKind::Whole,
        });
        let mut out: Vec<Option<AxisId>> = (0..r).map(Some).collect();
        out.insert(self.axis, Some(r));
        DimMap {
            axes,
            inputs: vec![(0..r).map(Some).collect(), vec![None]],
            outputs: vec![out],
        }
    }

    fn cost(&self, inputs: &[&TensorType], outputs: &[&TensorType]) -> Cost {
        // one compare per output element
        Cost::elementwise(inputs, outputs, 1.0)
    }

    fn differentiable(&self, _i: usize) -> bool {
        false
    }

    fn vjp(&self, _cx: &mut VjpCtx<'_>) -> Result<Vec<Option<ValueId>>, OpError> {
        Ok(vec![None, None])
    }

    fn eval(&self, inputs: &[&Tensor]) -> Result<Vec<Tensor>, OpError> {
        let tys: Vec<TensorType> = inputs.iter().map(|t| t.ty()).collect();
        let out = self.infer(&tys.iter().collect::<Vec<_>>())?.remove(0);
        let (indices, values) = (inputs[0], inputs[1]);
        let (off, on) = (values.data[0], values.data[1]);
        let depth = self.depth as i64;
        let istrides = indices.strides();
        let mut data = Vec::with_capacity(out.numel());
        for_each_index(&out.shape, |idx| {
            let class = idx[self.axis] as i64;
            let at: usize = idx
                .iter()
                .enumerate()
                .filter(|&(d, _)| d != self.axis)
                .map(|(_, &i)| i)
                .zip(&istrides)
                .map(|(i, s)| i * s)
                .sum();
            let mut v = indices.data[at].trunc() as i64;
            if v < 0 {
                v += depth;
            }
            data.push(if v == class { on } else { off });
        });
        Ok(vec![Tensor::new(out.dtype, out.shape, data)])
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn infers_and_rejects() {
        let i = TensorType::new(DType::I64, [2, 3]);
        let v = TensorType::new(DType::F32, [2]);
        let op = OneHot { depth: 5, axis: 1 };
        let out = op.infer(&[&i, &v]).unwrap();
        assert_eq!(out[0], TensorType::new(DType::F32, [2, 5, 3]));
        assert_eq!(op.dims(&[&i, &v], &[&out[0]]).to_einsum(), "ab,_->aCb");
        let e = OneHot { depth: 5, axis: 3 }.infer(&[&i, &v]).unwrap_err();
        assert!(e.0.contains("axis 3 is out of range"), "{e}");
        let e = op
            .infer(&[&i, &TensorType::new(DType::F32, [3])])
            .unwrap_err();
        assert!(e.0.contains("[off, on]"), "{e}");
        assert!(op.infer(&[&i]).is_err());
        assert!(!op.differentiable(1));
    }

    #[test]
    fn evaluates_with_wrapping() {
        let i = Tensor::from_i64([4], &[0, 2, -1, 7]);
        let v = Tensor::new(DType::F32, vec![2], vec![0.0, 1.0]);
        let out = OneHot { depth: 3, axis: 1 }.eval(&[&i, &v]).unwrap();
        assert_eq!(out[0].shape, vec![4, 3]);
        assert_eq!(
            out[0].data,
            vec![1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0]
        );
        let out = OneHot { depth: 3, axis: 0 }
            .eval(&[&Tensor::from_i64([2], &[1, -3]), &v])
            .unwrap();
        assert_eq!(out[0].shape, vec![3, 2]);
        assert_eq!(out[0].data, vec![0.0, 1.0, 1.0, 0.0, 0.0, 0.0]);
    }
}
