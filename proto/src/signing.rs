//! Fixed-layout, domain-separated byte strings that are signed.
//!
//! Protobuf encodings are not canonical, so nothing signed is a protobuf: devices sign the
//! byte strings below, send them verbatim in a `bytes` field, and the coordinator checks the
//! signature over exactly the bytes it received, then parses them strictly (exact length,
//! domain tag) and compares every field with what it expects itself.
//!
//! Update header (208 bytes, integers big-endian):
//!
//! | bytes | field |
//! |---|---|
//! | 23 | `"covey/adapter-delta/v1\0"` |
//! | 32 | device id (SHA-256 of its public key) |
//! | 8 | round id |
//! | 16 | task id |
//! | 32 | SHA-256 of the base version's signed manifest |
//! | 32 | nonce issued with the task (single use) |
//! | 8 | payload length |
//! | 32 | SHA-256 of the payload |
//! | 8 | clip norm C (f64 bits) |
//! | 8 | local noise multiplier z (f64 bits) |
//! | 8 | number of training examples |
//! | 1 | 0: pre-clip norm above C, 1: within C, 2: not reported |
//!
//! Device request (73 bytes and the method's subject): `"covey/device-request/v1\0"` (24)
//! ‖ method (1: poll, 2: heartbeat, 3: get-manifest, 4: fetch-artifact) ‖ device id (32) ‖
//! timestamp in ms (8) ‖ 8 zero bytes reserved ‖ subject: nothing for poll and heartbeat,
//! the version (8) for get-manifest, the artifact's SHA-256 (32) for fetch-artifact.
//!
//! Task (signed by the coordinator, [`TaskBinding`]): `"covey/task/v1\0"` (14) ‖ device id
//! (32) ‖ round id (8) ‖ task id (16) ‖ nonce (32) ‖ base version (8) ‖ base manifest
//! SHA-256 (32) ‖ A-factors SHA-256 (32) ‖ rank (u32) ‖ alpha (f32 bits) ‖ number of
//! targets (u8) ‖ each target as its length (u8) and ASCII bytes ‖ steps (u32) ‖ batch
//! size (u32) ‖ sequence length (u32) ‖ learning rate (f32 bits) ‖ proximal μ (f32 bits) ‖
//! seed (u64) ‖ clip norm (f64 bits) ‖ noise multiplier (f64 bits) ‖ deadline in ms (u64)
//! ‖ largest payload (u64).
//!
//! `proto/covey/v1/signing-vectors.json` holds golden vectors of every signed string
//! (key, fields, bytes, signature); `tests/vectors.rs` checks them.

use crate::{ProtoError, Result};

/// Domain tag of an update header.
pub const UPDATE_DOMAIN: &[u8; 23] = b"covey/adapter-delta/v1\0";
/// Domain tag of a device request.
pub const REQUEST_DOMAIN: &[u8; 24] = b"covey/device-request/v1\0";
/// Length of an update header.
pub const UPDATE_HEADER_LEN: usize = 23 + 32 + 8 + 16 + 32 + 32 + 8 + 32 + 8 + 8 + 8 + 1;
/// Length of a device request without its subject.
pub const DEVICE_REQUEST_LEN: usize = 24 + 1 + 32 + 8 + 8;
/// Domain tag of a manifest signature (the manifest's JSON follows it).
pub const MANIFEST_SIGNING_DOMAIN: &[u8; 18] = crate::manifest::MANIFEST_DOMAIN;
/// Domain tag of a task.
pub const TASK_DOMAIN: &[u8; 14] = b"covey/task/v1\0";

/// What a device signs for one update.
#[derive(Debug, Clone, PartialEq)]
pub struct UpdateHeader {
    /// SHA-256 of the device public key.
    pub device_id: [u8; 32],
    /// Round.
    pub round_id: u64,
    /// Task (assignment) id.
    pub task_id: [u8; 16],
    /// SHA-256 of the base version's signed manifest.
    pub base_manifest_hash: [u8; 32],
    /// Single-use nonce from the task.
    pub nonce: [u8; 32],
    /// Payload length in bytes.
    pub payload_len: u64,
    /// SHA-256 of the payload.
    pub payload_sha256: [u8; 32],
    /// Clip norm the device applied.
    pub clip_norm: f64,
    /// Local noise multiplier the device applied.
    pub noise_multiplier: f64,
    /// Training examples behind the update (its aggregation weight).
    pub num_examples: u64,
    /// Whether the pre-clip norm was within the clip norm (adaptive clipping), if reported.
    pub within_clip: Option<bool>,
}

