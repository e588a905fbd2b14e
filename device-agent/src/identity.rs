//! The device's identity: an Ed25519 key pair and what enrolment returned.
//!
//! On disk, in the state directory:
//! * `device.key`: the PKCS#8 document of the key, created with mode `0600` on Unix
//!   (owner read/write only) and never rewritten;
//! * `identity.json`: hex device id, hex coordinator public key, coordinator URL, label,
//!   enrolment time;
//! * `ca.pem`: the CA certificate used at enrolment, if any (pinned for later runs).
//!
//! Both files are written to a temporary name and renamed into place, so a crash leaves
//! either the old state or the new one.

use std::path::Path;

use covey_proto::keys::{self, KeyPair};
use serde::{Deserialize, Serialize};

use crate::error::{AgentError, Result};

/// File name of the device key.
pub const KEY_FILE: &str = "device.key";
/// File name of the identity record.
pub const IDENTITY_FILE: &str = "identity.json";
/// File name of the CA certificate pinned at enrolment.
pub const CA_FILE: &str = "ca.pem";

/// What `identity.json` holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityRecord {
    /// Hex SHA-256 of the device public key.
    pub device_id: String,
    /// Hex Ed25519 public key of this device.
    pub public_key: String,
    /// Hex Ed25519 public key that signs the coordinator's manifests.
    pub coordinator_public_key: String,
    /// URL the device enrolled with.
    pub coordinator_url: String,
    /// Label given at enrolment.
    #[serde(default)]
    pub label: String,
    /// Enrolment time, ms since the Unix epoch.
    #[serde(default)]
    pub enrolled_unix_ms: u64,
}

/// A loaded identity: the key pair and the coordinator it belongs to.
#[derive(Debug)]
pub struct Identity {
    key: KeyPair,
    /// SHA-256 of the device public key.
    pub device_id: [u8; 32],
    /// Raw public key of the coordinator (verifies manifests).
    pub coordinator_public_key: [u8; 32],
    /// URL the device enrolled with.
    pub coordinator_url: String,
    /// Label given at enrolment.
    pub label: String,
    /// Enrolment time, ms since the Unix epoch.
    pub enrolled_unix_ms: u64,
}

impl Identity {
    /// A new identity for `key`, as returned by enrolment.
    pub fn new(key: KeyPair, coordinator_public_key: [u8; 32], coordinator_url: String, label: String) -> Self {
        Self {
            device_id: key.device_id(),
            key,
            coordinator_public_key,
            coordinator_url,
            label,
            enrolled_unix_ms: covey_proto::signing::unix_ms(),
        }
    }

    /// The device key.
    pub fn key(&self) -> &KeyPair {
        &self.key
    }

    /// Hex device id.
    pub fn device_id_hex(&self) -> String {
        hex::encode(self.device_id)
    }

    /// The record written to `identity.json`.
    pub fn record(&self) -> IdentityRecord {
        IdentityRecord {
            device_id: hex::encode(self.device_id),
            public_key: hex::encode(self.key.public_key()),
            coordinator_public_key: hex::encode(self.coordinator_public_key),
            coordinator_url: self.coordinator_url.clone(),
            label: self.label.clone(),
            enrolled_unix_ms: self.enrolled_unix_ms,
        }
    }

    /// Whether `state_dir` holds an identity record.
    pub fn exists(state_dir: &Path) -> bool {
        state_dir.join(IDENTITY_FILE).exists()
    }

    /// Write `device.key` (mode 0600) and `identity.json` into `state_dir`, creating it
    /// (mode 0700) if needed. Refuses to replace an existing identity.
    pub fn save(&self, state_dir: &Path) -> Result<()> {
        if let Ok(existing) = read_record(&state_dir.join(IDENTITY_FILE)) {
            return Err(AgentError::AlreadyEnrolled { state_dir: state_dir.to_owned(), device_id: existing.device_id });
        }
        create_private_dir(state_dir)?;
        write_private(&state_dir.join(KEY_FILE), self.key.pkcs8())?;
        let json = serde_json::to_vec_pretty(&self.record()).map_err(|e| AgentError::json(IDENTITY_FILE, e))?;
        write_atomic(&state_dir.join(IDENTITY_FILE), &json)
    }

    /// Load the identity of `state_dir`, checking that the key and the record agree.
    pub fn load(state_dir: &Path) -> Result<Self> {
        let rec_path = state_dir.join(IDENTITY_FILE);
        if !rec_path.exists() {
            return Err(AgentError::NotEnrolled { state_dir: state_dir.to_owned() });
        }
        let rec = read_record(&rec_path)?;
        let key_path = state_dir.join(KEY_FILE);
        warn_if_shared(&key_path);
        let pkcs8 = std::fs::read(&key_path).map_err(|e| AgentError::io(&key_path, e))?;
        let key = KeyPair::from_pkcs8(&pkcs8)
            .map_err(|e| AgentError::CorruptIdentity { path: key_path.clone(), reason: e.to_string() })?;
        let corrupt = |reason: String| AgentError::CorruptIdentity { path: rec_path.clone(), reason };
        let device_id = key.device_id();
        if rec.device_id != hex::encode(device_id) {
            return Err(corrupt(format!(
                "device_id {} is not the SHA-256 of the key in {KEY_FILE} ({})",
                rec.device_id,
                hex::encode(device_id)
            )));
        }
        let coordinator_public_key = hex::decode(&rec.coordinator_public_key)
            .ok()
            .and_then(|b| <[u8; 32]>::try_from(b).ok())
            .ok_or_else(|| corrupt("coordinator_public_key is not 32 bytes of hex".into()))?;
        Ok(Self {
            key,
            device_id,
            coordinator_public_key,
            coordinator_url: rec.coordinator_url,
            label: rec.label,
            enrolled_unix_ms: rec.enrolled_unix_ms,
        })
    }

