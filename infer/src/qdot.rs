//! Integer dot products of int8 / int4 weight rows with activations quantized to int8.
//!
//! What llama.cpp does for its Q8_0 and Q4_1 weights: each input row is quantized once,
//! in blocks of 32, to int8 with one f32 scale per block ([`QuantizedRows`], llama.cpp's
//! Q8_1 layout: the block's scaled sum is kept too, for the int4 minimum). A weight row
//! is then read once, as stored, and multiplied in integers: per block, 32 int8 × int8
//! (or uint4 × int8) products summed exactly in i32, scaled by the block's two scales
//! and accumulated in f32. No f32 copy of a weight row is ever written.
//!
//! Two implementations of the same arithmetic, chosen by [`KernelPath`]:
//! - [`KernelPath::Native`]: on x86-64 with AVX2 (checked at run time), 32 products per
//!   block in three instructions (`vpsignb`, `vpmaddubsw`, `vpmaddwd`), accumulated in
//!   eight f32 lanes with no horizontal sum until the row ends. Through `pulp`'s safe
//!   intrinsics, without `unsafe`.
//! - [`KernelPath::Portable`]: plain Rust over the same blocks, what every other CPU
//!   runs (a phone's ARM core included); the compiler vectorizes the block sums.
//!
//! Within a block the integer sum is exact, so the two paths differ only in the order
//! of their f32 additions.

use covey_tensors::quant::{INT4_GROUP, Int4Tensor, Int8Tensor};

/// Values per quantized block of activations; also the int4 weight group.
pub(crate) const BLOCK: usize = 32;
const _: () = assert!(INT4_GROUP == BLOCK);

/// Which implementation of the integer kernels runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KernelPath {
    /// The fastest this CPU has, detected at run time (AVX2 on x86-64; the portable
    /// code elsewhere).
    #[default]
    Native,
    /// Plain Rust: what a CPU without the native kernels runs. Tests and benchmarks
    /// force it to check it against the native path and to measure it.
    Portable,
}

/// Rows of activations quantized to int8 in blocks of [`BLOCK`].
pub(crate) struct QuantizedRows {
    cols: usize,
    values: Vec<i8>,
    /// One scale per block: `x ≈ value · scale`.
    scales: Vec<f32>,
    /// Per block, `scale · Σ value`: what an int4 group's minimum multiplies.
    sums: Vec<f32>,
}

impl QuantizedRows {
    /// Quantize `n` rows of `cols` values (`cols` a multiple of [`BLOCK`]).
    pub(crate) fn quantize(x: &[f32], n: usize, cols: usize) -> Self {
        debug_assert!(cols.is_multiple_of(BLOCK) && x.len() == n * cols);
        let blocks = x.len() / BLOCK;
        let mut values = vec![0i8; x.len()];
        let mut scales = Vec::with_capacity(blocks);
        let mut sums = Vec::with_capacity(blocks);
        for (block, out) in x.chunks_exact(BLOCK).zip(values.chunks_exact_mut(BLOCK)) {
            let amax = block.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let scale = amax / 127.0;
            let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
            let mut sum = 0i32;
            for (o, &v) in out.iter_mut().zip(block) {
                // |v · inv| ≤ 127 by construction; NaN becomes 0.
                let q = (v * inv).round() as i8;
                *o = q;
                sum += i32::from(q);
            }
            scales.push(scale);
            sums.push(scale * sum as f32);
        }
        Self { cols, values, scales, sums }
    }

    /// Row `t`: its values, block scales and block sums.
    fn row(&self, t: usize) -> (&[i8], &[f32], &[f32]) {
        let blocks = self.cols / BLOCK;
        (
            &self.values[t * self.cols..(t + 1) * self.cols],
            &self.scales[t * blocks..(t + 1) * blocks],
            &self.sums[t * blocks..(t + 1) * blocks],
        )
    }
}

/// A quantized weight, as the integer kernels read it.
#[derive(Clone, Copy)]
pub(crate) enum QuantizedWeight<'a> {
    Int8(&'a Int8Tensor),
    Int4(&'a Int4Tensor),
}

impl QuantizedWeight<'_> {
    /// `out[i][t] = W[first_row + i] · x[t]` for every row of `out` (`[rows, n]`,
    /// one row of `out` per weight row) and every input row `t`.
    pub(crate) fn rows_times(&self, path: KernelPath, x: &QuantizedRows, first_row: usize, out: &mut [f32], n: usize) {
        #[cfg(target_arch = "x86_64")]
        if path == KernelPath::Native
            && let Some(simd) = pulp::x86::V3::try_new()
        {
            pulp::Simd::vectorize(simd, avx2::Rows { simd, weight: *self, x, first_row, out, n });
            return;
        }
        let _ = path;
        portable_rows(*self, x, first_row, out, n);
    }
}

