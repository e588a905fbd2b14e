//! Matrix kernels over f32, int8 and packed int4 weights.
//!
//! A [`Weight`] is `[rows, cols]` (Hugging Face `[out, in]`). [`Weight::matmul`] computes
//! `y[t] = W · x[t]` for `n` input rows, parallel over blocks of output rows (rayon), and
//! never expands a quantized weight: each task decodes one int8 or int4 row at a time
//! into a row-sized scratch buffer, then takes its dot products with the inputs (four
//! inputs per pass over the row, so a weight is read once for four tokens). The SIMD
//! code is chosen at run time by `pulp` (AVX2/FMA, AVX-512 or NEON; scalar otherwise).

use covey_tensors::quant::{INT4_GROUP, Int4Tensor, Int8Tensor};
use rayon::prelude::*;

/// A projection weight, held as stored.
#[derive(Debug, Clone)]
pub enum Weight {
    /// Full precision, row-major.
    F32 {
        /// Output rows.
        rows: usize,
        /// Input columns.
        cols: usize,
        /// `rows × cols` values.
        data: Vec<f32>,
    },
    /// int8 per output channel.
    Int8(Int8Tensor),
    /// int4 group-wise (group 32), packed.
    Int4(Int4Tensor),
}

/// Output rows per parallel task: large enough to amortise scheduling, small enough to
/// balance two to sixteen threads.
const ROWS_PER_TASK: usize = 16;

/// Multiply-adds below which a matmul runs on the calling thread: handing a few
/// microseconds of work to the pool costs more than it saves (a decode step of a
/// sub-million-parameter student is mostly such matmuls).
pub(crate) const PARALLEL_MIN_WORK: usize = 1 << 16;

impl Weight {
    /// Output rows.
    pub fn rows(&self) -> usize {
        match self {
            Self::F32 { rows, .. } => *rows,
            Self::Int8(q) => q.shape[0],
            Self::Int4(q) => q.shape[0],
        }
    }

    /// Input columns.
    pub fn cols(&self) -> usize {
        match self {
            Self::F32 { cols, .. } => *cols,
            Self::Int8(q) => q.shape[1],
            Self::Int4(q) => q.shape[1],
        }
    }

    /// Bytes of weight data held.
    pub fn bytes(&self) -> usize {
        match self {
            Self::F32 { data, .. } => data.len() * 4,
            Self::Int8(q) => q.values.len() + q.scales.len() * 4,
            Self::Int4(q) => q.bytes(),
        }
    }

    /// Copy row `r` into `out` as f32 (an embedding lookup).
    pub fn row_into(&self, r: usize, out: &mut [f32]) {
        let cols = self.cols();
        match self {
            Self::F32 { data, .. } => out.copy_from_slice(&data[r * cols..(r + 1) * cols]),
            Self::Int8(q) => {
                let s = q.scales[r];
                for (o, &v) in out.iter_mut().zip(&q.values[r * cols..(r + 1) * cols]) {
                    *o = f32::from(v) * s;
                }
            }
            Self::Int4(q) => {
                let groups = cols / INT4_GROUP;
                let mut buf = [0.0f32; INT4_GROUP];
                for g in 0..groups {
                    let gi = r * groups + g;
                    q.unpack_group(gi, &q.packed[gi * INT4_GROUP / 2..(gi + 1) * INT4_GROUP / 2], &mut buf);
                    out[g * INT4_GROUP..(g + 1) * INT4_GROUP].copy_from_slice(&buf);
                }
            }
        }
    }

    /// `out[t][r] = Σ_c W[r][c] · x[t][c]` for `n` rows of `x` (`[n, cols]` → `[n, rows]`).
    pub fn matmul(&self, x: &[f32], n: usize, out: &mut [f32]) {
        let rows = self.rows();
        debug_assert_eq!(x.len(), n * self.cols());
        debug_assert_eq!(out.len(), n * rows);
        // Work in a [rows, n] buffer so each task owns a contiguous block of output rows.
        let mut tmp = vec![0.0f32; rows * n];
        let arch = pulp::Arch::new();
        let task = |(block, chunk): (usize, &mut [f32])| {
            arch.dispatch(RowBlock { weight: self, x, n, first_row: block * ROWS_PER_TASK, out: chunk });
        };
        if rows * self.cols() * n < PARALLEL_MIN_WORK {
            tmp.chunks_mut(ROWS_PER_TASK * n).enumerate().for_each(task);
        } else {
            tmp.par_chunks_mut(ROWS_PER_TASK * n).enumerate().for_each(task);
        }
        for r in 0..rows {
            for t in 0..n {
                out[t * rows + r] = tmp[r * n + t];
            }
        }
    }
}

