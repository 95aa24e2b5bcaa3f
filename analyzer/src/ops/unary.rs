//! `unary`: elementwise function of one tensor (ONNX Identity, Neg, Abs, Exp, Log, Sqrt,
//! Reciprocal, Sin, Cos, Tanh, Sigmoid, Relu, Erf, Floor, Ceil, Sign, Not, IsNaN, IsInf, and the
//! fused activations SiLU and both GELUs that exporters spell as several nodes).
//!
//! One op because the planner sees them all alike: every dim a parallel axis, a handful of flops
//! per element. Activations are kept fused (`Gelu` rather than its erf formula) so that the
//! profiler charges one read and one write, as the fused kernel does. Rounding, sign and the bool
//! predicates have no gradient: they are marked non-differentiable and their vjp gives none.

use super::*;
use crate::dtype::{DType, TensorType};
use crate::error::{AnalyzerError, OpError};
use crate::graph::ValueId;
use crate::op_err;
use crate::ops::binary::{bin, offset, scale, BinaryKind};
use crate::tensor::Tensor;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
/// Elementwise function of one tensor.
pub struct Unary {
    pub kind: UnaryKind,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UnaryKind {
    Identity,
    Neg,
    Abs,
    Exp,
    Log,
    Sqrt,
    Rsqrt,
    Reciprocal,
    Sin,
    Cos,
    Tanh,
    Sigmoid,
    Relu,
    /// x * sigmoid(x)
    Silu,
    /// exact GELU, 0.5 x (1 + erf(x / sqrt 2))
    Gelu,
    /// tanh approximation of GELU (GPT-2's `gelu_new`)
    GeluTanh,
    Erf,
    Floor,
    Ceil,
    Sign,
    /// logical not (bool -> bool)
    Not,
    /// bool result
    IsNan,
    /// bool result
    IsInf,
}

/// `sqrt(2 / pi)`, the scale inside the tanh approximation of GELU.
const SQRT_2_OVER_PI: f64 = 0.797_884_560_802_865_4;
/// The cubic coefficient of the tanh approximation of GELU.
const GELU_TANH_K: f64 = 0.044_715;

impl UnaryKind {
    /// Whether a gradient flows through this kind.
    pub fn has_gradient(self) -> bool {
        use UnaryKind::*;
        !matches!(self, Floor | Ceil | Sign | Not | IsNan | IsInf)
    }

    /// Vector flops per element: 1 for a compare / negate / round, 2 for a division or square
    /// root, 4 for a transcendental (exp, log, sin, tanh, erf: a short polynomial after range
    /// reduction), more for the activations built from them.
    pub fn flops_per_element(self) -> f64 {
        use UnaryKind::*;
        match self {
            Identity => 0.0,
            Neg | Abs | Relu | Floor | Ceil | Sign | Not | IsNan | IsInf => 1.0,
            Sqrt | Rsqrt | Reciprocal => 2.0,
            Exp | Log | Sin | Cos | Tanh | Erf => 4.0,
            Sigmoid => 6.0,
            Silu => 7.0,
            Gelu => 8.0,
            GeluTanh => 10.0,
        }
    }

