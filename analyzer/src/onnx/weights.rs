//! Tensors of the model file: ONNX dtypes, `TensorProto` payloads (inline raw or typed data,
//! external data) and their conversion to IR weights and constants.
//!
//! External data is located, checked against the file's size and recorded, never read, except
//! for small non-trainable tensors that become constants (shape arithmetic must fold).

use super::proto::{data_type, TensorProto, TypeProto, DATA_LOCATION_EXTERNAL};
use crate::dtype::{DType, TensorType};
use crate::graph::WeightData;
use crate::tensor::Tensor;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

/// External tensors up to this many bytes are read when they must become constants.
pub const CONST_READ_MAX_BYTES: u64 = 64 << 20;

/// The IR dtype of an ONNX data type code.
pub fn dtype_of(code: i32) -> Option<DType> {
    Some(match code {
        data_type::FLOAT => DType::F32,
        data_type::DOUBLE => DType::F64,
        data_type::FLOAT16 => DType::F16,
        data_type::BFLOAT16 => DType::BF16,
        data_type::INT64 => DType::I64,
        data_type::INT32 => DType::I32,
        data_type::INT16 => DType::I16,
        data_type::INT8 => DType::I8,
        data_type::UINT8 => DType::U8,
        data_type::BOOL => DType::Bool,
        _ => return None,
    })
}

/// The IR dtype of an ONNX code, or an error naming `what`.
pub fn dtype_or_err(code: i32, what: &str) -> Result<DType, String> {
    dtype_of(code).ok_or_else(|| {
        format!(
            "{what} has element type {}, which is not supported",
            data_type::name(code)
        )
    })
}

/// dtype and dims of a tensor.
pub fn tensor_type(t: &TensorProto) -> Result<TensorType, String> {
    let what = format!("tensor {:?}", t.name);
    let dtype = dtype_or_err(t.data_type, &what)?;
    let mut shape = Vec::with_capacity(t.dims.len());
    for &d in &t.dims {
        match usize::try_from(d) {
            Ok(d) => shape.push(d),
            Err(_) => return Err(format!("{what} has a negative dim in {:?}", t.dims)),
        }
    }
    if shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .is_none()
    {
        return Err(format!("{what} has too many elements ({:?})", t.dims));
    }
    Ok(TensorType::new(dtype, shape))
}

/// A declared value type: dtype code and dims (`None` for a symbolic or unknown dim), or
/// `None` for a non-tensor / rank-unknown type.
pub fn declared_type(tp: &TypeProto) -> Option<(i32, Vec<Option<i64>>)> {
    use super::proto::tensor_shape_proto::dimension::Value;
    use super::proto::type_proto::Value as T;
    let T::TensorType(t) = tp.value.as_ref()? else {
        return None;
    };
    let shape = t.shape.as_ref()?;
    let dims = shape
        .dim
        .iter()
        .map(|d| match &d.value {
            Some(Value::DimValue(n)) if *n >= 0 => Some(*n),
            _ => None,
        })
        .collect();
    Some((t.elem_type, dims))
}

/// Where a tensor's bytes are.
pub enum Payload {
    /// In the model file (raw or typed data, converted to little-endian bytes).
    Inline(Vec<u8>),
    /// In an external file that exists and is long enough.
    External {
        path: PathBuf,
        offset: u64,
        length: u64,
    },
    /// In an external file that is not there (graph-only export): plans, but does not run.
    Missing {
        path: PathBuf,
        offset: u64,
        length: u64,
    },
}

/// Takes the payload out of `t` (its raw bytes are moved, not copied).
pub fn take_payload(
    t: &mut TensorProto,
    ty: &TensorType,
    base_dir: &Path,
) -> Result<Payload, String> {
    let expected = ty.numel() as u64 * ty.dtype.size_bytes() as u64;
    let what = format!("tensor {:?}", t.name);
    if t.data_location == Some(DATA_LOCATION_EXTERNAL) || !t.external_data.is_empty() {
        return external_payload(t, expected, base_dir, &what);
    }
    if t.segment.is_some() {
        return Err(format!(
            "{what} is stored in segments, which is not supported"
        ));
    }
    let bytes = if !t.raw_data.is_empty() || expected == 0 {
        std::mem::take(&mut t.raw_data)
    } else {
        typed_to_le_bytes(t, ty.dtype).ok_or_else(|| format!("{what} holds no data of its type"))?
    };
    if bytes.len() as u64 != expected {
        return Err(format!(
            "{what} ({ty}) holds {} bytes of data, expected {expected}",
            bytes.len()
        ));
    }
    Ok(Payload::Inline(bytes))
}