impl UpdateHeader {
    /// The signed byte string.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(UPDATE_HEADER_LEN);
        b.extend_from_slice(UPDATE_DOMAIN);
        b.extend_from_slice(&self.device_id);
        b.extend_from_slice(&self.round_id.to_be_bytes());
        b.extend_from_slice(&self.task_id);
        b.extend_from_slice(&self.base_manifest_hash);
        b.extend_from_slice(&self.nonce);
        b.extend_from_slice(&self.payload_len.to_be_bytes());
        b.extend_from_slice(&self.payload_sha256);
        b.extend_from_slice(&self.clip_norm.to_bits().to_be_bytes());
        b.extend_from_slice(&self.noise_multiplier.to_bits().to_be_bytes());
        b.extend_from_slice(&self.num_examples.to_be_bytes());
        b.push(match self.within_clip {
            Some(false) => 0,
            Some(true) => 1,
            None => 2,
        });
        b
    }

    /// Parse a header strictly: exact length, domain tag, known flag values, finite numbers.
    pub fn parse(bytes: &[u8]) -> Result<Self> {
        if bytes.len() != UPDATE_HEADER_LEN {
            return Err(ProtoError::Length { what: "update header", expected: UPDATE_HEADER_LEN, found: bytes.len() });
        }
        let mut r = Reader { bytes, at: 0 };
        if r.take::<23>() != *UPDATE_DOMAIN {
            return Err(ProtoError::Domain("update header"));
        }
        let header = Self {
            device_id: r.take(),
            round_id: u64::from_be_bytes(r.take()),
            task_id: r.take(),
            base_manifest_hash: r.take(),
            nonce: r.take(),
            payload_len: u64::from_be_bytes(r.take()),
            payload_sha256: r.take(),
            clip_norm: f64::from_bits(u64::from_be_bytes(r.take())),
            noise_multiplier: f64::from_bits(u64::from_be_bytes(r.take())),
            num_examples: u64::from_be_bytes(r.take()),
            within_clip: match r.take::<1>()[0] {
                0 => Some(false),
                1 => Some(true),
                2 => None,
                other => {
                    return Err(ProtoError::Field { field: "within_clip", reason: format!("unknown flag {other}") });
                }
            },
        };
        for (field, v) in [("clip_norm", header.clip_norm), ("noise_multiplier", header.noise_multiplier)] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(ProtoError::Field { field, reason: format!("{v} is not a finite non-negative number") });
            }
        }
        Ok(header)
    }
}

/// Which device RPC a request signature is for (so a poll signature cannot be replayed as a
/// heartbeat).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum DeviceMethod {
    /// `Fleet.PollTask`.
    Poll = 1,
    /// `Fleet.Heartbeat`.
    Heartbeat = 2,
    /// `Fleet.GetManifest` (subject: the version, u64 big-endian).
    GetManifest = 3,
    /// `Fleet.FetchArtifact` (subject: the artifact's SHA-256).
    FetchArtifact = 4,
    /// `Fleet.DeclineTask` (subject: the task id, 16 bytes).
    DeclineTask = 5,
}

/// The byte string a device signs to authenticate a poll or heartbeat (no subject).
pub fn device_request_bytes(method: DeviceMethod, device_id: &[u8; 32], timestamp_ms: u64) -> Vec<u8> {
    device_request_bytes_for(method, device_id, timestamp_ms, &[])
}

/// The byte string a device signs to authenticate a request about `subject`: the
/// version's 8 big-endian bytes for [`DeviceMethod::GetManifest`], the artifact's SHA-256
/// for [`DeviceMethod::FetchArtifact`], nothing for the others.
pub fn device_request_bytes_for(
    method: DeviceMethod,
    device_id: &[u8; 32],
    timestamp_ms: u64,
    subject: &[u8],
) -> Vec<u8> {
    let mut b = Vec::with_capacity(DEVICE_REQUEST_LEN + subject.len());
    b.extend_from_slice(REQUEST_DOMAIN);
    b.push(method as u8);
    b.extend_from_slice(device_id);
    b.extend_from_slice(&timestamp_ms.to_be_bytes());
    b.extend_from_slice(&[0u8; 8]);
    b.extend_from_slice(subject);
    b
}

