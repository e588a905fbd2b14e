//! int8 symmetric per-output-channel quantization.
//!
//! A 2-D weight `[out, in]` (Hugging Face layout) becomes `out` rows of `i8` values and one
//! f32 scale per row: `scale = max|row| / 127`, `q = round(x / scale)` clamped to ±127. The
//! error of every value is at most `scale / 2`. 1-D tensors (norms) stay f32.
//!
//! On the wire and on disk a quantized model is a safetensors file: the `I8` tensor under
//! the weight's own name, its scales as an F32 `[out]` tensor under `<name>.qscale`, and the
//! metadata key `covey.quantization = int8-per-channel-symmetric`.

use std::collections::HashMap;

use crate::{HostTensor, NamedTensors, Result, TensorError};

/// Suffix of the scale tensor of a quantized weight.
pub const SCALE_SUFFIX: &str = ".qscale";
/// Metadata key naming the quantization scheme.
pub const SCHEME_KEY: &str = "covey.quantization";
/// The scheme this module writes.
pub const INT8_SCHEME: &str = "int8-per-channel-symmetric";

/// One quantized 2-D tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct Int8Tensor {
    /// `[out, in]`.
    pub shape: Vec<usize>,
    /// Row-major quantized values.
    pub values: Vec<i8>,
    /// One scale per output channel (row).
    pub scales: Vec<f32>,
}

impl Int8Tensor {
    /// Quantize a 2-D tensor per row.
    pub fn quantize(t: &HostTensor) -> Result<Self> {
        if t.shape.len() != 2 {
            return Err(TensorError::Shape { name: "int8".into(), expected: vec![0, 0], found: t.shape.clone() });
        }
        if !t.is_finite() {
            return Err(TensorError::NonFinite("int8 input".into()));
        }
        let cols = t.shape[1];
        let mut values = Vec::with_capacity(t.len());
        let mut scales = Vec::with_capacity(t.shape[0]);
        for row in t.data.chunks(cols.max(1)) {
            let max = row.iter().fold(0.0f32, |m, x| m.max(x.abs()));
            let scale = if max > 0.0 { max / 127.0 } else { 1.0 };
            scales.push(scale);
            values.extend(row.iter().map(|x| (x / scale).round().clamp(-127.0, 127.0) as i8));
        }
        Ok(Self { shape: t.shape.clone(), values, scales })
    }

    /// The f32 tensor the quantized values stand for.
    pub fn dequantize(&self) -> HostTensor {
        let cols = self.shape[1].max(1);
        let data = self.values.iter().enumerate().map(|(i, &q)| f32::from(q) * self.scales[i / cols]).collect();
        HostTensor { shape: self.shape.clone(), data }
    }

    /// The largest error any value of row `row` can have: half a step.
    pub fn error_bound(&self, row: usize) -> f32 {
        self.scales[row] / 2.0
    }
}

/// Encode a model with every 2-D tensor quantized to int8 (1-D tensors stay f32).
pub fn encode_int8(tensors: &NamedTensors, mut metadata: HashMap<String, String>) -> Result<Vec<u8>> {
    let mut owned: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for (name, t) in tensors {
        if t.shape.len() == 2 {
            let q = Int8Tensor::quantize(t).map_err(|_| TensorError::NonFinite(name.clone()))?;
            owned.push((
                name.clone(),
                safetensors::Dtype::I8,
                q.shape.clone(),
                q.values.iter().map(|&v| v as u8).collect(),
            ));
            owned.push((
                format!("{name}{SCALE_SUFFIX}"),
                safetensors::Dtype::F32,
                vec![q.scales.len()],
                q.scales.iter().flat_map(|s| s.to_le_bytes()).collect(),
            ));
        } else {
            owned.push((
                name.clone(),
                safetensors::Dtype::F32,
                t.shape.clone(),
                t.data.iter().flat_map(|x| x.to_le_bytes()).collect(),
            ));
        }
    }
    let views = owned
        .iter()
        .map(|(n, d, s, b)| {
            safetensors::tensor::TensorView::new(*d, s.clone(), b)
                .map(|v| (n.clone(), v))
                .map_err(|e| TensorError::Safetensors(e.to_string()))
        })
        .collect::<Result<Vec<_>>>()?;
    metadata.insert(SCHEME_KEY.into(), INT8_SCHEME.into());
    safetensors::serialize(views, Some(metadata)).map_err(|e| TensorError::Safetensors(e.to_string()))
}

