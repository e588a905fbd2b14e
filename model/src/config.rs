//! LoRA hyper-parameters. The model shape, [`LlamaConfig`], lives in `covey-infer` (which
//! needs it without burn) and is re-exported here.

use serde::{Deserialize, Serialize};

pub use covey_infer::LlamaConfig;

use crate::error::{ModelError, Result};

pub use covey_tensors::lora::LoraTarget;

/// LoRA hyper-parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraConfig {
    /// Rank `r` of the update `A·B`. Default 8.
    pub rank: usize,
    /// Scaling numerator: the update is multiplied by `alpha / rank`. Default 16.
    pub alpha: f64,
    /// Dropout on the adapter's input during training. Default 0.
    pub dropout: f64,
    /// Projections that carry an adapter. Default q and v.
    pub targets: Vec<LoraTarget>,
    /// FFA-LoRA: `A` is frozen (drawn from `seed`), only `B` trains. Averaging `B`
    /// across clients is then exactly averaging the updates. Default false.
    pub ffa: bool,
    /// Seed of the `A` initialisation. Every client of a federation must use the same
    /// seed, so that the adapters start identical. Default 0.
    pub seed: u64,
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self { rank: 8, alpha: 16.0, dropout: 0.0, targets: vec![LoraTarget::Q, LoraTarget::V], ffa: false, seed: 0 }
    }
}

impl LoraConfig {
    /// The factor `alpha / rank` applied to the adapter output.
    pub fn scale(&self) -> f64 {
        self.alpha / self.rank as f64
    }

    /// Check that every value is possible.
    pub fn validate(&self) -> Result<()> {
        if self.rank == 0 {
            return Err(ModelError::config("rank", "must be at least 1"));
        }
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            return Err(ModelError::config("alpha", format!("{} is not a positive number", self.alpha)));
        }
        if !(self.dropout.is_finite() && (0.0..1.0).contains(&self.dropout)) {
            return Err(ModelError::config("dropout", format!("{} is not in [0, 1)", self.dropout)));
        }
        if self.targets.is_empty() {
            return Err(ModelError::config("targets", "no projection selected"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lora_targets_parse_both_spellings() {
        assert_eq!(LoraTarget::parse("q"), Some(LoraTarget::Q));
        assert_eq!(LoraTarget::parse("gate_proj"), Some(LoraTarget::Gate));
        assert_eq!(LoraTarget::parse("x"), None);
    }
}
