//! The speed anchor: training throughput and peak memory of a fixed configuration.

use std::time::Instant;

use serde::Serialize;

use covey_model::config::{LlamaConfig, LoraConfig, LoraTarget};
use covey_model::error::Result;
use covey_model::train::TrainConfig;
use covey_model::{LocalRound, LocalTrainSpec, RoundBase};
use covey_tensors::quant::StoredTensor;

/// Figures printed by `covey-model bench`.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    /// Description of the configuration measured.
    pub config: String,
    /// Base parameters.
    pub params: usize,
    /// Trainable (adapter) parameters.
    pub trainable: usize,
    /// Timed steps.
    pub steps: usize,
    /// Training tokens per second over the timed steps.
    pub tokens_per_second: f64,
    /// Mean milliseconds per optimizer step.
    pub ms_per_step: f64,
    /// Peak resident set size of the process, MiB (Linux only).
    pub peak_rss_mib: Option<f64>,
    /// Resident set size when training starts (model loaded), MiB (Linux only).
    pub rss_before_training_mib: Option<f64>,
}

/// Peak resident set size of this process in MiB (`VmHWM`), where the OS reports it.
pub fn peak_rss_mib() -> Option<f64> {
    status_mib("VmHWM:")
}

/// Resident set size of this process now, MiB (`VmRSS`).
pub fn rss_mib() -> Option<f64> {
    status_mib("VmRSS:")
}

fn status_mib(key: &str) -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(key))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// Which trainer runs the benchmark.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Engine {
    /// `covey-qlora`'s hand-written trainer: what agents, `covey-sim` and `finetune` run.
    Covey,
    /// burn's autodiff on the f32 weights: the reference.
    Burn,
}

/// How a benchmark runs: timed steps, warm-up steps, threads, MiB of activations kept
/// between the passes, and the trainer.
#[derive(Debug, Clone, Copy)]
pub struct BenchRun {
    /// Timed optimizer steps.
    pub steps: usize,
    /// Untimed steps before them.
    pub warmup: usize,
    /// Training threads.
    pub threads: usize,
    /// `TrainConfig::activation_memory_mib`.
    pub keep_mib: usize,
    /// Which trainer.
    pub engine: Engine,
    /// Example-level DP-SGD (per-example clipping and noise), covey trainer only.
    pub example_dp: Option<covey_model::ExampleDp>,
}

/// Example-level DP-SGD's noise, as the agent draws it (covey-privacy's snapped
/// Gaussian from an OS-keyed ChaCha20 stream).
struct Noise(covey_privacy::noise::SecureRng);

impl covey_model::NoiseSource for Noise {
    fn add_gaussian(&mut self, values: &mut [f32], std: f64) {
        covey_privacy::noise::add_snapped_gaussian(values, std, &mut self.0);
    }
}

/// LoRA fine-tuning of the fixed configuration: hidden 256, 4 layers, 4 heads,
/// intermediate 688, byte vocabulary, sequence 128, batch 8, LoRA rank 8 on q and v,
/// base frozen (f32), AdamW, on `threads` threads. `warmup` steps run before `steps`
/// timed ones.
pub fn lora_training(run: BenchRun) -> Result<BenchReport> {
    let BenchRun { threads, keep_mib, engine, .. } = run;
    let config = LlamaConfig::default();
    let weights = covey_infer::random_tensors(&config, 0);
    let base = weights.iter().map(|(n, t)| (n.clone(), StoredTensor::F32(t.clone()))).collect();
    drop(weights);
    // Deterministic pseudo-text: the speed does not depend on the bytes.
    let text: String =
        (0..200_000u32).map(|i| char::from(b'a' + ((i.wrapping_mul(2_654_435_761) >> 24) % 26) as u8)).collect();
    let line = format!(
        "hidden 256, 4 layers, 4 heads, intermediate 688, vocab 256, seq 128, batch 8, LoRA r8 on q,v, AdamW, {threads} thread(s), {keep_mib} MiB of activations kept, {engine:?} trainer{}",
        dp_line(run.example_dp)
    );
    timed_round(&config, base, &covey_model::Tokenizer::Bytes, &text, 8, run, line)
}

/// What [`lora_real`] fine-tunes on top of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum BaseWeights {
    /// f32 base (plain LoRA).
    F32,
    /// int8 base (QLoRA, 8-bit): what a coordinator releases by default.
    Int8,
    /// int4 base (QLoRA, group-wise 4-bit).
    Int4,
}

