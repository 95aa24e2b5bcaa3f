//! `scatter_elements`: ONNX `ScatterElements` (mixture-of-experts routing writes, T5's bucket
//! tables). `out = data`, then for every position `i` of `indices`,
//! `out[i with i[axis] = indices[i]] (op)= updates[i]`.
//!
//! Dim map: data and output share every axis; the scattered axis is whole; the other dims of
//! `indices` / `updates` join the data's axis where their size matches (else they are whole).
//!
//! Gradients exist for reduction `none` and `add`: `d data` is `dy` with the overwritten
//! positions zeroed (`none`, a scatter of zeros) or `dy` itself (`add`); `d updates` reads `dy`
//! back at the scattered positions, a [`GatherNd`](super::GatherNd) over index tuples built from
//! explicit coordinates. With `none` and duplicate indices ONNX leaves the winner undefined;
//! the gradient then credits every duplicate.

use super::gather_nd::coordinates;
use super::*;
use crate::dtype::TensorType;
use crate::error::OpError;
use crate::graph::ValueId;
use crate::op_err;
use crate::tensor::{for_each_index, Tensor};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
/// ONNX ScatterElements: inputs `data, indices, updates`.
pub struct ScatterElements {
    pub axis: usize,
    pub reduction: ScatterReduction,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScatterReduction {
    None,
    Add,
    Mul,
    Max,
    Min,
}

impl ScatterReduction {
    /// Cost shared by the scatter ops: one flop per update when reducing, plus the bytes.
    pub(crate) fn scatter_cost(self, inputs: &[&TensorType], outputs: &[&TensorType]) -> Cost {
        let flops = match self {
            ScatterReduction::None => 0.0,
            _ => inputs.get(2).map_or(0, |t| t.numel()) as f64,
        };
        Cost::memory_bound(inputs, outputs, flops)
    }

    /// Gradient w.r.t. `data` shared by the scatter ops (`op` is the scatter itself): with no
    /// reduction the overwritten positions get none (scatter zeros there), with `add` it
    /// passes through.
    pub(crate) fn data_grad(self, op: Op, cx: &mut VjpCtx<'_>, dy: ValueId) -> Result<ValueId, OpError> {
        match self {
            ScatterReduction::None => {
                let z = cx.b.zeros(&cx.ty(cx.inputs[2]))?;
                cx.b.emit(op, &[dy, cx.inputs[1], z])
            }
            _ => Ok(dy),
        }
    }
    /// The value at a target after one update.
    pub fn apply(self, current: f64, update: f64) -> f64 {
        match self {
            ScatterReduction::None => update,
            ScatterReduction::Add => current + update,
            ScatterReduction::Mul => current * update,
            ScatterReduction::Max => current.max(update),
            ScatterReduction::Min => current.min(update),
        }
    }
    /// Errors for the reductions whose gradient is not implemented.
    pub(crate) fn check_differentiable(self, op: &str) -> Result<(), OpError> {
        match self {
            ScatterReduction::None | ScatterReduction::Add => Ok(()),
            r => Err(op_err!(
                "{op} with reduction {r:?} has no gradient (only none and add are supported)"
            )),
        }
    }
}

impl OpSpec for ScatterElements {
    fn infer(&self, inputs: &[&TensorType]) -> Result<Vec<TensorType>, OpError> {
        let [data, indices, updates] = inputs else {
            return Err(op_err!(
                "scatter_elements takes 3 inputs (data, indices, updates), got {}",
                inputs.len()
            ));
        };
        if !indices.dtype.is_int() {
            return Err(op_err!("indices must be integer, got {}", indices.dtype));
        }
        if updates.dtype != data.dtype {
            return Err(op_err!(
                "updates are {}, data is {}",
                updates.dtype,
                data.dtype
            ));
        }
        if updates.shape != indices.shape {
            return Err(op_err!(
                "updates {updates} and indices {indices} differ in shape"
            ));
        }
        if self.axis >= data.rank() {
            return Err(op_err!(
                "axis {} is out of range for rank-{} data",
                self.axis,
                data.rank()
            ));
        }
        let fits = indices.rank() == data.rank()
            && (0..data.rank()).all(|d| d == self.axis || indices.shape[d] <= data.shape[d]);
        if !fits {
            return Err(op_err!(
                "indices {indices} must have the rank of data {data} and no larger dims outside axis {}",
                self.axis
            ));
        }
        Ok(vec![(*data).clone()])
    }

