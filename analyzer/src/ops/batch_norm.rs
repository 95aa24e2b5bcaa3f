//! `batch_norm` op. PLACEHOLDER: semantics to be implemented.

use super::*;
use crate::dtype::TensorType;
use crate::error::OpError;
use crate::graph::ValueId;
use crate::tensor::Tensor;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
/// BatchNormalization over dim 1 (NC...): inputs `x, scale, bias, running_mean, running_var`.
/// Inference: one output `y`, normalised with the running statistics. Training: outputs `y,
/// new_running_mean, new_running_var, saved_mean, saved_rstd`, normalised with batch
/// statistics; running stats updated as `momentum * running + (1 - momentum) * batch` (ONNX).
pub struct BatchNorm {
    pub epsilon: f64,
    pub momentum: f64,
    pub training: bool,
}

impl OpSpec for BatchNorm {
    fn infer(&self, _inputs: &[&TensorType]) -> Result<Vec<TensorType>, OpError> {
        Err(OpError::new("batch_norm: not implemented yet"))
    }
    fn dims(&self, inputs: &[&TensorType], outputs: &[&TensorType]) -> DimMap {
        DimMap::opaque(inputs, outputs)
    }
    fn cost(&self, inputs: &[&TensorType], outputs: &[&TensorType]) -> Cost {
        Cost::data_movement(inputs, outputs)
    }
    fn vjp(&self, _cx: &mut VjpCtx<'_>) -> Result<Vec<Option<ValueId>>, OpError> {
        Err(OpError::new("batch_norm: not implemented yet"))
    }
    fn eval(&self, _inputs: &[&Tensor]) -> Result<Vec<Tensor>, OpError> {
        Err(OpError::new("batch_norm: not implemented yet"))
    }
}
