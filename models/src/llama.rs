//! LLaMA with Llama-3 shapes (HF `LlamaForCausalLM`): `llama-1b` (Llama-3.2-1B, tied
//! embeddings, llama3 RoPE scaling) and `llama-8b` (Meta-Llama-3-8B, untied).
//!
//! Structure, names as HF's without the `model.` prefix: `embed_tokens`; per layer
//! `layers.<i>`: `input_layernorm` (RMSNorm), `self_attn.{q,k,v}_proj` (no bias), RoPE on q and
//! k, grouped-query attention (each kv head repeated `heads / kv_heads` times by Reshape +
//! Expand + Reshape, HF's `repeat_kv` order), causal mask, `self_attn.o_proj`, residual;
//! `post_attention_layernorm`, SwiGLU `mlp.{gate,up,down}_proj` with SiLU, residual; `norm`,
//! `lm_head` (or `embed_tokens` when tied).
//!
//! RoPE (HF `rotate_half` form): `x * cos + rotate_half(x) * sin` with `cos, sin [S, head_dim]`
//! computed by ops from two small constants, positions `[S, 1]` and inverse frequencies
//! `[1, head_dim/2]` (Mul, Concat, Cos, Sin), once per graph and shared by every layer: the
//! graph holds no `S x head_dim` constant (1M values at seq 8192), and the tables are computed
//! in f32 (f64 for f64 models) and cast, as HF does.
//!
//! Inputs: `input_ids` i64 `[B, S]`, `labels` i64 `[B, S]`; no attention mask. Loss: mean cross
//! entropy of logits `[B*S, V]` against `labels [B*S]` as given (already shifted), ignore
//! index -100.

use crate::config::{ModelConfig, RopeScaling};
use crate::nn::{Net, IGNORE_INDEX, R};
use autopar_analyzer::ops::unary::UnaryKind;
use autopar_analyzer::ops::Einsum;
use autopar_analyzer::{DType, Tensor, ValueId};

/// Inverse RoPE frequencies `theta^(-2i/d)`, with Llama-3 scaling when configured.
pub(crate) fn inv_freq(head_dim: usize, theta: f64, scaling: Option<RopeScaling>) -> Vec<f64> {
    let half = head_dim / 2;
    let mut f: Vec<f64> = (0..half)
        .map(|i| 1.0 / theta.powf((2 * i) as f64 / head_dim as f64))
        .collect();
    if let Some(sc) = scaling {
        let old = sc.original_max_positions as f64;
        let low_wavelen = old / sc.low_freq_factor;
        let high_wavelen = old / sc.high_freq_factor;
        for x in &mut f {
            let wavelen = 2.0 * std::f64::consts::PI / *x;
            if wavelen > low_wavelen {
                *x /= sc.factor;
            } else if wavelen >= high_wavelen && sc.high_freq_factor != sc.low_freq_factor {
                let smooth = (old / wavelen - sc.low_freq_factor)
                    / (sc.high_freq_factor - sc.low_freq_factor);
                *x = (1.0 - smooth) * *x / sc.factor + smooth * *x;
            }
        }
    }
    f
}

/// `cos, sin` tables shaped `[S, 1, head_dim]` (broadcast over batch and heads).
fn rope_tables(net: &mut Net<'_>, c: &ModelConfig) -> R<(ValueId, ValueId)> {
    let (s, d) = (c.seq, c.head_dim());
    let tdt = if c.dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    };
    net.scope("rope", |n| {
        let pos = n.b.named_constant(
            n.b.path("positions"),
            Tensor::new(tdt, vec![s, 1], (0..s).map(|i| i as f64).collect()),
        );
        let inv = inv_freq(d, c.rope_theta, c.rope_scaling);
        let inv =
            n.b.named_constant(n.b.path("inv_freq"), Tensor::new(tdt, vec![1, d / 2], inv));
        let freqs = n.mul("freqs", pos, inv)?;
        let emb = n.concat("emb", &[freqs, freqs], 1)?;
        let mut out = [emb; 2];
        for (j, (name, kind)) in [("cos", UnaryKind::Cos), ("sin", UnaryKind::Sin)]
            .into_iter()
            .enumerate()
        {
            let t = n.unary(name, kind, emb)?;
            let t = n.reshape(&format!("{name}_3d"), t, &[s, 1, d])?;
            out[j] = n.cast(&format!("{name}_cast"), t, c.dtype)?;
        }
        Ok((out[0], out[1]))
    })
}

/// `x * cos + rotate_half(x) * sin` for `x [B, S, H, D]`, in scope `<name>`.
fn apply_rope(net: &mut Net<'_>, name: &str, x: ValueId, cos: ValueId, sin: ValueId) -> R {
    let d = net.shape(x).last().copied().unwrap_or(0);
    net.scope(name, |n| {
        let x1 = n.slice("x1", x, 3, 0, d / 2)?;
        let x2 = n.slice("x2", x, 3, d / 2, d)?;
        let nx2 = n.unary("neg", UnaryKind::Neg, x2)?;
        let rot = n.concat("rotate_half", &[nx2, x1], 3)?;
        let a = n.mul("mul_cos", x, cos)?;
        let r = n.mul("mul_sin", rot, sin)?;
        n.add("", a, r)
    })
}

