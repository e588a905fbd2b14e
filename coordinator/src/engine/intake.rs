//! Update intake: the signed header is checked against the round's plan before any
//! payload byte is read ([`Coordinator::begin_upload`]); the streamed payload is then
//! checked and stored with its row in one step ([`Coordinator::finish_upload`]).

use std::collections::HashSet;
use std::sync::{Arc, Mutex as StdMutex};

use covey_proto::keys;
use covey_proto::signing::UpdateHeader;
use tracing::{info, warn};

use super::Coordinator;
use crate::artifacts::PendingBlob;
use crate::error::{CoordinatorError, Rejection, Result};
use crate::round::RoundPlan;
use crate::store::UpdateRecord;

/// A verified update header: the upload may now stream its payload. Holds the device's
/// upload slot (one upload per device at a time) until dropped.
#[derive(Debug)]
pub struct UploadPermit {
    header: UpdateHeader,
    signed_header: Vec<u8>,
    signature: Vec<u8>,
    plan: RoundPlan,
    _slot: UploadSlot,
}

impl UploadPermit {
    /// The payload length the header signs.
    pub fn payload_len(&self) -> u64 {
        self.header.payload_len
    }
}

#[derive(Debug)]
struct UploadSlot {
    busy: Arc<StdMutex<HashSet<[u8; 32]>>>,
    device: [u8; 32],
}

impl Drop for UploadSlot {
    fn drop(&mut self) {
        self.busy.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(&self.device);
    }
}

impl Coordinator {
    /// Count and log a refused upload (the one place this is done, for the engine and the
    /// service's stream checks); the error to return.
    pub fn reject(&self, r: Rejection) -> CoordinatorError {
        self.metrics.reject(r.label());
        warn!(reason = r.label(), "update refused: {r}");
        CoordinatorError::Rejected(r)
    }

    /// Verify and durably store one upload whose payload is in memory:
    /// [`Coordinator::begin_upload`], then [`Coordinator::finish_upload`]. Returns the
    /// update's id and round.
    pub async fn accept_update(
        &self,
        signed_header: &[u8],
        signature: &[u8],
        payload: &[u8],
        train_loss: f32,
    ) -> Result<(u64, u64)> {
        let permit = self.begin_upload(signed_header, signature).await?;
        let mut pending = self.uploads.pending()?;
        pending.write(payload)?;
        self.finish_upload(permit, pending, train_loss).await
    }

    /// Check a signed update header before any payload byte is read: the device is
    /// enrolled, not revoked, and signed it; it names the open round, this device's task
    /// and unused nonce, and the round plan's base version, clip norm, noise and number
    /// of examples, and a payload length within the limit. At most one upload per device
    /// is in progress. A refusal is [`CoordinatorError::Rejected`].
    pub async fn begin_upload(&self, signed_header: &[u8], signature: &[u8]) -> Result<UploadPermit> {
        let header =
            UpdateHeader::parse(signed_header).map_err(|e| self.reject(Rejection::MalformedHeader(e.to_string())))?;
        let Some(device) = self.store.device(&header.device_id).await? else {
            return Err(self.reject(Rejection::UnknownDevice));
        };
        if keys::verify(&device.public_key, signed_header, signature).is_err() {
            return Err(self.reject(Rejection::BadSignature));
        }
        if device.revoked {
            return Err(self.reject(Rejection::RevokedDevice));
        }
        let Some(round) = self.store.active_round().await? else { return Err(self.reject(Rejection::NoAssignment)) };
        if header.round_id != round.id {
            return Err(self.reject(Rejection::WrongRound { expected: round.id, found: header.round_id }));
        }
        if !round.state.accepts_updates() {
            return Err(self.reject(Rejection::NoAssignment));
        }
        if self.now_ms() >= round.deadline_ms {
            return Err(self.reject(Rejection::DeadlinePassed));
        }
        let Some(assignment) = self.store.assignment(round.id, &device.id).await? else {
            return Err(self.reject(Rejection::NoAssignment));
        };
        if header.task_id != assignment.task_id {
            return Err(self.reject(Rejection::WrongTask));
        }
        if assignment.used || assignment.declined.is_some() || header.nonce != assignment.nonce {
            return Err(self.reject(Rejection::Replay));
        }
        let limits = self.config.privacy.participation;
        if limits != Default::default() {
            let p = self.store.participation(&device.id).await?;
            if !limits.allows(p.map_or(0, |p| p.count), p.map(|p| p.last_round), round.id) {
                return Err(self.reject(Rejection::ParticipationLimit {
                    contributions: p.map_or(0, |p| p.count),
                    last_round: p.map_or(0, |p| p.last_round),
                }));
            }
        }
        let plan = self.plan_of(&round).await?;
        if header.base_manifest_hash != plan.frame.base_manifest_hash {
            return Err(self.reject(Rejection::WrongBaseVersion));
        }
        let (c, z) = (plan.privacy.clip_norm, plan.privacy.noise_multiplier);
        if header.clip_norm.to_bits() != c.to_bits() || header.noise_multiplier.to_bits() != z.to_bits() {
            return Err(self.reject(Rejection::PrivacyMismatch(format!(
                "header C = {}, z = {}; task C = {c}, z = {z}",
                header.clip_norm, header.noise_multiplier
            ))));
        }
        if header.payload_len > plan.frame.max_payload_bytes {
            return Err(self.reject(Rejection::Oversized { limit: plan.frame.max_payload_bytes }));
        }
        let expected = plan.examples_per_update();
        if header.num_examples != expected {
            return Err(self.reject(Rejection::ExamplesMismatch { expected, found: header.num_examples }));
        }
        if !self.uploading.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(device.id) {
            return Err(self.reject(Rejection::UploadInProgress));
        }
        let slot = UploadSlot { busy: self.uploading.clone(), device: device.id };
        Ok(UploadPermit {
            header,
            signed_header: signed_header.to_vec(),
            signature: signature.to_vec(),
            plan,
            _slot: slot,
        })
    }

