//! Reference inputs and outputs stored beside a model (`<stem>.ref.json` + `.ref.bin`, as the
//! corpus keeps onnxruntime's and PyTorch's results): named tensors, little-endian, C order.
//! Tests compare every runtime against them; users can check an import the same way.

use crate::dtype::DType;
use crate::error::AnalyzerError;
use crate::tensor::Tensor;
use std::path::Path;

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
