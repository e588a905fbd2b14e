//! The one home of "which accountant": its names, and ε of a run's Gaussian releases
//! under either accountant. Callers (the coordinator, the simulator, the command line)
//! record releases as [`SampledGaussian`] steps and ask [`Accountant::epsilon`].

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::{PrivacyError, Result};
use crate::{pld, rdp};

/// Which accountant turns the releases into (ε, δ).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accountant {
    /// Rényi DP of the Poisson-subsampled Gaussian (Mironov et al. 2019), converted with
    /// Balle et al. 2020: cheap (≈ 0.5 ms for 10,000 steps), looser.
    #[default]
    Rdp,
    /// Privacy loss distributions (connect-the-dots, FFT composition): tight (ε often a
    /// third lower at the same noise), ≈ 0.1 s for 10,000 steps of a federated run.
    Pld,
}

impl Accountant {
    /// Every accountant, as named in configuration files and on the command line.
    pub const ALL: [Accountant; 2] = [Accountant::Rdp, Accountant::Pld];

    /// The short name (`rdp`, `pld`).
    pub fn name(self) -> &'static str {
        match self {
            Accountant::Rdp => "rdp",
            Accountant::Pld => "pld",
        }
    }

    /// The name recorded in signed manifests: accountant and mechanism.
    pub fn manifest_name(self) -> &'static str {
        match self {
            Accountant::Rdp => "rdp-subsampled-gaussian",
            Accountant::Pld => "pld-subsampled-gaussian",
        }
    }

    /// The sampling rate a run's round is composed at: the exact `q` for RDP; for PLD,
    /// `q` rounded up to the next point of a 1 % geometric grid (`1.01^k`, at most 1), so
    /// that rounds whose cohorts were drawn from slightly different populations share
    /// one self-composition instead of one FFT convolution each. ε is non-decreasing in
    /// `q`, so this can only over-report, by about 1 % at most.
    pub fn composition_rate(self, q: f64) -> f64 {
        match self {
            Accountant::Rdp => q,
            Accountant::Pld if q <= 0.0 || q >= 1.0 => q,
            Accountant::Pld => {
                let k = (q.ln() / 1.01f64.ln()).ceil();
                let up = 1.01f64.powf(k).min(1.0);
                // Guard the rounding of powf: never below q.
                if up < q { (up * 1.01).min(1.0) } else { up }
            }
        }
    }

    /// ε at `delta` of a run's rounds, one `(q, z)` release each, at
    /// [`Accountant::composition_rate`].
    pub fn epsilon_of_rounds(self, rounds: &[(f64, f64)], delta: f64) -> Result<f64> {
        let steps: Vec<SampledGaussian> = rounds
            .iter()
            .map(|&(q, z)| SampledGaussian { q: if q.is_nan() { q } else { self.composition_rate(q) }, z, steps: 1 })
            .collect();
        self.epsilon(&steps, delta)
    }

    /// ε at `delta` of one Gaussian mechanism with noise multiplier `z` and squared L2
    /// sensitivity `sensitivity_squared` (per unit clip norm), with no sampling: the whole
    /// of a DP-FTRL run ([`crate::tree::CorrelatedNoise::sensitivity_squared`]), RDP
    /// `α·s²/(2z²)`, or (PLD) the exact ε of the Gaussian of multiplier `z/s`.
    pub fn epsilon_without_sampling(self, z: f64, sensitivity_squared: f64, delta: f64) -> Result<f64> {
        if !(z.is_finite() && z > 0.0) {
            return Err(PrivacyError::param("noise_multiplier", z, "must be finite and > 0"));
        }
        if !(sensitivity_squared.is_finite() && sensitivity_squared >= 0.0) {
            return Err(PrivacyError::param("sensitivity_squared", sensitivity_squared, "must be finite and >= 0"));
        }
        if !(delta > 0.0 && delta < 1.0) {
            return Err(PrivacyError::param("delta", delta, "must be in (0, 1)"));
        }
        if sensitivity_squared == 0.0 {
            return Ok(0.0);
        }
        match self {
            Accountant::Rdp => {
                let orders = rdp::default_orders();
                let curve: Vec<f64> = orders.iter().map(|a| a * sensitivity_squared / (2.0 * z * z)).collect();
                Ok(rdp::epsilon_from_rdp(&orders, &curve, delta)?.0)
            }
            Accountant::Pld => pld::gaussian_epsilon(z / sensitivity_squared.sqrt(), delta),
        }
    }

    /// ε at `delta` of all `steps` (composed in any order: composition commutes).
    pub fn epsilon(self, steps: &[SampledGaussian], delta: f64) -> Result<f64> {
        if !(delta > 0.0 && delta < 1.0) {
            return Err(PrivacyError::param("delta", delta, "must be in (0, 1)"));
        }
        let groups = group(steps)?;
        match self {
            Accountant::Rdp => {
                let mut acc = rdp::RdpAccountant::default();
                for g in &groups {
                    acc.compose_subsampled_gaussian(g.q, g.z, g.steps)?;
                }
                Ok(acc.epsilon(delta)?.0)
            }
            Accountant::Pld => {
                let mut acc = pld::PldAccountant::default();
                for g in &groups {
                    acc.compose_subsampled_gaussian(g.q, g.z, g.steps)?;
                }
                acc.epsilon(delta)
            }
        }
    }
}

