//! Tensor factories: `arange`, `ones` / `zeros` / `full` / `empty`, their `new_*` and
//! `*_like` forms. Shapes are known, so each is a constant: a scalar broadcast by an `expand`
//! (folded into a constant when small, so a huge `zeros` never materialises at import).
//! `empty` is zeros (its contents are unspecified).

use crate::lower::{bail, to_dims, Cx, LResult, Val};
use autopar_analyzer::ops::Expand;
use autopar_analyzer::{DType, Tensor, ValueId};

/// `value` broadcast to `shape` in `dtype`.
pub fn filled(cx: &mut Cx<'_>, shape: Vec<usize>, dtype: DType, value: f64) -> LResult<ValueId> {
    let mut s = Tensor::scalar(dtype, value);
    s.round_to_dtype();
    let s = cx.b.constant(s);
    if shape.is_empty() {
        return Ok(s);
    }
    cx.emit(Expand::new(shape), &[s])
}

/// The default dtype of a fill value (bool, int64, float32).
fn dtype_of_number(v: &Val) -> DType {
    match v {
        Val::Bool(_) => DType::Bool,
        Val::Int(_) => DType::I64,
        _ => DType::F32,
    }
}

/// `ones`, `zeros`, `empty`, `full` (size first), and `new_*` (a tensor, then size: the
/// tensor's dtype is the default).
pub fn factory(cx: &mut Cx<'_>) -> LResult<Vec<Val>> {
    let name = cx.node.kind.rsplit("::").next().unwrap_or("").to_string();
    let (base, like) = match name.strip_prefix("new_") {
        Some(b) => (b.to_string(), Some(cx.tensor(0)?)),
        None => (name.clone(), None),
    };
    let first = like.is_some() as usize;
    let shape = to_dims(&cx.ints(first)?, "size")?;
    let (value, dtype_arg, default) = match base.as_str() {
        "full" => {
            let v = cx.arg(first + 1)?.clone();
            (cx.float(first + 1)?, first + 2, dtype_of_number(&v))
        }
        "ones" => (1.0, first + 1, DType::F32),
        "zeros" | "empty" => (0.0, first + 1, DType::F32),
        other => bail!("factory {other} is not supported"),
    };
    let dtype = match (cx.opt_dtype(dtype_arg)?, like) {
        (Some(d), _) => d,
        (None, Some(t)) => cx.dtype(t),
        (None, None) => default,
    };
    Ok(vec![Val::Tensor(filled(cx, shape, dtype, value)?)])
}

/// `ones_like`, `zeros_like`, `empty_like`, `full_like`.
pub fn like(cx: &mut Cx<'_>) -> LResult<Vec<Val>> {
    let x = cx.tensor(0)?;
    let name = cx.node.kind.rsplit("::").next().unwrap_or("").to_string();
    let (value, dtype_arg) = match name.as_str() {
        "full_like" => (cx.float(1)?, 2),
        "ones_like" => (1.0, 1),
        "zeros_like" | "empty_like" => (0.0, 1),
        other => bail!("{other} is not supported"),
    };
    let dtype = cx.opt_dtype(dtype_arg)?.unwrap_or(cx.dtype(x));
    let shape = cx.shape(x);
    Ok(vec![Val::Tensor(filled(cx, shape, dtype, value)?)])
}

/// `arange(end)`, `arange(start, end)`, `arange(start, end, step)`.
pub fn arange(cx: &mut Cx<'_>) -> LResult<Vec<Val>> {
    let n_bounds = match cx.node.overload() {
        "" => 1,
        "start" => 2,
        "start_step" => 3,
        other => bail!("arange overload {other:?} is not supported"),
    };
    let bounds: Vec<f64> = (0..n_bounds).map(|i| cx.float(i)).collect::<LResult<_>>()?;
    let all_int = (0..n_bounds).all(|i| match cx.arg(i) {
        Ok(Val::Int(_)) => true,
        Ok(Val::Tensor(t)) => !cx.dtype(*t).is_float(),
        _ => false,
    });
    let (start, end, step) = match bounds[..] {
        [e] => (0.0, e, 1.0),
        [s, e] => (s, e, 1.0),
        [s, e, st] => (s, e, st),
        _ => bail!("arange takes 1 to 3 bounds"),
    };
    if step == 0.0 || !step.is_finite() || !start.is_finite() || !end.is_finite() {
        bail!("arange({start}, {end}, {step}) is not a finite range");
    }
    let n = ((end - start) / step).ceil().max(0.0) as usize;
    if n > 1 << 31 {
        bail!("arange of {n} elements");
    }
    let dtype = cx
        .opt_dtype(n_bounds)?
        .unwrap_or(if all_int { DType::I64 } else { DType::F32 });
    let mut t = Tensor::new(
        dtype,
        vec![n],
        (0..n).map(|i| start + i as f64 * step).collect(),
    );
    t.round_to_dtype();
    Ok(vec![Val::Tensor(cx.b.constant(t))])
}
