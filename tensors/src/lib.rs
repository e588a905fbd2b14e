//! Host-side tensors: the vocabulary every Covey crate shares without linking an ML
//! framework.
//!
//! * [`HostTensor`] and [`NamedTensors`]: row-major f32 tensors by name (Hugging Face /
//!   PEFT names, `[out, in]` layout for weights).
//! * [`encode`] / [`decode`]: safetensors bytes (F32 written; F32, F16, BF16 read).
//! * [`quant`]: int8 symmetric per-output-channel quantization of a whole model.
//! * [`compress`]: int8 / int4 update payloads by stochastic rounding (unbiased).
//! * [`lora`]: folding PEFT `lora_A` / `lora_B` factors into base weights.
//!
//! ```
//! use covey_tensors::{HostTensor, NamedTensors, decode, encode};
//! let mut t = NamedTensors::new();
//! t.insert("w".into(), HostTensor::new(vec![2, 2], vec![1.0, 2.0, 3.0, 4.0]).unwrap());
//! let bytes = encode(&t, None).unwrap();
//! let (back, _) = decode(&bytes).unwrap();
//! assert_eq!(back, t);
//! ```

pub mod compress;
pub mod lora;
pub mod quant;

use std::collections::{BTreeMap, HashMap};

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TensorError {
    /// The bytes are not a valid safetensors file.
    #[error("not a valid safetensors file: {0}")]
    Safetensors(String),
    /// A tensor has a dtype this crate does not read.
    #[error("tensor `{name}` has unsupported dtype {dtype}")]
    UnsupportedDtype {
        /// Tensor name.
        name: String,
        /// The dtype found.
        dtype: String,
    },
    /// The number of values does not match the shape.
    #[error("shape {shape:?} needs {expected} values, got {found}")]
    ShapeData {
        /// Shape given.
        shape: Vec<usize>,
        /// Product of the shape.
        expected: usize,
        /// Values given.
        found: usize,
    },
    /// A tensor the operation needs is missing.
    #[error("tensor `{0}` is missing")]
    Missing(String),
    /// A tensor has the wrong shape.
    #[error("tensor `{name}` has shape {found:?}, expected {expected:?}")]
    Shape {
        /// Tensor name.
        name: String,
        /// Expected shape.
        expected: Vec<usize>,
        /// Shape found.
        found: Vec<usize>,
    },
    /// A tensor holds NaN or infinite values.
    #[error("tensor `{0}` holds NaN or infinite values")]
    NonFinite(String),
}

/// Result of this crate.
pub type Result<T, E = TensorError> = std::result::Result<T, E>;

/// A tensor on the host: shape and row-major f32 values.
#[derive(Clone, PartialEq)]
pub struct HostTensor {
    /// Dimensions.
    pub shape: Vec<usize>,
    /// Row-major values.
    pub data: Vec<f32>,
}

impl std::fmt::Debug for HostTensor {
    // Shape and norm only: values of an update are private data.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostTensor").field("shape", &self.shape).field("l2_norm", &self.l2_norm()).finish()
    }
}

impl HostTensor {
    /// A tensor, checking that `data` fills `shape`.
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Result<Self> {
        let expected = shape.iter().product::<usize>();
        if expected != data.len() {
            return Err(TensorError::ShapeData { shape, expected, found: data.len() });
        }
        Ok(Self { shape, data })
    }

    /// A tensor of zeros.
    pub fn zeros(shape: &[usize]) -> Self {
        Self { shape: shape.to_vec(), data: vec![0.0; shape.iter().product()] }
    }

    /// Number of values.
    pub fn len(&self) -> usize {
        self.data.len()
    }

    /// Whether the tensor has no values.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// The transpose of a 2-D tensor.
    ///
    /// # Panics
    /// If the tensor is not 2-D.
    pub fn transposed(&self) -> Self {
        assert_eq!(self.shape.len(), 2, "transposed needs a 2-D tensor");
        let (r, c) = (self.shape[0], self.shape[1]);
        let mut data = vec![0.0; r * c];
        for i in 0..r {
            for j in 0..c {
                data[j * r + i] = self.data[i * c + j];
            }
        }
        Self { shape: vec![c, r], data }
    }

    /// L2 norm of the values, accumulated in f64.
    pub fn l2_norm(&self) -> f64 {
        self.data.iter().map(|&x| f64::from(x) * f64::from(x)).sum::<f64>().sqrt()
    }

    /// Whether every value is finite.
    pub fn is_finite(&self) -> bool {
        self.data.iter().all(|x| x.is_finite())
    }
}

/// Named host tensors, sorted by name.
pub type NamedTensors = BTreeMap<String, HostTensor>;

/// Global L2 norm of a set of tensors.
pub fn global_norm(tensors: &NamedTensors) -> f64 {
    tensors.values().map(|t| t.l2_norm().powi(2)).sum::<f64>().sqrt()
}

