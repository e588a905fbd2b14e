//! Picking the next token: greedy, temperature, top-k and top-p sampling, seeded.

use rand::RngExt;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::error::{InferError, Result};

/// How to pick each next token.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SamplingConfig {
    /// Tokens to generate after the prompt. Default 200.
    pub max_new_tokens: usize,
    /// Softmax temperature; 0 means greedy (argmax). Default 0.8.
    pub temperature: f64,
    /// Keep only the `k` most likely tokens. Default none.
    pub top_k: Option<usize>,
    /// Keep the smallest set of most likely tokens whose probability reaches `p`. Default none.
    pub top_p: Option<f64>,
    /// Seed of the sampler. Default 0.
    pub seed: u64,
}

impl Default for SamplingConfig {
    fn default() -> Self {
        Self { max_new_tokens: 200, temperature: 0.8, top_k: None, top_p: None, seed: 0 }
    }
}

impl SamplingConfig {
    /// Check that every value is possible.
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(InferError::InvalidSetting {
                field: "temperature",
                reason: format!("{} is negative", self.temperature),
            });
        }
        if self.top_k == Some(0) {
            return Err(InferError::InvalidSetting { field: "top_k", reason: "must be at least 1".into() });
        }
        if let Some(p) = self.top_p
            && !(p > 0.0 && p <= 1.0)
        {
            return Err(InferError::InvalidSetting { field: "top_p", reason: format!("{p} is not in (0, 1]") });
        }
        Ok(())
    }
}

/// Pick the next token from `logits` (one row of the vocabulary).
pub fn sample(logits: &[f32], cfg: &SamplingConfig, rng: &mut ChaCha8Rng) -> u32 {
    let argmax = || {
        logits
            .iter()
            .enumerate()
            .fold((0usize, f32::NEG_INFINITY), |best, (i, &x)| if x > best.1 { (i, x) } else { best })
            .0 as u32
    };
    if cfg.temperature == 0.0 {
        return argmax();
    }
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    if let Some(k) = cfg.top_k {
        order.truncate(k.max(1));
    }
    let max = logits[order[0]] as f64;
    let mut probs: Vec<f64> = order.iter().map(|&i| ((logits[i] as f64 - max) / cfg.temperature).exp()).collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= total);
    if let Some(top_p) = cfg.top_p {
        let mut cum = 0.0;
        let mut keep = probs.len();
        for (i, p) in probs.iter().enumerate() {
            cum += p;
            if cum >= top_p {
                keep = i + 1;
                break;
            }
        }
        probs.truncate(keep);
        order.truncate(keep);
    }
    let total: f64 = probs.iter().sum();
    let mut u = rng.random::<f64>() * total;
    for (i, p) in probs.iter().enumerate() {
        if u < *p {
            return order[i] as u32;
        }
        u -= p;
    }
    order[order.len() - 1] as u32
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn greedy_top_k_and_top_p_select_from_the_right_sets() {
        let logits = [0.0f32, 3.0, 1.0, 2.0];
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let greedy = SamplingConfig { temperature: 0.0, ..SamplingConfig::default() };
        assert_eq!(sample(&logits, &greedy, &mut rng), 1);
        let top2 = SamplingConfig { temperature: 1.0, top_k: Some(2), ..SamplingConfig::default() };
        for _ in 0..200 {
            assert!(matches!(sample(&logits, &top2, &mut rng), 1 | 3));
        }
        // p(1) = e^3 / (e^0 + e^3 + e^1 + e^2) ≈ 0.64 < 0.7, so top-p 0.7 keeps {1, 3}.
        let top_p = SamplingConfig { temperature: 1.0, top_p: Some(0.7), ..SamplingConfig::default() };
        let mut seen = [0usize; 4];
        for _ in 0..2000 {
            seen[sample(&logits, &top_p, &mut rng) as usize] += 1;
        }
        assert_eq!(seen[0] + seen[2], 0, "{seen:?}");
        assert!(seen[1] > seen[3] && seen[3] > 0, "{seen:?}");
    }

    #[test]
    fn same_seed_same_samples() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let cfg = SamplingConfig { temperature: 1.0, ..SamplingConfig::default() };
        let draw = |seed| {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            (0..20).map(|_| sample(&logits, &cfg, &mut rng)).collect::<Vec<_>>()
        };
        assert_eq!(draw(3), draw(3));
        assert_ne!(draw(3), draw(4));
    }
}
