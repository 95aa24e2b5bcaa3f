//! Elementwise aten ops: arithmetic (`add`, `sub`, `rsub`, `mul`, `div`, `floor_divide`,
//! `remainder`, `pow`, `maximum`, `minimum`), comparisons (`eq`, `ne`, `lt`, `le`, `gt`, `ge`),
//! logic (`__and__`, `__or__`, `__xor__`, `logical_*`), `where`, `masked_fill`, `clamp`, and the
//! unary functions (`neg`, `rsqrt`, `tanh`, `gelu`, `silu`, `relu`, `sin`, `cos`, ...).
//!
//! Operands follow PyTorch's type promotion (see [`Cx::result_dtype`]) and are cast to the
//! common dtype before the IR `binary` op, which takes equal dtypes. With no tensor operand the
//! same aten op is int / float arithmetic on numbers (`aten::add.int`, `aten::floordiv`), done
//! here at import time.

use crate::lower::{bail, Cx, LResult, Operand, Val};
use autopar_analyzer::ops::binary::BinaryKind;
use autopar_analyzer::ops::unary::UnaryKind;
use autopar_analyzer::ops::{Binary, Unary, Where};
use autopar_analyzer::{DType, ValueId};

fn is_number(v: &Val) -> bool {
    matches!(v, Val::Int(_) | Val::Float(_) | Val::Bool(_))
}

/// Arithmetic on two numbers (`aten::add.int`, `aten::floordiv.int`, `aten::lt.float`, ...).
fn number_binary(op: &str, a: &Val, b: &Val) -> LResult<Val> {
    let as_f = |v: &Val| match v {
        Val::Int(i) => *i as f64,
        Val::Float(f) => *f,
        Val::Bool(b) => *b as i64 as f64,
        _ => f64::NAN,
    };
    let ints = !matches!(a, Val::Float(_)) && !matches!(b, Val::Float(_));
    let (x, y) = (as_f(a), as_f(b));
    let (i, j) = (x as i64, y as i64);
    let num = |v: f64| {
        if ints {
            Val::Int(v as i64)
        } else {
            Val::Float(v)
        }
    };
    Ok(match op {
        "add" => num(x + y),
        "sub" => num(x - y),
        "mul" => num(x * y),
        "div" | "true_divide" => Val::Float(x / y),
        "floordiv" | "floor_divide" if ints => match (i.checked_div(j), i.checked_rem(j)) {
            (Some(q), Some(r)) => Val::Int(if r != 0 && ((r < 0) != (j < 0)) {
                q - 1
            } else {
                q
            }),
            _ => bail!("integer division {i} // {j} is undefined"),
        },
        "floordiv" | "floor_divide" => Val::Float((x / y).floor()),
        "remainder" | "fmod" | "__mod__" if ints => match i.checked_rem(j) {
            Some(r) if op != "fmod" && r != 0 && ((r < 0) != (j < 0)) => Val::Int(r + j),
            Some(r) => Val::Int(r),
            None => bail!("integer modulo {i} % {j} is undefined"),
        },
        "remainder" | "__mod__" => Val::Float(x - (x / y).floor() * y),
        "fmod" => Val::Float(x % y),
        "pow" if ints && j >= 0 => Val::Int(i.checked_pow(j as u32).unwrap_or(i64::MAX)),
        "pow" => Val::Float(x.powf(y)),
        "maximum" | "max" => num(x.max(y)),
        "minimum" | "min" => num(x.min(y)),
        "eq" => Val::Bool(x == y),
        "ne" => Val::Bool(x != y),
        "lt" => Val::Bool(x < y),
        "le" => Val::Bool(x <= y),
        "gt" => Val::Bool(x > y),
        "ge" => Val::Bool(x >= y),
        "__and__" | "logical_and" if ints && op == "__and__" && !matches!(a, Val::Bool(_)) => {
            Val::Int(i & j)
        }
        "__and__" | "logical_and" => Val::Bool(x != 0.0 && y != 0.0),
        "__or__" | "logical_or" if ints && op == "__or__" && !matches!(a, Val::Bool(_)) => {
            Val::Int(i | j)
        }
        "__or__" | "logical_or" => Val::Bool(x != 0.0 || y != 0.0),
        "__xor__" | "logical_xor" => Val::Bool((x != 0.0) != (y != 0.0)),
        other => bail!("{other} of two numbers is not supported"),
    })
}

