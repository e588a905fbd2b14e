//! Calibration: the smallest noise multiplier that meets a target (ε, δ), like
//! Opacus' `get_noise_multiplier`, but bisected to a relative precision of 1e-6.

use crate::error::{PrivacyError, Result};
use crate::rdp;

/// Largest multiplier tried before giving up.
pub const MAX_NOISE_MULTIPLIER: f64 = 1e4;

/// The smallest `z` (to a relative 1e-6) such that `steps` steps at sampling rate `q`
/// spend at most `target_epsilon` at `delta` under the RDP accountant.
pub fn noise_multiplier(target_epsilon: f64, delta: f64, q: f64, steps: u64) -> Result<f64> {
    if !(target_epsilon.is_finite() && target_epsilon > 0.0) {
        return Err(PrivacyError::param("target_epsilon", target_epsilon, "must be finite and > 0"));
    }
    if steps == 0 {
        return Err(PrivacyError::param("steps", 0.0, "must be at least 1"));
    }
    let eps = |z: f64| rdp::epsilon(q, z, steps, delta).map(|(e, _)| e);
    let mut hi = 1.0;
    while eps(hi)? > target_epsilon {
        hi *= 2.0;
        if hi > MAX_NOISE_MULTIPLIER {
            return Err(PrivacyError::CalibrationFailed { target_epsilon, delta, max: MAX_NOISE_MULTIPLIER });
        }
    }
    let mut lo = hi / 2.0;
    while eps(lo)? <= target_epsilon {
        hi = lo;
        lo /= 2.0;
        if lo < 1e-6 {
            return Ok(hi);
        }
    }
    // Invariant: eps(lo) > target >= eps(hi).
    while hi / lo > 1.0 + 1e-7 {
        let mid = (lo * hi).sqrt();
        if eps(mid)? <= target_epsilon { hi = mid } else { lo = mid }
    }
    Ok(hi)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calibration_round_trips() {
        for &(target, q, steps) in &[(1.0, 0.01, 1000u64), (8.0, 0.1, 100), (3.0, 0.001, 10_000), (0.5, 1.0, 1)] {
            let delta = 1e-5;
            let z = noise_multiplier(target, delta, q, steps).expect("calibrate");
            let at = rdp::epsilon(q, z, steps, delta).expect("eps").0;
            assert!(at <= target, "ε {at} at calibrated z {z} exceeds {target}");
            let smaller = rdp::epsilon(q, z * 0.99, steps, delta).expect("eps").0;
            assert!(smaller > target, "1% less noise (z {}) still meets {target}: {smaller}", z * 0.99);
        }
    }

    #[test]
    fn impossible_targets_are_reported() {
        assert!(noise_multiplier(0.0, 1e-5, 0.1, 10).is_err());
        assert!(noise_multiplier(1.0, 1e-5, 0.1, 0).is_err());
        assert!(noise_multiplier(1e-9, 1e-5, 1.0, 10_000).is_err());
    }
}
