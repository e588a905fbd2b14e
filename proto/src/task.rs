//! The task a device receives, validated: the one task type of Covey. The coordinator's
//! round policy builds it, the service sends it ([`Task::to_message`]), the device checks
//! a received one field by field ([`TryFrom<pb::Task>`]) and the in-process simulator
//! trains from it. Every value is at wire precision (the wire carries `u32` and `f32`
//! for the LoRA and training fields), so a task and its message mean exactly the same.

use covey_tensors::compress::UpdateEncoding;
use covey_tensors::lora::LoraTarget;
use serde::{Deserialize, Serialize};

use crate::signing::{TaskBinding, fixed};
use crate::{ProtoError, Result, pb};

/// LoRA layout of a task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraSpec {
    /// Rank r (≥ 1).
    pub rank: usize,
    /// Scaling numerator (> 0, an `f32` on the wire).
    pub alpha: f64,
    /// Target projections (at least one, no repeats).
    pub targets: Vec<LoraTarget>,
    /// SHA-256 of the frozen `A` factors artifact.
    pub a_factors_sha256: [u8; 32],
}

/// Local training hyper-parameters of a task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainingSpec {
    /// Optimizer steps (≥ 1).
    pub steps: usize,
    /// Sequences per step (≥ 1).
    pub batch_size: usize,
    /// Tokens per sequence (≥ 1).
    pub seq_len: usize,
    /// Peak learning rate (> 0, an `f32` on the wire).
    pub learning_rate: f64,
    /// FedProx coefficient (≥ 0, an `f32` on the wire).
    pub proximal_mu: f64,
    /// Seed of batch sampling (the round's; each device mixes in its id).
    pub seed: u64,
    /// How the device encodes its update for the upload (f32, int8, int4).
    #[serde(default)]
    pub update_encoding: UpdateEncoding,
}

impl TrainingSpec {
    /// Examples behind an update: steps × batch size (the coordinator's aggregation weight).
    pub fn examples(&self) -> u64 {
        self.steps as u64 * self.batch_size as u64
    }
}

/// Privacy settings of a task.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PrivacySpec {
    /// L2 bound C of the whole update; 0: no clipping.
    pub clip_norm: f64,
    /// Local noise multiplier z (std z·C); 0: none. Needs C > 0.
    pub noise_multiplier: f64,
}

impl PrivacySpec {
    /// Check the values: both finite and ≥ 0, and noise only with clipping.
    pub fn validate(&self) -> Result<()> {
        for (field, v) in [("privacy.clip_norm", self.clip_norm), ("privacy.noise_multiplier", self.noise_multiplier)] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(ProtoError::Field { field, reason: format!("{v} is not a finite number >= 0") });
            }
        }
        if self.noise_multiplier > 0.0 && self.clip_norm == 0.0 {
            return Err(ProtoError::Field {
                field: "privacy.noise_multiplier",
                reason: "noise needs a clip norm (its std is z·C)".into(),
            });
        }
        Ok(())
    }
}

/// A device's task in one round.
#[derive(Debug, Clone, PartialEq)]
pub struct Task {
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

fn usize_of(v: u32) -> usize {
    usize::try_from(v).unwrap_or(usize::MAX)
}

fn u32_of(v: usize) -> u32 {
    u32::try_from(v).unwrap_or(u32::MAX)
}

impl Task {
    /// Hex task id.
    pub fn id_hex(&self) -> String {
        hex::encode(self.task_id)
    }

    /// Milliseconds past the deadline at `now_ms`, if it has passed.
    pub fn late_by(&self, now_ms: u64) -> Option<u64> {
        (self.deadline_unix_ms > 0 && now_ms > self.deadline_unix_ms).then(|| now_ms - self.deadline_unix_ms)
    }

