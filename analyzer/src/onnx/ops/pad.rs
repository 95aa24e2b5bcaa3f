//! `Pad` (13, 18: `axes` input, 19: `wrap` mode): constant mode only; `pads`
//! (`[x1_begin, x2_begin, ..., x1_end, x2_end, ...]` over `axes` or every dim) and the
//! optional scalar `constant_value` must be constants. Lowers to the IR `pad` op; negative pads
//! (cropping) are rejected.

use crate::graph::ValueId;
use crate::onnx::lower::{bail, checked_numel, LResult, Lowering};
use crate::ops::Pad;

pub fn pad(n: &mut Lowering<'_>) -> LResult<Vec<ValueId>> {
    let x = n.input(0)?;
    let rank = n.rank(x);
    let mode = n.attr_s("mode", "constant")?;
    if mode != "constant" {
        bail!("mode {mode:?} is not supported (only constant)");
    }
    let pads = n.const_ints(1)?;
    let value = match n.opt_input(2) {
        Some(_) => n.const_scalar(2)?,
        None => 0.0,
    };
    let axes: Vec<usize> = match n.opt_input(3) {
        Some(_) => {
            let a = n.const_ints(3)?;
            n.axes(&a, rank)?
        }
        None => (0..rank).collect(),
    };
    if pads.len() != 2 * axes.len() {
        bail!("{} pads for {} axes", pads.len(), axes.len());
    }
    if pads.iter().any(|&p| p < 0) {
        bail!("negative pads {pads:?} (cropping) are not supported");
    }
    let mut full = vec![[0usize; 2]; rank];
    for (i, &a) in axes.iter().enumerate() {
        full[a] = [pads[i] as usize, pads[i + axes.len()] as usize];
    }
    let s = n.shape(x);
    let out: Option<Vec<usize>> = s
        .iter()
        .zip(&full)
        .map(|(&d, p)| d.checked_add(p[0])?.checked_add(p[1]))
        .collect();
    match out {
        Some(out) => checked_numel(&out)?,
        None => bail!("padding {s:?} by {pads:?} overflows"),
    };
    if full.iter().all(|p| *p == [0, 0]) {
        return Ok(vec![x]);
    }
    Ok(vec![n.emit(Pad { pads: full, value }, &[x])?])
}
