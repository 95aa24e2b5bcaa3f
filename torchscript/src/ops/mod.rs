//! The aten / prim op lowerings, one file per family, and the one dispatch function,
//! [`lookup`], from a node kind (`aten::linear`) to its lowering.
//!
//! A lowering reads its node through [`Cx`] and returns one [`Val`] per TorchScript output.
//! In-place variants (`aten::add_`, `aten::relu_`) are dispatched to the out-of-place lowering
//! by the driver, which then rebinds the mutated input to the result.

use crate::lower::{Cx, LResult, Val};

pub mod create;
pub mod elementwise;
pub mod linear;
pub mod nn;
pub mod prim;
pub mod shape;

/// Lowers one node; returns the values of its outputs, in order.
pub type LowerFn = fn(&mut Cx<'_>) -> LResult<Vec<Val>>;

/// The lowering of a node kind, if the importer supports it (`prim::Constant` and
/// `prim::GetAttr` are the driver's).
pub fn lookup(kind: &str) -> Option<LowerFn> {
    use elementwise as ew;
    Some(match kind {
        // plumbing and numbers
        "prim::ListConstruct" => prim::list_construct,
        "prim::TupleConstruct" => prim::tuple_construct,
        "prim::ListUnpack" | "prim::TupleUnpack" => prim::unpack,
        "prim::TupleIndex" | "aten::__getitem__" | "aten::select.t" => prim::get_item,
        "aten::len" => prim::len,
        "aten::size" | "aten::sym_size" => prim::size,
        "aten::dim" => prim::dim,
        "aten::numel" => prim::numel,
        "prim::dtype" => prim::dtype,
        "prim::device" => prim::device,
        "prim::NumToTensor" => prim::num_to_tensor,
        "aten::scalar_tensor" => prim::scalar_tensor,
        "aten::Int" | "aten::Float" | "aten::Bool" | "aten::ScalarImplicit" | "aten::item" => {
            prim::to_number
        }
        "aten::contiguous"
        | "aten::clone"
        | "aten::detach"
        | "aten::alias"
        | "prim::data"
        | "aten::lift_fresh"
        | "aten::requires_grad_"
        | "aten::resolve_conj"
        | "aten::resolve_neg" => prim::identity,
        "aten::to" | "aten::type_as" => prim::to,
        "aten::dropout" | "aten::feature_dropout" => prim::dropout,
        // elementwise
        "aten::add" | "aten::sub" | "aten::subtract" | "aten::rsub" | "aten::mul"
        | "aten::multiply" | "aten::maximum" | "aten::minimum" | "prim::max" | "prim::min" => {
            ew::arith
        }
        "aten::div" | "aten::divide" | "aten::true_divide" | "aten::floor_divide"
        | "aten::floordiv" | "aten::remainder" => ew::div,
        "aten::pow" => ew::pow,
        "aten::eq"
        | "aten::ne"
        | "aten::lt"
        | "aten::le"
        | "aten::gt"
        | "aten::ge"
        | "aten::less"
        | "aten::less_equal"
        | "aten::greater"
        | "aten::greater_equal" => ew::compare,
        "aten::__and__" | "aten::__or__" | "aten::__xor__" | "aten::bitwise_and"
        | "aten::bitwise_or" | "aten::bitwise_xor" | "aten::logical_and" | "aten::logical_or"
        | "aten::logical_xor" => ew::logic,
        "aten::where" => ew::where_,
        "aten::masked_fill" => ew::masked_fill,
        "aten::clamp" | "aten::clip" | "aten::clamp_min" | "aten::clamp_max" | "aten::hardtanh"
        | "aten::relu6" => ew::clamp,
        "aten::neg" | "aten::negative" | "aten::abs" | "aten::exp" | "aten::log" | "aten::sqrt"
        | "aten::rsqrt" | "aten::reciprocal" | "aten::sin" | "aten::cos" | "aten::tanh"
        | "aten::sigmoid" | "aten::relu" | "aten::silu" | "aten::gelu" | "aten::erf"
        | "aten::floor" | "aten::ceil" | "aten::sign" | "aten::logical_not"
        | "aten::bitwise_not" | "aten::isnan" | "aten::isinf" | "aten::square" => ew::unary,
        // contractions
        "aten::linear" => linear::linear,
        "aten::addmm" => linear::addmm,
        "aten::mm" | "aten::bmm" | "aten::matmul" => linear::matmul,
        "aten::einsum" => linear::einsum,
        // layout
        "aten::view" | "aten::reshape" | "aten::view_as" | "aten::reshape_as"
        | "aten::_unsafe_view" => shape::reshape,
        "aten::flatten" => shape::flatten,
        "aten::unflatten" => shape::unflatten,
        "aten::transpose" | "aten::swapaxes" | "aten::t" | "aten::numpy_T" | "aten::permute" => {
            shape::transpose
        }
        "aten::unsqueeze" => shape::unsqueeze,
        "aten::squeeze" => shape::squeeze,
        "aten::expand" | "aten::expand_as" | "aten::broadcast_to" => shape::expand,
        "aten::repeat" => shape::repeat,
        "aten::slice" => shape::slice,
        "aten::narrow" => shape::narrow,
        "aten::select" => shape::select,
        "aten::unbind" => shape::unbind,
        "aten::cat" | "aten::concat" | "aten::concatenate" => shape::cat,
        "aten::stack" => shape::stack,
        "aten::split"
        | "aten::split_with_sizes"
        | "aten::unsafe_split"
        | "aten::chunk"
        | "aten::unsafe_chunk" => shape::split,
        "aten::index" => shape::index,
        "aten::index_select" => shape::index_select,
        "aten::repeat_interleave" => shape::repeat_interleave,
        "aten::pad" | "aten::constant_pad_nd" => shape::pad,
        // factories
        "aten::ones" | "aten::zeros" | "aten::empty" | "aten::full" | "aten::new_ones"
        | "aten::new_zeros" | "aten::new_empty" | "aten::new_full" => create::factory,
        "aten::ones_like" | "aten::zeros_like" | "aten::empty_like" | "aten::full_like" => {
            create::like
        }
        "aten::arange" => create::arange,
        // neural-network ops
        "aten::embedding" => nn::embedding,
        "aten::softmax" | "aten::log_softmax" => nn::softmax,
        "aten::scaled_dot_product_attention" => nn::sdpa,
        "aten::cross_entropy_loss" => nn::cross_entropy,
        "aten::layer_norm" => nn::layer_norm,
        "aten::rms_norm" => nn::rms_norm,
        "aten::batch_norm" => nn::batch_norm,
        "aten::_convolution" | "aten::convolution" | "aten::conv1d" | "aten::conv2d"
        | "aten::conv3d" => nn::conv,
        "aten::max_pool1d" | "aten::max_pool2d" | "aten::max_pool3d" | "aten::avg_pool1d"
        | "aten::avg_pool2d" | "aten::avg_pool3d" => nn::pool,
        "aten::adaptive_avg_pool1d" | "aten::adaptive_avg_pool2d" | "aten::adaptive_avg_pool3d" => {
            nn::adaptive_avg_pool
        }
        "aten::mean" | "aten::sum" | "aten::amax" | "aten::amin" => nn::reduce,
        "aten::topk" => nn::topk,
        _ => return None,
    })
}

/// The out-of-place kind of an in-place op (`aten::add_` -> `aten::add`), if it is one.
pub fn out_of_place(kind: &str) -> Option<&str> {
    let (ns, name) = kind.split_once("::")?;
    if ns != "aten" || name.starts_with("__") || !name.ends_with('_') {
        return None;
    }
    Some(&kind[..kind.len() - 1])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dispatches_and_recognises_in_place_ops() {
        assert!(lookup("aten::linear").is_some());
        assert!(lookup("aten::unique").is_none());
        assert_eq!(out_of_place("aten::relu_"), Some("aten::relu"));
        assert_eq!(out_of_place("aten::__and__"), None);
        assert_eq!(out_of_place("aten::relu"), None);
    }
}
