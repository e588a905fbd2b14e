//! ggml block codecs: [`dequantize`] any common GGUF tensor type to f32, [`quantize`] f32 values
//! to the simple types.
//!
//! Both follow llama.cpp's reference code (`ggml-quants.c`: `dequantize_row_*` and
//! `quantize_row_*_ref`) operation for operation, so results are bit-identical to ggml's
//! scalar path. Every function checks its input lengths and returns an error instead of
//! panicking, whatever the bytes hold.
//!
//! # Dequantization
//!
//! Supported: `F32`, `F16`, `BF16`, `F64`, `I8`, `I16`, `I32`, `I64` (converted to f32), `Q4_0`,
//! `Q4_1`, `Q5_0`, `Q5_1`, `Q8_0`, the K-quants `Q2_K`, `Q3_K`, `Q4_K`, `Q5_K`, `Q6_K`, `Q8_K`,
//! and the two table-based i-quants `IQ4_NL` and `IQ4_XS`. The other i-quants (`IQ1_*`,
//! `IQ2_*`, `IQ3_*`), `TQ1_0`, `TQ2_0`, `MXFP4`, `NVFP4`, `Q1_0` and `Q8_1` give
//! [`GgufError::UnsupportedType`].
//!
//! # Quantization and its error bounds
//!
//! Supported: `F32`, `F16`, `BF16`, `Q8_0`, `Q4_0`, `Q4_1`, `Q5_0`, `Q5_1`. For each, the bound on
//! `|x - x̂|` for one value `x` and its round trip `x̂`, where `δ(y) = |y - f16(y)|` is the f16
//! rounding error of a block parameter (`δ(y) ≤ max(|y|·2⁻¹¹, 2⁻²⁵)`), and all bounds hold up to
//! f32 rounding of the arithmetic (well under `10⁻⁵·|d|`):
//!
//! * `F32`: exact.
//! * `F16`: `max(|x|·2⁻¹¹, 2⁻²⁵)` (round to nearest even). Finite values that round to infinity
//!   (`|x| ≥ 65520`) are rejected; NaN and ±∞ are kept.
//! * `BF16`: `max(|x|·2⁻⁸, 2⁻¹³⁴)` (round to nearest even, as ggml). NaN and ±∞ are kept.
//! * `Q8_0`: with `d = amax/127` (amax: largest magnitude in the 32-value block),
//!   `d/2 + 127·δ(d)`, about `0.562·d`.
//! * `Q4_0`: with `max` the value of largest magnitude (the first one on ties) and `d = max/-8`,
//!   `|d|/2 + 8·δ(d)`, **except** values of the sign opposite to `max` with `|x| > 7.5·|d|`,
//!   which ggml clamps to the code for `7·(-d)`: for those, `|d| + 8·δ(d)`.
//! * `Q5_0`: with `d = max/-16`, `|d|/2 + 16·δ(d)`, except opposite-sign values with
//!   `|x| > 15.5·|d|`: `|d| + 16·δ(d)`.
//! * `Q4_1`: with `d = (max - min)/15`, `d/2 + 15·δ(d) + δ(min)`.
//! * `Q5_1`: with `d = (max - min)/31`, `d/2 + 31·δ(d) + δ(min)`.
//!
//! Block types reject NaN and infinite inputs, and blocks whose scale (or minimum) is beyond
//! the f16 range, with [`GgufError::NotRepresentable`] (ggml would silently write inf/NaN).

use half::f16;

use crate::{GgmlType, GgufError, Result};

const QK_K: usize = 256;

/// The table of `IQ4_NL` / `IQ4_XS` (`kvalues_iq4nl` in ggml).
const KVALUES_IQ4NL: [i8; 16] = [-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113];

/// Checks that `n_elements` values of `ty` take exactly `n_bytes` bytes.
fn check_len(ty: GgmlType, n_bytes: usize, n_elements: usize, what: &str) -> Result<()> {
    let n = n_elements as u64;
    if !n.is_multiple_of(ty.block_size()) {
        return Err(GgufError::NotBlockMultiple {
            what: format!("{what} count"),
            count: n,
            ty,
            block_size: ty.block_size(),
        });
    }
    let expected = ty
        .bytes_for(n)
        .ok_or_else(|| GgufError::TooLarge { what: format!("byte size of {n} {ty} values"), value: n })?;
    if expected != n_bytes as u64 {
        return Err(GgufError::ByteLength {
            what: format!("{n_elements} {ty} values"),
            expected,
            found: n_bytes as u64,
        });
    }
    Ok(())
}

/// Decodes `n_elements` values of type `ty` from `bytes` (exactly `ty.bytes_for(n_elements)`
/// bytes), as llama.cpp's `dequantize_row_*` does.
///
/// Errors: [`GgufError::UnsupportedType`] for types without a decoder (see the module docs),
/// [`GgufError::NotBlockMultiple`] and [`GgufError::ByteLength`] for inconsistent sizes.
pub fn dequantize(ty: GgmlType, bytes: &[u8], n_elements: usize) -> Result<Vec<f32>> {
    if !ty.can_dequantize() {
        return Err(GgufError::UnsupportedType { ty, op: "dequantizing" });
    }
    check_len(ty, bytes.len(), n_elements, "element")?;
    let mut out = Vec::with_capacity(n_elements);
    match ty {
        GgmlType::F32 => out.extend(bytes.as_chunks::<4>().0.iter().map(|c| f32::from_le_bytes(*c))),
        GgmlType::F16 => out.extend(bytes.as_chunks::<2>().0.iter().map(|c| f16::from_le_bytes(*c).to_f32())),
        GgmlType::BF16 => out.extend(bytes.as_chunks::<2>().0.iter().map(|c| bf16_to_f32(u16::from_le_bytes(*c)))),
        GgmlType::F64 => out.extend(bytes.as_chunks::<8>().0.iter().map(|c| f64::from_le_bytes(*c) as f32)),
        GgmlType::I8 => out.extend(bytes.iter().map(|&b| f32::from(b as i8))),
        GgmlType::I16 => out.extend(bytes.as_chunks::<2>().0.iter().map(|c| f32::from(i16::from_le_bytes(*c)))),
        GgmlType::I32 => out.extend(bytes.as_chunks::<4>().0.iter().map(|c| i32::from_le_bytes(*c) as f32)),
        GgmlType::I64 => out.extend(bytes.as_chunks::<8>().0.iter().map(|c| i64::from_le_bytes(*c) as f32)),
        GgmlType::Q4_0 => blocks(bytes, &mut out, dequantize_q4_0),
        GgmlType::Q4_1 => blocks(bytes, &mut out, dequantize_q4_1),
        GgmlType::Q5_0 => blocks(bytes, &mut out, dequantize_q5_0),
        GgmlType::Q5_1 => blocks(bytes, &mut out, dequantize_q5_1),
        GgmlType::Q8_0 => blocks(bytes, &mut out, dequantize_q8_0),
        GgmlType::Q2K => blocks(bytes, &mut out, dequantize_q2_k),
        GgmlType::Q3K => blocks(bytes, &mut out, dequantize_q3_k),
        GgmlType::Q4K => blocks(bytes, &mut out, dequantize_q4_k),
        GgmlType::Q5K => blocks(bytes, &mut out, dequantize_q5_k),
        GgmlType::Q6K => blocks(bytes, &mut out, dequantize_q6_k),
        GgmlType::Q8K => blocks(bytes, &mut out, dequantize_q8_k),
        GgmlType::IQ4NL => blocks(bytes, &mut out, dequantize_iq4_nl),
        GgmlType::IQ4XS => blocks(bytes, &mut out, dequantize_iq4_xs),
        _ => return Err(GgufError::UnsupportedType { ty, op: "dequantizing" }),
    }
    Ok(out)
}

