//! The one error type of this crate.

use std::path::PathBuf;

/// Why a configuration could not be read or is not possible.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    /// A value is missing or out of range.
    #[error("invalid configuration: {field}: {reason}")]
    Invalid {
        /// The offending field.
        field: &'static str,
        /// Why it is invalid.
        reason: String,
    },
    /// The TOML text is malformed, names an unknown key, or holds a value of the wrong type.
    #[error("{path}: invalid configuration: {source}")]
    Toml {
        /// The file involved (`<string>` for text).
        path: PathBuf,
        /// The parser's error.
        #[source]
        source: Box<toml::de::Error>,
    },
    /// The file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

impl SettingsError {
    /// An invalid value of `field`.
    pub fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        Self::Invalid { field, reason: reason.into() }
    }
}

/// Results of this crate.
pub type Result<T> = std::result::Result<T, SettingsError>;
