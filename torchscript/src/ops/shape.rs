//! Layout ops: `view` / `reshape` / `flatten` / `unflatten`, `transpose` / `t` / `permute`,
//! `unsqueeze` / `squeeze`, `expand`, `repeat`, `slice` / `narrow` / `select`, `cat` / `stack`,
//! `split` / `chunk` / `unbind`, advanced `index`, `index_select`, `repeat_interleave` and
//! constant `pad`.
//!
//! All bounds are known at import time (static shapes); Python's slice clamping and negative
//! dims are resolved here so the IR ops get normalised attributes.

use crate::lower::{bail, promote_types, to_dims, Cx, LResult, Val};
use autopar_analyzer::ops::{Concat, Expand, Gather, GatherNd, Pad, Slice, Tile, Transpose};
use autopar_analyzer::{DType, Tensor, ValueId};

fn t(v: ValueId) -> Val {
    Val::Tensor(v)
}

/// A target shape with at most one `-1`, resolved against `numel`.
fn resolve_shape(spec: &[i64], numel: usize) -> LResult<Vec<usize>> {
    let mut unknown = None;
    let mut known = 1usize;
    for (i, &d) in spec.iter().enumerate() {
        if d == -1 {
            if unknown.is_some() {
                bail!("shape {spec:?} has more than one -1");
            }
            unknown = Some(i);
        } else if d < 0 {
            bail!("shape {spec:?} has a negative dim");
        } else {
            known = known.saturating_mul(d as usize);
        }
    }
    let mut out: Vec<usize> = spec.iter().map(|&d| d.max(0) as usize).collect();
    if let Some(i) = unknown {
        if known == 0 || numel % known != 0 {
            bail!("shape {spec:?} does not fit {numel} elements");
        }
        out[i] = numel / known;
    }
    if out.iter().product::<usize>() != numel {
        bail!("shape {spec:?} does not fit {numel} elements");
    }
    Ok(out)
}

/// `view`, `reshape` (and `view_as` / `reshape_as` / `_unsafe_view`).
pub fn reshape(cx: &mut Cx<'_>) -> LResult<Vec<Val>> {
    let x = cx.tensor(0)?;
    if cx.node.overload() == "dtype" {
        bail!("view(dtype) reinterprets bytes: not supported");
    }
    let spec: Vec<i64> = match cx.arg(1)? {
        Val::Tensor(o) if cx.node.kind.ends_with("_as") => {
            cx.shape(*o).iter().map(|&d| d as i64).collect()
        }
        _ => cx.ints(1)?,
    };
    let shape = resolve_shape(&spec, cx.ty(x).numel())?;
    Ok(vec![t(cx.reshape(x, shape)?)])
}

/// `flatten(x, start_dim, end_dim)`.
pub fn flatten(cx: &mut Cx<'_>) -> LResult<Vec<Val>> {
    let x = cx.tensor(0)?;
    let s = cx.shape(x);
    if s.is_empty() {
        return Ok(vec![t(cx.reshape(x, vec![1])?)]);
    }
    let a = cx.dim(cx.opt_int(1)?.unwrap_or(0), s.len())?;
    let b = cx.dim(cx.opt_int(2)?.unwrap_or(-1), s.len())?;
    if a > b {
        bail!("flatten start_dim {a} is after end_dim {b}");
    }
    let mut shape = s[..a].to_vec();
    shape.push(s[a..=b].iter().product());
    shape.extend_from_slice(&s[b + 1..]);
    Ok(vec![t(cx.reshape(x, shape)?)])
}

/// `unflatten(x, dim, sizes)`.
pub fn unflatten(cx: &mut Cx<'_>) -> LResult<Vec<Val>> {
    let x = cx.tensor(0)?;
    let s = cx.shape(x);
    let d = cx.dim(cx.int(1)?, s.len())?;
    let sizes = resolve_shape(&cx.ints(2)?, s[d])?;
    let mut shape = s[..d].to_vec();
    shape.extend(sizes);
    shape.extend_from_slice(&s[d + 1..]);
    Ok(vec![t(cx.reshape(x, shape)?)])
}

