//! Structured pruning: remove whole attention heads and whole MLP channels, so the model
//! gets genuinely smaller (narrower matrices, a consistent `config.json`), not sparser.
//!
//! * **Heads** respect grouped-query attention: query heads that share a key/value head
//!   form a group, and every group must keep the same number of query heads. With more
//!   than one query head per group, the plan either drops the same number of query heads
//!   from every group or drops whole groups (with their key/value head), whichever lands
//!   closer to the target; with plain multi-head attention a group is one head. The head
//!   width is kept (the config then records `head_dim`).
//! * **MLP channels** `j` of the SwiGLU (`gate` and `up` row `j`, `down` column `j`) are
//!   ranked per layer; every layer keeps the same number (the config has one
//!   `intermediate_size`), rounded to a multiple (32 by default, what int4 groups and
//!   GGUF blocks need).
//!
//! Importance ([`Importance`]):
//! * `Magnitude`: channel `j` scores `‖gate_j‖·‖up_j‖·‖down_:,j‖`; head `h` scores
//!   `‖v_g(h)‖·‖o_:,h‖` (Frobenius norms of the slices).
//! * `Activation`: over calibration text, channel `j` scores
//!   `E|silu(gate_j(x))·up_j(x)| · ‖down_:,j‖` and head `h` scores
//!   `E‖attn_h(x)‖ · ‖o_:,h‖` — what the layer's output actually loses without it.
//! * `Gradient`: the first-order Taylor estimate of the loss change when the group's
//!   weights go to zero, `(Σ_w w·∂L/∂w)²` over the group (a channel: its `gate` and `up`
//!   rows and `down` column; a head: its `q` rows and `o` columns), averaged over
//!   calibration batches.
//!
//! Pruning works on host tensors under Hugging Face names ([`apply`]); [`mask`] zeroes
//! the same heads and channels in place instead, which gives the same outputs (the
//! tests check it).

use std::path::Path;

use burn::tensor::{Device, Int, Tensor, TensorData};
use serde::{Deserialize, Serialize};

use crate::checkpoint::{HostTensor, NamedTensors};
use crate::config::LlamaConfig;
use crate::error::{ModelError, Result};
use crate::llama::{Llama, ProbeSite};

/// How heads and channels are ranked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Importance {
    /// Norms of the weights that carry the head or channel.
    Magnitude,
    /// Mean activation magnitude on calibration text, times the outgoing weight norm.
    Activation,
    /// First-order Taylor estimate of the loss change when the head or channel is
    /// removed, on calibration text (Molchanov et al. 2019).
    Gradient,
}

/// What to prune.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PruneConfig {
    /// Target fraction of query heads removed, in [0, 1). Default 0.3.
    pub head_ratio: f64,
    /// Target fraction of MLP channels removed, in [0, 1). Default 0.3.
    pub mlp_ratio: f64,
    /// Kept channels are a multiple of this (when the original width is). Default 32.
    pub channel_multiple: usize,
}

impl Default for PruneConfig {
    fn default() -> Self {
        Self { head_ratio: 0.3, mlp_ratio: 0.3, channel_multiple: 32 }
    }
}

impl PruneConfig {
    /// Check the ratios.
    pub fn validate(&self) -> Result<()> {
        for (field, r) in [("head_ratio", self.head_ratio), ("mlp_ratio", self.mlp_ratio)] {
            if !(r.is_finite() && (0.0..1.0).contains(&r)) {
                return Err(ModelError::config(field, format!("{r} is not in [0, 1)")));
            }
        }
        if self.channel_multiple == 0 {
            return Err(ModelError::config("channel_multiple", "must be at least 1"));
        }
        Ok(())
    }
}

/// Importance of every query head and MLP channel, per layer.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Scores {
    /// `[layer][query head]`.
    pub heads: Vec<Vec<f64>>,
    /// `[layer][channel]`.
    pub channels: Vec<Vec<f64>>,
}

/// What one layer keeps (indices in the original model, ascending).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LayerPlan {
    /// Query heads kept, grouped by key/value head.
    pub heads: Vec<usize>,
    /// Key/value heads kept.
    pub kv_heads: Vec<usize>,
    /// MLP channels kept.
    pub channels: Vec<usize>,
}

/// What pruning keeps, and the configuration of the result.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PrunePlan {
    /// Per layer.
    pub layers: Vec<LayerPlan>,
    /// The pruned model's configuration.
    pub config: LlamaConfig,
}

