//! Adaptive clipping (Andrew, Thakkar, McMahan and Ramaswamy, NeurIPS 2021): the clip
//! norm tracks a target quantile of the update norms through a noised count of the
//! clients whose update was not clipped.
//!
//! Each round, client `i` reports `bᵢ = 1[‖Δᵢ‖ ≤ C]`; the server forms
//! `b̃ = (Σ bᵢ + N(0, σ_b²)) / m` (m the expected number of clients) and sets
//! `C ← C · exp(−η (b̃ − γ))`. The count query has sensitivity ½ once centred, so the
//! round releases the noised sum of clipped updates and the noised count together as
//! one Gaussian mechanism with multiplier `z = (z_Δ⁻² + (2σ_b)⁻²)^(−½)`: accounting
//! uses `z`, and the updates get the larger `z_Δ` ([`update_noise_multiplier`]).

use crate::error::{PrivacyError, Result};
use crate::noise::SecureRng;

/// Settings of adaptive clipping.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdaptiveClipConfig {
    /// Initial clip norm. Default 0.1.
    pub initial_clip: f64,
    /// Target quantile γ of unclipped updates. Default 0.5.
    pub target_quantile: f64,
    /// Geometric learning rate η. Default 0.2.
    pub learning_rate: f64,
    /// Standard deviation σ_b of the noise on the count (paper: m / 20). Default 5.
    pub count_noise_std: f64,
}

impl Default for AdaptiveClipConfig {
    fn default() -> Self {
        Self { initial_clip: 0.1, target_quantile: 0.5, learning_rate: 0.2, count_noise_std: 5.0 }
    }
}

/// The noise multiplier left for the updates when the round as a whole must have
/// multiplier `total` and the count carries noise `count_noise_std`.
pub fn update_noise_multiplier(total: f64, count_noise_std: f64) -> Result<f64> {
    if !(total.is_finite() && total > 0.0) {
        return Err(PrivacyError::param("noise_multiplier", total, "must be finite and > 0"));
    }
    let rest = total.powi(-2) - (2.0 * count_noise_std).powi(-2);
    if count_noise_std.is_nan() || count_noise_std <= 0.0 || rest <= 0.0 {
        return Err(PrivacyError::param(
            "count_noise_std",
            count_noise_std,
            "too small: 2·σ_b must exceed the round's noise multiplier",
        ));
    }
    Ok(rest.powf(-0.5))
}

/// Quantile-tracking clip norm.
#[derive(Debug, Clone, PartialEq)]
pub struct AdaptiveClipper {
    config: AdaptiveClipConfig,
    clip: f64,
}

impl AdaptiveClipper {
    /// A clipper at `config.initial_clip`.
    pub fn new(config: AdaptiveClipConfig) -> Result<Self> {
        if !(config.initial_clip.is_finite() && config.initial_clip > 0.0) {
            return Err(PrivacyError::param("initial_clip", config.initial_clip, "must be finite and > 0"));
        }
        if !(0.0..=1.0).contains(&config.target_quantile) {
            return Err(PrivacyError::param("target_quantile", config.target_quantile, "must be in [0, 1]"));
        }
        if !(config.learning_rate.is_finite() && config.learning_rate > 0.0) {
            return Err(PrivacyError::param("learning_rate", config.learning_rate, "must be finite and > 0"));
        }
        Ok(Self { clip: config.initial_clip, config })
    }

    /// The current clip norm.
    pub fn clip_norm(&self) -> f64 {
        self.clip
    }

    /// Update the clip norm from the number of clients whose update norm was at most the
    /// current clip, out of `expected_clients`; the count is noised here. Returns the new clip.
    pub fn update(&mut self, unclipped: usize, expected_clients: f64, rng: &mut SecureRng) -> f64 {
        let mut z = [0.0f64];
        rng.fill_standard_normal(&mut z);
        let noisy = (unclipped as f64 + self.config.count_noise_std * z[0]) / expected_clients.max(1.0);
        self.clip *= (-self.config.learning_rate * (noisy - self.config.target_quantile)).exp();
        self.clip
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clip_tracks_the_target_quantile() {
        let mut rng = SecureRng::from_os().expect("os");
        let cfg = AdaptiveClipConfig { initial_clip: 0.01, count_noise_std: 1.0, ..AdaptiveClipConfig::default() };
        let mut clipper = AdaptiveClipper::new(cfg).expect("clipper");
        // 100 clients with norms 0.01, 0.02, ..., 1.0: the median is ≈ 0.5.
        let norms: Vec<f64> = (1..=100).map(|i| i as f64 / 100.0).collect();
        for _ in 0..300 {
            let c = clipper.clip_norm();
            let unclipped = norms.iter().filter(|&&n| n <= c).count();
            clipper.update(unclipped, 100.0, &mut rng);
        }
        let c = clipper.clip_norm();
        assert!((0.35..0.65).contains(&c), "clip {c} did not reach the median");
    }

    #[test]
    fn the_count_takes_its_share_of_the_noise() {
        let z = update_noise_multiplier(1.0, 5.0).expect("z");
        // (1 - 1/100)^(-1/2)
        assert!((z - (1.0f64 - 0.01).powf(-0.5)).abs() < 1e-12);
        assert!(update_noise_multiplier(1.0, 0.4).is_err());
    }
}
