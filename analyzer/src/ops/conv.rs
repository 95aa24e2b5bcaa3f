//! `conv`: N-d convolution over NC... tensors with strides, pads, dilations and groups (ONNX
//! `Conv` after the importer resolved `auto_pad` and defaults; ResNet's stem and blocks).
//!
//! Dim map: the batch is parallel; output channels are parallel (weight dim 0, output dim 1,
//! bias); with `groups == 1` input channels are contracted (a split leaves partial sums, as in
//! a row-parallel linear layer); with `groups > 1` the one splittable channel axis is the group
//! index, of size `groups`, tying the channel dims of input, weight rows and output (a shard
//! holds `groups / k` whole groups and runs a conv with `groups / k` groups). Spatial dims are
//! whole: a split would need halo exchange, which this planner does not model.
//!
//! The vjp is two [`ConvGrad`](super::ConvGrad) nodes (input and weight) and a sum of `dy` for
//! the bias. The sliding-window geometry here ([`Window`]) is shared with pooling.

use super::conv_grad::ConvGradWrt;
use super::reduce::ReduceKind;
use super::*;
use crate::dtype::TensorType;
use crate::error::{AnalyzerError, OpError};
use crate::graph::ValueId;
use crate::op_err;
use crate::tensor::{for_each_index, Tensor};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
/// N-d convolution (NCHW...): inputs `x, w[, b]`, `w` shaped `[C_out, C_in/groups, k...]`.
/// `pads[d] = [before, after]` per spatial dim.
pub struct Conv {
    pub strides: Vec<usize>,
    pub pads: Vec<[usize; 2]>,
    pub dilations: Vec<usize>,
    pub groups: usize,
}

/// Geometry of a sliding window over the spatial dims (conv and pooling).
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Window {
    pub input: Vec<usize>,
    pub output: Vec<usize>,
    pub kernel: Vec<usize>,
    pub strides: Vec<usize>,
    pub pads: Vec<[usize; 2]>,
    pub dilations: Vec<usize>,
}

impl Window {
    /// Checks the attributes against `input` spatial dims and computes the output dims (ONNX /
    /// PyTorch formula; with `ceil_mode` a last window starting in the end padding is dropped).
    pub fn new(
        input: &[usize],
        kernel: &[usize],
        strides: &[usize],
        pads: &[[usize; 2]],
        dilations: &[usize],
        ceil_mode: bool,
    ) -> Result<Window, OpError> {
        let n = input.len();
        if n == 0 {
            return Err(op_err!("no spatial dims (input must be N, C, spatial...)"));
        }
        for (what, len) in [
            ("kernel", kernel.len()),
            ("strides", strides.len()),
            ("pads", pads.len()),
            ("dilations", dilations.len()),
        ] {
            if len != n {
                return Err(op_err!("{what} has {len} entries for {n} spatial dims"));
            }
        }
        let mut output = Vec::with_capacity(n);
        for d in 0..n {
            let (k, s, dil, [pb, pa]) = (kernel[d], strides[d], dilations[d], pads[d]);
            if k == 0 || s == 0 || dil == 0 {
                return Err(op_err!(
                    "spatial dim {d}: kernel {k}, stride {s} and dilation {dil} must be at least 1"
                ));
            }
            let overflow = || op_err!("spatial dim {d}: window arithmetic overflows");
            let extent = dil
                .checked_mul(k - 1)
                .and_then(|e| e.checked_add(1))
                .ok_or_else(overflow)?;
            let padded = input[d]
                .checked_add(pb)
                .and_then(|p| p.checked_add(pa))
                .ok_or_else(overflow)?;
            if padded < extent {
                return Err(op_err!(
                    "spatial dim {d}: kernel extent {extent} is larger than the padded input {padded}"
                ));
            }
            let span = padded - extent;
            let mut out = if ceil_mode {
                span.div_ceil(s) + 1
            } else {
                span / s + 1
            };
            if ceil_mode && (out - 1).saturating_mul(s) >= input[d] + pb {
                out -= 1;
            }
            output.push(out);
        }
        Ok(Window {
            input: input.to_vec(),
            output,
            kernel: kernel.to_vec(),
            strides: strides.to_vec(),
            pads: pads.to_vec(),
            dilations: dilations.to_vec(),
        })
    }

    /// Elements of one spatial block of the input / output / kernel.
    pub fn input_len(&self) -> usize {
        self.input.iter().product()
    }
    pub fn output_len(&self) -> usize {
        self.output.iter().product()
    }
    pub fn kernel_len(&self) -> usize {
        self.kernel.iter().product()
    }

