//! The one error type of `covey-infer`.

use std::path::PathBuf;

/// Everything that can go wrong in `covey-infer`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum InferError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file involved.
        path: PathBuf,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A JSON file (`config.json`) is malformed.
    #[error("{path}: invalid JSON: {source}")]
    Json {
        /// The file involved.
        path: PathBuf,
        /// The parser's error, with line and column.
        #[source]
        source: serde_json::Error,
    },
    /// A configuration value is missing, out of range or inconsistent.
    #[error("invalid configuration{}: {field}: {reason}", origin(.path))]
    InvalidConfig {
        /// The file the configuration came from, if any.
        path: Option<PathBuf>,
        /// The offending field.
        field: &'static str,
        /// Why it is invalid.
        reason: String,
    },
    /// A weight the model needs is absent.
    #[error("missing tensor `{0}`")]
    MissingTensor(String),
    /// A weight has the wrong shape for the configuration.
    #[error("tensor `{name}` has shape {found:?}, expected {expected:?}")]
    ShapeMismatch {
        /// The tensor name.
        name: String,
        /// The shape the configuration implies.
        expected: Vec<usize>,
        /// The shape found.
        found: Vec<usize>,
    },
    /// A token id is not in the vocabulary.
    #[error("token id {id} is outside the vocabulary of {vocab} tokens")]
    TokenOutOfRange {
        /// The id.
        id: u32,
        /// Vocabulary size.
        vocab: usize,
    },
    /// The sequence would exceed the model's context.
    #[error("sequence of {len} tokens exceeds the context of {max} positions")]
    ContextFull {
        /// Positions requested.
        len: usize,
        /// The model's `max_position_embeddings`.
        max: usize,
    },
    /// A tensor codec or file failed.
    #[error(transparent)]
    Tensor(#[from] covey_tensors::TensorError),
    /// A sampling or evaluation setting is impossible.
    #[error("invalid setting `{field}`: {reason}")]
    InvalidSetting {
        /// The setting.
        field: &'static str,
        /// Why.
        reason: String,
    },
}

fn origin(path: &Option<PathBuf>) -> String {
    path.as_ref().map(|p| format!(" in {}", p.display())).unwrap_or_default()
}

impl InferError {
    pub(crate) fn config(field: &'static str, reason: impl Into<String>) -> Self {
        Self::InvalidConfig { path: None, field, reason: reason.into() }
    }
    /// Attach the file a configuration came from.
    pub fn in_file(self, file: impl Into<PathBuf>) -> Self {
        match self {
            Self::InvalidConfig { path: None, field, reason } => {
                Self::InvalidConfig { path: Some(file.into()), field, reason }
            }
            other => other,
        }
    }
}

/// Result alias of this crate.
pub type Result<T, E = InferError> = std::result::Result<T, E>;
