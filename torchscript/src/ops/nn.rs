//! Neural-network aten ops: `embedding`, `scaled_dot_product_attention` (lowered to
//! einsum-softmax-einsum, masks as `where` / additive), `softmax` / `log_softmax`,
//! `cross_entropy_loss`, `layer_norm`, `rms_norm`, `batch_norm`, convolutions
//! (`_convolution`, `conv1d/2d/3d`), pooling (`max_pool*`, `avg_pool*`,
//! `adaptive_avg_pool*`), reductions (`mean`, `sum`, `amax`, `amin`) and `topk`.

use super::create::filled;
use super::elementwise::binary_op;
use crate::lower::{bail, to_dims, Cx, LResult, Operand, Priority, Val};
use autopar_analyzer::ops::binary::BinaryKind;
use autopar_analyzer::ops::cross_entropy::LossReduction;
use autopar_analyzer::ops::pool::PoolKind;
use autopar_analyzer::ops::reduce::ReduceKind;
use autopar_analyzer::ops::{
    BatchNorm, Binary, CausalMask, Conv, Dropout, Einsum, Expand, Gather, LayerNorm, Pool, Reduce,
    RmsNorm, Softmax, SoftmaxCrossEntropy, TopK, Where,
};
use autopar_analyzer::{DType, ValueId};

fn t(v: ValueId) -> Val {
    Val::Tensor(v)
}

/// `embedding(weight, indices, padding_idx, scale_grad_by_freq, sparse)`: rows of the table.
pub fn embedding(cx: &mut Cx<'_>) -> LResult<Vec<Val>> {
    let w = cx.tensor(0)?;
    let i = cx.tensor(1)?;
    if cx.rank(w) != 2 {
        bail!("embedding table must be 2-D, got {:?}", cx.shape(w));
    }
    Ok(vec![t(cx.emit(Gather { axis: 0 }, &[w, i])?)])
}

/// `softmax(x, dim, dtype)`, `log_softmax(x, dim, dtype)`.
pub fn softmax(cx: &mut Cx<'_>) -> LResult<Vec<Val>> {
    let x = cx.tensor(0)?;
    let axis = cx.dim(cx.int(1)?, cx.rank(x))?;
    let x = match cx.opt_dtype(2)? {
        Some(d) => cx.cast(x, d)?,
        None if !cx.dtype(x).is_float() => bail!("softmax of a {} tensor", cx.dtype(x)),
        None => x,
    };
    let log = cx.node.kind.contains("log_softmax");
    Ok(vec![t(cx.emit(Softmax { axis, log }, &[x])?)])
}

/// `scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal, scale,
/// enable_gqa)`: `softmax(q k^T * scale + mask) v` over the last two dims; with fewer key/value
/// heads than query heads (grouped-query attention) each key/value head serves a group.
pub fn sdpa(cx: &mut Cx<'_>) -> LResult<Vec<Val>> {
    let q = cx.tensor(0)?;
    let mut k = cx.tensor(1)?;
    let mut v = cx.tensor(2)?;
    let mask = cx.opt_tensor(3)?;
    let dropout_p = cx.opt_float(4)?.unwrap_or(0.0);
    let causal = cx.opt_bool(5)?.unwrap_or(false);
    let scale = cx.opt_float(6)?;
    let (qs, ks, vs) = (cx.shape(q), cx.shape(k), cx.shape(v));
    let r = qs.len();
    if r < 2 || ks.len() != r || vs.len() != r || r > 6 {
        bail!("query, key and value must have the same rank (2 to 6), got {qs:?}, {ks:?}, {vs:?}");
    }
    let e = qs[r - 1];
    if ks[r - 1] != e || ks[r - 2] != vs[r - 2] {
        bail!("key {ks:?} / value {vs:?} do not fit query {qs:?}");
    }
    // grouped-query attention: repeat each key/value head for its group of query heads
    if r >= 3 && ks[r - 3] != qs[r - 3] {
        let (hq, hk) = (qs[r - 3], ks[r - 3]);
        if hk == 0 || hq % hk != 0 {
            bail!("{hq} query heads cannot share {hk} key/value heads");
        }
        let g = hq / hk;
        k = repeat_heads(cx, k, r - 3, g)?;
        v = repeat_heads(cx, v, r - 3, g)?;
    }
    let dt = cx.dtype(q);
    let batch: String = "abcdh".chars().skip(5 - (r - 2)).collect();
    let mut scores = cx.emit(
        Einsum::new(format!("{batch}le,{batch}se->{batch}ls")),
        &[q, k],
    )?;
    let scale = scale.unwrap_or(1.0 / (e as f64).sqrt());
    let s = cx.scalar(dt, scale);
    scores = cx.emit(
        Binary {
            kind: BinaryKind::Mul,
        },
        &[scores, s],
    )?;
    let (l, sk) = (qs[r - 2], ks[r - 2]);
    if causal {
        let m = cx.emit(
            CausalMask {
                rows: l,
                cols: sk,
                dtype: dt,
            },
            &[],
        )?;
        scores = cx.emit(
            Binary {
                kind: BinaryKind::Add,
            },
            &[scores, m],
        )?;
    }
    if let Some(m) = mask {
        if cx.dtype(m) == DType::Bool {
            let low = cx.scalar(dt, f64::NEG_INFINITY);
            scores = cx.emit(Where {}, &[m, scores, low])?;
        } else {
            let a = Operand {
                v: scores,
                priority: Priority::Dimensioned,
            };
            let b = Operand {
                v: m,
                priority: Priority::Dimensioned,
            };
            scores = binary_op(cx, BinaryKind::Add, a, b, Some(dt))?;
        }
    }
    let mut probs = cx.emit(
        Softmax {
            axis: r - 1,
            log: false,
        },
        &[scores],
    )?;
    if dropout_p > 0.0 {
        probs = cx.emit_n(
            Dropout {
                ratio: dropout_p,
                training: true,
                seed: cx.index as u64,
            },
            &[probs],
        )?[0];
    }
    let out = cx.emit(
        Einsum::new(format!("{batch}ls,{batch}sv->{batch}lv")),
        &[probs, v],
    )?;
    Ok(vec![t(out)])
}