/// Everything a task prescribes, bound to one device: what the coordinator signs so a
/// device trains only on settings (clip norm, noise, `A` factors, ...) the coordinator
/// vouched for.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskBinding {
    /// The device the task is for.
    pub device_id: [u8; 32],
    /// Round.
    pub round_id: u64,
    /// Task id.
    pub task_id: [u8; 16],
    /// Single-use nonce.
    pub nonce: [u8; 32],
    /// Base version.
    pub base_version: u64,
    /// SHA-256 of the base version's signed manifest.
    pub base_manifest_hash: [u8; 32],
    /// SHA-256 of the `A` factors.
    pub a_factors_sha256: [u8; 32],
    /// LoRA rank.
    pub rank: u32,
    /// LoRA alpha.
    pub alpha: f32,
    /// LoRA targets (ASCII, at most 255 of at most 255 bytes).
    pub targets: Vec<String>,
    /// Optimizer steps.
    pub steps: u32,
    /// Sequences per step.
    pub batch_size: u32,
    /// Tokens per sequence.
    pub seq_len: u32,
    /// Learning rate.
    pub learning_rate: f32,
    /// FedProx μ.
    pub proximal_mu: f32,
    /// Batch-sampling seed.
    pub seed: u64,
    /// Update encoding (wire number; 0 is f32).
    pub update_encoding: u32,
    /// Clip norm C.
    pub clip_norm: f64,
    /// Local noise multiplier z.
    pub noise_multiplier: f64,
    /// Deadline, ms since the Unix epoch.
    pub deadline_ms: u64,
    /// Largest accepted payload.
    pub max_payload_bytes: u64,
}

impl TaskBinding {
    /// The binding of a received protobuf task for `device_id` (to verify its signature).
    pub fn of_task(device_id: [u8; 32], t: &crate::pb::Task) -> Result<Self> {
        let missing = |field| ProtoError::Field { field, reason: "missing".into() };
        let lora = t.lora.as_ref().ok_or_else(|| missing("lora"))?;
        let training = t.training.as_ref().ok_or_else(|| missing("training"))?;
        let privacy = t.privacy.as_ref().ok_or_else(|| missing("privacy"))?;
        Ok(Self {
            device_id,
            round_id: t.round_id,
            task_id: fixed("task_id", &t.task_id)?,
            nonce: fixed("nonce", &t.nonce)?,
            base_version: t.base_version,
            base_manifest_hash: fixed("base_manifest_hash", &t.base_manifest_hash)?,
            a_factors_sha256: fixed("lora.a_factors_sha256", &lora.a_factors_sha256)?,
            rank: lora.rank,
            alpha: lora.alpha,
            targets: lora.targets.clone(),
            steps: training.steps,
            batch_size: training.batch_size,
            seq_len: training.seq_len,
            learning_rate: training.learning_rate,
            proximal_mu: training.proximal_mu,
            seed: training.seed,
            update_encoding: training.update_encoding,
            clip_norm: privacy.clip_norm,
            noise_multiplier: privacy.noise_multiplier,
            deadline_ms: t.deadline_unix_ms,
            max_payload_bytes: t.max_payload_bytes,
        })
    }

