//! `MaxPool` (12; the `Indices` output is not supported), `AveragePool` (11, 19:
//! `dilations`) with `kernel_shape`, `strides`, `pads` / `auto_pad`, `ceil_mode`,
//! `count_include_pad`, lowered to the IR `pool` op; `GlobalAveragePool` / `GlobalMaxPool` (1)
//! as an IR `reduce` over the spatial dims keeping them.

use super::conv::{resolve_pads, spatial_attr};
use crate::graph::ValueId;
use crate::onnx::lower::{bail, to_dims, LResult, Lowering};
use crate::ops::pool::PoolKind;
use crate::ops::reduce::ReduceKind;
use crate::ops::{Pool, Reduce};

fn pool(n: &mut Lowering<'_>, kind: PoolKind) -> LResult<Vec<ValueId>> {
    let x = n.input(0)?;
    let xs = n.shape(x);
    if xs.len() < 3 {
        bail!("pooling needs [N, C, spatial...], got {xs:?}");
    }
    if n.output_used(1) {
        bail!("the Indices output is not supported");
    }
    let sp = xs.len() - 2;
    let kernel = match n.attr_ints("kernel_shape")? {
        Some(k) if k.len() == sp && k.iter().all(|&d| d >= 1) => to_dims(&k, "kernel_shape")?,
        _ => bail!("kernel_shape must be {sp} positive values"),
    };
    let strides = spatial_attr(n, "strides", sp)?;
    let dilations = spatial_attr(n, "dilations", sp)?;
    let pads = resolve_pads(n, &xs[2..], &kernel, &strides, &dilations)?;
    let ceil_mode = n.attr_i("ceil_mode", 0)? != 0;
    let count_include_pad = n.attr_i("count_include_pad", 0)? != 0;
    Ok(vec![n.emit(
        Pool {
            kind,
            kernel,
            strides,
            pads,
            dilations,
            count_include_pad,
            ceil_mode,
        },
        &[x],
    )?])
}

pub fn max_pool(n: &mut Lowering<'_>) -> LResult<Vec<ValueId>> {
    pool(n, PoolKind::Max)
}
pub fn average_pool(n: &mut Lowering<'_>) -> LResult<Vec<ValueId>> {
    pool(n, PoolKind::Avg)
}

fn global(n: &mut Lowering<'_>, kind: ReduceKind) -> LResult<Vec<ValueId>> {
    let x = n.input(0)?;
    let r = n.rank(x);
    if r < 3 {
        bail!(
            "global pooling needs [N, C, spatial...], got {:?}",
            n.shape(x)
        );
    }
    let axes = (2..r).collect();
    Ok(vec![n.emit(
        Reduce {
            kind,
            axes,
            keepdims: true,
        },
        &[x],
    )?])
}

pub fn global_average_pool(n: &mut Lowering<'_>) -> LResult<Vec<ValueId>> {
    global(n, ReduceKind::Mean)
}
pub fn global_max_pool(n: &mut Lowering<'_>) -> LResult<Vec<ValueId>> {
    global(n, ReduceKind::Max)
}
