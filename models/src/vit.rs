//! Vision Transformer (torchvision `vit_b_16`): `vit-b16`.
//!
//! Structure, names as torchvision's: `conv_proj` (patch x patch conv, stride patch, bias) to
//! `[B, h, g, g]`, flattened and transposed to `[B, g*g, h]`; `class_token [1, 1, h]` expanded
//! over the batch and concatenated in front; `encoder.pos_embedding [1, g*g+1, h]` added, dropout;
//! per layer `encoder.layers.encoder_layer_<i>`: `ln_1` (eps 1e-6), `self_attention`
//! (`nn.MultiheadAttention`: fused `in_proj_weight [3h, h]` / `in_proj_bias`, split into q, k,
//! v; `out_proj`), dropout, residual; `ln_2`, `mlp.0` Linear to `ffn`, exact GELU, dropout,
//! `mlp.3` Linear back, dropout, residual; `encoder.ln`; the class token's row through
//! `heads.head` (Linear to `num_classes`). vit-b16 has 86,567,656 parameters.
//!
//! Inputs: `images` `[B, channels, image_size, image_size]` (model dtype), `labels` i64 `[B]`.
//! Loss: mean cross entropy of the logits `[B, num_classes]`.

use crate::nn::{Net, R};
use autopar_analyzer::ops::unary::UnaryKind;
use autopar_analyzer::{DType, ValueId};

pub(crate) fn build(net: &mut Net<'_>) -> R<ValueId> {
    let c = net.cfg;
    let (b, h, nh, hd) = (c.batch, c.hidden, c.heads, c.head_dim());
    let g = c.image_size / c.patch;
    let n_tok = g * g + 1;
    let (eps, p) = (c.norm_eps, c.dropout);
    let dt = net.dtype();
    let images = net.input("images", dt, &[b, c.channels, c.image_size, c.image_size]);
    let labels = net.input("labels", DType::I64, &[b]);

    let x = net.conv2d("conv_proj", images, h, c.patch, c.patch, 0, true)?;
    let x = net.scope("conv_proj", |n| {
        let x = n.reshape("flatten", x, &[b, h, g * g])?;
        n.transpose("to_tokens", x, &[0, 2, 1])
    })?;
    let cls = net.param("class_token", &[1, 1, h]);
    let cls = net.expand("class_token.expand", cls, &[b, 1, h])?;
    let mut x = net.concat("class_token.concat", &[cls, x], 1)?;

    x = net.scope("encoder", |n| {
        let pos = n.param("pos_embedding", &[1, n_tok, h]);
        let mut x = n.add("add_pos_embedding", x, pos)?;
        x = n.dropout("dropout", x, p)?;
        for i in 0..c.layers {
            x = n.scope(format!("layers.encoder_layer_{i}"), |n| {
                let a = n.layer_norm("ln_1", x, eps)?;
                let a = n.scope("self_attention", |n| {
                    let w = n.param("in_proj_weight", &[3 * h, h]);
                    let bias = n.param("in_proj_bias", &[3 * h]);
                    let qkv = n.scope("in_proj", |n| n.affine(a, w, Some(bias)))?;
                    let mut heads = [qkv; 3];
                    for (j, name) in ["q", "k", "v"].iter().enumerate() {
                        let t = n.slice(&format!("split_{name}"), qkv, 2, j * h, (j + 1) * h)?;
                        heads[j] = n.reshape(&format!("{name}_heads"), t, &[b, n_tok, nh, hd])?;
                    }
                    let ctx = n.attention(heads[0], heads[1], heads[2], None)?;
                    let ctx = n.reshape("merge_heads", ctx, &[b, n_tok, h])?;
                    n.linear("out_proj", ctx, h, true)
                })?;
                let a = n.dropout("dropout", a, p)?;
                let x = n.add("residual_1", a, x)?;
                let m = n.layer_norm("ln_2", x, eps)?;
                let m = n.scope("mlp", |n| {
                    let f = n.linear("0", m, c.ffn, true)?;
                    let f = n.unary("1", UnaryKind::Gelu, f)?;
                    let f = n.dropout("2", f, p)?;
                    let o = n.linear("3", f, h, true)?;
                    n.dropout("4", o, p)
                })?;
                n.add("residual_2", x, m)
            })?;
        }
        n.layer_norm("ln", x, eps)
    })?;
    let cls_out = net.slice("class_token.select", x, 1, 0, 1)?;
    let cls_out = net.reshape("class_token.squeeze", cls_out, &[b, h])?;
    let logits = net.scope("heads", |n| n.linear("head", cls_out, c.num_classes, true))?;
    net.cross_entropy("loss", logits, labels, None)
}
