//! Training options a device is configured with: example-level DP-SGD and
//! personalisation. The training itself is `covey-model`'s (`local_round`, `personal`).

use covey_tensors::lora::LoraTarget;
use serde::{Deserialize, Serialize};

use crate::error::{Result, SettingsError};

/// Example-level DP-SGD within a local round (Abadi et al. 2016): every training
/// sequence's gradient (over all `B` together) is clipped to L2 norm `clip`, and each
/// optimizer step adds `N(0, (noise_multiplier · clip)²)` to the sum of its clipped
/// gradients before dividing by the number of sequences. It protects each sequence of the
/// device's text within the adapter the device uploads; the coordinator's central DP
/// protects the device as a whole. Windows are drawn with replacement from the token
/// stream, not by Poisson sampling, so no amplification-by-sampling ε is claimed here.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ExampleDp {
    /// L2 bound of one example's gradient.
    pub clip: f64,
    /// Noise standard deviation over `clip` (0: clipping only).
    pub noise_multiplier: f64,
}

impl ExampleDp {
    /// Check that both values are possible.
    pub fn validate(&self) -> Result<()> {
        if !(self.clip.is_finite() && self.clip > 0.0) {
            return Err(SettingsError::invalid("example_dp.clip", format!("{} is not a positive number", self.clip)));
        }
        if !(self.noise_multiplier.is_finite() && self.noise_multiplier >= 0.0) {
            return Err(SettingsError::invalid(
                "example_dp.noise_multiplier",
                format!("{} is not a number >= 0", self.noise_multiplier),
            ));
        }
        Ok(())
    }
}

/// How the local adapter is trained.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum PersonalMethod {
    /// Reconstructed from zero after each global update.
    #[default]
    FedRecon,
    /// Kept across updates and trained further, coupled to the global model by λ.
    Ditto,
}

impl std::fmt::Display for PersonalMethod {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::FedRecon => "fed-recon",
            Self::Ditto => "ditto",
        })
    }
}

/// The local adapter and its training (`[personalisation]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct PersonalConfig {
    /// FedRecon or Ditto. Default `fed-recon`.
    pub method: PersonalMethod,
    /// Rank of the local adapter. Default 4.
    pub rank: usize,
    /// Its scaling numerator (`alpha / rank`). Default 8.
    pub alpha: f64,
    /// Projections it adapts. Default q and v.
    pub targets: Vec<LoraTarget>,
    /// Optimizer steps per training (after each global update). Default 20.
    pub steps: usize,
    /// Sequences per step. Default 4.
    pub batch_size: usize,
    /// Tokens per sequence. Default 64.
    pub seq_len: usize,
    /// AdamW learning rate. Default 1e-2.
    pub learning_rate: f64,
    /// Ditto's coupling λ (unused by FedRecon). Default 0.1.
    pub lambda: f64,
}

impl Default for PersonalConfig {
    fn default() -> Self {
        Self {
            method: PersonalMethod::FedRecon,
            rank: 4,
            alpha: 8.0,
            targets: vec![LoraTarget::Q, LoraTarget::V],
            steps: 20,
            batch_size: 4,
            seq_len: 64,
            learning_rate: 1e-2,
            lambda: 0.1,
        }
    }
}

impl PersonalConfig {
    /// Check every value; errors name the field.
    pub fn validate(&self) -> Result<()> {
        let positive = |field: &'static str, v: usize| {
            if v == 0 { Err(SettingsError::invalid(field, "must be at least 1")) } else { Ok(()) }
        };
        positive("rank", self.rank)?;
        positive("steps", self.steps)?;
        positive("batch-size", self.batch_size)?;
        positive("seq-len", self.seq_len)?;
        if self.targets.is_empty() {
            return Err(SettingsError::invalid("targets", "names no projection"));
        }
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            return Err(SettingsError::invalid("alpha", format!("{} is not a number > 0", self.alpha)));
        }
        if !(self.learning_rate.is_finite() && self.learning_rate > 0.0) {
            return Err(SettingsError::invalid("learning-rate", format!("{} is not a number > 0", self.learning_rate)));
        }
        if !(self.lambda.is_finite() && self.lambda >= 0.0) {
            return Err(SettingsError::invalid("lambda", format!("{} is not a number >= 0", self.lambda)));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_dp_refuses_impossible_values() {
        ExampleDp { clip: 1.0, noise_multiplier: 0.0 }.validate().expect("clipping only");
        let err = ExampleDp { clip: 0.0, noise_multiplier: 1.0 }.validate().expect_err("zero clip");
        assert!(err.to_string().contains("example_dp.clip"), "{err}");
        let err = ExampleDp { clip: 1.0, noise_multiplier: f64::NAN }.validate().expect_err("NaN noise");
        assert!(err.to_string().contains("noise_multiplier"), "{err}");
    }

    #[test]
    fn personal_config_defaults_are_valid_and_fields_are_named() {
        PersonalConfig::default().validate().expect("defaults");
        let cases = [
            (PersonalConfig { rank: 0, ..PersonalConfig::default() }, "rank"),
            (PersonalConfig { targets: Vec::new(), ..PersonalConfig::default() }, "targets"),
            (PersonalConfig { alpha: f64::INFINITY, ..PersonalConfig::default() }, "alpha"),
            (PersonalConfig { learning_rate: 0.0, ..PersonalConfig::default() }, "learning-rate"),
            (PersonalConfig { lambda: -0.5, ..PersonalConfig::default() }, "lambda"),
        ];
        for (cfg, field) in cases {
            let err = cfg.validate().expect_err(field);
            assert!(matches!(err, SettingsError::Invalid { field: f, .. } if f == field), "{field}: {err}");
        }
        let parsed: PersonalConfig =
            toml::from_str("method = \"ditto\"\ntargets = [\"q_proj\", \"down_proj\"]\n").expect("toml");
        assert_eq!((parsed.method, parsed.targets.len()), (PersonalMethod::Ditto, 2));
        assert!(toml::from_str::<PersonalConfig>("methd = \"ditto\"").is_err(), "unknown keys are refused");
    }
}
