//! The decoder on host memory: weights as stored, a KV cache per [`Session`].

use std::collections::BTreeMap;

use covey_tensors::quant::{Int4Tensor, Int8Tensor, StoredTensor};
use covey_tensors::{HostTensor, NamedTensors};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::config::LlamaConfig;
use crate::error::{InferError, Result};
use crate::kernels::Weight;
use crate::qdot::KernelPath;
use crate::sample::{SamplingConfig, sample};

/// How the projection weights are held in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// f32 everywhere.
    F32,
    /// int8 per output channel for every projection and the embedding.
    Int8,
    /// int4 group-wise (group 32) for the projections; the embedding (and the tied LM
    /// head) stays int8, as llama.cpp keeps `token_embd` at 8 bits in its 4-bit files.
    Int4,
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::F32 => "f32",
            Self::Int8 => "int8",
            Self::Int4 => "int4",
        })
    }
}

impl std::str::FromStr for Precision {
    type Err = InferError;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "f32" => Ok(Self::F32),
            "int8" | "i8" | "q8" => Ok(Self::Int8),
            "int4" | "i4" | "q4" => Ok(Self::Int4),
            other => Err(InferError::InvalidSetting {
                field: "precision",
                reason: format!("`{other}` is not one of f32, int8, int4"),
            }),
        }
    }
}

struct Layer {
    attn_norm: Vec<f32>,
    q: Weight,
    k: Weight,
    v: Weight,
    o: Weight,
    mlp_norm: Vec<f32>,
    gate: Weight,
    up: Weight,
    down: Weight,
}

/// A loaded model, ready for [`Model::forward`]. Immutable: any number of [`Session`]s
/// can share it.
pub struct Model {
    config: LlamaConfig,
    embed: Weight,
    layers: Vec<Layer>,
    norm: Vec<f32>,
    lm_head: Option<Weight>,
    inv_freq: Vec<f32>,
    kernels: KernelPath,
}

/// The KV cache of one sequence.
#[derive(Debug, Clone, Default)]
pub struct Session {
    /// Per layer: keys then values, `[position, kv_dim]` each.
    keys: Vec<Vec<f32>>,
    values: Vec<Vec<f32>>,
    len: usize,
}

