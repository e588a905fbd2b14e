//! What a task needs of the device, estimated before any large download, so that a
//! task that would not fit the agent's memory budget (`max-memory-bytes`) is declined
//! with a reason rather than started and killed.
//!
//! The estimate is an upper bound of what the local round holds: the release as stored,
//! the version's weights in f32 twice (the host copy and burn's parameters, both alive
//! while the model is built), the activations autodiff keeps for the backward pass (per
//! layer, per token: the hidden state through norms, attention and the MLP), the logits
//! of every position with their softmax and gradient, and a fixed allowance for the
//! process. On SmolLM2-135M (batch 2 × 64 tokens) it says 1.65 GB; the agent peaked at
//! 1.64 GB while it kept the host copy and the release through training, and at 1.42 GB
//! once it let them go after building the model (`covey-sim fleet`).

use covey_model::LlamaConfig;

use crate::task::TrainingSpec;

/// Allowance for the process itself (runtime, gRPC, tokenizer, allocator slack).
const PROCESS_BYTES: u64 = 64 << 20;

/// Number of parameters of a model of `config`.
pub fn parameters(config: &LlamaConfig) -> u64 {
    let (h, i, v) = (config.hidden_size as u64, config.intermediate_size as u64, config.vocab_size as u64);
    let head_dim = config.head_dim() as u64;
    let q = config.num_attention_heads as u64 * head_dim;
    let kv = config.num_key_value_heads as u64 * head_dim;
    let layer = h * q + 2 * h * kv + q * h + 3 * h * i + 2 * h;
    let lm_head = if config.tie_word_embeddings { 0 } else { v * h };
    v * h + config.num_hidden_layers as u64 * layer + h + lm_head
}

/// Estimated peak bytes of training one task of `training` on a model of `config` whose
/// release file is `release_bytes` long.
pub fn task_memory_bytes(config: &LlamaConfig, release_bytes: u64, training: &TrainingSpec) -> u64 {
    let tokens = (training.batch_size * training.seq_len) as u64;
    let (h, i, v) = (config.hidden_size as u64, config.intermediate_size as u64, config.vocab_size as u64);
    let activations = tokens * (config.num_hidden_layers as u64 * (16 * h + 6 * i) + 3 * v) * 4;
    release_bytes + 2 * 4 * parameters(config) + activations + PROCESS_BYTES
}

#[cfg(test)]
mod tests {
    use super::*;

    fn smollm2() -> LlamaConfig {
        LlamaConfig {
            hidden_size: 576,
            num_hidden_layers: 30,
            num_attention_heads: 9,
            num_key_value_heads: 3,
            intermediate_size: 1536,
            vocab_size: 49152,
            max_position_embeddings: 8192,
            tie_word_embeddings: true,
            ..LlamaConfig::default()
        }
    }

    #[test]
    fn smollm2_needs_what_its_fleet_run_measured() {
        assert_eq!(parameters(&smollm2()), 134_515_008);
        let t = TrainingSpec { steps: 8, batch_size: 2, seq_len: 64, learning_rate: 3e-3, proximal_mu: 0.0, seed: 0 };
        let est = task_memory_bytes(&smollm2(), 135_491_512, &t) as f64 / 1e9;
        assert!((1.55..1.75).contains(&est), "{est} GB against 1.64 GB measured");
        let longer = TrainingSpec { seq_len: 512, ..t };
        assert!(task_memory_bytes(&smollm2(), 135_491_512, &longer) as f64 / 1e9 > 3.0);
    }
}
