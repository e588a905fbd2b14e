//! Matrix kernels over f32, int8 and packed int4 weights.
//!
//! A [`Weight`] is `[rows, cols]` (Hugging Face `[out, in]`). [`Weight::matmul`] computes
//! `y[t] = W · x[t]` for `n` input rows, parallel over blocks of output rows (rayon), and
//! never expands a quantized weight: int8 rows are converted on the fly inside the dot
//! product and int4 groups are unpacked 32 values at a time into a stack buffer.

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

#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s = (acc[0] + acc[4]) + (acc[1] + acc[5]) + (acc[2] + acc[6]) + (acc[3] + acc[7]);
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

#[inline]
fn dot_i8(q: &[i8], x: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (cq, cx) = (q.chunks_exact(8), x.chunks_exact(8));
    let (rq, rx) = (cq.remainder(), cx.remainder());
    for (a, b) in cq.zip(cx) {
        for i in 0..8 {
            acc[i] += f32::from(a[i]) * b[i];
        }
    }
    let mut s = (acc[0] + acc[4]) + (acc[1] + acc[5]) + (acc[2] + acc[6]) + (acc[3] + acc[7]);
    for (a, b) in rq.iter().zip(rx) {
        s += f32::from(*a) * b;
    }
    s
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

    /// `out[t][r] = Σ_c W[r][c] · x[t][c]` for `n` rows of `x` (`[n, cols]` → `[n, rows]`).
    pub fn matmul(&self, x: &[f32], n: usize, out: &mut [f32]) {
        let (rows, cols) = (self.rows(), self.cols());
        debug_assert_eq!(x.len(), n * cols);
        debug_assert_eq!(out.len(), n * rows);
        // Per-group sums of x, for the int4 minimum term: Σ (q·d + m)·x = d·Σ q·x + m·Σ x.
        let xsum: Vec<f32> = match self {
            Self::Int4(_) => x.chunks_exact(INT4_GROUP).map(|g| g.iter().sum()).collect(),
            _ => Vec::new(),
        };
        // Work in a [rows, n] buffer so each task owns a contiguous block of output rows.
        let mut tmp = vec![0.0f32; rows * n];
        tmp.par_chunks_mut(ROWS_PER_TASK * n).enumerate().for_each(|(block, chunk)| {
            let r0 = block * ROWS_PER_TASK;
            let mut unpacked = [0.0f32; INT4_GROUP];
            for (i, acc) in chunk.chunks_exact_mut(n).enumerate() {
                let r = r0 + i;
                match self {
                    Self::F32 { data, .. } => {
                        let w = &data[r * cols..(r + 1) * cols];
                        for (t, a) in acc.iter_mut().enumerate() {
                            *a = dot(w, &x[t * cols..(t + 1) * cols]);
                        }
                    }
                    Self::Int8(q) => {
                        let w = &q.values[r * cols..(r + 1) * cols];
                        let s = q.scales[r];
                        for (t, a) in acc.iter_mut().enumerate() {
                            *a = s * dot_i8(w, &x[t * cols..(t + 1) * cols]);
                        }
                    }
                    Self::Int4(q) => {
                        let groups = cols / INT4_GROUP;
                        acc.iter_mut().for_each(|a| *a = 0.0);
                        for g in 0..groups {
                            let gi = r * groups + g;
                            let bytes = &q.packed[gi * INT4_GROUP / 2..(gi + 1) * INT4_GROUP / 2];
                            // Codes as f32 (scale and minimum applied after the dot product).
                            for (j, &b) in bytes.iter().enumerate() {
                                unpacked[j] = f32::from(b & 0x0f);
                                unpacked[j + INT4_GROUP / 2] = f32::from(b >> 4);
                            }
                            let (d, m) = (q.scales[gi], q.mins[gi]);
                            for (t, a) in acc.iter_mut().enumerate() {
                                let xg = &x[t * cols + g * INT4_GROUP..t * cols + (g + 1) * INT4_GROUP];
                                *a += d * dot(&unpacked, xg) + m * xsum[t * groups + g];
                            }
                        }
                    }
                }
            }
        });
        for r in 0..rows {
            for t in 0..n {
                out[t * rows + r] = tmp[r * n + t];
            }
        }
    }
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