fn layer_name(i: usize, part: &str) -> String {
    format!("model.layers.{i}.{part}.weight")
}

fn get<'a>(t: &'a NamedTensors, name: &str, shape: &[usize]) -> Result<&'a HostTensor> {
    let x = t.get(name).ok_or_else(|| ModelError::MissingTensor { path: "model".into(), name: name.into() })?;
    if x.shape != shape {
        return Err(ModelError::ShapeMismatch {
            path: "model".into(),
            name: name.into(),
            expected: shape.to_vec(),
            found: x.shape.clone(),
        });
    }
    Ok(x)
}

/// Frobenius norm of rows `rows` of a row-major `[_, cols]` tensor.
fn rows_norm(t: &HostTensor, rows: std::ops::Range<usize>, cols: usize) -> f64 {
    t.data[rows.start * cols..rows.end * cols].iter().map(|&x| f64::from(x) * f64::from(x)).sum::<f64>().sqrt()
}

/// Frobenius norm of columns `c` of a row-major `[rows, cols]` tensor.
fn cols_norm(t: &HostTensor, c: std::ops::Range<usize>, cols: usize) -> f64 {
    t.data
        .chunks_exact(cols)
        .map(|r| r[c.clone()].iter().map(|&x| f64::from(x) * f64::from(x)).sum::<f64>())
        .sum::<f64>()
        .sqrt()
}

/// Outgoing weight norms: `‖o_:,h‖` per query head and `‖down_:,j‖` per channel.
fn outgoing_norms(config: &LlamaConfig, t: &NamedTensors, layer: usize) -> Result<(Vec<f64>, Vec<f64>)> {
    let (h, hd, f) = (config.hidden_size, config.head_dim(), config.intermediate_size);
    let o = get(t, &layer_name(layer, "self_attn.o_proj"), &[h, config.q_dim()])?;
    let down = get(t, &layer_name(layer, "mlp.down_proj"), &[h, f])?;
    let heads = (0..config.num_attention_heads).map(|q| cols_norm(o, q * hd..(q + 1) * hd, config.q_dim())).collect();
    let channels = (0..f).map(|j| cols_norm(down, j..j + 1, f)).collect();
    Ok((heads, channels))
}

/// Weight-magnitude importance.
pub fn magnitude_scores(config: &LlamaConfig, t: &NamedTensors) -> Result<Scores> {
    let (h, hd, f) = (config.hidden_size, config.head_dim(), config.intermediate_size);
    let rep = config.num_attention_heads / config.num_key_value_heads;
    let mut scores = Scores { heads: Vec::new(), channels: Vec::new() };
    for i in 0..config.num_hidden_layers {
        let (o_norms, down_norms) = outgoing_norms(config, t, i)?;
        let v = get(t, &layer_name(i, "self_attn.v_proj"), &[config.kv_dim(), h])?;
        let gate = get(t, &layer_name(i, "mlp.gate_proj"), &[f, h])?;
        let up = get(t, &layer_name(i, "mlp.up_proj"), &[f, h])?;
        scores.heads.push(
            o_norms.iter().enumerate().map(|(q, o)| o * rows_norm(v, (q / rep) * hd..(q / rep + 1) * hd, h)).collect(),
        );
        scores.channels.push(
            down_norms
                .iter()
                .enumerate()
                .map(|(j, d)| d * rows_norm(gate, j..j + 1, h) * rows_norm(up, j..j + 1, h))
                .collect(),
        );
    }
    Ok(scores)
}

