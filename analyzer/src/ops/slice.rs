//! `slice`: a strided window of some axes (ONNX `Slice`, `Split` lowers to one slice per part,
//! GPT-2's fused-QKV split). The importer normalises the bounds, so the IR only holds
//! `start <= end <= dim`, `step >= 1`.
//!
//! A sliced dim is whole (a shard would hold the wrong rows); untouched dims pass their axis
//! through. The vjp places `dy` back with zeros around it: a `pad` when every step is 1, and for
//! strided slices first an interleave with zeros (reshape to `[.., m, 1, ..]`, pad to
//! `[.., m, step, ..]`, reshape to `[.., m*step, ..]`), so no scatter op is needed.

use super::*;
use crate::dtype::TensorType;
use crate::error::{AnalyzerError, OpError};
use crate::graph::ValueId;
use crate::op_err;
use crate::tensor::{for_each_index, Tensor};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
/// Strided slice, normalised: for each listed axis, `start <= end <= dim`, `step >= 1`
/// (the importer clamps ONNX's negative and out-of-range bounds; negative steps are rejected).
pub struct Slice {
    pub axes: Vec<usize>,
    pub starts: Vec<usize>,
    pub ends: Vec<usize>,
    pub steps: Vec<usize>,
}

impl Slice {
    /// A step-1 slice `[start, end)` of one axis.
    pub fn range(axis: usize, start: usize, end: usize) -> Self {
        Slice {
            axes: vec![axis],
            starts: vec![start],
            ends: vec![end],
            steps: vec![1],
        }
    }

    /// For every dim of `shape`: `(start, step)` and the output size; checks the attributes.
    fn plan(&self, shape: &[usize]) -> Result<Vec<(usize, usize, usize)>, OpError> {
        let n = self.axes.len();
        if self.starts.len() != n || self.ends.len() != n || self.steps.len() != n {
            return Err(op_err!(
                "axes, starts, ends and steps have lengths {}, {}, {}, {}",
                n,
                self.starts.len(),
                self.ends.len(),
                self.steps.len()
            ));
        }
        let mut plan: Vec<Option<(usize, usize, usize)>> = vec![None; shape.len()];
        for k in 0..n {
            let (axis, start, end, step) =
                (self.axes[k], self.starts[k], self.ends[k], self.steps[k]);
            let Some(&dim) = shape.get(axis) else {
                return Err(op_err!(
                    "axis {axis} is out of range for a rank-{} input",
                    shape.len()
                ));
            };
            if plan[axis].is_some() {
                return Err(op_err!("axis {axis} is sliced twice"));
            }
            if step == 0 {
                return Err(op_err!("axis {axis}: step must be at least 1"));
            }
            if !(start <= end && end <= dim) {
                return Err(op_err!(
                    "axis {axis}: bounds [{start}, {end}) do not satisfy start <= end <= {dim}"
                ));
            }
            plan[axis] = Some((start, step, (end - start).div_ceil(step)));
        }
        Ok(plan
            .into_iter()
            .zip(shape)
            .map(|(p, &d)| p.unwrap_or((0, 1, d)))
            .collect())
    }
}

impl OpSpec for Slice {
    fn infer(&self, inputs: &[&TensorType]) -> Result<Vec<TensorType>, OpError> {
        let [x] = inputs else {
            return Err(op_err!("slice takes 1 input, got {}", inputs.len()));
        };
        let plan = self.plan(&x.shape)?;
        let shape: Vec<usize> = plan.iter().map(|p| p.2).collect();
        Ok(vec![TensorType::new(x.dtype, shape)])
    }

    fn dims(&self, inputs: &[&TensorType], outputs: &[&TensorType]) -> DimMap {
        let (Some(x), Some(y)) = (inputs.first(), outputs.first()) else {
            return DimMap::opaque(inputs, outputs);
        };
        if self.plan(&x.shape).is_err() || x.rank() != y.rank() {
            return DimMap::opaque(inputs, outputs);
        }
        DimMap::same_size_dims_parallel(x, y)
    }

    fn cost(&self, _inputs: &[&TensorType], outputs: &[&TensorType]) -> Cost {
        // only the selected elements are read
        Cost::data_movement(outputs, outputs)
    }

