//! `softmax_cross_entropy`: ONNX SoftmaxCrossEntropyLoss without class weights: scores
//! `[N, C, d...]`, integer labels `[N, d...]`, loss `-log_softmax(scores, 1)[label]` per position,
//! then summed, averaged over the non-ignored labels (ONNX `mean` with `ignore_index`), or kept.
//! The log-probabilities are the second output, as in ONNX, and are what the backward
//! ([`SoftmaxCrossEntropyGrad`](super::SoftmaxCrossEntropyGrad)) reads.
//!
//! Dims: the class axis is `Whole` (the softmax normaliser sums over it). The batch and spatial
//! axes are `Parallel` for `none` reduction; for `sum` and `mean` the scalar loss carries none of
//! them, so they are `Contracted`: split across devices, each holds a partial sum of the loss
//! (for `mean`, after weighting by its share of the labels) while `log_prob` is split with them.

use super::*;
use crate::dtype::TensorType;
use crate::error::{AnalyzerError, OpError};
use crate::graph::ValueId;
use crate::op_err;
use crate::ops::binary::{bin, BinaryKind};
use crate::ops::reduce::ReduceKind;
use crate::ops::softmax::{softmax_rows, split_at_axis};
use crate::ops::unary::{un, UnaryKind};
use crate::tensor::Tensor;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
/// ONNX SoftmaxCrossEntropyLoss: inputs `scores [N, C, d...], labels [N, d...]` (integer);
/// outputs `loss` (scalar for mean/sum, `[N, d...]` for none) and `log_prob` (like scores).
pub struct SoftmaxCrossEntropy {
    pub reduction: LossReduction,
    pub ignore_index: Option<i64>,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LossReduction {
    None,
    Sum,
    Mean,
}

/// Vector flops per score element: the log-softmax (as [`Softmax`](super::Softmax) counts it).
const FLOPS_PER_ELEMENT: f64 = 8.0;

/// Checks a `scores [N, C, d...]` / `labels [N, d...]` pair; returns the labels' shape.
pub(crate) fn check_scores_labels(
    scores: &TensorType,
    labels: &TensorType,
) -> Result<Vec<usize>, OpError> {
    if !scores.dtype.is_float() {
        return Err(op_err!("scores must be float, got {}", scores.dtype));
    }
    if scores.rank() < 2 {
        return Err(op_err!(
            "scores must be [N, C, d...], got rank {}",
            scores.rank()
        ));
    }
    if !labels.dtype.is_int() {
        return Err(op_err!("labels must be integer, got {}", labels.dtype));
    }
    let mut expect = scores.shape.clone();
    expect.remove(1);
    if labels.shape != expect {
        return Err(op_err!(
            "labels have shape {:?}, expected {:?} for scores {:?}",
            labels.shape,
            expect,
            scores.shape
        ));
    }
    Ok(expect)
}

/// The class of one label, `None` when it is the ignored index; an error when out of range.
pub(crate) fn label_class(
    label: f64,
    classes: usize,
    ignore_index: Option<i64>,
) -> Result<Option<usize>, OpError> {
    let l = label as i64;
    if ignore_index == Some(l) {
        return Ok(None);
    }
    if l < 0 || l as usize >= classes {
        return Err(op_err!("label {l} is outside [0, {classes})"));
    }
    Ok(Some(l as usize))
}

/// Dim map of the loss and its gradient: one axis per scores dim, the class axis `Whole`, the
/// others `lead_kind`. `ins` / `outs` give one letter per tensor: scores-shaped (`S`),
/// labels-shaped (`L`) or a scalar (any other letter, `0` by convention).
pub(crate) fn ce_dims(scores: &TensorType, lead_kind: AxisKind, ins: &str, outs: &str) -> DimMap {
    let axes = scores
        .shape
        .iter()
        .enumerate()
        .map(|(d, &size)| Axis {
            size,
            kind: if d == 1 { AxisKind::Whole } else { lead_kind },
        })
        .collect();
    let r = scores.rank();
    let map = |c: char| -> Vec<Option<AxisId>> {
        match c {
            'S' => (0..r).map(Some).collect(),
            'L' => (0..r).filter(|&d| d != 1).map(Some).collect(),
            _ => vec![],
        }
    };
    DimMap {
        axes,
        inputs: ins.chars().map(map).collect(),
        outputs: outs.chars().map(map).collect(),
    }
}

impl OpSpec for SoftmaxCrossEntropy {
    fn infer(&self, inputs: &[&TensorType]) -> Result<Vec<TensorType>, OpError> {
        let [scores, labels] = inputs else {
            return Err(op_err!(
                "takes 2 inputs (scores, labels), got {}",
                inputs.len()
            ));
        };
        let lshape = check_scores_labels(scores, labels)?;
        let loss_shape = match self.reduction {
            LossReduction::None => lshape,
            LossReduction::Sum | LossReduction::Mean => vec![],
        };
        Ok(vec![
            TensorType::new(scores.dtype, loss_shape),
            (*scores).clone(),
        ])
    }

