//! The one error type of this crate.

use std::path::PathBuf;

/// Why an experiment file could not be read or describes an impossible run.
#[derive(Debug, thiserror::Error)]
pub enum ExperimentError {
    /// A setting is impossible.
    #[error("invalid setting `{field}`: {reason}")]
    Invalid {
        /// The setting, as written in the experiment file.
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// The file is not valid TOML for an experiment (syntax, unknown key, wrong type).
    #[error("{}: {reason}", path.display())]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The file could not be read.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The sections shared with the coordinator fail the coordinator's own checks.
    #[error(transparent)]
    Coordinator(#[from] covey_coordinator::CoordinatorError),
}

impl ExperimentError {
    /// An [`ExperimentError::Invalid`].
    pub fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        Self::Invalid { field, reason: reason.into() }
    }
}

/// Result with [`ExperimentError`].
pub type Result<T, E = ExperimentError> = std::result::Result<T, E>;
