//! `pad`: constant padding (ONNX `Pad` in constant mode; slice's vjp). A padded dim is whole
//! (the border belongs to the first and last shard only); the vjp slices the border off `dy`.

use super::*;
use crate::dtype::TensorType;
use crate::error::{AnalyzerError, OpError};
use crate::graph::ValueId;
use crate::op_err;
use crate::tensor::{for_each_index, Tensor};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
/// Constant padding: `pads[d] = [before, after]` for every dim.
pub struct Pad {
    pub pads: Vec<[usize; 2]>,
    pub value: f64,
}

impl OpSpec for Pad {
    fn infer(&self, inputs: &[&TensorType]) -> Result<Vec<TensorType>, OpError> {
        let [x] = inputs else {
            return Err(op_err!("pad takes 1 input, got {}", inputs.len()));
        };
        if self.pads.len() != x.rank() {
            return Err(op_err!(
                "{} [before, after] pairs for a rank-{} input",
                self.pads.len(),
                x.rank()
            ));
        }
        let shape = x
            .shape
            .iter()
            .zip(&self.pads)
            .map(|(&d, &[b, a])| d.checked_add(b).and_then(|n| n.checked_add(a)))
            .collect::<Option<Vec<usize>>>()
            .ok_or_else(|| op_err!("padded shape overflows"))?;
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
        let mut s = Slice {
            axes: vec![],
            starts: vec![],
            ends: vec![],
            steps: vec![],
        };
        for (d, (&n, &[before, after])) in x.shape.iter().zip(&self.pads).enumerate() {
            if before + after > 0 {
                s.axes.push(d);
                s.starts.push(before);
                s.ends.push(before + n);
                s.steps.push(1);
            }
        }
        if s.axes.is_empty() {
            return Ok(vec![Some(dy)]);
        }
        Ok(vec![Some(cx.b.emit(s, &[dy])?)])
    }

    fn eval(&self, inputs: &[&Tensor]) -> Result<Vec<Tensor>, OpError> {
        let tys: Vec<TensorType> = inputs.iter().map(|t| t.ty()).collect();
        let out = self.infer(&tys.iter().collect::<Vec<_>>())?.remove(0);
        let x = inputs[0];
        let mut data = vec![self.value; out.numel()];
        let out_st = Tensor::strides_of(&out.shape);
        let mut k = 0;
        for_each_index(&x.shape, |idx| {
            let o: usize = idx
                .iter()
                .zip(&self.pads)
                .zip(&out_st)
                .map(|((&i, p), &s)| (i + p[0]) * s)
                .sum();
            data[o] = x.data[k];
            k += 1;
        });
        Ok(vec![Tensor::new(out.dtype, out.shape, data)])
    }
}

impl crate::builder::GraphBuilder {
    /// `x` padded with `value`: `pads[d] = [before, after]` for every dim.
    pub fn pad(
        &mut self,
        x: ValueId,
        pads: &[[usize; 2]],
        value: f64,
    ) -> Result<ValueId, AnalyzerError> {
        self.node1(
            Pad {
                pads: pads.to_vec(),
                value,
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
    fn rejects_wrong_pads() {
        let x = TensorType::new(DType::F32, [2, 3]);
        let op = Pad {
            pads: vec![[0, 1]],
            value: 0.0,
        };
        let e = op.infer(&[&x]).expect_err("one pair for rank 2");
        assert!(e.0.contains("rank-2"), "{e}");
        let op = Pad {
            pads: vec![[0, 0], [usize::MAX, 1]],
            value: 0.0,
        };
        assert!(op.infer(&[&x]).is_err());
    }

    #[test]
    fn infers_maps_and_evaluates() {
        let op = Pad {
            pads: vec![[0, 0], [1, 2]],
            value: -1.0,
        };
        let x = Tensor::new(DType::F64, vec![2, 1], vec![5.0, 6.0]);
        let y = op.eval(&[&x]).expect("eval").remove(0);
        assert_eq!(y.shape, vec![2, 4]);
        assert_eq!(y.data, vec![-1.0, 5.0, -1.0, -1.0, -1.0, 6.0, -1.0, -1.0]);
        assert_eq!(op.dims(&[&x.ty()], &[&y.ty()]).to_einsum(), "aB->aC");
    }

    #[test]
    fn vjp_matches_finite_differences() {
        let op = Pad {
            pads: vec![[1, 0], [0, 0], [2, 1]],
            value: 3.0,
        };
        check(op, &[rand_tensor(&[2, 2, 3], 1)], 1e-6);
    }
}
