//! Tests of the `covey-coordinator` binary: a coordinator process killed with SIGKILL
//! loses no acknowledged update; mutual TLS, with the operator's admin command.

mod binary;
mod crash;
mod durability;
// The coordinator library's test support (tiny model, configuration, raw device client).
#[path = "../../../../coordinator/tests/fleet/support.rs"]
#[allow(dead_code)]
mod support;
mod tls;
