//! The coordinator's behaviour, transport-free: enrolment, polling, verification and
//! storage of updates, the round driver, aggregation and publishing. The gRPC layer
//! (`service`) only converts messages and maps errors.
//!
//! What a device says is checked against what the coordinator knows itself: the signed
//! header must carry the task's round, nonce, base version, clip norm, noise and number
//! of examples (steps × batch size, which is also the aggregation weight: never the
//! device's word); the cohort is sampled here (Poisson, from the OS CSPRNG) and the
//! sampling rate the accountant uses is the one the sampling used.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex as StdMutex, RwLock};
use std::time::Duration;

use covey_proto::keys::{self, KeyPair};
use covey_proto::manifest::{ArtifactRef, Manifest, PrivacySpent};
use covey_proto::signing::{self, DeviceMethod, TaskBinding, UpdateHeader};
use covey_strategy::{ClientUpdate, RoundContext, Strategy, StrategyState};
use covey_tensors::NamedTensors;
use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota, RateLimiter};
use serde::{Deserialize, Serialize};
use tokio::sync::{Mutex, Notify};
use tracing::{error, info, warn};

use crate::artifacts::{Artifacts, PendingBlob};
use crate::config::CoordinatorConfig;
use crate::error::{CoordinatorError, Rejection, Result};
use crate::metrics::{Metrics, OutcomeLabel};
use crate::store::{
    Assignment, DeviceRecord, EnrollOutcome, RevokeOutcome, RoundRecord, RoundState, Store, TokenRecord, UpdateRecord,
    VersionRecord,
};
use crate::weights;

/// Wall-clock milliseconds that advance with tokio's clock (so paused-time tests move the
/// deadlines): the wall time at start plus tokio's elapsed time.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    wall_ms: u64,
    start: tokio::time::Instant,
}

impl Clock {
    /// Anchor at the current wall time.
    pub fn new() -> Self {
        Self { wall_ms: now_wall_ms(), start: tokio::time::Instant::now() }
    }

    /// Milliseconds since the Unix epoch.
    pub fn now_ms(&self) -> u64 {
        self.wall_ms + self.start.elapsed().as_millis() as u64
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}

/// What a device gets from a poll.
#[derive(Debug, Clone, PartialEq)]
pub enum PollOutcome {
    /// Train this.
    Task(Box<SignedTask>),
    /// Ask again later.
    Wait {
        /// When.
        retry_after: Duration,
        /// Why.
        reason: String,
    },
}

/// A device's task and the coordinator's signature over [`TaskBinding::to_bytes`].
#[derive(Debug, Clone, PartialEq)]
pub struct SignedTask {
    /// Everything the task prescribes.
    pub binding: TaskBinding,
    /// Ed25519 signature of the coordinator.
    pub signature: [u8; 64],
}

/// A Gaussian release composed into the accountant.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PrivacyRecord {
    /// Sampling rate.
    pub q: f64,
    /// Noise multiplier.
    pub z: f64,
}

/// What [`Coordinator::open_round`] did.
#[derive(Debug, Clone, PartialEq)]
pub enum Opening {
    /// A round was opened (it may be failed at once when the sample came out below
    /// `min-updates`).
    Opened(RoundRecord),
    /// Fewer eligible devices than `min-available`.
    NotEnoughDevices {
        /// Eligible now.
        eligible: usize,
    },
    /// `privacy.population` is below the eligible devices: refused, since the sampling
    /// rate would understate each device's chance of being sampled.
    PopulationTooSmall {
        /// Configured.
        population: usize,
        /// Eligible now.
        eligible: usize,
    },
    /// One more round would take ε past `privacy.target-epsilon`.
    BudgetReached {
        /// ε spent so far.
        epsilon: f64,
        /// ε after one more round.
        next: f64,
    },
}

impl Opening {
    /// The round, when one was opened.
    pub fn round(self) -> Option<RoundRecord> {
        match self {
            Self::Opened(r) => Some(r),
            _ => None,
        }
    }
}

/// A verified update header: the upload may now stream its payload. Holds the device's
/// upload slot (one upload per device at a time) until dropped.
#[derive(Debug)]
pub struct UploadPermit {
    header: UpdateHeader,
    signed_header: Vec<u8>,
    signature: Vec<u8>,
    round_id: u64,
    clip_norm: f64,
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

const KEY_A: &str = "a_factors";
const KEY_CONFIG: &str = "config_json";
const KEY_STRATEGY: &str = "strategy";
const KEY_PRIVACY: &str = "privacy_events";
/// A device's `last_seen` is written at most this often (each write is an fsync).
const TOUCH_EVERY_MS: u64 = 1000;
/// Header allowance of an update payload over its tensor bytes (safetensors JSON).
const PAYLOAD_HEADER_SLACK: u64 = 64 << 10;

/// The coordinator.
pub struct Coordinator {
    config: CoordinatorConfig,
    store: Arc<dyn Store>,
    artifacts: Artifacts,
    uploads: Artifacts,
    key: KeyPair,
    metrics: Arc<Metrics>,
    clock: Clock,
    strategy: Mutex<Box<dyn Strategy>>,
    wake: Notify,
    a_hash: [u8; 32],
    config_hash: [u8; 32],
    expected_b: BTreeMap<String, Vec<usize>>,
    b_values: usize,
    examples_per_update: u64,
    max_payload: u64,
    served: RwLock<HashSet<[u8; 32]>>,
    uploading: Arc<StdMutex<HashSet<[u8; 32]>>>,
    device_limiter: DefaultKeyedRateLimiter<[u8; 32]>,
    enroll_limiter: DefaultDirectRateLimiter,
    token_limiter: DefaultKeyedRateLimiter<[u8; 32]>,
}

impl std::fmt::Debug for Coordinator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Coordinator").field("key", &self.key).finish_non_exhaustive()
    }
}

fn now_wall_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

fn per_minute(n: u32) -> Quota {
    Quota::per_minute(NonZeroU32::new(n).unwrap_or(NonZeroU32::MIN))
}

/// Requests a device may make per minute: the configured limit, but never less than twice
/// the polling rate the coordinator itself asks for (`rounds.poll-interval`) plus 30 for
/// downloads and heartbeats, so an obedient device is never refused.
fn device_rate(config: &CoordinatorConfig) -> u32 {
    let poll_ms = config.rounds.poll_interval.as_millis().max(1);
    let polls = u32::try_from(120_000u128.div_ceil(poll_ms)).unwrap_or(u32::MAX);
    config.limits.device_requests_per_minute.max(polls.saturating_add(30))
}

