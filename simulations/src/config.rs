//! Experiments described in TOML: model, data and partitioner, LoRA, local training,
//! rounds and cohort, strategy, privacy, seed.
//!
//! The types live in `covey-experiment`, which does not link burn (so the file can be
//! parsed, checked and fuzzed without the model), and are re-exported here.
//! `simulations/experiments/` holds examples; every key is optional and defaults are
//! listed in [`Experiment::default`]. Relative paths are resolved against the current
//! directory (run from the repository root).

pub use covey_experiment::schema::{
    CalibrateSection, DataSection, Experiment, Mode, ModelSection, ReportSection, RoundsSection, Source,
};
