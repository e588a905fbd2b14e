//! Content-addressed blobs: model weights, `A` factors, update payloads.
//!
//! [`Artifacts::Dir`] writes `<dir>/<hex sha256>` through a temporary file, `fsync`, rename
//! and a directory `fsync`, so a blob that [`Artifacts::put`] returned is on disk.
//! Directories are created owner-only (0700) and blobs written owner-only (0600): raw
//! device updates are personal data.
//!
//! Every read re-hashes the bytes ([`Artifacts::get`]): a blob damaged on disk is refused
//! as [`CoordinatorError::CorruptArtifact`], never decoded, merged and re-signed.
//!
//! Uploads are streamed into a [`PendingBlob`] (a temporary file, or memory for the
//! memory store) and only become a blob when [`PendingBlob::commit`] is called after every
//! check passed; dropping it removes the temporary file.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use covey_proto::keys::Sha256;

use crate::error::{CoordinatorError, Result};

/// Blobs in memory, by namespace ("" for the default one) and SHA-256.
pub type MemoryBlobs = Arc<Mutex<HashMap<(String, [u8; 32]), Arc<Vec<u8>>>>>;

/// Where blobs live.
#[derive(Debug, Clone)]
pub enum Artifacts {
    /// A local directory (the embedded default).
    Dir(PathBuf),
    /// Memory (tests and simulations): the blobs and this store's namespace.
    Memory(MemoryBlobs, String),
}

fn create_private_dir(path: &Path) -> Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(path).map_err(|e| CoordinatorError::io(path, e))
}

