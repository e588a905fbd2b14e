//! One client round of federated FFA-LoRA fine-tuning, and held-out evaluation, on plain
//! host tensors: what a device agent calls.
//!
//! Protocol (FFA-LoRA): the coordinator issues the LoRA `A` factors under PEFT names
//! (`base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`, `[r, in]`),
//! identical for every client. `A` stays frozen; the client trains only `B`, starting at
//! zero, and uploads `B` (`lora_B` names, `[out, r]`). Since every client shares the same
//! frozen `A`, averaging the clients' `B` averages their updates `scale · B · A` exactly.
//!
//! The base model comes as Hugging Face-named tensors ([`checkpoint::from_base_tensors`]);
//! the update folds into it with [`covey_tensors::lora::merge`] at scale `alpha / rank`.

use std::collections::BTreeSet;
use std::path::Path;

use burn::module::Module;
use burn::tensor::Device;
use serde::{Deserialize, Serialize};

use crate::checkpoint::{self, HostTensor, NamedTensors, host_tensor, peft_name};
use crate::config::{LlamaConfig, LoraConfig, LoraTarget};
use crate::data::Batcher;
use crate::error::{ModelError, Result};
use crate::eval::{EvalMetrics, evaluate};
use crate::llama::Llama;
use crate::tokenizer::Tokenizer;
use crate::train::{LoopOptions, TrainConfig, train_with};
use covey_qlora::FrozenAdapter;

/// Source named in errors about the base tensors.
const BASE_SOURCE: &str = "base tensors";
/// Source named in errors about the coordinator's `A` factors.
const A_SOURCE: &str = "LoRA A tensors";
/// Source named in errors about the `B` factors given to resume from.
const B_SOURCE: &str = "LoRA B tensors";
/// Source named in errors about the local corpus.
const CORPUS_SOURCE: &str = "local corpus";
/// Source named in errors about evaluation texts.
const EVAL_SOURCE: &str = "evaluation texts";
/// Windows scored together by [`evaluate_texts`].
const EVAL_BATCH: usize = 8;

/// What one client trains in a round.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LocalTrainSpec {
    /// Rank, alpha, targets and dropout of the adapters. `ffa` is forced to true and
    /// `seed` is unused: `A` comes from the coordinator.
    pub lora: LoraConfig,
    /// Local training hyper-parameters (steps, batch, sequence length, learning rate,
    /// seed of batch sampling and dropout...).
    pub train: TrainConfig,
    /// FedProx coefficient: `(mu / 2) · Σ ||B||²` is added to the training objective (the
    /// proximal centre is `B = 0`, where every round starts). Not included in the reported
    /// losses. Default 0 (plain FedAvg).
    #[serde(default)]
    pub proximal_mu: f64,
    /// Emit a [`RoundProgress`] every this many optimizer steps; 0 never. Default 10.
    #[serde(default = "ten")]
    pub checkpoint_every: usize,
    /// Example-level DP-SGD: each example's gradient clipped, Gaussian noise on each
    /// step's sum. Default none.
    #[serde(default)]
    pub example_dp: Option<ExampleDp>,
}

/// Example-level DP-SGD within a local round: its settings, from `covey-settings`.
pub use covey_settings::ExampleDp;

/// Where example-level DP-SGD's noise comes from: the caller's generator (the agent and
/// `covey-sim` pass covey-privacy's CSPRNG-keyed, snapped Gaussian; this crate draws no
/// privacy noise itself).
pub trait NoiseSource {
    /// Add independent `N(0, std²)` noise to every value.
    fn add_gaussian(&mut self, values: &mut [f32], std: f64);
}

fn ten() -> usize {
    10
}

impl Default for LocalTrainSpec {
    fn default() -> Self {
        Self {
            lora: LoraConfig { ffa: true, ..LoraConfig::default() },
            train: TrainConfig::default(),
            proximal_mu: 0.0,
            checkpoint_every: ten(),
            example_dp: None,
        }
    }
}

impl LocalTrainSpec {
    /// The LoRA configuration actually used: `self.lora` with FFA on.
    pub fn ffa_lora(&self) -> LoraConfig {
        LoraConfig { ffa: true, ..self.lora.clone() }
    }

    /// Check that every value is possible.
    pub fn validate(&self) -> Result<()> {
        self.lora.validate()?;
        self.train.validate()?;
        if !(self.proximal_mu.is_finite() && self.proximal_mu >= 0.0) {
            return Err(ModelError::config("proximal_mu", format!("{} is not a number >= 0", self.proximal_mu)));
        }
        if let Some(dp) = &self.example_dp {
            dp.validate().map_err(ModelError::from)?;
        }
        Ok(())
    }
}

/// Where to continue an interrupted round: the last [`RoundProgress`] the run emitted.
///
/// Training continues at optimizer step `step` with these `B`, on the same batches and
/// learning-rate schedule as an uninterrupted run. The AdamW moments are not saved, so
/// they restart from zero: the result is close to, not identical with, an uninterrupted
/// run. With dropout > 0 the dropout masks after the restart differ too.
#[derive(Debug, Clone, PartialEq)]
pub struct Resume {
    /// Optimizer steps already done (`RoundProgress::step`); less than `train.steps`.
    pub step: usize,
    /// The `B` factors at that step, PEFT `lora_B` names.
    pub b: NamedTensors,
}

/// The adapter in the middle of a round, for crash recovery.
#[derive(Debug, Clone, PartialEq)]
pub struct RoundProgress {
    /// Optimizer steps done. When it equals `train.steps`, `b` is the final result.
    pub step: usize,
    /// The `B` factors after those steps, PEFT `lora_B` names.
    pub b: NamedTensors,
}

/// What a client uploads after a round, with the figures a strategy weighs it by.
#[derive(Debug, Clone, PartialEq)]
pub struct LocalResult {
    /// The trained `B` factors, PEFT `lora_B` names, `[out, r]`. The `A` factors are not
    /// included: they are the coordinator's, unchanged.
    pub b: NamedTensors,
    /// Training sequences behind `b` over the whole round:
    /// `train.steps × batch_size × grad_accum`, steps done before a [`Resume`] included.
    /// Sequences are random windows of the local token stream, drawn with replacement.
    pub examples: u64,
    /// Training tokens behind `b` over the whole round: `examples × seq_len`.
    pub tokens: u64,
    /// Non-blank documents of the local corpus.
    pub documents: u64,
    /// Optimizer steps run by this call (`train.steps - resume.step`).
    pub steps_run: usize,
    /// Language-model loss (nats per token) of the first step run by this call.
    pub loss_first: f32,
    /// Language-model loss of the last step.
    pub loss_last: f32,
    /// Language-model loss of every step run by this call, in order.
    pub losses: Vec<f32>,
}

/// The PEFT names and shapes of every `factor` (`'A'` or `'B'`) of `lora` on a model.
fn factor_shapes(config: &LlamaConfig, lora: &LoraConfig, factor: char) -> Vec<(String, [usize; 2])> {
    let mut out = Vec::new();
    for i in 0..config.num_hidden_layers {
        for &t in &lora.targets {
            let (d_in, d_out) = config.lora_dims(t);
            let shape = if factor == 'A' { [lora.rank, d_in] } else { [d_out, lora.rank] };
            out.push((peft_name(i, t, factor), shape));
        }
    }
    out
}

