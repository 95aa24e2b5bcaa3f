//! `layer_norm_grad`: the fused backward of [`LayerNorm`](super::LayerNorm), as PyTorch's
//! `native_layer_norm_backward`: one pass over `dy` and `x` with the saved statistics gives `dx`,
//! `dscale` and `dbias`.
//!
//! With `xhat = (x - mean) * rstd` and `g = dy * scale`, per row of the normalised dims:
//! `dx = rstd * (g - mean(g) - xhat * mean(g * xhat))`, `dscale = sum_rows(dy * xhat)`,
//! `dbias = sum_rows(dy)`. The leading (row) axes are `Contracted`: split across devices, `dx`
//! splits with them and `dscale` / `dbias` are partial sums, as a data-parallel weight gradient
//! is. The normalised axes stay whole.

use super::*;
use crate::dtype::TensorType;
use crate::error::OpError;
use crate::graph::ValueId;
use crate::op_err;
use crate::ops::layer_norm::{check_norm_operands, norm_dims, stats_dtype, stats_shape, NormRole};
use crate::tensor::Tensor;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
/// Backward of [`LayerNorm`](super::LayerNorm). Inputs `dy, x, scale, mean, rstd`; outputs
/// `dx, dscale` and `dbias` when `has_bias`.
pub struct LayerNormGrad {
    pub axis: usize,
    pub has_bias: bool,
}

/// Vector flops per element: xhat (2), g (1), the two row means (2), dx (4), dscale (2),
/// dbias (1).
const FLOPS_PER_ELEMENT: f64 = 12.0;

impl OpSpec for LayerNormGrad {
    fn infer(&self, inputs: &[&TensorType]) -> Result<Vec<TensorType>, OpError> {
        let [dy, x, w, mean, rstd] = inputs else {
            return Err(op_err!(
                "takes 5 inputs (dy, x, scale, mean, rstd), got {}",
                inputs.len()
            ));
        };
        check_norm_operands(x, &[("scale", w)], self.axis)?;
        if dy != x {
            return Err(op_err!("dy is {dy} but x is {x}"));
        }
        let stats = TensorType::new(stats_dtype(x.dtype), stats_shape(&x.shape, self.axis));
        for (name, t) in [("mean", mean), ("rstd", rstd)] {
            if **t != stats {
                return Err(op_err!("{name} is {t}, expected {stats}"));
            }
        }
        let mut outs = vec![(*x).clone(), (*w).clone()];
        if self.has_bias {
            outs.push((*w).clone());
        }
        Ok(outs)
    }

    fn dims(&self, inputs: &[&TensorType], outputs: &[&TensorType]) -> DimMap {
        if self.infer(inputs).is_err() {
            return DimMap::opaque(inputs, outputs);
        }
        use NormRole::*;
        let outs = [Full, Feature, Feature];
        norm_dims(
            inputs[1],
            self.axis,
            AxisKind::Contracted,
            &[Full, Full, Feature, Stats, Stats],
            &outs[..outputs.len().min(3)],
        )
    }

    fn cost(&self, inputs: &[&TensorType], outputs: &[&TensorType]) -> Cost {
        let n = inputs.get(1).map_or(0, |x| x.numel());
        Cost::memory_bound(inputs, outputs, FLOPS_PER_ELEMENT * n as f64)
    }

    fn vjp(&self, _cx: &mut VjpCtx<'_>) -> Result<Vec<Option<ValueId>>, OpError> {
        Err(op_err!(
            "layer_norm_grad has no gradient: second-order gradients are unsupported"
        ))
    }

