//! `reduce`: Sum, Mean, Max or Min over a list of axes (ONNX ReduceSum, ReduceMean, ReduceMax,
//! ReduceMin, GlobalAveragePool after flattening, and the gradient of every broadcast).
//!
//! Axes are explicit, sorted and distinct; an empty list reduces nothing (the output is the
//! input), so importers turn ONNX's "no axes = all axes" into the full list. The dim map says how
//! a split reduced axis is finished: Sum and Mean leave a partial sum on each device (the axis is
//! `Contracted`: an all-reduce completes it, for Mean after the local means are weighted by the
//! shard sizes); Max and Min would need a max-all-reduce, which the strategy vocabulary has no
//! word for, so their axes are `Whole`.

use super::*;
use crate::dtype::{DType, TensorType};
use crate::error::{AnalyzerError, OpError};
use crate::graph::ValueId;
use crate::op_err;
use crate::ops::binary::{bin, cast_to, scale, BinaryKind};
use crate::tensor::Tensor;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
/// Reduction over `axes` (sorted, distinct, non-negative).
pub struct Reduce {
    pub kind: ReduceKind,
    pub axes: Vec<usize>,
    pub keepdims: bool,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReduceKind {
    Sum,
    Mean,
    Max,
    Min,
}

impl Reduce {
    pub fn new(kind: ReduceKind, axes: impl Into<Vec<usize>>, keepdims: bool) -> Self {
        Reduce {
            kind,
            axes: axes.into(),
            keepdims,
        }
    }

    /// Checks the axes against a rank.
    fn check_axes(&self, rank: usize) -> Result<(), OpError> {
        for (i, &a) in self.axes.iter().enumerate() {
            if a >= rank {
                return Err(op_err!("axis {a} is out of range for rank {rank}"));
            }
            if i > 0 && self.axes[i - 1] >= a {
                return Err(op_err!("axes {:?} must be sorted and distinct", self.axes));
            }
        }
        Ok(())
    }

    /// The input shape with every reduced dim set to 1.
    fn kept_shape(&self, shape: &[usize]) -> Vec<usize> {
        shape
            .iter()
            .enumerate()
            .map(|(d, &n)| if self.axes.contains(&d) { 1 } else { n })
            .collect()
    }

    /// Number of input elements folded into each output element.
    fn count(&self, shape: &[usize]) -> usize {
        self.axes
            .iter()
            .map(|&a| shape.get(a).copied().unwrap_or(1))
            .product()
    }
}

impl OpSpec for Reduce {
    fn infer(&self, inputs: &[&TensorType]) -> Result<Vec<TensorType>, OpError> {
        let [x] = inputs else {
            return Err(op_err!("takes 1 input, got {}", inputs.len()));
        };
        self.check_axes(x.rank())?;
        if x.dtype == DType::Bool && matches!(self.kind, ReduceKind::Sum | ReduceKind::Mean) {
            return Err(op_err!("{:?} of a bool tensor: cast it first", self.kind));
        }
        let shape: Vec<usize> = if self.keepdims {
            self.kept_shape(&x.shape)
        } else {
            x.shape
                .iter()
                .enumerate()
                .filter(|(d, _)| !self.axes.contains(d))
                .map(|(_, &n)| n)
                .collect()
        };
        Ok(vec![TensorType::new(x.dtype, shape)])
    }

    fn dims(&self, inputs: &[&TensorType], outputs: &[&TensorType]) -> DimMap {
        let Some(x) = inputs.first() else {
            return DimMap::opaque(inputs, outputs);
        };
        if self.check_axes(x.rank()).is_err() {
            return DimMap::opaque(inputs, outputs);
        }
        let reduced_kind = match self.kind {
            ReduceKind::Sum | ReduceKind::Mean => AxisKind::Contracted,
            ReduceKind::Max | ReduceKind::Min => AxisKind::Whole,
        };
        let axes = x
            .shape
            .iter()
            .enumerate()
            .map(|(d, &size)| Axis {
                size,
                kind: if self.axes.contains(&d) {
                    reduced_kind
                } else {
                    AxisKind::Parallel
                },
            })
            .collect();
        let out: Vec<Option<AxisId>> = (0..x.rank())
            .filter_map(|d| match (self.axes.contains(&d), self.keepdims) {
                (false, _) => Some(Some(d)),
                (true, true) => Some(None),
                (true, false) => None,
            })
            .collect();
        DimMap {
            axes,
            inputs: vec![(0..x.rank()).map(Some).collect()],
            outputs: vec![out],
        }
    }