/// Check that `tensors` holds exactly the `factor` factors of `lora`, each of the right
/// shape and finite. Errors name `source` and the tensor.
fn check_factors(
    tensors: &NamedTensors,
    config: &LlamaConfig,
    lora: &LoraConfig,
    factor: char,
    source: &str,
) -> Result<()> {
    let source = Path::new(source);
    let mut expected = BTreeSet::new();
    for (name, shape) in factor_shapes(config, lora, factor) {
        checkpoint::checked(tensors, &name, &shape, source)?;
        expected.insert(name);
    }
    if let Some(extra) = tensors.keys().find(|k| !expected.contains(*k)) {
        return Err(ModelError::Adapter(format!(
            "{}: unexpected tensor `{extra}`: not a lora_{factor} factor of the configured targets {:?}",
            source.display(),
            lora.targets.iter().map(|t| t.hf_name()).collect::<Vec<_>>(),
        )));
    }
    Ok(())
}

/// The `B` factors of a model's adapters, PEFT `lora_B` names, `[out, r]`.
pub fn lora_b_tensors(model: &Llama) -> Result<NamedTensors> {
    let lora = model.lora.as_ref().ok_or_else(|| ModelError::Adapter("the model carries no adapters".into()))?;
    let mut out = NamedTensors::new();
    for (i, layer) in model.layers.iter().enumerate() {
        for &t in &lora.targets {
            if let Some(ad) = &layer.proj(t).lora {
                out.insert(peft_name(i, t, 'B'), host_tensor(ad.b.val()).transposed());
            }
        }
    }
    Ok(out)
}

/// The model built from Hugging Face-named `base` tensors, with FFA-LoRA adapters
/// (`lora` with `ffa` forced on): `A = a` (frozen), `B = b`, or zero when `b` is `None`.
/// Only `B` requires gradients. Every tensor is checked (presence, shape, finite values),
/// and `a` / `b` may hold nothing but the factors of `lora`.
pub fn adapter_model(
    config: &LlamaConfig,
    base: &NamedTensors,
    lora: &LoraConfig,
    a: &NamedTensors,
    b: Option<&NamedTensors>,
    device: &Device,
) -> Result<Llama> {
    let lora = LoraConfig { ffa: true, ..lora.clone() };
    lora.validate()?;
    config.validate()?;
    check_factors(a, config, &lora, 'A', A_SOURCE)?;
    let mut factors = a.clone();
    match b {
        Some(b) => {
            check_factors(b, config, &lora, 'B', B_SOURCE)?;
            factors.extend(b.iter().map(|(k, v)| (k.clone(), v.clone())));
        }
        None => {
            for (name, shape) in factor_shapes(config, &lora, 'B') {
                factors.insert(name, HostTensor::zeros(&shape));
            }
        }
    }
    let model = checkpoint::from_base_tensors(config, base, Path::new(BASE_SOURCE), device)?;
    let model = model.with_lora(&lora, device)?;
    checkpoint::load_adapter_tensors(model, &factors, Path::new("LoRA factors"))
}

/// The non-blank texts joined by blank lines, their count, and their token ids, checked
/// against the vocabulary. No text is an [`ModelError::EmptyCorpus`] naming `source`.
fn tokenize_texts(
    texts: &[String],
    tokenizer: &Tokenizer,
    config: &LlamaConfig,
    source: &str,
) -> Result<(String, usize, Vec<u32>)> {
    let docs: Vec<&str> = texts.iter().map(String::as_str).filter(|t| !t.trim().is_empty()).collect();
    if docs.is_empty() {
        return Err(ModelError::EmptyCorpus { path: source.into(), needed: None });
    }
    let text = docs.join("\n\n");
    let tokens = tokenizer.encode(&text)?;
    if let Some(&id) = tokens.iter().find(|&&id| id as usize >= config.vocab_size) {
        return Err(ModelError::TokenOutOfRange { id, vocab: config.vocab_size });
    }
    Ok((text, docs.len(), tokens))
}

/// What one client's round trains on: the published model (shape and base weights), the
/// frozen `A` factors the coordinator issued, the tokenizer and the local text.
#[derive(Debug, Clone)]
pub struct LocalRound<'a> {
    /// Shape of the model.
    pub config: &'a LlamaConfig,
    /// Base weights (Hugging Face names): f32, or as the release stores them.
    pub base: RoundBase<'a>,
    /// The version's own adapter, applied on top of `base` and never trained (the
    /// release and its adapter stay apart, so a quantized release stays quantized).
    pub adapter: Option<FrozenAdapter<'a>>,
    /// The frozen `A` factors (PEFT names, `[r, in]`).
    pub a: &'a NamedTensors,
    /// How the text is tokenized.
    pub tokenizer: &'a Tokenizer,
    /// The local text, one document per entry.
    pub corpus: &'a [String],
    /// Local chat transcripts: rendered with `chat_format`, the loss on the assistant's
    /// turns only.
    pub chats: &'a [Vec<crate::chat::Message>],
    /// How transcripts are rendered: the model's chat template and special tokens
    /// (required when `chats` is not empty).
    pub chat_format: Option<ChatFormat<'a>>,
}

/// The weights a round trains on.
#[derive(Debug, Clone)]
pub enum RoundBase<'a> {
    /// f32 weights: borrowed, or handed over (then no second copy is made).
    Tensors(std::borrow::Cow<'a, NamedTensors>),
    /// The weights as a release stores them (int8, int4 or f32), handed over: QLoRA,
    /// trained without ever expanding the base to f32.
    Stored(std::collections::BTreeMap<String, covey_tensors::quant::StoredTensor>),
}

impl<'a> RoundBase<'a> {
    /// The trainer's base: quantized weights stay quantized; owned f32 weights move.
    fn into_base(self, config: &LlamaConfig) -> Result<covey_qlora::Base> {
        use covey_tensors::quant::StoredTensor;
        Ok(match self {
            Self::Tensors(std::borrow::Cow::Borrowed(t)) => covey_qlora::Base::from_tensors(config, t)?,
            Self::Tensors(std::borrow::Cow::Owned(t)) => {
                covey_qlora::Base::from_stored(config, t.into_iter().map(|(n, t)| (n, StoredTensor::F32(t))).collect())?
            }
            Self::Stored(s) => covey_qlora::Base::from_stored(config, s)?,
        })
    }