fn create_private_file(path: &Path) -> Result<std::fs::File> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options.open(path).map_err(|e| CoordinatorError::io(path, e))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Artifacts {
    /// A directory store, created (owner-only) if needed.
    pub fn dir(path: &Path) -> Result<Self> {
        create_private_dir(path)?;
        Ok(Self::Dir(path.to_owned()))
    }

    /// An empty memory store.
    pub fn memory() -> Self {
        Self::Memory(Arc::default(), String::new())
    }

    /// A separate namespace for blobs that are never served (device updates): the
    /// `name` subdirectory of a directory store, or a namespace of the same memory.
    pub fn namespace(&self, name: &str) -> Result<Self> {
        match self {
            Self::Dir(dir) => Self::dir(&dir.join(name)),
            Self::Memory(m, ns) => Ok(Self::Memory(m.clone(), format!("{ns}/{name}"))),
        }
    }

    fn path(dir: &Path, hash: &[u8; 32]) -> PathBuf {
        dir.join(hex::encode(hash))
    }

    /// Store `bytes` durably; returns their SHA-256.
    pub fn put(&self, bytes: &[u8]) -> Result<[u8; 32]> {
        let mut pending = self.pending()?;
        pending.write(bytes)?;
        pending.commit()
    }

    /// Start a blob whose bytes arrive in pieces.
    pub fn pending(&self) -> Result<PendingBlob> {
        let sink = match self {
            Self::Dir(dir) => {
                let suffix: [u8; 8] = covey_proto::keys::random_bytes()?;
                let tmp = dir.join(format!(".pending-{}.tmp", hex::encode(suffix)));
                let file = create_private_file(&tmp)?;
                Sink::File { dir: dir.clone(), tmp, file: Some(file) }
            }
            Self::Memory(m, ns) => Sink::Memory { blobs: m.clone(), namespace: ns.clone(), bytes: Vec::new() },
        };
        Ok(PendingBlob { sink, hash: Sha256::default(), len: 0 })
    }

    /// The blob with this hash, re-hashed: a blob whose bytes no longer match is
    /// [`CoordinatorError::CorruptArtifact`].
    pub fn get(&self, hash: &[u8; 32]) -> Result<Arc<Vec<u8>>> {
        let bytes = match self {
            Self::Dir(dir) => {
                let path = Self::path(dir, hash);
                match std::fs::read(&path) {
                    Ok(b) => Arc::new(b),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        return Err(CoordinatorError::MissingArtifact(hex::encode(hash)));
                    }
                    Err(e) => return Err(CoordinatorError::io(&path, e)),
                }
            }
            Self::Memory(m, ns) => lock(m)
                .get(&(ns.clone(), *hash))
                .cloned()
                .ok_or_else(|| CoordinatorError::MissingArtifact(hex::encode(hash)))?,
        };
        if covey_proto::keys::sha256(&bytes) != *hash {
            return Err(CoordinatorError::CorruptArtifact(hex::encode(hash)));
        }
        Ok(bytes)
    }

    /// Size of a stored blob.
    pub fn size(&self, hash: &[u8; 32]) -> Result<u64> {
        match self {
            Self::Dir(dir) => {
                let path = Self::path(dir, hash);
                match std::fs::metadata(&path) {
                    Ok(m) => Ok(m.len()),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        Err(CoordinatorError::MissingArtifact(hex::encode(hash)))
                    }
                    Err(e) => Err(CoordinatorError::io(&path, e)),
                }
            }
            Self::Memory(m, ns) => lock(m)
                .get(&(ns.clone(), *hash))
                .map(|b| b.len() as u64)
                .ok_or_else(|| CoordinatorError::MissingArtifact(hex::encode(hash))),
        }
    }

    /// A reader of the blob from `offset` (for streaming downloads without holding the
    /// blob in memory); the caller hashes what it reads when integrity matters.
    pub fn reader(&self, hash: &[u8; 32], offset: u64) -> Result<Box<dyn Read + Send>> {
        match self {
            Self::Dir(dir) => {
                use std::io::Seek;
                let path = Self::path(dir, hash);
                let mut f = match std::fs::File::open(&path) {
                    Ok(f) => f,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        return Err(CoordinatorError::MissingArtifact(hex::encode(hash)));
                    }
                    Err(e) => return Err(CoordinatorError::io(&path, e)),
                };
                f.seek(std::io::SeekFrom::Start(offset)).map_err(|e| CoordinatorError::io(&path, e))?;
                Ok(Box::new(f))
            }
            Self::Memory(..) => {
                let bytes = self.get(hash)?;
                let start = (offset as usize).min(bytes.len());
                Ok(Box::new(std::io::Cursor::new(bytes[start..].to_vec())))
            }
        }
    }

    /// The hashes of every blob stored in this namespace (not in sub-namespaces).
    pub fn list(&self) -> Result<Vec<[u8; 32]>> {
        match self {
            Self::Dir(dir) => {
                let mut out = Vec::new();
                for entry in std::fs::read_dir(dir).map_err(|e| CoordinatorError::io(dir, e))? {
                    let entry = entry.map_err(|e| CoordinatorError::io(dir, e))?;
                    let name = entry.file_name();
                    let hash =
                        name.to_str().and_then(|n| hex::decode(n).ok()).and_then(|b| <[u8; 32]>::try_from(b).ok());
                    if let Some(h) = hash
                        && entry.file_type().is_ok_and(|t| t.is_file())
                    {
                        out.push(h);
                    }
                }
                Ok(out)
            }
            Self::Memory(m, ns) => Ok(lock(m).keys().filter(|(n, _)| n == ns).map(|(_, h)| *h).collect()),
        }
    }

    /// Delete the temporary files of blobs whose writer died before committing them (a
    /// crash mid-upload or mid-publish); returns how many. Only safe while no writer runs:
    /// the coordinator calls it once, at start-up.
    pub fn remove_pending(&self) -> Result<usize> {
        let Self::Dir(dir) = self else { return Ok(0) };
        let mut removed = 0;
        for entry in std::fs::read_dir(dir).map_err(|e| CoordinatorError::io(dir, e))? {
            let entry = entry.map_err(|e| CoordinatorError::io(dir, e))?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.starts_with(".pending-") && name.ends_with(".tmp") {
                std::fs::remove_file(entry.path()).map_err(|e| CoordinatorError::io(&entry.path(), e))?;
                removed += 1;
            }
        }
        if removed > 0 {
            covey_fs::sync_dir(dir).map_err(|e| CoordinatorError::io(dir, e))?;
        }
        Ok(removed)
    }

    /// Remove a blob (absent is fine).
    pub fn remove(&self, hash: &[u8; 32]) -> Result<()> {
        match self {
            Self::Dir(dir) => {
                let path = Self::path(dir, hash);
                match std::fs::remove_file(&path) {
                    Ok(()) => Ok(()),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                    Err(e) => Err(CoordinatorError::io(&path, e)),
                }
            }
            Self::Memory(m, ns) => {
                lock(m).remove(&(ns.clone(), *hash));
                Ok(())
            }
        }
    }
}

