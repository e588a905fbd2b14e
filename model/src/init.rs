//! Seeded host-side initialisation, identical on every backend and platform.

use rand::Rng;
use rand_chacha::ChaCha8Rng;

/// A uniform draw in `[0, 1)` with 24 bits of precision.
fn unit(rng: &mut ChaCha8Rng) -> f32 {
    (rng.next_u32() >> 8) as f32 / (1u32 << 24) as f32
}

/// `n` values uniform in `[-bound, bound)`.
pub(crate) fn uniform(rng: &mut ChaCha8Rng, n: usize, bound: f32) -> Vec<f32> {
    (0..n).map(|_| (unit(rng) * 2.0 - 1.0) * bound).collect()
}

/// `n` values from `N(0, std²)` (Box–Muller).
pub(crate) fn normal(rng: &mut ChaCha8Rng, n: usize, std: f32) -> Vec<f32> {
    let mut out = Vec::with_capacity(n + 1);
    while out.len() < n {
        let u1 = unit(rng).max(f32::MIN_POSITIVE);
        let u2 = unit(rng);
        let r = (-2.0 * u1.ln()).sqrt() * std;
        let t = std::f32::consts::TAU * u2;
        out.push(r * t.cos());
        out.push(r * t.sin());
    }
    out.truncate(n);
    out
}
