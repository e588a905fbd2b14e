//! # covey-coordinator
//!
//! The coordinator service of Covey: enrolment, the round state machine and cohort
//! selection, verification of signed updates, aggregation strategies (FedAvg and
//! the others, DP wrappers), privacy accounting, merge + quantize + sign + publish,
//! durable state (SQLite by default), admin and metrics.
//!
//! Not built yet: this crate is a placeholder so the workspace has its final shape.
