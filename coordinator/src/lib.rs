//! # covey-coordinator
//!
//! The coordinator of a Covey fleet: devices enrol with an Ed25519 key, poll for tasks,
//! fetch signed model versions and upload signed LoRA updates over gRPC; the coordinator
//! verifies every upload before it acknowledges it, stores it durably, aggregates each
//! round with a [`covey_strategy::Strategy`], accounts the privacy spent, merges the
//! aggregate into the f32 master weights, quantizes them to int8, signs a manifest and
//! publishes the new version.
//!
//! * [`config`]: TOML configuration with defaults and validation.
//! * [`store`]: durable state ([`store::SqliteStore`] by default, [`store::MemoryStore`]).
//! * [`artifacts`]: content-addressed blobs.
//! * [`round`]: the round policy, pure: cohort sampling, each round's plan and task,
//!   the privacy a round spends (shared with `covey-sim`).
//! * [`engine`]: the behaviour, transport-free ([`engine::Coordinator`]).
//! * [`service`]: the tonic `Fleet` and `Admin` services over the engine.
//! * [`server`]: binding, TLS, the round driver and `/metrics`, for the binary and tests.
//! * [`weights`]: master weights, `A` factors, merging.
//! * [`metrics`]: Prometheus metrics.
//! * [`pace`]: pace steering, when each waiting device should come back.
//! * [`rollout`]: staged rollout's policy (sticky canary and control buckets, the health
//!   test); not yet wired into the engine.

pub mod artifacts;
pub mod config;
pub mod crashpoint;
pub mod engine;
pub mod error;
pub mod metrics;
pub mod pace;
pub mod rollout;
pub mod round;
pub mod server;
pub mod service;
pub mod store;
pub mod weights;

pub use config::CoordinatorConfig;
pub use engine::Coordinator;
pub use error::{CoordinatorError, Rejection, Result};
