//! The ONNX op lowerings: one file per op or small family (burn-onnx style), each with a doc
//! header naming the spec (<https://onnx.ai/onnx/operators/>) and the opsets it handles, and
//! one dispatch table, [`TABLE`], from `op_type` to its lowering.
//!
//! A lowering reads its node through [`Lowering`] and returns one value per ONNX output it
//! supports (an output it cannot produce is reported by the driver if the model uses it).
//! It emits IR ops through the builder, so shape inference runs and constant inputs fold on
//! the spot; ops whose outputs depend only on types (`Shape`, `Size`) or constants
//! (`Constant`, `Range`, `ConstantOfShape`, `NonZero`) are evaluated directly.

use super::lower::{LResult, Lowering};
use crate::graph::ValueId;

mod batch_norm;
mod binary;
mod cast;
mod clip;
mod concat;
mod constant;
mod conv;
mod cross_entropy;
mod dropout;
mod einsum;
mod expand;
mod gather;
mod identity;
mod layer_norm;
mod matmul;
mod non_zero;
mod one_hot;
mod pad;
mod pool;
mod range;
mod reduce;
mod reshape;
mod scatter;
mod shape;
mod slice;
mod softmax;
mod split;
mod tile;
mod top_k;
mod transpose;
mod unary;
mod where_op;

/// Lowers one ONNX node; returns the values of its outputs, in order.
pub type LowerFn = fn(&mut Lowering<'_>) -> LResult<Vec<ValueId>>;

/// Every supported `op_type` of the default domain and its lowering, sorted by name.
pub const TABLE: &[(&str, LowerFn)] = &[
    ("Abs", unary::abs),
    ("Add", binary::add),
    ("And", binary::and),
    ("AveragePool", pool::average_pool),
    ("BatchNormalization", batch_norm::batch_norm),
    ("Cast", cast::cast),
    ("CastLike", cast::cast_like),
    ("Ceil", unary::ceil),
    ("Clip", clip::clip),
    ("Concat", concat::concat),
    ("Constant", constant::constant),
    ("ConstantOfShape", constant::constant_of_shape),
    ("Conv", conv::conv),
    ("Cos", unary::cos),
    ("Div", binary::div),
    ("Dropout", dropout::dropout),
    ("Einsum", einsum::einsum),
    ("Equal", binary::equal),
    ("Erf", unary::erf),
    ("Exp", unary::exp),
    ("Expand", expand::expand),
    ("Flatten", reshape::flatten),
    ("Floor", unary::floor),
    ("Gather", gather::gather),
    ("GatherND", gather::gather_nd),
    ("Gelu", unary::gelu),
    ("Gemm", matmul::gemm),
    ("GlobalAveragePool", pool::global_average_pool),
    ("GlobalMaxPool", pool::global_max_pool),
    ("Greater", binary::greater),
    ("GreaterOrEqual", binary::greater_or_equal),
    ("Identity", identity::identity),
    ("IsInf", unary::is_inf),
    ("IsNaN", unary::is_nan),
    ("LayerNormalization", layer_norm::layer_norm),
    ("Less", binary::less),
    ("LessOrEqual", binary::less_or_equal),
    ("Log", unary::log),
    ("LogSoftmax", softmax::log_softmax),
    ("MatMul", matmul::matmul),
    ("Max", binary::max),
    ("MaxPool", pool::max_pool),
    ("Mean", binary::mean),
    ("Min", binary::min),
    ("Mod", binary::modulo),
    ("Mul", binary::mul),
    ("Neg", unary::neg),
    ("NonZero", non_zero::non_zero),
    ("Not", unary::not),
    ("OneHot", one_hot::one_hot),
    ("Or", binary::or),
    ("Pad", pad::pad),
    ("Pow", binary::pow),
    ("Range", range::range),
    ("Reciprocal", unary::reciprocal),
    ("ReduceL2", reduce::reduce_l2),
    ("ReduceMax", reduce::reduce_max),
    ("ReduceMean", reduce::reduce_mean),
    ("ReduceMin", reduce::reduce_min),
    ("ReduceSum", reduce::reduce_sum),
    ("ReduceSumSquare", reduce::reduce_sum_square),
    ("Relu", unary::relu),
    ("Reshape", reshape::reshape),
    ("ScatterElements", scatter::scatter_elements),
    ("ScatterND", scatter::scatter_nd),
    ("Shape", shape::shape),
    ("Sigmoid", unary::sigmoid),
    ("Sign", unary::sign),
    ("Sin", unary::sin),
    ("Size", shape::size),
    ("Slice", slice::slice),
    ("Softmax", softmax::softmax),
    (
        "SoftmaxCrossEntropyLoss",
        cross_entropy::softmax_cross_entropy,
    ),
    ("Softplus", unary::softplus),
    ("Split", split::split),
    ("Sqrt", unary::sqrt),
    ("Squeeze", reshape::squeeze),
    ("Sub", binary::sub),
    ("Sum", binary::sum),
    ("Tanh", unary::tanh),
    ("Tile", tile::tile),
    ("TopK", top_k::top_k),
    ("Transpose", transpose::transpose),
    ("Unsqueeze", reshape::unsqueeze),
    ("Where", where_op::where_),
    ("Xor", binary::xor),
];

/// The lowering of `op_type`, if the importer supports it.
pub fn lookup(op_type: &str) -> Option<LowerFn> {
    TABLE
        .binary_search_by(|(name, _)| (*name).cmp(op_type))
        .ok()
        .map(|i| TABLE[i].1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_is_sorted_and_unique() {
        for w in TABLE.windows(2) {
            assert!(w[0].0 < w[1].0, "{} before {}", w[0].0, w[1].0);
        }
        assert!(lookup("MatMul").is_some());
        assert!(lookup("Loop").is_none());
    }
}
