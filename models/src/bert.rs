//! BERT with its masked-LM head (HF `BertForMaskedLM`, no pooler): `bert-base`, `bert-large`.
//!
//! Structure, names as HF's without the `bert.` prefix: `embeddings.{word,position,
//! token_type}_embeddings` summed, `embeddings.LayerNorm` (eps 1e-12), dropout; per layer
//! `encoder.layer.<i>`: `attention.self.{query,key,value}` (Linear with bias), unmasked
//! attention scaled by 1/sqrt(head_dim) with dropout on the probabilities,
//! `attention.output.dense` + dropout + residual + `attention.output.LayerNorm` (post-LN);
//! `intermediate.dense` + exact GELU, `output.dense` + dropout + residual + `output.LayerNorm`.
//! MLM head: `cls.predictions.transform.dense` + GELU + `transform.LayerNorm`, then the decoder
//! tied to the word embeddings (`cls.predictions.decoder.weight` when untied) plus the bias
//! `cls.predictions.bias` (HF ties `decoder.bias` to it: one parameter). bert-base has
//! 109,514,298 parameters.
//!
//! Inputs: `input_ids`, `token_type_ids`, `labels`, all i64 `[B, S]`; no attention mask (no
//! padding). Loss: mean cross entropy of logits `[B*S, V]` against `labels [B*S]`, ignore index
//! -100 (HF's value for unmasked positions).

use crate::nn::{Net, IGNORE_INDEX, R};
use autopar_analyzer::ops::unary::UnaryKind;
use autopar_analyzer::ops::Einsum;
use autopar_analyzer::{DType, ValueId};

pub(crate) fn build(net: &mut Net<'_>) -> R<ValueId> {
    let c = net.cfg;
    let (b, s, h, nh, v) = (c.batch, c.seq, c.hidden, c.heads, c.vocab);
    let (eps, p, hd) = (c.norm_eps, c.dropout, c.head_dim());
    let ids = net.input("input_ids", DType::I64, &[b, s]);
    let types = net.input("token_type_ids", DType::I64, &[b, s]);
    let labels = net.input("labels", DType::I64, &[b, s]);

    let (word, mut x) = net.scope("embeddings", |n| {
        let word = n.scope("word_embeddings", |n| Ok(n.param("weight", &[v, h])))?;
        let pos = n.scope("position_embeddings", |n| {
            Ok(n.param("weight", &[c.max_positions, h]))
        })?;
        let tt = n.scope("token_type_embeddings", |n| {
            Ok(n.param("weight", &[c.type_vocab, h]))
        })?;
        let w = n.scope("word_embeddings", |n| n.gather("", word, ids))?;
        let t = n.scope("token_type_embeddings", |n| n.gather("", tt, types))?;
        let ps = n.scope("position_embeddings", |n| {
            if s == c.max_positions {
                Ok(pos)
            } else {
                n.slice("", pos, 0, 0, s)
            }
        })?;
        let e = n.add("add_token_type", w, t)?;
        let e = n.add("add_position", e, ps)?;
        let e = n.layer_norm("LayerNorm", e, eps)?;
        Ok((word, n.dropout("dropout", e, p)?))
    })?;

    for i in 0..c.layers {
        x = net.scope(format!("encoder.layer.{i}"), |n| {
            let a = n.scope("attention", |n| {
                let ctx = n.scope("self", |n| {
                    let mut qkv = [x; 3];
                    for (j, name) in ["query", "key", "value"].iter().enumerate() {
                        let t = n.linear(name, x, h, true)?;
                        qkv[j] = n.reshape(&format!("{name}_heads"), t, &[b, s, nh, hd])?;
                    }
                    let ctx = n.attention(qkv[0], qkv[1], qkv[2], None)?;
                    n.reshape("merge_heads", ctx, &[b, s, h])
                })?;
                n.scope("output", |n| {
                    let o = n.linear("dense", ctx, h, true)?;
                    let o = n.dropout("dropout", o, p)?;
                    let o = n.add("residual", o, x)?;
                    n.layer_norm("LayerNorm", o, eps)
                })
            })?;
            let f = n.scope("intermediate", |n| {
                let f = n.linear("dense", a, c.ffn, true)?;
                n.unary("act", UnaryKind::Gelu, f)
            })?;
            n.scope("output", |n| {
                let o = n.linear("dense", f, h, true)?;
                let o = n.dropout("dropout", o, p)?;
                let o = n.add("residual", o, a)?;
                n.layer_norm("LayerNorm", o, eps)
            })
        })?;
    }

    let logits = net.scope("cls.predictions", |n| {
        let t = n.scope("transform", |n| {
            let t = n.linear("dense", x, h, true)?;
            let t = n.unary("act", UnaryKind::Gelu, t)?;
            n.layer_norm("LayerNorm", t, eps)
        })?;
        let dec = if c.tie_embeddings {
            word
        } else {
            n.scope("decoder", |n| Ok(n.param("weight", &[v, h])))?
        };
        let bias = n.param("bias", &[v]);
        n.scope("decoder", |n| {
            let y = n.op("", Einsum::new("bsh,vh->bsv"), &[t, dec])?;
            n.add("bias_add", y, bias)
        })
    })?;
    net.cross_entropy("loss", logits, labels, Some(IGNORE_INDEX))
}
