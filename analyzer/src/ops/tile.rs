//! `tile`: repeats the input along each dim (ONNX `Tile`; mixture-of-experts routing copies).
//! A tiled dim is whole (a shard of the output is not a tile of a shard of the input); dims
//! repeated once pass their axis through. The vjp views `dy` as `[r0, d0, r1, d1, ...]` and sums
//! the repeat dims away.

use super::reduce::ReduceKind;
use super::*;
use crate::dtype::TensorType;
use crate::error::{AnalyzerError, OpError};
use crate::graph::ValueId;
use crate::op_err;
use crate::tensor::{for_each_index, Tensor};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
/// Repeats the input `repeats[d]` times along each dim.
pub struct Tile {
    pub repeats: Vec<usize>,
}

impl OpSpec for Tile {
    fn infer(&self, inputs: &[&TensorType]) -> Result<Vec<TensorType>, OpError> {
        let [x] = inputs else {
            return Err(op_err!("tile takes 1 input, got {}", inputs.len()));
        };
        if self.repeats.len() != x.rank() {
            return Err(op_err!(
                "{} repeats for a rank-{} input",
                self.repeats.len(),
                x.rank()
            ));
        }
        let shape = x
            .shape
            .iter()
            .zip(&self.repeats)
            .map(|(&d, &r)| d.checked_mul(r))
            .collect::<Option<Vec<usize>>>()
            .ok_or_else(|| op_err!("tiled shape overflows"))?;
        super::reshape::checked_numel(&shape)?;
        Ok(vec![TensorType::new(x.dtype, shape)])
    }

    fn dims(&self, inputs: &[&TensorType], outputs: &[&TensorType]) -> DimMap {
        let (Some(x), Some(y)) = (inputs.first(), outputs.first()) else {
            return DimMap::opaque(inputs, outputs);
        };
        if self.infer(inputs).is_err() || y.rank() != x.rank() {
            return DimMap::opaque(inputs, outputs);
        }
        DimMap::same_size_dims_parallel(x, y)
    }

    fn cost(&self, inputs: &[&TensorType], outputs: &[&TensorType]) -> Cost {
        Cost::data_movement(inputs, outputs)
    }

    fn vjp(&self, cx: &mut VjpCtx<'_>) -> Result<Vec<Option<ValueId>>, OpError> {
        let (Some(dy), Some(true)) = (cx.grads.first().copied().flatten(), cx.needs.first()) else {
            return Ok(vec![None; cx.inputs.len()]);
        };
        let x = cx.input_ty(0);
        if self.repeats.contains(&0) {
            return Ok(vec![Some(cx.b.zeros(&x)?)]);
        }
        if self.repeats.iter().all(|&r| r == 1) {
            return Ok(vec![Some(dy)]);
        }
        let mut split = vec![];
        let mut axes = vec![];
        for (&d, &r) in x.shape.iter().zip(&self.repeats) {
            if r > 1 {
                axes.push(split.len());
                split.push(r);
            }
            split.push(d);
        }
        let g = cx.b.emit(Reshape::new(split), &[dy])?;
        let g = cx.b.emit(
            Reduce {
                kind: ReduceKind::Sum,
                axes,
                keepdims: false,
            },
            &[g],
        )?;
        Ok(vec![Some(g)])
    }

    fn eval(&self, inputs: &[&Tensor]) -> Result<Vec<Tensor>, OpError> {
        let tys: Vec<TensorType> = inputs.iter().map(|t| t.ty()).collect();
        let out = self.infer(&tys.iter().collect::<Vec<_>>())?.remove(0);
        let x = inputs[0];
        let st = x.strides();
        let mut data = Vec::with_capacity(out.numel());
        for_each_index(&out.shape, |idx| {
            let off: usize = idx
                .iter()
                .zip(&x.shape)
                .zip(&st)
                .map(|((&i, &n), &s)| (i % n) * s)
                .sum();
            data.push(x.data[off]);
        });
        Ok(vec![Tensor::new(out.dtype, out.shape, data)])
    }
}

impl crate::builder::GraphBuilder {
    /// `x` repeated `repeats[d]` times along each dim.
    pub fn tile(&mut self, x: ValueId, repeats: &[usize]) -> Result<ValueId, AnalyzerError> {
        self.node1(
            Tile {
                repeats: repeats.to_vec(),
            },
            &[x],
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::DType;
    use crate::ops::gradcheck::{check, rand_tensor};

    #[test]
    fn rejects_wrong_repeats() {
        let x = TensorType::new(DType::F32, [2, 3]);
        let op = Tile {
            repeats: vec![2, 2, 2],
        };
        let e = op.infer(&[&x]).expect_err("rank mismatch");
        assert!(e.0.contains("3 repeats"), "{e}");
    }

    #[test]
    fn infers_maps_and_evaluates() {
        let op = Tile {
            repeats: vec![1, 2],
        };
        let x = Tensor::new(DType::F64, vec![2, 2], vec![1.0, 2.0, 3.0, 4.0]);
        let y = op.eval(&[&x]).expect("eval").remove(0);
        assert_eq!(y.shape, vec![2, 4]);
        assert_eq!(y.data, vec![1.0, 2.0, 1.0, 2.0, 3.0, 4.0, 3.0, 4.0]);
        assert_eq!(op.dims(&[&x.ty()], &[&y.ty()]).to_einsum(), "aB->aC");
    }

    #[test]
    fn vjp_matches_finite_differences() {
        let op = Tile {
            repeats: vec![2, 1, 3],
        };
        check(op, &[rand_tensor(&[2, 3, 2], 1)], 1e-6);
    }
}
