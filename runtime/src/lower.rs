//! The one lowering of IR ops to libtorch (tch) calls.
//!
//! Why one exhaustive `match`: every op of [`op_list!`](autopar_analyzer::ops) must run on the
//! devices, and its meaning is fixed by the analyzer's f64 reference `eval`. Keeping the whole
//! mapping in one function makes the compiler point here when an op is added, and the tests
//! check every op against its `eval` (same outputs, same order, same dtypes).
//!
//! Why a [`LowerCtx`]: the generator runs each node on this rank's *shards* of its inputs, so
//! a few ops need to know more than their local tensors:
//! - target-shape attributes (`Reshape`, `Expand`, `GatherGrad`, `ConvGrad`) hold global shapes;
//!   the lowering produces the local shapes in [`LowerCtx::outputs`];
//! - reductions whose reduced axis is split produce *partial sums* that the generator
//!   all-reduces later, so a mean divides by the *global* count (`Reduce` mean from
//!   [`LowerCtx::global_inputs`]; cross entropy by the number of non-ignored labels summed over
//!   the group through [`LowerCtx::group_sum`]);
//! - training-mode `BatchNorm` and `BatchNormGrad` all-reduce their per-channel sums through
//!   `group_sum` (SyncBatchNorm), so every rank normalises with the full-batch statistics;
//! - `Dropout` draws its keep mask from *global* element indices
//!   ([`dropout_keep`](autopar_analyzer::ops::dropout::dropout_keep)), so a sharded run drops
//!   exactly the elements a single-device run drops. The hash runs on the tensor's device with
//!   wrapping int64 arithmetic, so no mask crosses the host boundary;
//! - `Attention` and `AttentionGrad` on a block of the query sequence offset the causal diagonal
//!   by the block's global start (see the attention section).
//!
//! Errors never panic: every libtorch call is a fallible `f_*` call, and inputs libtorch would
//! not reject but `eval` does (out-of-range indices and labels, integer division by zero) are
//! checked first, because on CUDA they would be a device-side assert or silent garbage.
//! Outputs may alias inputs (`Identity`, `Reshape`, `Transpose`, `Expand` return views), as in
//! PyTorch: callers must not update tensors in place that a view may share.

use autopar_analyzer::ops::binary::BinaryKind;
use autopar_analyzer::ops::causal_mask::lowest_finite;
use autopar_analyzer::ops::conv_grad::ConvGradWrt;
use autopar_analyzer::ops::cross_entropy::LossReduction;
use autopar_analyzer::ops::pool::PoolKind;
use autopar_analyzer::ops::reduce::ReduceKind;
use autopar_analyzer::ops::scatter_elements::ScatterReduction;
use autopar_analyzer::ops::unary::UnaryKind;
use autopar_analyzer::ops::{
    Attention, AttentionGrad, BatchNorm, Conv, ConvGrad, Dropout, GatherNd, LayerNorm,
    LayerNormGrad, OpSpec, Pool, Reduce, RmsNorm, RmsNormGrad, Slice, SoftmaxCrossEntropy,
    SoftmaxCrossEntropyGrad,
};
use autopar_analyzer::{DType, Op, OpError, TensorType};
use tch::{Device, Kind, TchError, Tensor};

/// Why a node could not run. Every variant names the op.
#[derive(Debug, thiserror::Error)]
pub enum LowerError {
    /// The op's inputs, attributes or context do not fit (the reason says which).
    #[error("{op}: {reason}")]
    Op { op: &'static str, reason: String },
    /// libtorch refused a call (shape, dtype or device mismatch, allocation failure, ...).
    #[error("{op}: libtorch failed: {source}")]
    Torch {
        op: &'static str,
        #[source]
        source: TchError,
    },
    /// A conversion between reference tensors and libtorch tensors failed.
    #[error("tensor conversion: {0}")]
    Convert(String),
    /// The context's `group_sum` failed (a collective error, reported by the caller's closure).
    #[error("group sum: {0}")]
    GroupSum(String),
}

/// What a node needs beyond its local input tensors when it runs on one rank of a sharded
/// program (see the module doc).
pub struct LowerCtx<'a> {
    /// Local (this rank's) output types, which reshape/expand-like ops must produce.
    pub outputs: &'a [TensorType],
    /// Global (unsharded) input types of the node in the training graph.
    pub global_inputs: &'a [TensorType],
    /// Global (unsharded) output types of the node in the training graph.
    pub global_outputs: &'a [TensorType],
    /// Per input, per dim: global index where this rank's block of that input starts.
    pub input_offsets: &'a [Vec<usize>],
    /// Sums a tensor over the ranks across which this node's reductions are split (BatchNorm's
    /// statistics, cross-entropy's valid-label count); the identity on one device. It receives
    /// small f32 tensors (f64 when the op computes in f64) and must return the same shape and
    /// kind; every rank of the group calls it the same number of times in the same order.
    pub group_sum: &'a mut dyn FnMut(Tensor) -> Result<Tensor, LowerError>,
    /// Mixed into dropout seeds so that each training step draws new masks (0: the analyzer's
    /// masks).
    pub rng_step: u64,
    /// Where ops without inputs (`CausalMask`) create their output.
    pub device: Device,
}

/// The `group_sum` of a single device: the identity.
pub fn identity_sum(t: Tensor) -> Result<Tensor, LowerError> {
    Ok(t)
}

/// Owns what a single-device [`LowerCtx`] borrows: global types equal local types, offsets are
/// zero and `group_sum` is the identity.
pub struct SingleDevice {
    inputs: Vec<TensorType>,
    outputs: Vec<TensorType>,
    offsets: Vec<Vec<usize>>,
    sum: fn(Tensor) -> Result<Tensor, LowerError>,
    /// Mixed into dropout seeds (0 by default: the analyzer's masks).
    pub rng_step: u64,
    /// Device of outputs created without inputs.
    pub device: Device,
}

impl SingleDevice {
    /// The single-device context of `op` on `inputs` (output types inferred by the op).
    pub fn new(op: &Op, inputs: &[&Tensor], device: Device) -> Result<Self, LowerError> {
        let types = inputs
            .iter()
            .map(|t| tensor_type(t))
            .collect::<Result<Vec<_>, _>>()?;
        Self::from_types(op, types, device)
    }

    /// The single-device context of `op` on inputs of `types`.
    pub fn from_types(op: &Op, types: Vec<TensorType>, device: Device) -> Result<Self, LowerError> {
        let refs: Vec<&TensorType> = types.iter().collect();
        let outputs = op.spec().infer(&refs).map_err(|e| LowerError::Op {
            op: op.name(),
            reason: e.0,
        })?;
        let offsets = types.iter().map(|t| vec![0; t.rank()]).collect();
        Ok(SingleDevice {
            inputs: types,
            outputs,
            offsets,
            sum: identity_sum,
            rng_step: 0,
            device,
        })
    }

    /// The context to pass to [`lower`].
    pub fn ctx(&mut self) -> LowerCtx<'_> {
        LowerCtx {
            outputs: &self.outputs,
            global_inputs: &self.inputs,
            global_outputs: &self.outputs,
            input_offsets: &self.offsets,
            group_sum: &mut self.sum,
            rng_step: self.rng_step,
            device: self.device,
        }
    }
}

/// Runs `op` on whole (unsharded) tensors on one device.
pub fn lower_single(op: &Op, inputs: &[&Tensor]) -> Result<Vec<Tensor>, LowerError> {
    let device = inputs.first().map_or(Device::Cpu, |t| t.device());
    let mut sd = SingleDevice::new(op, inputs, device)?;
    lower(op, inputs, &mut sd.ctx())
}

/// The libtorch kind of an analyzer dtype.
pub fn kind_of(dtype: DType) -> Kind {
    match dtype {
        DType::F64 => Kind::Double,
        DType::F32 => Kind::Float,
        DType::F16 => Kind::Half,
        DType::BF16 => Kind::BFloat16,
        DType::I64 => Kind::Int64,
        DType::I32 => Kind::Int,
        DType::I16 => Kind::Int16,
        DType::I8 => Kind::Int8,
        DType::U8 => Kind::Uint8,
        DType::Bool => Kind::Bool,
    }
}

/// The analyzer dtype of a libtorch kind, `None` for kinds the IR has no dtype for.
pub fn dtype_of(kind: Kind) -> Option<DType> {
    Some(match kind {
        Kind::Double => DType::F64,
        Kind::Float => DType::F32,
        Kind::Half => DType::F16,
        Kind::BFloat16 => DType::BF16,
        Kind::Int64 => DType::I64,
        Kind::Int => DType::I32,
        Kind::Int16 => DType::I16,
        Kind::Int8 => DType::I8,
        Kind::Uint8 => DType::U8,
        Kind::Bool => DType::Bool,
        _ => return None,
    })
}

/// The IR type (dtype and shape) of a libtorch tensor.
pub fn tensor_type(t: &Tensor) -> Result<TensorType, LowerError> {
    let kind = t.f_kind().map_err(|e| LowerError::Convert(e.to_string()))?;
    let dtype =
        dtype_of(kind).ok_or_else(|| LowerError::Convert(format!("no IR dtype for {kind:?}")))?;
    let shape = t
        .size()
        .iter()
        .map(|&d| d.max(0) as usize)
        .collect::<Vec<_>>();
    Ok(TensorType::new(dtype, shape))
}

/// A reference tensor as a libtorch tensor of the same dtype and shape on `device`.
pub fn to_tch(t: &autopar_analyzer::Tensor, device: Device) -> Result<Tensor, LowerError> {
    let conv = |e: TchError| LowerError::Convert(e.to_string());
    let n: usize = t.shape.iter().product();
    if n != t.data.len() {
        return Err(LowerError::Convert(format!(
            "tensor of shape {:?} holds {} values",
            t.shape,
            t.data.len()
        )));
    }
    let flat = match t.dtype {
        DType::F64 => Tensor::f_from_slice(&t.data),
        DType::F32 | DType::F16 | DType::BF16 => {
            Tensor::f_from_slice(&t.data.iter().map(|&v| v as f32).collect::<Vec<_>>())
        }
        DType::Bool => Tensor::f_from_slice(&t.data.iter().map(|&v| v != 0.0).collect::<Vec<_>>()),
        _ => Tensor::f_from_slice(&t.data.iter().map(|&v| v as i64).collect::<Vec<_>>()),
    }
    .map_err(conv)?;
    flat.f_reshape(i64s(&t.shape))
        .and_then(|x| x.f_to_kind(kind_of(t.dtype)))
        .and_then(|x| x.f_to(device))
        .map_err(conv)
}

