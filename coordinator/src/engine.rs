//! The coordinator's behaviour, transport-free: enrolment, polling, verification and
//! storage of updates, the round driver, aggregation and publishing. The gRPC layer
//! (`service`) only converts messages and maps errors.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use covey_proto::keys::{self, KeyPair};
use covey_proto::manifest::{ArtifactRef, Manifest, PrivacySpent};
use covey_proto::signing::{self, DeviceMethod, UpdateHeader};
use covey_strategy::{ClientUpdate, RoundContext, Strategy, StrategyState};
use covey_tensors::NamedTensors;
use rand::SeedableRng;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};
use tokio::sync::{Mutex, Notify};
use tracing::{info, warn};

use crate::artifacts::Artifacts;
use crate::config::CoordinatorConfig;
use crate::error::{CoordinatorError, Rejection, Result};
use crate::metrics::{Metrics, OutcomeLabel};
use crate::store::{Assignment, DeviceRecord, RoundRecord, RoundState, Store, UpdateRecord, VersionRecord};
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
        let wall_ms =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
        Self { wall_ms, start: tokio::time::Instant::now() }
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
    Task(Box<TaskSpec>),
    /// Ask again later.
    Wait {
        /// When.
        retry_after: Duration,
        /// Why.
        reason: String,
    },
}

/// A device's task, before conversion to protobuf.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskSpec {
    /// Round.
    pub round_id: u64,
    /// Assignment.
    pub task_id: [u8; 16],
    /// Single-use nonce.
    pub nonce: [u8; 32],
    /// Base version.
    pub base_version: u64,
    /// SHA-256 of its signed manifest.
    pub base_manifest_hash: [u8; 32],
    /// Artifact of the `A` factors.
    pub a_factors_sha256: [u8; 32],
    /// FedProx μ.
    pub proximal_mu: f64,
    /// Clip norm.
    pub clip_norm: f64,
    /// Local noise multiplier.
    pub noise_multiplier: f64,
    /// Deadline (ms).
    pub deadline_ms: u64,
}

/// A Gaussian release composed into the accountant.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PrivacyRecord {
    /// Sampling rate.
    pub q: f64,
    /// Noise multiplier.
    pub z: f64,
}

const KEY_A: &str = "a_factors";
const KEY_CONFIG: &str = "config_json";
const KEY_STRATEGY: &str = "strategy";
const KEY_PRIVACY: &str = "privacy_events";

/// The coordinator.
pub struct Coordinator {
    config: CoordinatorConfig,
    store: Arc<dyn Store>,
    artifacts: Artifacts,
    key: KeyPair,
    metrics: Arc<Metrics>,
    clock: Clock,
    strategy: Mutex<Box<dyn Strategy>>,
    wake: Notify,
    a_hash: [u8; 32],
    config_hash: [u8; 32],
    expected_b: BTreeMap<String, Vec<usize>>,
    b_values: usize,
}

impl std::fmt::Debug for Coordinator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Coordinator").field("key", &self.key).finish_non_exhaustive()
    }
}

fn now_wall_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