/// Runs a block decoder over every `N`-byte block (the caller checked the length).
fn blocks<const N: usize>(bytes: &[u8], out: &mut Vec<f32>, decode: fn(&[u8; N], &mut Vec<f32>)) {
    for block in bytes.as_chunks::<N>().0 {
        decode(block, out);
    }
}

fn f16_to_f32(lo: u8, hi: u8) -> f32 {
    f16::from_le_bytes([lo, hi]).to_f32()
}

fn bf16_to_f32(bits: u16) -> f32 {
    f32::from_bits(u32::from(bits) << 16)
}

/// ggml's `ggml_compute_fp32_to_bf16`: round to nearest even, NaN forced quiet.
fn f32_to_bf16(x: f32) -> u16 {
    let u = x.to_bits();
    if (u & 0x7fff_ffff) > 0x7f80_0000 {
        return ((u >> 16) | 64) as u16;
    }
    (u.wrapping_add(0x7fff + ((u >> 16) & 1)) >> 16) as u16
}

/// `block_q4_0`: f16 d, 16 bytes of nibbles; low nibbles are values 0..16, high 16..32.
fn dequantize_q4_0(b: &[u8; 18], y: &mut Vec<f32>) {
    let d = f16_to_f32(b[0], b[1]);
    let qs = &b[2..18];
    y.extend(qs.iter().map(|&q| (i32::from(q & 0x0F) - 8) as f32 * d));
    y.extend(qs.iter().map(|&q| (i32::from(q >> 4) - 8) as f32 * d));
}

/// `block_q4_1`: f16 d, f16 m, 16 bytes of nibbles.
fn dequantize_q4_1(b: &[u8; 20], y: &mut Vec<f32>) {
    let d = f16_to_f32(b[0], b[1]);
    let m = f16_to_f32(b[2], b[3]);
    let qs = &b[4..20];
    y.extend(qs.iter().map(|&q| f32::from(q & 0x0F) * d + m));
    y.extend(qs.iter().map(|&q| f32::from(q >> 4) * d + m));
}

/// `block_q5_0`: f16 d, u32 of fifth bits, 16 bytes of nibbles.
fn dequantize_q5_0(b: &[u8; 22], y: &mut Vec<f32>) {
    let d = f16_to_f32(b[0], b[1]);
    let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
    let qs = &b[6..22];
    y.extend(qs.iter().zip(0u32..).map(|(&q, j)| {
        let xh = ((qh >> j) << 4) & 0x10;
        ((u32::from(q & 0x0F) | xh) as i32 - 16) as f32 * d
    }));
    y.extend(qs.iter().zip(0u32..).map(|(&q, j)| {
        let xh = (qh >> (j + 12)) & 0x10;
        ((u32::from(q >> 4) | xh) as i32 - 16) as f32 * d
    }));
}

/// `block_q5_1`: f16 d, f16 m, u32 of fifth bits, 16 bytes of nibbles.
fn dequantize_q5_1(b: &[u8; 24], y: &mut Vec<f32>) {
    let d = f16_to_f32(b[0], b[1]);
    let m = f16_to_f32(b[2], b[3]);
    let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    let qs = &b[8..24];
    y.extend(qs.iter().zip(0u32..).map(|(&q, j)| {
        let xh = ((qh >> j) << 4) & 0x10;
        (u32::from(q & 0x0F) | xh) as f32 * d + m
    }));
    y.extend(qs.iter().zip(0u32..).map(|(&q, j)| {
        let xh = (qh >> (j + 12)) & 0x10;
        (u32::from(q >> 4) | xh) as f32 * d + m
    }));
}

/// `block_q8_0`: f16 d, 32 i8.
fn dequantize_q8_0(b: &[u8; 34], y: &mut Vec<f32>) {
    let d = f16_to_f32(b[0], b[1]);
    y.extend(b[2..34].iter().map(|&q| f32::from(q as i8) * d));
}

/// `block_q2_K`: 16 scale/min bytes (4 + 4 bits), 64 bytes of 2-bit quants, f16 d, f16 dmin.
fn dequantize_q2_k(b: &[u8; 84], y: &mut Vec<f32>) {
    let scales = &b[0..16];
    let d = f16_to_f32(b[80], b[81]);
    let min = f16_to_f32(b[82], b[83]);
    let mut is = 0;
    for half in 0..2 {
        let q = &b[16 + 32 * half..16 + 32 * half + 32];
        for shift in [0, 2, 4, 6] {
            for part in [&q[0..16], &q[16..32]] {
                let sc = scales[is];
                is += 1;
                let dl = d * f32::from(sc & 0x0F);
                let ml = min * f32::from(sc >> 4);
                y.extend(part.iter().map(|&v| dl * f32::from((v >> shift) & 3) - ml));
            }
        }
    }
}

/// `block_q3_K`: 32 bytes of high bits, 64 bytes of 2-bit quants, 12 bytes of 6-bit scales,
/// f16 d.
fn dequantize_q3_k(b: &[u8; 110], y: &mut Vec<f32>) {
    const KMASK1: u32 = 0x0303_0303;
    const KMASK2: u32 = 0x0f0f_0f0f;
    let hm = &b[0..32];
    let d_all = f16_to_f32(b[108], b[109]);
    let a0 = u32::from_le_bytes([b[96], b[97], b[98], b[99]]);
    let a1 = u32::from_le_bytes([b[100], b[101], b[102], b[103]]);
    let tmp = u32::from_le_bytes([b[104], b[105], b[106], b[107]]);
    let aux = [
        (a0 & KMASK2) | ((tmp & KMASK1) << 4),
        (a1 & KMASK2) | (((tmp >> 2) & KMASK1) << 4),
        ((a0 >> 4) & KMASK2) | (((tmp >> 4) & KMASK1) << 4),
        ((a1 >> 4) & KMASK2) | (((tmp >> 6) & KMASK1) << 4),
    ];
    let mut scales = [0i8; 16];
    for (dst, src) in scales.as_chunks_mut::<4>().0.iter_mut().zip(aux) {
        *dst = src.to_le_bytes().map(|v| v as i8);
    }
    let mut is = 0;
    let mut m: u32 = 1;
    for half in 0..2 {
        let q = &b[32 + 32 * half..32 + 32 * half + 32];
        for shift in [0, 2, 4, 6] {
            for (qpart, hpart) in [(&q[0..16], &hm[0..16]), (&q[16..32], &hm[16..32])] {
                let dl = d_all * (i32::from(scales[is]) - 32) as f32;
                is += 1;
                y.extend(qpart.iter().zip(hpart).map(|(&qv, &hv)| {
                    let low = i32::from((qv >> shift) & 3);
                    let high = if u32::from(hv) & m != 0 { 0 } else { 4 };
                    dl * (low - high) as f32
                }));
            }
            m <<= 1;
        }
    }
}