pub(crate) fn build(net: &mut Net<'_>) -> R<ValueId> {
    let c = net.cfg;
    let (b, s, h, v) = (c.batch, c.seq, c.hidden, c.vocab);
    let (nh, nkv, hd) = (c.heads, c.kv_heads, c.head_dim());
    let groups = nh / nkv;
    let eps = c.norm_eps;
    let ids = net.input("input_ids", DType::I64, &[b, s]);
    let labels = net.input("labels", DType::I64, &[b, s]);

    let emb = net.scope("embed_tokens", |n| Ok(n.param("weight", &[v, h])))?;
    let mut x = net.scope("embed_tokens", |n| n.gather("", emb, ids))?;
    let (cos, sin) = rope_tables(net, c)?;
    let mask = net.causal_mask("causal_mask", s)?;

    for i in 0..c.layers {
        x = net.scope(format!("layers.{i}"), |n| {
            let a = n.rms_norm("input_layernorm", x, eps)?;
            let a = n.scope("self_attn", |n| {
                let q = n.linear("q_proj", a, nh * hd, false)?;
                let k = n.linear("k_proj", a, nkv * hd, false)?;
                let vv = n.linear("v_proj", a, nkv * hd, false)?;
                let q = n.reshape("q_heads", q, &[b, s, nh, hd])?;
                let k = n.reshape("k_heads", k, &[b, s, nkv, hd])?;
                let vv = n.reshape("v_heads", vv, &[b, s, nkv, hd])?;
                let q = apply_rope(n, "q_rope", q, cos, sin)?;
                let mut k = apply_rope(n, "k_rope", k, cos, sin)?;
                let mut vv = vv;
                if groups > 1 {
                    for (name, t) in [("k", &mut k), ("v", &mut vv)] {
                        let r =
                            n.reshape(&format!("{name}_repeat.split"), *t, &[b, s, nkv, 1, hd])?;
                        let r = n.expand(
                            &format!("{name}_repeat.expand"),
                            r,
                            &[b, s, nkv, groups, hd],
                        )?;
                        *t = n.reshape(&format!("{name}_repeat"), r, &[b, s, nh, hd])?;
                    }
                }
                let ctx = n.attention(q, k, vv, Some(mask))?;
                let ctx = n.reshape("merge_heads", ctx, &[b, s, nh * hd])?;
                n.linear("o_proj", ctx, h, false)
            })?;
            let x = n.add("residual_1", x, a)?;
            let m = n.rms_norm("post_attention_layernorm", x, eps)?;
            let m = n.scope("mlp", |n| {
                let g = n.linear("gate_proj", m, c.ffn, false)?;
                let u = n.linear("up_proj", m, c.ffn, false)?;
                let g = n.unary("act", UnaryKind::Silu, g)?;
                let gu = n.mul("gate_mul", g, u)?;
                n.linear("down_proj", gu, h, false)
            })?;
            n.add("residual_2", x, m)
        })?;
    }
    let x = net.rms_norm("norm", x, eps)?;
    let head = if c.tie_embeddings {
        emb
    } else {
        net.scope("lm_head", |n| Ok(n.param("weight", &[v, h])))?
    };
    let logits = net.scope("lm_head", |n| {
        n.op("", Einsum::new("bsh,vh->bsv"), &[x, head])
    })?;
    net.cross_entropy("loss", logits, labels, Some(IGNORE_INDEX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama3_rope_scaling_divides_only_low_frequencies() {
        let plain = inv_freq(128, 500000.0, None);
        assert_eq!(plain.len(), 64);
        assert_eq!(plain[0], 1.0);
        assert!((plain[1] - 500000f64.powf(-2.0 / 128.0)).abs() < 1e-15);
        // factor 1 is the identity (up to rounding in the blended band)
        let one = inv_freq(128, 500000.0, Some(RopeScaling::llama3(1.0)));
        assert!(one
            .iter()
            .zip(&plain)
            .all(|(a, b)| (a - b).abs() <= 1e-15 * b));
        let scaled = inv_freq(128, 500000.0, Some(RopeScaling::llama3(32.0)));
        let wavelen = |f: f64| 2.0 * std::f64::consts::PI / f;
        for (p, s) in plain.iter().zip(&scaled) {
            if wavelen(*p) < 8192.0 / 4.0 {
                assert_eq!(p, s, "high frequency kept");
            } else if wavelen(*p) > 8192.0 {
                assert!((p / 32.0 - s).abs() < 1e-18, "low frequency divided");
            } else {
                assert!(s < p && *s > p / 32.0, "medium frequency blended");
            }
        }
        assert!(scaled.iter().zip(&plain).any(|(s, p)| s != p));
    }
}
