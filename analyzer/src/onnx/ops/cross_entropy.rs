//! `SoftmaxCrossEntropyLoss` (13): inputs `scores [N, C, d...], labels [N, d...]` (the
//! optional class `weights` are not supported), attributes `reduction` (mean / sum / none)
//! and `ignore_index`; outputs `output[, log_prob]`. Lowers to the IR `softmax_cross_entropy`
//! op, which returns both. Its loss output is the imported model's training loss.

use crate::graph::ValueId;
use crate::onnx::lower::{bail, LResult, Lowering};
use crate::ops::cross_entropy::LossReduction;
use crate::ops::SoftmaxCrossEntropy;

pub fn softmax_cross_entropy(n: &mut Lowering<'_>) -> LResult<Vec<ValueId>> {
    let scores = n.input(0)?;
    let labels = n.input(1)?;
    if n.opt_input(2).is_some() {
        bail!("class weights are not supported");
    }
    let reduction = match n.attr_s("reduction", "mean")?.as_str() {
        "mean" => LossReduction::Mean,
        "sum" => LossReduction::Sum,
        "none" => LossReduction::None,
        other => bail!("unknown reduction {other:?}"),
    };
    let ignore_index = n.attr_opt_i("ignore_index")?;
    n.emit_n(
        SoftmaxCrossEntropy {
            reduction,
            ignore_index,
        },
        &[scores, labels],
    )
}
