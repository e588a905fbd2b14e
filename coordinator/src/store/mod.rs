//! Durable state: the [`Store`] trait, its embedded default [`SqliteStore`] (sqlx, WAL,
//! `synchronous = FULL`, `store/sqlite.rs`), and [`MemoryStore`] for tests and simulations
//! (`store/memory.rs`); one conformance suite (`conformance`, tests only) runs on both.
//!
//! *Invariant*: an update row is inserted, and its nonce consumed, in one transaction; a
//! publish (new version, round closed, current version, strategy and accountant state) is
//! one transaction. A crash at any point leaves either the old or the new state.

mod memory;
mod sqlite;

use std::collections::BTreeMap;

use async_trait::async_trait;

use crate::error::{CoordinatorError, Result};
use crate::round::RoundPlan;

pub use memory::MemoryStore;
pub use sqlite::SqliteStore;

/// An enrolled device.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceRecord {
    /// SHA-256 of the public key.
    pub id: [u8; 32],
    /// Raw Ed25519 public key.
    pub public_key: [u8; 32],
    /// Operator label.
    pub label: String,
    /// Enrolment time (ms).
    pub enrolled_ms: u64,
    /// Last poll or heartbeat (ms; 0: never).
    pub last_seen_ms: u64,
    /// Revoked devices are refused everywhere.
    pub revoked: bool,
}

/// Where a round is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RoundState {
    /// Sampled, waiting for the first update.
    Open,
    /// At least one update stored.
    Collecting,
    /// Closed to uploads, aggregating.
    Aggregating,
    /// A new version was published.
    Published,
    /// Closed without a version.
    Failed,
}

impl RoundState {
    /// Stable name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Open => "open",
            Self::Collecting => "collecting",
            Self::Aggregating => "aggregating",
            Self::Published => "published",
            Self::Failed => "failed",
        }
    }

    fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "open" => Self::Open,
            "collecting" => Self::Collecting,
            "aggregating" => Self::Aggregating,
            "published" => Self::Published,
            "failed" => Self::Failed,
            other => return Err(CoordinatorError::Corrupt(format!("unknown round state `{other}`"))),
        })
    }

    /// Whether uploads are accepted.
    pub fn accepts_updates(self) -> bool {
        matches!(self, Self::Open | Self::Collecting)
    }
}

/// One round.
#[derive(Debug, Clone, PartialEq)]
pub struct RoundRecord {
    /// Round number from 1.
    pub id: u64,
    /// State.
    pub state: RoundState,
    /// Version trained on.
    pub base_version: u64,
    /// Version published (0: none).
    pub published_version: u64,
    /// Devices sampled.
    pub cohort_size: u64,
    /// Devices the cohort was sampled from, N (0 in rounds stored before Poisson sampling).
    pub population: u64,
    /// Expected cohort size q·N: each of the N devices was sampled with probability
    /// `expected_cohort / population`, and central DP divides by it.
    pub expected_cohort: u64,
    /// Updates that close the round early.
    pub target_updates: u64,
    /// Updates needed at the deadline.
    pub min_updates: u64,
    /// Opening time (ms).
    pub opened_ms: u64,
    /// Deadline (ms).
    pub deadline_ms: u64,
    /// Why it failed.
    pub failure: String,
    /// What the round prescribes to its devices, fixed when it opened (`None` for a round
    /// stored before plans were).
    pub plan: Option<RoundPlan>,
}

/// One device's task in one round.
#[derive(Debug, Clone, PartialEq)]
pub struct Assignment {
    /// Round.
    pub round_id: u64,
    /// Device.
    pub device_id: [u8; 32],
    /// Task id.
    pub task_id: [u8; 16],
    /// Single-use nonce.
    pub nonce: [u8; 32],
    /// Whether an update consumed the nonce.
    pub used: bool,
    /// Why the device declined the task, when it did (it will send no update).
    pub declined: Option<String>,
}

/// How much one device has contributed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Participation {
    /// Accepted updates, over all rounds.
    pub count: u64,
    /// The latest round with an accepted update.
    pub last_round: u64,
}

/// A stored, verified update; the payload lives in the artifact store under its hash.
#[derive(Debug, Clone, PartialEq)]
pub struct UpdateRecord {
    /// Row id (assigned by the store).
    pub id: u64,
    /// Round.
    pub round_id: u64,
    /// Device.
    pub device_id: [u8; 32],
    /// The signed header, verbatim.
    pub header: Vec<u8>,
    /// The device's signature over `header`.
    pub signature: Vec<u8>,
    /// SHA-256 of the payload (artifact key).
    pub payload_sha256: [u8; 32],
    /// Aggregation weight.
    pub num_examples: u64,
    /// Adaptive-clipping bit.
    pub within_clip: Option<bool>,
    /// Reported training loss (`None`: not reported, as under local noise).
    pub train_loss: Option<f32>,
    /// Arrival (ms).
    pub received_ms: u64,
}

