//! `layer_norm`: ONNX LayerNormalization (opset 17) over the trailing dims `axis..`, with its
//! mean and reciprocal standard deviation as extra outputs, as PyTorch's `native_layer_norm`
//! returns them: the backward ([`LayerNormGrad`](super::LayerNormGrad)) reads them instead of
//! recomputing, and the profiler sees them as the small saved activations they are.
//!
//! The statistics are kept in f32 for every float input below f64 (ONNX `stash_type = 1`,
//! PyTorch's accumulation type), in f64 for f64. Normalised dims must stay whole on a device
//! (their statistics sum over them), so they are `Whole` axes tied to `scale` and `bias`; the
//! leading dims are parallel. The vjp is one fused `LayerNormGrad` node; gradients arriving at
//! the statistics outputs (nothing in a training graph reads them, but the op is honest about
//! them) add their own terms in plain IR ops.

use super::*;
use crate::dtype::{DType, TensorType};
use crate::error::{AnalyzerError, OpError};
use crate::graph::ValueId;
use crate::op_err;
use crate::ops::binary::{bin, cast_to, scale, BinaryKind};
use crate::tensor::Tensor;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
/// ONNX LayerNormalization: normalises over dims `axis..rank`. Inputs `x, scale[, bias]`
/// (scale/bias shaped like `x.shape[axis..]`). Outputs `y, mean, rstd`, mean and rstd shaped
/// like x with dims `axis..` set to 1 (saved for the backward, as PyTorch does).
pub struct LayerNorm {
    pub axis: usize,
    pub epsilon: f64,
}

/// Vector flops per element: mean (1), centre (1), square and sum (2), scale by rstd (1), by
/// `scale` (1), add bias (1), plus the per-row rsqrt spread thin.
const FLOPS_PER_ELEMENT: f64 = 8.0;

