//! `attention`: fused scaled dot-product attention, `softmax(q k^T * scale + causal) v`, with
//! the row-wise log-sum-exp of the scaled scores as a second output (as the flash / memory-
//! efficient kernels return it for their backward).
//!
//! Why one op: composed, attention is two einsums around a scale, a mask add and a softmax,
//! and the `[.., Lq, Lk]` probabilities are saved for the backward in every layer. Fused, the
//! runtime calls libtorch's flash (CPU) or memory-efficient (CUDA) kernel, nothing of size
//! `Lq x Lk` is ever stored, and the backward ([`AttentionGrad`])
//! recomputes the probabilities block by block from q, k and the saved log-sum-exp. The
//! [`fuse`](crate::fuse) pass rewrites the composed pattern of every model source into it.
//!
//! Layout: q, k, v and the output share one layout, given by two axis positions: `seq_axis`
//! (the sequence) and `dim_axis` (the per-head feature dim); every other axis is a batch-like
//! axis (batch, heads) of the same size in all three. The built-in models use `[B, S, H, D]`
//! (`seq_axis` 1, `dim_axis` 3), TorchScript's `scaled_dot_product_attention` `[B, H, S, D]`
//! (2, 3); neither needs a transpose. k and v have as many heads as q (grouped-query attention
//! repeats its kv heads before the op). The output has v's head dim; the log-sum-exp has q's
//! shape without `dim_axis`, in f32 (f64 for f64 inputs).
//!
//! Causal masking is aligned to the bottom-right, as [`CausalMask`]: query
//! row `i` sees keys `j <= i + (Lk - Lq)`, which needs `Lq <= Lk` (every row sees a key).
//!
//! Dim map: batch axes and the query sequence are `Parallel` (a query block needs every key,
//! but no other query; the runtime offsets the causal diagonal by the block's global start),
//! the key sequence and both head dims are `Whole`.
//!
//! Cost: the FLOPs of the composed ops it replaces (two matmuls, the scale, the mask add, the
//! softmax), but bytes only for q, k, v, the output and the log-sum-exp.

use super::*;
use crate::dtype::TensorType;
use crate::error::{AnalyzerError, OpError};
use crate::graph::ValueId;
use crate::op_err;
use crate::ops::layer_norm::stats_dtype;
use crate::tensor::Tensor;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
/// Fused attention over `q, k, v` (see the module doc); outputs `out, lse`.
pub struct Attention {
    /// Position of the sequence axis in q, k, v and the output.
    pub seq_axis: usize,
    /// Position of the per-head feature axis in q, k, v and the output.
    pub dim_axis: usize,
    /// Bottom-right aligned causal masking.
    pub causal: bool,
    /// Factor applied to `q k^T` before the softmax (usually `1 / sqrt(D)`).
    pub scale: f64,
}

/// Vector flops per score element of the forward: the scale (1) and the softmax (8, as
/// [`Softmax`](super::Softmax) counts it); causal masking adds 1.
const FWD_FLOPS_PER_SCORE: f64 = 9.0;

/// The sizes of one attention problem: `n` (product of the batch-like axes), the query and key
/// lengths, q/k's head dim and v's head dim.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct AttentionSizes {
    pub n: usize,
    pub lq: usize,
    pub lk: usize,
    pub d: usize,
    pub e: usize,
}

impl AttentionSizes {
    /// Score elements: `n * lq * lk`.
    pub fn scores(&self) -> f64 {
        self.n as f64 * self.lq as f64 * self.lk as f64
    }
}

