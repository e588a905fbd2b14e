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
//! Device request (73 bytes): `"covey/device-request/v1\0"` (24) ‖ method (1) ‖ device id
//! (32) ‖ timestamp in ms (8) ‖ 8 zero bytes reserved.

use crate::{ProtoError, Result};

/// Domain tag of an update header.
pub const UPDATE_DOMAIN: &[u8; 23] = b"covey/adapter-delta/v1\0";
/// Domain tag of a device request.
pub const REQUEST_DOMAIN: &[u8; 24] = b"covey/device-request/v1\0";
/// Length of an update header.
pub const UPDATE_HEADER_LEN: usize = 23 + 32 + 8 + 16 + 32 + 32 + 8 + 32 + 8 + 8 + 8 + 1;
/// Length of a device request.
pub const DEVICE_REQUEST_LEN: usize = 24 + 1 + 32 + 8 + 8;

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
}

/// The byte string a device signs to authenticate a poll or heartbeat.
pub fn device_request_bytes(method: DeviceMethod, device_id: &[u8; 32], timestamp_ms: u64) -> Vec<u8> {
    let mut b = Vec::with_capacity(DEVICE_REQUEST_LEN);
    b.extend_from_slice(REQUEST_DOMAIN);
    b.push(method as u8);
    b.extend_from_slice(device_id);
    b.extend_from_slice(&timestamp_ms.to_be_bytes());
    b.extend_from_slice(&[0u8; 8]);
    b
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