/// The aten base name of the node (`add` of `aten::add`).
fn base(cx: &Cx<'_>) -> String {
    let k = cx.node.kind.rsplit("::").next().unwrap_or("");
    k.trim_end_matches('_').to_string()
}

/// `kind(a, b)` in the promoted dtype (`compute` overrides it, e.g. float for true division).
pub fn binary_op(
    cx: &mut Cx<'_>,
    kind: BinaryKind,
    a: Operand,
    b: Operand,
    compute: Option<DType>,
) -> LResult<ValueId> {
    let dt = compute.unwrap_or_else(|| cx.result_dtype(&[a, b]));
    let x = cx.cast(a.v, dt)?;
    let y = cx.cast(b.v, dt)?;
    cx.emit(Binary { kind }, &[x, y])
}

fn unary_op(cx: &mut Cx<'_>, kind: UnaryKind, x: ValueId) -> LResult<ValueId> {
    cx.emit(Unary { kind }, &[x])
}

/// Numbers on both sides: import-time arithmetic; otherwise the two tensor operands.
fn operands(cx: &mut Cx<'_>) -> LResult<Result<(Operand, Operand), Val>> {
    let (a, b) = (cx.arg(0)?.clone(), cx.arg(1)?.clone());
    if is_number(&a) && is_number(&b) {
        return Ok(Err(number_binary(&base(cx), &a, &b)?));
    }
    Ok(Ok((cx.operand_of(&a, 0)?, cx.operand_of(&b, 1)?)))
}

/// `b * alpha` for `add` / `sub` with an `alpha` other than 1.
fn scaled(cx: &mut Cx<'_>, b: Operand, alpha_arg: usize) -> LResult<Operand> {
    let alpha = match cx.opt_arg(alpha_arg) {
        Some(_) => cx.float(alpha_arg)?,
        None => 1.0,
    };
    if alpha == 1.0 {
        return Ok(b);
    }
    let dt = cx.dtype(b.v);
    let s = cx.scalar(if dt.is_float() { dt } else { DType::F32 }, alpha);
    let s = Operand {
        v: s,
        priority: crate::lower::Priority::Number,
    };
    let v = binary_op(cx, BinaryKind::Mul, b, s, None)?;
    Ok(Operand {
        v,
        priority: b.priority,
    })
}

/// `add`, `sub`, `rsub` (with `alpha`), `mul`.
pub fn arith(cx: &mut Cx<'_>) -> LResult<Vec<Val>> {
    let name = base(cx);
    if name == "rsub" {
        let (a, b) = match operands(cx)? {
            Ok(ops) => ops,
            Err(v) => return Ok(vec![v]),
        };
        let a = scaled(cx, a, 2)?;
        return Ok(vec![Val::Tensor(binary_op(
            cx,
            BinaryKind::Sub,
            b,
            a,
            None,
        )?)]);
    }
    let (a, b) = match operands(cx)? {
        Ok(ops) => ops,
        Err(v) => return Ok(vec![v]),
    };
    let kind = match name.as_str() {
        "add" => BinaryKind::Add,
        "sub" | "subtract" => BinaryKind::Sub,
        "mul" | "multiply" => BinaryKind::Mul,
        "maximum" | "max" => BinaryKind::Max,
        "minimum" | "min" => BinaryKind::Min,
        other => bail!("{other} is not an arithmetic op"),
    };
    let b = if matches!(kind, BinaryKind::Add | BinaryKind::Sub) {
        scaled(cx, b, 2)?
    } else {
        b
    };
    if cx.dtype(a.v) == DType::Bool && cx.dtype(b.v) == DType::Bool && kind == BinaryKind::Add {
        // bool + bool is logical or in PyTorch
        return Ok(vec![Val::Tensor(binary_op(
            cx,
            BinaryKind::Or,
            a,
            b,
            None,
        )?)]);
    }
    Ok(vec![Val::Tensor(binary_op(cx, kind, a, b, None)?)])
}