impl Attention {
    /// Checks q, k, v against the layout; returns the problem sizes.
    pub fn check(
        &self,
        q: &TensorType,
        k: &TensorType,
        v: &TensorType,
    ) -> Result<AttentionSizes, OpError> {
        let r = q.rank();
        if r < 2 {
            return Err(op_err!("q must have rank >= 2, got {q}"));
        }
        if self.seq_axis >= r || self.dim_axis >= r || self.seq_axis == self.dim_axis {
            return Err(op_err!(
                "seq_axis {} and dim_axis {} must be distinct axes of rank {r}",
                self.seq_axis,
                self.dim_axis
            ));
        }
        for (name, t) in [("k", k), ("v", v)] {
            if t.rank() != r {
                return Err(op_err!("{name} is {t} but q is {q}: ranks differ"));
            }
            if t.dtype != q.dtype {
                return Err(op_err!("{name} is {t} but q is {q}: dtypes differ"));
            }
        }
        if !q.dtype.is_float() {
            return Err(op_err!("takes float tensors, got {}", q.dtype));
        }
        if !self.scale.is_finite() {
            return Err(op_err!("scale {} is not finite", self.scale));
        }
        for d in (0..r).filter(|&d| d != self.seq_axis && d != self.dim_axis) {
            if k.shape[d] != q.shape[d] || v.shape[d] != q.shape[d] {
                return Err(op_err!(
                    "axis {d} (batch or heads) differs: q {q}, k {k}, v {v}"
                ));
            }
        }
        let (s, h) = (self.seq_axis, self.dim_axis);
        if k.shape[h] != q.shape[h] {
            return Err(op_err!("k {k} and q {q} have different head dims"));
        }
        if v.shape[s] != k.shape[s] {
            return Err(op_err!("k {k} and v {v} have different key lengths"));
        }
        let sizes = AttentionSizes {
            n: (0..r)
                .filter(|&d| d != s && d != h)
                .map(|d| q.shape[d])
                .product(),
            lq: q.shape[s],
            lk: k.shape[s],
            d: q.shape[h],
            e: v.shape[h],
        };
        if self.causal && sizes.lq > sizes.lk {
            return Err(op_err!(
                "causal attention of {} queries over {} keys: some rows would see no key",
                sizes.lq,
                sizes.lk
            ));
        }
        Ok(sizes)
    }

    /// The output type (q's layout with v's head dim) and the log-sum-exp type.
    pub fn output_types(&self, q: &TensorType, v: &TensorType) -> (TensorType, TensorType) {
        let mut out = q.clone();
        out.shape[self.dim_axis] = v.shape[self.dim_axis];
        let lse_shape: Vec<usize> = q
            .shape
            .iter()
            .enumerate()
            .filter(|&(d, _)| d != self.dim_axis)
            .map(|(_, &n)| n)
            .collect();
        (out, TensorType::new(stats_dtype(q.dtype), lse_shape))
    }

    /// The permutation taking this layout to `[batch.., seq, dim]`.
    pub fn to_rows_perm(&self, rank: usize) -> Vec<usize> {
        let mut p: Vec<usize> = (0..rank)
            .filter(|&d| d != self.seq_axis && d != self.dim_axis)
            .collect();
        p.push(self.seq_axis);
        p.push(self.dim_axis);
        p
    }

    /// The permutation taking the log-sum-exp's layout to `[batch.., seq]`.
    pub fn lse_to_rows_perm(&self, rank: usize) -> Vec<usize> {
        // the log-sum-exp drops `dim_axis`: positions after it shift down by one
        let seq = self.seq_axis - usize::from(self.dim_axis < self.seq_axis);
        let mut p: Vec<usize> = (0..rank - 1).filter(|&d| d != seq).collect();
        p.push(seq);
        p
    }

    /// Whether query row `i` may see key `j` (bottom-right aligned, as `CausalMask`).
    pub fn visible(&self, i: usize, j: usize, lq: usize, lk: usize) -> bool {
        !self.causal || j + lq <= i + lk
    }
}

/// The tensors of an attention operand role, for [`attention_dims`].
#[derive(Copy, Clone, Debug)]
pub(crate) enum Role {
    /// batch, query sequence, q/k head dim
    Q,
    /// batch, key sequence, q/k head dim
    K,
    /// batch, key sequence, v head dim
    V,
    /// batch, query sequence, v head dim (the output and its gradient)
    O,
    /// batch, query sequence (the log-sum-exp and its gradient)
    Lse,
}