enum Sink {
    File { dir: PathBuf, tmp: PathBuf, file: Option<std::fs::File> },
    Memory { blobs: MemoryBlobs, namespace: String, bytes: Vec<u8> },
}

/// A blob being written: hashed as it grows, stored only by [`PendingBlob::commit`],
/// discarded (its temporary file removed) when dropped.
pub struct PendingBlob {
    sink: Sink,
    hash: Sha256,
    len: u64,
}

impl std::fmt::Debug for PendingBlob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingBlob").field("len", &self.len).finish_non_exhaustive()
    }
}

impl PendingBlob {
    /// Append bytes.
    pub fn write(&mut self, bytes: &[u8]) -> Result<()> {
        self.hash.update(bytes);
        self.len += bytes.len() as u64;
        match &mut self.sink {
            Sink::File { tmp, file: Some(f), .. } => f.write_all(bytes).map_err(|e| CoordinatorError::io(tmp, e)),
            Sink::File { tmp, file: None, .. } => {
                Err(CoordinatorError::io(tmp, std::io::Error::other("the pending blob was already read")))
            }
            Sink::Memory { bytes: b, .. } => {
                b.extend_from_slice(bytes);
                Ok(())
            }
        }
    }

    /// Bytes written so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether nothing was written.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// SHA-256 of the bytes written so far.
    pub fn sha256(&self) -> [u8; 32] {
        self.hash.clone().finish()
    }

    /// Read the whole pending content back (for the checks that need it whole).
    pub fn read_all(&mut self) -> Result<Vec<u8>> {
        match &mut self.sink {
            Sink::File { tmp, file, .. } => {
                if let Some(f) = file.take() {
                    f.sync_all().map_err(|e| CoordinatorError::io(tmp, e))?;
                }
                std::fs::read(&*tmp).map_err(|e| CoordinatorError::io(tmp, e))
            }
            Sink::Memory { bytes, .. } => Ok(bytes.clone()),
        }
    }

    /// Store the bytes durably under their SHA-256 and return it.
    pub fn commit(mut self) -> Result<[u8; 32]> {
        let hash = self.sha256();
        match &mut self.sink {
            Sink::File { dir, tmp, file } => {
                if let Some(f) = file.take() {
                    f.sync_all().map_err(|e| CoordinatorError::io(tmp, e))?;
                }
                let path = Artifacts::path(dir, &hash);
                std::fs::rename(&*tmp, &path).map_err(|e| CoordinatorError::io(&path, e))?;
                covey_fs::sync_dir(dir).map_err(|e| CoordinatorError::io(dir, e))?;
            }
            Sink::Memory { blobs, namespace, bytes } => {
                lock(blobs).insert((namespace.clone(), hash), Arc::new(std::mem::take(bytes)));
            }
        }
        Ok(hash)
    }
}

impl Drop for PendingBlob {
    fn drop(&mut self) {
        if let Sink::File { tmp, .. } = &self.sink {
            // Gone already after a commit's rename.
            let _ = std::fs::remove_file(tmp);
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
            assert_eq!(store.size(&h).expect("size"), 7);
            let mut r = store.reader(&h, 3).expect("reader");
            let mut rest = Vec::new();
            r.read_to_end(&mut rest).expect("read");
            assert_eq!(rest, b"load");
            assert!(matches!(store.get(&[0; 32]), Err(CoordinatorError::MissingArtifact(_))));
        }
    }

    #[test]
    fn a_damaged_blob_is_refused_on_read_and_pending_blobs_leave_nothing() {
        let dir = tempfile::tempdir().expect("tmp");
        let store = Artifacts::dir(dir.path()).expect("dir");
        let h = store.put(b"master weights").expect("put");
        std::fs::write(dir.path().join(hex::encode(h)), b"master weighTs").expect("damage");
        assert!(matches!(store.get(&h), Err(CoordinatorError::CorruptArtifact(_))));

        let mut p = store.pending().expect("pending");
        p.write(b"upload").expect("write");
        assert_eq!(p.read_all().expect("read"), b"upload");
        drop(p);
        let names: Vec<_> = std::fs::read_dir(dir.path()).expect("ls").map(|e| e.expect("e").file_name()).collect();
        assert_eq!(names.len(), 1, "a dropped pending blob leaves no file: {names:?}");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join(hex::encode(h))).expect("meta").permissions().mode();
            assert_eq!(mode & 0o077, 0, "blobs are owner-only: {mode:o}");
        }
    }
}