pub fn permute_value(cx: &mut Cx<'_>, x: ValueId, perm: Vec<usize>) -> LResult<ValueId> {
    if perm.iter().enumerate().all(|(i, &p)| i == p) {
        return Ok(x);
    }
    cx.emit(Transpose::new(perm), &[x])
}

/// `transpose(x, d0, d1)`, `t(x)`, `permute(x, dims)`, `swapaxes`.
pub fn transpose(cx: &mut Cx<'_>) -> LResult<Vec<Val>> {
    let x = cx.tensor(0)?;
    let r = cx.rank(x);
    let perm: Vec<usize> = match cx.node.kind.as_str() {
        "aten::permute" => {
            let dims = cx.ints(1)?;
            if dims.len() != r {
                bail!("permute dims {dims:?} for a rank-{r} tensor");
            }
            let p = dims
                .iter()
                .map(|&d| cx.dim(d, r))
                .collect::<LResult<Vec<_>>>()?;
            let mut seen = p.clone();
            seen.sort_unstable();
            seen.dedup();
            if seen.len() != r {
                bail!("permute dims {dims:?} repeat a dim");
            }
            p
        }
        "aten::t" | "aten::numpy_T" if r < 2 => return Ok(vec![t(x)]),
        "aten::t" | "aten::numpy_T" => (0..r).rev().collect(),
        _ => {
            let a = cx.dim(cx.int(1)?, r)?;
            let b = cx.dim(cx.int(2)?, r)?;
            let mut p: Vec<usize> = (0..r).collect();
            p.swap(a, b);
            p
        }
    };
    Ok(vec![t(permute_value(cx, x, perm)?)])
}

pub fn unsqueeze(cx: &mut Cx<'_>) -> LResult<Vec<Val>> {
    let x = cx.tensor(0)?;
    let mut s = cx.shape(x);
    let d = cx.dim(cx.int(1)?, s.len() + 1)?;
    s.insert(d, 1);
    Ok(vec![t(cx.reshape(x, s)?)])
}

/// `squeeze(x)` (every size-1 dim), `squeeze.dim`, `squeeze.dims` (dims of other sizes stay).
pub fn squeeze(cx: &mut Cx<'_>) -> LResult<Vec<Val>> {
    let x = cx.tensor(0)?;
    let s = cx.shape(x);
    let dims: Vec<usize> = match cx.opt_arg(1) {
        None => (0..s.len()).collect(),
        Some(_) => {
            let r = s.len().max(1);
            cx.ints(1)?
                .iter()
                .map(|&d| cx.dim(d, r))
                .collect::<LResult<Vec<_>>>()?
        }
    };
    let shape: Vec<usize> = s
        .iter()
        .enumerate()
        .filter(|(i, &n)| !(n == 1 && dims.contains(i)))
        .map(|(_, &n)| n)
        .collect();
    Ok(vec![t(cx.reshape(x, shape)?)])
}

/// `expand(x, sizes)` (`-1` keeps a dim), `expand_as(x, other)`.
pub fn expand(cx: &mut Cx<'_>) -> LResult<Vec<Val>> {
    let x = cx.tensor(0)?;
    let s = cx.shape(x);
    let spec: Vec<i64> = match cx.arg(1)? {
        Val::Tensor(o) => cx.shape(*o).iter().map(|&d| d as i64).collect(),
        _ => cx.ints(1)?,
    };
    if spec.len() < s.len() {
        bail!("expand to {spec:?} has fewer dims than the input {s:?}");
    }
    let off = spec.len() - s.len();
    let mut shape = Vec::with_capacity(spec.len());
    for (i, &d) in spec.iter().enumerate() {
        shape.push(match d {
            -1 if i >= off => s[i - off],
            -1 => bail!("expand to {spec:?}: -1 for a new leading dim"),
            d if d < 0 => bail!("expand to {spec:?} has a negative size"),
            d => d as usize,
        });
    }
    if shape == s {
        return Ok(vec![t(x)]);
    }
    Ok(vec![t(cx.emit(Expand::new(shape), &[x])?)])
}

