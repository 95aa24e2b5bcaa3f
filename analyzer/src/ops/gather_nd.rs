//! `gather_nd`: ONNX `GatherND` with `batch_dims` (the dynamo exporter's `x[arange(b), idx]`,
//! e.g. picking each sequence's last token).
//!
//! For data of rank `r`, indices of rank `q` whose last dim `k` holds coordinates, and `b`
//! batch dims, `out[i_0..i_{q-2}, rest] = data[i_0..i_{b-1}, indices[i_0..i_{q-2}, :], rest]`.
//! Batch dims are parallel across all three tensors, the gathered data dims are whole, the
//! coordinate dim of `indices` is tied to no axis, and the other dims flow into the output.
//! The vjp scatter-adds `dy` into zeros with [`ScatterNd`](super::ScatterNd), after spelling
//! the batch coordinates out in the index tuples.

use super::gather::normalize_index;
use super::scatter_elements::ScatterReduction;
use super::*;
use crate::builder::GraphBuilder;
use crate::dtype::{DType, TensorType};
use crate::error::OpError;
use crate::graph::ValueId;
use crate::op_err;
use crate::tensor::{for_each_index, Tensor};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
/// ONNX GatherND with `batch_dims`; inputs `data, indices`.
pub struct GatherNd {
    pub batch_dims: usize,
}

/// `shape ++ [1]` values of `dtype` whose entry at multi-index `i` is `i[dim]`: one column of
/// explicit coordinates, for building full index tuples in scatter / gather vjps.
pub(crate) fn coordinates(
    b: &mut GraphBuilder,
    dtype: DType,
    shape: &[usize],
    dim: usize,
) -> Result<ValueId, OpError> {
    let n = shape
        .get(dim)
        .copied()
        .ok_or_else(|| op_err!("no dim {dim} in {shape:?}"))?;
    let mut small = vec![1; shape.len() + 1];
    small[dim] = n;
    let c = b.constant(Tensor::new(
        dtype,
        small.clone(),
        (0..n).map(|i| i as f64).collect(),
    ));
    let mut full = shape.to_vec();
    full.push(1);
    if full == small {
        Ok(c)
    } else {
        b.emit(Expand::new(full), &[c])
    }
}

/// Checks shared with [`ScatterNd`](super::ScatterNd): returns `k`, the tuple length.
pub(crate) fn check_nd_indices(
    data: &TensorType,
    indices: &TensorType,
    batch_dims: usize,
) -> Result<usize, OpError> {
    if !indices.dtype.is_int() {
        return Err(op_err!("indices must be integer, got {}", indices.dtype));
    }
    let (r, q) = (data.rank(), indices.rank());
    if r == 0 || q == 0 {
        return Err(op_err!(
            "data {data} and indices {indices} must both have rank >= 1"
        ));
    }
    if batch_dims >= r.min(q) {
        return Err(op_err!(
            "batch_dims {batch_dims} must be below the ranks of data ({r}) and indices ({q})"
        ));
    }
    if data.shape[..batch_dims] != indices.shape[..batch_dims] {
        return Err(op_err!(
            "the {batch_dims} batch dims of data {data} and indices {indices} differ"
        ));
    }
    let k = indices.shape[q - 1];
    if k == 0 || k > r - batch_dims {
        return Err(op_err!(
            "index tuples have length {k}; it must be in 1..={} for data {data} with {batch_dims} batch dims",
            r - batch_dims
        ));
    }
    Ok(k)
}

/// Flat offset into row-major `shape` of the block addressed by `batch` (leading dims) then the
/// `coords` tuple, negative coordinates counting from the end.
pub(crate) fn block_offset(
    shape: &[usize],
    strides: &[usize],
    batch: &[usize],
    coords: &[f64],
) -> Result<usize, OpError> {
    let mut off = 0;
    for (d, &i) in batch.iter().enumerate() {
        off += i * strides[d];
    }
    for (j, &c) in coords.iter().enumerate() {
        let d = batch.len() + j;
        off += normalize_index(c, shape[d])? * strides[d];
    }
    Ok(off)
}

