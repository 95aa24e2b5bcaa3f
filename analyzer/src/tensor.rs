//! Reference tensor values for the evaluator: constant folding at import, the finite-difference
//! checks of every op's vjp, and small numerical tests.
//!
//! Every element is held as `f64` whatever the dtype (integers up to 2^53 exactly; i64 sentinels
//! such as `i64::MAX` saturate back on conversion). This is a correctness oracle, not a runtime:
//! the real kernels are libtorch's.

pub use crate::dtype::broadcast_shapes;
use crate::dtype::{DType, TensorType};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Tensor {
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub data: Vec<f64>,
}

impl Tensor {
    /// A tensor from row-major data; the caller guarantees `data.len() == shape.product()`.
    pub fn new(dtype: DType, shape: impl Into<Vec<usize>>, data: Vec<f64>) -> Self {
        let shape = shape.into();
        debug_assert_eq!(shape.iter().product::<usize>(), data.len());
        let mut t = Self { dtype, shape, data };
        t.round_to_dtype();
        t
    }
    pub fn full(dtype: DType, shape: impl Into<Vec<usize>>, value: f64) -> Self {
        let shape = shape.into();
        let n = shape.iter().product();
        Self::new(dtype, shape, vec![value; n])
    }
    pub fn zeros(ty: &TensorType) -> Self {
        Self::full(ty.dtype, ty.shape.clone(), 0.0)
    }
    pub fn scalar(dtype: DType, value: f64) -> Self {
        Self::new(dtype, Vec::<usize>::new(), vec![value])
    }
    pub fn from_i64(shape: impl Into<Vec<usize>>, values: &[i64]) -> Self {
        Self::new(
            DType::I64,
            shape,
            values.iter().map(|&v| v as f64).collect(),
        )
    }
    /// Deterministic pseudo-random f64 values in [-1, 1) (xorshift), for tests and examples.
    pub fn pseudo_random(shape: &[usize], seed: u64) -> Tensor {
        let n: usize = shape.iter().product();
        let mut x = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let data = (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
            })
            .collect();
        Tensor::new(DType::F64, shape.to_vec(), data)
    }
    pub fn ty(&self) -> TensorType {
        TensorType::new(self.dtype, self.shape.clone())
    }
    pub fn numel(&self) -> usize {
        self.data.len()
    }
    pub fn rank(&self) -> usize {
        self.shape.len()
    }
    /// Values as i64 (saturating), e.g. for shape and index operands.
    pub fn to_i64_vec(&self) -> Vec<i64> {
        self.data.iter().map(|&v| v as i64).collect()
    }
    /// Row-major strides of `shape`.
    pub fn strides_of(shape: &[usize]) -> Vec<usize> {
        let mut s = vec![1; shape.len()];
        for i in (0..shape.len().saturating_sub(1)).rev() {
            s[i] = s[i + 1] * shape[i + 1];
        }
        s
    }
    pub fn strides(&self) -> Vec<usize> {
        Self::strides_of(&self.shape)
    }
    /// Element at a multi-index.
    pub fn at(&self, idx: &[usize]) -> f64 {
        let st = self.strides();
        self.data[idx.iter().zip(&st).map(|(i, s)| i * s).sum::<usize>()]
    }
    /// Element for an output index of a broadcast: `out_idx` indexes a shape of rank >= self's.
    pub fn at_broadcast(&self, out_idx: &[usize]) -> f64 {
        let off = out_idx.len() - self.rank();
        let st = self.strides();
        let mut flat = 0;
        for (d, (&n, &s)) in self.shape.iter().zip(&st).enumerate() {
            if n != 1 {
                flat += out_idx[off + d] * s;
            }
        }
        self.data[flat]
    }
    /// Rounds the held values the way the dtype would store them (ints truncate toward zero,
    /// bools become 0/1, f32/f16/bf16 round through their precision).
    pub fn round_to_dtype(&mut self) {
        let f: fn(f64) -> f64 = match self.dtype {
            DType::F64 => return,
            DType::F32 => |v| v as f32 as f64,
            DType::F16 | DType::BF16 => |v| v as f32 as f64,
            DType::Bool => |v| if v != 0.0 { 1.0 } else { 0.0 },
            DType::I64 => |v| (v as i64) as f64,
            DType::I32 => |v| (v as i32) as f64,
            DType::I16 => |v| (v as i16) as f64,
            DType::I8 => |v| (v as i8) as f64,
            DType::U8 => |v| (v as u8) as f64,
        };
        for v in &mut self.data {
            *v = f(*v);
        }
    }
    pub fn cast(&self, dtype: DType) -> Tensor {
        Tensor::new(dtype, self.shape.clone(), self.data.clone())
    }
    /// Decodes little-endian raw bytes (ONNX raw_data, safetensors) of `dtype`.
    pub fn from_le_bytes(dtype: DType, shape: Vec<usize>, bytes: &[u8]) -> Option<Tensor> {
        let n: usize = shape.iter().product();
        if bytes.len() != n * dtype.size_bytes() {
            return None;
        }
        let data: Vec<f64> = match dtype {
            DType::F64 => bytes
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
                .collect(),
            DType::F32 => bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap_or([0; 4])) as f64)
                .collect(),
            DType::F16 => bytes
                .chunks_exact(2)
                .map(|c| f16_to_f32(u16::from_le_bytes([c[0], c[1]])) as f64)
                .collect(),
            DType::BF16 => bytes
                .chunks_exact(2)
                .map(|c| f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16) as f64)
                .collect(),
            DType::I64 => bytes
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().unwrap_or([0; 8])) as f64)
                .collect(),
            DType::I32 => bytes
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes(c.try_into().unwrap_or([0; 4])) as f64)
                .collect(),
            DType::I16 => bytes
                .chunks_exact(2)
                .map(|c| i16::from_le_bytes([c[0], c[1]]) as f64)
                .collect(),
            DType::I8 => bytes.iter().map(|&b| b as i8 as f64).collect(),
            DType::U8 | DType::Bool => bytes.iter().map(|&b| b as f64).collect(),
        };
        Some(Tensor { dtype, shape, data })
    }
    /// Largest relative difference to `other` (`|a-b| / max(|a|,|b|,floor)`), for numerical tests.
    pub fn max_rel_err(&self, other: &Tensor, floor: f64) -> f64 {
        self.data
            .iter()
            .zip(&other.data)
            .map(|(a, b)| (a - b).abs() / a.abs().max(b.abs()).max(floor))
            .fold(0.0, f64::max)
    }
}

