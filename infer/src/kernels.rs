//! Matrix kernels over f32, int8 and packed int4 weights.
//!
//! A [`Weight`] is `[rows, cols]` (Hugging Face `[out, in]`). [`Weight::matmul`] computes
//! `y[t] = W · x[t]` for `n` input rows, parallel over blocks of output rows (rayon), and
//! never expands a quantized weight:
//! - int8 and int4 weights multiply activations quantized to int8 in blocks of 32, in
//!   integers (`crate::qdot`, llama.cpp's scheme), for fewer than [`GEMM_MIN_INPUTS`]
//!   input rows (decoding); from that many on (a prompt), each task decodes a panel of
//!   rows to f32 and multiplies it with `gemm` (f32 activations, exact dequantization);
//! - f32 weights (and int8 ones whose rows are not a multiple of 32 long) take f32 dot
//!   products, an int8 row decoded into a row-sized scratch buffer first, four inputs
//!   per pass over the row. That SIMD code is chosen at run time by `pulp` (AVX2/FMA,
//!   AVX-512 or NEON; scalar otherwise).

use covey_tensors::quant::{INT4_GROUP, Int4Tensor, Int8Tensor};
use rayon::prelude::*;

use crate::gemm::{Mat, MatMut, Threads, matmul};
use crate::qdot::{BLOCK, KernelPath, QuantizedRows, QuantizedWeight};

/// Input rows from which a quantized weight is multiplied as f32 panels through `gemm`
/// (prompt processing: compute-bound, where a blocked matrix product wins) instead of
/// row by row in integers (decoding: memory-bound).
pub const GEMM_MIN_INPUTS: usize = 16;
/// Rows of a weight decoded into one f32 panel (≤ 256 × cols floats: L2-sized).
const GEMM_PANEL_ROWS: usize = 256;

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

/// Output rows per parallel task: at least this many, and otherwise about eight tasks
/// per thread (enough to balance, few enough that scheduling stays negligible).
const MIN_ROWS_PER_TASK: usize = 16;

fn rows_per_task(rows: usize) -> usize {
    rows.div_ceil(8 * rayon::current_num_threads()).max(MIN_ROWS_PER_TASK)
}

/// Multiply-adds below which a matmul runs on the calling thread: handing a few
/// microseconds of work to the pool costs more than it saves (a decode step of a
/// sub-million-parameter student is mostly such matmuls).
const PARALLEL_MIN_WORK: usize = 1 << 16;