    /// The signed byte string; refuses targets that do not fit their length bytes.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        if self.targets.len() > 255 || self.targets.iter().any(|t| t.len() > 255 || !t.is_ascii()) {
            return Err(ProtoError::Field {
                field: "targets",
                reason: "at most 255 ASCII names of at most 255 bytes".into(),
            });
        }
        let mut b = Vec::with_capacity(320);
        b.extend_from_slice(TASK_DOMAIN);
        b.extend_from_slice(&self.device_id);
        b.extend_from_slice(&self.round_id.to_be_bytes());
        b.extend_from_slice(&self.task_id);
        b.extend_from_slice(&self.nonce);
        b.extend_from_slice(&self.base_version.to_be_bytes());
        b.extend_from_slice(&self.base_manifest_hash);
        b.extend_from_slice(&self.a_factors_sha256);
        b.extend_from_slice(&self.rank.to_be_bytes());
        b.extend_from_slice(&self.alpha.to_bits().to_be_bytes());
        b.push(self.targets.len() as u8);
        for t in &self.targets {
            b.push(t.len() as u8);
            b.extend_from_slice(t.as_bytes());
        }
        b.extend_from_slice(&self.steps.to_be_bytes());
        b.extend_from_slice(&self.batch_size.to_be_bytes());
        b.extend_from_slice(&self.seq_len.to_be_bytes());
        b.extend_from_slice(&self.learning_rate.to_bits().to_be_bytes());
        b.extend_from_slice(&self.proximal_mu.to_bits().to_be_bytes());
        b.extend_from_slice(&self.seed.to_be_bytes());
        b.extend_from_slice(&self.clip_norm.to_bits().to_be_bytes());
        b.extend_from_slice(&self.noise_multiplier.to_bits().to_be_bytes());
        b.extend_from_slice(&self.deadline_ms.to_be_bytes());
        b.extend_from_slice(&self.max_payload_bytes.to_be_bytes());
        // Appended only when not f32, so the bytes of f32 tasks are those of earlier
        // versions, and a device that does not know the field fails to verify a compressed
        // task instead of uploading f32. The wire number is at most 255 by construction of
        // the encodings; a larger one is refused.
        if self.update_encoding != 0 {
            let code = u8::try_from(self.update_encoding).map_err(|_| ProtoError::Field {
                field: "training.update_encoding",
                reason: format!("{} is not an encoding", self.update_encoding),
            })?;
            b.push(code);
        }
        Ok(b)
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        out.copy_from_slice(&self.bytes[self.at..self.at + N]);
        self.at += N;
        out
    }
}

/// Longest device label an enrolment may carry, in bytes (control characters refused).
pub const MAX_LABEL_BYTES: usize = 128;

/// Milliseconds since the Unix epoch by the system clock (0 before it): the clock of
/// request timestamps, deadlines and records on both sides of the protocol.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// A fixed-size id from a protobuf `bytes` field, with an error naming the field.
pub fn fixed<const N: usize>(field: &'static str, bytes: &[u8]) -> Result<[u8; N]> {
    bytes.try_into().map_err(|_| ProtoError::Length { what: field, expected: N, found: bytes.len() })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> UpdateHeader {
        UpdateHeader {
            device_id: [9; 32],
            round_id: 3,
            task_id: [1; 16],
            base_manifest_hash: [2; 32],
            nonce: [3; 32],
            payload_len: 1234,
            payload_sha256: [4; 32],
            clip_norm: 0.5,
            noise_multiplier: 1.1,
            num_examples: 77,
            within_clip: None,
        }
    }

    #[test]
    fn header_round_trips_and_has_the_documented_length() {
        let h = header();
        let b = h.to_bytes();
        assert_eq!(b.len(), UPDATE_HEADER_LEN);
        assert_eq!(UPDATE_HEADER_LEN, 208);
        assert_eq!(UpdateHeader::parse(&b).expect("parse"), h);
    }

    #[test]
    fn malformed_headers_are_refused() {
        let b = header().to_bytes();
        assert!(matches!(UpdateHeader::parse(&b[..200]), Err(ProtoError::Length { .. })));
        let mut wrong = b.clone();
        wrong[0] = b'x';
        assert!(matches!(UpdateHeader::parse(&wrong), Err(ProtoError::Domain(_))));
        let mut flag = b.clone();
        flag[UPDATE_HEADER_LEN - 1] = 7;
        assert!(matches!(UpdateHeader::parse(&flag), Err(ProtoError::Field { field: "within_clip", .. })));
        let nan = UpdateHeader { clip_norm: f64::NAN, ..header() }.to_bytes();
        assert!(matches!(UpdateHeader::parse(&nan), Err(ProtoError::Field { field: "clip_norm", .. })));
    }

    #[test]
    fn request_framing_separates_methods() {
        let a = device_request_bytes(DeviceMethod::Poll, &[1; 32], 5);
        let b = device_request_bytes(DeviceMethod::Heartbeat, &[1; 32], 5);
        assert_eq!(a.len(), DEVICE_REQUEST_LEN);
        assert_ne!(a, b);
    }
}