    /// The reference function on one element.
    pub fn apply(self, x: f64) -> f64 {
        use UnaryKind::*;
        let t = |c: bool| if c { 1.0 } else { 0.0 };
        match self {
            Identity => x,
            Neg => -x,
            Abs => x.abs(),
            Exp => x.exp(),
            Log => x.ln(),
            Sqrt => x.sqrt(),
            Rsqrt => 1.0 / x.sqrt(),
            Reciprocal => 1.0 / x,
            Sin => x.sin(),
            Cos => x.cos(),
            Tanh => x.tanh(),
            Sigmoid => sigmoid(x),
            Relu if x.is_nan() => x,
            Relu => x.max(0.0),
            Silu => x * sigmoid(x),
            Gelu => 0.5 * x * (1.0 + erf(x / std::f64::consts::SQRT_2)),
            GeluTanh => 0.5 * x * (1.0 + (SQRT_2_OVER_PI * (x + GELU_TANH_K * x * x * x)).tanh()),
            Erf => erf(x),
            Floor => x.floor(),
            Ceil => x.ceil(),
            Sign if x.is_nan() => x,
            Sign => t(x > 0.0) - t(x < 0.0),
            Not => t(x == 0.0),
            IsNan => t(x.is_nan()),
            IsInf => t(x.is_infinite()),
        }
    }
}

fn sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

/// The error function to about 1e-14: its Maclaurin series below 2.5 (terms stay small enough
/// there that cancellation costs under two digits), the continued fraction of erfc above.
pub fn erf(x: f64) -> f64 {
    if x.is_nan() {
        return x;
    }
    let ax = x.abs();
    let r = if ax < 2.5 {
        let (mut sum, mut term) = (ax, ax);
        for n in 1..200 {
            term *= -ax * ax / n as f64;
            let d = term / (2 * n + 1) as f64;
            sum += d;
            if d.abs() <= 1e-17 * sum.abs() {
                break;
            }
        }
        std::f64::consts::FRAC_2_SQRT_PI * sum
    } else if ax < 27.0 {
        // erfc(x) = exp(-x^2) / sqrt(pi) / (x + (1/2) / (x + 1 / (x + (3/2) / (x + ...))))
        let mut f = ax;
        for k in (1..=60).rev() {
            f = ax + (k as f64 / 2.0) / f;
        }
        1.0 - (-ax * ax).exp() / (std::f64::consts::PI.sqrt() * f)
    } else {
        1.0
    };
    r.copysign(x)
}

/// `kind(x)` inside a vjp.
pub(crate) fn un(b: &mut GraphBuilder, kind: UnaryKind, x: ValueId) -> Result<ValueId, OpError> {
    b.emit(Unary { kind }, &[x])
}

impl OpSpec for Unary {
    fn infer(&self, inputs: &[&TensorType]) -> Result<Vec<TensorType>, OpError> {
        use UnaryKind::*;
        let [x] = inputs else {
            return Err(op_err!("takes 1 input, got {}", inputs.len()));
        };
        let k = self.kind;
        let d = x.dtype;
        let out = match k {
            Identity => d,
            Not if d == DType::Bool => DType::Bool,
            Not => return Err(op_err!("Not takes bool, got {d}")),
            IsNan | IsInf if d.is_float() => DType::Bool,
            Neg | Abs | Sign | Relu if d != DType::Bool => d,
            _ if d.is_float() => d,
            _ => return Err(op_err!("{k:?} takes a float tensor, got {d}")),
        };
        Ok(vec![x.with_dtype(out)])
    }

    fn dims(&self, inputs: &[&TensorType], outputs: &[&TensorType]) -> DimMap {
        DimMap::elementwise(inputs, outputs)
    }

    fn cost(&self, inputs: &[&TensorType], outputs: &[&TensorType]) -> Cost {
        Cost::elementwise(inputs, outputs, self.kind.flops_per_element())
    }

    fn differentiable(&self, _i: usize) -> bool {
        self.kind.has_gradient()
    }

