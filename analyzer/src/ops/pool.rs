//! `pool` op. PLACEHOLDER: semantics to be implemented.

use super::*;
use crate::dtype::TensorType;
use crate::error::OpError;
use crate::graph::ValueId;
use crate::tensor::Tensor;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
/// Max or average pooling over the spatial dims (NCHW...).
pub struct Pool {
    pub kind: PoolKind,
    pub kernel: Vec<usize>,
    pub strides: Vec<usize>,
    pub pads: Vec<[usize; 2]>,
    pub dilations: Vec<usize>,
    /// Average pooling: divide by the full window (true) or by the unpadded part (false).
    pub count_include_pad: bool,
    pub ceil_mode: bool,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PoolKind {
    Max,
    Avg,
}

impl OpSpec for Pool {
    fn infer(&self, _inputs: &[&TensorType]) -> Result<Vec<TensorType>, OpError> {
        Err(OpError::new("pool: not implemented yet"))
    }
    fn dims(&self, inputs: &[&TensorType], outputs: &[&TensorType]) -> DimMap {
        DimMap::opaque(inputs, outputs)
    }
    fn cost(&self, inputs: &[&TensorType], outputs: &[&TensorType]) -> Cost {
        Cost::data_movement(inputs, outputs)
    }
    fn vjp(&self, _cx: &mut VjpCtx<'_>) -> Result<Vec<Option<ValueId>>, OpError> {
        Err(OpError::new("pool: not implemented yet"))
    }
    fn eval(&self, _inputs: &[&Tensor]) -> Result<Vec<Tensor>, OpError> {
        Err(OpError::new("pool: not implemented yet"))
    }
}
