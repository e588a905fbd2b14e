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
    /// What the bytes are: `safetensors-int8`, `safetensors-int4`, `safetensors-f32`,
    /// `llama-config-json`, `tokenizer-json`.
    pub format: String,
    /// Hex SHA-256 of each [`DOWNLOAD_CHUNK_BYTES`] piece, in order (the last one may be
    /// shorter); empty for an artifact of one piece or less. A device checks each piece as
    /// it arrives and keeps only verified pieces, so an interrupted download resumes after
    /// the last verified byte and never fetches a verified byte twice.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub chunks: Vec<String>,
}

/// Size of the pieces [`ArtifactRef::chunks`] hashes (1 MiB, the transport's chunk size).
pub const DOWNLOAD_CHUNK_BYTES: u64 = crate::CHUNK_BYTES as u64;

/// The privacy report of this version: what was spent up to it, how, and on what
/// assumptions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrivacySpent {
    /// ε at `delta`; 0 when no differential privacy is configured.
    pub epsilon: f64,
    /// δ.
    pub delta: f64,
    /// Accountant and what it composes: `rdp-subsampled-gaussian`,
    /// `pld-subsampled-gaussian`, or `none`.
    pub accountant: String,
    /// Rounds composed.
    pub rounds: u64,
    /// Mechanism: `dp-fedavg`, `dp-ftrl`, `local-gaussian`, or `none` (schema 3).
    #[serde(default = "none")]
    pub mechanism: String,
    /// What the guarantee assumes: `poisson-sampling` (each device joins each round
    /// independently with the recorded rate), `participation-limits` (the coordinator
    /// enforces the bounds below; no sampling assumed), or `none` (schema 3).
    #[serde(default = "none")]
    pub assumption: String,
    /// Contributions per device over the accounting period, at most (0: no limit).
    #[serde(default)]
    pub max_participations: u64,
    /// Rounds between two contributions of a device, at least (0: no limit).
    #[serde(default)]
    pub min_separation: u64,
    /// ε at `delta` once every device has made all the contributions the limits allow:
    /// what the whole period can cost (DP-FTRL); absent when nothing bounds it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epsilon_bound: Option<f64>,
}

fn none() -> String {
    "none".into()
}

impl PrivacySpent {
    /// Nothing spent, no mechanism: a manifest without differential privacy.
    pub fn nothing() -> Self {
        Self {
            epsilon: 0.0,
            delta: 0.0,
            accountant: none(),
            rounds: 0,
            mechanism: none(),
            assumption: none(),
            max_participations: 0,
            min_separation: 0,
            epsilon_bound: None,
        }
    }
}

/// Current format version of [`Manifest`]. 3 added the privacy report's mechanism,
/// assumption and participation bound; schema 2 manifests are still read.
pub const MANIFEST_SCHEMA: u32 = 3;
/// The oldest [`Manifest`] format version this program reads.
pub const MIN_MANIFEST_SCHEMA: u32 = 2;

/// Special token ids of a model's tokenizer.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpecialTokens {
    /// Beginning of sequence.
    pub bos: Option<u32>,
    /// End of sequence (generation stops there).
    pub eos: Option<u32>,
    /// Whether a prompt starts with BOS.
    pub add_bos: bool,
}

/// A base release: the merged weights, quantized, with everything needed to tokenize,
/// prompt and run them. Devices keep a release until a version names another one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Release {
    /// The version that cut this release (its first version).
    pub version: u64,
    /// Model architecture: `llama`.
    pub architecture: String,
    /// Weights: `safetensors-int8`, `safetensors-int4` or `safetensors-f32`.
    pub model: ArtifactRef,
    /// Quantization scheme of `model`: `int8-per-channel-symmetric`,
    /// `int4-group32-asymmetric` (int8 where a row does not split into groups) or `none`.
    pub quantization: String,
    /// `config.json` of the model (Hugging Face Llama names).
    pub config: ArtifactRef,
    /// Hugging Face `tokenizer.json`; absent for the built-in byte-level tokenizer.
    pub tokenizer: Option<ArtifactRef>,
    /// Jinja chat template, for instruct models.
    pub chat_template: Option<String>,
    /// Special tokens.
    pub special_tokens: SpecialTokens,
}

