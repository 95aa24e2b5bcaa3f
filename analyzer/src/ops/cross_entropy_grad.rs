//! `softmax_cross_entropy_grad`: the backward of
//! [`SoftmaxCrossEntropy`](super::SoftmaxCrossEntropy) w.r.t. the scores, fused as every
//! framework fuses it: `dscores = (exp(log_prob) - onehot(label)) * coef` with `coef` the loss
//! gradient at that position (`none`), the scalar loss gradient (`sum`), or that divided by the
//! number of non-ignored labels (`mean`); ignored positions get zero.
//!
//! Every output element depends on its own position only (plus the class row), so batch and
//! spatial axes are `Parallel` and the class axis `Whole`. Under a batch split the `mean`
//! divisor is still the global label count: the lowering must count labels over the whole
//! batch, not the local shard.

use super::*;
use crate::dtype::TensorType;
use crate::error::OpError;
use crate::graph::ValueId;
use crate::op_err;
use crate::ops::cross_entropy::{ce_dims, check_scores_labels, label_class, LossReduction};
use crate::ops::softmax::split_at_axis;
use crate::tensor::Tensor;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
/// Backward of [`SoftmaxCrossEntropy`](super::SoftmaxCrossEntropy) w.r.t. the scores: inputs
/// `dloss, log_prob, labels`; output shaped like log_prob.
pub struct SoftmaxCrossEntropyGrad {
    pub reduction: super::cross_entropy::LossReduction,
    pub ignore_index: Option<i64>,
}

/// Vector flops per element: exp (4), subtract the one-hot, multiply by the coefficient.
const FLOPS_PER_ELEMENT: f64 = 6.0;

impl OpSpec for SoftmaxCrossEntropyGrad {
    fn infer(&self, inputs: &[&TensorType]) -> Result<Vec<TensorType>, OpError> {
        let [dloss, log_prob, labels] = inputs else {
            return Err(op_err!(
                "takes 3 inputs (dloss, log_prob, labels), got {}",
                inputs.len()
            ));
        };
        let lshape = check_scores_labels(log_prob, labels)?;
        let expect = TensorType::new(
            log_prob.dtype,
            match self.reduction {
                LossReduction::None => lshape,
                LossReduction::Sum | LossReduction::Mean => vec![],
            },
        );
        if **dloss != expect {
            return Err(op_err!("dloss is {dloss}, expected {expect}"));
        }
        Ok(vec![(*log_prob).clone()])
    }

    fn dims(&self, inputs: &[&TensorType], outputs: &[&TensorType]) -> DimMap {
        if self.infer(inputs).is_err() {
            return DimMap::opaque(inputs, outputs);
        }
        let ins = match self.reduction {
            LossReduction::None => "LSL",
            LossReduction::Sum | LossReduction::Mean => "0SL",
        };
        ce_dims(inputs[1], AxisKind::Parallel, ins, "S")
    }

    fn cost(&self, inputs: &[&TensorType], outputs: &[&TensorType]) -> Cost {
        Cost::elementwise(inputs, outputs, FLOPS_PER_ELEMENT)
    }

    fn differentiable(&self, i: usize) -> bool {
        i != 2
    }

    fn vjp(&self, _cx: &mut VjpCtx<'_>) -> Result<Vec<Option<ValueId>>, OpError> {
        Err(op_err!(
            "softmax_cross_entropy_grad has no gradient: second-order gradients are unsupported"
        ))
    }

    fn eval(&self, inputs: &[&Tensor]) -> Result<Vec<Tensor>, OpError> {
        let tys: Vec<TensorType> = inputs.iter().map(|t| t.ty()).collect();
        let outs = self.infer(&tys.iter().collect::<Vec<_>>())?;
        let (dloss, lp, labels) = (inputs[0], inputs[1], inputs[2]);
        let (n, c, d) = split_at_axis(&lp.shape, 1);
        let classes: Vec<Option<usize>> = labels
            .data
            .iter()
            .map(|&l| label_class(l, c, self.ignore_index))
            .collect::<Result<_, _>>()?;
        let count = classes.iter().filter(|l| l.is_some()).count();
        let mut out = vec![0.0; lp.numel()];
        for i in 0..n {
            for j in 0..d {
                let Some(l) = classes[i * d + j] else {
                    continue;
                };
                let coef = match self.reduction {
                    LossReduction::None => dloss.data[i * d + j],
                    LossReduction::Sum => dloss.data[0],
                    LossReduction::Mean => dloss.data[0] / count as f64,
                };
                for k in 0..c {
                    let at = (i * c + k) * d + j;
                    let onehot = if k == l { 1.0 } else { 0.0 };
                    out[at] = (lp.data[at].exp() - onehot) * coef;
                }
            }
        }
        Ok(vec![Tensor::new(outs[0].dtype, outs[0].shape.clone(), out)])
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
    fn op(reduction: LossReduction) -> SoftmaxCrossEntropyGrad {
        SoftmaxCrossEntropyGrad {
            reduction,
            ignore_index: Some(-100),
        }
    }

    #[test]
    fn infers_and_rejects() {
        let lp = tt(DType::F32, &[4, 10]);
        let l = tt(DType::I64, &[4]);
        let s = tt(DType::F32, &[]);
        assert_eq!(
            op(LossReduction::Mean).infer(&[&s, &lp, &l]).unwrap()[0],
            lp
        );
        let e = op(LossReduction::None).infer(&[&s, &lp, &l]).unwrap_err();
        assert!(e.0.contains("dloss is f32[], expected f32[4]"), "{e}");
        assert!(op(LossReduction::Mean).infer(&[&s, &lp]).is_err());
    }

    #[test]
    fn dims_keep_the_batch_parallel() {
        let lp = tt(DType::F32, &[4, 10]);
        let l = tt(DType::I64, &[4]);
        let s = tt(DType::F32, &[]);
        let d = op(LossReduction::Mean).dims(&[&s, &lp, &l], &[&lp]);
        assert_eq!(d.to_einsum(), ",aB,a->aB");
        assert_eq!(d.axes[0].kind, AxisKind::Parallel);
        let dl = tt(DType::F32, &[4]);
        let d = op(LossReduction::None).dims(&[&dl, &lp, &l], &[&lp]);
        assert_eq!(d.to_einsum(), "a,aB,a->aB");
    }

    #[test]
    fn evaluates_a_hand_example() {
        // p = [1/4, 3/4] for both rows; labels [1, ignored]; mean over 1 label; dloss 2
        let lp = Tensor::new(
            DType::F64,
            vec![2, 2],
            vec![0.25f64.ln(), 0.75f64.ln(), 0.25f64.ln(), 0.75f64.ln()],
        );
        let l = Tensor::from_i64([2], &[1, -100]);
        let out = op(LossReduction::Mean)
            .eval(&[&Tensor::scalar(DType::F64, 2.0), &lp, &l])
            .unwrap();
        let want = [0.5, -0.5, 0.0, 0.0];
        for (a, b) in out[0].data.iter().zip(want) {
            assert!((a - b).abs() < 1e-15, "{:?}", out[0].data);
        }
    }
}