    fn eval(&self, inputs: &[&Tensor]) -> Result<Vec<Tensor>, OpError> {
        let tys: Vec<TensorType> = inputs.iter().map(|t| t.ty()).collect();
        let outs = self.infer(&tys.iter().collect::<Vec<_>>())?;
        let [dy, x, w, mean, rstd] = inputs else {
            return Err(op_err!("takes 5 inputs"));
        };
        let n = w.numel();
        let rows = mean.numel();
        let mut dx = vec![0.0; x.numel()];
        let mut dw = vec![0.0; n];
        let mut db = vec![0.0; n];
        for r in 0..rows {
            let (m, s) = (mean.data[r], rstd.data[r]);
            let at = |k: usize| r * n + k;
            let xhat = |k: usize| (x.data[at(k)] - m) * s;
            let g = |k: usize| dy.data[at(k)] * w.data[k];
            let mean_g = (0..n).map(g).sum::<f64>() / n as f64;
            let mean_gx = (0..n).map(|k| g(k) * xhat(k)).sum::<f64>() / n as f64;
            for k in 0..n {
                dx[at(k)] = s * (g(k) - mean_g - xhat(k) * mean_gx);
                dw[k] += dy.data[at(k)] * xhat(k);
                db[k] += dy.data[at(k)];
            }
        }
        let mut res = vec![
            Tensor::new(outs[0].dtype, outs[0].shape.clone(), dx),
            Tensor::new(outs[1].dtype, outs[1].shape.clone(), dw),
        ];
        if self.has_bias {
            res.push(Tensor::new(outs[1].dtype, outs[1].shape.clone(), db));
        }
        Ok(res)
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
        let x = tt(DType::BF16, &[2, 3, 4]);
        let w = tt(DType::BF16, &[4]);
        let st = tt(DType::F32, &[2, 3, 1]);
        let op = LayerNormGrad {
            axis: 2,
            has_bias: true,
        };
        let out = op.infer(&[&x, &x, &w, &st, &st]).unwrap();
        assert_eq!(out, vec![x.clone(), w.clone(), w.clone()]);
        let op2 = LayerNormGrad {
            axis: 2,
            has_bias: false,
        };
        assert_eq!(op2.infer(&[&x, &x, &w, &st, &st]).unwrap().len(), 2);
        let bad = tt(DType::BF16, &[2, 3, 1]);
        let e = op.infer(&[&x, &x, &w, &bad, &st]).unwrap_err();
        assert!(
            e.0.contains("mean is bf16[2,3,1], expected f32[2,3,1]"),
            "{e}"
        );
        let e = op.infer(&[&w, &x, &w, &st, &st]).unwrap_err();
        assert!(e.0.contains("dy is bf16[4] but x is bf16[2,3,4]"), "{e}");
        assert!(op.infer(&[&x, &x, &w, &st]).is_err());
    }

    #[test]
    fn dims_make_rows_contracted() {
        let x = tt(DType::F32, &[2, 3, 4]);
        let w = tt(DType::F32, &[4]);
        let st = tt(DType::F32, &[2, 3, 1]);
        let op = LayerNormGrad {
            axis: 2,
            has_bias: true,
        };
        let d = op.dims(&[&x, &x, &w, &st, &st], &[&x, &w, &w]);
        assert_eq!(d.to_einsum(), "abC,abC,C,ab_,ab_->abC,C,C");
        assert_eq!(d.axes[0].kind, AxisKind::Contracted);
        assert_eq!(d.axes[2].kind, AxisKind::Whole);
    }

    #[test]
    fn evaluates_a_hand_example() {
        // one row x = [1, 3]: mean 2, rstd 1 (eps 0), xhat = [-1, 1]; scale [1, 1], dy = [1, 0]:
        // g = [1, 0], mean(g) = 1/2, mean(g xhat) = -1/2, dx = [1 - 1/2 - 1/2, 0 - 1/2 + 1/2]
        let f = |s: &[usize], d: &[f64]| Tensor::new(DType::F64, s.to_vec(), d.to_vec());
        let out = LayerNormGrad {
            axis: 1,
            has_bias: true,
        }
        .eval(&[
            &f(&[1, 2], &[1.0, 0.0]),
            &f(&[1, 2], &[1.0, 3.0]),
            &f(&[2], &[1.0, 1.0]),
            &f(&[1, 1], &[2.0]),
            &f(&[1, 1], &[1.0]),
        ])
        .unwrap();
        assert_eq!(out[0].data, vec![0.0, 0.0]);
        assert_eq!(out[1].data, vec![-1.0, 0.0]);
        assert_eq!(out[2].data, vec![1.0, 0.0]);
    }
}
