//! `batch_norm`: ONNX `BatchNormalization` over dim 1 of NC... tensors (ResNet).
//!
//! Inference normalises with the running statistics: every dim is parallel. Training
//! normalises with the batch's statistics (mean and *population* variance over N and the
//! spatial dims, as the ONNX reference implementation computes them) and returns the updated
//! running statistics `running * momentum + batch * (1 - momentum)` plus the saved mean and
//! `1 / sqrt(var + eps)` for the backward. PyTorch updates its running variance with the
//! unbiased estimate instead; this op follows ONNX, the format it is imported from.
//!
//! Training dim map: channels are parallel, while N and the spatial dims are *whole*. The
//! statistics need the whole batch: splitting the batch would either change the numbers
//! (per-device statistics, what unsynchronised data parallelism does) or need an all-reduce of
//! per-channel sums inside the op, which a dim map cannot express. This is the honest choice;
//! it makes batch-split plans pay for gathering the batch at each batch norm.
//!
//! The training vjp is [`BatchNormGrad`](super::BatchNormGrad) (plus, only when gradients flow
//! into the statistics outputs, their exact elementwise terms); the inference vjp is
//! elementwise: `dx = dy * scale / sqrt(var + eps)`, `dscale`, `dbias` by sums.

use super::binary::BinaryKind;
use super::reduce::ReduceKind;
use super::unary::UnaryKind;
use super::*;
use crate::dtype::{DType, TensorType};
use crate::error::{AnalyzerError, OpError};
use crate::graph::ValueId;
use crate::op_err;
use crate::tensor::Tensor;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
/// BatchNormalization over dim 1 (NC...): inputs `x, scale, bias, running_mean, running_var`.
/// Inference: one output `y`, normalised with the running statistics. Training: outputs `y,
/// new_running_mean, new_running_var, saved_mean, saved_rstd`, normalised with batch
/// statistics; running stats updated as `momentum * running + (1 - momentum) * batch` (ONNX).
pub struct BatchNorm {
    pub epsilon: f64,
    pub momentum: f64,
    pub training: bool,
}

/// Checks an NC... tensor and per-channel operands; returns C.
pub(crate) fn check_channels(
    x: &TensorType,
    per_channel: &[(&str, &TensorType)],
) -> Result<usize, OpError> {
    if x.rank() < 2 || !x.dtype.is_float() {
        return Err(op_err!("input {x} must be a float N, C, ... tensor"));
    }
    let c = x.shape[1];
    for (name, t) in per_channel {
        if t.shape != [c] || !t.dtype.is_float() {
            return Err(op_err!(
                "{name} {t} must be a float [{c}] (one per channel of {x})"
            ));
        }
    }
    Ok(c)
}

/// Axes of an NC... tensor and of per-channel vectors: channels parallel; batch and spatial
/// dims whole when statistics are taken over them, else parallel.
pub(crate) fn bn_axis_maps(
    x: &TensorType,
    batch_statistics: bool,
) -> (Vec<Axis>, Vec<Option<AxisId>>, Vec<Option<AxisId>>) {
    let other = if batch_statistics {
        AxisKind::Statistics
    } else {
        AxisKind::Parallel
    };
    let axes = x
        .shape
        .iter()
        .enumerate()
        .map(|(d, &size)| Axis {
            size,
            kind: if d == 1 { AxisKind::Parallel } else { other },
        })
        .collect();
    (axes, (0..x.rank()).map(Some).collect(), vec![Some(1)])
}

/// `[1, C, 1, ...]`: a per-channel vector's shape for broadcasting against `x`.
pub(crate) fn channel_shape(x: &TensorType) -> Vec<usize> {
    let mut s = vec![1; x.rank()];
    if let Some(c) = x.shape.get(1) {
        s[1] = *c;
    }
    s
}

/// Elements per channel and the channel of flat element `i` of an NC... tensor.
pub(crate) fn per_channel(x: &[usize]) -> (usize, impl Fn(usize) -> usize) {
    let c = x.get(1).copied().unwrap_or(1).max(1);
    let inner: usize = x.iter().skip(2).product::<usize>().max(1);
    let count = x.iter().product::<usize>() / c;
    (count, move |i| (i / inner) % c)
}