/// Decode a model file written by [`encode_int8`] or [`crate::encode`] into f32 tensors,
/// dequantizing int8 weights.
pub fn decode_model(bytes: &[u8]) -> Result<(NamedTensors, HashMap<String, String>)> {
    let (_, header) =
        safetensors::SafeTensors::read_metadata(bytes).map_err(|e| TensorError::Safetensors(e.to_string()))?;
    let metadata = header.metadata().clone().unwrap_or_default();
    if metadata.get(SCHEME_KEY).map(String::as_str) != Some(INT8_SCHEME) {
        return crate::decode(bytes);
    }
    let st = safetensors::SafeTensors::deserialize(bytes).map_err(|e| TensorError::Safetensors(e.to_string()))?;
    let mut out = NamedTensors::new();
    for (name, view) in st.tensors() {
        if name.ends_with(SCALE_SUFFIX) {
            continue;
        }
        match view.dtype() {
            safetensors::Dtype::I8 => {
                let shape = view.shape().to_vec();
                if shape.len() != 2 {
                    return Err(TensorError::Shape { name, expected: vec![0, 0], found: shape });
                }
                let scale_name = format!("{name}{SCALE_SUFFIX}");
                let sv = st.tensor(&scale_name).map_err(|_| TensorError::Missing(scale_name.clone()))?;
                if sv.dtype() != safetensors::Dtype::F32 || sv.shape() != [shape[0]] {
                    return Err(TensorError::Shape {
                        name: scale_name,
                        expected: vec![shape[0]],
                        found: sv.shape().to_vec(),
                    });
                }
                let scales: Vec<f32> =
                    sv.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
                if scales.iter().any(|s| !s.is_finite()) {
                    return Err(TensorError::NonFinite(scale_name));
                }
                let values = view.data().iter().map(|&b| b as i8).collect();
                out.insert(name, Int8Tensor { shape, values, scales }.dequantize());
            }
            safetensors::Dtype::F32 => {
                let data = view.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
                out.insert(name, HostTensor { shape: view.shape().to_vec(), data });
            }
            other => return Err(TensorError::UnsupportedDtype { name, dtype: format!("{other:?}") }),
        }
    }
    Ok((out, metadata))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wavy(rows: usize, cols: usize) -> HostTensor {
        let data = (0..rows * cols).map(|i| (i as f32 * 0.37).sin() * (1.0 + (i / cols) as f32)).collect();
        HostTensor::new(vec![rows, cols], data).expect("test value")
    }

    #[test]
    fn int8_round_trip_is_within_half_a_step_per_row() {
        let t = wavy(8, 33);
        let q = Int8Tensor::quantize(&t).expect("test value");
        let back = q.dequantize();
        for (i, (a, b)) in t.data.iter().zip(&back.data).enumerate() {
            let bound = q.error_bound(i / 33) * 1.0001;
            assert!((a - b).abs() <= bound, "value {i}: {a} vs {b}, bound {bound}");
        }
        // The row maximum is exact.
        assert_eq!(q.values.iter().map(|v| v.unsigned_abs()).max(), Some(127));
    }

    #[test]
    fn zero_rows_quantize_to_zero() {
        let q = Int8Tensor::quantize(&HostTensor::zeros(&[2, 4])).expect("test value");
        assert!(q.dequantize().data.iter().all(|&x| x == 0.0));
    }

    #[test]
    fn quantized_model_file_round_trips() {
        let mut m = NamedTensors::new();
        m.insert("w".into(), wavy(64, 64));
        m.insert("norm".into(), HostTensor::new(vec![3], vec![1.0, 2.0, 3.0]).expect("test value"));
        let bytes = encode_int8(&m, HashMap::new()).expect("test value");
        let (back, meta) = decode_model(&bytes).expect("test value");
        assert_eq!(meta.get(SCHEME_KEY).map(String::as_str), Some(INT8_SCHEME));
        assert_eq!(back["norm"], m["norm"]);
        let err = back["w"].data.iter().zip(&m["w"].data).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
        let max = m["w"].data.iter().fold(0.0f32, |a, x| a.max(x.abs()));
        assert!(err > 0.0 && err <= max / 254.0 * 1.0001, "{err} vs bound {}", max / 254.0);
        // Smaller than f32.
        assert!(bytes.len() < crate::encode(&m, None).expect("test value").len() / 2);
    }

    #[test]
    fn nan_weights_are_refused() {
        let mut m = NamedTensors::new();
        m.insert("w".into(), HostTensor::new(vec![1, 2], vec![f32::NAN, 1.0]).expect("test value"));
        assert!(encode_int8(&m, HashMap::new()).is_err());
    }
}
