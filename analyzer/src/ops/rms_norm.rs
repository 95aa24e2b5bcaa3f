//! `rms_norm`: RMSNorm as LLaMA uses it, `y = x * rsqrt(mean(x^2 over axis..) + eps) * scale`,
//! with the reciprocal root mean square saved as a second output for the fused backward
//! ([`RmsNormGrad`](super::RmsNormGrad)). ONNX exports spell it as Pow / ReduceMean / Sqrt /
//! Div / Mul; the importer fuses those so that the profiler charges one kernel.
//!
//! As for [`LayerNorm`](super::LayerNorm): statistics in f32 below f64, normalised dims `Whole`
//! and tied to `scale`, leading dims parallel; a gradient arriving at `rstd` adds its own term.

use super::*;
use crate::dtype::TensorType;
use crate::error::{AnalyzerError, OpError};
use crate::graph::ValueId;
use crate::op_err;
use crate::ops::binary::{bin, cast_to, scale, BinaryKind};
use crate::ops::layer_norm::{check_norm_operands, norm_dims, stats_dtype, stats_shape, NormRole};
use crate::tensor::Tensor;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
/// RMSNorm (LLaMA): `y = x * rsqrt(mean(x^2 over axis..) + eps) * scale`. Inputs `x, scale`;
/// outputs `y, rstd` (rstd shaped like x with dims `axis..` set to 1).
pub struct RmsNorm {
    pub axis: usize,
    pub epsilon: f64,
}

/// Vector flops per element: square and sum (2), scale by rstd (1), by `scale` (1), plus the
/// per-row rsqrt spread thin.
const FLOPS_PER_ELEMENT: f64 = 5.0;

impl OpSpec for RmsNorm {
    fn infer(&self, inputs: &[&TensorType]) -> Result<Vec<TensorType>, OpError> {
        let [x, w] = inputs else {
            return Err(op_err!("takes 2 inputs (x, scale), got {}", inputs.len()));
        };
        check_norm_operands(x, &[("scale", w)], self.axis)?;
        let stats = TensorType::new(stats_dtype(x.dtype), stats_shape(&x.shape, self.axis));
        Ok(vec![(*x).clone(), stats])
    }

    fn dims(&self, inputs: &[&TensorType], outputs: &[&TensorType]) -> DimMap {
        if self.infer(inputs).is_err() {
            return DimMap::opaque(inputs, outputs);
        }
        norm_dims(
            inputs[0],
            self.axis,
            AxisKind::Parallel,
            &[NormRole::Full, NormRole::Feature],
            &[NormRole::Full, NormRole::Stats],
        )
    }

    fn cost(&self, inputs: &[&TensorType], outputs: &[&TensorType]) -> Cost {
        let n = inputs.first().map_or(0, |x| x.numel());
        Cost::memory_bound(inputs, outputs, FLOPS_PER_ELEMENT * n as f64)
    }

    fn vjp(&self, cx: &mut VjpCtx<'_>) -> Result<Vec<Option<ValueId>>, OpError> {
        let (x, w) = (cx.inputs[0], cx.inputs[1]);
        let rstd = cx.outputs[1];
        let xt = cx.input_ty(0);
        let needs = cx.needs.to_vec();
        let mut grads = vec![None, None];
        if let Some(dy) = cx.grads[0] {
            let outs =
                cx.b.emit_n(RmsNormGrad { axis: self.axis }, &[dy, x, w, rstd])?;
            for (i, g) in grads.iter_mut().enumerate() {
                if needs[i] {
                    *g = outs.get(i).copied();
                }
            }
        }
        if !needs[0] {
            return Ok(grads);
        }
        // d rstd / dx = -rstd^3 x / n
        if let Some(gr) = cx.grads[1] {
            let n = xt
                .shape
                .get(self.axis..)
                .map_or(1, |s| s.iter().product::<usize>())
                .max(1) as f64;
            let b = &mut *cx.b;
            let r2 = bin(b, BinaryKind::Mul, rstd, rstd)?;
            let r3 = bin(b, BinaryKind::Mul, r2, rstd)?;
            let t = bin(b, BinaryKind::Mul, gr, r3)?;
            let t = scale(b, t, -1.0 / n)?;
            let t = cast_to(b, t, xt.dtype)?;
            let t = bin(b, BinaryKind::Mul, x, t)?;
            grads[0] = Some(match grads[0] {
                Some(d) => bin(b, BinaryKind::Add, d, t)?,
                None => t,
            });
        }
        Ok(grads)
    }

