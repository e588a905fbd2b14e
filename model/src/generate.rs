//! Text generation with a KV cache: greedy, temperature, top-k and top-p sampling, seeded.

use burn::tensor::{Device, Int, Tensor, TensorData};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

pub use covey_infer::sample::{SamplingConfig, sample};

use crate::error::{ModelError, Result};
use crate::llama::{KvCache, Llama};

/// Generate up to `cfg.max_new_tokens` tokens after `prompt`, stopping early at
/// `stop` or at the model's context length. Returns only the new tokens.
pub fn generate(
    model: &Llama,
    prompt: &[u32],
    cfg: &SamplingConfig,
    stop: Option<u32>,
    device: &Device,
) -> Result<Vec<u32>> {
    cfg.validate()?;
    let vocab = model.config.vocab_size;
    if prompt.is_empty() {
        return Err(ModelError::config("prompt", "is empty"));
    }
    if let Some(&id) = prompt.iter().find(|&&t| t as usize >= vocab) {
        return Err(ModelError::TokenOutOfRange { id, vocab });
    }
    let ctx = model.config.max_position_embeddings;
    let prompt = &prompt[prompt.len().saturating_sub(ctx)..];
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    let mut cache = KvCache::new();
    let mut out = Vec::with_capacity(cfg.max_new_tokens);
    let mut next_input: Vec<u32> = prompt.to_vec();
    while out.len() < cfg.max_new_tokens && cache.len() + next_input.len() <= ctx {
        let ids: Vec<i64> = next_input.iter().map(|&t| t as i64).collect();
        let n = ids.len();
        let tokens = Tensor::<2, Int>::from_data(TensorData::new(ids, [1, n]), device);
        let logits = model.forward_cached(tokens, &mut cache);
        let last = logits.narrow(1, n - 1, 1).reshape([vocab]);
        let row = last
            .into_data()
            .convert::<f32>()
            .try_into_vec::<f32>()
            .map_err(|e| ModelError::config("logits", format!("cannot read the logits back: {e:?}")))?;
        let tok = sample(&row, cfg, &mut rng);
        out.push(tok);
        if Some(tok) == stop {
            break;
        }
        next_input = vec![tok];
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sampling_lives_in_covey_infer() {
        let cfg = SamplingConfig { temperature: 0.0, ..SamplingConfig::default() };
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        assert_eq!(sample(&[0.0, 2.0, 1.0], &cfg, &mut rng), 1);
    }
}
