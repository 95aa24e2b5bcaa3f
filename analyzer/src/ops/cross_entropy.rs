//! `cross_entropy` op. PLACEHOLDER: semantics to be implemented.

use super::*;
use crate::dtype::TensorType;
use crate::error::OpError;
use crate::graph::ValueId;
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

impl OpSpec for SoftmaxCrossEntropy {
    fn infer(&self, _inputs: &[&TensorType]) -> Result<Vec<TensorType>, OpError> {
        Err(OpError::new("cross_entropy: not implemented yet"))
    }
    fn dims(&self, inputs: &[&TensorType], outputs: &[&TensorType]) -> DimMap {
        DimMap::opaque(inputs, outputs)
    }
    fn cost(&self, inputs: &[&TensorType], outputs: &[&TensorType]) -> Cost {
        Cost::data_movement(inputs, outputs)
    }
    fn vjp(&self, _cx: &mut VjpCtx<'_>) -> Result<Vec<Option<ValueId>>, OpError> {
        Err(OpError::new("cross_entropy: not implemented yet"))
    }
    fn eval(&self, _inputs: &[&Tensor]) -> Result<Vec<Tensor>, OpError> {
        Err(OpError::new("cross_entropy: not implemented yet"))
    }
}