    fn dims(&self, inputs: &[&TensorType], outputs: &[&TensorType]) -> DimMap {
        if self.infer(inputs).is_err() {
            return DimMap::opaque(inputs, outputs);
        }
        match self.reduction {
            LossReduction::None => ce_dims(inputs[0], AxisKind::Parallel, "SL", "LS"),
            LossReduction::Sum | LossReduction::Mean => {
                ce_dims(inputs[0], AxisKind::Contracted, "SL", "0S")
            }
        }
    }

    fn cost(&self, inputs: &[&TensorType], outputs: &[&TensorType]) -> Cost {
        let n = inputs.first().map_or(0, |s| s.numel());
        Cost::memory_bound(inputs, outputs, FLOPS_PER_ELEMENT * n as f64)
    }

    fn differentiable(&self, i: usize) -> bool {
        i == 0
    }

    fn vjp(&self, cx: &mut VjpCtx<'_>) -> Result<Vec<Option<ValueId>>, OpError> {
        if !cx.needs[0] {
            return Ok(vec![None, None]);
        }
        let labels = cx.inputs[1];
        let log_prob = cx.outputs[1];
        let b = &mut *cx.b;
        let mut g = match cx.grads[0] {
            Some(dl) => Some(b.emit(
                SoftmaxCrossEntropyGrad {
                    reduction: self.reduction,
                    ignore_index: self.ignore_index,
                },
                &[dl, log_prob, labels],
            )?),
            None => None,
        };
        // a gradient on log_prob goes back through the log-softmax: gl - exp(lp) * sum_c(gl)
        if let Some(gl) = cx.grads[1] {
            let s = b.emit(Reduce::new(ReduceKind::Sum, [1], true), &[gl])?;
            let p = un(b, UnaryKind::Exp, log_prob)?;
            let t = bin(b, BinaryKind::Mul, p, s)?;
            let t = bin(b, BinaryKind::Sub, gl, t)?;
            g = Some(match g {
                Some(g) => bin(b, BinaryKind::Add, g, t)?,
                None => t,
            });
        }
        Ok(vec![g, None])
    }