impl OpSpec for GatherNd {
    fn infer(&self, inputs: &[&TensorType]) -> Result<Vec<TensorType>, OpError> {
        let [data, indices] = inputs else {
            return Err(op_err!(
                "gather_nd takes 2 inputs (data, indices), got {}",
                inputs.len()
            ));
        };
        let k = check_nd_indices(data, indices, self.batch_dims)?;
        let mut shape = indices.shape[..indices.rank() - 1].to_vec();
        shape.extend_from_slice(&data.shape[self.batch_dims + k..]);
        Ok(vec![TensorType::new(data.dtype, shape)])
    }

    fn dims(&self, inputs: &[&TensorType], outputs: &[&TensorType]) -> DimMap {
        let Ok(k) = self
            .infer(inputs)
            .and_then(|_| check_nd_indices(inputs[0], inputs[1], self.batch_dims))
        else {
            return DimMap::opaque(inputs, outputs);
        };
        let (data, indices, b) = (inputs[0], inputs[1], self.batch_dims);
        let q = indices.rank();
        let mut axes = vec![];
        let mut new_axis = |size, kind| {
            axes.push(Axis { size, kind });
            Some(axes.len() - 1)
        };
        let batch: Vec<Option<AxisId>> = (0..b)
            .map(|d| new_axis(data.shape[d], AxisKind::Parallel))
            .collect();
        let gathered: Vec<Option<AxisId>> = (b..b + k)
            .map(|d| new_axis(data.shape[d], AxisKind::Whole))
            .collect();
        let rest: Vec<Option<AxisId>> = (b + k..data.rank())
            .map(|d| new_axis(data.shape[d], AxisKind::Parallel))
            .collect();
        let middle: Vec<Option<AxisId>> = (b..q - 1)
            .map(|d| new_axis(indices.shape[d], AxisKind::Parallel))
            .collect();
        let data_map = [batch.clone(), gathered, rest.clone()].concat();
        let index_map = [batch.clone(), middle.clone(), vec![None]].concat();
        let out_map = [batch, middle, rest].concat();
        DimMap {
            axes,
            inputs: vec![data_map, index_map],
            outputs: vec![out_map],
        }
    }

    fn cost(&self, inputs: &[&TensorType], outputs: &[&TensorType]) -> Cost {
        let read: Vec<&TensorType> = inputs.iter().skip(1).chain(outputs).copied().collect();
        Cost::data_movement(&read, outputs)
    }

    fn differentiable(&self, i: usize) -> bool {
        i == 0
    }

    fn vjp(&self, cx: &mut VjpCtx<'_>) -> Result<Vec<Option<ValueId>>, OpError> {
        let mut grads = vec![None; cx.inputs.len()];
        let (Some(dy), Some(true)) = (cx.grads.first().copied().flatten(), cx.needs.first()) else {
            return Ok(grads);
        };
        let (data, indices) = (cx.input_ty(0), cx.input_ty(1));
        let q = indices.rank();
        let mut full = cx.inputs[1];
        if self.batch_dims > 0 {
            let lead = &indices.shape[..q - 1];
            let mut parts = vec![];
            for d in 0..self.batch_dims {
                parts.push(coordinates(cx.b, indices.dtype, lead, d)?);
            }
            parts.push(full);
            full = cx.b.emit(Concat { axis: q - 1 }, &parts)?;
        }
        let zeros = cx.b.zeros(&data)?;
        let op = ScatterNd {
            reduction: ScatterReduction::Add,
        };
        grads[0] = Some(cx.b.emit(op, &[zeros, full, dy])?);
        Ok(grads)
    }

