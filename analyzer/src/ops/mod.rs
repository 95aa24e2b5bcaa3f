//! The op set of the IR: one file per op, one line per op in [`op_list!`].
//!
//! Each op is an attribute struct implementing [`OpSpec`]:
//! - `infer`: output dtypes and shapes from input types (errors say why, never panic);
//! - `dims`: how its axes flow, einsum style ([`DimMap`]): the solver derives every sharding
//!   strategy of the op from this alone;
//! - `cost`: forward FLOPs and bytes read / written (backward cost is the cost of the nodes its
//!   `vjp` emits, so there is one source of truth);
//! - `vjp`: its gradient, emitted as IR ops through a [`GraphBuilder`];
//! - `eval`: reference semantics on [`Tensor`]s (f64), used for constant folding at import and
//!   for finite-difference checks of `vjp`.
//!
//! Adding an op: write `ops/<op>.rs` with the struct, its `OpSpec` impl, an
//! `impl GraphBuilder` helper and tests, then add one line to [`op_list!`]; the compiler then
//! points at the runtime's one lowering arm.

use crate::builder::GraphBuilder;
use crate::dtype::TensorType;
use crate::error::OpError;
use crate::graph::ValueId;
use crate::tensor::Tensor;
use serde::{Deserialize, Serialize};

#[cfg(test)]
pub mod gradcheck;

/// Index of an axis in a [`DimMap`].
pub type AxisId = usize;

/// What splitting an axis across devices means for the op.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum AxisKind {
    /// Present in outputs and inputs: splitting it splits every tensor that carries it, with no
    /// communication (batch, sequence, heads, a matmul's free dims).
    Parallel,
    /// Summed away (an einsum's contracted index, a ReduceSum axis): when split, each device
    /// holds a partial sum of every output, to be all-reduced or reduce-scattered.
    Contracted,
    /// Must stay whole on each device (softmax's axis, a normalised axis, the inner dim of a
    /// reshape merge, a gather's table axis).
    Whole,
    /// Splittable like `Parallel`, but the op reduces small statistics over it (training-mode
    /// BatchNorm's batch and spatial axes): when split, the devices all-reduce the statistics,
    /// shaped like the op's rank-1 operands, forward and backward (SyncBatchNorm), so the
    /// result equals the single-device one.
    Statistics,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Axis {
    pub size: usize,
    pub kind: AxisKind,
}

/// How the axes of an op flow between its inputs and outputs (tract's axes mapping, einsum form).
///
/// `inputs[i][d]` / `outputs[o][d]` name the axis dim `d` of that tensor carries; `None` means
/// the dim is tied to no axis (a broadcast dim of size 1, an index operand's dims, a shape the
/// op rebuilds) and stays replicated whenever the op runs sharded.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DimMap {
    pub axes: Vec<Axis>,
    pub inputs: Vec<Vec<Option<AxisId>>>,
    pub outputs: Vec<Vec<Option<AxisId>>>,
}

impl DimMap {
    /// A map where every tensor dim is its own whole axis... rather: nothing may be split.
    pub fn opaque(inputs: &[&TensorType], outputs: &[&TensorType]) -> DimMap {
        DimMap {
            axes: vec![],
            inputs: inputs.iter().map(|t| vec![None; t.rank()]).collect(),
            outputs: outputs.iter().map(|t| vec![None; t.rank()]).collect(),
        }
    }

    /// Elementwise map over a broadcast: one parallel axis per output dim; an input dim of size 1
    /// under a larger output dim is tied to no axis.
    pub fn elementwise(inputs: &[&TensorType], outputs: &[&TensorType]) -> DimMap {
        let out_shape = outputs.first().map(|t| t.shape.clone()).unwrap_or_default();
        let axes = out_shape
            .iter()
            .map(|&size| Axis {
                size,
                kind: AxisKind::Parallel,
            })
            .collect();
        let n = out_shape.len();
        let map_tensor = |t: &TensorType| -> Vec<Option<AxisId>> {
            let off = n.saturating_sub(t.rank());
            t.shape
                .iter()
                .enumerate()
                .map(|(d, &s)| {
                    if s == out_shape.get(off + d).copied().unwrap_or(0) {
                        Some(off + d)
                    } else {
                        None
                    }
                })
                .collect()
        };
        DimMap {
            axes,
            inputs: inputs.iter().map(|t| map_tensor(t)).collect(),
            outputs: outputs.iter().map(|t| map_tensor(t)).collect(),
        }
    }

    /// The map of a one-input op that rewrites some dims in place (slice, pad, tile): a dim
    /// whose size it keeps is one parallel axis; a dim it resizes is a whole axis on each side.
    pub fn same_size_dims_parallel(x: &TensorType, y: &TensorType) -> DimMap {
        let mut axes = vec![];
        let (mut ins, mut outs) = (vec![], vec![]);
        for (&a, &b) in x.shape.iter().zip(&y.shape) {
            if a == b {
                axes.push(Axis {
                    size: a,
                    kind: AxisKind::Parallel,
                });
                ins.push(Some(axes.len() - 1));
                outs.push(Some(axes.len() - 1));
            } else {
                for (size, side) in [(a, &mut ins), (b, &mut outs)] {
                    axes.push(Axis {
                        size,
                        kind: AxisKind::Whole,
                    });
                    side.push(Some(axes.len() - 1));
                }
            }
        }
        DimMap {
            axes,
            inputs: vec![ins],
            outputs: vec![outs],
        }
    }

