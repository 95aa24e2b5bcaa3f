//! `mlp`: the corpus's plain MLP (`nn.Sequential` of Linear + exact GELU, no GELU after the
//! last Linear), the smallest model with real matmul sizes.
//!
//! Shape: `in_features -> hidden -> ... -> hidden -> in_features` over `layers` Linear layers
//! (default 1024-4096-4096-4096-1024, batch 64). Parameters are named as in `nn.Sequential`:
//! `0.weight`, `2.weight`, ... (the GELUs sit at the odd indices).
//!
//! Loss: **mean squared error** against a float input `target [batch, in_features]`,
//! `mean((y - target)^2)` over all elements. A regression loss keeps the output width of the
//! corpus model (no classifier head to invent) and exercises a reduction to a scalar.
//! Inputs: `x [batch, in_features]`, `target [batch, in_features]`.

use crate::config::ModelConfig;
use crate::nn::{Net, R};
use autopar_analyzer::ops::binary::BinaryKind;
use autopar_analyzer::ops::reduce::ReduceKind;
use autopar_analyzer::ops::unary::UnaryKind;
use autopar_analyzer::ValueId;

pub(crate) fn build(net: &mut Net<'_>) -> R<ValueId> {
    let c: &ModelConfig = net.cfg;
    let (batch, width, hidden, layers) = (c.batch, c.in_features, c.hidden, c.layers);
    let dt = net.dtype();
    let x = net.input("x", dt, &[batch, width]);
    let target = net.input("target", dt, &[batch, width]);
    let mut h = x;
    for i in 0..layers {
        let out = if i + 1 == layers { width } else { hidden };
        h = net.linear(&(2 * i).to_string(), h, out, true)?;
        if i + 1 < layers {
            h = net.unary(&(2 * i + 1).to_string(), UnaryKind::Gelu, h)?;
        }
    }
    net.scope("loss", |n| {
        let d = n.binary("diff", BinaryKind::Sub, h, target)?;
        let sq = n.mul("square", d, d)?;
        n.reduce("mean", ReduceKind::Mean, sq, &[0, 1])
    })
}
