//! Evaluation: mean NLL, perplexity, bits per byte, next-token top-1 and top-3 accuracy.

use burn::tensor::activation::log_softmax;
use burn::tensor::{Device, Int, Tensor, TensorData};
use serde::Serialize;

use crate::error::{ModelError, Result};
use crate::llama::Llama;

/// Metrics of a model on held-out tokens.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct EvalMetrics {
    /// Tokens scored.
    pub tokens: usize,
    /// Mean negative log-likelihood per token (nats).
    pub mean_nll: f64,
    /// `exp(mean_nll)`.
    pub perplexity: f64,
    /// Total NLL in bits divided by the bytes of text scored.
    pub bits_per_byte: f64,
    /// Fraction of tokens that are the model's most likely next token.
    pub top1: f64,
    /// Fraction of tokens among the model's three most likely (the keyboard metric).
    pub top3: f64,
}

/// Score `tokens` in consecutive windows of `seq_len` predictions (every token after the
/// first of a window is scored once). `bytes_per_token` converts to bits per byte
/// (exactly 1 for the byte tokenizer). At most `max_tokens` predictions are scored.
pub fn evaluate(
    model: &Llama,
    tokens: &[u32],
    seq_len: usize,
    batch_size: usize,
    bytes_per_token: f64,
    max_tokens: Option<usize>,
    device: &Device,
) -> Result<EvalMetrics> {
    if tokens.len() < 2 {
        return Err(ModelError::EmptyCorpus { path: "evaluation text".into(), needed: Some(2) });
    }
    let seq_len = seq_len.min(model.config.max_position_embeddings).max(1);
    let limit = max_tokens.unwrap_or(usize::MAX);
    let mut windows: Vec<&[u32]> = Vec::new();
    let mut start = 0;
    let mut planned = 0;
    while start + 1 < tokens.len() && planned < limit {
        let end = (start + seq_len + 1).min(tokens.len());
        windows.push(&tokens[start..end]);
        planned += end - start - 1;
        start += seq_len;
    }
    let (mut nll, mut top1, mut top3, mut count) = (0.0f64, 0.0f64, 0.0f64, 0usize);
    // Windows of equal length are batched; the last, shorter one runs alone.
    for group in windows.chunk_by(|a, b| a.len() == b.len()) {
        for chunk in group.chunks(batch_size.max(1)) {
            let (n, b, s) = score(model, chunk, device);
            nll += n;
            top1 += b;
            top3 += s;
            count += chunk.len() * (chunk[0].len() - 1);
        }
    }
    let mean_nll = nll / count as f64;
    Ok(EvalMetrics {
        tokens: count,
        mean_nll,
        perplexity: mean_nll.exp(),
        bits_per_byte: nll / std::f64::consts::LN_2 / (count as f64 * bytes_per_token),
        top1: top1 / count as f64,
        top3: top3 / count as f64,
    })
}

/// Sum of NLL, top-1 hits and top-3 hits over windows of equal length.
fn score(model: &Llama, windows: &[&[u32]], device: &Device) -> (f64, f64, f64) {
    let b = windows.len();
    let t = windows[0].len() - 1;
    let mut inputs = Vec::with_capacity(b * t);
    let mut targets = Vec::with_capacity(b * t);
    for w in windows {
        inputs.extend(w[..t].iter().map(|&x| x as i64));
        targets.extend(w[1..].iter().map(|&x| x as i64));
    }
    let inputs = Tensor::<2, Int>::from_data(TensorData::new(inputs, [b, t]), device);
    let targets = Tensor::<2, Int>::from_data(TensorData::new(targets, [b * t, 1]), device);
    let logits = model.forward(inputs);
    let v = logits.dims()[2];
    let logits = logits.reshape([b * t, v]);
    let nll = log_softmax(logits.clone(), 1).gather(1, targets.clone()).neg().sum();
    let k = v.min(3);
    let (_, idx) = logits.topk_with_indices(k, 1);
    let hits = idx.equal(targets.expand([b * t, k])).int();
    let top1 = hits.clone().narrow(1, 0, 1).sum();
    let top3 = hits.sum();
    (f64::from(nll.into_scalar::<f32>()), top1.into_scalar::<i64>() as f64, top3.into_scalar::<i64>() as f64)
}