    fn vjp(&self, cx: &mut VjpCtx<'_>) -> Result<Vec<Option<ValueId>>, OpError> {
        let (Some(dy), Some(true)) = (cx.grads.first().copied().flatten(), cx.needs.first()) else {
            return Ok(vec![None; cx.inputs.len()]);
        };
        let x = cx.input_ty(0);
        let plan = self.plan(&x.shape)?;
        if plan.iter().any(|p| p.2 == 0) {
            return Ok(vec![Some(cx.b.zeros(&x)?)]);
        }
        let mut g = dy;
        let mut cur: Vec<usize> = plan.iter().map(|p| p.2).collect();
        let mut pads = vec![[0usize; 2]; x.rank()];
        for (axis, &(start, step, m)) in plan.iter().enumerate() {
            if step > 1 {
                // interleave step-1 zeros after every element
                let mut split = cur.clone();
                split.insert(axis + 1, 1);
                g = cx.b.emit(Reshape::new(split), &[g])?;
                let mut p = vec![[0usize; 2]; x.rank() + 1];
                p[axis + 1] = [0, step - 1];
                g = cx.b.emit(
                    Pad {
                        pads: p,
                        value: 0.0,
                    },
                    &[g],
                )?;
                cur[axis] = m * step;
                g = cx.b.emit(Reshape::new(cur.clone()), &[g])?;
                let room = x.shape[axis] - start;
                if cur[axis] > room {
                    g = cx.b.emit(Slice::range(axis, 0, room), &[g])?;
                    cur[axis] = room;
                }
            }
            pads[axis] = [start, x.shape[axis] - start - cur[axis]];
        }
        if pads.iter().any(|p| p[0] + p[1] > 0) {
            g = cx.b.emit(Pad { pads, value: 0.0 }, &[g])?;
        }
        Ok(vec![Some(g)])
    }

    fn eval(&self, inputs: &[&Tensor]) -> Result<Vec<Tensor>, OpError> {
        let tys: Vec<TensorType> = inputs.iter().map(|t| t.ty()).collect();
        let out = self.infer(&tys.iter().collect::<Vec<_>>())?.remove(0);
        let x = inputs[0];
        let plan = self.plan(&x.shape)?;
        let st = x.strides();
        let mut data = Vec::with_capacity(out.numel());
        for_each_index(&out.shape, |idx| {
            let off: usize = idx
                .iter()
                .zip(&plan)
                .zip(&st)
                .map(|((&i, &(start, step, _)), &s)| (start + i * step) * s)
                .sum();
            data.push(x.data[off]);
        });
        Ok(vec![Tensor::new(out.dtype, out.shape, data)])
    }
}

impl crate::builder::GraphBuilder {
    /// Strided slice of `x` along `axes` (normalised bounds: `start <= end <= dim`, `step >= 1`).
    pub fn slice(
        &mut self,
        x: ValueId,
        axes: &[usize],
        starts: &[usize],
        ends: &[usize],
        steps: &[usize],
    ) -> Result<ValueId, AnalyzerError> {
        self.node1(
            Slice {
                axes: axes.to_vec(),
                starts: starts.to_vec(),
                ends: ends.to_vec(),
                steps: steps.to_vec(),
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

    fn slice(axes: &[usize], starts: &[usize], ends: &[usize], steps: &[usize]) -> Slice {
        Slice {
            axes: axes.to_vec(),
            starts: starts.to_vec(),
            ends: ends.to_vec(),
            steps: steps.to_vec(),
        }
    }

    #[test]
    fn rejects_bad_bounds() {
        let x = TensorType::new(DType::F32, [4, 6]);
        let cases = [
            (slice(&[2], &[0], &[1], &[1]), "out of range"),
            (slice(&[1], &[3], &[2], &[1]), "start <= end"),
            (slice(&[1], &[0], &[7], &[1]), "start <= end <= 6"),
            (slice(&[1], &[0], &[2], &[0]), "step"),
            (slice(&[1, 1], &[0, 0], &[2, 2], &[1, 1]), "twice"),
            (slice(&[1], &[0, 1], &[2], &[1]), "lengths"),
        ];
        for (op, msg) in cases {
            let e = op.infer(&[&x]).expect_err(msg);
            assert!(e.0.contains(msg), "{msg}: {e}");
        }
    }

    #[test]
    fn infers_and_maps_dims() {
        let x = TensorType::new(DType::F32, [4, 6, 5]);
        let op = slice(&[1], &[1], &[6], &[2]);
        let y = op.infer(&[&x]).expect("infer").remove(0);
        assert_eq!(y.shape, vec![4, 3, 5]);
        assert_eq!(op.dims(&[&x], &[&y]).to_einsum(), "aBd->aCd");
        // a full-range slice leaves the axis parallel
        let op = slice(&[0], &[0], &[4], &[1]);
        let y = op.infer(&[&x]).expect("infer").remove(0);
        assert_eq!(op.dims(&[&x], &[&y]).to_einsum(), "abc->abc");
    }

    #[test]
    fn evaluates() {
        let x = Tensor::new(DType::F64, vec![2, 5], (0..10).map(f64::from).collect());
        let y = slice(&[1, 0], &[1, 1], &[5, 2], &[3, 1])
            .eval(&[&x])
            .expect("eval")
            .remove(0);
        assert_eq!(y.shape, vec![1, 2]);
        assert_eq!(y.data, vec![6.0, 9.0]);
    }

    #[test]
    fn vjp_matches_finite_differences() {
        let x = || vec![rand_tensor(&[3, 7, 2], 1)];
        check(slice(&[1], &[2], &[6], &[1]), &x(), 1e-6);
        check(slice(&[1, 0], &[1, 1], &[7, 3], &[3, 1]), &x(), 1e-6);
        check(slice(&[1], &[0], &[7], &[2]), &x(), 1e-6);
        check(slice(&[1], &[5], &[5], &[1]), &x(), 1e-6);
    }
}
