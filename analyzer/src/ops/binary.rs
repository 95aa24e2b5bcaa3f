//! `binary`: elementwise function of two tensors with numpy broadcasting (ONNX Add, Sub, Mul,
//! Div, Pow, Max, Min, Mod, Equal, Less, LessOrEqual, Greater, GreaterOrEqual, And, Or, Xor).
//!
//! One op for all of them because they share everything the planner cares about: the dim map is
//! the broadcast (every output dim a parallel axis, a size-1 input dim under a larger output dim
//! tied to no axis) and the cost is a few flops per output element. Arithmetic needs one dtype on
//! both sides (ONNX guarantees it; only `Pow` may raise to an exponent of another numeric type,
//! as ONNX allows); comparisons give bool; `And`/`Or`/`Xor` take bools.
//!
//! This file also holds [`unbroadcast`], the gradient step every broadcasting op shares: the
//! gradient of a broadcast input is the output gradient summed over the dims it was broadcast
//! along.

use super::*;
use crate::dtype::{DType, TensorType};
use crate::error::{AnalyzerError, OpError};
use crate::graph::ValueId;
use crate::op_err;
use crate::ops::reduce::ReduceKind;
use crate::ops::unary::UnaryKind;
use crate::tensor::{broadcast_shapes, for_each_index, Tensor};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
/// Elementwise function of two tensors with numpy broadcasting.
pub struct Binary {
    pub kind: BinaryKind,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BinaryKind {
    Add,
    Sub,
    Mul,
    Div,
    Pow,
    Max,
    Min,
    /// integer modulo with the sign of the divisor (ONNX Mod fmod=0)
    Mod,
    /// comparisons and logic give bool
    Equal,
    Less,
    LessOrEqual,
    Greater,
    GreaterOrEqual,
    And,
    Or,
    Xor,
}

impl BinaryKind {
    /// Comparisons: same dtype on both sides, bool result.
    pub fn is_comparison(self) -> bool {
        use BinaryKind::*;
        matches!(self, Equal | Less | LessOrEqual | Greater | GreaterOrEqual)
    }
    /// Logic: bool on both sides, bool result.
    pub fn is_logic(self) -> bool {
        matches!(self, BinaryKind::And | BinaryKind::Or | BinaryKind::Xor)
    }
    /// Whether a gradient flows through this kind at all.
    pub fn has_gradient(self) -> bool {
        !self.is_comparison() && !self.is_logic()
    }
    /// Vector flops per output element: one for the plain ones; `Pow` is an exp of a log times
    /// the exponent; `Mod` a division, a floor and a multiply-subtract.
    pub fn flops_per_element(self) -> f64 {
        match self {
            BinaryKind::Pow => 9.0,
            BinaryKind::Mod => 4.0,
            _ => 1.0,
        }
    }

