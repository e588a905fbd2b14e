//! The embedded default store: one SQLite file (sqlx, WAL, `synchronous = FULL`),
//! migrated in place when an older release wrote it.

use std::collections::BTreeMap;
use std::path::Path;

use async_trait::async_trait;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Row, SqlitePool};

use super::{
    Assignment, DeviceRecord, EnrollOutcome, Participation, RevokeOutcome, RoundRecord, RoundState, Store, TokenRecord,
    UpdateRecord, VersionRecord, decode_current, decode_u64,
};
use crate::error::{CoordinatorError, Rejection, Result};

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
const ADDED_COLUMNS: [&str; 5] = [
    "ALTER TABLE rounds ADD COLUMN population INTEGER NOT NULL DEFAULT 0",
    "ALTER TABLE rounds ADD COLUMN expected_cohort INTEGER NOT NULL DEFAULT 0",
    "ALTER TABLE devices ADD COLUMN token_hash BLOB",
    "ALTER TABLE rounds ADD COLUMN plan TEXT",
    "ALTER TABLE assignments ADD COLUMN declined TEXT",
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
        // The participation limits count a device's updates at every round opening and
        // upload; after the rebuild above, so that it indexes the table in use.
        sqlx::query("CREATE INDEX IF NOT EXISTS updates_by_device ON updates (device_id, round_id)")
            .execute(&pool)
            .await?;
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
            plan: match row.try_get::<Option<String>, _>("plan")? {
                Some(json) => Some(
                    serde_json::from_str(&json).map_err(|e| CoordinatorError::Corrupt(format!("round plan: {e}")))?,
                ),
                None => None,
            },
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
        let plan = match &r.plan {
            Some(p) => Some(
                serde_json::to_string(p)
                    .map_err(|source| CoordinatorError::Serialize { what: "round plan", source })?,
            ),
            None => None,
        };
        let mut tx = self.pool.begin_with(BEGIN_WRITE).await?;
        sqlx::query(
            "INSERT INTO rounds (id, state, base_version, published_version, cohort_size, population, \
             expected_cohort, target_updates, min_updates, opened_ms, deadline_ms, failure, plan) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
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
        .bind(plan)
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
                declined: row.try_get("declined")?,
            })
        })
        .transpose()
    }

    async fn insert_update(&self, up: &UpdateRecord, nonce: &[u8; 32]) -> Result<u64> {
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
            return Err(Rejection::RoundClosed.into());
        }
        let consumed = sqlx::query(
            "UPDATE assignments SET used = 1 WHERE round_id = ? AND device_id = ? AND nonce = ? AND used = 0 \
             AND declined IS NULL",
        )
        .bind(i(up.round_id))
        .bind(&up.device_id[..])
        .bind(&nonce[..])
        .execute(&mut *tx)
        .await?;
        if consumed.rows_affected() != 1 {
            tx.rollback().await?;
            return Err(Rejection::Replay.into());
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
        Ok(u(r.last_insert_rowid()))
    }

    async fn updates(&self, round_id: u64) -> Result<Vec<UpdateRecord>> {
        let rows = sqlx::query("SELECT * FROM updates WHERE round_id = ? ORDER BY id")
            .bind(i(round_id))
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(Self::update_row).collect()
    }

    async fn decline(&self, round_id: u64, device_id: &[u8; 32], reason: &str) -> Result<bool> {
        let r = sqlx::query(
            "UPDATE assignments SET declined = ? WHERE round_id = ? AND device_id = ? AND used = 0 AND declined IS NULL",
        )
        .bind(reason)
        .bind(i(round_id))
        .bind(&device_id[..])
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    async fn declined_count(&self, round_id: u64) -> Result<u64> {
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM assignments WHERE round_id = ? AND declined IS NOT NULL")
            .bind(i(round_id))
            .fetch_one(&self.pool)
            .await?;
        Ok(u(n))
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

    async fn participations(&self) -> Result<BTreeMap<[u8; 32], Participation>> {
        let rows: Vec<(Vec<u8>, i64, i64)> =
            sqlx::query_as("SELECT device_id, COUNT(*), MAX(round_id) FROM updates GROUP BY device_id")
                .fetch_all(&self.pool)
                .await?;
        rows.into_iter()
            .map(|(id, n, last)| Ok((id32(id, "device id")?, Participation { count: u(n), last_round: u(last) })))
            .collect()
    }

    async fn participation(&self, device_id: &[u8; 32]) -> Result<Option<Participation>> {
        let (n, last): (i64, Option<i64>) =
            sqlx::query_as("SELECT COUNT(*), MAX(round_id) FROM updates WHERE device_id = ?")
                .bind(&device_id[..])
                .fetch_one(&self.pool)
                .await?;
        Ok(last.map(|last| Participation { count: u(n), last_round: u(last) }))
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::conformance::{round, store_conformance, update};

    /// A database of the first release (no token, population, expected-cohort or plan
    /// columns, `train_loss NOT NULL`) opens: columns are added, the updates table
    /// rebuilt, rows kept.
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
        assert_eq!((r.population, r.expected_cohort, r.cohort_size, r.plan), (0, 0, 4, None));
        let kept = s.updates(1).await.expect("updates");
        assert_eq!(kept.len(), 1);
        assert_eq!(kept[0].train_loss, Some(2.5));
        s.insert_round(
            &round(2),
            &[Assignment {
                round_id: 2,
                device_id: [1; 32],
                task_id: [5; 16],
                nonce: [8; 32],
                used: false,
                declined: None,
            }],
        )
        .await
        .expect("round 2");
        let unreported = UpdateRecord { round_id: 2, train_loss: None, ..update(2, 1) };
        s.insert_update(&unreported, &[8; 32]).await.expect("accepted");
        assert_eq!(s.updates(2).await.expect("updates")[0].train_loss, None, "a loss can go unreported");
        // The rebuilt table is indexed for the participation limits' per-device counts.
        let plan: Vec<(i64, i64, i64, String)> =
            sqlx::query_as("EXPLAIN QUERY PLAN SELECT COUNT(*), MAX(round_id) FROM updates WHERE device_id = ?")
                .bind(&[1u8; 32][..])
                .fetch_all(&s.pool)
                .await
                .expect("plan");
        assert!(plan.iter().any(|(_, _, _, d)| d.contains("updates_by_device")), "{plan:?}");
        assert_eq!(
            s.participation(&[1; 32]).await.expect("participation"),
            Some(crate::store::Participation { count: 2, last_round: 2 })
        );
        drop(s);
        SqliteStore::open(&path).await.expect("a migrated database opens again");
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