    /// Where tap `k` of output position `o` reads: `Ok(flat input offset)` inside the input,
    /// `Err(true)` in the padding, `Err(false)` beyond the padding (ceil-mode windows).
    pub fn tap(&self, o: &[usize], k: &[usize]) -> Result<usize, bool> {
        let mut flat = 0;
        let mut padded = false;
        let mut outside = false;
        for d in 0..self.input.len() {
            let p = o[d] * self.strides[d] + k[d] * self.dilations[d];
            let [pb, _] = self.pads[d];
            if p < pb {
                padded = true;
                continue;
            }
            let p = p - pb;
            if p >= self.input[d] {
                if p < self.input[d] + self.pads[d][1] {
                    padded = true;
                } else {
                    outside = true;
                }
                continue;
            }
            flat = flat * self.input[d] + p;
        }
        if outside {
            Err(false)
        } else if padded {
            Err(true)
        } else {
            Ok(flat)
        }
    }

    /// Every (flat output position, output index) pair, then every kernel tap, in row-major
    /// order: `f(flat_out, out_idx, flat_tap, tap_idx)`.
    pub fn for_each_tap(&self, mut f: impl FnMut(usize, &[usize], usize, &[usize])) {
        let mut o_flat = 0;
        for_each_index(&self.output, |o| {
            let mut k_flat = 0;
            for_each_index(&self.kernel, |k| {
                f(o_flat, o, k_flat, k);
                k_flat += 1;
            });
            o_flat += 1;
        });
    }
}

/// Shapes of a checked conv: (window, N, C_in, C_out).
pub(crate) struct ConvShape {
    pub window: Window,
    pub n: usize,
    pub c_in: usize,
    pub c_out: usize,
}

impl Conv {
    /// Checks `x` and `w` (and an optional bias) against the attributes.
    pub(crate) fn shape(
        &self,
        x: &TensorType,
        w: &TensorType,
        bias: Option<&TensorType>,
    ) -> Result<ConvShape, OpError> {
        if x.rank() < 3 {
            return Err(op_err!("input {x} must be N, C, spatial..."));
        }
        if w.rank() != x.rank() {
            return Err(op_err!(
                "weight {w} must have the rank of the input {x} (C_out, C_in/groups, kernel...)"
            ));
        }
        for t in [Some(w), bias].into_iter().flatten() {
            if t.dtype != x.dtype {
                return Err(op_err!("operands mix {} and {}", x.dtype, t.dtype));
            }
        }
        if !x.dtype.is_float() {
            return Err(op_err!("conv on {} is not supported", x.dtype));
        }
        let g = self.groups;
        let (c_in, c_out) = (x.shape[1], w.shape[0]);
        if g == 0 || c_in % g != 0 || c_out % g != 0 {
            return Err(op_err!(
                "groups {g} must divide the input channels {c_in} and output channels {c_out}"
            ));
        }
        if w.shape[1] != c_in / g {
            return Err(op_err!(
                "weight {w} expects {} input channels per group, the input {x} has {c_in} channels in {g} groups",
                w.shape[1]
            ));
        }
        if let Some(b) = bias {
            if b.shape != [c_out] {
                return Err(op_err!("bias {b} must be [{c_out}]"));
            }
        }
        let window = Window::new(
            &x.shape[2..],
            &w.shape[2..],
            &self.strides,
            &self.pads,
            &self.dilations,
            false,
        )?;
        Ok(ConvShape {
            window,
            n: x.shape[0],
            c_in,
            c_out,
        })
    }

    /// `2 * N * C_out * out_spatial * C_in/groups * kernel`: the multiply-adds of the conv.
    pub(crate) fn matmul_flops(&self, s: &ConvShape) -> f64 {
        2.0 * s.n as f64
            * s.c_out as f64
            * s.window.output_len() as f64
            * (s.c_in / self.groups.max(1)) as f64
            * s.window.kernel_len() as f64
    }

