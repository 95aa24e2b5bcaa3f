//! `layer_norm_grad` op. PLACEHOLDER: semantics to be implemented.

use super::*;
use crate::dtype::TensorType;
use crate::error::OpError;
use crate::graph::ValueId;
use crate::tensor::Tensor;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
/// Backward of [`LayerNorm`](super::LayerNorm). Inputs `dy, x, scale, mean, rstd`; outputs
/// `dx, dscale` and `dbias` when `has_bias`.
pub struct LayerNormGrad {
    pub axis: usize,
    pub has_bias: bool,
}

impl OpSpec for LayerNormGrad {
    fn infer(&self, _inputs: &[&TensorType]) -> Result<Vec<TensorType>, OpError> {
        Err(OpError::new("layer_norm_grad: not implemented yet"))
    }
    fn dims(&self, inputs: &[&TensorType], outputs: &[&TensorType]) -> DimMap {
        DimMap::opaque(inputs, outputs)
    }
    fn cost(&self, inputs: &[&TensorType], outputs: &[&TensorType]) -> Cost {
        Cost::data_movement(inputs, outputs)
    }
    fn vjp(&self, _cx: &mut VjpCtx<'_>) -> Result<Vec<Option<ValueId>>, OpError> {
        Err(OpError::new("layer_norm_grad: not implemented yet"))
    }
    fn eval(&self, _inputs: &[&Tensor]) -> Result<Vec<Tensor>, OpError> {
        Err(OpError::new("layer_norm_grad: not implemented yet"))
    }
}
