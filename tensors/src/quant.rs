//! Weight quantization: int8 symmetric per output channel, int4 group-wise.
//!
//! **int8** ([`Int8Tensor`]):
//! A 2-D weight `[out, in]` (Hugging Face layout) becomes `out` rows of `i8` values and one
//! f32 scale per row: `scale = max|row| / 127`, `q = round(x / scale)` clamped to ±127. The
//! error of every value is at most `scale / 2`. 1-D tensors (norms) stay f32.
//!
//! On the wire and on disk a quantized model is a safetensors file: the `I8` tensor under
//! the weight's own name, its scales as an F32 `[out]` tensor under `<name>.qscale`, and the
//! metadata key `covey.quantization = int8-per-channel-symmetric`.
//!
//! **int4** ([`Int4Tensor`]): each row is cut into groups of [`INT4_GROUP`] = 32 values;
//! a group keeps an f32 scale `d = (max − min) / 15` and its minimum `m`, and each value
//! becomes a 4-bit code `q = round((x − m) / d)` (0..=15), two codes per byte: byte `j` of a
//! group holds value `j` in its low nibble and value `j + 16` in its high nibble — the
//! layout of ggml's `Q4_1` blocks, so GGUF `Q4_1` weights convert without loss. The error
//! of every value is at most `d / 2`. Rows must be a multiple of 32 long (every Llama
//! projection is); other tensors stay int8. A file mixing both ([`encode_quantized`])
//! stores int4 weights as `U8 [out, in / 2]` with `<name>.qscale` and `<name>.qmin` as
//! F32 `[out, in / 32]`, under `covey.quantization = int4-group32-asymmetric`.

use std::collections::HashMap;

use crate::{HostTensor, NamedTensors, Result, TensorError};

/// Suffix of the scale tensor of a quantized weight.
pub const SCALE_SUFFIX: &str = ".qscale";
/// Metadata key naming the quantization scheme.
pub const SCHEME_KEY: &str = "covey.quantization";
/// The scheme this module writes.
pub const INT8_SCHEME: &str = "int8-per-channel-symmetric";
/// Scheme of files whose 2-D weights are int4 (rows not a multiple of 32 stay int8).
pub const INT4_SCHEME: &str = "int4-group32-asymmetric";
/// Suffix of the per-group minimum of an int4 weight.
pub const MIN_SUFFIX: &str = ".qmin";
/// Values per int4 group.
pub const INT4_GROUP: usize = 32;

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

/// One int4 group-wise quantized 2-D tensor (see the module docs for the layout).
#[derive(Debug, Clone, PartialEq)]
pub struct Int4Tensor {
    /// `[out, in]`; `in` is a multiple of [`INT4_GROUP`].
    pub shape: Vec<usize>,
    /// `out × in / 2` bytes, two codes per byte, groups in row order.
    pub packed: Vec<u8>,
    /// One scale per group, `out × in / 32`.
    pub scales: Vec<f32>,
    /// One minimum per group, `out × in / 32`.
    pub mins: Vec<f32>,
}

impl Int4Tensor {
    /// Whether a tensor of this shape can be stored as int4.
    pub fn supports(shape: &[usize]) -> bool {
        shape.len() == 2 && shape[1] > 0 && shape[1].is_multiple_of(INT4_GROUP)
    }