    fn vjp(&self, cx: &mut VjpCtx<'_>) -> Result<Vec<Option<ValueId>>, OpError> {
        use BinaryKind::{Add, Div, Greater, Mul};
        use UnaryKind::*;
        let x = cx.inputs[0];
        let y = cx.outputs[0];
        let dtype = cx.input_ty(0).dtype;
        let Some(dy) = cx.grads[0] else {
            return Ok(vec![None]);
        };
        if !cx.needs[0] || !dtype.is_float() || !self.kind.has_gradient() {
            return Ok(vec![None]);
        }
        let b = &mut *cx.b;
        let g = match self.kind {
            Identity => dy,
            Neg => un(b, Neg, dy)?,
            Abs => {
                let s = un(b, Sign, x)?;
                bin(b, Mul, dy, s)?
            }
            Exp => bin(b, Mul, dy, y)?,
            Log => bin(b, Div, dy, x)?,
            Sqrt => {
                let h = scale(b, dy, 0.5)?;
                bin(b, Div, h, y)?
            }
            Rsqrt => {
                // d x^(-1/2) = -1/2 x^(-3/2) = -1/2 y^3
                let t = bin(b, Mul, y, y)?;
                let t = bin(b, Mul, t, y)?;
                let t = scale(b, t, -0.5)?;
                bin(b, Mul, dy, t)?
            }
            Reciprocal => {
                let t = bin(b, Mul, y, y)?;
                let t = bin(b, Mul, dy, t)?;
                un(b, Neg, t)?
            }
            Sin => {
                let c = un(b, Cos, x)?;
                bin(b, Mul, dy, c)?
            }
            Cos => {
                let s = un(b, Sin, x)?;
                let t = bin(b, Mul, dy, s)?;
                un(b, Neg, t)?
            }
            Tanh => {
                let t = bin(b, Mul, y, y)?;
                let t = scale(b, t, -1.0)?;
                let t = offset(b, t, 1.0)?;
                bin(b, Mul, dy, t)?
            }
            Sigmoid => {
                let t = scale(b, y, -1.0)?;
                let t = offset(b, t, 1.0)?;
                let t = bin(b, Mul, y, t)?;
                bin(b, Mul, dy, t)?
            }
            Relu => {
                let zero = b.scalar(dtype, 0.0);
                let pos = bin(b, Greater, x, zero)?;
                b.emit(Where {}, &[pos, dy, zero])?
            }
            Silu => {
                // s (1 + x (1 - s)), s = sigmoid(x)
                let s = un(b, Sigmoid, x)?;
                let t = scale(b, s, -1.0)?;
                let t = offset(b, t, 1.0)?;
                let t = bin(b, Mul, x, t)?;
                let t = offset(b, t, 1.0)?;
                let t = bin(b, Mul, s, t)?;
                bin(b, Mul, dy, t)?
            }
            Gelu => {
                // Phi(x) + x phi(x)
                let u = scale(b, x, std::f64::consts::FRAC_1_SQRT_2)?;
                let e = un(b, Erf, u)?;
                let e = offset(b, e, 1.0)?;
                let cdf = scale(b, e, 0.5)?;
                let x2 = bin(b, Mul, x, x)?;
                let p = scale(b, x2, -0.5)?;
                let p = un(b, Exp, p)?;
                let p = scale(
                    b,
                    p,
                    0.5 * std::f64::consts::FRAC_2_SQRT_PI * std::f64::consts::FRAC_1_SQRT_2,
                )?;
                let t = bin(b, Mul, x, p)?;
                let t = bin(b, Add, cdf, t)?;
                bin(b, Mul, dy, t)?
            }
            GeluTanh => {
                // t = tanh(c (x + k x^3)):
                // 1/2 (1 + t) + 1/2 x (1 - t^2) c (1 + 3 k x^2)
                let x2 = bin(b, Mul, x, x)?;
                let x3 = bin(b, Mul, x2, x)?;
                let inner = scale(b, x3, GELU_TANH_K)?;
                let inner = bin(b, Add, x, inner)?;
                let u = scale(b, inner, SQRT_2_OVER_PI)?;
                let t = un(b, Tanh, u)?;
                let first = offset(b, t, 1.0)?;
                let first = scale(b, first, 0.5)?;
                let sech2 = bin(b, Mul, t, t)?;
                let sech2 = scale(b, sech2, -1.0)?;
                let sech2 = offset(b, sech2, 1.0)?;
                let du = scale(b, x2, 3.0 * GELU_TANH_K)?;
                let du = offset(b, du, 1.0)?;
                let du = scale(b, du, SQRT_2_OVER_PI)?;
                let half_x = scale(b, x, 0.5)?;
                let second = bin(b, Mul, sech2, du)?;
                let second = bin(b, Mul, second, half_x)?;
                let d = bin(b, Add, first, second)?;
                bin(b, Mul, dy, d)?
            }
            Erf => {
                let x2 = bin(b, Mul, x, x)?;
                let e = scale(b, x2, -1.0)?;
                let e = un(b, Exp, e)?;
                let e = scale(b, e, std::f64::consts::FRAC_2_SQRT_PI)?;
                bin(b, Mul, dy, e)?
            }
            Floor | Ceil | Sign | Not | IsNan | IsInf => return Ok(vec![None]),
        };
        Ok(vec![Some(g)])
    }

