//! The speed anchor: training throughput and peak memory of a fixed configuration.

use std::time::Instant;

use serde::Serialize;

use covey_model::config::{LlamaConfig, LoraConfig, LoraTarget};
use covey_model::data::Batcher;
use covey_model::error::Result;
use covey_model::llama::Llama;
use covey_model::train::{TrainConfig, train};

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
}

/// Peak resident set size of this process in MiB (`VmHWM`), where the OS reports it.
pub fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// LoRA fine-tuning of the fixed configuration: hidden 256, 4 layers, 4 heads,
/// intermediate 688, byte vocabulary, sequence 128, batch 8, LoRA rank 8 on q and v,
/// base frozen, AdamW. `warmup` steps are run before `steps` timed ones; each batch
/// is split over `threads` data-parallel shards.
pub fn lora_training(steps: usize, warmup: usize, threads: usize) -> Result<BenchReport> {
    let device = covey_model::cpu_device().autodiff();
    let config = LlamaConfig::default();
    let lora =
        LoraConfig { rank: 8, alpha: 16.0, targets: vec![LoraTarget::Q, LoraTarget::V], ..LoraConfig::default() };
    let model = Llama::init(&config, 0, &device)?.with_lora(&lora, &device)?;
    let trainable = covey_model::checkpoint::adapter_tensors(&model)?.values().map(|t| t.data.len()).sum();
    // Deterministic pseudo-text: the speed does not depend on the bytes.
    let tokens: Vec<u32> = (0..200_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) % 256).collect();
    let mut batcher = Batcher::new(tokens, 128, 0, std::path::Path::new("bench"))?;
    let tc = TrainConfig { batch_size: 8, seq_len: 128, warmup_steps: 1, threads, ..TrainConfig::default() };
    let config_line = format!(
        "hidden 256, 4 layers, 4 heads, intermediate 688, vocab 256, seq 128, batch 8, LoRA r8 on q,v, AdamW, {threads} thread(s)"
    );
    timed_training(model, &mut batcher, tc, steps, warmup, &device, config_line, config.num_params(), trainable)
}

/// Run `warmup` untimed steps (then reset the peak RSS), then `steps` timed ones.
#[allow(clippy::too_many_arguments)]
fn timed_training(
    model: Llama,
    batcher: &mut Batcher,
    tc: TrainConfig,
    steps: usize,
    warmup: usize,
    device: &burn::tensor::Device,
    config: String,
    params: usize,
    trainable: usize,
) -> Result<BenchReport> {
    let warm = TrainConfig { steps: warmup.max(1), ..tc.clone() };
    reset_peak_rss();
    let (model, _) = train(model, batcher, &warm, device, |_, _| {})?;
    let timed = TrainConfig { steps, ..tc };
    let start = Instant::now();
    let (_, report) = train(model, batcher, &timed, device, |_, _| {})?;
    let secs = start.elapsed().as_secs_f64();
    Ok(BenchReport {
        config,
        params,
        trainable,
        steps,
        tokens_per_second: report.tokens as f64 / secs,
        ms_per_step: secs * 1000.0 / steps as f64,
        peak_rss_mib: peak_rss_mib(),
    })
}

/// Reset the peak resident set size (`VmHWM`) so that a later [`peak_rss_mib`] measures
/// only what follows (Linux ≥ 4.0; a no-op elsewhere).
pub fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// What [`lora_real`] fine-tunes on top of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum BaseWeights {
    /// f32 base (plain LoRA).
    F32,
    /// int8 base (QLoRA, 8-bit).
    Int8,
    /// packed int4 base (QLoRA).
    Int4,
}

/// LoRA fine-tuning of a real model (a GGUF file or model directory): sequence 128,
/// batch 4, rank 8 on q and v, AdamW, on Shakespeare text tokenized by the model's own
/// tokenizer. Peak RSS is reset after loading, so it is the training footprint. With
/// `checkpointing`, burn recomputes memory-bound activations in the backward pass.
pub fn lora_real(
    model_path: &std::path::Path,
    text: &str,
    base: BaseWeights,
    steps: usize,
    warmup: usize,
    threads: usize,
    checkpointing: bool,
) -> Result<BenchReport> {
    let device = covey_model::cpu_device().autodiff();
    let device = if checkpointing { device.gradient_checkpointing() } else { device };
    let (config, tokens, llama) = {
        let loaded = covey_model::artifact::LoadedModel::open(model_path)?;
        let tokens = loaded.tokenizer.encode(text)?;
        let tensors = loaded.f32_tensors();
        let config = loaded.config.clone();
        drop(loaded);
        let llama = covey_model::checkpoint::from_base_tensors(&config, &tensors, model_path, &device)?;
        (llama.config.clone(), tokens, llama)
    };
    let lora =
        LoraConfig { rank: 8, alpha: 16.0, targets: vec![LoraTarget::Q, LoraTarget::V], ..LoraConfig::default() };
    let mut model = llama.with_lora(&lora, &device)?;
    model = match base {
        BaseWeights::F32 => model,
        BaseWeights::Int8 => model.quantize_base(8)?,
        BaseWeights::Int4 => model.quantize_base(4)?,
    };
    let trainable = covey_model::checkpoint::adapter_tensors(&model)?.values().map(|t| t.data.len()).sum();
    let mut batcher = Batcher::new(tokens, 128, 0, model_path)?;
    let tc = TrainConfig { batch_size: 4, seq_len: 128, warmup_steps: 1, threads, lr: 1e-4, ..TrainConfig::default() };
    let config_line = format!(
        "{}, {base:?} base, seq 128, batch 4, LoRA r8 on q,v, AdamW, {threads} thread(s){}",
        model_path.display(),
        if checkpointing { ", gradient checkpointing" } else { "" }
    );
    timed_training(model, &mut batcher, tc, steps, warmup, &device, config_line, config.num_params(), trainable)
}
