//! Local training of one task, on a blocking thread: the verified version's release as
//! stored (int8 / int4) with its adapter kept apart, its `A` factors and tokenizer, the
//! local corpus; `B` is trained with `covey_model::train_local_adapter` (covey-qlora's
//! trainer), checkpointing as it goes.

use std::path::PathBuf;

use covey_model::{
    ChatFormat, LocalResult, LocalRound, LocalTrainSpec, LoraConfig, Resume, RoundProgress, TrainConfig,
};

use crate::checkpoint::CheckpointStore;
use crate::config::AgentConfig;
use crate::error::{AgentError, Result};
use crate::models::VerifiedModel;
use crate::task::{LoraSpec, Task, TrainingSpec};

/// The local training settings of `task`: its LoRA layout (FFA: `A` frozen), steps, batch
/// size, sequence length, learning rate (warm-up over the first tenth of the steps, then
/// cosine decay), FedProx coefficient and seed; `cfg.train_threads` and
/// `cfg.checkpoint_every` from the agent. The task's seed is mixed with the first 8 bytes
/// of the device id, so devices given the same seed still draw different batches while a
/// restart of the same device draws the same ones.
pub fn local_spec(task: &Task, cfg: &AgentConfig, device_id: &[u8; 32]) -> LocalTrainSpec {
    LocalTrainSpec {
        example_dp: cfg.example_dp,
        ..spec_for(&task.lora, &task.training, cfg.train_threads, cfg.checkpoint_every, device_id)
    }
}

/// Example-level DP-SGD's noise: covey-privacy's snapped Gaussian from a ChaCha20
/// stream keyed by the operating system (or by a seed, in simulations).
#[derive(Debug)]
pub struct SecureNoise(pub covey_privacy::noise::SecureRng);

impl covey_model::NoiseSource for SecureNoise {
    fn add_gaussian(&mut self, values: &mut [f32], std: f64) {
        covey_privacy::noise::add_snapped_gaussian(values, std, &mut self.0);
    }
}

/// [`local_spec`] from its parts: the task's LoRA layout and training settings, the
/// agent's training threads and checkpoint interval, and the device id. Simulations call
/// this for their virtual devices, so they train exactly as an agent would.
pub fn spec_for(
    lora: &LoraSpec,
    t: &TrainingSpec,
    train_threads: usize,
    checkpoint_every: usize,
    device_id: &[u8; 32],
) -> LocalTrainSpec {
    let mut id = [0u8; 8];
    id.copy_from_slice(&device_id[..8]);
    LocalTrainSpec {
        lora: LoraConfig {
            rank: lora.rank,
            alpha: lora.alpha,
            dropout: 0.0,
            targets: lora.targets.clone(),
            ffa: true,
            seed: 0,
        },
        train: TrainConfig {
            steps: t.steps,
            batch_size: t.batch_size,
            seq_len: t.seq_len,
            grad_accum: 1,
            lr: t.learning_rate,
            warmup_steps: t.steps / 10,
            seed: t.seed ^ u64::from_be_bytes(id),
            threads: train_threads,
            ..TrainConfig::default()
        },
        proximal_mu: t.proximal_mu,
        checkpoint_every,
        example_dp: None,
    }
}

/// What one training run needs.
#[derive(Debug)]
pub(crate) struct TrainJob {
    pub model: VerifiedModel,
    pub data_dir: PathBuf,
    pub spec: LocalTrainSpec,
    pub task: Task,
    pub store: CheckpointStore,
}

/// The trained `B` with the figures reported beside it.
#[derive(Debug)]
pub(crate) struct Trained {
    pub b: covey_tensors::NamedTensors,
    pub examples: u64,
    pub loss: f32,
    pub resumed_from: Option<usize>,
}

/// Run `job` on a blocking thread of the runtime.
pub(crate) async fn train(job: TrainJob) -> Result<Trained> {
    tokio::task::spawn_blocking(move || train_blocking(job)).await.map_err(AgentError::Join)?
}

