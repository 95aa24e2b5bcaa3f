//! `gather_grad`: the backward of [`Gather`](super::Gather) w.r.t. its table, a scatter-add of
//! `dy` rows into zeros (embedding backward).
//!
//! Its dim map mirrors the gather's: the table axis is whole, the other table dims pass their
//! axes between `dy` and the result, and the index dims are *contracted*: tokens split across
//! devices each scatter into a full-size table, leaving partial sums to all-reduce, which is
//! exactly data-parallel embedding training.

use super::gather::{gather_dims, gather_shape, normalize_index};
use super::*;
use crate::dtype::TensorType;
use crate::error::OpError;
use crate::graph::ValueId;
use crate::op_err;
use crate::tensor::{for_each_index, Tensor};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
/// Backward of [`Gather`](super::Gather) w.r.t. data: inputs `dy, indices`; output shaped
/// `data_shape`, zeros with `dy` slices added at the gathered positions (embedding backward).
pub struct GatherGrad {
    pub axis: usize,
    pub data_shape: Vec<usize>,
}

impl OpSpec for GatherGrad {
    fn infer(&self, inputs: &[&TensorType]) -> Result<Vec<TensorType>, OpError> {
        let [dy, indices] = inputs else {
            return Err(op_err!(
                "gather_grad takes 2 inputs (dy, indices), got {}",
                inputs.len()
            ));
        };
        let expect = gather_shape(&self.data_shape, indices, self.axis)?;
        if dy.shape != expect {
            return Err(op_err!(
                "dy is {dy}, but gathering {indices} from {:?} along axis {} gives {expect:?}",
                self.data_shape,
                self.axis
            ));
        }
        if !dy.dtype.is_float() {
            return Err(op_err!("dy must be a float tensor, got {}", dy.dtype));
        }
        Ok(vec![TensorType::new(dy.dtype, self.data_shape.clone())])
    }

    fn dims(&self, inputs: &[&TensorType], outputs: &[&TensorType]) -> DimMap {
        if self.infer(inputs).is_err() {
            return DimMap::opaque(inputs, outputs);
        }
        let m = gather_dims(
            &self.data_shape,
            &inputs[1].shape,
            self.axis,
            AxisKind::Contracted,
        );
        DimMap {
            axes: m.axes,
            inputs: vec![m.gathered, m.indices],
            outputs: vec![m.table],
        }
    }

    fn cost(&self, inputs: &[&TensorType], outputs: &[&TensorType]) -> Cost {
        // zero-fill the table, then one add per element of dy
        let flops = inputs.first().map_or(0, |t| t.numel()) as f64;
        Cost::memory_bound(inputs, outputs, flops)
    }

    fn differentiable(&self, i: usize) -> bool {
        i == 0
    }

    fn vjp(&self, _cx: &mut VjpCtx<'_>) -> Result<Vec<Option<ValueId>>, OpError> {
        Err(op_err!(
            "gather_grad has no gradient (second-order gradients are unsupported)"
        ))
    }

    fn eval(&self, inputs: &[&Tensor]) -> Result<Vec<Tensor>, OpError> {
        let tys: Vec<TensorType> = inputs.iter().map(|t| t.ty()).collect();
        let out = self.infer(&tys.iter().collect::<Vec<_>>())?.remove(0);
        let (dy, indices) = (inputs[0], inputs[1]);
        let (axis, q) = (self.axis, indices.rank());
        let dim = self.data_shape[axis];
        let rows = indices
            .data
            .iter()
            .map(|&i| normalize_index(i, dim))
            .collect::<Result<Vec<usize>, OpError>>()?;
        let (tst, ist) = (Tensor::strides_of(&out.shape), indices.strides());
        let mut table = vec![0.0; out.numel()];
        let mut k = 0;
        for_each_index(&dy.shape, |idx| {
            let r: usize = idx[axis..axis + q]
                .iter()
                .zip(&ist)
                .map(|(a, b)| a * b)
                .sum();
            let mut off = rows[r] * tst[axis];
            for d in 0..axis {
                off += idx[d] * tst[d];
            }
            for d in axis + 1..out.rank() {
                off += idx[d - 1 + q] * tst[d];
            }
            table[off] += dy.data[k];
            k += 1;
        });
        Ok(vec![Tensor::new(out.dtype, out.shape, table)])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::DType;

    #[test]
    fn rejects_mismatched_dy() {
        let op = GatherGrad {
            axis: 0,
            data_shape: vec![10, 4],
        };
        let idx = TensorType::new(DType::I64, [2, 3]);
        let dy = TensorType::new(DType::F32, [2, 3, 5]);
        let e = op.infer(&[&dy, &idx]).expect_err("hidden 5 vs 4");
        assert!(e.0.contains("[2, 3, 4]"), "{e}");
    }

    #[test]
    fn maps_index_dims_as_contracted() {
        let op = GatherGrad {
            axis: 0,
            data_shape: vec![10, 4],
        };
        let idx = TensorType::new(DType::I64, [2, 3]);
        let dy = TensorType::new(DType::F32, [2, 3, 4]);
        let out = op.infer(&[&dy, &idx]).expect("infer").remove(0);
        assert_eq!(out.shape, vec![10, 4]);
        let m = op.dims(&[&dy, &idx], &[&out]);
        assert_eq!(m.to_einsum(), "cdb,cd->Ab");
        assert_eq!(m.axes[2].kind, AxisKind::Contracted);
    }

    #[test]
    fn accumulates_repeated_rows() {
        let op = GatherGrad {
            axis: 0,
            data_shape: vec![3, 2],
        };
        let dy = Tensor::new(DType::F64, vec![3, 2], vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        let idx = Tensor::from_i64([3], &[2, -1, 0]);
        let t = op.eval(&[&dy, &idx]).expect("eval").remove(0);
        assert_eq!(t.data, vec![5.0, 6.0, 0.0, 0.0, 4.0, 6.0]);
        // its values are checked against finite differences by gather's gradcheck
    }
}