/// Total number of values.
pub fn num_values(tensors: &NamedTensors) -> usize {
    tensors.values().map(HostTensor::len).sum()
}

/// Encode named tensors as f32 safetensors bytes with optional string metadata.
pub fn encode(tensors: &NamedTensors, metadata: Option<HashMap<String, String>>) -> Result<Vec<u8>> {
    let bytes: Vec<(&String, &Vec<usize>, Vec<u8>)> =
        tensors.iter().map(|(n, t)| (n, &t.shape, t.data.iter().flat_map(|x| x.to_le_bytes()).collect())).collect();
    let views = bytes
        .iter()
        .map(|(n, s, b)| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.to_vec(), b)
                .map(|v| (n.to_string(), v))
                .map_err(|e| TensorError::Safetensors(e.to_string()))
        })
        .collect::<Result<Vec<_>>>()?;
    safetensors::serialize(views, metadata).map_err(|e| TensorError::Safetensors(e.to_string()))
}

/// Decode safetensors bytes into f32 tensors (F32, F16 and BF16 are accepted) and the
/// file's metadata.
pub fn decode(bytes: &[u8]) -> Result<(NamedTensors, HashMap<String, String>)> {
    let (_, header) =
        safetensors::SafeTensors::read_metadata(bytes).map_err(|e| TensorError::Safetensors(e.to_string()))?;
    let metadata = header.metadata().clone().unwrap_or_default();
    let st = safetensors::SafeTensors::deserialize(bytes).map_err(|e| TensorError::Safetensors(e.to_string()))?;
    let mut out = NamedTensors::new();
    for (name, view) in st.tensors() {
        let raw = view.data();
        let data: Vec<f32> = match view.dtype() {
            safetensors::Dtype::F32 => {
                raw.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
            }
            safetensors::Dtype::BF16 => {
                raw.chunks_exact(2).map(|c| f32::from_bits(u32::from(u16::from_le_bytes([c[0], c[1]])) << 16)).collect()
            }
            safetensors::Dtype::F16 => {
                raw.chunks_exact(2).map(|c| f16_to_f32(u16::from_le_bytes([c[0], c[1]]))).collect()
            }
            other => return Err(TensorError::UnsupportedDtype { name, dtype: format!("{other:?}") }),
        };
        out.insert(name, HostTensor { shape: view.shape().to_vec(), data });
    }
    Ok((out, metadata))
}

/// IEEE half to single precision.
pub fn f16_to_f32(h: u16) -> f32 {
    let sign = u32::from(h >> 15) << 31;
    let exp = u32::from((h >> 10) & 0x1f);
    let frac = u32::from(h & 0x3ff);
    let bits = match (exp, frac) {
        (0, 0) => sign,
        (0, f) => {
            // Subnormal: normalise.
            let mut e = 127 - 15 + 1;
            let mut f = f;
            while f & 0x400 == 0 {
                f <<= 1;
                e -= 1;
            }
            sign | (e << 23) | ((f & 0x3ff) << 13)
        }
        (0x1f, f) => sign | 0x7f80_0000 | (f << 13),
        (e, f) => sign | ((e + 127 - 15) << 23) | (f << 13),
    };
    f32::from_bits(bits)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encode_decode_round_trips_with_metadata() {
        let mut t = NamedTensors::new();
        t.insert("a".into(), HostTensor::new(vec![2, 3], vec![1.0, -2.0, 3.5, 0.0, 1e-8, -7.25]).expect("test value"));
        t.insert("b".into(), HostTensor::new(vec![1], vec![42.0]).expect("test value"));
        let meta = HashMap::from([("k".to_string(), "v".to_string())]);
        let bytes = encode(&t, Some(meta.clone())).expect("test value");
        let (back, m) = decode(&bytes).expect("test value");
        assert_eq!(back, t);
        assert_eq!(m, meta);
    }

    #[test]
    fn garbage_and_truncated_bytes_are_errors() {
        assert!(decode(b"hello world").is_err());
        let mut t = NamedTensors::new();
        t.insert("a".into(), HostTensor::zeros(&[4, 4]));
        let bytes = encode(&t, None).expect("test value");
        assert!(decode(&bytes[..bytes.len() - 3]).is_err());
    }

    #[test]
    fn new_checks_the_shape() {
        assert!(HostTensor::new(vec![2, 2], vec![0.0; 3]).is_err());
    }

    #[test]
    fn debug_prints_no_values() {
        let t = HostTensor::new(vec![2], vec![3.0, 4.0]).expect("test value");
        let s = format!("{t:?}");
        assert!(s.contains("l2_norm: 5.0") && !s.contains("3.0"), "{s}");
    }

    #[test]
    fn f16_conversion_matches_known_values() {
        assert_eq!(f16_to_f32(0x3c00), 1.0);
        assert_eq!(f16_to_f32(0xc000), -2.0);
        assert_eq!(f16_to_f32(0x0001), 2.0f32.powi(-24));
        assert!(f16_to_f32(0x7c00).is_infinite());
    }
}