/// The per-row dot products, shared by both paths: `int8(row, x_row)` and
/// `int4(row, x_row)` are the path's block kernels.
#[inline(always)]
fn for_each_row(
    weight: QuantizedWeight<'_>,
    x: &QuantizedRows,
    first_row: usize,
    out: &mut [f32],
    n: usize,
    int8: impl Fn(&[i8], &[i8], &[f32]) -> f32,
    int4: impl Fn(&[u8], &[f32], &[f32], &[i8], &[f32], &[f32]) -> f32,
) {
    let cols = x.cols;
    let groups = cols / BLOCK;
    for (i, acc) in out.chunks_exact_mut(n).enumerate() {
        let r = first_row + i;
        match weight {
            QuantizedWeight::Int8(q) => {
                let row = &q.values[r * cols..(r + 1) * cols];
                let scale = q.scales[r];
                for (t, o) in acc.iter_mut().enumerate() {
                    let (xq, xd, _) = x.row(t);
                    *o = int8(row, xq, xd) * scale;
                }
            }
            QuantizedWeight::Int4(q) => {
                let packed = &q.packed[r * cols / 2..(r + 1) * cols / 2];
                let (d, m) = (&q.scales[r * groups..(r + 1) * groups], &q.mins[r * groups..(r + 1) * groups]);
                for (t, o) in acc.iter_mut().enumerate() {
                    let (xq, xd, xs) = x.row(t);
                    *o = int4(packed, d, m, xq, xd, xs);
                }
            }
        }
    }
}

fn portable_rows(weight: QuantizedWeight<'_>, x: &QuantizedRows, first_row: usize, out: &mut [f32], n: usize) {
    for_each_row(weight, x, first_row, out, n, portable_int8, portable_int4);
}

/// `Σ_b d_b · Σ_j w_j q_j` over the blocks of one int8 row.
#[inline(always)]
fn portable_int8(w: &[i8], xq: &[i8], xd: &[f32]) -> f32 {
    let mut acc = 0.0f32;
    for ((wb, xb), &d) in w.chunks_exact(BLOCK).zip(xq.chunks_exact(BLOCK)).zip(xd) {
        let mut s = 0i32;
        for (&a, &b) in wb.iter().zip(xb) {
            s += i32::from(a) * i32::from(b);
        }
        acc += s as f32 * d;
    }
    acc
}