impl Session {
    /// Positions already in the cache.
    pub fn len(&self) -> usize {
        self.len
    }
    /// Whether nothing has been fed yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

fn layer_name(i: usize, part: &str) -> String {
    format!("model.layers.{i}.{part}.weight")
}

/// Everything a model with `config` needs, with its shape.
pub fn expected_shapes(config: &LlamaConfig) -> Vec<(String, Vec<usize>)> {
    let (h, kv, f, v) = (config.hidden_size, config.kv_dim(), config.intermediate_size, config.vocab_size);
    let qd = config.q_dim();
    let mut out = vec![("model.embed_tokens.weight".to_string(), vec![v, h])];
    for i in 0..config.num_hidden_layers {
        out.push((layer_name(i, "input_layernorm"), vec![h]));
        out.push((layer_name(i, "self_attn.q_proj"), vec![qd, h]));
        out.push((layer_name(i, "self_attn.k_proj"), vec![kv, h]));
        out.push((layer_name(i, "self_attn.v_proj"), vec![kv, h]));
        out.push((layer_name(i, "self_attn.o_proj"), vec![h, qd]));
        out.push((layer_name(i, "post_attention_layernorm"), vec![h]));
        out.push((layer_name(i, "mlp.gate_proj"), vec![f, h]));
        out.push((layer_name(i, "mlp.up_proj"), vec![f, h]));
        out.push((layer_name(i, "mlp.down_proj"), vec![h, f]));
    }
    out.push(("model.norm.weight".to_string(), vec![h]));
    if !config.tie_word_embeddings {
        out.push(("lm_head.weight".to_string(), vec![v, h]));
    }
    out
}

/// A random model under Hugging Face names (for tests and benchmarks): projections
/// N(0, 0.02²)-like, norms around 1.
pub fn random_tensors(config: &LlamaConfig, seed: u64) -> NamedTensors {
    use rand::RngExt;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    expected_shapes(config)
        .into_iter()
        .map(|(name, shape)| {
            let n: usize = shape.iter().product();
            let data = if shape.len() == 1 {
                (0..n).map(|_| 1.0 + 0.1 * (rng.random::<f32>() - 0.5)).collect()
            } else {
                let std = 0.5 / (shape[1] as f32).sqrt();
                (0..n).map(|_| std * 3.46 * (rng.random::<f32>() - 0.5)).collect()
            };
            (name, HostTensor { shape, data })
        })
        .collect()
}

fn take_weight(
    tensors: &mut BTreeMap<String, StoredTensor>,
    name: &str,
    shape: &[usize],
    precision: Precision,
    embedding: bool,
) -> Result<Weight> {
    let stored = tensors.remove(name).ok_or_else(|| InferError::MissingTensor(name.into()))?;
    if stored.shape() != shape {
        return Err(InferError::ShapeMismatch {
            name: name.into(),
            expected: shape.to_vec(),
            found: stored.shape().to_vec(),
        });
    }
    let target = match (precision, embedding) {
        (Precision::Int4, true) => Precision::Int8,
        (p, _) => p,
    };
    let bad = |_| InferError::Tensor(covey_tensors::TensorError::NonFinite(name.into()));
    Ok(match (stored, target) {
        // Already quantized weights are used as stored (no re-quantization).
        (StoredTensor::Int8(q), _) => Weight::Int8(q),
        (StoredTensor::Int4(q), _) => Weight::Int4(q),
        (StoredTensor::F32(t), Precision::F32) => Weight::F32 { rows: shape[0], cols: shape[1], data: t.data },
        (StoredTensor::F32(t), Precision::Int8) => Weight::Int8(Int8Tensor::quantize(&t).map_err(bad)?),
        (StoredTensor::F32(t), Precision::Int4) => {
            if Int4Tensor::supports(&t.shape) {
                Weight::Int4(Int4Tensor::quantize(&t).map_err(bad)?)
            } else {
                Weight::Int8(Int8Tensor::quantize(&t).map_err(bad)?)
            }
        }
    })
}

fn take_vector(tensors: &mut BTreeMap<String, StoredTensor>, name: &str, len: usize) -> Result<Vec<f32>> {
    let stored = tensors.remove(name).ok_or_else(|| InferError::MissingTensor(name.into()))?;
    if stored.shape() != [len] {
        return Err(InferError::ShapeMismatch {
            name: name.into(),
            expected: vec![len],
            found: stored.shape().to_vec(),
        });
    }
    Ok(stored.to_f32().data)
}

impl Model {
    /// Build a model from f32 tensors under Hugging Face names, quantizing the
    /// projections to `precision` (one matrix at a time: the f32 input is the only full
    /// copy).
    pub fn from_tensors(config: LlamaConfig, tensors: &NamedTensors, precision: Precision) -> Result<Self> {
        let stored = tensors.iter().map(|(n, t)| (n.clone(), StoredTensor::F32(t.clone()))).collect();
        Self::from_stored(config, stored, precision)
    }

    /// Build a model from tensors as a file stores them. Quantized tensors are used as
    /// they are; f32 ones are quantized to `precision`. Unknown extra tensors are
    /// ignored; missing or misshapen ones are errors naming the tensor.
    pub fn from_stored(
        config: LlamaConfig,
        mut tensors: BTreeMap<String, StoredTensor>,
        precision: Precision,
    ) -> Result<Self> {
        config.validate()?;
        let (h, kv, f, v) = (config.hidden_size, config.kv_dim(), config.intermediate_size, config.vocab_size);
        let qd = config.q_dim();
        let embed = take_weight(&mut tensors, "model.embed_tokens.weight", &[v, h], precision, true)?;
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            let mut w = |part: &str, shape: [usize; 2]| {
                take_weight(&mut tensors, &layer_name(i, part), &shape, precision, false)
            };
            let q = w("self_attn.q_proj", [qd, h])?;
            let k = w("self_attn.k_proj", [kv, h])?;
            let vv = w("self_attn.v_proj", [kv, h])?;
            let o = w("self_attn.o_proj", [h, qd])?;
            let gate = w("mlp.gate_proj", [f, h])?;
            let up = w("mlp.up_proj", [f, h])?;
            let down = w("mlp.down_proj", [h, f])?;
            layers.push(Layer {
                attn_norm: take_vector(&mut tensors, &layer_name(i, "input_layernorm"), h)?,
                q,
                k,
                v: vv,
                o,
                mlp_norm: take_vector(&mut tensors, &layer_name(i, "post_attention_layernorm"), h)?,
                gate,
                up,
                down,
            });
        }
        let norm = take_vector(&mut tensors, "model.norm.weight", h)?;
        let lm_head = if config.tie_word_embeddings {
            None
        } else {
            Some(take_weight(&mut tensors, "lm_head.weight", &[v, h], precision, true)?)
        };
        let hd = config.head_dim();
        let inv_freq = (0..hd / 2).map(|j| (1.0 / config.rope_theta.powf(2.0 * j as f64 / hd as f64)) as f32).collect();
        Ok(Self { config, embed, layers, norm, lm_head, inv_freq, kernels: KernelPath::Native })
    }