/// Activation importance over calibration `tokens` (windows of `seq_len`, batches of
/// `batch`, at most `max_windows` windows), for `model` on an inference device; the
/// outgoing norms come from `tensors`, the same weights under Hugging Face names.
pub fn activation_scores(
    model: &Llama,
    tensors: &NamedTensors,
    tokens: &[u32],
    seq_len: usize,
    batch: usize,
    max_windows: usize,
    device: &Device,
) -> Result<Scores> {
    let c = &model.config;
    if seq_len == 0 || tokens.len() < seq_len {
        return Err(ModelError::EmptyCorpus { path: "calibration text".into(), needed: Some(seq_len.max(1)) });
    }
    let (layers, heads, hd, f) = (c.num_hidden_layers, c.num_attention_heads, c.head_dim(), c.intermediate_size);
    let mut head_sum = vec![vec![0.0f64; heads]; layers];
    let mut chan_sum = vec![vec![0.0f64; f]; layers];
    let windows: Vec<&[u32]> = tokens.chunks_exact(seq_len).take(max_windows.max(1)).collect();
    let mut positions = 0usize;
    for group in windows.chunks(batch.max(1)) {
        let b = group.len();
        let ids: Vec<i64> = group.iter().flat_map(|w| w.iter().map(|&t| i64::from(t))).collect();
        let input = Tensor::<2, Int>::from_data(TensorData::new(ids, [b, seq_len]), device);
        let mut probe = |layer: usize, site: ProbeSite, a: &Tensor<3>| {
            let sums: Vec<f32> = match site {
                // Per head: the L2 norm of its slice at each position, summed.
                ProbeSite::AttentionHeads => a
                    .clone()
                    .reshape([b * seq_len, heads, hd])
                    .square()
                    .sum_dim(2)
                    .sqrt()
                    .sum_dim(0)
                    .into_data()
                    .try_into_vec::<f32>()
                    .unwrap_or_default(),
                ProbeSite::MlpHidden => a
                    .clone()
                    .abs()
                    .reshape([b * seq_len, f])
                    .sum_dim(0)
                    .into_data()
                    .try_into_vec::<f32>()
                    .unwrap_or_default(),
            };
            let acc = match site {
                ProbeSite::AttentionHeads => &mut head_sum[layer],
                ProbeSite::MlpHidden => &mut chan_sum[layer],
            };
            for (a, s) in acc.iter_mut().zip(sums) {
                *a += f64::from(s);
            }
        };
        model.forward_probed(input, &mut probe);
        positions += b * seq_len;
    }
    let mut scores = Scores { heads: Vec::new(), channels: Vec::new() };
    for i in 0..layers {
        let (o_norms, down_norms) = outgoing_norms(c, tensors, i)?;
        scores.heads.push(head_sum[i].iter().zip(&o_norms).map(|(a, o)| a / positions as f64 * o).collect());
        scores.channels.push(chan_sum[i].iter().zip(&down_norms).map(|(a, d)| a / positions as f64 * d).collect());
    }
    Ok(scores)
}

/// Gradient (first-order Taylor) importance over calibration `tokens` (windows of
/// `seq_len`, batches of `batch`, at most `max_windows` windows). `model` must be on an
/// autodiff device with its weights requiring gradients (as `from_base_tensors` makes
/// them); nothing is updated.
pub fn gradient_scores(
    model: &Llama,
    tokens: &[u32],
    seq_len: usize,
    batch: usize,
    max_windows: usize,
    device: &Device,
) -> Result<Scores> {
    let c = &model.config;
    if !device.is_autodiff() {
        return Err(ModelError::config("device", "gradient importance needs an autodiff device"));
    }
    if seq_len == 0 || tokens.len() < seq_len + 1 {
        return Err(ModelError::EmptyCorpus { path: "calibration text".into(), needed: Some(seq_len + 1) });
    }
    let (layers, heads, hd, f, h) =
        (c.num_hidden_layers, c.num_attention_heads, c.head_dim(), c.intermediate_size, c.hidden_size);
    let mut head_sum = vec![vec![0.0f64; heads]; layers];
    let mut chan_sum = vec![vec![0.0f64; f]; layers];
    let windows: Vec<&[u32]> = tokens.windows(seq_len + 1).step_by(seq_len).take(max_windows.max(1)).collect();
    let mut batches = 0usize;
    for group in windows.chunks(batch.max(1)) {
        let b = group.len();
        let ids = |range: std::ops::Range<usize>| -> Vec<i64> {
            group.iter().flat_map(|w| w[range.clone()].iter().map(|&t| i64::from(t))).collect()
        };
        let x = Tensor::<2, Int>::from_data(TensorData::new(ids(0..seq_len), [b, seq_len]), device);
        let y = Tensor::<2, Int>::from_data(TensorData::new(ids(1..seq_len + 1), [b, seq_len]), device);
        let grads = crate::train::lm_loss(model.forward(x), y).backward();
        // Σ w·g per group; burn's layout is [d_in, d_out].
        let wg = |p: &burn::module::Param<Tensor<2>>| -> Option<Tensor<2>> {
            let w = p.val();
            w.grad(&grads).map(|g| w.inner() * g)
        };
        let host = |t: Tensor<1>| -> Vec<f64> {
            t.into_data().try_into_vec::<f32>().unwrap_or_default().into_iter().map(f64::from).collect()
        };
        for (i, layer) in model.layers.iter().enumerate() {
            let missing = || ModelError::config("model", "its weights do not require gradients");
            // q: [h, heads·hd] → per head; o: [heads·hd, h] → per head.
            let q = wg(&layer.q_proj.weight).ok_or_else(missing)?.reshape([h, heads, hd]).sum_dim(2).sum_dim(0);
            let o = wg(&layer.o_proj.weight).ok_or_else(missing)?.reshape([heads, hd * h]).sum_dim(1);
            let per_head = host(q.reshape([heads]) + o.reshape([heads]));
            // gate, up: [h, f] → per column; down: [f, h] → per row.
            let gate = wg(&layer.gate_proj.weight).ok_or_else(missing)?.sum_dim(0).reshape([f]);
            let up = wg(&layer.up_proj.weight).ok_or_else(missing)?.sum_dim(0).reshape([f]);
            let down = wg(&layer.down_proj.weight).ok_or_else(missing)?.sum_dim(1).reshape([f]);
            let per_channel = host(gate + up + down);
            for (acc, v) in head_sum[i].iter_mut().zip(per_head) {
                *acc += v * v;
            }
            for (acc, v) in chan_sum[i].iter_mut().zip(per_channel) {
                *acc += v * v;
            }
        }
        batches += 1;
    }
    let mean = |v: Vec<Vec<f64>>| v.into_iter().map(|l| l.into_iter().map(|x| x / batches as f64).collect()).collect();
    Ok(Scores { heads: mean(head_sum), channels: mean(chan_sum) })
}

