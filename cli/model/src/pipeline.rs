//! The workflows behind the command line: pretraining on a corpus with held-out
//! documents, and LoRA fine-tuning with a before/after evaluation.

use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::tensor::Device;
use serde::Serialize;

use crate::progress::Steps;

use covey_model::checkpoint;
use covey_model::config::{LlamaConfig, LoraConfig};
use covey_model::data::{self, Batcher, Document};
use covey_model::error::{ModelError, Result};
use covey_model::eval::{EvalMetrics, evaluate};
use covey_model::llama::Llama;
use covey_model::tokenizer::Tokenizer;
use covey_model::train::{TrainConfig, TrainReport, train};

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

/// [`train`] with a progress report per step (a bar on a terminal), unless `progress`
/// is false.
fn train_showing(
    model: Llama,
    batcher: &mut Batcher,
    config: &TrainConfig,
    device: &Device,
    progress: bool,
) -> Result<(Llama, TrainReport)> {
    let steps = Steps::new(progress, config.steps as u64, "steps");
    train(model, batcher, config, device, |s, _| steps.tick(s.step as u64 + 1, &format!("loss {:.3}", s.loss)))
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
    let (model, report) = train_showing(model, &mut batcher, &opts.train, &ad, opts.progress)?;
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
    let (model, report) = if opts.lora.dropout > 0.0 {
        // Adapter dropout runs on burn's autodiff.
        train_showing(model, &mut batcher, &opts.train, &ad, opts.progress)?
    } else {
        // covey-qlora's trainer (what agents run), from the same seeded A.
        let loaded = covey_model::LoadedModel::open(&opts.base)?;
        let config = loaded.config.clone();
        let run = covey_model::AdapterRun {
            config: &config,
            base: covey_model::RoundBase::Stored(loaded.tensors),
            frozen: None,
            lora: &opts.lora,
            a: None,
            b: None,
            start_step: 0,
            proximal_mu: 0.0,
            example_dp: None,
        };
        let steps = Steps::new(opts.progress, opts.train.steps as u64, "steps");
        let trained = covey_model::train_adapter(run, &opts.train, &mut batcher, None, |s, _| {
            steps.tick(s.step as u64 + 1, &format!("loss {:.3}", s.loss))
        })?;
        let mut factors = trained.a;
        factors.extend(trained.b);
        let model = checkpoint::load_adapter_tensors(model, &factors, Path::new("trained adapter"))?;
        (model, TrainReport { steps: trained.steps, tokens: trained.tokens, seconds: trained.seconds })
    };
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

/// Where a distillation student starts.
#[derive(Debug, Clone)]
pub enum StudentInit {
    /// A fresh model of this shape (its vocabulary is set to the tokenizer's).
    Fresh(LlamaConfig),
    /// An existing model directory (e.g. a pruned student to recover).
    From(PathBuf),
}

/// Settings of a distillation run (`covey-model distill`); with `loss.alpha = 0` it is
/// plain next-token training on the same windows: the from-scratch baseline.
#[derive(Debug, Clone)]
pub struct DistillOptions {
    /// Teacher: a GGUF file or a model directory. It provides the tokenizer; with
    /// `alpha = 0` it is only scored, never run during training.
    pub teacher: Option<PathBuf>,
    /// Weights the teacher runs with.
    pub teacher_precision: covey_infer::Precision,
    /// The student.
    pub student: StudentInit,
    /// Training corpus (file or directory).
    pub data: PathBuf,
    /// Held-out corpus; `None` holds out `holdout` whole plays of `data` (as `pretrain`).
    pub eval_data: Option<PathBuf>,
    /// Whole documents held out when `eval_data` is `None`.
    pub holdout: usize,
    /// Temperature and α.
    pub loss: covey_model::distill::DistillLoss,
    /// Cache the teacher's top-k logits in this file (built when missing).
    pub cache: Option<PathBuf>,
    /// Logits kept per position in the cache.
    pub top_k: usize,
    /// Train on at most this many windows of the corpus (seeded choice).
    pub max_windows: Option<usize>,
    /// Hyper-parameters.
    pub train: TrainConfig,
    /// Held-out tokens scored.
    pub eval_tokens: usize,
    /// Score the held-out text every this many steps (0: only at the end).
    pub eval_every: usize,
    /// Output model directory.
    pub out: PathBuf,
    /// Show progress bars.
    pub progress: bool,
}

/// Parameters and held-out perplexity of one model.
#[derive(Debug, Clone, Serialize)]
pub struct ModelFigures {
    /// Parameters.
    pub params: usize,
    /// Held-out perplexity (per token).
    pub perplexity: f64,
}

/// What a distillation run produced.
#[derive(Debug, Clone, Serialize)]
pub struct DistillResult {
    /// `cached top-k`, `live` or `none` (cross-entropy only).
    pub teacher_mode: String,
    /// The teacher's figures, when there is one.
    pub teacher: Option<ModelFigures>,
    /// The student before training.
    pub student_before: ModelFigures,
    /// The trained student.
    pub student: ModelFigures,
    /// Temperature and α.
    pub loss: covey_model::distill::DistillLoss,
    /// Windows trained on.
    pub windows: usize,
    /// Held-out tokens scored.
    pub eval_tokens: usize,
    /// Training tokens.
    pub train_tokens: usize,
    /// Training wall-clock seconds (teacher included).
    pub train_seconds: f64,
    /// Training tokens per second.
    pub tokens_per_second: f64,
    /// Seconds of those spent computing or reading teacher logits.
    pub teacher_seconds: f64,
    /// Seconds spent building the cache (0 when it existed or is not used).
    pub cache_build_seconds: f64,
    /// Per-step loss and the periodic held-out perplexity.
    pub curve: Vec<CurvePoint>,
}

/// One logged step.
#[derive(Debug, Clone, Serialize)]
pub struct CurvePoint {
    /// 0-based step.
    pub step: usize,
    /// Training objective.
    pub loss: f32,
    /// Learning rate.
    pub lr: f64,
    /// Held-out perplexity, where scored.
    pub perplexity: Option<f64>,
}

/// Held-out perplexity of host weights, windows of `window` tokens (covey-infer, f32).
fn engine_perplexity(
    config: &LlamaConfig,
    tensors: &covey_model::NamedTensors,
    tokens: &[u32],
    window: usize,
) -> Result<f64> {
    let engine = covey_infer::Model::from_tensors(config.clone(), tensors, covey_infer::Precision::F32)?;
    Ok(engine.nll(tokens, window)?.0.exp())
}

/// Whether two tokenizers map text to the same ids (same kind, same vocabulary).
fn same_tokenizer(a: &Tokenizer, b: &Tokenizer) -> bool {
    match (a, b) {
        (Tokenizer::Bytes, Tokenizer::Bytes) => true,
        (Tokenizer::HuggingFace(x), Tokenizer::HuggingFace(y)) => x.get_vocab(true) == y.get_vocab(true),
        _ => false,
    }
}

/// Train and held-out texts: `eval_data`, or `holdout` whole plays of `data`.
fn train_and_heldout(data: &Path, eval_data: Option<&Path>, holdout: usize, seed: u64) -> Result<(String, String)> {
    let docs = data::load_corpus(data)?;
    match eval_data {
        Some(e) => Ok((join(&docs), join(&data::load_corpus(e)?))),
        None => {
            let (train_docs, held) =
                data::holdout_documents(docs, holdout, seed, |d| data::speeches(&d.text).len() >= 50);
            if held.is_empty() || train_docs.is_empty() {
                return Err(ModelError::config(
                    "holdout",
                    format!("{}: no whole play to hold out; pass held-out text explicitly", data.display()),
                ));
            }
            Ok((join(&train_docs), join(&held)))
        }
    }
}

/// Distil a teacher into a student (or, with `alpha = 0`, train the student on the
/// text alone), save it to `opts.out` with `metrics.json` and `train_log.csv`.
pub fn distill(opts: &DistillOptions, device: &Device) -> Result<DistillResult> {
    use covey_model::distill::{DistillBatches, Teacher, TeacherCache, Windows};
    opts.train.validate()?;
    opts.loss.validate()?;
    let teacher_model = opts.teacher.as_deref().map(covey_model::LoadedModel::open).transpose()?;
    if teacher_model.is_none() && opts.loss.alpha > 0.0 {
        return Err(ModelError::config("alpha", "distillation needs a teacher (or alpha 0 to train on text alone)"));
    }
    let ad = device.clone().autodiff();
    let (student, tokenizer) = match &opts.student {
        StudentInit::Fresh(shape) => {
            let tokenizer = teacher_model.as_ref().map_or(Tokenizer::Bytes, |t| t.tokenizer.clone());
            let config = LlamaConfig {
                vocab_size: tokenizer.vocab_size().max(teacher_model.as_ref().map_or(0, |t| t.config.vocab_size)),
                max_position_embeddings: shape.max_position_embeddings.max(opts.train.seq_len),
                ..shape.clone()
            };
            (Llama::init(&config, opts.train.seed, &ad)?, tokenizer)
        }
        StudentInit::From(dir) => (checkpoint::load_model(dir, &ad)?, Tokenizer::for_model_dir(dir)?),
    };
    if let Some(t) = &teacher_model
        && (!same_tokenizer(&t.tokenizer, &tokenizer) || t.config.vocab_size != student.config.vocab_size)
    {
        return Err(ModelError::config(
            "teacher",
            format!(
                "{}: teacher and student must share a tokenizer (vocabularies {} and {})",
                t.source.display(),
                t.config.vocab_size,
                student.config.vocab_size
            ),
        ));
    }
    let (train_text, held_text) =
        train_and_heldout(&opts.data, opts.eval_data.as_deref(), opts.holdout, opts.train.seed)?;
    let seq = opts.train.seq_len;
    let windows = Windows::new(tokenizer.encode(&train_text)?, seq, opts.max_windows, opts.train.seed, &opts.data)?;
    let mut held = tokenizer.encode(&held_text)?;
    held.truncate(opts.eval_tokens.max(2));
    let eval_window = (seq + 1).min(student.config.max_position_embeddings);
    tracing::info!(windows = windows.len(), held_out = held.len(), "distillation data ready");

    // The teacher: scored once, then run live, cached, or not at all.
    let mut teacher_figures = None;
    let mut cache_build_seconds = 0.0;
    let mut teacher = Teacher::None;
    if let Some(t) = &teacher_model {
        let engine = t.engine(opts.teacher_precision)?;
        let (nll, _) = engine.nll(&held, eval_window.min(t.config.max_position_embeddings))?;
        teacher_figures = Some(ModelFigures { params: t.config.num_params(), perplexity: nll.exp() });
        if opts.loss.alpha > 0.0 {
            teacher = match &opts.cache {
                Some(path) if path.exists() => Teacher::Cached(TeacherCache::open(path, &windows)?),
                Some(path) => {
                    let started = std::time::Instant::now();
                    let bar = Steps::new(opts.progress, windows.len() as u64, "teacher windows");
                    let c =
                        TeacherCache::build(path, &engine, &t.description, &windows, opts.top_k, &mut |done, _| {
                            bar.tick(done as u64, "")
                        })?;
                    cache_build_seconds = started.elapsed().as_secs_f64();
                    Teacher::Cached(c)
                }
                None => Teacher::Live(Box::new(engine)),
            };
        }
    }
    let teacher_mode = match teacher {
        Teacher::None => "none",
        Teacher::Live(_) => "live",
        Teacher::Cached(_) => "cached top-k",
    }
    .to_string();
    let student_before = ModelFigures {
        params: student.config.num_params(),
        perplexity: engine_perplexity(&student.config, &checkpoint::base_tensors(&student), &held, eval_window)?,
    };
    let mut batches = DistillBatches::new(&windows, &mut teacher, opts.train.seed);
    let mut curve = Vec::with_capacity(opts.train.steps);
    let mut eval_error = None;
    let steps = Steps::new(opts.progress, opts.train.steps as u64, "steps");
    let (model, report) =
        covey_model::train::train_distill(student, &mut batches, &opts.train, opts.loss, &ad, |s, m| {
            steps.tick(s.step as u64 + 1, &format!("loss {:.3}", s.loss));
            let scored = opts.eval_every > 0 && (s.step + 1) % opts.eval_every == 0 && s.step + 1 < opts.train.steps;
            let perplexity = if scored {
                match engine_perplexity(&m.config, &checkpoint::base_tensors(m), &held, eval_window) {
                    Ok(p) => Some(p),
                    Err(e) => {
                        eval_error.get_or_insert(e);
                        None
                    }
                }
            } else {
                None
            };
            curve.push(CurvePoint { step: s.step, loss: s.loss, lr: s.lr, perplexity });
        })?;
    if let Some(e) = eval_error {
        return Err(e);
    }
    let teacher_seconds = batches.teacher_seconds;
    let model = model.valid();
    let final_ppl = engine_perplexity(&model.config, &checkpoint::base_tensors(&model), &held, eval_window)?;
    if let Some(last) = curve.last_mut() {
        last.perplexity = Some(final_ppl);
    }
    checkpoint::save_model(&model, &tokenizer, &opts.out)?;
    let result = DistillResult {
        teacher_mode,
        teacher: teacher_figures,
        student_before,
        student: ModelFigures { params: model.config.num_params(), perplexity: final_ppl },
        loss: opts.loss,
        windows: windows.len(),
        eval_tokens: held.len(),
        train_tokens: report.tokens,
        train_seconds: report.seconds,
        tokens_per_second: report.tokens_per_second(),
        teacher_seconds,
        cache_build_seconds,
        curve,
    };
    write_json(&opts.out.join("metrics.json"), &result)?;
    let mut csv = String::from("step,loss,lr,heldout_perplexity\n");
    for p in &result.curve {
        csv.push_str(&format!(
            "{},{},{},{}\n",
            p.step,
            p.loss,
            p.lr,
            p.perplexity.map(|x| x.to_string()).unwrap_or_default()
        ));
    }
    let path = opts.out.join("train_log.csv");
    std::fs::write(&path, csv).map_err(|e| ModelError::io(&path, e))?;
    Ok(result)
}

/// Settings of a pruning run (`covey-model prune`).
#[derive(Debug, Clone)]
pub struct PruneOptions {
    /// The model to prune (a model directory or GGUF file, f32 weights).
    pub model: PathBuf,
    /// Output model directory.
    pub out: PathBuf,
    /// Ratios.
    pub prune: covey_model::prune::PruneConfig,
    /// How heads and channels are ranked.
    pub importance: covey_model::prune::Importance,
    /// Text for activation scores, held-out perplexity and the recovery fine-tune.
    pub data: PathBuf,
    /// Held-out corpus; `None` holds out `holdout` whole plays of `data`.
    pub eval_data: Option<PathBuf>,
    /// Whole documents held out when `eval_data` is `None`.
    pub holdout: usize,
    /// Calibration windows for activation scores.
    pub calibration_windows: usize,
    /// Recovery fine-tune (all weights); `steps` 0 skips it.
    pub recover: TrainConfig,
    /// Teacher for a distilled recovery (else cross-entropy on the text).
    pub teacher: Option<PathBuf>,
    /// Distillation settings of the recovery, with a teacher.
    pub loss: covey_model::distill::DistillLoss,
    /// Held-out tokens scored.
    pub eval_tokens: usize,
    /// Show progress bars.
    pub progress: bool,
}

/// What a pruning run produced.
#[derive(Debug, Clone, Serialize)]
pub struct PruneResult {
    /// One line: heads, channels, parameters before → after.
    pub summary: String,
    /// The plan (kept heads and channels per layer, new config).
    pub plan: covey_model::prune::PrunePlan,
    /// The model before pruning.
    pub before: ModelFigures,
    /// Right after pruning.
    pub pruned: ModelFigures,
    /// After the recovery fine-tune, if one ran.
    pub recovered: Option<ModelFigures>,
    /// Bytes of `model.safetensors` before and after.
    pub file_bytes: (u64, u64),
}

/// Prune heads and MLP channels, optionally fine-tune the result, save it to
/// `opts.out` with `prune.json`.
pub fn prune(opts: &PruneOptions, device: &Device) -> Result<PruneResult> {
    use covey_model::prune::{
        Importance, activation_scores, apply, gradient_scores, magnitude_scores, plan, require_f32,
    };
    opts.prune.validate()?;
    let loaded = covey_model::LoadedModel::open(&opts.model)?;
    require_f32(
        loaded.tensors.values().any(|t| !matches!(t, covey_tensors::quant::StoredTensor::F32(_))),
        &opts.model,
    )?;
    let tensors = loaded.f32_tensors();
    let config = loaded.config.clone();
    let (train_text, held_text) =
        train_and_heldout(&opts.data, opts.eval_data.as_deref(), opts.holdout, opts.recover.seed)?;
    let tokenizer = loaded.tokenizer.clone();
    let mut held = tokenizer.encode(&held_text)?;
    held.truncate(opts.eval_tokens.max(2));
    let seq = opts.recover.seq_len.min(config.max_position_embeddings);
    let window = (seq + 1).min(config.max_position_embeddings);
    let scores = match opts.importance {
        Importance::Magnitude => magnitude_scores(&config, &tensors)?,
        Importance::Activation => {
            let model = checkpoint::from_base_tensors(&config, &tensors, &opts.model, device)?;
            let calib = tokenizer.encode(&train_text)?;
            activation_scores(&model, &tensors, &calib, seq, 8, opts.calibration_windows, device)?
        }
        Importance::Gradient => {
            let ad = device.clone().autodiff();
            let model = checkpoint::from_base_tensors(&config, &tensors, &opts.model, &ad)?;
            let calib = tokenizer.encode(&train_text)?;
            gradient_scores(&model, &calib, seq, 8, opts.calibration_windows, &ad)?
        }
    };
    let p = plan(&config, &scores, &opts.prune)?;
    let pruned = apply(&config, &tensors, &p)?;
    let before =
        ModelFigures { params: config.num_params(), perplexity: engine_perplexity(&config, &tensors, &held, window)? };
    let after = ModelFigures {
        params: p.config.num_params(),
        perplexity: engine_perplexity(&p.config, &pruned, &held, window)?,
    };
    let out_model = covey_model::LoadedModel {
        source: opts.out.clone(),
        config: p.config.clone(),
        tensors: pruned.into_iter().map(|(n, t)| (n, covey_tensors::quant::StoredTensor::F32(t))).collect(),
        tokenizer: loaded.tokenizer.clone(),
        chat_template: loaded.chat_template.clone(),
        special: loaded.special.clone(),
        description: format!("pruned from {}", opts.model.display()),
    };
    out_model.save_dir(&opts.out)?;
    let recovered = if opts.recover.steps > 0 {
        let r = distill(
            &DistillOptions {
                teacher: opts.teacher.clone(),
                teacher_precision: covey_infer::Precision::F32,
                student: StudentInit::From(opts.out.clone()),
                data: opts.data.clone(),
                eval_data: opts.eval_data.clone(),
                holdout: opts.holdout,
                loss: if opts.teacher.is_some() {
                    opts.loss
                } else {
                    covey_model::distill::DistillLoss { alpha: 0.0, ..opts.loss }
                },
                cache: None,
                top_k: 0,
                max_windows: None,
                train: opts.recover.clone(),
                eval_tokens: opts.eval_tokens,
                eval_every: 0,
                out: opts.out.clone(),
                progress: opts.progress,
            },
            device,
        )?;
        Some(r.student)
    } else {
        None
    };
    let size = |dir: &Path| -> u64 {
        if dir.is_dir() {
            std::fs::metadata(dir.join(checkpoint::MODEL_FILE)).map(|m| m.len()).unwrap_or(0)
        } else {
            std::fs::metadata(dir).map(|m| m.len()).unwrap_or(0)
        }
    };
    let result = PruneResult {
        summary: covey_model::prune::describe(&config, &p.config),
        plan: p,
        before,
        pruned: after,
        recovered,
        file_bytes: (size(&opts.model), size(&opts.out)),
    };
    write_json(&opts.out.join("prune.json"), &result)?;
    Ok(result)
}