/// ggml's `get_scale_min_k4`: the 6-bit scale and min of sub-block `j` (0..8).
fn get_scale_min_k4(j: usize, q: &[u8; 12]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        ((q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4))
    }
}

fn k_scales(b: &[u8]) -> [u8; 12] {
    let mut s = [0u8; 12];
    s.copy_from_slice(&b[4..16]);
    s
}

/// `block_q4_K`: f16 d, f16 dmin, 12 bytes of 6-bit scales and mins, 128 bytes of nibbles.
fn dequantize_q4_k(b: &[u8; 144], y: &mut Vec<f32>) {
    let d = f16_to_f32(b[0], b[1]);
    let min = f16_to_f32(b[2], b[3]);
    let scales = k_scales(b);
    for (chunk, q) in b[16..144].as_chunks::<32>().0.iter().enumerate() {
        let (sc1, m1) = get_scale_min_k4(2 * chunk, &scales);
        let (sc2, m2) = get_scale_min_k4(2 * chunk + 1, &scales);
        let (d1, m1) = (d * f32::from(sc1), min * f32::from(m1));
        let (d2, m2) = (d * f32::from(sc2), min * f32::from(m2));
        y.extend(q.iter().map(|&v| d1 * f32::from(v & 0x0F) - m1));
        y.extend(q.iter().map(|&v| d2 * f32::from(v >> 4) - m2));
    }
}

/// `block_q5_K`: f16 d, f16 dmin, 12 bytes of scales and mins, 32 bytes of fifth bits, 128
/// bytes of nibbles.
fn dequantize_q5_k(b: &[u8; 176], y: &mut Vec<f32>) {
    let d = f16_to_f32(b[0], b[1]);
    let min = f16_to_f32(b[2], b[3]);
    let scales = k_scales(b);
    let qh = &b[16..48];
    let mut u1: u8 = 1;
    let mut u2: u8 = 2;
    for (chunk, ql) in b[48..176].as_chunks::<32>().0.iter().enumerate() {
        let (sc1, m1) = get_scale_min_k4(2 * chunk, &scales);
        let (sc2, m2) = get_scale_min_k4(2 * chunk + 1, &scales);
        let (d1, m1) = (d * f32::from(sc1), min * f32::from(m1));
        let (d2, m2) = (d * f32::from(sc2), min * f32::from(m2));
        y.extend(ql.iter().zip(qh).map(|(&l, &h)| d1 * f32::from((l & 0x0F) + if h & u1 != 0 { 16 } else { 0 }) - m1));
        y.extend(ql.iter().zip(qh).map(|(&l, &h)| d2 * f32::from((l >> 4) + if h & u2 != 0 { 16 } else { 0 }) - m2));
        u1 = u1.wrapping_shl(2);
        u2 = u2.wrapping_shl(2);
    }
}

