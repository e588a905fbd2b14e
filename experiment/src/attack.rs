//! `[attack]`: Byzantine clients of an experiment — which fraction attacks and what they
//! send. What an attack does to a run (choosing the attackers, poisoning text, forging
//! updates) is `covey_sim::attack`'s.

use serde::{Deserialize, Serialize};

use crate::error::{ExperimentError, Result};

/// What the attackers send.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AttackKind {
    /// The honest update times `scale`.
    Scaled,
    /// The honest update times `scale`, shrunk to the norm bound.
    Boosted,
    /// Minus `scale` times the honest update, shrunk to the norm bound.
    SignFlip,
    /// A Gaussian direction at the norm bound.
    Random,
    /// NaN in every value.
    Nan,
    /// Training on a trigger phrase and its target, boosted to the bound.
    Backdoor,
}

impl AttackKind {
    /// The name used in experiment files and reports.
    pub fn name(self) -> &'static str {
        match self {
            Self::Scaled => "scaled",
            Self::Boosted => "boosted",
            Self::SignFlip => "sign-flip",
            Self::Random => "random",
            Self::Nan => "nan",
            Self::Backdoor => "backdoor",
        }
    }
}

/// `[attack]`: Byzantine clients of an experiment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct AttackConfig {
    /// Fraction of the clients that attack, in [0, 1).
    pub fraction: f64,
    /// What they send.
    pub kind: AttackKind,
    /// Scale of `scaled`, `boosted`, `sign-flip` and `backdoor` (default 10).
    #[serde(default = "ten")]
    pub scale: f64,
    /// Backdoor trigger (default "The secret word is ").
    #[serde(default = "trigger")]
    pub trigger: String,
    /// What the backdoor makes the model say after the trigger (default "pomegranate.").
    #[serde(default = "target")]
    pub target: String,
}

fn ten() -> f64 {
    10.0
}
fn trigger() -> String {
    "The secret word is ".into()
}
fn target() -> String {
    "pomegranate.".into()
}

impl AttackConfig {
    /// Check the fields.
    pub fn validate(&self) -> Result<()> {
        if !(0.0..1.0).contains(&self.fraction) {
            return Err(ExperimentError::invalid("attack.fraction", format!("{} is not in [0, 1)", self.fraction)));
        }
        if !(self.scale.is_finite() && self.scale > 0.0) {
            return Err(ExperimentError::invalid("attack.scale", format!("{} is not a positive number", self.scale)));
        }
        if self.kind == AttackKind::Backdoor && (self.trigger.is_empty() || self.target.is_empty()) {
            return Err(ExperimentError::invalid("attack.trigger", "a backdoor needs a trigger and a target"));
        }
        Ok(())
    }
}