    /// Run on the kernels `path` names ([`KernelPath::Native`] unless set): the
    /// portable ones are what a CPU without AVX2 runs, forced here to compare or measure.
    pub fn set_kernel_path(&mut self, path: KernelPath) {
        self.kernels = path;
    }

    /// The configuration.
    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    /// Bytes of weights held (what a device keeps in memory, KV cache aside).
    pub fn weight_bytes(&self) -> usize {
        let vecs = |v: &[f32]| v.len() * 4;
        self.embed.bytes()
            + self.lm_head.as_ref().map_or(0, Weight::bytes)
            + vecs(&self.norm)
            + self
                .layers
                .iter()
                .map(|l| {
                    [&l.q, &l.k, &l.v, &l.o, &l.gate, &l.up, &l.down].iter().map(|w| w.bytes()).sum::<usize>()
                        + vecs(&l.attn_norm)
                        + vecs(&l.mlp_norm)
                })
                .sum::<usize>()
    }

    /// A fresh, empty KV cache.
    pub fn session(&self) -> Session {
        let n = self.config.num_hidden_layers;
        Session { keys: vec![Vec::new(); n], values: vec![Vec::new(); n], len: 0 }
    }

    fn rms_norm(&self, x: &[f32], weight: &[f32], out: &mut [f32]) {
        let h = self.config.hidden_size;
        let eps = self.config.rms_norm_eps as f32;
        for (xr, or) in x.chunks_exact(h).zip(out.chunks_exact_mut(h)) {
            let ms = xr.iter().map(|v| v * v).sum::<f32>() / h as f32;
            let inv = 1.0 / (ms + eps).sqrt();
            for ((o, &v), &w) in or.iter_mut().zip(xr).zip(weight) {
                *o = v * inv * w;
            }
        }
    }

    /// Rotate-half RoPE (Hugging Face convention) of `heads` heads per row, rows at
    /// positions `start..`.
    fn rope(&self, x: &mut [f32], heads: usize, start: usize) {
        let hd = self.config.head_dim();
        let half = hd / 2;
        for (t, row) in x.chunks_exact_mut(heads * hd).enumerate() {
            let pos = (start + t) as f32;
            for head in row.chunks_exact_mut(hd) {
                for j in 0..half {
                    let (s, c) = (pos * self.inv_freq[j]).sin_cos();
                    let (a, b) = (head[j], head[j + half]);
                    head[j] = a * c - b * s;
                    head[j + half] = b * c + a * s;
                }
            }
        }
    }

    /// Feed `ids` after what `session` holds and return their logits, `[ids.len(), vocab]`
    /// row-major. With `last_only`, only the last position's logits are computed (what
    /// generation needs), and the result has one row.
    pub fn forward(&self, session: &mut Session, ids: &[u32], last_only: bool) -> Result<Vec<f32>> {
        if rayon::current_num_threads() > 1 && rayon::current_thread_index().is_none() {
            // Enter the thread pool once per forward, not once per matmul: from outside
            // it, every parallel loop is a cold hand-over that blocks the caller (two
            // context switches, ~200 per decoded token).
            return rayon::scope(|_| self.forward_in_pool(session, ids, last_only));
        }
        self.forward_in_pool(session, ids, last_only)
    }

