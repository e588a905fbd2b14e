//! GFLOP/s of the f32 products a LoRA step runs (a diagnostic, not a benchmark row).
fn main() {
    use std::time::Instant;
    for &(m, k, n) in &[
        (1024usize, 256usize, 256usize),
        (1024, 256, 688),
        (1024, 688, 256),
        (512, 576, 576),
        (512, 576, 1536),
        (512, 1536, 576),
        (512, 576, 4096),
    ] {
        let a = vec![0.5f32; m * k];
        let b = vec![0.25f32; k * n];
        let mut c = vec![0.0f32; m * n];
        for threads in [1usize, 2] {
            let par = if threads == 1 { gemm::Parallelism::None } else { gemm::Parallelism::Rayon(2) };
            let reps = (4e9 / (2.0 * (m * k * n) as f64)).max(3.0) as usize;
            let start = Instant::now();
            for _ in 0..reps {
                #[allow(unsafe_code)]
                unsafe {
                    gemm::gemm(
                        m,
                        n,
                        k,
                        c.as_mut_ptr(),
                        1,
                        n as isize,
                        false,
                        a.as_ptr(),
                        1,
                        k as isize,
                        b.as_ptr(),
                        1,
                        n as isize,
                        1.0,
                        1.0,
                        false,
                        false,
                        false,
                        par,
                    );
                }
            }
            let s = start.elapsed().as_secs_f64();
            println!("{m}x{k}x{n} threads {threads}: {:.1} GFLOP/s", 2.0 * (m * k * n * reps) as f64 / s / 1e9);
            if threads == 1 {
                let start = Instant::now();
                for _ in 0..reps {
                    #[allow(unsafe_code)]
                    unsafe {
                        matrixmultiply::sgemm(
                            m,
                            k,
                            n,
                            1.0,
                            a.as_ptr(),
                            k as isize,
                            1,
                            b.as_ptr(),
                            n as isize,
                            1,
                            0.0,
                            c.as_mut_ptr(),
                            n as isize,
                            1,
                        );
                    }
                }
                let s = start.elapsed().as_secs_f64();
                println!("   matrixmultiply (MMTHREADS): {:.1} GFLOP/s", 2.0 * (m * k * n * reps) as f64 / s / 1e9);
            }
        }
    }
}
