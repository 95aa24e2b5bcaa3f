//! `causal_mask` op. PLACEHOLDER: semantics to be implemented.

use super::*;
use crate::dtype::DType;
use crate::dtype::TensorType;
use crate::error::OpError;
use crate::graph::ValueId;
use crate::tensor::Tensor;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
/// Additive causal attention mask `[rows, cols]`: 0 where `col <= row + (cols - rows)`, the
/// dtype's lowest value elsewhere. No inputs; avoids storing an S x S constant.
pub struct CausalMask {
    pub rows: usize,
    pub cols: usize,
    pub dtype: DType,
}

impl OpSpec for CausalMask {
    fn infer(&self, _inputs: &[&TensorType]) -> Result<Vec<TensorType>, OpError> {
        Err(OpError::new("causal_mask: not implemented yet"))
    }
    fn dims(&self, inputs: &[&TensorType], outputs: &[&TensorType]) -> DimMap {
        DimMap::opaque(inputs, outputs)
    }
    fn cost(&self, inputs: &[&TensorType], outputs: &[&TensorType]) -> Cost {
        Cost::data_movement(inputs, outputs)
    }
    fn vjp(&self, _cx: &mut VjpCtx<'_>) -> Result<Vec<Option<ValueId>>, OpError> {
        Err(OpError::new("causal_mask: not implemented yet"))
    }
    fn eval(&self, _inputs: &[&Tensor]) -> Result<Vec<Tensor>, OpError> {
        Err(OpError::new("causal_mask: not implemented yet"))
    }
}