    /// f32 weights with `adapter` merged in (what burn's model is built from).
    fn into_merged_tensors(self, adapter: Option<FrozenAdapter<'_>>) -> Result<std::borrow::Cow<'a, NamedTensors>> {
        let mut tensors = match self {
            Self::Tensors(t) if adapter.is_none() => return Ok(t),
            Self::Tensors(t) => t.into_owned(),
            Self::Stored(s) => s.into_iter().map(|(n, t)| (n, t.to_f32())).collect(),
        };
        if let Some(f) = adapter {
            let mut factors = f.a.clone();
            factors.extend(f.b.iter().map(|(n, t)| (n.clone(), t.clone())));
            covey_tensors::lora::merge(&mut tensors, &factors, f.scale)
                .map_err(|e| ModelError::Adapter(format!("the version's adapter: {e}")))?;
        }
        Ok(std::borrow::Cow::Owned(tensors))
    }
}

/// A model's chat template and the text of its special tokens.
#[derive(Debug, Clone, Copy)]
pub struct ChatFormat<'a> {
    /// Jinja chat template.
    pub template: &'a str,
    /// BOS token text (empty when none).
    pub bos: &'a str,
    /// EOS (end of turn) token text (empty when none).
    pub eos: &'a str,
}

/// The token stream of a corpus and, when it holds chat transcripts, which tokens are
/// learned: plain texts (joined by blank lines) wholly, transcripts only on the
/// assistant's turns and their end of turn. Returns (tokens, mask, documents).
pub fn tokenize_corpus(
    texts: &[String],
    chats: &[Vec<crate::chat::Message>],
    chat_format: Option<ChatFormat<'_>>,
    tokenizer: &Tokenizer,
    config: &LlamaConfig,
) -> Result<(Vec<u32>, Option<Vec<bool>>, usize)> {
    let documents = texts.iter().filter(|t| !t.trim().is_empty()).count() + chats.len();
    let mut tokens = Vec::new();
    let mut mask = Vec::new();
    if texts.iter().any(|t| !t.trim().is_empty()) {
        let (_, _, t) = tokenize_texts(texts, tokenizer, config, CORPUS_SOURCE)?;
        mask.resize(t.len(), true);
        tokens = t;
    }
    if !chats.is_empty() {
        let format = chat_format.ok_or_else(|| {
            ModelError::config("chat", "the local data holds chat transcripts and the model has no chat template")
        })?;
        for chat in chats {
            let (text, spans) = crate::chat::training_text(format.template, chat, format.bos, format.eos)?;
            let (ids, offsets) = tokenizer.encode_with_offsets(&text)?;
            if let Some(&id) = ids.iter().find(|&&id| id as usize >= config.vocab_size) {
                return Err(ModelError::TokenOutOfRange { id, vocab: config.vocab_size });
            }
            mask.extend(offsets.iter().map(|&(a, b)| spans.iter().any(|&(s, e)| a < e && b > s)));
            tokens.extend(ids);
        }
    }
    if documents == 0 || tokens.is_empty() {
        return Err(ModelError::EmptyCorpus { path: CORPUS_SOURCE.into(), needed: None });
    }
    let all = mask.iter().all(|&m| m);
    Ok((tokens, (!all).then_some(mask), documents))
}

/// One client round: build the model from `base` (Hugging Face names), attach FFA-LoRA
/// with the coordinator's `a_init` (frozen) and `B = 0` (or `resume.b`), train `B` on
/// `corpus` for `spec.train.steps` optimizer steps, and return `B`.
///
/// `device` may be plain or autodiff; training runs on its autodiff form.
/// `on_checkpoint` receives `B` every `spec.checkpoint_every` steps; pass the last one as
/// [`Resume`] to continue after a crash. Batches are drawn from the concatenated
/// non-blank documents (separated by blank lines) with `spec.train.seed`: a fixed seed
/// gives the same `B`.
///
/// Errors: invalid spec, missing / misshapen / non-finite base or `A` / `B` tensor (named),
/// an empty corpus or one shorter than `seq_len + 1` tokens, a token outside the model's
/// vocabulary, `resume.step >= spec.train.steps`, or a diverging loss.
///
/// The round runs on `covey-qlora`'s trainer (hand-written backward, layer
/// recomputation, quantized base kept as stored, chunked cross-entropy). With adapter
/// dropout > 0, which that trainer does not implement, it runs on burn's autodiff
/// instead ([`train_local_adapter_burn`]).
pub fn train_local_adapter(
    round: LocalRound<'_>,
    spec: &LocalTrainSpec,
    device: &Device,
    resume: Option<Resume>,
    on_checkpoint: impl FnMut(RoundProgress),
) -> Result<LocalResult> {
    if spec.lora.dropout > 0.0 {
        return train_local(round, spec, device, resume, on_checkpoint).map(|(_, r)| r);
    }
    train_local_fast(round, spec, resume, on_checkpoint, None)
}

/// [`train_local_adapter`] with example-level DP-SGD (`spec.example_dp`), its noise from
/// `noise`.
pub fn train_local_adapter_private(
    round: LocalRound<'_>,
    spec: &LocalTrainSpec,
    resume: Option<Resume>,
    on_checkpoint: impl FnMut(RoundProgress),
    noise: &mut dyn NoiseSource,
) -> Result<LocalResult> {
    train_local_fast(round, spec, resume, on_checkpoint, Some(noise))
}

/// [`train_local_adapter`] on burn's autodiff (the `device` given, in its autodiff
/// form): the reference the fast trainer is checked against, and the path for adapter
/// dropout. The base is expanded to f32 with the version's adapter merged in.
pub fn train_local_adapter_burn(
    round: LocalRound<'_>,
    spec: &LocalTrainSpec,
    device: &Device,
    resume: Option<Resume>,
    on_checkpoint: impl FnMut(RoundProgress),
) -> Result<LocalResult> {
    train_local(round, spec, device, resume, on_checkpoint).map(|(_, r)| r)
}

/// The batcher of a round: its corpus tokenized, positioned at `start_step`.
fn round_batcher(
    corpus: &[String],
    chats: &[Vec<crate::chat::Message>],
    chat_format: Option<ChatFormat<'_>>,
    tokenizer: &Tokenizer,
    config: &LlamaConfig,
    train: &TrainConfig,
    start_step: usize,
) -> Result<(Batcher, usize)> {
    let (tokens, mask, documents) = tokenize_corpus(corpus, chats, chat_format, tokenizer, config)?;
    let source = Path::new(CORPUS_SOURCE);
    let mut batcher = match mask {
        Some(mask) => Batcher::with_mask(tokens, mask, train.seq_len, train.seed, source)?,
        None => Batcher::new(tokens, train.seq_len, train.seed, source)?,
    };
    batcher.skip(start_step * train.grad_accum, train.batch_size);
    Ok((batcher, documents))
}

/// The first step to run, checked against the spec.
fn start_of(spec: &LocalTrainSpec, resume: Option<&Resume>) -> Result<usize> {
    spec.validate()?;
    let start_step = resume.map_or(0, |r| r.step);
    if start_step >= spec.train.steps {
        return Err(ModelError::config(
            "resume.step",
            format!("{start_step} leaves nothing of {} steps to train; its B is the final result", spec.train.steps),
        ));
    }
    Ok(start_step)
}

