//! Calibration: the smallest noise multiplier that meets a target (ε, δ), like
//! Opacus' `get_noise_multiplier`, under either accountant; bisected to a relative
//! precision of 1e-6 (RDP) or 1e-4 (PLD, whose queries cost ≈ 0.1 s each).

use crate::accountant::{Accountant, SampledGaussian};
use crate::error::{PrivacyError, Result};

/// Largest multiplier tried before giving up.
pub const MAX_NOISE_MULTIPLIER: f64 = 1e4;

/// The smallest `z` (to a relative 1e-6) such that `steps` steps at sampling rate `q`
/// spend at most `target_epsilon` at `delta` under the RDP accountant.
pub fn noise_multiplier(target_epsilon: f64, delta: f64, q: f64, steps: u64) -> Result<f64> {
    noise_multiplier_for(Accountant::Rdp, target_epsilon, delta, q, steps)
}

/// The smallest `z` such that `steps` steps at sampling rate `q` spend at most
/// `target_epsilon` at `delta` under `accountant` (the returned `z` always meets the
/// target; a `z` smaller by the precision does not).
pub fn noise_multiplier_for(
    accountant: Accountant,
    target_epsilon: f64,
    delta: f64,
    q: f64,
    steps: u64,
) -> Result<f64> {
    if steps == 0 {
        return Err(PrivacyError::param("steps", 0.0, "must be at least 1"));
    }
    let precision = match accountant {
        Accountant::Rdp => 1e-7,
        Accountant::Pld => 1e-4,
    };
    // The rate a run's rounds are composed at (PLD rounds it up a little): the
    // calibrated noise then meets the target as the run reports it.
    let q = accountant.composition_rate(q);
    smallest_multiplier(target_epsilon, delta, precision, |z| {
        accountant.epsilon(&[SampledGaussian { q, z, steps }], delta)
    })
}

/// The smallest `z` (to a relative 1e-7) such that one Gaussian mechanism of squared
/// sensitivity `sensitivity_squared` and multiplier `z`, without sampling (a DP-FTRL run:
/// [`Accountant::epsilon_without_sampling`]), spends at most `target_epsilon` at `delta`.
pub fn noise_multiplier_without_sampling(
    accountant: Accountant,
    target_epsilon: f64,
    delta: f64,
    sensitivity_squared: f64,
) -> Result<f64> {
    if !(sensitivity_squared.is_finite() && sensitivity_squared > 0.0) {
        return Err(PrivacyError::param("sensitivity_squared", sensitivity_squared, "must be finite and > 0"));
    }
    smallest_multiplier(target_epsilon, delta, 1e-7, |z| {
        accountant.epsilon_without_sampling(z, sensitivity_squared, delta)
    })
}

/// Bisection on a non-increasing `eps(z)`: the smallest `z` (to a relative `precision`)
/// with `eps(z) <= target_epsilon`.
fn smallest_multiplier(
    target_epsilon: f64,
    delta: f64,
    precision: f64,
    eps: impl Fn(f64) -> Result<f64>,
) -> Result<f64> {
    if !(target_epsilon.is_finite() && target_epsilon > 0.0) {
        return Err(PrivacyError::param("target_epsilon", target_epsilon, "must be finite and > 0"));
    }
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
    while hi / lo > 1.0 + precision {
        let mid = (lo * hi).sqrt();
        if eps(mid)? <= target_epsilon { hi = mid } else { lo = mid }
    }
    Ok(hi)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rdp;

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
    fn pld_calibration_meets_the_target_with_less_noise_than_rdp() {
        let (target, delta, q, steps) = (8.0, 1e-5, 0.05, 200u64);
        let z_pld = noise_multiplier_for(Accountant::Pld, target, delta, q, steps).expect("pld");
        let z_rdp = noise_multiplier(target, delta, q, steps).expect("rdp");
        // As a run reports it: its rounds composed at the PLD composition rate.
        let at = |z| Accountant::Pld.epsilon_of_rounds(&vec![(q, z); steps as usize], delta).expect("eps");
        assert!(at(z_pld) <= target, "{}", at(z_pld));
        assert!(at(z_pld * 0.995) > target, "0.5 % less noise still meets the target");
        assert!(z_pld < z_rdp, "PLD needs less noise: {z_pld} vs {z_rdp}");
    }

    #[test]
    fn dp_ftrl_calibration_round_trips_under_both_accountants() {
        for accountant in Accountant::ALL {
            let s2 = 4.0 * 5.0; // 4 participations, trees of 16 rounds (depth 5)
            let z = noise_multiplier_without_sampling(accountant, 8.0, 1e-5, s2).expect("calibrate");
            let at = |z| accountant.epsilon_without_sampling(z, s2, 1e-5).expect("eps");
            assert!(at(z) <= 8.0 && at(z * 0.999) > 8.0, "{accountant}: z={z}");
        }
        assert!(noise_multiplier_without_sampling(Accountant::Rdp, 8.0, 1e-5, 0.0).is_err());
    }

    #[test]
    fn impossible_targets_are_reported() {
        assert!(noise_multiplier(0.0, 1e-5, 0.1, 10).is_err());
        assert!(noise_multiplier(1.0, 1e-5, 0.1, 0).is_err());
        assert!(noise_multiplier(1e-9, 1e-5, 1.0, 10_000).is_err());
        assert!(noise_multiplier_for(Accountant::Pld, f64::NAN, 1e-5, 0.1, 10).is_err());
    }
}
