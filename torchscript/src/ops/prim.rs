//! List and tuple plumbing (`prim::ListConstruct`, `prim::TupleUnpack`, ...), numbers known at
//! import time (`aten::size`, `prim::NumToTensor`, `aten::Int`) and the ops that only change
//! how a tensor is held (`aten::contiguous`, `aten::to`, `aten::dropout` in eval mode).
//!
//! Shapes are static, so every `aten::size` is a number and the tracer's shape arithmetic
//! (`NumToTensor -> floor_divide -> Int`) folds to constants through the builder.

use crate::lower::{bail, scalar_type_code, Cx, LResult, Val};
use autopar_analyzer::ops::Dropout;
use autopar_analyzer::{DType, Tensor};

pub fn list_construct(cx: &mut Cx<'_>) -> LResult<Vec<Val>> {
    Ok(vec![Val::List(cx.args.clone())])
}

pub fn tuple_construct(cx: &mut Cx<'_>) -> LResult<Vec<Val>> {
    Ok(vec![Val::Tuple(cx.args.clone())])
}

/// `prim::ListUnpack` / `prim::TupleUnpack`: one output per element.
pub fn unpack(cx: &mut Cx<'_>) -> LResult<Vec<Val>> {
    let n = cx.node.outputs.len();
    match cx.arg(0)? {
        Val::List(items) | Val::Tuple(items) if items.len() == n => Ok(items.clone()),
        Val::List(items) | Val::Tuple(items) => {
            bail!("unpacks {n} values from a sequence of {}", items.len())
        }
        other => bail!("unpacks {}, not a list or tuple", other.kind()),
    }
}

/// `prim::TupleIndex`, `aten::__getitem__.t`: element `i` of a list or tuple.
pub fn get_item(cx: &mut Cx<'_>) -> LResult<Vec<Val>> {
    let i = cx.int(1)?;
    match cx.arg(0)? {
        Val::List(items) | Val::Tuple(items) => {
            let n = items.len() as i64;
            let j = if i < 0 { i + n } else { i };
            match usize::try_from(j).ok().and_then(|j| items.get(j)) {
                Some(v) => Ok(vec![v.clone()]),
                None => bail!("index {i} is out of range for {n} elements"),
            }
        }
        other => bail!("indexes {}, not a list or tuple", other.kind()),
    }
}

pub fn len(cx: &mut Cx<'_>) -> LResult<Vec<Val>> {
    match cx.arg(0)? {
        Val::List(items) | Val::Tuple(items) => Ok(vec![Val::Int(items.len() as i64)]),
        Val::Tensor(t) => match cx.shape(*t).first() {
            Some(&n) => Ok(vec![Val::Int(n as i64)]),
            None => bail!("len() of a 0-d tensor"),
        },
        other => bail!("len() of {}", other.kind()),
    }
}

/// `aten::size.int(x, dim)` or `aten::size(x)` (the whole shape as a list).
pub fn size(cx: &mut Cx<'_>) -> LResult<Vec<Val>> {
    let x = cx.tensor(0)?;
    let shape = cx.shape(x);
    if cx.args.len() < 2 {
        return Ok(vec![Val::List(
            shape.iter().map(|&d| Val::Int(d as i64)).collect(),
        )]);
    }
    let d = cx.dim(cx.int(1)?, shape.len())?;
    Ok(vec![Val::Int(shape[d] as i64)])
}

pub fn dim(cx: &mut Cx<'_>) -> LResult<Vec<Val>> {
    let x = cx.tensor(0)?;
    Ok(vec![Val::Int(cx.rank(x) as i64)])
}

pub fn numel(cx: &mut Cx<'_>) -> LResult<Vec<Val>> {
    let x = cx.tensor(0)?;
    Ok(vec![Val::Int(cx.ty(x).numel() as i64)])
}

/// `prim::dtype`: the dtype's `ScalarType` code.
pub fn dtype(cx: &mut Cx<'_>) -> LResult<Vec<Val>> {
    let x = cx.tensor(0)?;
    Ok(vec![Val::Int(scalar_type_code(cx.dtype(x)))])
}

pub fn device(_cx: &mut Cx<'_>) -> LResult<Vec<Val>> {
    Ok(vec![Val::Device("cpu".into())])
}