    /// Builds a map from an einsum-like spec: `"bmk,kn->bmn"` with an axis kind per letter
    /// (letters missing from `kinds` are `Parallel` if they reach an output, else `Contracted`);
    /// `_` marks a dim tied to no axis. Panics only on a malformed literal spec (programmer error).
    pub fn from_spec(spec: &str, shapes_in: &[&TensorType], whole: &str) -> DimMap {
        let (lhs, rhs) = spec.split_once("->").expect("dim spec has ->");
        let ins: Vec<&str> = if lhs.is_empty() {
            vec![]
        } else {
            lhs.split(',').collect()
        };
        let outs: Vec<&str> = if rhs.is_empty() {
            vec![]
        } else {
            rhs.split(',').collect()
        };
        let mut letters: Vec<char> = vec![];
        let mut sizes: Vec<usize> = vec![];
        for (t, s) in ins.iter().zip(shapes_in) {
            for (c, &n) in t.chars().zip(&s.shape) {
                if c != '_' && !letters.contains(&c) {
                    letters.push(c);
                    sizes.push(n);
                }
            }
        }
        let in_out = outs.concat();
        let axes = letters
            .iter()
            .zip(&sizes)
            .map(|(c, &size)| {
                let kind = if whole.contains(*c) {
                    AxisKind::Whole
                } else if in_out.contains(*c) {
                    AxisKind::Parallel
                } else {
                    AxisKind::Contracted
                };
                Axis { size, kind }
            })
            .collect();
        let map = |t: &str| {
            t.chars()
                .map(|c| letters.iter().position(|&l| l == c))
                .collect()
        };
        DimMap {
            axes,
            inputs: ins.iter().map(|t| map(t)).collect(),
            outputs: outs.iter().map(|t| map(t)).collect(),
        }
    }

    /// The map in einsum notation: parallel axes lower-case, contracted ones too (they are
    /// missing from the outputs), statistics axes too (check `axes[i].kind`), whole axes
    /// upper-case, untied dims `_`.
    pub fn to_einsum(&self) -> String {
        let letter = |a: Option<AxisId>| match a {
            None => '_',
            Some(a) => {
                let c = (b'a' + (a % 26) as u8) as char;
                if self.axes[a].kind == AxisKind::Whole {
                    c.to_ascii_uppercase()
                } else {
                    c
                }
            }
        };
        let side = |ts: &Vec<Vec<Option<AxisId>>>| {
            ts.iter()
                .map(|t| t.iter().map(|&a| letter(a)).collect::<String>())
                .collect::<Vec<_>>()
                .join(",")
        };
        format!("{}->{}", side(&self.inputs), side(&self.outputs))
    }
}

/// Forward cost of one op execution on one device.
#[derive(Copy, Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Cost {
    /// All floating-point operations (a fused multiply-add counts 2).
    pub flops: f64,
    /// The part of `flops` done by matmul / convolution units (tensor cores).
    pub matmul_flops: f64,
    pub bytes_read: f64,
    pub bytes_written: f64,
}

impl Cost {
    /// Bytes of reading every input and writing every output, with `flops` of vector work.
    pub fn memory_bound(inputs: &[&TensorType], outputs: &[&TensorType], flops: f64) -> Cost {
        Cost {
            flops,
            matmul_flops: 0.0,
            bytes_read: inputs.iter().map(|t| t.size_bytes() as f64).sum(),
            bytes_written: outputs.iter().map(|t| t.size_bytes() as f64).sum(),
        }
    }
    /// `flops_per_element` vector flops per output element plus the bytes of every operand.
    pub fn elementwise(
        inputs: &[&TensorType],
        outputs: &[&TensorType],
        flops_per_element: f64,
    ) -> Cost {
        let n: usize = outputs.iter().map(|t| t.numel()).sum();
        Self::memory_bound(inputs, outputs, flops_per_element * n as f64)
    }
    /// Pure data movement (reshape views count as moves too: the runtime may copy).
    pub fn data_movement(inputs: &[&TensorType], outputs: &[&TensorType]) -> Cost {
        Self::memory_bound(inputs, outputs, 0.0)
    }
}

impl std::ops::Add for Cost {
    type Output = Cost;
    fn add(self, o: Cost) -> Cost {
        Cost {
            flops: self.flops + o.flops,
            matmul_flops: self.matmul_flops + o.matmul_flops,
            bytes_read: self.bytes_read + o.bytes_read,
            bytes_written: self.bytes_written + o.bytes_written,
        }
    }
}
impl std::ops::AddAssign for Cost {
    fn add_assign(&mut self, o: Cost) {
        *self = *self + o;
    }
}

