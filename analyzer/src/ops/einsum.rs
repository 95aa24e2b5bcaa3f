//! `einsum`: the one contraction op. ONNX `MatMul`, `Gemm` and `Einsum`, and every linear layer
//! of the built-in models, lower to it; its equation *is* its dimension map, so data-parallel,
//! column- and row-parallel strategies all fall out of the same generic enumeration.

use super::*;
use crate::dtype::TensorType;
use crate::error::{AnalyzerError, OpError};
use crate::graph::ValueId;
use crate::op_err;
use crate::tensor::{for_each_index, Tensor};

/// Generalised contraction (`MatMul`, `Gemm`, `Einsum`, batched matmul): `equation` in numpy
/// form with explicit output (`"bmk,kn->bmn"`), lower-case letters, no ellipsis, no repeated
/// letter within one operand. Letters absent from the output are summed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Einsum {
    pub equation: String,
}

/// A parsed equation: operand labels, output labels, and every distinct letter with its size.
struct Parsed {
    ins: Vec<Vec<char>>,
    out: Vec<char>,
    letters: Vec<char>,
    sizes: Vec<usize>,
}

impl Einsum {
    pub fn new(equation: impl Into<String>) -> Self {
        Einsum { equation: equation.into() }
    }

    fn parse(&self, shapes: &[&[usize]]) -> Result<Parsed, OpError> {
        let eq: String = self.equation.chars().filter(|c| !c.is_whitespace()).collect();
        let Some((lhs, rhs)) = eq.split_once("->") else { return Err(op_err!("equation {:?} has no '->'", self.equation)) };
        let ins: Vec<Vec<char>> = lhs.split(',').map(|s| s.chars().collect()).collect();
        let out: Vec<char> = rhs.chars().collect();
        if ins.len() != shapes.len() {
            return Err(op_err!("equation {:?} has {} operands, got {} inputs", self.equation, ins.len(), shapes.len()));
        }
        let mut letters = vec![];
        let mut sizes: Vec<usize> = vec![];
        for (i, (labels, shape)) in ins.iter().zip(shapes).enumerate() {
            if labels.len() != shape.len() {
                return Err(op_err!("operand {i} is labelled {:?} but has rank {}", labels.iter().collect::<String>(), shape.len()));
            }
            for (j, (&c, &n)) in labels.iter().zip(shape.iter()).enumerate() {
                if !c.is_ascii_lowercase() {
                    return Err(op_err!("label {c:?} is not a lower-case letter"));
                }
                if labels[..j].contains(&c) {
                    return Err(op_err!("label {c:?} repeated within operand {i}"));
                }
                match letters.iter().position(|&l| l == c) {
                    Some(p) if sizes[p] != n => return Err(op_err!("label {c:?} has size {} and {n}", sizes[p])),
                    Some(_) => {}
                    None => {
                        letters.push(c);
                        sizes.push(n);
                    }
                }
            }
        }
        for (j, &c) in out.iter().enumerate() {
            if !letters.contains(&c) {
                return Err(op_err!("output label {c:?} is in no operand"));
            }
            if out[..j].contains(&c) {
                return Err(op_err!("output label {c:?} repeated"));
            }
        }
        Ok(Parsed { ins, out, letters, sizes })
    }
}

fn size_of(p: &Parsed, c: char) -> usize {
    p.letters.iter().position(|&l| l == c).map(|i| p.sizes[i]).unwrap_or(1)
}

impl OpSpec for Einsum {
    fn infer(&self, inputs: &[&TensorType]) -> Result<Vec<TensorType>, OpError> {
        let shapes: Vec<&[usize]> = inputs.iter().map(|t| t.shape.as_slice()).collect();
        let p = self.parse(&shapes)?;
        let dtype = inputs.first().map(|t| t.dtype).ok_or_else(|| op_err!("einsum needs an operand"))?;
        if let Some(t) = inputs.iter().find(|t| t.dtype != dtype) {
            return Err(op_err!("operands mix {dtype} and {}", t.dtype));
        }
        if !dtype.is_float() {
            return Err(op_err!("einsum on {dtype} is not supported"));
        }
        Ok(vec![TensorType::new(dtype, p.out.iter().map(|&c| size_of(&p, c)).collect::<Vec<_>>())])
    }

    fn dims(&self, inputs: &[&TensorType], outputs: &[&TensorType]) -> DimMap {
        let shapes: Vec<&[usize]> = inputs.iter().map(|t| t.shape.as_slice()).collect();
        match self.parse(&shapes) {
            Ok(_) => DimMap::from_spec(&self.equation.replace(' ', ""), inputs, ""),
            Err(_) => DimMap::opaque(inputs, outputs),
        }
    }

