//! Tasks: the validated form of the coordinator's `Task` message, and the per-task
//! checkpoint directory that lets a crashed agent resume where it stopped.
//!
//! `state/checkpoint/{task id hex}/` holds
//! * `task.json`: round, version, manifest hash and nonce the files belong to;
//! * `b.safetensors`: the last `B` factors, with the optimizer step in the metadata;
//! * `update.header`, `update.payload`, `update.json`: the signed update, written before
//!   the first upload attempt so that a restart re-sends the very same bytes (re-noising
//!   the same `B` and sending it again would spend privacy twice).
//!
//! A poll before submitting returns the same task (same id and nonce), so the directory
//! is found again after a restart. Everything is checked against the task before use;
//! anything that does not match is discarded.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use covey_model::{Checkpoint, LoraTarget};
use covey_proto::pb;
use covey_proto::signing::fixed;
use serde::{Deserialize, Serialize};

use crate::error::{AgentError, Result};
use crate::identity::{Identity, create_private_dir, write_atomic};
use crate::update::SignedUpdate;

/// LoRA layout of a task.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraSpec {
    /// Rank r (≥ 1).
    pub rank: usize,
    /// Scaling numerator (> 0).
    pub alpha: f64,
    /// Target projections (at least one).
    pub targets: Vec<LoraTarget>,
    /// SHA-256 of the frozen `A` factors artifact.
    pub a_factors_sha256: [u8; 32],
}

/// Local training hyper-parameters of a task.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainingSpec {
    /// Optimizer steps (≥ 1).
    pub steps: usize,
    /// Sequences per step (≥ 1).
    pub batch_size: usize,
    /// Tokens per sequence (≥ 1).
    pub seq_len: usize,
    /// Peak learning rate (> 0).
    pub learning_rate: f64,
    /// FedProx coefficient (≥ 0).
    pub proximal_mu: f64,
    /// Seed of batch sampling.
    pub seed: u64,
}

/// Privacy settings of a task.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PrivacySpec {
    /// L2 bound C of the whole update; 0: no clipping.
    pub clip_norm: f64,
    /// Local noise multiplier z (std z·C); 0: none. Needs C > 0.
    pub noise_multiplier: f64,
}

impl PrivacySpec {
    /// Check the values: both finite and ≥ 0, and noise only with clipping.
    pub fn validate(&self) -> std::result::Result<(), (&'static str, String)> {
        for (field, v) in [("privacy.clip_norm", self.clip_norm), ("privacy.noise_multiplier", self.noise_multiplier)] {
            if !(v.is_finite() && v >= 0.0) {
                return Err((field, format!("{v} is not a finite number >= 0")));
            }
        }
        if self.noise_multiplier > 0.0 && self.clip_norm == 0.0 {
            return Err(("privacy.noise_multiplier", "noise needs a clip norm (its std is z·C)".into()));
        }
        Ok(())
    }
}

/// A task, checked field by field ([`TryFrom<pb::Task>`]).
#[derive(Debug, Clone, PartialEq)]
pub struct TaskSpec {
    /// Round number.
    pub round_id: u64,
    /// 16-byte id of this assignment.
    pub task_id: [u8; 16],
    /// Single-use nonce to sign into the update header.
    pub nonce: [u8; 32],
    /// Model version to start from.
    pub base_version: u64,
    /// SHA-256 of that version's signed manifest bytes.
    pub base_manifest_hash: [u8; 32],
    /// LoRA layout.
    pub lora: LoraSpec,
    /// Local training.
    pub training: TrainingSpec,
    /// Clipping and local noise.
    pub privacy: PrivacySpec,
    /// Deadline, ms since the Unix epoch; 0: none.
    pub deadline_unix_ms: u64,
    /// Largest accepted payload in bytes; 0: no limit given.
    pub max_payload_bytes: u64,
}

impl TaskSpec {
    /// Hex task id.
    pub fn id_hex(&self) -> String {
        hex::encode(self.task_id)
    }

    /// Milliseconds past the deadline at `now_ms`, if it has passed.
    pub fn late_by(&self, now_ms: u64) -> Option<u64> {
        (self.deadline_unix_ms > 0 && now_ms > self.deadline_unix_ms).then(|| now_ms - self.deadline_unix_ms)
    }
}