/// A libtorch tensor (any device) as a reference tensor of the same dtype and shape.
pub fn from_tch(t: &Tensor) -> Result<autopar_analyzer::Tensor, LowerError> {
    let conv = |e: TchError| LowerError::Convert(e.to_string());
    let ty = tensor_type(t)?;
    let flat = t
        .f_to(Device::Cpu)
        .and_then(|x| x.f_contiguous())
        .and_then(|x| x.f_reshape([-1]))
        .map_err(conv)?;
    let data: Vec<f64> = if ty.dtype.is_float() {
        Vec::<f64>::try_from(&flat.f_to_kind(Kind::Double).map_err(conv)?).map_err(conv)?
    } else {
        Vec::<i64>::try_from(&flat.f_to_kind(Kind::Int64).map_err(conv)?)
            .map_err(conv)?
            .into_iter()
            .map(|v| v as f64)
            .collect()
    };
    Ok(autopar_analyzer::Tensor::new(ty.dtype, ty.shape, data))
}

/// An internal failure, turned into a [`LowerError`] naming the op by [`lower`].
enum Fail {
    Torch(TchError),
    Msg(String),
    GroupSum(LowerError),
}

impl From<TchError> for Fail {
    fn from(e: TchError) -> Self {
        Fail::Torch(e)
    }
}

impl From<OpError> for Fail {
    fn from(e: OpError) -> Self {
        Fail::Msg(e.0)
    }
}

type R<T> = Result<T, Fail>;

macro_rules! bail {
    ($($t:tt)*) => { return Err(Fail::Msg(format!($($t)*))) };
}

impl LowerCtx<'_> {
    fn out(&self, k: usize) -> R<&TensorType> {
        match self.outputs.get(k) {
            Some(t) => Ok(t),
            None => bail!(
                "the context gives {} output types, output {k} is needed",
                self.outputs.len()
            ),
        }
    }
    fn global_in(&self, k: usize) -> R<&TensorType> {
        match self.global_inputs.get(k) {
            Some(t) => Ok(t),
            None => bail!(
                "the context gives {} global input types, input {k} is needed",
                self.global_inputs.len()
            ),
        }
    }
    fn sum(&mut self, t: Tensor) -> R<Tensor> {
        (self.group_sum)(t).map_err(Fail::GroupSum)
    }
}

/// Runs `op` on this rank's `inputs` (see the module doc for what `ctx` must hold).
pub fn lower(
    op: &Op,
    inputs: &[&Tensor],
    ctx: &mut LowerCtx<'_>,
) -> Result<Vec<Tensor>, LowerError> {
    lower_mixed(op, inputs, ctx).map_err(|f| match f {
        Fail::Torch(source) => LowerError::Torch {
            op: op.name(),
            source,
        },
        Fail::Msg(reason) => LowerError::Op {
            op: op.name(),
            reason,
        },
        Fail::GroupSum(e) => LowerError::Op {
            op: op.name(),
            reason: format!("group sum failed: {e}"),
        },
    })
}

/// Ops whose reductions lose too much in bf16 / f16 (normalisations, softmax, losses,
/// reductions): with low-precision float inputs they compute in f32 and return the inputs'
/// output types' precision, as PyTorch's autocast keeps them in f32.
fn needs_f32(op: &Op) -> bool {
    matches!(
        op,
        Op::Softmax(_)
            | Op::LayerNorm(_)
            | Op::LayerNormGrad(_)
            | Op::RmsNorm(_)
            | Op::RmsNormGrad(_)
            | Op::SoftmaxCrossEntropy(_)
            | Op::SoftmaxCrossEntropyGrad(_)
            | Op::BatchNorm(_)
            | Op::BatchNormGrad(_)
            | Op::Reduce(_)
    )
}

fn lower_mixed(op: &Op, inputs: &[&Tensor], ctx: &mut LowerCtx<'_>) -> R<Vec<Tensor>> {
    let low = inputs
        .iter()
        .map(|t| t.kind())
        .find(|k| matches!(k, Kind::BFloat16 | Kind::Half));
    match low {
        Some(low) if needs_f32(op) => {
            let up: Vec<Tensor> = inputs
                .iter()
                .map(|t| {
                    if t.kind() == low {
                        t.f_to_kind(Kind::Float)
                    } else {
                        Ok(t.shallow_clone())
                    }
                })
                .collect::<Result<_, _>>()?;
            let refs: Vec<&Tensor> = up.iter().collect();
            let outs = lower_inner(op, &refs, ctx)?;
            // back to the precision the node's output types ask for (statistics outputs stay
            // f32; under mixed precision the graph says f32 and the executor casts)
            let wanted: Vec<Option<Kind>> = (0..outs.len())
                .map(|k| {
                    ctx.outputs.get(k).and_then(|t| match t.dtype {
                        DType::BF16 => Some(Kind::BFloat16),
                        DType::F16 => Some(Kind::Half),
                        _ => None,
                    })
                })
                .collect();
            Ok(outs
                .into_iter()
                .zip(wanted)
                .map(|(t, w)| match w {
                    Some(k) if t.kind() == Kind::Float => t.f_to_kind(k),
                    _ => Ok(t),
                })
                .collect::<Result<_, _>>()?)
        }
        _ => lower_inner(op, inputs, ctx),
    }
}

fn lower_inner(op: &Op, inputs: &[&Tensor], ctx: &mut LowerCtx<'_>) -> R<Vec<Tensor>> {
    let one = |t: Tensor| Ok(vec![t]);
    match op {
        Op::Einsum(o) => {
            let eq: String = o.equation.chars().filter(|c| !c.is_whitespace()).collect();
            one(Tensor::f_einsum(&eq, inputs, None::<Vec<i64>>)?)
        }
        Op::Unary(o) => {
            let [x] = args(inputs)?;
            one(unary(o.kind, x)?)
        }
        Op::Binary(o) => {
            let [a, b] = args(inputs)?;
            one(binary(o.kind, a, b)?)
        }
        Op::Where(_) => {
            let [c, x, y] = args(inputs)?;
            one(x.f_where_self(c, y)?)
        }
        Op::Cast(o) => {
            let [x] = args(inputs)?;
            one(x.f_to_kind(kind_of(o.to))?)
        }
        Op::Reduce(o) => {
            let [x] = args(inputs)?;
            one(reduce(o, x, ctx)?)
        }
        Op::Softmax(o) => {
            let [x] = args(inputs)?;
            let k = x.f_kind()?;
            one(if o.log {
                x.f_log_softmax(o.axis as i64, k)?
            } else {
                x.f_softmax(o.axis as i64, k)?
            })
        }
        Op::LayerNorm(o) => layer_norm(o, inputs),
        Op::LayerNormGrad(o) => layer_norm_grad(o, inputs),
        Op::RmsNorm(o) => rms_norm(o, inputs),
        Op::RmsNormGrad(o) => rms_norm_grad(o, inputs),
        Op::Reshape(_) => {
            let [x] = args(inputs)?;
            one(x.f_reshape(i64s(&ctx.out(0)?.shape))?)
        }
        Op::Transpose(o) => {
            let [x] = args(inputs)?;
            one(x.f_permute(i64s(&o.perm))?)
        }
        Op::Slice(o) => {
            let [x] = args(inputs)?;
            one(slice(o, x)?)
        }
        Op::Concat(o) => {
            if inputs.is_empty() {
                bail!("concat needs at least one input");
            }
            one(Tensor::f_cat(inputs, o.axis as i64)?)
        }
        Op::Expand(_) => {
            let [x] = args(inputs)?;
            one(x.f_expand(i64s(&ctx.out(0)?.shape), false)?)
        }
        Op::Pad(o) => {
            let [x] = args(inputs)?;
            if o.pads.len() != x.dim() {
                bail!("{} pad pairs for a rank-{} input", o.pads.len(), x.dim());
            }
            let pads: Vec<i64> = o
                .pads
                .iter()
                .rev()
                .flat_map(|&[b, a]| [b as i64, a as i64])
                .collect();
            one(x.f_pad(pads, "constant", o.value)?)
        }
        Op::Tile(o) => {
            let [x] = args(inputs)?;
            one(x.f_repeat(i64s(&o.repeats))?)
        }
        Op::Gather(o) => {
            let [data, indices] = args(inputs)?;
            one(gather(o.axis, data, indices)?)
        }
        Op::GatherGrad(o) => {
            let [dy, indices] = args(inputs)?;
            one(gather_grad(o.axis, dy, indices, &ctx.out(0)?.shape)?)
        }
        Op::GatherNd(o) => {
            let [data, indices] = args(inputs)?;
            one(gather_nd(o, data, indices)?)
        }
        Op::ScatterElements(o) => {
            let [data, indices, updates] = args(inputs)?;
            one(scatter_elements(
                o.axis,
                o.reduction,
                data,
                indices,
                updates,
            )?)
        }
        Op::ScatterNd(o) => {
            let [data, indices, updates] = args(inputs)?;
            one(scatter_nd(o.reduction, data, indices, updates)?)
        }
        Op::OneHot(o) => {
            let [indices, values] = args(inputs)?;
            one(one_hot(o.depth, o.axis, indices, values)?)
        }
        Op::TopK(o) => {
            let [x] = args(inputs)?;
            let (values, indices) = x.f_sort_stable(true, o.axis as i64, o.largest)?;
            Ok(vec![
                values.f_narrow(o.axis as i64, 0, o.k as i64)?,
                indices.f_narrow(o.axis as i64, 0, o.k as i64)?,
            ])
        }
        Op::Conv(o) => one(conv(o, inputs)?),
        Op::ConvGrad(o) => {
            let [dy, operand] = args(inputs)?;
            one(conv_grad(o, dy, operand, &ctx.out(0)?.shape)?)
        }
        Op::Pool(o) => {
            let [x] = args(inputs)?;
            one(pool(o, x)?)
        }
        Op::PoolGrad(o) => {
            let [dy, x] = args(inputs)?;
            one(pool_grad(&o.pool, dy, x)?)
        }
        Op::BatchNorm(o) => batch_norm(o, inputs, ctx),
        Op::BatchNormGrad(_) => batch_norm_grad(inputs, ctx),
        Op::Dropout(o) => {
            let [x] = args(inputs)?;
            dropout(o, x, ctx)
        }
        Op::SoftmaxCrossEntropy(o) => cross_entropy(o, inputs, ctx),
        Op::SoftmaxCrossEntropyGrad(o) => cross_entropy_grad(o, inputs, ctx),
        Op::Attention(o) => {
            let [q, k, v] = args(inputs)?;
            attention(o, q, k, v, ctx)
        }
        Op::AttentionGrad(o) => attention_grad(o, inputs, ctx),
        Op::CausalMask(o) => {
            if !inputs.is_empty() {
                bail!("takes no inputs, got {}", inputs.len());
            }
            let Some(low) = lowest_finite(o.dtype) else {
                bail!("an additive mask must be float, got {}", o.dtype);
            };
            let dev = ctx.device;
            let (rows, cols) = (o.rows as i64, o.cols as i64);
            let r = Tensor::f_arange(rows, (Kind::Int64, dev))?.f_view([rows, 1])?;
            let c = Tensor::f_arange(cols, (Kind::Int64, dev))?.f_view([1, cols])?;
            // visible: col + rows <= row + cols
            let visible = c.f_add_scalar(rows)?.f_le_tensor(&r.f_add_scalar(cols)?)?;
            let full = Tensor::f_full([rows, cols], low, (kind_of(o.dtype), dev))?;
            one(full.f_masked_fill(&visible, 0.0)?)
        }
    }
}

