//! Contractions, all lowered to the IR `einsum` op: `linear`, `addmm`, `mm`, `bmm`, `matmul`
//! (numpy semantics: broadcast batch dims, rank-1 operands as vectors) and `einsum`.
//!
//! A broadcast batch dim of size 1 is reshaped away on its side, so `[b,1,s,k] @ [h,k,n]`
//! contracts without materialising the broadcast (as the ONNX importer's `MatMul` does).

use super::elementwise::binary_op;
use crate::lower::{bail, Cx, LResult, Operand, Priority, Val};
use autopar_analyzer::ops::binary::BinaryKind;
use autopar_analyzer::ops::Einsum;
use autopar_analyzer::ValueId;

/// Letters for batch dims (m, k and n name the matrix dims).
const BATCH_LETTERS: &[u8] = b"abcdefghijlopqrstuvwxyz";

fn tensor_operand(cx: &Cx<'_>, v: ValueId) -> Operand {
    Operand {
        v,
        priority: if cx.rank(v) == 0 {
            Priority::ZeroDim
        } else {
            Priority::Dimensioned
        },
    }
}

/// `a @ b` with numpy matmul semantics.
pub fn matmul_values(cx: &mut Cx<'_>, a: ValueId, b: ValueId) -> LResult<ValueId> {
    let sa = cx.shape(a);
    let sb = cx.shape(b);
    if sa.is_empty() || sb.is_empty() {
        bail!("matmul of a 0-d tensor ({sa:?} x {sb:?})");
    }
    let (ra, rb) = (sa.len(), sb.len());
    let a_batch = &sa[..ra.saturating_sub(2)];
    let b_batch = &sb[..rb.saturating_sub(2)];
    let nb = a_batch.len().max(b_batch.len());
    if nb > BATCH_LETTERS.len() {
        bail!("matmul with {nb} batch dims");
    }
    let (mut al, mut bl, mut out) = (String::new(), String::new(), String::new());
    let (mut a_shape, mut b_shape) = (Vec::new(), Vec::new());
    for (i, &letter) in BATCH_LETTERS.iter().enumerate().take(nb) {
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
            al.push(letter);
            a_shape.push(size);
        }
        if db == Some(size) {
            bl.push(letter);
            b_shape.push(size);
        }
    }
    if ra == 1 {
        al.push('k');
    } else {
        al.push_str("mk");
        out.push('m');
    }
    if rb == 1 {
        bl.push('k');
    } else {
        bl.push_str("kn");
        out.push('n');
    }
    a_shape.extend_from_slice(&sa[ra - ra.min(2)..]);
    b_shape.extend_from_slice(&sb[rb - rb.min(2)..]);
    let a = cx.reshape(a, a_shape)?;
    let b = cx.reshape(b, b_shape)?;
    let (a, b) = same_dtype(cx, a, b)?;
    cx.emit(Einsum::new(format!("{al},{bl}->{out}")), &[a, b])
}

fn same_dtype(cx: &mut Cx<'_>, a: ValueId, b: ValueId) -> LResult<(ValueId, ValueId)> {
    let (da, db) = (cx.dtype(a), cx.dtype(b));
    if da == db {
        return Ok((a, b));
    }
    bail!("operands are {da} and {db}: PyTorch requires the same dtype")
}

/// `x + bias` in x's dtype (broadcast).
fn add_bias(cx: &mut Cx<'_>, y: ValueId, bias: ValueId, beta: f64) -> LResult<ValueId> {
    let mut bias = tensor_operand(cx, bias);
    if beta != 1.0 {
        let s = cx.scalar(cx.dtype(bias.v), beta);
        let s = Operand {
            v: s,
            priority: Priority::Number,
        };
        bias.v = binary_op(cx, BinaryKind::Mul, bias, s, None)?;
    }
    let y = tensor_operand(cx, y);
    binary_op(cx, BinaryKind::Add, y, bias, None)
}

