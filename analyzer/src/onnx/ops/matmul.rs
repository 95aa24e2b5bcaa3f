//! `MatMul` (13) and `Gemm` (13), lowered to the IR `einsum` op.
//!
//! `MatMul` has numpy semantics: rank-1 operands are vectors, leading dims are batch dims that
//! broadcast. A batch dim of size 1 facing a larger one is reshaped away on its side (einsum
//! letters must agree in size), so `[b,1,s,k] x [h,k,n]` becomes `"amk,bkn->abmn"`-style
//! contractions without materialising a broadcast copy. `Gemm` is `alpha * A' B' + beta * C`
//! with `transA` / `transB` chosen by the operand labels.

use crate::graph::ValueId;
use crate::onnx::lower::{bail, LResult, Lowering};
use crate::ops::binary::BinaryKind;
use crate::ops::{Binary, Einsum};

/// Letters for batch dims (m, k and n name the matrix dims).
const BATCH_LETTERS: &[u8] = b"abcdefghijlopqrstuvwxyz";

/// `a @ b` with numpy matmul semantics.
pub fn lower_matmul(n: &mut Lowering<'_>, a: ValueId, b: ValueId) -> LResult<ValueId> {
    let sa = n.shape(a);
    let sb = n.shape(b);
    if sa.is_empty() || sb.is_empty() {
        bail!("MatMul of a scalar ({sa:?} x {sb:?})");
    }
    let (ra, rb) = (sa.len(), sb.len());
    let a_batch = &sa[..ra.saturating_sub(2)];
    let b_batch = &sb[..rb.saturating_sub(2)];
    let nb = a_batch.len().max(b_batch.len());
    if nb > BATCH_LETTERS.len() {
        bail!("MatMul with {nb} batch dims");
    }
    let (mut a_labels, mut b_labels, mut out) = (String::new(), String::new(), String::new());
    let (mut a_shape, mut b_shape) = (Vec::new(), Vec::new());
    for (i, &letter) in BATCH_LETTERS.iter().enumerate().take(nb) {
        // dims aligned from the right
        let da = (i + a_batch.len()).checked_sub(nb).map(|j| a_batch[j]);
        let db = (i + b_batch.len()).checked_sub(nb).map(|j| b_batch[j]);
        let size = match (da, db) {
            (Some(x), Some(y)) if x == y => x,
            (Some(1), Some(y)) => y,
            (Some(x), Some(1)) | (Some(x), None) => x,
            (None, Some(y)) => y,
            _ => bail!("batch dims of {sa:?} and {sb:?} do not broadcast"),
        };
        let letter = letter as char;
        out.push(letter);
        if da == Some(size) {
            a_labels.push(letter);
            a_shape.push(size);
        }
        if db == Some(size) {
            b_labels.push(letter);
            b_shape.push(size);
        }
    }
    if ra == 1 {
        a_labels.push('k');
    } else {
        a_labels.push_str("mk");
        out.push('m');
    }
    if rb == 1 {
        b_labels.push('k');
    } else {
        b_labels.push_str("kn");
        out.push('n');
    }
    a_shape.extend_from_slice(&sa[ra - ra.min(2)..]);
    b_shape.extend_from_slice(&sb[rb - rb.min(2)..]);
    let a = n.reshape(a, a_shape)?;
    let b = n.reshape(b, b_shape)?;
    n.emit(
        Einsum::new(format!("{a_labels},{b_labels}->{out}")),
        &[a, b],
    )
}

pub fn matmul(n: &mut Lowering<'_>) -> LResult<Vec<ValueId>> {
    let a = n.input(0)?;
    let b = n.input(1)?;
    Ok(vec![lower_matmul(n, a, b)?])
}

pub fn gemm(n: &mut Lowering<'_>) -> LResult<Vec<ValueId>> {
    let a = n.input(0)?;
    let b = n.input(1)?;
    if n.rank(a) != 2 || n.rank(b) != 2 {
        bail!(
            "Gemm needs 2-D operands, got {:?} and {:?}",
            n.shape(a),
            n.shape(b)
        );
    }
    let al = if n.attr_i("transA", 0)? != 0 {
        "km"
    } else {
        "mk"
    };
    let bl = if n.attr_i("transB", 0)? != 0 {
        "nk"
    } else {
        "kn"
    };
    let alpha = n.attr_f("alpha", 1.0)?;
    let beta = n.attr_f("beta", 1.0)?;
    let mut y = n.emit(Einsum::new(format!("{al},{bl}->mn")), &[a, b])?;
    if alpha != 1.0 {
        let s = n.scalar(n.dtype(y), alpha);
        y = n.emit(
            Binary {
                kind: BinaryKind::Mul,
            },
            &[y, s],
        )?;
    }
    if let Some(mut c) = n.opt_input(2) {
        if beta != 0.0 {
            if beta != 1.0 {
                let s = n.scalar(n.dtype(c), beta);
                c = n.emit(
                    Binary {
                        kind: BinaryKind::Mul,
                    },
                    &[c, s],
                )?;
            }
            y = n.emit(
                Binary {
                    kind: BinaryKind::Add,
                },
                &[y, c],
            )?;
        }
    }
    Ok(vec![y])
}