    fn eval(&self, inputs: &[&Tensor]) -> Result<Vec<Tensor>, OpError> {
        let tys: Vec<TensorType> = inputs.iter().map(|t| t.ty()).collect();
        let outs = self.infer(&tys.iter().collect::<Vec<_>>())?;
        let (scores, labels) = (inputs[0], inputs[1]);
        let (n, c, d) = split_at_axis(&scores.shape, 1);
        let lp = softmax_rows(&scores.data, (n, c, d), true);
        let mut loss = vec![0.0; n * d];
        let mut count = 0usize;
        for i in 0..n {
            for j in 0..d {
                if let Some(l) = label_class(labels.data[i * d + j], c, self.ignore_index)? {
                    loss[i * d + j] = -lp[(i * c + l) * d + j];
                    count += 1;
                }
            }
        }
        let loss = match self.reduction {
            LossReduction::None => loss,
            LossReduction::Sum => vec![loss.iter().sum()],
            // no label counted: 0 / 0, as ONNX and PyTorch give
            LossReduction::Mean => vec![loss.iter().sum::<f64>() / count as f64],
        };
        Ok(vec![
            Tensor::new(outs[0].dtype, outs[0].shape.clone(), loss),
            Tensor::new(outs[1].dtype, outs[1].shape.clone(), lp),
        ])
    }
}

impl crate::builder::GraphBuilder {
    /// Softmax cross entropy of `scores [N, C, d...]` against integer `labels [N, d...]`; returns
    /// the loss (log_prob is output 1 of the node).
    pub fn softmax_cross_entropy(
        &mut self,
        scores: ValueId,
        labels: ValueId,
        reduction: LossReduction,
        ignore_index: Option<i64>,
    ) -> Result<ValueId, AnalyzerError> {
        self.node1(
            SoftmaxCrossEntropy {
                reduction,
                ignore_index,
            },
            &[scores, labels],
        )
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
    fn ce(reduction: LossReduction, ignore_index: Option<i64>) -> SoftmaxCrossEntropy {
        SoftmaxCrossEntropy {
            reduction,
            ignore_index,
        }
    }

    #[test]
    fn infers_and_rejects() {
        let s = tt(DType::F32, &[2, 5, 3]);
        let l = tt(DType::I64, &[2, 3]);
        let out = ce(LossReduction::Mean, None).infer(&[&s, &l]).unwrap();
        assert_eq!(out, vec![tt(DType::F32, &[]), s.clone()]);
        let out = ce(LossReduction::None, None).infer(&[&s, &l]).unwrap();
        assert_eq!(out[0], tt(DType::F32, &[2, 3]));
        let e = ce(LossReduction::Sum, None)
            .infer(&[&s, &tt(DType::I64, &[2, 5])])
            .unwrap_err();
        assert!(
            e.0.contains("labels have shape [2, 5], expected [2, 3]"),
            "{e}"
        );
        let e = ce(LossReduction::Sum, None)
            .infer(&[&s, &tt(DType::F32, &[2, 3])])
            .unwrap_err();
        assert!(e.0.contains("labels must be integer"), "{e}");
        let e = ce(LossReduction::Sum, None)
            .infer(&[&tt(DType::F32, &[5]), &tt(DType::I64, &[])])
            .unwrap_err();
        assert!(e.0.contains("rank 1"), "{e}");
        assert!(ce(LossReduction::Sum, None).infer(&[&s]).is_err());
    }

    #[test]
    fn dims_contract_the_batch_of_a_reduced_loss() {
        let s = tt(DType::F32, &[2, 5, 3]);
        let l = tt(DType::I64, &[2, 3]);
        let dims = |r| {
            let op = ce(r, None);
            let out = op.infer(&[&s, &l]).unwrap();
            op.dims(&[&s, &l], &[&out[0], &out[1]])
        };
        let m = dims(LossReduction::Mean);
        assert_eq!(m.to_einsum(), "aBc,ac->,aBc");
        assert_eq!(m.axes[0].kind, AxisKind::Contracted);
        let n = dims(LossReduction::None);
        assert_eq!(n.to_einsum(), "aBc,ac->ac,aBc");
        assert_eq!(n.axes[0].kind, AxisKind::Parallel);
        assert!(!ce(LossReduction::Mean, None).differentiable(1));
    }

    #[test]
    fn evaluates_with_ignore_index() {
        // uniform scores over 4 classes: every loss is ln 4
        let s = Tensor::full(DType::F64, vec![3, 4], 0.5);
        let l = Tensor::from_i64([3], &[1, -100, 3]);
        let m = ce(LossReduction::Mean, Some(-100)).eval(&[&s, &l]).unwrap();
        assert!((m[0].data[0] - 4f64.ln()).abs() < 1e-15);
        let sum = ce(LossReduction::Sum, Some(-100)).eval(&[&s, &l]).unwrap();
        assert!((sum[0].data[0] - 2.0 * 4f64.ln()).abs() < 1e-15);
        let none = ce(LossReduction::None, Some(-100)).eval(&[&s, &l]).unwrap();
        assert_eq!(none[0].data[1], 0.0);
        let e = ce(LossReduction::Mean, None).eval(&[&s, &l]).unwrap_err();
        assert!(e.0.contains("label -100 is outside [0, 4)"), "{e}");
        let all_ignored = Tensor::from_i64([3], &[-100, -100, -100]);
        let m = ce(LossReduction::Mean, Some(-100))
            .eval(&[&s, &all_ignored])
            .unwrap();
        assert!(m[0].data[0].is_nan());
        // a hand case: scores [0, ln 3] -> p = [1/4, 3/4]; label 0 -> loss ln 4
        let s = Tensor::new(DType::F64, vec![1, 2], vec![0.0, 3f64.ln()]);
        let out = ce(LossReduction::Sum, None)
            .eval(&[&s, &Tensor::from_i64([1], &[0])])
            .unwrap();
        assert!((out[0].data[0] - 4f64.ln()).abs() < 1e-15);
    }

    #[test]
    fn gradients_match_finite_differences() {
        // gradcheck weights both outputs: SoftmaxCrossEntropyGrad's eval and the log_prob term
        let l = Tensor::from_i64([3], &[1, 0, 3]);
        for r in [LossReduction::None, LossReduction::Sum, LossReduction::Mean] {
            check(ce(r, None), &[rand_tensor(&[3, 4], 1), l.clone()], 1e-6);
            check(ce(r, Some(0)), &[rand_tensor(&[3, 4], 2), l.clone()], 1e-6);
            let l2 = Tensor::from_i64([2, 2], &[2, -1, 0, 1]);
            check(ce(r, Some(-1)), &[rand_tensor(&[2, 3, 2], 3), l2], 1e-6);
        }
    }
}