    fn eval(&self, inputs: &[&Tensor]) -> Result<Vec<Tensor>, OpError> {
        let tys: Vec<TensorType> = inputs.iter().map(|t| t.ty()).collect();
        let out_ty = self.infer(&tys.iter().collect::<Vec<_>>())?.remove(0);
        let data = inputs[0].data.iter().map(|&v| self.kind.apply(v)).collect();
        Ok(vec![Tensor::new(out_ty.dtype, out_ty.shape, data)])
    }
}

impl crate::builder::GraphBuilder {
    /// `kind(x)` elementwise.
    pub fn unary(&mut self, kind: UnaryKind, x: ValueId) -> Result<ValueId, AnalyzerError> {
        self.node1(Unary { kind }, &[x])
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
    fn op(kind: UnaryKind) -> Unary {
        Unary { kind }
    }

    #[test]
    fn infers_dtypes() {
        let f = tt(DType::F16, &[2, 3]);
        let i = tt(DType::I64, &[2, 3]);
        let bo = tt(DType::Bool, &[2, 3]);
        assert_eq!(op(UnaryKind::Exp).infer(&[&f]).unwrap()[0], f);
        assert_eq!(op(UnaryKind::IsNan).infer(&[&f]).unwrap()[0], bo);
        assert_eq!(op(UnaryKind::Neg).infer(&[&i]).unwrap()[0], i);
        assert_eq!(op(UnaryKind::Not).infer(&[&bo]).unwrap()[0], bo);
        let e = op(UnaryKind::Exp).infer(&[&i]).unwrap_err();
        assert!(e.0.contains("float"), "{e}");
        assert!(op(UnaryKind::Not).infer(&[&f]).is_err());
        assert!(op(UnaryKind::Neg).infer(&[&bo]).is_err());
        assert!(op(UnaryKind::Exp).infer(&[&f, &f]).is_err());
    }

    #[test]
    fn dims_and_cost() {
        let x = tt(DType::F32, &[2, 3]);
        let d = op(UnaryKind::Gelu).dims(&[&x], &[&x]);
        assert_eq!(d.to_einsum(), "ab->ab");
        let c = op(UnaryKind::Gelu).cost(&[&x], &[&x]);
        assert_eq!(c.flops, 48.0);
        assert_eq!(c.bytes_read, 24.0);
    }

    #[test]
    fn evaluates() {
        let x = Tensor::new(DType::F64, vec![4], vec![-1.0, 0.0, 0.5, f64::NAN]);
        let r = op(UnaryKind::Relu).eval(&[&x]).unwrap();
        assert_eq!(r[0].data[..3], [0.0, 0.0, 0.5]);
        assert!(r[0].data[3].is_nan());
        let n = op(UnaryKind::IsNan).eval(&[&x]).unwrap();
        assert_eq!(n[0].data, vec![0.0, 0.0, 0.0, 1.0]);
        assert_eq!(n[0].dtype, DType::Bool);
        let s = op(UnaryKind::Sign).eval(&[&x]).unwrap();
        assert_eq!(s[0].data[..3], [-1.0, 0.0, 1.0]);
        let g = op(UnaryKind::Gelu)
            .eval(&[&Tensor::new(DType::F64, vec![1], vec![1.0])])
            .unwrap();
        assert!((g[0].data[0] - 0.841_344_746_068_542_9).abs() < 1e-14);
        let gt = op(UnaryKind::GeluTanh)
            .eval(&[&Tensor::new(DType::F64, vec![1], vec![1.0])])
            .unwrap();
        assert!((gt[0].data[0] - 0.841_191_990_608_276_8).abs() < 1e-12);
    }

    #[test]
    fn erf_is_accurate() {
        // reference values: Python's math.erf
        for (x, e) in [
            (0.0, 0.0),
            (0.1, 0.112_462_916_018_284_9),
            (1.0, 0.842_700_792_949_714_9),
            (-2.0, -0.995_322_265_018_952_7),
            (2.4999, 0.999_592_830_099_666_6),
            (3.0, 0.999_977_909_503_001_4),
            (6.0, 1.0),
        ] {
            assert!((erf(x) - e).abs() < 1e-14, "erf({x}) = {} != {e}", erf(x));
        }
    }

    #[test]
    fn gradients_match_finite_differences() {
        use UnaryKind::*;
        let x = rand_tensor(&[2, 3], 1);
        let mut pos = rand_tensor(&[2, 3], 2);
        for v in &mut pos.data {
            *v = *v * 0.5 + 1.5;
        }
        let mut wide = rand_tensor(&[2, 3], 3);
        for v in &mut wide.data {
            *v *= 3.0;
        }
        for k in [
            Identity, Neg, Abs, Exp, Sin, Cos, Tanh, Sigmoid, Relu, Silu, Gelu, GeluTanh, Erf,
        ] {
            check(op(k), std::slice::from_ref(&x), 1e-6);
            check(op(k), &[wide.clone()], 1e-6);
        }
        for k in [Log, Sqrt, Rsqrt, Reciprocal] {
            check(op(k), &[pos.clone()], 1e-6);
        }
    }

    #[test]
    fn predicates_have_no_gradient() {
        for k in [UnaryKind::Floor, UnaryKind::Sign, UnaryKind::IsNan] {
            assert!(!op(k).differentiable(0));
        }
        assert!(op(UnaryKind::Abs).differentiable(0));
    }
}
