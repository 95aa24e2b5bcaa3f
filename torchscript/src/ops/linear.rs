//! Contractions, all lowered to the IR `einsum` op: `linear`, `addmm`, `mm`, `bmm`, `matmul`
//! (numpy semantics: broadcast batch dims, rank-1 operands as vectors) and `einsum`.
//!
//! `matmul` is the analyzer's `GraphBuilder::numpy_matmul`, the lowering ONNX `MatMul` uses too:
//! a broadcast batch dim of size 1 is reshaped away on its side, so `[b,1,s,k] @ [h,k,n]`
//! contracts without materialising the broadcast.

use super::elementwise::binary_op;
use crate::lower::{bail, Cx, LResult, Operand, Priority, Val};
use autopar_analyzer::ops::binary::BinaryKind;
use autopar_analyzer::ops::einsum::MATMUL_BATCH_LETTERS;
use autopar_analyzer::ops::Einsum;
use autopar_analyzer::ValueId;

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

/// `a @ b` with numpy matmul semantics (the analyzer's one lowering, shared with ONNX `MatMul`).
pub fn matmul_values(cx: &mut Cx<'_>, a: ValueId, b: ValueId) -> LResult<ValueId> {
    let (a, b) = same_dtype(cx, a, b)?;
    Ok(cx.b.numpy_matmul(a, b)?)
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
        (r, 2) if r - 1 <= MATMUL_BATCH_LETTERS.len() => {
            let lead: String = MATMUL_BATCH_LETTERS[..r - 1]
                .iter()
                .map(|&c| c as char)
                .collect();
            let (x, w) = same_dtype(cx, x, w)?;
            cx.emit(Einsum::new(format!("{lead}k,nk->{lead}n")), &[x, w])?
        }
        (r, 1) if r - 1 <= MATMUL_BATCH_LETTERS.len() => {
            let lead: String = MATMUL_BATCH_LETTERS[..r - 1]
                .iter()
                .map(|&c| c as char)
                .collect();
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
