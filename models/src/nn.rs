//! Layer helpers shared by the model builders: one place where modules (Linear, LayerNorm,
//! attention, ...) become IR ops.
//!
//! Every node is added through [`Net::op`], which names it by the scope path plus a leaf
//! (`h.0.attn.scores`), so dumps, plans and errors point at the module. Parameters are named by
//! the scope path plus PyTorch's leaf name (`h.0.attn.c_attn.weight`) and keep PyTorch's layout
//! (`nn.Linear` weight `[out, in]`, HF GPT-2 `Conv1D` weight `[in, out]`) so that a checkpoint's
//! tensors fit them as they are.

use crate::config::ModelConfig;
use autopar_analyzer::dtype::TensorType;
use autopar_analyzer::ops::binary::BinaryKind;
use autopar_analyzer::ops::cross_entropy::LossReduction;
use autopar_analyzer::ops::reduce::ReduceKind;
use autopar_analyzer::ops::unary::UnaryKind;
use autopar_analyzer::ops::{
    BatchNorm, Binary, Cast, CausalMask, Concat, Conv, Dropout, Einsum, Expand, Gather, LayerNorm,
    Reduce, Reshape, RmsNorm, Slice, Softmax, SoftmaxCrossEntropy, Transpose, Unary,
};
use autopar_analyzer::{AnalyzerError, DType, GraphBuilder, Op, ValueId};

pub(crate) type R<T = ValueId> = Result<T, AnalyzerError>;

/// HF's ignore index for language-model labels.
pub(crate) const IGNORE_INDEX: i64 = -100;

/// A graph under construction plus the model's config.
pub(crate) struct Net<'c> {
    pub b: GraphBuilder,
    pub cfg: &'c ModelConfig,
    dropouts: u64,
}

/// Lower-case letters for `n` leading dims of an einsum operand, avoiding `skip`.
fn lead(n: usize, skip: &str) -> String {
    ('a'..='z').filter(|c| !skip.contains(*c)).take(n).collect()
}

impl<'c> Net<'c> {
    pub fn new(cfg: &'c ModelConfig) -> Self {
        Net {
            b: GraphBuilder::new(),
            cfg,
            dropouts: 0,
        }
    }

    pub fn dtype(&self) -> DType {
        self.cfg.dtype
    }
    pub fn shape(&self, v: ValueId) -> Vec<usize> {
        self.b.ty(v).shape.clone()
    }

    /// Runs `f` inside the name scope `name`; the scope is left even when `f` fails.
    pub fn scope<T>(&mut self, name: impl Into<String>, f: impl FnOnce(&mut Self) -> R<T>) -> R<T> {
        self.b.push_scope(name);
        let r = f(self);
        self.b.pop_scope();
        r
    }

    pub fn input(&mut self, name: &str, dtype: DType, shape: &[usize]) -> ValueId {
        self.b.input(name, TensorType::new(dtype, shape.to_vec()))
    }
    /// A trainable parameter `<scope>.<leaf>` of the model dtype.
    pub fn param(&mut self, leaf: &str, shape: &[usize]) -> ValueId {
        let ty = TensorType::new(self.dtype(), shape.to_vec());
        self.b.param(leaf, ty)
    }
    pub fn buffer(&mut self, leaf: &str, shape: &[usize]) -> ValueId {
        let ty = TensorType::new(self.dtype(), shape.to_vec());
        self.b.buffer(leaf, ty)
    }

    /// Adds a node named `<scope>.<leaf>` (`<scope>` when `leaf` is empty); first output.
    pub fn op(&mut self, leaf: &str, op: impl Into<Op>, inputs: &[ValueId]) -> R {
        let name = self.b.path(leaf);
        self.b.name_next(name);
        self.b.node1(op, inputs)
    }
    // ---- elementwise -------------------------------------------------------------------

    pub fn binary(&mut self, leaf: &str, kind: BinaryKind, a: ValueId, b: ValueId) -> R {
        self.op(leaf, Binary { kind }, &[a, b])
    }
    pub fn add(&mut self, leaf: &str, a: ValueId, b: ValueId) -> R {
        self.binary(leaf, BinaryKind::Add, a, b)
    }
    pub fn mul(&mut self, leaf: &str, a: ValueId, b: ValueId) -> R {
        self.binary(leaf, BinaryKind::Mul, a, b)
    }
    /// `x * s` with a scalar constant of x's dtype.
    pub fn scale(&mut self, leaf: &str, x: ValueId, s: f64) -> R {
        let c = self.b.scalar(self.b.ty(x).dtype, s);
        self.mul(leaf, x, c)
    }
    pub fn unary(&mut self, leaf: &str, kind: UnaryKind, x: ValueId) -> R {
        self.op(leaf, Unary { kind }, &[x])
    }
    pub fn cast(&mut self, leaf: &str, x: ValueId, to: DType) -> R {
        if self.b.ty(x).dtype == to {
            return Ok(x);
        }
        self.op(leaf, Cast { to }, &[x])
    }