/// Dim map of the attention ops: one axis per batch-like dim, then the query sequence (of
/// `lq_kind`), the key sequence, q/k's head dim and v's head dim (all `Whole`).
pub(crate) fn attention_dims(
    op: &Attention,
    q: &TensorType,
    sizes: &AttentionSizes,
    lq_kind: AxisKind,
    inputs: &[Role],
    outputs: &[Role],
) -> DimMap {
    let r = q.rank();
    let batch: Vec<usize> = (0..r)
        .filter(|&d| d != op.seq_axis && d != op.dim_axis)
        .collect();
    let nb = batch.len();
    let mut axes: Vec<Axis> = batch
        .iter()
        .map(|&d| Axis {
            size: q.shape[d],
            kind: AxisKind::Parallel,
        })
        .collect();
    for (size, kind) in [
        (sizes.lq, lq_kind),
        (sizes.lk, AxisKind::Whole),
        (sizes.d, AxisKind::Whole),
        (sizes.e, AxisKind::Whole),
    ] {
        axes.push(Axis { size, kind });
    }
    let (lq, lk, d, e) = (nb, nb + 1, nb + 2, nb + 3);
    let map = |role: &Role| -> Vec<Option<AxisId>> {
        let (seq, dim) = match role {
            Role::Q => (lq, Some(d)),
            Role::K => (lk, Some(d)),
            Role::V => (lk, Some(e)),
            Role::O => (lq, Some(e)),
            Role::Lse => (lq, None),
        };
        (0..r)
            .filter_map(|p| {
                if p == op.seq_axis {
                    Some(Some(seq))
                } else if p == op.dim_axis {
                    dim.map(Some)
                } else {
                    Some(batch.iter().position(|&b| b == p))
                }
            })
            .collect()
    };
    DimMap {
        axes,
        inputs: inputs.iter().map(map).collect(),
        outputs: outputs.iter().map(map).collect(),
    }
}

fn transposed(t: &Tensor, perm: Vec<usize>) -> Result<Tensor, OpError> {
    Transpose::new(perm)
        .eval(&[t])?
        .into_iter()
        .next()
        .ok_or_else(|| op_err!("transpose gave no output"))
}

/// `t` permuted by `perm` (its data in the permuted row-major order).
pub(crate) fn permuted(t: &Tensor, perm: &[usize]) -> Result<Vec<f64>, OpError> {
    Ok(transposed(t, perm.to_vec())?.data)
}

/// Data laid out in `perm`'s order put back into the original layout of `shape`.
pub(crate) fn unpermuted(
    dtype: crate::dtype::DType,
    data: Vec<f64>,
    shape: &[usize],
    perm: &[usize],
) -> Result<Tensor, OpError> {
    let pshape: Vec<usize> = perm.iter().map(|&p| shape[p]).collect();
    let mut inverse = vec![0; perm.len()];
    for (i, &p) in perm.iter().enumerate() {
        inverse[p] = i;
    }
    let t = Tensor::new(crate::dtype::DType::F64, pshape, data);
    let back = transposed(&t, inverse)?;
    Ok(Tensor::new(dtype, shape.to_vec(), back.data))
}

/// The scaled, masked scores of query row `i` of problem `b` (`-inf` where masked), from q
/// and k in rows layout (`[n][l][d]`).
pub(crate) fn score_row(
    op: &Attention,
    sz: &AttentionSizes,
    q: &[f64],
    k: &[f64],
    b: usize,
    i: usize,
) -> Vec<f64> {
    let qi = &q[(b * sz.lq + i) * sz.d..][..sz.d];
    (0..sz.lk)
        .map(|j| {
            if op.visible(i, j, sz.lq, sz.lk) {
                let kj = &k[(b * sz.lk + j) * sz.d..][..sz.d];
                op.scale * qi.iter().zip(kj).map(|(a, c)| a * c).sum::<f64>()
            } else {
                f64::NEG_INFINITY
            }
        })
        .collect()
}

