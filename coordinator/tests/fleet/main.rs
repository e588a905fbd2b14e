//! Integration tests of the coordinator over real gRPC on 127.0.0.1, with a hand-made
//! device client (no ML framework): security, durability across SIGKILL, drop-outs.

mod dropout;
mod durability;
mod security;
mod soundness;
mod support;
mod tls;
