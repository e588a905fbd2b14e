//! The one error type of `covey-model`.

use std::path::PathBuf;

/// Everything that can go wrong in `covey-model`.
///
/// Variants name the file and the problem so that a user can act on the message.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ModelError {
    /// A file or directory could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file involved.
        path: PathBuf,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A JSON file (config, adapter config, corpus line) is malformed.
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
    /// A safetensors file is truncated or malformed.
    #[error("{path}: not a valid safetensors file: {reason}")]
    Safetensors {
        /// The file involved.
        path: PathBuf,
        /// The decoder's explanation.
        reason: String,
    },
    /// A teacher-logit cache is unreadable, truncated, or was built for other data.
    #[error("{path}: {reason}")]
    TeacherCache {
        /// The cache file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A tensor expected in a checkpoint is absent.
    #[error("{path}: missing tensor `{name}`")]
    MissingTensor {
        /// The file involved.
        path: PathBuf,
        /// The tensor name that was expected.
        name: String,
    },
    /// A tensor has the wrong shape for the model configuration.
    #[error("{path}: tensor `{name}` has shape {found:?}, expected {expected:?}")]
    ShapeMismatch {
        /// The file (or source) involved.
        path: PathBuf,
        /// The tensor name.
        name: String,
        /// The shape the configuration implies.
        expected: Vec<usize>,
        /// The shape found.
        found: Vec<usize>,
    },
    /// A tensor has an element type this crate cannot read.
    #[error("{path}: tensor `{name}` has unsupported dtype {dtype}")]
    UnsupportedDtype {
        /// The file involved.
        path: PathBuf,
        /// The tensor name.
        name: String,
        /// The dtype found.
        dtype: String,
    },
    /// A tensor contains NaN or infinite values.
    #[error("{path}: tensor `{name}` contains non-finite values")]
    NonFinite {
        /// The file (or source) involved.
        path: PathBuf,
        /// The tensor name.
        name: String,
    },
    /// A corpus holds no usable text.
    #[error("{path}: corpus is empty{}", hint(.needed))]
    EmptyCorpus {
        /// The file or directory involved.
        path: PathBuf,
        /// How many tokens were needed, when a minimum applies.
        needed: Option<usize>,
    },
    /// An operation needs LoRA adapters but the model has none (or the reverse).
    #[error("{0}")]
    Adapter(String),
    /// A record of a data file (a JSONL line) parses but does not say what it must.
    #[error("{path}: {reason}")]
    BadRecord {
        /// The file and line (`file:line`).
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A token id is outside the vocabulary.
    #[error("token id {id} is outside the vocabulary of {vocab} entries")]
    TokenOutOfRange {
        /// The offending id.
        id: u32,
        /// The vocabulary size.
        vocab: usize,
    },
    /// A model file is valid but describes a model Covey does not support.
    #[error("{path}: unsupported model: {reason}")]
    UnsupportedModel {
        /// The file involved.
        path: PathBuf,
        /// What is not supported.
        reason: String,
    },
    /// The inference engine (`covey-infer`) refused a model or input.
    #[error(transparent)]
    Infer(covey_infer::InferError),
    /// A model artifact error (`covey-artifact`: tokenizer, GGUF, chat template, ONNX
    /// export) with no counterpart here.
    #[error(transparent)]
    Artifact(covey_artifact::ArtifactError),
    /// The LoRA trainer (`covey-qlora`) refused its inputs.
    #[error(transparent)]
    Trainer(#[from] covey_qlora::QloraError),
}

impl From<covey_infer::InferError> for ModelError {
    fn from(e: covey_infer::InferError) -> Self {
        use covey_infer::InferError as I;
        match e {
            I::Io { path, source } => Self::Io { path, source },
            I::Json { path, source } => Self::Json { path, source },
            I::InvalidConfig { path, field, reason } => Self::InvalidConfig { path, field, reason },
            other => Self::Infer(other),
        }
    }
}

impl From<covey_artifact::ArtifactError> for ModelError {
    /// The same variant, by name: a message reads the same from either crate.
    fn from(e: covey_artifact::ArtifactError) -> Self {
        use covey_artifact::ArtifactError as A;
        match e {
            A::Io { path, source } => Self::Io { path, source },
            A::Json { path, source } => Self::Json { path, source },
            A::InvalidConfig { path, field, reason } => Self::InvalidConfig { path, field, reason },
            A::Safetensors { path, reason } => Self::Safetensors { path, reason },
            A::MissingTensor { path, name } => Self::MissingTensor { path, name },
            A::ShapeMismatch { path, name, expected, found } => Self::ShapeMismatch { path, name, expected, found },
            A::UnsupportedDtype { path, name, dtype } => Self::UnsupportedDtype { path, name, dtype },
            A::NonFinite { path, name } => Self::NonFinite { path, name },
            A::TokenOutOfRange { id, vocab } => Self::TokenOutOfRange { id, vocab },
            A::UnsupportedModel { path, reason } => Self::UnsupportedModel { path, reason },
            A::Infer(e) => Self::Infer(e),
            other => Self::Artifact(other),
        }
    }
}

fn origin(path: &Option<PathBuf>) -> String {
    match path {
        Some(p) => format!(" in {}", p.display()),
        None => String::new(),
    }
}

fn hint(needed: &Option<usize>) -> String {
    match needed {
        Some(n) => format!(" (needs at least {n} tokens)"),
        None => String::new(),
    }
}

impl From<covey_settings::SettingsError> for ModelError {
    fn from(e: covey_settings::SettingsError) -> Self {
        use covey_settings::SettingsError as S;
        match e {
            S::Invalid { field, reason } => Self::InvalidConfig { path: None, field, reason },
            S::Toml { path, source } => {
                Self::InvalidConfig { path: Some(path), field: "toml", reason: source.to_string() }
            }
            S::Io { path, source } => Self::Io { path, source },
        }
    }
}

impl ModelError {
    /// An I/O error on `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io { path: path.into(), source }
    }
    /// An impossible configuration value.
    pub fn config(field: &'static str, reason: impl Into<String>) -> Self {
        Self::InvalidConfig { path: None, field, reason: reason.into() }
    }
    /// Attach the file a configuration came from.
    pub(crate) fn in_file(self, file: impl Into<PathBuf>) -> Self {
        match self {
            Self::InvalidConfig { path: None, field, reason } => {
                Self::InvalidConfig { path: Some(file.into()), field, reason }
            }
            other => other,
        }
    }
}

/// Result alias of this crate.
pub type Result<T, E = ModelError> = std::result::Result<T, E>;