fn external_payload(
    t: &TensorProto,
    expected: u64,
    base_dir: &Path,
    what: &str,
) -> Result<Payload, String> {
    let mut location = None;
    let mut offset = 0u64;
    let mut length = None;
    for e in &t.external_data {
        let num = || {
            e.value.trim().parse::<u64>().map_err(|_| {
                format!(
                    "{what}: external data {} {:?} is not a number",
                    e.key, e.value
                )
            })
        };
        match e.key.as_str() {
            "location" => location = Some(e.value.clone()),
            "offset" => offset = num()?,
            "length" => length = Some(num()?),
            _ => {}
        }
    }
    let Some(location) = location else {
        return Err(format!("{what} has external data without a location"));
    };
    let rel = Path::new(&location);
    if rel.is_absolute()
        || rel
            .components()
            .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
    {
        return Err(format!(
            "{what}: external data location {location:?} must be a relative path inside the \
             model's directory"
        ));
    }
    let length = length.unwrap_or(expected);
    if length != expected {
        return Err(format!(
            "{what}: external data length {length} does not match its type ({expected} bytes)"
        ));
    }
    let path = base_dir.join(rel);
    match std::fs::metadata(&path) {
        Ok(m) => {
            let end = offset
                .checked_add(length)
                .ok_or_else(|| format!("{what}: external data offset overflows"))?;
            if m.len() < end {
                return Err(format!(
                    "{what}: external data {} has {} bytes, the tensor needs bytes {offset}..{end}",
                    path.display(),
                    m.len()
                ));
            }
            Ok(Payload::External {
                path,
                offset,
                length,
            })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Payload::Missing {
            path,
            offset,
            length,
        }),
        Err(e) => Err(format!(
            "{what}: cannot open external data {}: {e}",
            path.display()
        )),
    }
}

/// The typed-data fields of `t` as little-endian bytes of `dtype`.
fn typed_to_le_bytes(t: &TensorProto, dtype: DType) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    match dtype {
        DType::F32 if !t.float_data.is_empty() => t
            .float_data
            .iter()
            .for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        DType::F64 if !t.double_data.is_empty() => t
            .double_data
            .iter()
            .for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        DType::I64 if !t.int64_data.is_empty() => t
            .int64_data
            .iter()
            .for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        DType::I32 if !t.int32_data.is_empty() => t
            .int32_data
            .iter()
            .for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        DType::I16 | DType::F16 | DType::BF16 if !t.int32_data.is_empty() => t
            .int32_data
            .iter()
            .for_each(|&v| out.extend_from_slice(&(v as u16).to_le_bytes())),
        DType::I8 | DType::U8 | DType::Bool if !t.int32_data.is_empty() => {
            t.int32_data.iter().for_each(|&v| out.push(v as u8))
        }
        _ => return None,
    }
    Some(out)
}

/// Reads `length` bytes at `offset` of `path`.
pub fn read_external(path: &Path, offset: u64, length: u64) -> Result<Vec<u8>, String> {
    let err = |e: std::io::Error| format!("cannot read external data {}: {e}", path.display());
    let mut f = std::fs::File::open(path).map_err(err)?;
    f.seek(SeekFrom::Start(offset)).map_err(err)?;
    let len = usize::try_from(length).map_err(|_| format!("external tensor of {length} bytes"))?;
    let mut buf = vec![0u8; len];
    f.read_exact(&mut buf).map_err(err)?;
    Ok(buf)
}

/// The values of `bytes` as a tensor of `ty`.
pub fn decode(ty: &TensorType, bytes: &[u8], what: &str) -> Result<Tensor, String> {
    Tensor::from_le_bytes(ty.dtype, ty.shape.clone(), bytes)
        .ok_or_else(|| format!("{what}: {} bytes do not hold {ty}", bytes.len()))
}

/// A payload as weight data (no bytes are read).
pub fn weight_data(p: Payload) -> WeightData {
    match p {
        Payload::Inline(b) => WeightData::Inline(Arc::new(b)),
        // a missing file stays external: planning never reads weights, and running names the
        // file it cannot open instead of training made-up values
        Payload::External {
            path,
            offset,
            length,
        }
        | Payload::Missing {
            path,
            offset,
            length,
        } => WeightData::External {
            path: path.to_string_lossy().into_owned(),
            offset,
            length,
        },
    }
}

/// A tensor of the model file whose values are wanted.
pub enum TensorValue {
    /// Values at hand (inline, or small external data read now).
    Known(Tensor),
    /// External data that is missing or too large to read at import: only its type and
    /// location are known.
    Unknown(TensorType, WeightData),
}

/// The values of a tensor that should become a constant (an attribute, a `Constant` node).
pub fn tensor_values(t: &TensorProto, base_dir: &Path) -> Result<TensorValue, String> {
    let ty = tensor_type(t)?;
    let what = format!("tensor {:?}", t.name);
    let expected = ty.numel() as u64 * ty.dtype.size_bytes() as u64;
    if t.data_location == Some(DATA_LOCATION_EXTERNAL) || !t.external_data.is_empty() {
        return match external_payload(t, expected, base_dir, &what)? {
            Payload::External {
                path,
                offset,
                length,
            } if length <= CONST_READ_MAX_BYTES => {
                let b = read_external(&path, offset, length)?;
                decode(&ty, &b, &what).map(TensorValue::Known)
            }
            p => Ok(TensorValue::Unknown(ty, weight_data(p))),
        };
    }
    if !t.raw_data.is_empty() || expected == 0 {
        return decode(&ty, &t.raw_data, &what).map(TensorValue::Known);
    }
    let bytes = typed_to_le_bytes(t, ty.dtype)
        .ok_or_else(|| format!("{what} holds no data of its type"))?;
    decode(&ty, &bytes, &what).map(TensorValue::Known)
}