// ---------------------------------------------------------------------------------------------
// small helpers

fn i64s(v: &[usize]) -> Vec<i64> {
    v.iter().map(|&d| d as i64).collect()
}

fn args<'t, const N: usize>(inputs: &[&'t Tensor]) -> R<[&'t Tensor; N]> {
    match <[&Tensor; N]>::try_from(inputs) {
        Ok(a) => Ok(a),
        Err(_) => bail!("takes {N} inputs, got {}", inputs.len()),
    }
}

fn is_float(k: Kind) -> bool {
    matches!(k, Kind::Double | Kind::Float | Kind::Half | Kind::BFloat16)
}

/// The kind statistics are computed in: f64 for f64 tensors, f32 otherwise.
fn acc_kind(k: Kind) -> Kind {
    if k == Kind::Double {
        Kind::Double
    } else {
        Kind::Float
    }
}

fn any_true(mask: &Tensor) -> R<bool> {
    Ok(mask.f_any()?.f_to_kind(Kind::Int64)?.f_int64_value(&[])? != 0)
}

/// The first element of `t` where `mask` holds, as i64 (for error messages).
fn first_where(t: &Tensor, mask: &Tensor) -> R<i64> {
    Ok(t.f_masked_select(mask)?.f_int64_value(&[0])?)
}

/// Sum over `dims` in `kind`; the tensor itself (cast) when `dims` is empty (libtorch would
/// sum everything).
fn sum_dims(t: &Tensor, dims: &[i64], keepdim: bool, kind: Kind) -> R<Tensor> {
    if dims.is_empty() {
        return Ok(t.f_to_kind(kind)?);
    }
    Ok(t.f_sum_dim_intlist(dims, keepdim, kind)?)
}

/// Integer indices into a dim of size `dim`: negative ones count from the end, others must be
/// in range (the analyzer's `normalize_index`).
fn normalize_indices(indices: &Tensor, dim: i64) -> R<Tensor> {
    let idx = indices.f_to_kind(Kind::Int64)?;
    let bad = idx.f_lt(-dim)?.f_logical_or(&idx.f_ge(dim)?)?;
    if any_true(&bad)? {
        let v = first_where(&idx, &bad)?;
        bail!("index {v} is out of range for a dim of size {dim}");
    }
    Ok(idx.f_add_scalar(dim)?.f_where_self(&idx.f_lt(0)?, &idx)?)
}

fn check_nonzero(b: &Tensor, what: &str) -> R<()> {
    if any_true(&b.f_eq(0)?)? {
        bail!("integer {what} by zero is undefined");
    }
    Ok(())
}

/// `[1, .., n, .., 1]` of rank `rank` with `n` at `dim`.
fn along(rank: usize, dim: usize, n: i64) -> Vec<i64> {
    let mut s = vec![1; rank];
    s[dim] = n;
    s
}

// ---------------------------------------------------------------------------------------------
// elementwise

fn unary(kind: UnaryKind, x: &Tensor) -> R<Tensor> {
    use UnaryKind::*;
    Ok(match kind {
        Identity => x.shallow_clone(),
        Neg => x.f_neg()?,
        Abs => x.f_abs()?,
        Exp => x.f_exp()?,
        Log => x.f_log()?,
        Sqrt => x.f_sqrt()?,
        Rsqrt => x.f_rsqrt()?,
        Reciprocal => x.f_reciprocal()?,
        Sin => x.f_sin()?,
        Cos => x.f_cos()?,
        Tanh => x.f_tanh()?,
        Sigmoid => x.f_sigmoid()?,
        Relu => x.f_relu()?,
        Silu => x.f_silu()?,
        Gelu => x.f_gelu("none")?,
        GeluTanh => x.f_gelu("tanh")?,
        Erf => x.f_erf()?,
        Floor => x.f_floor()?,
        Ceil => x.f_ceil()?,
        Sign => {
            let s = x.f_sign()?;
            if is_float(x.f_kind()?) {
                // the reference keeps NaN, libtorch's sign gives 0
                x.f_where_self(&x.f_isnan()?, &s)?
            } else {
                s
            }
        }
        Not => x.f_logical_not()?,
        IsNan => x.f_isnan()?,
        IsInf => x.f_isinf()?,
    })
}

fn binary(kind: BinaryKind, a: &Tensor, b: &Tensor) -> R<Tensor> {
    use BinaryKind::*;
    let ka = a.f_kind()?;
    let int = !is_float(ka) && ka != Kind::Bool;
    Ok(match kind {
        Add => a.f_add(b)?,
        Sub => a.f_sub(b)?,
        Mul => a.f_mul(b)?,
        Div if int => {
            check_nonzero(b, "division")?;
            a.f_div_tensor_mode(b, "trunc")?
        }
        Div => a.f_div(b)?,
        // the result keeps the base's dtype (an integer exponent does not promote)
        Pow => a.f_pow(b)?.f_to_kind(ka)?,
        Max => a.f_maximum(b)?,
        Min => a.f_minimum(b)?,
        Mod if int => {
            check_nonzero(b, "modulo")?;
            a.f_remainder_tensor(b)?
        }
        Mod => {
            // fmod, then moved to the divisor's sign, as the reference computes it
            let r = a.f_fmod_tensor(b)?;
            let fix = r
                .f_ne(0.0)?
                .f_logical_and(&r.f_lt(0.0)?.f_ne_tensor(&b.f_lt(0.0)?)?)?;
            r.f_add(b)?.f_where_self(&fix, &r)?
        }
        Equal => a.f_eq_tensor(b)?,
        Less => a.f_lt_tensor(b)?,
        LessOrEqual => a.f_le_tensor(b)?,
        Greater => a.f_gt_tensor(b)?,
        GreaterOrEqual => a.f_ge_tensor(b)?,
        And => a.f_logical_and(b)?,
        Or => a.f_logical_or(b)?,
        Xor => a.f_logical_xor(b)?,
    })
}

fn reduce(op: &Reduce, x: &Tensor, ctx: &LowerCtx<'_>) -> R<Tensor> {
    if let Some(&a) = op.axes.iter().find(|&&a| a >= x.dim()) {
        bail!("axis {a} is out of range for rank {}", x.dim());
    }
    if op.axes.is_empty() {
        return Ok(x.shallow_clone());
    }
    let axes = i64s(&op.axes);
    let k = x.f_kind()?;
    Ok(match op.kind {
        ReduceKind::Sum => x.f_sum_dim_intlist(axes.as_slice(), op.keepdims, k)?,
        ReduceKind::Mean => {
            // a partial sum over this rank's block, divided by the global count
            let g = ctx.global_in(0)?;
            let mut count = 1.0;
            for &a in &op.axes {
                match g.shape.get(a) {
                    Some(&n) => count *= n as f64,
                    None => bail!("global input {g} has no axis {a}"),
                }
            }
            let acc = if is_float(k) {
                acc_kind(k)
            } else {
                Kind::Double
            };
            x.f_sum_dim_intlist(axes.as_slice(), op.keepdims, acc)?
                .f_div_scalar(count)?
                .f_to_kind(k)?
        }
        ReduceKind::Max => x.f_amax(axes.as_slice(), op.keepdims)?,
        ReduceKind::Min => x.f_amin(axes.as_slice(), op.keepdims)?,
    })
}

fn slice(op: &Slice, x: &Tensor) -> R<Tensor> {
    let n = op.axes.len();
    if op.starts.len() != n || op.ends.len() != n || op.steps.len() != n {
        bail!("axes, starts, ends and steps have different lengths");
    }
    let mut y = x.shallow_clone();
    for k in 0..n {
        let (axis, start, end, step) = (op.axes[k], op.starts[k], op.ends[k], op.steps[k]);
        if step == 0 || start > end || axis >= x.dim() {
            bail!("axis {axis}: bad slice [{start}, {end}) step {step}");
        }
        y = y.f_slice(axis as i64, start as i64, end as i64, step as i64)?;
    }
    Ok(y)
}

// ---------------------------------------------------------------------------------------------
// normalisations

/// `(x, scale, bias?)` of a layer norm, checked.
fn norm_operands<'t>(inputs: &[&'t Tensor]) -> R<(&'t Tensor, &'t Tensor, Option<&'t Tensor>)> {
    match inputs {
        [x, w] => Ok((x, w, None)),
        [x, w, b] => Ok((x, w, Some(b))),
        _ => bail!(
            "takes 2 or 3 inputs (x, scale[, bias]), got {}",
            inputs.len()
        ),
    }
}

fn check_axis(axis: usize, x: &Tensor) -> R<(Vec<i64>, Vec<i64>)> {
    if axis >= x.dim() {
        bail!("axis {axis} is out of range for x of rank {}", x.dim());
    }
    let lead = (0..axis as i64).collect();
    let feat = (axis as i64..x.dim() as i64).collect();
    Ok((lead, feat))
}

fn layer_norm(op: &LayerNorm, inputs: &[&Tensor]) -> R<Vec<Tensor>> {
    let (x, w, b) = norm_operands(inputs)?;
    let (_, feat) = check_axis(op.axis, x)?;
    let k = x.f_kind()?;
    let stats_shape: Vec<i64> = x
        .size()
        .iter()
        .enumerate()
        .map(|(d, &n)| if d >= op.axis { 1 } else { n })
        .collect();
    if matches!(k, Kind::Float | Kind::Double) {
        // statistics in x's own dtype: the fused kernel computes exactly the op
        let normalized = &x.size()[op.axis..];
        let (y, mean, rstd) = x.f_native_layer_norm(normalized, Some(w), b, op.epsilon)?;
        return Ok(vec![
            y,
            mean.f_reshape(stats_shape.as_slice())?,
            rstd.f_reshape(stats_shape.as_slice())?,
        ]);
    }
    let sk = acc_kind(k);
    let xs = x.f_to_kind(sk)?;
    let mean = xs.f_mean_dim(feat.as_slice(), true, sk)?;
    let xc = xs.f_sub(&mean)?;
    let var = xc.f_square()?.f_mean_dim(feat.as_slice(), true, sk)?;
    let rstd = var.f_add_scalar(op.epsilon)?.f_rsqrt()?;
    let mut y = xc.f_mul(&rstd)?.f_mul(&w.f_to_kind(sk)?)?;
    if let Some(b) = b {
        y = y.f_add(&b.f_to_kind(sk)?)?;
    }
    Ok(vec![y.f_to_kind(k)?, mean, rstd])
}

