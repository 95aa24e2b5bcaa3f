//! `cast`: converts the element type (ONNX Cast). Mixed-precision exports cast around softmax and
//! norms, so the op must cost what it moves (a read in one dtype, a write in the other). The
//! gradient of a float-to-float cast is the output gradient cast back; casts from or to integers
//! and bool carry no gradient.

use super::*;
use crate::dtype::DType;
use crate::dtype::TensorType;
use crate::error::{AnalyzerError, OpError};
use crate::graph::ValueId;
use crate::op_err;
use crate::tensor::Tensor;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
/// Converts the element type.
pub struct Cast {
    pub to: DType,
}

impl OpSpec for Cast {
    fn infer(&self, inputs: &[&TensorType]) -> Result<Vec<TensorType>, OpError> {
        let [x] = inputs else {
            return Err(op_err!("takes 1 input, got {}", inputs.len()));
        };
        Ok(vec![x.with_dtype(self.to)])
    }

    fn dims(&self, inputs: &[&TensorType], outputs: &[&TensorType]) -> DimMap {
        DimMap::elementwise(inputs, outputs)
    }

    fn cost(&self, inputs: &[&TensorType], outputs: &[&TensorType]) -> Cost {
        Cost::data_movement(inputs, outputs)
    }

    fn vjp(&self, cx: &mut VjpCtx<'_>) -> Result<Vec<Option<ValueId>>, OpError> {
        let from = cx.input_ty(0).dtype;
        let Some(dy) = cx.grads[0] else {
            return Ok(vec![None]);
        };
        if !cx.needs[0] || !from.is_float() || !self.to.is_float() {
            return Ok(vec![None]);
        }
        if from == self.to {
            return Ok(vec![Some(dy)]);
        }
        Ok(vec![Some(cx.b.emit(Cast { to: from }, &[dy])?)])
    }

    fn eval(&self, inputs: &[&Tensor]) -> Result<Vec<Tensor>, OpError> {
        let [x] = inputs else {
            return Err(op_err!("takes 1 input, got {}", inputs.len()));
        };
        Ok(vec![x.cast(self.to)])
    }
}

impl crate::builder::GraphBuilder {
    /// `x` converted to `dtype`.
    pub fn cast(&mut self, x: ValueId, dtype: DType) -> Result<ValueId, AnalyzerError> {
        self.node1(Cast { to: dtype }, &[x])
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::ops::gradcheck::{check, rand_tensor};

    #[test]
    fn infers_dims_and_cost() {
        let x = TensorType::new(DType::F32, [2, 3]);
        let op = Cast { to: DType::F16 };
        let out = op.infer(&[&x]).unwrap();
        assert_eq!(out[0], TensorType::new(DType::F16, [2, 3]));
        assert!(op.infer(&[]).is_err());
        assert_eq!(op.dims(&[&x], &[&out[0]]).to_einsum(), "ab->ab");
        let c = op.cost(&[&x], &[&out[0]]);
        assert_eq!((c.bytes_read, c.bytes_written), (24.0, 12.0));
    }

    #[test]
    fn evaluates_with_onnx_rounding() {
        let x = Tensor::new(DType::F64, vec![4], vec![-1.7, 0.0, 2.9, 1e-3]);
        let i = Cast { to: DType::I32 }.eval(&[&x]).unwrap();
        assert_eq!(i[0].data, vec![-1.0, 0.0, 2.0, 0.0]);
        let b = Cast { to: DType::Bool }.eval(&[&x]).unwrap();
        assert_eq!(b[0].data, vec![1.0, 0.0, 1.0, 1.0]);
    }

    #[test]
    fn gradient_casts_back() {
        // f64 -> f64 through the finite-difference check; f64 -> f32 rounds the forward too
        // coarsely for central differences, so check the emitted cast directly
        check(Cast { to: DType::F64 }, &[rand_tensor(&[3], 2)], 1e-6);
        let mut b = crate::builder::GraphBuilder::new();
        let x = b.input("x", TensorType::new(DType::F64, [3]));
        let y = b.cast(x, DType::F32).unwrap();
        let dy = b.constant(Tensor::new(DType::F32, vec![3], vec![1.0, 2.0, 3.0]));
        let mut cx = VjpCtx {
            b: &mut b,
            inputs: &[x],
            outputs: &[y],
            grads: &[Some(dy)],
            needs: &[true],
        };
        let g = Cast { to: DType::F32 }.vjp(&mut cx).unwrap()[0].unwrap();
        assert_eq!(*b.ty(g), TensorType::new(DType::F64, [3]));
        let vals = crate::eval::run(&b.graph, &[(x, rand_tensor(&[3], 1))].into()).unwrap();
        assert_eq!(
            vals[g.0 as usize].as_ref().unwrap().data,
            vec![1.0, 2.0, 3.0]
        );
        let mut cx = VjpCtx {
            b: &mut b,
            inputs: &[x],
            outputs: &[y],
            grads: &[Some(dy)],
            needs: &[true],
        };
        assert_eq!(Cast { to: DType::I64 }.vjp(&mut cx).unwrap(), vec![None]);
    }
}
