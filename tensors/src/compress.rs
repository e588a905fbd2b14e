//! Compressed update payloads: a device's `B` factors sent as int8 or int4 codes with one
//! f32 scale per group of [`GROUP`] values, quantized by **stochastic rounding** so that
//! the decoded update is an unbiased estimate of the sent one (`E[decode(encode(x))] = x`).
//!
//! * [`UpdateEncoding`]: `f32` (plain safetensors, the default), `int8` (codes in
//!   `[-127, 127]`, about 3.8× fewer bytes) or `int4` (codes in `[-7, 7]`, two per byte,
//!   about 7× fewer).
//! * [`encode_update`]: quantize and serialize. The decoded norm never exceeds the larger
//!   of the sent tensors' norm and a cap (the task's clip norm): when rounding would grow it
//!   past that, every scale shrinks by the same factor. A device's clipping, and with it the
//!   coordinator's norm bound and the privacy accounting, hold for what the coordinator
//!   decodes. The shrink is the one departure from unbiasedness: it happens only to updates
//!   within a few rounding steps of the cap, by a factor of about 1 − 2·10⁻⁵ (int8) or
//!   1 − 10⁻² (int4) on the updates measured.
//! * [`decode_update`]: the strict inverse the coordinator runs on outside bytes: every
//!   code within its range, every scale finite and ≥ 0, nothing missing, nothing extra.
//!
//! Layout (safetensors): metadata `covey.update` = `int8` | `int4`; per tensor `name`, its
//! codes under `name` (I8 of the tensor's shape for int8; U8 of `⌈n/2⌉` bytes for int4, low
//! nibble first, with the shape in metadata `covey.shape.<name>`) and its scales under
//! `name::scale` (F32, `⌈n/GROUP⌉`). An f32 payload is an ordinary safetensors file.
//!
//! ```
//! use covey_tensors::compress::{UpdateEncoding, decode_update, encode_update};
//! use covey_tensors::{HostTensor, NamedTensors};
//! let mut b = NamedTensors::new();
//! b.insert("lora_B".into(), HostTensor::new(vec![64, 4], (0..256).map(|i| (i as f32).sin()).collect()).unwrap());
//! let bytes = encode_update(&b, UpdateEncoding::Int8, [1; 32], 0.0).unwrap();
//! let (back, encoding) = decode_update(&bytes).unwrap();
//! assert_eq!(encoding, UpdateEncoding::Int8);
//! assert!((back["lora_B"].data[3] - b["lora_B"].data[3]).abs() < 1.0 / 127.0 + 1e-6);
//! ```

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;

use rand::{Rng, RngExt};
use serde::{Deserialize, Serialize};

use crate::{HostTensor, NamedTensors, Result, TensorError, global_norm};

/// Values that share one scale.
pub const GROUP: usize = 64;
/// Metadata key naming the encoding of a compressed payload.
pub const ENCODING_KEY: &str = "covey.update";
const SHAPE_KEY: &str = "covey.shape.";
const SCALE_SUFFIX: &str = "::scale";

/// How a device encodes its update for the upload; set by the coordinator in each task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum UpdateEncoding {
    /// Plain f32 safetensors.
    #[default]
    F32,
    /// int8 codes, stochastic rounding, one scale per group.
    Int8,
    /// int4 codes (two per byte), stochastic rounding, one scale per group.
    Int4,
}

impl UpdateEncoding {
    /// Every encoding, in wire order.
    pub const ALL: [Self; 3] = [Self::F32, Self::Int8, Self::Int4];

    /// The largest code magnitude (0 for f32).
    pub fn levels(self) -> i32 {
        match self {
            Self::F32 => 0,
            Self::Int8 => 127,
            Self::Int4 => 7,
        }
    }

    /// The name used in configs, metadata and reports.
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::Int8 => "int8",
            Self::Int4 => "int4",
        }
    }

    /// The number on the wire (protobuf `Task.update_encoding`).
    pub fn wire(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::Int8 => 1,
            Self::Int4 => 2,
        }
    }

    /// The encoding of a wire number, if known.
    pub fn from_wire(v: u32) -> Option<Self> {
        Self::ALL.into_iter().find(|e| e.wire() == v)
    }
}