/// A small emitter for the elementwise gradient formulas.
struct Emit<'a, 'b> {
    cx: &'a mut VjpCtx<'b>,
}

impl Emit<'_, '_> {
    fn bin(&mut self, kind: BinaryKind, a: ValueId, b: ValueId) -> Result<ValueId, OpError> {
        self.cx.b.emit(Binary { kind }, &[a, b])
    }
    fn scalar(&mut self, like: ValueId, v: f64) -> ValueId {
        let dtype = self.cx.ty(like).dtype;
        self.cx.b.scalar(dtype, v)
    }
    fn scale(&mut self, a: ValueId, v: f64) -> Result<ValueId, OpError> {
        let s = self.scalar(a, v);
        self.bin(BinaryKind::Mul, a, s)
    }
    fn cast(&mut self, a: ValueId, to: DType) -> Result<ValueId, OpError> {
        if self.cx.ty(a).dtype == to {
            Ok(a)
        } else {
            self.cx.b.emit(Cast { to }, &[a])
        }
    }
    /// A per-channel vector reshaped to `[1, C, 1, ...]` in `x`'s dtype.
    fn per_channel(&mut self, v: ValueId, x: &TensorType) -> Result<ValueId, OpError> {
        let v = self.cast(v, x.dtype)?;
        self.cx.b.emit(Reshape::new(channel_shape(x)), &[v])
    }
    /// Sum over every dim but the channel dim, cast to `to`.
    fn channel_sum(&mut self, v: ValueId, to: DType) -> Result<ValueId, OpError> {
        let rank = self.cx.ty(v).rank();
        let axes = [vec![0], (2..rank).collect()].concat();
        let s = self.cx.b.emit(
            Reduce {
                kind: ReduceKind::Sum,
                axes,
                keepdims: false,
            },
            &[v],
        )?;
        self.cast(s, to)
    }
    fn add_opt(
        &mut self,
        a: Option<ValueId>,
        b: Option<ValueId>,
    ) -> Result<Option<ValueId>, OpError> {
        Ok(match (a, b) {
            (Some(a), Some(b)) => Some(self.bin(BinaryKind::Add, a, b)?),
            (a, b) => a.or(b),
        })
    }
}

impl BatchNorm {
    fn training_vjp(&self, cx: &mut VjpCtx<'_>) -> Result<Vec<Option<ValueId>>, OpError> {
        let mut grads = vec![None; cx.inputs.len()];
        if cx.grads.iter().all(Option::is_none) {
            return Ok(grads);
        }
        let need = |i: usize| cx.needs.get(i).copied().unwrap_or(false);
        let (needs_x, needs_scale, needs_bias) = (need(0), need(1), need(2));
        let xt = cx.input_ty(0);
        let (x, scale) = (cx.inputs[0], cx.inputs[1]);
        let (saved_mean, saved_rstd) = (cx.outputs[3], cx.outputs[4]);
        let dy = cx.grad_or_zeros(0)?;
        let outs =
            cx.b.emit_n(BatchNormGrad {}, &[dy, x, scale, saved_mean, saved_rstd])?;
        let [dx, dscale, dbias] = outs[..] else {
            return Err(op_err!("batch_norm_grad produced {} outputs", outs.len()));
        };
        let stat_grads: Vec<Option<ValueId>> =
            (1..5).map(|o| cx.grads.get(o).copied().flatten()).collect();
        let mut dx = dx;
        if needs_x && stat_grads.iter().any(Option::is_some) {
            // the statistics outputs depend on x through the batch mean and variance:
            // d mean / dx = 1/M, d var / dx = 2 (x - mean) / M
            let (m, _) = per_channel(&xt.shape);
            let keep = 1.0 - self.momentum;
            let mut e = Emit { cx };
            let g_run_mean = match stat_grads[0] {
                Some(g) => Some(e.scale(g, keep)?),
                None => None,
            };
            let g_mean = e.add_opt(g_run_mean, stat_grads[2])?;
            let g_run_var = match stat_grads[1] {
                Some(g) => Some(e.scale(g, keep)?),
                None => None,
            };
            let g_rstd_var = match stat_grads[3] {
                Some(g) => {
                    // d rstd / d var = -rstd^3 / 2
                    let r2 = e.bin(BinaryKind::Mul, saved_rstd, saved_rstd)?;
                    let r3 = e.bin(BinaryKind::Mul, r2, saved_rstd)?;
                    let t = e.bin(BinaryKind::Mul, g, r3)?;
                    Some(e.scale(t, -0.5)?)
                }
                None => None,
            };
            let g_var = e.add_opt(g_run_var, g_rstd_var)?;
            let mut term = match g_mean {
                Some(g) => Some(e.per_channel(g, &xt)?),
                None => None,
            };
            if let Some(g) = g_var {
                let gb = e.per_channel(g, &xt)?;
                let mb = e.per_channel(saved_mean, &xt)?;
                let centered = e.bin(BinaryKind::Sub, x, mb)?;
                let t = e.bin(BinaryKind::Mul, centered, gb)?;
                let t = e.scale(t, 2.0)?;
                term = e.add_opt(term, Some(t))?;
            }
            if let Some(t) = term {
                let t = e.scale(t, 1.0 / m as f64)?;
                dx = e.bin(BinaryKind::Add, dx, t)?;
            }
        }
        grads[0] = needs_x.then_some(dx);
        grads[1] = needs_scale.then_some(dscale);
        grads[2] = needs_bias.then_some(dbias);
        Ok(grads)
    }