/// LoRA fine-tuning of a real model (a GGUF file or model directory) as an agent's
/// local round runs it: the base as a release stores it (`base`), sequence 128, batch 4,
/// rank 8 on q and v, AdamW, on `text` tokenized by the model's own tokenizer. The peak
/// RSS is the whole process's, loading included.
pub fn lora_real(model_path: &std::path::Path, text: &str, base: BaseWeights, run: BenchRun) -> Result<BenchReport> {
    let BenchRun { threads, keep_mib, engine, .. } = run;
    let loaded = covey_model::artifact::LoadedModel::open(model_path)?;
    let config = loaded.config.clone();
    let tokenizer = loaded.tokenizer.clone();
    // One tensor at a time, so that no f32 copy of the whole model is ever made.
    let mut stored = std::collections::BTreeMap::new();
    for (name, t) in loaded.tensors {
        let quantize_error = |e| quantize_error(&name, e);
        let t = match (base, t) {
            (_, t) if t.shape().len() == 1 => StoredTensor::F32(t.to_f32()),
            (BaseWeights::F32, t) => StoredTensor::F32(t.to_f32()),
            (BaseWeights::Int8, StoredTensor::Int8(q)) => StoredTensor::Int8(q),
            (BaseWeights::Int4, StoredTensor::Int4(q)) => StoredTensor::Int4(q),
            (BaseWeights::Int8, t) => {
                StoredTensor::Int8(covey_tensors::quant::Int8Tensor::quantize(&t.to_f32()).map_err(quantize_error)?)
            }
            (BaseWeights::Int4, t) => {
                StoredTensor::Int4(covey_tensors::quant::Int4Tensor::quantize(&t.to_f32()).map_err(quantize_error)?)
            }
        };
        stored.insert(name, t);
    }
    let line = format!(
        "{}, {base:?} base, seq 128, batch 4, LoRA r8 on q,v, AdamW, {threads} thread(s), {keep_mib} MiB of activations kept, {engine:?} trainer{}",
        model_path.display(),
        dp_line(run.example_dp)
    );
    timed_round(&config, stored, &tokenizer, text, 4, run, line)
}

/// One local round of `warmup + steps` steps, as an agent runs it; the timed steps are
/// those after the warm-up.
#[allow(clippy::too_many_arguments)]
fn timed_round(
    config: &LlamaConfig,
    base: std::collections::BTreeMap<String, StoredTensor>,
    tokenizer: &covey_model::Tokenizer,
    text: &str,
    batch_size: usize,
    run: BenchRun,
    line: String,
) -> Result<BenchReport> {
    let BenchRun { steps, warmup, threads, keep_mib, engine, example_dp } = run;
    let lora = LoraConfig {
        rank: 8,
        alpha: 16.0,
        targets: vec![LoraTarget::Q, LoraTarget::V],
        ffa: true,
        ..LoraConfig::default()
    };
    let params = config.num_params();
    // `frozen_a` reads only the names and input widths: one-row stand-ins suffice.
    let shapes: covey_model::NamedTensors = base
        .iter()
        .map(|(n, t)| (n.clone(), covey_model::HostTensor::zeros(&t.shape()[t.shape().len().saturating_sub(1)..])))
        .map(|(n, t)| {
            if t.shape.len() == 1 && !n.contains("norm") {
                (n, covey_model::HostTensor::zeros(&[1, t.shape[0]]))
            } else {
                (n, t)
            }
        })
        .collect();
    let a = covey_tensors::lora::frozen_a(&shapes, lora.rank, &lora.targets, 0);
    drop(shapes);
    let trainable = a
        .iter()
        .map(|(n, t)| {
            let target = lora.targets.iter().copied().find(|x| n.contains(x.hf_name())).unwrap_or(LoraTarget::Q);
            config.lora_dims(target).1 * t.shape[0]
        })
        .sum();
    let spec = LocalTrainSpec {
        lora,
        train: TrainConfig {
            steps: warmup + steps,
            batch_size,
            seq_len: 128,
            warmup_steps: 1,
            threads,
            lr: 1e-4,
            activation_memory_mib: keep_mib,
            ..TrainConfig::default()
        },
        proximal_mu: 0.0,
        checkpoint_every: 1,
        example_dp,
    };
    let corpus = [text.to_string()];
    let round = LocalRound {
        config,
        base: RoundBase::Stored(base),
        adapter: None,
        a: &a,
        tokenizer,
        corpus: &corpus,
        chats: &[],
        chat_format: None,
    };
    let rss_before_training_mib = rss_mib();
    let mut marks = Vec::with_capacity(warmup + steps + 1);
    let start = Instant::now();
    let on_step = |_: covey_model::RoundProgress| marks.push(Instant::now());
    let device = covey_model::cpu_device();
    match (engine, example_dp) {
        (Engine::Covey, None) => covey_model::train_local_adapter(round, &spec, &device, None, on_step)?,
        (Engine::Covey, Some(_)) => {
            let rng = covey_privacy::noise::SecureRng::from_os()
                .map_err(|e| covey_model::ModelError::config("example_dp", e.to_string()))?;
            covey_model::train_local_adapter_private(round, &spec, None, on_step, &mut Noise(rng))?
        }
        (Engine::Burn, _) => covey_model::train_local_adapter_burn(round, &spec, &device, None, on_step)?,
    };
    let from = if warmup == 0 { start } else { marks[warmup - 1] };
    let secs = marks.last().map_or(0.0, |m| m.duration_since(from).as_secs_f64());
    Ok(BenchReport {
        config: line,
        params,
        trainable,
        steps,
        tokens_per_second: (steps * batch_size * 128) as f64 / secs,
        ms_per_step: secs * 1000.0 / steps as f64,
        peak_rss_mib: peak_rss_mib(),
        rss_before_training_mib,
    })
}

fn quantize_error(name: &str, e: covey_tensors::TensorError) -> covey_model::ModelError {
    covey_model::ModelError::config("base", format!("cannot quantize `{name}`: {e}"))
}

fn dp_line(dp: Option<covey_model::ExampleDp>) -> String {
    dp.map(|d| format!(", example-level DP-SGD (clip {}, noise multiplier {})", d.clip, d.noise_multiplier))
        .unwrap_or_default()
}
