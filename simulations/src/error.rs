//! The one error type of covey-sim.

use std::path::{Path, PathBuf};

/// What can go wrong in a simulation.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SimError {
    /// A file or directory could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The path.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A JSON file or line is malformed.
    #[error("{}: {source}", path.display())]
    Json {
        /// The path (with `:line` for JSONL).
        path: PathBuf,
        /// The cause.
        source: serde_json::Error,
    },
    /// An experiment file is not valid TOML for an experiment.
    #[error("{}: {reason}", path.display())]
    ConfigFile {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A setting is impossible.
    #[error("invalid setting `{field}`: {reason}")]
    Config {
        /// The setting, as written in the experiment file.
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// A dataset cannot be built as asked.
    #[error("dataset: {0}")]
    Data(String),
    /// A plot could not be drawn.
    #[error("plot {}: {reason}", path.display())]
    Plot {
        /// The output file.
        path: PathBuf,
        /// The cause.
        reason: String,
    },
    /// A simulated client failed in a way the run cannot absorb.
    #[error("client {client}: {reason}")]
    Client {
        /// The client's id.
        client: String,
        /// The cause.
        reason: String,
    },
    /// From covey-model.
    #[error(transparent)]
    Model(#[from] covey_model::ModelError),
    /// From covey-strategy.
    #[error(transparent)]
    Strategy(#[from] covey_strategy::StrategyError),
    /// From covey-privacy.
    #[error(transparent)]
    Privacy(#[from] covey_privacy::PrivacyError),
    /// From covey-tensors.
    #[error(transparent)]
    Tensor(#[from] covey_tensors::TensorError),
    /// From covey-coordinator.
    #[error(transparent)]
    Coordinator(#[from] covey_coordinator::CoordinatorError),
    /// From covey-agent.
    #[error(transparent)]
    Agent(#[from] covey_agent::AgentError),
}

impl From<covey_experiment::ExperimentError> for SimError {
    fn from(e: covey_experiment::ExperimentError) -> Self {
        use covey_experiment::ExperimentError as E;
        match e {
            E::Invalid { field, reason } => Self::Config { field, reason },
            E::File { path, reason } => Self::ConfigFile { path, reason },
            E::Io { path, source } => Self::Io { path, source },
            E::Coordinator(e) => Self::Coordinator(e),
        }
    }
}

impl SimError {
    /// An [`SimError::Io`] for `path`.
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        Self::Io { path: path.to_owned(), source }
    }

    /// An [`SimError::Config`].
    pub fn config(field: &'static str, reason: impl Into<String>) -> Self {
        Self::Config { field, reason: reason.into() }
    }
}

/// Result with [`SimError`].
pub type Result<T, E = SimError> = std::result::Result<T, E>;
