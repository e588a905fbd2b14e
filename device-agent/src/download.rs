//! Downloads that survive interruptions: an artifact is written piece by piece into
//! `artifacts/partial/{sha256}`, each piece checked against the hash the signed manifest
//! lists for it before it is written. A download that stops (a dropped connection, a
//! killed process) resumes after the last verified piece; a piece that does not match is
//! refused and the file keeps only what was verified. The whole file's SHA-256 is checked
//! once more before it joins the artifact cache.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use covey_proto::keys::{self, Sha256};
use covey_proto::manifest::ArtifactRef;

use crate::error::{AgentError, Result};

/// The receiving end of one artifact's download: accepts bytes in order, verifies and
/// persists them piece by piece.
pub struct PieceWriter<'a> {
    artifact: &'a ArtifactRef,
    sha256: [u8; 32],
    path: PathBuf,
    file: File,
    /// Bytes verified and written.
    verified: u64,
    /// Bytes received past `verified`, waiting for their piece to complete.
    pending: Vec<u8>,
    whole: Sha256,
    /// Bytes received from the network by this writer.
    received: u64,
}

impl std::fmt::Debug for PieceWriter<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PieceWriter")
            .field("artifact", &self.artifact.sha256)
            .field("verified", &self.verified)
            .field("pending", &self.pending.len())
            .finish_non_exhaustive()
    }
}

impl<'a> PieceWriter<'a> {
    /// Open (or create) the partial file `path` of `artifact`, keeping the pieces of it
    /// that still verify and cutting the file after them.
    pub fn resume(artifact: &'a ArtifactRef, path: &Path) -> Result<Self> {
        let sha256 = artifact.sha256_bytes().map_err(|e| mismatch(artifact, e.to_string()))?;
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| AgentError::io(path, e))?;
        let on_disk = file.metadata().map_err(|e| AgentError::io(path, e))?.len();
        let mut whole = Sha256::default();
        let mut verified = 0u64;
        let mut piece = Vec::new();
        // Only pieces with their own hash can be trusted from disk.
        if !artifact.chunks.is_empty() {
            for i in 0..artifact.pieces() {
                let (start, end) = artifact.piece_range(i);
                if end > on_disk {
                    break;
                }
                piece.resize((end - start) as usize, 0);
                file.read_exact(&mut piece).map_err(|e| AgentError::io(path, e))?;
                if Some(keys::sha256(&piece)) != artifact.piece_sha256(i) {
                    tracing::warn!(artifact = %artifact.sha256, piece = i, "a stored piece no longer verifies; fetching it again");
                    break;
                }
                whole.update(&piece);
                verified = end;
            }
        }
        file.set_len(verified).map_err(|e| AgentError::io(path, e))?;
        file.seek(SeekFrom::Start(verified)).map_err(|e| AgentError::io(path, e))?;
        if verified > 0 {
            tracing::info!(artifact = %artifact.sha256, verified, size = artifact.size, "resuming a download");
        }
        Ok(Self { artifact, sha256, path: path.to_owned(), file, verified, pending: Vec::new(), whole, received: 0 })
    }

    /// The offset the next byte belongs at.
    pub fn offset(&self) -> u64 {
        self.verified + self.pending.len() as u64
    }

    /// Bytes verified and written so far.
    pub fn verified(&self) -> u64 {
        self.verified
    }

    /// Bytes received from the network by this writer.
    pub fn received(&self) -> u64 {
        self.received
    }

    /// Accept the next bytes; every piece they complete is checked and written. A piece
    /// that does not match its hash is refused ([`AgentError::ArtifactMismatch`]) and
    /// dropped with whatever followed it.
    pub fn accept(&mut self, data: &[u8]) -> Result<()> {
        if self.offset() + data.len() as u64 > self.artifact.size {
            return Err(mismatch(
                self.artifact,
                format!("{} bytes at {} overrun the artifact's {}", data.len(), self.offset(), self.artifact.size),
            ));
        }
        self.received += data.len() as u64;
        self.pending.extend_from_slice(data);
        loop {
            let i = self.verified / covey_proto::manifest::DOWNLOAD_CHUNK_BYTES;
            let (start, end) = self.artifact.piece_range(if self.artifact.chunks.is_empty() { 0 } else { i });
            if self.verified >= self.artifact.size || self.offset() < end {
                return Ok(());
            }
            let len = (end - start) as usize;
            let got = keys::sha256(&self.pending[..len]);
            let want = self.artifact.piece_sha256(i).unwrap_or(self.sha256);
            if got != want {
                self.pending.clear();
                return Err(mismatch(
                    self.artifact,
                    format!(
                        "piece {i} (bytes {start}..{end}) hashes to {}, the manifest says {}",
                        hex::encode(got),
                        hex::encode(want)
                    ),
                ));
            }
            self.file.write_all(&self.pending[..len]).map_err(|e| AgentError::io(&self.path, e))?;
            self.whole.update(&self.pending[..len]);
            self.pending.drain(..len);
            self.verified = end;
        }
    }

    /// Forget bytes received past the last verified piece (before a resumed request).
    pub fn drop_pending(&mut self) {
        self.pending.clear();
    }

    /// Check that every byte arrived and the whole file hashes to the artifact's SHA-256,
    /// make it durable and return its path.
    pub fn finish(mut self) -> Result<PathBuf> {
        if self.verified != self.artifact.size {
            return Err(mismatch(
                self.artifact,
                format!("the stream ended at {} of {} bytes", self.offset(), self.artifact.size),
            ));
        }
        let got = self.whole.finish();
        if got != self.sha256 {
            let _ = std::fs::remove_file(&self.path);
            return Err(mismatch(self.artifact, format!("the downloaded bytes hash to {}", hex::encode(got))));
        }
        self.file.flush().map_err(|e| AgentError::io(&self.path, e))?;
        self.file.sync_all().map_err(|e| AgentError::io(&self.path, e))?;
        Ok(self.path)
    }
}

