//! The training loop: AdamW, linear warm-up then cosine decay, clipping by the global
//! gradient norm, gradient accumulation, seeded batches. Works for full pretraining
//! and for LoRA fine-tuning alike: only parameters that require gradients move.

use std::time::Instant;

use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::{AdamWConfig, GradientsAccumulator, GradientsParams};
use burn::tensor::activation::log_softmax;
use burn::tensor::{Device, Int, Tensor};
use serde::{Deserialize, Serialize};

pub use crate::batch::{Batch, BatchSource};
use crate::distill::{DistillLoss, distillation_loss};
use crate::error::{ModelError, Result};
use crate::llama::Llama;

/// AdamW's first-moment decay (every training loop of the crate).
pub(crate) const ADAM_BETA_1: f32 = 0.9;
/// AdamW's second-moment decay.
pub(crate) const ADAM_BETA_2: f32 = 0.95;
/// AdamW's epsilon.
pub(crate) const ADAM_EPSILON: f32 = 1e-8;

/// Hyper-parameters of a training run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// Optimizer steps. Default 200.
    pub steps: usize,
    /// Sequences per micro-batch. Default 8.
    pub batch_size: usize,
    /// Tokens per sequence. Default 128.
    pub seq_len: usize,
    /// Micro-batches per optimizer step. Default 1.
    pub grad_accum: usize,
    /// Peak learning rate. Default 3e-3.
    pub lr: f64,
    /// Final learning rate as a fraction of the peak. Default 0.1.
    pub min_lr_ratio: f64,
    /// Linear warm-up steps. Default 20.
    pub warmup_steps: usize,
    /// AdamW decoupled weight decay. Default 0.01.
    pub weight_decay: f64,
    /// Clip the global gradient L2 norm to this value; `None` disables. Default 1.0.
    pub max_grad_norm: Option<f64>,
    /// Seed of batch sampling (and of dropout). Default 0.
    pub seed: u64,
    /// Data-parallel shards per micro-batch, each run on its own thread with its own
    /// autodiff graph (burn's CPU kernels are mostly single-threaded, so two shards keep
    /// two cores busy). Default 1.
    #[serde(default = "one")]
    pub threads: usize,
    /// LoRA rounds (covey-qlora's trainer): MiB of layer activations that may stay from
    /// the forward to the backward pass instead of being recomputed. More is faster (a
    /// layer kept costs two passes instead of three); 0 recomputes every layer, the
    /// least memory. Default 64.
    #[serde(default = "default_activation_memory_mib")]
    pub activation_memory_mib: usize,
}

fn one() -> usize {
    1
}

fn default_activation_memory_mib() -> usize {
    64
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            steps: 200,
            batch_size: 8,
            seq_len: 128,
            grad_accum: 1,
            lr: 3e-3,
            min_lr_ratio: 0.1,
            warmup_steps: 20,
            weight_decay: 0.01,
            max_grad_norm: Some(1.0),
            seed: 0,
            threads: 1,
            activation_memory_mib: default_activation_memory_mib(),
        }
    }
}

impl TrainConfig {
    /// Check that every value is possible.
    pub fn validate(&self) -> Result<()> {
        for (field, v) in [
            ("steps", self.steps),
            ("batch_size", self.batch_size),
            ("seq_len", self.seq_len),
            ("grad_accum", self.grad_accum),
        ] {
            if v == 0 {
                return Err(ModelError::config(field, "must be at least 1"));
            }
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return Err(ModelError::config("lr", format!("{} is not a positive number", self.lr)));
        }
        if !(0.0..=1.0).contains(&self.min_lr_ratio) {
            return Err(ModelError::config("min_lr_ratio", format!("{} is not in [0, 1]", self.min_lr_ratio)));
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return Err(ModelError::config("weight_decay", format!("{} is negative", self.weight_decay)));
        }
        if let Some(c) = self.max_grad_norm
            && !(c.is_finite() && c > 0.0)
        {
            return Err(ModelError::config("max_grad_norm", format!("{c} is not a positive number")));
        }
        Ok(())
    }

