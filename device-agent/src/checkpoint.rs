//! The per-task checkpoint directory that lets a crashed agent resume where it stopped.
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

use covey_model::RoundProgress;
use serde::{Deserialize, Serialize};

use crate::error::{AgentError, Result};
use crate::identity::{Identity, create_private_dir, write_atomic};
use crate::task::Task;
use crate::update::SignedUpdate;

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
    fn of(task: &Task) -> Self {
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
    fn bound_dir(&self, task: &Task) -> Result<PathBuf> {
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

    fn matches(&self, task: &Task) -> bool {
        let path = self.dir(&task.task_id).join(TASK_FILE);
        std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice::<TaskBinding>(&b).ok())
            .is_some_and(|b| b == TaskBinding::of(task))
    }

    /// Save `B` after `checkpoint.step` steps of `task`.
    pub fn save(&self, task: &Task, checkpoint: &RoundProgress) -> Result<()> {
        let dir = self.bound_dir(task)?;
        let meta = HashMap::from([(STEP_KEY.to_string(), checkpoint.step.to_string())]);
        let bytes = covey_tensors::encode(&checkpoint.b, Some(meta))
            .map_err(|source| AgentError::Tensor { what: "checkpoint", source })?;
        write_atomic(&dir.join(B_FILE), &bytes)
    }

    /// The last checkpoint of `task`, if one was saved for exactly this task. An
    /// unreadable checkpoint is logged and ignored (training restarts from zero).
    pub fn load(&self, task: &Task) -> Option<RoundProgress> {
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
            Some((step, b)) => Some(RoundProgress { step, b }),
            None => {
                tracing::warn!(path = %path.display(), "ignoring an unreadable checkpoint");
                None
            }
        }
    }

    /// Record that an update of `task` is about to leave the device (kept for the last
    /// [`SENT_MEMORY`] tasks, across restarts).
    pub fn mark_sent(&self, task: &Task) -> Result<()> {
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
    pub fn was_sent(&self, task: &Task) -> bool {
        self.sent().contains(&task.id_hex())
    }

    fn sent(&self) -> Vec<String> {
        std::fs::read_to_string(self.root.join(SENT_FILE))
            .map(|t| t.lines().map(str::to_owned).collect())
            .unwrap_or_default()
    }

    /// Persist the signed update of `task` before it is first sent.
    pub fn save_update(&self, task: &Task, update: &SignedUpdate) -> Result<()> {
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
    pub fn load_update(&self, task: &Task, identity: &Identity) -> Option<SignedUpdate> {
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
pub(crate) fn sample_b() -> covey_tensors::NamedTensors {
    let mut b = covey_tensors::NamedTensors::new();
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::task::{sample_task, validate};

    #[test]
    fn checkpoints_are_bound_to_their_task() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = CheckpointStore::new(dir.path());
        let task = validate(&sample_task()).expect("task");
        assert!(store.load(&task).is_none());
        store.save(&task, &RoundProgress { step: 2, b: sample_b() }).expect("save");
        let back = store.load(&task).expect("checkpoint");
        assert_eq!((back.step, &back.b), (2, &sample_b()));
        assert_eq!(store.pending(), vec![task.id_hex()]);

        // Same id, another nonce: not this task's.
        let other = Task { nonce: [9; 32], ..task.clone() };
        assert!(store.load(&other).is_none());
        store.remove_others(&[7; 16]);
        assert!(store.pending().is_empty());

        assert!(!store.was_sent(&task));
        store.mark_sent(&task).expect("mark");
        store.mark_sent(&task).expect("mark twice");
        assert!(store.was_sent(&task) && !store.was_sent(&Task { task_id: [3; 16], ..task.clone() }));
        assert!(store.pending().is_empty(), "the record is not a task directory");
    }
}