    fn forward_in_pool(&self, session: &mut Session, ids: &[u32], last_only: bool) -> Result<Vec<f32>> {
        let c = &self.config;
        let (h, vocab) = (c.hidden_size, c.vocab_size);
        let n = ids.len();
        if n == 0 {
            return Ok(Vec::new());
        }
        if let Some(&id) = ids.iter().find(|&&t| t as usize >= vocab) {
            return Err(InferError::TokenOutOfRange { id, vocab });
        }
        if session.len + n > c.max_position_embeddings {
            return Err(InferError::ContextFull { len: session.len + n, max: c.max_position_embeddings });
        }
        if session.keys.len() != c.num_hidden_layers {
            *session = self.session();
        }
        let (hd, heads, kvh) = (c.head_dim(), c.num_attention_heads, c.num_key_value_heads);
        let (kv, qd) = (c.kv_dim(), c.q_dim());
        let group = heads / kvh;
        let start = session.len;
        let mut x = vec![0.0f32; n * h];
        for (t, &id) in ids.iter().enumerate() {
            self.embed.row_into(id as usize, &mut x[t * h..(t + 1) * h]);
        }
        let mut normed = vec![0.0f32; n * h];
        let mut q = vec![0.0f32; n * qd];
        let mut k = vec![0.0f32; n * kv];
        let mut v = vec![0.0f32; n * kv];
        let mut attn = vec![0.0f32; n * qd];
        let mut proj = vec![0.0f32; n * h];
        let mut gate = vec![0.0f32; n * c.intermediate_size];
        let mut up = vec![0.0f32; n * c.intermediate_size];
        let scale = 1.0 / (hd as f32).sqrt();
        for (li, layer) in self.layers.iter().enumerate() {
            self.rms_norm(&x, &layer.attn_norm, &mut normed);
            layer.q.matmul_on(self.kernels, &normed, n, &mut q);
            layer.k.matmul_on(self.kernels, &normed, n, &mut k);
            layer.v.matmul_on(self.kernels, &normed, n, &mut v);
            self.rope(&mut q, heads, start);
            self.rope(&mut k, kvh, start);
            let keys = &mut session.keys[li];
            let values = &mut session.values[li];
            keys.extend_from_slice(&k);
            values.extend_from_slice(&v);
            let (keys, values) = (&*keys, &*values);
            // Causal attention, parallel over (token, head) unless the work is small.
            let attend = |(idx, out): (usize, &mut [f32])| {
                let (t, head) = (idx / heads, idx % heads);
                let kvhead = head / group;
                let qv = &q[t * qd + head * hd..t * qd + (head + 1) * hd];
                let upto = start + t + 1;
                let mut scores: Vec<f32> = (0..upto)
                    .map(|p| dot(qv, &keys[p * kv + kvhead * hd..p * kv + (kvhead + 1) * hd]) * scale)
                    .collect();
                let max = scores.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
                let mut total = 0.0;
                for s in &mut scores {
                    *s = (*s - max).exp();
                    total += *s;
                }
                out.iter_mut().for_each(|o| *o = 0.0);
                for (p, s) in scores.iter().enumerate() {
                    let w = s / total;
                    let vr = &values[p * kv + kvhead * hd..p * kv + (kvhead + 1) * hd];
                    for (o, &vv) in out.iter_mut().zip(vr) {
                        *o += w * vv;
                    }
                }
            };
            if crate::kernels::worth_parallel(n * heads * (start + n) * hd) {
                attn.par_chunks_mut(hd).enumerate().for_each(attend);
            } else {
                attn.chunks_mut(hd).enumerate().for_each(attend);
            }
            layer.o.matmul_on(self.kernels, &attn, n, &mut proj);
            x.iter_mut().zip(&proj).for_each(|(a, b)| *a += b);
            self.rms_norm(&x, &layer.mlp_norm, &mut normed);
            layer.gate.matmul_on(self.kernels, &normed, n, &mut gate);
            layer.up.matmul_on(self.kernels, &normed, n, &mut up);
            gate.iter_mut().zip(&up).for_each(|(g, u)| *g = *g / (1.0 + (-*g).exp()) * u);
            layer.down.matmul_on(self.kernels, &gate, n, &mut proj);
            x.iter_mut().zip(&proj).for_each(|(a, b)| *a += b);
        }
        session.len += n;
        let (rows, from) = if last_only { (1, (n - 1) * h) } else { (n, 0) };
        let mut final_norm = vec![0.0f32; rows * h];
        self.rms_norm(&x[from..], &self.norm, &mut final_norm);
        let mut logits = vec![0.0f32; rows * vocab];
        self.lm_head.as_ref().unwrap_or(&self.embed).matmul_on(self.kernels, &final_norm, rows, &mut logits);
        Ok(logits)
    }