/// `prim::NumToTensor`: a number as a 0-d tensor (int64 for ints, float64 for floats, as
/// PyTorch does).
pub fn num_to_tensor(cx: &mut Cx<'_>) -> LResult<Vec<Val>> {
    let (dtype, v) = match cx.arg(0)? {
        Val::Int(i) => (DType::I64, *i as f64),
        Val::Float(f) => (DType::F64, *f),
        Val::Bool(b) => (DType::Bool, *b as i64 as f64),
        Val::Tensor(t) => return Ok(vec![Val::Tensor(*t)]),
        other => bail!("cannot make a tensor of {}", other.kind()),
    };
    let t = cx.b.constant(Tensor::scalar(dtype, v));
    Ok(vec![Val::Tensor(t)])
}

/// `aten::scalar_tensor(s, dtype=None, ...)`: a 0-d tensor of the default float dtype.
pub fn scalar_tensor(cx: &mut Cx<'_>) -> LResult<Vec<Val>> {
    let v = cx.float(0)?;
    let dtype = cx.opt_dtype(1)?.unwrap_or(DType::F32);
    let mut t = Tensor::scalar(dtype, v);
    t.round_to_dtype();
    Ok(vec![Val::Tensor(cx.b.constant(t))])
}

/// `aten::Int`, `aten::Float`, `aten::Bool`, `aten::ScalarImplicit`: a one-element tensor (or
/// number) as a number; the tensor must be known at import time.
pub fn to_number(cx: &mut Cx<'_>) -> LResult<Vec<Val>> {
    let v = cx.arg(0)?.clone();
    let x = match &v {
        Val::Tensor(t) => match cx.const_of(*t) {
            Some(c) if c.numel() == 1 => (c.data[0], c.dtype),
            Some(c) => bail!("converts a tensor of shape {:?} to a number", c.shape),
            None => bail!(
                "converts a tensor computed from run-time data ({}) to a number: the graph's \
                 shape would depend on data",
                cx.ty(*t)
            ),
        },
        Val::Int(i) => (*i as f64, DType::I64),
        Val::Float(f) => (*f, DType::F64),
        Val::Bool(b) => (*b as i64 as f64, DType::Bool),
        other => bail!("converts {} to a number", other.kind()),
    };
    Ok(vec![match cx.node.kind.as_str() {
        "aten::Int" => Val::Int(x.0 as i64),
        "aten::Float" => Val::Float(x.0),
        "aten::Bool" => Val::Bool(x.0 != 0.0),
        _ if x.1.is_float() => Val::Float(x.0),
        _ if x.1 == DType::Bool => Val::Bool(x.0 != 0.0),
        _ => Val::Int(x.0 as i64),
    }])
}

/// Ops that return their input unchanged in value: `contiguous`, `clone`, `detach`, ...
pub fn identity(cx: &mut Cx<'_>) -> LResult<Vec<Val>> {
    Ok(vec![cx.arg(0)?.clone()])
}

/// `aten::to` (every overload) and `aten::type_as`: a cast when the dtype changes; devices,
/// layouts and memory formats do not matter to the graph.
pub fn to(cx: &mut Cx<'_>) -> LResult<Vec<Val>> {
    let x = cx.tensor(0)?;
    let dtype = if cx.node.kind == "aten::type_as" {
        Some(cx.dtype(cx.tensor(1)?))
    } else {
        match cx.node.overload() {
            "dtype" | "dtype_layout" | "prim_dtype" => cx.opt_dtype(1)?,
            "device" | "prim_Device" => cx.opt_dtype(2)?,
            "other" => Some(cx.dtype(cx.tensor(1)?)),
            "prim_other" => None,
            other => bail!("aten::to overload {other:?} is not supported"),
        }
    };
    Ok(vec![Val::Tensor(match dtype {
        Some(d) => cx.cast(x, d)?,
        None => x,
    })])
}

/// `aten::dropout(x, p, train)`: the identity in eval mode, a `dropout` node in train mode.
pub fn dropout(cx: &mut Cx<'_>) -> LResult<Vec<Val>> {
    let x = cx.tensor(0)?;
    let p = cx.float(1)?;
    let train = cx.bool(2)?;
    if !train || p == 0.0 {
        return Ok(vec![Val::Tensor(x)]);
    }
    let y = cx.emit_n(
        Dropout {
            ratio: p,
            training: true,
            seed: cx.index as u64,
        },
        &[x],
    )?;
    Ok(vec![Val::Tensor(y[0])])
}
