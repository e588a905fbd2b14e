//! Verified model versions and artifacts, cached in the state directory.
//!
//! Nothing is written before it is verified:
//! * a manifest is trusted only through [`VerifiedManifest::verify`] (the coordinator's
//!   Ed25519 signature over the exact bytes received, the expected version, and the
//!   SHA-256 of the signed bytes that the task names);
//! * a version is cached by [`ModelCache::store`] only once the model and config bytes
//!   match the manifest's sizes and SHA-256 and the config parses and validates. Files are
//!   written into a temporary directory renamed to `models/v{n}/` at the end;
//! * cached versions are verified again when read ([`ModelCache::load`]), so a file
//!   altered on disk is refused too.
//!
//! Layout: `models/v{n}/{manifest.json, manifest.sig, model.safetensors, config.json}`,
//! and `artifacts/{sha256 hex}` for other content-addressed artifacts (the `A` factors).

use std::path::{Path, PathBuf};

use covey_model::{LlamaConfig, NamedTensors};
use covey_proto::keys;
use covey_proto::manifest::{ArtifactRef, Manifest};

use crate::error::{AgentError, Result};
use crate::identity::{create_private_dir, write_atomic};

/// Directory of the verified model versions, under the state directory.
pub const MODELS_DIR: &str = "models";
/// Directory of other verified artifacts, under the state directory.
pub const ARTIFACTS_DIR: &str = "artifacts";
const MANIFEST_FILE: &str = "manifest.json";
const SIGNATURE_FILE: &str = "manifest.sig";
const MODEL_FILE: &str = "model.safetensors";
const CONFIG_FILE: &str = "config.json";

/// Model formats the agent reads (both through `covey_tensors::quant::decode_model`).
pub const MODEL_FORMATS: [&str; 2] = ["safetensors-int8", "safetensors-f32"];
/// Format of the config artifact.
pub const CONFIG_FORMAT: &str = "llama-config-json";

/// A manifest whose signature, version and hash were checked.
#[derive(Debug, Clone, PartialEq)]
pub struct VerifiedManifest {
    manifest: Manifest,
    bytes: Vec<u8>,
    signature: Vec<u8>,
    hash: [u8; 32],
}

impl VerifiedManifest {
    /// Verify `signature` over `bytes` with the coordinator's key, parse, and check that
    /// the manifest is of `version` and, when given, that `sha256(bytes)` is
    /// `expected_hash` (the task's `base_manifest_hash`).
    pub fn verify(
        bytes: &[u8],
        signature: &[u8],
        coordinator_key: &[u8; 32],
        version: u64,
        expected_hash: Option<&[u8; 32]>,
    ) -> Result<Self> {
        let manifest = Manifest::verify(bytes, signature, coordinator_key)
            .map_err(|e| AgentError::untrusted(version, format!("manifest: {e}")))?;
        let hash = keys::sha256(bytes);
        if let Some(expected) = expected_hash
            && &hash != expected
        {
            return Err(AgentError::untrusted(
                version,
                format!("manifest hashes to {}, the task names {}", hex::encode(hash), hex::encode(expected)),
            ));
        }
        if manifest.version != version {
            return Err(AgentError::untrusted(
                version,
                format!("the signed manifest is of version {}", manifest.version),
            ));
        }
        if !MODEL_FORMATS.contains(&manifest.model.format.as_str()) {
            return Err(AgentError::untrusted(
                version,
                format!("model format {} is not supported", manifest.model.format),
            ));
        }
        if manifest.config.format != CONFIG_FORMAT {
            return Err(AgentError::untrusted(
                version,
                format!("config format {} is not {CONFIG_FORMAT}", manifest.config.format),
            ));
        }
        for a in [&manifest.model, &manifest.config] {
            artifact_sha(a).map_err(|reason| AgentError::untrusted(version, reason))?;
        }
        Ok(Self { manifest, bytes: bytes.to_vec(), signature: signature.to_vec(), hash })
    }

    /// The manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// SHA-256 of the signed bytes.
    pub fn hash(&self) -> &[u8; 32] {
        &self.hash
    }

    /// SHA-256 of the model artifact.
    pub fn model_sha256(&self) -> [u8; 32] {
        artifact_sha(&self.manifest.model).unwrap_or_default()
    }

    /// SHA-256 of the config artifact.
    pub fn config_sha256(&self) -> [u8; 32] {
        artifact_sha(&self.manifest.config).unwrap_or_default()
    }
}