/// Indices of the `keep` largest scores, ascending (ties: lower index kept).
fn top_indices(scores: &[f64], keep: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    order.truncate(keep);
    order.sort_unstable();
    order
}

/// Choose what to keep: the same number of heads (in whole, equal groups) and channels
/// in every layer, the highest-scoring ones.
pub fn plan(config: &LlamaConfig, scores: &Scores, cfg: &PruneConfig) -> Result<PrunePlan> {
    cfg.validate()?;
    config.validate()?;
    let (nh, nkv, f) = (config.num_attention_heads, config.num_key_value_heads, config.intermediate_size);
    if scores.heads.len() != config.num_hidden_layers
        || scores.channels.len() != config.num_hidden_layers
        || scores.heads.iter().any(|s| s.len() != nh)
        || scores.channels.iter().any(|s| s.len() != f)
    {
        return Err(ModelError::config("scores", "do not match the model's shape"));
    }
    let rep = nh / nkv;
    // (groups kept, query heads per group): whole groups, or the same count from each.
    let target = nh as f64 * (1.0 - cfg.head_ratio);
    let mut candidates: Vec<(usize, usize)> = (1..=nkv).map(|g| (g, rep)).collect();
    candidates.extend((1..rep).map(|p| (nkv, p)));
    let &(groups, per_group) = candidates
        .iter()
        .min_by(|a, b| {
            let d = |c: &(usize, usize)| ((c.0 * c.1) as f64 - target).abs();
            d(a).total_cmp(&d(b)).then(b.0.cmp(&a.0))
        })
        .expect("at least one candidate");
    let m = if f.is_multiple_of(cfg.channel_multiple) { cfg.channel_multiple } else { 1 };
    let keep_channels = (((f as f64 * (1.0 - cfg.mlp_ratio)) / m as f64).round() as usize * m).clamp(m.min(f), f);
    let mut layers = Vec::with_capacity(config.num_hidden_layers);
    for (hs, cs) in scores.heads.iter().zip(&scores.channels) {
        let group_scores: Vec<f64> = (0..nkv).map(|g| hs[g * rep..(g + 1) * rep].iter().sum()).collect();
        let kv_heads = top_indices(&group_scores, groups);
        let mut heads = Vec::with_capacity(groups * per_group);
        for &g in &kv_heads {
            heads.extend(top_indices(&hs[g * rep..(g + 1) * rep], per_group).into_iter().map(|j| g * rep + j));
        }
        layers.push(LayerPlan { heads, kv_heads, channels: top_indices(cs, keep_channels) });
    }
    let pruned = LlamaConfig {
        num_attention_heads: groups * per_group,
        num_key_value_heads: groups,
        intermediate_size: keep_channels,
        head_dim: Some(config.head_dim()),
        ..config.clone()
    };
    pruned.validate()?;
    Ok(PrunePlan { layers, config: pruned })
}

