//! LoRA hyper-parameters. The model shape, [`LlamaConfig`], lives in `covey-infer` (which
//! needs it without burn) and is re-exported here.

use serde::{Deserialize, Serialize};

pub use covey_infer::LlamaConfig;

use crate::error::{ModelError, Result};

/// A projection that can carry a LoRA adapter. The names are Hugging Face's module names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum LoraTarget {
    /// Query projection `self_attn.q_proj`.
    #[serde(rename = "q_proj")]
    Q,
    /// Key projection `self_attn.k_proj`.
    #[serde(rename = "k_proj")]
    K,
    /// Value projection `self_attn.v_proj`.
    #[serde(rename = "v_proj")]
    V,
    /// Output projection `self_attn.o_proj`.
    #[serde(rename = "o_proj")]
    O,
    /// SwiGLU gate projection `mlp.gate_proj`.
    #[serde(rename = "gate_proj")]
    Gate,
    /// SwiGLU up projection `mlp.up_proj`.
    #[serde(rename = "up_proj")]
    Up,
    /// Down projection `mlp.down_proj`.
    #[serde(rename = "down_proj")]
    Down,
}

impl LoraTarget {
    /// All seven projections, in layer order.
    pub const ALL: [LoraTarget; 7] = [Self::Q, Self::K, Self::V, Self::O, Self::Gate, Self::Up, Self::Down];

    /// The Hugging Face module name (`q_proj`, ...).
    pub fn hf_name(self) -> &'static str {
        match self {
            Self::Q => "q_proj",
            Self::K => "k_proj",
            Self::V => "v_proj",
            Self::O => "o_proj",
            Self::Gate => "gate_proj",
            Self::Up => "up_proj",
            Self::Down => "down_proj",
        }
    }

    /// The module path inside a decoder layer (`self_attn.q_proj`, `mlp.up_proj`, ...).
    pub fn hf_path(self) -> &'static str {
        match self {
            Self::Q => "self_attn.q_proj",
            Self::K => "self_attn.k_proj",
            Self::V => "self_attn.v_proj",
            Self::O => "self_attn.o_proj",
            Self::Gate => "mlp.gate_proj",
            Self::Up => "mlp.up_proj",
            Self::Down => "mlp.down_proj",
        }
    }

    /// Parse `q`, `q_proj`, `gate`, `gate_proj`, ...
    pub fn parse(s: &str) -> Option<Self> {
        let s = s.trim().to_ascii_lowercase();
        let s = s.strip_suffix("_proj").unwrap_or(&s);
        Some(match s {
            "q" => Self::Q,
            "k" => Self::K,
            "v" => Self::V,
            "o" => Self::O,
            "gate" => Self::Gate,
            "up" => Self::Up,
            "down" => Self::Down,
            _ => return None,
        })
    }

    /// `(d_in, d_out)` of this projection for a model configuration.
    pub fn dims(self, c: &LlamaConfig) -> (usize, usize) {
        let h = c.hidden_size;
        match self {
            Self::Q => (h, c.q_dim()),
            Self::O => (c.q_dim(), h),
            Self::K | Self::V => (h, c.kv_dim()),
            Self::Gate | Self::Up => (h, c.intermediate_size),
            Self::Down => (c.intermediate_size, h),
        }
    }
}

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
