//! `causal_mask`: the additive causal attention mask `[rows, cols]`, generated instead of stored
//! (exporters build it from Range / LessOrEqual / Where chains or an S x S constant). Row `i`
//! may attend to columns `0..=i + (cols - rows)`, so a query block at the end of a longer key
//! sequence (KV cache) lines up with its keys; masked entries hold the dtype's lowest finite
//! value, as `torch.finfo(dtype).min` in Hugging Face models.
//!
//! Both axes are `Whole`: the op's value at a position depends on the global row and column,
//! so a shard generated from local shapes alone would be wrong; it is cheap enough to make on
//! every device and slice.

use super::*;
use crate::dtype::DType;
use crate::dtype::TensorType;
use crate::error::{AnalyzerError, OpError};
use crate::graph::ValueId;
use crate::op_err;
use crate::tensor::Tensor;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
/// Additive causal attention mask `[rows, cols]`: 0 where `col <= row + (cols - rows)`, the
/// dtype's lowest value elsewhere. No inputs; avoids storing an S x S constant.
pub struct CausalMask {
    pub rows: usize,
    pub cols: usize,
    pub dtype: DType,
}

/// The lowest finite value of a float dtype (`torch.finfo(dtype).min`).
pub fn lowest_finite(dtype: DType) -> Option<f64> {
    match dtype {
        DType::F64 => Some(f64::MIN),
        DType::F32 => Some(f32::MIN as f64),
        DType::F16 => Some(-65504.0),
        // (2 - 2^-7) * 2^127
        DType::BF16 => Some(-3.389_531_389_251_535_5e38),
        _ => None,
    }
}

impl CausalMask {
    /// Whether `(row, col)` may attend.
    pub fn visible(&self, row: usize, col: usize) -> bool {
        // col <= row + cols - rows, without underflow when rows > cols
        col + self.rows <= row + self.cols
    }
}

impl OpSpec for CausalMask {
    fn infer(&self, inputs: &[&TensorType]) -> Result<Vec<TensorType>, OpError> {
        if !inputs.is_empty() {
            return Err(op_err!("takes no inputs, got {}", inputs.len()));
        }
        if lowest_finite(self.dtype).is_none() {
            return Err(op_err!(
                "an additive mask must be float, got {}",
                self.dtype
            ));
        }
        Ok(vec![TensorType::new(self.dtype, [self.rows, self.cols])])
    }

    fn dims(&self, inputs: &[&TensorType], outputs: &[&TensorType]) -> DimMap {
        if outputs.len() != 1 || outputs[0].rank() != 2 {
            return DimMap::opaque(inputs, outputs);
        }
        DimMap {
            axes: outputs[0]
                .shape
                .iter()
                .map(|&size| Axis {
                    size,
                    kind: AxisKind::Whole,
                })
                .collect(),
            inputs: vec![],
            outputs: vec![vec![Some(0), Some(1)]],
        }
    }

    fn cost(&self, inputs: &[&TensorType], outputs: &[&TensorType]) -> Cost {
        // one compare per element
        Cost::elementwise(inputs, outputs, 1.0)
    }

    fn differentiable(&self, _i: usize) -> bool {
        false
    }

    fn vjp(&self, _cx: &mut VjpCtx<'_>) -> Result<Vec<Option<ValueId>>, OpError> {
        Ok(vec![])
    }

    fn eval(&self, inputs: &[&Tensor]) -> Result<Vec<Tensor>, OpError> {
        let tys: Vec<TensorType> = inputs.iter().map(|t| t.ty()).collect();
        let out = self.infer(&tys.iter().collect::<Vec<_>>())?.remove(0);
        let low = lowest_finite(self.dtype).unwrap_or(f64::MIN);
        let mut data = Vec::with_capacity(self.rows * self.cols);
        for r in 0..self.rows {
            for c in 0..self.cols {
                data.push(if self.visible(r, c) { 0.0 } else { low });
            }
        }
        Ok(vec![Tensor::new(out.dtype, out.shape, data)])
    }
}

impl crate::builder::GraphBuilder {
    /// The additive causal mask `[rows, cols]` of `dtype`.
    pub fn causal_mask(
        &mut self,
        rows: usize,
        cols: usize,
        dtype: DType,
    ) -> Result<ValueId, AnalyzerError> {
        self.node1(CausalMask { rows, cols, dtype }, &[])
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn m(rows: usize, cols: usize, dtype: DType) -> CausalMask {
        CausalMask { rows, cols, dtype }
    }

    #[test]
    fn infers_and_rejects() {
        assert_eq!(
            m(2, 3, DType::F16).infer(&[]).unwrap()[0],
            TensorType::new(DType::F16, [2, 3])
        );
        let e = m(2, 3, DType::I64).infer(&[]).unwrap_err();
        assert!(e.0.contains("must be float"), "{e}");
        let x = TensorType::new(DType::F32, [2]);
        assert!(m(2, 3, DType::F32).infer(&[&x]).is_err());
        let out = m(2, 3, DType::F32).infer(&[]).unwrap();
        assert_eq!(
            m(2, 3, DType::F32).dims(&[], &[&out[0]]).to_einsum(),
            "->AB"
        );
    }

    #[test]
    fn evaluates_with_a_key_offset() {
        let low = f32::MIN as f64;
        let y = m(2, 3, DType::F32).eval(&[]).unwrap();
        assert_eq!(y[0].data, vec![0.0, 0.0, low, 0.0, 0.0, 0.0]);
        let sq = m(3, 3, DType::F64).eval(&[]).unwrap();
        assert_eq!(sq[0].data[1], f64::MIN);
        assert_eq!(sq[0].data[3], 0.0);
        // more rows than columns: the first rows see nothing
        let tall = m(3, 1, DType::F32).eval(&[]).unwrap();
        assert_eq!(tall[0].data, vec![low, low, 0.0]);
        let bf = m(2, 2, DType::BF16).eval(&[]).unwrap();
        assert_eq!(bf[0].data[1], -3.389_531_389_251_535_5e38);
    }
}