fn layer_norm_grad(op: &LayerNormGrad, inputs: &[&Tensor]) -> R<Vec<Tensor>> {
    let [dy, x, w, mean, rstd] = args(inputs)?;
    let (lead, feat) = check_axis(op.axis, x)?;
    let (k, wk) = (x.f_kind()?, w.f_kind()?);
    let sk = acc_kind(k);
    let (mean, rstd) = (mean.f_to_kind(sk)?, rstd.f_to_kind(sk)?);
    let dy = dy.f_to_kind(sk)?;
    let xhat = x.f_to_kind(sk)?.f_sub(&mean)?.f_mul(&rstd)?;
    let g = dy.f_mul(&w.f_to_kind(sk)?)?;
    let mean_g = g.f_mean_dim(feat.as_slice(), true, sk)?;
    let mean_gx = g.f_mul(&xhat)?.f_mean_dim(feat.as_slice(), true, sk)?;
    let dx = g
        .f_sub(&mean_g)?
        .f_sub(&xhat.f_mul(&mean_gx)?)?
        .f_mul(&rstd)?;
    let dw = sum_dims(&dy.f_mul(&xhat)?, &lead, false, sk)?;
    let mut outs = vec![dx.f_to_kind(k)?, dw.f_to_kind(wk)?];
    if op.has_bias {
        outs.push(sum_dims(&dy, &lead, false, sk)?.f_to_kind(wk)?);
    }
    Ok(outs)
}

fn rms_norm(op: &RmsNorm, inputs: &[&Tensor]) -> R<Vec<Tensor>> {
    let [x, w] = args(inputs)?;
    let (_, feat) = check_axis(op.axis, x)?;
    let k = x.f_kind()?;
    let sk = acc_kind(k);
    let xs = x.f_to_kind(sk)?;
    let ms = xs.f_square()?.f_mean_dim(feat.as_slice(), true, sk)?;
    let rstd = ms.f_add_scalar(op.epsilon)?.f_rsqrt()?;
    let y = xs.f_mul(&rstd)?.f_mul(&w.f_to_kind(sk)?)?;
    Ok(vec![y.f_to_kind(k)?, rstd])
}

fn rms_norm_grad(op: &RmsNormGrad, inputs: &[&Tensor]) -> R<Vec<Tensor>> {
    let [dy, x, w, rstd] = args(inputs)?;
    let (lead, feat) = check_axis(op.axis, x)?;
    let (k, wk) = (x.f_kind()?, w.f_kind()?);
    let sk = acc_kind(k);
    let rstd = rstd.f_to_kind(sk)?;
    let dy = dy.f_to_kind(sk)?;
    let xhat = x.f_to_kind(sk)?.f_mul(&rstd)?;
    let g = dy.f_mul(&w.f_to_kind(sk)?)?;
    let mean_gx = g.f_mul(&xhat)?.f_mean_dim(feat.as_slice(), true, sk)?;
    let dx = g.f_sub(&xhat.f_mul(&mean_gx)?)?.f_mul(&rstd)?;
    let dw = sum_dims(&dy.f_mul(&xhat)?, &lead, false, sk)?;
    Ok(vec![dx.f_to_kind(k)?, dw.f_to_kind(wk)?])
}

/// Elements per channel of the *global* NC... input of a batch norm (SyncBatchNorm's count).
fn bn_count(ctx: &LowerCtx<'_>, input: usize) -> R<f64> {
    let g = ctx.global_in(input)?;
    match g.shape.get(1) {
        Some(&c) if c > 0 => Ok((g.numel() / c) as f64),
        _ => bail!("global input {g} is not a non-empty N, C, ... tensor"),
    }
}

/// `[1, C, 1, ...]` for per-channel vectors against an NC... tensor, and the reduced dims.
fn bn_shapes(x: &Tensor) -> R<(Vec<i64>, Vec<i64>)> {
    let r = x.dim();
    if r < 2 {
        bail!("input of rank {r} is not N, C, ...");
    }
    let c = x.size()[1];
    let red = std::iter::once(0).chain(2..r as i64).collect();
    Ok((along(r, 1, c), red))
}

fn batch_norm(op: &BatchNorm, inputs: &[&Tensor], ctx: &mut LowerCtx<'_>) -> R<Vec<Tensor>> {
    let [x, scale, bias, rmean, rvar] = args(inputs)?;
    let (cshape, red) = bn_shapes(x)?;
    let k = x.f_kind()?;
    let ck = acc_kind(k);
    let bc = |t: &Tensor| -> R<Tensor> { Ok(t.f_to_kind(ck)?.f_reshape(cshape.as_slice())?) };
    let xs = x.f_to_kind(ck)?;
    if !op.training {
        let rstd = rvar.f_to_kind(ck)?.f_add_scalar(op.epsilon)?.f_rsqrt()?;
        let y = xs
            .f_sub(&bc(rmean)?)?
            .f_mul(&bc(&rstd)?)?
            .f_mul(&bc(scale)?)?
            .f_add(&bc(bias)?)?;
        return Ok(vec![y.f_to_kind(k)?]);
    }
    let count = bn_count(ctx, 0)?;
    // two passes, each summed over the group: the mean, then the centred squares
    let sum = ctx.sum(xs.f_sum_dim_intlist(red.as_slice(), false, ck)?)?;
    let mean = sum.f_div_scalar(count)?;
    let xc = xs.f_sub(&bc(&mean)?)?;
    let sq = ctx.sum(
        xc.f_square()?
            .f_sum_dim_intlist(red.as_slice(), false, ck)?,
    )?;
    let var = sq.f_div_scalar(count)?;
    let rstd = var.f_add_scalar(op.epsilon)?.f_rsqrt()?;
    let y = xc
        .f_mul(&bc(&rstd)?)?
        .f_mul(&bc(scale)?)?
        .f_add(&bc(bias)?)?;
    let blend = |run: &Tensor, batch: &Tensor| -> R<Tensor> {
        Ok(run
            .f_to_kind(ck)?
            .f_mul_scalar(op.momentum)?
            .f_add(&batch.f_mul_scalar(1.0 - op.momentum)?)?
            .f_to_kind(run.f_kind()?)?)
    };
    let mk = rmean.f_kind()?;
    Ok(vec![
        y.f_to_kind(k)?,
        blend(rmean, &mean)?,
        blend(rvar, &var)?,
        mean.f_to_kind(mk)?,
        rstd.f_to_kind(mk)?,
    ])
}

fn batch_norm_grad(inputs: &[&Tensor], ctx: &mut LowerCtx<'_>) -> R<Vec<Tensor>> {
    let [dy, x, scale, mean, rstd] = args(inputs)?;
    let (cshape, red) = bn_shapes(x)?;
    let (k, sk) = (x.f_kind()?, scale.f_kind()?);
    let ck = acc_kind(k);
    let bc = |t: &Tensor| -> R<Tensor> { Ok(t.f_to_kind(ck)?.f_reshape(cshape.as_slice())?) };
    let m = bn_count(ctx, 1)?;
    let c = cshape[1];
    let dy = dy.f_to_kind(ck)?;
    let xhat = x.f_to_kind(ck)?.f_sub(&bc(mean)?)?.f_mul(&bc(rstd)?)?;
    // one group sum for both statistics
    let sums = Tensor::f_cat(
        &[
            dy.f_sum_dim_intlist(red.as_slice(), false, ck)?,
            dy.f_mul(&xhat)?
                .f_sum_dim_intlist(red.as_slice(), false, ck)?,
        ],
        0,
    )?;
    let sums = ctx.sum(sums)?;
    let (sum_dy, sum_dy_xhat) = (sums.f_narrow(0, 0, c)?, sums.f_narrow(0, c, c)?);
    let dx = dy
        .f_mul_scalar(m)?
        .f_sub(&bc(&sum_dy)?)?
        .f_sub(&xhat.f_mul(&bc(&sum_dy_xhat)?)?)?
        .f_mul(&bc(scale)?.f_mul(&bc(rstd)?)?.f_div_scalar(m)?)?;
    Ok(vec![
        dx.f_to_kind(k)?,
        sum_dy_xhat.f_to_kind(sk)?,
        sum_dy.f_to_kind(sk)?,
    ])
}

// ---------------------------------------------------------------------------------------------
// indexing

fn gather(axis: usize, data: &Tensor, indices: &Tensor) -> R<Tensor> {
    let ds = data.size();
    let Some(&dim) = ds.get(axis) else {
        bail!("axis {axis} is out of range for rank-{} data", ds.len());
    };
    let idx = normalize_indices(indices, dim)?.f_reshape([-1])?;
    let mut shape = ds[..axis].to_vec();
    shape.extend(indices.size());
    shape.extend_from_slice(&ds[axis + 1..]);
    Ok(data.f_index_select(axis as i64, &idx)?.f_reshape(shape)?)
}

fn gather_grad(axis: usize, dy: &Tensor, indices: &Tensor, out: &[usize]) -> R<Tensor> {
    let Some(&dim) = out.get(axis) else {
        bail!("axis {axis} is out of range for the table shape {out:?}");
    };
    let idx = normalize_indices(indices, dim as i64)?.f_reshape([-1])?;
    let mut src = i64s(&out[..axis]);
    src.push(idx.size()[0]);
    src.extend(i64s(&out[axis + 1..]));
    let zeros = Tensor::f_zeros(i64s(out), (dy.f_kind()?, dy.device()))?;
    Ok(zeros.f_index_add(axis as i64, &idx, &dy.f_reshape(src)?)?)
}

/// Linear offsets (row-major over `dims`) of the index tuples in the last dim of `indices`,
/// each coordinate normalised against its dim; shaped like `indices` without its last dim.
fn nd_linear(indices: &Tensor, dims: &[i64]) -> R<Tensor> {
    let dev = indices.device();
    let idx = indices.f_to_kind(Kind::Int64)?;
    let dimt = Tensor::f_from_slice(dims)?.f_to(dev)?;
    let bad = idx
        .f_lt_tensor(&dimt.f_neg()?)?
        .f_logical_or(&idx.f_ge_tensor(&dimt)?)?;
    if any_true(&bad)? {
        let v = first_where(&idx, &bad)?;
        bail!("index {v} is out of range for the indexed dims {dims:?}");
    }
    let idx = idx.f_add(&dimt)?.f_where_self(&idx.f_lt(0)?, &idx)?;
    let mut strides = vec![1i64; dims.len()];
    for i in (0..dims.len().saturating_sub(1)).rev() {
        strides[i] = strides[i + 1] * dims[i + 1];
    }
    let st = Tensor::f_from_slice(&strides)?.f_to(dev)?;
    Ok(idx
        .f_mul(&st)?
        .f_sum_dim_intlist([-1i64].as_slice(), false, Kind::Int64)?)
}

fn check_nd(data: &[i64], indices: &[i64], b: usize) -> R<usize> {
    let (r, q) = (data.len(), indices.len());
    if r == 0 || q == 0 || b >= r.min(q) || data[..b] != indices[..b] {
        bail!("data {data:?} and indices {indices:?} do not fit with {b} batch dims");
    }
    let k = indices[q - 1] as usize;
    if k == 0 || k > r - b {
        bail!("index tuples of length {k} for data {data:?} with {b} batch dims");
    }
    Ok(k)
}