/// `repeat(x, repeats)`: a tile, with leading dims added when `repeats` is longer.
pub fn repeat(cx: &mut Cx<'_>) -> LResult<Vec<Val>> {
    let x = cx.tensor(0)?;
    let reps = to_dims(&cx.ints(1)?, "repeats")?;
    let s = cx.shape(x);
    if reps.len() < s.len() {
        bail!("repeat {reps:?} has fewer dims than the input {s:?}");
    }
    let mut shape = vec![1; reps.len() - s.len()];
    shape.extend_from_slice(&s);
    let x = cx.reshape(x, shape)?;
    if reps.iter().all(|&r| r == 1) {
        return Ok(vec![t(x)]);
    }
    Ok(vec![t(cx.emit(Tile { repeats: reps }, &[x])?)])
}

/// A step-`step` slice `[start, end)` of axis `d` with Python clamping; no node when whole.
pub fn slice_value(
    cx: &mut Cx<'_>,
    x: ValueId,
    d: usize,
    start: Option<i64>,
    end: Option<i64>,
    step: i64,
) -> LResult<ValueId> {
    let n = cx.shape(x)[d] as i64;
    if step < 1 {
        bail!("slice step {step} (only positive steps are supported)");
    }
    let norm = |v: i64| {
        let v = if v < 0 { v + n } else { v };
        v.clamp(0, n)
    };
    let s = start.map_or(0, norm);
    let e = end.map_or(n, norm).max(s);
    if s == 0 && e == n && step == 1 {
        return Ok(x);
    }
    cx.emit(
        Slice {
            axes: vec![d],
            starts: vec![s as usize],
            ends: vec![e as usize],
            steps: vec![step as usize],
        },
        &[x],
    )
}

/// `slice.Tensor(x, dim, start, end, step)`.
pub fn slice(cx: &mut Cx<'_>) -> LResult<Vec<Val>> {
    let x = cx.tensor(0)?;
    let d = cx.dim(cx.opt_int(1)?.unwrap_or(0), cx.rank(x))?;
    let start = cx.opt_int(2)?;
    let end = cx.opt_int(3)?;
    let step = cx.opt_int(4)?.unwrap_or(1);
    Ok(vec![t(slice_value(cx, x, d, start, end, step)?)])
}

/// `narrow(x, dim, start, length)`.
pub fn narrow(cx: &mut Cx<'_>) -> LResult<Vec<Val>> {
    let x = cx.tensor(0)?;
    let d = cx.dim(cx.int(1)?, cx.rank(x))?;
    let n = cx.shape(x)[d] as i64;
    let mut s = cx.int(2)?;
    if s < 0 {
        s += n;
    }
    let len = cx.int(3)?;
    if s < 0 || len < 0 || s + len > n {
        bail!("narrow [{s}, {s}+{len}) is out of range for a dim of size {n}");
    }
    Ok(vec![t(slice_value(cx, x, d, Some(s), Some(s + len), 1)?)])
}

/// `select(x, dim, index)`: a gather of one index (the dim disappears).
fn select_value(cx: &mut Cx<'_>, x: ValueId, d: usize, index: i64) -> LResult<ValueId> {
    let n = cx.shape(x)[d] as i64;
    let i = if index < 0 { index + n } else { index };
    if i < 0 || i >= n {
        bail!("index {index} is out of range for a dim of size {n}");
    }
    let idx = cx.b.constant(Tensor::scalar(DType::I64, i as f64));
    cx.emit(Gather { axis: d }, &[x, idx])
}

pub fn select(cx: &mut Cx<'_>) -> LResult<Vec<Val>> {
    let x = cx.tensor(0)?;
    let d = cx.dim(cx.int(1)?, cx.rank(x))?;
    let i = cx.int(2)?;
    Ok(vec![t(select_value(cx, x, d, i)?)])
}

