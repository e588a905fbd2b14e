//! The coordinator's behaviour, transport-free: no gRPC type appears here. Every method
//! returns [`crate::Result`]; a refused device request is
//! [`CoordinatorError::Rejected`] with a typed [`crate::Rejection`], counted and logged
//! where it is refused, and only the service (`service`) turns it into a status.
//!
//! What a device says is checked against what the coordinator knows itself: the signed
//! header must carry the task's round, nonce, base version, clip norm, noise and number
//! of examples (steps × batch size, which is also the aggregation weight: never the
//! device's word); the cohort is sampled here (Poisson, from the OS CSPRNG; from
//! `rounds.seed` in simulations) and the
//! sampling rate the accountant uses is the one the sampling used. The round's
//! parameters are decided by the pure [`crate::round`] policy when it opens and stored
//! on its record.
//!
//! | file | concern |
//! |---|---|
//! | `mod.rs` | the [`Coordinator`], opening the state, accessors, the version watch |
//! | `devices.rs` | enrolment, tokens, request authentication, polls and tasks, heartbeats, downloads, revocation |
//! | `intake.rs` | update uploads: header first, then the streamed payload |
//! | `rounds.rs` | the round driver: opening, collecting, deadlines, operator actions |
//! | `publish.rs` | aggregation, privacy accounting, adapter versions and base releases, signing |

mod devices;
mod intake;
pub mod integrity;
mod publish;
mod rounds;

use std::collections::{BTreeMap, HashSet};
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex as StdMutex, RwLock};
use std::time::Duration;

use covey_proto::keys::{self, KeyPair};
use covey_proto::signing::TaskBinding;
use covey_proto::task::Task;
use covey_strategy::{Strategy, StrategyState};
use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota, RateLimiter};
use tokio::sync::{Mutex, Notify, watch};
use tracing::warn;

use crate::artifacts::Artifacts;
use crate::config::CoordinatorConfig;
use crate::error::{CoordinatorError, Rejection, Result};
use crate::metrics::Metrics;
pub use crate::round::NoRound;
use crate::store::{RoundRecord, Store, TokenRecord, VersionRecord};
use crate::weights;

pub use crate::round::PrivacyRecord;
pub use intake::UploadPermit;
pub use publish::StoredUpdates;

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
        /// How long to wait before polling again.
        retry_after: Duration,
        /// Why there is no task (for the device's log).
        reason: String,
    },
}

/// A device's task and the coordinator's signature over its binding.
#[derive(Debug, Clone, PartialEq)]
pub struct SignedTask {
    /// The task.
    pub task: Task,
    /// What is signed: the task bound to the device ([`Task::binding`]).
    pub binding: TaskBinding,
    /// Ed25519 signature of the coordinator over [`TaskBinding::to_bytes`].
    pub signature: [u8; 64],
}

/// What [`Coordinator::open_round`] did.
#[derive(Debug, Clone, PartialEq)]
pub enum Opening {
    /// A round was opened (it may be failed at once when the sample came out below
    /// `min-updates`).
    Opened(Box<RoundRecord>),
    /// No round opens now, and why.
    NotOpened(NoRound),
}

impl Opening {
    /// The round, when one was opened.
    pub fn round(self) -> Option<RoundRecord> {
        match self {
            Self::Opened(r) => Some(*r),
            _ => None,
        }
    }
}

const KEY_A: &str = "a_factors";
const KEY_STRATEGY: &str = "strategy";
const KEY_PRIVACY: &str = "privacy_events";
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
    versions: watch::Sender<u64>,
    a_hash: [u8; 32],
    expected_b: BTreeMap<String, Vec<usize>>,
    b_values: usize,
    max_payload: u64,
    served: RwLock<HashSet<[u8; 32]>>,
    uploading: Arc<StdMutex<HashSet<[u8; 32]>>>,
    device_limiter: DefaultKeyedRateLimiter<[u8; 32]>,
    enroll_limiter: DefaultDirectRateLimiter,
    token_limiter: DefaultKeyedRateLimiter<[u8; 32]>,
    pace: crate::pace::PaceSteering,
    /// The state directory's lock, when [`crate::server::open_engine`] took one.
    state_lock: std::sync::OnceLock<std::fs::File>,
}