/// The LoRA layout devices train: the frozen `A` factors the coordinator issues, the
/// same for every version of a state directory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraLayout {
    /// Rank r (the largest a device may train).
    pub rank: usize,
    /// Scale numerator: an adapter adds `alpha / rank · B A`.
    pub alpha: f32,
    /// Target projections (`q_proj`, `v_proj`, ...).
    pub targets: Vec<String>,
    /// The `A` factors (PEFT-named safetensors, f32).
    pub a: ArtifactRef,
}

/// The aggregated adapter of a version: its `B` factors, cumulative since the release
/// (the version's weights are the release's plus `alpha / rank · B A`). Cumulative rather
/// than a delta per round: a device that missed rounds needs only the newest adapter,
/// every adapter has the same size, and any version (rollback included) is one release
/// plus one adapter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Adapter {
    /// Rounds aggregated into it since the release.
    pub rounds: u64,
    /// The `B` factors (PEFT-named safetensors, f32).
    pub b: ArtifactRef,
}

/// The manifest of one model version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Format version of this document ([`MANIFEST_SCHEMA`]).
    pub schema: u32,
    /// Version number, from 1.
    pub version: u64,
    /// Parent version, 0 for the first.
    pub parent: u64,
    /// Round that produced it, 0 for the first.
    pub round_id: u64,
    /// The base release this version runs on.
    pub release: Release,
    /// The LoRA layout devices train.
    pub lora: LoraLayout,
    /// The aggregated adapter on top of the release; absent on the version that cut it.
    pub adapter: Option<Adapter>,
    /// Hex SHA-256 of the full-precision master weights of the release, kept by the
    /// coordinator.
    pub master_sha256: String,
    /// Privacy spent so far.
    pub privacy: PrivacySpent,
    /// Creation time, ms since the Unix epoch.
    pub created_unix_ms: u64,
}

impl ArtifactRef {
    /// Describe `bytes`: SHA-256, size, and the hash of every piece when there are several.
    pub fn describe(bytes: &[u8], format: &str) -> Self {
        let chunks = if bytes.len() as u64 > DOWNLOAD_CHUNK_BYTES {
            bytes.chunks(DOWNLOAD_CHUNK_BYTES as usize).map(|c| hex::encode(keys::sha256(c))).collect()
        } else {
            Vec::new()
        };
        Self { sha256: hex::encode(keys::sha256(bytes)), size: bytes.len() as u64, format: format.into(), chunks }
    }

    /// The 32 bytes of [`ArtifactRef::sha256`].
    pub fn sha256_bytes(&self) -> Result<[u8; 32]> {
        parse_sha256(&self.sha256)
    }

    /// Number of pieces a download verifies: `chunks.len()`, or 1.
    pub fn pieces(&self) -> u64 {
        (self.chunks.len() as u64).max(1)
    }

    /// Byte range `[start, end)` of piece `i` (the whole artifact when it has no piece
    /// hashes).
    pub fn piece_range(&self, i: u64) -> (u64, u64) {
        if self.chunks.is_empty() {
            return (0, self.size);
        }
        let start = i * DOWNLOAD_CHUNK_BYTES;
        (start, (start + DOWNLOAD_CHUNK_BYTES).min(self.size))
    }

    /// The 32 bytes of piece `i`'s hash (`None` without piece hashes).
    pub fn piece_sha256(&self, i: u64) -> Option<[u8; 32]> {
        self.chunks.get(i as usize).and_then(|h| parse_sha256(h).ok())
    }

    /// Check the hashes and that the pieces cover the size exactly.
    pub fn check(&self) -> Result<()> {
        self.sha256_bytes()?;
        let wanted = if self.size > DOWNLOAD_CHUNK_BYTES { self.size.div_ceil(DOWNLOAD_CHUNK_BYTES) } else { 0 };
        if self.chunks.len() as u64 != wanted {
            return Err(ProtoError::BadManifest(format!(
                "artifact {}: {} piece hashes for {} bytes (expected {wanted})",
                self.sha256,
                self.chunks.len(),
                self.size
            )));
        }
        for c in &self.chunks {
            parse_sha256(c)?;
        }
        Ok(())
    }
}

