//! `pool_grad`: the backward of [`Pool`](super::Pool). Max pooling routes each `dy` element to
//! the first maximal tap of its window (ties: the first in row-major window order, as the
//! forward picked it); average pooling spreads it evenly over the window's real taps with the
//! forward's divisor. Batch and channels are parallel, spatial dims whole.

use super::pool::pool_axis_maps;
use super::pool::PoolKind;
use super::*;
use crate::dtype::TensorType;
use crate::error::OpError;
use crate::graph::ValueId;
use crate::op_err;
use crate::tensor::Tensor;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
/// Backward of [`Pool`](super::Pool): inputs `dy, x`; output shaped like x.
pub struct PoolGrad {
    pub pool: super::pool::Pool,
}

impl OpSpec for PoolGrad {
    fn infer(&self, inputs: &[&TensorType]) -> Result<Vec<TensorType>, OpError> {
        let [dy, x] = inputs else {
            return Err(op_err!(
                "pool_grad takes 2 inputs (dy, x), got {}",
                inputs.len()
            ));
        };
        let y = self.pool.infer(&[x])?.remove(0);
        if dy.shape != y.shape || dy.dtype != x.dtype {
            return Err(op_err!("dy is {dy}, the forward pool produces {y}"));
        }
        if !x.dtype.is_float() {
            return Err(op_err!("pool_grad of {} is not supported", x.dtype));
        }
        Ok(vec![(*x).clone()])
    }

    fn dims(&self, inputs: &[&TensorType], outputs: &[&TensorType]) -> DimMap {
        if self.infer(inputs).is_err() {
            return DimMap::opaque(inputs, outputs);
        }
        let (axes, x, y) = pool_axis_maps(inputs[1], inputs[0]);
        DimMap {
            axes,
            inputs: vec![y, x.clone()],
            outputs: vec![x],
        }
    }

    fn cost(&self, inputs: &[&TensorType], outputs: &[&TensorType]) -> Cost {
        let per_dy: usize = self.pool.kernel.iter().product();
        let n = inputs.first().map_or(0, |t| t.numel());
        Cost::memory_bound(inputs, outputs, (n * per_dy) as f64)
    }

    fn differentiable(&self, i: usize) -> bool {
        i == 0
    }

    fn vjp(&self, _cx: &mut VjpCtx<'_>) -> Result<Vec<Option<ValueId>>, OpError> {
        Err(op_err!(
            "pool_grad has no gradient (second-order gradients are unsupported)"
        ))
    }

    fn eval(&self, inputs: &[&Tensor]) -> Result<Vec<Tensor>, OpError> {
        let tys: Vec<TensorType> = inputs.iter().map(|t| t.ty()).collect();
        let out = self.infer(&tys.iter().collect::<Vec<_>>())?.remove(0);
        let (dy, x) = (inputs[0], inputs[1]);
        let t = self.pool.taps(&tys[1])?;
        let (in_len, out_len) = (t.window.input_len(), t.window.output_len());
        let planes = x.shape[0] * x.shape[1];
        let mut dx = vec![0.0; out.numel()];
        for c in 0..planes {
            let plane = &x.data[c * in_len..(c + 1) * in_len];
            let grad = &mut dx[c * in_len..(c + 1) * in_len];
            for (o, (taps, &div)) in t.taps.iter().zip(&t.divisors).enumerate() {
                let g = dy.data[c * out_len + o];
                match self.pool.kind {
                    PoolKind::Max => {
                        if let Some(p) = super::Pool::argmax(plane, taps) {
                            grad[p] += g;
                        }
                    }
                    PoolKind::Avg => {
                        for &p in taps {
                            grad[p] += g / div;
                        }
                    }
                }
            }
        }
        Ok(vec![Tensor::new(out.dtype, out.shape, dx)])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::DType;
    use crate::ops::Pool;

    fn max2x2() -> Pool {
        Pool {
            kind: PoolKind::Max,
            kernel: vec![2, 2],
            strides: vec![1, 1],
            pads: vec![[0, 0]; 2],
            dilations: vec![1, 1],
            count_include_pad: false,
            ceil_mode: false,
        }
    }

    #[test]
    fn rejects_mismatched_dy() {
        let op = PoolGrad { pool: max2x2() };
        let x = TensorType::new(DType::F32, [1, 2, 4, 4]);
        let dy = TensorType::new(DType::F32, [1, 2, 4, 4]);
        let e = op.infer(&[&dy, &x]).expect_err("3x3");
        assert!(e.0.contains("f32[1,2,3,3]"), "{e}");
        let dy = TensorType::new(DType::F32, [1, 2, 3, 3]);
        let y = op.infer(&[&dy, &x]).expect("infer").remove(0);
        assert_eq!(op.dims(&[&dy, &x], &[&y]).to_einsum(), "abEF,abCD->abCD");
    }

    #[test]
    fn ties_route_to_the_first_max() {
        // all equal: every window's first tap (its top-left) gets the gradient
        let x = Tensor::full(DType::F64, vec![1, 1, 3, 3], 1.0);
        let dy = Tensor::new(DType::F64, vec![1, 1, 2, 2], vec![1.0, 2.0, 3.0, 4.0]);
        let dx = PoolGrad { pool: max2x2() }
            .eval(&[&dy, &x])
            .expect("eval")
            .remove(0);
        assert_eq!(dx.data, vec![1.0, 2.0, 0.0, 3.0, 4.0, 0.0, 0.0, 0.0, 0.0]);
        let avg = Pool {
            kind: PoolKind::Avg,
            ..max2x2()
        };
        let dx = PoolGrad { pool: avg }
            .eval(&[&dy, &x])
            .expect("eval")
            .remove(0);
        assert_eq!(
            dx.data,
            vec![0.25, 0.75, 0.5, 1.0, 2.5, 1.5, 0.75, 1.75, 1.0]
        );
        // values against finite differences: pool's gradcheck
    }
}
