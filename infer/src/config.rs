//! The shape of a Llama-style decoder.
//!
//! [`LlamaConfig`] uses the field names of Hugging Face's `LlamaConfig`, so the
//! `config.json` written beside a checkpoint loads in `transformers` and an HF
//! `config.json` loads here.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{InferError, Result};

/// Shape of a Llama-style decoder (RMSNorm, RoPE, SwiGLU, grouped-query attention).
///
/// The defaults are the byte-level Shakespeare student (about 3.2 M parameters):
/// hidden 256, 4 layers, 4 heads, 4 KV heads, intermediate 688, vocabulary 256.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    /// Width of the residual stream. Default 256.
    pub hidden_size: usize,
    /// Number of decoder layers. Default 4.
    pub num_hidden_layers: usize,
    /// Number of query heads; must divide `hidden_size`. Default 4.
    pub num_attention_heads: usize,
    /// Number of key/value heads (grouped-query attention); must divide
    /// `num_attention_heads`. Default 4 (plain multi-head attention).
    pub num_key_value_heads: usize,
    /// Width of the SwiGLU feed-forward layer. Default 688 (≈ 8/3 · hidden, rounded).
    pub intermediate_size: usize,
    /// Vocabulary size. Default 256 (the built-in byte tokenizer).
    pub vocab_size: usize,
    /// RoPE base frequency. Default 10 000.
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    /// Longest sequence the model is meant to see. Default 512.
    pub max_position_embeddings: usize,
    /// Whether the LM head shares the token embedding matrix. Default true.
    #[serde(default = "default_true")]
    pub tie_word_embeddings: bool,
    /// Epsilon of RMSNorm. Default 1e-5.
    #[serde(default = "default_rms_eps")]
    pub rms_norm_eps: f64,
    /// Width of one attention head when it is not `hidden_size / num_attention_heads`
    /// (Hugging Face's `head_dim`): a model whose heads were pruned keeps their width
    /// with fewer of them. Default `None` (the quotient).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_dim: Option<usize>,
}

fn default_rope_theta() -> f64 {
    10_000.0
}
fn default_true() -> bool {
    true
}
fn default_rms_eps() -> f64 {
    1e-5
}

impl Default for LlamaConfig {
    fn default() -> Self {
        Self {
            hidden_size: 256,
            num_hidden_layers: 4,
            num_attention_heads: 4,
            num_key_value_heads: 4,
            intermediate_size: 688,
            vocab_size: 256,
            rope_theta: default_rope_theta(),
            max_position_embeddings: 512,
            tie_word_embeddings: true,
            rms_norm_eps: default_rms_eps(),
            head_dim: None,
        }
    }
}

impl LlamaConfig {
    /// A very small configuration for unit tests (hidden 32, 2 layers, GQA 4:2).
    pub fn tiny() -> Self {
        Self {
            hidden_size: 32,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            intermediate_size: 64,
            vocab_size: 256,
            max_position_embeddings: 128,
            ..Self::default()
        }
    }

    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.head_dim.unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// `(d_in, d_out)` of the projection `target` (the shape of its LoRA factors'
    /// outer dimensions).
    pub fn lora_dims(&self, target: covey_tensors::lora::LoraTarget) -> (usize, usize) {
        use covey_tensors::lora::LoraTarget as T;
        let h = self.hidden_size;
        match target {
            T::Q => (h, self.q_dim()),
            T::O => (self.q_dim(), h),
            T::K | T::V => (h, self.kv_dim()),
            T::Gate | T::Up => (h, self.intermediate_size),
            T::Down => (self.intermediate_size, h),
        }
    }

    /// Width of the query projection's output (and of the output projection's input):
    /// heads × head width, `hidden_size` unless heads were pruned.
    pub fn q_dim(&self) -> usize {
        self.head_dim() * self.num_attention_heads
    }

    /// Width of the key/value projections.
    pub fn kv_dim(&self) -> usize {
        self.head_dim() * self.num_key_value_heads
    }

    /// Check that every value is possible; returns the first problem found.
    pub fn validate(&self) -> Result<()> {
        let positive = [
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("intermediate_size", self.intermediate_size),
            ("vocab_size", self.vocab_size),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        for (field, value) in positive {
            if value == 0 {
                return Err(InferError::config(field, "must be at least 1"));
            }
        }
        if self.head_dim == Some(0) {
            return Err(InferError::config("head_dim", "must be at least 1"));
        }
        if self.head_dim.is_none() && !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(InferError::config(
                "num_attention_heads",
                format!("{} does not divide hidden_size {}", self.num_attention_heads, self.hidden_size),
            ));
        }
        if !self.num_attention_heads.is_multiple_of(self.num_key_value_heads) {
            return Err(InferError::config(
                "num_key_value_heads",
                format!(
                    "{} does not divide num_attention_heads {}",
                    self.num_key_value_heads, self.num_attention_heads
                ),
            ));
        }
        if !self.head_dim().is_multiple_of(2) {
            return Err(InferError::config(
                "head_dim",
                format!("{} is odd; RoPE needs an even head width", self.head_dim()),
            ));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 1.0) {
            return Err(InferError::config("rope_theta", format!("{} is not > 1", self.rope_theta)));
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps > 0.0 && self.rms_norm_eps < 1.0) {
            return Err(InferError::config("rms_norm_eps", format!("{} is not in (0, 1)", self.rms_norm_eps)));
        }
        Ok(())
    }

