//! `concat`: joins its inputs along one axis (ONNX `Concat`; rotary embeddings, KV caches).
//! The joined axis is whole on every operand (a shard of the output would mix operands); the
//! other dims carry one axis through all operands. The vjp slices `dy` back into the parts.

use super::*;
use crate::dtype::TensorType;
use crate::error::{AnalyzerError, OpError};
use crate::graph::ValueId;
use crate::op_err;
use crate::tensor::{for_each_index, Tensor};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
/// Concatenation of all inputs along `axis`.
pub struct Concat {
    pub axis: usize,
}

impl OpSpec for Concat {
    fn infer(&self, inputs: &[&TensorType]) -> Result<Vec<TensorType>, OpError> {
        let Some(first) = inputs.first() else {
            return Err(op_err!("concat needs at least one input"));
        };
        if self.axis >= first.rank() {
            return Err(op_err!(
                "axis {} is out of range for rank-{} inputs",
                self.axis,
                first.rank()
            ));
        }
        let mut shape = first.shape.clone();
        for (i, t) in inputs.iter().enumerate().skip(1) {
            if t.dtype != first.dtype {
                return Err(op_err!(
                    "input {i} is {}, input 0 is {}",
                    t.dtype,
                    first.dtype
                ));
            }
            let same_dims = t.rank() == first.rank()
                && (0..t.rank()).all(|d| d == self.axis || t.shape[d] == first.shape[d]);
            if !same_dims {
                return Err(op_err!(
                    "input {i} {t} does not match input 0 {first} outside axis {}",
                    self.axis
                ));
            }
            shape[self.axis] = shape[self.axis]
                .checked_add(t.shape[self.axis])
                .ok_or_else(|| op_err!("concatenated axis overflows"))?;
        }
        Ok(vec![TensorType::new(first.dtype, shape)])
    }

    fn dims(&self, inputs: &[&TensorType], outputs: &[&TensorType]) -> DimMap {
        let Some(y) = outputs.first() else {
            return DimMap::opaque(inputs, outputs);
        };
        if self.axis >= y.rank() || inputs.iter().any(|t| t.rank() != y.rank()) {
            return DimMap::opaque(inputs, outputs);
        }
        let mut axes: Vec<Axis> = y
            .shape
            .iter()
            .map(|&size| Axis {
                size,
                kind: AxisKind::Parallel,
            })
            .collect();
        axes[self.axis].kind = AxisKind::Whole;
        let mut map = |t: &TensorType, own: bool| -> Vec<Option<AxisId>> {
            (0..t.rank())
                .map(|d| {
                    if d == self.axis && own {
                        axes.push(Axis {
                            size: t.shape[d],
                            kind: AxisKind::Whole,
                        });
                        Some(axes.len() - 1)
                    } else {
                        Some(d)
                    }
                })
                .collect()
        };
        let outputs = vec![map(y, false)];
        let inputs = inputs.iter().map(|t| map(t, true)).collect();
        DimMap {
            axes,
            inputs,
            outputs,
        }
    }

    fn cost(&self, inputs: &[&TensorType], outputs: &[&TensorType]) -> Cost {
        Cost::data_movement(inputs, outputs)
    }

    fn vjp(&self, cx: &mut VjpCtx<'_>) -> Result<Vec<Option<ValueId>>, OpError> {
        let Some(dy) = cx.grads.first().copied().flatten() else {
            return Ok(vec![None; cx.inputs.len()]);
        };
        let mut grads = vec![None; cx.inputs.len()];
        let mut offset = 0;
        for (i, grad) in grads.iter_mut().enumerate() {
            let len = cx
                .input_ty(i)
                .shape
                .get(self.axis)
                .copied()
                .ok_or_else(|| op_err!("input {i} has no axis {}", self.axis))?;
            if cx.needs.get(i).copied().unwrap_or(false) {
                *grad = Some(cx.b.emit(Slice::range(self.axis, offset, offset + len), &[dy])?);
            }
            offset += len;
        }
        Ok(grads)
    }

    fn eval(&self, inputs: &[&Tensor]) -> Result<Vec<Tensor>, OpError> {
        let tys: Vec<TensorType> = inputs.iter().map(|t| t.ty()).collect();
        let out = self.infer(&tys.iter().collect::<Vec<_>>())?.remove(0);
        let mut data = vec![0.0; out.numel()];
        let out_st = Tensor::strides_of(&out.shape);
        let mut offset = 0;
        for t in inputs {
            let mut k = 0;
            for_each_index(&t.shape, |idx| {
                let o: usize = idx
                    .iter()
                    .enumerate()
                    .map(|(d, &i)| (if d == self.axis { i + offset } else { i }) * out_st[d])
                    .sum();
                data[o] = t.data[k];
                k += 1;
            });
            offset += t.shape[self.axis];
        }
        Ok(vec![Tensor::new(out.dtype, out.shape, data)])
    }
}

impl crate::builder::GraphBuilder {
    /// `parts` joined along `axis`.
    pub fn concat(&mut self, parts: &[ValueId], axis: usize) -> Result<ValueId, AnalyzerError> {
        self.node1(Concat { axis }, parts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::DType;
    use crate::ops::gradcheck::{check, rand_tensor};

    #[test]
    fn rejects_mismatches() {
        let a = TensorType::new(DType::F32, [2, 3]);
        let b = TensorType::new(DType::F32, [3, 3]);
        let e = Concat { axis: 1 }
            .infer(&[&a, &b])
            .expect_err("dim 0 differs");
        assert!(e.0.contains("does not match"), "{e}");
        assert!(Concat { axis: 2 }.infer(&[&a, &a]).is_err());
        let c = TensorType::new(DType::F64, [2, 3]);
        assert!(Concat { axis: 0 }.infer(&[&a, &c]).is_err());
        assert!(Concat { axis: 0 }.infer(&[]).is_err());
    }

    #[test]
    fn infers_and_maps_dims() {
        let a = TensorType::new(DType::F32, [2, 3]);
        let b = TensorType::new(DType::F32, [2, 5]);
        let y = Concat { axis: 1 }
            .infer(&[&a, &b])
            .expect("infer")
            .remove(0);
        assert_eq!(y.shape, vec![2, 8]);
        let m = Concat { axis: 1 }.dims(&[&a, &b], &[&y]);
        assert_eq!(m.to_einsum(), "aC,aD->aB");
    }

    #[test]
    fn evaluates_and_differentiates() {
        let a = Tensor::new(DType::F64, vec![2, 1], vec![1.0, 2.0]);
        let b = Tensor::new(DType::F64, vec![2, 2], vec![3.0, 4.0, 5.0, 6.0]);
        let y = Concat { axis: 1 }.eval(&[&a, &b]).expect("eval").remove(0);
        assert_eq!(y.data, vec![1.0, 3.0, 4.0, 2.0, 5.0, 6.0]);
        check(
            Concat { axis: 1 },
            &[
                rand_tensor(&[2, 3, 2], 1),
                rand_tensor(&[2, 1, 2], 2),
                rand_tensor(&[2, 2, 2], 3),
            ],
            1e-6,
        );
    }
}