/// dtype of the saved statistics of a norm over `x` (f32 unless x is f64).
pub fn stats_dtype(x: DType) -> DType {
    if x == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// Shape of the saved statistics: `shape` with dims `axis..` set to 1.
pub(crate) fn stats_shape(shape: &[usize], axis: usize) -> Vec<usize> {
    shape
        .iter()
        .enumerate()
        .map(|(d, &n)| if d >= axis { 1 } else { n })
        .collect()
}

/// Checks `x` and a per-feature parameter (`scale`, `bias`) of a norm over dims `axis..`.
pub(crate) fn check_norm_operands(
    x: &TensorType,
    params: &[(&str, &TensorType)],
    axis: usize,
) -> Result<(), OpError> {
    if !x.dtype.is_float() {
        return Err(op_err!("x must be float, got {}", x.dtype));
    }
    if axis >= x.rank() {
        return Err(op_err!(
            "axis {axis} is out of range for x of rank {}",
            x.rank()
        ));
    }
    let feat = &x.shape[axis..];
    for (name, p) in params {
        if p.dtype != x.dtype {
            return Err(op_err!("{name} is {} but x is {}", p.dtype, x.dtype));
        }
        if p.shape != feat {
            return Err(op_err!(
                "{name} has shape {:?}, expected the normalised dims {:?} of x {:?}",
                p.shape,
                feat,
                x.shape
            ));
        }
    }
    Ok(())
}

/// Dim map of a norm over `axis..`: one axis per dim of `x`, the normalised ones `Whole` and
/// `lead_kind` for the rest; `x`-shaped tensors carry all, feature-shaped ones the normalised
/// axes, statistics the leading axes; `inputs` / `outputs` give each tensor's role.
pub(crate) fn norm_dims(
    x: &TensorType,
    axis: usize,
    lead_kind: AxisKind,
    inputs: &[NormRole],
    outputs: &[NormRole],
) -> DimMap {
    let r = x.rank();
    let axes = x
        .shape
        .iter()
        .enumerate()
        .map(|(d, &size)| Axis {
            size,
            kind: if d >= axis {
                AxisKind::Whole
            } else {
                lead_kind
            },
        })
        .collect();
    let map = |role: &NormRole| -> Vec<Option<AxisId>> {
        match role {
            NormRole::Full => (0..r).map(Some).collect(),
            NormRole::Feature => (axis..r).map(Some).collect(),
            NormRole::Stats => (0..r).map(|d| (d < axis).then_some(d)).collect(),
        }
    };
    DimMap {
        axes,
        inputs: inputs.iter().map(map).collect(),
        outputs: outputs.iter().map(map).collect(),
    }
}

/// What a tensor of a norm op is, for [`norm_dims`].
#[derive(Copy, Clone, Debug)]
pub(crate) enum NormRole {
    /// shaped like x
    Full,
    /// shaped like `x.shape[axis..]` (scale, bias)
    Feature,
    /// shaped like x with dims `axis..` set to 1 (mean, rstd)
    Stats,
}

impl OpSpec for LayerNorm {
    fn infer(&self, inputs: &[&TensorType]) -> Result<Vec<TensorType>, OpError> {
        let (x, params) = match inputs {
            [x, s] => (x, vec![("scale", *s)]),
            [x, s, b] => (x, vec![("scale", *s), ("bias", *b)]),
            _ => {
                return Err(op_err!(
                    "takes 2 or 3 inputs (x, scale[, bias]), got {}",
                    inputs.len()
                ))
            }
        };
        check_norm_operands(x, &params, self.axis)?;
        let stats = TensorType::new(stats_dtype(x.dtype), stats_shape(&x.shape, self.axis));
        Ok(vec![(*x).clone(), stats.clone(), stats])
    }

    fn dims(&self, inputs: &[&TensorType], outputs: &[&TensorType]) -> DimMap {
        let Some(x) = inputs.first() else {
            return DimMap::opaque(inputs, outputs);
        };
        if self.infer(inputs).is_err() {
            return DimMap::opaque(inputs, outputs);
        }
        let ins = [NormRole::Full, NormRole::Feature, NormRole::Feature];
        norm_dims(
            x,
            self.axis,
            AxisKind::Parallel,
            &ins[..inputs.len()],
            &[NormRole::Full, NormRole::Stats, NormRole::Stats],
        )
    }

    fn cost(&self, inputs: &[&TensorType], outputs: &[&TensorType]) -> Cost {
        let n = inputs.first().map_or(0, |x| x.numel());
        Cost::memory_bound(inputs, outputs, FLOPS_PER_ELEMENT * n as f64)
    }

    fn vjp(&self, cx: &mut VjpCtx<'_>) -> Result<Vec<Option<ValueId>>, OpError> {
        let has_bias = cx.inputs.len() == 3;
        let (x, w) = (cx.inputs[0], cx.inputs[1]);
        let (mean, rstd) = (cx.outputs[1], cx.outputs[2]);
        let xt = cx.input_ty(0);
        let needs = cx.needs.to_vec();
        let need = |i: usize| needs.get(i).copied().unwrap_or(false);
        let mut grads = vec![None; cx.inputs.len()];
        if let Some(dy) = cx.grads[0] {
            let outs = cx.b.emit_n(
                LayerNormGrad {
                    axis: self.axis,
                    has_bias,
                },
                &[dy, x, w, mean, rstd],
            )?;
            for (i, g) in grads.iter_mut().enumerate() {
                if need(i) {
                    *g = outs.get(i).copied();
                }
            }
        }
        if !need(0) {
            return Ok(grads);
        }
        let n = xt
            .shape
            .get(self.axis..)
            .map_or(1, |s| s.iter().product::<usize>())
            .max(1) as f64;
        let b = &mut *cx.b;
        let mut dx = grads[0];
        // d rstd / dx = -rstd^3 (x - mean) / n
        if let Some(gr) = cx.grads[2] {
            let r2 = bin(b, BinaryKind::Mul, rstd, rstd)?;
            let r3 = bin(b, BinaryKind::Mul, r2, rstd)?;
            let t = bin(b, BinaryKind::Mul, gr, r3)?;
            let t = scale(b, t, -1.0 / n)?;
            let t = cast_to(b, t, xt.dtype)?;
            let m = cast_to(b, mean, xt.dtype)?;
            let xc = bin(b, BinaryKind::Sub, x, m)?;
            let t = bin(b, BinaryKind::Mul, xc, t)?;
            dx = Some(match dx {
                Some(d) => bin(b, BinaryKind::Add, d, t)?,
                None => t,
            });
        }
        // d mean / dx = 1 / n
        if let Some(gm) = cx.grads[1] {
            let t = scale(b, gm, 1.0 / n)?;
            let t = cast_to(b, t, xt.dtype)?;
            dx = Some(match dx {
                Some(d) => bin(b, BinaryKind::Add, d, t)?,
                None => b.emit(
                    Expand {
                        shape: xt.shape.clone(),
                    },
                    &[t],
                )?,
            });
        }
        grads[0] = dx;
        Ok(grads)
    }

    fn eval(&self, inputs: &[&Tensor]) -> Result<Vec<Tensor>, OpError> {
        let tys: Vec<TensorType> = inputs.iter().map(|t| t.ty()).collect();
        let outs = self.infer(&tys.iter().collect::<Vec<_>>())?;
        let (x, w, bias) = (inputs[0], inputs[1], inputs.get(2));
        let n = w.numel();
        let rows = x.numel().checked_div(n).unwrap_or(0);
        let mut y = vec![0.0; x.numel()];
        let mut means = vec![0.0; rows];
        let mut rstds = vec![0.0; rows];
        for r in 0..rows {
            let row = &x.data[r * n..(r + 1) * n];
            let mean = row.iter().sum::<f64>() / n as f64;
            let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / n as f64;
            let rstd = 1.0 / (var + self.epsilon).sqrt();
            for (k, v) in row.iter().enumerate() {
                let b = bias.map_or(0.0, |b| b.data[k]);
                y[r * n + k] = (v - mean) * rstd * w.data[k] + b;
            }
            means[r] = mean;
            rstds[r] = rstd;
        }
        let [yt, st, _] = &outs[..] else {
            return Err(op_err!("layer_norm infers three outputs"));
        };
        Ok(vec![
            Tensor::new(yt.dtype, yt.shape.clone(), y),
            Tensor::new(st.dtype, st.shape.clone(), means),
            Tensor::new(st.dtype, st.shape.clone(), rstds),
        ])
    }
}

impl crate::builder::GraphBuilder {
    /// Layer norm of `x` over dims `axis..`; returns `y` (mean and rstd are outputs 1 and 2 of
    /// the node).
    pub fn layer_norm(
        &mut self,
        x: ValueId,
        scale: ValueId,
        bias: Option<ValueId>,
        axis: usize,
        eps: f64,
    ) -> Result<ValueId, AnalyzerError> {
        let op = LayerNorm { axis, epsilon: eps };
        match bias {
            Some(b) => self.node1(op, &[x, scale, b]),
            None => self.node1(op, &[x, scale]),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::ops::gradcheck::{check, rand_tensor};

    fn tt(dtype: DType, shape: &[usize]) -> TensorType {
        TensorType::new(dtype, shape.to_vec())
    }
    fn ln(axis: usize) -> LayerNorm {
        LayerNorm {
            axis,
            epsilon: 1e-5,
        }
    }

    #[test]
    fn infers_and_rejects() {
        let x = tt(DType::F16, &[2, 3, 4]);
        let s = tt(DType::F16, &[4]);
        let out = ln(2).infer(&[&x, &s, &s]).unwrap();
        assert_eq!(out[0], x);
        assert_eq!(out[1], tt(DType::F32, &[2, 3, 1]));
        assert_eq!(out[2], out[1]);
        let s2 = tt(DType::F16, &[3, 4]);
        assert_eq!(ln(1).infer(&[&x, &s2]).unwrap()[1].shape, vec![2, 1, 1]);
        let e = ln(1).infer(&[&x, &s]).unwrap_err();
        assert!(
            e.0.contains("scale has shape [4], expected the normalised dims [3, 4]"),
            "{e}"
        );
        let e = ln(3).infer(&[&x, &s]).unwrap_err();
        assert!(e.0.contains("axis 3 is out of range"), "{e}");
        let e = ln(2).infer(&[&x, &s, &tt(DType::F32, &[4])]).unwrap_err();
        assert!(e.0.contains("bias is f32 but x is f16"), "{e}");
        assert!(ln(2).infer(&[&x]).is_err());
    }

    #[test]
    fn dims_tie_scale_to_the_whole_axes() {
        let x = tt(DType::F32, &[2, 3, 4]);
        let s = tt(DType::F32, &[4]);
        let out = ln(2).infer(&[&x, &s, &s]).unwrap();
        let outs: Vec<&TensorType> = out.iter().collect();
        assert_eq!(
            ln(2).dims(&[&x, &s, &s], &outs).to_einsum(),
            "abC,C,C->abC,ab_,ab_"
        );
        let s2 = tt(DType::F32, &[3, 4]);
        let out = ln(1).infer(&[&x, &s2]).unwrap();
        let outs: Vec<&TensorType> = out.iter().collect();
        assert_eq!(
            ln(1).dims(&[&x, &s2], &outs).to_einsum(),
            "aBC,BC->aBC,a__,a__"
        );
        assert_eq!(ln(2).cost(&[&x, &s], &outs).flops, 8.0 * 24.0);
    }

    #[test]
    fn evaluates() {
        let x = Tensor::new(DType::F64, vec![2, 2], vec![1.0, 3.0, -1.0, -1.0]);
        let s = Tensor::new(DType::F64, vec![2], vec![2.0, 1.0]);
        let b = Tensor::new(DType::F64, vec![2], vec![0.0, 10.0]);
        let out = LayerNorm {
            axis: 1,
            epsilon: 0.0,
        }
        .eval(&[&x, &s, &b])
        .unwrap();
        assert_eq!(out[0].data[..2], [-2.0, 11.0]);
        assert_eq!(out[1].data, vec![2.0, -1.0]);
        assert_eq!(out[2].data[0], 1.0);
        assert!(out[2].data[1].is_infinite());
    }

    #[test]
    fn gradients_match_finite_differences() {
        // gradcheck weights all three outputs, so the statistics' terms and LayerNormGrad's eval
        // are both covered
        let x = rand_tensor(&[2, 3, 4], 1);
        check(
            ln(2),
            &[x.clone(), rand_tensor(&[4], 2), rand_tensor(&[4], 3)],
            1e-6,
        );
        check(ln(1), &[x.clone(), rand_tensor(&[3, 4], 4)], 1e-6);
        check(
            ln(0),
            &[rand_tensor(&[2, 3], 5), rand_tensor(&[2, 3], 6)],
            1e-6,
        );
    }
}