    /// Dim maps of x-, w- and y-shaped tensors (and the bias), with the kinds of the batch,
    /// output-channel and input-channel axes given (shared with [`ConvGrad`](super::ConvGrad),
    /// where a different axis is summed): returns (axes, x map, w map, y map, bias map).
    #[allow(clippy::type_complexity)]
    pub(crate) fn axis_maps(
        &self,
        s: &ConvShape,
        [batch_kind, c_out_kind, c_in_kind]: [AxisKind; 3],
    ) -> (
        Vec<Axis>,
        Vec<Option<AxisId>>,
        Vec<Option<AxisId>>,
        Vec<Option<AxisId>>,
        Vec<Option<AxisId>>,
    ) {
        let mut axes = vec![];
        let mut new_axis = |size, kind| {
            axes.push(Axis { size, kind });
            Some(axes.len() - 1)
        };
        let n = new_axis(s.n, batch_kind);
        let (c_in, c_in_w, c_out) = if self.groups == 1 {
            let c_out = new_axis(s.c_out, c_out_kind);
            let c_in = new_axis(s.c_in, c_in_kind);
            (c_in, c_in, c_out)
        } else {
            let group = new_axis(self.groups, AxisKind::Parallel);
            (
                group,
                new_axis(s.c_in / self.groups, AxisKind::Whole),
                group,
            )
        };
        let x_sp: Vec<_> = s
            .window
            .input
            .iter()
            .map(|&d| new_axis(d, AxisKind::Whole))
            .collect();
        let k_sp: Vec<_> = s
            .window
            .kernel
            .iter()
            .map(|&d| new_axis(d, AxisKind::Whole))
            .collect();
        let y_sp: Vec<_> = s
            .window
            .output
            .iter()
            .map(|&d| new_axis(d, AxisKind::Whole))
            .collect();
        let x = [vec![n, c_in], x_sp].concat();
        let w = [vec![c_out, c_in_w], k_sp].concat();
        let y = [vec![n, c_out], y_sp].concat();
        (axes, x, w, y, vec![c_out])
    }
}

/// The conv of `x` by `w`, in f64 (bias excluded), shaped `[N, C_out, out...]`.
pub(crate) fn conv_forward(conv: &Conv, s: &ConvShape, x: &Tensor, w: &Tensor) -> Vec<f64> {
    let win = &s.window;
    let (g, cin_g, cout_g) = (conv.groups, s.c_in / conv.groups, s.c_out / conv.groups);
    let (in_len, out_len, k_len) = (win.input_len(), win.output_len(), win.kernel_len());
    let mut y = vec![0.0; s.n * s.c_out * out_len];
    for n in 0..s.n {
        for gi in 0..g {
            for co in gi * cout_g..(gi + 1) * cout_g {
                let y_base = (n * s.c_out + co) * out_len;
                for cl in 0..cin_g {
                    let x_base = (n * s.c_in + gi * cin_g + cl) * in_len;
                    let w_base = (co * cin_g + cl) * k_len;
                    win.for_each_tap(|o, oi, k, ki| {
                        if let Ok(p) = win.tap(oi, ki) {
                            y[y_base + o] += x.data[x_base + p] * w.data[w_base + k];
                        }
                    });
                }
            }
        }
    }
    y
}

impl OpSpec for Conv {
    fn infer(&self, inputs: &[&TensorType]) -> Result<Vec<TensorType>, OpError> {
        let (x, w, b) = match inputs {
            [x, w] => (x, w, None),
            [x, w, b] => (x, w, Some(*b)),
            _ => {
                return Err(op_err!(
                    "conv takes 2 or 3 inputs (x, w[, b]), got {}",
                    inputs.len()
                ))
            }
        };
        let s = self.shape(x, w, b)?;
        let shape = [vec![s.n, s.c_out], s.window.output.clone()].concat();
        Ok(vec![TensorType::new(x.dtype, shape)])
    }

    fn dims(&self, inputs: &[&TensorType], outputs: &[&TensorType]) -> DimMap {
        if self.infer(inputs).is_err() {
            return DimMap::opaque(inputs, outputs);
        }
        let Ok(s) = self.shape(inputs[0], inputs[1], None) else {
            return DimMap::opaque(inputs, outputs);
        };
        let (axes, x, w, y, b) = self.axis_maps(
            &s,
            [AxisKind::Parallel, AxisKind::Parallel, AxisKind::Contracted],
        );
        let mut ins = vec![x, w];
        if inputs.len() == 3 {
            ins.push(b);
        }
        DimMap {
            axes,
            inputs: ins,
            outputs: vec![y],
        }
    }

