//! `attention_grad`: the fused backward of [`Attention`], as the flash /
//! memory-efficient kernels compute it: from q, k, v, the forward's output and log-sum-exp and
//! the output gradient, without any saved `Lq x Lk` tensor.
//!
//! Per problem, with `P = exp(q k^T * scale - lse)` (0 where masked) recomputed block by block:
//! `dv = P^T dout`, `dP = dout v^T`, `delta = rowsum(dout * out) - dlse`,
//! `dS = P * (dP - delta)`, `dq = dS k * scale`, `dk = dS^T q * scale`. The optional seventh
//! input `dlse` is the gradient arriving at the log-sum-exp output (nothing in a training graph
//! reads it; the runtime then takes a slower composed path).
//!
//! Cost: the recompute of the scores and probabilities is included, so the backward costs
//! five `Lq x Lk` matmuls (`q k^T`, `P^T dout`, `dout v^T`, `dS k`, `dS^T q`) against the
//! forward's two. Dim map: batch axes `Parallel`; the query sequence `Contracted` (split, `dq`
//! splits with it and `dk`, `dv` are partial sums over the query blocks); the key sequence and
//! the head dims `Whole`.

use super::attention::{attention_dims, permuted, score_row, unpermuted, AttentionSizes, Role};
use super::*;
use crate::dtype::TensorType;
use crate::error::OpError;
use crate::graph::ValueId;
use crate::op_err;
use crate::tensor::Tensor;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
/// Backward of [`Attention`] (same attributes). Inputs
/// `q, k, v, out, lse, dout[, dlse]`; outputs `dq, dk, dv`.
pub struct AttentionGrad {
    pub seq_axis: usize,
    pub dim_axis: usize,
    pub causal: bool,
    pub scale: f64,
}

/// Vector flops per score element of the backward: the recompute of the probabilities (scale
/// 1, subtract the log-sum-exp 1, exp 4), `dS = P * (dP - delta)` (2) and its scale (1);
/// causal masking adds 1.
const BWD_FLOPS_PER_SCORE: f64 = 9.0;

impl AttentionGrad {
    fn forward(&self) -> Attention {
        Attention {
            seq_axis: self.seq_axis,
            dim_axis: self.dim_axis,
            causal: self.causal,
            scale: self.scale,
        }
    }

    fn check(&self, inputs: &[&TensorType]) -> Result<AttentionSizes, OpError> {
        let (q, k, v, out, lse, dout, dlse) = match inputs {
            [q, k, v, o, l, d] => (q, k, v, o, l, d, None),
            [q, k, v, o, l, d, dl] => (q, k, v, o, l, d, Some(dl)),
            _ => {
                return Err(op_err!(
                    "takes 6 or 7 inputs (q, k, v, out, lse, dout[, dlse]), got {}",
                    inputs.len()
                ))
            }
        };
        let fwd = self.forward();
        let sz = fwd.check(q, k, v)?;
        let (o_ty, lse_ty) = fwd.output_types(q, v);
        for (name, t, want) in [
            ("out", out, &o_ty),
            ("lse", lse, &lse_ty),
            ("dout", dout, &o_ty),
        ] {
            if *t != want {
                return Err(op_err!("{name} is {t}, expected {want}"));
            }
        }
        if let Some(dl) = dlse {
            if **dl != lse_ty {
                return Err(op_err!("dlse is {dl}, expected {lse_ty}"));
            }
        }
        Ok(sz)
    }
}

impl OpSpec for AttentionGrad {
    fn infer(&self, inputs: &[&TensorType]) -> Result<Vec<TensorType>, OpError> {
        self.check(inputs)?;
        Ok(inputs[..3].iter().map(|t| (*t).clone()).collect())
    }

    fn dims(&self, inputs: &[&TensorType], outputs: &[&TensorType]) -> DimMap {
        match self.check(inputs) {
            Ok(sz) => {
                use Role::*;
                let ins = [Q, K, V, O, Lse, O, Lse];
                attention_dims(
                    &self.forward(),
                    inputs[0],
                    &sz,
                    AxisKind::Contracted,
                    &ins[..inputs.len()],
                    &[Q, K, V],
                )
            }
            Err(_) => DimMap::opaque(inputs, outputs),
        }
    }

