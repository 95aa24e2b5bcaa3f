//! `Transpose` (13): `perm` defaults to reversing the dims. Lowers to the IR `transpose` op
//! (no node for the identity permutation).

use crate::graph::ValueId;
use crate::onnx::lower::{bail, LResult, Lowering};
use crate::ops::Transpose;

pub fn transpose(n: &mut Lowering<'_>) -> LResult<Vec<ValueId>> {
    let x = n.input(0)?;
    let r = n.rank(x);
    let perm: Vec<usize> = match n.attr_ints("perm")? {
        Some(p) => p.iter().map(|&a| n.axis(a, r)).collect::<LResult<_>>()?,
        None => (0..r).rev().collect(),
    };
    let mut seen = perm.clone();
    seen.sort_unstable();
    if seen != (0..r).collect::<Vec<_>>() {
        bail!("perm {perm:?} is not a permutation of rank {r}");
    }
    if perm.iter().enumerate().all(|(i, &p)| i == p) {
        return Ok(vec![x]);
    }
    Ok(vec![n.emit(Transpose { perm }, &[x])?])
}
