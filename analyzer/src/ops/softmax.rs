//! `softmax`: softmax or log-softmax along one axis (ONNX Softmax / LogSoftmax, opset >= 13
//! semantics: a single axis). The axis must stay whole on a device (its normaliser sums over
//! it); every other dim is a parallel axis, which is what lets attention split over batch and
//! heads. The gradient is written in IR ops from the saved output: `y * (dy - sum(dy * y))`, or
//! `dy - exp(y) * sum(dy)` for log-softmax.

use super::*;
use crate::dtype::TensorType;
use crate::error::{AnalyzerError, OpError};
use crate::graph::ValueId;
use crate::op_err;
use crate::ops::binary::{bin, BinaryKind};
use crate::ops::reduce::ReduceKind;
use crate::ops::unary::{un, UnaryKind};
use crate::tensor::Tensor;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
/// Softmax (or log-softmax when `log`) along `axis`.
pub struct Softmax {
    pub axis: usize,
    pub log: bool,
}

/// Vector flops per element: max, subtract, exp (counted as 4: see `UnaryKind`), sum, divide (or
/// log and subtract).
const FLOPS_PER_ELEMENT: f64 = 8.0;

/// `(outer, n, inner)`: the shape viewed as `[outer, n, inner]` around `axis`.
pub(crate) fn split_at_axis(shape: &[usize], axis: usize) -> (usize, usize, usize) {
    let outer = shape[..axis.min(shape.len())].iter().product();
    let n = shape.get(axis).copied().unwrap_or(1);
    let inner = shape.get(axis + 1..).map_or(1, |s| s.iter().product());
    (outer, n, inner)
}

/// Softmax or log-softmax of `data` (shaped `[outer, n, inner]`) along the middle dim.
pub(crate) fn softmax_rows(
    data: &[f64],
    (outer, n, inner): (usize, usize, usize),
    log: bool,
) -> Vec<f64> {
    let mut out = vec![0.0; data.len()];
    for o in 0..outer {
        for i in 0..inner {
            let at = |k: usize| (o * n + k) * inner + i;
            let m = (0..n)
                .map(|k| data[at(k)])
                .fold(f64::NEG_INFINITY, f64::max);
            let sum: f64 = (0..n).map(|k| (data[at(k)] - m).exp()).sum();
            for k in 0..n {
                let z = data[at(k)] - m;
                out[at(k)] = if log { z - sum.ln() } else { z.exp() / sum };
            }
        }
    }
    out
}

impl OpSpec for Softmax {
    fn infer(&self, inputs: &[&TensorType]) -> Result<Vec<TensorType>, OpError> {
        let [x] = inputs else {
            return Err(op_err!("takes 1 input, got {}", inputs.len()));
        };
        if self.axis >= x.rank() {
            return Err(op_err!(
                "axis {} is out of range for rank {}",
                self.axis,
                x.rank()
            ));
        }
        if !x.dtype.is_float() {
            return Err(op_err!("takes a float tensor, got {}", x.dtype));
        }
        Ok(vec![(*x).clone()])
    }

    fn dims(&self, inputs: &[&TensorType], outputs: &[&TensorType]) -> DimMap {
        let mut m = DimMap::elementwise(inputs, outputs);
        match m.axes.get_mut(self.axis) {
            Some(a) => a.kind = AxisKind::Whole,
            None => return DimMap::opaque(inputs, outputs),
        }
        m
    }

    fn cost(&self, inputs: &[&TensorType], outputs: &[&TensorType]) -> Cost {
        Cost::elementwise(inputs, outputs, FLOPS_PER_ELEMENT)
    }

    fn vjp(&self, cx: &mut VjpCtx<'_>) -> Result<Vec<Option<ValueId>>, OpError> {
        let Some(dy) = cx.grads[0] else {
            return Ok(vec![None]);
        };
        if !cx.needs[0] {
            return Ok(vec![None]);
        }
        let y = cx.outputs[0];
        let b = &mut *cx.b;
        let sum = Reduce::new(ReduceKind::Sum, [self.axis], true);
        let g = if self.log {
            let s = b.emit(sum, &[dy])?;
            let p = un(b, UnaryKind::Exp, y)?;
            let t = bin(b, BinaryKind::Mul, p, s)?;
            bin(b, BinaryKind::Sub, dy, t)?
        } else {
            let t = bin(b, BinaryKind::Mul, dy, y)?;
            let s = b.emit(sum, &[t])?;
            let d = bin(b, BinaryKind::Sub, dy, s)?;
            bin(b, BinaryKind::Mul, y, d)?
        };
        Ok(vec![Some(g)])
    }

    fn eval(&self, inputs: &[&Tensor]) -> Result<Vec<Tensor>, OpError> {
        let tys: Vec<TensorType> = inputs.iter().map(|t| t.ty()).collect();
        let out = self.infer(&tys.iter().collect::<Vec<_>>())?.remove(0);
        let x = inputs[0];
        let data = softmax_rows(&x.data, split_at_axis(&x.shape, self.axis), self.log);
        Ok(vec![Tensor::new(out.dtype, out.shape, data)])
    }
}

impl crate::builder::GraphBuilder {
    pub fn softmax(&mut self, x: ValueId, axis: usize) -> Result<ValueId, AnalyzerError> {
        self.node1(Softmax { axis, log: false }, &[x])
    }
    pub fn log_softmax(&mut self, x: ValueId, axis: usize) -> Result<ValueId, AnalyzerError> {
        self.node1(Softmax { axis, log: true }, &[x])
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::dtype::DType;
    use crate::ops::gradcheck::{check, rand_tensor};

    #[test]
    fn infers_and_rejects() {
        let x = TensorType::new(DType::F32, [2, 3]);
        assert_eq!(
            Softmax {
                axis: 1,
                log: false
            }
            .infer(&[&x])
            .unwrap()[0],
            x
        );
        let e = Softmax {
            axis: 2,
            log: false,
        }
        .infer(&[&x])
        .unwrap_err();
        assert!(e.0.contains("axis 2 is out of range for rank 2"), "{e}");
        let i = TensorType::new(DType::I64, [2]);
        assert!(Softmax { axis: 0, log: true }.infer(&[&i]).is_err());
    }

    #[test]
    fn dims_keep_the_axis_whole() {
        let x = TensorType::new(DType::F32, [2, 3, 4]);
        let d = Softmax {
            axis: 1,
            log: false,
        }
        .dims(&[&x], &[&x]);
        assert_eq!(d.to_einsum(), "aBc->aBc");
        let c = Softmax {
            axis: 1,
            log: false,
        }
        .cost(&[&x], &[&x]);
        assert_eq!(c.flops, 8.0 * 24.0);
    }

    #[test]
    fn evaluates() {
        let x = Tensor::new(DType::F64, vec![2, 2], vec![0.0, 0.0, 1000.0, 0.0]);
        let y = Softmax {
            axis: 1,
            log: false,
        }
        .eval(&[&x])
        .unwrap();
        assert_eq!(y[0].data, vec![0.5, 0.5, 1.0, 0.0]);
        let l = Softmax { axis: 0, log: true }.eval(&[&x]).unwrap();
        assert_eq!(l[0].data[0], -1000.0);
        assert!((l[0].data[1] - (-2f64.ln())).abs() < 1e-15);
    }

    #[test]
    fn gradients_match_finite_differences() {
        for log in [false, true] {
            for axis in 0..3 {
                check(
                    Softmax { axis, log },
                    &[rand_tensor(&[2, 3, 2], 1 + axis as u64)],
                    1e-6,
                );
            }
        }
    }
}
