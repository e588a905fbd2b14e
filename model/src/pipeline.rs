//! The workflows behind the command line: pretraining on a corpus with held-out
//! documents, and LoRA fine-tuning with a before/after evaluation.

use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::tensor::Device;
use serde::Serialize;

use crate::checkpoint;
use crate::config::{LlamaConfig, LoraConfig};
use crate::data::{self, Batcher, Document};
use crate::error::{ModelError, Result};
use crate::eval::{EvalMetrics, evaluate};
use crate::llama::Llama;
use crate::tokenizer::Tokenizer;
use crate::train::{TrainConfig, TrainReport, train};

/// Settings of a pretraining run.
#[derive(Debug, Clone)]
pub struct PretrainOptions {
    /// Corpus: a file or a directory of `.txt` / `.jsonl`.
    pub data: PathBuf,
    /// Output model directory.
    pub out: PathBuf,
    /// Whole documents held out for evaluation (chosen by a seeded shuffle among
    /// documents with at least 50 speeches, i.e. plays).
    pub holdout: usize,
    /// Model shape.
    pub model: LlamaConfig,
    /// Training hyper-parameters.
    pub train: TrainConfig,
    /// Cap on held-out tokens scored.
    pub eval_tokens: usize,
    /// Show progress bars.
    pub progress: bool,
}

/// What a pretraining run produced.
#[derive(Debug, Clone, Serialize)]
pub struct PretrainResult {
    /// Names of the held-out documents.
    pub holdout: Vec<String>,
    /// Parameters of the model.
    pub params: usize,
    /// Training tokens seen.
    pub train_tokens: usize,
    /// Training wall-clock seconds.
    pub train_seconds: f64,
    /// Mean loss of the last 20 steps.
    pub final_train_loss: f64,
    /// Metrics on the held-out documents.
    pub heldout: EvalMetrics,
}

fn join(docs: &[Document]) -> String {
    docs.iter().map(|d| d.text.as_str()).collect::<Vec<_>>().join("\n\n")
}

fn bytes_per_token(text: &str, tokens: &[u32]) -> f64 {
    text.len() as f64 / tokens.len().max(1) as f64
}

/// Pretrain a byte-level model from scratch, hold out whole documents, save it to
/// `opts.out` (with `metrics.json`) and report held-out metrics.
pub fn pretrain(opts: &PretrainOptions, device: &Device) -> Result<PretrainResult> {
    opts.model.validate()?;
    opts.train.validate()?;
    let tokenizer = Tokenizer::Bytes;
    if opts.model.vocab_size != tokenizer.vocab_size() {
        return Err(ModelError::config("vocab_size", "a byte-level model needs a vocabulary of 256"));
    }
    let docs = data::load_corpus(&opts.data)?;
    let (train_docs, held) =
        data::holdout_documents(docs, opts.holdout, opts.train.seed, |d| data::speeches(&d.text).len() >= 50);
    if train_docs.is_empty() {
        return Err(ModelError::EmptyCorpus { path: opts.data.clone(), needed: None });
    }
    let train_text = join(&train_docs);
    let held_text = join(&held);
    tracing::info!(train_docs = train_docs.len(), held_out = held.len(), bytes = train_text.len(), "corpus loaded");
    let ad = device.clone().autodiff();
    let model = Llama::init(&opts.model, opts.train.seed, &ad)?;
    let mut batcher = Batcher::new(tokenizer.encode(&train_text)?, opts.train.seq_len, opts.train.seed, &opts.data)?;
    let (model, report) = train(model, &mut batcher, &opts.train, &ad, opts.progress, |_, _| {})?;
    let model = model.valid();
    checkpoint::save_model(&model, &tokenizer, &opts.out)?;
    let eval_text = if held_text.is_empty() { train_text.clone() } else { held_text };
    let eval_tokens = tokenizer.encode(&eval_text)?;
    let heldout = evaluate(
        &model,
        &eval_tokens,
        opts.train.seq_len,
        opts.train.batch_size,
        bytes_per_token(&eval_text, &eval_tokens),
        Some(opts.eval_tokens),
        device,
    )?;
    let tail = report.steps.iter().rev().take(20).map(|s| f64::from(s.loss)).collect::<Vec<_>>();
    let result = PretrainResult {
        holdout: held.iter().map(|d| d.name.clone()).collect(),
        params: opts.model.num_params(),
        train_tokens: report.tokens,
        train_seconds: report.seconds,
        final_train_loss: tail.iter().sum::<f64>() / tail.len().max(1) as f64,
        heldout,
    };
    write_json(&opts.out.join("metrics.json"), &result)?;
    write_train_log(&opts.out.join("train_log.csv"), &report)?;
    Ok(result)
}

