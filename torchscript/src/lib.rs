//! The TorchScript importer of autopar: a `torch.jit.save` archive (`.pt`) becomes a typed
//! analyzer [`Graph`], like an ONNX file does.
//!
//! Why it looks the way it does:
//! - The archive's program is Python-like source that only libtorch compiles, so a small C++
//!   shim (`shim/shim.cpp`, built against the libtorch tch links) loads it with
//!   `torch::jit::load`, inlines every submodule call of `forward`, resolves the module
//!   attribute reads to named parameters, buffers and constants, and hands the straight-line
//!   graph over as JSON ([`dump`]). Only [`ffi`] touches C.
//! - Everything else is Rust: TorchScript values become [`lower::Val`]s, where tensors are IR
//!   values and ints, lists and tuples are known at import time (shapes are static), so
//!   `aten::size` arithmetic and `prim::` list/tuple plumbing fold away; tensor arithmetic on
//!   constants folds through the builder (`fold_constants`), as in the ONNX importer.
//! - One file per aten op family under [`ops`], one dispatch function ([`ops::lookup`]).
//! - Input shapes come from the example inputs `torch.jit.trace` stores in the archive
//!   (`traced_inputs.pkl`), or from the user (`--input NAME=DIMS[:dtype]`).
//! - Weights: parameters are `nn.Parameter`s of the module (tied ones once), with their bytes
//!   inline. Buffers read as BatchNorm running statistics stay buffers; other buffers with data
//!   (rotary `inv_freq`, masks) are not trained and become constants, so what is computed from
//!   them folds (the ONNX importer's classification). Archives whose weight records were
//!   emptied (the corpus's graph-only `.jit.pt`) still load, libtorch leaving those storages
//!   unallocated: such weights are [`WeightData::Absent`] and planning works as for ONNX files
//!   without external data.
//! - The loss is the first `aten::cross_entropy_loss` with a scalar result (the graph output
//!   it reaches is named `loss`).
//! - Every failure is an error naming the node (its outputs, module path and source line), its
//!   schema and the reason; an unsupported op names its schema.
//!
//! Entry points: [`import_torchscript`]; [`LibtorchModule`] runs the archive's own forward in
//! libtorch (weights settable by name), the reference the imported graph is checked against.
//!
//! [`Graph`]: autopar_analyzer::Graph
//! [`WeightData::Absent`]: autopar_analyzer::WeightData::Absent

pub mod dump;
mod ffi;
mod import;
pub mod lower;
pub mod ops;
mod reference;

use autopar_analyzer::onnx::ImportOptions;
use autopar_analyzer::{AnalyzerError, Graph, ValueId};
use std::path::Path;

pub use import::clean_name;
pub use reference::{to_le_bytes, LibtorchModule};

/// An imported TorchScript module.
#[derive(Clone, Debug)]
pub struct TorchScriptModel {
    pub graph: Graph,
    /// The training loss: the first `aten::cross_entropy_loss` with a scalar result.
    pub loss: Option<ValueId>,
}

/// Imports the TorchScript archive at `path` (its `forward` method). Input shapes come from
/// the example inputs the archive records, or from `opts.input_overrides`.
pub fn import_torchscript(
    path: &Path,
    opts: &ImportOptions,
) -> Result<TorchScriptModel, AnalyzerError> {
    import::import(path, opts)
}
