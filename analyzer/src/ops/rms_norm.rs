//! `rms_norm` op. PLACEHOLDER: semantics to be implemented.

use super::*;
use crate::dtype::TensorType;
use crate::error::OpError;
use crate::graph::ValueId;
use crate::tensor::Tensor;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
/// RMSNorm (LLaMA): `y = x * rsqrt(mean(x^2 over axis..) + eps) * scale`. Inputs `x, scale`;
/// outputs `y, rstd` (rstd shaped like x with dims `axis..` set to 1).
pub struct RmsNorm {
    pub axis: usize,
    pub epsilon: f64,
}

impl OpSpec for RmsNorm {
    fn infer(&self, _inputs: &[&TensorType]) -> Result<Vec<TensorType>, OpError> {
        Err(OpError::new("rms_norm: not implemented yet"))
    }
    fn dims(&self, inputs: &[&TensorType], outputs: &[&TensorType]) -> DimMap {
        DimMap::opaque(inputs, outputs)
    }
    fn cost(&self, inputs: &[&TensorType], outputs: &[&TensorType]) -> Cost {
        Cost::data_movement(inputs, outputs)
    }
    fn vjp(&self, _cx: &mut VjpCtx<'_>) -> Result<Vec<Option<ValueId>>, OpError> {
        Err(OpError::new("rms_norm: not implemented yet"))
    }
    fn eval(&self, _inputs: &[&Tensor]) -> Result<Vec<Tensor>, OpError> {
        Err(OpError::new("rms_norm: not implemented yet"))
    }
}
