//! Content-addressed blobs: model weights, `A` factors, update payloads.
//!
//! [`Artifacts::Dir`] writes `<dir>/<hex sha256>` through a temporary file, `fsync`, rename
//! and a directory `fsync`, so a blob that [`Artifacts::put`] returned is on disk.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::error::{CoordinatorError, Result};

/// Blobs in memory, by SHA-256.
pub type MemoryBlobs = Arc<Mutex<HashMap<[u8; 32], Arc<Vec<u8>>>>>;

/// Where blobs live.
#[derive(Debug, Clone)]
pub enum Artifacts {
    /// A local directory (the embedded default).
    Dir(PathBuf),
    /// Memory (tests and simulations).
    Memory(MemoryBlobs),
}

impl Artifacts {
    /// A directory store, created if needed.
    pub fn dir(path: &Path) -> Result<Self> {
        std::fs::create_dir_all(path).map_err(|e| CoordinatorError::io(path, e))?;
        Ok(Self::Dir(path.to_owned()))
    }

    /// An empty memory store.
    pub fn memory() -> Self {
        Self::Memory(Arc::default())
    }

    /// Store `bytes` durably; returns their SHA-256.
    pub fn put(&self, bytes: &[u8]) -> Result<[u8; 32]> {
        let hash = covey_proto::keys::sha256(bytes);
        match self {
            Self::Dir(dir) => {
                let path = dir.join(hex::encode(hash));
                if path.exists() {
                    return Ok(hash);
                }
                let tmp = dir.join(format!(".{}.tmp", hex::encode(hash)));
                let mut f = std::fs::File::create(&tmp).map_err(|e| CoordinatorError::io(&tmp, e))?;
                f.write_all(bytes).map_err(|e| CoordinatorError::io(&tmp, e))?;
                f.sync_all().map_err(|e| CoordinatorError::io(&tmp, e))?;
                std::fs::rename(&tmp, &path).map_err(|e| CoordinatorError::io(&path, e))?;
                std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(|e| CoordinatorError::io(dir, e))?;
            }
            Self::Memory(m) => {
                m.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(hash, Arc::new(bytes.to_vec()));
            }
        }
        Ok(hash)
    }

    /// The blob with this hash.
    pub fn get(&self, hash: &[u8; 32]) -> Result<Arc<Vec<u8>>> {
        match self {
            Self::Dir(dir) => {
                let path = dir.join(hex::encode(hash));
                match std::fs::read(&path) {
                    Ok(b) => Ok(Arc::new(b)),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        Err(CoordinatorError::MissingArtifact(hex::encode(hash)))
                    }
                    Err(e) => Err(CoordinatorError::io(&path, e)),
                }
            }
            Self::Memory(m) => m
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .get(hash)
                .cloned()
                .ok_or_else(|| CoordinatorError::MissingArtifact(hex::encode(hash))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blobs_round_trip_by_hash_in_both_stores() {
        let dir = tempfile::tempdir().expect("tmp");
        for store in [Artifacts::dir(dir.path()).expect("dir"), Artifacts::memory()] {
            let h = store.put(b"payload").expect("put");
            assert_eq!(store.put(b"payload").expect("idempotent"), h);
            assert_eq!(store.get(&h).expect("get").as_slice(), b"payload");
            assert!(matches!(store.get(&[0; 32]), Err(CoordinatorError::MissingArtifact(_))));
        }
    }
}