/// One task of [`Weight::matmul`]: a block of output rows for every input row. Run
/// through `pulp`'s dispatch, so the whole body — the int8/int4 decoding included — is
/// compiled for the best instruction set the CPU has (AVX2 + FMA, AVX-512, NEON) and
/// chosen at run time, without `unsafe` here.
struct RowBlock<'a> {
    weight: &'a Weight,
    x: &'a [f32],
    n: usize,
    first_row: usize,
    out: &'a mut [f32],
}

impl pulp::WithSimd for RowBlock<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, simd: S) {
        let Self { weight, x, n, first_row, out } = self;
        let cols = weight.cols();
        let mut scratch = match weight {
            Weight::F32 { .. } => Vec::new(),
            _ => vec![0.0f32; cols],
        };
        for (i, acc) in out.chunks_exact_mut(n).enumerate() {
            let r = first_row + i;
            let row: &[f32] = match weight {
                Weight::F32 { data, .. } => &data[r * cols..(r + 1) * cols],
                Weight::Int8(q) => {
                    let s = q.scales[r];
                    for (o, &v) in scratch.iter_mut().zip(&q.values[r * cols..(r + 1) * cols]) {
                        *o = f32::from(v) * s;
                    }
                    &scratch
                }
                Weight::Int4(q) => {
                    let groups = cols / INT4_GROUP;
                    let half = INT4_GROUP / 2;
                    for g in 0..groups {
                        let gi = r * groups + g;
                        let (d, m) = (q.scales[gi], q.mins[gi]);
                        let mut bytes = [0u8; INT4_GROUP / 2];
                        bytes.copy_from_slice(&q.packed[gi * half..(gi + 1) * half]);
                        // Fixed-size arrays: the decoding vectorizes.
                        let mut group = [0.0f32; INT4_GROUP];
                        for j in 0..INT4_GROUP / 2 {
                            group[j] = f32::from(bytes[j] & 0x0f);
                            group[j + INT4_GROUP / 2] = f32::from(bytes[j] >> 4);
                        }
                        for v in &mut group {
                            *v = *v * d + m;
                        }
                        scratch[g * INT4_GROUP..(g + 1) * INT4_GROUP].copy_from_slice(&group);
                    }
                    &scratch
                }
            };
            let mut t = 0;
            while t + 4 <= n {
                let sums = dot4(simd, row, &x[t * cols..(t + 4) * cols]);
                acc[t..t + 4].copy_from_slice(&sums);
                t += 4;
            }
            while t < n {
                acc[t] = dot1(simd, row, &x[t * cols..(t + 1) * cols]);
                t += 1;
            }
        }
    }
}

/// `Σ a·b`, two accumulators wide.
#[inline(always)]
fn dot1<S: pulp::Simd>(simd: S, a: &[f32], b: &[f32]) -> f32 {
    let (ah, at) = S::as_simd_f32s(a);
    let (bh, bt) = S::as_simd_f32s(b);
    let (mut s0, mut s1) = (simd.splat_f32s(0.0), simd.splat_f32s(0.0));
    let mut pairs_a = ah.chunks_exact(2);
    let mut pairs_b = bh.chunks_exact(2);
    for (pa, pb) in (&mut pairs_a).zip(&mut pairs_b) {
        s0 = simd.mul_add_e_f32s(pa[0], pb[0], s0);
        s1 = simd.mul_add_e_f32s(pa[1], pb[1], s1);
    }
    for (&va, &vb) in pairs_a.remainder().iter().zip(pairs_b.remainder()) {
        s0 = simd.mul_add_e_f32s(va, vb, s0);
    }
    let mut sum = simd.reduce_sum_f32s(simd.add_f32s(s0, s1));
    for (x, y) in at.iter().zip(bt) {
        sum += x * y;
    }
    sum
}