impl fmt::Display for UpdateEncoding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for UpdateEncoding {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Self::ALL.into_iter().find(|e| e.name() == s).ok_or_else(|| format!("`{s}` is not one of f32, int8, int4"))
    }
}

/// Quantize one tensor's values: per group, scale `max|x| / L`, code `⌊x/s + u⌋` with
/// `u ~ U[0, 1)` (unbiased: `E[code·s] = x`).
fn quantize(values: &[f32], levels: i32, rng: &mut impl Rng) -> (Vec<i8>, Vec<f32>) {
    let mut codes = Vec::with_capacity(values.len());
    let mut scales = Vec::with_capacity(values.len().div_ceil(GROUP));
    for group in values.chunks(GROUP) {
        let max = group.iter().fold(0f32, |m, x| m.max(x.abs()));
        let scale = max / levels as f32;
        scales.push(scale);
        for &x in group {
            let code = if scale > 0.0 {
                let u: f32 = rng.random();
                ((x / scale + u).floor() as i32).clamp(-levels, levels)
            } else {
                0
            };
            codes.push(code as i8);
        }
    }
    (codes, scales)
}

fn dequantize(codes: &[i8], scales: &[f32]) -> Vec<f32> {
    codes.chunks(GROUP).zip(scales).flat_map(|(g, &s)| g.iter().map(move |&c| f32::from(c) * s)).collect()
}

fn pack_nibbles(codes: &[i8]) -> Vec<u8> {
    codes.chunks(2).map(|p| (p[0] as u8 & 0x0f) | ((p.get(1).copied().unwrap_or(0) as u8 & 0x0f) << 4)).collect()
}

fn unpack_nibble(b: u8, high: bool) -> i8 {
    let n = if high { b >> 4 } else { b & 0x0f };
    ((n << 4) as i8) >> 4
}

/// Encode `tensors` for the upload. For `int8` / `int4` the codes are drawn by stochastic
/// rounding from a ChaCha generator keyed with `seed` (a device keys it from the OS; a
/// simulation from its seed); if the decoded norm would exceed both the sent tensors' norm
/// and `norm_cap` (the clip norm; 0 for none), every scale shrinks by the same factor so
/// that it does not.
pub fn encode_update(
    tensors: &NamedTensors,
    encoding: UpdateEncoding,
    seed: [u8; 32],
    norm_cap: f64,
) -> Result<Vec<u8>> {
    let mut rng = <rand_chacha::ChaCha12Rng as rand::SeedableRng>::from_seed(seed);
    if encoding == UpdateEncoding::F32 {
        return crate::encode(tensors, None);
    }
    if let Some((name, _)) = tensors.iter().find(|(_, t)| !t.is_finite()) {
        return Err(TensorError::NonFinite(name.clone()));
    }
    let levels = encoding.levels();
    let mut quantized: Vec<(&String, &HostTensor, Vec<i8>, Vec<f32>)> = tensors
        .iter()
        .map(|(n, t)| {
            let (codes, scales) = quantize(&t.data, levels, &mut rng);
            (n, t, codes, scales)
        })
        .collect();
    let sent = global_norm(tensors).max(norm_cap);
    let decoded: f64 = quantized
        .iter()
        .map(|(_, _, c, s)| dequantize(c, s).iter().map(|&v| f64::from(v) * f64::from(v)).sum::<f64>())
        .sum::<f64>()
        .sqrt();
    if decoded > sent {
        let shrink = (sent / decoded) as f32;
        for (_, _, _, scales) in &mut quantized {
            scales.iter_mut().for_each(|s| *s *= shrink);
        }
        // f32 rounding of the product can leave the norm a hair above; one ulp down.
        let again: f64 = quantized
            .iter()
            .map(|(_, _, c, s)| dequantize(c, s).iter().map(|&v| f64::from(v) * f64::from(v)).sum::<f64>())
            .sum::<f64>()
            .sqrt();
        if again > sent {
            for (_, _, _, scales) in &mut quantized {
                scales.iter_mut().for_each(|s| *s = f32::from_bits(s.to_bits().saturating_sub(1)));
            }
        }
    }
    let mut metadata = HashMap::from([(ENCODING_KEY.to_string(), encoding.name().to_string())]);
    let mut buffers: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for (name, t, codes, scales) in quantized {
        let (dtype, shape, bytes) = match encoding {
            UpdateEncoding::Int8 => (safetensors::Dtype::I8, t.shape.clone(), codes.iter().map(|&c| c as u8).collect()),
            _ => {
                let dims: Vec<String> = t.shape.iter().map(usize::to_string).collect();
                metadata.insert(format!("{SHAPE_KEY}{name}"), dims.join(","));
                let packed = pack_nibbles(&codes);
                (safetensors::Dtype::U8, vec![packed.len()], packed)
            }
        };
        buffers.push((name.clone(), dtype, shape, bytes));
        let scale_bytes = scales.iter().flat_map(|s| s.to_le_bytes()).collect();
        buffers.push((format!("{name}{SCALE_SUFFIX}"), safetensors::Dtype::F32, vec![scales.len()], scale_bytes));
    }
    let views = buffers
        .iter()
        .map(|(n, dtype, shape, bytes)| {
            safetensors::tensor::TensorView::new(*dtype, shape.clone(), bytes)
                .map(|v| (n.clone(), v))
                .map_err(|e| TensorError::Safetensors(e.to_string()))
        })
        .collect::<Result<Vec<_>>>()?;
    safetensors::serialize(views, Some(metadata)).map_err(|e| TensorError::Safetensors(e.to_string()))
}