    /// What the coordinator signs for `device_id` (the task framing of `covey.proto`).
    pub fn binding(&self, device_id: [u8; 32]) -> TaskBinding {
        TaskBinding {
            device_id,
            round_id: self.round_id,
            task_id: self.task_id,
            nonce: self.nonce,
            base_version: self.base_version,
            base_manifest_hash: self.base_manifest_hash,
            a_factors_sha256: self.lora.a_factors_sha256,
            rank: u32_of(self.lora.rank),
            alpha: self.lora.alpha as f32,
            targets: self.lora.targets.iter().map(|t| t.hf_name().to_owned()).collect(),
            steps: u32_of(self.training.steps),
            batch_size: u32_of(self.training.batch_size),
            seq_len: u32_of(self.training.seq_len),
            learning_rate: self.training.learning_rate as f32,
            proximal_mu: self.training.proximal_mu as f32,
            seed: self.training.seed,
            update_encoding: self.training.update_encoding.wire(),
            clip_norm: self.privacy.clip_norm,
            noise_multiplier: self.privacy.noise_multiplier,
            deadline_ms: self.deadline_unix_ms,
            max_payload_bytes: self.max_payload_bytes,
        }
    }

    /// The protobuf message, carrying the coordinator's `signature` over
    /// [`Task::binding`].
    pub fn to_message(&self, signature: &[u8; 64]) -> pb::Task {
        let b = self.binding([0; 32]);
        pb::Task {
            round_id: b.round_id,
            task_id: b.task_id.to_vec(),
            nonce: b.nonce.to_vec(),
            base_version: b.base_version,
            base_manifest_hash: b.base_manifest_hash.to_vec(),
            lora: Some(pb::LoraSpec {
                rank: b.rank,
                alpha: b.alpha,
                targets: b.targets,
                a_factors_sha256: b.a_factors_sha256.to_vec(),
            }),
            training: Some(pb::TrainingSpec {
                steps: b.steps,
                batch_size: b.batch_size,
                seq_len: b.seq_len,
                learning_rate: b.learning_rate,
                proximal_mu: b.proximal_mu,
                seed: b.seed,
                update_encoding: b.update_encoding,
            }),
            privacy: Some(pb::PrivacySpec { clip_norm: b.clip_norm, noise_multiplier: b.noise_multiplier }),
            deadline_unix_ms: b.deadline_ms,
            max_payload_bytes: b.max_payload_bytes,
            signature: signature.to_vec(),
        }
    }
}

fn field(field: &'static str, reason: impl Into<String>) -> ProtoError {
    ProtoError::Field { field, reason: reason.into() }
}

impl TryFrom<&pb::Task> for Task {
    type Error = ProtoError;

