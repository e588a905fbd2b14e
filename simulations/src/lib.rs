//! # covey-sim
//!
//! Federated simulations with Covey: datasets (LEAF Shakespeare by speaking role)
//! and partitioners, many virtual clients in one process or real agents over
//! loopback gRPC, experiment configs, reports and plots.
//!
//! Not built yet: this crate is a placeholder so the workspace has its final shape.
//! Architecture invariant: nothing depends on this crate.