/// The 32 bytes of an artifact's hex SHA-256.
fn artifact_sha(a: &ArtifactRef) -> std::result::Result<[u8; 32], String> {
    hex::decode(&a.sha256)
        .ok()
        .and_then(|b| <[u8; 32]>::try_from(b).ok())
        .ok_or_else(|| format!("artifact sha256 {:?} is not 32 bytes of hex", a.sha256))
}

/// Check `bytes` against an artifact reference: size and SHA-256.
fn check_artifact(version: u64, what: &str, a: &ArtifactRef, bytes: &[u8]) -> Result<()> {
    if bytes.len() as u64 != a.size {
        return Err(AgentError::untrusted(
            version,
            format!("{what}: {} bytes, the manifest says {}", bytes.len(), a.size),
        ));
    }
    let got = hex::encode(keys::sha256(bytes));
    if !got.eq_ignore_ascii_case(&a.sha256) {
        return Err(AgentError::untrusted(
            version,
            format!("{what}: bytes hash to {got}, the manifest says {}", a.sha256),
        ));
    }
    Ok(())
}

/// A verified model version, read into memory.
#[derive(Debug, Clone)]
pub struct VerifiedModel {
    /// The version's manifest.
    pub manifest: Manifest,
    /// SHA-256 of its signed manifest bytes.
    pub manifest_hash: [u8; 32],
    /// The model's configuration.
    pub config: LlamaConfig,
    model_bytes: Vec<u8>,
}

impl VerifiedModel {
    /// Version number.
    pub fn version(&self) -> u64 {
        self.manifest.version
    }

    /// The base weights (Hugging Face names), dequantized to f32.
    pub fn base_tensors(&self) -> Result<NamedTensors> {
        covey_tensors::quant::decode_model(&self.model_bytes)
            .map(|(t, _)| t)
            .map_err(|source| AgentError::Tensor { what: "model artifact", source })
    }
}

/// Parse and validate a `config.json`.
fn parse_config(version: u64, bytes: &[u8]) -> Result<LlamaConfig> {
    let config: LlamaConfig = serde_json::from_slice(bytes)
        .map_err(|e| AgentError::untrusted(version, format!("config.json does not parse: {e}")))?;
    config.validate().map_err(|e| AgentError::untrusted(version, format!("config.json: {e}")))?;
    Ok(config)
}

/// The verified versions of one state directory.
#[derive(Debug, Clone)]
pub struct ModelCache {
    root: PathBuf,
}

impl ModelCache {
    /// The cache of `state_dir` (`state_dir/models`).
    pub fn new(state_dir: &Path) -> Self {
        Self { root: state_dir.join(MODELS_DIR) }
    }

    fn dir(&self, version: u64) -> PathBuf {
        self.root.join(format!("v{version}"))
    }

    /// Check `model` and `config` bytes against `manifest`, then write the version into
    /// the cache (atomically: a temporary directory renamed into place). Nothing is
    /// written when a check fails.
    pub fn store(&self, manifest: &VerifiedManifest, model: Vec<u8>, config: Vec<u8>) -> Result<VerifiedModel> {
        let m = &manifest.manifest;
        check_artifact(m.version, "model", &m.model, &model)?;
        check_artifact(m.version, "config", &m.config, &config)?;
        let parsed = parse_config(m.version, &config)?;
        create_private_dir(&self.root)?;
        let dir = self.dir(m.version);
        let tmp = covey_fs::temp_path(&dir);
        let _ = std::fs::remove_dir_all(&tmp);
        create_private_dir(&tmp)?;
        write_atomic(&tmp.join(MANIFEST_FILE), &manifest.bytes)?;
        write_atomic(&tmp.join(SIGNATURE_FILE), &manifest.signature)?;
        write_atomic(&tmp.join(MODEL_FILE), &model)?;
        write_atomic(&tmp.join(CONFIG_FILE), &config)?;
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(|e| AgentError::io(&dir, e))?;
        }
        std::fs::rename(&tmp, &dir).map_err(|e| AgentError::io(&dir, e))?;
        Ok(VerifiedModel { manifest: m.clone(), manifest_hash: manifest.hash, config: parsed, model_bytes: model })
    }

    /// Read `version` from the cache and verify it again (signature, hashes, config).
    pub fn load(&self, version: u64, coordinator_key: &[u8; 32]) -> Result<VerifiedModel> {
        let dir = self.dir(version);
        let read = |name: &str| {
            let p = dir.join(name);
            std::fs::read(&p).map_err(|e| AgentError::io(p, e))
        };
        let manifest =
            VerifiedManifest::verify(&read(MANIFEST_FILE)?, &read(SIGNATURE_FILE)?, coordinator_key, version, None)?;
        let model = read(MODEL_FILE)?;
        let config = read(CONFIG_FILE)?;
        let m = &manifest.manifest;
        check_artifact(version, "model", &m.model, &model)?;
        check_artifact(version, "config", &m.config, &config)?;
        let parsed = parse_config(version, &config)?;
        Ok(VerifiedModel { manifest: m.clone(), manifest_hash: manifest.hash, config: parsed, model_bytes: model })
    }

    /// Cached version numbers, ascending.
    pub fn versions(&self) -> Vec<u64> {
        let mut v: Vec<u64> = std::fs::read_dir(&self.root)
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .filter_map(|e| e.file_name().to_str()?.strip_prefix('v')?.parse::<u64>().ok())
                    .collect()
            })
            .unwrap_or_default();
        v.sort_unstable();
        v
    }

    /// The newest cached version that still verifies; versions that do not are logged and
    /// skipped.
    pub fn latest_verified(&self, coordinator_key: &[u8; 32]) -> Option<VerifiedModel> {
        for v in self.versions().into_iter().rev() {
            match self.load(v, coordinator_key) {
                Ok(m) => return Some(m),
                Err(e) => tracing::warn!(version = v, error = %e, "skipping a cached version that does not verify"),
            }
        }
        None
    }

    /// Delete all but the newest `1 + keep_older` versions.
    pub fn prune(&self, keep_older: usize) {
        let versions = self.versions();
        let drop = versions.len().saturating_sub(1 + keep_older);
        for v in &versions[..drop] {
            let dir = self.dir(*v);
            if let Err(e) = std::fs::remove_dir_all(&dir) {
                tracing::warn!(path = %dir.display(), error = %e, "cannot remove an old version");
            }
        }
    }
}