    fn cost(&self, inputs: &[&TensorType], outputs: &[&TensorType]) -> Cost {
        let shapes: Vec<&[usize]> = inputs.iter().map(|t| t.shape.as_slice()).collect();
        let mut c = Cost::data_movement(inputs, outputs);
        if let Ok(p) = self.parse(&shapes) {
            let points: f64 = p.sizes.iter().map(|&s| s as f64).product();
            // one multiply and one add per point of the iteration space (per extra operand)
            let f = 2.0 * points * (inputs.len().max(2) - 1) as f64;
            c.flops = f;
            if inputs.len() >= 2 {
                c.matmul_flops = f;
            }
        }
        c
    }

    fn vjp(&self, cx: &mut VjpCtx<'_>) -> Result<Vec<Option<ValueId>>, OpError> {
        let shapes: Vec<Vec<usize>> = cx.inputs.iter().map(|&v| cx.ty(v).shape).collect();
        let shape_refs: Vec<&[usize]> = shapes.iter().map(|s| s.as_slice()).collect();
        let p = self.parse(&shape_refs)?;
        let Some(dy) = cx.grads[0] else { return Ok(vec![None; cx.inputs.len()]) };
        let mut grads = vec![None; cx.inputs.len()];
        for i in 0..cx.inputs.len() {
            if !cx.needs[i] {
                continue;
            }
            // d input_i = einsum(dy, other operands -> labels_i); labels of input i found in no
            // other operand and not in the output were summed in the forward: broadcast back.
            let mut operands = vec![dy];
            let mut labels = vec![p.out.iter().collect::<String>()];
            for (j, l) in p.ins.iter().enumerate() {
                if j != i {
                    operands.push(cx.inputs[j]);
                    labels.push(l.iter().collect());
                }
            }
            let available: String = labels.concat();
            let kept: String = p.ins[i].iter().filter(|c| available.contains(**c)).collect();
            let eq = format!("{}->{kept}", labels.join(","));
            let mut g = cx.b.emit(Einsum::new(eq), &operands)?;
            if kept.len() != p.ins[i].len() {
                let with_ones: Vec<usize> = p.ins[i].iter().map(|&c| if kept.contains(c) { size_of(&p, c) } else { 1 }).collect();
                g = cx.b.emit(Reshape { shape: with_ones }, &[g])?;
                g = cx.b.emit(Expand { shape: shapes[i].clone() }, &[g])?;
            }
            grads[i] = Some(g);
        }
        Ok(grads)
    }

    fn eval(&self, inputs: &[&Tensor]) -> Result<Vec<Tensor>, OpError> {
        let shapes: Vec<&[usize]> = inputs.iter().map(|t| t.shape.as_slice()).collect();
        let p = self.parse(&shapes)?;
        let tys: Vec<TensorType> = inputs.iter().map(|t| t.ty()).collect();
        let out_ty = self.infer(&tys.iter().collect::<Vec<_>>())?.remove(0);
        let out_strides = Tensor::strides_of(&out_ty.shape);
        let in_strides: Vec<Vec<usize>> = inputs.iter().map(|t| t.strides()).collect();
        // position of each operand / output dim in the letter list
        let pos = |labels: &[char]| -> Vec<usize> { labels.iter().map(|c| p.letters.iter().position(|l| l == c).unwrap_or(0)).collect() };
        let in_pos: Vec<Vec<usize>> = p.ins.iter().map(|l| pos(l)).collect();
        let out_pos = pos(&p.out);
        let mut out = vec![0.0; out_ty.numel()];
        for_each_index(&p.sizes, |idx| {
            let mut prod = 1.0;
            for (k, t) in inputs.iter().enumerate() {
                let off: usize = in_pos[k].iter().zip(&in_strides[k]).map(|(&l, &s)| idx[l] * s).sum();
                prod *= t.data[off];
            }
            let o: usize = out_pos.iter().zip(&out_strides).map(|(&l, &s)| idx[l] * s).sum();
            out[o] += prod;
        });
        Ok(vec![Tensor::new(out_ty.dtype, out_ty.shape, out)])
    }
}

/// Letters [`GraphBuilder::numpy_matmul`](crate::builder::GraphBuilder::numpy_matmul) gives
/// batch dims, in order (`m`, `k` and `n` name the matrix dims); also the most batch dims it takes.
pub const MATMUL_BATCH_LETTERS: &[u8] = b"abcdefghijlopqrstuvwxyz";