/// An enrolment token, kept as its SHA-256.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenRecord {
    /// SHA-256 of the token.
    pub hash: [u8; 32],
    /// Operator note.
    pub label: String,
    /// Devices it may still enrol; negative: unlimited (static tokens of the config).
    pub uses_left: i64,
    /// Expiry (ms since the Unix epoch); 0: never.
    pub expires_ms: u64,
    /// A device it enrolled was revoked: it enrols no one any more.
    pub burned: bool,
    /// Creation (ms).
    pub created_ms: u64,
}

/// What an enrolment did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EnrollOutcome {
    /// A new device; one use of the token consumed.
    Enrolled,
    /// This key was enrolled already (nothing consumed).
    AlreadyEnrolled,
    /// This key belongs to a revoked device.
    DeviceRevoked,
    /// No such token.
    TokenUnknown,
    /// The token expired.
    TokenExpired,
    /// The token has no uses left.
    TokenUsedUp,
    /// The token was burned by a revocation.
    TokenBurned,
}

/// What a revocation did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RevokeOutcome {
    /// The device was not revoked before.
    pub changed: bool,
    /// The token that enrolled it was burned now.
    pub token_burned: bool,
}

/// A published model version.
#[derive(Debug, Clone, PartialEq)]
pub struct VersionRecord {
    /// Version from 1.
    pub version: u64,
    /// Parent (0: none).
    pub parent: u64,
    /// Producing round (0: initial).
    pub round_id: u64,
    /// Manifest bytes as signed.
    pub manifest: Vec<u8>,
    /// Coordinator signature.
    pub signature: Vec<u8>,
    /// SHA-256 of `manifest`.
    pub manifest_sha256: [u8; 32],
    /// Artifact key of the f32 master weights.
    pub master_sha256: [u8; 32],
    /// ε spent up to it.
    pub epsilon: f64,
    /// Creation (ms).
    pub created_ms: u64,
}

