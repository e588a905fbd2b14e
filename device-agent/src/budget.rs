//! What a task needs of the device, estimated before any large download, so that a
//! task that would not fit the agent's memory budget (`max-memory-bytes`) is declined
//! with a reason rather than started and killed.
//!
//! The estimate is of the leanest way the local round runs (covey-qlora's trainer with
//! no activations kept; a budget above it is spent on keeping some, see
//! `TrainConfig::activation_memory_mib`): the larger of
//! - loading: the release file read whole, and its tensors decoded beside it;
//! - training: the release as stored (int8 / int4: never expanded to f32), each layer's
//!   input kept for the backward pass, one layer's activations and gradients, one layer's
//!   weights decoded to f32, a block of the output head and its logits;
//!
//! plus a fixed allowance for the process. On SmolLM2-135M (int8 release, batch 4 × 128
//! tokens) it says 0.34 GB; `covey-model bench` measured a whole-process peak of
//! 0.32 GB (307 MiB).

use covey_model::{LlamaConfig, LoraTarget};

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

/// Bytes an adapter of rank `rank` on `targets` adds to a task of `tokens` tokens per
/// step: `A`, and `B` with its gradient and AdamW's two moments, per layer and target;
/// `x · Aᵀ` of one layer. The version's own adapter (frozen, at most the same size) is
/// counted once more.
pub fn adapter_bytes(config: &LlamaConfig, rank: usize, targets: &[LoraTarget], tokens: u64) -> u64 {
    let per_rank: u64 = targets
        .iter()
        .map(|&t| {
            let (d_in, d_out) = config.lora_dims(t);
            (2 * d_in + 5 * d_out) as u64
        })
        .sum::<u64>()
        * config.num_hidden_layers as u64
        + tokens * targets.len() as u64;
    4 * per_rank * rank as u64
}

/// The largest rank, up to `max_rank`, whose task would fit `limit` bytes (1 when none
/// does: such a task is declined anyway). What the agent states as its rank cap when
/// `max-lora-rank` is 0 and `max-memory-bytes` is set.
pub fn rank_for_budget(
    config: &LlamaConfig,
    release_bytes: u64,
    training: &TrainingSpec,
    targets: &[LoraTarget],
    max_rank: usize,
    limit: u64,
) -> usize {
    (1..=max_rank.max(1))
        .rev()
        .find(|&r| task_memory_bytes(config, release_bytes, training, r, targets) <= limit)
        .unwrap_or(1)
}

/// Estimated peak bytes of training one task of `training` on a model of `config` whose
/// release file is `release_bytes` long, with an adapter of rank `rank` on `targets`.
pub fn task_memory_bytes(
    config: &LlamaConfig,
    release_bytes: u64,
    training: &TrainingSpec,
    rank: usize,
    targets: &[LoraTarget],
) -> u64 {
    let n = (training.batch_size * training.seq_len) as u64;
    let (b, t) = (training.batch_size as u64, training.seq_len as u64);
    let (d, f, v) = (config.hidden_size as u64, config.intermediate_size as u64, config.vocab_size as u64);
    let head_dim = config.head_dim() as u64;
    let (heads, qd) = (config.num_attention_heads as u64, config.num_attention_heads as u64 * head_dim);
    let kvd = config.num_key_value_heads as u64 * head_dim;
    let layers = config.num_hidden_layers as u64;
    let layer_inputs = (layers + 1) * n * d;
    let activations = n * (3 * d + 3 * qd + 2 * kvd + 3 * f) + b * heads * t * t;
    let gradients = n * (3 * d + 3 * f + 3 * qd + 4 * kvd);
    let layer_weights = 2 * d * qd + 2 * d * kvd + 3 * d * f;
    let block = ((1u64 << 21) / n.max(1)).clamp(64, v.max(64));
    let head = n * block + block * d + 3 * n * d;
    let training = release_bytes
        + 4 * (layer_inputs + activations + gradients + layer_weights + head)
        + adapter_bytes(config, rank, targets, n);
    let loading = 2 * release_bytes;
    training.max(loading) + PROCESS_BYTES
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
    fn smollm2_needs_what_its_benchmark_measured() {
        assert_eq!(parameters(&smollm2()), 134_515_008);
        let t = TrainingSpec {
            steps: 8,
            batch_size: 4,
            seq_len: 128,
            learning_rate: 3e-3,
            proximal_mu: 0.0,
            seed: 0,
            update_encoding: Default::default(),
        };
        let qv = [LoraTarget::Q, LoraTarget::V];
        let est = task_memory_bytes(&smollm2(), 135_491_528, &t, 8, &qv) as f64 / 1e9;
        assert!((0.32..0.45).contains(&est), "{est} GB against 0.32 GB measured");
        let longer = TrainingSpec { seq_len: 2048, ..t.clone() };
        assert!(task_memory_bytes(&smollm2(), 135_491_528, &longer, 8, &qv) as f64 / 1e9 > 1.0);
    }

    #[test]
    fn the_rank_a_device_asks_for_follows_from_its_memory() {
        let t = TrainingSpec {
            steps: 8,
            batch_size: 4,
            seq_len: 128,
            learning_rate: 3e-3,
            proximal_mu: 0.0,
            seed: 0,
            update_encoding: Default::default(),
        };
        let all = LoraTarget::ALL;
        let (c, release) = (smollm2(), 135_491_528);
        let need = |r| task_memory_bytes(&c, release, &t, r, &all);
        // Each rank costs the same amount more; a limit between two ranks' needs picks
        // the lower one, and more memory never asks for a smaller rank.
        assert!(need(16) > need(8) && need(16) - need(8) == need(24) - need(16));
        assert_eq!(rank_for_budget(&c, release, &t, &all, 64, need(16)), 16);
        assert_eq!(rank_for_budget(&c, release, &t, &all, 64, need(16) - 1), 15);
        assert_eq!(rank_for_budget(&c, release, &t, &all, 64, u64::MAX), 64);
        assert_eq!(rank_for_budget(&c, release, &t, &all, 64, 1), 1);
        let mut last = 0;
        for mb in (300..800).step_by(25) {
            let r = rank_for_budget(&c, release, &t, &all, 64, mb << 20);
            assert!(r >= last, "{mb} MiB: rank {r} below {last}");
            last = r;
        }
        assert!(last > 1, "some budget in 300..800 MiB affords more than rank 1");
    }
}