/// `x` with each index of `dim` repeated `g` times in place (`repeat_interleave`).
fn repeat_heads(cx: &mut Cx<'_>, x: ValueId, dim: usize, g: usize) -> LResult<ValueId> {
    let s = cx.shape(x);
    let mut u = s.clone();
    u.insert(dim + 1, 1);
    let y = cx.reshape(x, u.clone())?;
    u[dim + 1] = g;
    let y = cx.emit(Expand::new(u), &[y])?;
    let mut out = s;
    out[dim] *= g;
    cx.reshape(y, out)
}

/// `cross_entropy_loss(input, target, weight, reduction, ignore_index, label_smoothing)` with
/// class indices as targets (scores `[N, C, ...]`, as the IR op takes them).
pub fn cross_entropy(cx: &mut Cx<'_>) -> LResult<Vec<Val>> {
    let x = cx.tensor(0)?;
    let y = cx.tensor(1)?;
    if cx.opt_tensor(2)?.is_some() {
        bail!("class weights are not supported");
    }
    let reduction = match cx.opt_int(3)?.unwrap_or(1) {
        0 => LossReduction::None,
        1 => LossReduction::Mean,
        2 => LossReduction::Sum,
        r => bail!("unknown reduction {r}"),
    };
    let ignore = cx.opt_int(4)?.unwrap_or(-100);
    let smoothing = cx.opt_float(5)?.unwrap_or(0.0);
    if smoothing != 0.0 {
        bail!("label_smoothing {smoothing} is not supported");
    }
    if cx.dtype(y).is_float() {
        bail!("class probabilities as targets are not supported (targets must be class indices)");
    }
    let y = cx.cast(y, DType::I64)?;
    let outs = cx.emit_n(
        SoftmaxCrossEntropy {
            reduction,
            ignore_index: Some(ignore),
        },
        &[x, y],
    )?;
    Ok(vec![t(outs[0])])
}

/// A per-feature operand, or ones / zeros of `shape` when absent.
fn or_filled(
    cx: &mut Cx<'_>,
    v: Option<ValueId>,
    shape: &[usize],
    dtype: DType,
    value: f64,
) -> LResult<ValueId> {
    match v {
        Some(v) => Ok(v),
        None => filled(cx, shape.to_vec(), dtype, value),
    }
}

