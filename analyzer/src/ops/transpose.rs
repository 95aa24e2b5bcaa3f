//! `transpose`: a permutation of dims (ONNX `Transpose`; attention's head moves). Every dim
//! keeps its axis under the permutation, so any sharding passes through without communication;
//! only the runtime's copy costs.

use super::*;
use crate::dtype::TensorType;
use crate::error::{AnalyzerError, OpError};
use crate::graph::ValueId;
use crate::op_err;
use crate::tensor::{for_each_index, Tensor};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
/// Permutes dims: output dim `i` is input dim `perm[i]`.
pub struct Transpose {
    pub perm: Vec<usize>,
}

impl Transpose {
    pub fn new(perm: impl Into<Vec<usize>>) -> Self {
        Transpose { perm: perm.into() }
    }
    /// The permutation that undoes this one.
    pub fn inverse(&self) -> Transpose {
        let mut inv = vec![0; self.perm.len()];
        for (i, &p) in self.perm.iter().enumerate() {
            if let Some(slot) = inv.get_mut(p) {
                *slot = i;
            }
        }
        Transpose { perm: inv }
    }
    fn check(&self, rank: usize) -> Result<(), OpError> {
        if self.perm.len() != rank {
            return Err(op_err!(
                "perm {:?} has {} entries for a rank-{rank} input",
                self.perm,
                self.perm.len()
            ));
        }
        let mut seen = vec![false; rank];
        for &p in &self.perm {
            match seen.get_mut(p) {
                Some(s) if !*s => *s = true,
                _ => {
                    return Err(op_err!(
                        "perm {:?} is not a permutation of 0..{rank}",
                        self.perm
                    ))
                }
            }
        }
        Ok(())
    }
}

impl OpSpec for Transpose {
    fn infer(&self, inputs: &[&TensorType]) -> Result<Vec<TensorType>, OpError> {
        let [x] = inputs else {
            return Err(op_err!("transpose takes 1 input, got {}", inputs.len()));
        };
        self.check(x.rank())?;
        let shape: Vec<usize> = self.perm.iter().map(|&p| x.shape[p]).collect();
        Ok(vec![TensorType::new(x.dtype, shape)])
    }

    fn dims(&self, inputs: &[&TensorType], outputs: &[&TensorType]) -> DimMap {
        let Some(x) = inputs.first() else {
            return DimMap::opaque(inputs, outputs);
        };
        if self.check(x.rank()).is_err() {
            return DimMap::opaque(inputs, outputs);
        }
        DimMap {
            axes: x
                .shape
                .iter()
                .map(|&size| Axis {
                    size,
                    kind: AxisKind::Parallel,
                })
                .collect(),
            inputs: vec![(0..x.rank()).map(Some).collect()],
            outputs: vec![self.perm.iter().map(|&p| Some(p)).collect()],
        }
    }

    fn cost(&self, inputs: &[&TensorType], outputs: &[&TensorType]) -> Cost {
        Cost::data_movement(inputs, outputs)
    }

    fn vjp(&self, cx: &mut VjpCtx<'_>) -> Result<Vec<Option<ValueId>>, OpError> {
        match (cx.grads.first().copied().flatten(), cx.needs.first()) {
            (Some(dy), Some(true)) => Ok(vec![Some(cx.b.emit(self.inverse(), &[dy])?)]),
            _ => Ok(vec![None; cx.inputs.len()]),
        }
    }

    fn eval(&self, inputs: &[&Tensor]) -> Result<Vec<Tensor>, OpError> {
        let tys: Vec<TensorType> = inputs.iter().map(|t| t.ty()).collect();
        let out = self.infer(&tys.iter().collect::<Vec<_>>())?.remove(0);
        let x = inputs[0];
        let st = x.strides();
        let mut data = Vec::with_capacity(out.numel());
        for_each_index(&out.shape, |idx| {
            let off: usize = idx.iter().zip(&self.perm).map(|(&i, &p)| i * st[p]).sum();
            data.push(x.data[off]);
        });
        Ok(vec![Tensor::new(out.dtype, out.shape, data)])
    }
}

impl crate::builder::GraphBuilder {
    /// `x` with its dims permuted: output dim `i` is input dim `perm[i]`.
    pub fn transpose(&mut self, x: ValueId, perm: &[usize]) -> Result<ValueId, AnalyzerError> {
        self.node1(Transpose::new(perm), &[x])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::DType;
    use crate::ops::gradcheck::{check, rand_tensor};

    #[test]
    fn rejects_bad_perms() {
        let x = TensorType::new(DType::F32, [2, 3, 4]);
        for perm in [vec![0, 1], vec![0, 1, 1], vec![0, 1, 3]] {
            let e = Transpose::new(perm.clone())
                .infer(&[&x])
                .expect_err("bad perm");
            assert!(e.0.contains("perm"), "{perm:?}: {e}");
        }
    }

    #[test]
    fn infers_and_maps_dims() {
        let x = TensorType::new(DType::F32, [2, 3, 4, 5]);
        let op = Transpose::new([0, 2, 1, 3]);
        let y = op.infer(&[&x]).expect("infer").remove(0);
        assert_eq!(y.shape, vec![2, 4, 3, 5]);
        assert_eq!(op.dims(&[&x], &[&y]).to_einsum(), "abcd->acbd");
    }

    #[test]
    fn evaluates_and_differentiates() {
        let x = Tensor::new(DType::F64, vec![2, 3], (0..6).map(f64::from).collect());
        let y = Transpose::new([1, 0]).eval(&[&x]).expect("eval").remove(0);
        assert_eq!(y.shape, vec![3, 2]);
        assert_eq!(y.data, vec![0.0, 3.0, 1.0, 4.0, 2.0, 5.0]);
        check(
            Transpose::new([2, 0, 1]),
            &[rand_tensor(&[2, 3, 4], 1)],
            1e-6,
        );
    }
}
