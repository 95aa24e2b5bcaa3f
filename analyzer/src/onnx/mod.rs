//! The ONNX importer: a `.onnx` file (PyTorch's TorchScript-based exporter, opset 17, or its
//! dynamo exporter, opset 18) becomes a typed [`Graph`].
//!
//! Why it looks the way it does:
//! - The protobuf messages are hand-written `prost` structs ([`proto`]): no `protoc` at build
//!   time, and only the fields the importer reads.
//! - Weights are never read eagerly: an initializer stored in external data is recorded as
//!   [`WeightData::External`] (the path as opened from the working directory), also when the
//!   file is missing, so graph-only exports still plan and a run names the missing file; this
//!   is what lets files with many GiB of weights import in milliseconds. Only small
//!   non-trainable tensors are read, to become constants.
//! - Which initializers are trainable follows one documented rule (the corpus's
//!   "graph_params rule", [`classify`]): float tensors of more than one element are parameters
//!   unless every use is a non-differentiable input.
//! - Import goes through [`GraphBuilder`] with constant folding on, so the exporters' shape
//!   arithmetic (`Shape -> Gather -> Concat -> Reshape`) disappears into constants, and ops
//!   whose attributes must be known (a reshape's target, a slice's bounds) read them from
//!   folded constants. `Shape`, `Size`, `Constant`, `ConstantOfShape`, `Range`, `Identity` and
//!   a constant `NonZero` are evaluated here from the known types.
//! - One file per ONNX op (or small family) under [`ops`], each naming the spec and opsets it
//!   handles, and one dispatch table ([`ops::TABLE`]).
//! - After lowering, the exporters' decompositions of ops a TorchScript graph keeps whole (GELU's
//!   erf formula, `1 / sqrt`, attention's materialised `K^T`, scale and mask arithmetic) are
//!   rewritten into the TorchScript importer's form ([`patterns`]), so both exports of one
//!   model plan alike and the attention fusion sees one form.
//! - Every failure is an error naming the ONNX node, its op type and the reason; nothing a
//!   model file contains can make the importer panic.
//!
//! Entry points: [`import_onnx`] (a file), [`import_onnx_bytes`] (bytes plus the directory
//! external data is relative to), [`parse_input_override`] (the CLI's `--input NAME=8x1024:i64`).
//!
//! [`WeightData::External`]: crate::graph::WeightData::External

pub mod classify;
pub mod compact;
mod import;
mod lower;
pub mod ops;
pub mod patterns;
pub mod proto;
mod weights;

use crate::builder::GraphBuilder;
use crate::dtype::DType;
use crate::error::AnalyzerError;
use crate::graph::{Graph, ValueId};
use std::path::Path;

pub use lower::{LowerError, Lowering};

/// Lowest opset of the default domain the importer accepts.
pub const MIN_OPSET: i64 = 13;
/// Highest opset of the default domain the importer accepts.
pub const MAX_OPSET: i64 = 21;

/// Sets the shape (and optionally the dtype) of one graph input, for dynamic axes or to
/// import at another batch size than the file was exported with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InputOverride {
    pub name: String,
    pub shape: Vec<usize>,
    /// `None` keeps the dtype the file declares.
    pub dtype: Option<DType>,
}

impl InputOverride {
    pub fn new(
        name: impl Into<String>,
        shape: impl Into<Vec<usize>>,
        dtype: Option<DType>,
    ) -> Self {
        Self {
            name: name.into(),
            shape: shape.into(),
            dtype,
        }
    }
}

#[derive(Clone, Debug, Default)]
pub struct ImportOptions {
    /// Shapes for graph inputs, replacing what the file declares.
    pub input_overrides: Vec<InputOverride>,
}

/// An imported model.
#[derive(Clone, Debug)]
pub struct ImportedModel {
    pub graph: Graph,
    /// The training loss: the graph output named `loss`, else the first
    /// `SoftmaxCrossEntropyLoss` node's loss output.
    pub loss: Option<ValueId>,
    /// Opset of the default domain.
    pub opset: i64,
    /// `producer_name producer_version`, e.g. `pytorch 2.11.0`.
    pub producer: String,
}

