//! GPT-2 (HF `GPT2LMHeadModel`): `gpt2` (124M), `gpt2-medium`, `gpt2-large`, `gpt2-xl`.
//!
//! Structure, names as HF's without the `transformer.` prefix: `wte`, `wpe`; per block `h.<i>`:
//! `ln_1`, `attn.c_attn` (Conv1D to 3h, bias; split into q, k, v), causal attention scaled by
//! 1/sqrt(head_dim) with dropout on the probabilities, `attn.c_proj` + dropout, residual;
//! `ln_2`, `mlp.c_fc` (4h) + `gelu_tanh` (`gelu_new`), `mlp.c_proj` + dropout, residual; then
//! `ln_f` and the LM head. The head is tied: logits = `x @ wte^T`, one parameter (hence
//! 124,439,808 parameters for `gpt2`); with `tie_embeddings = false` it is `lm_head.weight`.
//!
//! Inputs: `input_ids` i64 `[B, S]`, `labels` i64 `[B, S]`. No attention mask (every sequence is
//! full length). Loss: mean cross entropy of logits `[B*S, V]` against `labels [B*S]`, with
//! HF's ignore index -100; `labels` are taken as given (the caller shifts them: label `s` is the
//! target of position `s`), which keeps the graph free of a slice of the logits.

use crate::nn::{Net, IGNORE_INDEX, R};
use autopar_analyzer::ops::unary::UnaryKind;
use autopar_analyzer::ops::Einsum;
use autopar_analyzer::{DType, ValueId};

pub(crate) fn build(net: &mut Net<'_>) -> R<ValueId> {
    let c = net.cfg;
    let (b, s, h, nh, v) = (c.batch, c.seq, c.hidden, c.heads, c.vocab);
    let (eps, p) = (c.norm_eps, c.dropout);
    let hd = c.head_dim();
    let ids = net.input("input_ids", DType::I64, &[b, s]);
    let labels = net.input("labels", DType::I64, &[b, s]);

    let wte = net.scope("wte", |n| Ok(n.param("weight", &[v, h])))?;
    let wpe = net.scope("wpe", |n| Ok(n.param("weight", &[c.max_positions, h])))?;
    let mut x = net.scope("wte", |n| n.gather("", wte, ids))?;
    let pos = net.scope("wpe", |n| {
        if s == c.max_positions {
            Ok(wpe)
        } else {
            n.slice("", wpe, 0, 0, s)
        }
    })?;
    x = net.add("embed", x, pos)?;
    x = net.dropout("drop", x, p)?;
    let mask = net.causal_mask("causal_mask", s)?;

    for i in 0..c.layers {
        x = net.scope(format!("h.{i}"), |n| {
            let a = n.layer_norm("ln_1", x, eps)?;
            let a = n.scope("attn", |n| {
                let qkv = n.conv1d("c_attn", a, 3 * h)?;
                let mut heads = [qkv; 3];
                for (j, name) in ["q", "k", "v"].iter().enumerate() {
                    let t = n.slice(&format!("split_{name}"), qkv, 2, j * h, (j + 1) * h)?;
                    heads[j] = n.reshape(&format!("{name}_heads"), t, &[b, s, nh, hd])?;
                }
                let ctx = n.attention(heads[0], heads[1], heads[2], Some(mask))?;
                let ctx = n.reshape("merge_heads", ctx, &[b, s, h])?;
                let o = n.conv1d("c_proj", ctx, h)?;
                n.dropout("resid_dropout", o, p)
            })?;
            let x = n.add("residual_1", x, a)?;
            let m = n.layer_norm("ln_2", x, eps)?;
            let m = n.scope("mlp", |n| {
                let f = n.conv1d("c_fc", m, c.ffn)?;
                let f = n.unary("act", UnaryKind::GeluTanh, f)?;
                let o = n.conv1d("c_proj", f, h)?;
                n.dropout("dropout", o, p)
            })?;
            n.add("residual_2", x, m)
        })?;
    }
    let x = net.layer_norm("ln_f", x, eps)?;
    let head = if c.tie_embeddings {
        wte
    } else {
        net.scope("lm_head", |n| Ok(n.param("weight", &[v, h])))?
    };
    let logits = net.scope("lm_head", |n| {
        n.op("", Einsum::new("bsh,vh->bsv"), &[x, head])
    })?;
    net.cross_entropy("loss", logits, labels, Some(IGNORE_INDEX))
}