fn bad(what: String) -> TensorError {
    TensorError::Safetensors(format!("compressed update: {what}"))
}

/// Decode an update payload of any [`UpdateEncoding`] into f32 tensors, checking every
/// code, scale and shape. Non-finite values are left for the caller to refuse (an f32
/// payload may carry them).
pub fn decode_update(bytes: &[u8]) -> Result<(NamedTensors, UpdateEncoding)> {
    let (_, header) =
        safetensors::SafeTensors::read_metadata(bytes).map_err(|e| TensorError::Safetensors(e.to_string()))?;
    let metadata = header.metadata().clone().unwrap_or_default();
    let Some(name) = metadata.get(ENCODING_KEY) else {
        let (tensors, _) = crate::decode(bytes)?;
        return Ok((tensors, UpdateEncoding::F32));
    };
    let encoding = UpdateEncoding::from_str(name).map_err(|e| bad(format!("{ENCODING_KEY}: {e}")))?;
    if encoding == UpdateEncoding::F32 {
        return Err(bad(format!("{ENCODING_KEY} = f32 is written as a plain payload")));
    }
    let levels = encoding.levels();
    let st = safetensors::SafeTensors::deserialize(bytes).map_err(|e| TensorError::Safetensors(e.to_string()))?;
    let views: HashMap<String, safetensors::tensor::TensorView<'_>> = st.tensors().into_iter().collect();
    let mut out = NamedTensors::new();
    for (name, view) in &views {
        if name.ends_with(SCALE_SUFFIX) {
            if !views.contains_key(name.trim_end_matches(SCALE_SUFFIX)) {
                return Err(bad(format!("scales `{name}` without codes")));
            }
            continue;
        }
        let scale_view =
            views.get(&format!("{name}{SCALE_SUFFIX}")).ok_or_else(|| bad(format!("`{name}` has no scales")))?;
        let (shape, codes): (Vec<usize>, Vec<i8>) = match encoding {
            UpdateEncoding::Int8 => {
                if view.dtype() != safetensors::Dtype::I8 {
                    return Err(bad(format!("`{name}` is {:?}, not I8", view.dtype())));
                }
                (view.shape().to_vec(), view.data().iter().map(|&b| b as i8).collect())
            }
            _ => {
                if view.dtype() != safetensors::Dtype::U8 || view.shape().len() != 1 {
                    return Err(bad(format!("`{name}` is not a U8 vector of packed int4 codes")));
                }
                let dims = metadata
                    .get(&format!("{SHAPE_KEY}{name}"))
                    .ok_or_else(|| bad(format!("`{name}` has no shape in the metadata")))?;
                let shape = dims
                    .split(',')
                    .map(|d| d.parse::<usize>().map_err(|_| bad(format!("shape `{dims}` of `{name}`"))))
                    .collect::<Result<Vec<usize>>>()?;
                let n = shape
                    .iter()
                    .try_fold(1usize, |a, &d| a.checked_mul(d))
                    .ok_or_else(|| bad(format!("shape `{dims}` of `{name}` overflows")))?;
                if n.div_ceil(2) != view.data().len() {
                    return Err(bad(format!("`{name}` holds {} bytes for {n} int4 codes", view.data().len())));
                }
                let codes = (0..n).map(|i| unpack_nibble(view.data()[i / 2], i % 2 == 1)).collect();
                (shape, codes)
            }
        };
        if let Some(c) = codes.iter().find(|&&c| i32::from(c).abs() > levels) {
            return Err(bad(format!("`{name}` holds code {c}, outside ±{levels}")));
        }
        if scale_view.dtype() != safetensors::Dtype::F32 || scale_view.shape() != [codes.len().div_ceil(GROUP)] {
            return Err(bad(format!("`{name}{SCALE_SUFFIX}` is not {} f32 scales", codes.len().div_ceil(GROUP))));
        }
        let scales: Vec<f32> =
            scale_view.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        if let Some(s) = scales.iter().find(|s| !(s.is_finite() && **s >= 0.0)) {
            return Err(bad(format!("`{name}` has scale {s}")));
        }
        let tensor = HostTensor::new(shape, dequantize(&codes, &scales))?;
        out.insert(name.clone(), tensor);
    }
    Ok((out, encoding))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{RngExt, SeedableRng};

    fn update(seed: u64) -> NamedTensors {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let mut t = NamedTensors::new();
        for (name, rows) in [("q.lora_B", 960), ("v.lora_B", 33)] {
            let data: Vec<f32> = (0..rows * 4).map(|_| rng.random::<f32>() * 2.0 - 1.0).collect();
            t.insert(name.into(), HostTensor::new(vec![rows, 4], data).expect("test value"));
        }
        t
    }

    #[test]
    fn stochastic_rounding_is_unbiased_and_within_one_step() {
        let b = update(1);
        for encoding in [UpdateEncoding::Int8, UpdateEncoding::Int4] {
            let trials = 4000u32;
            let mut mean: NamedTensors = b
                .iter()
                .map(|(n, t)| (n.clone(), HostTensor::new(t.shape.clone(), vec![0.0; t.len()]).expect("test value")))
                .collect();
            for trial in 0..trials {
                let mut seed = [2; 32];
                seed[..4].copy_from_slice(&trial.to_le_bytes());
                let (d, e) = decode_update(&encode_update(&b, encoding, seed, f64::INFINITY).expect("test value"))
                    .expect("test value");
                assert_eq!(e, encoding);
                for (name, t) in &d {
                    let orig = &b[name];
                    assert_eq!(t.shape, orig.shape);
                    for (i, (&x, &y)) in orig.data.iter().zip(&t.data).enumerate() {
                        let group = &orig.data[i / GROUP * GROUP..((i / GROUP + 1) * GROUP).min(orig.len())];
                        let step = group.iter().fold(0f32, |m, v| m.max(v.abs())) / encoding.levels() as f32;
                        assert!((x - y).abs() <= step * 1.0001, "{encoding}: {x} decoded as {y}, step {step}");
                    }
                    let m = mean.get_mut(name).expect("test value");
                    m.data.iter_mut().zip(&t.data).for_each(|(a, v)| *a += v / trials as f32);
                }
            }
            // The mean of many decodes converges on the input: its error is far below
            // one quantization step (the step is 1/127 or 1/7 of a group's maximum).
            let worst = b
                .iter()
                .flat_map(|(n, t)| t.data.iter().zip(&mean[n].data).map(|(x, m)| (x - m).abs()))
                .fold(0f32, f32::max);
            let step = 1.0 / encoding.levels() as f32;
            assert!(worst < step * 0.15, "{encoding}: mean off by {worst}, step {step}");
        }
    }

    #[test]
    fn the_decoded_norm_never_exceeds_the_sent_norm_and_bytes_shrink() {
        let plain = crate::encode(&update(0), None).expect("test value").len();
        for seed in 0..50 {
            let b = update(seed);
            for encoding in [UpdateEncoding::Int8, UpdateEncoding::Int4] {
                let cap = global_norm(&b) * [0.0, 0.99, 1.0, 1.01][seed as usize % 4];
                let bytes = encode_update(&b, encoding, [seed as u8; 32], cap).expect("test value");
                let (d, _) = decode_update(&bytes).expect("test value");
                assert!(global_norm(&d) <= global_norm(&b).max(cap), "{encoding}: norm grew past the cap");
                let ratio = plain as f64 / bytes.len() as f64;
                let at_least = if encoding == UpdateEncoding::Int8 { 2.5 } else { 4.0 };
                assert!(ratio > at_least, "{encoding}: only {ratio:.2}× smaller");
            }
        }
    }

    #[test]
    fn f32_payloads_pass_through_and_encodings_round_trip_on_the_wire() {
        let b = update(3);
        let (d, e) = decode_update(&encode_update(&b, UpdateEncoding::F32, [0; 32], 0.0).expect("test value"))
            .expect("test value");
        assert_eq!((d, e), (b, UpdateEncoding::F32));
        for e in UpdateEncoding::ALL {
            assert_eq!(UpdateEncoding::from_wire(e.wire()), Some(e));
            assert_eq!(e.name().parse::<UpdateEncoding>(), Ok(e));
        }
        assert_eq!(UpdateEncoding::from_wire(9), None);
        assert!("int2".parse::<UpdateEncoding>().expect_err("refused").contains("int2"));
    }

    fn tamper(
        encoding: UpdateEncoding,
        f: impl FnOnce(&mut Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)>, &mut HashMap<String, String>),
    ) -> String {
        let b = update(4);
        let bytes = encode_update(&b, encoding, [0; 32], 0.0).expect("test value");
        let st = safetensors::SafeTensors::deserialize(&bytes).expect("test value");
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).expect("test value");
        let mut metadata = header.metadata().clone().expect("test value");
        let mut parts: Vec<_> =
            st.tensors().into_iter().map(|(n, v)| (n, v.dtype(), v.shape().to_vec(), v.data().to_vec())).collect();
        f(&mut parts, &mut metadata);
        let views: Vec<_> = parts
            .iter()
            .map(|(n, d, s, b)| {
                (n.clone(), safetensors::tensor::TensorView::new(*d, s.clone(), b).expect("test value"))
            })
            .collect();
        let bytes = safetensors::serialize(views, Some(metadata)).expect("test value");
        decode_update(&bytes).expect_err("refused").to_string()
    }

    #[test]
    fn hostile_compressed_payloads_are_refused_with_the_reason() {
        let e = tamper(UpdateEncoding::Int8, |p, _| {
            let codes = p.iter_mut().find(|t| t.0 == "q.lora_B").expect("test value");
            codes.3[5] = 0x80; // -128
        });
        assert!(e.contains("outside ±127"), "{e}");
        let e = tamper(UpdateEncoding::Int4, |p, _| {
            let codes = p.iter_mut().find(|t| t.0 == "v.lora_B").expect("test value");
            codes.3[0] = 0x08; // -8
        });
        assert!(e.contains("outside ±7"), "{e}");
        let e = tamper(UpdateEncoding::Int8, |p, _| {
            let s = p.iter_mut().find(|t| t.0 == "q.lora_B::scale").expect("test value");
            s.3[0..4].copy_from_slice(&f32::NAN.to_le_bytes());
        });
        assert!(e.contains("scale NaN"), "{e}");
        let e = tamper(UpdateEncoding::Int8, |p, _| p.retain(|t| t.0 != "q.lora_B::scale"));
        assert!(e.contains("has no scales"), "{e}");
        let e = tamper(UpdateEncoding::Int8, |p, _| p.retain(|t| t.0 != "q.lora_B"));
        assert!(e.contains("without codes"), "{e}");
        let e = tamper(UpdateEncoding::Int4, |_, m| {
            m.insert(format!("{SHAPE_KEY}q.lora_B"), "960,5".into());
        });
        assert!(e.contains("bytes for 4800 int4 codes"), "{e}");
        let e = tamper(UpdateEncoding::Int4, |_, m| {
            m.insert(format!("{SHAPE_KEY}q.lora_B"), "18446744073709551615,3".into());
        });
        assert!(e.contains("overflows"), "{e}");
        let e = tamper(UpdateEncoding::Int8, |_, m| {
            m.insert(ENCODING_KEY.into(), "int3".into());
        });
        assert!(e.contains("int3"), "{e}");
    }
}
