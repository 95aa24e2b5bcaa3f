//! The archive's own module, run by libtorch: the reference an imported graph is checked
//! against. Weights can be replaced from Rust (by the names the imported graph gives them), so
//! archives whose weight records were emptied can be run too, on seeded values.

use crate::dump::{Dump, TensorInfo};
use crate::ffi::{Archive, RawTensor};
use autopar_analyzer::{AnalyzerError, DType, Tensor};
use std::path::Path;

/// A TorchScript module held by libtorch.
pub struct LibtorchModule {
    archive: Archive,
    tensors: Vec<TensorInfo>,
    path: String,
}

fn c10_name(d: DType) -> &'static str {
    match d {
        DType::F32 => "Float",
        DType::F64 => "Double",
        DType::F16 => "Half",
        DType::BF16 => "BFloat16",
        DType::I64 => "Long",
        DType::I32 => "Int",
        DType::I16 => "Short",
        DType::I8 => "Char",
        DType::U8 => "Byte",
        DType::Bool => "Bool",
    }
}

/// The little-endian bytes of `t` in its dtype (f16 / bf16 rounded through f32).
pub fn to_le_bytes(t: &Tensor) -> Vec<u8> {
    let mut out = Vec::with_capacity(t.numel() * t.dtype.size_bytes());
    for &v in &t.data {
        match t.dtype {
            DType::F64 => out.extend_from_slice(&v.to_le_bytes()),
            DType::F32 => out.extend_from_slice(&(v as f32).to_le_bytes()),
            DType::BF16 => {
                let bits = (v as f32).to_bits();
                // round to nearest even on the dropped 16 bits
                let r = bits.wrapping_add(0x7fff + ((bits >> 16) & 1));
                out.extend_from_slice(&((r >> 16) as u16).to_le_bytes());
            }
            DType::F16 => out.extend_from_slice(&f32_to_f16(v as f32).to_le_bytes()),
            DType::I64 => out.extend_from_slice(&(v as i64).to_le_bytes()),
            DType::I32 => out.extend_from_slice(&(v as i32).to_le_bytes()),
            DType::I16 => out.extend_from_slice(&(v as i16).to_le_bytes()),
            DType::I8 => out.push(v as i8 as u8),
            DType::U8 => out.push(v as u8),
            DType::Bool => out.push((v != 0.0) as u8),
        }
    }
    out
}

/// IEEE half from f32 (round to nearest; overflow to infinity, tiny values flush to zero).
fn f32_to_f16(x: f32) -> u16 {
    let b = x.to_bits();
    let sign = ((b >> 16) & 0x8000) as u16;
    let exp = ((b >> 23) & 0xff) as i32;
    let frac = b & 0x7f_ffff;
    if exp == 0xff {
        return sign | 0x7c00 | if frac != 0 { 0x200 } else { 0 };
    }
    let e = exp - 127 + 15;
    if e >= 0x1f {
        return sign | 0x7c00;
    }
    if e <= 0 {
        if e < -10 {
            return sign;
        }
        let m = (frac | 0x80_0000) >> (1 - e + 13);
        return sign | m as u16;
    }
    let m = frac >> 13;
    let round = (frac >> 12) & 1;
    (sign | ((e as u16) << 10) | m as u16).wrapping_add(round as u16)
}

impl LibtorchModule {
    /// Loads the archive at `path` with libtorch.
    pub fn load(path: &Path) -> Result<LibtorchModule, AnalyzerError> {
        let file_err = |reason: String| AnalyzerError::File {
            path: path.display().to_string(),
            reason,
        };
        let archive = Archive::load(path).map_err(file_err)?;
        let dump: Dump = serde_json::from_str(&archive.json)
            .map_err(|e| file_err(format!("the shim's graph description is malformed: {e}")))?;
        Ok(LibtorchModule {
            archive,
            tensors: dump.tensors,
            path: path.display().to_string(),
        })
    }

    /// Sets the parameter or buffer `name` (as the imported graph names it) to `t`, which must
    /// have its shape; the values are converted to its dtype.
    pub fn set_weight(&mut self, name: &str, t: &Tensor) -> Result<(), AnalyzerError> {
        let err = |reason: String| AnalyzerError::Input {
            name: name.to_string(),
            reason,
        };
        let Some(i) = self.tensors.iter().position(|x| x.name == name) else {
            return Err(err(format!("{} holds no weight of this name", self.path)));
        };
        let info = &self.tensors[i];
        let dtype = crate::dump::dtype_of(&info.dtype)
            .ok_or_else(|| err(format!("dtype {} is not supported", info.dtype)))?;
        let shape: Vec<i64> = t.shape.iter().map(|&d| d as i64).collect();
        if shape != info.shape {
            return Err(err(format!(
                "shape {:?}, expected {:?}",
                t.shape, info.shape
            )));
        }
        self.archive
            .set_tensor(i, &to_le_bytes(&t.cast(dtype)))
            .map_err(err)
    }

    /// Runs `forward` on `inputs` (in signature order); the outputs flattened, as f64 tensors
    /// of their dtypes.
    pub fn forward(&self, inputs: &[Tensor]) -> Result<Vec<Tensor>, AnalyzerError> {
        let raw: Vec<RawTensor> = inputs
            .iter()
            .map(|t| RawTensor {
                dtype: c10_name(t.dtype),
                shape: t.shape.iter().map(|&d| d as i64).collect(),
                bytes: to_le_bytes(t),
            })
            .collect();
        let err = |reason: String| AnalyzerError::File {
            path: self.path.clone(),
            reason: format!("libtorch's forward: {reason}"),
        };
        let outs = self.archive.forward(&raw).map_err(err)?;
        outs.into_iter()
            .map(|(dtype, shape, bytes)| {
                let d = crate::dump::dtype_of(&dtype)
                    .ok_or_else(|| err(format!("output dtype {dtype}")))?;
                let shape: Vec<usize> = shape.iter().map(|&x| x as usize).collect();
                Tensor::from_le_bytes(d, shape, &bytes)
                    .ok_or_else(|| err("output bytes do not match".into()))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn encodes_dtypes() {
        let t = Tensor::new(DType::F16, vec![3], vec![1.0, -2.0, 0.5]);
        let back = Tensor::from_le_bytes(DType::F16, vec![3], &to_le_bytes(&t)).unwrap();
        assert_eq!(back.data, t.data);
        let t = Tensor::new(DType::BF16, vec![2], vec![1.0, -3.0]);
        let back = Tensor::from_le_bytes(DType::BF16, vec![2], &to_le_bytes(&t)).unwrap();
        assert_eq!(back.data, t.data);
        let t = Tensor::new(DType::I64, vec![2], vec![-5.0, 7.0]);
        let back = Tensor::from_le_bytes(DType::I64, vec![2], &to_le_bytes(&t)).unwrap();
        assert_eq!(back.data, t.data);
    }
}