fn status(e: &CoordinatorError) -> tonic::Status {
    tonic::Status::from(e)
}

/// The model and config artifacts a signed manifest names.
fn manifest_artifacts(v: &VersionRecord) -> Result<[[u8; 32]; 2]> {
    let m: Manifest = serde_json::from_slice(&v.manifest)
        .map_err(|e| CoordinatorError::Corrupt(format!("manifest of version {}: {e}", v.version)))?;
    let parse = |h: &str| -> Result<[u8; 32]> {
        hex::decode(h)
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| CoordinatorError::Corrupt(format!("manifest of version {}: bad hash {h}", v.version)))
    };
    Ok([parse(&m.model.sha256)?, parse(&m.config.sha256)?])
}

impl Coordinator {
    /// Open the coordinator on `store` and `artifacts`; on first start, import
    /// `config.initial_model` as version 1. Device updates live in the `uploads`
    /// namespace of `artifacts`, which is never served.
    pub async fn open(
        config: CoordinatorConfig,
        store: Arc<dyn Store>,
        artifacts: Artifacts,
        key: KeyPair,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Self>> {
        config.validate()?;
        let uploads = artifacts.namespace("uploads")?;
        if store.current_version().await? == 0 {
            let dir = config.initial_model.clone().ok_or_else(|| CoordinatorError::Config {
                field: "initial-model".into(),
                reason: "required on first start (a directory with config.json and model.safetensors)".into(),
            })?;
            let (config_json, master) = weights::read_initial_model(&dir, &config.lora)?;
            let a = weights::a_factors(&master, &config.lora);
            let a_hash = artifacts.put(&covey_tensors::encode(&a, None)?)?;
            let config_hash = artifacts.put(&config_json)?;
            let (v, _) = build_version(
                &artifacts,
                &key,
                &master,
                1,
                0,
                0,
                config_hash,
                privacy_spent(&[], config.privacy.delta)?,
            )?;
            let state = [
                (KEY_A.into(), a_hash.to_vec()),
                (KEY_CONFIG.into(), config_hash.to_vec()),
                (KEY_PRIVACY.into(), b"[]".to_vec()),
            ];
            store.publish(0, &v, &state).await?;
            info!(version = 1, "imported the initial model from {}", dir.display());
        }
        let hash_state = |v: Option<Vec<u8>>, what: &str| -> Result<[u8; 32]> {
            v.and_then(|b| b.try_into().ok()).ok_or_else(|| CoordinatorError::Corrupt(format!("{what} hash missing")))
        };
        let a_hash = hash_state(store.get_state(KEY_A).await?, KEY_A)?;
        let config_hash = hash_state(store.get_state(KEY_CONFIG).await?, KEY_CONFIG)?;
        let current = store.current_version().await?;
        let master = load_master(&*store, &artifacts, current).await?;
        // The A factors devices train against were fixed on first start: a changed [lora]
        // would make every later merge fail or mean something else.
        if keys::sha256(&covey_tensors::encode(&weights::a_factors(&master, &config.lora), None)?) != a_hash {
            return Err(CoordinatorError::Config {
                field: "lora".into(),
                reason: "rank, targets or seed differ from the ones this state directory was started with; keep \
                         them, or start a new state directory"
                    .into(),
            });
        }
        let expected_b = weights::expected_b_shapes(&master, &config.lora);
        let b_values: usize = expected_b.values().map(|s| s.iter().product::<usize>()).sum();
        let mut strategy = covey_strategy::build(
            &config.strategy,
            config.privacy.central.as_ref(),
            covey_privacy::SecureRng::from_os()?,
        )?;
        if let Some(bytes) = store.get_state(KEY_STRATEGY).await? {
            let state: StrategyState = serde_json::from_slice(&bytes)
                .map_err(|e| CoordinatorError::Corrupt(format!("strategy state: {e}")))?;
            strategy.restore(state)?;
        }
        for t in &config.enrollment.tokens {
            store
                .insert_token(&TokenRecord {
                    hash: keys::sha256(t.as_bytes()),
                    label: "static token of the configuration".into(),
                    uses_left: -1,
                    expires_ms: 0,
                    burned: false,
                    created_ms: now_wall_ms(),
                })
                .await?;
        }
        let mut served = HashSet::from([a_hash, config_hash]);
        for v in store.versions().await? {
            served.extend(manifest_artifacts(&v)?);
        }
        if let Some(seed) = config.rounds.seed {
            warn!(seed, "cohorts are sampled from a seed: anyone who knows it knows who is sampled (simulations only)");
        }
        let examples_per_update = u64::from(config.training.steps) * u64::from(config.training.batch_size);
        let max_payload = config.limits.max_payload_bytes.min(b_values as u64 * 4 + PAYLOAD_HEADER_SLACK);
        metrics.current_version.set(current as i64);
        metrics.active_devices.set(store.devices().await?.iter().filter(|d| !d.revoked).count() as i64);
        Ok(Arc::new(Self {
            device_limiter: RateLimiter::keyed(per_minute(device_rate(&config))),
            enroll_limiter: RateLimiter::direct(per_minute(config.enrollment.per_minute)),
            token_limiter: RateLimiter::keyed(per_minute(config.enrollment.per_token_per_minute)),
            config,
            store,
            artifacts,
            uploads,
            key,
            metrics,
            clock: Clock::new(),
            strategy: Mutex::new(strategy),
            wake: Notify::new(),
            a_hash,
            config_hash,
            expected_b,
            b_values,
            examples_per_update,
            max_payload,
            served: RwLock::new(served),
            uploading: Arc::default(),
        }))
    }

    /// The configuration.
    pub fn config(&self) -> &CoordinatorConfig {
        &self.config
    }

    /// The durable state.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// Published blobs (models, configs, `A` factors).
    pub fn artifacts(&self) -> &Artifacts {
        &self.artifacts
    }

    /// Device update payloads (never served).
    pub fn uploads(&self) -> &Artifacts {
        &self.uploads
    }

    /// Metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The coordinator's public key.
    pub fn public_key(&self) -> [u8; 32] {
        self.key.public_key()
    }

    /// The clock deadlines are measured on.
    pub fn now_ms(&self) -> u64 {
        self.clock.now_ms()
    }

    /// The largest payload an update may have: the configured limit, or the expected `B`
    /// factors plus 64 KiB of header when smaller.
    pub fn max_payload_bytes(&self) -> u64 {
        self.max_payload
    }

    /// Examples behind every update (steps × batch size of the task): its aggregation
    /// weight, whatever a device declares.
    pub fn examples_per_update(&self) -> u64 {
        self.examples_per_update
    }

    fn refuse(&self, reason: &'static str, status: tonic::Status) -> tonic::Status {
        self.metrics.refuse(reason);
        warn!(reason, "request refused: {}", status.message());
        status
    }

    /// Enrol a device with an enrolment token. Re-enrolling the same key is idempotent
    /// (no use of the token is consumed); a revoked key stays revoked; expired, used-up
    /// and burned tokens enrol no one. Rate-limited over the coordinator and per token.
    pub async fn enroll(&self, public_key: &[u8], token: &str, label: &str) -> Result<[u8; 32], tonic::Status> {
        if self.enroll_limiter.check().is_err() {
            return Err(self.refuse(
                "enrolment_rate",
                tonic::Status::resource_exhausted("too many enrolments; retry in a minute"),
            ));
        }
        let token_hash = keys::sha256(token.as_bytes());
        if self.token_limiter.check_key(&token_hash).is_err() {
            return Err(self.refuse(
                "enrolment_token_rate",
                tonic::Status::resource_exhausted("too many enrolments with this token; retry in a minute"),
            ));
        }
        let pk: [u8; 32] =
            signing::fixed("public_key", public_key).map_err(|e| tonic::Status::invalid_argument(e.to_string()))?;
        if label.len() > 128 {
            return Err(tonic::Status::invalid_argument("label is longer than 128 bytes"));
        }
        if label.chars().any(char::is_control) {
            return Err(tonic::Status::invalid_argument("label holds control characters"));
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
        let denied = |why: &str| tonic::Status::permission_denied(why.to_owned());
        match self.store.enroll(&record, &token_hash, self.now_ms()).await.map_err(|e| status(&e))? {
            EnrollOutcome::Enrolled => {
                info!(device = %hex::encode(&id[..8]), label, "enrolled");
                self.metrics.active_devices.inc();
                self.wake.notify_one();
                Ok(id)
            }
            EnrollOutcome::AlreadyEnrolled => Ok(id),
            EnrollOutcome::DeviceRevoked => Err(denied("device is revoked")),
            EnrollOutcome::TokenUnknown => Err(denied("invalid enrolment token")),
            EnrollOutcome::TokenExpired => Err(denied("the enrolment token expired")),
            EnrollOutcome::TokenUsedUp => Err(denied("the enrolment token has no uses left")),
            EnrollOutcome::TokenBurned => {
                Err(denied("the enrolment token was withdrawn (a device it enrolled was revoked)"))
            }
        }
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
    ) -> Result<DeviceRecord, tonic::Status> {
        let id: [u8; 32] =
            signing::fixed("device_id", device_id).map_err(|e| tonic::Status::invalid_argument(e.to_string()))?;
        let device = self
            .store
            .device(&id)
            .await
            .map_err(|e| status(&e))?
            .ok_or_else(|| tonic::Status::unauthenticated("unknown device"))?;
        let bytes = signing::device_request_bytes_for(method, &id, timestamp_ms, subject);
        keys::verify(&device.public_key, &bytes, signature)
            .map_err(|_| tonic::Status::unauthenticated("request signature does not verify"))?;
        let skew = self.config.enrollment.max_clock_skew.as_millis() as u64;
        let now = self.now_ms();
        if timestamp_ms.abs_diff(now) > skew {
            return Err(tonic::Status::unauthenticated("request timestamp is outside the allowed clock skew"));
        }
        if device.revoked {
            return Err(tonic::Status::permission_denied("device is revoked"));
        }
        if self.device_limiter.check_key(&id).is_err() {
            return Err(self.refuse(
                "device_rate",
                tonic::Status::resource_exhausted("too many requests from this device; slow down"),
            ));
        }
        if now.saturating_sub(device.last_seen_ms) >= TOUCH_EVERY_MS {
            self.store.touch(&id, now).await.map_err(|e| status(&e))?;
        }
        Ok(device)
    }

    /// A device asks for work.
    pub async fn poll(
        &self,
        device_id: &[u8],
        timestamp_ms: u64,
        signature: &[u8],
    ) -> Result<PollOutcome, tonic::Status> {
        let device = self.authenticate(DeviceMethod::Poll, device_id, timestamp_ms, signature, &[]).await?;
        self.wake.notify_one();
        let wait =
            |reason: &str| PollOutcome::Wait { retry_after: self.config.rounds.poll_interval, reason: reason.into() };
        let Some(round) = self.store.active_round().await.map_err(|e| status(&e))? else {
            return Ok(wait("no open round"));
        };
        if !round.state.accepts_updates() || self.now_ms() >= round.deadline_ms {
            return Ok(wait("the round is closing"));
        }
        let Some(a) = self.store.assignment(round.id, &device.id).await.map_err(|e| status(&e))? else {
            return Ok(wait("not sampled for this round"));
        };
        if a.used {
            return Ok(wait("update already received for this round"));
        }
        let version = self.version(round.base_version).await.map_err(|e| status(&e))?;
        let round_config = self.strategy.lock().await.configure_round(&self.round_context(&round));
        let c = &self.config;
        let binding = TaskBinding {
            device_id: device.id,
            round_id: round.id,
            task_id: a.task_id,
            nonce: a.nonce,
            base_version: round.base_version,
            base_manifest_hash: version.manifest_sha256,
            a_factors_sha256: self.a_hash,
            rank: c.lora.rank as u32,
            alpha: c.lora.alpha,
            targets: c.lora.targets.clone(),
            steps: c.training.steps,
            batch_size: c.training.batch_size,
            seq_len: c.training.seq_len,
            learning_rate: c.training.learning_rate,
            proximal_mu: round_config.proximal_mu as f32,
            seed: c.training.seed ^ round.id,
            clip_norm: round_config.clip_norm.unwrap_or(c.privacy.clip_norm),
            noise_multiplier: c.privacy.local_noise_multiplier,
            deadline_ms: round.deadline_ms,
            max_payload_bytes: self.max_payload,
        };
        let bytes = binding.to_bytes().map_err(|e| tonic::Status::internal(e.to_string()))?;
        let signature = self.key.sign(&bytes);
        Ok(PollOutcome::Task(Box::new(SignedTask { binding, signature })))
    }

    /// A device says it is alive; returns the current version.
    pub async fn heartbeat(&self, device_id: &[u8], timestamp_ms: u64, signature: &[u8]) -> Result<u64, tonic::Status> {
        self.authenticate(DeviceMethod::Heartbeat, device_id, timestamp_ms, signature, &[]).await?;
        self.wake.notify_one();
        self.store.current_version().await.map_err(|e| status(&e))
    }

    async fn version(&self, v: u64) -> Result<VersionRecord> {
        self.store.version(v).await?.ok_or_else(|| CoordinatorError::Corrupt(format!("version {v} is missing")))
    }

    /// The signed manifest of a version (0: the current one), for an enrolled device.
    pub async fn manifest(
        &self,
        version: u64,
        device_id: &[u8],
        timestamp_ms: u64,
        signature: &[u8],
    ) -> Result<Option<VersionRecord>, tonic::Status> {
        self.authenticate(DeviceMethod::GetManifest, device_id, timestamp_ms, signature, &version.to_be_bytes())
            .await?;
        let v = if version == 0 { self.store.current_version().await.map_err(|e| status(&e))? } else { version };
        self.store.version(v).await.map_err(|e| status(&e))
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
    ) -> Result<(), tonic::Status> {
        self.authenticate(DeviceMethod::FetchArtifact, device_id, timestamp_ms, signature, sha256).await?;
        if self.served.read().unwrap_or_else(std::sync::PoisonError::into_inner).contains(sha256) {
            Ok(())
        } else {
            Err(tonic::Status::not_found("no such artifact"))
        }
    }

    fn round_context(&self, round: &RoundRecord) -> RoundContext {
        if round.population > 0 {
            RoundContext {
                round: round.id,
                expected_clients: round.expected_cohort.max(1) as usize,
                population: round.population as usize,
            }
        } else {
            // A round stored before Poisson sampling: its cohort was the whole sample.
            RoundContext {
                round: round.id,
                expected_clients: round.cohort_size.max(1) as usize,
                population: round.cohort_size.max(1) as usize,
            }
        }
    }

    fn note(&self, outcome: &std::result::Result<(u64, u64), Rejection>, bytes: u64) {
        match outcome {
            Ok((id, round)) => {
                self.metrics.updates_accepted.inc();
                self.metrics.bytes_received.inc_by(bytes);
                info!(update = id, round, bytes, "update stored");
                self.wake.notify_one();
            }
            Err(r) => {
                self.metrics.reject(r.label());
                warn!(reason = r.label(), "update refused: {r}");
            }
        }
    }

    /// Verify and durably store one upload whose payload is in memory:
    /// [`Coordinator::begin_upload`], then [`Coordinator::finish_upload`].
    pub async fn accept_update(
        &self,
        signed_header: &[u8],
        signature: &[u8],
        payload: &[u8],
        train_loss: f32,
    ) -> Result<std::result::Result<(u64, u64), Rejection>> {
        let permit = match self.begin_upload(signed_header, signature).await? {
            Ok(p) => p,
            Err(r) => return Ok(Err(r)),
        };
        let mut pending = self.uploads.pending()?;
        pending.write(payload)?;
        self.finish_upload(permit, pending, train_loss).await
    }

    /// Check a signed update header before any payload byte is read: the device is
    /// enrolled, not revoked, and signed it; it names the open round, this device's task
    /// and unused nonce, the round's base version, the task's clip norm, noise and number
    /// of examples, and a payload length within the limit. At most one upload per device
    /// is in progress.
    pub async fn begin_upload(
        &self,
        signed_header: &[u8],
        signature: &[u8],
    ) -> Result<std::result::Result<UploadPermit, Rejection>> {
        let outcome = self.check_header(signed_header, signature).await?;
        if let Err(r) = &outcome {
            self.metrics.reject(r.label());
            warn!(reason = r.label(), "update refused: {r}");
        }
        Ok(outcome)
    }

    async fn check_header(
        &self,
        signed_header: &[u8],
        signature: &[u8],
    ) -> Result<std::result::Result<UploadPermit, Rejection>> {
        macro_rules! reject {
            ($r:expr) => {
                return Ok(Err($r))
            };
        }
        let header = match UpdateHeader::parse(signed_header) {
            Ok(h) => h,
            Err(e) => reject!(Rejection::MalformedHeader(e.to_string())),
        };
        let Some(device) = self.store.device(&header.device_id).await? else { reject!(Rejection::UnknownDevice) };
        if keys::verify(&device.public_key, signed_header, signature).is_err() {
            reject!(Rejection::BadSignature);
        }
        if device.revoked {
            reject!(Rejection::RevokedDevice);
        }
        let Some(round) = self.store.active_round().await? else { reject!(Rejection::NoAssignment) };
        if header.round_id != round.id {
            reject!(Rejection::WrongRound { expected: round.id, found: header.round_id });
        }
        if !round.state.accepts_updates() {
            reject!(Rejection::NoAssignment);
        }
        if self.now_ms() >= round.deadline_ms {
            reject!(Rejection::DeadlinePassed);
        }
        let Some(assignment) = self.store.assignment(round.id, &device.id).await? else {
            reject!(Rejection::NoAssignment)
        };
        if header.task_id != assignment.task_id {
            reject!(Rejection::WrongTask);
        }
        if assignment.used || header.nonce != assignment.nonce {
            reject!(Rejection::Replay);
        }
        if header.base_manifest_hash != self.version(round.base_version).await?.manifest_sha256 {
            reject!(Rejection::WrongBaseVersion);
        }
        // The clip norm of the task: the strategy's (DP-FedAvg, adaptive clipping) or the
        // configured one.
        let clip_norm = self
            .strategy
            .lock()
            .await
            .configure_round(&self.round_context(&round))
            .clip_norm
            .unwrap_or(self.config.privacy.clip_norm);
        let z = self.config.privacy.local_noise_multiplier;
        if header.clip_norm.to_bits() != clip_norm.to_bits() || header.noise_multiplier.to_bits() != z.to_bits() {
            reject!(Rejection::PrivacyMismatch(format!(
                "header C = {}, z = {}; task C = {clip_norm}, z = {z}",
                header.clip_norm, header.noise_multiplier
            )));
        }
        if header.payload_len > self.max_payload {
            reject!(Rejection::Oversized { limit: self.max_payload });
        }
        if header.num_examples != self.examples_per_update {
            reject!(Rejection::ExamplesMismatch { expected: self.examples_per_update, found: header.num_examples });
        }
        {
            let mut busy = self.uploading.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if !busy.insert(device.id) {
                reject!(Rejection::UploadInProgress);
            }
        }
        let slot = UploadSlot { busy: self.uploading.clone(), device: device.id };
        Ok(Ok(UploadPermit {
            header,
            signed_header: signed_header.to_vec(),
            signature: signature.to_vec(),
            round_id: round.id,
            clip_norm,
            _slot: slot,
        }))
    }

    /// Finish an upload whose payload streamed into `pending`: length and SHA-256 as
    /// signed, tensors, shapes, finiteness and norm; then the blob is committed and the
    /// row inserted (nonce consumed) in one transaction. A refused upload leaves no blob.
    /// Under local noise the training loss and the within-clip bit are not stored.
    pub async fn finish_upload(
        &self,
        permit: UploadPermit,
        mut pending: PendingBlob,
        train_loss: f32,
    ) -> Result<std::result::Result<(u64, u64), Rejection>> {
        let h = &permit.header;
        let bytes = pending.len();
        let outcome = 'check: {
            if pending.len() != h.payload_len {
                break 'check Err(Rejection::LengthMismatch { expected: h.payload_len, found: pending.len() });
            }
            if pending.sha256() != h.payload_sha256 {
                break 'check Err(Rejection::PayloadHash);
            }
            let payload = pending.read_all()?;
            if let Err(r) = self.check_payload(&payload, permit.clip_norm) {
                break 'check Err(r);
            }
            drop(payload);
            let existed = self.uploads.size(&h.payload_sha256).is_ok();
            let payload_sha256 = pending.commit()?;
            let local_noise = self.config.privacy.local_noise_multiplier > 0.0;
            let record = UpdateRecord {
                id: 0,
                round_id: permit.round_id,
                device_id: h.device_id,
                header: permit.signed_header.clone(),
                signature: permit.signature.clone(),
                payload_sha256,
                num_examples: self.examples_per_update,
                within_clip: if local_noise { None } else { h.within_clip },
                train_loss: (train_loss.is_finite() && !local_noise).then_some(train_loss),
                received_ms: self.now_ms(),
            };
            let stored = self.store.insert_update(&record, &h.nonce).await?;
            if stored.is_err() && !existed {
                self.uploads.remove(&payload_sha256)?;
            }
            stored.map(|id| (id, permit.round_id))
        };
        self.note(&outcome, bytes);
        Ok(outcome)
    }

    /// Shapes, finiteness and norm of a payload.
    fn check_payload(&self, payload: &[u8], clip_norm: f64) -> std::result::Result<NamedTensors, Rejection> {
        let (tensors, _) = covey_tensors::decode(payload).map_err(|e| Rejection::BadPayload(e.to_string()))?;
        for (name, shape) in &self.expected_b {
            match tensors.get(name) {
                None => return Err(Rejection::WrongTensors(format!("`{name}` is missing"))),
                Some(t) if &t.shape != shape => {
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
        let z = self.config.privacy.local_noise_multiplier;
        if clip_norm > 0.0 {
            // Local noise of std z·C per value has norm about z·C·√d; allow a wide margin.
            let noise = z * (self.b_values as f64).sqrt() + 5.0 * z;
            let bound = clip_norm * (self.config.limits.norm_slack + noise) * (1.0 + 1e-6);
            let norm = covey_tensors::global_norm(&tensors);
            if norm > bound {
                return Err(Rejection::NormTooLarge { norm, bound });
            }
        }
        Ok(tensors)
    }

    /// Run rounds until `max-rounds` are published or `target-epsilon` is reached.
    /// Errors of the store or the artifacts are logged and retried with back-off (1 s
    /// doubling to 60 s); they never end the process.
    pub async fn run_rounds(self: Arc<Self>) -> Result<()> {
        let mut failures = 0u32;
        loop {
            match self.round_step().await {
                Ok(true) => failures = 0,
                Ok(false) => return Ok(()),
                Err(e) => {
                    failures = failures.saturating_add(1);
                    let delay =
                        Duration::from_secs(1u64 << failures.min(7).saturating_sub(1)).min(Duration::from_secs(60));
                    error!(error = %e, failures, retry_in_s = delay.as_secs(), "round driver error; retrying");
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    /// One step of the driver; `false` when no more rounds will open.
    async fn round_step(&self) -> Result<bool> {
        let published =
            self.store.rounds(usize::MAX >> 1).await?.iter().filter(|r| r.state == RoundState::Published).count()
                as u64;
        if self.config.rounds.max_rounds > 0 && published >= self.config.rounds.max_rounds {
            info!(published, "max-rounds reached; no more rounds");
            return Ok(false);
        }
        let round = match self.store.active_round().await? {
            Some(r) => r,
            None => match self.open_round().await? {
                Opening::Opened(r) => r,
                Opening::BudgetReached { epsilon, next } => {
                    info!(epsilon, next, "target-epsilon reached: no more rounds");
                    return Ok(false);
                }
                Opening::NotEnoughDevices { .. } | Opening::PopulationTooSmall { .. } => {
                    let _ = tokio::time::timeout(self.config.rounds.poll_interval, self.wake.notified()).await;
                    return Ok(true);
                }
            },
        };
        self.drive(round).await?;
        tokio::time::sleep(self.config.rounds.pause).await;
        Ok(true)
    }

    /// Sample a cohort and open a round. Every eligible device (enrolled, not revoked,
    /// seen within the eligibility window) joins independently with probability
    /// q = min(1, cohort / N), N = max(`privacy.population`, eligible), drawn from the OS
    /// CSPRNG (from `rounds.seed` in simulations): the Poisson sampling the accountant
    /// assumes, with the q it is given.
    pub async fn open_round(&self) -> Result<Opening> {
        let now = self.now_ms();
        let window = self.config.rounds.eligibility_window.as_millis() as u64;
        let eligible: Vec<DeviceRecord> =
            self.store.devices().await?.into_iter().filter(|d| !d.revoked && d.last_seen_ms + window >= now).collect();
        if eligible.len() < self.config.rounds.min_available.max(self.config.rounds.min_updates) {
            return Ok(Opening::NotEnoughDevices { eligible: eligible.len() });
        }
        let configured = self.config.privacy.population;
        if configured > 0 && configured < eligible.len() {
            error!(
                population = configured,
                eligible = eligible.len(),
                "privacy.population is below the eligible devices; no round opens (the sampling rate would be understated)"
            );
            return Ok(Opening::PopulationTooSmall { population: configured, eligible: eligible.len() });
        }
        let population = configured.max(eligible.len());
        let expected = self.config.cohort_size(population).max(1);
        let q = expected as f64 / population as f64;
        if let Some(target) = self.config.privacy.target_epsilon {
            let z = self
                .config
                .privacy
                .central
                .as_ref()
                .map_or(self.config.privacy.local_noise_multiplier, |c| c.noise_multiplier);
            let mut events = self.privacy_events().await?;
            let epsilon = privacy_spent(&events, self.config.privacy.delta)?.epsilon;
            events.push(PrivacyRecord { q, z });
            let next = privacy_spent(&events, self.config.privacy.delta)?.epsilon;
            if next > target {
                return Ok(Opening::BudgetReached { epsilon, next });
            }
        }
        let id = self.store.rounds(1).await?.first().map_or(1, |r| r.id + 1);
        let mut rng = match self.config.rounds.seed {
            Some(seed) => {
                let mut key = [0u8; 32];
                key[..8].copy_from_slice(&seed.to_be_bytes());
                key[8..16].copy_from_slice(&id.to_be_bytes());
                covey_privacy::SecureRng::from_seed(key)
            }
            None => covey_privacy::SecureRng::from_os()?,
        };
        let cohort: Vec<DeviceRecord> = covey_privacy::sampling::poisson(eligible.len(), q, &mut rng)?
            .into_iter()
            .map(|i| eligible[i].clone())
            .collect();
        let mut assignments = Vec::with_capacity(cohort.len());
        for d in &cohort {
            assignments.push(Assignment {
                round_id: id,
                device_id: d.id,
                task_id: keys::random_bytes()?,
                nonce: keys::random_bytes()?,
                used: false,
            });
        }
        let min_updates = self.config.rounds.min_updates;
        let too_few = cohort.len() < min_updates;
        let round = RoundRecord {
            id,
            state: if too_few { RoundState::Failed } else { RoundState::Open },
            base_version: self.store.current_version().await?,
            published_version: 0,
            cohort_size: cohort.len() as u64,
            population: population as u64,
            expected_cohort: expected as u64,
            target_updates: self.config.rounds.target_updates.min(cohort.len()) as u64,
            min_updates: min_updates as u64,
            opened_ms: now,
            deadline_ms: now + self.config.rounds.deadline.as_millis() as u64,
            failure: if too_few {
                format!("sampled {} devices, fewer than min-updates {min_updates}", cohort.len())
            } else {
                String::new()
            },
        };
        self.store.insert_round(&round, &assignments).await?;
        if too_few {
            self.metrics.rounds.get_or_create(&OutcomeLabel { outcome: "failed".into() }).inc();
            warn!(round = id, cohort = round.cohort_size, "round failed at once: {}", round.failure);
        } else {
            info!(round = id, cohort = round.cohort_size, q, population, base = round.base_version, "round opened");
        }
        Ok(Opening::Opened(round))
    }

    /// Collect until the target or the deadline, then aggregate and publish (or fail).
    /// Returns at once when the round is finished, or when it is finished meanwhile (an
    /// operator's `fail-round`, `promote` or `rollback`).
    pub async fn drive(&self, round: RoundRecord) -> Result<()> {
        if matches!(round.state, RoundState::Published | RoundState::Failed) {
            return Ok(());
        }
        let mut round = round;
        if round.state.accepts_updates() {
            loop {
                match self.store.active_round().await? {
                    Some(r) if r.id == round.id => round = r,
                    _ => return Ok(()),
                }
                if !round.state.accepts_updates() {
                    break;
                }
                let count = self.store.update_count(round.id).await?;
                if count >= round.target_updates {
                    break;
                }
                let now = self.now_ms();
                if now >= round.deadline_ms {
                    break;
                }
                let left = Duration::from_millis(round.deadline_ms - now);
                let _ = tokio::time::timeout(left, self.wake.notified()).await;
            }
            if round.state.accepts_updates() {
                let count = self.store.update_count(round.id).await?;
                if count < round.min_updates {
                    let reason = format!("{count} of the {} updates needed arrived by the deadline", round.min_updates);
                    if self.store.set_round_state(round.id, RoundState::Failed, &reason).await? {
                        self.metrics.rounds.get_or_create(&OutcomeLabel { outcome: "failed".into() }).inc();
                        warn!(round = round.id, "round failed: {reason}");
                    }
                    self.discard_updates(round.id).await;
                    return Ok(());
                }
                if !self.store.set_round_state(round.id, RoundState::Aggregating, "").await? {
                    return Ok(());
                }
            }
        }
        let started = std::time::Instant::now();
        match self.aggregate_and_publish(&round).await {
            Ok(Some(v)) => {
                self.metrics.rounds.get_or_create(&OutcomeLabel { outcome: "published".into() }).inc();
                info!(round = round.id, version = v, "published");
            }
            Ok(None) => {
                if self.store.set_round_state(round.id, RoundState::Failed, "no usable update").await? {
                    self.metrics.rounds.get_or_create(&OutcomeLabel { outcome: "failed".into() }).inc();
                }
            }
            Err(CoordinatorError::Refused(reason)) => {
                info!(round = round.id, "not published: {reason}");
                return Ok(());
            }
            Err(e) => return Err(e),
        }
        self.discard_updates(round.id).await;
        self.metrics.aggregate_seconds.observe(started.elapsed().as_secs_f64());
        self.metrics.round_seconds.observe(self.now_ms().saturating_sub(round.opened_ms) as f64 / 1000.0);
        Ok(())
    }

    /// Delete a finished round's raw update payloads (unless `privacy.retain-updates`):
    /// they are personal data, and nothing reads them once the round is closed.
    async fn discard_updates(&self, round_id: u64) {
        if self.config.privacy.retain_updates {
            return;
        }
        let records = match self.store.updates(round_id).await {
            Ok(r) => r,
            Err(e) => {
                warn!(round = round_id, error = %e, "cannot list the round's updates to delete them");
                return;
            }
        };
        for r in records {
            if let Err(e) = self.uploads.remove(&r.payload_sha256) {
                warn!(round = round_id, update = r.id, error = %e, "cannot delete an update payload");
            }
        }
    }

    async fn aggregate_and_publish(&self, round: &RoundRecord) -> Result<Option<u64>> {
        let mut strategy = self.strategy.lock().await;
        // The strategy's state as persisted: put back if anything fails, so a retried
        // aggregation does not apply a server step (FedAdam moments, adaptive clip) twice.
        let snapshot = strategy.state()?;
        let outcome = self.aggregate_locked(&mut **strategy, round).await;
        if outcome.is_err()
            && let Err(e) = strategy.restore(snapshot)
        {
            error!(error = %e, "cannot restore the strategy's state after a failed aggregation");
        }
        outcome
    }

    async fn aggregate_locked(&self, strategy: &mut dyn Strategy, round: &RoundRecord) -> Result<Option<u64>> {
        let records = self.store.updates(round.id).await?;
        let mut keys_by_device = HashMap::new();
        for r in &records {
            if let Some(d) = self.store.device(&r.device_id).await? {
                keys_by_device.insert(d.id, (d.public_key, d.revoked));
            }
        }
        let ctx = self.round_context(round);
        let failures = (round.cohort_size as usize).saturating_sub(records.len());
        let base = self.version(round.base_version).await?;
        let master = decode_blob(&self.artifacts, &base.master_sha256)?;
        let a = decode_blob(&self.artifacts, &self.a_hash)?;
        let aggregate = {
            let mut stream = StoredUpdates::new(&records, &self.uploads, &keys_by_device, self.examples_per_update);
            let aggregate = strategy.aggregate(&ctx, &mut stream, failures)?;
            if let Some(e) = stream.error.take() {
                return Err(e);
            }
            if stream.dropped > 0 {
                warn!(
                    round = round.id,
                    dropped = stream.dropped,
                    stored = records.len(),
                    "updates left out of the aggregate"
                );
            }
            aggregate
        };
        let Some(aggregate) = aggregate else { return Ok(None) };
        let merged = weights::merge_step(&master, &a, &aggregate.step, &self.config.lora)?;
        let mut events = self.privacy_events().await?;
        if let Some(e) = aggregate.privacy {
            events.push(PrivacyRecord { q: e.sampling_rate, z: e.noise_multiplier });
        } else if self.config.privacy.local_noise_multiplier > 0.0 {
            let q = ctx.expected_clients as f64 / ctx.population.max(1) as f64;
            events.push(PrivacyRecord { q, z: self.config.privacy.local_noise_multiplier });
        }
        let spent = privacy_spent(&events, self.config.privacy.delta)?;
        let version = self.store.versions().await?.first().map_or(1, |v| v.version + 1);
        let (v, model_sha256) = build_version(
            &self.artifacts,
            &self.key,
            &merged,
            version,
            round.base_version,
            round.id,
            self.config_hash,
            spent,
        )?;
        let state = serde_json::to_vec(&strategy.state()?).map_err(|e| CoordinatorError::Corrupt(e.to_string()))?;
        let events = serde_json::to_vec(&events).map_err(|e| CoordinatorError::Corrupt(e.to_string()))?;
        let current =
            self.store.publish(round.id, &v, &[(KEY_STRATEGY.into(), state), (KEY_PRIVACY.into(), events)]).await?;
        // Served from now on, not before: an aggregate whose publish was refused never is.
        self.served.write().unwrap_or_else(std::sync::PoisonError::into_inner).insert(model_sha256);
        if current {
            self.metrics.current_version.set(version as i64);
        } else {
            warn!(
                version,
                parent = round.base_version,
                "published without making it current: the operator made another version current meanwhile"
            );
        }
        Ok(Some(version))
    }

    /// The accountant's events. A missing ledger while published rounds exist is
    /// corruption, never ε = 0.
    async fn privacy_events(&self) -> Result<Vec<PrivacyRecord>> {
        if let Some(b) = self.store.get_state(KEY_PRIVACY).await? {
            return serde_json::from_slice(&b).map_err(|e| CoordinatorError::Corrupt(format!("privacy events: {e}")));
        }
        if self.store.versions().await?.iter().any(|v| v.round_id != 0) {
            return Err(CoordinatorError::Corrupt(
                "the privacy ledger (privacy_events) is missing while published rounds exist; ε is not restarted \
                 from 0"
                    .into(),
            ));
        }
        Ok(Vec::new())
    }

    /// ε spent so far at the configured δ.
    pub async fn epsilon(&self) -> Result<f64> {
        Ok(privacy_spent(&self.privacy_events().await?, self.config.privacy.delta)?.epsilon)
    }

    /// Make `version` current (operators). A round in progress on another base version is
    /// failed (its updates would merge into the wrong base); returns the current version
    /// and the round failed, if any.
    pub async fn promote(&self, version: u64) -> Result<(u64, Option<u64>), tonic::Status> {
        if self.store.version(version).await.map_err(|e| status(&e))?.is_none() {
            return Err(tonic::Status::not_found(format!("version {version} does not exist")));
        }
        self.store.set_current_version(version).await.map_err(|e| status(&e))?;
        self.metrics.current_version.set(version as i64);
        info!(version, "promoted");
        let mut failed = None;
        if let Some(r) = self.store.active_round().await.map_err(|e| status(&e))?
            && r.base_version != version
        {
            let reason = format!("superseded: the operator made version {version} current");
            if self.store.set_round_state(r.id, RoundState::Failed, &reason).await.map_err(|e| status(&e))? {
                self.metrics.rounds.get_or_create(&OutcomeLabel { outcome: "failed".into() }).inc();
                warn!(round = r.id, "round failed: {reason}");
                failed = Some(r.id);
                self.wake.notify_one();
            }
        }
        Ok((version, failed))
    }

    /// Go back to `version`, or to the current version's parent when 0.
    pub async fn rollback(&self, version: u64) -> Result<(u64, Option<u64>), tonic::Status> {
        let target = if version == 0 {
            let current = self.store.current_version().await.map_err(|e| status(&e))?;
            let v = self.store.version(current).await.map_err(|e| status(&e))?;
            match v {
                Some(v) if v.parent > 0 => v.parent,
                _ => return Err(tonic::Status::failed_precondition("the current version has no parent")),
            }
        } else {
            version
        };
        self.promote(target).await
    }

    /// Fail the round in progress (operators): `round_id` must be it. Returns the state it
    /// had.
    pub async fn fail_round(&self, round_id: u64, reason: &str) -> Result<RoundState> {
        let Some(r) = self.store.active_round().await?.filter(|r| r.id == round_id) else {
            return Err(CoordinatorError::Refused(format!("round {round_id} is not in progress")));
        };
        let why = format!("failed by the operator: {}", if reason.is_empty() { "no reason given" } else { reason });
        if !self.store.set_round_state(r.id, RoundState::Failed, &why).await? {
            return Err(CoordinatorError::Refused(format!("round {round_id} finished meanwhile")));
        }
        self.metrics.rounds.get_or_create(&OutcomeLabel { outcome: "failed".into() }).inc();
        warn!(round = r.id, "round failed: {why}");
        self.wake.notify_one();
        Ok(r.state)
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

/// Streams a round's stored updates to a strategy one at a time, re-verifying each
/// signature and payload hash (so the benchmark and a restarted coordinator trust nothing
/// they did not check); updates of revoked devices, and payloads missing or damaged on
/// disk, are left out and counted in `dropped`. Every update weighs `weight` (the
/// task's steps × batch size), whatever its header declares.
pub struct StoredUpdates<'a> {
    records: std::slice::Iter<'a, UpdateRecord>,
    uploads: &'a Artifacts,
    keys: &'a HashMap<[u8; 32], ([u8; 32], bool)>,
    weight: u64,
    /// A storage failure met while streaming (the stream ends early).
    pub error: Option<CoordinatorError>,
    /// Updates left out (revoked device, failed re-verification, missing or damaged payload).
    pub dropped: usize,
}

impl<'a> StoredUpdates<'a> {
    /// Stream `records`, whose payloads are in `uploads`.
    pub fn new(
        records: &'a [UpdateRecord],
        uploads: &'a Artifacts,
        keys: &'a HashMap<[u8; 32], ([u8; 32], bool)>,
        weight: u64,
    ) -> Self {
        Self { records: records.iter(), uploads, keys, weight, error: None, dropped: 0 }
    }
}

impl Iterator for StoredUpdates<'_> {
    type Item = ClientUpdate;

    fn next(&mut self) -> Option<ClientUpdate> {
        loop {
            let r = self.records.next()?;
            let Some((pk, revoked)) = self.keys.get(&r.device_id) else {
                self.dropped += 1;
                continue;
            };
            let header = UpdateHeader::parse(&r.header).ok();
            let payload = match self.uploads.get(&r.payload_sha256) {
                Ok(p) => p,
                Err(e @ (CoordinatorError::MissingArtifact(_) | CoordinatorError::CorruptArtifact(_))) => {
                    warn!(update = r.id, error = %e, "stored update payload unusable; left out");
                    self.dropped += 1;
                    continue;
                }
                Err(e) => {
                    self.error = Some(e);
                    return None;
                }
            };
            let ok = !revoked
                && keys::verify(pk, &r.header, &r.signature).is_ok()
                && header.as_ref().is_some_and(|h| h.payload_sha256 == keys::sha256(&payload));
            if !ok {
                warn!(update = r.id, "stored update fails re-verification or its device is revoked; left out");
                self.dropped += 1;
                continue;
            }
            match covey_tensors::decode(&payload) {
                Ok((delta, _)) => {
                    return Some(ClientUpdate {
                        client: hex::encode(&r.device_id[..8]),
                        num_examples: self.weight,
                        delta,
                        within_clip: r.within_clip,
                    });
                }
                Err(e) => {
                    warn!(update = r.id, error = %e, "stored update does not decode; left out");
                    self.dropped += 1;
                }
            }
        }
    }
}

fn decode_blob(artifacts: &Artifacts, hash: &[u8; 32]) -> Result<NamedTensors> {
    Ok(covey_tensors::decode(&artifacts.get(hash)?)?.0)
}

async fn load_master(store: &dyn Store, artifacts: &Artifacts, version: u64) -> Result<NamedTensors> {
    let v =
        store.version(version).await?.ok_or_else(|| CoordinatorError::Corrupt(format!("version {version} missing")))?;
    decode_blob(artifacts, &v.master_sha256)
}

fn privacy_spent(events: &[PrivacyRecord], delta: f64) -> Result<PrivacySpent> {
    if events.is_empty() {
        return Ok(PrivacySpent { epsilon: 0.0, delta, accountant: "none".into(), rounds: 0 });
    }
    let mut acc = covey_privacy::RdpAccountant::default();
    for e in events {
        acc.compose_subsampled_gaussian(e.q.clamp(0.0, 1.0), e.z, 1)?;
    }
    let (epsilon, _) = acc.epsilon(delta)?;
    Ok(PrivacySpent { epsilon, delta, accountant: "rdp-subsampled-gaussian".into(), rounds: events.len() as u64 })
}

/// Store master (f32) and device (int8) weights, and sign a manifest for them; returns
/// the version and the SHA-256 of its int8 model.
#[allow(clippy::too_many_arguments)]
fn build_version(
    artifacts: &Artifacts,
    key: &KeyPair,
    master: &NamedTensors,
    version: u64,
    parent: u64,
    round_id: u64,
    config_hash: [u8; 32],
    privacy: PrivacySpent,
) -> Result<(VersionRecord, [u8; 32])> {
    let master_bytes = covey_tensors::encode(master, None)?;
    let master_sha256 = artifacts.put(&master_bytes)?;
    let int8 = covey_tensors::quant::encode_int8(master, HashMap::new())?;
    let model_sha256 = artifacts.put(&int8)?;
    let config_size = artifacts.size(&config_hash)?;
    let epsilon = privacy.epsilon;
    let manifest = Manifest {
        schema: 1,
        version,
        parent,
        round_id,
        model: ArtifactRef {
            sha256: hex::encode(model_sha256),
            size: int8.len() as u64,
            format: "safetensors-int8".into(),
        },
        master_sha256: hex::encode(master_sha256),
        config: ArtifactRef { sha256: hex::encode(config_hash), size: config_size, format: "llama-config-json".into() },
        quantization: covey_tensors::quant::INT8_SCHEME.into(),
        privacy,
        created_unix_ms: now_wall_ms(),
    };
    let (bytes, signature) = manifest.sign(key)?;
    let record = VersionRecord {
        version,
        parent,
        round_id,
        manifest_sha256: keys::sha256(&bytes),
        manifest: bytes,
        signature: signature.to_vec(),
        master_sha256,
        epsilon,
        created_ms: now_wall_ms(),
    };
    Ok((record, model_sha256))
}