fn usize_of(v: u32) -> usize {
    usize::try_from(v).unwrap_or(usize::MAX)
}

impl TryFrom<pb::Task> for TaskSpec {
    type Error = AgentError;

    fn try_from(t: pb::Task) -> Result<Self> {
        let task_hex = hex::encode(&t.task_id);
        let bad =
            |field: &'static str, reason: String| AgentError::InvalidTask { task_id: task_hex.clone(), field, reason };
        let task_id = fixed::<16>("task_id", &t.task_id).map_err(|e| bad("task_id", e.to_string()))?;
        let nonce = fixed::<32>("nonce", &t.nonce).map_err(|e| bad("nonce", e.to_string()))?;
        let base_manifest_hash = fixed::<32>("base_manifest_hash", &t.base_manifest_hash)
            .map_err(|e| bad("base_manifest_hash", e.to_string()))?;
        let lora = t.lora.ok_or_else(|| bad("lora", "missing".into()))?;
        let training = t.training.ok_or_else(|| bad("training", "missing".into()))?;
        let privacy = t.privacy.ok_or_else(|| bad("privacy", "missing".into()))?;
        if lora.rank == 0 {
            return Err(bad("lora.rank", "must be at least 1".into()));
        }
        if !(lora.alpha.is_finite() && lora.alpha > 0.0) {
            return Err(bad("lora.alpha", format!("{} is not a positive number", lora.alpha)));
        }
        let mut targets = Vec::with_capacity(lora.targets.len());
        for name in &lora.targets {
            let t = LoraTarget::parse(name).ok_or_else(|| bad("lora.targets", format!("unknown projection {name}")))?;
            if !targets.contains(&t) {
                targets.push(t);
            }
        }
        if targets.is_empty() {
            return Err(bad("lora.targets", "no projection".into()));
        }
        let a_factors_sha256 = fixed::<32>("a_factors_sha256", &lora.a_factors_sha256)
            .map_err(|e| bad("lora.a_factors_sha256", e.to_string()))?;
        for (field, v) in [
            ("training.steps", training.steps),
            ("training.batch_size", training.batch_size),
            ("training.seq_len", training.seq_len),
        ] {
            if v == 0 {
                return Err(bad(field, "must be at least 1".into()));
            }
        }
        if !(training.learning_rate.is_finite() && training.learning_rate > 0.0) {
            return Err(bad("training.learning_rate", format!("{} is not a positive number", training.learning_rate)));
        }
        if !(training.proximal_mu.is_finite() && training.proximal_mu >= 0.0) {
            return Err(bad("training.proximal_mu", format!("{} is not a number >= 0", training.proximal_mu)));
        }
        let privacy = PrivacySpec { clip_norm: privacy.clip_norm, noise_multiplier: privacy.noise_multiplier };
        privacy.validate().map_err(|(field, reason)| bad(field, reason))?;
        Ok(Self {
            round_id: t.round_id,
            task_id,
            nonce,
            base_version: t.base_version,
            base_manifest_hash,
            lora: LoraSpec { rank: usize_of(lora.rank), alpha: f64::from(lora.alpha), targets, a_factors_sha256 },
            training: TrainingSpec {
                steps: usize_of(training.steps),
                batch_size: usize_of(training.batch_size),
                seq_len: usize_of(training.seq_len),
                learning_rate: f64::from(training.learning_rate),
                proximal_mu: f64::from(training.proximal_mu),
                seed: training.seed,
            },
            privacy,
            deadline_unix_ms: t.deadline_unix_ms,
            max_payload_bytes: t.max_payload_bytes,
        })
    }
}

/// Check the coordinator's signature over a task: the task framing of `covey.proto`
/// rebuilt from the received fields, bound to this device, verified with the coordinator
/// key recorded at enrolment. A task someone else wrote (or altered on the way: clip
/// norm, noise, `A` factors) is [`AgentError::InvalidTask`] and is not trained on.
pub fn verify_task(t: &pb::Task, device_id: &[u8; 32], coordinator_key: &[u8; 32]) -> Result<()> {
    let bad = |field: &'static str, reason: String| AgentError::InvalidTask {
        task_id: hex::encode(&t.task_id),
        field,
        reason,
    };
    let bytes = covey_proto::signing::TaskBinding::of_task(*device_id, t)
        .and_then(|b| b.to_bytes())
        .map_err(|e| bad("task", e.to_string()))?;
    covey_proto::keys::verify(coordinator_key, &bytes, &t.signature)
        .map_err(|_| bad("signature", "does not verify with the coordinator key recorded at enrolment".into()))
}