/// `div` (true division, or `rounding_mode` "trunc" / "floor"), `floor_divide`, `remainder`.
pub fn div(cx: &mut Cx<'_>) -> LResult<Vec<Val>> {
    let name = base(cx);
    let mode = match (name.as_str(), cx.opt_arg(2)) {
        ("floor_divide", _) => Some("floor".to_string()),
        ("div" | "divide", Some(Val::Str(s))) => Some(s.clone()),
        _ => None,
    };
    let (a, b) = match operands(cx)? {
        Ok(ops) => ops,
        Err(v) => return Ok(vec![v]),
    };
    let dt = cx.result_dtype(&[a, b]);
    if name == "remainder" {
        return Ok(vec![Val::Tensor(binary_op(
            cx,
            BinaryKind::Mod,
            a,
            b,
            Some(dt),
        )?)]);
    }
    let y = match mode.as_deref() {
        None => {
            let f = if dt.is_float() { dt } else { DType::F32 };
            binary_op(cx, BinaryKind::Div, a, b, Some(f))?
        }
        Some("floor") if dt.is_float() => {
            let q = binary_op(cx, BinaryKind::Div, a, b, Some(dt))?;
            unary_op(cx, UnaryKind::Floor, q)?
        }
        Some("floor") => {
            // a // b = (a - a mod b) / b, exact in integers (mod takes the divisor's sign)
            let x = cx.cast(a.v, dt)?;
            let y = cx.cast(b.v, dt)?;
            let r = cx.emit(
                Binary {
                    kind: BinaryKind::Mod,
                },
                &[x, y],
            )?;
            let d = cx.emit(
                Binary {
                    kind: BinaryKind::Sub,
                },
                &[x, r],
            )?;
            cx.emit(
                Binary {
                    kind: BinaryKind::Div,
                },
                &[d, y],
            )?
        }
        Some("trunc") if dt.is_float() => {
            let q = binary_op(cx, BinaryKind::Div, a, b, Some(dt))?;
            let zero = cx.scalar(dt, 0.0);
            let neg = cx.emit(
                Binary {
                    kind: BinaryKind::Less,
                },
                &[q, zero],
            )?;
            let up = unary_op(cx, UnaryKind::Ceil, q)?;
            let down = unary_op(cx, UnaryKind::Floor, q)?;
            cx.emit(Where {}, &[neg, up, down])?
        }
        Some("trunc") => binary_op(cx, BinaryKind::Div, a, b, Some(dt))?,
        Some(other) => bail!("rounding_mode {other:?} is not supported"),
    };
    Ok(vec![Val::Tensor(y)])
}

pub fn pow(cx: &mut Cx<'_>) -> LResult<Vec<Val>> {
    let (a, b) = match operands(cx)? {
        Ok(ops) => ops,
        Err(v) => return Ok(vec![v]),
    };
    Ok(vec![Val::Tensor(binary_op(
        cx,
        BinaryKind::Pow,
        a,
        b,
        None,
    )?)])
}

