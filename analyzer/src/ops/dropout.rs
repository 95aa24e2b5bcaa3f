//! `dropout` op. PLACEHOLDER: semantics to be implemented.

use super::*;
use crate::dtype::TensorType;
use crate::error::OpError;
use crate::graph::ValueId;
use crate::tensor::Tensor;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
/// Dropout: outputs `y, mask` (mask bool, true = kept; y = x * mask / (1 - ratio)). Not
/// `training`: y = x and mask all true. The mask is a deterministic function of `seed` and the
/// element index so that every run (and every rank) agrees.
pub struct Dropout {
    pub ratio: f64,
    pub training: bool,
    pub seed: u64,
}

impl OpSpec for Dropout {
    fn infer(&self, _inputs: &[&TensorType]) -> Result<Vec<TensorType>, OpError> {
        Err(OpError::new("dropout: not implemented yet"))
    }
    fn dims(&self, inputs: &[&TensorType], outputs: &[&TensorType]) -> DimMap {
        DimMap::opaque(inputs, outputs)
    }
    fn cost(&self, inputs: &[&TensorType], outputs: &[&TensorType]) -> Cost {
        Cost::data_movement(inputs, outputs)
    }
    fn vjp(&self, _cx: &mut VjpCtx<'_>) -> Result<Vec<Option<ValueId>>, OpError> {
        Err(OpError::new("dropout: not implemented yet"))
    }
    fn eval(&self, _inputs: &[&Tensor]) -> Result<Vec<Tensor>, OpError> {
        Err(OpError::new("dropout: not implemented yet"))
    }
}