    /// Quantize a 2-D tensor whose rows are a multiple of 32 long.
    pub fn quantize(t: &HostTensor) -> Result<Self> {
        if !Self::supports(&t.shape) {
            return Err(TensorError::Shape {
                name: "int4".into(),
                expected: vec![0, INT4_GROUP],
                found: t.shape.clone(),
            });
        }
        if !t.is_finite() {
            return Err(TensorError::NonFinite("int4 input".into()));
        }
        let groups = t.len() / INT4_GROUP;
        let mut packed = Vec::with_capacity(t.len() / 2);
        let mut scales = Vec::with_capacity(groups);
        let mut mins = Vec::with_capacity(groups);
        for g in t.data.chunks_exact(INT4_GROUP) {
            let (lo, hi) = g.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &x| (a.min(x), b.max(x)));
            let d = (hi - lo) / 15.0;
            let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
            let code = |x: f32| ((x - lo) * inv).round().clamp(0.0, 15.0) as u8;
            for j in 0..INT4_GROUP / 2 {
                packed.push(code(g[j]) | (code(g[j + INT4_GROUP / 2]) << 4));
            }
            scales.push(d);
            mins.push(lo);
        }
        Ok(Self { shape: t.shape.clone(), packed, scales, mins })
    }

    /// The f32 tensor the codes stand for.
    pub fn dequantize(&self) -> HostTensor {
        let mut data = Vec::with_capacity(self.packed.len() * 2);
        let mut group = [0.0f32; INT4_GROUP];
        for (g, bytes) in self.packed.chunks_exact(INT4_GROUP / 2).enumerate() {
            self.unpack_group(g, bytes, &mut group);
            data.extend_from_slice(&group);
        }
        HostTensor { shape: self.shape.clone(), data }
    }

    /// Decode group `g` (its 16 bytes) into 32 values.
    #[inline]
    pub fn unpack_group(&self, g: usize, bytes: &[u8], out: &mut [f32; INT4_GROUP]) {
        let (d, m) = (self.scales[g], self.mins[g]);
        for (j, &b) in bytes.iter().enumerate().take(INT4_GROUP / 2) {
            out[j] = f32::from(b & 0x0f) * d + m;
            out[j + INT4_GROUP / 2] = f32::from(b >> 4) * d + m;
        }
    }

    /// The largest error any value of group `g` can have: half a step.
    pub fn error_bound(&self, g: usize) -> f32 {
        self.scales[g] / 2.0
    }

    /// Bytes held: codes plus scales and minimums.
    pub fn bytes(&self) -> usize {
        self.packed.len() + 4 * (self.scales.len() + self.mins.len())
    }
}

/// A quantized (or plain) tensor as a model file holds it.
#[derive(Debug, Clone, PartialEq)]
pub enum StoredTensor {
    /// Full precision (norms, or unquantized files).
    F32(HostTensor),
    /// int8 per output channel.
    Int8(Int8Tensor),
    /// int4 group-wise.
    Int4(Int4Tensor),
}

impl StoredTensor {
    /// Row-major shape.
    pub fn shape(&self) -> &[usize] {
        match self {
            Self::F32(t) => &t.shape,
            Self::Int8(t) => &t.shape,
            Self::Int4(t) => &t.shape,
        }
    }

    /// The f32 values (allocates for quantized tensors).
    pub fn to_f32(&self) -> HostTensor {
        match self {
            Self::F32(t) => t.clone(),
            Self::Int8(t) => t.dequantize(),
            Self::Int4(t) => t.dequantize(),
        }
    }
}

/// Which codec [`encode_quantized`] applies to 2-D tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    /// int8 per output channel.
    Int8,
    /// int4 group-wise where the row length allows, int8 otherwise.
    Int4,
}

/// Quantize every 2-D tensor of a model with `scheme` (1-D tensors stay f32).
pub fn quantize_model(
    tensors: &NamedTensors,
    scheme: Scheme,
) -> Result<std::collections::BTreeMap<String, StoredTensor>> {
    tensors
        .iter()
        .map(|(name, t)| {
            let stored = match (t.shape.len(), scheme) {
                (2, Scheme::Int4) if Int4Tensor::supports(&t.shape) => {
                    StoredTensor::Int4(Int4Tensor::quantize(t).map_err(|_| TensorError::NonFinite(name.clone()))?)
                }
                (2, _) => {
                    StoredTensor::Int8(Int8Tensor::quantize(t).map_err(|_| TensorError::NonFinite(name.clone()))?)
                }
                _ => StoredTensor::F32(t.clone()),
            };
            Ok((name.clone(), stored))
        })
        .collect()
}

/// Encode a model with every 2-D tensor quantized to int8 (1-D tensors stay f32).
pub fn encode_int8(tensors: &NamedTensors, metadata: HashMap<String, String>) -> Result<Vec<u8>> {
    encode_quantized(tensors, Scheme::Int8, metadata)
}

/// Encode a model with its 2-D tensors quantized by `scheme` (1-D tensors stay f32).
pub fn encode_quantized(tensors: &NamedTensors, scheme: Scheme, metadata: HashMap<String, String>) -> Result<Vec<u8>> {
    encode_stored(&quantize_model(tensors, scheme)?, metadata)
}

fn le_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|s| s.to_le_bytes()).collect()
}

