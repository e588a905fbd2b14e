//! Errors of the training engine.

use thiserror::Error;

/// What can go wrong building or running a LoRA trainer.
#[derive(Debug, Error)]
pub enum QloraError {
    /// A base weight is missing.
    #[error("base weights: `{0}` is missing")]
    MissingTensor(String),
    /// A tensor has the wrong shape.
    #[error("{source_name}: `{name}` has shape {found:?}, expected {expected:?}")]
    Shape {
        /// Which input (base weights, LoRA A, ...).
        source_name: &'static str,
        /// The tensor.
        name: String,
        /// What the model needs.
        expected: Vec<usize>,
        /// What was given.
        found: Vec<usize>,
    },
    /// A tensor holds NaN or infinity.
    #[error("{source_name}: `{name}` holds a value that is not finite")]
    NonFinite {
        /// Which input.
        source_name: &'static str,
        /// The tensor.
        name: String,
    },
    /// A setting or an input is impossible.
    #[error("{field}: {reason}")]
    Invalid {
        /// The setting.
        field: &'static str,
        /// Why.
        reason: String,
    },
    /// The model configuration is invalid.
    #[error(transparent)]
    Config(#[from] covey_infer::InferError),
}

/// Result of this crate.
pub type Result<T> = std::result::Result<T, QloraError>;

pub(crate) fn invalid(field: &'static str, reason: impl Into<String>) -> QloraError {
    QloraError::Invalid { field, reason: reason.into() }
}