/// `unbind(x, dim)`: every index of `dim`.
pub fn unbind(cx: &mut Cx<'_>) -> LResult<Vec<Val>> {
    let x = cx.tensor(0)?;
    let d = cx.dim(cx.opt_int(1)?.unwrap_or(0), cx.rank(x))?;
    let n = cx.shape(x)[d];
    let parts = (0..n)
        .map(|i| select_value(cx, x, d, i as i64).map(Val::Tensor))
        .collect::<LResult<Vec<_>>>()?;
    Ok(vec![Val::List(parts)])
}

/// Casts tensors to their common dtype (cat / stack promote).
fn common_dtype(cx: &mut Cx<'_>, xs: &[ValueId]) -> LResult<Vec<ValueId>> {
    let Some(dt) = xs.iter().map(|&x| cx.dtype(x)).reduce(promote_types) else {
        bail!("needs at least one tensor");
    };
    xs.iter().map(|&x| cx.cast(x, dt)).collect()
}

/// `cat(tensors, dim)` (also `concat`, `concatenate`).
pub fn cat(cx: &mut Cx<'_>) -> LResult<Vec<Val>> {
    let xs = cx.tensors(0)?;
    let xs = common_dtype(cx, &xs)?;
    let r = cx.rank(xs[0]);
    let d = cx.dim(cx.opt_int(1)?.unwrap_or(0), r)?;
    if xs.len() == 1 {
        return Ok(vec![t(xs[0])]);
    }
    Ok(vec![t(cx.emit(Concat { axis: d }, &xs)?)])
}

/// `stack(tensors, dim)`: unsqueeze each, concatenate.
pub fn stack(cx: &mut Cx<'_>) -> LResult<Vec<Val>> {
    let xs = cx.tensors(0)?;
    let xs = common_dtype(cx, &xs)?;
    let r = cx.rank(xs[0]);
    let d = cx.dim(cx.opt_int(1)?.unwrap_or(0), r + 1)?;
    let mut parts = vec![];
    for x in xs {
        let mut s = cx.shape(x);
        s.insert(d, 1);
        parts.push(cx.reshape(x, s)?);
    }
    if parts.len() == 1 {
        return Ok(vec![t(parts[0])]);
    }
    Ok(vec![t(cx.emit(Concat { axis: d }, &parts)?)])
}

fn split_sizes(cx: &mut Cx<'_>, x: ValueId, d: usize, sizes: &[usize]) -> LResult<Val> {
    let n = cx.shape(x)[d];
    if sizes.iter().sum::<usize>() != n {
        bail!("split sizes {sizes:?} do not add up to the dim's size {n}");
    }
    let mut parts = vec![];
    let mut at = 0;
    for &s in sizes {
        parts.push(Val::Tensor(slice_value(
            cx,
            x,
            d,
            Some(at as i64),
            Some((at + s) as i64),
            1,
        )?));
        at += s;
    }
    Ok(Val::List(parts))
}

/// `split(x, size_or_sizes, dim)`, `split_with_sizes`, `chunk(x, chunks, dim)`.
pub fn split(cx: &mut Cx<'_>) -> LResult<Vec<Val>> {
    let x = cx.tensor(0)?;
    let d = cx.dim(cx.opt_int(2)?.unwrap_or(0), cx.rank(x))?;
    let n = cx.shape(x)[d];
    let chunked = cx.node.kind.contains("chunk");
    let sizes: Vec<usize> = match cx.arg(1)? {
        Val::List(_) | Val::Tuple(_) => to_dims(&cx.ints(1)?, "split sizes")?,
        _ => {
            let k = cx.int(1)?;
            if k <= 0 {
                bail!("split size / chunk count {k} must be positive");
            }
            let size = if chunked {
                n.div_ceil(k as usize).max(1)
            } else {
                k as usize
            };
            let mut v = vec![];
            let mut left = n;
            while left > 0 {
                v.push(size.min(left));
                left -= size.min(left);
            }
            if v.is_empty() {
                v.push(0);
            }
            v
        }
    };
    Ok(vec![split_sizes(cx, x, d, &sizes)?])
}