/// `layer_norm(x, normalized_shape, weight, bias, eps, cudnn_enable)`.
pub fn layer_norm(cx: &mut Cx<'_>) -> LResult<Vec<Val>> {
    let x = cx.tensor(0)?;
    let ns = to_dims(&cx.ints(1)?, "normalized_shape")?;
    let s = cx.shape(x);
    if ns.is_empty() || ns.len() > s.len() || s[s.len() - ns.len()..] != ns[..] {
        bail!("normalized_shape {ns:?} is not the trailing dims of {s:?}");
    }
    let axis = s.len() - ns.len();
    let dt = cx.dtype(x);
    let w = cx.opt_tensor(2)?;
    let w = or_filled(cx, w, &ns, dt, 1.0)?;
    let mut ins = vec![x, w];
    if let Some(b) = cx.opt_tensor(3)? {
        ins.push(b);
    }
    let epsilon = cx.opt_float(4)?.unwrap_or(1e-5);
    let y = cx.emit_n(LayerNorm { axis, epsilon }, &ins)?;
    Ok(vec![t(y[0])])
}

/// `rms_norm(x, normalized_shape, weight, eps)`.
pub fn rms_norm(cx: &mut Cx<'_>) -> LResult<Vec<Val>> {
    let x = cx.tensor(0)?;
    let ns = to_dims(&cx.ints(1)?, "normalized_shape")?;
    let s = cx.shape(x);
    if ns.is_empty() || ns.len() > s.len() || s[s.len() - ns.len()..] != ns[..] {
        bail!("normalized_shape {ns:?} is not the trailing dims of {s:?}");
    }
    let axis = s.len() - ns.len();
    let dt = cx.dtype(x);
    let w = cx.opt_tensor(2)?;
    let w = or_filled(cx, w, &ns, dt, 1.0)?;
    let epsilon = match cx.opt_float(3)? {
        Some(e) => e,
        None => match dt {
            DType::F64 => f64::EPSILON,
            DType::F16 => 0.000_976_562_5,
            DType::BF16 => 0.007_812_5,
            _ => f32::EPSILON as f64,
        },
    };
    let y = cx.emit_n(RmsNorm { axis, epsilon }, &[x, w])?;
    Ok(vec![t(y[0])])
}

/// `batch_norm(x, weight, bias, running_mean, running_var, training, momentum, eps, cudnn)`.
pub fn batch_norm(cx: &mut Cx<'_>) -> LResult<Vec<Val>> {
    let x = cx.tensor(0)?;
    let s = cx.shape(x);
    if s.len() < 2 {
        bail!("batch_norm needs [N, C, ...], got {s:?}");
    }
    let c = [s[1]];
    let dt = cx.dtype(x);
    let w = cx.opt_tensor(1)?;
    let w = or_filled(cx, w, &c, dt, 1.0)?;
    let b = cx.opt_tensor(2)?;
    let b = or_filled(cx, b, &c, dt, 0.0)?;
    let (Some(mean), Some(var)) = (cx.opt_tensor(3)?, cx.opt_tensor(4)?) else {
        bail!("batch_norm without running statistics is not supported");
    };
    let training = cx.bool(5)?;
    let momentum = cx.opt_float(6)?.unwrap_or(0.1);
    let epsilon = cx.opt_float(7)?.unwrap_or(1e-5);
    let outs = cx.emit_n(
        BatchNorm {
            epsilon,
            // ONNX convention: running = momentum * running + (1 - momentum) * batch
            momentum: 1.0 - momentum,
            training,
        },
        &[x, w, b, mean, var],
    )?;
    Ok(vec![t(outs[0])])
}

/// A per-spatial-dim int list: one value repeated, or exactly `sp` values.
fn spatial(cx: &Cx<'_>, i: usize, sp: usize, default: usize, what: &str) -> LResult<Vec<usize>> {
    let v = match cx.opt_arg(i) {
        None => return Ok(vec![default; sp]),
        Some(_) => cx.ints(i)?,
    };
    let v = to_dims(&v, what)?;
    match v.len() {
        0 => Ok(vec![default; sp]),
        1 => Ok(vec![v[0]; sp]),
        n if n == sp => Ok(v),
        n => bail!("{what} has {n} values for {sp} spatial dims"),
    }
}