    /// Sign a device request (poll, heartbeat) at `timestamp_ms`.
    pub fn sign_request(&self, method: covey_proto::signing::DeviceMethod, timestamp_ms: u64) -> [u8; 64] {
        self.sign_request_for(method, timestamp_ms, &[])
    }

    /// Sign a request about `subject` (the version of a manifest, the hash of an artifact).
    pub fn sign_request_for(
        &self,
        method: covey_proto::signing::DeviceMethod,
        timestamp_ms: u64,
        subject: &[u8],
    ) -> [u8; 64] {
        self.key.sign(&covey_proto::signing::device_request_bytes_for(method, &self.device_id, timestamp_ms, subject))
    }

    /// The signed authentication of a request about `subject`, timestamped now.
    pub fn auth(&self, method: covey_proto::signing::DeviceMethod, subject: &[u8]) -> covey_proto::pb::DeviceAuth {
        let timestamp_ms = covey_proto::signing::unix_ms();
        covey_proto::pb::DeviceAuth {
            device_id: self.device_id.to_vec(),
            timestamp_ms,
            signature: self.sign_request_for(method, timestamp_ms, subject).to_vec(),
        }
    }

    /// Verify a signature of the coordinator's key (`keys::verify`).
    pub fn verify_coordinator(&self, message: &[u8], signature: &[u8]) -> bool {
        keys::verify(&self.coordinator_public_key, message, signature).is_ok()
    }
}

fn read_record(path: &Path) -> Result<IdentityRecord> {
    let bytes = std::fs::read(path).map_err(|e| AgentError::io(path, e))?;
    serde_json::from_slice(&bytes).map_err(|e| AgentError::json(path, e))
}

/// Create `dir` and its parents; on Unix a newly created `dir` gets mode 0700.
pub(crate) fn create_private_dir(dir: &Path) -> Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder.create(dir).map_err(|e| AgentError::io(dir, e))
}

/// Write a secret atomically, mode 0600 on Unix ([`covey_fs::write_atomic_private`]).
pub(crate) fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    covey_fs::write_atomic_private(path, bytes).map_err(|e| AgentError::io(path, e))
}

/// Write a file atomically and durably ([`covey_fs::write_atomic`]): readers never see
/// half of it, a crash leaves the old or the new one.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    covey_fs::write_atomic(path, bytes).map_err(|e| AgentError::io(path, e))
}

#[cfg(unix)]
fn warn_if_shared(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(path)
        && meta.permissions().mode() & 0o077 != 0
    {
        tracing::warn!(path = %path.display(), mode = format!("{:o}", meta.permissions().mode() & 0o777),
            "the device key is readable by other users; chmod 600 it");
    }
}

#[cfg(not(unix))]
fn warn_if_shared(_path: &Path) {}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity() -> Identity {
        let coordinator = KeyPair::generate().expect("key");
        Identity::new(
            KeyPair::generate().expect("key"),
            coordinator.public_key(),
            "http://127.0.0.1:1".into(),
            "test".into(),
        )
    }

    #[test]
    fn identity_round_trips_and_cannot_be_overwritten() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = dir.path().join("state");
        assert!(matches!(Identity::load(&state), Err(AgentError::NotEnrolled { .. })));
        let id = identity();
        id.save(&state).expect("save");
        let back = Identity::load(&state).expect("load");
        assert_eq!(back.record(), id.record());
        assert_eq!(back.key().public_key(), id.key().public_key());
        assert_eq!(back.device_id, keys::sha256(&id.key().public_key()));
        let err = identity().save(&state).expect_err("second enrolment");
        assert!(matches!(err, AgentError::AlreadyEnrolled { .. }), "{err}");
        assert_eq!(Identity::load(&state).expect("still the first").record(), id.record());
    }

    #[test]
    fn a_record_that_does_not_match_the_key_is_corrupt() {
        let dir = tempfile::tempdir().expect("tempdir");
        let id = identity();
        id.save(dir.path()).expect("save");
        let mut rec = id.record();
        rec.device_id = hex::encode([7u8; 32]);
        std::fs::write(dir.path().join(IDENTITY_FILE), serde_json::to_vec(&rec).expect("json")).expect("write");
        let err = Identity::load(dir.path()).expect_err("mismatch");
        assert!(matches!(err, AgentError::CorruptIdentity { .. }), "{err}");
    }

    #[cfg(unix)]
    #[test]
    fn the_key_file_is_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let state = dir.path().join("state");
        identity().save(&state).expect("save");
        let mode = std::fs::metadata(state.join(KEY_FILE)).expect("key").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{mode:o}");
        let dir_mode = std::fs::metadata(&state).expect("dir").permissions().mode() & 0o777;
        assert_eq!(dir_mode, 0o700, "{dir_mode:o}");
    }
}
