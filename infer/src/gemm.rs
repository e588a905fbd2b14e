//! The one home of `unsafe` in the workspace: a bounds-checked, safe front to `gemm`'s
//! f32 kernels (AVX-512 with the `x86-v4` feature, AVX2/FMA, NEON or portable code,
//! chosen at run time). covey-qlora's trainer and this engine's prompt path use it.

#![allow(unsafe_code)]

use ::gemm::Parallelism;

/// A read-only matrix: `rows × cols` stored row-major with row stride `rs`, read as is
/// or transposed.
#[derive(Clone, Copy, Debug)]
pub struct Mat<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    rs: usize,
    t: bool,
}

impl<'a> Mat<'a> {
    /// A dense row-major `rows × cols` matrix.
    pub fn new(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Self::strided(data, rows, cols, cols)
    }

    /// `rows × cols` with row stride `rs` (a block of a wider matrix).
    pub fn strided(data: &'a [f32], rows: usize, cols: usize, rs: usize) -> Self {
        assert!(cols <= rs || rows <= 1, "row stride {rs} shorter than {cols} columns");
        assert!(rows == 0 || cols == 0 || data.len() >= (rows - 1) * rs + cols, "matrix out of bounds");
        Self { data, rows, cols, rs, t: false }
    }

    /// The transpose (no copy).
    pub fn t(self) -> Self {
        Self { t: !self.t, ..self }
    }

    /// Logical (rows, cols).
    fn shape(&self) -> (usize, usize) {
        if self.t { (self.cols, self.rows) } else { (self.rows, self.cols) }
    }

    /// Logical (row stride, column stride).
    fn strides(&self) -> (isize, isize) {
        if self.t { (1, self.rs as isize) } else { (self.rs as isize, 1) }
    }
}

/// A writable dense block: `rows × cols`, row stride `rs`.
#[derive(Debug)]
pub struct MatMut<'a> {
    data: &'a mut [f32],
    rows: usize,
    cols: usize,
    rs: usize,
}

impl<'a> MatMut<'a> {
    /// A dense row-major `rows × cols` matrix.
    pub fn new(data: &'a mut [f32], rows: usize, cols: usize) -> Self {
        Self::strided(data, rows, cols, cols)
    }

    /// `rows × cols` with row stride `rs`.
    pub fn strided(data: &'a mut [f32], rows: usize, cols: usize, rs: usize) -> Self {
        assert!(cols <= rs || rows <= 1, "row stride {rs} shorter than {cols} columns");
        assert!(rows == 0 || cols == 0 || data.len() >= (rows - 1) * rs + cols, "matrix out of bounds");
        Self { data, rows, cols, rs }
    }
}

/// How many threads a product may use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Threads {
    /// The calling thread only (inside a parallel loop).
    One,
    /// The current rayon pool.
    Pool,
}

/// `dst = scale · a · b`, or `dst += scale · a · b` with `accumulate`.
///
/// Panics when the shapes do not agree (a bug of the caller, never of the input data).
pub fn matmul(dst: MatMut<'_>, a: Mat<'_>, b: Mat<'_>, accumulate: bool, scale: f32, threads: Threads) {
    let (m, k) = a.shape();
    let (k2, n) = b.shape();
    assert_eq!(k, k2, "inner dimensions differ");
    assert_eq!((dst.rows, dst.cols), (m, n), "destination shape");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for r in 0..m {
                dst.data[r * dst.rs..r * dst.rs + n].fill(0.0);
            }
        }
        return;
    }
    let (a_rs, a_cs) = a.strides();
    let (b_rs, b_cs) = b.strides();
    let parallelism = match threads {
        Threads::One => Parallelism::None,
        Threads::Pool if rayon::current_num_threads() > 1 => Parallelism::Rayon(0),
        Threads::Pool => Parallelism::None,
    };
    // SAFETY: `Mat::strided` / `MatMut::strided` checked that every element the logical
    // shapes address lies inside its slice; the shapes agree (asserted above); `dst` is a
    // unique borrow, so it aliases neither input.
    unsafe {
        ::gemm::gemm(
            m,
            n,
            k,
            dst.data.as_mut_ptr(),
            1,
            dst.rs as isize,
            accumulate,
            a.data.as_ptr(),
            a_cs,
            a_rs,
            b.data.as_ptr(),
            b_cs,
            b_rs,
            1.0,
            scale,
            false,
            false,
            false,
            parallelism,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
        let mut out = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                out[i * n + j] = (0..k).map(|p| a[i * k + p] * b[p * n + j]).sum();
            }
        }
        out
    }

    #[test]
    fn products_and_transposes_match_the_definition() {
        let (m, k, n) = (5, 7, 3);
        let a: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..k * n).map(|i| (i as f32 * 0.11).cos()).collect();
        let want = naive(&a, &b, m, k, n);
        let mut out = vec![0.0; m * n];
        matmul(MatMut::new(&mut out, m, n), Mat::new(&a, m, k), Mat::new(&b, k, n), false, 1.0, Threads::Pool);
        for (x, y) in out.iter().zip(&want) {
            assert!((x - y).abs() < 1e-5);
        }
        // bᵀ stored as [n, k], read transposed; accumulate twice the product at scale 0.5.
        let bt: Vec<f32> = (0..n * k).map(|i| b[(i % k) * n + i / k]).collect();
        matmul(MatMut::new(&mut out, m, n), Mat::new(&a, m, k), Mat::new(&bt, n, k).t(), true, 0.5, Threads::One);
        for (x, y) in out.iter().zip(&want) {
            assert!((x - 1.5 * y).abs() < 1e-5);
        }
        // A strided block: the middle 2 × 3 of a 4 × 5 matrix times a 3 × 1 vector.
        let big: Vec<f32> = (0..20).map(|i| i as f32).collect();
        let v = [1.0, 2.0, 3.0];
        let mut o = [0.0f32; 2];
        matmul(
            MatMut::new(&mut o, 2, 1),
            Mat::strided(&big[6..], 2, 3, 5),
            Mat::new(&v, 3, 1),
            false,
            1.0,
            Threads::One,
        );
        assert_eq!(o, [6.0 + 14.0 + 24.0, 11.0 + 24.0 + 39.0]);
    }

    #[test]
    #[should_panic(expected = "out of bounds")]
    fn a_view_past_its_slice_is_refused() {
        let data = [0.0f32; 5];
        let _ = Mat::strided(&data, 2, 3, 3);
    }
}
