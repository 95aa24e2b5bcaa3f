//! `batch_norm_grad`: the backward of training-mode [`BatchNorm`](super::BatchNorm), in one
//! fused op as cuDNN and PyTorch run it. With `xhat = (x - mean) * rstd` and `M` elements per
//! channel:
//!
//! `dx = scale * rstd / M * (M * dy - sum(dy) - xhat * sum(dy * xhat))`,
//! `dscale = sum(dy * xhat)`, `dbias = sum(dy)` (sums over N and the spatial dims).
//!
//! Its dim map matches the forward's: channels parallel, batch and spatial dims whole.

use super::batch_norm::{bn_axis_maps, check_channels, per_channel};
use super::*;
use crate::dtype::TensorType;
use crate::error::OpError;
use crate::graph::ValueId;
use crate::op_err;
use crate::tensor::Tensor;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
/// Backward of training-mode [`BatchNorm`](super::BatchNorm): inputs `dy, x, scale,
/// saved_mean, saved_rstd`; outputs `dx, dscale, dbias`.
pub struct BatchNormGrad {}

impl OpSpec for BatchNormGrad {
    fn infer(&self, inputs: &[&TensorType]) -> Result<Vec<TensorType>, OpError> {
        let [dy, x, scale, mean, rstd] = inputs else {
            return Err(op_err!(
                "batch_norm_grad takes 5 inputs (dy, x, scale, saved_mean, saved_rstd), got {}",
                inputs.len()
            ));
        };
        if dy != x {
            return Err(op_err!("dy {dy} and x {x} differ"));
        }
        check_channels(
            x,
            &[("scale", scale), ("saved_mean", mean), ("saved_rstd", rstd)],
        )?;
        Ok(vec![(*x).clone(), (*scale).clone(), (*scale).clone()])
    }

    fn dims(&self, inputs: &[&TensorType], outputs: &[&TensorType]) -> DimMap {
        if self.infer(inputs).is_err() {
            return DimMap::opaque(inputs, outputs);
        }
        let (axes, x, c) = bn_axis_maps(inputs[1], true);
        DimMap {
            axes,
            inputs: vec![x.clone(), x.clone(), c.clone(), c.clone(), c.clone()],
            outputs: vec![x, c.clone(), c],
        }
    }

    fn cost(&self, inputs: &[&TensorType], outputs: &[&TensorType]) -> Cost {
        let n = inputs.first().map_or(0, |t| t.numel());
        Cost::memory_bound(inputs, outputs, 10.0 * n as f64)
    }

    fn differentiable(&self, i: usize) -> bool {
        i < 3
    }

    fn vjp(&self, _cx: &mut VjpCtx<'_>) -> Result<Vec<Option<ValueId>>, OpError> {
        Err(op_err!(
            "batch_norm_grad has no gradient (second-order gradients are unsupported)"
        ))
    }

    fn eval(&self, inputs: &[&Tensor]) -> Result<Vec<Tensor>, OpError> {
        let tys: Vec<TensorType> = inputs.iter().map(|t| t.ty()).collect();
        let outs = self.infer(&tys.iter().collect::<Vec<_>>())?;
        let [dy, x, scale, mean, rstd] = inputs else {
            return Err(op_err!("batch_norm_grad takes 5 inputs"));
        };
        let c = scale.numel();
        let (m, chan) = per_channel(&x.shape);
        let xhat = |i: usize| (x.data[i] - mean.data[chan(i)]) * rstd.data[chan(i)];
        let (mut sum_dy, mut sum_dy_xhat) = (vec![0.0; c], vec![0.0; c]);
        for (i, &g) in dy.data.iter().enumerate() {
            sum_dy[chan(i)] += g;
            sum_dy_xhat[chan(i)] += g * xhat(i);
        }
        let m = m as f64;
        let dx: Vec<f64> = dy
            .data
            .iter()
            .enumerate()
            .map(|(i, &g)| {
                let k = chan(i);
                scale.data[k] * rstd.data[k] / m * (m * g - sum_dy[k] - xhat(i) * sum_dy_xhat[k])
            })
            .collect();
        Ok(vec![
            Tensor::new(outs[0].dtype, outs[0].shape.clone(), dx),
            Tensor::new(outs[1].dtype, outs[1].shape.clone(), sum_dy_xhat),
            Tensor::new(outs[2].dtype, outs[2].shape.clone(), sum_dy),
        ])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::DType;

    #[test]
    fn rejects_mismatches() {
        let x = TensorType::new(DType::F32, [2, 3, 4]);
        let dy = TensorType::new(DType::F32, [2, 3, 5]);
        let c = TensorType::new(DType::F32, [3]);
        let e = BatchNormGrad {}
            .infer(&[&dy, &x, &c, &c, &c])
            .expect_err("dy");
        assert!(e.0.contains("differ"), "{e}");
        let c2 = TensorType::new(DType::F32, [2]);
        assert!(BatchNormGrad {}.infer(&[&x, &x, &c, &c2, &c]).is_err());
    }

    #[test]
    fn maps_dims_and_evaluates() {
        let x = Tensor::new(DType::F64, vec![2, 1, 2], vec![1.0, 2.0, 3.0, 4.0]);
        let dy = Tensor::new(DType::F64, vec![2, 1, 2], vec![1.0, 1.0, 1.0, 1.0]);
        let one = |v: f64| Tensor::new(DType::F64, vec![1], vec![v]);
        let outs = BatchNormGrad {}
            .eval(&[&dy, &x, &one(3.0), &one(2.5), &one(2.0)])
            .expect("eval");
        // a constant dy only shifts y: no gradient reaches x, dbias counts the elements
        assert!(
            outs[0].data.iter().all(|v| v.abs() < 1e-12),
            "{:?}",
            outs[0].data
        );
        assert!(outs[1].data[0].abs() < 1e-12);
        assert_eq!(outs[2].data, vec![4.0]);
        let tys: Vec<TensorType> = [&dy, &x, &one(0.0), &one(0.0), &one(0.0)]
            .iter()
            .map(|t| t.ty())
            .collect();
        let ins: Vec<&TensorType> = tys.iter().collect();
        let o = BatchNormGrad {}.infer(&ins).expect("infer");
        let orefs: Vec<&TensorType> = o.iter().collect();
        assert_eq!(
            BatchNormGrad {}.dims(&ins, &orefs).to_einsum(),
            "abc,abc,b,b,b->abc,b,b"
        );
        // values against finite differences: batch_norm's gradcheck
    }
}
