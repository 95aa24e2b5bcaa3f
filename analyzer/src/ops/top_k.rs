//! `top_k`: ONNX TopK with a constant `k` (mixture-of-experts routing picks its experts with
//! it). Outputs the `k` largest (or smallest) values along `axis` and their i64 indices; ties go
//! to the lower index, and the output is always sorted (which `sorted = false` permits).
//!
//! The selection axis is `Whole` in the input (a split would need a merge of per-shard top-k
//! lists) and its size-`k` counterpart in the outputs is tied to no axis; the other dims are
//! parallel. The values' gradient is scattered back with `ScatterElements(add)` into zeros at
//! the selected indices; the indices output carries no gradient.

use super::*;
use crate::dtype::{DType, TensorType};
use crate::error::OpError;
use crate::graph::ValueId;
use crate::op_err;
use crate::ops::scatter_elements::ScatterReduction;
use crate::ops::softmax::split_at_axis;
use crate::tensor::Tensor;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
/// ONNX TopK with a constant k: outputs `values, indices` (i64).
pub struct TopK {
    pub axis: usize,
    pub k: usize,
    pub largest: bool,
    pub sorted: bool,
}

impl OpSpec for TopK {
    fn infer(&self, inputs: &[&TensorType]) -> Result<Vec<TensorType>, OpError> {
        let [x] = inputs else {
            return Err(op_err!("takes 1 input, got {}", inputs.len()));
        };
        if x.dtype == DType::Bool {
            return Err(op_err!("takes a numeric tensor, got bool"));
        }
        let Some(&n) = x.shape.get(self.axis) else {
            return Err(op_err!(
                "axis {} is out of range for rank {}",
                self.axis,
                x.rank()
            ));
        };
        if self.k > n {
            return Err(op_err!(
                "k = {} exceeds the size {n} of axis {}",
                self.k,
                self.axis
            ));
        }
        let mut shape = x.shape.clone();
        shape[self.axis] = self.k;
        Ok(vec![
            TensorType::new(x.dtype, shape.clone()),
            TensorType::new(DType::I64, shape),
        ])
    }

    fn dims(&self, inputs: &[&TensorType], outputs: &[&TensorType]) -> DimMap {
        if self.infer(inputs).is_err() {
            return DimMap::opaque(inputs, outputs);
        }
        let x = inputs[0];
        let axes = x
            .shape
            .iter()
            .enumerate()
            .map(|(d, &size)| Axis {
                size,
                kind: if d == self.axis {
                    AxisKind::Whole
                } else {
                    AxisKind::Parallel
                },
            })
            .collect();
        let out: Vec<Option<AxisId>> = (0..x.rank())
            .map(|d| (d != self.axis).then_some(d))
            .collect();
        DimMap {
            axes,
            inputs: vec![(0..x.rank()).map(Some).collect()],
            outputs: vec![out.clone(), out],
        }
    }

    fn cost(&self, inputs: &[&TensorType], outputs: &[&TensorType]) -> Cost {
        // a heap of k: about log2(k) + 1 compares per input element
        let n = inputs.first().map_or(0, |x| x.numel());
        let per = (self.k.max(1) as f64).log2() + 1.0;
        Cost::memory_bound(inputs, outputs, per * n as f64)
    }

    fn differentiable(&self, _i: usize) -> bool {
        true
    }

    fn vjp(&self, cx: &mut VjpCtx<'_>) -> Result<Vec<Option<ValueId>>, OpError> {
        let xt = cx.input_ty(0);
        let Some(dv) = cx.grads[0] else {
            return Ok(vec![None]);
        };
        if !cx.needs[0] || !xt.dtype.is_float() {
            return Ok(vec![None]);
        }
        let indices = cx.outputs[1];
        let zeros = cx.b.zeros(&xt)?;
        let g = cx.b.emit(
            ScatterElements {
                axis: self.axis,
                reduction: ScatterReduction::Add,
            },
            &[zeros, indices, dv],
        )?;
        Ok(vec![Some(g)])
    }