/// The round on `covey-qlora`'s trainer: the same objective, schedule, clipping and
/// AdamW as burn's loop ([`train_with`]).
fn train_local_fast(
    round: LocalRound<'_>,
    spec: &LocalTrainSpec,
    resume: Option<Resume>,
    mut on_checkpoint: impl FnMut(RoundProgress),
    noise: Option<&mut dyn NoiseSource>,
) -> Result<LocalResult> {
    let LocalRound { config, base, adapter, a, tokenizer, corpus, chats, chat_format } = round;
    let start_step = start_of(spec, resume.as_ref())?;
    if let Some(dp) = &spec.example_dp {
        if spec.lora.dropout > 0.0 {
            return Err(ModelError::config("example_dp", "example-level DP-SGD does not run with adapter dropout"));
        }
        if dp.noise_multiplier > 0.0 && noise.is_none() {
            return Err(ModelError::config("example_dp", "noise was asked for and no noise source was given"));
        }
    }
    let train = &spec.train;
    let lora = spec.ffa_lora();
    config.validate()?;
    check_factors(a, config, &lora, 'A', A_SOURCE)?;
    if let Some(r) = &resume {
        check_factors(&r.b, config, &lora, 'B', B_SOURCE)?;
    }
    let (mut batcher, documents) = round_batcher(corpus, chats, chat_format, tokenizer, config, train, start_step)?;
    let every = spec.checkpoint_every;
    let run = AdapterRun {
        config,
        base,
        frozen: adapter,
        lora: &lora,
        a: Some(a),
        b: resume.as_ref().map(|r| &r.b),
        start_step,
        proximal_mu: spec.proximal_mu,
        example_dp: spec.example_dp,
    };
    let trained = train_adapter(run, train, &mut batcher, noise, |s, trainer| {
        if every > 0 && (s.step + 1).is_multiple_of(every) {
            on_checkpoint(RoundProgress { step: s.step + 1, b: trainer.b_tensors() });
        }
    })?;
    let losses: Vec<f32> = trained.steps.iter().map(|s| s.loss).collect();
    let examples = (train.steps * train.batch_size * train.grad_accum) as u64;
    Ok(LocalResult {
        b: trained.b,
        examples,
        tokens: examples * train.seq_len as u64,
        documents: documents as u64,
        steps_run: losses.len(),
        loss_first: losses.first().copied().unwrap_or(f32::NAN),
        loss_last: losses.last().copied().unwrap_or(f32::NAN),
        losses,
    })
}

/// What [`train_adapter`] trains.
#[derive(Debug)]
pub struct AdapterRun<'a> {
    /// Shape of the model.
    pub config: &'a LlamaConfig,
    /// Its weights (f32, or as a release stores them).
    pub base: RoundBase<'a>,
    /// An adapter already folded into the version trained on, kept apart, never trained.
    pub frozen: Option<FrozenAdapter<'a>>,
    /// Rank, alpha, targets; `ffa` freezes `A` (only `B` trains). Dropout must be 0.
    pub lora: &'a LoraConfig,
    /// `A` (PEFT names, `[r, in]`); `None`: the seeded initialisation `Llama::with_lora`
    /// draws, from `lora.seed`.
    pub a: Option<&'a NamedTensors>,
    /// `B` (PEFT names, `[out, r]`); `None`: zero.
    pub b: Option<&'a NamedTensors>,
    /// First optimizer step (the batcher must already be positioned there).
    pub start_step: usize,
    /// FedProx coefficient on `B` (0: none).
    pub proximal_mu: f64,
    /// Example-level DP-SGD (FFA only; noise from the caller's source).
    pub example_dp: Option<ExampleDp>,
}

/// An adapter trained by [`train_adapter`].
#[derive(Debug, Clone)]
pub struct TrainedAdapter {
    /// `A` (trained unless FFA), PEFT names.
    pub a: NamedTensors,
    /// `B`, PEFT names.
    pub b: NamedTensors,
    /// Every step run.
    pub steps: Vec<crate::train::StepStats>,
    /// Training tokens processed.
    pub tokens: usize,
    /// Wall-clock seconds.
    pub seconds: f64,
}

