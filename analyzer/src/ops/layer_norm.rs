//! `layer_norm` op. PLACEHOLDER: semantics to be implemented.

use super::*;
use crate::dtype::TensorType;
use crate::error::OpError;
use crate::graph::ValueId;
use crate::tensor::Tensor;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
/// ONNX LayerNormalization: normalises over dims `axis..rank`. Inputs `x, scale[, bias]`
/// (scale/bias shaped like `x.shape[axis..]`). Outputs `y, mean, rstd`, mean and rstd shaped
/// like x with dims `axis..` set to 1 (saved for the backward, as PyTorch does).
pub struct LayerNorm {
    pub axis: usize,
    pub epsilon: f64,
}

impl OpSpec for LayerNorm {
    fn infer(&self, _inputs: &[&TensorType]) -> Result<Vec<TensorType>, OpError> {
        Err(OpError::new("layer_norm: not implemented yet"))
    }
    fn dims(&self, inputs: &[&TensorType], outputs: &[&TensorType]) -> DimMap {
        DimMap::opaque(inputs, outputs)
    }
    fn cost(&self, inputs: &[&TensorType], outputs: &[&TensorType]) -> Cost {
        Cost::data_movement(inputs, outputs)
    }
    fn vjp(&self, _cx: &mut VjpCtx<'_>) -> Result<Vec<Option<ValueId>>, OpError> {
        Err(OpError::new("layer_norm: not implemented yet"))
    }
    fn eval(&self, _inputs: &[&Tensor]) -> Result<Vec<Tensor>, OpError> {
        Err(OpError::new("layer_norm: not implemented yet"))
    }
}