    fn cost(&self, inputs: &[&TensorType], outputs: &[&TensorType]) -> Cost {
        let mut c = Cost::data_movement(inputs, outputs);
        if let (Some(x), Some(w)) = (inputs.first(), inputs.get(1)) {
            if let Ok(s) = self.shape(x, w, None) {
                c.matmul_flops = self.matmul_flops(&s);
                let bias_adds = if inputs.len() == 3 {
                    outputs.first().map_or(0, |y| y.numel())
                } else {
                    0
                };
                c.flops = c.matmul_flops + bias_adds as f64;
            }
        }
        c
    }

    fn vjp(&self, cx: &mut VjpCtx<'_>) -> Result<Vec<Option<ValueId>>, OpError> {
        let mut grads = vec![None; cx.inputs.len()];
        let Some(dy) = cx.grads.first().copied().flatten() else {
            return Ok(grads);
        };
        let need = |i: usize| cx.needs.get(i).copied().unwrap_or(false);
        let (x, w) = (cx.inputs[0], cx.inputs[1]);
        if need(0) {
            let op = ConvGrad {
                conv: self.clone(),
                wrt: ConvGradWrt::Input,
                other_shape: cx.ty(x).shape,
            };
            grads[0] = Some(cx.b.emit(op, &[dy, w])?);
        }
        if need(1) {
            let op = ConvGrad {
                conv: self.clone(),
                wrt: ConvGradWrt::Weight,
                other_shape: cx.ty(w).shape,
            };
            grads[1] = Some(cx.b.emit(op, &[dy, x])?);
        }
        if cx.inputs.len() == 3 && need(2) {
            let rank = cx.ty(dy).rank();
            let axes = [vec![0], (2..rank).collect()].concat();
            let op = Reduce {
                kind: ReduceKind::Sum,
                axes,
                keepdims: false,
            };
            grads[2] = Some(cx.b.emit(op, &[dy])?);
        }
        Ok(grads)
    }

    fn eval(&self, inputs: &[&Tensor]) -> Result<Vec<Tensor>, OpError> {
        let tys: Vec<TensorType> = inputs.iter().map(|t| t.ty()).collect();
        let out = self.infer(&tys.iter().collect::<Vec<_>>())?.remove(0);
        let s = self.shape(&tys[0], &tys[1], None)?;
        let mut y = conv_forward(self, &s, inputs[0], inputs[1]);
        if let Some(b) = inputs.get(2) {
            let out_len = s.window.output_len();
            for (i, v) in y.iter_mut().enumerate() {
                *v += b.data[(i / out_len) % s.c_out];
            }
        }
        Ok(vec![Tensor::new(out.dtype, out.shape, y)])
    }
}