    fn eval(&self, inputs: &[&Tensor]) -> Result<Vec<Tensor>, OpError> {
        let tys: Vec<TensorType> = inputs.iter().map(|t| t.ty()).collect();
        let out = self.infer(&tys.iter().collect::<Vec<_>>())?.remove(0);
        let (data, indices, b) = (inputs[0], inputs[1], self.batch_dims);
        let q = indices.rank();
        let k = indices.shape[q - 1];
        let inner: usize = data.shape[b + k..].iter().product();
        let st = data.strides();
        let mut values = Vec::with_capacity(out.numel());
        let mut p = 0;
        let mut err = None;
        for_each_index(&indices.shape[..q - 1], |prefix| {
            let coords = &indices.data[p * k..(p + 1) * k];
            p += 1;
            match block_offset(&data.shape, &st, &prefix[..b], coords) {
                Ok(off) => values.extend_from_slice(&data.data[off..off + inner]),
                Err(e) => {
                    err.get_or_insert(e);
                }
            }
        });
        if let Some(e) = err {
            return Err(e);
        }
        Ok(vec![Tensor::new(out.dtype, out.shape, values)])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::gradcheck::{check, rand_tensor};

    #[test]
    fn rejects_bad_indices() {
        let data = TensorType::new(DType::F32, [2, 5, 4]);
        let cases = [
            (TensorType::new(DType::F32, [2, 1]), 0, "integer"),
            (TensorType::new(DType::I64, [3, 4]), 0, "1..=3"),
            (TensorType::new(DType::I64, [3, 1]), 1, "batch dims"),
            (TensorType::new(DType::I64, [2]), 1, "below the ranks"),
        ];
        for (idx, b, msg) in cases {
            let e = GatherNd { batch_dims: b }
                .infer(&[&data, &idx])
                .expect_err(msg);
            assert!(e.0.contains(msg), "{msg}: {e}");
        }
    }

    #[test]
    fn infers_and_maps_dims() {
        let data = TensorType::new(DType::F32, [2, 5, 4]);
        let idx = TensorType::new(DType::I64, [2, 3, 1]);
        let op = GatherNd { batch_dims: 1 };
        let y = op.infer(&[&data, &idx]).expect("infer").remove(0);
        assert_eq!(y.shape, vec![2, 3, 4]);
        assert_eq!(op.dims(&[&data, &idx], &[&y]).to_einsum(), "aBc,ad_->adc");
        let idx = TensorType::new(DType::I64, [6, 2]);
        let op = GatherNd { batch_dims: 0 };
        let y = op.infer(&[&data, &idx]).expect("infer").remove(0);
        assert_eq!(y.shape, vec![6, 4]);
        assert_eq!(op.dims(&[&data, &idx], &[&y]).to_einsum(), "ABc,d_->dc");
    }

    #[test]
    fn evaluates_onnx_examples() {
        // ONNX GatherND example 5 (batch_dims = 1)
        let data = Tensor::new(DType::F64, vec![2, 2, 2], (0..8).map(f64::from).collect());
        let idx = Tensor::from_i64([2, 1], &[1, 0]);
        let y = GatherNd { batch_dims: 1 }
            .eval(&[&data, &idx])
            .expect("eval")
            .remove(0);
        assert_eq!(y.shape, vec![2, 2]);
        assert_eq!(y.data, vec![2.0, 3.0, 4.0, 5.0]);
        // example 2, with a negative coordinate
        let data = Tensor::new(DType::F64, vec![2, 2], (0..4).map(f64::from).collect());
        let idx = Tensor::from_i64([2, 1], &[-1, 0]);
        let y = GatherNd { batch_dims: 0 }
            .eval(&[&data, &idx])
            .expect("eval")
            .remove(0);
        assert_eq!(y.data, vec![2.0, 3.0, 0.0, 1.0]);
        let bad = Tensor::from_i64([1, 1], &[2]);
        assert!(GatherNd { batch_dims: 0 }.eval(&[&data, &bad]).is_err());
    }

    #[test]
    fn vjp_matches_finite_differences() {
        let idx = Tensor::from_i64([3, 2], &[0, 1, 1, 2, 0, 1]);
        check(
            GatherNd { batch_dims: 0 },
            &[rand_tensor(&[2, 3, 2], 1), idx],
            1e-6,
        );
        let idx = Tensor::from_i64([2, 2, 1], &[2, 0, -1, 1]);
        check(
            GatherNd { batch_dims: 1 },
            &[rand_tensor(&[2, 3, 2], 2), idx],
            1e-6,
        );
    }
}