fn mismatch(a: &ArtifactRef, reason: String) -> AgentError {
    AgentError::ArtifactMismatch { sha256: a.sha256.clone(), reason }
}

#[cfg(test)]
mod tests {
    use super::*;
    use covey_proto::manifest::DOWNLOAD_CHUNK_BYTES;

    fn bytes(n: u64) -> Vec<u8> {
        (0..n).map(|i| (i * 7 % 251) as u8).collect()
    }

    #[test]
    fn an_interrupted_download_resumes_after_the_last_verified_piece() {
        let dir = tempfile::tempdir().expect("tmp");
        let data = bytes(2 * DOWNLOAD_CHUNK_BYTES + 1000);
        let a = ArtifactRef::describe(&data, "safetensors-int8");
        let path = dir.path().join("partial");
        let mut w = PieceWriter::resume(&a, &path).expect("open");
        // 1.5 pieces arrive, then the connection drops (the process dies).
        let cut = (DOWNLOAD_CHUNK_BYTES + DOWNLOAD_CHUNK_BYTES / 2) as usize;
        for part in data[..cut].chunks(100_000) {
            w.accept(part).expect("accept");
        }
        assert_eq!(w.verified(), DOWNLOAD_CHUNK_BYTES);
        drop(w);
        assert_eq!(std::fs::metadata(&path).expect("partial").len(), DOWNLOAD_CHUNK_BYTES);
        // A new process resumes at the verified piece boundary, and only fetches the rest.
        let mut w = PieceWriter::resume(&a, &path).expect("resume");
        assert_eq!(w.offset(), DOWNLOAD_CHUNK_BYTES);
        w.accept(&data[DOWNLOAD_CHUNK_BYTES as usize..]).expect("rest");
        assert_eq!(w.received(), data.len() as u64 - DOWNLOAD_CHUNK_BYTES);
        let done = w.finish().expect("complete");
        assert_eq!(std::fs::read(done).expect("read"), data);
    }

    #[test]
    fn a_bad_truncated_or_reordered_piece_is_refused_and_only_verified_bytes_are_kept() {
        let dir = tempfile::tempdir().expect("tmp");
        let data = bytes(3 * DOWNLOAD_CHUNK_BYTES);
        let a = ArtifactRef::describe(&data, "safetensors-int8");
        let path = dir.path().join("partial");
        let piece = DOWNLOAD_CHUNK_BYTES as usize;

        // Piece 1 with one byte flipped.
        let mut w = PieceWriter::resume(&a, &path).expect("open");
        w.accept(&data[..piece]).expect("piece 0");
        let mut bad = data[piece..2 * piece].to_vec();
        bad[5] ^= 1;
        let err = w.accept(&bad).expect_err("bad piece").to_string();
        assert!(err.contains("piece 1") && err.contains("the manifest says"), "{err}");
        assert_eq!(w.offset(), DOWNLOAD_CHUNK_BYTES, "the bad piece is dropped");
        drop(w);

        // Pieces 2 and 1 swapped: piece 2's bytes where piece 1 belongs.
        let mut w = PieceWriter::resume(&a, &path).expect("resume");
        assert_eq!(w.verified(), DOWNLOAD_CHUNK_BYTES, "piece 0 was kept");
        let err = w.accept(&data[2 * piece..]).expect_err("reordered").to_string();
        assert!(err.contains("piece 1"), "{err}");

        // A stream that ends early is not a complete artifact.
        let mut w = PieceWriter::resume(&a, &path).expect("resume");
        w.accept(&data[piece..2 * piece - 10]).expect("truncated piece");
        let err = w.finish().expect_err("truncated").to_string();
        assert!(err.contains("ended at"), "{err}");

        // A piece altered on disk is fetched again.
        let mut w = PieceWriter::resume(&a, &path).expect("resume");
        w.accept(&data[piece..2 * piece]).expect("piece 1");
        drop(w);
        let mut on_disk = std::fs::read(&path).expect("read");
        on_disk[piece + 3] ^= 1;
        std::fs::write(&path, &on_disk).expect("alter");
        let w = PieceWriter::resume(&a, &path).expect("resume");
        assert_eq!(w.verified(), DOWNLOAD_CHUNK_BYTES);

        // More bytes than the artifact has are refused.
        let small = ArtifactRef::describe(b"config", "llama-config-json");
        let mut w = PieceWriter::resume(&small, &dir.path().join("small")).expect("open");
        assert!(w.accept(b"config!").is_err());
        w.accept(b"config").expect("exact");
        w.finish().expect("whole-file hash");
    }
}