/// `_convolution(x, w, b, stride, padding, dilation, transposed, output_padding, groups, ...)`
/// and `conv1d/2d/3d(x, w, b, stride, padding, dilation, groups)`.
pub fn conv(cx: &mut Cx<'_>) -> LResult<Vec<Val>> {
    let x = cx.tensor(0)?;
    let w = cx.tensor(1)?;
    let b = cx.opt_tensor(2)?;
    let (xs, ws) = (cx.shape(x), cx.shape(w));
    if xs.len() < 3 || ws.len() != xs.len() {
        bail!("convolution needs x [N, C, spatial...] and a weight of the same rank, got {xs:?} and {ws:?}");
    }
    let sp = xs.len() - 2;
    let generic = cx.node.kind == "aten::_convolution" || cx.node.kind == "aten::convolution";
    if generic && cx.bool(6)? {
        bail!("transposed convolution is not supported");
    }
    let groups_arg = if generic { 8 } else { 6 };
    let strides = spatial(cx, 3, sp, 1, "stride")?;
    let pad: Vec<usize> = match cx.opt_arg(4) {
        Some(Val::Str(s)) if s == "valid" => vec![0; sp],
        Some(Val::Str(s)) if s == "same" => {
            let dil = spatial(cx, 5, sp, 1, "dilation")?;
            let mut p = vec![];
            for i in 0..sp {
                let total = dil[i] * (ws[2 + i] - 1);
                if total % 2 != 0 {
                    bail!("padding='same' with an asymmetric total padding is not supported");
                }
                p.push(total / 2);
            }
            p
        }
        _ => spatial(cx, 4, sp, 0, "padding")?,
    };
    let dilations = spatial(cx, 5, sp, 1, "dilation")?;
    let groups = cx.opt_int(groups_arg)?.unwrap_or(1);
    let Ok(groups) = usize::try_from(groups) else {
        bail!("groups {groups} must be positive");
    };
    let mut ins = vec![x, w];
    if let Some(b) = b {
        ins.push(b);
    }
    let y = cx.emit(
        Conv {
            strides,
            pads: pad.iter().map(|&p| [p, p]).collect(),
            dilations,
            groups,
        },
        &ins,
    )?;
    Ok(vec![t(y)])
}

/// `max_pool{1,2,3}d(x, kernel, stride, padding, dilation, ceil_mode)`,
/// `avg_pool{1,2,3}d(x, kernel, stride, padding, ceil_mode, count_include_pad, divisor)`.
pub fn pool(cx: &mut Cx<'_>) -> LResult<Vec<Val>> {
    let x = cx.tensor(0)?;
    let xs = cx.shape(x);
    if xs.len() < 3 {
        bail!("pooling needs [N, C, spatial...], got {xs:?}");
    }
    let sp = xs.len() - 2;
    let kernel = spatial(cx, 1, sp, 1, "kernel_size")?;
    let strides = match cx.opt_arg(2) {
        Some(Val::List(l)) if l.is_empty() => kernel.clone(),
        None => kernel.clone(),
        Some(_) => spatial(cx, 2, sp, 1, "stride")?,
    };
    let pads = spatial(cx, 3, sp, 0, "padding")?;
    let max = cx.node.kind.contains("max_pool");
    let (dilations, ceil_mode, count_include_pad) = if max {
        (
            spatial(cx, 4, sp, 1, "dilation")?,
            cx.opt_bool(5)?.unwrap_or(false),
            false,
        )
    } else {
        if cx.opt_arg(6).is_some() {
            bail!("avg_pool divisor_override is not supported");
        }
        (
            vec![1; sp],
            cx.opt_bool(4)?.unwrap_or(false),
            cx.opt_bool(5)?.unwrap_or(true),
        )
    };
    let y = cx.emit(
        Pool {
            kind: if max { PoolKind::Max } else { PoolKind::Avg },
            kernel,
            strides,
            pads: pads.iter().map(|&p| [p, p]).collect(),
            dilations,
            count_include_pad,
            ceil_mode,
        },
        &[x],
    )?;
    Ok(vec![t(y)])
}

