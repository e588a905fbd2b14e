//! Enrolment, tokens, request authentication, polls and tasks, heartbeats, downloads and
//! revocation: what a device (or an operator, about devices) asks.

use std::time::Duration;

use covey_proto::keys;
use covey_proto::signing::{self, DeviceMethod, MAX_LABEL_BYTES};
use tracing::{info, warn};

use super::{Coordinator, PollOutcome, SignedTask, now_wall_ms};
use crate::error::{Rejection, Result};
use crate::store::{DeviceRecord, EnrollOutcome, RevokeOutcome, TokenRecord, VersionRecord};

/// Longest reason a device may give for declining a task.
pub const MAX_DECLINE_REASON: usize = 512;

/// A device's `last_seen` is written at most this often (each write is an fsync).
const TOUCH_EVERY_MS: u64 = 1000;

fn bad_request(field: &'static str, e: impl std::fmt::Display) -> Rejection {
    Rejection::BadRequest { field, reason: e.to_string() }
}

impl Coordinator {
    /// Enrol a device with an enrolment token. Re-enrolling the same key is idempotent
    /// (no use of the token is consumed); a revoked key stays revoked; expired, used-up
    /// and burned tokens enrol no one. Rate-limited over the coordinator and per token.
    pub async fn enroll(&self, public_key: &[u8], token: &str, label: &str) -> Result<[u8; 32]> {
        if self.enroll_limiter.check().is_err() {
            return Err(self.refuse(Rejection::EnrolmentRate));
        }
        let token_hash = keys::sha256(token.as_bytes());
        if self.token_limiter.check_key(&token_hash).is_err() {
            return Err(self.refuse(Rejection::EnrolmentTokenRate));
        }
        let pk: [u8; 32] =
            signing::fixed("public_key", public_key).map_err(|e| self.refuse(bad_request("public_key", e)))?;
        if label.len() > MAX_LABEL_BYTES {
            return Err(self.refuse(bad_request("label", format!("longer than {MAX_LABEL_BYTES} bytes"))));
        }
        if label.chars().any(char::is_control) {
            return Err(self.refuse(bad_request("label", "holds control characters")));
        }
        let id = keys::device_id(&pk);
        let record = DeviceRecord {
            id,
            public_key: pk,
            label: label.to_owned(),
            enrolled_ms: now_wall_ms(),
            last_seen_ms: self.now_ms(),
            revoked: false,
        };
        let refused = match self.store.enroll(&record, &token_hash, self.now_ms()).await? {
            EnrollOutcome::Enrolled => {
                crate::crashpoint::reach("enroll-stored");
                info!(device = %hex::encode(&id[..8]), label, "enrolled");
                self.metrics.active_devices.inc();
                self.wake.notify_one();
                return Ok(id);
            }
            EnrollOutcome::AlreadyEnrolled => return Ok(id),
            EnrollOutcome::DeviceRevoked => Rejection::RevokedDevice,
            EnrollOutcome::TokenUnknown => Rejection::TokenUnknown,
            EnrollOutcome::TokenExpired => Rejection::TokenExpired,
            EnrollOutcome::TokenUsedUp => Rejection::TokenUsedUp,
            EnrollOutcome::TokenBurned => Rejection::TokenBurned,
        };
        Err(self.refuse(refused))
    }

    /// Mint an enrolment token for `uses` devices (at least 1), expiring after `ttl`.
    /// Returns the token (64 hex characters; only its SHA-256 is stored) and its expiry.
    pub async fn mint_token(&self, uses: u32, ttl: Duration, label: &str) -> Result<(String, u64)> {
        let secret: [u8; 32] = keys::random_bytes()?;
        let token = hex::encode(secret);
        let expires_ms = self.now_ms() + ttl.as_millis().max(1) as u64;
        self.store
            .insert_token(&TokenRecord {
                hash: keys::sha256(token.as_bytes()),
                label: label.to_owned(),
                uses_left: i64::from(uses.max(1)),
                expires_ms,
                burned: false,
                created_ms: now_wall_ms(),
            })
            .await?;
        info!(uses = uses.max(1), expires_ms, label, "enrolment token minted");
        Ok((token, expires_ms))
    }