/// IEEE half to f32.
fn f16_to_f32(h: u16) -> f32 {
    let sign = ((h >> 15) & 1) as u32;
    let exp = ((h >> 10) & 0x1f) as u32;
    let frac = (h & 0x3ff) as u32;
    let bits = if exp == 0 {
        if frac == 0 {
            sign << 31
        } else {
            // subnormal: normalise
            let mut e = 127 - 15 + 1;
            let mut f = frac;
            while f & 0x400 == 0 {
                f <<= 1;
                e -= 1;
            }
            (sign << 31) | ((e as u32) << 23) | ((f & 0x3ff) << 13)
        }
    } else if exp == 0x1f {
        (sign << 31) | (0xff << 23) | (frac << 13)
    } else {
        (sign << 31) | ((exp + 127 - 15) << 23) | (frac << 13)
    };
    f32::from_bits(bits)
}

/// Iterates over every multi-index of `shape` in row-major order.
pub fn for_each_index(shape: &[usize], mut f: impl FnMut(&[usize])) {
    if shape.contains(&0) {
        return;
    }
    let mut idx = vec![0usize; shape.len()];
    loop {
        f(&idx);
        let mut d = shape.len();
        loop {
            if d == 0 {
                return;
            }
            d -= 1;
            idx[d] += 1;
            if idx[d] < shape[d] {
                break;
            }
            idx[d] = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn index_iteration_and_broadcast() {
        let mut seen = vec![];
        for_each_index(&[2, 2], |i| seen.push(i.to_vec()));
        assert_eq!(seen, vec![vec![0, 0], vec![0, 1], vec![1, 0], vec![1, 1]]);
        let t = Tensor::new(DType::F32, vec![2, 1], vec![1.0, 2.0]);
        assert_eq!(t.at_broadcast(&[1, 5]), 2.0);
        let mut n = 0;
        for_each_index(&[], |_| n += 1);
        assert_eq!(n, 1);
    }
    #[test]
    fn f16_decoding() {
        assert_eq!(f16_to_f32(0x3c00), 1.0);
        assert_eq!(f16_to_f32(0xc000), -2.0);
    }
}