/// `adaptive_avg_pool{1,2,3}d(x, output_size)`: a mean over the spatial dims for output 1, an
/// average pool when each input size is a multiple of the output size.
pub fn adaptive_avg_pool(cx: &mut Cx<'_>) -> LResult<Vec<Val>> {
    let x = cx.tensor(0)?;
    let xs = cx.shape(x);
    if xs.len() < 2 {
        bail!("adaptive pooling needs [N, C, spatial...] or [C, spatial...], got {xs:?}");
    }
    let sp = match cx.node.kind.as_str() {
        "aten::adaptive_avg_pool1d" => 1,
        "aten::adaptive_avg_pool3d" => 3,
        _ => 2,
    };
    if xs.len() < sp + 1 {
        bail!("adaptive pooling of {xs:?} over {sp} spatial dims");
    }
    let out = spatial(cx, 1, sp, 1, "output_size")?;
    let first = xs.len() - sp;
    let ins = &xs[first..];
    if out.iter().all(|&o| o == 1) {
        let y = cx.emit(
            Reduce::new(
                ReduceKind::Mean,
                (first..xs.len()).collect::<Vec<_>>(),
                true,
            ),
            &[x],
        )?;
        return Ok(vec![t(y)]);
    }
    if ins.iter().zip(&out).any(|(&i, &o)| o == 0 || i % o != 0) {
        bail!("adaptive pooling of {ins:?} to {out:?} (sizes that do not divide) is not supported");
    }
    let kernel: Vec<usize> = ins.iter().zip(&out).map(|(&i, &o)| i / o).collect();
    if first != 2 {
        bail!("adaptive pooling of a tensor without a batch dim ({xs:?}) is not supported");
    }
    let y = cx.emit(
        Pool {
            kind: PoolKind::Avg,
            kernel: kernel.clone(),
            strides: kernel,
            pads: vec![[0, 0]; sp],
            dilations: vec![1; sp],
            count_include_pad: false,
            ceil_mode: false,
        },
        &[x],
    )?;
    Ok(vec![t(y)])
}

/// `mean` / `sum` / `amax` / `amin` over `dim` (all dims when absent), `keepdim`, `dtype`.
pub fn reduce(cx: &mut Cx<'_>) -> LResult<Vec<Val>> {
    let x = cx.tensor(0)?;
    let name = cx.node.kind.rsplit("::").next().unwrap_or("").to_string();
    let kind = match name.as_str() {
        "mean" => ReduceKind::Mean,
        "sum" => ReduceKind::Sum,
        "amax" => ReduceKind::Max,
        "amin" => ReduceKind::Min,
        other => bail!("reduction {other} is not supported"),
    };
    let r = cx.rank(x);
    // sum(x, dtype) / mean(x, dtype): every dim; otherwise (x, dim, keepdim, dtype)
    let whole = cx.node.overload().is_empty() && matches!(kind, ReduceKind::Sum | ReduceKind::Mean);
    let (dims, keepdim, dtype) = if whole {
        (None, false, cx.opt_dtype(1)?)
    } else {
        let dims = cx.opt_ints(1)?;
        let keep = cx.opt_bool(2)?.unwrap_or(false);
        let dtype = if matches!(kind, ReduceKind::Max | ReduceKind::Min) {
            None
        } else {
            cx.opt_dtype(3)?
        };
        (dims, keep, dtype)
    };
    let mut axes: Vec<usize> = match dims {
        None => (0..r).collect(),
        Some(d) if d.is_empty() => (0..r).collect(),
        Some(d) => d.iter().map(|&a| cx.dim(a, r)).collect::<LResult<_>>()?,
    };
    axes.sort_unstable();
    axes.dedup();
    let mut x = x;
    if let Some(d) = dtype {
        x = cx.cast(x, d)?;
    } else if matches!(kind, ReduceKind::Sum) && !cx.dtype(x).is_float() {
        x = cx.cast(x, DType::I64)?;
    } else if matches!(kind, ReduceKind::Mean) && !cx.dtype(x).is_float() {
        bail!(
            "mean of a {} tensor (PyTorch requires a float dtype)",
            cx.dtype(x)
        );
    }
    if axes.is_empty() {
        return Ok(vec![t(x)]);
    }
    Ok(vec![t(cx.emit(Reduce::new(kind, axes, keepdim), &[x])?)])
}

/// `topk(x, k, dim, largest, sorted)`: values and int64 indices.
pub fn topk(cx: &mut Cx<'_>) -> LResult<Vec<Val>> {
    let x = cx.tensor(0)?;
    let k = cx.int(1)?;
    let Ok(k) = usize::try_from(k) else {
        bail!("k = {k} is negative");
    };
    let axis = cx.dim(cx.opt_int(2)?.unwrap_or(-1), cx.rank(x))?;
    let largest = cx.opt_bool(3)?.unwrap_or(true);
    let sorted = cx.opt_bool(4)?.unwrap_or(true);
    let outs = cx.emit_n(
        TopK {
            axis,
            k,
            largest,
            sorted,
        },
        &[x],
    )?;
    Ok(outs.into_iter().map(Val::Tensor).collect())
}
