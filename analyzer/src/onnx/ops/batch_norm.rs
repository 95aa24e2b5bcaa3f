//! `BatchNormalization` (14/15: `training_mode` attribute; 9-13: training when the running
//! statistics are requested as outputs): inputs `X, scale, B, input_mean, input_var`, outputs
//! `Y[, running_mean, running_var]`. Lowers to the IR `batch_norm` op, whose training form
//! returns the updated running statistics as outputs 1 and 2 (ONNX's order). Opset 9-13's
//! `saved_mean` / `saved_var` outputs are not supported.

use crate::graph::ValueId;
use crate::onnx::lower::{bail, LResult, Lowering};
use crate::ops::BatchNorm;

pub fn batch_norm(n: &mut Lowering<'_>) -> LResult<Vec<ValueId>> {
    let ins = (0..5).map(|i| n.input(i)).collect::<LResult<Vec<_>>>()?;
    let epsilon = n.attr_f("epsilon", 1e-5)?;
    let momentum = n.attr_f("momentum", 0.9)?;
    let training = if n.opset >= 14 {
        n.attr_i("training_mode", 0)? != 0
    } else {
        (1..n.num_outputs()).any(|i| n.output_used(i))
    };
    if n.output_used(3) || n.output_used(4) {
        bail!("the saved_mean / saved_var outputs are not supported");
    }
    if !training {
        if n.output_used(1) || n.output_used(2) {
            bail!("running statistics are outputs only in training mode");
        }
        let y = n.emit(
            BatchNorm {
                epsilon,
                momentum,
                training,
            },
            &ins,
        )?;
        return Ok(vec![y]);
    }
    let outs = n.emit_n(
        BatchNorm {
            epsilon,
            momentum,
            training,
        },
        &ins,
    )?;
    Ok(outs.into_iter().take(3).collect())
}