    fn inference_vjp(&self, cx: &mut VjpCtx<'_>) -> Result<Vec<Option<ValueId>>, OpError> {
        let mut grads = vec![None; cx.inputs.len()];
        let Some(dy) = cx.grads.first().copied().flatten() else {
            return Ok(grads);
        };
        let need = |i: usize| cx.needs.get(i).copied().unwrap_or(false);
        let (needs_x, needs_scale, needs_bias) = (need(0), need(1), need(2));
        let xt = cx.input_ty(0);
        let (scale_dtype, bias_dtype) = (cx.input_ty(1).dtype, cx.input_ty(2).dtype);
        let (x, scale, mean, var) = (cx.inputs[0], cx.inputs[1], cx.inputs[3], cx.inputs[4]);
        let mut e = Emit { cx };
        let eps = e.scalar(var, self.epsilon);
        let v = e.bin(BinaryKind::Add, var, eps)?;
        let rstd = e.cx.b.emit(
            Unary {
                kind: UnaryKind::Rsqrt,
            },
            &[v],
        )?;
        let rstd_b = e.per_channel(rstd, &xt)?;
        if needs_x {
            let scale_b = e.per_channel(scale, &xt)?;
            let k = e.bin(BinaryKind::Mul, scale_b, rstd_b)?;
            grads[0] = Some(e.bin(BinaryKind::Mul, dy, k)?);
        }
        if needs_scale {
            let mean_b = e.per_channel(mean, &xt)?;
            let centered = e.bin(BinaryKind::Sub, x, mean_b)?;
            let xhat = e.bin(BinaryKind::Mul, centered, rstd_b)?;
            let t = e.bin(BinaryKind::Mul, dy, xhat)?;
            grads[1] = Some(e.channel_sum(t, scale_dtype)?);
        }
        if needs_bias {
            grads[2] = Some(e.channel_sum(dy, bias_dtype)?);
        }
        Ok(grads)
    }
}

impl OpSpec for BatchNorm {
    fn infer(&self, inputs: &[&TensorType]) -> Result<Vec<TensorType>, OpError> {
        let [x, scale, bias, mean, var] = inputs else {
            return Err(op_err!(
                "batch_norm takes 5 inputs (x, scale, bias, running_mean, running_var), got {}",
                inputs.len()
            ));
        };
        check_channels(
            x,
            &[
                ("scale", scale),
                ("bias", bias),
                ("running_mean", mean),
                ("running_var", var),
            ],
        )?;
        if !self.training {
            return Ok(vec![(*x).clone()]);
        }
        if x.numel() == 0 {
            return Err(op_err!("batch statistics of an empty batch {x}"));
        }
        Ok(vec![
            (*x).clone(),
            (*mean).clone(),
            (*var).clone(),
            (*mean).clone(),
            (*mean).clone(),
        ])
    }