/// `eq`, `ne`, `lt`, `le`, `gt`, `ge`: compared in the promoted dtype, bool result.
pub fn compare(cx: &mut Cx<'_>) -> LResult<Vec<Val>> {
    let name = base(cx);
    let (a, b) = match operands(cx)? {
        Ok(ops) => ops,
        Err(v) => return Ok(vec![v]),
    };
    let (kind, swap, negate) = match name.as_str() {
        "eq" => (BinaryKind::Equal, false, false),
        "ne" => (BinaryKind::Equal, false, true),
        "lt" | "less" => (BinaryKind::Less, false, false),
        "le" | "less_equal" => (BinaryKind::LessOrEqual, false, false),
        "gt" | "greater" => (BinaryKind::Greater, false, false),
        "ge" | "greater_equal" => (BinaryKind::GreaterOrEqual, false, false),
        other => bail!("{other} is not a comparison"),
    };
    let (a, b) = if swap { (b, a) } else { (a, b) };
    let mut y = binary_op(cx, kind, a, b, None)?;
    if negate {
        y = unary_op(cx, UnaryKind::Not, y)?;
    }
    Ok(vec![Val::Tensor(y)])
}

/// `__and__`, `__or__`, `__xor__`, `logical_and`, `logical_or`, `logical_xor`: on bool tensors
/// (the logical ops cast other dtypes to bool first; bitwise ops on integers are unsupported).
pub fn logic(cx: &mut Cx<'_>) -> LResult<Vec<Val>> {
    let name = base(cx);
    let (a, b) = match operands(cx)? {
        Ok(ops) => ops,
        Err(v) => return Ok(vec![v]),
    };
    let kind = match name.trim_start_matches("logical_").trim_matches('_') {
        "and" => BinaryKind::And,
        "or" => BinaryKind::Or,
        "xor" => BinaryKind::Xor,
        other => bail!("{other} is not a logical op"),
    };
    let logical = name.starts_with("logical_");
    for o in [a, b] {
        let d = cx.dtype(o.v);
        if d != DType::Bool && !logical {
            bail!("bitwise {name} on {d} tensors is not supported (only bool)");
        }
    }
    let x = cx.cast(a.v, DType::Bool)?;
    let y = cx.cast(b.v, DType::Bool)?;
    Ok(vec![Val::Tensor(cx.emit(Binary { kind }, &[x, y])?)])
}

/// `where(cond, x, y)` (every overload: x and y may be numbers).
pub fn where_(cx: &mut Cx<'_>) -> LResult<Vec<Val>> {
    let c = cx.tensor(0)?;
    let c = cx.cast(c, DType::Bool)?;
    let x = cx.operand(1)?;
    let y = cx.operand(2)?;
    let dt = cx.result_dtype(&[x, y]);
    let (x, y) = (cx.cast(x.v, dt)?, cx.cast(y.v, dt)?);
    Ok(vec![Val::Tensor(cx.emit(Where {}, &[c, x, y])?)])
}

/// `masked_fill(x, mask, value)`: `where(mask, value, x)` in x's dtype.
pub fn masked_fill(cx: &mut Cx<'_>) -> LResult<Vec<Val>> {
    let x = cx.tensor(0)?;
    let m = cx.tensor(1)?;
    let m = cx.cast(m, DType::Bool)?;
    let v = cx.operand(2)?;
    let dt = cx.dtype(x);
    let v = cx.cast(v.v, dt)?;
    Ok(vec![Val::Tensor(cx.emit(Where {}, &[m, v, x])?)])
}

/// `clamp(x, min, max)`, `clamp_min`, `clamp_max`, `hardtanh`, `relu6`.
pub fn clamp(cx: &mut Cx<'_>) -> LResult<Vec<Val>> {
    let x = cx.tensor(0)?;
    let name = base(cx);
    let (lo, hi) = match name.as_str() {
        "clamp_min" => (cx.opt_arg(1).cloned(), None),
        "clamp_max" => (None, cx.opt_arg(1).cloned()),
        "relu6" => (Some(Val::Float(0.0)), Some(Val::Float(6.0))),
        "hardtanh" => (
            Some(cx.opt_arg(1).cloned().unwrap_or(Val::Float(-1.0))),
            Some(cx.opt_arg(2).cloned().unwrap_or(Val::Float(1.0))),
        ),
        _ => (cx.opt_arg(1).cloned(), cx.opt_arg(2).cloned()),
    };
    let dt = cx.dtype(x);
    let mut y = x;
    for (bound, kind) in [(lo, BinaryKind::Max), (hi, BinaryKind::Min)] {
        if let Some(b) = bound {
            let o = cx.operand_of(&b, 1)?;
            let o = cx.cast(o.v, dt)?;
            y = cx.emit(Binary { kind }, &[y, o])?;
        }
    }
    Ok(vec![Val::Tensor(y)])
}