    fn cost(&self, inputs: &[&TensorType], outputs: &[&TensorType]) -> Cost {
        // one add / compare per input element, one division per output element for Mean
        let n_in: usize = inputs.iter().map(|t| t.numel()).sum();
        let n_out: usize = outputs.iter().map(|t| t.numel()).sum();
        let div = if self.kind == ReduceKind::Mean {
            n_out
        } else {
            0
        };
        Cost::memory_bound(inputs, outputs, (n_in + div) as f64)
    }

    fn vjp(&self, cx: &mut VjpCtx<'_>) -> Result<Vec<Option<ValueId>>, OpError> {
        let xt = cx.input_ty(0);
        let Some(dy) = cx.grads[0] else {
            return Ok(vec![None]);
        };
        if !cx.needs[0] || !xt.dtype.is_float() {
            return Ok(vec![None]);
        }
        if self.axes.is_empty() {
            return Ok(vec![Some(dy)]);
        }
        let kept = self.kept_shape(&xt.shape);
        let b = &mut *cx.b;
        let keep = |b: &mut GraphBuilder, v: ValueId| -> Result<ValueId, OpError> {
            if b.ty(v).shape == kept {
                Ok(v)
            } else {
                b.emit(
                    Reshape {
                        shape: kept.clone(),
                    },
                    &[v],
                )
            }
        };
        let dyk = keep(b, dy)?;
        let g = match self.kind {
            ReduceKind::Sum => b.emit(
                Expand {
                    shape: xt.shape.clone(),
                },
                &[dyk],
            )?,
            ReduceKind::Mean => {
                let n = self.count(&xt.shape).max(1);
                let s = scale(b, dyk, 1.0 / n as f64)?;
                b.emit(
                    Expand {
                        shape: xt.shape.clone(),
                    },
                    &[s],
                )?
            }
            ReduceKind::Max | ReduceKind::Min => {
                // every position equal to the extremum shares the gradient evenly
                let yk = keep(b, cx.outputs[0])?;
                let hit = bin(b, BinaryKind::Equal, cx.inputs[0], yk)?;
                let hit = cast_to(b, hit, xt.dtype)?;
                let ties = b.emit(
                    Reduce::new(ReduceKind::Sum, self.axes.clone(), true),
                    &[hit],
                )?;
                let share = bin(b, BinaryKind::Div, dyk, ties)?;
                bin(b, BinaryKind::Mul, hit, share)?
            }
        };
        Ok(vec![Some(g)])
    }