/// Content-addressed artifacts other than models (the `A` factors), verified both on the
/// way in and on the way out.
#[derive(Debug, Clone)]
pub struct ArtifactCache {
    root: PathBuf,
}

impl ArtifactCache {
    /// The cache of `state_dir` (`state_dir/artifacts`).
    pub fn new(state_dir: &Path) -> Self {
        Self { root: state_dir.join(ARTIFACTS_DIR) }
    }

    /// The bytes of `sha256` if cached and still matching their hash.
    pub fn get(&self, sha256: &[u8; 32]) -> Option<Vec<u8>> {
        let bytes = std::fs::read(self.root.join(hex::encode(sha256))).ok()?;
        (&keys::sha256(&bytes) == sha256).then_some(bytes)
    }

    /// Cache `bytes` under `sha256`, refusing bytes that do not hash to it.
    pub fn put(&self, sha256: &[u8; 32], bytes: &[u8]) -> Result<()> {
        let got = keys::sha256(bytes);
        if &got != sha256 {
            return Err(AgentError::ArtifactMismatch {
                sha256: hex::encode(sha256),
                reason: format!("bytes hash to {}", hex::encode(got)),
            });
        }
        create_private_dir(&self.root)?;
        write_atomic(&self.root.join(hex::encode(sha256)), bytes)
    }

