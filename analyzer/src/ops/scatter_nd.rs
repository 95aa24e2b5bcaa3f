//! `scatter_nd`: ONNX `ScatterND`. `out = data`, then for every index tuple
//! `indices[i, :]` (length `k`), `out[indices[i, :], rest] (op)= updates[i, rest]`. It is also
//! [`GatherNd`](super::GatherNd)'s vjp (reduction `add` into zeros).
//!
//! Dim map: the addressed data dims (`..k`) are whole; the trailing data dims carry one axis
//! through data, updates and output; the update rows (the leading dims of `indices` and
//! `updates`) are whole, since a row may land anywhere. Gradients exist for reduction `none`
//! (the overwritten positions of `dy` zeroed by scattering zeros) and `add` (`dy` itself);
//! `d updates` gathers `dy` back at the tuples.

use super::gather_nd::{block_offset, check_nd_indices};
use super::scatter_elements::ScatterReduction;
use super::*;
use crate::dtype::TensorType;
use crate::error::OpError;
use crate::graph::ValueId;
use crate::op_err;
use crate::tensor::{for_each_index, Tensor};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
/// ONNX ScatterND: inputs `data, indices, updates`.
pub struct ScatterNd {
    pub reduction: ScatterReduction,
}

impl OpSpec for ScatterNd {
    fn infer(&self, inputs: &[&TensorType]) -> Result<Vec<TensorType>, OpError> {
        let [data, indices, updates] = inputs else {
            return Err(op_err!(
                "scatter_nd takes 3 inputs (data, indices, updates), got {}",
                inputs.len()
            ));
        };
        let k = check_nd_indices(data, indices, 0)?;
        if updates.dtype != data.dtype {
            return Err(op_err!(
                "updates are {}, data is {}",
                updates.dtype,
                data.dtype
            ));
        }
        let mut expect = indices.shape[..indices.rank() - 1].to_vec();
        expect.extend_from_slice(&data.shape[k..]);
        if updates.shape != expect {
            return Err(op_err!(
                "updates {updates} must be shaped {expect:?} (indices' leading dims, then data's dims after the first {k})"
            ));
        }
        Ok(vec![(*data).clone()])
    }

    fn dims(&self, inputs: &[&TensorType], outputs: &[&TensorType]) -> DimMap {
        let Ok(k) = self
            .infer(inputs)
            .and_then(|_| check_nd_indices(inputs[0], inputs[1], 0))
        else {
            return DimMap::opaque(inputs, outputs);
        };
        let (data, indices) = (inputs[0], inputs[1]);
        let q = indices.rank();
        let mut axes = vec![];
        let mut new_axis = |size, kind| {
            axes.push(Axis { size, kind });
            Some(axes.len() - 1)
        };
        let addressed: Vec<Option<AxisId>> = data.shape[..k]
            .iter()
            .map(|&n| new_axis(n, AxisKind::Whole))
            .collect();
        let rest: Vec<Option<AxisId>> = data.shape[k..]
            .iter()
            .map(|&n| new_axis(n, AxisKind::Parallel))
            .collect();
        let rows: Vec<Option<AxisId>> = indices.shape[..q - 1]
            .iter()
            .map(|&n| new_axis(n, AxisKind::Whole))
            .collect();
        let data_map = [addressed, rest.clone()].concat();
        DimMap {
            axes,
            inputs: vec![
                data_map.clone(),
                [rows.clone(), vec![None]].concat(),
                [rows, rest].concat(),
            ],
            outputs: vec![data_map],
        }
    }

    fn cost(&self, inputs: &[&TensorType], outputs: &[&TensorType]) -> Cost {
        self.reduction.scatter_cost(inputs, outputs)
    }

    fn differentiable(&self, i: usize) -> bool {
        i != 1
    }

    fn vjp(&self, cx: &mut VjpCtx<'_>) -> Result<Vec<Option<ValueId>>, OpError> {
        let mut grads = vec![None; cx.inputs.len()];
        let Some(dy) = cx.grads.first().copied().flatten() else {
            return Ok(grads);
        };
        self.reduction.check_differentiable("scatter_nd")?;
        let indices = cx.inputs[1];
        if cx.needs.first().copied().unwrap_or(false) {
            grads[0] = Some(self.reduction.data_grad(self.clone().into(), cx, dy)?);
        }
        if cx.needs.get(2).copied().unwrap_or(false) {
            grads[2] = Some(cx.b.emit(GatherNd { batch_dims: 0 }, &[dy, indices])?);
        }
        Ok(grads)
    }