    /// The function on one pair of elements; `int` selects exact integer division and modulo.
    fn apply(self, a: f64, b: f64, int: bool) -> Result<f64, OpError> {
        use BinaryKind::*;
        let t = |c: bool| if c { 1.0 } else { 0.0 };
        Ok(match self {
            Add => a + b,
            Sub => a - b,
            Mul => a * b,
            Div if int => {
                let (x, y) = (a as i64, b as i64);
                x.checked_div(y)
                    .ok_or_else(|| op_err!("integer division {x} / {y} is undefined"))?
                    as f64
            }
            Div => a / b,
            Pow => a.powf(b),
            Max if a.is_nan() || b.is_nan() => f64::NAN,
            Max => a.max(b),
            Min if a.is_nan() || b.is_nan() => f64::NAN,
            Min => a.min(b),
            Mod if int => {
                let (x, y) = (a as i64, b as i64);
                let r = x
                    .checked_rem(y)
                    .ok_or_else(|| op_err!("integer modulo {x} % {y} is undefined"))?;
                (if r != 0 && ((r < 0) != (y < 0)) {
                    r + y
                } else {
                    r
                }) as f64
            }
            Mod => {
                let r = a % b;
                if r != 0.0 && ((r < 0.0) != (b < 0.0)) {
                    r + b
                } else {
                    r
                }
            }
            Equal => t(a == b),
            Less => t(a < b),
            LessOrEqual => t(a <= b),
            Greater => t(a > b),
            GreaterOrEqual => t(a >= b),
            And => t(a != 0.0 && b != 0.0),
            Or => t(a != 0.0 || b != 0.0),
            Xor => t((a != 0.0) != (b != 0.0)),
        })
    }
}

/// For each element of `out_shape` in row-major order, the flat offset of the element of a
/// tensor of `in_shape` that numpy broadcasting reads. `in_shape` must broadcast to `out_shape`.
pub(crate) fn broadcast_offsets(in_shape: &[usize], out_shape: &[usize]) -> Vec<usize> {
    let strides = Tensor::strides_of(in_shape);
    let lead = out_shape.len().saturating_sub(in_shape.len());
    let bstrides: Vec<usize> = (0..out_shape.len())
        .map(|d| {
            if d < lead {
                return 0;
            }
            let i = d - lead;
            match in_shape.get(i) {
                Some(&1) | None => 0,
                Some(_) => strides[i],
            }
        })
        .collect();
    let mut offsets = Vec::with_capacity(out_shape.iter().product());
    for_each_index(out_shape, |idx| {
        offsets.push(idx.iter().zip(&bstrides).map(|(i, s)| i * s).sum());
    });
    offsets
}

/// Sums `grad` (shaped like a broadcast result) down to `to_shape`, the shape of the input that
/// was broadcast: leading extra dims are summed away, dims where `to_shape` has 1 are summed
/// keeping the dim. Returns `grad` itself when nothing was broadcast.
pub fn unbroadcast(
    b: &mut GraphBuilder,
    grad: ValueId,
    to_shape: &[usize],
) -> Result<ValueId, OpError> {
    let g_shape = b.ty(grad).shape.clone();
    if g_shape == to_shape {
        return Ok(grad);
    }
    let mismatch = || {
        op_err!(
            "a gradient shaped {:?} cannot be summed down to {:?}",
            g_shape,
            to_shape
        )
    };
    if to_shape.len() > g_shape.len() {
        return Err(mismatch());
    }
    let lead = g_shape.len() - to_shape.len();
    let mut inner = vec![];
    for (d, &n) in to_shape.iter().enumerate() {
        let g = g_shape[lead + d];
        if n == g {
            continue;
        }
        if n != 1 {
            return Err(mismatch());
        }
        inner.push(lead + d);
    }
    let sum = |axes: Vec<usize>, keepdims: bool| Reduce {
        kind: ReduceKind::Sum,
        axes,
        keepdims,
    };
    if inner.is_empty() {
        // only leading dims were added: summing them away leaves exactly `to_shape`
        return b.emit(sum((0..lead).collect(), false), &[grad]);
    }
    if lead == 0 {
        return b.emit(sum(inner, true), &[grad]);
    }
    let mut axes: Vec<usize> = (0..lead).collect();
    axes.extend(inner);
    let s = b.emit(sum(axes, true), &[grad])?;
    b.emit(
        Reshape {
            shape: to_shape.to_vec(),
        },
        &[s],
    )
}

/// `kind(x, y)` inside a vjp.
pub(crate) fn bin(
    b: &mut GraphBuilder,
    kind: BinaryKind,
    x: ValueId,
    y: ValueId,
) -> Result<ValueId, OpError> {
    b.emit(Binary { kind }, &[x, y])
}

/// `x * s` with `s` a scalar constant of x's dtype, inside a vjp.
pub(crate) fn scale(b: &mut GraphBuilder, x: ValueId, s: f64) -> Result<ValueId, OpError> {
    let c = b.scalar(b.ty(x).dtype, s);
    bin(b, BinaryKind::Mul, x, c)
}

/// `x + s` with `s` a scalar constant of x's dtype, inside a vjp.
pub(crate) fn offset(b: &mut GraphBuilder, x: ValueId, s: f64) -> Result<ValueId, OpError> {
    let c = b.scalar(b.ty(x).dtype, s);
    bin(b, BinaryKind::Add, x, c)
}

/// `x` cast to `dtype` (no node when it already is), inside a vjp.
pub(crate) fn cast_to(b: &mut GraphBuilder, x: ValueId, dtype: DType) -> Result<ValueId, OpError> {
    if b.ty(x).dtype == dtype {
        return Ok(x);
    }
    b.emit(Cast { to: dtype }, &[x])
}

impl OpSpec for Binary {
    fn infer(&self, inputs: &[&TensorType]) -> Result<Vec<TensorType>, OpError> {
        let [a, b] = inputs else {
            return Err(op_err!("takes 2 inputs, got {}", inputs.len()));
        };
        let k = self.kind;
        if k.is_logic() {
            if a.dtype != DType::Bool || b.dtype != DType::Bool {
                return Err(op_err!(
                    "{k:?} takes bool operands, got {} and {}",
                    a.dtype,
                    b.dtype
                ));
            }
        } else if k == BinaryKind::Pow {
            if a.dtype == DType::Bool || b.dtype == DType::Bool {
                return Err(op_err!(
                    "Pow takes numeric operands, got {} and {}",
                    a.dtype,
                    b.dtype
                ));
            }
        } else {
            if a.dtype != b.dtype {
                return Err(op_err!("{k:?} operands mix {} and {}", a.dtype, b.dtype));
            }
            if !k.is_comparison() && a.dtype == DType::Bool {
                return Err(op_err!("{k:?} on bool operands is not arithmetic"));
            }
        }
        let shape = broadcast_shapes(&a.shape, &b.shape)
            .ok_or_else(|| op_err!("shapes {:?} and {:?} do not broadcast", a.shape, b.shape))?;
        let dtype = if k.is_comparison() || k.is_logic() {
            DType::Bool
        } else {
            a.dtype
        };
        Ok(vec![TensorType::new(dtype, shape)])
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
        use BinaryKind::*;
        let (x, y) = (cx.inputs[0], cx.inputs[1]);
        let (tx, ty) = (cx.input_ty(0), cx.input_ty(1));
        let want_x = cx.needs[0] && tx.dtype.is_float();
        let want_y = cx.needs.get(1).copied().unwrap_or(false) && ty.dtype.is_float();
        let Some(dy) = cx.grads[0] else {
            return Ok(vec![None, None]);
        };
        if !self.kind.has_gradient() || !(want_x || want_y) {
            return Ok(vec![None, None]);
        }
        let out = cx.outputs[0];
        let b = &mut *cx.b;
        // full-shape (output-shaped) gradients, before summing broadcast dims away
        let (gx, gy) = match self.kind {
            Add => (Some(dy), Some(dy)),
            Sub => {
                let gy = if want_y {
                    Some(b.emit(
                        Unary {
                            kind: UnaryKind::Neg,
                        },
                        &[dy],
                    )?)
                } else {
                    None
                };
                (Some(dy), gy)
            }
            Mul => {
                let gx = if want_x {
                    Some(bin(b, Mul, dy, y)?)
                } else {
                    None
                };
                let gy = if want_y {
                    Some(bin(b, Mul, dy, x)?)
                } else {
                    None
                };
                (gx, gy)
            }
            Div => {
                let gx = if want_x {
                    Some(bin(b, Div, dy, y)?)
                } else {
                    None
                };
                let gy = if want_y {
                    // d(x/y)/dy = -(x/y)/y
                    let t = bin(b, Mul, dy, out)?;
                    let t = bin(b, Div, t, y)?;
                    Some(b.emit(
                        Unary {
                            kind: UnaryKind::Neg,
                        },
                        &[t],
                    )?)
                } else {
                    None
                };
                (gx, gy)
            }
            Pow => {
                let gx = if want_x {
                    // y * x^(y-1), computed in x's dtype (the exponent may be another type)
                    let yc = cast_to(b, y, tx.dtype)?;
                    let ym1 = offset(b, yc, -1.0)?;
                    let p = bin(b, Pow, x, ym1)?;
                    let t = bin(b, Mul, p, yc)?;
                    Some(bin(b, Mul, dy, t)?)
                } else {
                    None
                };
                let gy = if want_y {
                    // x^y * ln x
                    let l = b.emit(
                        Unary {
                            kind: UnaryKind::Log,
                        },
                        &[x],
                    )?;
                    let t = bin(b, Mul, out, l)?;
                    let t = bin(b, Mul, dy, t)?;
                    Some(cast_to(b, t, ty.dtype)?)
                } else {
                    None
                };
                (gx, gy)
            }
            Max | Min => {
                // the winner takes the gradient; a tie splits it evenly
                let wins = if self.kind == Max { Greater } else { Less };
                let w = bin(b, wins, x, y)?;
                let w = cast_to(b, w, tx.dtype)?;
                let e = bin(b, Equal, x, y)?;
                let e = cast_to(b, e, tx.dtype)?;
                let e = scale(b, e, 0.5)?;
                let w = bin(b, Add, w, e)?;
                let gx = bin(b, Mul, dy, w)?;
                let gy = if want_y {
                    Some(bin(b, Sub, dy, gx)?)
                } else {
                    None
                };
                (Some(gx), gy)
            }
            Mod => {
                // x mod y = x - y * floor(x / y)
                let gy = if want_y {
                    let q = bin(b, Div, x, y)?;
                    let q = b.emit(
                        Unary {
                            kind: UnaryKind::Floor,
                        },
                        &[q],
                    )?;
                    let t = bin(b, Mul, dy, q)?;
                    Some(b.emit(
                        Unary {
                            kind: UnaryKind::Neg,
                        },
                        &[t],
                    )?)
                } else {
                    None
                };
                (Some(dy), gy)
            }
            Equal | Less | LessOrEqual | Greater | GreaterOrEqual | And | Or | Xor => (None, None),
        };
        let gx = match gx.filter(|_| want_x) {
            Some(g) => Some(unbroadcast(b, g, &tx.shape)?),
            None => None,
        };
        let gy = match gy.filter(|_| want_y) {
            Some(g) => Some(unbroadcast(b, g, &ty.shape)?),
            None => None,
        };
        Ok(vec![gx, gy])
    }