impl crate::builder::GraphBuilder {
    /// N-d convolution of `x` (N, C_in, spatial...) by `w` (C_out, C_in/groups, kernel...),
    /// plus an optional bias `[C_out]`; one stride, `[before, after]` pad and dilation per
    /// spatial dim.
    #[allow(clippy::too_many_arguments)]
    pub fn conv(
        &mut self,
        x: ValueId,
        w: ValueId,
        b: Option<ValueId>,
        strides: &[usize],
        pads: &[[usize; 2]],
        dilations: &[usize],
        groups: usize,
    ) -> Result<ValueId, AnalyzerError> {
        let op = Conv {
            strides: strides.to_vec(),
            pads: pads.to_vec(),
            dilations: dilations.to_vec(),
            groups,
        };
        let mut inputs = vec![x, w];
        inputs.extend(b);
        self.node1(op, &inputs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::DType;
    use crate::ops::gradcheck::{check, rand_tensor};

    fn conv2d(stride: usize, pad: usize, dil: usize, groups: usize) -> Conv {
        Conv {
            strides: vec![stride; 2],
            pads: vec![[pad, pad]; 2],
            dilations: vec![dil; 2],
            groups,
        }
    }

    #[test]
    fn rejects_bad_shapes() {
        let f = |s: &[usize]| TensorType::new(DType::F32, s);
        let x = f(&[2, 4, 5, 5]);
        let cases = [
            (
                conv2d(1, 0, 1, 1),
                f(&[8, 3, 3, 3]),
                "input channels per group",
            ),
            (conv2d(1, 0, 1, 3), f(&[6, 2, 3, 3]), "groups 3 must divide"),
            (
                conv2d(1, 0, 1, 1),
                f(&[8, 4, 7, 7]),
                "larger than the padded input",
            ),
            (
                conv2d(1, 0, 3, 1),
                f(&[8, 4, 3, 3]),
                "larger than the padded input",
            ),
            (conv2d(0, 0, 1, 1), f(&[8, 4, 3, 3]), "at least 1"),
            (conv2d(1, 0, 1, 1), f(&[8, 4, 3]), "rank"),
        ];
        for (op, w, msg) in cases {
            let e = op.infer(&[&x, &w]).expect_err(msg);
            assert!(e.0.contains(msg), "{msg}: {e}");
        }
        let short = Conv {
            strides: vec![1],
            ..conv2d(1, 0, 1, 1)
        };
        assert!(short.infer(&[&x, &f(&[8, 4, 3, 3])]).is_err());
        let bias = f(&[7]);
        assert!(conv2d(1, 0, 1, 1)
            .infer(&[&x, &f(&[8, 4, 3, 3]), &bias])
            .is_err());
    }

    #[test]
    fn infers_dims_and_cost() {
        let x = TensorType::new(DType::F32, [2, 3, 8, 8]);
        let w = TensorType::new(DType::F32, [4, 3, 3, 3]);
        let b = TensorType::new(DType::F32, [4]);
        let op = conv2d(2, 1, 1, 1);
        let y = op.infer(&[&x, &w, &b]).expect("infer").remove(0);
        assert_eq!(y.shape, vec![2, 4, 4, 4]);
        let m = op.dims(&[&x, &w, &b], &[&y]);
        assert_eq!(m.to_einsum(), "acDE,bcFG,b->abHI");
        assert_eq!(m.axes[2].kind, AxisKind::Contracted);
        let c = op.cost(&[&x, &w, &b], &[&y]);
        assert_eq!(c.matmul_flops, 2.0 * 2.0 * 4.0 * 16.0 * 3.0 * 9.0);
        // grouped: the group axis ties input channels, weight rows and output channels
        let w = TensorType::new(DType::F32, [6, 1, 3, 3]);
        let op = conv2d(1, 1, 1, 3);
        let y = op.infer(&[&x, &w]).expect("infer").remove(0);
        assert_eq!(y.shape, vec![2, 6, 8, 8]);
        assert_eq!(op.dims(&[&x, &w], &[&y]).to_einsum(), "abDE,bCFG->abHI");
    }

    #[test]
    fn evaluates_hand_example() {
        // 1x1x3x3 input, 2x2 kernel of ones, pad 0: sums of 2x2 windows, plus bias
        let x = Tensor::new(
            DType::F64,
            vec![1, 1, 3, 3],
            (1..=9).map(f64::from).collect(),
        );
        let w = Tensor::full(DType::F64, vec![1, 1, 2, 2], 1.0);
        let b = Tensor::new(DType::F64, vec![1], vec![0.5]);
        let y = conv2d(1, 0, 1, 1)
            .eval(&[&x, &w, &b])
            .expect("eval")
            .remove(0);
        assert_eq!(y.data, vec![12.5, 16.5, 24.5, 28.5]);
        // stride 2 with pad 1 reads the corners only
        let w = Tensor::full(DType::F64, vec![1, 1, 1, 1], 2.0);
        let y = conv2d(2, 1, 1, 1).eval(&[&x, &w]).expect("eval").remove(0);
        assert_eq!(y.shape, vec![1, 1, 3, 3]);
        assert_eq!(y.data, vec![0.0, 0.0, 0.0, 0.0, 10.0, 0.0, 0.0, 0.0, 0.0]);
        // dilation 2 picks the four corners
        let w = Tensor::full(DType::F64, vec![1, 1, 2, 2], 1.0);
        let y = conv2d(1, 0, 2, 1).eval(&[&x, &w]).expect("eval").remove(0);
        assert_eq!(y.data, vec![20.0]);
    }

    #[test]
    fn vjp_matches_finite_differences() {
        let op = Conv {
            strides: vec![2, 1],
            pads: vec![[1, 0], [1, 1]],
            dilations: vec![1, 2],
            groups: 1,
        };
        check(
            op,
            &[
                rand_tensor(&[2, 2, 5, 4], 1),
                rand_tensor(&[3, 2, 2, 2], 2),
                rand_tensor(&[3], 3),
            ],
            1e-6,
        );
        // grouped 1-d conv without bias
        let op = Conv {
            strides: vec![1],
            pads: vec![[1, 1]],
            dilations: vec![1],
            groups: 2,
        };
        check(
            op,
            &[rand_tensor(&[1, 4, 5], 4), rand_tensor(&[6, 2, 3], 5)],
            1e-6,
        );
    }
}