    fn dims(&self, inputs: &[&TensorType], outputs: &[&TensorType]) -> DimMap {
        if self.infer(inputs).is_err() {
            return DimMap::opaque(inputs, outputs);
        }
        let (axes, x, c) = bn_axis_maps(inputs[0], self.training);
        let mut outs = vec![x.clone()];
        if self.training {
            outs.extend(std::iter::repeat_n(c.clone(), 4));
        }
        DimMap {
            axes,
            inputs: vec![x, c.clone(), c.clone(), c.clone(), c],
            outputs: outs,
        }
    }

    fn cost(&self, inputs: &[&TensorType], outputs: &[&TensorType]) -> Cost {
        let n = inputs.first().map_or(0, |t| t.numel());
        Cost::memory_bound(inputs, outputs, 10.0 * n as f64)
    }

    fn differentiable(&self, i: usize) -> bool {
        // running statistics are buffers
        i < 3
    }

    fn vjp(&self, cx: &mut VjpCtx<'_>) -> Result<Vec<Option<ValueId>>, OpError> {
        if self.training {
            self.training_vjp(cx)
        } else {
            self.inference_vjp(cx)
        }
    }

    fn eval(&self, inputs: &[&Tensor]) -> Result<Vec<Tensor>, OpError> {
        let tys: Vec<TensorType> = inputs.iter().map(|t| t.ty()).collect();
        let outs = self.infer(&tys.iter().collect::<Vec<_>>())?;
        let [x, scale, bias, rmean, rvar] = inputs else {
            return Err(op_err!("batch_norm takes 5 inputs"));
        };
        let c = tys[0].shape[1];
        let (count, chan) = per_channel(&x.shape);
        let (mean, var) = if self.training {
            let mut sum = vec![0.0; c];
            for (i, &v) in x.data.iter().enumerate() {
                sum[chan(i)] += v;
            }
            let mean: Vec<f64> = sum.iter().map(|s| s / count as f64).collect();
            let mut sq = vec![0.0; c];
            for (i, &v) in x.data.iter().enumerate() {
                sq[chan(i)] += (v - mean[chan(i)]).powi(2);
            }
            (
                mean,
                sq.iter().map(|s| s / count as f64).collect::<Vec<f64>>(),
            )
        } else {
            (rmean.data.clone(), rvar.data.clone())
        };
        let rstd: Vec<f64> = var
            .iter()
            .map(|v| 1.0 / (v + self.epsilon).sqrt())
            .collect();
        let y: Vec<f64> = x
            .data
            .iter()
            .enumerate()
            .map(|(i, &v)| {
                let k = chan(i);
                (v - mean[k]) * rstd[k] * scale.data[k] + bias.data[k]
            })
            .collect();
        let mut results = vec![Tensor::new(outs[0].dtype, outs[0].shape.clone(), y)];
        if self.training {
            let blend = |run: &Tensor, batch: &[f64]| -> Vec<f64> {
                run.data
                    .iter()
                    .zip(batch)
                    .map(|(r, b)| r * self.momentum + b * (1.0 - self.momentum))
                    .collect()
            };
            for (o, data) in [blend(rmean, &mean), blend(rvar, &var), mean.clone(), rstd]
                .into_iter()
                .enumerate()
            {
                let t = &outs[o + 1];
                results.push(Tensor::new(t.dtype, t.shape.clone(), data));
            }
        }
        Ok(results)
    }
}