    /// Logits of every position of `ids` from an empty cache: one row of `vocab` per id.
    pub fn logits(&self, ids: &[u32]) -> Result<Vec<Vec<f32>>> {
        let mut s = self.session();
        let flat = self.forward(&mut s, ids, false)?;
        Ok(flat.chunks_exact(self.config.vocab_size).map(<[f32]>::to_vec).collect())
    }

    /// Generate up to `cfg.max_new_tokens` after `prompt`, stopping after any id of
    /// `stop` or at the context length. Returns only the new tokens. Greedy
    /// (`temperature = 0`) is deterministic; sampling is seeded by `cfg.seed`.
    pub fn generate(&self, prompt: &[u32], cfg: &SamplingConfig, stop: &[u32]) -> Result<Vec<u32>> {
        self.generate_with(prompt, cfg, stop, |_| {})
    }

    /// [`Model::generate`], calling `on_token` with each new token as it is chosen.
    pub fn generate_with(
        &self,
        prompt: &[u32],
        cfg: &SamplingConfig,
        stop: &[u32],
        mut on_token: impl FnMut(u32),
    ) -> Result<Vec<u32>> {
        cfg.validate()?;
        if prompt.is_empty() {
            return Err(InferError::InvalidSetting { field: "prompt", reason: "is empty".into() });
        }
        let ctx = self.config.max_position_embeddings;
        let prompt = &prompt[prompt.len().saturating_sub(ctx.saturating_sub(1))..];
        let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
        let mut session = self.session();
        let mut out = Vec::with_capacity(cfg.max_new_tokens);
        let mut next: Vec<u32> = prompt.to_vec();
        while out.len() < cfg.max_new_tokens && session.len() + next.len() <= ctx {
            let logits = self.forward(&mut session, &next, true)?;
            let tok = sample(&logits, cfg, &mut rng);
            out.push(tok);
            on_token(tok);
            if stop.contains(&tok) {
                break;
            }
            next = vec![tok];
        }
        Ok(out)
    }

    /// Mean negative log-likelihood (nats per token) and the number of tokens scored, of
    /// `ids` read in consecutive windows of at most `window` tokens (each window
    /// predicts its tokens 2..; the first token of each window is context only).
    pub fn nll(&self, ids: &[u32], window: usize) -> Result<(f64, usize)> {
        if window < 2 {
            return Err(InferError::InvalidSetting { field: "window", reason: "must be at least 2".into() });
        }
        let window = window.min(self.config.max_position_embeddings);
        let vocab = self.config.vocab_size;
        let (mut total, mut count) = (0.0f64, 0usize);
        for chunk in ids.chunks(window) {
            if chunk.len() < 2 {
                continue;
            }
            let mut s = self.session();
            let logits = self.forward(&mut s, &chunk[..chunk.len() - 1], false)?;
            for (row, &target) in logits.chunks_exact(vocab).zip(&chunk[1..]) {
                let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
                let lse = row.iter().map(|&x| f64::from(x - max).exp()).sum::<f64>().ln() + f64::from(max);
                total += lse - f64::from(row[target as usize]);
                count += 1;
            }
        }
        if count == 0 {
            return Err(InferError::InvalidSetting { field: "text", reason: "has fewer than two tokens".into() });
        }
        Ok((total / count as f64, count))
    }
}

