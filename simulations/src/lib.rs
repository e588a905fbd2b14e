//! # covey-sim
//!
//! Federated simulations with Covey: datasets (LEAF Shakespeare by speaking role, client
//! text directories, JSONL) and partitioners (IID, Dirichlet, shards, natural), many
//! virtual clients in one process or real agents over loopback gRPC, experiment configs
//! in TOML, per-round metrics as CSV and JSON, and SVG plots.
//!
//! Architecture invariant: nothing depends on this crate. Virtual clients run the device
//! agent's training code (`covey_model::train_local_adapter` with the agent's local
//! spec and privacy step) and the coordinator's strategies aggregate them.

pub mod attack;
pub mod audit;
pub mod config;
pub mod dataset;
pub mod error;
pub mod fleet;
pub mod loopback;
pub mod output;
pub mod pace;
pub mod parallel;
pub mod partition;
pub mod personal;
pub mod plot;
pub mod prepare;
pub mod progress;
pub mod quickstart;
pub mod report;
pub mod runner;
pub mod sweep;

pub use error::{Result, SimError};