    /// Delete every artifact but `keep`.
    pub fn retain(&self, keep: &[[u8; 32]]) {
        let keep: Vec<String> = keep.iter().map(hex::encode).collect();
        if let Ok(rd) = std::fs::read_dir(&self.root) {
            for e in rd.filter_map(|e| e.ok()) {
                let name = e.file_name().to_string_lossy().into_owned();
                if !keep.contains(&name) {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use covey_proto::keys::KeyPair;
    use covey_proto::manifest::PrivacySpent;

    use super::*;

    /// A tiny model version signed by `key`: (signed manifest bytes, signature, model bytes,
    /// config bytes).
    pub(crate) fn signed_version(key: &KeyPair, version: u64) -> (Vec<u8>, [u8; 64], Vec<u8>, Vec<u8>) {
        let config = LlamaConfig::tiny();
        let config_bytes = serde_json::to_vec(&config).expect("json");
        let base = covey_model::checkpoint::base_tensors(
            &covey_model::Llama::init(&config, 1, &covey_model::cpu_device()).expect("init"),
        );
        let model_bytes = covey_tensors::quant::encode_int8(&base, std::collections::HashMap::new()).expect("quantize");
        let art = |bytes: &[u8], format: &str| ArtifactRef {
            sha256: hex::encode(keys::sha256(bytes)),
            size: bytes.len() as u64,
            format: format.into(),
        };
        let manifest = Manifest {
            schema: 1,
            version,
            parent: version.saturating_sub(1),
            round_id: 0,
            model: art(&model_bytes, "safetensors-int8"),
            master_sha256: "00".repeat(32),
            config: art(&config_bytes, CONFIG_FORMAT),
            quantization: "int8-per-channel-symmetric".into(),
            privacy: PrivacySpent { epsilon: 0.0, delta: 0.0, accountant: "none".into(), rounds: 0 },
            created_unix_ms: 1,
        };
        let (bytes, sig) = manifest.sign(key).expect("sign");
        (bytes, sig, model_bytes, config_bytes)
    }

    #[test]
    fn a_verified_version_is_cached_and_reloaded() {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = KeyPair::generate().expect("key");
        let (bytes, sig, model, config) = signed_version(&key, 2);
        let hash = keys::sha256(&bytes);
        let vm = VerifiedManifest::verify(&bytes, &sig, &key.public_key(), 2, Some(&hash)).expect("verify");
        let cache = ModelCache::new(dir.path());
        let stored = cache.store(&vm, model, config).expect("store");
        assert_eq!(stored.config, LlamaConfig::tiny());
        let latest = cache.latest_verified(&key.public_key()).expect("cached");
        assert_eq!((latest.version(), latest.manifest_hash), (2, hash));
        assert!(latest.base_tensors().expect("decode").contains_key("model.norm.weight"));

        // A file altered on disk is refused when read back.
        let path = dir.path().join(MODELS_DIR).join("v2").join(MODEL_FILE);
        let mut altered = std::fs::read(&path).expect("read");
        let last = altered.len() - 1;
        altered[last] ^= 0x55;
        std::fs::write(&path, altered).expect("write");
        assert!(matches!(cache.load(2, &key.public_key()), Err(AgentError::UntrustedModel { .. })));
        assert!(cache.latest_verified(&key.public_key()).is_none());
    }

    #[test]
    fn a_manifest_with_a_bad_signature_or_hash_is_refused() {
        let key = KeyPair::generate().expect("key");
        let (bytes, sig, _, _) = signed_version(&key, 2);
        let hash = keys::sha256(&bytes);
        let other = KeyPair::generate().expect("key");
        let err = VerifiedManifest::verify(&bytes, &sig, &other.public_key(), 2, Some(&hash)).expect_err("wrong key");
        assert!(err.to_string().contains("signature"), "{err}");
        let mut bad_sig = sig;
        bad_sig[0] ^= 1;
        assert!(VerifiedManifest::verify(&bytes, &bad_sig, &key.public_key(), 2, Some(&hash)).is_err());
        let err = VerifiedManifest::verify(&bytes, &sig, &key.public_key(), 2, Some(&[0; 32])).expect_err("task hash");
        assert!(err.to_string().contains("the task names"), "{err}");
        let err = VerifiedManifest::verify(&bytes, &sig, &key.public_key(), 3, Some(&hash)).expect_err("version");
        assert!(err.to_string().contains("version 2"), "{err}");
    }

    #[test]
    fn a_tampered_artifact_is_refused_and_not_cached() {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = KeyPair::generate().expect("key");
        let (bytes, sig, model, config) = signed_version(&key, 5);
        let vm = VerifiedManifest::verify(&bytes, &sig, &key.public_key(), 5, None).expect("verify");
        let cache = ModelCache::new(dir.path());
        let mut tampered = model.clone();
        tampered[100] ^= 1;
        let err = cache.store(&vm, tampered, config.clone()).expect_err("tampered model");
        assert!(matches!(err, AgentError::UntrustedModel { version: 5, .. }), "{err}");
        assert!(cache.versions().is_empty());
        let err = cache.store(&vm, model.clone(), b"{}".to_vec()).expect_err("other config");
        assert!(err.to_string().contains("config"), "{err}");
        assert!(cache.versions().is_empty());
        assert!(!dir.path().join(MODELS_DIR).join("v5").exists());

        let artifacts = ArtifactCache::new(dir.path());
        let sha = keys::sha256(b"factors");
        assert!(matches!(artifacts.put(&sha, b"factorz"), Err(AgentError::ArtifactMismatch { .. })));
        assert!(artifacts.get(&sha).is_none());
        artifacts.put(&sha, b"factors").expect("put");
        assert_eq!(artifacts.get(&sha).as_deref(), Some(&b"factors"[..]));
    }

    #[test]
    fn pruning_keeps_the_newest_versions() {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = KeyPair::generate().expect("key");
        let cache = ModelCache::new(dir.path());
        for v in 1..=4 {
            let (bytes, sig, model, config) = signed_version(&key, v);
            let vm = VerifiedManifest::verify(&bytes, &sig, &key.public_key(), v, None).expect("verify");
            cache.store(&vm, model, config).expect("store");
        }
        cache.prune(1);
        assert_eq!(cache.versions(), vec![3, 4]);
    }
}