fn gather_nd(op: &GatherNd, data: &Tensor, indices: &Tensor) -> R<Tensor> {
    let b = op.batch_dims;
    let (ds, is) = (data.size(), indices.size());
    let k = check_nd(&ds, &is, b)?;
    let q = is.len();
    let bprod: i64 = ds[..b].iter().product();
    let dprod: i64 = ds[b..b + k].iter().product();
    let inner: i64 = ds[b + k..].iter().product();
    let mprod: i64 = is[b..q - 1].iter().product();
    let lin = nd_linear(indices, &ds[b..b + k])?.f_reshape([bprod, mprod])?;
    let batch = Tensor::f_arange(bprod, (Kind::Int64, data.device()))?
        .f_mul_scalar(dprod)?
        .f_unsqueeze(1)?;
    let rows = lin.f_add(&batch)?.f_reshape([-1])?;
    let mut shape = is[..q - 1].to_vec();
    shape.extend_from_slice(&ds[b + k..]);
    Ok(data
        .f_reshape([bprod * dprod, inner])?
        .f_index_select(0, &rows)?
        .f_reshape(shape)?)
}

/// Rows of `base` (dim 0) updated at `idx` from the rows of `src`.
fn scatter_rows(base: &Tensor, idx: &Tensor, src: &Tensor, red: ScatterReduction) -> R<Tensor> {
    let reduce = |how: &str| -> R<Tensor> {
        // scatter_reduce wants the index shaped like the source
        let full = idx
            .f_reshape(along(src.dim().max(1), 0, -1))?
            .f_expand(src.size(), false)?;
        Ok(base.f_internal_scatter_reduce(0, &full, src, how, true)?)
    };
    match red {
        ScatterReduction::None => Ok(base.f_index_copy(0, idx, src)?),
        ScatterReduction::Add => Ok(base.f_index_add(0, idx, src)?),
        ScatterReduction::Mul => reduce("prod"),
        ScatterReduction::Max => reduce("amax"),
        ScatterReduction::Min => reduce("amin"),
    }
}

fn scatter_elements(
    axis: usize,
    red: ScatterReduction,
    data: &Tensor,
    indices: &Tensor,
    updates: &Tensor,
) -> R<Tensor> {
    let (ds, is) = (data.size(), indices.size());
    let r = ds.len();
    if axis >= r || is.len() != r || updates.size() != is {
        bail!("indices {is:?} and updates must match data {ds:?} in rank, axis {axis}");
    }
    let idx = normalize_indices(indices, ds[axis])?;
    let mut strides = vec![1i64; r];
    for i in (0..r.saturating_sub(1)).rev() {
        strides[i] = strides[i + 1] * ds[i + 1];
    }
    let mut flat = idx.f_mul_scalar(strides[axis])?;
    for d in (0..r).filter(|&d| d != axis) {
        let ar = Tensor::f_arange(is[d], (Kind::Int64, data.device()))?
            .f_mul_scalar(strides[d])?
            .f_reshape(along(r, d, is[d]))?;
        flat = flat.f_add(&ar)?;
    }
    let out = scatter_rows(
        &data.f_reshape([-1])?,
        &flat.f_reshape([-1])?,
        &updates.f_reshape([-1])?,
        red,
    )?;
    Ok(out.f_reshape(ds)?)
}

fn scatter_nd(
    red: ScatterReduction,
    data: &Tensor,
    indices: &Tensor,
    updates: &Tensor,
) -> R<Tensor> {
    let (ds, is) = (data.size(), indices.size());
    let k = check_nd(&ds, &is, 0)?;
    let dprod: i64 = ds[..k].iter().product();
    let inner: i64 = ds[k..].iter().product();
    let lin = nd_linear(indices, &ds[..k])?.f_reshape([-1])?;
    let m = lin.size()[0];
    let out = scatter_rows(
        &data.f_reshape([dprod, inner])?,
        &lin,
        &updates.f_reshape([m, inner])?,
        red,
    )?;
    Ok(out.f_reshape(ds)?)
}

fn one_hot(depth: usize, axis: usize, indices: &Tensor, values: &Tensor) -> R<Tensor> {
    let r = indices.dim();
    if axis > r || values.size() != [2] {
        bail!("axis {axis} for indices of rank {r}, values must be [off, on]");
    }
    let depth = depth as i64;
    let idx = if is_float(indices.f_kind()?) {
        indices.f_trunc()?.f_to_kind(Kind::Int64)?
    } else {
        indices.f_to_kind(Kind::Int64)?
    };
    let idx = idx.f_add_scalar(depth)?.f_where_self(&idx.f_lt(0)?, &idx)?;
    let classes = Tensor::f_arange(depth, (Kind::Int64, indices.device()))?.f_reshape(along(
        r + 1,
        axis,
        depth,
    ))?;
    let hit = idx.f_unsqueeze(axis as i64)?.f_eq_tensor(&classes)?;
    let (off, on) = (values.f_select(0, 0)?, values.f_select(0, 1)?);
    Ok(on.f_where_self(&hit, &off)?)
}

// ---------------------------------------------------------------------------------------------
// convolution and pooling

/// Zero padding `[before, after]` per spatial dim of an N, C, spatial... tensor.
fn pad_spatial(x: &Tensor, pads: &[[usize; 2]], value: f64) -> R<Tensor> {
    if pads.iter().all(|&[b, a]| b == 0 && a == 0) {
        return Ok(x.shallow_clone());
    }
    let flat: Vec<i64> = pads
        .iter()
        .rev()
        .flat_map(|&[b, a]| [b as i64, a as i64])
        .collect();
    Ok(x.f_pad(flat, "constant", value)?)
}

fn check_spatial(conv: &Conv, x_rank: usize) -> R<usize> {
    let sp = x_rank.saturating_sub(2);
    if sp == 0
        || conv.strides.len() != sp
        || conv.pads.len() != sp
        || conv.dilations.len() != sp
        || conv.groups == 0
    {
        bail!("strides, pads and dilations must have one entry per spatial dim ({sp})");
    }
    Ok(sp)
}

fn conv(op: &Conv, inputs: &[&Tensor]) -> R<Tensor> {
    let (x, w, b) = match inputs {
        [x, w] => (x, w, None),
        [x, w, b] => (x, w, Some(*b)),
        _ => bail!("takes 2 or 3 inputs (x, w[, b]), got {}", inputs.len()),
    };
    let sp = check_spatial(op, x.dim())?;
    let symmetric = op.pads.iter().all(|&[b, a]| b == a);
    let (xin, padding) = if symmetric {
        (
            x.shallow_clone(),
            op.pads.iter().map(|p| p[0] as i64).collect(),
        )
    } else {
        (pad_spatial(x, &op.pads, 0.0)?, vec![0; sp])
    };
    Ok(xin.f_convolution(
        w,
        b,
        i64s(&op.strides),
        padding,
        i64s(&op.dilations),
        false,
        vec![0i64; sp],
        op.groups as i64,
    )?)
}

fn conv_grad(op: &ConvGrad, dy: &Tensor, operand: &Tensor, out: &[usize]) -> R<Tensor> {
    let c = &op.conv;
    let sp = check_spatial(c, out.len())?;
    let g = c.groups as i64;
    let (strides, dils) = (i64s(&c.strides), i64s(&c.dilations));
    let ds = dy.size();
    if ds.len() != sp + 2 {
        bail!("dy {ds:?} does not match a conv with {sp} spatial dims");
    }
    match op.wrt {
        ConvGradWrt::Input => {
            // dx = the transposed convolution of dy over the padded input, then cropped
            let w = operand;
            let ws = w.size();
            let mut out_pad = vec![];
            for d in 0..sp {
                let padded = (out[2 + d] + c.pads[d][0] + c.pads[d][1]) as i64;
                let extent = dils[d] * (ws[2 + d] - 1) + 1;
                let reach = (ds[2 + d] - 1) * strides[d] + extent;
                if reach > padded {
                    bail!("dy {ds:?} is too large for the input {out:?}");
                }
                out_pad.push(padded - reach);
            }
            let mut dx = dy.f_convolution(
                w,
                None::<&Tensor>,
                strides.as_slice(),
                vec![0i64; sp],
                dils.as_slice(),
                true,
                out_pad,
                g,
            )?;
            for d in 0..sp {
                dx = dx.f_narrow(2 + d as i64, c.pads[d][0] as i64, out[2 + d] as i64)?;
            }
            Ok(dx)
        }
        ConvGradWrt::Weight => {
            // dw[co, ci, k] = sum_{n, o} dy[n, co, o] * xp[n, ci, o * stride + k * dilation]: a
            // convolution of x (batch and channels swapped) with dy as the kernel, where the
            // forward's stride and dilation trade places.
            let x = operand;
            let xs = x.size();
            if xs.len() != sp + 2 || xs[1] % g != 0 || out[0] as i64 % g != 0 {
                bail!("x {xs:?} and weight {out:?} do not fit {g} groups");
            }
            let (n, cin_g, cout_g) = (xs[0], xs[1] / g, out[0] as i64 / g);
            let xp = pad_spatial(x, &c.pads, 0.0)?;
            let psp = xp.size()[2..].to_vec();
            let rest = |from: i64| (from..from + sp as i64).collect::<Vec<_>>();
            let xin = xp
                .f_reshape([&[n, g, cin_g][..], &psp].concat())?
                .f_permute([&[2, 1, 0][..], &rest(3)].concat())?
                .f_reshape([&[cin_g, g * n][..], &psp].concat())?;
            let kernel = dy
                .f_reshape([&[n, g, cout_g][..], &ds[2..]].concat())?
                .f_permute([&[1, 2, 0][..], &rest(3)].concat())?
                .f_reshape([&[g * cout_g, n][..], &ds[2..]].concat())?;
            let mut dw = xin.f_convolution(
                &kernel,
                None::<&Tensor>,
                dils.as_slice(),
                vec![0i64; sp],
                strides.as_slice(),
                false,
                vec![0i64; sp],
                g,
            )?;
            for d in 0..sp {
                dw = dw.f_narrow(2 + d as i64, 0, out[2 + d] as i64)?;
            }
            Ok(dw.f_transpose(0, 1)?.f_contiguous()?)
        }
    }
}

/// Geometry of a pooling window per spatial dim.
struct PoolGeom {
    /// Output length.
    out: Vec<i64>,
    /// Kernel size, stride, dilation, before-padding, input length.
    kernel: Vec<i64>,
    strides: Vec<i64>,
    dils: Vec<i64>,
    pad_before: Vec<i64>,
    input: Vec<i64>,
    /// Length of the padded input the windows are cut from (covers every window and the input).
    len: Vec<i64>,
}

