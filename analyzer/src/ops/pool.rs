//! `pool`: max and average pooling over the spatial dims of NC... tensors (ONNX `MaxPool`,
//! `AveragePool`, and `GlobalAveragePool` as a window over the whole map).
//!
//! Semantics follow PyTorch, the exporters' source: padding never wins a max; average pooling
//! divides by the taps inside the padded input (`count_include_pad`) or inside the input; with
//! `ceil_mode` a last window that would start in the end padding is dropped, and taps beyond
//! the padded input count for neither. Batch and channels are parallel, spatial dims whole.
//! The vjp is [`PoolGrad`](super::PoolGrad): the max routes `dy` to the first maximal tap, the
//! average spreads it over the window.

use super::conv::Window;
use super::*;
use crate::dtype::{DType, TensorType};
use crate::error::{AnalyzerError, OpError};
use crate::graph::ValueId;
use crate::op_err;
use crate::tensor::Tensor;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
/// Max or average pooling over the spatial dims (NCHW...).
pub struct Pool {
    pub kind: PoolKind,
    pub kernel: Vec<usize>,
    pub strides: Vec<usize>,
    pub pads: Vec<[usize; 2]>,
    pub dilations: Vec<usize>,
    /// Average pooling: divide by the full window (true) or by the unpadded part (false).
    pub count_include_pad: bool,
    pub ceil_mode: bool,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PoolKind {
    Max,
    Avg,
}

/// Per output position of one (n, c) plane: the input offsets its window reads, and the
/// divisor of average pooling.
pub(crate) struct PoolTaps {
    pub window: Window,
    pub taps: Vec<Vec<usize>>,
    pub divisors: Vec<f64>,
}

impl Pool {
    /// Checks `x` against the attributes and computes the window geometry.
    pub(crate) fn window(&self, x: &TensorType) -> Result<Window, OpError> {
        if x.rank() < 3 {
            return Err(op_err!("input {x} must be N, C, spatial..."));
        }
        match self.kind {
            PoolKind::Avg if !x.dtype.is_float() => {
                return Err(op_err!("average pooling of {} is not supported", x.dtype))
            }
            PoolKind::Max if x.dtype == DType::Bool => {
                return Err(op_err!("max pooling of bool is not supported"))
            }
            _ => {}
        }
        let w = Window::new(
            &x.shape[2..],
            &self.kernel,
            &self.strides,
            &self.pads,
            &self.dilations,
            self.ceil_mode,
        )?;
        for (d, (&[pb, pa], (&k, &dil))) in self
            .pads
            .iter()
            .zip(self.kernel.iter().zip(&self.dilations))
            .enumerate()
        {
            let extent = dil * (k - 1) + 1;
            if pb >= extent || pa >= extent {
                return Err(op_err!(
                    "spatial dim {d}: pads [{pb}, {pa}] must be smaller than the kernel extent {extent}"
                ));
            }
        }
        Ok(w)
    }

    /// The taps of every output position (see [`PoolTaps`]).
    pub(crate) fn taps(&self, x: &TensorType) -> Result<PoolTaps, OpError> {
        let window = self.window(x)?;
        let n_out = window.output_len();
        let mut taps = vec![vec![]; n_out];
        let mut padded = vec![0usize; n_out];
        window.for_each_tap(|o, oi, _, ki| match window.tap(oi, ki) {
            Ok(p) => taps[o].push(p),
            Err(true) => padded[o] += 1,
            Err(false) => {}
        });
        let divisors = taps
            .iter()
            .zip(&padded)
            .map(|(t, &p)| {
                let n = if self.count_include_pad {
                    t.len() + p
                } else {
                    t.len()
                };
                n.max(1) as f64
            })
            .collect();
        Ok(PoolTaps {
            window,
            taps,
            divisors,
        })
    }

    /// Index into the window's taps of the first maximal input (None for an empty window).
    pub(crate) fn argmax(plane: &[f64], taps: &[usize]) -> Option<usize> {
        let mut best: Option<usize> = None;
        for &p in taps {
            if best.is_none_or(|b| plane[p] > plane[b]) {
                best = Some(p);
            }
        }
        best
    }
}

impl OpSpec for Pool {
    fn infer(&self, inputs: &[&TensorType]) -> Result<Vec<TensorType>, OpError> {
        let [x] = inputs else {
            return Err(op_err!("pool takes 1 input, got {}", inputs.len()));
        };
        let w = self.window(x)?;
        let shape = [x.shape[..2].to_vec(), w.output].concat();
        Ok(vec![TensorType::new(x.dtype, shape)])
    }