/// Durable coordinator state. Implementations must pass `tests::store_conformance`.
#[async_trait]
pub trait Store: Send + Sync {
    /// Add a device; `false` when the id exists already.
    async fn insert_device(&self, d: &DeviceRecord) -> Result<bool>;
    /// One device.
    async fn device(&self, id: &[u8; 32]) -> Result<Option<DeviceRecord>>;
    /// All devices, in enrolment order.
    async fn devices(&self) -> Result<Vec<DeviceRecord>>;
    /// Add an enrolment token; `false` when its hash exists already (left as it is, so a
    /// burned static token stays burned across restarts).
    async fn insert_token(&self, t: &TokenRecord) -> Result<bool>;
    /// Enrol `d` with the token of SHA-256 `token_hash`, atomically: the token must exist,
    /// be unexpired at `now_ms`, unburned and have a use left (consumed).
    async fn enroll(&self, d: &DeviceRecord, token_hash: &[u8; 32], now_ms: u64) -> Result<EnrollOutcome>;
    /// Revoke a device and burn the token that enrolled it, in one transaction.
    async fn revoke(&self, id: &[u8; 32]) -> Result<RevokeOutcome>;
    /// Record a sign of life.
    async fn touch(&self, id: &[u8; 32], now_ms: u64) -> Result<()>;
    /// Open a round with its assignments.
    async fn insert_round(&self, r: &RoundRecord, assignments: &[Assignment]) -> Result<()>;
    /// The round that is not finished, if any.
    async fn active_round(&self) -> Result<Option<RoundRecord>>;
    /// Rounds, newest first.
    async fn rounds(&self, limit: usize) -> Result<Vec<RoundRecord>>;
    /// Move an unfinished round to `state` (with a failure reason for `Failed`); `false`
    /// when the round is finished (published or failed) already: those states are final.
    async fn set_round_state(&self, id: u64, state: RoundState, failure: &str) -> Result<bool>;
    /// A device's assignment in a round.
    async fn assignment(&self, round_id: u64, device_id: &[u8; 32]) -> Result<Option<Assignment>>;
    /// Store an update and consume its assignment's nonce, atomically. A used nonce is
    /// A round no longer open or a nonce already used is
    /// [`CoordinatorError::Rejected`] (`RoundClosed`, `Replay`), and nothing is written.
    async fn insert_update(&self, u: &UpdateRecord, nonce: &[u8; 32]) -> Result<u64>;
    /// Updates of a round, in arrival order.
    async fn updates(&self, round_id: u64) -> Result<Vec<UpdateRecord>>;
    /// Number of updates of a round.
    async fn update_count(&self, round_id: u64) -> Result<u64>;
    /// Record that a device declined its task in a round, with its reason; `false` when
    /// the assignment is missing, used by an update, or declined already.
    async fn decline(&self, round_id: u64, device_id: &[u8; 32], reason: &str) -> Result<bool>;
    /// Number of declined tasks of a round.
    async fn declined_count(&self, round_id: u64) -> Result<u64>;
    /// Updates accepted from a device, over all rounds.
    async fn device_update_count(&self, device_id: &[u8; 32]) -> Result<u64>;
    /// Per device that has contributed: its accepted updates and the latest round of one
    /// (the participation limits' and DP-FTRL's accountant's input).
    async fn participations(&self) -> Result<BTreeMap<[u8; 32], Participation>>;
    /// One device's [`Participation`] (`None`: it has not contributed).
    async fn participation(&self, device_id: &[u8; 32]) -> Result<Option<Participation>>;
    /// Publish, in one transaction: insert the version, close the round (0: the initial
    /// version, no round), store `state` entries, and make the version current when the
    /// current version is still its parent (an operator's promote or rollback meanwhile is
    /// not undone). A round that is no longer `aggregating` (failed by the operator) is
    /// refused with [`CoordinatorError::Refused`] and nothing changes. Returns whether the
    /// version became current.
    async fn publish(&self, round_id: u64, v: &VersionRecord, state: &[(String, Vec<u8>)]) -> Result<bool>;
    /// One version.
    async fn version(&self, version: u64) -> Result<Option<VersionRecord>>;
    /// All versions, newest first.
    async fn versions(&self) -> Result<Vec<VersionRecord>>;
    /// The current version (0: none yet).
    async fn current_version(&self) -> Result<u64>;
    /// Make a version current.
    async fn set_current_version(&self, version: u64) -> Result<()>;
    /// A state entry.
    async fn get_state(&self, key: &str) -> Result<Option<Vec<u8>>>;
}

/// A big-endian `u64` state value (0 when it is not 8 bytes).
fn decode_u64(b: &[u8]) -> u64 {
    b.try_into().map(u64::from_be_bytes).unwrap_or(0)
}

/// The `current_version` state value.
fn decode_current(b: &[u8]) -> Result<u64> {
    match <[u8; 8]>::try_from(b).map(u64::from_be_bytes) {
        Ok(v) if v > 0 && v <= i64::MAX as u64 => Ok(v),
        _ => Err(CoordinatorError::Corrupt(format!("current_version is {} bytes {}", b.len(), hex::encode(b)))),
    }
}

#[cfg(test)]
pub(crate) mod conformance {
    //! The behaviour every store must have, run on each implementation.
    use super::*;
    use crate::error::Rejection;

    fn device(n: u8) -> DeviceRecord {
        DeviceRecord {
            id: [n; 32],
            public_key: [n; 32],
            label: format!("d{n}"),
            enrolled_ms: 1,
            last_seen_ms: 0,
            revoked: false,
        }
    }

    pub(crate) fn round(id: u64) -> RoundRecord {
        RoundRecord {
            id,
            state: RoundState::Open,
            base_version: 1,
            published_version: 0,
            cohort_size: 2,
            population: 4,
            expected_cohort: 2,
            target_updates: 2,
            min_updates: 1,
            opened_ms: 5,
            deadline_ms: 10,
            failure: String::new(),
            plan: Some(RoundPlan {
                frame: crate::round::RoundFrame {
                    round_id: id,
                    base_version: 1,
                    base_manifest_hash: [3; 32],
                    a_factors_sha256: [4; 32],
                    deadline_ms: 10,
                    max_payload_bytes: 1 << 20,
                },
                lora: covey_proto::task::LoraSpec {
                    rank: 2,
                    alpha: 4.0,
                    targets: vec![covey_tensors::lora::LoraTarget::Q],
                    a_factors_sha256: [4; 32],
                },
                training: covey_proto::task::TrainingSpec {
                    steps: 3,
                    batch_size: 2,
                    seq_len: 8,
                    learning_rate: f64::from(0.01f32),
                    proximal_mu: 0.0,
                    seed: 7 ^ id,
                    update_encoding: Default::default(),
                },
                privacy: covey_proto::task::PrivacySpec { clip_norm: 0.1 + 0.2, noise_multiplier: 0.0 },
            }),
        }
    }

