//! The one error type of `covey-privacy`.

use std::path::PathBuf;

/// Everything that can go wrong in `covey-privacy`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PrivacyError {
    /// A privacy or clipping parameter is out of range.
    #[error("invalid parameter {name} = {value}: {reason}")]
    InvalidParameter {
        /// Parameter name.
        name: &'static str,
        /// The value given.
        value: f64,
        /// Why it is invalid.
        reason: &'static str,
    },
    /// An update or gradient contains NaN or infinity.
    #[error("the update contains non-finite values (first at index {index})")]
    NonFinite {
        /// Index of the first non-finite value.
        index: usize,
    },
    /// Per-example inputs do not all have the same length.
    #[error("example {index} has {found} values, expected {expected}")]
    LengthMismatch {
        /// Offending example.
        index: usize,
        /// Its length.
        found: usize,
        /// Length of the first example.
        expected: usize,
    },
    /// The operating system's random generator failed.
    #[error("the operating system's random generator failed: {0}")]
    Entropy(#[source] getrandom::Error),
    /// An accountant name that does not exist.
    #[error("unknown accountant `{name}`: expected `rdp` or `pld`")]
    UnknownAccountant {
        /// The name given.
        name: String,
    },
    /// No noise multiplier reaches the target.
    #[error("no noise multiplier up to {max} reaches ε = {target_epsilon} at δ = {delta}")]
    CalibrationFailed {
        /// Target ε.
        target_epsilon: f64,
        /// δ.
        delta: f64,
        /// Largest multiplier tried.
        max: f64,
    },
    /// A device would exceed its privacy budget; nothing was charged.
    #[error("device {device} would spend ε = {would_spend:.4} > budget {budget} at δ = {delta}; refused")]
    BudgetExceeded {
        /// The device.
        device: String,
        /// ε after this participation.
        would_spend: f64,
        /// The configured budget.
        budget: f64,
        /// δ of the budget.
        delta: f64,
    },
    /// The ledger file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The ledger file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The ledger file exists but cannot be trusted.
    #[error("{path}: corrupt privacy ledger: {reason}")]
    CorruptLedger {
        /// The ledger file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

impl PrivacyError {
    pub(crate) fn param(name: &'static str, value: f64, reason: &'static str) -> Self {
        Self::InvalidParameter { name, value, reason }
    }
}

/// Result alias of this crate.
pub type Result<T, E = PrivacyError> = std::result::Result<T, E>;