    fn eval(&self, inputs: &[&Tensor]) -> Result<Vec<Tensor>, OpError> {
        let tys: Vec<TensorType> = inputs.iter().map(|t| t.ty()).collect();
        let out = self.infer(&tys.iter().collect::<Vec<_>>())?.remove(0);
        let x = inputs[0];
        // output offset of each input element: strides of the kept shape, 0 on reduced dims
        let kept = self.kept_shape(&x.shape);
        let kst = Tensor::strides_of(&kept);
        let st: Vec<usize> = (0..x.rank())
            .map(|d| if self.axes.contains(&d) { 0 } else { kst[d] })
            .collect();
        let init = match self.kind {
            ReduceKind::Sum | ReduceKind::Mean => 0.0,
            ReduceKind::Max => f64::NEG_INFINITY,
            ReduceKind::Min => f64::INFINITY,
        };
        let mut acc = vec![init; out.numel()];
        let mut k = 0;
        crate::tensor::for_each_index(&x.shape, |idx| {
            let o: usize = idx.iter().zip(&st).map(|(i, s)| i * s).sum();
            let v = x.data[k];
            k += 1;
            acc[o] = match self.kind {
                ReduceKind::Sum | ReduceKind::Mean => acc[o] + v,
                ReduceKind::Max if v.is_nan() || v > acc[o] => v,
                ReduceKind::Min if v.is_nan() || v < acc[o] => v,
                ReduceKind::Max | ReduceKind::Min => acc[o],
            };
        });
        if self.kind == ReduceKind::Mean {
            let n = self.count(&x.shape) as f64;
            for v in &mut acc {
                *v /= n;
            }
        }
        Ok(vec![Tensor::new(out.dtype, out.shape, acc)])
    }
}

impl crate::builder::GraphBuilder {
    /// `kind` over `axes` (sorted, distinct).
    pub fn reduce(
        &mut self,
        kind: ReduceKind,
        x: ValueId,
        axes: &[usize],
        keepdims: bool,
    ) -> Result<ValueId, AnalyzerError> {
        self.node1(Reduce::new(kind, axes, keepdims), &[x])
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::ops::gradcheck::{check, rand_tensor};

    fn tt(shape: &[usize]) -> TensorType {
        TensorType::new(DType::F32, shape.to_vec())
    }

    #[test]
    fn infers_shapes_and_rejects_bad_axes() {
        let x = tt(&[2, 3, 4]);
        let r = Reduce::new(ReduceKind::Sum, [1], false);
        assert_eq!(r.infer(&[&x]).unwrap()[0].shape, vec![2, 4]);
        let r = Reduce::new(ReduceKind::Mean, [0, 2], true);
        assert_eq!(r.infer(&[&x]).unwrap()[0].shape, vec![1, 3, 1]);
        let r = Reduce::new(ReduceKind::Max, [0, 1, 2], false);
        assert_eq!(r.infer(&[&x]).unwrap()[0].shape, Vec::<usize>::new());
        let e = Reduce::new(ReduceKind::Sum, [3], false)
            .infer(&[&x])
            .unwrap_err();
        assert!(e.0.contains("axis 3 is out of range for rank 3"), "{e}");
        let e = Reduce::new(ReduceKind::Sum, [1, 0], false)
            .infer(&[&x])
            .unwrap_err();
        assert!(e.0.contains("sorted and distinct"), "{e}");
        let b = TensorType::new(DType::Bool, [2]);
        assert!(Reduce::new(ReduceKind::Sum, [0], false)
            .infer(&[&b])
            .is_err());
        assert!(Reduce::new(ReduceKind::Max, [0], false)
            .infer(&[&b])
            .is_ok());
    }

    #[test]
    fn dims_mark_reduced_axes() {
        let x = tt(&[2, 3, 4]);
        let map = |kind, keepdims| {
            let r = Reduce::new(kind, [1], keepdims);
            let out = r.infer(&[&x]).unwrap();
            r.dims(&[&x], &[&out[0]])
        };
        let s = map(ReduceKind::Sum, false);
        assert_eq!(s.to_einsum(), "abc->ac");
        assert_eq!(s.axes[1].kind, AxisKind::Contracted);
        assert_eq!(map(ReduceKind::Mean, true).to_einsum(), "abc->a_c");
        assert_eq!(map(ReduceKind::Max, false).to_einsum(), "aBc->ac");
        let c = Reduce::new(ReduceKind::Mean, [1], false).cost(&[&x], &[&tt(&[2, 4])]);
        assert_eq!(c.flops, 24.0 + 8.0);
    }

    #[test]
    fn evaluates() {
        let x = Tensor::new(DType::F64, vec![2, 3], vec![1.0, 5.0, 3.0, -2.0, 0.0, 4.0]);
        let run = |kind, axes: &[usize], keep| {
            Reduce::new(kind, axes, keep).eval(&[&x]).unwrap().remove(0)
        };
        assert_eq!(run(ReduceKind::Sum, &[1], false).data, vec![9.0, 2.0]);
        assert_eq!(run(ReduceKind::Mean, &[0], true).data, vec![-0.5, 2.5, 3.5]);
        assert_eq!(run(ReduceKind::Max, &[0, 1], false).data, vec![5.0]);
        assert_eq!(run(ReduceKind::Min, &[1], true).shape, vec![2, 1]);
        assert_eq!(run(ReduceKind::Min, &[1], true).data, vec![1.0, -2.0]);
        assert_eq!(run(ReduceKind::Sum, &[], false).data, x.data);
    }

    #[test]
    fn gradients_match_finite_differences() {
        let x = rand_tensor(&[2, 3, 4], 1);
        for kind in [
            ReduceKind::Sum,
            ReduceKind::Mean,
            ReduceKind::Max,
            ReduceKind::Min,
        ] {
            for (axes, keep) in [
                (&[1usize][..], false),
                (&[0, 2][..], true),
                (&[0, 1, 2][..], false),
            ] {
                check(
                    Reduce::new(kind, axes, keep),
                    std::slice::from_ref(&x),
                    1e-6,
                );
            }
        }
    }

    #[test]
    fn max_ties_share_the_gradient() {
        let mut b = GraphBuilder::new();
        let x = b.input("x", TensorType::new(DType::F64, [3]));
        let y = b.reduce(ReduceKind::Max, x, &[0], false).unwrap();
        let dy = b.scalar(DType::F64, 1.0);
        let mut cx = VjpCtx {
            b: &mut b,
            inputs: &[x],
            outputs: &[y],
            grads: &[Some(dy)],
            needs: &[true],
        };
        let g = Reduce::new(ReduceKind::Max, [0], false)
            .vjp(&mut cx)
            .unwrap()[0]
            .unwrap();
        let feed = Tensor::new(DType::F64, vec![3], vec![2.0, 1.0, 2.0]);
        let vals = crate::eval::run(&b.graph, &[(x, feed)].into()).unwrap();
        assert_eq!(
            vals[g.0 as usize].as_ref().unwrap().data,
            vec![0.5, 0.0, 0.5]
        );
    }
}