    /// Check every field once: ids and hashes of their length, known and distinct LoRA
    /// targets, positive rank, steps, batch and sequence, finite positive rates, a valid
    /// privacy pair. The signature is checked apart ([`TaskBinding::of_task`]).
    fn try_from(t: &pb::Task) -> Result<Self> {
        let lora = t.lora.as_ref().ok_or_else(|| field("lora", "missing"))?;
        let training = t.training.as_ref().ok_or_else(|| field("training", "missing"))?;
        let privacy = t.privacy.as_ref().ok_or_else(|| field("privacy", "missing"))?;
        if lora.rank == 0 {
            return Err(field("lora.rank", "must be at least 1"));
        }
        if !(lora.alpha.is_finite() && lora.alpha > 0.0) {
            return Err(field("lora.alpha", format!("{} is not a positive number", lora.alpha)));
        }
        let mut targets = Vec::with_capacity(lora.targets.len());
        for name in &lora.targets {
            let t =
                LoraTarget::parse(name).ok_or_else(|| field("lora.targets", format!("unknown projection {name}")))?;
            if !targets.contains(&t) {
                targets.push(t);
            }
        }
        if targets.is_empty() {
            return Err(field("lora.targets", "no projection"));
        }
        for (name, v) in [
            ("training.steps", training.steps),
            ("training.batch_size", training.batch_size),
            ("training.seq_len", training.seq_len),
        ] {
            if v == 0 {
                return Err(field(name, "must be at least 1"));
            }
        }
        if !(training.learning_rate.is_finite() && training.learning_rate > 0.0) {
            return Err(field(
                "training.learning_rate",
                format!("{} is not a positive number", training.learning_rate),
            ));
        }
        if !(training.proximal_mu.is_finite() && training.proximal_mu >= 0.0) {
            return Err(field("training.proximal_mu", format!("{} is not a number >= 0", training.proximal_mu)));
        }
        let privacy = PrivacySpec { clip_norm: privacy.clip_norm, noise_multiplier: privacy.noise_multiplier };
        privacy.validate()?;
        Ok(Self {
            round_id: t.round_id,
            task_id: fixed("task_id", &t.task_id)?,
            nonce: fixed("nonce", &t.nonce)?,
            base_version: t.base_version,
            base_manifest_hash: fixed("base_manifest_hash", &t.base_manifest_hash)?,
            lora: LoraSpec {
                rank: usize_of(lora.rank),
                alpha: f64::from(lora.alpha),
                targets,
                a_factors_sha256: fixed("lora.a_factors_sha256", &lora.a_factors_sha256)?,
            },
            training: TrainingSpec {
                steps: usize_of(training.steps),
                batch_size: usize_of(training.batch_size),
                seq_len: usize_of(training.seq_len),
                learning_rate: f64::from(training.learning_rate),
                proximal_mu: f64::from(training.proximal_mu),
                seed: training.seed,
                update_encoding: UpdateEncoding::from_wire(training.update_encoding).ok_or_else(|| {
                    let e = training.update_encoding;
                    field("training.update_encoding", format!("{e} is not 0 (f32), 1 (int8) or 2 (int4)"))
                })?,
            },
            privacy,
            deadline_unix_ms: t.deadline_unix_ms,
            max_payload_bytes: t.max_payload_bytes,
        })
    }
}

impl ProtoError {
    /// The field an error is about (`"task"` when it names none).
    pub fn field(&self) -> &'static str {
        match self {
            Self::Field { field, .. } => field,
            Self::Length { what, .. } => what,
            _ => "task",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task() -> Task {
        Task {
            round_id: 4,
            task_id: [1; 16],
            nonce: [2; 32],
            base_version: 3,
            base_manifest_hash: [5; 32],
            lora: LoraSpec {
                rank: 4,
                alpha: 8.0,
                targets: vec![LoraTarget::Q, LoraTarget::Down],
                a_factors_sha256: [6; 32],
            },
            training: TrainingSpec {
                steps: 10,
                batch_size: 4,
                seq_len: 64,
                learning_rate: f64::from(0.003f32),
                proximal_mu: f64::from(0.01f32),
                seed: 99,
                update_encoding: UpdateEncoding::Int4,
            },
            privacy: PrivacySpec { clip_norm: 0.5, noise_multiplier: 0.0 },
            deadline_unix_ms: 1_000,
            max_payload_bytes: 4096,
        }
    }

    #[test]
    fn a_task_survives_its_message_and_binds_what_it_says() {
        let t = task();
        let m = t.to_message(&[7; 64]);
        assert_eq!(Task::try_from(&m).expect("valid"), t);
        assert_eq!(TaskBinding::of_task([9; 32], &m).expect("binding"), t.binding([9; 32]));
        assert_eq!(t.training.examples(), 40);
    }

    #[test]
    fn every_bad_field_is_named() {
        let m = task().to_message(&[7; 64]);
        type Spoil = fn(&mut pb::Task);
        let cases: [(&str, Spoil); 7] = [
            ("lora.rank", |m| m.lora.as_mut().map_or((), |l| l.rank = 0)),
            ("lora.targets", |m| m.lora.as_mut().map_or((), |l| l.targets = vec!["wq".into()])),
            ("training.steps", |m| m.training.as_mut().map_or((), |t| t.steps = 0)),
            ("training.learning_rate", |m| m.training.as_mut().map_or((), |t| t.learning_rate = f32::NAN)),
            ("privacy.noise_multiplier", |m| {
                m.privacy = Some(pb::PrivacySpec { clip_norm: 0.0, noise_multiplier: 1.0 })
            }),
            ("nonce", |m| m.nonce.truncate(3)),
            ("training", |m| m.training = None),
        ];
        for (name, spoil) in cases {
            let mut bad = m.clone();
            spoil(&mut bad);
            let e = Task::try_from(&bad).expect_err(name);
            assert_eq!(e.field(), name, "{e}");
        }
    }
}
