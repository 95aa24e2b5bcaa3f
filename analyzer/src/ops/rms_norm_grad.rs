//! `rms_norm_grad`: the fused backward of [`RmsNorm`](super::RmsNorm). With
//! `xhat = x * rstd` and `g = dy * scale`, per row of the normalised dims:
//! `dx = rstd * (g - xhat * mean(g * xhat))` and `dscale = sum_rows(dy * xhat)`. As for
//! [`LayerNormGrad`](super::LayerNormGrad) the row axes are `Contracted` (dscale is a partial
//! sum when they are split) and the normalised axes whole.

use super::*;
use crate::dtype::TensorType;
use crate::error::OpError;
use crate::graph::ValueId;
use crate::op_err;
use crate::ops::layer_norm::{check_norm_operands, norm_dims, stats_dtype, stats_shape, NormRole};
use crate::tensor::Tensor;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
/// Backward of [`RmsNorm`](super::RmsNorm). Inputs `dy, x, scale, rstd`; outputs `dx, dscale`.
pub struct RmsNormGrad {
    pub axis: usize,
}

/// Vector flops per element: xhat (1), g (1), the row mean (2), dx (3), dscale (2).
const FLOPS_PER_ELEMENT: f64 = 9.0;

impl OpSpec for RmsNormGrad {
    fn infer(&self, inputs: &[&TensorType]) -> Result<Vec<TensorType>, OpError> {
        let [dy, x, w, rstd] = inputs else {
            return Err(op_err!(
                "takes 4 inputs (dy, x, scale, rstd), got {}",
                inputs.len()
            ));
        };
        check_norm_operands(x, &[("scale", w)], self.axis)?;
        if dy != x {
            return Err(op_err!("dy is {dy} but x is {x}"));
        }
        let stats = TensorType::new(stats_dtype(x.dtype), stats_shape(&x.shape, self.axis));
        if **rstd != stats {
            return Err(op_err!("rstd is {rstd}, expected {stats}"));
        }
        Ok(vec![(*x).clone(), (*w).clone()])
    }

    fn dims(&self, inputs: &[&TensorType], outputs: &[&TensorType]) -> DimMap {
        if self.infer(inputs).is_err() {
            return DimMap::opaque(inputs, outputs);
        }
        use NormRole::*;
        norm_dims(
            inputs[1],
            self.axis,
            AxisKind::Contracted,
            &[Full, Full, Feature, Stats],
            &[Full, Feature],
        )
    }

    fn cost(&self, inputs: &[&TensorType], outputs: &[&TensorType]) -> Cost {
        let n = inputs.get(1).map_or(0, |x| x.numel());
        Cost::memory_bound(inputs, outputs, FLOPS_PER_ELEMENT * n as f64)
    }

    fn vjp(&self, _cx: &mut VjpCtx<'_>) -> Result<Vec<Option<ValueId>>, OpError> {
        Err(op_err!(
            "rms_norm_grad has no gradient: second-order gradients are unsupported"
        ))
    }

    fn eval(&self, inputs: &[&Tensor]) -> Result<Vec<Tensor>, OpError> {
        let tys: Vec<TensorType> = inputs.iter().map(|t| t.ty()).collect();
        let outs = self.infer(&tys.iter().collect::<Vec<_>>())?;
        let [dy, x, w, rstd] = inputs else {
            return Err(op_err!("takes 4 inputs"));
        };
        let n = w.numel();
        let mut dx = vec![0.0; x.numel()];
        let mut dw = vec![0.0; n];
        for r in 0..rstd.numel() {
            let s = rstd.data[r];
            let at = |k: usize| r * n + k;
            let xhat = |k: usize| x.data[at(k)] * s;
            let g = |k: usize| dy.data[at(k)] * w.data[k];
            let mean_gx = (0..n).map(|k| g(k) * xhat(k)).sum::<f64>() / n as f64;
            for k in 0..n {
                dx[at(k)] = s * (g(k) - xhat(k) * mean_gx);
                dw[k] += dy.data[at(k)] * xhat(k);
            }
        }
        Ok(vec![
            Tensor::new(outs[0].dtype, outs[0].shape.clone(), dx),
            Tensor::new(outs[1].dtype, outs[1].shape.clone(), dw),
        ])
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::dtype::DType;

    fn tt(dtype: DType, shape: &[usize]) -> TensorType {
        TensorType::new(dtype, shape.to_vec())
    }

    #[test]
    fn infers_and_rejects() {
        let x = tt(DType::F32, &[2, 4]);
        let w = tt(DType::F32, &[4]);
        let st = tt(DType::F32, &[2, 1]);
        let op = RmsNormGrad { axis: 1 };
        assert_eq!(
            op.infer(&[&x, &x, &w, &st]).unwrap(),
            vec![x.clone(), w.clone()]
        );
        let e = op.infer(&[&x, &x, &w, &x]).unwrap_err();
        assert!(e.0.contains("rstd is f32[2,4], expected f32[2,1]"), "{e}");
        assert!(op.infer(&[&x, &x, &w]).is_err());
    }

    #[test]
    fn dims_make_rows_contracted() {
        let x = tt(DType::F32, &[2, 4]);
        let w = tt(DType::F32, &[4]);
        let st = tt(DType::F32, &[2, 1]);
        let d = RmsNormGrad { axis: 1 }.dims(&[&x, &x, &w, &st], &[&x, &w]);
        assert_eq!(d.to_einsum(), "aB,aB,B,a_->aB,B");
        assert_eq!(d.axes[0].kind, AxisKind::Contracted);
    }

    #[test]
    fn evaluates_a_hand_example() {
        // x = [3, 4], rstd = 1/5 (eps 0 would give 1/sqrt(12.5); any saved value is used as is)
        // xhat = [0.6, 0.8]; scale = [1, 1], dy = [1, 0]: g = [1, 0], mean(g xhat) = 0.3,
        // dx = 0.2 * ([1, 0] - 0.3 [0.6, 0.8]) = [0.164, -0.048]; dscale = [0.6, 0]
        let f = |s: &[usize], d: &[f64]| Tensor::new(DType::F64, s.to_vec(), d.to_vec());
        let out = RmsNormGrad { axis: 1 }
            .eval(&[
                &f(&[1, 2], &[1.0, 0.0]),
                &f(&[1, 2], &[3.0, 4.0]),
                &f(&[2], &[1.0, 1.0]),
                &f(&[1, 1], &[0.2]),
            ])
            .unwrap();
        assert!((out[0].data[0] - 0.164).abs() < 1e-15);
        assert!((out[0].data[1] + 0.048).abs() < 1e-15);
        assert!((out[1].data[0] - 0.6).abs() < 1e-15);
        assert_eq!(out[1].data[1], 0.0);
    }
}