/// Encode already-quantized tensors. The scheme key says int4 when any tensor is int4.
pub fn encode_stored(
    tensors: &std::collections::BTreeMap<String, StoredTensor>,
    mut metadata: HashMap<String, String>,
) -> Result<Vec<u8>> {
    let mut owned: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    let mut any_int4 = false;
    for (name, t) in tensors {
        match t {
            StoredTensor::F32(t) => {
                owned.push((name.clone(), safetensors::Dtype::F32, t.shape.clone(), le_bytes(&t.data)));
            }
            StoredTensor::Int8(q) => {
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
                    le_bytes(&q.scales),
                ));
            }
            StoredTensor::Int4(q) => {
                any_int4 = true;
                let (rows, cols) = (q.shape[0], q.shape[1]);
                owned.push((name.clone(), safetensors::Dtype::U8, vec![rows, cols / 2], q.packed.clone()));
                let groups = vec![rows, cols / INT4_GROUP];
                owned.push((
                    format!("{name}{SCALE_SUFFIX}"),
                    safetensors::Dtype::F32,
                    groups.clone(),
                    le_bytes(&q.scales),
                ));
                owned.push((format!("{name}{MIN_SUFFIX}"), safetensors::Dtype::F32, groups, le_bytes(&q.mins)));
            }
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
    metadata.insert(SCHEME_KEY.into(), if any_int4 { INT4_SCHEME } else { INT8_SCHEME }.into());
    safetensors::serialize(views, Some(metadata)).map_err(|e| TensorError::Safetensors(e.to_string()))
}

/// Decode a model file written by [`encode_quantized`] or [`crate::encode`] into f32
/// tensors, dequantizing quantized weights.
pub fn decode_model(bytes: &[u8]) -> Result<(NamedTensors, HashMap<String, String>)> {
    let (stored, metadata) = decode_stored(bytes)?;
    Ok((stored.into_iter().map(|(n, t)| (n, t.to_f32())).collect(), metadata))
}

fn f32s(view: &safetensors::tensor::TensorView<'_>, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
    if view.dtype() != safetensors::Dtype::F32 || view.shape() != shape {
        return Err(TensorError::Shape { name: name.into(), expected: shape.to_vec(), found: view.shape().to_vec() });
    }
    let v: Vec<f32> = view.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    if v.iter().any(|s| !s.is_finite()) {
        return Err(TensorError::NonFinite(name.into()));
    }
    Ok(v)
}