    fn eval(&self, inputs: &[&Tensor]) -> Result<Vec<Tensor>, OpError> {
        let tys: Vec<TensorType> = inputs.iter().map(|t| t.ty()).collect();
        let out_ty = self.infer(&tys.iter().collect::<Vec<_>>())?.remove(0);
        let (a, b) = (inputs[0], inputs[1]);
        let int = a.dtype.is_int() && matches!(self.kind, BinaryKind::Div | BinaryKind::Mod);
        let oa = broadcast_offsets(&a.shape, &out_ty.shape);
        let ob = broadcast_offsets(&b.shape, &out_ty.shape);
        let data = oa
            .iter()
            .zip(&ob)
            .map(|(&i, &j)| self.kind.apply(a.data[i], b.data[j], int))
            .collect::<Result<Vec<f64>, OpError>>()?;
        Ok(vec![Tensor::new(out_ty.dtype, out_ty.shape, data)])
    }
}

impl crate::builder::GraphBuilder {
    /// `kind(a, b)` with numpy broadcasting.
    pub fn binary(
        &mut self,
        kind: BinaryKind,
        a: ValueId,
        b: ValueId,
    ) -> Result<ValueId, AnalyzerError> {
        self.node1(Binary { kind }, &[a, b])
    }
    pub fn add(&mut self, a: ValueId, b: ValueId) -> Result<ValueId, AnalyzerError> {
        self.binary(BinaryKind::Add, a, b)
    }
    pub fn sub(&mut self, a: ValueId, b: ValueId) -> Result<ValueId, AnalyzerError> {
        self.binary(BinaryKind::Sub, a, b)
    }
    pub fn mul(&mut self, a: ValueId, b: ValueId) -> Result<ValueId, AnalyzerError> {
        self.binary(BinaryKind::Mul, a, b)
    }
    pub fn div(&mut self, a: ValueId, b: ValueId) -> Result<ValueId, AnalyzerError> {
        self.binary(BinaryKind::Div, a, b)
    }
    /// `x * s`, `s` a scalar constant of x's dtype.
    pub fn mul_scalar(&mut self, x: ValueId, s: f64) -> Result<ValueId, AnalyzerError> {
        let c = self.scalar(self.ty(x).dtype, s);
        self.mul(x, c)
    }
    /// `x + s`, `s` a scalar constant of x's dtype.
    pub fn add_scalar(&mut self, x: ValueId, s: f64) -> Result<ValueId, AnalyzerError> {
        let c = self.scalar(self.ty(x).dtype, s);
        self.add(x, c)
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
    fn op(kind: BinaryKind) -> Binary {
        Binary { kind }
    }
    /// `rand * spread + center`, elementwise.
    fn shifted(shape: &[usize], seed: u64, center: f64, spread: f64) -> Tensor {
        let mut t = rand_tensor(shape, seed);
        for v in &mut t.data {
            *v = *v * spread + center;
        }
        t
    }

    #[test]
    fn infers_dtypes_and_broadcast() {
        let a = tt(DType::F32, &[2, 1, 4]);
        let b = tt(DType::F32, &[3, 1]);
        let out = op(BinaryKind::Add).infer(&[&a, &b]).unwrap();
        assert_eq!(out[0], tt(DType::F32, &[2, 3, 4]));
        let out = op(BinaryKind::Less).infer(&[&a, &b]).unwrap();
        assert_eq!(out[0].dtype, DType::Bool);
        let bools = tt(DType::Bool, &[3]);
        assert_eq!(
            op(BinaryKind::Xor).infer(&[&bools, &bools]).unwrap()[0].dtype,
            DType::Bool
        );
        let i = tt(DType::I64, &[]);
        assert_eq!(
            op(BinaryKind::Pow).infer(&[&a, &i]).unwrap()[0].dtype,
            DType::F32
        );
    }

    #[test]
    fn rejects_bad_operands() {
        let f = tt(DType::F32, &[2, 3]);
        let h = tt(DType::F16, &[2, 3]);
        let e = op(BinaryKind::Mul).infer(&[&f, &h]).unwrap_err();
        assert!(e.0.contains("mix f32 and f16"), "{e}");
        let e = op(BinaryKind::And).infer(&[&f, &f]).unwrap_err();
        assert!(e.0.contains("bool"), "{e}");
        let e = op(BinaryKind::Add)
            .infer(&[&f, &tt(DType::F32, &[4])])
            .unwrap_err();
        assert!(e.0.contains("do not broadcast"), "{e}");
        let bools = tt(DType::Bool, &[3]);
        assert!(op(BinaryKind::Add).infer(&[&bools, &bools]).is_err());
        assert!(op(BinaryKind::Add).infer(&[&f]).is_err());
    }

    #[test]
    fn dims_follow_the_broadcast() {
        let a = tt(DType::F32, &[2, 1, 4]);
        let b = tt(DType::F32, &[3, 1]);
        let out = op(BinaryKind::Mul).infer(&[&a, &b]).unwrap();
        let d = op(BinaryKind::Mul).dims(&[&a, &b], &[&out[0]]);
        assert_eq!(d.to_einsum(), "a_c,b_->abc");
        let c = op(BinaryKind::Pow).cost(&[&a, &b], &[&out[0]]);
        assert_eq!(c.flops, 9.0 * 24.0);
        assert_eq!(c.bytes_written, 24.0 * 4.0);
    }

    #[test]
    fn evaluates_onnx_semantics() {
        let a = Tensor::from_i64([4], &[7, -7, 7, -7]);
        let b = Tensor::from_i64([4], &[3, 3, -3, -3]);
        let m = op(BinaryKind::Mod).eval(&[&a, &b]).unwrap();
        assert_eq!(m[0].data, vec![1.0, 2.0, -2.0, -1.0]);
        let d = op(BinaryKind::Div).eval(&[&a, &b]).unwrap();
        assert_eq!(d[0].data, vec![2.0, -2.0, -2.0, 2.0]);
        let z = Tensor::from_i64([], &[0]);
        let e = op(BinaryKind::Div).eval(&[&a, &z]).unwrap_err();
        assert!(e.0.contains("division"), "{e}");
        let x = Tensor::new(DType::F64, vec![2, 1], vec![2.0, 3.0]);
        let y = Tensor::new(DType::F64, vec![2], vec![2.0, 0.5]);
        let p = op(BinaryKind::Pow).eval(&[&x, &y]).unwrap();
        assert_eq!(p[0].shape, vec![2, 2]);
        assert_eq!(p[0].data, vec![4.0, 2f64.sqrt(), 9.0, 3f64.sqrt()]);
        let t = Tensor::new(DType::Bool, vec![2], vec![1.0, 0.0]);
        let f = Tensor::new(DType::Bool, vec![2, 1], vec![1.0, 0.0]);
        assert_eq!(
            op(BinaryKind::Xor).eval(&[&t, &f]).unwrap()[0].data,
            vec![0.0, 1.0, 1.0, 0.0]
        );
        assert_eq!(
            op(BinaryKind::And).eval(&[&t, &f]).unwrap()[0].data,
            vec![1.0, 0.0, 0.0, 0.0]
        );
        assert_eq!(
            op(BinaryKind::LessOrEqual).eval(&[&x, &y]).unwrap()[0].data,
            vec![1.0, 0.0, 0.0, 0.0]
        );
        let fm = op(BinaryKind::Mod)
            .eval(&[
                &Tensor::new(DType::F64, vec![2], vec![-1.5, 1.5]),
                &Tensor::new(DType::F64, vec![], vec![1.0]),
            ])
            .unwrap();
        assert_eq!(fm[0].data, vec![0.5, 0.5]);
    }

    #[test]
    fn gradients_match_finite_differences() {
        use BinaryKind::*;
        let shapes: [(&[usize], &[usize]); 3] =
            [(&[2, 3], &[2, 3]), (&[2, 3], &[3]), (&[2, 1, 3], &[4, 1])];
        for (i, (sa, sb)) in shapes.into_iter().enumerate() {
            let s = i as u64 * 10;
            let (a, b) = (rand_tensor(sa, s + 1), rand_tensor(sb, s + 2));
            for k in [Add, Sub, Mul, Max, Min] {
                check(op(k), &[a.clone(), b.clone()], 1e-6);
            }
            let bpos = shifted(sb, s + 3, 1.5, 0.5);
            check(op(Div), &[a.clone(), bpos.clone()], 1e-6);
            check(op(Div), &[bpos.clone(), a.clone()], 1e-6);
            let apos = shifted(sa, s + 4, 1.5, 0.5);
            check(op(Pow), &[apos, b.clone()], 1e-6);
            // x / y stays within (1, 2): floor(x / y) = 1, away from the jumps
            let x = shifted(sa, s + 5, 3.0, 0.4);
            let y = shifted(sb, s + 6, 2.0, 0.2);
            check(op(Mod), &[x, y], 1e-6);
        }
        // an integer exponent gets no gradient, the base does
        let a = shifted(&[3], 7, 1.5, 0.5);
        check(op(Pow), &[a, Tensor::from_i64([], &[3])], 1e-6);
    }

    #[test]
    fn ties_split_the_gradient() {
        use crate::builder::GraphBuilder;
        let mut b = GraphBuilder::new();
        let x = b.input("x", tt(DType::F64, &[2]));
        let y = b.input("y", tt(DType::F64, &[2]));
        let m = b.binary(BinaryKind::Max, x, y).unwrap();
        let dy = b.constant(Tensor::new(DType::F64, vec![2], vec![1.0, 1.0]));
        let g = {
            let mut cx = VjpCtx {
                b: &mut b,
                inputs: &[x, y],
                outputs: &[m],
                grads: &[Some(dy)],
                needs: &[true, true],
            };
            Binary {
                kind: BinaryKind::Max,
            }
            .vjp(&mut cx)
            .unwrap()
        };
        let g0 = g[0].unwrap();
        let g1 = g[1].unwrap();
        let graph = b.finish();
        let feeds = [
            (x, Tensor::new(DType::F64, vec![2], vec![1.0, 5.0])),
            (y, Tensor::new(DType::F64, vec![2], vec![1.0, 2.0])),
        ]
        .into_iter()
        .collect();
        let vals = crate::eval::run(&graph, &feeds).unwrap();
        assert_eq!(vals[g0.0 as usize].as_ref().unwrap().data, vec![0.5, 1.0]);
        assert_eq!(vals[g1.0 as usize].as_ref().unwrap().data, vec![0.5, 0.0]);
    }

    #[test]
    fn comparisons_have_no_gradient() {
        assert!(!op(BinaryKind::Less).differentiable(0));
        assert!(op(BinaryKind::Mod).differentiable(1));
    }
}
