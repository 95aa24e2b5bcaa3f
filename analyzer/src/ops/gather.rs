//! `gather`: `data.take(indices, axis)` (ONNX `Gather`; embedding lookups, index selects).
//!
//! The table axis of `data` is whole: a lookup may hit any row. Every other dim of `data`
//! and every dim of `indices` carries its own axis into the output, so an embedding sharded
//! along the hidden dim, or tokens sharded along the batch, gather with no communication. The
//! vjp is [`GatherGrad`](super::GatherGrad), a scatter-add into a zero table.

use super::*;
use crate::dtype::TensorType;
use crate::error::{AnalyzerError, OpError};
use crate::graph::ValueId;
use crate::op_err;
use crate::tensor::{for_each_index, Tensor};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
/// ONNX Gather: `out = data.take(indices, axis)`; inputs `data, indices` (integer, negative
/// indices count from the end). Output shape `data[..axis] ++ indices ++ data[axis+1..]`.
pub struct Gather {
    pub axis: usize,
}

/// Output shape of a gather of `indices` from `data_shape` along `axis`, with the checks shared
/// by [`Gather`] and [`GatherGrad`](super::GatherGrad).
pub(crate) fn gather_shape(
    data_shape: &[usize],
    indices: &TensorType,
    axis: usize,
) -> Result<Vec<usize>, OpError> {
    if !indices.dtype.is_int() {
        return Err(op_err!("indices must be integer, got {}", indices.dtype));
    }
    if axis >= data_shape.len() {
        return Err(op_err!(
            "axis {axis} is out of range for rank-{} data",
            data_shape.len()
        ));
    }
    let mut shape = data_shape[..axis].to_vec();
    shape.extend_from_slice(&indices.shape);
    shape.extend_from_slice(&data_shape[axis + 1..]);
    super::reshape::checked_numel(&shape)?;
    Ok(shape)
}

/// `index` made non-negative for a dim of size `dim` (ONNX: negative counts from the end).
pub(crate) fn normalize_index(index: f64, dim: usize) -> Result<usize, OpError> {
    let i = index as i64;
    let j = if i < 0 { i + dim as i64 } else { i };
    if j < 0 || j >= dim as i64 {
        return Err(op_err!("index {i} is out of range for a dim of size {dim}"));
    }
    Ok(j as usize)
}

/// Per-tensor axis lists of a gather's dim map (see [`gather_dims`]).
pub(crate) struct GatherMaps {
    pub axes: Vec<Axis>,
    pub table: Vec<Option<AxisId>>,
    pub indices: Vec<Option<AxisId>>,
    pub gathered: Vec<Option<AxisId>>,
}

/// Dim map shared by gather and its gradient: `table` is the data-shaped tensor, `gathered` the
/// output-shaped one, `index_kind` the kind of the index dims (parallel forward, summed back).
pub(crate) fn gather_dims(
    table: &[usize],
    indices: &[usize],
    axis: usize,
    index_kind: AxisKind,
) -> GatherMaps {
    let mut axes: Vec<Axis> = table
        .iter()
        .map(|&size| Axis {
            size,
            kind: AxisKind::Parallel,
        })
        .collect();
    axes[axis].kind = AxisKind::Whole;
    let table_map: Vec<Option<AxisId>> = (0..table.len()).map(Some).collect();
    let index_map: Vec<Option<AxisId>> = indices
        .iter()
        .map(|&size| {
            axes.push(Axis {
                size,
                kind: index_kind,
            });
            Some(axes.len() - 1)
        })
        .collect();
    let mut gathered: Vec<Option<AxisId>> = (0..axis).map(Some).collect();
    gathered.extend(index_map.iter().copied());
    gathered.extend((axis + 1..table.len()).map(Some));
    GatherMaps {
        axes,
        table: table_map,
        indices: index_map,
        gathered,
    }
}

impl OpSpec for Gather {
    fn infer(&self, inputs: &[&TensorType]) -> Result<Vec<TensorType>, OpError> {
        let [data, indices] = inputs else {
            return Err(op_err!(
                "gather takes 2 inputs (data, indices), got {}",
                inputs.len()
            ));
        };
        let shape = gather_shape(&data.shape, indices, self.axis)?;
        Ok(vec![TensorType::new(data.dtype, shape)])
    }

    fn dims(&self, inputs: &[&TensorType], outputs: &[&TensorType]) -> DimMap {
        if self.infer(inputs).is_err() {
            return DimMap::opaque(inputs, outputs);
        }
        let m = gather_dims(
            &inputs[0].shape,
            &inputs[1].shape,
            self.axis,
            AxisKind::Parallel,
        );
        DimMap {
            axes: m.axes,
            inputs: vec![m.table, m.indices],
            outputs: vec![m.gathered],
        }
    }

    fn cost(&self, inputs: &[&TensorType], outputs: &[&TensorType]) -> Cost {
        // reads the indices and the gathered rows only, not the whole table
        let read: Vec<&TensorType> = inputs.iter().skip(1).chain(outputs).copied().collect();
        Cost::data_movement(&read, outputs)
    }

    fn differentiable(&self, i: usize) -> bool {
        i == 0
    }