    fn eval(&self, inputs: &[&Tensor]) -> Result<Vec<Tensor>, OpError> {
        let tys: Vec<TensorType> = inputs.iter().map(|t| t.ty()).collect();
        let outs = self.infer(&tys.iter().collect::<Vec<_>>())?;
        let x = inputs[0];
        let (outer, n, inner) = split_at_axis(&x.shape, self.axis);
        let k = self.k;
        let mut values = vec![0.0; outer * k * inner];
        let mut indices = vec![0.0; outer * k * inner];
        let mut order: Vec<usize> = Vec::with_capacity(n);
        for o in 0..outer {
            for i in 0..inner {
                let at = |j: usize| x.data[(o * n + j) * inner + i];
                order.clear();
                order.extend(0..n);
                // stable: equal values keep index order, so ties go to the lower index
                if self.largest {
                    order.sort_by(|&a, &b| at(b).total_cmp(&at(a)));
                } else {
                    order.sort_by(|&a, &b| at(a).total_cmp(&at(b)));
                }
                for (r, &j) in order.iter().take(k).enumerate() {
                    let dst = (o * k + r) * inner + i;
                    values[dst] = at(j);
                    indices[dst] = j as f64;
                }
            }
        }
        Ok(vec![
            Tensor::new(outs[0].dtype, outs[0].shape.clone(), values),
            Tensor::new(DType::I64, outs[1].shape.clone(), indices),
        ])
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::ops::gradcheck::{check, rand_tensor};

    fn op(axis: usize, k: usize, largest: bool) -> TopK {
        TopK {
            axis,
            k,
            largest,
            sorted: true,
        }
    }

    #[test]
    fn infers_and_rejects() {
        let x = TensorType::new(DType::F32, [2, 8, 3]);
        let out = op(1, 2, true).infer(&[&x]).unwrap();
        assert_eq!(out[0], TensorType::new(DType::F32, [2, 2, 3]));
        assert_eq!(out[1], TensorType::new(DType::I64, [2, 2, 3]));
        let d = op(1, 2, true).dims(&[&x], &[&out[0], &out[1]]);
        assert_eq!(d.to_einsum(), "aBc->a_c,a_c");
        let e = op(1, 9, true).infer(&[&x]).unwrap_err();
        assert!(e.0.contains("k = 9 exceeds the size 8 of axis 1"), "{e}");
        let e = op(3, 1, true).infer(&[&x]).unwrap_err();
        assert!(e.0.contains("axis 3 is out of range"), "{e}");
        assert!(op(0, 1, true).infer(&[&x.with_dtype(DType::Bool)]).is_err());
    }

    #[test]
    fn evaluates_with_ties_to_the_lower_index() {
        let x = Tensor::new(
            DType::F64,
            vec![2, 4],
            vec![1.0, 3.0, 3.0, 0.0, 5.0, -1.0, 2.0, -1.0],
        );
        let out = op(1, 2, true).eval(&[&x]).unwrap();
        assert_eq!(out[0].data, vec![3.0, 3.0, 5.0, 2.0]);
        assert_eq!(out[1].data, vec![1.0, 2.0, 0.0, 2.0]);
        let out = op(1, 3, false).eval(&[&x]).unwrap();
        assert_eq!(out[0].data, vec![0.0, 1.0, 3.0, -1.0, -1.0, 2.0]);
        assert_eq!(out[1].data, vec![3.0, 0.0, 1.0, 1.0, 3.0, 2.0]);
        let out = op(0, 1, true).eval(&[&x]).unwrap();
        assert_eq!(out[1].data, vec![1.0, 0.0, 0.0, 0.0]);
    }

    #[test]
    fn gradients_match_finite_differences() {
        check(op(1, 2, true), &[rand_tensor(&[2, 4, 2], 1)], 1e-6);
        check(op(0, 1, false), &[rand_tensor(&[3, 2], 2)], 1e-6);
    }
}