/// `index_select(x, dim, index)`.
pub fn index_select(cx: &mut Cx<'_>) -> LResult<Vec<Val>> {
    let x = cx.tensor(0)?;
    let d = cx.dim(cx.int(1)?, cx.rank(x))?;
    let i = cx.tensor(2)?;
    if cx.rank(i) > 1 {
        bail!(
            "index_select index must be 0-D or 1-D, got {:?}",
            cx.shape(i)
        );
    }
    Ok(vec![t(cx.emit(Gather { axis: d }, &[x, i])?)])
}

/// `index(x, indices)`: advanced indexing with integer index tensors (`None` keeps a dim).
/// One index tensor is a `gather`; several broadcast together and become a `gather_nd` over
/// the indexed dims moved to the front (and moved back when they were adjacent, as PyTorch
/// places the result there).
pub fn index(cx: &mut Cx<'_>) -> LResult<Vec<Val>> {
    let x = cx.tensor(0)?;
    let items: Vec<Option<ValueId>> = match cx.arg(1)? {
        Val::List(items) | Val::Tuple(items) => items
            .iter()
            .map(|v| match v {
                Val::None => Ok(None),
                Val::Tensor(t) => Ok(Some(*t)),
                other => bail!("index list holds {}", other.kind()),
            })
            .collect::<LResult<_>>()?,
        other => bail!("indices must be a list, got {}", other.kind()),
    };
    let r = cx.rank(x);
    if items.len() > r {
        bail!("{} indices for a rank-{r} tensor", items.len());
    }
    let mut pos = vec![];
    let mut idx = vec![];
    for (d, it) in items.iter().enumerate() {
        if let Some(i) = it {
            let dt = cx.dtype(*i);
            if dt == DType::Bool || dt == DType::U8 {
                bail!("boolean mask indexing makes the shape depend on data: not supported");
            }
            if !dt.is_int() {
                bail!("index tensors must be integer, got {dt}");
            }
            pos.push(d);
            idx.push(*i);
        }
    }
    match idx.len() {
        0 => return Ok(vec![t(x)]),
        1 => return Ok(vec![t(cx.emit(Gather { axis: pos[0] }, &[x, idx[0]])?)]),
        _ => {}
    }
    // broadcast the index tensors and stack them on a new last dim
    let mut bshape: Vec<usize> = vec![];
    for &i in &idx {
        let s = cx.shape(i);
        bshape = match autopar_analyzer::dtype::broadcast_shapes(&bshape, &s) {
            Some(b) => b,
            None => bail!("index shapes {bshape:?} and {s:?} do not broadcast"),
        };
    }
    let mut cols = vec![];
    for &i in &idx {
        let i = cx.cast(i, DType::I64)?;
        let i = if cx.shape(i) == bshape {
            i
        } else {
            cx.emit(Expand::new(bshape.clone()), &[i])?
        };
        let mut s = bshape.clone();
        s.push(1);
        cols.push(cx.reshape(i, s)?);
    }
    let stacked = cx.emit(Concat { axis: bshape.len() }, &cols)?;
    // move the indexed dims to the front
    let rest: Vec<usize> = (0..r).filter(|d| !pos.contains(d)).collect();
    let mut perm = pos.clone();
    perm.extend(&rest);
    let xt = permute_value(cx, x, perm)?;
    let g = cx.emit(GatherNd { batch_dims: 0 }, &[xt, stacked])?;
    let adjacent = pos.windows(2).all(|w| w[1] == w[0] + 1);
    if !adjacent || pos[0] == 0 {
        return Ok(vec![t(g)]);
    }
    // result is B ++ rest; PyTorch puts B where the adjacent indexed dims were
    let nb = bshape.len();
    let before = pos[0];
    let mut perm: Vec<usize> = (nb..nb + before).collect();
    perm.extend(0..nb);
    perm.extend(nb + before..nb + rest.len());
    Ok(vec![t(permute_value(cx, g, perm)?)])
}