    // ---- data movement -----------------------------------------------------------------

    pub fn reshape(&mut self, leaf: &str, x: ValueId, shape: &[usize]) -> R {
        self.op(
            leaf,
            Reshape {
                shape: shape.to_vec(),
            },
            &[x],
        )
    }
    pub fn transpose(&mut self, leaf: &str, x: ValueId, perm: &[usize]) -> R {
        self.op(
            leaf,
            Transpose {
                perm: perm.to_vec(),
            },
            &[x],
        )
    }
    pub fn expand(&mut self, leaf: &str, x: ValueId, shape: &[usize]) -> R {
        self.op(
            leaf,
            Expand {
                shape: shape.to_vec(),
            },
            &[x],
        )
    }
    /// `x[.., start..end, ..]` along `axis`.
    pub fn slice(&mut self, leaf: &str, x: ValueId, axis: usize, start: usize, end: usize) -> R {
        self.op(
            leaf,
            Slice {
                axes: vec![axis],
                starts: vec![start],
                ends: vec![end],
                steps: vec![1],
            },
            &[x],
        )
    }
    pub fn concat(&mut self, leaf: &str, xs: &[ValueId], axis: usize) -> R {
        self.op(leaf, Concat { axis }, xs)
    }
    /// Embedding lookup: rows of `table` at `ids` (Gather on axis 0).
    pub fn gather(&mut self, leaf: &str, table: ValueId, ids: ValueId) -> R {
        self.op(leaf, Gather { axis: 0 }, &[table, ids])
    }
    pub fn reduce(&mut self, leaf: &str, kind: ReduceKind, x: ValueId, axes: &[usize]) -> R {
        self.op(
            leaf,
            Reduce {
                kind,
                axes: axes.to_vec(),
                keepdims: false,
            },
            &[x],
        )
    }

    // ---- layers ------------------------------------------------------------------------

    /// `x @ w^T (+ b)` with a PyTorch `[out, in]` weight, over any leading dims of x. The matmul
    /// node is named `<scope>`, the bias add `<scope>.bias_add`.
    pub fn affine(&mut self, x: ValueId, w: ValueId, bias: Option<ValueId>) -> R {
        let r = self.b.ty(x).rank();
        let l = lead(r.saturating_sub(1), "io");
        let y = self.op("", Einsum::new(format!("{l}i,oi->{l}o")), &[x, w])?;
        match bias {
            Some(b) => self.add("bias_add", y, b),
            None => Ok(y),
        }
    }

    /// `nn.Linear(in, out, bias)` in scope `name`: params `weight [out, in]`, `bias [out]`.
    pub fn linear(&mut self, name: &str, x: ValueId, out: usize, bias: bool) -> R {
        let inp = self.shape(x).last().copied().unwrap_or(1);
        self.scope(name, |n| {
            let w = n.param("weight", &[out, inp]);
            let b = bias.then(|| n.param("bias", &[out]));
            n.affine(x, w, b)
        })
    }

    /// HF GPT-2 `Conv1D(out, in)` in scope `name`: `x @ weight + bias`, weight `[in, out]`.
    pub fn conv1d(&mut self, name: &str, x: ValueId, out: usize) -> R {
        let inp = self.shape(x).last().copied().unwrap_or(1);
        self.scope(name, |n| {
            let w = n.param("weight", &[inp, out]);
            let b = n.param("bias", &[out]);
            let r = n.b.ty(x).rank();
            let l = lead(r.saturating_sub(1), "io");
            let y = n.op("", Einsum::new(format!("{l}i,io->{l}o")), &[x, w])?;
            n.add("bias_add", y, b)
        })
    }

    /// `nn.LayerNorm(last dim)` in scope `name`: params `weight`, `bias`.
    pub fn layer_norm(&mut self, name: &str, x: ValueId, eps: f64) -> R {
        let shape = self.shape(x);
        let axis = shape.len().saturating_sub(1);
        let h = shape.last().copied().unwrap_or(1);
        self.scope(name, |n| {
            let w = n.param("weight", &[h]);
            let b = n.param("bias", &[h]);
            n.op("", LayerNorm { axis, epsilon: eps }, &[x, w, b])
        })
    }

    /// LLaMA `RMSNorm(last dim)` in scope `name`: param `weight`.
    pub fn rms_norm(&mut self, name: &str, x: ValueId, eps: f64) -> R {
        let shape = self.shape(x);
        let axis = shape.len().saturating_sub(1);
        let h = shape.last().copied().unwrap_or(1);
        self.scope(name, |n| {
            let w = n.param("weight", &[h]);
            n.op("", RmsNorm { axis, epsilon: eps }, &[x, w])
        })
    }

