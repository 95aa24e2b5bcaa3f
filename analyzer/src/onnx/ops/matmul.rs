//! `MatMul` (13) and `Gemm` (13), lowered to the IR `einsum` op.
//!
//! `MatMul` has numpy semantics (rank-1 operands are vectors, batch dims broadcast); its
//! lowering is [`GraphBuilder::numpy_matmul`], shared with the TorchScript importer's
//! `aten::matmul`. `Gemm` is `alpha * A' B' + beta * C`
//! with `transA` / `transB` chosen by the operand labels.
//!
//! [`GraphBuilder::numpy_matmul`]: crate::builder::GraphBuilder::numpy_matmul

use crate::graph::ValueId;
use crate::onnx::lower::{bail, LResult, Lowering};
use crate::ops::binary::BinaryKind;
use crate::ops::{Binary, Einsum};

pub fn matmul(n: &mut Lowering<'_>) -> LResult<Vec<ValueId>> {
    let a = n.input(0)?;
    let b = n.input(1)?;
    Ok(vec![n.b.numpy_matmul(a, b)?])
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
