//! # covey-experiment
//!
//! The experiment file of `covey-sim`: what a simulation runs, as serde structs with
//! documented defaults (every key is optional) and one validation, free of burn.
//!
//! * [`schema`]: [`Experiment`] and its sections. The `lora`, `training`, `privacy` and
//!   `strategy` sections are the coordinator's own types, so an experiment that works in
//!   simulation is a coordinator configuration away from a real fleet.
//! * [`data`]: the LEAF options and the [`Partitioner`].
//! * [`attack`]: Byzantine clients ([`AttackConfig`]).
//! * [`fleet`]: the file of `covey-sim fleet` ([`FleetExperiment`]), real processes on one
//!   machine.
//!
//! `covey-sim` re-exports these types at their old paths (`covey_sim::config`,
//! `covey_sim::dataset::LeafOptions`, `covey_sim::partition::Partitioner`,
//! `covey_sim::attack`, `covey_sim::fleet`) and does the work they describe. Parsing lives
//! here so that an experiment file can be parsed, checked and fuzzed (`fuzz/`, target
//! `experiment`) without compiling the model.
//!
//! ```
//! use std::path::Path;
//! let exp = covey_experiment::Experiment::from_toml("[rounds]\nrounds = 3\n", Path::new("demo.toml")).unwrap();
//! assert_eq!(exp.rounds.rounds, 3);
//! ```

pub mod attack;
pub mod data;
pub mod error;
pub mod fleet;
pub mod schema;

pub use attack::{AttackConfig, AttackKind};
pub use data::{LeafOptions, Partitioner};
pub use error::{ExperimentError, Result};
pub use fleet::FleetExperiment;
pub use schema::{CalibrateSection, DataSection, Experiment, Mode, ModelSection, ReportSection, RoundsSection, Source};