/// Directory of the per-task checkpoints, under the state directory.
pub const CHECKPOINT_DIR: &str = "checkpoint";
const TASK_FILE: &str = "task.json";
const B_FILE: &str = "b.safetensors";
const UPDATE_HEADER_FILE: &str = "update.header";
const UPDATE_PAYLOAD_FILE: &str = "update.payload";
const UPDATE_META_FILE: &str = "update.json";
const STEP_KEY: &str = "covey.step";
const SENT_FILE: &str = "sent.txt";
/// Number of task ids remembered as sent.
pub const SENT_MEMORY: usize = 256;

/// What binds a checkpoint directory to its task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct TaskBinding {
    round_id: u64,
    base_version: u64,
    base_manifest_hash: String,
    nonce: String,
    steps: usize,
}

impl TaskBinding {
    fn of(task: &TaskSpec) -> Self {
        Self {
            round_id: task.round_id,
            base_version: task.base_version,
            base_manifest_hash: hex::encode(task.base_manifest_hash),
            nonce: hex::encode(task.nonce),
            steps: task.training.steps,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct UpdateMeta {
    train_loss: f32,
    payload_len: u64,
}

/// The per-task checkpoints of one state directory.
#[derive(Debug, Clone)]
pub struct CheckpointStore {
    root: PathBuf,
}

impl CheckpointStore {
    /// The store of `state_dir` (`state_dir/checkpoint`).
    pub fn new(state_dir: &Path) -> Self {
        Self { root: state_dir.join(CHECKPOINT_DIR) }
    }

    fn dir(&self, task_id: &[u8; 16]) -> PathBuf {
        self.root.join(hex::encode(task_id))
    }

    /// Task ids (hex) that have a checkpoint directory.
    pub fn pending(&self) -> Vec<String> {
        let mut out: Vec<String> = std::fs::read_dir(&self.root)
            .map(|rd| rd.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
            .unwrap_or_default();
        out.retain(|n| n.len() == 32 && n.bytes().all(|b| b.is_ascii_hexdigit()));
        out.sort();
        out
    }

    /// Delete the directory of `task_id` (nothing if absent).
    pub fn remove(&self, task_id: &[u8; 16]) {
        let dir = self.dir(task_id);
        if dir.exists()
            && let Err(e) = std::fs::remove_dir_all(&dir)
        {
            tracing::warn!(path = %dir.display(), error = %e, "cannot remove a checkpoint");
        }
    }

    /// Delete every checkpoint but `keep`'s: tasks the coordinator no longer offers.
    pub fn remove_others(&self, keep: &[u8; 16]) {
        let keep = hex::encode(keep);
        for name in self.pending() {
            if name != keep
                && let Ok(bytes) = hex::decode(&name)
                && let Ok(id) = <[u8; 16]>::try_from(bytes)
            {
                tracing::info!(task = %name, "dropping the checkpoint of a task no longer offered");
                self.remove(&id);
            }
        }
    }

    /// The directory of `task`, created and bound to it; an existing directory bound to
    /// something else (same id, other nonce or version) is emptied first.
    fn bound_dir(&self, task: &TaskSpec) -> Result<PathBuf> {
        let dir = self.dir(&task.task_id);
        if !self.matches(task) {
            self.remove(&task.task_id);
            create_private_dir(&dir)?;
            let json = serde_json::to_vec_pretty(&TaskBinding::of(task))
                .map_err(|e| AgentError::json(dir.join(TASK_FILE), e))?;
            write_atomic(&dir.join(TASK_FILE), &json)?;
        }
        Ok(dir)
    }

    fn matches(&self, task: &TaskSpec) -> bool {
        let path = self.dir(&task.task_id).join(TASK_FILE);
        std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice::<TaskBinding>(&b).ok())
            .is_some_and(|b| b == TaskBinding::of(task))
    }

    /// Save `B` after `checkpoint.step` steps of `task`.
    pub fn save(&self, task: &TaskSpec, checkpoint: &Checkpoint) -> Result<()> {
        let dir = self.bound_dir(task)?;
        let meta = HashMap::from([(STEP_KEY.to_string(), checkpoint.step.to_string())]);
        let bytes = covey_tensors::encode(&checkpoint.b, Some(meta))
            .map_err(|source| AgentError::Tensor { what: "checkpoint", source })?;
        write_atomic(&dir.join(B_FILE), &bytes)
    }

    /// The last checkpoint of `task`, if one was saved for exactly this task. An
    /// unreadable checkpoint is logged and ignored (training restarts from zero).
    pub fn load(&self, task: &TaskSpec) -> Option<Checkpoint> {
        if !self.matches(task) {
            return None;
        }
        let path = self.dir(&task.task_id).join(B_FILE);
        let bytes = std::fs::read(&path).ok()?;
        let parsed = covey_tensors::decode(&bytes).ok().and_then(|(b, meta)| {
            let step = meta.get(STEP_KEY)?.parse::<usize>().ok()?;
            (step > 0 && step <= task.training.steps && b.values().all(|t| t.is_finite())).then_some((step, b))
        });
        match parsed {
            Some((step, b)) => Some(Checkpoint { step, b }),
            None => {
                tracing::warn!(path = %path.display(), "ignoring an unreadable checkpoint");
                None
            }
        }
    }

    /// Record that an update of `task` is about to leave the device (kept for the last
    /// [`SENT_MEMORY`] tasks, across restarts).
    pub fn mark_sent(&self, task: &TaskSpec) -> Result<()> {
        let mut ids = self.sent();
        let id = task.id_hex();
        if !ids.contains(&id) {
            ids.push(id);
        }
        let keep = ids.len().saturating_sub(SENT_MEMORY);
        create_private_dir(&self.root)?;
        write_atomic(&self.root.join(SENT_FILE), ids[keep..].join("\n").as_bytes())
    }

    /// Whether an update of `task` was already sent (or an attempt was made).
    pub fn was_sent(&self, task: &TaskSpec) -> bool {
        self.sent().contains(&task.id_hex())
    }

    fn sent(&self) -> Vec<String> {
        std::fs::read_to_string(self.root.join(SENT_FILE))
            .map(|t| t.lines().map(str::to_owned).collect())
            .unwrap_or_default()
    }

    /// Persist the signed update of `task` before it is first sent.
    pub fn save_update(&self, task: &TaskSpec, update: &SignedUpdate) -> Result<()> {
        let dir = self.bound_dir(task)?;
        let mut header = update.header_bytes().to_vec();
        header.extend_from_slice(update.signature());
        write_atomic(&dir.join(UPDATE_PAYLOAD_FILE), update.payload())?;
        write_atomic(&dir.join(UPDATE_HEADER_FILE), &header)?;
        let meta = UpdateMeta { train_loss: update.train_loss(), payload_len: update.payload().len() as u64 };
        let json = serde_json::to_vec(&meta).map_err(|e| AgentError::json(dir.join(UPDATE_META_FILE), e))?;
        write_atomic(&dir.join(UPDATE_META_FILE), &json)
    }

    /// The signed update persisted for `task`, if any and if it still verifies: signed by
    /// this device, bound to this task, payload matching its hash. A mismatch is logged and
    /// ignored.
    pub fn load_update(&self, task: &TaskSpec, identity: &Identity) -> Option<SignedUpdate> {
        if !self.matches(task) {
            return None;
        }
        let dir = self.dir(&task.task_id);
        let meta: UpdateMeta = serde_json::from_slice(&std::fs::read(dir.join(UPDATE_META_FILE)).ok()?).ok()?;
        let header = std::fs::read(dir.join(UPDATE_HEADER_FILE)).ok()?;
        let payload = std::fs::read(dir.join(UPDATE_PAYLOAD_FILE)).ok()?;
        if header.len() < 64 || payload.len() as u64 != meta.payload_len {
            return None;
        }
        let (header_bytes, signature) = header.split_at(header.len() - 64);
        match SignedUpdate::reload(header_bytes, signature, payload, meta.train_loss, task, identity) {
            Ok(u) => Some(u),
            Err(e) => {
                tracing::warn!(task = %task.id_hex(), error = %e, "ignoring a persisted update that does not verify");
                None
            }
        }
    }
}

/// `B` factors of a checkpoint, for tests.
#[cfg(test)]
pub(crate) fn sample_b() -> covey_model::NamedTensors {
    let mut b = covey_model::NamedTensors::new();
    b.insert(
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight".into(),
        covey_tensors::HostTensor::new(vec![2, 2], vec![3.0, 0.0, 0.0, 4.0]).expect("tensor"),
    );
    b.insert(
        "base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight".into(),
        covey_tensors::HostTensor::new(vec![2, 1], vec![12.0, 0.0]).expect("tensor"),
    );
    b
}

/// A valid task message, for tests.
#[cfg(test)]
pub(crate) fn sample_task() -> pb::Task {
    pb::Task {
        round_id: 4,
        task_id: vec![1; 16],
        nonce: vec![2; 32],
        base_version: 3,
        base_manifest_hash: vec![5; 32],
        lora: Some(pb::LoraSpec {
            rank: 4,
            alpha: 8.0,
            targets: vec!["q_proj".into(), "v".into()],
            a_factors_sha256: vec![6; 32],
        }),
        training: Some(pb::TrainingSpec {
            steps: 5,
            batch_size: 2,
            seq_len: 16,
            learning_rate: 0.01,
            proximal_mu: 0.0,
            seed: 9,
        }),
        privacy: Some(pb::PrivacySpec { clip_norm: 1.0, noise_multiplier: 0.0 }),
        deadline_unix_ms: 0,
        max_payload_bytes: 1 << 20,
        signature: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_task_message_is_validated_field_by_field() {
        let t = TaskSpec::try_from(sample_task()).expect("valid");
        assert_eq!(t.lora.targets, vec![LoraTarget::Q, LoraTarget::V]);
        assert_eq!(t.training.steps, 5);
        type Mutation = Box<dyn Fn(&mut pb::Task)>;
        let cases: Vec<(&str, Mutation)> = vec![
            ("task_id", Box::new(|t| t.task_id = vec![1; 15])),
            ("nonce", Box::new(|t| t.nonce.clear())),
            ("lora", Box::new(|t| t.lora = None)),
            ("lora.targets", Box::new(|t| t.lora.as_mut().expect("lora").targets = vec!["qq".into()])),
            ("training.steps", Box::new(|t| t.training.as_mut().expect("training").steps = 0)),
            ("privacy.clip_norm", Box::new(|t| t.privacy.as_mut().expect("privacy").clip_norm = f64::NAN)),
            (
                "privacy.noise_multiplier",
                Box::new(|t| {
                    *t.privacy.as_mut().expect("privacy") = pb::PrivacySpec { clip_norm: 0.0, noise_multiplier: 1.0 }
                }),
            ),
        ];
        for (field, mutate) in cases {
            let mut m = sample_task();
            mutate(&mut m);
            let err = TaskSpec::try_from(m).expect_err(field).to_string();
            assert!(err.contains(field), "{field}: {err}");
        }
    }

    #[test]
    fn checkpoints_are_bound_to_their_task() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = CheckpointStore::new(dir.path());
        let task = TaskSpec::try_from(sample_task()).expect("task");
        assert!(store.load(&task).is_none());
        store.save(&task, &Checkpoint { step: 2, b: sample_b() }).expect("save");
        let back = store.load(&task).expect("checkpoint");
        assert_eq!((back.step, &back.b), (2, &sample_b()));
        assert_eq!(store.pending(), vec![task.id_hex()]);

        // Same id, another nonce: not this task's.
        let other = TaskSpec { nonce: [9; 32], ..task.clone() };
        assert!(store.load(&other).is_none());
        store.remove_others(&[7; 16]);
        assert!(store.pending().is_empty());

        assert!(!store.was_sent(&task));
        store.mark_sent(&task).expect("mark");
        store.mark_sent(&task).expect("mark twice");
        assert!(store.was_sent(&task) && !store.was_sent(&TaskSpec { task_id: [3; 16], ..task.clone() }));
        assert!(store.pending().is_empty(), "the record is not a task directory");
    }
}