    fn eval(&self, inputs: &[&Tensor]) -> Result<Vec<Tensor>, OpError> {
        let tys: Vec<TensorType> = inputs.iter().map(|t| t.ty()).collect();
        let out = self.infer(&tys.iter().collect::<Vec<_>>())?.remove(0);
        let (data, indices, updates) = (inputs[0], inputs[1], inputs[2]);
        let q = indices.rank();
        let k = indices.shape[q - 1];
        let inner: usize = data.shape[k..].iter().product();
        let st = data.strides();
        let mut values = data.data.clone();
        let mut p = 0;
        let mut err = None;
        for_each_index(&indices.shape[..q - 1], |_| {
            let coords = &indices.data[p * k..(p + 1) * k];
            match block_offset(&data.shape, &st, &[], coords) {
                Ok(off) => {
                    for t in 0..inner {
                        let u = updates.data[p * inner + t];
                        values[off + t] = self.reduction.apply(values[off + t], u);
                    }
                }
                Err(e) => {
                    err.get_or_insert(e);
                }
            }
            p += 1;
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
    use crate::dtype::DType;
    use crate::ops::gradcheck::{check, rand_tensor};

    fn op(reduction: ScatterReduction) -> ScatterNd {
        ScatterNd { reduction }
    }

    #[test]
    fn rejects_bad_updates() {
        let data = TensorType::new(DType::F32, [4, 3]);
        let idx = TensorType::new(DType::I64, [2, 1]);
        let upd = TensorType::new(DType::F32, [2, 4]);
        let e = op(ScatterReduction::None)
            .infer(&[&data, &idx, &upd])
            .expect_err("rows of 3");
        assert!(e.0.contains("[2, 3]"), "{e}");
        let fidx = TensorType::new(DType::F32, [2, 1]);
        let upd = TensorType::new(DType::F32, [2, 3]);
        assert!(op(ScatterReduction::None)
            .infer(&[&data, &fidx, &upd])
            .is_err());
    }

    #[test]
    fn maps_dims() {
        let data = TensorType::new(DType::F32, [4, 3]);
        let idx = TensorType::new(DType::I64, [2, 1]);
        let upd = TensorType::new(DType::F32, [2, 3]);
        let m = op(ScatterReduction::Add).dims(&[&data, &idx, &upd], &[&data]);
        assert_eq!(m.to_einsum(), "Ab,C_,Cb->Ab");
    }

    #[test]
    fn evaluates_onnx_example() {
        // ONNX ScatterND example 1
        let data = Tensor::new(DType::F64, vec![8], (1..=8).map(f64::from).collect());
        let idx = Tensor::from_i64([4, 1], &[4, 3, 1, 7]);
        let upd = Tensor::new(DType::F64, vec![4], vec![9.0, 10.0, 11.0, 12.0]);
        let y = op(ScatterReduction::None)
            .eval(&[&data, &idx, &upd])
            .expect("eval")
            .remove(0);
        assert_eq!(y.data, vec![1.0, 11.0, 3.0, 10.0, 9.0, 6.0, 7.0, 12.0]);
        let idx = Tensor::from_i64([2, 1], &[-1, 7]);
        let upd = Tensor::new(DType::F64, vec![2], vec![1.0, 2.0]);
        let y = op(ScatterReduction::Add)
            .eval(&[&data, &idx, &upd])
            .expect("eval")
            .remove(0);
        assert_eq!(y.data[7], 11.0);
        let bad = Tensor::from_i64([2, 1], &[8, 0]);
        assert!(op(ScatterReduction::Add)
            .eval(&[&data, &bad, &upd])
            .is_err());
    }

    #[test]
    fn vjp_matches_finite_differences() {
        let idx = Tensor::from_i64([2, 2], &[0, 1, 2, -1]);
        for r in [ScatterReduction::None, ScatterReduction::Add] {
            check(
                op(r),
                &[
                    rand_tensor(&[3, 2, 2], 1),
                    idx.clone(),
                    rand_tensor(&[2, 2], 2),
                ],
                1e-6,
            );
        }
        let idx = Tensor::from_i64([3, 1], &[1, 0, 1]);
        check(
            op(ScatterReduction::Add),
            &[rand_tensor(&[2, 3], 3), idx, rand_tensor(&[3, 3], 4)],
            1e-6,
        );
    }
}
