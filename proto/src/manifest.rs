//! The manifest of a model version: what a device needs to trust and use it.
//!
//! A manifest is JSON; the coordinator signs `"covey/manifest/v1\0" ‖ manifest bytes` and
//! devices verify that signature over the bytes they received, then check every artifact
//! they download against the SHA-256 the manifest lists.

use serde::{Deserialize, Serialize};

use crate::keys::{self, KeyPair};
use crate::{ProtoError, Result};

/// Domain tag of manifest signatures.
pub const MANIFEST_DOMAIN: &[u8; 18] = b"covey/manifest/v1\0";

/// One stored blob named by content.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArtifactRef {
    /// Hex SHA-256 of the bytes.
    pub sha256: String,
    /// Size in bytes.
    pub size: u64,
    /// What the bytes are: `safetensors-int8`, `safetensors-f32`, `llama-config-json`,
    /// `tokenizer-json`.
    pub format: String,
}

/// Privacy spent up to this version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrivacySpent {
    /// ε at `delta`; 0 when no differential privacy is configured.
    pub epsilon: f64,
    /// δ.
    pub delta: f64,
    /// Accountant: `rdp-subsampled-gaussian` or `none`.
    pub accountant: String,
    /// Rounds composed.
    pub rounds: u64,
}

/// The manifest of one model version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Format version of this document (1).
    pub schema: u32,
    /// Version number, from 1.
    pub version: u64,
    /// Parent version, 0 for the first.
    pub parent: u64,
    /// Round that produced it, 0 for the first.
    pub round_id: u64,
    /// The quantized weights devices run and train on.
    pub model: ArtifactRef,
    /// Hex SHA-256 of the full-precision master weights kept by the coordinator.
    pub master_sha256: String,
    /// `config.json` of the model (Hugging Face Llama names).
    pub config: ArtifactRef,
    /// Quantization scheme of `model`: `int8-per-channel-symmetric` or `none`.
    pub quantization: String,
    /// Privacy spent so far.
    pub privacy: PrivacySpent,
    /// Creation time, ms since the Unix epoch.
    pub created_unix_ms: u64,
}

impl Manifest {
    /// Serialize and sign.
    pub fn sign(&self, key: &KeyPair) -> Result<(Vec<u8>, [u8; 64])> {
        let bytes = serde_json::to_vec_pretty(self).map_err(ProtoError::Manifest)?;
        let signature = key.sign(&signed_bytes(&bytes));
        Ok((bytes, signature))
    }

    /// Verify `signature` over `bytes` with the coordinator's public key, then parse.
    pub fn verify(bytes: &[u8], signature: &[u8], coordinator_key: &[u8]) -> Result<Self> {
        keys::verify(coordinator_key, &signed_bytes(bytes), signature)?;
        serde_json::from_slice(bytes).map_err(ProtoError::Manifest)
    }
}

fn signed_bytes(manifest: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(MANIFEST_DOMAIN.len() + manifest.len());
    b.extend_from_slice(MANIFEST_DOMAIN);
    b.extend_from_slice(manifest);
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest() -> Manifest {
        let art = |f: &str| ArtifactRef { sha256: "ab".repeat(32), size: 10, format: f.into() };
        Manifest {
            schema: 1,
            version: 2,
            parent: 1,
            round_id: 1,
            model: art("safetensors-int8"),
            master_sha256: "cd".repeat(32),
            config: art("llama-config-json"),
            quantization: "int8-per-channel-symmetric".into(),
            privacy: PrivacySpent {
                epsilon: 0.5,
                delta: 1e-5,
                accountant: "rdp-subsampled-gaussian".into(),
                rounds: 1,
            },
            created_unix_ms: 1,
        }
    }

    #[test]
    fn signed_manifest_verifies_and_tampering_is_detected() {
        let k = KeyPair::generate().expect("key");
        let (bytes, sig) = manifest().sign(&k).expect("sign");
        assert_eq!(Manifest::verify(&bytes, &sig, &k.public_key()).expect("verify"), manifest());
        let mut tampered = bytes.clone();
        let i = tampered.iter().position(|&c| c == b'2').expect("digit");
        tampered[i] = b'3';
        assert!(matches!(Manifest::verify(&tampered, &sig, &k.public_key()), Err(ProtoError::BadSignature)));
        let other = KeyPair::generate().expect("key");
        assert!(Manifest::verify(&bytes, &sig, &other.public_key()).is_err());
    }
}