/// Rows of `t` (`[_, cols]`) in blocks of `block`: block indices `keep`.
fn take_rows(t: &HostTensor, keep: &[usize], block: usize) -> HostTensor {
    let cols = t.shape[1];
    let mut data = Vec::with_capacity(keep.len() * block * cols);
    for &k in keep {
        data.extend_from_slice(&t.data[k * block * cols..(k + 1) * block * cols]);
    }
    HostTensor { shape: vec![keep.len() * block, cols], data }
}

/// Columns of `t` in blocks of `block`: block indices `keep`.
fn take_cols(t: &HostTensor, keep: &[usize], block: usize) -> HostTensor {
    let cols = t.shape[1];
    let mut data = Vec::with_capacity(t.shape[0] * keep.len() * block);
    for row in t.data.chunks_exact(cols) {
        for &k in keep {
            data.extend_from_slice(&row[k * block..(k + 1) * block]);
        }
    }
    HostTensor { shape: vec![t.shape[0], keep.len() * block], data }
}

/// The pruned weights (Hugging Face names), for `plan.config`.
pub fn apply(config: &LlamaConfig, t: &NamedTensors, plan: &PrunePlan) -> Result<NamedTensors> {
    let (h, hd, f) = (config.hidden_size, config.head_dim(), config.intermediate_size);
    if plan.layers.len() != config.num_hidden_layers {
        return Err(ModelError::config("plan", "has another number of layers than the model"));
    }
    let mut out = t.clone();
    for (i, l) in plan.layers.iter().enumerate() {
        let mut put = |part: &str, x: HostTensor| {
            out.insert(layer_name(i, part), x);
        };
        put(
            "self_attn.q_proj",
            take_rows(get(t, &layer_name(i, "self_attn.q_proj"), &[config.q_dim(), h])?, &l.heads, hd),
        );
        put(
            "self_attn.k_proj",
            take_rows(get(t, &layer_name(i, "self_attn.k_proj"), &[config.kv_dim(), h])?, &l.kv_heads, hd),
        );
        put(
            "self_attn.v_proj",
            take_rows(get(t, &layer_name(i, "self_attn.v_proj"), &[config.kv_dim(), h])?, &l.kv_heads, hd),
        );
        put(
            "self_attn.o_proj",
            take_cols(get(t, &layer_name(i, "self_attn.o_proj"), &[h, config.q_dim()])?, &l.heads, hd),
        );
        put("mlp.gate_proj", take_rows(get(t, &layer_name(i, "mlp.gate_proj"), &[f, h])?, &l.channels, 1));
        put("mlp.up_proj", take_rows(get(t, &layer_name(i, "mlp.up_proj"), &[f, h])?, &l.channels, 1));
        put("mlp.down_proj", take_cols(get(t, &layer_name(i, "mlp.down_proj"), &[h, f])?, &l.channels, 1));
    }
    Ok(out)
}

/// The unpruned weights with the heads and channels `plan` removes set to zero: the
/// output projection's columns of each removed head, the `gate`/`up` rows and `down`
/// columns of each removed channel. Same shapes, same outputs as [`apply`].
pub fn mask(config: &LlamaConfig, t: &NamedTensors, plan: &PrunePlan) -> Result<NamedTensors> {
    let (h, hd, f, qd) = (config.hidden_size, config.head_dim(), config.intermediate_size, config.q_dim());
    let mut out = t.clone();
    for (i, l) in plan.layers.iter().enumerate() {
        let o_name = layer_name(i, "self_attn.o_proj");
        let mut o = get(t, &o_name, &[h, qd])?.clone();
        for q in (0..config.num_attention_heads).filter(|q| !l.heads.contains(q)) {
            o.data.chunks_exact_mut(qd).for_each(|r| r[q * hd..(q + 1) * hd].fill(0.0));
        }
        out.insert(o_name, o);
        let dropped: Vec<usize> = (0..f).filter(|j| !l.channels.contains(j)).collect();
        for part in ["mlp.gate_proj", "mlp.up_proj"] {
            let name = layer_name(i, part);
            let mut w = get(t, &name, &[f, h])?.clone();
            for &j in &dropped {
                w.data[j * h..(j + 1) * h].fill(0.0);
            }
            out.insert(name, w);
        }
        let name = layer_name(i, "mlp.down_proj");
        let mut down = get(t, &name, &[h, f])?.clone();
        down.data.chunks_exact_mut(f).for_each(|r| dropped.iter().for_each(|&j| r[j] = 0.0));
        out.insert(name, down);
    }
    Ok(out)
}

