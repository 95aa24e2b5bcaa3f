//! `Dropout` (13): inputs `data[, ratio[, training_mode]]`, outputs `output[, mask]`. Without
//! a `training_mode` input (or with it false) dropout is the identity (the TorchScript
//! exporter writes eval-mode dropouts that way) and the mask is all true. In training the ratio
//! and mode must be constants; the mask's seed is the node's position in the graph, so every
//! dropout gets its own deterministic mask and every rank agrees. Lowers to the IR `dropout`
//! op.

use crate::dtype::DType;
use crate::graph::ValueId;
use crate::onnx::lower::{bail, LResult, Lowering};
use crate::ops::{Dropout, Expand};

pub fn dropout(n: &mut Lowering<'_>) -> LResult<Vec<ValueId>> {
    let x = n.input(0)?;
    let ratio = match n.opt_input(1) {
        Some(_) => n.const_scalar(1)?,
        None => n.attr_f("ratio", 0.5)?,
    };
    if !(0.0..1.0).contains(&ratio) {
        bail!("ratio {ratio} is not in [0, 1)");
    }
    let training = match n.opt_input(2) {
        Some(_) => n.const_scalar(2)? != 0.0,
        None => false,
    };
    if training {
        let seed = n.index as u64;
        return n.emit_n(
            Dropout {
                ratio,
                training,
                seed,
            },
            &[x],
        );
    }
    let mut outs = vec![x];
    if n.output_used(1) {
        let t = n.scalar(DType::Bool, 1.0);
        let shape = n.shape(x);
        let mask = if shape.is_empty() {
            t
        } else {
            n.emit(Expand { shape }, &[t])?
        };
        outs.push(mask);
    }
    Ok(outs)
}