/// One int4 row: per group, `scale · d_b · Σ_j code_j q_j + min · d_b · Σ_j q_j`. Byte
/// `j` of a group holds code `j` (low nibble) and code `j + 16` (high nibble).
#[inline(always)]
fn portable_int4(packed: &[u8], scales: &[f32], mins: &[f32], xq: &[i8], xd: &[f32], xs: &[f32]) -> f32 {
    let mut acc = 0.0f32;
    let half = BLOCK / 2;
    for (g, (bytes, xb)) in packed.chunks_exact(half).zip(xq.chunks_exact(BLOCK)).enumerate() {
        let mut s = 0i32;
        for j in 0..half {
            s += i32::from(bytes[j] & 0x0f) * i32::from(xb[j]) + i32::from(bytes[j] >> 4) * i32::from(xb[j + half]);
        }
        acc += s as f32 * (scales[g] * xd[g]) + mins[g] * xs[g];
    }
    acc
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use core::arch::x86_64::{__m128i, __m256, __m256i};

    use pulp::bytemuck::cast;
    use pulp::x86::V3;

    use super::{BLOCK, QuantizedRows, QuantizedWeight, for_each_row};

    /// [`super::QuantizedWeight::rows_times`] compiled for AVX2 + FMA.
    pub(super) struct Rows<'a> {
        pub simd: V3,
        pub weight: QuantizedWeight<'a>,
        pub x: &'a QuantizedRows,
        pub first_row: usize,
        pub out: &'a mut [f32],
        pub n: usize,
    }

    impl pulp::WithSimd for Rows<'_> {
        type Output = ();

        #[inline(always)]
        fn with_simd<S: pulp::Simd>(self, _: S) {
            let Self { simd, weight, x, first_row, out, n } = self;
            for_each_row(
                weight,
                x,
                first_row,
                out,
                n,
                |w, xq, xd| int8(simd, w, xq, xd),
                |p, d, m, xq, xd, xs| int4(simd, p, d, m, xq, xd, xs),
            );
        }
    }

    /// Eight i32 lanes of `Σ u·s` over one block: `u` unsigned bytes, `s` signed.
    #[inline(always)]
    fn block_dot(simd: V3, u: __m256i, s: __m256i) -> __m256 {
        let pairs = simd.avx2._mm256_maddubs_epi16(u, s);
        let quads = simd.avx2._mm256_madd_epi16(pairs, simd.avx._mm256_set1_epi16(1));
        simd.avx._mm256_cvtepi32_ps(quads)
    }

    #[inline(always)]
    fn sum_lanes(v: __m256) -> f32 {
        let lanes: [f32; 8] = cast(v);
        lanes.iter().sum()
    }

    /// One int8 row. `vpmaddubsw` multiplies unsigned by signed bytes, so the weight's
    /// sign moves onto the activation (`|w| · (x · sign w)`, llama.cpp's trick). Two
    /// accumulators hide the FMA latency.
    #[inline(always)]
    pub(super) fn int8(simd: V3, w: &[i8], xq: &[i8], xd: &[f32]) -> f32 {
        let (wb, _) = pulp::as_arrays::<BLOCK, i8>(w);
        let (xb, _) = pulp::as_arrays::<BLOCK, i8>(xq);
        let dot = |k: usize| {
            let w: __m256i = cast(wb[k]);
            let x: __m256i = cast(xb[k]);
            let sx = simd.avx2._mm256_sign_epi8(x, w);
            let aw = simd.avx2._mm256_sign_epi8(w, w);
            block_dot(simd, aw, sx)
        };
        let mut acc0 = simd.avx._mm256_setzero_ps();
        let mut acc1 = acc0;
        let blocks = xd.len();
        let mut k = 0;
        while k + 2 <= blocks {
            acc0 = simd.fma._mm256_fmadd_ps(dot(k), simd.avx._mm256_set1_ps(xd[k]), acc0);
            acc1 = simd.fma._mm256_fmadd_ps(dot(k + 1), simd.avx._mm256_set1_ps(xd[k + 1]), acc1);
            k += 2;
        }
        if k < blocks {
            acc0 = simd.fma._mm256_fmadd_ps(dot(k), simd.avx._mm256_set1_ps(xd[k]), acc0);
        }
        sum_lanes(simd.avx._mm256_add_ps(acc0, acc1))
    }

    /// One int4 row: each group's 16 bytes become 32 codes (low nibbles, then high),
    /// in the order of the activations.
    #[inline(always)]
    pub(super) fn int4(
        simd: V3,
        packed: &[u8],
        scales: &[f32],
        mins: &[f32],
        xq: &[i8],
        xd: &[f32],
        xs: &[f32],
    ) -> f32 {
        let (pb, _) = pulp::as_arrays::<{ BLOCK / 2 }, u8>(packed);
        let (xb, _) = pulp::as_arrays::<BLOCK, i8>(xq);
        let low = simd.sse2._mm_set1_epi8(0x0f);
        let dot = |g: usize| {
            let bytes: __m128i = cast(pb[g]);
            let lo = simd.sse2._mm_and_si128(bytes, low);
            let hi = simd.sse2._mm_and_si128(simd.sse2._mm_srli_epi16::<4>(bytes), low);
            let codes = simd.avx._mm256_set_m128i(hi, lo);
            block_dot(simd, codes, cast(xb[g]))
        };
        let mut acc0 = simd.avx._mm256_setzero_ps();
        let mut acc1 = acc0;
        let mut offset = 0.0f32;
        let groups = scales.len();
        let mut g = 0;
        while g + 2 <= groups {
            acc0 = simd.fma._mm256_fmadd_ps(dot(g), simd.avx._mm256_set1_ps(scales[g] * xd[g]), acc0);
            acc1 = simd.fma._mm256_fmadd_ps(dot(g + 1), simd.avx._mm256_set1_ps(scales[g + 1] * xd[g + 1]), acc1);
            offset += mins[g] * xs[g] + mins[g + 1] * xs[g + 1];
            g += 2;
        }
        if g < groups {
            acc0 = simd.fma._mm256_fmadd_ps(dot(g), simd.avx._mm256_set1_ps(scales[g] * xd[g]), acc0);
            offset += mins[g] * xs[g];
        }
        sum_lanes(simd.avx._mm256_add_ps(acc0, acc1)) + offset
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use covey_tensors::HostTensor;

    fn wavy(rows: usize, cols: usize, f: f32) -> HostTensor {
        let data = (0..rows * cols).map(|i| ((i as f32) * f).sin() * 0.5).collect();
        HostTensor::new(vec![rows, cols], data).expect("test value")
    }

    /// `[rows, n]` through one path.
    fn run(path: KernelPath, w: QuantizedWeight<'_>, x: &QuantizedRows, rows: usize, n: usize) -> Vec<f32> {
        let mut out = vec![0.0; rows * n];
        w.rows_times(path, x, 0, &mut out, n);
        out
    }

    #[test]
    fn activations_round_trip_within_half_a_step_per_block() {
        let x: Vec<f32> = (0..2 * 96).map(|i| ((i as f32) * 0.37).cos() * (1 + i % 7) as f32).collect();
        let q = QuantizedRows::quantize(&x, 2, 96);
        for t in 0..2 {
            let (v, d, s) = q.row(t);
            for (b, block) in x[t * 96..(t + 1) * 96].chunks_exact(BLOCK).enumerate() {
                let amax = block.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                assert!((d[b] - amax / 127.0).abs() <= f32::EPSILON * amax);
                let codes = &v[b * BLOCK..(b + 1) * BLOCK];
                for (&c, &orig) in codes.iter().zip(block) {
                    assert!((f32::from(c) * d[b] - orig).abs() <= d[b] / 2.0 + 1e-6, "{c} {orig}");
                }
                let sum: i32 = codes.iter().map(|&c| i32::from(c)).sum();
                assert!((s[b] - sum as f32 * d[b]).abs() < 1e-5);
            }
        }
        // A block of zeros has scale 0 and codes 0, not NaN.
        let z = QuantizedRows::quantize(&[0.0; 32], 1, 32);
        assert_eq!((z.scales[0], z.values.iter().all(|&v| v == 0)), (0.0, true));
    }

    /// Both paths compute, up to f32 summation order, the exact dot product of the
    /// stored weights with the quantized activations; and that is close to the dot
    /// product with the original activations.
    #[test]
    fn native_and_portable_paths_agree_with_the_dequantized_product() {
        let (rows, cols, n) = (21, 160, 3);
        let w = wavy(rows, cols, 0.713);
        let x: Vec<f32> = (0..n * cols).map(|i| ((i as f32) * 0.29).cos() * 1.5).collect();
        let xq = QuantizedRows::quantize(&x, n, cols);
        let q8 = Int8Tensor::quantize(&w).expect("test value");
        let q4 = Int4Tensor::quantize(&w).expect("test value");
        for (weight, dense) in
            [(QuantizedWeight::Int8(&q8), q8.dequantize()), (QuantizedWeight::Int4(&q4), q4.dequantize())]
        {
            let native = run(KernelPath::Native, weight, &xq, rows, n);
            let portable = run(KernelPath::Portable, weight, &xq, rows, n);
            for r in 0..rows {
                for t in 0..n {
                    let wr = &dense.data[r * cols..(r + 1) * cols];
                    let (v, d, _) = xq.row(t);
                    let exact: f64 = wr
                        .iter()
                        .zip(v)
                        .enumerate()
                        .map(|(c, (&a, &b))| f64::from(a) * f64::from(b) * f64::from(d[c / BLOCK]))
                        .sum();
                    let with_f32_x: f32 = wr.iter().zip(&x[t * cols..(t + 1) * cols]).map(|(a, b)| a * b).sum();
                    let magnitude: f32 = wr.iter().zip(&x[t * cols..(t + 1) * cols]).map(|(a, b)| (a * b).abs()).sum();
                    let (a, b) = (native[r * n + t], portable[r * n + t]);
                    assert!((a - b).abs() <= 1e-5 * magnitude, "row {r} token {t}: native {a} portable {b}");
                    assert!((f64::from(b) - exact).abs() <= 1e-5 * f64::from(magnitude), "{b} vs exact {exact}");
                    // Activation rounding: at most half a step of each block's scale per value.
                    assert!((b - with_f32_x).abs() <= 0.01 * magnitude, "{b} vs f32 activations {with_f32_x}");
                }
            }
        }
    }

    #[test]
    fn extreme_codes_do_not_saturate() {
        // -128 weights (a file may hold them) against ±127 activations: vpmaddubsw's
        // i16 pair sums stay below 2 · 128 · 127 < 32767.
        let cols = 64;
        let q8 = Int8Tensor {
            shape: vec![2, cols],
            values: [vec![-128i8; cols], vec![127i8; cols]].concat(),
            scales: vec![1.0, 1.0],
        };
        let x: Vec<f32> = (0..cols).map(|i| if i % 2 == 0 { 127.0 } else { -127.0 }).collect();
        let xq = QuantizedRows::quantize(&x, 1, cols);
        let ones = vec![-127.0f32; cols];
        let xo = QuantizedRows::quantize(&ones, 1, cols);
        for path in [KernelPath::Native, KernelPath::Portable] {
            assert_eq!(run(path, QuantizedWeight::Int8(&q8), &xq, 2, 1), vec![0.0, 0.0], "{path:?}");
            assert_eq!(
                run(path, QuantizedWeight::Int8(&q8), &xo, 2, 1),
                vec![128.0 * 127.0 * cols as f32, -127.0 * 127.0 * cols as f32],
                "{path:?}"
            );
        }
    }
}