/// The dot products of one weight row with four consecutive input rows (`x` is
/// `[4, cols]`): each weight vector is loaded once for four tokens.
#[inline(always)]
fn dot4<S: pulp::Simd>(simd: S, w: &[f32], x: &[f32]) -> [f32; 4] {
    let cols = w.len();
    let (wh, wt) = S::as_simd_f32s(w);
    let (x0, t0) = S::as_simd_f32s(&x[..cols]);
    let (x1, t1) = S::as_simd_f32s(&x[cols..2 * cols]);
    let (x2, t2) = S::as_simd_f32s(&x[2 * cols..3 * cols]);
    let (x3, t3) = S::as_simd_f32s(&x[3 * cols..]);
    let z = simd.splat_f32s(0.0);
    let (mut a0, mut a1, mut a2, mut a3) = (z, z, z, z);
    for ((((&wv, &v0), &v1), &v2), &v3) in wh.iter().zip(x0).zip(x1).zip(x2).zip(x3) {
        a0 = simd.mul_add_e_f32s(wv, v0, a0);
        a1 = simd.mul_add_e_f32s(wv, v1, a1);
        a2 = simd.mul_add_e_f32s(wv, v2, a2);
        a3 = simd.mul_add_e_f32s(wv, v3, a3);
    }
    let mut out =
        [simd.reduce_sum_f32s(a0), simd.reduce_sum_f32s(a1), simd.reduce_sum_f32s(a2), simd.reduce_sum_f32s(a3)];
    for (j, &wv) in wt.iter().enumerate() {
        out[0] += wv * t0[j];
        out[1] += wv * t1[j];
        out[2] += wv * t2[j];
        out[3] += wv * t3[j];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use covey_tensors::HostTensor;

    fn wavy(rows: usize, cols: usize) -> HostTensor {
        let data = (0..rows * cols).map(|i| ((i as f32) * 0.713).sin() * 0.5).collect();
        HostTensor::new(vec![rows, cols], data).expect("test value")
    }

    fn reference(w: &HostTensor, x: &[f32], n: usize) -> Vec<f32> {
        let (rows, cols) = (w.shape[0], w.shape[1]);
        let mut out = vec![0.0; n * rows];
        for t in 0..n {
            for r in 0..rows {
                out[t * rows + r] = (0..cols).map(|c| w.data[r * cols + c] * x[t * cols + c]).sum();
            }
        }
        out
    }

    #[test]
    fn every_format_multiplies_like_its_dequantized_matrix() {
        let w = wavy(37, 96);
        let n = 3;
        let x: Vec<f32> = (0..n * 96).map(|i| ((i as f32) * 0.29).cos()).collect();
        let q8 = Int8Tensor::quantize(&w).expect("test value");
        let q4 = Int4Tensor::quantize(&w).expect("test value");
        let cases = [
            (Weight::F32 { rows: 37, cols: 96, data: w.data.clone() }, w.clone()),
            (Weight::Int8(q8.clone()), q8.dequantize()),
            (Weight::Int4(q4.clone()), q4.dequantize()),
        ];
        for (weight, dense) in cases {
            let mut out = vec![0.0; n * 37];
            weight.matmul(&x, n, &mut out);
            let want = reference(&dense, &x, n);
            for (a, b) in out.iter().zip(&want) {
                assert!((a - b).abs() < 1e-4, "{a} vs {b}");
            }
            let mut row = vec![0.0; 96];
            weight.row_into(5, &mut row);
            assert_eq!(row, dense.data[5 * 96..6 * 96]);
        }
    }

    #[test]
    fn quantized_weights_hold_fewer_bytes() {
        let w = wavy(64, 64);
        let f = Weight::F32 { rows: 64, cols: 64, data: w.data.clone() }.bytes();
        let i8b = Weight::Int8(Int8Tensor::quantize(&w).expect("test value")).bytes();
        let i4b = Weight::Int4(Int4Tensor::quantize(&w).expect("test value")).bytes();
        assert!(i8b * 3 < f && i4b < i8b * 3 / 4, "{f} {i8b} {i4b}");
    }
}