    /// Learning rate at optimizer step `step` (0-based): linear warm-up to `lr`, then
    /// cosine decay to `lr · min_lr_ratio` at the last step.
    pub fn lr_at(&self, step: usize) -> f64 {
        if step < self.warmup_steps {
            return self.lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let span = self.steps.saturating_sub(self.warmup_steps).max(1) as f64;
        let progress = ((step - self.warmup_steps) as f64 / span).min(1.0);
        let min = self.lr * self.min_lr_ratio;
        min + 0.5 * (self.lr - min) * (1.0 + (std::f64::consts::PI * progress).cos())
    }
}

/// Mean next-token cross-entropy (nats) of `logits: [b, t, v]` against `targets: [b, t]`.
pub fn lm_loss(logits: Tensor<3>, targets: Tensor<2, Int>) -> Tensor<1> {
    let [b, t, v] = logits.dims();
    let logp = log_softmax(logits.reshape([b * t, v]), 1);
    logp.gather(1, targets.reshape([b * t, 1])).neg().mean()
}

/// [`lm_loss`] with per-target `weights` `[batch, seq]`: the mean of weight × NLL (with
/// weights averaging 1 over the batch, the mean NLL of the weighted targets).
pub fn weighted_lm_loss(logits: Tensor<3>, targets: Tensor<2, Int>, weights: Tensor<2>) -> Tensor<1> {
    let [b, t, v] = logits.dims();
    let logp = log_softmax(logits.reshape([b * t, v]), 1);
    (logp.gather(1, targets.reshape([b * t, 1])).neg() * weights.reshape([b * t, 1])).mean()
}

struct SquaredNorm<'a> {
    grads: &'a GradientsParams,
    sum: Option<Tensor<1>>,
}

impl ModuleVisitor for SquaredNorm<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if let Some(g) = self.grads.get::<D>(param.id) {
            let s = g.square().sum();
            self.sum = Some(match self.sum.take() {
                None => s,
                Some(acc) => acc + s,
            });
        }
    }
}

struct Rescale<'a> {
    grads: &'a mut GradientsParams,
    factor: f64,
}

impl ModuleVisitor for Rescale<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if let Some(g) = self.grads.remove::<D>(param.id) {
            self.grads.register(param.id, g.mul_scalar(self.factor));
        }
    }
}

/// The L2 norm of all gradients of `model` taken together.
pub fn global_grad_norm(model: &Llama, grads: &GradientsParams) -> f64 {
    let mut v = SquaredNorm { grads, sum: None };
    model.visit(&mut v);
    v.sum.map_or(0.0, |s| f64::from(s.into_scalar::<f32>()).sqrt())
}

/// Scale every gradient by `factor`.
pub fn scale_grads(model: &Llama, grads: &mut GradientsParams, factor: f64) {
    let mut v = Rescale { grads, factor };
    model.visit(&mut v);
}

/// Rescale the gradients so that their global L2 norm is at most `max_norm`;
/// returns the norm before clipping.
pub fn clip_global_norm(model: &Llama, grads: &mut GradientsParams, max_norm: f64) -> f64 {
    let norm = global_grad_norm(model, grads);
    if norm > max_norm {
        scale_grads(model, grads, max_norm / norm);
    }
    norm
}

/// What a step reports.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct StepStats {
    /// 0-based optimizer step.
    pub step: usize,
    /// Mean loss over the step's micro-batches (nats per token).
    pub loss: f32,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Learning rate used.
    pub lr: f64,
}

/// Summary of a training run.
#[derive(Debug, Clone, Serialize)]
pub struct TrainReport {
    /// Per-step statistics.
    pub steps: Vec<StepStats>,
    /// Tokens processed.
    pub tokens: usize,
    /// Wall-clock seconds.
    pub seconds: f64,
}

impl TrainReport {
    /// Training throughput.
    pub fn tokens_per_second(&self) -> f64 {
        self.tokens as f64 / self.seconds.max(1e-9)
    }
}

/// Where a training run starts and what it adds to the loss, beyond [`TrainConfig`].
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct LoopOptions {
    /// First optimizer step to run (0-based); the learning-rate schedule continues from
    /// it. The batcher must already be positioned there.
    pub start_step: usize,
    /// FedProx coefficient on the LoRA `B` factors: `(mu / 2) · Σ ||B||²` is added to the
    /// objective (not to the reported loss). 0 disables.
    pub proximal_mu: f64,
    /// Distillation: the loss mixes the teacher's softened distribution with the
    /// targets (batches must then carry teacher logits). `None`: plain cross-entropy.
    pub distill: Option<DistillLoss>,
}