#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> (LlamaConfig, NamedTensors) {
        let c = LlamaConfig::tiny();
        let t = random_tensors(&c, 3);
        (c, t)
    }

    #[test]
    fn cached_decoding_equals_a_full_forward() {
        let (c, t) = tiny();
        let m = Model::from_tensors(c.clone(), &t, Precision::F32).expect("model");
        let ids = [5u32, 17, 200, 3, 99, 42];
        let full = m.logits(&ids).expect("logits");
        let mut s = m.session();
        m.forward(&mut s, &ids[..2], false).expect("prefix");
        for (i, &id) in ids.iter().enumerate().skip(2) {
            let step = m.forward(&mut s, &[id], true).expect("step");
            for (a, b) in step.iter().zip(&full[i]) {
                assert!((a - b).abs() < 1e-5, "position {i}: {a} vs {b}");
            }
        }
        assert_eq!(s.len(), ids.len());
    }

    #[test]
    fn quantized_models_stay_close_to_f32_and_hold_fewer_bytes() {
        let (c, t) = tiny();
        let f = Model::from_tensors(c.clone(), &t, Precision::F32).expect("model");
        let ids: Vec<u32> = (0..20).map(|i| (i * 37 % 256) as u32).collect();
        let base = f.logits(&ids).expect("logits");
        let mut prev = 0.0;
        for p in [Precision::Int8, Precision::Int4] {
            let m = Model::from_tensors(c.clone(), &t, p).expect("model");
            assert!(m.weight_bytes() < f.weight_bytes() / 2, "{p}");
            let got = m.logits(&ids).expect("logits");
            let err = got.iter().flatten().zip(base.iter().flatten()).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
            assert!(err > prev && err < 0.5, "{p}: max logit error {err}");
            prev = err;
        }
    }

    /// A CPU without AVX2 runs the portable kernels: forced here, they give the native
    /// path's logits (up to f32 summation order) and its greedy tokens.
    #[test]
    fn the_portable_kernels_decode_like_the_native_ones() {
        let (c, t) = tiny();
        for p in [Precision::F32, Precision::Int8, Precision::Int4] {
            let native = Model::from_tensors(c.clone(), &t, p).expect("model");
            let mut portable = Model::from_tensors(c.clone(), &t, p).expect("model");
            portable.set_kernel_path(KernelPath::Portable);
            let ids: Vec<u32> = (0..12).map(|i| (i * 53 % 256) as u32).collect();
            let (a, b) = (native.logits(&ids).expect("logits"), portable.logits(&ids).expect("logits"));
            let err = a.iter().flatten().zip(b.iter().flatten()).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max);
            assert!(err < 1e-4, "{p}: native and portable logits differ by {err}");
            let cfg = SamplingConfig { temperature: 0.0, max_new_tokens: 10, ..SamplingConfig::default() };
            assert_eq!(
                native.generate(&ids, &cfg, &[]).expect("gen"),
                portable.generate(&ids, &cfg, &[]).expect("gen")
            );
        }
    }

    #[test]
    fn bad_inputs_are_errors() {
        let (c, mut t) = tiny();
        let m = Model::from_tensors(c.clone(), &t, Precision::F32).expect("model");
        assert!(matches!(m.logits(&[300]), Err(InferError::TokenOutOfRange { id: 300, .. })));
        let long = vec![1u32; c.max_position_embeddings + 1];
        assert!(matches!(m.logits(&long), Err(InferError::ContextFull { .. })));
        t.insert("model.norm.weight".into(), HostTensor::zeros(&[3]));
        let err = Model::from_tensors(c.clone(), &t, Precision::F32).err().expect("bad shape").to_string();
        assert!(err.contains("model.norm.weight"), "{err}");
        t.remove("model.layers.1.mlp.up_proj.weight");
        let err = Model::from_tensors(c, &t, Precision::F32).err().expect("missing").to_string();
        assert!(err.contains("model.layers.1.mlp.up_proj.weight"), "{err}");
    }

    #[test]
    fn greedy_generation_is_deterministic_and_stops() {
        let (c, t) = tiny();
        let m = Model::from_tensors(c, &t, Precision::Int8).expect("model");
        let cfg = SamplingConfig { temperature: 0.0, max_new_tokens: 12, ..SamplingConfig::default() };
        let a = m.generate(&[1, 2, 3], &cfg, &[]).expect("gen");
        assert_eq!(a.len(), 12);
        assert_eq!(a, m.generate(&[1, 2, 3], &cfg, &[]).expect("gen"));
        let stop = m.generate(&[1, 2, 3], &cfg, &[a[3]]).expect("gen");
        assert_eq!(stop, a[..a.iter().position(|&x| x == a[3]).expect("present") + 1]);
    }

    #[test]
    fn nll_of_a_uniform_model_is_log_vocab() {
        let (c, mut t) = tiny();
        // Zero LM head (tied embedding) after a norm: every logit 0.
        t.insert("model.norm.weight".into(), HostTensor::zeros(&[c.hidden_size]));
        let m = Model::from_tensors(c, &t, Precision::F32).expect("model");
        let ids: Vec<u32> = (0..50).collect();
        let (nll, n) = m.nll(&ids, 16).expect("nll");
        assert_eq!(n, 50 - 4); // four windows: 16 + 16 + 16 + 2, each loses its first token
        assert!((nll - (256f64).ln()).abs() < 1e-5, "{nll}");
    }
}
