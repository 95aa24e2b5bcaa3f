//! `Conv` (11): N-d convolution with `strides`, `pads`, `dilations`, `group` and `auto_pad`
//! (`NOTSET`, `VALID`, `SAME_UPPER`, `SAME_LOWER`); inputs `X, W[, B]`. Lowers to the IR
//! `conv` op. The padding resolution is shared with the pooling ops.

use crate::graph::ValueId;
use crate::onnx::lower::{bail, to_dims, LResult, Lowering};
use crate::ops::Conv;

/// A per-spatial-dim attribute list (`strides`, `dilations`), default all ones.
pub fn spatial_attr(n: &Lowering<'_>, name: &str, spatial: usize) -> LResult<Vec<usize>> {
    match n.attr_ints(name)? {
        Some(v) if v.len() == spatial && v.iter().all(|&s| s >= 1) => to_dims(&v, name),
        Some(v) => bail!("{name} {v:?} must be {spatial} positive values"),
        None => Ok(vec![1; spatial]),
    }
}

/// `[begin, end]` pads per spatial dim, from `pads` or `auto_pad`.
pub fn resolve_pads(
    n: &Lowering<'_>,
    input: &[usize],
    kernel: &[usize],
    strides: &[usize],
    dilations: &[usize],
) -> LResult<Vec<[usize; 2]>> {
    let sp = input.len();
    let auto = n.attr_s("auto_pad", "NOTSET")?;
    match auto.as_str() {
        "NOTSET" => match n.attr_ints("pads")? {
            None => Ok(vec![[0, 0]; sp]),
            Some(p) if p.len() == 2 * sp && p.iter().all(|&x| x >= 0) => Ok((0..sp)
                .map(|i| [p[i] as usize, p[i + sp] as usize])
                .collect()),
            Some(p) => bail!("pads {p:?} must be {} non-negative values", 2 * sp),
        },
        "VALID" => Ok(vec![[0, 0]; sp]),
        "SAME_UPPER" | "SAME_LOWER" => Ok((0..sp)
            .map(|i| {
                let out = input[i].div_ceil(strides[i]);
                let span = kernel[i]
                    .saturating_sub(1)
                    .saturating_mul(dilations[i])
                    .saturating_add(1);
                let total = out
                    .saturating_sub(1)
                    .saturating_mul(strides[i])
                    .saturating_add(span)
                    .saturating_sub(input[i]);
                let small = total / 2;
                if auto == "SAME_UPPER" {
                    [small, total - small]
                } else {
                    [total - small, small]
                }
            })
            .collect()),
        other => bail!("unknown auto_pad {other:?}"),
    }
}

pub fn conv(n: &mut Lowering<'_>) -> LResult<Vec<ValueId>> {
    let x = n.input(0)?;
    let w = n.input(1)?;
    let xs = n.shape(x);
    let ws = n.shape(w);
    if xs.len() < 3 || ws.len() != xs.len() {
        bail!("Conv needs X [N, C, spatial...] and W of the same rank, got {xs:?} and {ws:?}");
    }
    let sp = xs.len() - 2;
    let kernel = ws[2..].to_vec();
    if let Some(k) = n.attr_ints("kernel_shape")? {
        if to_dims(&k, "kernel_shape")? != kernel {
            bail!("kernel_shape {k:?} disagrees with W {ws:?}");
        }
    }
    let strides = spatial_attr(n, "strides", sp)?;
    let dilations = spatial_attr(n, "dilations", sp)?;
    let Ok(groups) = usize::try_from(n.attr_i("group", 1)?) else {
        bail!("group must be positive");
    };
    let pads = resolve_pads(n, &xs[2..], &kernel, &strides, &dilations)?;
    let mut ins = vec![x, w];
    if let Some(b) = n.opt_input(2) {
        ins.push(b);
    }
    Ok(vec![n.emit(
        Conv {
            strides,
            pads,
            dilations,
            groups,
        },
        &ins,
    )?])
}
