//! `Reshape` (14, 19: `allowzero`), `Flatten` (13), `Squeeze` and `Unsqueeze` (13: axes input;
//! 11: axes attribute): all become one IR `reshape` to a concrete shape (or no node when the
//! shape does not change). The target must be known at import: exporters compute it with
//! `Shape`/`Gather`/`Concat` chains, which fold to constants.

use crate::graph::ValueId;
use crate::onnx::lower::{bail, checked_numel, LResult, Lowering};

pub fn reshape(n: &mut Lowering<'_>) -> LResult<Vec<ValueId>> {
    let x = n.input(0)?;
    let spec = n.const_ints(1)?;
    let allow_zero = n.attr_i("allowzero", 0)? != 0;
    let in_shape = n.shape(x);
    let mut shape = Vec::with_capacity(spec.len());
    let mut infer_at = None;
    for (i, &d) in spec.iter().enumerate() {
        match d {
            -1 if infer_at.is_none() => {
                infer_at = Some(i);
                shape.push(1);
            }
            -1 => bail!("shape {spec:?} has more than one -1"),
            0 if !allow_zero => match in_shape.get(i) {
                Some(&s) => shape.push(s),
                None => bail!("shape {spec:?} copies dim {i} (0), which {in_shape:?} lacks"),
            },
            d if d >= 0 => shape.push(d as usize),
            _ => bail!("shape {spec:?} has a negative dim"),
        }
    }
    let total = checked_numel(&in_shape)?;
    if let Some(i) = infer_at {
        let rest = checked_numel(&shape)?;
        if rest == 0 || total % rest != 0 {
            bail!("cannot reshape {in_shape:?} to {spec:?}");
        }
        shape[i] = total / rest;
    }
    if checked_numel(&shape)? != total {
        bail!("cannot reshape {in_shape:?} ({total} elements) to {shape:?}");
    }
    Ok(vec![n.reshape(x, shape)?])
}

pub fn flatten(n: &mut Lowering<'_>) -> LResult<Vec<ValueId>> {
    let x = n.input(0)?;
    let s = n.shape(x);
    let axis = n.attr_i("axis", 1)?;
    let axis = if axis < 0 {
        axis + s.len() as i64
    } else {
        axis
    };
    if axis < 0 || axis > s.len() as i64 {
        bail!("axis {axis} is out of range for rank {}", s.len());
    }
    let (outer, inner) = s.split_at(axis as usize);
    let shape = vec![checked_numel(outer)?, checked_numel(inner)?];
    Ok(vec![n.reshape(x, shape)?])
}

/// The axes operand: input 1 when present (opset 13), else the attribute.
fn axes_operand(n: &Lowering<'_>) -> LResult<Option<Vec<i64>>> {
    match n.opt_input(1) {
        Some(_) => Ok(Some(n.const_ints(1)?)),
        None => n.attr_ints("axes"),
    }
}

pub fn squeeze(n: &mut Lowering<'_>) -> LResult<Vec<ValueId>> {
    let x = n.input(0)?;
    let s = n.shape(x);
    let axes = match axes_operand(n)? {
        Some(a) => n.axes(&a, s.len())?,
        None => (0..s.len()).filter(|&d| s[d] == 1).collect(),
    };
    if let Some(&d) = axes.iter().find(|&&d| s[d] != 1) {
        bail!("cannot squeeze dim {d} of {s:?}: its size is not 1");
    }
    let shape = s
        .iter()
        .enumerate()
        .filter(|(d, _)| !axes.contains(d))
        .map(|(_, &k)| k)
        .collect();
    Ok(vec![n.reshape(x, shape)?])
}

pub fn unsqueeze(n: &mut Lowering<'_>) -> LResult<Vec<ValueId>> {
    let x = n.input(0)?;
    let s = n.shape(x);
    let Some(axes) = axes_operand(n)? else {
        bail!("axes are required");
    };
    let axes = n.axes(&axes, s.len() + axes.len())?;
    let mut shape = Vec::with_capacity(s.len() + axes.len());
    let mut src = s.iter();
    for d in 0..s.len() + axes.len() {
        if axes.contains(&d) {
            shape.push(1);
        } else if let Some(&k) = src.next() {
            shape.push(k);
        }
    }
    Ok(vec![n.reshape(x, shape)?])
}
