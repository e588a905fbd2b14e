//! # covey-tests
//!
//! End-to-end and fault tests across Covey's crates (a coordinator and agents over
//! real gRPC on loopback, crashes, dropouts, hostile peers).
//!
//! Not built yet: this crate is a placeholder so the workspace has its final shape.