impl fmt::Display for Accountant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Accountant {
    type Err = PrivacyError;

    fn from_str(s: &str) -> Result<Self> {
        Accountant::ALL
            .into_iter()
            .find(|a| a.name() == s)
            .ok_or_else(|| PrivacyError::UnknownAccountant { name: s.to_owned() })
    }
}

/// `steps` steps of the Gaussian mechanism with noise multiplier `z` on a Poisson sample
/// of rate `q`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SampledGaussian {
    /// Sampling rate, in [0, 1].
    pub q: f64,
    /// Noise multiplier (noise std / sensitivity), finite and > 0.
    pub z: f64,
    /// Number of steps.
    pub steps: u64,
}

/// Equal (q, z) steps merged (one self-composition each), in first-seen order.
fn group(steps: &[SampledGaussian]) -> Result<Vec<SampledGaussian>> {
    let mut groups: Vec<SampledGaussian> = Vec::new();
    for s in steps {
        if !(0.0..=1.0).contains(&s.q) {
            return Err(PrivacyError::param("sampling_rate", s.q, "must be in [0, 1]"));
        }
        if !(s.z.is_finite() && s.z > 0.0) {
            return Err(PrivacyError::param("noise_multiplier", s.z, "must be finite and > 0"));
        }
        match groups.iter_mut().find(|g| g.q == s.q && g.z == s.z) {
            Some(g) => g.steps += s.steps,
            None => groups.push(*s),
        }
    }
    Ok(groups)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_names_are_refused_with_the_choices() {
        for a in Accountant::ALL {
            assert_eq!(a.name().parse::<Accountant>().expect("parse"), a);
        }
        let err = "moments".parse::<Accountant>().expect_err("unknown").to_string();
        assert!(err.contains("moments") && err.contains("rdp") && err.contains("pld"), "{err}");
        let toml: Accountant = serde_json::from_str("\"pld\"").expect("serde");
        assert_eq!(toml, Accountant::Pld);
    }

    #[test]
    fn both_accountants_agree_with_their_modules_and_pld_is_tighter() {
        let run = [SampledGaussian { q: 0.01, z: 1.1, steps: 600 }, SampledGaussian { q: 0.01, z: 1.1, steps: 400 }];
        let rdp = Accountant::Rdp.epsilon(&run, 1e-5).expect("rdp");
        let pld = Accountant::Pld.epsilon(&run, 1e-5).expect("pld");
        assert_eq!(rdp, crate::rdp::epsilon(0.01, 1.1, 1000, 1e-5).expect("rdp").0);
        assert_eq!(pld, crate::pld::epsilon(0.01, 1.1, 1000, 1e-5).expect("pld"));
        assert!(pld < rdp, "{pld} vs {rdp}");
        assert_eq!(Accountant::Pld.epsilon(&[], 1e-5).expect("nothing"), 0.0);
    }

    #[test]
    fn pld_rounds_share_compositions_on_a_one_percent_grid_that_never_rounds_down() {
        for q in [1e-4, 0.0123, 0.05, 0.2, 0.999, 1.0] {
            let r = Accountant::Pld.composition_rate(q);
            assert!(r >= q && r <= (q * 1.0101).min(1.0), "q={q} → {r}");
            assert_eq!(Accountant::Rdp.composition_rate(q), q);
        }
        // 200 rounds whose population drifted between 1,000 and 1,010 devices (cohort 20):
        let rounds: Vec<(f64, f64)> = (0..200).map(|i| (20.0 / (1000.0 + (i % 11) as f64), 1.0)).collect();
        let bucketed = Accountant::Pld.epsilon_of_rounds(&rounds, 1e-5).expect("pld");
        let top = Accountant::Pld.epsilon(&[SampledGaussian { q: 0.0202, z: 1.0, steps: 200 }], 1e-5).expect("pld");
        let exact_low =
            Accountant::Pld.epsilon(&[SampledGaussian { q: 20.0 / 1010.0, z: 1.0, steps: 200 }], 1e-5).expect("pld");
        assert!(bucketed >= exact_low && bucketed <= top * 1.000_001, "{exact_low} <= {bucketed} <= {top}");
    }

    #[test]
    fn bad_steps_are_refused() {
        for bad in [f64::NAN, -1.0, 0.0, f64::INFINITY] {
            let run = [SampledGaussian { q: 0.1, z: bad, steps: 1 }];
            for a in Accountant::ALL {
                assert!(a.epsilon(&run, 1e-5).is_err(), "{a} z={bad}");
            }
        }
        assert!(Accountant::Rdp.epsilon(&[SampledGaussian { q: 1.5, z: 1.0, steps: 1 }], 1e-5).is_err());
        assert!(Accountant::Pld.epsilon(&[], 0.0).is_err());
    }
}
