//! `expand`: numpy broadcast to an explicit shape (ONNX `Expand` after the importer resolved
//! its two-way broadcast; `GraphBuilder::zeros`; einsum's vjp for summed-away labels).
//!
//! Dims the input really has keep their axis; broadcast dims (new leading dims, size-1 dims
//! stretched) are tied to no axis on the input, so a sharded output just needs the input
//! replicated along them. The vjp sums `dy` over the broadcast dims and reshapes to the input.

use super::reduce::ReduceKind;
use super::*;
use crate::dtype::TensorType;
use crate::error::{AnalyzerError, OpError};
use crate::graph::ValueId;
use crate::op_err;
use crate::tensor::{for_each_index, Tensor};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
/// numpy broadcast of the input to `shape` (the output shape is exactly `shape`).
pub struct Expand {
    pub shape: Vec<usize>,
}

impl Expand {
    pub fn new(shape: impl Into<Vec<usize>>) -> Self {
        Expand {
            shape: shape.into(),
        }
    }
    /// Output dims that are broadcast from `input` (absent or size 1 there, larger here).
    fn broadcast_axes(&self, input: &[usize]) -> Vec<usize> {
        let off = self.shape.len() - input.len();
        (0..self.shape.len())
            .filter(|&d| d < off || (input[d - off] == 1 && self.shape[d] != 1))
            .collect()
    }
}

impl OpSpec for Expand {
    fn infer(&self, inputs: &[&TensorType]) -> Result<Vec<TensorType>, OpError> {
        let [x] = inputs else {
            return Err(op_err!("expand takes 1 input, got {}", inputs.len()));
        };
        let fits = x.rank() <= self.shape.len() && {
            let off = self.shape.len() - x.rank();
            x.shape
                .iter()
                .enumerate()
                .all(|(d, &n)| n == 1 || n == self.shape[off + d])
        };
        if !fits {
            return Err(op_err!(
                "cannot broadcast {x} to {:?}: every input dim must be 1 or equal the target dim",
                self.shape
            ));
        }
        super::reshape::checked_numel(&self.shape)?;
        Ok(vec![TensorType::new(x.dtype, self.shape.clone())])
    }

    fn dims(&self, inputs: &[&TensorType], outputs: &[&TensorType]) -> DimMap {
        if self.infer(inputs).is_err() {
            return DimMap::opaque(inputs, outputs);
        }
        DimMap::elementwise(inputs, outputs)
    }

    fn cost(&self, inputs: &[&TensorType], outputs: &[&TensorType]) -> Cost {
        Cost::data_movement(inputs, outputs)
    }

    fn vjp(&self, cx: &mut VjpCtx<'_>) -> Result<Vec<Option<ValueId>>, OpError> {
        let (Some(dy), Some(true)) = (cx.grads.first().copied().flatten(), cx.needs.first()) else {
            return Ok(vec![None; cx.inputs.len()]);
        };
        let x = cx.input_ty(0);
        let axes = self.broadcast_axes(&x.shape);
        let mut g = dy;
        if !axes.is_empty() {
            g = cx.b.emit(
                Reduce {
                    kind: ReduceKind::Sum,
                    axes,
                    keepdims: false,
                },
                &[g],
            )?;
        }
        if cx.ty(g).shape != x.shape {
            g = cx.b.emit(Reshape::new(x.shape), &[g])?;
        }
        Ok(vec![Some(g)])
    }

    fn eval(&self, inputs: &[&Tensor]) -> Result<Vec<Tensor>, OpError> {
        let tys: Vec<TensorType> = inputs.iter().map(|t| t.ty()).collect();
        let out = self.infer(&tys.iter().collect::<Vec<_>>())?.remove(0);
        let x = inputs[0];
        let mut data = Vec::with_capacity(out.numel());
        for_each_index(&out.shape, |idx| data.push(x.at_broadcast(idx)));
        Ok(vec![Tensor::new(out.dtype, out.shape, data)])
    }
}

impl crate::builder::GraphBuilder {
    /// `x` broadcast (numpy rules) to exactly `shape`.
    pub fn expand(&mut self, x: ValueId, shape: &[usize]) -> Result<ValueId, AnalyzerError> {
        self.node1(Expand::new(shape), &[x])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::DType;
    use crate::ops::gradcheck::{check, rand_tensor};

    #[test]
    fn rejects_non_broadcastable() {
        let x = TensorType::new(DType::F32, [3, 2]);
        let e = Expand::new([3, 4]).infer(&[&x]).expect_err("2 vs 4");
        assert!(e.0.contains("cannot broadcast"), "{e}");
        assert!(Expand::new([2]).infer(&[&x]).is_err());
    }

    #[test]
    fn infers_and_maps_dims() {
        let x = TensorType::new(DType::F32, [3, 1]);
        let op = Expand::new([2, 3, 4]);
        let y = op.infer(&[&x]).expect("infer").remove(0);
        assert_eq!(y.shape, vec![2, 3, 4]);
        assert_eq!(op.dims(&[&x], &[&y]).to_einsum(), "b_->abc");
    }

    #[test]
    fn evaluates() {
        let x = Tensor::new(DType::F64, vec![2, 1], vec![1.0, 2.0]);
        let y = Expand::new([2, 2, 3]).eval(&[&x]).expect("eval").remove(0);
        assert_eq!(y.data, [1.0, 1.0, 1.0, 2.0, 2.0, 2.0].repeat(2));
    }

    #[test]
    fn vjp_matches_finite_differences() {
        check(Expand::new([2, 3, 4]), &[rand_tensor(&[3, 1], 1)], 1e-6);
        check(Expand::new([1, 3, 2]), &[rand_tensor(&[3, 2], 2)], 1e-6);
        check(Expand::new([3, 2]), &[rand_tensor(&[3, 2], 3)], 1e-6);
    }
}
