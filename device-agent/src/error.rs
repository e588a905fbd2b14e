//! The one error type of `covey-agent`, and which failures are worth retrying.

use std::path::PathBuf;

/// Everything that can go wrong in the device agent.
///
/// Variants name the file, RPC, version or field involved so that an operator can act on
/// the message. [`AgentError::is_transient`] says whether retrying the same operation may
/// succeed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AgentError {
    /// A file or directory of the state or data directory could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file involved.
        path: PathBuf,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A JSON file of the state directory is malformed.
    #[error("{path}: invalid JSON: {source}")]
    Json {
        /// The file involved.
        path: PathBuf,
        /// The parser's error.
        #[source]
        source: serde_json::Error,
    },
    /// A TOML configuration file is malformed.
    #[error("{path}: invalid configuration: {source}")]
    Toml {
        /// The file involved.
        path: PathBuf,
        /// The parser's error.
        #[source]
        source: Box<toml::de::Error>,
    },
    /// A configuration value is missing or out of range.
    #[error("invalid configuration: {field}: {reason}")]
    Config {
        /// The offending field.
        field: &'static str,
        /// Why it is invalid.
        reason: String,
    },
    /// The state directory holds no identity: run `covey-agent enroll` first.
    #[error("{state_dir}: this device is not enrolled (no identity.json); run `covey-agent enroll` first")]
    NotEnrolled {
        /// The state directory.
        state_dir: PathBuf,
    },
    /// The state directory already holds an identity.
    #[error("{state_dir}: this device is already enrolled as {device_id}")]
    AlreadyEnrolled {
        /// The state directory.
        state_dir: PathBuf,
        /// Hex device id found there.
        device_id: String,
    },
    /// Another agent runs on this state directory.
    #[error("{state_dir}: another agent is running on this state directory (it holds agent.lock)")]
    StateLocked {
        /// The state directory.
        state_dir: PathBuf,
    },
    /// The sealed local adapter cannot be used: another key, altered or truncated, or not
    /// a local adapter. The device falls back to the global model.
    #[error("{path}: local adapter unusable: {reason}")]
    LocalAdapter {
        /// The sealed file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The stored identity is inconsistent (key and device id disagree, bad hex...).
    #[error("{path}: corrupt identity: {reason}")]
    CorruptIdentity {
        /// The file involved.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A key, signature or signed framing of `covey-proto` failed.
    #[error("{what}: {source}")]
    Proto {
        /// What was being done.
        what: &'static str,
        /// The cause.
        #[source]
        source: covey_proto::ProtoError,
    },
    /// The coordinator's endpoint or TLS settings are unusable.
    #[error("coordinator endpoint {url}: {source}")]
    Transport {
        /// The URL.
        url: String,
        /// The cause.
        #[source]
        source: Box<tonic::transport::Error>,
    },
    /// A call to the coordinator failed.
    #[error("{method}: {code:?}: {message}")]
    Rpc {
        /// The RPC.
        method: &'static str,
        /// The gRPC status code.
        code: tonic::Code,
        /// The coordinator's message.
        message: String,
    },
    /// The coordinator's answer lacks a field or holds an impossible value.
    #[error("{method}: malformed response: {field}: {reason}")]
    Malformed {
        /// The RPC.
        method: &'static str,
        /// The field.
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// A model version was refused: bad signature, wrong hash, wrong version, bad config.
    /// Nothing of it was cached or trained on.
    #[error("model version {version} refused: {reason}")]
    UntrustedModel {
        /// The version.
        version: u64,
        /// Why it was refused.
        reason: String,
    },
    /// Downloaded bytes do not match the SHA-256 or size they were requested by.
    /// Nothing of them was cached.
    #[error("artifact {sha256}: {reason}")]
    ArtifactMismatch {
        /// Hex SHA-256 requested.
        sha256: String,
        /// What did not match.
        reason: String,
    },
    /// A task cannot be carried out as issued (unknown target, impossible privacy spec...).
    #[error("task {task_id}: {field}: {reason}")]
    InvalidTask {
        /// Hex task id (empty when unreadable).
        task_id: String,
        /// The offending field.
        field: &'static str,
        /// Why.
        reason: String,
    },
    /// The task's deadline passed before its update could be sent.
    #[error("task {task_id}: deadline passed {late_ms} ms ago")]
    DeadlinePassed {
        /// Hex task id.
        task_id: String,
        /// How late.
        late_ms: u64,
    },
    /// The encoded update is larger than the task accepts.
    #[error("task {task_id}: update of {len} bytes exceeds the task's limit of {max} bytes")]
    PayloadTooLarge {
        /// Hex task id.
        task_id: String,
        /// Encoded size.
        len: u64,
        /// The task's `max_payload_bytes`.
        max: u64,
    },
    /// Local training failed (bad tensors, empty corpus, diverging loss...).
    #[error("local training: {0}")]
    Model(#[from] covey_model::ModelError),
    /// The device declined a task that does not fit its means (told to the coordinator).
    #[error("task {task_id} declined: {reason}")]
    Declined {
        /// Hex task id.
        task_id: String,
        /// Why.
        reason: String,
    },
    /// Local inference (`generate`, `chat`) failed: tokenizer, chat template, engine.
    #[error("local inference: {0}")]
    Inference(#[source] covey_model::ModelError),
    /// Encoding or decoding tensors failed.
    #[error("{what}: {source}")]
    Tensor {
        /// What was being encoded or decoded.
        what: &'static str,
        /// The cause.
        #[source]
        source: covey_tensors::TensorError,
    },
    /// Clipping or noising the update failed.
    #[error("privacy: {0}")]
    Privacy(#[from] covey_privacy::PrivacyError),
    /// The training thread panicked or was cancelled.
    #[error("training thread: {0}")]
    Join(#[source] tokio::task::JoinError),
    /// No verified model version is cached yet.
    #[error("{state_dir}: no verified model version is cached yet; run the agent until it trains once")]
    NoModel {
        /// The state directory.
        state_dir: PathBuf,
    },
    /// Too many tasks in a row failed (see `AgentConfig::max_task_failures`).
    #[error("{failures} tasks failed in a row; last: {last}")]
    TooManyFailures {
        /// Consecutive failures.
        failures: u32,
        /// The last error.
        last: Box<AgentError>,
    },
}

impl From<covey_settings::SettingsError> for AgentError {
    fn from(e: covey_settings::SettingsError) -> Self {
        use covey_settings::SettingsError as S;
        match e {
            S::Invalid { field, reason } => Self::Config { field, reason },
            S::Toml { path, source } => Self::Toml { path, source },
            S::Io { path, source } => Self::Io { path, source },
        }
    }
}

impl AgentError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io { path: path.into(), source }
    }

    pub(crate) fn json(path: impl Into<PathBuf>, source: serde_json::Error) -> Self {
        Self::Json { path: path.into(), source }
    }

    pub(crate) fn config(field: &'static str, reason: impl Into<String>) -> Self {
        Self::Config { field, reason: reason.into() }
    }

    pub(crate) fn rpc(method: &'static str, status: &tonic::Status) -> Self {
        Self::Rpc { method, code: status.code(), message: status.message().to_owned() }
    }

    pub(crate) fn untrusted(version: u64, reason: impl Into<String>) -> Self {
        Self::UntrustedModel { version, reason: reason.into() }
    }

    /// Whether retrying the same operation later may succeed: the coordinator was
    /// unreachable, overloaded or failed internally (see [`is_transient_code`]), or a
    /// download was cut short. Everything else is permanent for the task at hand.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Rpc { code, .. } => is_transient_code(*code),
            Self::Malformed { .. }
            | Self::Io { .. }
            | Self::Json { .. }
            | Self::Toml { .. }
            | Self::Config { .. }
            | Self::NotEnrolled { .. }
            | Self::AlreadyEnrolled { .. }
            | Self::StateLocked { .. }
            | Self::CorruptIdentity { .. }
            | Self::LocalAdapter { .. }
            | Self::Proto { .. }
            | Self::Transport { .. }
            | Self::UntrustedModel { .. }
            | Self::ArtifactMismatch { .. }
            | Self::InvalidTask { .. }
            | Self::DeadlinePassed { .. }
            | Self::PayloadTooLarge { .. }
            | Self::Model(_)
            | Self::Inference(_)
            | Self::Declined { .. }
            | Self::Tensor { .. }
            | Self::Privacy(_)
            | Self::Join(_)
            | Self::NoModel { .. }
            | Self::TooManyFailures { .. } => false,
        }
    }

    /// The gRPC code when this is a failed call.
    pub fn code(&self) -> Option<tonic::Code> {
        match self {
            Self::Rpc { code, .. } => Some(*code),
            _ => None,
        }
    }
}

/// Whether a gRPC status code is worth retrying with backoff.
///
/// Transient: `Unavailable`, `DeadlineExceeded`, `Aborted`, `Internal`, `Unknown`,
/// `Cancelled` (the connection dropped). Permanent for the task: `Unauthenticated`,
/// `PermissionDenied`, `InvalidArgument`, `FailedPrecondition`, `AlreadyExists`,
/// `ResourceExhausted`, `NotFound`, `OutOfRange`, `Unimplemented`, `DataLoss`.
pub fn is_transient_code(code: tonic::Code) -> bool {
    use tonic::Code;
    match code {
        Code::Unavailable
        | Code::DeadlineExceeded
        | Code::Aborted
        | Code::Internal
        | Code::Unknown
        | Code::Cancelled => true,
        Code::Ok
        | Code::InvalidArgument
        | Code::NotFound
        | Code::AlreadyExists
        | Code::PermissionDenied
        | Code::ResourceExhausted
        | Code::FailedPrecondition
        | Code::OutOfRange
        | Code::Unimplemented
        | Code::DataLoss
        | Code::Unauthenticated => false,
    }
}

/// Result alias of this crate.
pub type Result<T, E = AgentError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_codes_split_into_transient_and_permanent() {
        use tonic::Code;
        for c in [Code::Unavailable, Code::DeadlineExceeded, Code::Aborted, Code::Internal, Code::Unknown] {
            assert!(is_transient_code(c), "{c:?}");
            assert!(AgentError::rpc("PollTask", &tonic::Status::new(c, "x")).is_transient());
        }
        for c in [
            Code::Unauthenticated,
            Code::PermissionDenied,
            Code::InvalidArgument,
            Code::FailedPrecondition,
            Code::AlreadyExists,
            Code::ResourceExhausted,
        ] {
            assert!(!is_transient_code(c), "{c:?}");
        }
        assert!(!AgentError::untrusted(3, "bad signature").is_transient());
    }
}