/// `repeat_interleave(x, repeats, dim)`: each element repeated; a uniform count is an
/// unsqueeze-expand-reshape, per-element constant counts a gather.
pub fn repeat_interleave(cx: &mut Cx<'_>) -> LResult<Vec<Val>> {
    let mut x = cx.tensor(0)?;
    let d = match cx.opt_int(2)? {
        Some(d) => cx.dim(d, cx.rank(x))?,
        None => {
            let n = cx.ty(x).numel();
            x = cx.reshape(x, vec![n])?;
            0
        }
    };
    let s = cx.shape(x);
    let counts: Vec<i64> = match cx.arg(1)? {
        Val::Tensor(r) => match cx.const_of(*r) {
            Some(c) => c.to_i64_vec(),
            None => bail!("repeats computed from run-time data make the shape depend on data"),
        },
        _ => vec![cx.int(1)?],
    };
    if counts.iter().any(|&c| c < 0) {
        bail!("negative repeats {counts:?}");
    }
    if let [r] = counts[..] {
        let r = r as usize;
        let mut u = s.clone();
        u.insert(d + 1, 1);
        let y = cx.reshape(x, u.clone())?;
        u[d + 1] = r;
        let y = if r == 1 {
            y
        } else {
            cx.emit(Expand::new(u), &[y])?
        };
        let mut out = s.clone();
        out[d] *= r;
        return Ok(vec![t(cx.reshape(y, out)?)]);
    }
    if counts.len() != s[d] {
        bail!("{} repeats for a dim of size {}", counts.len(), s[d]);
    }
    let idx: Vec<f64> = counts
        .iter()
        .enumerate()
        .flat_map(|(i, &c)| std::iter::repeat_n(i as f64, c as usize))
        .collect();
    let n = idx.len();
    let i = cx.b.constant(Tensor::new(DType::I64, vec![n], idx));
    Ok(vec![t(cx.emit(Gather { axis: d }, &[x, i])?)])
}

/// `pad(x, pad, mode="constant", value)`, `constant_pad_nd(x, pad, value)`: pairs from the
/// last dim backwards; negative amounts crop.
pub fn pad(cx: &mut Cx<'_>) -> LResult<Vec<Val>> {
    let x = cx.tensor(0)?;
    let p = cx.ints(1)?;
    let (value_arg, mode) = if cx.node.kind == "aten::pad" {
        let mode = match cx.opt_arg(2) {
            Some(Val::Str(s)) => s.clone(),
            _ => "constant".into(),
        };
        (3, mode)
    } else {
        (2, "constant".into())
    };
    if mode != "constant" {
        bail!("pad mode {mode:?} is not supported (only constant)");
    }
    let value = cx.opt_float(value_arg)?.unwrap_or(0.0);
    let s = cx.shape(x);
    if p.len() % 2 != 0 || p.len() / 2 > s.len() {
        bail!("pad {p:?} for a rank-{} tensor", s.len());
    }
    let mut pads = vec![[0usize; 2]; s.len()];
    let mut crops = vec![];
    for k in 0..p.len() / 2 {
        let d = s.len() - 1 - k;
        for side in 0..2 {
            let a = p[2 * k + side];
            if a >= 0 {
                pads[d][side] = a as usize;
            } else {
                crops.push((d, side, (-a) as usize));
            }
        }
    }
    let mut y = x;
    if pads.iter().any(|q| *q != [0, 0]) {
        y = cx.emit(Pad { pads, value }, &[y])?;
    }
    for (d, side, n) in crops {
        let len = cx.shape(y)[d];
        if n > len {
            bail!("pad {p:?} crops more than dim {d} holds");
        }
        let (a, b) = if side == 0 { (n, len) } else { (0, len - n) };
        y = slice_value(cx, y, d, Some(a as i64), Some(b as i64), 1)?;
    }
    Ok(vec![t(y)])
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn resolves_shapes() {
        assert_eq!(resolve_shape(&[-1, 4], 12).unwrap(), vec![3, 4]);
        assert!(resolve_shape(&[-1, -1], 12).is_err());
        assert!(resolve_shape(&[5, -1], 12).is_err());
        assert_eq!(resolve_shape(&[], 1).unwrap(), Vec::<usize>::new());
    }
}