/// The 32 bytes of a hex SHA-256.
pub fn parse_sha256(hex_digest: &str) -> Result<[u8; 32]> {
    hex::decode(hex_digest)
        .ok()
        .and_then(|b| <[u8; 32]>::try_from(b).ok())
        .ok_or_else(|| ProtoError::BadManifest(format!("`{hex_digest}` is not a SHA-256 (64 hex digits)")))
}

impl Manifest {
    /// Serialize and sign.
    pub fn sign(&self, key: &KeyPair) -> Result<(Vec<u8>, [u8; 64])> {
        let bytes = serde_json::to_vec_pretty(self).map_err(ProtoError::Manifest)?;
        let signature = key.sign(&signed_bytes(&bytes));
        Ok((bytes, signature))
    }

    /// Verify `signature` over `bytes` with the coordinator's public key, then parse and
    /// check the document ([`Manifest::check`]).
    pub fn verify(bytes: &[u8], signature: &[u8], coordinator_key: &[u8]) -> Result<Self> {
        keys::verify(coordinator_key, &signed_bytes(bytes), signature)?;
        Self::parse(bytes)
    }

    /// Parse and check a document whose signature was verified already ([`Manifest::verify`]
    /// does both; the fuzz target `manifest` drives this half).
    pub fn parse(bytes: &[u8]) -> Result<Self> {
        let m: Self = serde_json::from_slice(bytes).map_err(ProtoError::Manifest)?;
        m.check()?;
        Ok(m)
    }

    /// Check what does not need the artifacts: the schema, every hash, the release
    /// cut no later than the version, an adapter absent exactly on the release's version.
    pub fn check(&self) -> Result<()> {
        let bad = |reason: String| Err(ProtoError::BadManifest(reason));
        if !(MIN_MANIFEST_SCHEMA..=MANIFEST_SCHEMA).contains(&self.schema) {
            return bad(format!(
                "schema {} (this program reads {MIN_MANIFEST_SCHEMA} to {MANIFEST_SCHEMA})",
                self.schema
            ));
        }
        for a in self.artifacts() {
            a.check()?;
        }
        parse_sha256(&self.master_sha256)?;
        if self.release.version == 0 || self.release.version > self.version {
            return bad(format!("release of version {} named by version {}", self.release.version, self.version));
        }
        match &self.adapter {
            None if self.release.version != self.version => {
                bad(format!("version {} has no adapter on release {}", self.version, self.release.version))
            }
            Some(_) if self.release.version == self.version => {
                bad(format!("version {} cuts a release and carries an adapter", self.version))
            }
            Some(a) if a.rounds == 0 => bad("an adapter of 0 rounds".into()),
            _ => Ok(()),
        }
    }

