//! Durable state: the [`Store`] trait, its embedded default [`SqliteStore`] (sqlx, WAL,
//! `synchronous = FULL`), and [`MemoryStore`] for tests and simulations.
//!
//! *Invariant*: an update row is inserted, and its nonce consumed, in one transaction; a
//! publish (new version, round closed, current version, strategy and accountant state) is
//! one transaction. A crash at any point leaves either the old or the new state.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;

use async_trait::async_trait;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Row, SqlitePool};

use crate::error::{CoordinatorError, Rejection, Result};

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
    /// `Err(Ok(Rejection::Replay))`-like: returned as `Ok(Err(rejection))`.
    async fn insert_update(&self, u: &UpdateRecord, nonce: &[u8; 32]) -> Result<std::result::Result<u64, Rejection>>;
    /// Updates of a round, in arrival order.
    async fn updates(&self, round_id: u64) -> Result<Vec<UpdateRecord>>;
    /// Number of updates of a round.
    async fn update_count(&self, round_id: u64) -> Result<u64>;
    /// Updates accepted from a device, over all rounds.
    async fn device_update_count(&self, device_id: &[u8; 32]) -> Result<u64>;
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

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS devices (
  id BLOB PRIMARY KEY, public_key BLOB NOT NULL, label TEXT NOT NULL,
  enrolled_ms INTEGER NOT NULL, last_seen_ms INTEGER NOT NULL DEFAULT 0,
  revoked INTEGER NOT NULL DEFAULT 0, seq INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS rounds (
  id INTEGER PRIMARY KEY, state TEXT NOT NULL, base_version INTEGER NOT NULL,
  published_version INTEGER NOT NULL DEFAULT 0, cohort_size INTEGER NOT NULL,
  target_updates INTEGER NOT NULL, min_updates INTEGER NOT NULL, opened_ms INTEGER NOT NULL,
  deadline_ms INTEGER NOT NULL, failure TEXT NOT NULL DEFAULT '');
CREATE TABLE IF NOT EXISTS assignments (
  round_id INTEGER NOT NULL, device_id BLOB NOT NULL, task_id BLOB NOT NULL,
  nonce BLOB NOT NULL UNIQUE, used INTEGER NOT NULL DEFAULT 0,
  PRIMARY KEY (round_id, device_id));
CREATE TABLE IF NOT EXISTS updates (
  id INTEGER PRIMARY KEY AUTOINCREMENT, round_id INTEGER NOT NULL, device_id BLOB NOT NULL,
  header BLOB NOT NULL, signature BLOB NOT NULL, payload_sha256 BLOB NOT NULL,
  num_examples INTEGER NOT NULL, within_clip INTEGER, train_loss REAL,
  received_ms INTEGER NOT NULL, UNIQUE (round_id, device_id));
CREATE TABLE IF NOT EXISTS versions (
  version INTEGER PRIMARY KEY, parent INTEGER NOT NULL, round_id INTEGER NOT NULL,
  manifest BLOB NOT NULL, signature BLOB NOT NULL, manifest_sha256 BLOB NOT NULL,
  master_sha256 BLOB NOT NULL, epsilon REAL NOT NULL, created_ms INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS tokens (
  hash BLOB PRIMARY KEY, label TEXT NOT NULL, uses_left INTEGER NOT NULL,
  expires_ms INTEGER NOT NULL, burned INTEGER NOT NULL DEFAULT 0, created_ms INTEGER NOT NULL);
"#;

/// Columns added after the first release, added to older databases at open.
const ADDED_COLUMNS: [&str; 3] = [
    "ALTER TABLE rounds ADD COLUMN population INTEGER NOT NULL DEFAULT 0",
    "ALTER TABLE rounds ADD COLUMN expected_cohort INTEGER NOT NULL DEFAULT 0",
    "ALTER TABLE devices ADD COLUMN token_hash BLOB",
];

/// The embedded default: one SQLite file.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
}

fn id32(v: Vec<u8>, what: &str) -> Result<[u8; 32]> {
    v.try_into().map_err(|_| CoordinatorError::Corrupt(format!("{what} is not 32 bytes")))
}

fn u(v: i64) -> u64 {
    v.max(0) as u64
}

fn i(v: u64) -> i64 {
    v.min(i64::MAX as u64) as i64
}

/// Write transactions take SQLite's write lock up front. A deferred `BEGIN` that reads
/// first and then writes fails with `SQLITE_BUSY_SNAPSHOT` when another connection
/// committed in between (WAL mode), which the busy timeout cannot wait out; with
/// `BEGIN IMMEDIATE` concurrent uploads queue on the busy timeout instead.
const BEGIN_WRITE: &str = "BEGIN IMMEDIATE";

impl SqliteStore {
    /// Open (creating it if needed) the database at `path`.
    pub async fn open(path: &Path) -> Result<Self> {
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(std::time::Duration::from_secs(30));
        let pool = SqlitePoolOptions::new().max_connections(4).connect_with(options).await?;
        sqlx::raw_sql(SCHEMA).execute(&pool).await?;
        for statement in ADDED_COLUMNS {
            match sqlx::query(statement).execute(&pool).await {
                Ok(_) => {}
                Err(sqlx::Error::Database(e)) if e.message().contains("duplicate column") => {}
                Err(e) => return Err(e.into()),
            }
        }
        Self::nullable_train_loss(&pool).await?;
        let integrity: String = sqlx::query_scalar("PRAGMA quick_check").fetch_one(&pool).await?;
        if integrity != "ok" {
            return Err(CoordinatorError::Corrupt(format!("{}: quick_check: {integrity}", path.display())));
        }
        Ok(Self { pool })
    }

    /// Databases written before losses could go unreported have `train_loss NOT NULL`:
    /// rebuild the table with a nullable column (SQLite cannot drop a constraint).
    async fn nullable_train_loss(pool: &SqlitePool) -> Result<()> {
        let not_null: Option<i64> =
            sqlx::query_scalar("SELECT \"notnull\" FROM pragma_table_info('updates') WHERE name = 'train_loss'")
                .fetch_optional(pool)
                .await?;
        if not_null != Some(1) {
            return Ok(());
        }
        let mut tx = pool.begin_with(BEGIN_WRITE).await?;
        sqlx::raw_sql(
            "CREATE TABLE updates_nullable_loss (
               id INTEGER PRIMARY KEY AUTOINCREMENT, round_id INTEGER NOT NULL, device_id BLOB NOT NULL,
               header BLOB NOT NULL, signature BLOB NOT NULL, payload_sha256 BLOB NOT NULL,
               num_examples INTEGER NOT NULL, within_clip INTEGER, train_loss REAL,
               received_ms INTEGER NOT NULL, UNIQUE (round_id, device_id));
             INSERT INTO updates_nullable_loss SELECT id, round_id, device_id, header, signature, payload_sha256,
               num_examples, within_clip, train_loss, received_ms FROM updates;
             DROP TABLE updates;
             ALTER TABLE updates_nullable_loss RENAME TO updates;",
        )
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    fn round(row: &sqlx::sqlite::SqliteRow) -> Result<RoundRecord> {
        Ok(RoundRecord {
            id: u(row.try_get("id")?),
            state: RoundState::parse(row.try_get("state")?)?,
            base_version: u(row.try_get("base_version")?),
            published_version: u(row.try_get("published_version")?),
            cohort_size: u(row.try_get("cohort_size")?),
            population: u(row.try_get("population")?),
            expected_cohort: u(row.try_get("expected_cohort")?),
            target_updates: u(row.try_get("target_updates")?),
            min_updates: u(row.try_get("min_updates")?),
            opened_ms: u(row.try_get("opened_ms")?),
            deadline_ms: u(row.try_get("deadline_ms")?),
            failure: row.try_get("failure")?,
        })
    }

    fn device_row(row: &sqlx::sqlite::SqliteRow) -> Result<DeviceRecord> {
        Ok(DeviceRecord {
            id: id32(row.try_get("id")?, "device id")?,
            public_key: id32(row.try_get("public_key")?, "public key")?,
            label: row.try_get("label")?,
            enrolled_ms: u(row.try_get("enrolled_ms")?),
            last_seen_ms: u(row.try_get("last_seen_ms")?),
            revoked: row.try_get::<i64, _>("revoked")? != 0,
        })
    }

    fn update_row(row: &sqlx::sqlite::SqliteRow) -> Result<UpdateRecord> {
        let within: Option<i64> = row.try_get("within_clip")?;
        Ok(UpdateRecord {
            id: u(row.try_get("id")?),
            round_id: u(row.try_get("round_id")?),
            device_id: id32(row.try_get("device_id")?, "device id")?,
            header: row.try_get("header")?,
            signature: row.try_get("signature")?,
            payload_sha256: id32(row.try_get("payload_sha256")?, "payload hash")?,
            num_examples: u(row.try_get("num_examples")?),
            within_clip: within.map(|w| w != 0),
            train_loss: row.try_get::<Option<f64>, _>("train_loss")?.map(|l| l as f32),
            received_ms: u(row.try_get("received_ms")?),
        })
    }

    fn version_row(row: &sqlx::sqlite::SqliteRow) -> Result<VersionRecord> {
        Ok(VersionRecord {
            version: u(row.try_get("version")?),
            parent: u(row.try_get("parent")?),
            round_id: u(row.try_get("round_id")?),
            manifest: row.try_get("manifest")?,
            signature: row.try_get("signature")?,
            manifest_sha256: id32(row.try_get("manifest_sha256")?, "manifest hash")?,
            master_sha256: id32(row.try_get("master_sha256")?, "master hash")?,
            epsilon: row.try_get("epsilon")?,
            created_ms: u(row.try_get("created_ms")?),
        })
    }
}

#[async_trait]
impl Store for SqliteStore {
    async fn insert_device(&self, d: &DeviceRecord) -> Result<bool> {
        let mut conn = self.pool.acquire().await?;
        Ok(insert_device_row(&mut conn, d, None).await? == 1)
    }

    async fn device(&self, id: &[u8; 32]) -> Result<Option<DeviceRecord>> {
        let row = sqlx::query("SELECT * FROM devices WHERE id = ?").bind(&id[..]).fetch_optional(&self.pool).await?;
        row.as_ref().map(Self::device_row).transpose()
    }

    async fn devices(&self) -> Result<Vec<DeviceRecord>> {
        let rows = sqlx::query("SELECT * FROM devices ORDER BY seq").fetch_all(&self.pool).await?;
        rows.iter().map(Self::device_row).collect()
    }

    async fn insert_token(&self, t: &TokenRecord) -> Result<bool> {
        let r = sqlx::query(
            "INSERT OR IGNORE INTO tokens (hash, label, uses_left, expires_ms, burned, created_ms) \
             VALUES (?, ?, ?, ?, ?, ?)",
        )
        .bind(&t.hash[..])
        .bind(&t.label)
        .bind(t.uses_left)
        .bind(i(t.expires_ms))
        .bind(i64::from(t.burned))
        .bind(i(t.created_ms))
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    async fn enroll(&self, d: &DeviceRecord, token_hash: &[u8; 32], now_ms: u64) -> Result<EnrollOutcome> {
        let mut tx = self.pool.begin_with(BEGIN_WRITE).await?;
        let existing: Option<i64> = sqlx::query_scalar("SELECT revoked FROM devices WHERE id = ?")
            .bind(&d.id[..])
            .fetch_optional(&mut *tx)
            .await?;
        if let Some(revoked) = existing {
            tx.rollback().await?;
            return Ok(if revoked != 0 { EnrollOutcome::DeviceRevoked } else { EnrollOutcome::AlreadyEnrolled });
        }
        let row = sqlx::query("SELECT uses_left, expires_ms, burned FROM tokens WHERE hash = ?")
            .bind(&token_hash[..])
            .fetch_optional(&mut *tx)
            .await?;
        let refusal = match &row {
            None => Some(EnrollOutcome::TokenUnknown),
            Some(row) => {
                let (uses, expires, burned): (i64, i64, i64) =
                    (row.try_get("uses_left")?, row.try_get("expires_ms")?, row.try_get("burned")?);
                if burned != 0 {
                    Some(EnrollOutcome::TokenBurned)
                } else if expires > 0 && u(expires) <= now_ms {
                    Some(EnrollOutcome::TokenExpired)
                } else if uses == 0 {
                    Some(EnrollOutcome::TokenUsedUp)
                } else {
                    None
                }
            }
        };
        if let Some(r) = refusal {
            tx.rollback().await?;
            return Ok(r);
        }
        sqlx::query("UPDATE tokens SET uses_left = uses_left - 1 WHERE hash = ? AND uses_left > 0")
            .bind(&token_hash[..])
            .execute(&mut *tx)
            .await?;
        insert_device_row(&mut tx, d, Some(token_hash)).await?;
        tx.commit().await?;
        Ok(EnrollOutcome::Enrolled)
    }

    async fn revoke(&self, id: &[u8; 32]) -> Result<RevokeOutcome> {
        let mut tx = self.pool.begin_with(BEGIN_WRITE).await?;
        let r = sqlx::query("UPDATE devices SET revoked = 1 WHERE id = ? AND revoked = 0")
            .bind(&id[..])
            .execute(&mut *tx)
            .await?;
        let burned = sqlx::query(
            "UPDATE tokens SET burned = 1 WHERE burned = 0 AND hash = (SELECT token_hash FROM devices WHERE id = ?)",
        )
        .bind(&id[..])
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(RevokeOutcome { changed: r.rows_affected() == 1, token_burned: burned.rows_affected() == 1 })
    }

    async fn touch(&self, id: &[u8; 32], now_ms: u64) -> Result<()> {
        sqlx::query("UPDATE devices SET last_seen_ms = ? WHERE id = ?")
            .bind(i(now_ms))
            .bind(&id[..])
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn insert_round(&self, r: &RoundRecord, assignments: &[Assignment]) -> Result<()> {
        let mut tx = self.pool.begin_with(BEGIN_WRITE).await?;
        sqlx::query(
            "INSERT INTO rounds (id, state, base_version, published_version, cohort_size, population, \
             expected_cohort, target_updates, min_updates, opened_ms, deadline_ms, failure) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(i(r.id))
        .bind(r.state.as_str())
        .bind(i(r.base_version))
        .bind(i(r.published_version))
        .bind(i(r.cohort_size))
        .bind(i(r.population))
        .bind(i(r.expected_cohort))
        .bind(i(r.target_updates))
        .bind(i(r.min_updates))
        .bind(i(r.opened_ms))
        .bind(i(r.deadline_ms))
        .bind(&r.failure)
        .execute(&mut *tx)
        .await?;
        for a in assignments {
            sqlx::query("INSERT INTO assignments (round_id, device_id, task_id, nonce, used) VALUES (?, ?, ?, ?, ?)")
                .bind(i(a.round_id))
                .bind(&a.device_id[..])
                .bind(&a.task_id[..])
                .bind(&a.nonce[..])
                .bind(i64::from(a.used))
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn active_round(&self) -> Result<Option<RoundRecord>> {
        let row = sqlx::query(
            "SELECT * FROM rounds WHERE state IN ('open', 'collecting', 'aggregating') ORDER BY id DESC LIMIT 1",
        )
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(Self::round).transpose()
    }

    async fn rounds(&self, limit: usize) -> Result<Vec<RoundRecord>> {
        let rows = sqlx::query("SELECT * FROM rounds ORDER BY id DESC LIMIT ?")
            .bind(i(limit as u64))
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(Self::round).collect()
    }

    async fn set_round_state(&self, id: u64, state: RoundState, failure: &str) -> Result<bool> {
        let r = sqlx::query(
            "UPDATE rounds SET state = ?, failure = ? WHERE id = ? AND state IN ('open', 'collecting', 'aggregating')",
        )
        .bind(state.as_str())
        .bind(failure)
        .bind(i(id))
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    async fn assignment(&self, round_id: u64, device_id: &[u8; 32]) -> Result<Option<Assignment>> {
        let row = sqlx::query("SELECT * FROM assignments WHERE round_id = ? AND device_id = ?")
            .bind(i(round_id))
            .bind(&device_id[..])
            .fetch_optional(&self.pool)
            .await?;
        row.map(|row| {
            Ok(Assignment {
                round_id: u(row.try_get("round_id")?),
                device_id: id32(row.try_get("device_id")?, "device id")?,
                task_id: row
                    .try_get::<Vec<u8>, _>("task_id")?
                    .try_into()
                    .map_err(|_| CoordinatorError::Corrupt("task id is not 16 bytes".into()))?,
                nonce: id32(row.try_get("nonce")?, "nonce")?,
                used: row.try_get::<i64, _>("used")? != 0,
            })
        })
        .transpose()
    }

    async fn insert_update(&self, up: &UpdateRecord, nonce: &[u8; 32]) -> Result<std::result::Result<u64, Rejection>> {
        let mut tx = self.pool.begin_with(BEGIN_WRITE).await?;
        // The round must still accept updates *in this transaction*: the round driver moves
        // it to `aggregating` before reading its updates, so an update either commits
        // before that (and is aggregated) or is refused (and never acknowledged).
        let open: Option<String> = sqlx::query_scalar("SELECT state FROM rounds WHERE id = ?")
            .bind(i(up.round_id))
            .fetch_optional(&mut *tx)
            .await?;
        if !matches!(open.as_deref(), Some("open" | "collecting")) {
            tx.rollback().await?;
            return Ok(Err(Rejection::RoundClosed));
        }
        let consumed = sqlx::query(
            "UPDATE assignments SET used = 1 WHERE round_id = ? AND device_id = ? AND nonce = ? AND used = 0",
        )
        .bind(i(up.round_id))
        .bind(&up.device_id[..])
        .bind(&nonce[..])
        .execute(&mut *tx)
        .await?;
        if consumed.rows_affected() != 1 {
            tx.rollback().await?;
            return Ok(Err(Rejection::Replay));
        }
        let r = sqlx::query(
            "INSERT INTO updates (round_id, device_id, header, signature, payload_sha256, num_examples, within_clip, \
             train_loss, received_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(i(up.round_id))
        .bind(&up.device_id[..])
        .bind(&up.header)
        .bind(&up.signature)
        .bind(&up.payload_sha256[..])
        .bind(i(up.num_examples))
        .bind(up.within_clip.map(i64::from))
        .bind(up.train_loss.filter(|l| l.is_finite()).map(f64::from))
        .bind(i(up.received_ms))
        .execute(&mut *tx)
        .await?;
        sqlx::query("UPDATE rounds SET state = 'collecting' WHERE id = ? AND state = 'open'")
            .bind(i(up.round_id))
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(Ok(u(r.last_insert_rowid())))
    }

    async fn updates(&self, round_id: u64) -> Result<Vec<UpdateRecord>> {
        let rows = sqlx::query("SELECT * FROM updates WHERE round_id = ? ORDER BY id")
            .bind(i(round_id))
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(Self::update_row).collect()
    }

    async fn update_count(&self, round_id: u64) -> Result<u64> {
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM updates WHERE round_id = ?")
            .bind(i(round_id))
            .fetch_one(&self.pool)
            .await?;
        Ok(u(n))
    }

    async fn device_update_count(&self, device_id: &[u8; 32]) -> Result<u64> {
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM updates WHERE device_id = ?")
            .bind(&device_id[..])
            .fetch_one(&self.pool)
            .await?;
        Ok(u(n))
    }

    async fn publish(&self, round_id: u64, v: &VersionRecord, state: &[(String, Vec<u8>)]) -> Result<bool> {
        let mut tx = self.pool.begin_with(BEGIN_WRITE).await?;
        if round_id != 0 {
            let round_state: Option<String> = sqlx::query_scalar("SELECT state FROM rounds WHERE id = ?")
                .bind(i(round_id))
                .fetch_optional(&mut *tx)
                .await?;
            if round_state.as_deref() != Some("aggregating") {
                tx.rollback().await?;
                return Err(CoordinatorError::Refused(format!(
                    "round {round_id} is {} and not aggregating: its version is not published",
                    round_state.as_deref().unwrap_or("missing")
                )));
            }
        }
        let current: Option<Vec<u8>> =
            sqlx::query_scalar("SELECT value FROM kv WHERE key = 'current_version'").fetch_optional(&mut *tx).await?;
        let becomes_current = current.map_or(0, |b| decode_u64(&b)) == v.parent;
        sqlx::query(
            "INSERT INTO versions (version, parent, round_id, manifest, signature, manifest_sha256, master_sha256, \
             epsilon, created_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(i(v.version))
        .bind(i(v.parent))
        .bind(i(v.round_id))
        .bind(&v.manifest)
        .bind(&v.signature)
        .bind(&v.manifest_sha256[..])
        .bind(&v.master_sha256[..])
        .bind(v.epsilon)
        .bind(i(v.created_ms))
        .execute(&mut *tx)
        .await?;
        if round_id != 0 {
            sqlx::query("UPDATE rounds SET state = 'published', published_version = ? WHERE id = ?")
                .bind(i(v.version))
                .bind(i(round_id))
                .execute(&mut *tx)
                .await?;
        }
        let current = ("current_version".to_string(), i(v.version).to_be_bytes().to_vec());
        for (k, val) in state.iter().chain(becomes_current.then_some(&current)) {
            sqlx::query(
                "INSERT INTO kv (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            )
            .bind(k)
            .bind(val)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(becomes_current)
    }

    async fn version(&self, version: u64) -> Result<Option<VersionRecord>> {
        let row =
            sqlx::query("SELECT * FROM versions WHERE version = ?").bind(i(version)).fetch_optional(&self.pool).await?;
        row.as_ref().map(Self::version_row).transpose()
    }

    async fn versions(&self) -> Result<Vec<VersionRecord>> {
        let rows = sqlx::query("SELECT * FROM versions ORDER BY version DESC").fetch_all(&self.pool).await?;
        rows.iter().map(Self::version_row).collect()
    }

    async fn current_version(&self) -> Result<u64> {
        match self.get_state("current_version").await? {
            None => Ok(0),
            Some(b) => decode_current(&b),
        }
    }

    async fn set_current_version(&self, version: u64) -> Result<()> {
        sqlx::query("INSERT INTO kv (key, value) VALUES ('current_version', ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value")
            .bind(i(version).to_be_bytes().to_vec())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn get_state(&self, key: &str) -> Result<Option<Vec<u8>>> {
        Ok(sqlx::query_scalar("SELECT value FROM kv WHERE key = ?").bind(key).fetch_optional(&self.pool).await?)
    }
}

/// Insert a device (ignored when its id exists); returns the rows inserted.
async fn insert_device_row(
    conn: &mut sqlx::SqliteConnection,
    d: &DeviceRecord,
    token_hash: Option<&[u8; 32]>,
) -> Result<u64> {
    let r = sqlx::query(
        "INSERT OR IGNORE INTO devices (id, public_key, label, enrolled_ms, last_seen_ms, revoked, seq, token_hash) \
         VALUES (?, ?, ?, ?, ?, ?, (SELECT COUNT(*) FROM devices), ?)",
    )
    .bind(&d.id[..])
    .bind(&d.public_key[..])
    .bind(&d.label)
    .bind(i(d.enrolled_ms))
    .bind(i(d.last_seen_ms))
    .bind(i64::from(d.revoked))
    .bind(token_hash.map(|h| h.to_vec()))
    .execute(conn)
    .await?;
    Ok(r.rows_affected())
}

fn decode_u64(b: &[u8]) -> u64 {
    b.try_into().map(u64::from_be_bytes).unwrap_or(0)
}

fn decode_current(b: &[u8]) -> Result<u64> {
    match <[u8; 8]>::try_from(b).map(u64::from_be_bytes) {
        Ok(v) if v > 0 && v <= i64::MAX as u64 => Ok(v),
        _ => Err(CoordinatorError::Corrupt(format!("current_version is {} bytes {}", b.len(), hex::encode(b)))),
    }
}

/// State in memory (lost on exit): tests, simulations, and paused-clock tests (it never
/// leaves the async runtime for another thread).
#[derive(Debug, Default)]
pub struct MemoryStore {
    inner: Mutex<Memory>,
}

#[derive(Debug, Default)]
struct Memory {
    devices: Vec<DeviceRecord>,
    device_tokens: BTreeMap<[u8; 32], [u8; 32]>,
    tokens: BTreeMap<[u8; 32], TokenRecord>,
    rounds: BTreeMap<u64, RoundRecord>,
    assignments: BTreeMap<(u64, [u8; 32]), Assignment>,
    updates: Vec<UpdateRecord>,
    versions: BTreeMap<u64, VersionRecord>,
    kv: BTreeMap<String, Vec<u8>>,
}

impl MemoryStore {
    fn lock(&self) -> std::sync::MutexGuard<'_, Memory> {
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[async_trait]
impl Store for MemoryStore {
    async fn insert_device(&self, d: &DeviceRecord) -> Result<bool> {
        let mut m = self.lock();
        if m.devices.iter().any(|x| x.id == d.id) {
            return Ok(false);
        }
        m.devices.push(d.clone());
        Ok(true)
    }

    async fn device(&self, id: &[u8; 32]) -> Result<Option<DeviceRecord>> {
        Ok(self.lock().devices.iter().find(|d| &d.id == id).cloned())
    }

    async fn devices(&self) -> Result<Vec<DeviceRecord>> {
        Ok(self.lock().devices.clone())
    }

    async fn insert_token(&self, t: &TokenRecord) -> Result<bool> {
        let mut m = self.lock();
        if m.tokens.contains_key(&t.hash) {
            return Ok(false);
        }
        m.tokens.insert(t.hash, t.clone());
        Ok(true)
    }

    async fn enroll(&self, d: &DeviceRecord, token_hash: &[u8; 32], now_ms: u64) -> Result<EnrollOutcome> {
        let mut m = self.lock();
        if let Some(existing) = m.devices.iter().find(|x| x.id == d.id) {
            return Ok(if existing.revoked { EnrollOutcome::DeviceRevoked } else { EnrollOutcome::AlreadyEnrolled });
        }
        let Some(t) = m.tokens.get_mut(token_hash) else { return Ok(EnrollOutcome::TokenUnknown) };
        if t.burned {
            return Ok(EnrollOutcome::TokenBurned);
        }
        if t.expires_ms > 0 && t.expires_ms <= now_ms {
            return Ok(EnrollOutcome::TokenExpired);
        }
        if t.uses_left == 0 {
            return Ok(EnrollOutcome::TokenUsedUp);
        }
        if t.uses_left > 0 {
            t.uses_left -= 1;
        }
        m.devices.push(d.clone());
        m.device_tokens.insert(d.id, *token_hash);
        Ok(EnrollOutcome::Enrolled)
    }

    async fn revoke(&self, id: &[u8; 32]) -> Result<RevokeOutcome> {
        let mut m = self.lock();
        let changed = match m.devices.iter_mut().find(|d| &d.id == id) {
            Some(d) if !d.revoked => {
                d.revoked = true;
                true
            }
            _ => false,
        };
        let token = m.device_tokens.get(id).copied();
        let token_burned = match token.and_then(|h| m.tokens.get_mut(&h)) {
            Some(t) if !t.burned => {
                t.burned = true;
                true
            }
            _ => false,
        };
        Ok(RevokeOutcome { changed, token_burned })
    }

    async fn touch(&self, id: &[u8; 32], now_ms: u64) -> Result<()> {
        if let Some(d) = self.lock().devices.iter_mut().find(|d| &d.id == id) {
            d.last_seen_ms = now_ms;
        }
        Ok(())
    }

    async fn insert_round(&self, r: &RoundRecord, assignments: &[Assignment]) -> Result<()> {
        let mut m = self.lock();
        if m.rounds.contains_key(&r.id) {
            return Err(CoordinatorError::Corrupt(format!("round {} exists", r.id)));
        }
        m.rounds.insert(r.id, r.clone());
        for a in assignments {
            m.assignments.insert((a.round_id, a.device_id), a.clone());
        }
        Ok(())
    }

    async fn active_round(&self) -> Result<Option<RoundRecord>> {
        Ok(self
            .lock()
            .rounds
            .values()
            .rev()
            .find(|r| matches!(r.state, RoundState::Open | RoundState::Collecting | RoundState::Aggregating))
            .cloned())
    }

    async fn rounds(&self, limit: usize) -> Result<Vec<RoundRecord>> {
        Ok(self.lock().rounds.values().rev().take(limit).cloned().collect())
    }

    async fn set_round_state(&self, id: u64, state: RoundState, failure: &str) -> Result<bool> {
        Ok(match self.lock().rounds.get_mut(&id) {
            Some(r) if matches!(r.state, RoundState::Open | RoundState::Collecting | RoundState::Aggregating) => {
                r.state = state;
                r.failure = failure.to_owned();
                true
            }
            _ => false,
        })
    }

    async fn assignment(&self, round_id: u64, device_id: &[u8; 32]) -> Result<Option<Assignment>> {
        Ok(self.lock().assignments.get(&(round_id, *device_id)).cloned())
    }

    async fn insert_update(&self, up: &UpdateRecord, nonce: &[u8; 32]) -> Result<std::result::Result<u64, Rejection>> {
        let mut m = self.lock();
        if !m.rounds.get(&up.round_id).is_some_and(|r| r.state.accepts_updates()) {
            return Ok(Err(Rejection::RoundClosed));
        }
        match m.assignments.get_mut(&(up.round_id, up.device_id)) {
            Some(a) if &a.nonce == nonce && !a.used => a.used = true,
            _ => return Ok(Err(Rejection::Replay)),
        }
        let id = m.updates.len() as u64 + 1;
        m.updates.push(UpdateRecord { id, ..up.clone() });
        if let Some(r) = m.rounds.get_mut(&up.round_id)
            && r.state == RoundState::Open
        {
            r.state = RoundState::Collecting;
        }
        Ok(Ok(id))
    }

    async fn updates(&self, round_id: u64) -> Result<Vec<UpdateRecord>> {
        Ok(self.lock().updates.iter().filter(|x| x.round_id == round_id).cloned().collect())
    }

    async fn update_count(&self, round_id: u64) -> Result<u64> {
        Ok(self.lock().updates.iter().filter(|x| x.round_id == round_id).count() as u64)
    }

    async fn device_update_count(&self, device_id: &[u8; 32]) -> Result<u64> {
        Ok(self.lock().updates.iter().filter(|x| &x.device_id == device_id).count() as u64)
    }

    async fn publish(&self, round_id: u64, v: &VersionRecord, state: &[(String, Vec<u8>)]) -> Result<bool> {
        let mut m = self.lock();
        if round_id != 0 {
            let found = m.rounds.get(&round_id).map(|r| r.state);
            if found != Some(RoundState::Aggregating) {
                return Err(CoordinatorError::Refused(format!(
                    "round {round_id} is {} and not aggregating: its version is not published",
                    found.map_or("missing", RoundState::as_str)
                )));
            }
        }
        let becomes_current = m.kv.get("current_version").map_or(0, |b| decode_u64(b)) == v.parent;
        m.versions.insert(v.version, v.clone());
        if let Some(r) = m.rounds.get_mut(&round_id) {
            r.state = RoundState::Published;
            r.published_version = v.version;
        }
        for (k, val) in state {
            m.kv.insert(k.clone(), val.clone());
        }
        if becomes_current {
            m.kv.insert("current_version".into(), v.version.to_be_bytes().to_vec());
        }
        Ok(becomes_current)
    }

    async fn version(&self, version: u64) -> Result<Option<VersionRecord>> {
        Ok(self.lock().versions.get(&version).cloned())
    }

    async fn versions(&self) -> Result<Vec<VersionRecord>> {
        Ok(self.lock().versions.values().rev().cloned().collect())
    }

    async fn current_version(&self) -> Result<u64> {
        match self.lock().kv.get("current_version") {
            None => Ok(0),
            Some(b) => decode_current(b),
        }
    }

    async fn set_current_version(&self, version: u64) -> Result<()> {
        self.lock().kv.insert("current_version".into(), version.to_be_bytes().to_vec());
        Ok(())
    }

    async fn get_state(&self, key: &str) -> Result<Option<Vec<u8>>> {
        Ok(self.lock().kv.get(key).cloned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    fn round(id: u64) -> RoundRecord {
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
        }
    }

    fn update(round_id: u64, dev: u8) -> UpdateRecord {
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
    async fn store_conformance(s: &dyn Store) {
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

        let a = Assignment { round_id: 1, device_id: [1; 32], task_id: [5; 16], nonce: [6; 32], used: false };
        s.insert_round(&round(1), std::slice::from_ref(&a)).await.expect("round");
        assert_eq!(s.active_round().await.expect("active").map(|r| r.id), Some(1));
        assert_eq!(s.assignment(1, &[1; 32]).await.expect("assignment"), Some(a));
        assert_eq!(s.insert_update(&update(1, 1), &[0; 32]).await.expect("wrong nonce"), Err(Rejection::Replay));
        assert_eq!(s.update_count(1).await.expect("count"), 0, "a refused update stores nothing");
        let id = s.insert_update(&update(1, 1), &[6; 32]).await.expect("insert").expect("accepted");
        assert_eq!(s.insert_update(&update(1, 1), &[6; 32]).await.expect("replay"), Err(Rejection::Replay));
        assert_eq!(s.update_count(1).await.expect("count"), 1);
        let stored = s.updates(1).await.expect("updates");
        assert_eq!(stored[0], UpdateRecord { id, ..update(1, 1) });
        assert_eq!(s.active_round().await.expect("active").expect("some").state, RoundState::Collecting);
        assert_eq!(s.device_update_count(&[1; 32]).await.expect("count"), 1);

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

        assert_eq!(
            s.insert_update(&update(1, 1), &[6; 32]).await.expect("closed"),
            Err(Rejection::RoundClosed),
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

    /// A database of the first release (no token, population or expected-cohort columns,
    /// `train_loss NOT NULL`) opens: columns are added, the updates table rebuilt, rows kept.
    #[tokio::test]
    async fn an_older_database_is_migrated_without_loss() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("state.sqlite");
        {
            let pool = SqlitePool::connect_with(SqliteConnectOptions::new().filename(&path).create_if_missing(true))
                .await
                .expect("pool");
            sqlx::raw_sql(
                "CREATE TABLE rounds (id INTEGER PRIMARY KEY, state TEXT NOT NULL, base_version INTEGER NOT NULL,
                   published_version INTEGER NOT NULL DEFAULT 0, cohort_size INTEGER NOT NULL,
                   target_updates INTEGER NOT NULL, min_updates INTEGER NOT NULL, opened_ms INTEGER NOT NULL,
                   deadline_ms INTEGER NOT NULL, failure TEXT NOT NULL DEFAULT '');
                 CREATE TABLE devices (id BLOB PRIMARY KEY, public_key BLOB NOT NULL, label TEXT NOT NULL,
                   enrolled_ms INTEGER NOT NULL, last_seen_ms INTEGER NOT NULL DEFAULT 0,
                   revoked INTEGER NOT NULL DEFAULT 0, seq INTEGER NOT NULL);
                 CREATE TABLE updates (id INTEGER PRIMARY KEY AUTOINCREMENT, round_id INTEGER NOT NULL,
                   device_id BLOB NOT NULL, header BLOB NOT NULL, signature BLOB NOT NULL,
                   payload_sha256 BLOB NOT NULL, num_examples INTEGER NOT NULL, within_clip INTEGER,
                   train_loss REAL NOT NULL, received_ms INTEGER NOT NULL, UNIQUE (round_id, device_id));
                 INSERT INTO rounds VALUES (1, 'published', 1, 2, 4, 4, 3, 5, 10, '');
                 INSERT INTO updates VALUES (1, 1, x'0101010101010101010101010101010101010101010101010101010101010101',
                   x'01', x'02', x'0707070707070707070707070707070707070707070707070707070707070707', 16, 1, 2.5, 6);",
            )
            .execute(&pool)
            .await
            .expect("old schema");
            pool.close().await;
        }
        let s = SqliteStore::open(&path).await.expect("migrated");
        let r = s.rounds(1).await.expect("rounds").remove(0);
        assert_eq!((r.population, r.expected_cohort, r.cohort_size), (0, 0, 4));
        let kept = s.updates(1).await.expect("updates");
        assert_eq!(kept.len(), 1);
        assert_eq!(kept[0].train_loss, Some(2.5));
        s.insert_round(
            &round(2),
            &[Assignment { round_id: 2, device_id: [1; 32], task_id: [5; 16], nonce: [8; 32], used: false }],
        )
        .await
        .expect("round 2");
        let unreported = UpdateRecord { round_id: 2, train_loss: None, ..update(2, 1) };
        s.insert_update(&unreported, &[8; 32]).await.expect("insert").expect("accepted");
        assert_eq!(s.updates(2).await.expect("updates")[0].train_loss, None, "a loss can go unreported");
        drop(s);
        SqliteStore::open(&path).await.expect("a migrated database opens again");
    }

    #[tokio::test]
    async fn memory_store_conforms() {
        store_conformance(&MemoryStore::default()).await;
    }

    #[tokio::test]
    async fn sqlite_store_conforms_and_persists() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("state.sqlite");
        {
            let s = SqliteStore::open(&path).await.expect("open");
            store_conformance(&s).await;
        }
        let s = SqliteStore::open(&path).await.expect("reopen");
        assert_eq!(s.update_count(1).await.expect("count"), 1);
        assert_eq!(s.current_version().await.expect("current"), 1);
    }
}