    /// Finish an upload whose payload streamed into `pending`: length and SHA-256 as
    /// signed, tensors, shapes, finiteness and norm; then the blob is committed and the
    /// row inserted (nonce consumed) in one transaction. A refused upload leaves no blob.
    /// Under local noise the training loss and the within-clip bit are not stored.
    /// Returns the update's id and round.
    pub async fn finish_upload(
        &self,
        permit: UploadPermit,
        mut pending: PendingBlob,
        train_loss: f32,
    ) -> Result<(u64, u64)> {
        let h = &permit.header;
        let bytes = pending.len();
        if pending.len() != h.payload_len {
            return Err(self.reject(Rejection::LengthMismatch { expected: h.payload_len, found: pending.len() }));
        }
        if pending.sha256() != h.payload_sha256 {
            return Err(self.reject(Rejection::PayloadHash));
        }
        let payload = pending.read_all()?;
        self.check_payload(&payload, &permit.plan).map_err(|r| self.reject(r))?;
        drop(payload);
        let existed = self.uploads.size(&h.payload_sha256).is_ok();
        let payload_sha256 = pending.commit()?;
        crate::crashpoint::reach("upload-blob-committed");
        let local_noise = permit.plan.privacy.noise_multiplier > 0.0;
        let record = UpdateRecord {
            id: 0,
            round_id: permit.plan.frame.round_id,
            device_id: h.device_id,
            header: permit.signed_header.clone(),
            signature: permit.signature.clone(),
            payload_sha256,
            num_examples: permit.plan.examples_per_update(),
            within_clip: if local_noise { None } else { h.within_clip },
            train_loss: (train_loss.is_finite() && !local_noise).then_some(train_loss),
            received_ms: self.now_ms(),
        };
        let stored = self.store.insert_update(&record, &h.nonce).await;
        if stored.is_err() && !existed {
            self.uploads.remove(&payload_sha256)?;
        }
        let id = match stored {
            Ok(id) => {
                crate::crashpoint::reach("upload-stored");
                id
            }
            Err(CoordinatorError::Rejected(r)) => return Err(self.reject(r)),
            Err(e) => return Err(e),
        };
        self.metrics.updates_accepted.inc();
        self.metrics.bytes_received.inc_by(bytes);
        info!(update = id, round = permit.plan.frame.round_id, bytes, "update stored");
        self.wake.notify_one();
        Ok((id, permit.plan.frame.round_id))
    }

    /// Shapes, finiteness and norm of a payload (the decoded tensors are not kept: the
    /// aggregation decodes the stored payload again, after re-verifying it).
    fn check_payload(&self, payload: &[u8], plan: &RoundPlan) -> std::result::Result<(), Rejection> {
        let (tensors, encoding) =
            covey_tensors::compress::decode_update(payload).map_err(|e| Rejection::BadPayload(e.to_string()))?;
        if encoding != plan.training.update_encoding {
            return Err(Rejection::BadPayload(format!(
                "the update is encoded as {encoding}, the task asked for {}",
                plan.training.update_encoding
            )));
        }
        // One rank for every tensor, one of the ranks devices may train (HetLoRA).
        let rank = tensors.values().next().and_then(|t| t.shape.get(1).copied()).unwrap_or(0);
        let allowed = self.config.lora.allowed_ranks();
        if !allowed.contains(&rank) {
            return Err(Rejection::WrongTensors(format!("rank {rank} is not one of {allowed:?}")));
        }
        for (name, full) in &self.expected_b {
            let shape = [full[0], rank];
            match tensors.get(name) {
                None => return Err(Rejection::WrongTensors(format!("`{name}` is missing"))),
                Some(t) if t.shape != shape => {
                    return Err(Rejection::WrongTensors(format!(
                        "`{name}` has shape {:?}, expected {shape:?}",
                        t.shape
                    )));
                }
                Some(t) if !t.is_finite() => return Err(Rejection::NonFinite(name.clone())),
                Some(_) => {}
            }
        }
        if let Some(extra) = tensors.keys().find(|n| !self.expected_b.contains_key(*n)) {
            return Err(Rejection::WrongTensors(format!("unexpected tensor `{extra}`")));
        }
        let values = self.b_values * rank / self.config.lora.rank;
        if let Some(bound) = crate::round::update_norm_bound(&self.config, plan, values) {
            let norm = covey_tensors::global_norm(&tensors);
            if norm > bound {
                return Err(Rejection::NormTooLarge { norm, bound });
            }
        }
        Ok(())
    }
}