impl std::fmt::Debug for Coordinator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Coordinator").field("key", &self.key).finish_non_exhaustive()
    }
}

use covey_proto::signing::unix_ms as now_wall_ms;

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

/// The artifacts a stored version's signed manifest names.
fn manifest_artifacts(v: &VersionRecord) -> Result<Vec<[u8; 32]>> {
    let m = publish::parse_manifest(v)?;
    m.artifacts()
        .into_iter()
        .map(|a| {
            a.sha256_bytes().map_err(|e| CoordinatorError::Corrupt(format!("manifest of version {}: {e}", v.version)))
        })
        .collect()
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
            publish::import_initial_model(&config, &*store, &artifacts, &key).await?;
        }
        let hash_state = |v: Option<Vec<u8>>, what: &str| -> Result<[u8; 32]> {
            v.and_then(|b| b.try_into().ok()).ok_or_else(|| CoordinatorError::Corrupt(format!("{what} hash missing")))
        };
        let a_hash = hash_state(store.get_state(KEY_A).await?, KEY_A)?;
        integrity::check_and_repair(&config, &*store, &artifacts, &uploads, a_hash).await?;
        let current = store.current_version().await?;
        let master = publish::load_master(&*store, &artifacts, current).await?;
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
            config.privacy.effective_central().as_ref(),
            covey_strategy::Randomness::Os,
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
        let mut served = HashSet::from([a_hash]);
        for v in store.versions().await? {
            served.extend(manifest_artifacts(&v)?);
        }
        if let Some(seed) = config.rounds.seed {
            warn!(seed, "cohorts are sampled from a seed: anyone who knows it knows who is sampled (simulations only)");
        }
        let max_payload = config.limits.max_payload_bytes.min(b_values as u64 * 4 + PAYLOAD_HEADER_SLACK);
        metrics.current_version.set(current as i64);
        metrics.active_devices.set(store.devices().await?.iter().filter(|d| !d.revoked).count() as i64);
        Ok(Arc::new(Self {
            device_limiter: RateLimiter::keyed(per_minute(device_rate(&config))),
            enroll_limiter: RateLimiter::direct(per_minute(config.enrollment.per_minute)),
            token_limiter: RateLimiter::keyed(per_minute(config.enrollment.per_token_per_minute)),
            pace: crate::pace::PaceSteering::new(
                config.rounds.pace_polls_per_second,
                config.rounds.poll_interval,
                config.rounds.pace_max_wait,
            ),
            state_lock: std::sync::OnceLock::new(),
            config,
            store,
            artifacts,
            uploads,
            key,
            metrics,
            clock: Clock::new(),
            strategy: Mutex::new(strategy),
            wake: Notify::new(),
            versions: watch::Sender::new(current),
            a_hash,
            expected_b,
            b_values,
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

    /// Keep the state directory's lock for as long as the engine lives.
    pub(crate) fn hold_state_lock(&self, lock: std::fs::File) {
        let _ = self.state_lock.set(lock);
    }

    /// The largest payload an update may have: the configured limit, or the expected `B`
    /// factors plus 64 KiB of header when smaller.
    pub fn max_payload_bytes(&self) -> u64 {
        self.max_payload
    }

    /// Examples behind every update of a round opened now (steps × batch size of the
    /// task): its aggregation weight, whatever a device declares.
    pub fn examples_per_update(&self) -> u64 {
        u64::from(self.config.training.steps) * u64::from(self.config.training.batch_size)
    }

    /// The latest version published (or made current by an operator): a listener wakes
    /// on each new one instead of polling the store.
    pub fn watch_versions(&self) -> watch::Receiver<u64> {
        self.versions.subscribe()
    }

    /// Count and log a refused device request; the error to return.
    fn refuse(&self, r: Rejection) -> CoordinatorError {
        self.metrics.refuse(r.label());
        warn!(reason = r.label(), "request refused: {r}");
        CoordinatorError::Rejected(r)
    }

    async fn version(&self, v: u64) -> Result<VersionRecord> {
        self.store.version(v).await?.ok_or_else(|| CoordinatorError::Corrupt(format!("version {v} is missing")))
    }
}
