//! Reference inputs and outputs stored beside a model (`<stem>.ref.json` + `.ref.bin`, as the
//! corpus keeps onnxruntime's and PyTorch's results): named tensors, little-endian, C order.
//! Tests compare every runtime against them; users can check an import the same way.
//!
//! Also the one reader of the shared corpus's `manifest.json` ([`find_corpus`],
//! [`corpus_files`]), which the corpus tests of every crate use.

use crate::dtype::DType;
use crate::error::AnalyzerError;
use crate::tensor::Tensor;
use std::path::{Path, PathBuf};

/// Inputs and expected outputs, by name, in file order.
#[derive(Clone, Debug, PartialEq)]
pub struct Reference {
    pub inputs: Vec<(String, Tensor)>,
    pub outputs: Vec<(String, Tensor)>,
}

/// Reads `json` and the `.bin` file it names (next to it).
pub fn read_reference(json: &Path) -> Result<Reference, AnalyzerError> {
    let err = |reason: String| AnalyzerError::File {
        path: json.display().to_string(),
        reason,
    };
    let text = std::fs::read_to_string(json).map_err(|e| err(e.to_string()))?;
    let meta: serde_json::Value = serde_json::from_str(&text).map_err(|e| err(e.to_string()))?;
    let bin_name = meta["bin"]
        .as_str()
        .ok_or_else(|| err("no \"bin\" file named".into()))?;
    let bin_path = json.with_file_name(bin_name);
    let bin = std::fs::read(&bin_path).map_err(|e| err(format!("{}: {e}", bin_path.display())))?;
    let mut r = Reference {
        inputs: vec![],
        outputs: vec![],
    };
    let tensors = meta["tensors"]
        .as_array()
        .ok_or_else(|| err("no \"tensors\" list".into()))?;
    for t in tensors {
        let name = t["name"].as_str().unwrap_or_default().to_string();
        let bad = |what: &str| err(format!("tensor {name:?}: bad {what}"));
        let dtype = t["dtype"]
            .as_str()
            .and_then(DType::parse)
            .ok_or_else(|| bad("dtype"))?;
        let shape = t["shape"]
            .as_array()
            .ok_or_else(|| bad("shape"))?
            .iter()
            .map(|d| d.as_u64().map(|d| d as usize))
            .collect::<Option<Vec<usize>>>()
            .ok_or_else(|| bad("shape"))?;
        let off = t["offset"].as_u64().ok_or_else(|| bad("offset"))? as usize;
        let n = t["nbytes"].as_u64().ok_or_else(|| bad("nbytes"))? as usize;
        let bytes = bin.get(off..off + n).ok_or_else(|| bad("offset or size"))?;
        let tensor = Tensor::from_le_bytes(dtype, shape, bytes).ok_or_else(|| bad("size"))?;
        match t["kind"].as_str() {
            Some("input") => r.inputs.push((name, tensor)),
            _ => r.outputs.push((name, tensor)),
        }
    }
    Ok(r)
}

/// The shared corpus (a `shared/corpus` directory holding `manifest.json`) beside `start` or
/// one of its ancestors, if there is one.
pub fn find_corpus(start: &Path) -> Option<PathBuf> {
    start
        .ancestors()
        .map(|a| a.join("shared").join("corpus"))
        .find(|p| p.join("manifest.json").is_file())
}

/// A model file (`.onnx`, `.pt`) the corpus manifest lists.
#[derive(Clone, Debug, PartialEq)]
pub struct CorpusFile {
    /// Path relative to the corpus directory (`gpt2_tiny/gpt2_tiny.dynamo.onnx`).
    pub file: String,
    /// The default-domain opset of an ONNX export; `None` for TorchScript archives.
    pub opset: Option<i64>,
    /// Trainable parameter elements the file implies (the manifest's `graph_params`).
    pub graph_params: u64,
    /// The exported outputs: name, shape, and dtype as the manifest spells it (`float32` for
    /// ONNX, `Float` for TorchScript).
    pub outputs: Vec<(String, Vec<usize>, String)>,
}

/// The model files `dir/manifest.json` lists that are on disk, in manifest order.
pub fn corpus_files(dir: &Path) -> Result<Vec<CorpusFile>, AnalyzerError> {
    let path = dir.join("manifest.json");
    let err = |reason: String| AnalyzerError::File {
        path: path.display().to_string(),
        reason,
    };
    let text = std::fs::read_to_string(&path).map_err(|e| err(e.to_string()))?;
    let manifest: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| err(e.to_string()))?;
    let entries = manifest
        .as_array()
        .ok_or_else(|| err("not a list of exports".into()))?;
    let mut out = vec![];
    for e in entries {
        let model = e["model"].as_str().unwrap_or("?");
        let bad = |what: &str| err(format!("export of {model:?}: bad {what}"));
        let mut outputs = vec![];
        for o in e["outputs"].as_array().into_iter().flatten() {
            let shape = o["shape"]
                .as_array()
                .ok_or_else(|| bad("output shape"))?
                .iter()
                .map(|d| d.as_u64().map(|d| d as usize))
                .collect::<Option<Vec<usize>>>()
                .ok_or_else(|| bad("output shape"))?;
            let name = o["name"].as_str().unwrap_or_default().to_string();
            let dtype = o["dtype"].as_str().ok_or_else(|| bad("output dtype"))?;
            outputs.push((name, shape, dtype.to_string()));
        }
        for f in e["files"].as_array().into_iter().flatten() {
            let file = f["file"].as_str().ok_or_else(|| bad("file name"))?;
            if !(file.ends_with(".onnx") || file.ends_with(".pt")) || !dir.join(file).is_file() {
                continue;
            }
            out.push(CorpusFile {
                file: file.to_string(),
                opset: e["opset"].as_i64(),
                graph_params: f["graph_params"]
                    .as_u64()
                    .ok_or_else(|| bad("graph_params"))?,
                outputs: outputs.clone(),
            });
        }
    }
    Ok(out)
}