    fn dims(&self, inputs: &[&TensorType], outputs: &[&TensorType]) -> DimMap {
        if self.infer(inputs).is_err() {
            return DimMap::opaque(inputs, outputs);
        }
        let (data, indices) = (inputs[0], inputs[1]);
        let mut axes: Vec<Axis> = data
            .shape
            .iter()
            .map(|&size| Axis {
                size,
                kind: AxisKind::Parallel,
            })
            .collect();
        axes[self.axis].kind = AxisKind::Whole;
        let data_map: Vec<Option<AxisId>> = (0..data.rank()).map(Some).collect();
        let index_map: Vec<Option<AxisId>> = (0..indices.rank())
            .map(|d| {
                if d != self.axis && indices.shape[d] == data.shape[d] {
                    Some(d)
                } else {
                    axes.push(Axis {
                        size: indices.shape[d],
                        kind: AxisKind::Whole,
                    });
                    Some(axes.len() - 1)
                }
            })
            .collect();
        DimMap {
            axes,
            inputs: vec![data_map.clone(), index_map.clone(), index_map],
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
        self.reduction.check_differentiable("scatter_elements")?;
        let indices = cx.inputs[1];
        if cx.needs.first().copied().unwrap_or(false) {
            grads[0] = Some(self.reduction.data_grad(self.clone().into(), cx, dy)?);
        }
        if cx.needs.get(2).copied().unwrap_or(false) {
            // index tuples: the coordinates of each position, with `indices` along `axis`
            let it = cx.ty(indices);
            let r = it.rank();
            let mut parts = vec![];
            for d in 0..r {
                parts.push(if d == self.axis {
                    let mut col = it.shape.clone();
                    col.push(1);
                    cx.b.emit(Reshape::new(col), &[indices])?
                } else {
                    coordinates(cx.b, it.dtype, &it.shape, d)?
                });
            }
            let tuples = cx.b.emit(Concat { axis: r }, &parts)?;
            grads[2] = Some(cx.b.emit(GatherNd { batch_dims: 0 }, &[dy, tuples])?);
        }
        Ok(grads)
    }

    fn eval(&self, inputs: &[&Tensor]) -> Result<Vec<Tensor>, OpError> {
        let tys: Vec<TensorType> = inputs.iter().map(|t| t.ty()).collect();
        let out = self.infer(&tys.iter().collect::<Vec<_>>())?.remove(0);
        let (data, indices, updates) = (inputs[0], inputs[1], inputs[2]);
        let st = data.strides();
        let dim = data.shape[self.axis];
        let mut values = data.data.clone();
        let mut k = 0;
        let mut err = None;
        for_each_index(&indices.shape, |idx| {
            match super::gather::normalize_index(indices.data[k], dim) {
                Ok(j) => {
                    let off: usize = idx
                        .iter()
                        .enumerate()
                        .map(|(d, &i)| if d == self.axis { j } else { i } * st[d])
                        .sum();
                    values[off] = self.reduction.apply(values[off], updates.data[k]);
                }
                Err(e) => {
                    err.get_or_insert(e);
                }
            }
            k += 1;
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

    fn op(axis: usize, reduction: ScatterReduction) -> ScatterElements {
        ScatterElements { axis, reduction }
    }

    #[test]
    fn rejects_bad_inputs() {
        let data = TensorType::new(DType::F32, [3, 3]);
        let idx = TensorType::new(DType::I64, [2, 3]);
        let upd = TensorType::new(DType::F32, [2, 3]);
        let fidx = TensorType::new(DType::F32, [2, 3]);
        let e = op(0, ScatterReduction::None)
            .infer(&[&data, &fidx, &upd])
            .expect_err("float idx");
        assert!(e.0.contains("integer"), "{e}");
        let upd2 = TensorType::new(DType::F32, [2, 2]);
        assert!(op(0, ScatterReduction::None)
            .infer(&[&data, &idx, &upd2])
            .is_err());
        assert!(op(2, ScatterReduction::None)
            .infer(&[&data, &idx, &upd])
            .is_err());
        let big = TensorType::new(DType::I64, [2, 4]);
        let bigu = TensorType::new(DType::F32, [2, 4]);
        assert!(op(0, ScatterReduction::None)
            .infer(&[&data, &big, &bigu])
            .is_err());
    }

    #[test]
    fn maps_dims() {
        let data = TensorType::new(DType::F32, [4, 5]);
        let idx = TensorType::new(DType::I64, [2, 5]);
        let upd = TensorType::new(DType::F32, [2, 5]);
        let m = op(0, ScatterReduction::Add).dims(&[&data, &idx, &upd], &[&data]);
        assert_eq!(m.to_einsum(), "Ab,Cb,Cb->Ab");
        let idx = TensorType::new(DType::I64, [4, 2]);
        let upd = TensorType::new(DType::F32, [4, 2]);
        let m = op(1, ScatterReduction::Add).dims(&[&data, &idx, &upd], &[&data]);
        assert_eq!(m.to_einsum(), "aB,aC,aC->aB");
    }

    #[test]
    fn evaluates_onnx_examples() {
        // ONNX ScatterElements example 1
        let data = Tensor::full(DType::F64, vec![3, 3], 0.0);
        let idx = Tensor::from_i64([2, 3], &[1, 0, 2, 0, 2, 1]);
        let upd = Tensor::new(DType::F64, vec![2, 3], vec![1.0, 1.1, 1.2, 2.0, 2.1, 2.2]);
        let y = op(0, ScatterReduction::None)
            .eval(&[&data, &idx, &upd])
            .expect("eval")
            .remove(0);
        assert_eq!(y.data, vec![2.0, 1.1, 0.0, 1.0, 0.0, 2.2, 0.0, 2.1, 1.2]);
        // example 2 with a negative index and add
        let data = Tensor::new(DType::F64, vec![1, 5], vec![1.0, 2.0, 3.0, 4.0, 5.0]);
        let idx = Tensor::from_i64([1, 2], &[1, -2]);
        let upd = Tensor::new(DType::F64, vec![1, 2], vec![1.5, 2.25]);
        let y = op(1, ScatterReduction::Add)
            .eval(&[&data, &idx, &upd])
            .expect("eval")
            .remove(0);
        assert_eq!(y.data, vec![1.0, 3.5, 3.0, 6.25, 5.0]);
        let y = op(1, ScatterReduction::Max)
            .eval(&[&data, &idx, &upd])
            .expect("eval")
            .remove(0);
        assert_eq!(y.data, vec![1.0, 2.0, 3.0, 4.0, 5.0]);
    }

    #[test]
    fn vjp_matches_finite_differences() {
        let idx = Tensor::from_i64([2, 3], &[1, 0, 2, 0, 2, -3]);
        for r in [ScatterReduction::None, ScatterReduction::Add] {
            check(
                op(0, r),
                &[
                    rand_tensor(&[3, 4], 1),
                    idx.clone(),
                    rand_tensor(&[2, 3], 2),
                ],
                1e-6,
            );
        }
        let idx = Tensor::from_i64([2, 2], &[3, 0, 1, 1]);
        check(
            op(1, ScatterReduction::Add),
            &[rand_tensor(&[2, 4], 3), idx, rand_tensor(&[2, 2], 4)],
            1e-6,
        );
    }

    #[test]
    fn mul_has_no_gradient() {
        let mut b = crate::builder::GraphBuilder::new();
        let d = b.input("d", TensorType::new(DType::F64, [2]));
        let i = b.input("i", TensorType::new(DType::I64, [1]));
        let u = b.input("u", TensorType::new(DType::F64, [1]));
        let s = op(0, ScatterReduction::Mul);
        let y = b.node(s.clone(), &[d, i, u]).expect("node");
        let g = b.scalar(DType::F64, 1.0);
        let g = b.expand(g, &[2]).expect("expand");
        let mut cx = VjpCtx {
            b: &mut b,
            inputs: &[d, i, u],
            outputs: &y,
            grads: &[Some(g)],
            needs: &[true, false, true],
        };
        let e = s.vjp(&mut cx).expect_err("mul");
        assert!(e.0.contains("Mul"), "{e}");
    }
}
