//! # covey-tests
//!
//! End-to-end tests across Covey's crates, in `tests/end_to_end.rs`: a real coordinator
//! and real device agents (training with burn) over gRPC on 127.0.0.1. The coordinator's
//! own fault tests live beside it: hostile uploads, soundness and drop-outs in
//! `coordinator/tests/fleet/`, SIGKILL and TLS with the admin command (which need its
//! binary) in `cli/coordinator/tests/process/`.