impl Coordinator {
    /// Open the coordinator on `store` and `artifacts`; on first start, import
    /// `config.initial_model` as version 1.
    pub async fn open(
        config: CoordinatorConfig,
        store: Arc<dyn Store>,
        artifacts: Artifacts,
        key: KeyPair,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Self>> {
        config.validate()?;
        if store.current_version().await? == 0 {
            let dir = config.initial_model.clone().ok_or_else(|| CoordinatorError::Config {
                field: "initial-model".into(),
                reason: "required on first start (a directory with config.json and model.safetensors)".into(),
            })?;
            let (config_json, master) = weights::read_initial_model(&dir, &config.lora)?;
            let a = weights::a_factors(&master, &config.lora);
            let a_hash = artifacts.put(&covey_tensors::encode(&a, None)?)?;
            let config_hash = artifacts.put(&config_json)?;
            let v = build_version(
                &artifacts,
                &key,
                &master,
                1,
                0,
                0,
                config_hash,
                privacy_spent(&[], config.privacy.delta)?,
            )?;
            store.publish(0, &v, &[(KEY_A.into(), a_hash.to_vec()), (KEY_CONFIG.into(), config_hash.to_vec())]).await?;
            info!(version = 1, "imported the initial model from {}", dir.display());
        }
        let hash_state = |v: Option<Vec<u8>>, what: &str| -> Result<[u8; 32]> {
            v.and_then(|b| b.try_into().ok()).ok_or_else(|| CoordinatorError::Corrupt(format!("{what} hash missing")))
        };
        let a_hash = hash_state(store.get_state(KEY_A).await?, KEY_A)?;
        let config_hash = hash_state(store.get_state(KEY_CONFIG).await?, KEY_CONFIG)?;
        let current = store.current_version().await?;
        let master = load_master(&*store, &artifacts, current).await?;
        let expected_b = weights::expected_b_shapes(&master, &config.lora);
        let b_values = expected_b.values().map(|s| s.iter().product::<usize>()).sum();
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
        metrics.current_version.set(current as i64);
        metrics.active_devices.set(store.devices().await?.iter().filter(|d| !d.revoked).count() as i64);
        Ok(Arc::new(Self {
            config,
            store,
            artifacts,
            key,
            metrics,
            clock: Clock::new(),
            strategy: Mutex::new(strategy),
            wake: Notify::new(),
            a_hash,
            config_hash,
            expected_b,
            b_values,
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

    /// Blobs.
    pub fn artifacts(&self) -> &Artifacts {
        &self.artifacts
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

    /// Enrol a device. Re-enrolling the same key is idempotent; a revoked key stays revoked.
    pub async fn enroll(&self, public_key: &[u8], token: &str, label: &str) -> Result<[u8; 32], tonic::Status> {
        if !self.config.enrollment.tokens.iter().any(|t| constant_time_eq(t.as_bytes(), token.as_bytes())) {
            return Err(tonic::Status::permission_denied("invalid enrolment token"));
        }
        let pk: [u8; 32] =
            signing::fixed("public_key", public_key).map_err(|e| tonic::Status::invalid_argument(e.to_string()))?;
        if label.len() > 128 {
            return Err(tonic::Status::invalid_argument("label is longer than 128 bytes"));
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
        let fresh = self.store.insert_device(&record).await.map_err(|e| tonic::Status::from(&e))?;
        if fresh {
            info!(device = %hex::encode(&id[..8]), label, "enrolled");
            self.metrics.active_devices.inc();
            self.wake.notify_one();
        }
        Ok(id)
    }

    /// Authenticate a signed device request.
    async fn authenticate(
        &self,
        method: DeviceMethod,
        device_id: &[u8],
        timestamp_ms: u64,
        signature: &[u8],
    ) -> Result<DeviceRecord, tonic::Status> {
        let id: [u8; 32] =
            signing::fixed("device_id", device_id).map_err(|e| tonic::Status::invalid_argument(e.to_string()))?;
        let device = self
            .store
            .device(&id)
            .await
            .map_err(|e| tonic::Status::from(&e))?
            .ok_or_else(|| tonic::Status::unauthenticated("unknown device"))?;
        keys::verify(&device.public_key, &signing::device_request_bytes(method, &id, timestamp_ms), signature)
            .map_err(|_| tonic::Status::unauthenticated("request signature does not verify"))?;
        let skew = self.config.enrollment.max_clock_skew.as_millis() as u64;
        if timestamp_ms.abs_diff(self.now_ms()) > skew {
            return Err(tonic::Status::unauthenticated("request timestamp is outside the allowed clock skew"));
        }
        if device.revoked {
            return Err(tonic::Status::permission_denied("device is revoked"));
        }
        self.store.touch(&id, self.now_ms()).await.map_err(|e| tonic::Status::from(&e))?;
        Ok(device)
    }

    /// A device asks for work.
    pub async fn poll(
        &self,
        device_id: &[u8],
        timestamp_ms: u64,
        signature: &[u8],
    ) -> Result<PollOutcome, tonic::Status> {
        let device = self.authenticate(DeviceMethod::Poll, device_id, timestamp_ms, signature).await?;
        self.wake.notify_one();
        let wait =
            |reason: &str| PollOutcome::Wait { retry_after: self.config.rounds.poll_interval, reason: reason.into() };
        let Some(round) = self.store.active_round().await.map_err(|e| tonic::Status::from(&e))? else {
            return Ok(wait("no open round"));
        };
        if !round.state.accepts_updates() || self.now_ms() >= round.deadline_ms {
            return Ok(wait("the round is closing"));
        }
        let Some(a) = self.store.assignment(round.id, &device.id).await.map_err(|e| tonic::Status::from(&e))? else {
            return Ok(wait("not sampled for this round"));
        };
        if a.used {
            return Ok(wait("update already received for this round"));
        }
        let version = self.version(round.base_version).await.map_err(|e| tonic::Status::from(&e))?;
        let round_config = self.strategy.lock().await.configure_round(&self.round_context(&round));
        let clip_norm = round_config.clip_norm.unwrap_or(self.config.privacy.clip_norm);
        Ok(PollOutcome::Task(Box::new(TaskSpec {
            round_id: round.id,
            task_id: a.task_id,
            nonce: a.nonce,
            base_version: round.base_version,
            base_manifest_hash: version.manifest_sha256,
            a_factors_sha256: self.a_hash,
            proximal_mu: round_config.proximal_mu,
            clip_norm,
            noise_multiplier: self.config.privacy.local_noise_multiplier,
            deadline_ms: round.deadline_ms,
        })))
    }

    /// A device says it is alive; returns the current version.
    pub async fn heartbeat(&self, device_id: &[u8], timestamp_ms: u64, signature: &[u8]) -> Result<u64, tonic::Status> {
        self.authenticate(DeviceMethod::Heartbeat, device_id, timestamp_ms, signature).await?;
        self.wake.notify_one();
        self.store.current_version().await.map_err(|e| tonic::Status::from(&e))
    }

    async fn version(&self, v: u64) -> Result<VersionRecord> {
        self.store.version(v).await?.ok_or_else(|| CoordinatorError::Corrupt(format!("version {v} is missing")))
    }

    /// The signed manifest of a version (0: the current one).
    pub async fn manifest(&self, version: u64) -> Result<Option<VersionRecord>> {
        let v = if version == 0 { self.store.current_version().await? } else { version };
        self.store.version(v).await
    }

    fn round_context(&self, round: &RoundRecord) -> RoundContext {
        RoundContext {
            round: round.id,
            expected_clients: round.cohort_size.max(1) as usize,
            population: self.config.privacy.population.max(round.cohort_size as usize),
        }
    }

    /// Verify and durably store one upload. Nothing is stored unless every check passes;
    /// the caller acknowledges only after this returns `Ok`.
    pub async fn accept_update(
        &self,
        signed_header: &[u8],
        signature: &[u8],
        payload: &[u8],
        train_loss: f32,
    ) -> Result<std::result::Result<(u64, u64), Rejection>> {
        let outcome = self.check_and_store(signed_header, signature, payload, train_loss).await?;
        match &outcome {
            Ok((id, round)) => {
                self.metrics.updates_accepted.inc();
                self.metrics.bytes_received.inc_by(payload.len() as u64);
                info!(update = id, round, bytes = payload.len(), "update stored");
                self.wake.notify_one();
            }
            Err(r) => {
                self.metrics.reject(r.label());
                warn!(reason = r.label(), "update refused: {r}");
            }
        }
        Ok(outcome)
    }

    async fn check_and_store(
        &self,
        signed_header: &[u8],
        signature: &[u8],
        payload: &[u8],
        train_loss: f32,
    ) -> Result<std::result::Result<(u64, u64), Rejection>> {
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
        if header.payload_len > self.config.limits.max_payload_bytes {
            reject!(Rejection::Oversized { limit: self.config.limits.max_payload_bytes });
        }
        if header.payload_len != payload.len() as u64 {
            reject!(Rejection::LengthMismatch { expected: header.payload_len, found: payload.len() as u64 });
        }
        if keys::sha256(payload) != header.payload_sha256 {
            reject!(Rejection::PayloadHash);
        }
        if header.num_examples == 0 {
            reject!(Rejection::NoExamples);
        }
        if let Err(r) = self.check_payload(payload, clip_norm) {
            reject!(r);
        }
        // Durable blob first, then the row that makes it part of the round.
        let payload_sha256 = self.artifacts.put(payload)?;
        let record = UpdateRecord {
            id: 0,
            round_id: round.id,
            device_id: device.id,
            header: signed_header.to_vec(),
            signature: signature.to_vec(),
            payload_sha256,
            num_examples: header.num_examples,
            within_clip: header.within_clip,
            train_loss: if train_loss.is_finite() { train_loss } else { f32::NAN },
            received_ms: self.now_ms(),
        };
        Ok(self.store.insert_update(&record, &header.nonce).await?.map(|id| (id, round.id)))
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

    /// Run rounds until `max-rounds` are published (or forever).
    pub async fn run_rounds(self: Arc<Self>) -> Result<()> {
        loop {
            let published =
                self.store.rounds(usize::MAX >> 1).await?.iter().filter(|r| r.state == RoundState::Published).count()
                    as u64;
            if self.config.rounds.max_rounds > 0 && published >= self.config.rounds.max_rounds {
                info!(published, "max-rounds reached; no more rounds");
                return Ok(());
            }
            let round = match self.store.active_round().await? {
                Some(r) => r,
                None => match self.open_round().await? {
                    Some(r) => r,
                    None => {
                        let _ = tokio::time::timeout(self.config.rounds.poll_interval, self.wake.notified()).await;
                        continue;
                    }
                },
            };
            self.drive(round).await?;
            tokio::time::sleep(self.config.rounds.pause).await;
        }
    }

    /// Sample a cohort among eligible devices and open a round; `None` when fewer than
    /// `min-available` devices are eligible.
    pub async fn open_round(&self) -> Result<Option<RoundRecord>> {
        let now = self.now_ms();
        let window = self.config.rounds.eligibility_window.as_millis() as u64;
        let mut eligible: Vec<DeviceRecord> =
            self.store.devices().await?.into_iter().filter(|d| !d.revoked && d.last_seen_ms + window >= now).collect();
        if eligible.len() < self.config.rounds.min_available.max(self.config.rounds.min_updates) {
            return Ok(None);
        }
        let id = self.store.rounds(1).await?.first().map_or(1, |r| r.id + 1);
        let mut rng =
            rand_chacha::ChaCha8Rng::seed_from_u64(self.config.rounds.seed ^ id.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        eligible.shuffle(&mut rng);
        eligible.truncate(self.config.cohort_size(eligible.len()));
        let mut assignments = Vec::with_capacity(eligible.len());
        for d in &eligible {
            assignments.push(Assignment {
                round_id: id,
                device_id: d.id,
                task_id: keys::random_bytes()?,
                nonce: keys::random_bytes()?,
                used: false,
            });
        }
        let round = RoundRecord {
            id,
            state: RoundState::Open,
            base_version: self.store.current_version().await?,
            published_version: 0,
            cohort_size: eligible.len() as u64,
            target_updates: self.config.rounds.target_updates.min(eligible.len()) as u64,
            min_updates: self.config.rounds.min_updates as u64,
            opened_ms: now,
            deadline_ms: now + self.config.rounds.deadline.as_millis() as u64,
            failure: String::new(),
        };
        self.store.insert_round(&round, &assignments).await?;
        info!(round = id, cohort = round.cohort_size, base = round.base_version, "round opened");
        Ok(Some(round))
    }

    /// Collect until the target or the deadline, then aggregate and publish (or fail).
    pub async fn drive(&self, round: RoundRecord) -> Result<()> {
        if round.state.accepts_updates() {
            loop {
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
            let count = self.store.update_count(round.id).await?;
            if count < round.min_updates {
                let reason = format!("{count} of the {} updates needed arrived by the deadline", round.min_updates);
                self.store.set_round_state(round.id, RoundState::Failed, &reason).await?;
                self.metrics.rounds.get_or_create(&OutcomeLabel { outcome: "failed".into() }).inc();
                warn!(round = round.id, "round failed: {reason}");
                return Ok(());
            }
            self.store.set_round_state(round.id, RoundState::Aggregating, "").await?;
        }
        let started = std::time::Instant::now();
        match self.aggregate_and_publish(&round).await? {
            Some(v) => {
                self.metrics.rounds.get_or_create(&OutcomeLabel { outcome: "published".into() }).inc();
                self.metrics.current_version.set(v as i64);
                info!(round = round.id, version = v, "published");
            }
            None => {
                self.store.set_round_state(round.id, RoundState::Failed, "no usable update").await?;
                self.metrics.rounds.get_or_create(&OutcomeLabel { outcome: "failed".into() }).inc();
            }
        }
        self.metrics.aggregate_seconds.observe(started.elapsed().as_secs_f64());
        self.metrics.round_seconds.observe(self.now_ms().saturating_sub(round.opened_ms) as f64 / 1000.0);
        Ok(())
    }

    async fn aggregate_and_publish(&self, round: &RoundRecord) -> Result<Option<u64>> {
        let records = self.store.updates(round.id).await?;
        let mut keys_by_device = HashMap::new();
        for r in &records {
            if let Some(d) = self.store.device(&r.device_id).await? {
                keys_by_device.insert(d.id, (d.public_key, d.revoked));
            }
        }
        let ctx = self.round_context(round);
        let failures = (round.cohort_size as usize).saturating_sub(records.len());
        let mut strategy = self.strategy.lock().await;
        let base = self.version(round.base_version).await?;
        let master = decode_blob(&self.artifacts, &base.master_sha256)?;
        let a = decode_blob(&self.artifacts, &self.a_hash)?;
        let aggregate = {
            let mut stream = StoredUpdates::new(&records, &self.artifacts, &keys_by_device);
            let aggregate = strategy.aggregate(&ctx, &mut stream, failures)?;
            if let Some(e) = stream.error.take() {
                return Err(e);
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
        let v = build_version(
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
        self.store.publish(round.id, &v, &[(KEY_STRATEGY.into(), state), (KEY_PRIVACY.into(), events)]).await?;
        Ok(Some(version))
    }

    async fn privacy_events(&self) -> Result<Vec<PrivacyRecord>> {
        match self.store.get_state(KEY_PRIVACY).await? {
            None => Ok(Vec::new()),
            Some(b) => {
                serde_json::from_slice(&b).map_err(|e| CoordinatorError::Corrupt(format!("privacy events: {e}")))
            }
        }
    }

    /// ε spent so far at the configured δ.
    pub async fn epsilon(&self) -> Result<f64> {
        Ok(privacy_spent(&self.privacy_events().await?, self.config.privacy.delta)?.epsilon)
    }

    /// Make `version` current (operators).
    pub async fn promote(&self, version: u64) -> Result<u64, tonic::Status> {
        if self.store.version(version).await.map_err(|e| tonic::Status::from(&e))?.is_none() {
            return Err(tonic::Status::not_found(format!("version {version} does not exist")));
        }
        self.store.set_current_version(version).await.map_err(|e| tonic::Status::from(&e))?;
        self.metrics.current_version.set(version as i64);
        info!(version, "promoted");
        Ok(version)
    }

    /// Go back to `version`, or to the current version's parent when 0.
    pub async fn rollback(&self, version: u64) -> Result<u64, tonic::Status> {
        let target = if version == 0 {
            let current = self.store.current_version().await.map_err(|e| tonic::Status::from(&e))?;
            let v = self.store.version(current).await.map_err(|e| tonic::Status::from(&e))?;
            match v {
                Some(v) if v.parent > 0 => v.parent,
                _ => return Err(tonic::Status::failed_precondition("the current version has no parent")),
            }
        } else {
            version
        };
        self.promote(target).await
    }

    /// Revoke a device.
    pub async fn revoke(&self, device_id: &[u8; 32]) -> Result<bool> {
        let changed = self.store.revoke(device_id).await?;
        if changed {
            self.metrics.active_devices.dec();
            info!(device = %hex::encode(&device_id[..8]), "revoked");
        }
        Ok(changed)
    }
}

/// Streams a round's stored updates to a strategy one at a time, re-verifying each
/// signature and payload hash (so the benchmark and a restarted coordinator trust nothing
/// they did not check); revoked devices' updates are dropped.
pub struct StoredUpdates<'a> {
    records: std::slice::Iter<'a, UpdateRecord>,
    artifacts: &'a Artifacts,
    keys: &'a HashMap<[u8; 32], ([u8; 32], bool)>,
    /// A storage failure met while streaming (the stream ends early).
    pub error: Option<CoordinatorError>,
    /// Updates dropped (revoked device, failed re-verification).
    pub dropped: usize,
}

impl<'a> StoredUpdates<'a> {
    /// Stream `records`.
    pub fn new(
        records: &'a [UpdateRecord],
        artifacts: &'a Artifacts,
        keys: &'a HashMap<[u8; 32], ([u8; 32], bool)>,
    ) -> Self {
        Self { records: records.iter(), artifacts, keys, error: None, dropped: 0 }
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
            let payload = match self.artifacts.get(&r.payload_sha256) {
                Ok(p) => p,
                Err(e) => {
                    self.error = Some(e);
                    return None;
                }
            };
            let ok = !revoked
                && keys::verify(pk, &r.header, &r.signature).is_ok()
                && header.as_ref().is_some_and(|h| h.payload_sha256 == keys::sha256(&payload));
            if !ok {
                warn!(update = r.id, "stored update fails re-verification or its device is revoked; dropped");
                self.dropped += 1;
                continue;
            }
            match covey_tensors::decode(&payload) {
                Ok((delta, _)) => {
                    return Some(ClientUpdate {
                        client: hex::encode(&r.device_id[..8]),
                        num_examples: r.num_examples,
                        delta,
                        within_clip: r.within_clip,
                    });
                }
                Err(e) => {
                    self.error = Some(e.into());
                    return None;
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

/// Store master (f32) and device (int8) weights, and sign a manifest for them.
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
) -> Result<VersionRecord> {
    let master_bytes = covey_tensors::encode(master, None)?;
    let master_sha256 = artifacts.put(&master_bytes)?;
    let int8 = covey_tensors::quant::encode_int8(master, HashMap::new())?;
    let model_sha256 = artifacts.put(&int8)?;
    let config_size = artifacts.get(&config_hash)?.len() as u64;
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
    Ok(VersionRecord {
        version,
        parent,
        round_id,
        manifest_sha256: keys::sha256(&bytes),
        manifest: bytes,
        signature: signature.to_vec(),
        master_sha256,
        epsilon,
        created_ms: now_wall_ms(),
    })
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
