//! zero-concentrated DP of the (unsubsampled) Gaussian mechanism and its conversion to
//! (ε, δ) with the bound of Canonne, Kamath and Steinke 2020 (the one opendp uses).

use crate::error::{PrivacyError, Result};

/// ρ of `steps` Gaussian releases with noise multiplier `z` (sensitivity 1): `T / (2 z²)`.
pub fn gaussian_rho(noise_multiplier: f64, steps: u64) -> Result<f64> {
    if !(noise_multiplier.is_finite() && noise_multiplier > 0.0) {
        return Err(PrivacyError::param("noise_multiplier", noise_multiplier, "must be finite and > 0"));
    }
    Ok(steps as f64 / (2.0 * noise_multiplier * noise_multiplier))
}

/// ε at `delta` of a ρ-zCDP mechanism: `inf over α > 1 of αρ + ln(1 − 1/α) − (ln δ + ln α)/(α − 1)`.
pub fn epsilon(rho: f64, delta: f64) -> Result<f64> {
    if !(rho >= 0.0 && rho.is_finite()) {
        return Err(PrivacyError::param("rho", rho, "must be finite and >= 0"));
    }
    if !(delta > 0.0 && delta < 1.0) {
        return Err(PrivacyError::param("delta", delta, "must be in (0, 1)"));
    }
    if rho == 0.0 {
        return Ok(0.0);
    }
    let f = |a: f64| a * rho + (-1.0 / a).ln_1p() - (delta.ln() + a.ln()) / (a - 1.0);
    // The objective is unimodal in ln(α − 1): coarse scan, then golden-section refinement.
    let (mut best_t, mut best) = (0.0f64, f64::INFINITY);
    let mut t: f64 = -10.0;
    while t <= 12.0 {
        let v = f(1.0 + t.exp());
        if v < best {
            best = v;
            best_t = t;
        }
        t += 0.05;
    }
    let (mut lo, mut hi) = (best_t - 0.05, best_t + 0.05);
    let g = 0.5 * (5f64.sqrt() - 1.0);
    for _ in 0..100 {
        let m1 = hi - g * (hi - lo);
        let m2 = lo + g * (hi - lo);
        if f(1.0 + m1.exp()) < f(1.0 + m2.exp()) { hi = m2 } else { lo = m1 }
    }
    Ok(best.min(f(1.0 + (0.5 * (lo + hi)).exp())).max(0.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_opendp_and_beats_the_classical_bound() {
        // opendp: make_zCDP_to_approxDP(gaussian with std 1 on sensitivity 1).epsilon(1e-5).
        let e = epsilon(0.5, 1e-5).expect("eps");
        assert!((e - 4.728386984943315).abs() < 1e-9, "{e}");
        // 100-fold composition: rho = 50.
        let e = epsilon(gaussian_rho(1.0, 100).expect("rho"), 1e-5).expect("eps");
        assert!((e - 96.03527067517317).abs() < 1e-7, "{e}");
        for &rho in &[0.01, 0.1, 1.0, 10.0] {
            let classical = rho + 2.0 * (rho * (1e5f64).ln()).sqrt();
            assert!(epsilon(rho, 1e-5).expect("eps") <= classical);
        }
    }
}