    fn vjp(&self, cx: &mut VjpCtx<'_>) -> Result<Vec<Option<ValueId>>, OpError> {
        let mut grads = vec![None; cx.inputs.len()];
        if let (Some(dy), Some(true)) = (cx.grads.first().copied().flatten(), cx.needs.first()) {
            let data_shape = cx.input_ty(0).shape;
            let op = GatherGrad {
                axis: self.axis,
                data_shape,
            };
            grads[0] = Some(cx.b.emit(op, &[dy, cx.inputs[1]])?);
        }
        Ok(grads)
    }

    fn eval(&self, inputs: &[&Tensor]) -> Result<Vec<Tensor>, OpError> {
        let tys: Vec<TensorType> = inputs.iter().map(|t| t.ty()).collect();
        let out = self.infer(&tys.iter().collect::<Vec<_>>())?.remove(0);
        let (data, indices) = (inputs[0], inputs[1]);
        let (axis, q) = (self.axis, indices.rank());
        let dim = data.shape[axis];
        let rows = indices
            .data
            .iter()
            .map(|&i| normalize_index(i, dim))
            .collect::<Result<Vec<usize>, OpError>>()?;
        let (dst, ist) = (data.strides(), indices.strides());
        let mut values = Vec::with_capacity(out.numel());
        for_each_index(&out.shape, |idx| {
            let k: usize = idx[axis..axis + q]
                .iter()
                .zip(&ist)
                .map(|(a, b)| a * b)
                .sum();
            let mut off = rows[k] * dst[axis];
            for d in 0..axis {
                off += idx[d] * dst[d];
            }
            for d in axis + 1..data.rank() {
                off += idx[d - 1 + q] * dst[d];
            }
            values.push(data.data[off]);
        });
        Ok(vec![Tensor::new(out.dtype, out.shape, values)])
    }
}

impl crate::builder::GraphBuilder {
    /// `data.take(indices, axis)` (ONNX Gather; negative indices count from the end).
    pub fn gather(
        &mut self,
        data: ValueId,
        indices: ValueId,
        axis: usize,
    ) -> Result<ValueId, AnalyzerError> {
        self.node1(Gather { axis }, &[data, indices])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::DType;
    use crate::ops::gradcheck::{check, rand_tensor};

    #[test]
    fn rejects_bad_inputs() {
        let data = TensorType::new(DType::F32, [5, 3]);
        let fidx = TensorType::new(DType::F32, [2]);
        let e = Gather { axis: 0 }
            .infer(&[&data, &fidx])
            .expect_err("float idx");
        assert!(e.0.contains("integer"), "{e}");
        let idx = TensorType::new(DType::I64, [2]);
        assert!(Gather { axis: 2 }.infer(&[&data, &idx]).is_err());
        assert!(Gather { axis: 0 }.infer(&[&data]).is_err());
    }

    #[test]
    fn infers_and_maps_dims() {
        // embedding lookup: table [vocab, hidden], tokens [batch, seq]
        let table = TensorType::new(DType::F32, [10, 4]);
        let tokens = TensorType::new(DType::I64, [2, 3]);
        let y = Gather { axis: 0 }
            .infer(&[&table, &tokens])
            .expect("infer")
            .remove(0);
        assert_eq!(y.shape, vec![2, 3, 4]);
        let m = Gather { axis: 0 }.dims(&[&table, &tokens], &[&y]);
        assert_eq!(m.to_einsum(), "Ab,cd->cdb");
        let data = TensorType::new(DType::F32, [2, 5, 3]);
        let idx = TensorType::new(DType::I64, []);
        let y = Gather { axis: 1 }
            .infer(&[&data, &idx])
            .expect("infer")
            .remove(0);
        assert_eq!(y.shape, vec![2, 3]);
        assert_eq!(
            Gather { axis: 1 }.dims(&[&data, &idx], &[&y]).to_einsum(),
            "aBc,->ac"
        );
    }

    #[test]
    fn evaluates_with_negative_indices() {
        let data = Tensor::new(DType::F64, vec![3, 2], (0..6).map(f64::from).collect());
        let idx = Tensor::from_i64([2], &[-1, 0]);
        let y = Gather { axis: 0 }
            .eval(&[&data, &idx])
            .expect("eval")
            .remove(0);
        assert_eq!(y.data, vec![4.0, 5.0, 0.0, 1.0]);
        let y = Gather { axis: 1 }
            .eval(&[&data, &idx])
            .expect("eval")
            .remove(0);
        assert_eq!(y.shape, vec![3, 2]);
        assert_eq!(y.data, vec![1.0, 0.0, 3.0, 2.0, 5.0, 4.0]);
        let bad = Tensor::from_i64([1], &[3]);
        assert!(Gather { axis: 0 }.eval(&[&data, &bad]).is_err());
    }

    #[test]
    fn vjp_matches_finite_differences() {
        // repeated rows accumulate
        let idx = Tensor::from_i64([2, 2], &[0, 2, -1, 0]);
        check(
            Gather { axis: 0 },
            &[rand_tensor(&[3, 2], 1), idx.clone()],
            1e-6,
        );
        check(Gather { axis: 1 }, &[rand_tensor(&[2, 3, 2], 2), idx], 1e-6);
    }
}
