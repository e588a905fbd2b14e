//! Tasks: the coordinator's signed `Task` message, checked ([`verify_task`]) and
//! validated into [`covey_proto::task::Task`], the one task type the coordinator, the
//! device and the simulator share.

use covey_proto::pb;

use crate::error::{AgentError, Result};

pub use covey_proto::task::{LoraSpec, PrivacySpec, Task, TrainingSpec};

/// Validate a received task field by field; a bad field is [`AgentError::InvalidTask`].
pub fn validate(t: &pb::Task) -> Result<Task> {
    Task::try_from(t).map_err(|e| AgentError::InvalidTask {
        task_id: hex::encode(&t.task_id),
        field: e.field(),
        reason: e.to_string(),
    })
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
            update_encoding: 0,
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
    use covey_tensors::lora::LoraTarget;

    #[test]
    fn a_task_message_is_validated_field_by_field() {
        let t = validate(&sample_task()).expect("valid");
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
            let err = validate(&m).expect_err(field).to_string();
            assert!(err.contains(field), "{field}: {err}");
        }
    }
}
