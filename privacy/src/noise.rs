//! Calibrated Gaussian noise from a cryptographically secure generator.
//!
//! # Sampler
//!
//! [`SecureRng`] is ChaCha20 keyed with 256 bits from the operating system
//! (`getrandom`); it is never seeded from an experiment seed. Standard normal draws
//! use the Box–Muller transform on 53-bit uniforms in `f64`.
//!
//! # Floating-point safety
//!
//! Naive floating-point noise leaks through its low-order bits (Mironov, CCS 2012:
//! the set of doubles `x + Z` can reach depends on `x`). Every privatized coordinate
//! is therefore *snapped*: `x + Z` is computed in `f64` and rounded to the grid
//! `Λ = 2^(⌊log₂ σ⌋ − 12)` (between σ/8192 and σ/4096), whose points are exactly
//! representable in `f32` for magnitudes below 2¹² σ. The output is a function of
//! the rounded value only, so the reachable set is the same grid for every input;
//! the `f64` rounding error of `Z` (≈ 1e-16 σ) can only move mass between adjacent
//! cells, changing cell probabilities by ≈ 1e-12, which is far below any δ in use.
//! The added rounding error (≤ Λ/2 per coordinate) is negligible against σ.
//!
//! opendp's exact discrete Gaussian (CKS20) is the alternative with a proof rather
//! than an argument; it costs 3.5–10 µs per coordinate and, to be cryptographically
//! seeded, a vendored OpenSSL build (≈ 8 minutes on 2 cores). See ARCHITECTURE.md.

use std::fmt;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;

use crate::clip::{ClipNorm, Clipped, l2_norm};
use crate::error::{PrivacyError, Result};

/// A noise multiplier `z > 0`: noise standard deviation is `z · C`.
#[derive(Debug, Clone, Copy, PartialEq, PartialOrd)]
pub struct NoiseMultiplier(f64);

impl NoiseMultiplier {
    /// A finite, strictly positive multiplier.
    pub fn new(z: f64) -> Result<Self> {
        if z.is_finite() && z > 0.0 {
            Ok(Self(z))
        } else {
            Err(PrivacyError::param("noise_multiplier", z, "must be finite and > 0"))
        }
    }
    /// The multiplier.
    pub fn get(self) -> f64 {
        self.0
    }
}

/// ChaCha20 keyed from the operating system. Not `Clone`: a copy would replay noise.
pub struct SecureRng(ChaCha20Rng);

impl fmt::Debug for SecureRng {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecureRng(..)")
    }
}

impl SecureRng {
    /// A generator keyed with 32 fresh bytes from the operating system.
    pub fn from_os() -> Result<Self> {
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed).map_err(PrivacyError::Entropy)?;
        Ok(Self(ChaCha20Rng::from_seed(seed)))
    }

    /// A generator keyed with a fixed seed: the same seed gives the same noise.
    ///
    /// For reproducible simulations and tests only; never for production privacy, where
    /// the key must be secret and fresh ([`SecureRng::from_os`]).
    pub fn from_seed(seed: [u8; 32]) -> Self {
        Self(ChaCha20Rng::from_seed(seed))
    }

    /// Fill `out` with random bytes (seeds of derived generators).
    pub fn fill_bytes(&mut self, out: &mut [u8]) {
        for chunk in out.chunks_mut(8) {
            let bytes = self.0.next_u64().to_le_bytes();
            chunk.copy_from_slice(&bytes[..chunk.len()]);
        }
    }

    /// Uniform in `[0, 1)` with 53 bits.
    pub fn uniform(&mut self) -> f64 {
        (self.0.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in `(0, 1)` with 53 bits.
    fn open_unit(&mut self) -> f64 {
        loop {
            let u = (self.0.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64);
            if u > 0.0 {
                return u;
            }
        }
    }

    /// Fill `out` with independent standard normal draws.
    pub fn fill_standard_normal(&mut self, out: &mut [f64]) {
        let mut chunks = out.chunks_exact_mut(2);
        for pair in &mut chunks {
            let (a, b) = self.box_muller();
            pair[0] = a;
            pair[1] = b;
        }
        if let [last] = chunks.into_remainder() {
            *last = self.box_muller().0;
        }
    }

    fn box_muller(&mut self) -> (f64, f64) {
        let r = (-2.0 * self.open_unit().ln()).sqrt();
        let t = std::f64::consts::TAU * self.open_unit();
        (r * t.cos(), r * t.sin())
    }
}

/// The snapping grid for noise of standard deviation `sigma`.
pub fn snapping_grid(sigma: f64) -> f64 {
    2f64.powi(sigma.log2().floor() as i32 - 12)
}

/// An update that was clipped and then noised: the only thing that may be signed
/// and uploaded. `Debug` prints shape and parameters, never values.
#[derive(Clone, PartialEq)]
pub struct Privatized {
    values: Vec<f32>,
    clip_norm: ClipNorm,
    noise_multiplier: NoiseMultiplier,
    examples: usize,
}

impl fmt::Debug for Privatized {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Privatized")
            .field("len", &self.values.len())
            .field("clip_norm", &self.clip_norm.get())
            .field("noise_multiplier", &self.noise_multiplier.get())
            .field("norm", &l2_norm(&self.values))
            .finish()
    }
}

