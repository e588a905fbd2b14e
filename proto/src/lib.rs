//! # covey-proto
//!
//! The wire protocol of Covey, package `covey.v1`: the `.proto` files of the Fleet
//! service (enrol, poll for tasks, fetch model versions in chunks, submit signed
//! updates in chunks, heartbeat) and the Admin service, and the tonic/prost code
//! generated from them with a pure-Rust protobuf compiler (no system `protoc`).
//!
//! Not built yet: this crate is a placeholder so the workspace has its final shape.
//! Generated structs will never reach strategies, model or privacy code; they are
//! converted at the edge with `TryFrom`.
