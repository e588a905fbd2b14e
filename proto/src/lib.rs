//! # covey-proto
//!
//! The Covey wire protocol, version 1 (`covey.v1`), and the byte-exact framings that make
//! it trustworthy.
//!
//! * [`pb`]: the generated prost messages and tonic clients/servers of
//!   `proto/covey/v1/covey.proto` (compiled by `protox`, pure Rust, no system `protoc`).
//!   Generated types stay at the edge: strategies, model and privacy code never see them.
//! * [`signing`]: the fixed-layout, domain-separated byte strings that devices and the
//!   coordinator sign — an update header, a device request — parsed back strictly.
//! * [`manifest`]: the JSON manifest of a model version and its signature.
//! * [`keys`]: Ed25519 key pairs (ring), device ids, SHA-256.
//! * [`task`]: the validated task a device receives (one type for the coordinator, the
//!   device and the simulator).
//!
//! ```
//! use covey_proto::keys::{KeyPair, verify};
//! use covey_proto::signing::UpdateHeader;
//!
//! let device = KeyPair::generate().unwrap();
//! let header = UpdateHeader {
//!     device_id: device.device_id(), round_id: 7, task_id: [1; 16], base_manifest_hash: [2; 32],
//!     nonce: [3; 32], payload_len: 5, payload_sha256: covey_proto::keys::sha256(b"hello"),
//!     clip_norm: 1.0, noise_multiplier: 0.0, num_examples: 64, within_clip: Some(true),
//! };
//! let bytes = header.to_bytes();
//! let signature = device.sign(&bytes);
//! assert!(verify(&device.public_key(), &bytes, &signature).is_ok());
//! assert_eq!(UpdateHeader::parse(&bytes).unwrap(), header);
//! ```

pub mod keys;
pub mod manifest;
pub mod signing;
pub mod task;

/// Generated protobuf messages and gRPC stubs of `covey.v1`.
#[allow(missing_docs, clippy::all, clippy::unwrap_used)]
pub mod pb {
    tonic::include_proto!("covey.v1");
}

/// Largest gRPC message either side encodes or decodes (4 MiB).
pub const MAX_MESSAGE_BYTES: usize = 4 << 20;
/// Size of the chunks artifacts and updates are streamed in (1 MiB).
pub const CHUNK_BYTES: usize = 1 << 20;
/// Largest request message the coordinator decodes: one chunk and its framing. Every
/// device request is small except `UpdateChunk.data`, which is at most [`CHUNK_BYTES`].
pub const MAX_REQUEST_BYTES: usize = CHUNK_BYTES + (16 << 10);

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProtoError {
    /// A signed byte string has the wrong length.
    #[error("{what}: expected {expected} bytes, got {found}")]
    Length {
        /// What was parsed.
        what: &'static str,
        /// Expected length.
        expected: usize,
        /// Length found.
        found: usize,
    },
    /// A signed byte string does not start with its domain tag.
    #[error("{0}: wrong domain tag")]
    Domain(&'static str),
    /// A field holds an impossible value.
    #[error("{field}: {reason}")]
    Field {
        /// Field name.
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// A signature does not verify.
    #[error("signature does not verify")]
    BadSignature,
    /// Key generation or parsing failed.
    #[error("key: {0}")]
    Key(String),
    /// A manifest is not valid JSON of the expected shape.
    #[error("manifest: {0}")]
    Manifest(#[source] serde_json::Error),
    /// A manifest parses but contradicts itself (schema, hashes, release and adapter).
    #[error("manifest: {0}")]
    BadManifest(String),
}

/// Result of this crate.
pub type Result<T, E = ProtoError> = std::result::Result<T, E>;