impl crate::builder::GraphBuilder {
    pub fn einsum(&mut self, equation: &str, operands: &[ValueId]) -> Result<ValueId, AnalyzerError> {
        self.node1(Einsum::new(equation), operands)
    }
    /// `x[..., k] @ w[k, n]`: a linear layer's matmul over any number of leading dims.
    pub fn matmul(&mut self, x: ValueId, w: ValueId) -> Result<ValueId, AnalyzerError> {
        let r = self.ty(x).rank();
        if r == 0 || r > 24 {
            return Err(AnalyzerError::Other(format!("matmul of a rank-{r} tensor")));
        }
        let lead: String = (b'a'..).take(r - 1).map(|c| c as char).collect();
        self.einsum(&format!("{lead}y,yz->{lead}z"), &[x, w])
    }
    /// `a @ b` with numpy matmul semantics (ONNX `MatMul`, `torch.matmul`): rank-1 operands are
    /// vectors, leading dims are batch dims that broadcast. A batch dim of size 1 facing a larger
    /// one is reshaped away on its side (einsum letters must agree in size), so `[b,1,s,k] @
    /// [h,k,n]` contracts without materialising the broadcast. One lowering for both importers.
    pub fn numpy_matmul(&mut self, a: ValueId, b: ValueId) -> Result<ValueId, AnalyzerError> {
        let sa = self.ty(a).shape.clone();
        let sb = self.ty(b).shape.clone();
        if sa.is_empty() || sb.is_empty() {
            return Err(AnalyzerError::Other(format!("matmul of a 0-d operand ({sa:?} x {sb:?})")));
        }
        let (ra, rb) = (sa.len(), sb.len());
        let a_batch = &sa[..ra.saturating_sub(2)];
        let b_batch = &sb[..rb.saturating_sub(2)];
        let nb = a_batch.len().max(b_batch.len());
        if nb > MATMUL_BATCH_LETTERS.len() {
            return Err(AnalyzerError::Other(format!("matmul with {nb} batch dims")));
        }
        let (mut al, mut bl, mut out) = (String::new(), String::new(), String::new());
        let (mut a_shape, mut b_shape) = (Vec::new(), Vec::new());
        for (i, &letter) in MATMUL_BATCH_LETTERS.iter().enumerate().take(nb) {
            // dims aligned from the right
            let da = (i + a_batch.len()).checked_sub(nb).map(|j| a_batch[j]);
            let db = (i + b_batch.len()).checked_sub(nb).map(|j| b_batch[j]);
            let size = match (da, db) {
                (Some(x), Some(y)) if x == y => x,
                (Some(1), Some(y)) => y,
                (Some(x), Some(1)) | (Some(x), None) => x,
                (None, Some(y)) => y,
                _ => return Err(AnalyzerError::Other(format!("batch dims of {sa:?} and {sb:?} do not broadcast"))),
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
        let a = if a_shape == sa { a } else { self.node1(crate::ops::Reshape { shape: a_shape }, &[a])? };
        let b = if b_shape == sb { b } else { self.node1(crate::ops::Reshape { shape: b_shape }, &[b])? };
        self.einsum(&format!("{al},{bl}->{out}"), &[a, b])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::DType;
    use crate::ops::gradcheck::{check, rand_tensor};

    #[test]
    fn infers_batched_matmul() {
        let a = TensorType::new(DType::F32, [2, 3, 4]);
        let b = TensorType::new(DType::F32, [4, 5]);
        let out = Einsum::new("bmk,kn->bmn").infer(&[&a, &b]).expect("infer");
        assert_eq!(out[0].shape, vec![2, 3, 5]);
        let dims = Einsum::new("bmk,kn->bmn").dims(&[&a, &b], &[&out[0]]);
        assert_eq!(dims.to_einsum(), "abc,cd->abd");
        assert_eq!(dims.axes[2].kind, AxisKind::Contracted);
        let cost = Einsum::new("bmk,kn->bmn").cost(&[&a, &b], &[&out[0]]);
        assert_eq!(cost.matmul_flops, 2.0 * 2.0 * 3.0 * 4.0 * 5.0);
    }

    #[test]
    fn rejects_bad_equations() {
        let a = TensorType::new(DType::F32, [2, 3]);
        for eq in ["ab,bc", "ab->abz", "aa->a", "abc->a", "aB->a"] {
            assert!(Einsum::new(eq).infer(&[&a]).is_err(), "{eq}");
        }
        let b = TensorType::new(DType::F32, [4, 5]);
        let e = Einsum::new("ab,bc->ac").infer(&[&a, &b]).expect_err("size clash");
        assert!(e.0.contains("size 3 and 4"), "{e}");
    }

    #[test]
    fn evaluates_matmul() {
        let a = Tensor::new(DType::F64, vec![2, 2], vec![1.0, 2.0, 3.0, 4.0]);
        let b = Tensor::new(DType::F64, vec![2, 1], vec![5.0, 6.0]);
        let y = Einsum::new("ik,kj->ij").eval(&[&a, &b]).expect("eval");
        assert_eq!(y[0].data, vec![17.0, 39.0]);
    }

    #[test]
    fn vjp_matches_finite_differences() {
        check(Einsum::new("bmk,kn->bmn"), &[rand_tensor(&[2, 3, 4], 1), rand_tensor(&[4, 5], 2)], 1e-6);
        check(Einsum::new("bhqd,bhkd->bhqk"), &[rand_tensor(&[1, 2, 3, 4], 3), rand_tensor(&[1, 2, 5, 4], 4)], 1e-6);
        check(Einsum::new("ij->j"), &[rand_tensor(&[3, 4], 5)], 1e-6);
    }
}