    fn cost(&self, inputs: &[&TensorType], outputs: &[&TensorType]) -> Cost {
        let mut c = Cost::memory_bound(inputs, outputs, 0.0);
        if let Ok(sz) = self.check(inputs) {
            let s = sz.scores();
            c.matmul_flops = 2.0 * s * (3 * sz.d + 2 * sz.e) as f64;
            let per = BWD_FLOPS_PER_SCORE + if self.causal { 1.0 } else { 0.0 };
            // delta = rowsum(dout * out): 2 per output element
            let delta = 2.0 * (sz.n * sz.lq * sz.e) as f64;
            c.flops = c.matmul_flops + per * s + delta;
        }
        c
    }

    fn vjp(&self, _cx: &mut VjpCtx<'_>) -> Result<Vec<Option<ValueId>>, OpError> {
        Err(op_err!(
            "attention_grad has no gradient: second-order gradients are unsupported"
        ))
    }

    fn eval(&self, inputs: &[&Tensor]) -> Result<Vec<Tensor>, OpError> {
        let tys: Vec<TensorType> = inputs.iter().map(|t| t.ty()).collect();
        let outs = self.infer(&tys.iter().collect::<Vec<_>>())?;
        let sz = self.check(&tys.iter().collect::<Vec<_>>())?;
        let fwd = self.forward();
        let r = inputs[0].rank();
        let perm = fwd.to_rows_perm(r);
        let lse_perm = fwd.lse_to_rows_perm(r);
        let rows = |i: usize| permuted(inputs[i], &perm);
        let (q, k, v, out, dout) = (rows(0)?, rows(1)?, rows(2)?, rows(3)?, rows(5)?);
        let lse = permuted(inputs[4], &lse_perm)?;
        let dlse = match inputs.get(6) {
            Some(t) => permuted(t, &lse_perm)?,
            None => vec![0.0; lse.len()],
        };
        let (lq, lk, d, e) = (sz.lq, sz.lk, sz.d, sz.e);
        let mut dq = vec![0.0; q.len()];
        let mut dk = vec![0.0; k.len()];
        let mut dv = vec![0.0; v.len()];
        for b in 0..sz.n {
            for i in 0..lq {
                let row = b * lq + i;
                let s = score_row(&fwd, &sz, &q, &k, b, i);
                let go = &dout[row * e..][..e];
                let delta = go
                    .iter()
                    .zip(&out[row * e..][..e])
                    .map(|(a, c)| a * c)
                    .sum::<f64>()
                    - dlse[row];
                for (j, x) in s.iter().enumerate() {
                    let p = (x - lse[row]).exp();
                    if p == 0.0 {
                        continue;
                    }
                    let vj = &v[(b * lk + j) * e..][..e];
                    let dp: f64 = go.iter().zip(vj).map(|(a, c)| a * c).sum();
                    dv[(b * lk + j) * e..][..e]
                        .iter_mut()
                        .zip(go)
                        .for_each(|(g, a)| *g += p * a);
                    let ds = p * (dp - delta) * self.scale;
                    for t in 0..d {
                        dq[row * d + t] += ds * k[(b * lk + j) * d + t];
                        dk[(b * lk + j) * d + t] += ds * q[row * d + t];
                    }
                }
            }
        }
        Ok(vec![
            unpermuted(outs[0].dtype, dq, &outs[0].shape, &perm)?,
            unpermuted(outs[1].dtype, dk, &outs[1].shape, &perm)?,
            unpermuted(outs[2].dtype, dv, &outs[2].shape, &perm)?,
        ])
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::dtype::DType;
    use crate::ops::gradcheck::rand_tensor;

    fn tt(dtype: DType, shape: &[usize]) -> TensorType {
        TensorType::new(dtype, shape.to_vec())
    }

    fn op(causal: bool) -> AttentionGrad {
        AttentionGrad {
            seq_axis: 1,
            dim_axis: 3,
            causal,
            scale: 0.5,
        }
    }

    #[test]
    fn infers_and_rejects() {
        let q = tt(DType::BF16, &[2, 5, 3, 4]);
        let k = tt(DType::BF16, &[2, 7, 3, 4]);
        let v = tt(DType::BF16, &[2, 7, 3, 6]);
        let o = tt(DType::BF16, &[2, 5, 3, 6]);
        let lse = tt(DType::F32, &[2, 5, 3]);
        let out = op(true).infer(&[&q, &k, &v, &o, &lse, &o]).unwrap();
        assert_eq!(out, vec![q.clone(), k.clone(), v.clone()]);
        assert!(op(true).infer(&[&q, &k, &v, &o, &lse, &o, &lse]).is_ok());
        let bad = tt(DType::BF16, &[2, 5, 3]);
        let e = op(true).infer(&[&q, &k, &v, &o, &bad, &o]).unwrap_err();
        assert!(
            e.0.contains("lse is bf16[2,5,3], expected f32[2,5,3]"),
            "{e}"
        );
        let e = op(true).infer(&[&q, &k, &v, &o, &lse, &q]).unwrap_err();
        assert!(e.0.contains("dout is bf16[2,5,3,4]"), "{e}");
        assert!(op(true).infer(&[&q, &k, &v, &o, &lse]).is_err());
    }

    #[test]
    fn dims_make_the_query_sequence_contracted() {
        let q = tt(DType::F32, &[2, 5, 3, 4]);
        let k = tt(DType::F32, &[2, 7, 3, 4]);
        let v = tt(DType::F32, &[2, 7, 3, 6]);
        let o = tt(DType::F32, &[2, 5, 3, 6]);
        let lse = tt(DType::F32, &[2, 5, 3]);
        let d = op(false).dims(&[&q, &k, &v, &o, &lse, &o], &[&q, &k, &v]);
        assert_eq!(
            d.to_einsum(),
            "acbE,aDbE,aDbF,acbF,acb,acbF->acbE,aDbE,aDbF"
        );
        assert_eq!(d.axes[2].kind, AxisKind::Contracted);
        let c = op(false).cost(&[&q, &k, &v, &o, &lse, &o], &[&q, &k, &v]);
        let scores = 2.0 * 3.0 * 5.0 * 7.0;
        assert_eq!(c.matmul_flops, 2.0 * scores * (3.0 * 4.0 + 2.0 * 6.0));
        assert_eq!(
            c.flops,
            c.matmul_flops + 9.0 * scores + 2.0 * (2.0 * 5.0 * 3.0 * 6.0)
        );
    }

    #[test]
    fn matches_the_forward_gradients() {
        // the vjp of Attention is checked against finite differences in attention.rs; here the
        // dlse input: its effect equals differentiating lse, i.e. dS += dlse * P
        let r = rand_tensor;
        let (q, k, v) = (
            r(&[1, 3, 1, 2], 1),
            r(&[1, 3, 1, 2], 2),
            r(&[1, 3, 1, 2], 3),
        );
        let fwd = Attention {
            seq_axis: 1,
            dim_axis: 3,
            causal: true,
            scale: 0.5,
        };
        let y = fwd.eval(&[&q, &k, &v]).unwrap();
        let zero_dout = Tensor::zeros(&y[0].ty());
        let dlse = r(&[1, 3, 1], 4);
        let g = op(true)
            .eval(&[&q, &k, &v, &y[0], &y[1], &zero_dout, &dlse])
            .unwrap();
        // finite differences of sum(lse * dlse) w.r.t. q
        let h = 1e-6;
        for t in 0..q.numel() {
            let f = |delta: f64| {
                let mut qq = q.clone();
                qq.data[t] += delta;
                let l = fwd.eval(&[&qq, &k, &v]).unwrap().remove(1);
                l.data
                    .iter()
                    .zip(&dlse.data)
                    .map(|(a, b)| a * b)
                    .sum::<f64>()
            };
            let num = (f(h) - f(-h)) / (2.0 * h);
            assert!((num - g[0].data[t]).abs() < 1e-6, "dq[{t}]");
        }
        assert!(g[2].data.iter().all(|&x| x == 0.0));
    }
}