/// Decode a model file keeping quantized weights quantized (no f32 copy of them).
pub fn decode_stored(
    bytes: &[u8],
) -> Result<(std::collections::BTreeMap<String, StoredTensor>, HashMap<String, String>)> {
    let (_, header) =
        safetensors::SafeTensors::read_metadata(bytes).map_err(|e| TensorError::Safetensors(e.to_string()))?;
    let metadata = header.metadata().clone().unwrap_or_default();
    let scheme = metadata.get(SCHEME_KEY).map(String::as_str);
    if scheme != Some(INT8_SCHEME) && scheme != Some(INT4_SCHEME) {
        let (plain, metadata) = crate::decode(bytes)?;
        return Ok((plain.into_iter().map(|(n, t)| (n, StoredTensor::F32(t))).collect(), metadata));
    }
    let st = safetensors::SafeTensors::deserialize(bytes).map_err(|e| TensorError::Safetensors(e.to_string()))?;
    let mut out = std::collections::BTreeMap::new();
    for (name, view) in st.tensors() {
        if name.ends_with(SCALE_SUFFIX) || name.ends_with(MIN_SUFFIX) {
            continue;
        }
        let side = |suffix: &str, shape: &[usize]| -> Result<Vec<f32>> {
            let n = format!("{name}{suffix}");
            let v = st.tensor(&n).map_err(|_| TensorError::Missing(n.clone()))?;
            f32s(&v, &n, shape)
        };
        let shape = view.shape().to_vec();
        let stored = match view.dtype() {
            safetensors::Dtype::I8 => {
                if shape.len() != 2 {
                    return Err(TensorError::Shape { name, expected: vec![0, 0], found: shape });
                }
                let scales = side(SCALE_SUFFIX, &[shape[0]])?;
                let values = view.data().iter().map(|&b| b as i8).collect();
                StoredTensor::Int8(Int8Tensor { shape, values, scales })
            }
            safetensors::Dtype::U8 => {
                if shape.len() != 2 || !shape[1].is_multiple_of(INT4_GROUP / 2) || shape[1] == 0 {
                    return Err(TensorError::Shape { name, expected: vec![0, INT4_GROUP / 2], found: shape });
                }
                let groups = [shape[0], shape[1] * 2 / INT4_GROUP];
                let scales = side(SCALE_SUFFIX, &groups)?;
                let mins = side(MIN_SUFFIX, &groups)?;
                StoredTensor::Int4(Int4Tensor {
                    shape: vec![shape[0], shape[1] * 2],
                    packed: view.data().to_vec(),
                    scales,
                    mins,
                })
            }
            safetensors::Dtype::F32 => StoredTensor::F32(HostTensor { data: f32s(&view, &name, &shape)?, shape }),
            other => return Err(TensorError::UnsupportedDtype { name, dtype: format!("{other:?}") }),
        };
        out.insert(name, stored);
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
    fn int4_round_trip_is_within_half_a_step_per_group() {
        let t = wavy(6, 96);
        let q = Int4Tensor::quantize(&t).expect("test value");
        assert_eq!(q.packed.len(), 6 * 96 / 2);
        let back = q.dequantize();
        for (i, (a, b)) in t.data.iter().zip(&back.data).enumerate() {
            let bound = q.error_bound(i / INT4_GROUP) * 1.0001 + 1e-6;
            assert!((a - b).abs() <= bound, "value {i}: {a} vs {b}, bound {bound}");
        }
        // Group extremes are kept exactly (codes 0 and 15).
        let g0 = &t.data[..INT4_GROUP];
        let lo = g0.iter().fold(f32::INFINITY, |a, &x| a.min(x));
        assert!(back.data[..INT4_GROUP].iter().any(|&x| (x - lo).abs() < 1e-6));
        // Constant groups are exact.
        let c = Int4Tensor::quantize(&HostTensor::new(vec![1, 32], vec![0.25; 32]).expect("test value"))
            .expect("test value");
        assert!(c.dequantize().data.iter().all(|&x| x == 0.25));
        // Rows that are not a multiple of 32 are refused.
        assert!(Int4Tensor::quantize(&wavy(2, 33)).is_err());
    }

    #[test]
    fn int4_model_file_round_trips_quantized_and_mixes_int8_where_rows_are_short() {
        let mut m = NamedTensors::new();
        m.insert("w".into(), wavy(8, 64));
        m.insert("odd".into(), wavy(3, 33));
        m.insert("norm".into(), HostTensor::new(vec![2], vec![1.0, 2.0]).expect("test value"));
        let bytes = encode_quantized(&m, Scheme::Int4, HashMap::new()).expect("test value");
        let (stored, meta) = decode_stored(&bytes).expect("test value");
        assert_eq!(meta.get(SCHEME_KEY).map(String::as_str), Some(INT4_SCHEME));
        assert!(matches!(stored["w"], StoredTensor::Int4(_)));
        assert!(matches!(stored["odd"], StoredTensor::Int8(_)));
        assert_eq!(stored["norm"], StoredTensor::F32(m["norm"].clone()));
        let q = Int4Tensor::quantize(&m["w"]).expect("test value");
        assert_eq!(stored["w"], StoredTensor::Int4(q));
        let (flat, _) = decode_model(&bytes).expect("test value");
        assert_eq!(flat["w"].shape, vec![8, 64]);
        // About a quarter of an int8 file for the int4 weight.
        let int8 = encode_quantized(&m, Scheme::Int8, HashMap::new()).expect("test value");
        assert!(bytes.len() < int8.len(), "{} vs {}", bytes.len(), int8.len());
        // A missing minimum is reported by name.
        let mut broken = stored.clone();
        broken.remove("w");
        let ok = encode_stored(&broken, HashMap::new()).expect("test value");
        assert!(decode_stored(&ok).is_ok());
    }

    #[test]
    fn nan_weights_are_refused() {
        let mut m = NamedTensors::new();
        m.insert("w".into(), HostTensor::new(vec![1, 2], vec![f32::NAN, 1.0]).expect("test value"));
        assert!(encode_int8(&m, HashMap::new()).is_err());
    }
}