/// Whether `work` multiply-adds are worth handing to the thread pool: enough of them,
/// and more than one thread (handing work to a one-thread pool costs two context
/// switches and gains nothing).
pub(crate) fn worth_parallel(work: usize) -> bool {
    work >= PARALLEL_MIN_WORK && rayon::current_num_threads() > 1
}

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

    /// `out[t][r] = Σ_c W[r][c] · x[t][c]` for `n` rows of `x` (`[n, cols]` → `[n, rows]`),
    /// on the fastest kernels this CPU has.
    pub fn matmul(&self, x: &[f32], n: usize, out: &mut [f32]) {
        self.matmul_on(KernelPath::Native, x, n, out);
    }

    /// [`Weight::matmul`] on the kernels `path` names.
    pub fn matmul_on(&self, path: KernelPath, x: &[f32], n: usize, out: &mut [f32]) {
        let (rows, cols) = (self.rows(), self.cols());
        assert_eq!(x.len(), n * cols, "matmul input of the wrong length");
        assert_eq!(out.len(), n * rows, "matmul output of the wrong length");
        let quantized = match self {
            Self::Int8(q) if cols.is_multiple_of(BLOCK) => Some(QuantizedWeight::Int8(q)),
            Self::Int4(q) => Some(QuantizedWeight::Int4(q)),
            _ => None,
        };
        let per_task = rows_per_task(rows);
        let parallel = worth_parallel(rows * cols * n);
        // Work in a [rows, n] buffer so each task owns a contiguous block of output rows
        // (for one input row, the layout of `out` itself).
        let mut tmp = if n == 1 { Vec::new() } else { vec![0.0f32; rows * n] };
        let target: &mut [f32] = if n == 1 { out } else { &mut tmp };
        match quantized {
            Some(_) if n >= GEMM_MIN_INPUTS => {
                // Each task decodes its rows into an f32 panel (exactly the dequantized
                // matrix) and multiplies the inputs with gemm: `[len, n] = panel · xᵀ`.
                let per_panel = per_task.min(GEMM_PANEL_ROWS);
                let task = |(block, chunk): (usize, &mut [f32])| {
                    let (first, len) = (block * per_panel, chunk.len() / n);
                    let mut panel = vec![0.0f32; len * cols];
                    for (i, row) in panel.chunks_exact_mut(cols).enumerate() {
                        self.row_into(first + i, row);
                    }
                    matmul(
                        MatMut::new(chunk, len, n),
                        Mat::new(&panel, len, cols),
                        Mat::new(x, n, cols).t(),
                        false,
                        1.0,
                        Threads::One,
                    );
                };
                if parallel {
                    target.par_chunks_mut(per_panel * n).enumerate().for_each(task);
                } else {
                    target.chunks_mut(per_panel * n).enumerate().for_each(task);
                }
            }
            Some(weight) => {
                let xq = QuantizedRows::quantize(x, n, cols);
                let task = |(block, chunk): (usize, &mut [f32])| {
                    weight.rows_times(path, &xq, block * per_task, chunk, n);
                };
                if parallel {
                    target.par_chunks_mut(per_task * n).enumerate().for_each(task);
                } else {
                    target.chunks_mut(per_task * n).enumerate().for_each(task);
                }
            }
            None => {
                let arch = pulp::Arch::new();
                let task = |(block, chunk): (usize, &mut [f32])| {
                    let op = RowBlock { weight: self, x, n, first_row: block * per_task, out: chunk };
                    match path {
                        KernelPath::Native => arch.dispatch(op),
                        KernelPath::Portable => pulp::Simd::vectorize(pulp::Scalar::new(), op),
                    }
                };
                if parallel {
                    target.par_chunks_mut(per_task * n).enumerate().for_each(task);
                } else {
                    target.chunks_mut(per_task * n).enumerate().for_each(task);
                }
            }
        }
        if n > 1 {
            for r in 0..rows {
                for t in 0..n {
                    out[t * rows + r] = tmp[r * n + t];
                }
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

    /// f32 weights multiply exactly; int8 and int4 ones multiply activations rounded to
    /// int8 per block of 32, so within a small fraction of `Σ |w x|` of their
    /// dequantized matrix. Both kernel paths, and int8 rows that are not a multiple of
    /// 32 long (the f32 fallback).
    #[test]
    fn every_format_multiplies_like_its_dequantized_matrix() {
        for cols in [96, 40] {
            let w = wavy(37, cols);
            for n in [1, 3, 6, GEMM_MIN_INPUTS + 3] {
                let x: Vec<f32> = (0..n * cols).map(|i| ((i as f32) * 0.29).cos()).collect();
                let q8 = Int8Tensor::quantize(&w).expect("test value");
                let mut cases = vec![
                    (Weight::F32 { rows: 37, cols, data: w.data.clone() }, w.clone(), 1e-5),
                    // Integer products round activations to int8: within 1 % of Σ|w x|.
                    // The prompt path and rows that are not a multiple of 32: f32.
                    (
                        Weight::Int8(q8.clone()),
                        q8.dequantize(),
                        if cols % 32 == 0 && n < GEMM_MIN_INPUTS { 1e-2 } else { 1e-5 },
                    ),
                ];
                if cols % 32 == 0 {
                    let q4 = Int4Tensor::quantize(&w).expect("test value");
                    cases.push((
                        Weight::Int4(q4.clone()),
                        q4.dequantize(),
                        if n < GEMM_MIN_INPUTS { 1e-2 } else { 1e-5 },
                    ));
                }
                for (weight, dense, tolerance) in cases {
                    let want = reference(&dense, &x, n);
                    let magnitude = |t: usize, r: usize| -> f32 {
                        (0..cols).map(|c| (dense.data[r * cols + c] * x[t * cols + c]).abs()).sum()
                    };
                    let mut by_path = Vec::new();
                    for path in [KernelPath::Native, KernelPath::Portable] {
                        let mut out = vec![0.0; n * 37];
                        weight.matmul_on(path, &x, n, &mut out);
                        for t in 0..n {
                            for r in 0..37 {
                                let (a, b) = (out[t * 37 + r], want[t * 37 + r]);
                                assert!((a - b).abs() <= tolerance * magnitude(t, r) + 1e-6, "{path:?} {a} vs {b}");
                            }
                        }
                        by_path.push(out);
                    }
                    for (i, (a, b)) in by_path[0].iter().zip(&by_path[1]).enumerate() {
                        assert!((a - b).abs() <= 1e-5 * magnitude(i / 37, i % 37) + 1e-7, "native {a} portable {b}");
                    }
                    let mut row = vec![0.0; cols];
                    weight.row_into(5, &mut row);
                    assert_eq!(row, dense.data[5 * cols..6 * cols]);
                }
            }
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