    /// 2-d convolution in scope `name`: `weight [cout, cin, k, k]`, optional `bias [cout]`.
    #[allow(clippy::too_many_arguments)]
    pub fn conv2d(
        &mut self,
        name: &str,
        x: ValueId,
        cout: usize,
        k: usize,
        stride: usize,
        pad: usize,
        bias: bool,
    ) -> R {
        let cin = self.shape(x).get(1).copied().unwrap_or(1);
        self.scope(name, |n| {
            let w = n.param("weight", &[cout, cin, k, k]);
            let mut ins = vec![x, w];
            if bias {
                ins.push(n.param("bias", &[cout]));
            }
            n.op(
                "",
                Conv {
                    strides: vec![stride, stride],
                    pads: vec![[pad, pad], [pad, pad]],
                    dilations: vec![1, 1],
                    groups: 1,
                },
                &ins,
            )
        })
    }

    /// `nn.BatchNorm2d(C)` in scope `name`: params `weight`, `bias`; buffers `running_mean`,
    /// `running_var`. Training mode normalises with batch statistics (PyTorch momentum 0.1 is
    /// ONNX momentum 0.9); the updated running statistics are outputs 1 and 2 of the node.
    pub fn batch_norm(&mut self, name: &str, x: ValueId) -> R {
        let c = self.shape(x).get(1).copied().unwrap_or(1);
        let eps = self.cfg.norm_eps;
        let training = self.cfg.training;
        self.scope(name, |n| {
            let w = n.param("weight", &[c]);
            let b = n.param("bias", &[c]);
            let rm = n.buffer("running_mean", &[c]);
            let rv = n.buffer("running_var", &[c]);
            n.op(
                "",
                BatchNorm {
                    epsilon: eps,
                    momentum: 0.9,
                    training,
                },
                &[x, w, b, rm, rv],
            )
        })
    }

    /// Dropout with probability `p` when training and `p > 0`; otherwise `x` itself. Each site
    /// gets its own mask seed, derived from the config's seed and the site's index.
    pub fn dropout(&mut self, leaf: &str, x: ValueId, p: f64) -> R {
        if !self.cfg.training || p <= 0.0 {
            return Ok(x);
        }
        let seed = self
            .cfg
            .seed
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .wrapping_add(self.dropouts);
        self.dropouts += 1;
        self.op(
            leaf,
            Dropout {
                ratio: p,
                training: true,
                seed,
            },
            &[x],
        )
    }

    /// The additive causal mask `[s, s]` (0 on and below the diagonal, lowest value above).
    pub fn causal_mask(&mut self, leaf: &str, s: usize) -> R {
        let dtype = self.dtype();
        self.op(
            leaf,
            CausalMask {
                rows: s,
                cols: s,
                dtype,
            },
            &[],
        )
    }

    /// Scaled dot-product attention over `q [B,S,H,D]`, `k, v [B,S,H,D]` (as many heads as q):
    /// `softmax(q k^T / sqrt(D) + mask) v`, returned as `[B,S,H,D]`. Nodes: `scores`, `scale`,
    /// `mask`, `softmax`, `attn_dropout`, `context` in the current scope. The einsums keep the
    /// `[B,S,H,D]` layout, so no transposes are needed around them.
    pub fn attention(&mut self, q: ValueId, k: ValueId, v: ValueId, mask: Option<ValueId>) -> R {
        let d = self.shape(q).last().copied().unwrap_or(1);
        let s = self.op("scores", Einsum::new("bqhd,bkhd->bhqk"), &[q, k])?;
        let s = self.scale("scale", s, 1.0 / (d as f64).sqrt())?;
        let s = match mask {
            Some(m) => self.add("mask", s, m)?,
            None => s,
        };
        let p = self.op(
            "softmax",
            Softmax {
                axis: 3,
                log: false,
            },
            &[s],
        )?;
        let p = self.dropout("attn_dropout", p, self.cfg.dropout)?;
        self.op("context", Einsum::new("bhqk,bkhd->bqhd"), &[p, v])
    }

    /// Mean cross entropy of `logits [.., C]` against integer `labels [..]`: both are
    /// flattened to `[N, C]` / `[N]`. 16-bit logits are cast to f32 first, as mixed-precision
    /// training computes the loss.
    pub fn cross_entropy(
        &mut self,
        leaf: &str,
        logits: ValueId,
        labels: ValueId,
        ignore_index: Option<i64>,
    ) -> R {
        let shape = self.shape(logits);
        let c = shape.last().copied().unwrap_or(1);
        let n: usize = shape[..shape.len().saturating_sub(1)].iter().product();
        let mut x = logits;
        if shape.len() != 2 {
            x = self.reshape("logits_2d", x, &[n, c])?;
        }
        if matches!(self.b.ty(x).dtype, DType::F16 | DType::BF16) {
            x = self.cast("logits_f32", x, DType::F32)?;
        }
        let mut y = labels;
        if self.b.ty(y).rank() != 1 {
            y = self.reshape("labels_1d", y, &[n])?;
        }
        self.op(
            leaf,
            SoftmaxCrossEntropy {
                reduction: LossReduction::Mean,
                ignore_index,
            },
            &[x, y],
        )
    }
}
