//! Integration tests of the coordinator library, in process (memory store, paused clock)
//! and over real gRPC on 127.0.0.1, with a hand-made device client (no ML framework):
//! security, soundness, drop-outs. The tests that run the `covey-coordinator` binary
//! (SIGKILL durability, TLS with the admin command) are in `cli/coordinator/tests`.

mod compressed;
mod dropout;
mod integrity;
mod pace;
mod privacy;
mod releases;
mod security;
mod soundness;
mod support;