    /// Authenticate a signed device request about `subject` (see
    /// [`signing::device_request_bytes_for`]), then apply the device's rate limit.
    async fn authenticate(
        &self,
        method: DeviceMethod,
        device_id: &[u8],
        timestamp_ms: u64,
        signature: &[u8],
        subject: &[u8],
    ) -> Result<DeviceRecord> {
        let id: [u8; 32] =
            signing::fixed("device_id", device_id).map_err(|e| self.refuse(bad_request("device_id", e)))?;
        let Some(device) = self.store.device(&id).await? else { return Err(self.refuse(Rejection::UnknownDevice)) };
        let bytes = signing::device_request_bytes_for(method, &id, timestamp_ms, subject);
        if keys::verify(&device.public_key, &bytes, signature).is_err() {
            return Err(self.refuse(Rejection::BadRequestSignature));
        }
        let skew = self.config.enrollment.max_clock_skew.as_millis() as u64;
        let now = self.now_ms();
        if timestamp_ms.abs_diff(now) > skew {
            return Err(self.refuse(Rejection::ClockSkew));
        }
        if device.revoked {
            return Err(self.refuse(Rejection::RevokedDevice));
        }
        if self.device_limiter.check_key(&id).is_err() {
            return Err(self.refuse(Rejection::DeviceRate));
        }
        if now.saturating_sub(device.last_seen_ms) >= TOUCH_EVERY_MS {
            self.store.touch(&id, now).await?;
        }
        Ok(device)
    }

    /// A device asks for work: its task in the open round, built from the round's stored
    /// plan and signed, or a time to wait.
    pub async fn poll(&self, device_id: &[u8], timestamp_ms: u64, signature: &[u8]) -> Result<PollOutcome> {
        self.poll_with_rank(device_id, timestamp_ms, signature, 0).await
    }

    /// [`Coordinator::poll`] from a device that can train LoRA of rank at most `max_rank`
    /// (0: any; signed as the request's subject): its task has the rank
    /// [`crate::config::LoraSection::rank_for`] gives, and the matching alpha.
    pub async fn poll_with_rank(
        &self,
        device_id: &[u8],
        timestamp_ms: u64,
        signature: &[u8],
        max_rank: u32,
    ) -> Result<PollOutcome> {
        let subject = if max_rank == 0 { Vec::new() } else { max_rank.to_be_bytes().to_vec() };
        let device = self.authenticate(DeviceMethod::Poll, device_id, timestamp_ms, signature, &subject).await?;
        self.wake.notify_one();
        // When to come back: pace steering spreads a crowd's next polls (`crate::pace`).
        let wait =
            |reason: &str| PollOutcome::Wait { retry_after: self.pace.wait(self.now_ms()), reason: reason.into() };
        let Some(round) = self.store.active_round().await? else {
            return Ok(wait("no open round"));
        };
        if !round.state.accepts_updates() || self.now_ms() >= round.deadline_ms {
            return Ok(wait("the round is closing"));
        }
        let Some(a) = self.store.assignment(round.id, &device.id).await? else {
            return Ok(wait("not sampled for this round"));
        };
        if a.used {
            return Ok(wait("update already received for this round"));
        }
        if a.declined.is_some() {
            return Ok(wait("task declined for this round"));
        }
        let mut task = self.plan_of(&round).await?.task(a.task_id, a.nonce);
        let rank = self.config.lora.rank_for(max_rank);
        if rank != task.lora.rank {
            // The same scale alpha / rank for every device: its padded B adds exactly
            // what it trained.
            task.lora.alpha = f64::from(self.config.lora.alpha * rank as f32 / self.config.lora.rank as f32);
            task.lora.rank = rank;
        }
        let binding = task.binding(device.id);
        let signature = self.key.sign(&binding.to_bytes()?);
        Ok(PollOutcome::Task(Box::new(SignedTask { task, binding, signature })))
    }

