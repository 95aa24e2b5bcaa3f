//! `cross_entropy_grad` op. PLACEHOLDER: semantics to be implemented.

use super::*;
use crate::dtype::TensorType;
use crate::error::OpError;
use crate::graph::ValueId;
use crate::tensor::Tensor;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
/// Backward of [`SoftmaxCrossEntropy`](super::SoftmaxCrossEntropy) w.r.t. the scores: inputs
/// `dloss, log_prob, labels`; output shaped like log_prob.
pub struct SoftmaxCrossEntropyGrad {
    pub reduction: super::cross_entropy::LossReduction,
    pub ignore_index: Option<i64>,
}

impl OpSpec for SoftmaxCrossEntropyGrad {
    fn infer(&self, _inputs: &[&TensorType]) -> Result<Vec<TensorType>, OpError> {
        Err(OpError::new("cross_entropy_grad: not implemented yet"))
    }
    fn dims(&self, inputs: &[&TensorType], outputs: &[&TensorType]) -> DimMap {
        DimMap::opaque(inputs, outputs)
    }
    fn cost(&self, inputs: &[&TensorType], outputs: &[&TensorType]) -> Cost {
        Cost::data_movement(inputs, outputs)
    }
    fn vjp(&self, _cx: &mut VjpCtx<'_>) -> Result<Vec<Option<ValueId>>, OpError> {
        Err(OpError::new("cross_entropy_grad: not implemented yet"))
    }
    fn eval(&self, _inputs: &[&Tensor]) -> Result<Vec<Tensor>, OpError> {
        Err(OpError::new("cross_entropy_grad: not implemented yet"))
    }
}