/// `(mu / 2) · Σ ||B||²` over every LoRA `B` factor of `model`; `None` when `mu` is 0 or
/// the model has no adapters.
fn proximal_term(model: &Llama, mu: f64) -> Option<Tensor<1>> {
    if mu <= 0.0 {
        return None;
    }
    let mut sum: Option<Tensor<1>> = None;
    for layer in &model.layers {
        for t in crate::config::LoraTarget::ALL {
            if let Some(ad) = &layer.proj(t).lora {
                let s = ad.b.val().square().sum();
                sum = Some(match sum.take() {
                    None => s,
                    Some(acc) => acc + s,
                });
            }
        }
    }
    sum.map(|s| s.mul_scalar(mu / 2.0))
}

/// Loss (weighted by the shard's share of the batch) and gradients of one micro-batch,
/// split into `config.threads` shards computed in parallel.
fn micro_batch(
    model: &Llama,
    data: Batch,
    config: &TrainConfig,
    options: &LoopOptions,
    device: &Device,
) -> Result<Vec<(f32, GradientsParams)>> {
    let batch = config.batch_size;
    let shards = config.threads.min(batch).max(1);
    let proximal_mu = options.proximal_mu;
    let run = |m: &Llama, part: Batch, weight: f64| {
        let logits = m.forward(part.inputs);
        let loss = match (&options.distill, &part.teacher) {
            (Some(d), Some(teacher)) => distillation_loss(logits, teacher, part.targets, d),
            _ => match part.weights {
                Some(w) => weighted_lm_loss(logits, part.targets, w),
                None => lm_loss(logits, part.targets),
            },
        };
        // Shards weigh `rows / batch` and micro-batches `1 / grad_accum`: the proximal
        // term, added to every shard's objective, counts once per optimizer step.
        let objective = match proximal_term(m, proximal_mu) {
            Some(p) => loss.clone() + p,
            None => loss.clone(),
        };
        let scaled = objective.mul_scalar(weight / config.grad_accum as f64);
        let grads = GradientsParams::from_grads(scaled.backward(), m);
        (loss.into_scalar::<f32>() * weight as f32, grads)
    };
    if options.distill.is_some_and(|d| d.alpha > 0.0) && data.teacher.is_none() {
        return Err(ModelError::config("distill", "a distillation run got a batch without teacher logits"));
    }
    if shards == 1 {
        return Ok(vec![run(model, data, 1.0)]);
    }
    let mut parts = Vec::with_capacity(shards);
    let mut start = 0;
    for s in 0..shards {
        let rows = batch / shards + usize::from(s < batch % shards);
        let part = Batch {
            inputs: data.inputs.clone().narrow(0, start, rows),
            targets: data.targets.clone().narrow(0, start, rows),
            weights: data.weights.as_ref().map(|w| w.clone().narrow(0, start, rows)),
            teacher: data.teacher.as_ref().map(|t| t.narrow(start, rows)),
        };
        parts.push((part, rows));
        start += rows;
    }
    std::thread::scope(|scope| {
        let handles: Vec<_> = parts
            .into_iter()
            .map(|(part, rows)| {
                // A fork has its own autodiff graph and keeps the parameter ids, so the
                // shards' gradients add up by id.
                let m = model.clone().fork(device);
                let run = &run;
                scope.spawn(move || run(&m, part, rows as f64 / batch as f64))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().map_err(|_| ModelError::config("threads", "a training thread panicked")))
            .collect()
    })
}

/// Train `model` (on an autodiff device) for `config.steps` optimizer steps over batches
/// drawn from `batcher`. Only parameters that require gradients change.
///
/// `on_step` sees every step's statistics and the model: it is also how a caller reports
/// progress (the command line draws a bar from it); the library draws nothing.
pub fn train(
    model: Llama,
    batcher: &mut dyn BatchSource,
    config: &TrainConfig,
    device: &Device,
    on_step: impl FnMut(&StepStats, &Llama),
) -> Result<(Llama, TrainReport)> {
    train_with(model, batcher, config, &LoopOptions::default(), device, on_step)
}

/// [`train`] with a distillation objective over batches that carry teacher logits.
pub fn train_distill(
    model: Llama,
    source: &mut dyn BatchSource,
    config: &TrainConfig,
    loss: DistillLoss,
    device: &Device,
    on_step: impl FnMut(&StepStats, &Llama),
) -> Result<(Llama, TrainReport)> {
    loss.validate()?;
    let options = LoopOptions { distill: Some(loss), ..LoopOptions::default() };
    train_with(model, source, config, &options, device, on_step)
}

/// [`train`] from `options.start_step` (steps `start_step..config.steps`), with an
/// optional proximal term on the LoRA `B` factors.
pub(crate) fn train_with(
    mut model: Llama,
    batcher: &mut dyn BatchSource,
    config: &TrainConfig,
    options: &LoopOptions,
    device: &Device,
    mut on_step: impl FnMut(&StepStats, &Llama),
) -> Result<(Llama, TrainReport)> {
    config.validate()?;
    if options.start_step >= config.steps {
        return Err(ModelError::config(
            "steps",
            format!("start step {} leaves nothing of {} steps to train", options.start_step, config.steps),
        ));
    }
    if !(options.proximal_mu.is_finite() && options.proximal_mu >= 0.0) {
        return Err(ModelError::config("proximal_mu", format!("{} is not a number >= 0", options.proximal_mu)));
    }
    if !device.is_autodiff() {
        return Err(ModelError::config("device", "training needs an autodiff device (Device::autodiff)"));
    }
    device.seed(config.seed);
    let mut optim = AdamWConfig::new()
        .with_beta_1(ADAM_BETA_1)
        .with_beta_2(ADAM_BETA_2)
        .with_epsilon(ADAM_EPSILON)
        .with_weight_decay(config.weight_decay as f32)
        .init();
    let start = Instant::now();
    let mut stats = Vec::with_capacity(config.steps - options.start_step);
    let mut tokens = 0usize;
    for step in options.start_step..config.steps {
        let mut accumulator = GradientsAccumulator::<Llama>::new();
        let mut loss_sum = 0.0f32;
        for _ in 0..config.grad_accum {
            let data = batcher.next_batch(config.batch_size, device)?;
            for (loss, grads) in micro_batch(&model, data, config, options, device)? {
                accumulator.accumulate(&model, grads);
                loss_sum += loss;
            }
            tokens += config.batch_size * config.seq_len;
        }
        let mut grads = accumulator.grads();
        let grad_norm = match config.max_grad_norm {
            Some(c) => clip_global_norm(&model, &mut grads, c),
            None => global_grad_norm(&model, &grads),
        };
        let lr = config.lr_at(step);
        model = optim.step(lr, model, grads);
        let s = StepStats { step, loss: loss_sum / config.grad_accum as f32, grad_norm, lr };
        if !s.loss.is_finite() {
            return Err(ModelError::config("lr", format!("training diverged at step {step} (loss {})", s.loss)));
        }
        on_step(&s, &model);
        stats.push(s);
    }
    Ok((model, TrainReport { steps: stats, tokens, seconds: start.elapsed().as_secs_f64() }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_warms_up_then_decays_to_the_floor() {
        let c = TrainConfig { steps: 100, warmup_steps: 10, lr: 1.0, min_lr_ratio: 0.1, ..TrainConfig::default() };
        assert!((c.lr_at(0) - 0.1).abs() < 1e-12);
        assert!((c.lr_at(9) - 1.0).abs() < 1e-12);
        assert!((c.lr_at(10) - 1.0).abs() < 1e-12);
        assert!((c.lr_at(100) - 0.1).abs() < 1e-12);
        let mid = c.lr_at(55);
        assert!((mid - 0.55).abs() < 1e-9, "{mid}");
        for s in 10..100 {
            assert!(c.lr_at(s + 1) <= c.lr_at(s) + 1e-12);
        }
    }

    #[test]
    fn impossible_training_values_are_rejected() {
        let c = TrainConfig { lr: -1.0, ..TrainConfig::default() };
        assert!(c.validate().expect_err("negative lr").to_string().contains("lr"));
        let c = TrainConfig { batch_size: 0, ..TrainConfig::default() };
        assert!(c.validate().expect_err("zero batch").to_string().contains("batch_size"));
    }
}