fn train_blocking(job: TrainJob) -> Result<Trained> {
    let TrainJob { mut model, data_dir, spec, task, store } = job;
    let examples = (spec.train.steps * spec.train.batch_size * spec.train.grad_accum) as u64;
    let resume = store.load(&task);
    if let Some(c) = &resume
        && c.step >= spec.train.steps
    {
        tracing::info!(task = %task.id_hex(), "the checkpoint holds the final B: nothing left to train");
        return Ok(Trained { b: c.b.clone(), examples, loss: f32::NAN, resumed_from: Some(c.step) });
    }
    // The version's weights as released (int8 / int4), handed over to the round, with
    // the version's adapter kept apart (QLoRA: the base is never expanded to f32).
    let weights = model.take_release();
    let text = LocalText::load(&data_dir, &model)?;
    let resumed_from = resume.as_ref().map(|c| c.step);
    if let Some(step) = resumed_from {
        tracing::info!(task = %task.id_hex(), step, "resuming from a checkpoint");
    }
    let device = covey_model::cpu_device();
    // A device of a smaller rank (HetLoRA) trains against the first rows of `A`.
    let a = first_rows(model.a_factors(), spec.lora.rank);
    let lora = &model.manifest.lora;
    let adapter = model.adapter().map(|b| covey_model::FrozenAdapter {
        a: model.a_factors(),
        b,
        scale: lora.alpha / lora.rank as f32,
    });
    let round = LocalRound {
        config: &model.config,
        base: covey_model::RoundBase::Stored(weights),
        adapter,
        a: &a,
        tokenizer: &model.tokenizer,
        corpus: &text.corpus,
        chats: &text.chats,
        chat_format: text.chat_format(&model),
    };
    let resume = resume.map(|c| Resume { step: c.step, b: c.b });
    let on_checkpoint = |c: RoundProgress| {
        if let Err(e) = store.save(&task, &c) {
            tracing::warn!(task = %task.id_hex(), step = c.step, error = %e, "cannot save a checkpoint");
        }
    };
    let result: LocalResult = match spec.example_dp {
        None => covey_model::train_local_adapter(round, &spec, &device, resume, on_checkpoint)?,
        Some(_) => {
            let mut noise = SecureNoise(covey_privacy::noise::SecureRng::from_os()?);
            covey_model::train_local_adapter_private(round, &spec, resume, on_checkpoint, &mut noise)?
        }
    };
    Ok(Trained { b: result.b, examples: result.examples, loss: result.loss_last, resumed_from })
}

/// The device's text as a local round takes it: plain texts, and chat transcripts
/// (trained with the model's chat template, the loss on the assistant's turns only).
pub(crate) struct LocalText {
    pub corpus: Vec<String>,
    pub chats: Vec<Vec<covey_model::chat::Message>>,
    bos: String,
    eos: String,
}

impl LocalText {
    /// The texts of `data_dir`, with `model`'s special tokens.
    pub(crate) fn load(data_dir: &std::path::Path, model: &VerifiedModel) -> Result<Self> {
        let mut corpus = Vec::new();
        let mut chats = Vec::new();
        for d in covey_model::data::load_corpus(data_dir)? {
            match d.chat {
                Some(turns) => chats.push(turns),
                None => corpus.push(d.text),
            }
        }
        let release = &model.manifest.release;
        let token = |id: Option<u32>| match (&model.tokenizer, id) {
            (covey_model::Tokenizer::HuggingFace(t), Some(id)) => t.id_to_token(id).unwrap_or_default(),
            _ => String::new(),
        };
        let (bos, eos) = (token(release.special_tokens.bos), token(release.special_tokens.eos));
        Ok(Self { corpus, chats, bos, eos })
    }

    /// How chat transcripts are rendered for `model` (none without a chat template).
    pub(crate) fn chat_format<'a>(&'a self, model: &'a VerifiedModel) -> Option<ChatFormat<'a>> {
        model.manifest.release.chat_template.as_deref().map(|template| ChatFormat {
            template,
            bos: &self.bos,
            eos: &self.eos,
        })
    }
}

/// The first `rank` rows of every `A` (`[r, in]` → `[rank, in]`).
fn first_rows(a: &covey_tensors::NamedTensors, rank: usize) -> covey_tensors::NamedTensors {
    a.iter()
        .map(|(name, t)| {
            let cols = t.shape.get(1).copied().unwrap_or(0);
            let rows = rank.min(t.shape[0]);
            let data = t.data[..rows * cols].to_vec();
            (name.clone(), covey_tensors::HostTensor { shape: vec![rows, cols], data })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::task::sample_task;

    #[test]
    fn the_local_spec_follows_the_task() {
        let task = crate::task::validate(&sample_task()).expect("task");
        let cfg = AgentConfig { train_threads: 2, checkpoint_every: 3, ..AgentConfig::default() };
        let s = local_spec(&task, &cfg, &[0; 32]);
        s.validate().expect("valid");
        assert_eq!((s.lora.rank, s.lora.alpha, s.lora.ffa), (4, 8.0, true));
        assert_eq!((s.train.steps, s.train.batch_size, s.train.seq_len, s.train.threads), (5, 2, 16, 2));
        assert_eq!((s.train.seed, s.checkpoint_every), (9, 3));
        let other = local_spec(&task, &cfg, &[1; 32]);
        assert_ne!(other.train.seed, s.train.seed, "devices draw different batches");
    }

    #[test]
    fn a_smaller_rank_takes_the_first_rows_of_a() {
        let a: covey_tensors::NamedTensors = [(
            "x".to_string(),
            covey_tensors::HostTensor { shape: vec![4, 3], data: (0..12).map(|v| v as f32).collect() },
        )]
        .into();
        let two = first_rows(&a, 2);
        assert_eq!((two["x"].shape.clone(), two["x"].data.clone()), (vec![2, 3], vec![0.0, 1.0, 2.0, 3.0, 4.0, 5.0]));
        assert_eq!(first_rows(&a, 4), a);
    }
}
