//! The coordinator's error type, and the reasons an upload is refused.

use std::path::{Path, PathBuf};

/// Errors of the coordinator library.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CoordinatorError {
    /// File-system failure.
    #[error("{path}: {source}")]
    Io {
        /// File or directory.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// An impossible configuration value.
    #[error("config `{field}`: {reason}")]
    Config {
        /// Key.
        field: String,
        /// What is wrong.
        reason: String,
    },
    /// The state database failed.
    #[error("state database: {0}")]
    Store(#[from] sqlx::Error),
    /// Durable state could not be serialised (a bug of this program, reported as one).
    #[error("cannot serialise the {what}: {source}")]
    Serialize {
        /// What was serialised.
        what: &'static str,
        /// Cause.
        #[source]
        source: serde_json::Error,
    },
    /// The state database holds something this version cannot read.
    #[error("state database is inconsistent: {0}")]
    Corrupt(String),
    /// A tensor operation failed.
    #[error("tensors: {0}")]
    Tensor(#[from] covey_tensors::TensorError),
    /// Framing, keys or manifests.
    #[error("protocol: {0}")]
    Proto(#[from] covey_proto::ProtoError),
    /// The strategy refused.
    #[error("strategy: {0}")]
    Strategy(#[from] covey_strategy::StrategyError),
    /// Privacy accounting failed.
    #[error("privacy: {0}")]
    Privacy(#[from] covey_privacy::PrivacyError),
    /// The initial model is unusable.
    #[error("model {path}: {reason}")]
    Model {
        /// Model directory or file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The gRPC server failed.
    #[error("transport: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// An artifact is missing from the artifact store.
    #[error("artifact {0} is missing")]
    MissingArtifact(String),
    /// An artifact's bytes no longer match its SHA-256 (damaged on disk).
    #[error("artifact {0} does not match its SHA-256 (damaged)")]
    CorruptArtifact(String),
    /// An operator request that cannot be carried out.
    #[error("{0}")]
    Refused(String),
    /// No version has this number.
    #[error("version {0} does not exist")]
    NoSuchVersion(u64),
    /// Another coordinator process holds the state directory.
    #[error("{}: another coordinator is running on this state directory (coordinator.lock is held)", state_dir.display())]
    StateLocked {
        /// The state directory.
        state_dir: std::path::PathBuf,
    },
    /// A device's request or upload was refused (counted and logged where refused).
    #[error("refused: {0}")]
    Rejected(#[from] Rejection),
}

impl CoordinatorError {
    /// An I/O error on `path`.
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        Self::Io { path: path.to_owned(), source }
    }

    /// The refusal, when this is one.
    pub fn rejection(&self) -> Option<&Rejection> {
        match self {
            Self::Rejected(r) => Some(r),
            _ => None,
        }
    }
}

/// Result of the coordinator library.
pub type Result<T, E = CoordinatorError> = std::result::Result<T, E>;

/// Why a device's request or upload was refused. Every variant maps to one gRPC status
/// code (in the service, [`Rejection::status`]) and one metric label; nothing is stored
/// for a refused upload.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum Rejection {
    /// A request field has the wrong length or form.
    #[error("{field}: {reason}")]
    BadRequest {
        /// The field.
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// Too many enrolments on the coordinator this minute.
    #[error("too many enrolments; retry in a minute")]
    EnrolmentRate,
    /// Too many enrolments with this token this minute.
    #[error("too many enrolments with this token; retry in a minute")]
    EnrolmentTokenRate,
    /// No enrolment token has this value.
    #[error("invalid enrolment token")]
    TokenUnknown,
    /// The enrolment token expired.
    #[error("the enrolment token expired")]
    TokenExpired,
    /// The enrolment token has enrolled as many devices as it may.
    #[error("the enrolment token has no uses left")]
    TokenUsedUp,
    /// The enrolment token was burned (a device it enrolled was revoked).
    #[error("the enrolment token was withdrawn (a device it enrolled was revoked)")]
    TokenBurned,
    /// A device request's signature does not verify under the device's key.
    #[error("request signature does not verify")]
    BadRequestSignature,
    /// A device request's timestamp is too far from the coordinator's clock.
    #[error("request timestamp is outside the allowed clock skew")]
    ClockSkew,
    /// The device sends requests faster than its rate limit.
    #[error("too many requests from this device; slow down")]
    DeviceRate,
    /// The artifact is not one the coordinator serves.
    #[error("no such artifact")]
    NoSuchArtifact,
    /// The stream did not start with exactly one header.
    #[error("malformed update stream: {0}")]
    MalformedStream(&'static str),
    /// The signed header does not parse.
    #[error("malformed update header: {0}")]
    MalformedHeader(String),
    /// No enrolled device has this id.
    #[error("unknown device")]
    UnknownDevice,
    /// The device is revoked.
    #[error("device is revoked")]
    RevokedDevice,
    /// The signature does not verify under the device's key.
    #[error("signature does not verify")]
    BadSignature,
    /// The device has no assignment in an open round.
    #[error("no task for this device in an open round")]
    NoAssignment,
    /// The header names another round.
    #[error("update is for round {found}, the open round is {expected}")]
    WrongRound {
        /// The open round.
        expected: u64,
        /// Round in the header.
        found: u64,
    },
    /// The header names another base version.
    #[error("update is for another base model version")]
    WrongBaseVersion,
    /// The header names another task.
    #[error("update names another task")]
    WrongTask,
    /// The nonce is not the one issued, or was used already.
    #[error("nonce already used or not issued (replay)")]
    Replay,
    /// The device is over its participation limits (`privacy.participation`).
    #[error(
        "the device is over its participation limits ({contributions} contributions, the last in round {last_round})"
    )]
    ParticipationLimit {
        /// Its accepted updates so far.
        contributions: u64,
        /// The round of its latest one.
        last_round: u64,
    },
    /// The round's deadline passed.
    #[error("the round's deadline has passed")]
    DeadlinePassed,
    /// The round closed (aggregating or finished) before the update was stored.
    #[error("the round is closed")]
    RoundClosed,
    /// Clip norm or noise settings differ from the task's.
    #[error("privacy settings differ from the task's: {0}")]
    PrivacyMismatch(String),
    /// The payload exceeds the limit.
    #[error("payload exceeds {limit} bytes")]
    Oversized {
        /// Limit in bytes.
        limit: u64,
    },
    /// The payload length differs from the signed length.
    #[error("payload is {found} bytes, the header signs {expected}")]
    LengthMismatch {
        /// Signed length.
        expected: u64,
        /// Received length.
        found: u64,
    },
    /// The payload's hash differs from the signed hash (tampering).
    #[error("payload does not match its signed SHA-256")]
    PayloadHash,
    /// The payload is not a valid tensor file.
    #[error("payload is not a valid safetensors file: {0}")]
    BadPayload(String),
    /// Tensors missing, unexpected, or of the wrong shape.
    #[error("wrong tensors: {0}")]
    WrongTensors(String),
    /// NaN or infinite values.
    #[error("tensor `{0}` holds NaN or infinite values")]
    NonFinite(String),
    /// The update's norm exceeds the bound.
    #[error("update norm {norm:.4} exceeds the bound {bound:.4}")]
    NormTooLarge {
        /// Norm found.
        norm: f64,
        /// Bound.
        bound: f64,
    },
    /// The declared number of examples is not what the task prescribed.
    #[error("update declares {found} training examples, the task prescribed {expected}")]
    ExamplesMismatch {
        /// steps × batch size of the task.
        expected: u64,
        /// Declared.
        found: u64,
    },
    /// Another upload of this device is in progress.
    #[error("another upload of this device is in progress")]
    UploadInProgress,
    /// Too many uploads in progress on the coordinator.
    #[error("too many uploads in progress; retry later")]
    Busy,
}

impl Rejection {
    /// Stable metric label.
    pub fn label(&self) -> &'static str {
        match self {
            Self::BadRequest { .. } => "bad_request",
            Self::EnrolmentRate => "enrolment_rate",
            Self::EnrolmentTokenRate => "enrolment_token_rate",
            Self::TokenUnknown => "token_unknown",
            Self::TokenExpired => "token_expired",
            Self::TokenUsedUp => "token_used_up",
            Self::TokenBurned => "token_burned",
            Self::BadRequestSignature => "bad_request_signature",
            Self::ClockSkew => "clock_skew",
            Self::DeviceRate => "device_rate",
            Self::NoSuchArtifact => "no_such_artifact",
            Self::MalformedStream(_) => "malformed_stream",
            Self::MalformedHeader(_) => "malformed_header",
            Self::UnknownDevice => "unknown_device",
            Self::RevokedDevice => "revoked_device",
            Self::BadSignature => "bad_signature",
            Self::NoAssignment => "no_assignment",
            Self::WrongRound { .. } => "wrong_round",
            Self::WrongBaseVersion => "wrong_base_version",
            Self::WrongTask => "wrong_task",
            Self::Replay => "replay",
            Self::ParticipationLimit { .. } => "participation_limit",
            Self::DeadlinePassed => "deadline_passed",
            Self::RoundClosed => "round_closed",
            Self::PrivacyMismatch(_) => "privacy_mismatch",
            Self::Oversized { .. } => "oversized",
            Self::LengthMismatch { .. } => "length_mismatch",
            Self::PayloadHash => "payload_hash",
            Self::BadPayload(_) => "bad_payload",
            Self::WrongTensors(_) => "wrong_tensors",
            Self::NonFinite(_) => "non_finite",
            Self::NormTooLarge { .. } => "norm_too_large",
            Self::ExamplesMismatch { .. } => "examples_mismatch",
            Self::UploadInProgress => "upload_in_progress",
            Self::Busy => "busy",
        }
    }

    /// The gRPC status a device receives.
    pub fn status(&self) -> tonic::Status {
        use tonic::Code;
        let code = match self {
            Self::BadRequest { .. }
            | Self::MalformedStream(_)
            | Self::MalformedHeader(_)
            | Self::PrivacyMismatch(_)
            | Self::LengthMismatch { .. }
            | Self::PayloadHash
            | Self::BadPayload(_)
            | Self::WrongTensors(_)
            | Self::NonFinite(_)
            | Self::NormTooLarge { .. }
            | Self::ExamplesMismatch { .. } => Code::InvalidArgument,
            Self::UploadInProgress => Code::Aborted,
            Self::Busy => Code::Unavailable,
            Self::UnknownDevice | Self::BadSignature | Self::BadRequestSignature | Self::ClockSkew => {
                Code::Unauthenticated
            }
            Self::RevokedDevice | Self::TokenUnknown | Self::TokenExpired | Self::TokenUsedUp | Self::TokenBurned => {
                Code::PermissionDenied
            }
            Self::EnrolmentRate | Self::EnrolmentTokenRate | Self::DeviceRate => Code::ResourceExhausted,
            Self::NoSuchArtifact => Code::NotFound,
            Self::NoAssignment
            | Self::WrongRound { .. }
            | Self::WrongBaseVersion
            | Self::WrongTask
            | Self::DeadlinePassed
            | Self::ParticipationLimit { .. }
            | Self::RoundClosed => Code::FailedPrecondition,
            Self::Replay => Code::AlreadyExists,
            Self::Oversized { .. } => Code::ResourceExhausted,
        };
        tonic::Status::new(code, self.to_string())
    }
}

impl From<&CoordinatorError> for tonic::Status {
    fn from(e: &CoordinatorError) -> Self {
        match e {
            CoordinatorError::Config { .. } => tonic::Status::invalid_argument(e.to_string()),
            CoordinatorError::MissingArtifact(_) => tonic::Status::not_found("no such artifact"),
            CoordinatorError::Refused(reason) => tonic::Status::failed_precondition(reason.clone()),
            CoordinatorError::Rejected(r) => r.status(),
            CoordinatorError::NoSuchVersion(_) => tonic::Status::not_found(e.to_string()),
            CoordinatorError::CorruptArtifact(_)
            | CoordinatorError::Io { .. }
            | CoordinatorError::Store(_)
            | CoordinatorError::Corrupt(_)
            | CoordinatorError::Serialize { .. }
            | CoordinatorError::Tensor(_)
            | CoordinatorError::Proto(_)
            | CoordinatorError::Strategy(_)
            | CoordinatorError::Privacy(_)
            | CoordinatorError::Model { .. }
            | CoordinatorError::StateLocked { .. }
            | CoordinatorError::Transport(_) => {
                // Paths and database details stay in the coordinator's log.
                tracing::error!(error = %e, "internal error answered to a client");
                tonic::Status::internal("internal error (see the coordinator's log)")
            }
        }
    }
}