fn pool_geom(pool: &Pool, x: &Tensor) -> R<PoolGeom> {
    let ty = tensor_type(x).map_err(|e| Fail::Msg(e.to_string()))?;
    let y = pool.infer(&[&ty])?.remove(0);
    let sp = ty.rank() - 2;
    let mut g = PoolGeom {
        out: i64s(&y.shape[2..]),
        kernel: i64s(&pool.kernel),
        strides: i64s(&pool.strides),
        dils: i64s(&pool.dilations),
        pad_before: pool.pads.iter().map(|p| p[0] as i64).collect(),
        input: i64s(&ty.shape[2..]),
        len: vec![],
    };
    for d in 0..sp {
        let extent = g.dils[d] * (g.kernel[d] - 1) + 1;
        let need = (g.out[d] - 1) * g.strides[d] + extent;
        g.len.push(need.max(g.pad_before[d] + g.input[d]));
    }
    Ok(g)
}

/// `x` padded with `value` to the geometry's lengths.
fn pool_pad(x: &Tensor, g: &PoolGeom, value: f64) -> R<Tensor> {
    let pads: Vec<[usize; 2]> = (0..g.len.len())
        .map(|d| {
            let after = g.len[d] - g.pad_before[d] - g.input[d];
            [g.pad_before[d] as usize, after as usize]
        })
        .collect();
    pad_spatial(x, &pads, value)
}

/// Windows of a padded `[N, C, len...]` tensor: `[N, C, out..., kernel...]` (views).
fn pool_windows(xp: &Tensor, g: &PoolGeom) -> R<Tensor> {
    let mut t = xp.shallow_clone();
    for d in 0..g.out.len() {
        let dim = 2 + d as i64;
        let extent = g.dils[d] * (g.kernel[d] - 1) + 1;
        t = t
            .f_unfold(dim, extent, g.strides[d])?
            .f_narrow(dim, 0, g.out[d])?
            .f_slice(-1, 0, extent, g.dils[d])?;
    }
    Ok(t)
}

/// The trailing kernel dims of a window tensor.
fn kernel_dims(g: &PoolGeom) -> Vec<i64> {
    let sp = g.out.len() as i64;
    (2 + sp..2 + 2 * sp).collect()
}

/// Per output position, the number of taps an average divides by: `[1, 1, out...]`.
fn pool_divisors(pool: &Pool, g: &PoolGeom, kind: Kind, device: Device) -> R<Tensor> {
    let sp = g.out.len();
    let mut mask = Tensor::f_ones(vec![1i64; sp + 2], (kind, device))?;
    for d in 0..sp {
        let (pb, n) = (g.pad_before[d], g.input[d]);
        let pa = pool.pads[d][1] as i64;
        let m: Vec<f32> = (0..g.len[d])
            .map(|p| {
                let counted = if pool.count_include_pad {
                    p < pb + n + pa
                } else {
                    p >= pb && p < pb + n
                };
                if counted {
                    1.0
                } else {
                    0.0
                }
            })
            .collect();
        let m = Tensor::f_from_slice(&m)?
            .f_to_kind(kind)?
            .f_to(device)?
            .f_reshape(along(sp + 2, 2 + d, g.len[d]))?;
        mask = mask.f_mul(&m)?;
    }
    let counts =
        pool_windows(&mask, g)?.f_sum_dim_intlist(kernel_dims(g).as_slice(), false, kind)?;
    Ok(counts.f_clamp_min(1.0)?)
}

/// The value padded taps of a max pool hold: below every real value.
fn lowest(kind: Kind) -> f64 {
    match kind {
        Kind::Int64 => i64::MIN as f64,
        Kind::Int => i32::MIN as f64,
        Kind::Int16 => i16::MIN as f64,
        Kind::Int8 => i8::MIN as f64,
        Kind::Uint8 => 0.0,
        _ => f64::NEG_INFINITY,
    }
}

fn pool(op: &Pool, x: &Tensor) -> R<Tensor> {
    let g = pool_geom(op, x)?;
    let kind = x.f_kind()?;
    let kdims = kernel_dims(&g);
    match op.kind {
        PoolKind::Max => {
            let w = pool_windows(&pool_pad(x, &g, lowest(kind))?, &g)?;
            Ok(w.f_amax(kdims.as_slice(), false)?)
        }
        PoolKind::Avg => {
            let w = pool_windows(&pool_pad(x, &g, 0.0)?, &g)?;
            let sums = w.f_sum_dim_intlist(kdims.as_slice(), false, kind)?;
            Ok(sums.f_div(&pool_divisors(op, &g, kind, x.device())?)?)
        }
    }
}

fn pool_grad(op: &Pool, dy: &Tensor, x: &Tensor) -> R<Tensor> {
    let g = pool_geom(op, x)?;
    let (kind, dev) = (x.f_kind()?, x.device());
    let xs = x.size();
    let (n, c) = (xs[0], xs[1]);
    let ptot: i64 = g.len.iter().product();
    let otot: i64 = g.out.iter().product();
    let ktot: i64 = g.kernel.iter().product();
    // flat position in the padded plane of every tap of every window: [1, 1, otot, ktot]
    let pos =
        Tensor::f_arange(ptot, (Kind::Int64, dev))?.f_reshape([&[1, 1][..], &g.len].concat())?;
    let pos = pool_windows(&pos, &g)?.f_reshape([1, 1, otot, ktot])?;
    let dy = dy.f_reshape([n, c, otot, 1])?;
    let (idx, src) = match op.kind {
        PoolKind::Max => {
            // the first maximal tap of each window takes the gradient
            let w = pool_windows(&pool_pad(x, &g, f64::NEG_INFINITY)?, &g)?
                .f_reshape([n, c, otot, ktot])?;
            let arg = w.f_argmax(3, true)?;
            let chosen = pos
                .f_expand([n, c, otot, ktot], false)?
                .f_gather(3, &arg, false)?;
            (chosen.f_reshape([n, c, otot])?, dy.f_reshape([n, c, otot])?)
        }
        PoolKind::Avg => {
            let div = pool_divisors(op, &g, kind, dev)?.f_reshape([1, 1, otot, 1])?;
            let share = dy
                .f_div(&div)?
                .f_expand([n, c, otot, ktot], false)?
                .f_reshape([n, c, otot * ktot])?;
            let idx = pos
                .f_expand([n, c, otot, ktot], false)?
                .f_reshape([n, c, otot * ktot])?;
            (idx, share)
        }
    };
    let dxp = Tensor::f_zeros([n, c, ptot], (kind, dev))?
        .f_scatter_add(2, &idx, &src)?
        .f_reshape([&[n, c][..], &g.len].concat())?;
    let mut dx = dxp;
    for d in 0..g.out.len() {
        dx = dx.f_narrow(2 + d as i64, g.pad_before[d], g.input[d])?;
    }
    Ok(dx)
}

// ---------------------------------------------------------------------------------------------
// dropout and losses

/// `z >> k` as an unsigned (logical) shift of int64 bits.
fn lsr(z: &Tensor, k: u32) -> R<Tensor> {
    let mask = ((1u64 << (64 - k)) - 1) as i64;
    Ok(z.f_bitwise_right_shift_tensor_scalar(k as i64)?
        .f_bitwise_and(mask)?)
}

/// The keep mask of a dropout shard: [`dropout_keep`] of each element's *global* row-major
/// index, evaluated on the device with wrapping int64 arithmetic (splitmix64).
///
/// [`dropout_keep`]: autopar_analyzer::ops::dropout::dropout_keep
fn dropout_mask(
    local: &[i64],
    offsets: &[usize],
    global: &[usize],
    seed: u64,
    ratio: f64,
    device: Device,
) -> R<Tensor> {
    let r = local.len();
    if offsets.len() != r || global.len() != r {
        bail!("offsets {offsets:?} and global shape {global:?} do not fit a rank-{r} shard");
    }
    let gst = autopar_analyzer::Tensor::strides_of(global);
    let mut lin = Tensor::f_zeros(vec![1i64; r], (Kind::Int64, device))?;
    for d in 0..r {
        let ar = Tensor::f_arange(local[d], (Kind::Int64, device))?
            .f_add_scalar(offsets[d] as i64)?
            .f_mul_scalar(gst[d] as i64)?
            .f_reshape(along(r, d, local[d]))?;
        lin = lin.f_add(&ar)?;
    }
    let lin = lin.f_expand(local, false)?;
    let c0 = 0x9E37_79B9_7F4A_7C15u64 as i64;
    let c1 = 0xBF58_476D_1CE4_E5B9u64 as i64;
    let c2 = 0x94D0_49BB_1331_11EBu64 as i64;
    let mut z = lin
        .f_add_scalar(1)?
        .f_mul_scalar(c0)?
        .f_bitwise_xor(seed as i64)?;
    z = z.f_bitwise_xor_tensor(&lsr(&z, 30)?)?.f_mul_scalar(c1)?;
    z = z.f_bitwise_xor_tensor(&lsr(&z, 27)?)?.f_mul_scalar(c2)?;
    z = z.f_bitwise_xor_tensor(&lsr(&z, 31)?)?;
    let u = lsr(&z, 11)?
        .f_to_kind(Kind::Double)?
        .f_div_scalar((1u64 << 53) as f64)?;
    Ok(u.f_ge(ratio)?)
}

fn dropout(op: &Dropout, x: &Tensor, ctx: &LowerCtx<'_>) -> R<Vec<Tensor>> {
    if !(0.0..1.0).contains(&op.ratio) {
        bail!("ratio {} is outside [0, 1)", op.ratio);
    }
    if !op.active() {
        let ones = Tensor::f_ones(x.size(), (Kind::Bool, x.device()))?;
        return Ok(vec![x.shallow_clone(), ones]);
    }
    let Some(offsets) = ctx.input_offsets.first() else {
        bail!("the context gives no input offsets");
    };
    let global = &ctx.global_in(0)?.shape;
    let mask = dropout_mask(
        &x.size(),
        offsets,
        global,
        op.seed ^ ctx.rng_step,
        op.ratio,
        x.device(),
    )?;
    let y = x.f_mul(&mask)?.f_mul_scalar(op.scale())?;
    Ok(vec![y, mask])
}

/// Which labels count (not the ignored index) and a safe class per position (0 where ignored);
/// an error for a counted label outside `[0, classes)`.
fn ce_labels(labels: &Tensor, classes: i64, ignore: Option<i64>) -> R<(Tensor, Tensor)> {
    let l = labels.f_to_kind(Kind::Int64)?;
    let valid = match ignore {
        Some(i) => l.f_ne(i)?,
        None => Tensor::f_ones(l.size(), (Kind::Bool, l.device()))?,
    };
    let out = l.f_lt(0)?.f_logical_or(&l.f_ge(classes)?)?;
    let bad = valid.f_logical_and(&out)?;
    if any_true(&bad)? {
        let v = first_where(&l, &bad)?;
        bail!("label {v} is outside [0, {classes})");
    }
    let safe = l.f_masked_fill(&valid.f_logical_not()?, 0)?;
    Ok((valid, safe))
}

fn classes_of(lp: &Tensor) -> R<i64> {
    match lp.size().get(1) {
        Some(&c) => Ok(c),
        None => bail!("scores must be [N, C, d...], got rank {}", lp.dim()),
    }
}