    pub(crate) fn update(round_id: u64, dev: u8) -> UpdateRecord {
        UpdateRecord {
            id: 0,
            round_id,
            device_id: [dev; 32],
            header: vec![1, 2],
            signature: vec![3],
            payload_sha256: [7; 32],
            num_examples: 4,
            within_clip: Some(true),
            train_loss: Some(1.5),
            received_ms: 6,
        }
    }

    fn version(v: u64) -> VersionRecord {
        VersionRecord {
            version: v,
            parent: v - 1,
            round_id: v - 1,
            manifest: b"{}".to_vec(),
            signature: vec![0; 64],
            manifest_sha256: [v as u8; 32],
            master_sha256: [9; 32],
            epsilon: 0.5,
            created_ms: 3,
        }
    }

    /// The behaviour every [`Store`] must have.
    pub(crate) async fn store_conformance(s: &dyn Store) {
        assert!(s.insert_device(&device(1)).await.expect("insert"));
        assert!(!s.insert_device(&device(1)).await.expect("again"), "duplicate ids are refused");
        assert!(s.insert_device(&device(2)).await.expect("insert"));
        assert_eq!(s.devices().await.expect("devices").len(), 2);
        s.touch(&[1; 32], 99).await.expect("touch");
        assert_eq!(s.device(&[1; 32]).await.expect("get").expect("some").last_seen_ms, 99);
        assert!(s.revoke(&[2; 32]).await.expect("revoke").changed);
        assert!(!s.revoke(&[2; 32]).await.expect("revoke twice").changed);
        assert!(s.device(&[2; 32]).await.expect("get").expect("some").revoked);

        // Tokens: single-use, expiring, burned by a revocation.
        let token = |h: u8, uses: i64, expires_ms: u64| TokenRecord {
            hash: [h; 32],
            label: String::new(),
            uses_left: uses,
            expires_ms,
            burned: false,
            created_ms: 0,
        };
        assert!(s.insert_token(&token(1, 1, 0)).await.expect("token"));
        assert!(!s.insert_token(&token(1, 5, 0)).await.expect("token again"), "an existing token is kept");
        assert!(s.insert_token(&token(2, 5, 100)).await.expect("token"));
        assert!(s.insert_token(&token(3, -1, 0)).await.expect("static"));
        assert_eq!(s.enroll(&device(10), &[9; 32], 50).await.expect("e"), EnrollOutcome::TokenUnknown);
        assert_eq!(s.enroll(&device(10), &[1; 32], 50).await.expect("e"), EnrollOutcome::Enrolled);
        assert_eq!(s.enroll(&device(10), &[1; 32], 50).await.expect("e"), EnrollOutcome::AlreadyEnrolled);
        assert_eq!(s.enroll(&device(11), &[1; 32], 50).await.expect("e"), EnrollOutcome::TokenUsedUp);
        assert_eq!(s.enroll(&device(11), &[2; 32], 100).await.expect("e"), EnrollOutcome::TokenExpired);
        assert_eq!(s.enroll(&device(11), &[3; 32], 100).await.expect("e"), EnrollOutcome::Enrolled);
        assert_eq!(s.enroll(&device(12), &[3; 32], 100).await.expect("e"), EnrollOutcome::Enrolled);
        let r = s.revoke(&[11; 32]).await.expect("revoke");
        assert!(r.changed && r.token_burned, "{r:?}");
        assert_eq!(s.enroll(&device(13), &[3; 32], 100).await.expect("e"), EnrollOutcome::TokenBurned);
        assert_eq!(s.enroll(&device(11), &[2; 32], 10).await.expect("e"), EnrollOutcome::DeviceRevoked);
        assert!(!s.device(&[12; 32]).await.expect("get").expect("some").revoked, "others stay enrolled");

        assert_eq!(s.current_version().await.expect("current"), 0);
        s.publish(0, &version(1), &[]).await.expect("initial version");
        assert_eq!(s.current_version().await.expect("current"), 1);

        let replay = |r: Result<u64>| matches!(r, Err(CoordinatorError::Rejected(Rejection::Replay)));
        let a = Assignment {
            round_id: 1,
            device_id: [1; 32],
            task_id: [5; 16],
            nonce: [6; 32],
            used: false,
            declined: None,
        };
        let b = Assignment { device_id: [2; 32], nonce: [7; 32], ..a.clone() };
        s.insert_round(&round(1), &[a.clone(), b]).await.expect("round");
        assert_eq!(s.active_round().await.expect("active"), Some(round(1)), "the plan is stored bit for bit");
        assert_eq!(s.assignment(1, &[1; 32]).await.expect("assignment"), Some(a));
        assert!(s.decline(1, &[2; 32], "needs 2 GB, has 1 GB").await.expect("decline"));
        assert!(!s.decline(1, &[2; 32], "again").await.expect("decline"), "declined once");
        assert!(!s.decline(1, &[9; 32], "not sampled").await.expect("decline"));
        assert_eq!(s.declined_count(1).await.expect("count"), 1);
        let declined = s.assignment(1, &[2; 32]).await.expect("assignment").expect("some");
        assert_eq!(declined.declined.as_deref(), Some("needs 2 GB, has 1 GB"));
        assert!(replay(s.insert_update(&update(1, 2), &[7; 32]).await), "no update after a decline");
        assert!(replay(s.insert_update(&update(1, 1), &[0; 32]).await), "wrong nonce");
        assert_eq!(s.update_count(1).await.expect("count"), 0, "a refused update stores nothing");
        let id = s.insert_update(&update(1, 1), &[6; 32]).await.expect("accepted");
        assert!(replay(s.insert_update(&update(1, 1), &[6; 32]).await), "replay");
        assert_eq!(s.update_count(1).await.expect("count"), 1);
        let stored = s.updates(1).await.expect("updates");
        assert_eq!(stored[0], UpdateRecord { id, ..update(1, 1) });
        assert_eq!(s.active_round().await.expect("active").expect("some").state, RoundState::Collecting);
        assert_eq!(s.device_update_count(&[1; 32]).await.expect("count"), 1);
        let p = s.participations().await.expect("participations");
        assert_eq!(p.len(), 1);
        assert_eq!(p[&[1; 32]], Participation { count: 1, last_round: 1 });
        assert_eq!(s.participation(&[1; 32]).await.expect("one"), Some(Participation { count: 1, last_round: 1 }));
        assert_eq!(s.participation(&[2; 32]).await.expect("one"), None);

        assert!(
            matches!(s.publish(1, &version(2), &[]).await, Err(CoordinatorError::Refused(_))),
            "a round must be aggregating to publish"
        );
        assert!(s.set_round_state(1, RoundState::Aggregating, "").await.expect("aggregating"));
        assert!(s.publish(1, &version(2), &[("strategy".into(), vec![1, 2, 3])]).await.expect("publish"));
        assert_eq!(s.active_round().await.expect("active"), None);
        let r = s.rounds(10).await.expect("rounds");
        assert_eq!((r[0].state, r[0].published_version), (RoundState::Published, 2));
        assert_eq!(s.current_version().await.expect("current"), 2);
        assert_eq!(s.get_state("strategy").await.expect("state"), Some(vec![1, 2, 3]));
        assert_eq!(s.versions().await.expect("versions").len(), 2);
        assert_eq!(s.version(2).await.expect("version"), Some(version(2)));
        s.set_current_version(1).await.expect("rollback");
        assert_eq!(s.current_version().await.expect("current"), 1);

        assert!(
            matches!(
                s.insert_update(&update(1, 1), &[6; 32]).await,
                Err(CoordinatorError::Rejected(Rejection::RoundClosed))
            ),
            "a published round takes no update"
        );
        s.insert_round(&round(2), &[]).await.expect("round 2");
        assert!(s.set_round_state(2, RoundState::Failed, "too few").await.expect("fail"));
        assert_eq!(s.rounds(1).await.expect("rounds")[0].failure, "too few");
        assert!(!s.set_round_state(2, RoundState::Aggregating, "").await.expect("final"), "failed is final");
        assert_eq!(s.rounds(1).await.expect("rounds")[0].state, RoundState::Failed);

        // A round published after an operator's rollback does not become current.
        s.insert_round(&round(3), &[]).await.expect("round 3");
        assert!(s.set_round_state(3, RoundState::Aggregating, "").await.expect("aggregating"));
        let v3 = VersionRecord { parent: 2, ..version(3) };
        assert!(!s.publish(3, &v3, &[]).await.expect("publish"), "current is 1, not the parent 2");
        assert_eq!(s.current_version().await.expect("current"), 1);
        assert_eq!(s.rounds(1).await.expect("rounds")[0].state, RoundState::Published);
    }
}
