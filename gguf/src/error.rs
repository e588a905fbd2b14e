//! The crate's error type.

use std::path::PathBuf;

use crate::GgmlType;

/// Everything that can go wrong reading, writing or converting GGUF data.
///
/// Byte offsets are absolute positions in the file (0 = first byte of the magic).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GgufError {
    /// The first four bytes are not `GGUF`.
    #[error("not a GGUF file: magic is {found:02x?} (\"{}\"), expected \"GGUF\" (47 47 55 46)", .found.escape_ascii())]
    BadMagic {
        /// The four bytes found.
        found: [u8; 4],
    },
    /// The version field names a GGUF version this crate does not read (it reads 2 and 3).
    #[error("unsupported GGUF version {version} (supported: 2 and 3)")]
    UnsupportedVersion {
        /// The version found.
        version: u32,
    },
    /// The version field reads as a byte-swapped 2 or 3: a big-endian file.
    #[error("big-endian GGUF file (version field {raw:#010x}); only little-endian files are supported")]
    BigEndian {
        /// The raw version field, read little-endian.
        raw: u32,
    },
    /// The file ends before a field it must hold.
    #[error("truncated GGUF file: {what} at byte {offset} needs {needed} bytes, only {available} left")]
    Truncated {
        /// What was being read.
        what: String,
        /// Where it starts.
        offset: u64,
        /// Bytes it needs.
        needed: u64,
        /// Bytes left in the file from `offset`.
        available: u64,
    },
    /// A length or count read from the file cannot fit in what is left of the file (checked before
    /// anything is allocated).
    #[error("{what}: count {count} (at byte {offset}) cannot fit in the {remaining} bytes left in the file")]
    CountTooLarge {
        /// What the count counts.
        what: String,
        /// The count read.
        count: u64,
        /// Where the count was read.
        offset: u64,
        /// Bytes left after the count.
        remaining: u64,
    },
    /// A string is not valid UTF-8.
    #[error("{what} at byte {offset} is not valid UTF-8")]
    InvalidUtf8 {
        /// Which string.
        what: String,
        /// Where its bytes start.
        offset: u64,
    },
    /// A metadata value type id is not one of GGUF's (0..=12).
    #[error("{what} at byte {offset}: unknown GGUF value type {raw}")]
    UnknownValueType {
        /// Where the type was met.
        what: String,
        /// The raw type id.
        raw: u32,
        /// Where it was read.
        offset: u64,
    },
    /// A bool value is neither 0 nor 1.
    #[error("{what} at byte {offset}: invalid bool byte {raw} (must be 0 or 1)")]
    InvalidBool {
        /// Which value.
        what: String,
        /// The byte found.
        raw: u8,
        /// Where it was read.
        offset: u64,
    },
    /// Arrays nest deeper than this crate accepts.
    #[error("{what}: arrays nested more than {max} deep")]
    NestingTooDeep {
        /// Which value.
        what: String,
        /// The deepest nesting accepted.
        max: usize,
    },
    /// A ggml tensor type id this crate does not know (or one ggml has removed).
    #[error("unknown ggml tensor type id {raw}{}", .tensor.as_ref().map(|n| format!(" for tensor `{n}`")).unwrap_or_default())]
    UnknownTensorType {
        /// The raw type id.
        raw: u32,
        /// The tensor that has it, when known.
        tensor: Option<String>,
    },
    /// The codec for this type (dequantization or quantization) is not implemented.
    #[error("{op} {ty} is not supported")]
    UnsupportedType {
        /// The type.
        ty: GgmlType,
        /// `"dequantizing"` or `"quantizing to"`.
        op: &'static str,
    },
    /// A tensor has more dimensions than ggml allows (4).
    #[error("tensor `{name}` has {n_dims} dimensions, at most 4 are allowed")]
    TooManyDims {
        /// Tensor name.
        name: String,
        /// Dimension count.
        n_dims: u64,
    },
    /// The product of a tensor's dimensions (or its byte size) overflows.
    #[error("tensor `{name}` dimensions {dims:?} overflow (element or byte count too large)")]
    DimsOverflow {
        /// Tensor name.
        name: String,
        /// Its dimensions, ggml order.
        dims: Vec<u64>,
    },
    /// An element count (or a row length, ggml's `ne0`) is not a whole number of blocks.
    #[error("{what}: {count} is not a multiple of the {ty} block size {block_size}")]
    NotBlockMultiple {
        /// What was counted.
        what: String,
        /// The count.
        count: u64,
        /// The tensor type.
        ty: GgmlType,
        /// Its block size.
        block_size: u64,
    },
    /// A byte buffer does not have the length its type and element count imply.
    #[error("{what}: expected {expected} bytes, got {found}")]
    ByteLength {
        /// What the buffer holds.
        what: String,
        /// Bytes expected.
        expected: u64,
        /// Bytes given.
        found: u64,
    },
    /// `general.alignment` is zero or not a power of two.
    #[error("alignment {alignment} is not a non-zero power of two")]
    BadAlignment {
        /// The alignment found.
        alignment: u64,
    },
    /// A tensor's data offset is not a multiple of the file's alignment.
    #[error("tensor `{name}` data offset {offset} is not a multiple of the alignment {alignment}")]
    Misaligned {
        /// Tensor name.
        name: String,
        /// Offset relative to the data section.
        offset: u64,
        /// The file's alignment.
        alignment: u64,
    },
    /// A tensor's data does not lie inside the file.
    #[error("tensor `{name}` data (bytes {start}..{end}) lies outside the file ({file_len} bytes)")]
    TensorOutOfBounds {
        /// Tensor name.
        name: String,
        /// Absolute start (saturated on overflow).
        start: u64,
        /// Absolute end (saturated on overflow).
        end: u64,
        /// File length.
        file_len: u64,
    },
    /// Two tensors' data ranges overlap.
    #[error("tensors `{first}` and `{second}` have overlapping data")]
    OverlappingTensors {
        /// The tensor whose data starts first.
        first: String,
        /// The tensor that starts inside it.
        second: String,
    },
    /// Two metadata entries have the same key.
    #[error("duplicate metadata key `{0}`")]
    DuplicateKey(String),
    /// Two tensors have the same name.
    #[error("duplicate tensor name `{0}`")]
    DuplicateTensor(String),
    /// A required metadata key is absent.
    #[error("missing metadata key `{0}`")]
    MissingKey(String),
    /// A metadata value has a type other than the one asked for.
    #[error("metadata key `{key}` is {found}, expected {expected}")]
    WrongType {
        /// The key.
        key: String,
        /// What was asked for.
        expected: &'static str,
        /// What the value is.
        found: &'static str,
    },
    /// An array mixes element types (GGUF arrays are homogeneous).
    #[error("metadata key `{key}`: array element {index} is {found}, but element 0 is {expected}")]
    MixedArray {
        /// The key.
        key: String,
        /// Index of the first element that differs.
        index: usize,
        /// Type of element 0.
        expected: &'static str,
        /// Type of the differing element.
        found: &'static str,
    },
    /// No tensor has this name.
    #[error("no tensor named `{0}`")]
    MissingTensor(String),
    /// A tensor name is too long for ggml (`GGML_MAX_NAME` = 64 bytes including the NUL).
    #[error("tensor name `{name}` is {len} bytes long, ggml allows at most 63")]
    NameTooLong {
        /// The name.
        name: String,
        /// Its length in bytes.
        len: usize,
    },
    /// A shape does not match the number of values given.
    #[error("tensor `{name}`: shape {shape:?} needs {expected} values, got {found}")]
    ShapeMismatch {
        /// Tensor name.
        name: String,
        /// Row-major shape.
        shape: Vec<usize>,
        /// Product of the shape (saturated on overflow).
        expected: u64,
        /// Values given.
        found: usize,
    },
    /// A value cannot be encoded in the target type (NaN or infinity in a quantized block, or a
    /// value or block scale beyond the range of f16/bf16).
    #[error("value {value} at index {index} cannot be encoded as {ty}: {reason}")]
    NotRepresentable {
        /// Target type.
        ty: GgmlType,
        /// Index of the offending value.
        index: usize,
        /// The value.
        value: f32,
        /// Why.
        reason: &'static str,
    },
    /// A size does not fit in this machine's `usize`.
    #[error("{what} ({value}) does not fit in memory on this platform")]
    TooLarge {
        /// What the size is.
        what: String,
        /// The size.
        value: u64,
    },
    /// Reading or writing a file failed.
    #[error("{}: {source}", .path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
}

impl GgufError {
    /// Prefixes the `what` of positional errors with `context` (e.g. the key being read).
    pub(crate) fn context(mut self, context: impl FnOnce() -> String) -> Self {
        match &mut self {
            GgufError::Truncated { what, .. }
            | GgufError::CountTooLarge { what, .. }
            | GgufError::InvalidUtf8 { what, .. }
            | GgufError::UnknownValueType { what, .. }
            | GgufError::InvalidBool { what, .. }
            | GgufError::NestingTooDeep { what, .. } => {
                *what = format!("{}: {what}", context());
            }
            _ => {}
        }
        self
    }
}

/// Result of this crate.
pub type Result<T, E = GgufError> = std::result::Result<T, E>;