/// The number of counted labels over the whole group (f32).
fn global_count(valid: &Tensor, ctx: &mut LowerCtx<'_>) -> R<Tensor> {
    let local = valid.f_sum(Kind::Float)?;
    ctx.sum(local)
}

fn cross_entropy(
    op: &SoftmaxCrossEntropy,
    inputs: &[&Tensor],
    ctx: &mut LowerCtx<'_>,
) -> R<Vec<Tensor>> {
    let [scores, labels] = args(inputs)?;
    let k = scores.f_kind()?;
    let c = classes_of(scores)?;
    let lp = scores.f_log_softmax(1, k)?;
    let (valid, safe) = ce_labels(labels, c, op.ignore_index)?;
    let picked = lp
        .f_gather(1, &safe.f_unsqueeze(1)?, false)?
        .f_squeeze_dim(1)?;
    let loss = picked
        .f_neg()?
        .f_masked_fill(&valid.f_logical_not()?, 0.0)?;
    let loss = match op.reduction {
        LossReduction::None => loss,
        LossReduction::Sum => loss.f_sum(k)?,
        LossReduction::Mean => {
            // this shard's share: summing the ranks' partial losses gives the global mean
            let count = global_count(&valid, ctx)?;
            loss.f_sum(Kind::Float)?.f_div(&count)?.f_to_kind(k)?
        }
    };
    Ok(vec![loss, lp])
}

fn cross_entropy_grad(
    op: &SoftmaxCrossEntropyGrad,
    inputs: &[&Tensor],
    ctx: &mut LowerCtx<'_>,
) -> R<Vec<Tensor>> {
    let [dloss, lp, labels] = args(inputs)?;
    let k = lp.f_kind()?;
    let c = classes_of(lp)?;
    let (valid, safe) = ce_labels(labels, c, op.ignore_index)?;
    let onehot = lp
        .f_zeros_like()?
        .f_scatter_value(1, &safe.f_unsqueeze(1)?, 1.0)?;
    let diff = lp.f_exp()?.f_sub(&onehot)?;
    let coef = match op.reduction {
        LossReduction::None => dloss.f_unsqueeze(1)?,
        LossReduction::Sum => dloss.shallow_clone(),
        LossReduction::Mean => {
            let count = global_count(&valid, ctx)?;
            dloss.f_to_kind(Kind::Float)?.f_div(&count)?.f_to_kind(k)?
        }
    };
    let g = diff
        .f_mul(&coef)?
        .f_masked_fill(&valid.f_unsqueeze(1)?.f_logical_not()?, 0.0)?;
    Ok(vec![g])
}

// ---------------------------------------------------------------------------------------------
// attention
//
// The kernels take `[N, H, L, D]`: each operand is permuted to `[batch.., seq, dim]` (a view)
// and its batch-like dims grouped into two. On the CPU the flash kernel
// (`_scaled_dot_product_flash_attention_for_cpu` and its backward) runs every float kind; on
// CUDA the memory-efficient kernel (`_scaled_dot_product_efficient_attention`,
// `_efficient_attention_backward`) runs f32, f16 and bf16; anything else (f64 on CUDA, v with
// another head dim than q and k, a gradient into the log-sum-exp) takes a composed path with
// the same results and an `Lq x Lk` temporary.
//
// Causal masking is bottom-right aligned, and a query block split off the sequence (sequence
// parallelism) starts at a global row: with `shift` the number of keys every local row sees
// beyond its own index, keys `[0, shift)` are visible to every row, keys
// `[shift, shift + lq)` form a square causal block, and the rest are hidden. The kernels run
// on those two pieces (no mask tensor); the forward merges them by their log-sum-exps, and the
// backward of each piece from the merged output and log-sum-exp is the piece's exact share of
// the gradients (as ring attention does).

/// Which implementation runs the attention of these tensors.
#[derive(Copy, Clone, PartialEq, Eq, Debug)]
enum AttnKernel {
    CpuFlash,
    CudaEfficient,
    Composed,
}

/// The kernel for `[N, H, L, D]` operands: the flash kernel wants one head dim for q, k and v.
fn attn_kernel(q4: &Tensor, v4: &Tensor) -> AttnKernel {
    if q4.size().last() != v4.size().last() {
        return AttnKernel::Composed;
    }
    match (q4.device(), q4.kind()) {
        (Device::Cpu, Kind::Float | Kind::Double | Kind::BFloat16 | Kind::Half) => {
            AttnKernel::CpuFlash
        }
        (Device::Cuda(_), Kind::Float | Kind::BFloat16 | Kind::Half) => AttnKernel::CudaEfficient,
        _ => AttnKernel::Composed,
    }
}

/// An operand of the attention ops seen as `[N, H, L, X]` (and back).
struct AttnView {
    /// `[batch.., seq, dim]` from the op's layout.
    perm: Vec<usize>,
    /// The log-sum-exp's `[batch.., seq]` from its layout.
    lse_perm: Vec<usize>,
    /// The sizes of the batch-like dims, in order.
    batch: Vec<i64>,
    /// `N, H`: the batch-like dims grouped in two.
    nh: [i64; 2],
}

impl AttnView {
    fn new(o: &Attention, q: &Tensor) -> R<Self> {
        let r = q.dim();
        if r < 2 || o.seq_axis >= r || o.dim_axis >= r || o.seq_axis == o.dim_axis {
            bail!(
                "seq_axis {} and dim_axis {} do not fit a rank-{r} q",
                o.seq_axis,
                o.dim_axis
            );
        }
        let perm = o.to_rows_perm(r);
        let size = q.size();
        let batch: Vec<i64> = perm[..r - 2].iter().map(|&d| size[d]).collect();
        let nh = match batch.len() {
            0 => [1, 1],
            1 => [batch[0], 1],
            n => [batch[..n - 1].iter().product(), batch[n - 1]],
        };
        Ok(AttnView {
            lse_perm: o.lse_to_rows_perm(r),
            perm,
            batch,
            nh,
        })
    }

    /// `t` (in the op's layout) as `[N, H, L, X]`, last dim contiguous.
    fn to4(&self, t: &Tensor) -> R<Tensor> {
        let x = t.f_permute(i64s(&self.perm))?;
        let size = x.size();
        let r = size.len();
        let x = x.f_reshape([self.nh[0], self.nh[1], size[r - 2], size[r - 1]])?;
        Ok(if x.stride().last() == Some(&1) {
            x
        } else {
            x.f_contiguous()?
        })
    }

    /// `[N, H, L, X]` back to the op's layout.
    fn from4(&self, t: &Tensor) -> R<Tensor> {
        let size = t.size();
        let mut shape = self.batch.clone();
        shape.extend([size[2], size[3]]);
        Ok(t.f_reshape(shape)?.f_permute(i64s(&inverse(&self.perm)))?)
    }

    /// The log-sum-exp (in its layout) as `[N, H, L]`.
    fn lse_to3(&self, t: &Tensor) -> R<Tensor> {
        let x = t.f_permute(i64s(&self.lse_perm))?;
        let l = x.size().last().copied().unwrap_or(1);
        Ok(x.f_reshape([self.nh[0], self.nh[1], l])?)
    }

    /// `[N, H, L]` back to the log-sum-exp's layout.
    fn lse_from3(&self, t: &Tensor) -> R<Tensor> {
        let mut shape = self.batch.clone();
        shape.push(t.size()[2]);
        Ok(t.f_reshape(shape)?
            .f_permute(i64s(&inverse(&self.lse_perm)))?)
    }
}

fn inverse(perm: &[usize]) -> Vec<usize> {
    let mut inv = vec![0; perm.len()];
    for (i, &p) in perm.iter().enumerate() {
        inv[p] = i;
    }
    inv
}

/// The key ranges the kernels run on: `(start, len, causal)`.
type Pieces = Vec<(i64, i64, bool)>;

/// The problem sizes, checked by the op, and the pieces of the key sequence (see the section
/// comment) for this rank's block of queries.
fn attn_pieces(
    o: &Attention,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    ctx: &LowerCtx<'_>,
) -> R<(i64, i64, Pieces)> {
    let (qt, kt, vt) = (tensor_type(q), tensor_type(k), tensor_type(v));
    let (qt, kt, vt) = match (qt, kt, vt) {
        (Ok(a), Ok(b), Ok(c)) => (a, b, c),
        _ => bail!("q, k and v must have IR dtypes"),
    };
    let sz = o.check(&qt, &kt, &vt)?;
    let (lq, lk) = (sz.lq as i64, sz.lk as i64);
    if !o.causal {
        return Ok((lq, lk, vec![(0, lk, false)]));
    }
    let s = o.seq_axis;
    let Some(&offset) = ctx.input_offsets.first().and_then(|off| off.get(s)) else {
        bail!("the context gives no offset of q's sequence axis");
    };
    let global_lq = ctx.global_in(0)?.shape.get(s).copied().unwrap_or(0) as i64;
    let global_lk = ctx.global_in(1)?.shape.get(s).copied().unwrap_or(0) as i64;
    if global_lk != lk {
        bail!(
            "the key sequence is split ({lk} of {global_lk} keys here): attention needs every key"
        );
    }
    let shift = offset as i64 + lk - global_lq;
    if shift < 0 || shift + lq > lk {
        bail!(
            "a block of {lq} queries at row {offset} of {global_lq} does not fit {lk} causal keys"
        );
    }
    let mut pieces = vec![];
    if shift > 0 {
        pieces.push((0, shift, false));
    }
    if lq > 0 {
        pieces.push((shift, lq, true));
    }
    Ok((lq, lk, pieces))
}

/// One kernel call on keys `[start, start + len)`: `(out [N,H,Lq,E], lse [N,H,Lq] in f32 / f64)`.
fn attn_piece(
    kernel: AttnKernel,
    q4: &Tensor,
    k4: &Tensor,
    v4: &Tensor,
    causal: bool,
    scale: f64,
) -> R<(Tensor, Tensor)> {
    let acc = acc_kind(q4.kind());
    let (out, lse) = match kernel {
        AttnKernel::CpuFlash => Tensor::f_internal_scaled_dot_product_flash_attention_for_cpu(
            q4,
            k4,
            v4,
            0.0,
            causal,
            None::<Tensor>,
            scale,
        )?,
        AttnKernel::CudaEfficient => {
            let (out, lse, _, _) = Tensor::f_internal_scaled_dot_product_efficient_attention(
                q4,
                k4,
                v4,
                None::<Tensor>,
                true,
                0.0,
                causal,
                scale,
            )?;
            // the kernel pads the log-sum-exp's rows to a multiple of 32
            let lq = q4.size()[2];
            (out, lse.f_narrow(2, 0, lq)?)
        }
        AttnKernel::Composed => {
            let s = composed_scores(q4, k4, causal, 0, scale)?;
            let lse = s.f_logsumexp([-1], false)?;
            let p = s.f_sub(&lse.f_unsqueeze(-1)?)?.f_exp()?;
            let out = p.f_matmul(&v4.f_to_kind(acc)?)?.f_to_kind(q4.kind())?;
            (out, lse)
        }
    };
    Ok((out, lse.f_to_kind(acc)?))
}

