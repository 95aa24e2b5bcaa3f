//! `dropout`: inverted dropout with an explicit keep mask as second output (ONNX Dropout with
//! `training_mode`, opset >= 12). The mask is saved for the backward, so the gradient is the
//! output gradient masked and scaled by `1 / (1 - ratio)`; outside training, or with ratio 0,
//! the op is the identity.
//!
//! The mask is a pure function of `(seed, flat element index)` ([`dropout_keep`]): every run
//! and every rank holding the same elements agrees, with no RNG state to carry. Every dim is a
//! parallel axis: a shard draws from its own indices, which changes which elements drop but not
//! the distribution.

use super::*;
use crate::dtype::{DType, TensorType};
use crate::error::{AnalyzerError, OpError};
use crate::graph::ValueId;
use crate::op_err;
use crate::ops::binary::scale;
use crate::tensor::Tensor;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
/// Dropout: outputs `y, mask` (mask bool, true = kept; y = x * mask / (1 - ratio)). Not
/// `training`: y = x and mask all true. The mask is a deterministic function of `seed` and the
/// element index so that every run (and every rank) agrees.
pub struct Dropout {
    pub ratio: f64,
    pub training: bool,
    pub seed: u64,
}

/// Whether element `index` is kept under dropout `ratio` with `seed`: a splitmix64 hash of the
/// pair mapped to a uniform draw in [0, 1), kept when the draw is at least `ratio`.
pub fn dropout_keep(seed: u64, index: u64, ratio: f64) -> bool {
    let mut z = seed ^ index.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    let u = (z >> 11) as f64 / (1u64 << 53) as f64;
    u >= ratio
}

impl Dropout {
    /// Whether the op drops anything.
    pub fn active(&self) -> bool {
        self.training && self.ratio > 0.0
    }
    /// The factor applied to kept elements.
    pub fn scale(&self) -> f64 {
        if self.active() {
            1.0 / (1.0 - self.ratio)
        } else {
            1.0
        }
    }
}

impl OpSpec for Dropout {
    fn infer(&self, inputs: &[&TensorType]) -> Result<Vec<TensorType>, OpError> {
        let [x] = inputs else {
            return Err(op_err!("takes 1 input, got {}", inputs.len()));
        };
        if !x.dtype.is_float() {
            return Err(op_err!("takes a float tensor, got {}", x.dtype));
        }
        if !(0.0..1.0).contains(&self.ratio) {
            return Err(op_err!("ratio {} is outside [0, 1)", self.ratio));
        }
        Ok(vec![(*x).clone(), x.with_dtype(DType::Bool)])
    }

    fn dims(&self, inputs: &[&TensorType], outputs: &[&TensorType]) -> DimMap {
        DimMap::elementwise(inputs, outputs)
    }

    fn cost(&self, inputs: &[&TensorType], outputs: &[&TensorType]) -> Cost {
        // a compare against the draw and a multiply per element (the hash is integer work)
        let n = inputs.first().map_or(0, |x| x.numel());
        let flops = if self.active() { 2.0 * n as f64 } else { 0.0 };
        Cost::memory_bound(inputs, outputs, flops)
    }

    fn vjp(&self, cx: &mut VjpCtx<'_>) -> Result<Vec<Option<ValueId>>, OpError> {
        let Some(dy) = cx.grads[0] else {
            return Ok(vec![None]);
        };
        if !cx.needs[0] {
            return Ok(vec![None]);
        }
        if !self.active() {
            return Ok(vec![Some(dy)]);
        }
        let mask = cx.outputs[1];
        let b = &mut *cx.b;
        let s = scale(b, dy, self.scale())?;
        let zero = b.scalar(b.ty(dy).dtype, 0.0);
        Ok(vec![Some(b.emit(Where {}, &[mask, s, zero])?)])
    }

    fn eval(&self, inputs: &[&Tensor]) -> Result<Vec<Tensor>, OpError> {
        let tys: Vec<TensorType> = inputs.iter().map(|t| t.ty()).collect();
        let outs = self.infer(&tys.iter().collect::<Vec<_>>())?;
        let x = inputs[0];
        let s = self.scale();
        let mask: Vec<f64> = (0..x.numel())
            .map(|i| {
                let keep = !self.active() || dropout_keep(self.seed, i as u64, self.ratio);
                if keep {
                    1.0
                } else {
                    0.0
                }
            })
            .collect();
        let y = x.data.iter().zip(&mask).map(|(v, m)| v * m * s).collect();
        Ok(vec![
            Tensor::new(outs[0].dtype, outs[0].shape.clone(), y),
            Tensor::new(DType::Bool, outs[1].shape.clone(), mask),
        ])
    }
}

impl crate::builder::GraphBuilder {
    /// Dropout of `x`; returns `y` (the mask is output 1 of the node).
    pub fn dropout(
        &mut self,
        x: ValueId,
        ratio: f64,
        training: bool,
        seed: u64,
    ) -> Result<ValueId, AnalyzerError> {
        self.node1(
            Dropout {
                ratio,
                training,
                seed,
            },
            &[x],
        )
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::ops::gradcheck::{check, rand_tensor};

    fn op(ratio: f64, training: bool) -> Dropout {
        Dropout {
            ratio,
            training,
            seed: 7,
        }
    }

    #[test]
    fn infers_and_rejects() {
        let x = TensorType::new(DType::F16, [2, 3]);
        let out = op(0.1, true).infer(&[&x]).unwrap();
        assert_eq!(out, vec![x.clone(), TensorType::new(DType::Bool, [2, 3])]);
        let e = op(1.0, true).infer(&[&x]).unwrap_err();
        assert!(e.0.contains("outside [0, 1)"), "{e}");
        assert!(op(f64::NAN, true).infer(&[&x]).is_err());
        assert!(op(0.1, true).infer(&[&x.with_dtype(DType::I64)]).is_err());
        let d = op(0.1, true).dims(&[&x], &[&out[0], &out[1]]);
        assert_eq!(d.to_einsum(), "ab->ab,ab");
    }

    #[test]
    fn mask_is_deterministic_and_fair() {
        let x = Tensor::full(DType::F64, vec![10_000], 1.0);
        let a = op(0.25, true).eval(&[&x]).unwrap();
        let b = op(0.25, true).eval(&[&x]).unwrap();
        assert_eq!(a, b);
        let kept = a[1].data.iter().filter(|&&m| m == 1.0).count();
        assert!((7300..7700).contains(&kept), "kept {kept} of 10000");
        assert!(a[0]
            .data
            .iter()
            .all(|&v| v == 0.0 || (v - 4.0 / 3.0).abs() < 1e-15));
        let c = Dropout {
            seed: 8,
            ..op(0.25, true)
        }
        .eval(&[&x])
        .unwrap();
        assert_ne!(a[1], c[1]);
        for inactive in [op(0.25, false), op(0.0, true)] {
            let out = inactive.eval(&[&x]).unwrap();
            assert_eq!(out[0], x);
            assert!(out[1].data.iter().all(|&m| m == 1.0));
        }
    }

    #[test]
    fn gradients_match_finite_differences() {
        check(op(0.5, true), &[rand_tensor(&[4, 5], 1)], 1e-6);
        check(op(0.5, false), &[rand_tensor(&[3], 2)], 1e-6);
    }
}