/// LoRA training on `covey-qlora`'s trainer (hand-written backward, the base kept as
/// stored, layer recomputation within `train.activation_memory_mib`): the objective,
/// schedule, clipping and AdamW of burn's loop ([`crate::train::train`]), on batches
/// from `batcher`. What local rounds and `covey-model finetune` run. `on_step` sees every
/// step and the trainer (its `B`, for checkpoints).
pub fn train_adapter(
    run: AdapterRun<'_>,
    train: &TrainConfig,
    batcher: &mut Batcher,
    mut noise: Option<&mut dyn NoiseSource>,
    mut on_step: impl FnMut(&crate::train::StepStats, &covey_qlora::Trainer<'_>),
) -> Result<TrainedAdapter> {
    let AdapterRun { config, base, frozen, lora, a, b, start_step, proximal_mu, example_dp } = run;
    train.validate()?;
    lora.validate()?;
    if lora.dropout > 0.0 {
        return Err(ModelError::config("dropout", "covey-qlora's trainer has no adapter dropout; use burn's"));
    }
    if start_step >= train.steps {
        return Err(ModelError::config(
            "steps",
            format!("start step {start_step} leaves nothing of {} steps", train.steps),
        ));
    }
    let drawn;
    let a = match a {
        Some(a) => a,
        None => {
            drawn = seeded_a(config, lora);
            &drawn
        }
    };
    let base = base.into_base(config)?;
    let lspec = covey_qlora::LoraSpec {
        rank: lora.rank,
        scale: lora.scale() as f32,
        targets: lora.targets.clone(),
        train_a: !lora.ffa,
    };
    let mut trainer = covey_qlora::Trainer::new(&base, &lspec, a, b, frozen)?;
    trainer.set_activation_budget(train.activation_memory_mib.saturating_mul(1 << 20));
    trainer.set_example_clip(example_dp.map(|dp| dp.clip as f32))?;
    let opt = covey_qlora::AdamW {
        beta_1: crate::train::ADAM_BETA_1,
        beta_2: crate::train::ADAM_BETA_2,
        epsilon: crate::train::ADAM_EPSILON,
        weight_decay: train.weight_decay as f32,
    };
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(train.threads.max(1))
        .build()
        .map_err(|e| ModelError::config("threads", format!("cannot start the training threads: {e}")))?;
    let started = std::time::Instant::now();
    let mut steps = Vec::with_capacity(train.steps - start_step);
    let mut tokens = 0;
    for step in start_step..train.steps {
        trainer.zero_grad();
        let mut loss_sum = 0.0f32;
        for _ in 0..train.grad_accum {
            let batch = batcher.next_host_batch(train.batch_size);
            let weight = 1.0 / train.grad_accum as f32;
            loss_sum += pool.install(|| trainer.accumulate(&batch, weight))?;
            tokens += train.batch_size * train.seq_len;
        }
        if let (Some(dp), Some(noise)) = (&example_dp, noise.as_deref_mut()) {
            // The clipped sum's noise, divided like the sum by the step's sequences.
            let std = dp.noise_multiplier * dp.clip / (train.batch_size * train.grad_accum) as f64;
            trainer.add_to_gradients(|g| noise.add_gaussian(g, std));
        }
        trainer.add_proximal(proximal_mu as f32);
        let grad_norm = trainer.grad_norm();
        if let Some(c) = train.max_grad_norm
            && grad_norm > c
        {
            trainer.scale_grads((c / grad_norm) as f32);
        }
        let lr = train.lr_at(step);
        trainer.step(lr, &opt);
        let loss = loss_sum / train.grad_accum as f32;
        if !loss.is_finite() {
            return Err(ModelError::config("lr", format!("training diverged at step {step} (loss {loss})")));
        }
        let s = crate::train::StepStats { step, loss, grad_norm, lr };
        on_step(&s, &trainer);
        steps.push(s);
    }
    Ok(TrainedAdapter {
        a: trainer.a_tensors(),
        b: trainer.b_tensors(),
        steps,
        tokens,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// The `A` factors `Llama::with_lora` draws for `lora` (PEFT names, `[r, in]`).
pub fn seeded_a(config: &LlamaConfig, lora: &LoraConfig) -> NamedTensors {
    let mut out = NamedTensors::new();
    for l in 0..config.num_hidden_layers {
        for &t in &lora.targets {
            let (d_in, _) = config.lora_dims(t);
            let a = crate::lora::initial_a(lora, crate::lora::lora_stream(l, t), d_in);
            // Drawn as `[d_in, r]` (burn's layout); PEFT's is `[r, d_in]`.
            let data = (0..lora.rank * d_in).map(|k| a[(k % d_in) * lora.rank + k / d_in]).collect();
            out.insert(peft_name(l, t, 'A'), HostTensor { shape: vec![lora.rank, d_in], data });
        }
    }
    out
}

/// [`train_local_adapter_burn`], also returning the trained model.
fn train_local(
    round: LocalRound<'_>,
    spec: &LocalTrainSpec,
    device: &Device,
    resume: Option<Resume>,
    mut on_checkpoint: impl FnMut(RoundProgress),
) -> Result<(Llama, LocalResult)> {
    let LocalRound { config, base, adapter, a: a_init, tokenizer, corpus, chats, chat_format } = round;
    let start_step = start_of(spec, resume.as_ref())?;
    if spec.example_dp.is_some() {
        return Err(ModelError::config("example_dp", "example-level DP-SGD runs on covey-qlora's trainer only"));
    }
    let train = &spec.train;
    let (mut batcher, documents) = round_batcher(corpus, chats, chat_format, tokenizer, config, train, start_step)?;
    let base = base.into_merged_tensors(adapter)?;
    let ad = device.clone().autodiff();
    let model = adapter_model(config, &base, &spec.ffa_lora(), a_init, resume.as_ref().map(|r| &r.b), &ad)?;
    // Handed-over weights are in the model now: do not keep a second copy while training.
    drop(base);
    let options = LoopOptions { start_step, proximal_mu: spec.proximal_mu, ..LoopOptions::default() };
    let every = spec.checkpoint_every;
    let (model, report) = train_with(model, &mut batcher, train, &options, &ad, |s, m| {
        if every > 0
            && (s.step + 1).is_multiple_of(every)
            && let Ok(b) = lora_b_tensors(m)
        {
            on_checkpoint(RoundProgress { step: s.step + 1, b });
        }
    })?;
    let b = lora_b_tensors(&model)?;
    let examples = (train.steps * train.batch_size * train.grad_accum) as u64;
    let result = LocalResult {
        b,
        examples,
        tokens: examples * train.seq_len as u64,
        documents: documents as u64,
        steps_run: report.steps.len(),
        loss_first: report.steps.first().map_or(f32::NAN, |s| s.loss),
        loss_last: report.steps.last().map_or(f32::NAN, |s| s.loss),
        losses: report.steps.iter().map(|s| s.loss).collect(),
    };
    Ok((model, result))
}

/// Held-out evaluation of a base model (no adapter; merge one in first with
/// [`covey_tensors::lora::merge`]) on `texts`: the non-blank texts are joined by blank
/// lines, tokenized, and scored in consecutive windows of `seq_len` predictions. Bits per
/// byte use the UTF-8 bytes of the joined text.
pub fn evaluate_texts(
    config: &LlamaConfig,
    base: &NamedTensors,
    tokenizer: &Tokenizer,
    texts: &[String],
    seq_len: usize,
    device: &Device,
) -> Result<EvalMetrics> {
    let (text, _, tokens) = tokenize_texts(texts, tokenizer, config, EVAL_SOURCE)?;
    if tokens.len() < 2 {
        return Err(ModelError::EmptyCorpus { path: EVAL_SOURCE.into(), needed: Some(2) });
    }
    let model = checkpoint::from_base_tensors(config, base, Path::new(BASE_SOURCE), device)?;
    let model = if device.is_autodiff() { model.no_grad() } else { model };
    let bytes_per_token = text.len() as f64 / tokens.len() as f64;
    evaluate(&model, &tokens, seq_len, EVAL_BATCH, bytes_per_token, None, device)
}

/// The projections that `a` holds layer-0 `A` factors for, in [`LoraTarget::ALL`] order:
/// the target list of the coordinator's adapters.
pub fn targets_of(a: &NamedTensors) -> Vec<LoraTarget> {
    LoraTarget::ALL.into_iter().filter(|&t| a.contains_key(&peft_name(0, t, 'A'))).collect()
}

#[cfg(test)]
mod tests {
    use burn::tensor::{Int, Tensor, TensorData};
    use covey_tensors::global_norm;

    use super::*;
    use crate::cpu_device;

    fn config() -> LlamaConfig {
        LlamaConfig::tiny()
    }

    fn lora() -> LoraConfig {
        LoraConfig {
            rank: 4,
            alpha: 8.0,
            targets: vec![LoraTarget::Q, LoraTarget::V, LoraTarget::Down],
            seed: 21,
            ffa: true,
            ..LoraConfig::default()
        }
    }

    fn spec(steps: usize) -> LocalTrainSpec {
        LocalTrainSpec {
            lora: lora(),
            train: TrainConfig {
                steps,
                batch_size: 4,
                seq_len: 32,
                warmup_steps: 2,
                lr: 1e-2,
                seed: 5,
                ..TrainConfig::default()
            },
            proximal_mu: 0.0,
            checkpoint_every: 2,
            example_dp: None,
        }
    }

    /// A round of the tiny model on `corpus`, byte-level.
    fn round<'a>(base: &'a NamedTensors, a: &'a NamedTensors, corpus: &'a [String]) -> LocalRound<'a> {
        static CONFIG: std::sync::OnceLock<LlamaConfig> = std::sync::OnceLock::new();
        LocalRound {
            config: CONFIG.get_or_init(config),
            base: RoundBase::Tensors(std::borrow::Cow::Borrowed(base)),
            adapter: None,
            a,
            tokenizer: &Tokenizer::Bytes,
            corpus,
            chats: &[],
            chat_format: None,
        }
    }

    /// The `A` factors a coordinator issues for `base()` and `lora()`.
    fn frozen_a() -> NamedTensors {
        covey_tensors::lora::frozen_a(&base(), lora().rank, &lora().targets, lora().seed)
    }

    fn base() -> NamedTensors {
        checkpoint::base_tensors(&Llama::init(&config(), 17, &cpu_device()).expect("init"))
    }

    fn corpus() -> Vec<String> {
        [
            "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer",
            "the slings and arrows of outrageous fortune, or to take arms against a sea of troubles,",
            "   ",
            "and by opposing end them. To die: to sleep; no more; and by a sleep to say we end",
        ]
        .iter()
        .map(|s| s.repeat(4))
        .collect()
    }

    fn run(spec: &LocalTrainSpec, resume: Option<Resume>) -> (Llama, LocalResult, Vec<RoundProgress>) {
        let mut checkpoints = Vec::new();
        let a = frozen_a();
        let (model, result) =
            train_local(round(&base(), &a, &corpus()), spec, &cpu_device(), resume, |c| checkpoints.push(c))
                .expect("train");
        (model, result, checkpoints)
    }

    fn logits(model: &Llama) -> Vec<f32> {
        let seq: Vec<i64> = (0..16).map(|i| (i * 29 % 256) as i64).collect();
        let x = Tensor::<2, Int>::from_data(TensorData::new(seq, [1, 16]), &cpu_device());
        model.forward(x).into_data().try_into_vec::<f32>().expect("f32")
    }

    /// The largest gap between two loss curves, relative, and the relative L2 distance
    /// between two sets of `B`.
    fn gaps(a: &LocalResult, b: &LocalResult) -> (f32, f64) {
        assert_eq!(a.losses.len(), b.losses.len());
        let curve = a.losses.iter().zip(&b.losses).map(|(x, y)| (x - y).abs() / y.abs()).fold(0.0f32, f32::max);
        let diff: f64 =
            a.b.iter()
                .map(|(n, t)| t.data.iter().zip(&b.b[n].data).map(|(x, y)| f64::from(x - y).powi(2)).sum::<f64>())
                .sum();
        (curve, diff.sqrt() / covey_tensors::global_norm(&b.b))
    }

    #[test]
    fn the_fast_trainer_follows_burns_loss_curve_for_50_steps() {
        // Clipping, gradient accumulation, two threads, FedProx and a chat-style mask:
        // every part of the objective and the update.
        let mut spec = spec(50);
        spec.train.grad_accum = 2;
        spec.train.threads = 2;
        spec.train.max_grad_norm = Some(0.5);
        spec.proximal_mu = 0.05;
        let a = frozen_a();
        let (base, corpus) = (base(), corpus());
        let device = cpu_device();
        let fast = train_local_adapter(round(&base, &a, &corpus), &spec, &device, None, |_| {}).expect("fast");
        let burn = train_local_adapter_burn(round(&base, &a, &corpus), &spec, &device, None, |_| {}).expect("burn");
        let (curve, b) = gaps(&fast, &burn);
        eprintln!(
            "f32 base: loss {:.4} -> {:.4}; curves differ by {curve:.2e} at most, B by {b:.2e}",
            burn.losses[0], burn.losses[49]
        );
        assert!(burn.losses[49] < burn.losses[0] - 0.05, "the run learns");
        assert!(curve < 1e-3 && b < 1e-2, "curve {curve}, B {b}");
    }

    #[test]
    fn qlora_on_a_quantized_release_with_its_adapter_apart_matches_burn_on_the_merged_weights() {
        use covey_tensors::quant::{Int4Tensor, Int8Tensor, StoredTensor};
        let spec = spec(20);
        let (base, corpus, a) = (base(), corpus(), frozen_a());
        // The release: int4 where rows allow it, int8 elsewhere; the version's adapter
        // (rank 8, on q and o) stays apart.
        let stored: std::collections::BTreeMap<String, StoredTensor> = base
            .iter()
            .map(|(n, t)| {
                let s = match t.shape.len() {
                    2 if Int4Tensor::supports(&t.shape) => StoredTensor::Int4(Int4Tensor::quantize(t).expect("int4")),
                    2 => StoredTensor::Int8(Int8Tensor::quantize(t).expect("int8")),
                    _ => StoredTensor::F32(t.clone()),
                };
                (n.clone(), s)
            })
            .collect();
        let fa = covey_tensors::lora::frozen_a(&base, 8, &[LoraTarget::Q, LoraTarget::O], 3);
        let fb: NamedTensors = fa
            .keys()
            .map(|n| {
                let rows = if n.contains("o_proj") { config().hidden_size } else { config().q_dim() };
                let data = (0..rows * 8).map(|i| ((i * 7919 % 101) as f32 / 101.0 - 0.5) * 0.2).collect();
                (n.replace("lora_A", "lora_B"), HostTensor { shape: vec![rows, 8], data })
            })
            .collect();
        let adapter = FrozenAdapter { a: &fa, b: &fb, scale: 0.25 };
        let with = |stored: std::collections::BTreeMap<String, StoredTensor>| {
            let mut r = round(&base, &a, &corpus);
            r.base = RoundBase::Stored(stored);
            r.adapter = Some(adapter);
            r
        };
        let device = cpu_device();
        let fast = train_local_adapter(with(stored.clone()), &spec, &device, None, |_| {}).expect("fast");
        let burn = train_local_adapter_burn(with(stored), &spec, &device, None, |_| {}).expect("burn");
        let (curve, b) = gaps(&fast, &burn);
        eprintln!("quantized base: curves differ by {curve:.2e} at most, B by {b:.2e}");
        assert!(curve < 1e-3 && b < 1e-2, "curve {curve}, B {b}");
    }

    #[test]
    fn plain_lora_with_a_trained_follows_burns_loop() {
        // `covey-model finetune`'s path: A trains too, from the seeded initialisation.
        let (cfg, base) = (config(), base());
        let lora = LoraConfig { ffa: false, ..lora() };
        let tokens = Tokenizer::Bytes.encode(&corpus().join("\n\n")).expect("bytes");
        let train = spec(20).train;
        let ad = cpu_device().autodiff();
        let model = checkpoint::from_base_tensors(&cfg, &base, Path::new("base"), &ad).expect("model");
        let model = model.with_lora(&lora, &ad).expect("lora");
        let mut batcher = Batcher::new(tokens.clone(), 32, 5, Path::new("text")).expect("batcher");
        let (model, report) = crate::train::train(model, &mut batcher, &train, &ad, |_, _| {}).expect("burn");
        let mut batcher = Batcher::new(tokens, 32, 5, Path::new("text")).expect("batcher");
        let run = AdapterRun {
            config: &cfg,
            base: RoundBase::Tensors(std::borrow::Cow::Borrowed(&base)),
            frozen: None,
            lora: &lora,
            a: None,
            b: None,
            start_step: 0,
            proximal_mu: 0.0,
            example_dp: None,
        };
        let trained = train_adapter(run, &train, &mut batcher, None, |_, _| {}).expect("fast");
        let curve = trained
            .steps
            .iter()
            .zip(&report.steps)
            .map(|(x, y)| (x.loss - y.loss).abs() / y.loss)
            .fold(0.0f32, f32::max);
        assert!(curve < 1e-3, "loss curves differ by {curve}");
        let burn = checkpoint::adapter_tensors(&model).expect("adapters");
        let seeded = seeded_a(&cfg, &lora);
        for (name, a) in &trained.a {
            assert_ne!(a, &seeded[name], "{name} trained");
            let diff = a.data.iter().zip(&burn[name].data).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
            assert!(diff < 1e-4, "{name}: differs from burn's by {diff}");
        }
    }

    /// Noise of a fixed, seeded stream (tests only: privacy noise comes from a CSPRNG).
    struct TestNoise(u64, usize);
    impl NoiseSource for TestNoise {
        fn add_gaussian(&mut self, values: &mut [f32], std: f64) {
            for v in values.iter_mut() {
                self.0 = self.0.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
                let u = (self.0 >> 11) as f64 / (1u64 << 53) as f64;
                *v += ((u - 0.5) * std * 3.46) as f32;
            }
            self.1 += 1;
        }
    }

    #[test]
    fn example_level_dp_clips_adds_noise_every_step_and_still_learns() {
        let (base, corpus, a) = (base(), corpus(), frozen_a());
        let device = cpu_device();
        let plain = train_local_adapter(round(&base, &a, &corpus), &spec(12), &device, None, |_| {}).expect("plain");
        // A clip far above every gradient and no noise: the same round.
        let loose = LocalTrainSpec { example_dp: Some(ExampleDp { clip: 1e9, noise_multiplier: 0.0 }), ..spec(12) };
        let mut none = TestNoise(1, 0);
        let same = train_local_adapter_private(round(&base, &a, &corpus), &loose, None, |_| {}, &mut none).expect("dp");
        let (curve, b) = gaps(&same, &plain);
        assert!(curve < 1e-4 && b < 1e-3, "curve {curve}, B {b}");
        // A tight clip with noise: noise drawn once per gradient buffer per step, B differs,
        // and the loss still falls.
        let tight = LocalTrainSpec { example_dp: Some(ExampleDp { clip: 0.05, noise_multiplier: 0.5 }), ..spec(12) };
        let mut noise = TestNoise(7, 0);
        let dp = train_local_adapter_private(round(&base, &a, &corpus), &tight, None, |_| {}, &mut noise).expect("dp");
        assert_eq!(noise.1, 12 * 3 * config().num_hidden_layers, "one draw per B per step");
        assert!(gaps(&dp, &plain).1 > 1e-2);
        assert!(dp.losses[11] < dp.losses[0], "{:?}", dp.losses);
        // Noise asked for without a source, or with adapter dropout, or a bad clip: errors.
        let err = train_local_adapter(round(&base, &a, &corpus), &tight, &device, None, |_| {}).expect_err("no source");
        assert!(err.to_string().contains("noise"), "{err}");
        let bad = LocalTrainSpec { example_dp: Some(ExampleDp { clip: -1.0, noise_multiplier: 1.0 }), ..spec(2) };
        let err =
            train_local_adapter_private(round(&base, &a, &corpus), &bad, None, |_| {}, &mut noise).expect_err("clip");
        assert!(err.to_string().contains("example_dp.clip"), "{err}");
    }

    #[test]
    fn only_b_trains_and_only_b_is_returned() {
        let (model, result, checkpoints) = run(&spec(4), None);
        let base = base();
        let a = frozen_a();
        assert_eq!(checkpoint::base_tensors(&model), base, "base weights changed");
        let adapters = checkpoint::adapter_tensors(&model).expect("adapters");
        for (name, t) in &a {
            assert_eq!(&adapters[name], t, "{name} changed");
        }
        let expected: BTreeSet<String> = factor_shapes(&config(), &lora(), 'B').into_iter().map(|(n, _)| n).collect();
        assert_eq!(result.b.keys().cloned().collect::<BTreeSet<_>>(), expected);
        for (name, b) in &result.b {
            assert!(name.contains("lora_B"), "{name}");
            assert!(b.data.iter().any(|&x| x != 0.0), "{name} did not train");
            assert_eq!(b, &adapters[name]);
        }
        assert_eq!(result.examples, 4 * 4);
        assert_eq!(result.tokens, 4 * 4 * 32);
        assert_eq!(result.documents, 3);
        assert_eq!(result.steps_run, 4);
        assert!(result.loss_first.is_finite() && result.loss_last.is_finite());
        assert_eq!(checkpoints.iter().map(|c| c.step).collect::<Vec<_>>(), [2, 4]);
        assert_eq!(checkpoints[1].b, result.b);
    }

    #[test]
    fn merging_b_into_the_base_gives_the_adapter_logits() {
        let (_, result, _) = run(&spec(4), None);
        let (config, lora, base) = (config(), lora(), base());
        let a = frozen_a();
        let device = cpu_device();
        let adapter = adapter_model(&config, &base, &lora, &a, Some(&result.b), &device).expect("adapter");
        let mut merged = base.clone();
        let mut factors = a.clone();
        factors.extend(result.b.clone());
        covey_tensors::lora::merge(&mut merged, &factors, lora.scale() as f32).expect("merge");
        let merged = checkpoint::from_base_tensors(&config, &merged, Path::new("merged"), &device).expect("model");
        let (x, y) = (logits(&adapter), logits(&merged));
        let diff = x.iter().zip(&y).map(|(p, q)| (p - q).abs()).fold(0.0f32, f32::max);
        assert!(diff < 1e-4, "merged logits differ by {diff}");
        // The update is not trivially zero.
        let plain = checkpoint::from_base_tensors(&config, &base, Path::new("base"), &device).expect("model");
        assert_ne!(logits(&plain), x);
    }

    #[test]
    fn chat_transcripts_train_on_the_assistant_turns_only() {
        use crate::chat::Message;
        let template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}";
        let format = ChatFormat { template, bos: "", eos: "</s>" };
        let chat = vec![
            Message::new("user", "Who is the Prince of Denmark? ".repeat(3).trim()),
            Message::new("assistant", "Hamlet, son of the late king."),
        ];
        let chats = vec![chat.clone(); 6];
        let (tokens, mask, documents) =
            tokenize_corpus(&[], &chats, Some(format), &Tokenizer::Bytes, &config()).expect("tokenize");
        let mask = mask.expect("a transcript masks its user turn");
        assert_eq!(documents, 6);
        let learned: String = tokens.iter().zip(&mask).filter(|(_, m)| **m).map(|(t, _)| *t as u8 as char).collect();
        assert_eq!(learned, "Hamlet, son of the late king.</s>".repeat(6));
        // Without a template, transcripts are refused with a clear error.
        let err = tokenize_corpus(&[], &chats, None, &Tokenizer::Bytes, &config()).expect_err("no template");
        assert!(err.to_string().contains("no chat template"), "{err}");
        // Plain text and transcripts together: the text is learned whole.
        let (tokens2, mask2, _) =
            tokenize_corpus(&corpus(), &chats, Some(format), &Tokenizer::Bytes, &config()).expect("tokenize");
        let mask2 = mask2.expect("mask");
        assert!(mask2[..tokens2.len() - tokens.len()].iter().all(|&m| m));

        let a = frozen_a();
        let base = base();
        let mut r = round(&base, &a, &[]);
        r.chats = &chats;
        r.chat_format = Some(format);
        let (_, result) = train_local(r, &spec(3), &cpu_device(), None, |_| {}).expect("train");
        assert!(result.loss_last.is_finite());
        assert!(result.b.values().any(|b| b.data.iter().any(|&x| x != 0.0)));
    }

    #[test]
    fn a_fixed_seed_gives_identical_b() {
        let (_, a, _) = run(&spec(3), None);
        let (_, b, _) = run(&spec(3), None);
        assert_eq!(a.b, b.b);
        assert_eq!(a.loss_last, b.loss_last);
    }

    #[test]
    fn a_round_resumes_from_a_checkpoint() {
        let spec = spec(5);
        let (_, full, checkpoints) = run(&spec, None);
        let at2 = checkpoints.into_iter().find(|c| c.step == 2).expect("checkpoint at step 2");
        let (_, resumed, later) = run(&spec, Some(Resume { step: at2.step, b: at2.b.clone() }));
        assert_eq!(resumed.steps_run, 3);
        assert_eq!(later.iter().map(|c| c.step).collect::<Vec<_>>(), [4]);
        assert_eq!(resumed.examples, full.examples);
        assert!(resumed.loss_first.is_finite() && resumed.loss_last.is_finite());
        for (name, b) in &full.b {
            assert_eq!(resumed.b[name].shape, b.shape, "{name}");
            assert_ne!(resumed.b[name], at2.b[name], "{name} did not train after resuming");
        }
        // Nothing left to train is an error.
        let a = frozen_a();
        let err = train_local_adapter(
            round(&base(), &a, &corpus()),
            &spec,
            &cpu_device(),
            Some(Resume { step: 5, b: full.b }),
            |_| {},
        )
        .expect_err("nothing to resume")
        .to_string();
        assert!(err.contains("resume.step"), "{err}");
    }

    #[test]
    fn the_proximal_term_keeps_b_smaller() {
        let plain = run(&spec(6), None).1;
        let prox = run(&LocalTrainSpec { proximal_mu: 50.0, ..spec(6) }, None).1;
        let (n0, n1) = (global_norm(&plain.b), global_norm(&prox.b));
        assert!(n1 < n0, "||B|| with mu: {n1}, without: {n0}");
        // The reported loss is the language-model loss alone: the first step (B = 0) agrees.
        assert!((plain.loss_first - prox.loss_first).abs() < 1e-6);
    }

    #[test]
    fn bad_inputs_are_errors_naming_the_tensor() {
        let (config, lora, base) = (config(), lora(), base());
        let device = cpu_device();
        let a = frozen_a();
        let spec = spec(2);
        let call = |a: &NamedTensors, base: &NamedTensors, corpus: &[String]| {
            train_local_adapter(round(base, a, corpus), &spec, &device, None, |_| {})
                .expect_err("must fail")
                .to_string()
        };
        let name = peft_name(1, LoraTarget::V, 'A');

        let mut missing = a.clone();
        missing.remove(&name);
        let err = call(&missing, &base, &corpus());
        assert!(err.contains("missing tensor") && err.contains(&name), "{err}");

        let mut wrong = a.clone();
        wrong.insert(name.clone(), HostTensor::zeros(&[3, 32]));
        let err = call(&wrong, &base, &corpus());
        assert!(err.contains(&name) && err.contains("[3, 32]"), "{err}");

        let mut nan = a.clone();
        if let Some(t) = nan.get_mut(&name) {
            t.data[0] = f32::NAN;
        }
        let err = call(&nan, &base, &corpus());
        assert!(err.contains(&name) && err.contains("non-finite"), "{err}");

        let mut extra = a.clone();
        let other = peft_name(0, LoraTarget::K, 'A');
        extra.insert(other.clone(), HostTensor::zeros(&[4, 32]));
        let err = call(&extra, &base, &corpus());
        assert!(err.contains(&other) && err.contains("unexpected"), "{err}");

        let mut bad_base = base.clone();
        bad_base.remove("model.norm.weight");
        let err = call(&a, &bad_base, &corpus());
        assert!(err.contains("model.norm.weight"), "{err}");

        let err = call(&a, &base, &[]);
        assert!(err.contains("corpus is empty"), "{err}");
        let err = call(&a, &base, &["  ".into(), "\n".into()]);
        assert!(err.contains("local corpus") && err.contains("corpus is empty"), "{err}");
        let err = call(&a, &base, &["short".into()]);
        assert!(err.contains("needs at least 33 tokens"), "{err}");

        let mut b =
            checkpoint::adapter_tensors(&adapter_model(&config, &base, &lora, &a, None, &device).expect("adapter"))
                .expect("tensors");
        b.retain(|k, _| k.contains("lora_B"));
        let bname = peft_name(0, LoraTarget::Down, 'B');
        if let Some(t) = b.get_mut(&bname) {
            t.data[1] = f32::INFINITY;
        }
        let err = train_local_adapter(round(&base, &a, &corpus()), &spec, &device, Some(Resume { step: 1, b }), |_| {})
            .expect_err("inf")
            .to_string();
        assert!(err.contains(&bname) && err.contains("LoRA B tensors"), "{err}");
    }

    #[test]
    fn the_coordinators_a_factors_cover_the_targets_in_the_adapters_shapes() {
        let device = cpu_device();
        let model = Llama::init(&config(), 3, &device).expect("init").with_lora(&lora(), &device).expect("lora");
        let mut drawn = checkpoint::adapter_tensors(&model).expect("adapters");
        drawn.retain(|k, _| k.contains("lora_A"));
        let a = frozen_a();
        assert_eq!(a.keys().collect::<Vec<_>>(), drawn.keys().collect::<Vec<_>>());
        assert!(a.iter().all(|(k, t)| t.shape == drawn[k].shape), "same [r, in] shapes");
        assert_eq!(targets_of(&a), lora().targets);
    }

    #[test]
    fn evaluating_a_fresh_model_gives_about_ln_256() {
        let device = cpu_device();
        let m = evaluate_texts(&config(), &base(), &Tokenizer::Bytes, &corpus(), 32, &device).expect("eval");
        let text_len = corpus().iter().filter(|t| !t.trim().is_empty()).map(String::len).sum::<usize>() + 2 * 2;
        assert_eq!(m.tokens, text_len - 1);
        assert!((m.mean_nll - 256f64.ln()).abs() < 0.1, "{}", m.mean_nll);
        assert!((m.bits_per_byte - m.mean_nll / std::f64::consts::LN_2).abs() < 1e-9);
        let err = evaluate_texts(&config(), &base(), &Tokenizer::Bytes, &[], 32, &device).expect_err("empty");
        assert!(err.to_string().contains("evaluation texts"), "{err}");
    }
}