impl OpSpec for Attention {
    fn infer(&self, inputs: &[&TensorType]) -> Result<Vec<TensorType>, OpError> {
        let [q, k, v] = inputs else {
            return Err(op_err!("takes 3 inputs (q, k, v), got {}", inputs.len()));
        };
        self.check(q, k, v)?;
        let (out, lse) = self.output_types(q, v);
        Ok(vec![out, lse])
    }

    fn dims(&self, inputs: &[&TensorType], outputs: &[&TensorType]) -> DimMap {
        let [q, k, v] = inputs else {
            return DimMap::opaque(inputs, outputs);
        };
        match self.check(q, k, v) {
            Ok(sz) => attention_dims(
                self,
                q,
                &sz,
                AxisKind::Parallel,
                &[Role::Q, Role::K, Role::V],
                &[Role::O, Role::Lse],
            ),
            Err(_) => DimMap::opaque(inputs, outputs),
        }
    }

    fn cost(&self, inputs: &[&TensorType], outputs: &[&TensorType]) -> Cost {
        let mut c = Cost::memory_bound(inputs, outputs, 0.0);
        if let [q, k, v] = inputs {
            if let Ok(sz) = self.check(q, k, v) {
                let s = sz.scores();
                c.matmul_flops = 2.0 * s * (sz.d + sz.e) as f64;
                let per = FWD_FLOPS_PER_SCORE + if self.causal { 1.0 } else { 0.0 };
                c.flops = c.matmul_flops + per * s;
            }
        }
        c
    }

    fn vjp(&self, cx: &mut VjpCtx<'_>) -> Result<Vec<Option<ValueId>>, OpError> {
        if cx.grads.iter().all(|g| g.is_none()) || !cx.needs.iter().any(|&n| n) {
            return Ok(vec![None; 3]);
        }
        let dout = cx.grad_or_zeros(0)?;
        let mut ins = cx.inputs.to_vec();
        ins.extend([cx.outputs[0], cx.outputs[1], dout]);
        // a gradient into the log-sum-exp (nothing reads it in a training graph, but the op is
        // honest about it) rides along as a seventh input
        if let Some(dlse) = cx.grads.get(1).copied().flatten() {
            ins.push(dlse);
        }
        let grad = AttentionGrad {
            seq_axis: self.seq_axis,
            dim_axis: self.dim_axis,
            causal: self.causal,
            scale: self.scale,
        };
        let g = cx.b.emit_n(grad, &ins)?;
        Ok((0..3)
            .map(|i| (cx.needs[i]).then(|| g.get(i).copied()).flatten())
            .collect())
    }

    fn eval(&self, inputs: &[&Tensor]) -> Result<Vec<Tensor>, OpError> {
        let tys: Vec<TensorType> = inputs.iter().map(|t| t.ty()).collect();
        let outs = self.infer(&tys.iter().collect::<Vec<_>>())?;
        let [q, k, v] = inputs else {
            return Err(op_err!("takes 3 inputs"));
        };
        let sz = self.check(&tys[0], &tys[1], &tys[2])?;
        let perm = self.to_rows_perm(q.rank());
        let (qr, kr, vr) = (
            permuted(q, &perm)?,
            permuted(k, &perm)?,
            permuted(v, &perm)?,
        );
        let mut out = vec![0.0; sz.n * sz.lq * sz.e];
        let mut lse = vec![0.0; sz.n * sz.lq];
        for b in 0..sz.n {
            for i in 0..sz.lq {
                let s = score_row(self, &sz, &qr, &kr, b, i);
                let m = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let l = m + s.iter().map(|x| (x - m).exp()).sum::<f64>().ln();
                lse[b * sz.lq + i] = l;
                let o = &mut out[(b * sz.lq + i) * sz.e..][..sz.e];
                for (j, x) in s.iter().enumerate() {
                    let p = (x - l).exp();
                    if p != 0.0 {
                        let vj = &vr[(b * sz.lk + j) * sz.e..][..sz.e];
                        o.iter_mut().zip(vj).for_each(|(o, v)| *o += p * v);
                    }
                }
            }
        }
        let out = unpermuted(outs[0].dtype, out, &outs[0].shape, &perm)?;
        let lse_perm = self.lse_to_rows_perm(q.rank());
        let lse = unpermuted(outs[1].dtype, lse, &outs[1].shape, &lse_perm)?;
        Ok(vec![out, lse])
    }
}

