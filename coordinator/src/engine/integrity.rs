//! The start-up check against torn writes. Blobs are written through a temporary file,
//! `fsync` and rename before the database names them, and the database commits atomically,
//! so a crash can leave only three kinds of debris, each repaired here:
//!
//! * temporary files of blobs whose writer died (`.pending-*.tmp`): deleted;
//! * blobs no database row names: an upload stored but not yet recorded, the payloads of a
//!   finished round whose deletion was cut short (personal data: deleted unless
//!   `privacy.retain-updates`), or the files of a version whose publish transaction never
//!   committed: deleted;
//! * nothing else. A blob that the database names but the disk lacks cannot come from a
//!   crash: for the current version or an acknowledged update of the round in progress the
//!   coordinator refuses to start, naming the file to restore.

use std::collections::HashSet;

use tracing::{info, warn};

use crate::artifacts::Artifacts;
use crate::config::CoordinatorConfig;
use crate::error::{CoordinatorError, Result};
use crate::store::Store;

/// What the check repaired.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Repairs {
    /// Temporary files of unfinished blobs deleted.
    pub pending_files: usize,
    /// Update payloads no update of the round in progress names, deleted.
    pub orphan_uploads: usize,
    /// Artifacts no version names, deleted.
    pub orphan_artifacts: usize,
}

/// Check `artifacts` and `uploads` against `store`, repair what a crash can leave, and
/// refuse state that lost what it acknowledged.
pub async fn check_and_repair(
    config: &CoordinatorConfig,
    store: &dyn Store,
    artifacts: &Artifacts,
    uploads: &Artifacts,
    a_hash: [u8; 32],
) -> Result<Repairs> {
    let mut repairs =
        Repairs { pending_files: artifacts.remove_pending()? + uploads.remove_pending()?, ..Repairs::default() };

    let current = store.current_version().await?;
    let mut named = HashSet::from([a_hash]);
    for v in store.versions().await? {
        let files: Vec<[u8; 32]> = std::iter::once(v.master_sha256).chain(super::manifest_artifacts(&v)?).collect();
        if v.version == current
            && let Some(h) = files.iter().find(|h| artifacts.size(h).is_err())
        {
            return Err(CoordinatorError::Corrupt(format!(
                "the current version {current} names the file {} that the artifact directory lacks: restore the \
                 directory from a backup",
                hex::encode(h)
            )));
        }
        named.extend(files);
    }
    for h in artifacts.list()? {
        if !named.contains(&h) {
            artifacts.remove(&h)?;
            repairs.orphan_artifacts += 1;
        }
    }

    let mut wanted = HashSet::new();
    if let Some(round) = store.active_round().await? {
        for u in store.updates(round.id).await? {
            if uploads.size(&u.payload_sha256).is_err() {
                return Err(CoordinatorError::Corrupt(format!(
                    "update {} of round {} was acknowledged but its payload {} is missing from the uploads \
                     directory: restore it from a backup",
                    u.id,
                    round.id,
                    hex::encode(u.payload_sha256)
                )));
            }
            wanted.insert(u.payload_sha256);
        }
    }
    if config.privacy.retain_updates {
        for round in store.rounds(usize::MAX >> 1).await? {
            wanted.extend(store.updates(round.id).await?.into_iter().map(|u| u.payload_sha256));
        }
    }
    for h in uploads.list()? {
        if !wanted.contains(&h) {
            uploads.remove(&h)?;
            repairs.orphan_uploads += 1;
        }
    }
    if repairs == Repairs::default() {
        info!("state checked: no debris");
    } else {
        warn!(
            pending = repairs.pending_files,
            orphan_uploads = repairs.orphan_uploads,
            orphan_artifacts = repairs.orphan_artifacts,
            "state checked: deleted what an interrupted write left"
        );
    }
    Ok(repairs)
}
