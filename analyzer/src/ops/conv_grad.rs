//! `conv_grad`: the backward of [`Conv`](super::Conv), one node per operand.
//!
//! - w.r.t. the input (inputs `dy, w`): a transposed convolution; output channels are
//!   contracted, input channels and the batch parallel.
//! - w.r.t. the weight (inputs `dy, x`): a correlation of `dy` with `x`; the batch is
//!   contracted (data-parallel training leaves partial weight gradients to all-reduce), both
//!   channel dims parallel.
//!
//! With `groups > 1` the group axis plays the channel role, as in the forward map. Spatial dims
//! are whole. Each costs the forward conv's multiply-adds.

use super::conv::{ConvShape, Window};
use super::*;
use crate::dtype::TensorType;
use crate::error::OpError;
use crate::graph::ValueId;
use crate::op_err;
use crate::tensor::Tensor;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
/// Backward of [`Conv`](super::Conv): w.r.t. the input (inputs `dy, w`, output shaped
/// `other_shape` = x's shape) or the weight (inputs `dy, x`, output shaped `other_shape` = w's).
pub struct ConvGrad {
    pub conv: super::conv::Conv,
    pub wrt: ConvGradWrt,
    pub other_shape: Vec<usize>,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConvGradWrt {
    Input,
    Weight,
}

impl ConvGrad {
    /// The forward conv's geometry and the type of the result, after checking that `dy` is
    /// what the forward conv produces.
    fn shape(&self, inputs: &[&TensorType]) -> Result<(ConvShape, TensorType), OpError> {
        let [dy, operand] = inputs else {
            return Err(op_err!(
                "conv_grad takes 2 inputs (dy, {}), got {}",
                self.operand_name(),
                inputs.len()
            ));
        };
        let result = TensorType::new(dy.dtype, self.other_shape.clone());
        let s = match self.wrt {
            ConvGradWrt::Input => self.conv.shape(&result, operand, None)?,
            ConvGradWrt::Weight => self.conv.shape(operand, &result, None)?,
        };
        let expect = [vec![s.n, s.c_out], s.window.output.clone()].concat();
        if dy.shape != expect {
            return Err(op_err!("dy is {dy}, the forward conv produces {expect:?}"));
        }
        Ok((s, result))
    }
    fn operand_name(&self) -> &'static str {
        match self.wrt {
            ConvGradWrt::Input => "w",
            ConvGradWrt::Weight => "x",
        }
    }
}

impl OpSpec for ConvGrad {
    fn infer(&self, inputs: &[&TensorType]) -> Result<Vec<TensorType>, OpError> {
        Ok(vec![self.shape(inputs)?.1])
    }

    fn dims(&self, inputs: &[&TensorType], outputs: &[&TensorType]) -> DimMap {
        let Ok((s, _)) = self.shape(inputs) else {
            return DimMap::opaque(inputs, outputs);
        };
        use AxisKind::{Contracted, Parallel};
        let kinds = match self.wrt {
            ConvGradWrt::Input => [Parallel, Contracted, Parallel],
            ConvGradWrt::Weight => [Contracted, Parallel, Parallel],
        };
        let (axes, x, w, dy, _) = self.conv.axis_maps(&s, kinds);
        let (operand, result) = match self.wrt {
            ConvGradWrt::Input => (w, x),
            ConvGradWrt::Weight => (x, w),
        };
        DimMap {
            axes,
            inputs: vec![dy, operand],
            outputs: vec![result],
        }
    }

    fn cost(&self, inputs: &[&TensorType], outputs: &[&TensorType]) -> Cost {
        let mut c = Cost::data_movement(inputs, outputs);
        if let Ok((s, _)) = self.shape(inputs) {
            c.matmul_flops = self.conv.matmul_flops(&s);
            c.flops = c.matmul_flops;
        }
        c
    }

    fn vjp(&self, _cx: &mut VjpCtx<'_>) -> Result<Vec<Option<ValueId>>, OpError> {
        Err(op_err!(
            "conv_grad has no gradient (second-order gradients are unsupported)"
        ))
    }