    /// Number of parameters of the base model.
    pub fn num_params(&self) -> usize {
        let h = self.hidden_size;
        let per_layer = 2 * h + 2 * h * self.q_dim() + 2 * h * self.kv_dim() + 3 * h * self.intermediate_size;
        let head = if self.tie_word_embeddings { 0 } else { h * self.vocab_size };
        self.vocab_size * h + self.num_hidden_layers * per_layer + h + head
    }

    /// Read a Hugging Face style `config.json` (unknown keys are ignored) and validate it.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| InferError::Io { path: path.to_owned(), source: e })?;
        let mut config: Self =
            serde_json::from_str(&text).map_err(|source| InferError::Json { path: path.to_owned(), source })?;
        // `save` always writes `head_dim`, as `transformers` reads it; the usual quotient
        // is kept implicit so that a config compares equal after a round trip.
        if config.num_attention_heads > 0
            && config.head_dim == Some(config.hidden_size / config.num_attention_heads)
            && config.hidden_size.is_multiple_of(config.num_attention_heads)
        {
            config.head_dim = None;
        }
        config.validate().map_err(|e| e.in_file(path))?;
        Ok(config)
    }

    /// Write `config.json` with the keys `transformers` expects for `LlamaForCausalLM`.
    pub fn save(&self, path: &Path) -> Result<()> {
        let file = HfConfigFile {
            architectures: vec!["LlamaForCausalLM".into()],
            model_type: "llama".into(),
            hidden_act: "silu".into(),
            torch_dtype: "float32".into(),
            attention_bias: false,
            mlp_bias: false,
            config: Self { head_dim: Some(self.head_dim()), ..self.clone() },
        };
        let text =
            serde_json::to_string_pretty(&file).map_err(|source| InferError::Json { path: path.to_owned(), source })?;
        std::fs::write(path, text).map_err(|e| InferError::Io { path: path.to_owned(), source: e })
    }
}

#[derive(Serialize)]
struct HfConfigFile {
    architectures: Vec<String>,
    model_type: String,
    hidden_act: String,
    torch_dtype: String,
    attention_bias: bool,
    mlp_bias: bool,
    #[serde(flatten)]
    config: LlamaConfig,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_config_is_valid_and_in_the_student_size_range() {
        let c = LlamaConfig::default();
        c.validate().expect("default config validates");
        let n = c.num_params();
        assert!((1_000_000..=5_000_000).contains(&n), "{n} parameters");
    }

    #[test]
    fn impossible_values_are_named() {
        let mut c = LlamaConfig::tiny();
        c.num_key_value_heads = 3;
        let err = c.validate().expect_err("3 does not divide 4").to_string();
        assert!(err.contains("num_key_value_heads"), "{err}");
        let mut c = LlamaConfig::tiny();
        c.hidden_size = 0;
        assert!(c.validate().expect_err("zero").to_string().contains("hidden_size"));
    }

    #[test]
    fn config_json_round_trips_and_missing_fields_are_reported() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("config.json");
        let c = LlamaConfig::tiny();
        c.save(&path).expect("save");
        assert_eq!(LlamaConfig::load(&path).expect("load"), c);

        std::fs::write(&path, r#"{"hidden_size": 32, "num_hidden_layers": 2}"#).expect("write");
        let err = LlamaConfig::load(&path).expect_err("missing fields").to_string();
        assert!(err.contains("config.json") && err.contains("missing field"), "{err}");

        let mut bad = c.clone();
        bad.num_attention_heads = 5;
        let text = serde_json::to_string(&bad).expect("json");
        std::fs::write(&path, text).expect("write");
        let err = LlamaConfig::load(&path).expect_err("impossible").to_string();
        assert!(err.contains("config.json") && err.contains("num_attention_heads"), "{err}");
    }

    #[test]
    fn an_explicit_head_width_survives_a_round_trip_and_sizes_the_projections() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("config.json");
        // Three of four heads of width 8 left in a model of width 32.
        let c =
            LlamaConfig { num_attention_heads: 3, num_key_value_heads: 1, head_dim: Some(8), ..LlamaConfig::tiny() };
        c.validate().expect("valid");
        assert_eq!((c.head_dim(), c.q_dim(), c.kv_dim()), (8, 24, 8));
        c.save(&path).expect("save");
        let text = std::fs::read_to_string(&path).expect("read");
        assert!(text.contains("\"head_dim\": 8"), "{text}");
        assert_eq!(LlamaConfig::load(&path).expect("load"), c);
        let odd = LlamaConfig { head_dim: Some(7), ..c };
        assert!(odd.validate().expect_err("odd").to_string().contains("head_dim"));
    }
}
