//! `Split` (13: `split` input; 18: or `num_outputs`, the last chunk smaller): one IR `slice`
//! per output. Without sizes the dim splits evenly over the outputs.

use super::slice::slice_axes;
use crate::graph::ValueId;
use crate::onnx::lower::{bail, to_dims, LResult, Lowering};

pub fn split(n: &mut Lowering<'_>) -> LResult<Vec<ValueId>> {
    let x = n.input(0)?;
    let shape = n.shape(x);
    let axis = n.axis(n.attr_i("axis", 0)?, shape.len())?;
    let dim = shape[axis];
    let outputs = n.num_outputs();
    let sizes: Vec<usize> = if n.opt_input(1).is_some() {
        to_dims(&n.const_ints(1)?, "split")?
    } else if let Some(s) = n.attr_ints("split")? {
        to_dims(&s, "split")?
    } else if let Some(k) = n.attr_opt_i("num_outputs")? {
        if usize::try_from(k).ok() != Some(outputs) || outputs == 0 {
            bail!("num_outputs = {k} but the node has {outputs} outputs");
        }
        let k = outputs;
        let chunk = dim.div_ceil(k);
        match chunk
            .checked_mul(k - 1)
            .and_then(|used| dim.checked_sub(used))
        {
            Some(last) => (0..k)
                .map(|i| if i + 1 == k { last } else { chunk })
                .collect(),
            None => bail!("cannot split {dim} into {k} chunks of {chunk}"),
        }
    } else {
        if outputs == 0 || dim % outputs != 0 {
            bail!("dim {dim} does not split evenly into {outputs} outputs");
        }
        vec![dim / outputs; outputs]
    };
    if sizes.iter().sum::<usize>() != dim {
        bail!("split sizes {sizes:?} do not add up to dim {axis} ({dim})");
    }
    if sizes.len() != outputs {
        bail!("{} split sizes for {outputs} outputs", sizes.len());
    }
    let mut outs = Vec::with_capacity(sizes.len());
    let mut start = 0;
    for s in sizes {
        outs.push(slice_axes(n, x, &[(axis, start, start + s, 1)])?);
        start += s;
    }
    Ok(outs)
}