    fn eval(&self, inputs: &[&Tensor]) -> Result<Vec<Tensor>, OpError> {
        let tys: Vec<TensorType> = inputs.iter().map(|t| t.ty()).collect();
        let (s, out) = self.shape(&tys.iter().collect::<Vec<_>>())?;
        let (dy, operand) = (inputs[0], inputs[1]);
        let win: &Window = &s.window;
        let g = self.conv.groups;
        let (cin_g, cout_g) = (s.c_in / g, s.c_out / g);
        let (in_len, out_len, k_len) = (win.input_len(), win.output_len(), win.kernel_len());
        let mut result = vec![0.0; out.numel()];
        for n in 0..s.n {
            for gi in 0..g {
                for co in gi * cout_g..(gi + 1) * cout_g {
                    let dy_base = (n * s.c_out + co) * out_len;
                    for cl in 0..cin_g {
                        let x_base = (n * s.c_in + gi * cin_g + cl) * in_len;
                        let w_base = (co * cin_g + cl) * k_len;
                        win.for_each_tap(|o, oi, k, ki| {
                            if let Ok(p) = win.tap(oi, ki) {
                                let d = dy.data[dy_base + o];
                                match self.wrt {
                                    ConvGradWrt::Input => {
                                        result[x_base + p] += d * operand.data[w_base + k]
                                    }
                                    ConvGradWrt::Weight => {
                                        result[w_base + k] += d * operand.data[x_base + p]
                                    }
                                }
                            }
                        });
                    }
                }
            }
        }
        Ok(vec![Tensor::new(out.dtype, out.shape, result)])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::DType;
    use crate::ops::Conv;

    fn conv() -> Conv {
        Conv {
            strides: vec![1, 1],
            pads: vec![[0, 0]; 2],
            dilations: vec![1, 1],
            groups: 1,
        }
    }

    #[test]
    fn rejects_mismatched_dy() {
        let op = ConvGrad {
            conv: conv(),
            wrt: ConvGradWrt::Input,
            other_shape: vec![2, 3, 5, 5],
        };
        let w = TensorType::new(DType::F32, [4, 3, 3, 3]);
        let dy = TensorType::new(DType::F32, [2, 4, 4, 4]);
        let e = op.infer(&[&dy, &w]).expect_err("3x3 output");
        assert!(e.0.contains("[2, 4, 3, 3]"), "{e}");
    }

    #[test]
    fn maps_dims_per_operand() {
        let x = TensorType::new(DType::F32, [2, 3, 5, 5]);
        let w = TensorType::new(DType::F32, [4, 3, 3, 3]);
        let dy = TensorType::new(DType::F32, [2, 4, 3, 3]);
        let op = ConvGrad {
            conv: conv(),
            wrt: ConvGradWrt::Input,
            other_shape: x.shape.clone(),
        };
        assert_eq!(op.infer(&[&dy, &w]).expect("infer")[0], x);
        let m = op.dims(&[&dy, &w], &[&x]);
        assert_eq!(m.to_einsum(), "abHI,bcFG->acDE");
        assert_eq!(m.axes[1].kind, AxisKind::Contracted);
        let op = ConvGrad {
            conv: conv(),
            wrt: ConvGradWrt::Weight,
            other_shape: w.shape.clone(),
        };
        assert_eq!(op.infer(&[&dy, &x]).expect("infer")[0], w);
        let m = op.dims(&[&dy, &x], &[&w]);
        assert_eq!(m.to_einsum(), "abHI,acDE->bcFG");
        assert_eq!(m.axes[0].kind, AxisKind::Contracted);
        let c = op.cost(&[&dy, &x], &[&w]);
        assert_eq!(c.matmul_flops, 2.0 * 2.0 * 4.0 * 9.0 * 3.0 * 9.0);
    }

    #[test]
    fn evaluates_hand_example() {
        // y = conv(x, w) with a 2x2 kernel over 3x3: dx spreads dy by w, dw correlates
        let dy = Tensor::full(DType::F64, vec![1, 1, 2, 2], 1.0);
        let w = Tensor::new(DType::F64, vec![1, 1, 2, 2], vec![1.0, 2.0, 3.0, 4.0]);
        let op = ConvGrad {
            conv: conv(),
            wrt: ConvGradWrt::Input,
            other_shape: vec![1, 1, 3, 3],
        };
        let dx = op.eval(&[&dy, &w]).expect("eval").remove(0);
        assert_eq!(dx.data, vec![1.0, 3.0, 2.0, 4.0, 10.0, 6.0, 3.0, 7.0, 4.0]);
        let x = Tensor::new(
            DType::F64,
            vec![1, 1, 3, 3],
            (1..=9).map(f64::from).collect(),
        );
        let op = ConvGrad {
            conv: conv(),
            wrt: ConvGradWrt::Weight,
            other_shape: vec![1, 1, 2, 2],
        };
        let dw = op.eval(&[&dy, &x]).expect("eval").remove(0);
        assert_eq!(dw.data, vec![12.0, 16.0, 24.0, 28.0]);
        // both are checked against finite differences by conv's gradcheck
    }
}