/// Parameters of a configuration's projections, embeddings and norms (see
/// [`LlamaConfig::num_params`]); a convenience for reports.
pub fn describe(before: &LlamaConfig, after: &LlamaConfig) -> String {
    format!(
        "heads {}→{} (kv {}→{}), MLP channels {}→{}, parameters {}→{} ({:+.1}%)",
        before.num_attention_heads,
        after.num_attention_heads,
        before.num_key_value_heads,
        after.num_key_value_heads,
        before.intermediate_size,
        after.intermediate_size,
        before.num_params(),
        after.num_params(),
        100.0 * (after.num_params() as f64 / before.num_params() as f64 - 1.0)
    )
}

/// Check that `path` holds plain f32 weights a pruning can slice.
pub fn require_f32(quantized: bool, path: &Path) -> Result<()> {
    if quantized {
        return Err(ModelError::UnsupportedModel {
            path: path.to_owned(),
            reason: "prune an f32 model (prune first, then quantize)".into(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::{base_tensors, from_base_tensors};
    use crate::cpu_device;

    fn model_and_tensors(config: &LlamaConfig) -> (Llama, NamedTensors) {
        let device = cpu_device();
        let model = Llama::init(config, 5, &device).expect("init");
        let t = base_tensors(&model);
        (model, t)
    }

    fn logits(config: &LlamaConfig, t: &NamedTensors, ids: &[u32]) -> Vec<f32> {
        let device = cpu_device();
        let m = from_base_tensors(config, t, Path::new("test"), &device).expect("model");
        let input = Tensor::<2, Int>::from_data(
            TensorData::new(ids.iter().map(|&x| i64::from(x)).collect::<Vec<_>>(), [1, ids.len()]),
            &device,
        );
        m.forward(input).into_data().try_into_vec::<f32>().expect("f32")
    }

    fn assert_close(a: &[f32], b: &[f32], what: &str) {
        assert_eq!(a.len(), b.len());
        let worst = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
        assert!(worst < 1e-4, "{what}: largest difference {worst}");
    }

    #[test]
    fn a_pruned_model_computes_what_the_masked_model_computes() {
        let ids: Vec<u32> = "To be, or not to be".bytes().map(u32::from).collect();
        // GQA 4:2 (query heads dropped within groups or whole groups), and plain MHA.
        for (heads, kv) in [(4, 2), (4, 4), (8, 2)] {
            let config = LlamaConfig {
                num_attention_heads: heads,
                num_key_value_heads: kv,
                hidden_size: 32,
                ..LlamaConfig::tiny()
            };
            let (_, t) = model_and_tensors(&config);
            let scores = magnitude_scores(&config, &t).expect("scores");
            for ratio in [0.3, 0.5] {
                let cfg = PruneConfig { head_ratio: ratio, mlp_ratio: ratio, channel_multiple: 8 };
                let p = plan(&config, &scores, &cfg).expect("plan");
                assert!(p.config.num_attention_heads < heads, "{heads}:{kv} at {ratio}: {:?}", p.config);
                assert!(p.config.intermediate_size < config.intermediate_size);
                assert!(p.config.num_params() < config.num_params());
                let pruned = apply(&config, &t, &p).expect("apply");
                let masked = mask(&config, &t, &p).expect("mask");
                assert_close(
                    &logits(&p.config, &pruned, &ids),
                    &logits(&config, &masked, &ids),
                    &format!("{heads}:{kv} heads at {ratio}"),
                );
                // And the pruned weights run in the inference engine too.
                let engine = covey_infer::Model::from_tensors(p.config.clone(), &pruned, covey_infer::Precision::F32)
                    .expect("engine");
                let flat: Vec<f32> = engine.logits(&ids).expect("logits").concat();
                assert_close(&flat, &logits(&p.config, &pruned, &ids), "engine against burn");
            }
        }
    }

    #[test]
    fn groups_stay_uniform_and_the_best_heads_and_channels_survive() {
        let config =
            LlamaConfig { num_attention_heads: 8, num_key_value_heads: 2, hidden_size: 32, ..LlamaConfig::tiny() };
        let mut scores = Scores {
            heads: vec![vec![1.0, 9.0, 2.0, 8.0, 7.0, 3.0, 6.0, 0.5]; 2],
            channels: vec![(0..64).map(|j| f64::from(j % 7)).collect(); 2],
        };
        scores.channels[1][0] = 100.0;
        let p = plan(&config, &scores, &PruneConfig { head_ratio: 0.3, mlp_ratio: 0.5, channel_multiple: 1 })
            .expect("plan");
        // 8 heads × 0.7 = 5.6: three of four in each of the two groups (6).
        assert_eq!(p.config.num_attention_heads, 6);
        assert_eq!(p.config.num_key_value_heads, 2);
        assert_eq!(p.layers[0].heads, vec![1, 2, 3, 4, 5, 6]);
        assert_eq!(p.config.intermediate_size, 32);
        assert!(p.layers[1].channels.contains(&0));
        assert!(p.layers[0].channels.iter().all(|&j| j % 7 >= 3), "{:?}", p.layers[0].channels);
        // Plain attention at 30 %: 4 × 0.7 = 2.8 → three heads.
        let mha = LlamaConfig { num_key_value_heads: 4, num_attention_heads: 4, ..config.clone() };
        let s = Scores { heads: vec![vec![3.0, 1.0, 2.0, 4.0]; 2], channels: vec![vec![1.0; 64]; 2] };
        let p = plan(&mha, &s, &PruneConfig::default()).expect("plan");
        assert_eq!(p.layers[0].heads, vec![0, 2, 3]);
        assert_eq!(p.layers[0].kv_heads, vec![0, 2, 3]);
        // Channels round to a multiple of 32: 64 × 0.7 = 44.8 → 32.
        assert_eq!(p.config.intermediate_size, 32);
        let err = plan(&mha, &s, &PruneConfig { head_ratio: 1.0, ..PruneConfig::default() }).expect_err("ratio 1");
        assert!(err.to_string().contains("head_ratio"), "{err}");
    }

    #[test]
    fn activation_scores_see_a_dead_channel_and_a_dead_head() {
        let config = LlamaConfig::tiny();
        let (_, mut t) = model_and_tensors(&config);
        // Channel 5 of layer 0 never fires; query head 1 of layer 1 writes nothing.
        let h = config.hidden_size;
        t.get_mut(&layer_name(0, "mlp.gate_proj")).expect("gate").data[5 * h..6 * h].fill(0.0);
        let (qd, hd) = (config.q_dim(), config.head_dim());
        t.get_mut(&layer_name(1, "self_attn.o_proj"))
            .expect("o")
            .data
            .chunks_exact_mut(qd)
            .for_each(|r| r[hd..2 * hd].fill(0.0));
        let device = cpu_device();
        let model = from_base_tensors(&config, &t, Path::new("test"), &device).expect("model");
        let tokens: Vec<u32> =
            "Now is the winter of our discontent made glorious summer".bytes().map(u32::from).collect();
        let s = activation_scores(&model, &t, &tokens, 16, 2, 8, &device).expect("scores");
        assert_eq!(s.channels[0][5], 0.0);
        assert!(s.channels[0].iter().enumerate().all(|(j, &v)| j == 5 || v > 0.0));
        assert_eq!(s.heads[1][1], 0.0);
        assert!(s.heads[0].iter().all(|&v| v > 0.0));
        let m = magnitude_scores(&config, &t).expect("magnitude");
        assert_eq!(m.channels[0][5], 0.0);
        // Gradients: the dead channel's weights carry no loss change either (w = 0 on
        // its gate row, zero gradient on its up row and down column).
        let ad = device.clone().autodiff();
        let model = from_base_tensors(&config, &t, Path::new("test"), &ad).expect("model");
        let g = gradient_scores(&model, &tokens, 16, 2, 8, &ad).expect("gradient scores");
        assert_eq!(g.channels[0][5], 0.0);
        assert!(g.channels[0].iter().filter(|&&v| v > 0.0).count() >= 60, "{:?}", g.channels[0]);
        assert!(g.heads.iter().flatten().all(|&v| v.is_finite() && v >= 0.0));
        assert!(gradient_scores(&model, &tokens, 16, 2, 8, &device).is_err(), "needs an autodiff device");
    }
}