/// `linear(x, weight [out, in], bias?)`: `x @ weight^T + bias`.
pub fn linear(cx: &mut Cx<'_>) -> LResult<Vec<Val>> {
    let x = cx.tensor(0)?;
    let w = cx.tensor(1)?;
    let bias = cx.opt_tensor(2)?;
    let xs = cx.shape(x);
    let ws = cx.shape(w);
    let y = match (xs.len(), ws.len()) {
        (0, _) => bail!("linear of a 0-d input"),
        (r, 2) if r - 1 <= BATCH_LETTERS.len() => {
            let lead: String = BATCH_LETTERS[..r - 1].iter().map(|&c| c as char).collect();
            let (x, w) = same_dtype(cx, x, w)?;
            cx.emit(Einsum::new(format!("{lead}k,nk->{lead}n")), &[x, w])?
        }
        (r, 1) if r - 1 <= BATCH_LETTERS.len() => {
            let lead: String = BATCH_LETTERS[..r - 1].iter().map(|&c| c as char).collect();
            let (x, w) = same_dtype(cx, x, w)?;
            cx.emit(Einsum::new(format!("{lead}k,k->{lead}")), &[x, w])?
        }
        _ => bail!("linear of {xs:?} with a weight of shape {ws:?}"),
    };
    Ok(vec![Val::Tensor(match bias {
        Some(b) => add_bias(cx, y, b, 1.0)?,
        None => y,
    })])
}

/// `addmm(bias, a, b, beta, alpha)`: `beta * bias + alpha * (a @ b)`.
pub fn addmm(cx: &mut Cx<'_>) -> LResult<Vec<Val>> {
    let bias = cx.tensor(0)?;
    let a = cx.tensor(1)?;
    let b = cx.tensor(2)?;
    let beta = cx.opt_float(3)?.unwrap_or(1.0);
    let alpha = cx.opt_float(4)?.unwrap_or(1.0);
    if cx.rank(a) != 2 || cx.rank(b) != 2 {
        bail!(
            "addmm needs 2-D matrices, got {:?} and {:?}",
            cx.shape(a),
            cx.shape(b)
        );
    }
    let (a, b) = same_dtype(cx, a, b)?;
    let mut y = cx.emit(Einsum::new("mk,kn->mn"), &[a, b])?;
    if alpha != 1.0 {
        let s = cx.scalar(cx.dtype(y), alpha);
        y = cx.emit(
            autopar_analyzer::ops::Binary {
                kind: BinaryKind::Mul,
            },
            &[y, s],
        )?;
    }
    if beta == 0.0 {
        return Ok(vec![Val::Tensor(y)]);
    }
    Ok(vec![Val::Tensor(add_bias(cx, y, bias, beta)?)])
}

/// `mm` (2-D), `bmm` (3-D), `matmul` (numpy semantics).
pub fn matmul(cx: &mut Cx<'_>) -> LResult<Vec<Val>> {
    let a = cx.tensor(0)?;
    let b = cx.tensor(1)?;
    let want = match cx.node.kind.as_str() {
        "aten::mm" => Some(2),
        "aten::bmm" => Some(3),
        _ => None,
    };
    if let Some(r) = want {
        if cx.rank(a) != r || cx.rank(b) != r {
            bail!(
                "needs {r}-D operands, got {:?} and {:?}",
                cx.shape(a),
                cx.shape(b)
            );
        }
    }
    Ok(vec![Val::Tensor(matmul_values(cx, a, b)?)])
}

/// `einsum(equation, tensors)`: explicit (`ij,jk->ik`) or implicit (`ij,jk`) form, without
/// ellipsis.
pub fn einsum(cx: &mut Cx<'_>) -> LResult<Vec<Val>> {
    let eq: String = cx.str(0)?.chars().filter(|c| !c.is_whitespace()).collect();
    let xs = cx.tensors(1)?;
    if eq.contains('.') {
        bail!("einsum equations with an ellipsis are not supported ({eq:?})");
    }
    let eq = if eq.contains("->") {
        eq
    } else {
        // implicit output: letters that appear once, in alphabetical order
        let mut letters: Vec<char> = eq.chars().filter(|c| c.is_ascii_alphabetic()).collect();
        letters.sort_unstable();
        let out: String = letters
            .iter()
            .filter(|c| letters.iter().filter(|d| d == c).count() == 1)
            .collect();
        format!("{eq}->{out}")
    };
    if eq.chars().any(|c| c.is_ascii_uppercase()) {
        bail!("einsum equation {eq:?}: only lower-case letters are supported");
    }
    Ok(vec![Val::Tensor(cx.emit(Einsum::new(eq), &xs)?)])
}