/// Imports the model at `path`; external data is looked up next to it.
pub fn import_onnx(path: &Path, opts: &ImportOptions) -> Result<ImportedModel, AnalyzerError> {
    let file_err = |reason: String| AnalyzerError::File {
        path: path.display().to_string(),
        reason,
    };
    let bytes = std::fs::read(path).map_err(|e| file_err(format!("cannot read: {e}")))?;
    let model = decode_model(&bytes).map_err(file_err)?;
    drop(bytes);
    let base_dir = path.parent().unwrap_or_else(|| Path::new(""));
    import::import_model(model, base_dir, opts)
}

/// Imports a model from its bytes; external data locations are relative to `base_dir`.
pub fn import_onnx_bytes(
    bytes: &[u8],
    base_dir: &Path,
    opts: &ImportOptions,
) -> Result<ImportedModel, AnalyzerError> {
    let model = decode_model(bytes).map_err(AnalyzerError::Other)?;
    import::import_model(model, base_dir, opts)
}

/// Decodes the protobuf; the error says why the bytes are not an ONNX model.
pub fn decode_model(bytes: &[u8]) -> Result<proto::ModelProto, String> {
    use prost::Message;
    let model = proto::ModelProto::decode(bytes).map_err(|e| format!("not an ONNX model: {e}"))?;
    if model.graph.is_none() {
        return Err("not an ONNX model: it has no graph".into());
    }
    if model.opset_import.is_empty() {
        return Err("not an ONNX model: it imports no opset".into());
    }
    Ok(model)
}

/// Parses `NAME=8x1024:i64` (the CLI's `--input`): dims separated by `x` (empty for a scalar),
/// an optional `:dtype` (`f32`, `i64`, `bool`, ... or their long names).
pub fn parse_input_override(s: &str) -> Result<InputOverride, AnalyzerError> {
    let err = |reason: String| AnalyzerError::Input {
        name: s.to_string(),
        reason,
    };
    let Some((name, spec)) = s.rsplit_once('=') else {
        return Err(err(
            "expected NAME=SHAPE[:DTYPE], e.g. input_ids=8x1024:i64".into(),
        ));
    };
    let name = name.trim();
    if name.is_empty() {
        return Err(err("the input name is empty".into()));
    }
    let (shape_s, dtype) = match spec.split_once(':') {
        Some((sh, dt)) => {
            let d = DType::parse(dt.trim())
                .ok_or_else(|| err(format!("unknown dtype {:?}", dt.trim())))?;
            (sh, Some(d))
        }
        None => (spec, None),
    };
    let shape_s = shape_s.trim();
    let shape = if shape_s.is_empty() || shape_s == "scalar" {
        vec![]
    } else {
        shape_s
            .split(['x', 'X', ','])
            .map(|d| {
                d.trim()
                    .parse::<usize>()
                    .map_err(|_| err(format!("dim {:?} is not a non-negative integer", d.trim())))
            })
            .collect::<Result<Vec<_>, _>>()?
    };
    Ok(InputOverride::new(name, shape, dtype))
}

/// A fresh builder configured as the importer uses it (constant folding on).
fn importer_builder() -> GraphBuilder {
    let mut b = GraphBuilder::new();
    b.fold_constants = true;
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_input_overrides() {
        let o = parse_input_override("input_ids=8x1024:i64").expect("parse");
        assert_eq!(
            o,
            InputOverride::new("input_ids", [8, 1024], Some(DType::I64))
        );
        let o = parse_input_override("x.1=2x3").expect("parse");
        assert_eq!(o, InputOverride::new("x.1", [2, 3], None));
        let o = parse_input_override("step=:int64").expect("parse");
        assert_eq!(
            o,
            InputOverride::new("step", Vec::<usize>::new(), Some(DType::I64))
        );
        for bad in ["x", "=2x3", "x=2xa", "x=2x3:f13", "x=-1"] {
            assert!(parse_input_override(bad).is_err(), "{bad}");
        }
    }
}