impl crate::builder::GraphBuilder {
    /// Fused attention of `q, k, v` laid out with the sequence at `seq_axis` and the head dim
    /// at `dim_axis`; returns the output (the log-sum-exp is output 1 of the node).
    pub fn attention(
        &mut self,
        q: ValueId,
        k: ValueId,
        v: ValueId,
        op: Attention,
    ) -> Result<ValueId, AnalyzerError> {
        self.node1(op, &[q, k, v])
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::dtype::DType;
    use crate::ops::gradcheck::{check, rand_tensor};

    fn tt(shape: &[usize]) -> TensorType {
        TensorType::new(DType::F32, shape.to_vec())
    }

    fn bshd(causal: bool) -> Attention {
        Attention {
            seq_axis: 1,
            dim_axis: 3,
            causal,
            scale: 0.5,
        }
    }

    #[test]
    fn infers_and_rejects() {
        let q = tt(&[2, 5, 3, 4]);
        let k = tt(&[2, 7, 3, 4]);
        let v = tt(&[2, 7, 3, 6]);
        let out = bshd(true).infer(&[&q, &k, &v]).unwrap();
        assert_eq!(out, vec![tt(&[2, 5, 3, 6]), tt(&[2, 5, 3])]);
        let bf = |t: &TensorType| t.with_dtype(DType::BF16);
        let out = bshd(false).infer(&[&bf(&q), &bf(&k), &bf(&v)]).unwrap();
        assert_eq!(out[1].dtype, DType::F32);
        // more queries than keys under a causal mask: some rows see nothing
        let e = bshd(true).infer(&[&k, &q, &tt(&[2, 5, 3, 6])]).unwrap_err();
        assert!(e.0.contains("some rows would see no key"), "{e}");
        assert!(bshd(false).infer(&[&k, &q, &tt(&[2, 5, 3, 6])]).is_ok());
        let e = bshd(false)
            .infer(&[&q, &tt(&[2, 7, 3, 5]), &v])
            .unwrap_err();
        assert!(e.0.contains("different head dims"), "{e}");
        let e = bshd(false)
            .infer(&[&q, &tt(&[2, 7, 2, 4]), &v])
            .unwrap_err();
        assert!(e.0.contains("axis 2 (batch or heads) differs"), "{e}");
        let e = bshd(false)
            .infer(&[&q, &k, &tt(&[2, 6, 3, 6])])
            .unwrap_err();
        assert!(e.0.contains("different key lengths"), "{e}");
        let same = Attention {
            dim_axis: 1,
            ..bshd(false)
        };
        assert!(same.infer(&[&q, &k, &v]).is_err());
        assert!(bshd(false).infer(&[&q, &k]).is_err());
        let i = q.with_dtype(DType::I64);
        assert!(bshd(false).infer(&[&i, &i, &i]).is_err());
    }

    #[test]
    fn dims_and_cost() {
        let q = tt(&[2, 5, 3, 4]);
        let k = tt(&[2, 7, 3, 4]);
        let v = tt(&[2, 7, 3, 6]);
        let op = bshd(true);
        let outs = op.infer(&[&q, &k, &v]).unwrap();
        let d = op.dims(&[&q, &k, &v], &[&outs[0], &outs[1]]);
        // batch a, heads b, query seq c (parallel), key seq D, head dims E, F
        assert_eq!(d.to_einsum(), "acbE,aDbE,aDbF->acbF,acb");
        let c = op.cost(&[&q, &k, &v], &[&outs[0], &outs[1]]);
        let scores = 2.0 * 3.0 * 5.0 * 7.0;
        assert_eq!(c.matmul_flops, 2.0 * scores * (4.0 + 6.0));
        assert_eq!(c.flops, c.matmul_flops + 10.0 * scores);
        let bytes = |s: &[usize]| 4.0 * s.iter().product::<usize>() as f64;
        assert_eq!(
            c.bytes_read,
            bytes(&[2, 5, 3, 4]) + bytes(&[2, 7, 3, 4]) + bytes(&[2, 7, 3, 6])
        );
        assert_eq!(c.bytes_written, bytes(&[2, 5, 3, 6]) + bytes(&[2, 5, 3]));
        // TorchScript's [B, H, S, D]
        let ts = Attention {
            seq_axis: 2,
            dim_axis: 3,
            causal: false,
            scale: 1.0,
        };
        let q = tt(&[2, 3, 5, 4]);
        let outs = ts.infer(&[&q, &q, &q]).unwrap();
        let d = ts.dims(&[&q, &q, &q], &[&outs[0], &outs[1]]);
        assert_eq!(d.to_einsum(), "abcE,abDE,abDF->abcF,abc");
    }

    /// The composed reference: softmax(q k^T * scale + mask) v, by hand on `[l][d]` rows.
    #[test]
    fn evaluates_like_the_composed_ops() {
        // one head, q rows [1, 0], [0, 1]; keys [1, 0], [0, 2]; values 1, 10
        let q = Tensor::new(DType::F64, vec![1, 2, 1, 2], vec![1.0, 0.0, 0.0, 1.0]);
        let k = Tensor::new(DType::F64, vec![1, 2, 1, 2], vec![1.0, 0.0, 0.0, 2.0]);
        let v = Tensor::new(DType::F64, vec![1, 2, 1, 1], vec![1.0, 10.0]);
        let op = Attention {
            scale: 1.0,
            ..bshd(false)
        };
        let y = op.eval(&[&q, &k, &v]).unwrap();
        // row 0: scores [1, 0]; row 1: scores [0, 2]
        let soft = |a: f64, b: f64| (a.exp() + 10.0 * b.exp()) / (a.exp() + b.exp());
        assert!((y[0].data[0] - soft(1.0, 0.0)).abs() < 1e-12);
        assert!((y[0].data[1] - soft(0.0, 2.0)).abs() < 1e-12);
        assert!((y[1].data[1] - (1.0 + 2f64.exp()).ln()).abs() < 1e-12);
        let causal = Attention { causal: true, ..op };
        let y = causal.eval(&[&q, &k, &v]).unwrap();
        assert_eq!(y[0].data[0], 1.0);
        assert!((y[0].data[1] - soft(0.0, 2.0)).abs() < 1e-12);
        assert_eq!(y[1].data[0], 1.0);
    }

    #[test]
    fn gradients_match_finite_differences() {
        let r = rand_tensor;
        for causal in [false, true] {
            // [B, S, H, D] with fewer queries than keys and a wider v
            check(
                bshd(causal),
                &[
                    r(&[2, 2, 2, 3], 1),
                    r(&[2, 3, 2, 3], 2),
                    r(&[2, 3, 2, 2], 3),
                ],
                1e-6,
            );
            // [B, H, S, D]
            check(
                Attention {
                    seq_axis: 2,
                    dim_axis: 3,
                    causal,
                    scale: 0.7,
                },
                &[
                    r(&[1, 2, 3, 2], 4),
                    r(&[1, 2, 3, 2], 5),
                    r(&[1, 2, 3, 2], 6),
                ],
                1e-6,
            );
        }
        // head dim before the sequence, rank 2
        check(
            Attention {
                seq_axis: 1,
                dim_axis: 0,
                causal: true,
                scale: 1.3,
            },
            &[r(&[2, 3], 7), r(&[2, 3], 8), r(&[4, 3], 9)],
            1e-6,
        );
    }
}
