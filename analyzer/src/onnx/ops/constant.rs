//! `Constant` (13/19: `value`, `value_float(s)`, `value_int(s)`; strings and sparse tensors are
//! not supported) and `ConstantOfShape` (9/20: a constant `shape` input and a one-element
//! `value`, default float 0). Both evaluate at import: a constant becomes an IR constant; a
//! `ConstantOfShape` too large to fold becomes a scalar constant and an `expand` node. A
//! `Constant` whose tensor lives in external data that is absent (graph-only exports move every
//! tensor over 64 KiB out of the file) becomes a buffer without data, like an initializer.

use crate::builder::FOLD_MAX_ELEMENTS;
use crate::dtype::DType;
use crate::graph::ValueId;
use crate::onnx::lower::{bail, checked_numel, to_dims, LResult, LowerError, Lowering};
use crate::onnx::weights::{tensor_values, TensorValue};
use crate::ops::Expand;
use crate::tensor::Tensor;

pub fn constant(n: &mut Lowering<'_>) -> LResult<Vec<ValueId>> {
    let t = if let Some(t) = n.attr_t("value")? {
        match tensor_values(t, n.base_dir).map_err(LowerError::Msg)? {
            TensorValue::Known(t) => t,
            TensorValue::Unknown(ty, data) => {
                let name = n.node.output.first().cloned().unwrap_or_default();
                return Ok(vec![n.b.buffer_with(name, ty, data)]);
            }
        }
    } else if let Some(f) = n.attr_opt_f("value_float")? {
        Tensor::scalar(DType::F32, f)
    } else if let Some(fs) = n.attr_floats("value_floats")? {
        Tensor::new(
            DType::F32,
            vec![fs.len()],
            fs.iter().map(|&f| f as f64).collect(),
        )
    } else if let Some(i) = n.attr_opt_i("value_int")? {
        Tensor::scalar(DType::I64, i as f64)
    } else if let Some(is) = n.attr_ints("value_ints")? {
        Tensor::from_i64(vec![is.len()], &is)
    } else {
        bail!("no supported value attribute (value, value_float(s), value_int(s))");
    };
    Ok(vec![n.constant(t)])
}

pub fn constant_of_shape(n: &mut Lowering<'_>) -> LResult<Vec<ValueId>> {
    let shape = to_dims(&n.const_ints(0)?, "shape")?;
    let value = match n.attr_t("value")? {
        Some(t) => match tensor_values(t, n.base_dir).map_err(LowerError::Msg)? {
            TensorValue::Known(t) if t.numel() == 1 => t,
            _ => bail!("value must be a one-element tensor"),
        },
        None => Tensor::scalar(DType::F32, 0.0),
    };
    let numel = checked_numel(&shape)?;
    if numel <= FOLD_MAX_ELEMENTS {
        return Ok(vec![n.constant(Tensor::full(
            value.dtype,
            shape,
            value.data[0],
        ))]);
    }
    let s = n.scalar(value.dtype, value.data[0]);
    Ok(vec![n.emit(Expand { shape }, &[s])?])
}
