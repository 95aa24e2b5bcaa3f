//! `Slice` (13): `starts, ends[, axes[, steps]]` inputs, which must be constants. Bounds are
//! normalised the ONNX way (negative counts from the end, out-of-range clamps, so
//! `INT64_MAX` means "to the end") into the IR `slice` op's `start <= end <= dim`; axes that
//! keep the whole dim are dropped, and a slice that keeps everything is no node. Negative
//! steps (reversal) have no IR op: they are evaluated here when the data is a constant (the
//! TorchScript exporter reverses pad lists that way) and rejected otherwise.

use crate::graph::ValueId;
use crate::onnx::lower::{bail, LResult, Lowering};
use crate::ops::Slice;
use crate::tensor::{for_each_index, Tensor};

/// One sliced axis: `(axis, start, end, step)`.
pub type AxisSlice = (usize, usize, usize, usize);

/// Normalises an ONNX bound against `dim` (for positive steps).
fn clamp_bound(b: i64, dim: usize) -> usize {
    let d = dim as i64;
    let b = if b < 0 { b.saturating_add(d) } else { b };
    b.clamp(0, d) as usize
}

/// `x[axis][start:end:step]` for each listed axis (no node when nothing is cut).
pub fn slice_axes(n: &mut Lowering<'_>, x: ValueId, slices: &[AxisSlice]) -> LResult<ValueId> {
    let shape = n.shape(x);
    let mut s: Vec<AxisSlice> = slices
        .iter()
        .copied()
        .filter(|&(a, st, e, step)| !(st == 0 && e == shape[a] && step == 1))
        .collect();
    if s.is_empty() {
        return Ok(x);
    }
    s.sort_unstable();
    n.emit(
        Slice {
            axes: s.iter().map(|t| t.0).collect(),
            starts: s.iter().map(|t| t.1).collect(),
            ends: s.iter().map(|t| t.2).collect(),
            steps: s.iter().map(|t| t.3).collect(),
        },
        &[x],
    )
}

pub fn slice(n: &mut Lowering<'_>) -> LResult<Vec<ValueId>> {
    let x = n.input(0)?;
    let shape = n.shape(x);
    let starts = n.const_ints(1)?;
    let ends = n.const_ints(2)?;
    let axes = match n.opt_input(3) {
        Some(_) => n.const_ints(3)?,
        None => (0..starts.len() as i64).collect(),
    };
    let steps = match n.opt_input(4) {
        Some(_) => n.const_ints(4)?,
        None => vec![1; starts.len()],
    };
    if ends.len() != starts.len() || axes.len() != starts.len() || steps.len() != starts.len() {
        bail!(
            "starts, ends, axes and steps differ in length ({}, {}, {}, {})",
            starts.len(),
            ends.len(),
            axes.len(),
            steps.len()
        );
    }
    let mut axes_n = Vec::with_capacity(starts.len());
    for &a in &axes {
        let a = n.axis(a, shape.len())?;
        if axes_n.contains(&a) {
            bail!("axis {a} is sliced twice");
        }
        axes_n.push(a);
    }
    if let Some(i) = steps.iter().position(|&s| s == 0) {
        bail!("step 0 on axis {}", axes_n[i]);
    }
    if steps.iter().any(|&s| s < 0) {
        let Some(t) = n.b.graph.const_value(x).cloned() else {
            bail!("negative steps {steps:?} (reversing slices) of run-time data are not supported");
        };
        let spec: Vec<(usize, i64, i64, i64)> = (0..starts.len())
            .map(|i| (axes_n[i], starts[i], ends[i], steps[i]))
            .collect();
        return Ok(vec![n.constant(eval_slice(&t, &spec))]);
    }
    let mut slices = Vec::with_capacity(starts.len());
    for i in 0..starts.len() {
        let (a, dim) = (axes_n[i], shape[axes_n[i]]);
        let start = clamp_bound(starts[i], dim);
        let end = clamp_bound(ends[i], dim).max(start);
        slices.push((a, start, end, steps[i] as usize));
    }
    Ok(vec![slice_axes(n, x, &slices)?])
}

/// ONNX `Slice` of a constant with any non-zero steps: `(axis, start, end, step)` per axis.
fn eval_slice(t: &Tensor, spec: &[(usize, i64, i64, i64)]) -> Tensor {
    // per dim: first index, step, count
    let mut first = vec![0i64; t.rank()];
    let mut stride = vec![1i64; t.rank()];
    let mut out_shape = t.shape.clone();
    for &(a, start, end, step) in spec {
        let d = t.shape[a] as i64;
        let norm = |b: i64| if b < 0 { b.saturating_add(d) } else { b };
        let (s, e) = if step > 0 {
            (norm(start).clamp(0, d), norm(end).clamp(0, d))
        } else {
            (norm(start).clamp(0, d - 1), norm(end).clamp(-1, d - 1))
        };
        let count = if step > 0 {
            (e - s + step - 1).div_euclid(step).max(0)
        } else {
            (s - e + (-step) - 1).div_euclid(-step).max(0)
        };
        first[a] = s;
        stride[a] = step;
        out_shape[a] = count as usize;
    }
    let strides = t.strides();
    let mut data = Vec::with_capacity(out_shape.iter().product());
    for_each_index(&out_shape, |idx| {
        let flat: i64 = idx
            .iter()
            .enumerate()
            .map(|(d, &i)| (first[d] + i as i64 * stride[d]) * strides[d] as i64)
            .sum();
        data.push(t.data[flat as usize]);
    });
    Tensor::new(t.dtype, out_shape, data)
}