/// Scaled scores `[N,H,Lq,Lk]` in f32 / f64, `-inf` where query `i` may not see key `j`
/// (`j > i + shift` under `causal`).
fn composed_scores(q4: &Tensor, k4: &Tensor, causal: bool, shift: i64, scale: f64) -> R<Tensor> {
    let acc = acc_kind(q4.kind());
    let s = q4
        .f_to_kind(acc)?
        .f_matmul(&k4.f_to_kind(acc)?.f_transpose(-2, -1)?)?
        .f_mul_scalar(scale)?;
    if !causal {
        return Ok(s);
    }
    let (lq, lk) = (q4.size()[2], k4.size()[2]);
    let dev = q4.device();
    let i = Tensor::f_arange(lq, (Kind::Int64, dev))?.f_view([lq, 1])?;
    let j = Tensor::f_arange(lk, (Kind::Int64, dev))?.f_view([1, lk])?;
    let hidden = j.f_gt_tensor(&i.f_add_scalar(shift)?)?;
    Ok(s.f_masked_fill(&hidden, f64::NEG_INFINITY)?)
}

fn attention(
    o: &Attention,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    ctx: &LowerCtx<'_>,
) -> R<Vec<Tensor>> {
    let (_, _, pieces) = attn_pieces(o, q, k, v, ctx)?;
    let view = AttnView::new(o, q)?;
    let (q4, k4, v4) = (view.to4(q)?, view.to4(k)?, view.to4(v)?);
    let kernel = attn_kernel(&q4, &v4);
    let mut parts = vec![];
    for &(start, len, causal) in &pieces {
        let (kp, vp) = (k4.f_narrow(2, start, len)?, v4.f_narrow(2, start, len)?);
        parts.push(attn_piece(kernel, &q4, &kp, &vp, causal, o.scale)?);
    }
    let (out, lse) = match parts.len() {
        1 => parts.remove(0),
        2 => {
            let (o2, l2) = parts.remove(1);
            let (o1, l1) = parts.remove(0);
            let lse = l1.f_logaddexp(&l2)?;
            let acc = l1.kind();
            let w = |l: &Tensor| -> R<Tensor> { Ok(l.f_sub(&lse)?.f_exp()?.f_unsqueeze(-1)?) };
            let out = o1
                .f_to_kind(acc)?
                .f_mul(&w(&l1)?)?
                .f_add(&o2.f_to_kind(acc)?.f_mul(&w(&l2)?)?)?
                .f_to_kind(q.kind())?;
            (out, lse)
        }
        n => bail!("{n} pieces of keys: an empty query block?"),
    };
    Ok(vec![view.from4(&out)?, view.lse_from3(&lse)?])
}

fn attention_grad(o: &AttentionGrad, inputs: &[&Tensor], ctx: &LowerCtx<'_>) -> R<Vec<Tensor>> {
    let (q, k, v, out, lse, dout, dlse) = match inputs {
        [q, k, v, out, lse, dout] => (*q, *k, *v, *out, *lse, *dout, None),
        [q, k, v, out, lse, dout, dlse] => (*q, *k, *v, *out, *lse, *dout, Some(*dlse)),
        _ => bail!(
            "takes 6 or 7 inputs (q, k, v, out, lse, dout[, dlse]), got {}",
            inputs.len()
        ),
    };
    let fwd = Attention {
        seq_axis: o.seq_axis,
        dim_axis: o.dim_axis,
        causal: o.causal,
        scale: o.scale,
    };
    let (lq, lk, pieces) = attn_pieces(&fwd, q, k, v, ctx)?;
    let view = AttnView::new(&fwd, q)?;
    let acc = acc_kind(q.kind());
    let (q4, k4, v4) = (view.to4(q)?, view.to4(k)?, view.to4(v)?);
    let (out4, dout4) = (view.to4(out)?, view.to4(dout)?);
    // under bf16 mixed precision the executor hands the log-sum-exp back in bf16
    let lse3 = view.lse_to3(lse)?.f_to_kind(acc)?;
    let kind = q.kind();
    let kernel = attn_kernel(&q4, &v4);
    if dlse.is_some() || kernel == AttnKernel::Composed {
        // one pass over all keys with the explicit mask
        let shift = match pieces.as_slice() {
            [.., (start, _, true)] => *start,
            _ => 0,
        };
        let dlse3 = match dlse {
            Some(t) => Some(view.lse_to3(t)?.f_to_kind(acc)?),
            None => None,
        };
        let [dq, dk, dv] = composed_backward(
            &q4,
            &k4,
            &v4,
            &out4,
            &lse3,
            &dout4,
            dlse3.as_ref(),
            fwd.causal,
            shift,
            fwd.scale,
        )?;
        return Ok(vec![
            view.from4(&dq.f_to_kind(kind)?)?,
            view.from4(&dk.f_to_kind(kind)?)?,
            view.from4(&dv.f_to_kind(kind)?)?,
        ]);
    }
    let mut dq: Option<Tensor> = None;
    let (mut dks, mut dvs) = (vec![], vec![]);
    let mut end = 0;
    for &(start, len, causal) in &pieces {
        let (kp, vp) = (k4.f_narrow(2, start, len)?, v4.f_narrow(2, start, len)?);
        let (dqp, dkp, dvp) = piece_backward(
            kernel, &q4, &kp, &vp, &out4, &lse3, &dout4, causal, fwd.scale,
        )?;
        dq = Some(match dq {
            None => dqp.f_to_kind(acc)?,
            Some(d) => d.f_add(&dqp.f_to_kind(acc)?)?,
        });
        dks.push(dkp);
        dvs.push(dvp);
        end = start + len;
    }
    let Some(dq) = dq else {
        bail!("no keys to differentiate against ({lq} queries, {lk} keys)");
    };
    // keys no query of this block sees get zero gradients
    if end < lk {
        for (list, x) in [(&mut dks, &k4), (&mut dvs, &v4)] {
            let mut shape = x.size();
            shape[2] = lk - end;
            list.push(Tensor::f_zeros(shape, (kind, x.device()))?);
        }
    }
    let dk = Tensor::f_cat(&dks, 2)?;
    let dv = Tensor::f_cat(&dvs, 2)?;
    Ok(vec![
        view.from4(&dq.f_to_kind(kind)?)?,
        view.from4(&dk)?,
        view.from4(&dv)?,
    ])
}

/// The gradients of one piece of keys from the merged output and log-sum-exp.
#[allow(clippy::too_many_arguments)]
fn piece_backward(
    kernel: AttnKernel,
    q4: &Tensor,
    k4: &Tensor,
    v4: &Tensor,
    out4: &Tensor,
    lse3: &Tensor,
    dout4: &Tensor,
    causal: bool,
    scale: f64,
) -> R<(Tensor, Tensor, Tensor)> {
    match kernel {
        AttnKernel::CpuFlash => Ok(
            Tensor::f_internal_scaled_dot_product_flash_attention_for_cpu_backward(
                dout4,
                q4,
                k4,
                v4,
                out4,
                lse3,
                0.0,
                causal,
                None::<Tensor>,
                scale,
            )?,
        ),
        AttnKernel::CudaEfficient => {
            // this kernel takes [N, L, H, D] and the log-sum-exp padded to a multiple of 32
            // rows with +inf, as the forward leaves it. The operands are made contiguous in
            // that layout: in bf16 the kernel reads `out` wrongly (NaNs, on an H100 with
            // libtorch 2.11) when it is a transposed view, which it is when the forward's
            // output was copied in another layout
            let t = |x: &Tensor| x.f_transpose(1, 2)?.f_contiguous();
            let size = q4.size();
            let (lq, lk) = (size[2], k4.size()[2]);
            let pad = (lq + 31) / 32 * 32 - lq;
            let tail = Tensor::f_full(
                [size[0], size[1], pad],
                f64::INFINITY,
                (Kind::Float, q4.device()),
            )?;
            let lse = Tensor::f_cat(&[lse3.f_to_kind(Kind::Float)?, tail], 2)?;
            let none = Tensor::f_zeros([], (Kind::Int64, Device::Cpu))?;
            let (dq, dk, dv, _) = Tensor::f_internal_efficient_attention_backward(
                &t(dout4)?,
                &t(q4)?,
                &t(k4)?,
                &t(v4)?,
                None::<Tensor>,
                &t(out4)?,
                None::<Tensor>,
                None::<Tensor>,
                lq,
                lk,
                &lse,
                0.0,
                &none,
                &none,
                // sdp::CustomMaskType: 0 none, 1 causal from the top left
                i64::from(causal),
                false,
                scale,
                None::<i64>,
                None::<i64>,
                false,
            )?;
            let back = |x: &Tensor| x.f_transpose(1, 2);
            Ok((back(&dq)?, back(&dk)?, back(&dv)?))
        }
        AttnKernel::Composed => {
            let [dq, dk, dv] =
                composed_backward(q4, k4, v4, out4, lse3, dout4, None, causal, 0, scale)?;
            let kind = q4.kind();
            Ok((
                dq.f_to_kind(kind)?,
                dk.f_to_kind(kind)?,
                dv.f_to_kind(kind)?,
            ))
        }
    }
}

/// The backward in matmuls (see `AttentionGrad`'s doc), in f32 / f64.
#[allow(clippy::too_many_arguments)]
fn composed_backward(
    q4: &Tensor,
    k4: &Tensor,
    v4: &Tensor,
    out4: &Tensor,
    lse3: &Tensor,
    dout4: &Tensor,
    dlse3: Option<&Tensor>,
    causal: bool,
    shift: i64,
    scale: f64,
) -> R<[Tensor; 3]> {
    let acc = acc_kind(q4.kind());
    let up = |x: &Tensor| x.f_to_kind(acc);
    let (q, k, v, out, dout) = (up(q4)?, up(k4)?, up(v4)?, up(out4)?, up(dout4)?);
    let p = composed_scores(q4, k4, causal, shift, scale)?
        .f_sub(&up(lse3)?.f_unsqueeze(-1)?)?
        .f_exp()?;
    let dv = p.f_transpose(-2, -1)?.f_matmul(&dout)?;
    let dp = dout.f_matmul(&v.f_transpose(-2, -1)?)?;
    let mut delta = dout
        .f_mul(&out)?
        .f_sum_dim_intlist(&[-1i64][..], false, acc)?;
    if let Some(d) = dlse3 {
        delta = delta.f_sub(&up(d)?)?;
    }
    let ds = p
        .f_mul(&dp.f_sub(&delta.f_unsqueeze(-1)?)?)?
        .f_mul_scalar(scale)?;
    let dq = ds.f_matmul(&k)?;
    let dk = ds.f_transpose(-2, -1)?.f_matmul(&q)?;
    Ok([dq, dk, dv])
}