    fn eval(&self, inputs: &[&Tensor]) -> Result<Vec<Tensor>, OpError> {
        let tys: Vec<TensorType> = inputs.iter().map(|t| t.ty()).collect();
        let outs = self.infer(&tys.iter().collect::<Vec<_>>())?;
        let (x, w) = (inputs[0], inputs[1]);
        let n = w.numel();
        let rows = x.numel().checked_div(n).unwrap_or(0);
        let mut y = vec![0.0; x.numel()];
        let mut rstds = vec![0.0; rows];
        for r in 0..rows {
            let row = &x.data[r * n..(r + 1) * n];
            let ms = row.iter().map(|v| v * v).sum::<f64>() / n as f64;
            let rstd = 1.0 / (ms + self.epsilon).sqrt();
            for (k, v) in row.iter().enumerate() {
                y[r * n + k] = v * rstd * w.data[k];
            }
            rstds[r] = rstd;
        }
        Ok(vec![
            Tensor::new(outs[0].dtype, outs[0].shape.clone(), y),
            Tensor::new(outs[1].dtype, outs[1].shape.clone(), rstds),
        ])
    }
}

impl crate::builder::GraphBuilder {
    /// RMS norm of `x` over dims `axis..`; returns `y` (rstd is output 1 of the node).
    pub fn rms_norm(
        &mut self,
        x: ValueId,
        scale: ValueId,
        axis: usize,
        eps: f64,
    ) -> Result<ValueId, AnalyzerError> {
        self.node1(RmsNorm { axis, epsilon: eps }, &[x, scale])
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::dtype::DType;
    use crate::ops::gradcheck::{check, rand_tensor};

    fn tt(dtype: DType, shape: &[usize]) -> TensorType {
        TensorType::new(dtype, shape.to_vec())
    }
    fn rms(axis: usize) -> RmsNorm {
        RmsNorm {
            axis,
            epsilon: 1e-6,
        }
    }

    #[test]
    fn infers_and_rejects() {
        let x = tt(DType::BF16, &[2, 3, 8]);
        let w = tt(DType::BF16, &[8]);
        let out = rms(2).infer(&[&x, &w]).unwrap();
        assert_eq!(out, vec![x.clone(), tt(DType::F32, &[2, 3, 1])]);
        let e = rms(1).infer(&[&x, &w]).unwrap_err();
        assert!(e.0.contains("scale has shape [8]"), "{e}");
        assert!(rms(2).infer(&[&x]).is_err());
        let i = tt(DType::I32, &[2, 8]);
        assert!(rms(1).infer(&[&i, &tt(DType::I32, &[8])]).is_err());
    }

    #[test]
    fn dims_and_cost() {
        let x = tt(DType::F32, &[2, 3, 8]);
        let w = tt(DType::F32, &[8]);
        let out = rms(2).infer(&[&x, &w]).unwrap();
        let d = rms(2).dims(&[&x, &w], &[&out[0], &out[1]]);
        assert_eq!(d.to_einsum(), "abC,C->abC,ab_");
        assert_eq!(
            rms(2).cost(&[&x, &w], &[&out[0], &out[1]]).flops,
            5.0 * 48.0
        );
    }

    #[test]
    fn evaluates() {
        let x = Tensor::new(DType::F64, vec![1, 2], vec![3.0, 4.0]);
        let w = Tensor::new(DType::F64, vec![2], vec![1.0, 2.0]);
        let out = RmsNorm {
            axis: 1,
            epsilon: 0.0,
        }
        .eval(&[&x, &w])
        .unwrap();
        // rms = sqrt(12.5)
        let r = 1.0 / 12.5f64.sqrt();
        assert_eq!(out[1].data, vec![r]);
        assert_eq!(out[0].data, vec![3.0 * r, 8.0 * r]);
    }

    #[test]
    fn gradients_match_finite_differences() {
        check(
            rms(2),
            &[rand_tensor(&[2, 3, 4], 1), rand_tensor(&[4], 2)],
            1e-6,
        );
        check(
            rms(1),
            &[rand_tensor(&[2, 3, 2], 3), rand_tensor(&[3, 2], 4)],
            1e-6,
        );
    }
}