/// What an op's `vjp` sees: its node's values and the gradients flowing into its outputs, and a
/// builder positioned in the backward phase to emit the gradient ops.
pub struct VjpCtx<'a> {
    pub b: &'a mut GraphBuilder,
    pub inputs: &'a [ValueId],
    pub outputs: &'a [ValueId],
    /// Gradient of the loss w.r.t. each output; `None` where no gradient flows.
    pub grads: &'a [Option<ValueId>],
    /// Whether each input wants a gradient (skip the work for those that do not).
    pub needs: &'a [bool],
}

impl VjpCtx<'_> {
    pub fn ty(&self, v: ValueId) -> TensorType {
        self.b.ty(v).clone()
    }
    pub fn input_ty(&self, i: usize) -> TensorType {
        self.ty(self.inputs[i])
    }
    /// The gradient of output `o`, materialised as zeros when none flows.
    pub fn grad_or_zeros(&mut self, o: usize) -> Result<ValueId, OpError> {
        match self.grads[o] {
            Some(g) => Ok(g),
            None => {
                let ty = self.ty(self.outputs[o]);
                self.b.zeros(&ty)
            }
        }
    }
}

/// The semantics of one op (see the module doc).
pub trait OpSpec {
    fn infer(&self, inputs: &[&TensorType]) -> Result<Vec<TensorType>, OpError>;
    fn dims(&self, inputs: &[&TensorType], outputs: &[&TensorType]) -> DimMap;
    fn cost(&self, inputs: &[&TensorType], outputs: &[&TensorType]) -> Cost;
    /// Whether a gradient can flow into input `i` (false for indices, masks, labels).
    fn differentiable(&self, _i: usize) -> bool {
        true
    }
    fn vjp(&self, cx: &mut VjpCtx<'_>) -> Result<Vec<Option<ValueId>>, OpError>;
    fn eval(&self, inputs: &[&Tensor]) -> Result<Vec<Tensor>, OpError>;
}

/// The one list of ops: `Variant => module::Struct, "text-name"`.
macro_rules! op_list {
    ($($variant:ident => $module:ident :: $ty:ident, $name:literal;)*) => {
        $(pub mod $module;)*
        $(pub use $module::$ty;)*

        /// An IR op with its attributes.
        #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
        #[serde(tag = "op")]
        pub enum Op {
            $(#[serde(rename = $name)] $variant($ty),)*
        }

        impl Op {
            /// Name in the text IR and in reports.
            pub fn name(&self) -> &'static str {
                match self { $(Op::$variant(_) => $name,)* }
            }
            pub fn spec(&self) -> &dyn OpSpec {
                match self { $(Op::$variant(o) => o,)* }
            }
            /// Every op name, in list order.
            pub const NAMES: &'static [&'static str] = &[$($name,)*];
        }
        $(impl From<$ty> for Op { fn from(o: $ty) -> Op { Op::$variant(o) } })*
    };
}

op_list! {
    Einsum => einsum::Einsum, "einsum";
    Unary => unary::Unary, "unary";
    Binary => binary::Binary, "binary";
    Where => select::Where, "where";
    Cast => cast::Cast, "cast";
    Reduce => reduce::Reduce, "reduce";
    Softmax => softmax::Softmax, "softmax";
    LayerNorm => layer_norm::LayerNorm, "layer_norm";
    LayerNormGrad => layer_norm_grad::LayerNormGrad, "layer_norm_grad";
    RmsNorm => rms_norm::RmsNorm, "rms_norm";
    RmsNormGrad => rms_norm_grad::RmsNormGrad, "rms_norm_grad";
    Reshape => reshape::Reshape, "reshape";
    Transpose => transpose::Transpose, "transpose";
    Slice => slice::Slice, "slice";
    Concat => concat::Concat, "concat";
    Expand => expand::Expand, "expand";
    Pad => pad::Pad, "pad";
    Tile => tile::Tile, "tile";
    Gather => gather::Gather, "gather";
    GatherGrad => gather_grad::GatherGrad, "gather_grad";
    GatherNd => gather_nd::GatherNd, "gather_nd";
    ScatterElements => scatter_elements::ScatterElements, "scatter_elements";
    ScatterNd => scatter_nd::ScatterNd, "scatter_nd";
    OneHot => one_hot::OneHot, "one_hot";
    TopK => top_k::TopK, "top_k";
    Conv => conv::Conv, "conv";
    ConvGrad => conv_grad::ConvGrad, "conv_grad";
    Pool => pool::Pool, "pool";
    PoolGrad => pool_grad::PoolGrad, "pool_grad";
    BatchNorm => batch_norm::BatchNorm, "batch_norm";
    BatchNormGrad => batch_norm_grad::BatchNormGrad, "batch_norm_grad";
    Dropout => dropout::Dropout, "dropout";
    SoftmaxCrossEntropy => cross_entropy::SoftmaxCrossEntropy, "softmax_cross_entropy";
    SoftmaxCrossEntropyGrad => cross_entropy_grad::SoftmaxCrossEntropyGrad, "softmax_cross_entropy_grad";
    CausalMask => causal_mask::CausalMask, "causal_mask";
    Attention => attention::Attention, "attention";
    AttentionGrad => attention_grad::AttentionGrad, "attention_grad";
}