    /// A device declines its task of the round in progress (it does not fit its means):
    /// the reason is recorded on its assignment and counted, the task is not offered
    /// again, and a round every sampled device has answered closes without waiting for
    /// its deadline.
    pub async fn decline(
        &self,
        device_id: &[u8],
        timestamp_ms: u64,
        signature: &[u8],
        task_id: &[u8; 16],
        reason: &str,
    ) -> Result<()> {
        let device = self.authenticate(DeviceMethod::DeclineTask, device_id, timestamp_ms, signature, task_id).await?;
        if reason.len() > MAX_DECLINE_REASON {
            return Err(
                self.refuse(bad_request("reason", format!("{} bytes (at most {MAX_DECLINE_REASON})", reason.len())))
            );
        }
        let round = self.store.active_round().await?.filter(|r| r.state.accepts_updates());
        let assignment = match &round {
            Some(r) => self.store.assignment(r.id, &device.id).await?,
            None => None,
        };
        let (Some(round), Some(a)) = (round, assignment) else {
            return Err(self.refuse(Rejection::NoAssignment));
        };
        if &a.task_id != task_id {
            return Err(self.refuse(Rejection::WrongTask));
        }
        let reason: String = reason.chars().filter(|c| !c.is_control()).collect();
        if self.store.decline(round.id, &device.id, &reason).await? {
            self.metrics.tasks_declined.inc();
            warn!(round = round.id, device = %hex::encode(&device.id[..8]), reason, "task declined");
            self.wake.notify_one();
        }
        Ok(())
    }

    /// A device says it is alive; returns the current version.
    pub async fn heartbeat(&self, device_id: &[u8], timestamp_ms: u64, signature: &[u8]) -> Result<u64> {
        self.authenticate(DeviceMethod::Heartbeat, device_id, timestamp_ms, signature, &[]).await?;
        self.wake.notify_one();
        self.store.current_version().await
    }

    /// The signed manifest of a version (0: the current one), for an enrolled device.
    pub async fn manifest(
        &self,
        version: u64,
        device_id: &[u8],
        timestamp_ms: u64,
        signature: &[u8],
    ) -> Result<Option<VersionRecord>> {
        self.authenticate(DeviceMethod::GetManifest, device_id, timestamp_ms, signature, &version.to_be_bytes())
            .await?;
        let v = if version == 0 { self.store.current_version().await? } else { version };
        self.store.version(v).await
    }

    /// Allow an enrolled device to download `sha256`: only published artifacts (a
    /// version's model and config, the `A` factors) are served; anything else, device
    /// updates included, is "no such artifact".
    pub async fn authorize_fetch(
        &self,
        sha256: &[u8; 32],
        device_id: &[u8],
        timestamp_ms: u64,
        signature: &[u8],
    ) -> Result<()> {
        self.authenticate(DeviceMethod::FetchArtifact, device_id, timestamp_ms, signature, sha256).await?;
        if self.served.read().unwrap_or_else(std::sync::PoisonError::into_inner).contains(sha256) {
            Ok(())
        } else {
            Err(self.refuse(Rejection::NoSuchArtifact))
        }
    }

    /// Revoke a device, and burn the enrolment token that enrolled it.
    pub async fn revoke(&self, device_id: &[u8; 32]) -> Result<RevokeOutcome> {
        let outcome = self.store.revoke(device_id).await?;
        if outcome.changed {
            self.metrics.active_devices.dec();
            info!(device = %hex::encode(&device_id[..8]), token_burned = outcome.token_burned, "revoked");
        }
        Ok(outcome)
    }
}
