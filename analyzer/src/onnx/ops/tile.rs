//! `Tile` (13): constant `repeats` per dim, lowered to the IR `tile` op (no node when every
//! repeat is 1).

use crate::graph::ValueId;
use crate::onnx::lower::{bail, checked_numel, to_dims, LResult, Lowering};
use crate::ops::Tile;

pub fn tile(n: &mut Lowering<'_>) -> LResult<Vec<ValueId>> {
    let x = n.input(0)?;
    let repeats = to_dims(&n.const_ints(1)?, "repeats")?;
    if repeats.len() != n.rank(x) {
        bail!("{} repeats for rank {}", repeats.len(), n.rank(x));
    }
    let s = n.shape(x);
    let out: Option<Vec<usize>> = s
        .iter()
        .zip(&repeats)
        .map(|(&d, &r)| d.checked_mul(r))
        .collect();
    match out {
        Some(out) => checked_numel(&out)?,
        None => bail!("tiling {s:?} by {repeats:?} overflows"),
    };
    if repeats.iter().all(|&r| r == 1) {
        return Ok(vec![x]);
    }
    Ok(vec![n.emit(Tile { repeats }, &[x])?])
}