impl crate::builder::GraphBuilder {
    /// Batch normalization of `x` (N, C, ...): one output in inference, five in training
    /// (`y, new_running_mean, new_running_var, saved_mean, saved_rstd`).
    #[allow(clippy::too_many_arguments)]
    pub fn batch_norm(
        &mut self,
        x: ValueId,
        scale: ValueId,
        bias: ValueId,
        mean: ValueId,
        var: ValueId,
        eps: f64,
        momentum: f64,
        training: bool,
    ) -> Result<Vec<ValueId>, AnalyzerError> {
        let op = BatchNorm {
            epsilon: eps,
            momentum,
            training,
        };
        self.node(op, &[x, scale, bias, mean, var])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::gradcheck::{check, rand_tensor};

    fn bn(training: bool) -> BatchNorm {
        BatchNorm {
            epsilon: 1e-5,
            momentum: 0.9,
            training,
        }
    }

    fn params(c: usize) -> Vec<Tensor> {
        let mut var = rand_tensor(&[c], 13);
        for v in &mut var.data {
            *v = v.abs() + 0.5;
        }
        vec![
            rand_tensor(&[c], 10),
            rand_tensor(&[c], 11),
            rand_tensor(&[c], 12),
            var,
        ]
    }

    #[test]
    fn rejects_bad_operands() {
        let x = TensorType::new(DType::F32, [2, 3, 4]);
        let c = TensorType::new(DType::F32, [3]);
        let c4 = TensorType::new(DType::F32, [4]);
        let e = bn(true)
            .infer(&[&x, &c, &c4, &c, &c])
            .expect_err("bias of 4");
        assert!(e.0.contains("bias"), "{e}");
        assert!(bn(true).infer(&[&x, &c, &c, &c]).is_err());
        let xi = TensorType::new(DType::I64, [2, 3]);
        assert!(bn(false).infer(&[&xi, &c, &c, &c, &c]).is_err());
        let empty = TensorType::new(DType::F32, [0, 3]);
        assert!(bn(true).infer(&[&empty, &c, &c, &c, &c]).is_err());
    }

    #[test]
    fn maps_dims() {
        let x = TensorType::new(DType::F32, [2, 3, 4, 5]);
        let c = TensorType::new(DType::F32, [3]);
        let ins = [&x, &c, &c, &c, &c];
        let outs = bn(true).infer(&ins).expect("infer");
        assert_eq!(outs.len(), 5);
        let refs: Vec<&TensorType> = outs.iter().collect();
        let dims = bn(true).dims(&ins, &refs);
        // batch and spatial axes are split with synced statistics (printed like parallel ones)
        assert_eq!(dims.to_einsum(), "abcd,b,b,b,b->abcd,b,b,b,b");
        let kinds: Vec<AxisKind> = dims.axes.iter().map(|a| a.kind).collect();
        use AxisKind::{Parallel, Statistics};
        assert_eq!(kinds, vec![Statistics, Parallel, Statistics, Statistics]);
        let outs = bn(false).infer(&ins).expect("infer");
        assert_eq!(
            bn(false).dims(&ins, &[&outs[0]]).to_einsum(),
            "abcd,b,b,b,b->abcd"
        );
    }

    #[test]
    fn evaluates_training_statistics() {
        // one channel, values 1..4: mean 2.5, population variance 1.25
        let x = Tensor::new(DType::F64, vec![2, 1, 2], vec![1.0, 2.0, 3.0, 4.0]);
        let one = |v: f64| Tensor::new(DType::F64, vec![1], vec![v]);
        let op = BatchNorm {
            epsilon: 0.0,
            momentum: 0.9,
            training: true,
        };
        let outs = op
            .eval(&[&x, &one(2.0), &one(1.0), &one(0.0), &one(1.0)])
            .expect("eval");
        let r = 1.0 / 1.25f64.sqrt();
        let expect_y: Vec<f64> = [-1.5, -0.5, 0.5, 1.5]
            .iter()
            .map(|d| d * r * 2.0 + 1.0)
            .collect();
        assert!(
            outs[0].max_rel_err(&Tensor::new(DType::F64, vec![2, 1, 2], expect_y), 1e-12) < 1e-12
        );
        assert!((outs[1].data[0] - 0.25).abs() < 1e-12);
        assert!((outs[2].data[0] - (0.9 + 0.125)).abs() < 1e-12);
        assert_eq!(outs[3].data, vec![2.5]);
        assert!((outs[4].data[0] - r).abs() < 1e-12);
        // inference uses the running statistics
        let y = BatchNorm {
            training: false,
            ..op
        }
        .eval(&[&x, &one(2.0), &one(1.0), &one(1.0), &one(4.0)])
        .expect("eval")
        .remove(0);
        assert_eq!(y.data, vec![1.0, 2.0, 3.0, 4.0]);
    }

    #[test]
    fn vjp_matches_finite_differences() {
        for training in [true, false] {
            let mut inputs = vec![rand_tensor(&[3, 2, 2], 1)];
            inputs.extend(params(2));
            check(bn(training), &inputs, 1e-5);
        }
        let mut inputs = vec![rand_tensor(&[2, 3, 2, 2], 2)];
        inputs.extend(params(3));
        check(bn(true), &inputs, 1e-5);
    }
}