impl Privatized {
    /// The privatized values.
    pub fn values(&self) -> &[f32] {
        &self.values
    }
    /// Take the values out (for encoding on the wire).
    pub fn into_values(self) -> Vec<f32> {
        self.values
    }
    /// The clip norm `C` the noise was calibrated to.
    pub fn clip_norm(&self) -> ClipNorm {
        self.clip_norm
    }
    /// The noise multiplier `z` (standard deviation `z · C`).
    pub fn noise_multiplier(&self) -> NoiseMultiplier {
        self.noise_multiplier
    }
    /// Per-example contributions summed before noising.
    pub fn examples(&self) -> usize {
        self.examples
    }
}

/// Add `N(0, (z·C)²)` to every coordinate of a clipped update, snapped to the grid
/// (see the module documentation).
pub fn privatize(clipped: Clipped, z: NoiseMultiplier, rng: &mut SecureRng) -> Privatized {
    let sigma = z.get() * clipped.clip_norm.get();
    let mut values = clipped.values;
    add_snapped_gaussian(&mut values, sigma, rng);
    Privatized { values, clip_norm: clipped.clip_norm, noise_multiplier: z, examples: clipped.examples }
}

/// Add `N(0, sigma²)` to every value, the sum snapped to the grid of `sigma` (see the
/// module documentation). What [`privatize`] does to an update, and what example-level
/// DP-SGD does to each step's clipped gradient sum. `sigma` 0 leaves the values as they are.
pub fn add_snapped_gaussian(values: &mut [f32], sigma: f64, rng: &mut SecureRng) {
    if sigma.is_nan() || sigma <= 0.0 {
        return;
    }
    let grid = snapping_grid(sigma);
    let mut noise = vec![0.0f64; 4096];
    for chunk in values.chunks_mut(4096) {
        let n = &mut noise[..chunk.len()];
        rng.fill_standard_normal(n);
        for (v, z) in chunk.iter_mut().zip(n.iter()) {
            let noisy = f64::from(*v) + sigma * z;
            *v = ((noisy / grid).round() * grid) as f32;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clip::clip;

    #[test]
    fn noise_mean_and_variance_match_within_five_standard_errors() {
        let n = 1_000_000usize;
        let c = ClipNorm::new(2.0).expect("c");
        let z = NoiseMultiplier::new(1.3).expect("z");
        let sigma = 2.6f64;
        let mut rng = SecureRng::from_os().expect("os rng");
        let out = privatize(clip(vec![0.0; n], c).expect("clip"), z, &mut rng);
        let xs: Vec<f64> = out.values().iter().map(|&x| f64::from(x)).collect();
        let mean = xs.iter().sum::<f64>() / n as f64;
        let var = xs.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / (n - 1) as f64;
        // Standard errors: of the mean σ/√n, of the variance σ²·√(2/(n−1)).
        let se_mean = sigma / (n as f64).sqrt();
        let se_var = sigma * sigma * (2.0 / (n - 1) as f64).sqrt();
        assert!(mean.abs() < 5.0 * se_mean, "mean {mean} vs 5·SE {}", 5.0 * se_mean);
        assert!((var - sigma * sigma).abs() < 5.0 * se_var, "variance {var} vs {}", sigma * sigma);
        // Every output sits on the snapping grid.
        let grid = snapping_grid(sigma);
        assert!(xs.iter().take(10_000).all(|x| ((x / grid).round() * grid - x).abs() == 0.0));
    }

    #[test]
    fn two_generators_from_the_os_differ() {
        let mut a = SecureRng::from_os().expect("os");
        let mut b = SecureRng::from_os().expect("os");
        let (mut x, mut y) = ([0.0; 8], [0.0; 8]);
        a.fill_standard_normal(&mut x);
        b.fill_standard_normal(&mut y);
        assert_ne!(x, y);
    }

    #[test]
    fn seeded_generators_replay_and_differ_by_seed() {
        let draw = |seed: [u8; 32]| {
            let mut out = [0.0; 8];
            SecureRng::from_seed(seed).fill_standard_normal(&mut out);
            out
        };
        assert_eq!(draw([7; 32]), draw([7; 32]));
        assert_ne!(draw([7; 32]), draw([8; 32]));
    }

    #[test]
    fn debug_never_prints_values() {
        let c = ClipNorm::new(1.0).expect("c");
        let z = NoiseMultiplier::new(1.0).expect("z");
        let p = privatize(clip(vec![0.5; 3], c).expect("clip"), z, &mut SecureRng::from_os().expect("os"));
        let s = format!("{p:?}");
        assert!(s.contains("len: 3") && !s.contains("values"), "{s}");
        assert!(NoiseMultiplier::new(0.0).is_err());
    }
}