/// Write per-step statistics as CSV (`step,loss,grad_norm,lr`).
pub fn write_train_log(path: &Path, report: &TrainReport) -> Result<()> {
    let mut csv = String::from("step,loss,grad_norm,lr\n");
    for s in &report.steps {
        csv.push_str(&format!("{},{},{},{}\n", s.step, s.loss, s.grad_norm, s.lr));
    }
    std::fs::write(path, csv).map_err(|e| ModelError::io(path, e))
}

/// Settings of a LoRA fine-tuning run.
#[derive(Debug, Clone)]
pub struct FinetuneOptions {
    /// Base model directory.
    pub base: PathBuf,
    /// Training text.
    pub train_text: String,
    /// Held-out text for the before/after comparison.
    pub eval_text: String,
    /// Adapter settings.
    pub lora: LoraConfig,
    /// Training hyper-parameters.
    pub train: TrainConfig,
    /// Output adapter directory.
    pub out: PathBuf,
    /// Show progress bars.
    pub progress: bool,
}

/// Before/after figures of a fine-tuning run.
#[derive(Debug, Clone, Serialize)]
pub struct FinetuneResult {
    /// Held-out metrics of the base model.
    pub base: EvalMetrics,
    /// Held-out metrics with the trained adapter.
    pub tuned: EvalMetrics,
    /// Trainable parameters.
    pub trainable_params: usize,
    /// Training tokens seen.
    pub train_tokens: usize,
    /// Training wall-clock seconds.
    pub train_seconds: f64,
}

impl FinetuneResult {
    /// Relative perplexity improvement, `1 - tuned / base`.
    pub fn perplexity_gain(&self) -> f64 {
        1.0 - self.tuned.perplexity / self.base.perplexity
    }
}

/// Fine-tune LoRA adapters on `opts.train_text`, save them (PEFT layout) to `opts.out`
/// with `metrics.json`, and compare held-out metrics before and after.
pub fn finetune(opts: &FinetuneOptions, device: &Device) -> Result<FinetuneResult> {
    opts.train.validate()?;
    let tokenizer = Tokenizer::for_model_dir(&opts.base)?;
    let ad = device.clone().autodiff();
    let base = checkpoint::load_model(&opts.base, &ad)?;
    let eval_tokens = tokenizer.encode(&opts.eval_text)?;
    let bpt = bytes_per_token(&opts.eval_text, &eval_tokens);
    let seq = opts.train.seq_len;
    let before = evaluate(&base.valid(), &eval_tokens, seq, opts.train.batch_size, bpt, None, device)?;
    let model = base.with_lora(&opts.lora, &ad)?;
    let trainable_params = checkpoint::adapter_tensors(&model)?.values().map(|t| t.data.len()).sum();
    let mut batcher =
        Batcher::new(tokenizer.encode(&opts.train_text)?, seq, opts.train.seed, Path::new("fine-tuning text"))?;
    let (model, report) = train(model, &mut batcher, &opts.train, &ad, opts.progress, |_, _| {})?;
    let model = model.valid();
    let after = evaluate(&model, &eval_tokens, seq, opts.train.batch_size, bpt, None, device)?;
    checkpoint::save_adapter(&model, &opts.out, opts.base.to_str())?;
    let result = FinetuneResult {
        base: before,
        tuned: after,
        trainable_params,
        train_tokens: report.tokens,
        train_seconds: report.seconds,
    };
    write_json(&opts.out.join("metrics.json"), &result)?;
    write_train_log(&opts.out.join("train_log.csv"), &report)?;
    Ok(result)
}

/// Write a value as pretty JSON.
pub fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let text =
        serde_json::to_string_pretty(value).map_err(|source| ModelError::Json { path: path.to_owned(), source })?;
    std::fs::write(path, text).map_err(|e| ModelError::io(path, e))
}