    /// Every artifact the version names: the release's model, config and tokenizer, the
    /// `A` factors and the adapter's `B`.
    pub fn artifacts(&self) -> Vec<&ArtifactRef> {
        let r = &self.release;
        let mut out = vec![&r.model, &r.config];
        out.extend(&r.tokenizer);
        out.push(&self.lora.a);
        out.extend(self.adapter.as_ref().map(|a| &a.b));
        out
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

    pub(crate) fn manifest() -> Manifest {
        let art = |f: &str| ArtifactRef { sha256: "ab".repeat(32), size: 10, format: f.into(), chunks: vec![] };
        Manifest {
            schema: MANIFEST_SCHEMA,
            version: 2,
            parent: 1,
            round_id: 1,
            release: Release {
                version: 1,
                architecture: "llama".into(),
                model: art("safetensors-int8"),
                quantization: "int8-per-channel-symmetric".into(),
                config: art("llama-config-json"),
                tokenizer: Some(art("tokenizer-json")),
                chat_template: Some("{{ messages }}".into()),
                special_tokens: SpecialTokens { bos: Some(1), eos: Some(2), add_bos: false },
            },
            lora: LoraLayout { rank: 4, alpha: 8.0, targets: vec!["q_proj".into()], a: art("safetensors-f32") },
            adapter: Some(Adapter { rounds: 1, b: art("safetensors-f32") }),
            master_sha256: "cd".repeat(32),
            privacy: PrivacySpent {
                epsilon: 0.5,
                delta: 1e-5,
                accountant: "rdp-subsampled-gaussian".into(),
                rounds: 1,
                mechanism: "dp-fedavg".into(),
                assumption: "poisson-sampling".into(),
                ..PrivacySpent::nothing()
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

    #[test]
    fn inconsistent_manifests_are_refused() {
        let k = KeyPair::generate().expect("key");
        let refused = |m: Manifest| {
            let (bytes, sig) = m.sign(&k).expect("sign");
            match Manifest::verify(&bytes, &sig, &k.public_key()) {
                Err(ProtoError::BadManifest(reason)) => reason,
                other => panic!("accepted or other error: {other:?}"),
            }
        };
        let mut m = manifest();
        m.schema = 1;
        assert!(refused(m).contains("schema 1"));
        let mut m = manifest();
        m.schema = MANIFEST_SCHEMA + 1;
        assert!(refused(m).contains("reads 2 to 3"));
        let mut m = manifest();
        m.adapter = None;
        assert!(refused(m).contains("no adapter"));
        let mut m = manifest();
        m.release.version = 2;
        assert!(refused(m).contains("carries an adapter"));
        let mut m = manifest();
        m.release.version = 3;
        assert!(refused(m).contains("release of version 3"));
        let mut m = manifest();
        m.lora.a.sha256 = "xyz".into();
        assert!(refused(m).contains("xyz"));
        assert_eq!(manifest().artifacts().len(), 5);
        let mut m = manifest();
        m.release.model.size = 3 * DOWNLOAD_CHUNK_BYTES;
        assert!(refused(m).contains("0 piece hashes"));
    }

    /// A schema-2 manifest (before the privacy report's mechanism and assumption) still
    /// verifies; its report says `none` for what it did not record.
    #[test]
    fn schema_2_manifests_are_still_read() {
        let k = KeyPair::generate().expect("key");
        let mut v = serde_json::to_value(manifest()).expect("json");
        v["schema"] = 2.into();
        let privacy = v["privacy"].as_object_mut().expect("privacy");
        for field in ["mechanism", "assumption", "max_participations", "min_separation", "epsilon_bound"] {
            privacy.remove(field);
        }
        let bytes = serde_json::to_vec(&v).expect("bytes");
        let sig = k.sign(&signed_bytes(&bytes));
        let m = Manifest::verify(&bytes, &sig, &k.public_key()).expect("schema 2 verifies");
        assert_eq!((m.privacy.mechanism.as_str(), m.privacy.assumption.as_str()), ("none", "none"));
        assert_eq!(m.privacy.epsilon_bound, None);
    }

    #[test]
    fn large_artifacts_are_described_piece_by_piece() {
        let bytes: Vec<u8> = (0..(2 * DOWNLOAD_CHUNK_BYTES + 5)).map(|i| (i % 251) as u8).collect();
        let a = ArtifactRef::describe(&bytes, "safetensors-int8");
        a.check().expect("consistent");
        assert_eq!((a.size, a.pieces()), (bytes.len() as u64, 3));
        assert_eq!(a.piece_range(2), (2 * DOWNLOAD_CHUNK_BYTES, bytes.len() as u64));
        let last = &bytes[2 * DOWNLOAD_CHUNK_BYTES as usize..];
        assert_eq!(a.piece_sha256(2), Some(keys::sha256(last)));
        let small = ArtifactRef::describe(b"config", "llama-config-json");
        assert!(small.chunks.is_empty());
        assert_eq!((small.pieces(), small.piece_range(0), small.piece_sha256(0)), (1, (0, 6), None));
    }
}