    fn dims(&self, inputs: &[&TensorType], outputs: &[&TensorType]) -> DimMap {
        let Ok(ys) = self.infer(inputs) else {
            return DimMap::opaque(inputs, outputs);
        };
        let (axes, x, y) = pool_axis_maps(inputs[0], &ys[0]);
        DimMap {
            axes,
            inputs: vec![x],
            outputs: vec![y],
        }
    }

    fn cost(&self, inputs: &[&TensorType], outputs: &[&TensorType]) -> Cost {
        let per_output: usize = self.kernel.iter().product();
        Cost::elementwise(inputs, outputs, per_output as f64)
    }

    fn vjp(&self, cx: &mut VjpCtx<'_>) -> Result<Vec<Option<ValueId>>, OpError> {
        match (cx.grads.first().copied().flatten(), cx.needs.first()) {
            (Some(dy), Some(true)) => {
                let op = PoolGrad { pool: self.clone() };
                Ok(vec![Some(cx.b.emit(op, &[dy, cx.inputs[0]])?)])
            }
            _ => Ok(vec![None; cx.inputs.len()]),
        }
    }

    fn eval(&self, inputs: &[&Tensor]) -> Result<Vec<Tensor>, OpError> {
        let tys: Vec<TensorType> = inputs.iter().map(|t| t.ty()).collect();
        let out = self.infer(&tys.iter().collect::<Vec<_>>())?.remove(0);
        let x = inputs[0];
        let t = self.taps(&tys[0])?;
        let in_len = t.window.input_len();
        let planes = x.shape[0] * x.shape[1];
        let mut y = Vec::with_capacity(out.numel());
        for c in 0..planes {
            let plane = &x.data[c * in_len..(c + 1) * in_len];
            for (taps, &div) in t.taps.iter().zip(&t.divisors) {
                y.push(match self.kind {
                    PoolKind::Max => {
                        Pool::argmax(plane, taps).map_or(f64::NEG_INFINITY, |p| plane[p])
                    }
                    PoolKind::Avg => taps.iter().map(|&p| plane[p]).sum::<f64>() / div,
                });
            }
        }
        Ok(vec![Tensor::new(out.dtype, out.shape, y)])
    }
}

/// Batch and channels parallel, spatial dims whole (own axes on each side).
pub(crate) fn pool_axis_maps(
    x: &TensorType,
    y: &TensorType,
) -> (Vec<Axis>, Vec<Option<AxisId>>, Vec<Option<AxisId>>) {
    let mut axes = vec![];
    let mut new_axis = |size, kind| {
        axes.push(Axis { size, kind });
        Some(axes.len() - 1)
    };
    let n = new_axis(x.shape[0], AxisKind::Parallel);
    let c = new_axis(x.shape[1], AxisKind::Parallel);
    let xs: Vec<_> = x.shape[2..]
        .iter()
        .map(|&d| new_axis(d, AxisKind::Whole))
        .collect();
    let ys: Vec<_> = y.shape[2..]
        .iter()
        .map(|&d| new_axis(d, AxisKind::Whole))
        .collect();
    (axes, [vec![n, c], xs].concat(), [vec![n, c], ys].concat())
}

impl crate::builder::GraphBuilder {
    /// Pooling of `x` (N, C, spatial...) as described by `op`.
    pub fn pool(&mut self, op: Pool, x: ValueId) -> Result<ValueId, AnalyzerError> {
        self.node1(op, &[x])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::gradcheck::{check, rand_tensor};

    fn pool2d(kind: PoolKind, k: usize, s: usize, p: usize, ceil: bool, incl: bool) -> Pool {
        Pool {
            kind,
            kernel: vec![k; 2],
            strides: vec![s; 2],
            pads: vec![[p, p]; 2],
            dilations: vec![1; 2],
            count_include_pad: incl,
            ceil_mode: ceil,
        }
    }

    #[test]
    fn rejects_bad_windows() {
        let x = TensorType::new(DType::F32, [1, 2, 4, 4]);
        let cases = [
            (
                pool2d(PoolKind::Max, 5, 1, 0, false, false),
                "larger than the padded input",
            ),
            (
                pool2d(PoolKind::Max, 2, 1, 2, false, false),
                "smaller than the kernel extent",
            ),
            (pool2d(PoolKind::Avg, 2, 0, 0, false, false), "at least 1"),
        ];
        for (op, msg) in cases {
            let e = op.infer(&[&x]).expect_err(msg);
            assert!(e.0.contains(msg), "{msg}: {e}");
        }
        let i = TensorType::new(DType::I64, [1, 2, 4, 4]);
        assert!(pool2d(PoolKind::Avg, 2, 2, 0, false, false)
            .infer(&[&i])
            .is_err());
        assert!(pool2d(PoolKind::Max, 2, 2, 0, false, false)
            .infer(&[&i])
            .is_ok());
    }

    #[test]
    fn infers_and_maps_dims() {
        // ResNet's stem max pool: 3x3, stride 2, pad 1
        let x = TensorType::new(DType::F32, [2, 3, 8, 8]);
        let op = pool2d(PoolKind::Max, 3, 2, 1, false, false);
        let y = op.infer(&[&x]).expect("infer").remove(0);
        assert_eq!(y.shape, vec![2, 3, 4, 4]);
        assert_eq!(op.dims(&[&x], &[&y]).to_einsum(), "abCD->abEF");
        let c = op.cost(&[&x], &[&y]);
        assert_eq!(c.flops, 2.0 * 3.0 * 16.0 * 9.0);
        // ceil mode keeps a partial last window, but none starting in the padding
        let x = TensorType::new(DType::F32, [1, 1, 5, 5]);
        let op = pool2d(PoolKind::Max, 2, 2, 0, true, false);
        assert_eq!(op.infer(&[&x]).expect("infer")[0].shape, vec![1, 1, 3, 3]);
        let op = pool2d(PoolKind::Max, 2, 2, 1, true, false);
        assert_eq!(op.infer(&[&x]).expect("infer")[0].shape, vec![1, 1, 3, 3]);
        let op = pool2d(PoolKind::Max, 3, 2, 1, true, false);
        let x = TensorType::new(DType::F32, [1, 1, 6, 6]);
        assert_eq!(op.infer(&[&x]).expect("infer")[0].shape, vec![1, 1, 4, 4]);
    }

    #[test]
    fn evaluates_hand_examples() {
        let x = Tensor::new(
            DType::F64,
            vec![1, 1, 3, 3],
            (1..=9).map(f64::from).collect(),
        );
        let max = pool2d(PoolKind::Max, 2, 2, 1, false, false);
        let y = max.eval(&[&x]).expect("eval").remove(0);
        assert_eq!(y.data, vec![1.0, 3.0, 7.0, 9.0]);
        let excl = pool2d(PoolKind::Avg, 2, 2, 1, false, false);
        let y = excl.eval(&[&x]).expect("eval").remove(0);
        assert_eq!(y.data, vec![1.0, 2.5, 5.5, 7.0]);
        let incl = pool2d(PoolKind::Avg, 2, 2, 1, false, true);
        let y = incl.eval(&[&x]).expect("eval").remove(0);
        assert_eq!(y.data, vec![0.25, 1.25, 2.75, 7.0]);
        // ceil mode: the last window sticks out past the input and counts only real taps
        let ceil = pool2d(PoolKind::Avg, 2, 2, 0, true, true);
        let y = ceil.eval(&[&x]).expect("eval").remove(0);
        assert_eq!(y.data, vec![3.0, 4.5, 7.5, 9.0]);
    }

    #[test]
    fn vjp_matches_finite_differences() {
        let x = || vec![rand_tensor(&[1, 2, 5, 5], 1)];
        for op in [
            pool2d(PoolKind::Max, 3, 2, 1, false, false),
            pool2d(PoolKind::Max, 2, 2, 0, true, false),
            pool2d(PoolKind::Avg, 3, 2, 1, true, true),
            pool2d(PoolKind::Avg, 3, 2, 1, false, false),
        ] {
            check(op, &x(), 1e-6);
        }
        let dilated = Pool {
            kind: PoolKind::Max,
            kernel: vec![2],
            strides: vec![1],
            pads: vec![[1, 0]],
            dilations: vec![2],
            count_include_pad: false,
            ceil_mode: false,
        };
        check(dilated, &[rand_tensor(&[2, 1, 6], 2)], 1e-6);
    }
}