/// `block_q6_K`: 128 bytes of low nibbles, 64 bytes of 2-bit highs, 16 i8 scales, f16 d.
fn dequantize_q6_k(b: &[u8; 210], y: &mut Vec<f32>) {
    let d = f16_to_f32(b[208], b[209]);
    let mut out = [0f32; QK_K];
    for half in 0..2 {
        let ql = &b[64 * half..64 * half + 64];
        let qh = &b[128 + 32 * half..128 + 32 * half + 32];
        let sc = &b[192 + 8 * half..192 + 8 * half + 8];
        let yh = &mut out[128 * half..128 * half + 128];
        for l in 0..32 {
            let is = l / 16;
            let q1 = i32::from((ql[l] & 0x0F) | ((qh[l] & 3) << 4)) - 32;
            let q2 = i32::from((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) - 32;
            let q3 = i32::from((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
            let q4 = i32::from((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
            yh[l] = d * f32::from(sc[is] as i8) * q1 as f32;
            yh[l + 32] = d * f32::from(sc[is + 2] as i8) * q2 as f32;
            yh[l + 64] = d * f32::from(sc[is + 4] as i8) * q3 as f32;
            yh[l + 96] = d * f32::from(sc[is + 6] as i8) * q4 as f32;
        }
    }
    y.extend_from_slice(&out);
}

/// `block_q8_K`: f32 d, 256 i8, 16 i16 block sums (unused here).
fn dequantize_q8_k(b: &[u8; 292], y: &mut Vec<f32>) {
    let d = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    y.extend(b[4..260].iter().map(|&q| d * f32::from(q as i8)));
}

/// `block_iq4_nl`: f16 d, 16 bytes of 4-bit indices into [`KVALUES_IQ4NL`].
fn dequantize_iq4_nl(b: &[u8; 18], y: &mut Vec<f32>) {
    let d = f16_to_f32(b[0], b[1]);
    let qs = &b[2..18];
    y.extend(qs.iter().map(|&q| d * f32::from(KVALUES_IQ4NL[usize::from(q & 0x0F)])));
    y.extend(qs.iter().map(|&q| d * f32::from(KVALUES_IQ4NL[usize::from(q >> 4)])));
}

/// `block_iq4_xs`: f16 d, u16 of scale high bits, 4 bytes of scale low nibbles, 128 bytes of
/// indices.
fn dequantize_iq4_xs(b: &[u8; 136], y: &mut Vec<f32>) {
    let d = f16_to_f32(b[0], b[1]);
    let scales_h = u16::from_le_bytes([b[2], b[3]]);
    let scales_l = &b[4..8];
    for (ib, qs) in b[8..136].as_chunks::<16>().0.iter().enumerate() {
        let low = (scales_l[ib / 2] >> (4 * (ib % 2))) & 0x0F;
        let high = ((scales_h >> (2 * ib)) & 3) as u8;
        let dl = d * (i32::from(low | (high << 4)) - 32) as f32;
        y.extend(qs.iter().map(|&q| dl * f32::from(KVALUES_IQ4NL[usize::from(q & 0x0F)])));
        y.extend(qs.iter().map(|&q| dl * f32::from(KVALUES_IQ4NL[usize::from(q >> 4)])));
    }
}

/// Encodes `values` as type `ty`, as llama.cpp's `quantize_row_*_ref` does (bit-identical
/// output). `values.len()` must be a multiple of the block size.
///
/// The error bound of each type is in the [module docs](self). Errors:
/// [`GgufError::UnsupportedType`] for types without an encoder, [`GgufError::NotBlockMultiple`],
/// and [`GgufError::NotRepresentable`] for NaN/∞ in a block type or values beyond the f16/bf16
/// range.
pub fn quantize(ty: GgmlType, values: &[f32]) -> Result<Vec<u8>> {
    if !ty.can_quantize() {
        return Err(GgufError::UnsupportedType { ty, op: "quantizing to" });
    }
    let n = values.len() as u64;
    let n_bytes = ty
        .bytes_for(n)
        .ok_or_else(|| GgufError::NotBlockMultiple {
            what: "value count".into(),
            count: n,
            ty,
            block_size: ty.block_size(),
        })
        .and_then(|b| {
            usize::try_from(b).map_err(|_| GgufError::TooLarge { what: format!("{ty} byte size"), value: b })
        })?;
    let mut out = Vec::with_capacity(n_bytes);
    match ty {
        GgmlType::F32 => {
            for v in values {
                out.extend_from_slice(&v.to_le_bytes());
            }
        }
        GgmlType::F16 => {
            for (index, &value) in values.iter().enumerate() {
                let h = f16::from_f32(value);
                if value.is_finite() && h.is_infinite() {
                    return Err(GgufError::NotRepresentable { ty, index, value, reason: "beyond the f16 range" });
                }
                out.extend_from_slice(&h.to_le_bytes());
            }
        }
        GgmlType::BF16 => {
            for (index, &value) in values.iter().enumerate() {
                let h = f32_to_bf16(value);
                if value.is_finite() && !bf16_to_f32(h).is_finite() {
                    return Err(GgufError::NotRepresentable { ty, index, value, reason: "beyond the bf16 range" });
                }
                out.extend_from_slice(&h.to_le_bytes());
            }
        }
        GgmlType::Q8_0 => quantize_blocks(ty, values, &mut out, quantize_q8_0)?,
        GgmlType::Q4_0 => quantize_blocks(ty, values, &mut out, quantize_q4_0)?,
        GgmlType::Q4_1 => quantize_blocks(ty, values, &mut out, quantize_q4_1)?,
        GgmlType::Q5_0 => quantize_blocks(ty, values, &mut out, quantize_q5_0)?,
        GgmlType::Q5_1 => quantize_blocks(ty, values, &mut out, quantize_q5_1)?,
        _ => return Err(GgufError::UnsupportedType { ty, op: "quantizing to" }),
    }
    Ok(out)
}

/// Why a block cannot be encoded: (index within the block, reason).
type BlockError = (usize, &'static str);

/// Runs a 32-value block encoder over `values`, after rejecting non-finite values.
fn quantize_blocks(
    ty: GgmlType,
    values: &[f32],
    out: &mut Vec<u8>,
    encode: fn(&[f32; 32], &mut Vec<u8>) -> std::result::Result<(), BlockError>,
) -> Result<()> {
    for (block_index, block) in values.as_chunks::<32>().0.iter().enumerate() {
        let base = block_index * 32;
        let failure = match block.iter().position(|v| !v.is_finite()) {
            Some(i) => Err((i, "not finite")),
            None => encode(block, out),
        };
        if let Err((i, reason)) = failure {
            let value = block.get(i).copied().unwrap_or(f32::NAN);
            return Err(GgufError::NotRepresentable { ty, index: base + i, value, reason });
        }
    }
    Ok(())
}

/// A block parameter as f16, or an error naming the value responsible for it.
fn f16_param(v: f32, blame: usize, reason: &'static str) -> std::result::Result<f16, BlockError> {
    let h = f16::from_f32(v);
    if h.is_finite() { Ok(h) } else { Err((blame, reason)) }
}

/// Index and value of the first element of largest magnitude (ggml's `amax`/`max` loop).
fn signed_max(x: &[f32; 32]) -> (usize, f32) {
    let (mut at, mut amax, mut max) = (0, 0f32, 0f32);
    for (i, &v) in x.iter().enumerate() {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
            at = i;
        }
    }
    (at, max)
}

/// Index of the first minimum and first maximum, and their values (ggml's min/max loop).
fn min_max(x: &[f32; 32]) -> (usize, f32, usize, f32) {
    let (mut imin, mut min, mut imax, mut max) = (0, f32::MAX, 0, -f32::MAX);
    for (i, &v) in x.iter().enumerate() {
        if v < min {
            min = v;
            imin = i;
        }
        if v > max {
            max = v;
            imax = i;
        }
    }
    (imin, min, imax, max)
}

fn inverse(d: f32) -> f32 {
    if d != 0.0 { 1.0 / d } else { 0.0 }
}

/// `quantize_row_q8_0_ref`.
fn quantize_q8_0(x: &[f32; 32], out: &mut Vec<u8>) -> std::result::Result<(), BlockError> {
    let (at, _) = signed_max(x);
    let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
    let d = amax / 127.0;
    let id = inverse(d);
    out.extend_from_slice(&f16_param(d, at, "block scale beyond the f16 range")?.to_le_bytes());
    out.extend(x.iter().map(|&v| (v * id).round() as i8 as u8));
    Ok(())
}

/// `quantize_row_q4_0_ref`: `q = min(15, trunc(x/d + 8.5))` with `d = max / -8`.
fn quantize_q4_0(x: &[f32; 32], out: &mut Vec<u8>) -> std::result::Result<(), BlockError> {
    let (at, max) = signed_max(x);
    let d = max / -8.0;
    let id = inverse(d);
    out.extend_from_slice(&f16_param(d, at, "block scale beyond the f16 range")?.to_le_bytes());
    let q = |v: f32| ((v * id + 8.5) as i8).clamp(0, 15) as u8;
    let (lo, hi) = x.split_at(16);
    out.extend(lo.iter().zip(hi).map(|(&a, &b)| q(a) | (q(b) << 4)));
    Ok(())
}

/// `quantize_row_q4_1_ref`: `q = min(15, trunc((x - min)/d + 0.5))` with `d = (max - min)/15`.
fn quantize_q4_1(x: &[f32; 32], out: &mut Vec<u8>) -> std::result::Result<(), BlockError> {
    let (imin, min, imax, max) = min_max(x);
    let d = (max - min) / 15.0;
    let id = inverse(d);
    out.extend_from_slice(&f16_param(d, imax, "block range beyond the f16 range")?.to_le_bytes());
    out.extend_from_slice(&f16_param(min, imin, "block minimum beyond the f16 range")?.to_le_bytes());
    let q = |v: f32| (((v - min) * id + 0.5) as i8).clamp(0, 15) as u8;
    let (lo, hi) = x.split_at(16);
    out.extend(lo.iter().zip(hi).map(|(&a, &b)| q(a) | (q(b) << 4)));
    Ok(())
}

/// Packs 32 5-bit codes as ggml does: `qh` (bit 4 of code j at bit j), then the low nibbles
/// (codes 0..16 low, 16..32 high).
fn pack_5bit(codes: &[u8; 32], out: &mut Vec<u8>) {
    let qh = codes.iter().zip(0u32..).fold(0u32, |qh, (&c, j)| qh | (u32::from((c & 0x10) >> 4) << j));
    out.extend_from_slice(&qh.to_le_bytes());
    let (lo, hi) = codes.split_at(16);
    out.extend(lo.iter().zip(hi).map(|(&a, &b)| (a & 0x0F) | ((b & 0x0F) << 4)));
}

/// `quantize_row_q5_0_ref`: `q = min(31, trunc(x/d + 16.5))` with `d = max / -16`.
fn quantize_q5_0(x: &[f32; 32], out: &mut Vec<u8>) -> std::result::Result<(), BlockError> {
    let (at, max) = signed_max(x);
    let d = max / -16.0;
    let id = inverse(d);
    out.extend_from_slice(&f16_param(d, at, "block scale beyond the f16 range")?.to_le_bytes());
    pack_5bit(&x.map(|v| ((v * id + 16.5) as i8).clamp(0, 31) as u8), out);
    Ok(())
}

/// `quantize_row_q5_1_ref`: `q = trunc((x - min)/d + 0.5)` with `d = (max - min)/31`.
fn quantize_q5_1(x: &[f32; 32], out: &mut Vec<u8>) -> std::result::Result<(), BlockError> {
    let (imin, min, imax, max) = min_max(x);
    let d = (max - min) / 31.0;
    let id = inverse(d);
    out.extend_from_slice(&f16_param(d, imax, "block range beyond the f16 range")?.to_le_bytes());
    out.extend_from_slice(&f16_param(min, imin, "block minimum beyond the f16 range")?.to_le_bytes());
    pack_5bit(&x.map(|v| (((v - min) * id + 0.5) as i8).clamp(0, 31) as u8), out);
    Ok(())
}

#[cfg(test)]
mod tests {
    use rand::{RngExt, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use super::*;

    fn round_trip(ty: GgmlType, x: &[f32]) -> Vec<f32> {
        let bytes = quantize(ty, x).expect("quantize");
        assert_eq!(bytes.len() as u64, ty.bytes_for(x.len() as u64).expect("size"));
        dequantize(ty, &bytes, x.len()).expect("dequantize")
    }

    fn f16_round(v: f32) -> f32 {
        f16::from_f32(v).to_f32()
    }

    /// The documented bound (module docs) for value `i` of `block`, in f64, plus a slack for
    /// the f32 arithmetic of the codecs.
    fn bound(ty: GgmlType, block: &[f32], i: usize) -> f64 {
        let x = f64::from(block[i]);
        let first_max = || {
            let mut max = 0f32;
            for &v in block {
                if max.abs() < v.abs() {
                    max = v;
                }
            }
            max
        };
        let min_max = || {
            let min = block.iter().copied().fold(f32::MAX, f32::min);
            let max = block.iter().copied().fold(-f32::MAX, f32::max);
            (min, max)
        };
        let (b, d) = match ty {
            GgmlType::F16 => return (x.abs() * 2f64.powi(-11)).max(2f64.powi(-25)),
            GgmlType::BF16 => return (x.abs() * 2f64.powi(-8)).max(2f64.powi(-134)),
            GgmlType::Q8_0 => {
                let amax = block.iter().fold(0f32, |a, v| a.max(v.abs()));
                let d = amax / 127.0;
                let delta = f64::from((d - f16_round(d)).abs());
                (f64::from(d) / 2.0 + 127.0 * delta, f64::from(d))
            }
            GgmlType::Q4_0 | GgmlType::Q5_0 => {
                let levels: f32 = if ty == GgmlType::Q4_0 { 8.0 } else { 16.0 };
                let d = first_max() / -levels;
                let delta = f64::from((d - f16_round(d)).abs());
                let clamped = d != 0.0 && x / f64::from(d) > f64::from(levels) - 0.5;
                let dd = f64::from(d.abs());
                (if clamped { dd } else { dd / 2.0 } + f64::from(levels) * delta, dd)
            }
            GgmlType::Q4_1 | GgmlType::Q5_1 => {
                let levels: f32 = if ty == GgmlType::Q4_1 { 15.0 } else { 31.0 };
                let (min, max) = min_max();
                let d = (max - min) / levels;
                let delta_d = f64::from((d - f16_round(d)).abs());
                let delta_m = f64::from((min - f16_round(min)).abs());
                (f64::from(d) / 2.0 + f64::from(levels) * delta_d + delta_m, f64::from(d))
            }
            GgmlType::F32 => return 0.0,
            _ => unreachable!("not a quantizer"),
        };
        b + 1e-5 * d + 1e-6 * x.abs() + 1e-30
    }

    fn check_bounds(ty: GgmlType, x: &[f32]) {
        let y = round_trip(ty, x);
        let block = ty.block_size() as usize;
        for (bi, (xb, yb)) in x.chunks(block).zip(y.chunks(block)).enumerate() {
            for i in 0..xb.len() {
                let err = (f64::from(xb[i]) - f64::from(yb[i])).abs();
                let bound = bound(ty, xb, i);
                assert!(
                    err <= bound,
                    "{ty} block {bi} value {i}: {} -> {} (error {err:e} > bound {bound:e})",
                    xb[i],
                    yb[i]
                );
            }
        }
    }

    const QUANTIZERS: [GgmlType; 8] = [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::BF16,
        GgmlType::Q8_0,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
    ];

    #[test]
    fn round_trips_stay_within_documented_bounds_on_random_data() {
        let mut rng = ChaCha8Rng::seed_from_u64(0x6775_6666);
        for ty in QUANTIZERS {
            let mut x = Vec::with_capacity(32 * 300);
            for block in 0..300 {
                // Scales from 1e-6 to 1e4 (the f16 subnormal range included), several shapes.
                let scale = 10f32.powf(rng.random_range(-6.0f32..4.0));
                for _ in 0..32 {
                    let u: f32 = rng.random_range(-1.0f32..1.0);
                    x.push(match block % 4 {
                        0 => u * scale,
                        1 => u * u * u * scale,        // heavy centre
                        2 => -(u.abs() + 0.1) * scale, // negative only
                        _ => (u.abs() + 0.25) * scale, // positive only, offset
                    });
                }
            }
            check_bounds(ty, &x);
            if ty == GgmlType::F32 {
                assert_eq!(round_trip(ty, &x), x);
            }
        }
    }

    #[test]
    fn round_trips_stay_within_bounds_on_edge_cases() {
        let zeros = [0f32; 64];
        let constant = [1.2345f32; 32];
        let negative_constant = [-3.3f32; 32];
        let mut outlier = [0.01f32; 32];
        outlier[17] = 1000.0;
        let mut negative_outlier: [f32; 32] = std::array::from_fn(|i| -0.5 - i as f32 / 64.0);
        negative_outlier[3] = -4000.0;
        let mut tiny = [1e-7f32; 32];
        tiny[0] = -3e-8;
        let ramp: [f32; 32] = std::array::from_fn(|i| i as f32 - 15.5);
        for ty in QUANTIZERS {
            assert!(round_trip(ty, &zeros).iter().all(|&v| v == 0.0), "{ty}: zeros");
            for case in [&constant[..], &negative_constant, &outlier, &negative_outlier, &tiny, &ramp] {
                check_bounds(ty, case);
            }
        }
        // A constant block costs Q4_1 only the f16 rounding of its minimum.
        let y = round_trip(GgmlType::Q4_1, &constant);
        assert!(y.iter().all(|&v| v == f16_round(1.2345)));
        // Q4_0's documented exception: the first value of largest magnitude is -1, so d = 1/8
        // and +1 maps to code 16, clamped to 15: 7/8, an error of exactly |d|.
        let mut x = [0f32; 32];
        x[0] = -1.0;
        x[1] = 1.0;
        let y = round_trip(GgmlType::Q4_0, &x);
        assert_eq!((y[0], y[1], y[2]), (-1.0, 0.875, 0.0));
    }

    #[test]
    fn quantize_is_bit_identical_to_gguf_py() {
        // FNV-1a hashes of gguf-py 0.17's `gguf.quants.quantize(x, type)` (and numpy's f16
        // cast) for the input below, built the same way in numpy (f32 arithmetic):
        //   x[i] = ((i*37 + 11) % 101) / 7 - 6.5, i < 256; x[96..128] = 1.25; x[160..192] = 0;
        //   x[192..224] = -|x| - 0.5 with x[200] = -300.
        // gguf-py's quantizers are written to match ggml's quantize_row_*_ref bit for bit.
        let mut x: Vec<f32> = (0..256u32).map(|i| ((i * 37 + 11) % 101) as f32 / 7.0 - 6.5).collect();
        x[96..128].fill(1.25);
        x[160..192].fill(0.0);
        for v in &mut x[192..224] {
            *v = -v.abs() - 0.5;
        }
        x[200] = -300.0;
        let fnv = |bytes: &[u8]| {
            bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
        };
        let expected = [
            (GgmlType::Q8_0, 272, 0x8953a8acc8f0e12e_u64),
            (GgmlType::Q4_0, 144, 0x5737a338c7ca4a16),
            (GgmlType::Q4_1, 160, 0xd508a17423d99849),
            (GgmlType::Q5_0, 176, 0xbeca53682973cad9),
            (GgmlType::Q5_1, 192, 0x1d93c5b80c8a77e3),
            (GgmlType::BF16, 512, 0xe90196d772a26fc9),
            (GgmlType::F16, 512, 0x9aa41a22905ee9f8),
        ];
        for (ty, len, hash) in expected {
            let q = quantize(ty, &x).expect("quantize");
            assert_eq!((q.len(), fnv(&q)), (len, hash), "{ty}");
        }
    }

    /// The byte pattern of the gguf-py fixtures: `((i*73 + 41) ^ (i >> 5)) & 0xFF`, then in block
    /// `b` the f16 scale set to bits `0x2000 + 37b` and the f16 min to `0x9C00 + 11b`.
    fn pattern_blocks(ty: GgmlType, n_blocks: usize) -> Vec<u8> {
        let size = ty.type_size() as usize;
        let mut buf: Vec<u8> = (0..n_blocks * size).map(|i| (((i * 73 + 41) ^ (i >> 5)) & 0xFF) as u8).collect();
        let (d_at, m_at): (usize, Option<usize>) = match ty {
            GgmlType::Q4_1 | GgmlType::Q5_1 | GgmlType::Q4K | GgmlType::Q5K => (0, Some(2)),
            GgmlType::Q2K => (80, Some(82)),
            GgmlType::Q3K => (108, None),
            GgmlType::Q6K => (208, None),
            _ => (0, None),
        };
        for b in 0..n_blocks {
            let base = b * size;
            buf[base + d_at..base + d_at + 2].copy_from_slice(&(0x2000 + 37 * b as u16).to_le_bytes());
            if let Some(m_at) = m_at {
                buf[base + m_at..base + m_at + 2].copy_from_slice(&(0x9C00 + 11 * b as u16).to_le_bytes());
            }
        }
        buf
    }

    #[test]
    fn dequantize_matches_gguf_py() {
        // Generated with gguf-py 0.17 (`gguf.quants.dequantize`) on `pattern_blocks(ty, 2)`:
        // (type, Σ v[i]·(i%7 + 1), Σ |v[i]|, v at [0, 1, 17, bs-1, bs+5, 2bs-1]; f32 values, exact).
        #[rustfmt::skip]
        let fixtures: [(GgmlType, f64, f64, [f64; 6]); 12] = [
            (GgmlType::Q4_0, -0.5205230712890625, 2.0676651000976562, [0.0234375, -0.03125, -0.0625, -0.0625, 0.0161895751953125, -0.0485687255859375]),
            (GgmlType::Q4_1, 12.375774383544922, 3.4073028564453125, [0.09765625, 0.04296875, 0.06640625, 0.06640625, 0.10937881469726562, 0.028430938720703125]),
            (GgmlType::Q5_0, -3.9962158203125, 4.217506408691406, [0.1171875, 0.0625, -0.109375, 0.015625, -0.10523223876953125, 0.0485687255859375]),
            (GgmlType::Q5_1, 30.373416900634766, 7.547454833984375, [0.12890625, 0.07421875, 0.20703125, 0.08203125, 0.18223190307617188, 0.06890487670898438]),
            (GgmlType::Q8_0, 13.807342529296875, 32.18241882324219, [-0.5390625, 0.03125, -0.84375, -0.8515625, -0.29950714111328125, 0.5666351318359375]),
            (GgmlType::Q2K, 241.32246780395508, 59.769317626953125, [0.078125, 0.1484375, 0.07421875, 0.02734375, 0.12537002563476562, 0.13701629638671875]),
            (GgmlType::Q3K, 40.80586242675781, 135.95281982421875, [0.0, -0.078125, 0.1171875, -0.1875, -0.0, 0.291412353515625]),
            (GgmlType::Q4K, 4053.6668586730957, 1018.8753051757812, [1.10546875, 0.39453125, 0.49609375, 0.08984375, 0.6268501281738281, 0.094757080078125]),
            (GgmlType::Q5K, 7143.5736083984375, 1736.2593994140625, [2.62890625, 0.49609375, 1.81640625, 0.08984375, 0.5954437255859375, 3.5024642944335938]),
            (GgmlType::Q6K, -914.1021041870117, 4153.268600463867, [0.9296875, -0.265625, 0.8125, 2.53125, -6.4596405029296875, 1.003753662109375]),
            (GgmlType::IQ4NL, -7.0206756591796875, 28.881141662597656, [0.296875, -0.3828125, -0.9921875, -0.9921875, 0.20236968994140625, -0.6718673706054688]),
            (GgmlType::IQ4XS, -186.81192016601562, 4218.457893371582, [-23.5625, 5.6640625, 8.609375, -5.859375, -11.421745300292969, -2.5093841552734375]),
        ];
        for (ty, weighted, abs_sum, values) in fixtures {
            let bs = ty.block_size() as usize;
            let v = dequantize(ty, &pattern_blocks(ty, 2), 2 * bs).expect("dequantize");
            let got_weighted: f64 = v.iter().enumerate().map(|(i, &x)| f64::from(x) * ((i % 7) + 1) as f64).sum();
            let got_abs: f64 = v.iter().map(|&x| f64::from(x).abs()).sum();
            assert!(
                (got_weighted - weighted).abs() <= 1e-9 * weighted.abs().max(1.0),
                "{ty}: {got_weighted} vs {weighted}"
            );
            assert!((got_abs - abs_sum).abs() <= 1e-9 * abs_sum.max(1.0), "{ty}: {got_abs} vs {abs_sum}");
            let got = [0, 1, 17, bs - 1, bs + 5, 2 * bs - 1].map(|i| f64::from(v[i]));
            assert_eq!(got, values, "{ty}");
        }
    }

    /// Inverse of `get_scale_min_k4` (as in `quantize_row_q4_K_ref`).
    fn pack_scale_min_k4(sc: [u8; 8], m: [u8; 8]) -> [u8; 12] {
        let mut s = [0u8; 12];
        for j in 0..8 {
            if j < 4 {
                s[j] = sc[j];
                s[j + 4] = m[j];
            } else {
                s[j + 4] = (sc[j] & 0x0F) | ((m[j] & 0x0F) << 4);
                s[j - 4] |= (sc[j] >> 4) << 6;
                s[j] |= (m[j] >> 4) << 6;
            }
        }
        s
    }

    #[test]
    fn q4_k_hand_built_block() {
        // d = 1, dmin = 0.5; 6-bit sub-block scales and mins chosen to use the high bits.
        let sc = [1, 2, 3, 63, 17, 33, 48, 5];
        let m = [0, 1, 2, 3, 40, 9, 63, 16];
        // Packed by hand (see pack_scale_min_k4): sub-blocks 4..8 keep their low nibbles in
        // bytes 8..12 and their top two bits in the top bits of bytes 0..8.
        let scales = [0x41, 0x82, 0xC3, 0x3F, 0x80, 0x01, 0xC2, 0x43, 0x81, 0x91, 0xF0, 0x05];
        assert_eq!(pack_scale_min_k4(sc, m), scales);
        for j in 0..8 {
            assert_eq!(get_scale_min_k4(j, &scales), (sc[j], m[j]), "sub-block {j}");
        }
        let mut block = vec![0x00, 0x3C, 0x00, 0x38]; // f16 1.0, f16 0.5
        block.extend_from_slice(&scales);
        // Byte l of each 32-byte chunk: low nibble l % 16, high nibble 15 - l % 16.
        block.extend((0..128).map(|i: u8| (i % 16) | ((15 - i % 16) << 4)));
        let y = dequantize(GgmlType::Q4K, &block, 256).expect("dequantize");
        // Element e: chunk c = e / 64; e % 64 < 32 uses the low nibbles and sub-block 2c,
        // otherwise the high nibbles and sub-block 2c + 1. value = d·sc·q - dmin·m.
        assert_eq!(y[0], 0.0); // sub 0: 1·1·0 - 0.5·0
        assert_eq!(y[5], 5.0); // sub 0: q = 5
        assert_eq!(y[40], 13.5); // sub 1: q = 15 - 8 = 7 → 2·7 - 0.5·1
        assert_eq!(y[100], 691.5); // sub 3: q = 15 - 4 = 11 → 63·11 - 0.5·3
        assert_eq!(y[130], 14.0); // sub 4: q = 2 → 17·2 - 0.5·40
        assert_eq!(y[200], 352.5); // sub 6: q = 8 → 48·8 - 0.5·63
        assert_eq!(y[255], -8.0); // sub 7: q = 0 → 0 - 0.5·16
        for (e, &v) in y.iter().enumerate() {
            let (c, r) = (e / 64, e % 64);
            let sub = 2 * c + r / 32;
            let q = if r < 32 { (r % 16) as f32 } else { (15 - (r - 32) % 16) as f32 };
            assert_eq!(v, f32::from(sc[sub]) * q - 0.5 * f32::from(m[sub]), "element {e}");
        }
    }

    #[test]
    fn q6_k_hand_built_block() {
        let mut block: Vec<u8> = (0..128u8).collect(); // ql
        block.extend((0..64u32).map(|i| (i * 29) as u8)); // qh
        let scales: [i8; 16] = [1, -2, 3, -4, 5, -6, 7, -8, 9, -10, 11, -12, 13, -14, 15, -16];
        block.extend(scales.map(|s| s as u8));
        block.extend_from_slice(&[0x00, 0x38]); // d = 0.5
        let y = dequantize(GgmlType::Q6K, &block, 256).expect("dequantize");
        // e = 0: ql[0] low nibble 0, qh[0] bits 0..2 = 0 → q = -32; scale 1 → 0.5·1·-32.
        assert_eq!(y[0], -16.0);
        // e = 33: group 1 (ql[l+32] low nibble, qh bits 2..4), l = 1: ql[33] = 0x21 → 1,
        // qh[1] = 29 = 0b11101 → bits 2..4 = 3 → q = 1 + 48 - 32 = 17; scale 2 (3) → 25.5.
        assert_eq!(y[33], 25.5);
        // e = 200: second half, group 2 (ql[l] high nibble, qh bits 4..6), l = 8:
        // ql[72] = 0x48 → 4, qh[40] = 1160 % 256 = 0b1000_1000 → bits 4..6 = 0 → q = -28;
        // scale 8 + 4 = 12 (13) → 0.5·13·-28.
        assert_eq!(y[200], -182.0);
        for (e, &v) in y.iter().enumerate() {
            let (h, r) = (e / 128, e % 128);
            let (g, l) = (r / 32, r % 32);
            let ql = block[h * 64 + l + if g % 2 == 1 { 32 } else { 0 }];
            let nibble = if g < 2 { ql & 0x0F } else { ql >> 4 };
            let high = (block[128 + h * 32 + l] >> (2 * g)) & 3;
            let q = i32::from(nibble | (high << 4)) - 32;
            let s = scales[h * 8 + g * 2 + l / 16];
            assert_eq!(v, 0.5 * f32::from(s) * q as f32, "element {e}");
        }
    }

    #[test]
    fn q2_k_q3_k_q5_k_match_a_per_element_reimplementation() {
        let blocks = 3;
        // Q2_K: element e → half h, shift group g, lane l; scale byte h·8 + 2g + l/16.
        let b = pattern_blocks(GgmlType::Q2K, blocks);
        let y = dequantize(GgmlType::Q2K, &b, 256 * blocks).expect("q2_k");
        for (e, &v) in y.iter().enumerate() {
            let blk = &b[(e / 256) * 84..][..84];
            let e = e % 256;
            let (h, g, l) = (e / 128, (e % 128) / 32, e % 32);
            let q = (blk[16 + h * 32 + l] >> (2 * g)) & 3;
            let sc = blk[h * 8 + g * 2 + l / 16];
            let (d, dmin) = (f16_to_f32(blk[80], blk[81]), f16_to_f32(blk[82], blk[83]));
            let want = d * f32::from(sc & 0x0F) * f32::from(q) - dmin * f32::from(sc >> 4);
            assert_eq!(v.to_bits(), want.to_bits(), "q2_k element {e}");
        }
        // Q3_K: 6-bit scale j = low nibble of byte j (j < 8) or high nibble of byte j - 8, plus
        // bits 2·(j/4) of byte 8 + j%4; high bit of element (h, g, l) is bit 4h + g of hmask[l].
        let b = pattern_blocks(GgmlType::Q3K, blocks);
        let y = dequantize(GgmlType::Q3K, &b, 256 * blocks).expect("q3_k");
        for (e, &v) in y.iter().enumerate() {
            let blk = &b[(e / 256) * 110..][..110];
            let e = e % 256;
            let (h, g, l) = (e / 128, (e % 128) / 32, e % 32);
            let j = h * 8 + g * 2 + l / 16;
            let s = &blk[96..108];
            let low = if j < 8 { s[j] & 0x0F } else { s[j - 8] >> 4 };
            let scale = i32::from(low | (((s[8 + j % 4] >> (2 * (j / 4))) & 3) << 4)) - 32;
            let q2 = i32::from((blk[32 + h * 32 + l] >> (2 * g)) & 3);
            let hbit = (blk[l] >> (4 * h + g)) & 1;
            let q = q2 - if hbit == 1 { 0 } else { 4 };
            let want = f16_to_f32(blk[108], blk[109]) * scale as f32 * q as f32;
            assert_eq!(v.to_bits(), want.to_bits(), "q3_k element {e}");
        }
        // Q5_K: chunk c, sub-block 2c + r/32; fifth bit of element (c, r) is bit 2c + r/32 of
        // qh[r % 32].
        let b = pattern_blocks(GgmlType::Q5K, blocks);
        let y = dequantize(GgmlType::Q5K, &b, 256 * blocks).expect("q5_k");
        for (e, &v) in y.iter().enumerate() {
            let blk = &b[(e / 256) * 176..][..176];
            let e = e % 256;
            let (c, r) = (e / 64, e % 64);
            let sub = 2 * c + r / 32;
            let scales: [u8; 12] = blk[4..16].try_into().expect("12 bytes");
            let (sc, m) = get_scale_min_k4(sub, &scales);
            let ql = blk[48 + c * 32 + r % 32];
            let nibble = if r < 32 { ql & 0x0F } else { ql >> 4 };
            let fifth = (blk[16 + r % 32] >> sub) & 1;
            let (d, dmin) = (f16_to_f32(blk[0], blk[1]), f16_to_f32(blk[2], blk[3]));
            let want = d * f32::from(sc) * f32::from(nibble + 16 * fifth) - dmin * f32::from(m);
            assert_eq!(v.to_bits(), want.to_bits(), "q5_k element {e}");
        }
    }

    #[test]
    fn q8_k_and_plain_types() {
        let mut block = 0.25f32.to_le_bytes().to_vec();
        block.extend((0..=255u8).map(|i| i.wrapping_sub(128)));
        block.extend([0u8; 32]); // bsums, ignored
        let y = dequantize(GgmlType::Q8K, &block, 256).expect("q8_k");
        assert_eq!((y[0], y[128], y[255]), (-32.0, 0.0, 31.75));
        let ints: Vec<u8> = [-3i32, 7].iter().flat_map(|v| v.to_le_bytes()).collect();
        assert_eq!(dequantize(GgmlType::I32, &ints, 2).expect("i32"), [-3.0, 7.0]);
        assert_eq!(dequantize(GgmlType::I8, &[0xFF, 2], 2).expect("i8"), [-1.0, 2.0]);
        let f64s: Vec<u8> = [0.5f64, -2.0].iter().flat_map(|v| v.to_le_bytes()).collect();
        assert_eq!(dequantize(GgmlType::F64, &f64s, 2).expect("f64"), [0.5, -2.0]);
        assert_eq!(dequantize(GgmlType::BF16, &[0x80, 0x3F, 0x00, 0xC0], 2).expect("bf16"), [1.0, -2.0]);
    }

    #[test]
    fn non_finite_and_out_of_range_values_are_rejected() {
        let mut x = [0.5f32; 32];
        x[3] = f32::NAN;
        for ty in [GgmlType::Q8_0, GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q5_0, GgmlType::Q5_1] {
            let err = quantize(ty, &x).expect_err("NaN");
            assert!(matches!(err, GgufError::NotRepresentable { index: 3, .. }), "{ty}: {err}");
        }
        let mut big = [1.0f32; 64];
        big[40] = 1e7; // Q8_0 scale 78740 > 65504
        let err = quantize(GgmlType::Q8_0, &big).expect_err("scale overflow");
        assert!(matches!(err, GgufError::NotRepresentable { index: 40, .. }), "{err}");
        let mut low = [0.0f32; 32];
        low[9] = -70000.0; // Q4_1 minimum beyond f16
        let err = quantize(GgmlType::Q4_1, &low).expect_err("min overflow");
        assert!(matches!(err, GgufError::NotRepresentable { index: 9, .. }), "{err}");
        let err = quantize(GgmlType::F16, &[1.0, 70000.0]).expect_err("f16 overflow");
        assert!(matches!(err, GgufError::NotRepresentable { index: 1, .. }), "{err}");
        // Non-finite values are kept by the float types.
        let y = round_trip(GgmlType::F16, &[f32::INFINITY, f32::NEG_INFINITY]);
        assert_eq!(y, [f32::INFINITY, f32::NEG_INFINITY]);
        assert!(round_trip(GgmlType::BF16, &[f32::NAN])[0].is_nan());
        assert!(round_trip(GgmlType::F32, &[f32::NAN])[0].is_nan());
    }

    #[test]
    fn sizes_and_types_are_checked() {
        let err = dequantize(GgmlType::Q4_0, &[0; 18], 33).expect_err("not a block multiple");
        assert!(matches!(err, GgufError::NotBlockMultiple { count: 33, block_size: 32, .. }), "{err}");
        let err = dequantize(GgmlType::Q4_0, &[0; 17], 32).expect_err("short");
        assert!(matches!(err, GgufError::ByteLength { expected: 18, found: 17, .. }), "{err}");
        let err = dequantize(GgmlType::F32, &[0; 12], 2).expect_err("long");
        assert!(matches!(err, GgufError::ByteLength { expected: 8, found: 12, .. }), "{err}");
        let err = dequantize(GgmlType::IQ2XXS, &[0; 66], 256).expect_err("unsupported");
        assert!(matches!(err, GgufError::UnsupportedType { ty: GgmlType::IQ2XXS, .. }), "{err}");
        assert_eq!(err.to_string(), "dequantizing IQ2_XXS is not supported");
        let err = quantize(GgmlType::Q4K, &[0.0; 256]).expect_err("unsupported");
        assert_eq!(err.to_string(), "quantizing to Q4_K is not supported");
        let err = quantize(GgmlType::Q8_0, &[0.0; 48]).expect_err("not a block multiple");
        assert!(matches!(err, GgufError::NotBlockMultiple { count: 48, .. }), "{err}");
        assert!(dequantize(GgmlType::Q6K, &[], 0).expect("empty").is_empty());
        for ty in GgmlType::ALL {
            assert_eq!(
                ty.can_dequantize(),
                dequantize(ty, &vec![0; ty.type_size() as usize], ty.block_size() as usize).is_ok(),
                "{ty}"
            );
            assert_eq!(ty.can_quantize(), quantize(ty, &vec![0.0; ty.block_size() as usize]).is_ok(), "{ty}");
        }
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut rng = ChaCha8Rng::seed_from_u64(99);
        for ty in GgmlType::ALL.into_iter().filter(|t| t.can_dequantize()) {
            for _ in 0..20 {
                let mut bytes = vec![0u8; 3 * ty.type_size() as usize];
                rng.fill(&mut bytes[..]);
                let y = dequantize(ty, &bytes, 3 * ty.block_size() as usize).expect("any bytes decode");
                assert_eq!(y.len(), 3 * ty.block_size() as usize);
            }
        }
    }
}