/// The unary functions. Float-only functions of integer tensors compute in float32, as
/// PyTorch does.
pub fn unary(cx: &mut Cx<'_>) -> LResult<Vec<Val>> {
    let name = base(cx);
    let a0 = cx.arg(0)?.clone();
    if is_number(&a0) {
        let v = cx.as_number(&a0).unwrap_or(f64::NAN);
        return Ok(vec![number_unary(&name, v, &a0)?]);
    }
    let x = cx.tensor(0)?;
    use UnaryKind::*;
    let kind = match name.as_str() {
        "neg" | "negative" => Neg,
        "abs" => Abs,
        "exp" => Exp,
        "log" => Log,
        "sqrt" => Sqrt,
        "rsqrt" => Rsqrt,
        "reciprocal" => Reciprocal,
        "sin" => Sin,
        "cos" => Cos,
        "tanh" => Tanh,
        "sigmoid" => Sigmoid,
        "relu" => Relu,
        "silu" => Silu,
        "gelu" => match cx.opt_arg(1) {
            Some(Val::Str(s)) if s == "tanh" => GeluTanh,
            Some(Val::Str(s)) if s != "none" => bail!("gelu approximate={s:?} is not supported"),
            _ => Gelu,
        },
        "erf" => Erf,
        "floor" => Floor,
        "ceil" => Ceil,
        "sign" => Sign,
        "logical_not" | "bitwise_not" => Not,
        "isnan" => IsNan,
        "isinf" => IsInf,
        "square" => {
            return Ok(vec![Val::Tensor(cx.emit(
                Binary {
                    kind: BinaryKind::Mul,
                },
                &[x, x],
            )?)]);
        }
        other => bail!("unary {other} is not supported"),
    };
    let d = cx.dtype(x);
    let x = match kind {
        Not if d != DType::Bool => {
            if name == "bitwise_not" {
                bail!("bitwise_not on {d} tensors is not supported (only bool)");
            }
            cx.cast(x, DType::Bool)?
        }
        Floor | Ceil if !d.is_float() => return Ok(vec![Val::Tensor(x)]),
        Neg | Abs | Sign | Relu | Not => x,
        IsNan | IsInf if !d.is_float() => {
            let f = cx.scalar(DType::Bool, 0.0);
            let shape = cx.shape(x);
            let z = cx.emit(autopar_analyzer::ops::Expand::new(shape), &[f])?;
            return Ok(vec![Val::Tensor(z)]);
        }
        _ if !d.is_float() => cx.cast(x, DType::F32)?,
        _ => x,
    };
    Ok(vec![Val::Tensor(unary_op(cx, kind, x)?)])
}

/// Math on one number (`aten::neg.int`, `aten::sqrt.float`, ...).
fn number_unary(name: &str, x: f64, v: &Val) -> LResult<Val> {
    let int = matches!(v, Val::Int(_));
    Ok(match name {
        "neg" => {
            if int {
                Val::Int(-(x as i64))
            } else {
                Val::Float(-x)
            }
        }
        "abs" => {
            if int {
                Val::Int((x as i64).abs())
            } else {
                Val::Float(x.abs())
            }
        }
        "sqrt" => Val::Float(x.sqrt()),
        "exp" => Val::Float(x.exp()),
        "log" => Val::Float(x.ln()),
        "floor" => Val::Int(x.floor() as i64),
        "ceil" => Val::Int(x.ceil() as i64),
        other => bail!("{other} of a number is not supported"),
    })
}
