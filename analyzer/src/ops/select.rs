//! `where`: elementwise select `cond ? x : y` with numpy broadcasting of all three inputs (ONNX
//! Where). Exporters use it for attention masks and for `masked_fill`; the planner sees a plain
//! broadcast. The condition is a mask and gets no gradient; `x` and `y` get the output gradient
//! where they were selected and zero elsewhere, summed down over their broadcast dims.

use super::*;
use crate::dtype::{DType, TensorType};
use crate::error::{AnalyzerError, OpError};
use crate::graph::ValueId;
use crate::op_err;
use crate::ops::binary::{broadcast_offsets, unbroadcast};
use crate::tensor::{broadcast_shapes, Tensor};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
/// `where(cond, x, y)`: elementwise select with numpy broadcasting of all three inputs.
pub struct Where {}

impl OpSpec for Where {
    fn infer(&self, inputs: &[&TensorType]) -> Result<Vec<TensorType>, OpError> {
        let [c, x, y] = inputs else {
            return Err(op_err!("takes 3 inputs (cond, x, y), got {}", inputs.len()));
        };
        if c.dtype != DType::Bool {
            return Err(op_err!("the condition must be bool, got {}", c.dtype));
        }
        if x.dtype != y.dtype {
            return Err(op_err!("x is {} but y is {}", x.dtype, y.dtype));
        }
        let shape = broadcast_shapes(&c.shape, &x.shape)
            .and_then(|s| broadcast_shapes(&s, &y.shape))
            .ok_or_else(|| {
                op_err!(
                    "shapes {:?} (cond), {:?} (x) and {:?} (y) do not broadcast",
                    c.shape,
                    x.shape,
                    y.shape
                )
            })?;
        Ok(vec![TensorType::new(x.dtype, shape)])
    }

    fn dims(&self, inputs: &[&TensorType], outputs: &[&TensorType]) -> DimMap {
        DimMap::elementwise(inputs, outputs)
    }

    fn cost(&self, inputs: &[&TensorType], outputs: &[&TensorType]) -> Cost {
        Cost::elementwise(inputs, outputs, 1.0)
    }

    fn differentiable(&self, i: usize) -> bool {
        i != 0
    }

    fn vjp(&self, cx: &mut VjpCtx<'_>) -> Result<Vec<Option<ValueId>>, OpError> {
        let Some(dy) = cx.grads[0] else {
            return Ok(vec![None; 3]);
        };
        let cond = cx.inputs[0];
        let mut grads = vec![None; 3];
        for i in [1, 2] {
            let ty = cx.input_ty(i);
            if !cx.needs[i] || !ty.dtype.is_float() {
                continue;
            }
            let zero = cx.b.scalar(ty.dtype, 0.0);
            let (a, b) = if i == 1 { (dy, zero) } else { (zero, dy) };
            let g = cx.b.emit(Where {}, &[cond, a, b])?;
            grads[i] = Some(unbroadcast(cx.b, g, &ty.shape)?);
        }
        Ok(grads)
    }

    fn eval(&self, inputs: &[&Tensor]) -> Result<Vec<Tensor>, OpError> {
        let tys: Vec<TensorType> = inputs.iter().map(|t| t.ty()).collect();
        let out = self.infer(&tys.iter().collect::<Vec<_>>())?.remove(0);
        let offs: Vec<Vec<usize>> = inputs
            .iter()
            .map(|t| broadcast_offsets(&t.shape, &out.shape))
            .collect();
        let (c, x, y) = (inputs[0], inputs[1], inputs[2]);
        let data = (0..out.numel())
            .map(|k| {
                if c.data[offs[0][k]] != 0.0 {
                    x.data[offs[1][k]]
                } else {
                    y.data[offs[2][k]]
                }
            })
            .collect();
        Ok(vec![Tensor::new(out.dtype, out.shape, data)])
    }
}

impl crate::builder::GraphBuilder {
    /// `cond ? x : y` elementwise, all three broadcast.
    pub fn where_(
        &mut self,
        cond: ValueId,
        x: ValueId,
        y: ValueId,
    ) -> Result<ValueId, AnalyzerError> {
        self.node1(Where {}, &[cond, x, y])
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::ops::gradcheck::{check, rand_tensor};

    fn tt(dtype: DType, shape: &[usize]) -> TensorType {
        TensorType::new(dtype, shape.to_vec())
    }

    #[test]
    fn infers_and_rejects() {
        let c = tt(DType::Bool, &[1, 3]);
        let x = tt(DType::F32, &[2, 1]);
        let y = tt(DType::F32, &[]);
        assert_eq!(
            Where {}.infer(&[&c, &x, &y]).unwrap()[0],
            tt(DType::F32, &[2, 3])
        );
        let e = Where {}.infer(&[&x, &x, &y]).unwrap_err();
        assert!(e.0.contains("condition must be bool"), "{e}");
        let e = Where {}.infer(&[&c, &x, &tt(DType::F16, &[])]).unwrap_err();
        assert!(e.0.contains("x is f32 but y is f16"), "{e}");
        let e = Where {}
            .infer(&[&c, &tt(DType::F32, &[4]), &y])
            .unwrap_err();
        assert!(e.0.contains("do not broadcast"), "{e}");
        assert!(Where {}.infer(&[&c, &x]).is_err());
    }

    #[test]
    fn dims_broadcast() {
        let c = tt(DType::Bool, &[1, 3]);
        let x = tt(DType::F32, &[2, 1]);
        let y = tt(DType::F32, &[]);
        let out = tt(DType::F32, &[2, 3]);
        assert_eq!(
            Where {}.dims(&[&c, &x, &y], &[&out]).to_einsum(),
            "_b,a_,->ab"
        );
        assert!(!Where {}.differentiable(0));
    }

    #[test]
    fn evaluates() {
        let c = Tensor::new(DType::Bool, vec![2], vec![1.0, 0.0]);
        let x = Tensor::new(DType::F64, vec![2, 1], vec![1.0, 2.0]);
        let y = Tensor::scalar(DType::F64, -1.0);
        let out = Where {}.eval(&[&c, &x, &y]).unwrap();
        assert_eq!(out[0].shape, vec![2, 2]);
        assert_eq!(out[0].data, vec![1.0, -1.0, 2.0, -1.0]);
    }

    #[test]
    fn gradients_match_finite_differences() {
        let c = Tensor::new(DType::Bool, vec![2, 3], vec![1.0, 0.0, 1.0, 0.0, 0.0, 1.0]);
        check(
            Where {},
            &[c.clone(), rand_tensor(&[2, 3], 1), rand_tensor(&[2, 3], 2)],
            1e-6,
        );
        check(
            Where {},
            &[c.clone(), rand_tensor(&[3], 3), rand_tensor(&[2, 1], 4)],
            1e-6,
        );
        let c1 = Tensor::new(DType::Bool, vec![3], vec![0.0, 1.0, 1.0]);
        check(
            Where {},
            &[c1, rand_tensor(&[2, 3], 5), rand_tensor(&[], 6)],
            1e-6,
        );
    }
}
