//! # covey-tests
//!
//! End-to-end tests across Covey's crates, in `tests/end_to_end.rs`: a real coordinator
//! and real device agents (training with burn) over gRPC on 127.0.0.1. The coordinator's
//! own fault tests (hostile uploads, SIGKILL, drop-outs, TLS) live in
//! `coordinator/tests/fleet/`, where its binary is at hand.
