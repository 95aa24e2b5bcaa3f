//! `LayerNormalization` (17): normalises over dims `axis..`; inputs `X, Scale[, B]`, outputs
//! `Y[, Mean, InvStdDev]`. Lowers to the IR `layer_norm` op, whose outputs are the same three
//! (mean and rstd shaped like X with the normalised dims set to 1). `stash_type` only sets the
//! precision of the statistics and is not modelled.

use crate::graph::ValueId;
use crate::onnx::lower::{LResult, Lowering};
use crate::ops::LayerNorm;

pub fn layer_norm(n: &mut Lowering<'_>) -> LResult<Vec<ValueId>> {
    let x = n.input(0)?;
    let scale = n.input(1)?;
    let axis = n.axis(n.attr_i("axis", -1)?, n.rank(x))?;
    let epsilon = n.attr_f("epsilon", 1e-5)?;
    let mut ins = vec![x, scale];
    if let Some(bias) = n.opt_input(2) {
        ins.push(bias);
    }
    n.emit_n(LayerNorm { axis, epsilon }, &ins)
}
