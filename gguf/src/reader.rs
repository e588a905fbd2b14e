//! Reading GGUF files: [`GgufFile`] and [`TensorInfo`].

use std::collections::HashSet;
use std::fmt;
use std::path::Path;

use covey_tensors::HostTensor;

use crate::value::type_id;
use crate::{DEFAULT_ALIGNMENT, GgmlType, GgufError, MAX_ARRAY_DEPTH, MAX_DIMS, Result, Value, codec};

/// The key that sets the data alignment.
pub(crate) const ALIGNMENT_KEY: &str = "general.alignment";

/// One tensor's entry in the tensor-info section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    /// Tensor name (`blk.0.attn_q.weight`).
    pub name: String,
    /// Dimensions in ggml order: `dims[0]` (`ne0`) is the innermost, contiguous one.
    pub dims: Vec<u64>,
    /// Element type.
    pub ggml_type: GgmlType,
    /// Byte offset of the data, relative to the start of the data section.
    pub offset: u64,
}

impl TensorInfo {
    /// Row-major shape: the dims reversed, so a weight with `ne0 = in`, `ne1 = out` has shape
    /// `[out, in]`. A 0-dimensional tensor has shape `[]` (one value).
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| usize::try_from(d).unwrap_or(usize::MAX)).collect()
    }

    /// Number of values (product of the dims; saturates at `u64::MAX`, which no tensor of a
    /// [`GgufFile`] reaches: the reader rejects overflowing dims).
    pub fn n_elements(&self) -> u64 {
        self.checked_n_elements().unwrap_or(u64::MAX)
    }

    /// Bytes of data (`u64::MAX` for inconsistent infos, which no tensor of a [`GgufFile`] has).
    pub fn n_bytes(&self) -> u64 {
        self.checked_n_elements().and_then(|n| self.ggml_type.bytes_for(n)).unwrap_or(u64::MAX)
    }

    fn checked_n_elements(&self) -> Option<u64> {
        self.dims.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d))
    }

    fn dims_overflow(&self) -> GgufError {
        GgufError::DimsOverflow { name: self.name.clone(), dims: self.dims.clone() }
    }

    /// Checks dims, block multiple and size; returns (element count, byte count).
    pub(crate) fn validate_size(&self) -> Result<(u64, u64)> {
        if self.dims.len() > MAX_DIMS {
            return Err(GgufError::TooManyDims { name: self.name.clone(), n_dims: self.dims.len() as u64 });
        }
        // ggml stores dims as int64_t; the element count must also fit in memory.
        if self.dims.iter().any(|&d| d > i64::MAX as u64 || usize::try_from(d).is_err()) {
            return Err(self.dims_overflow());
        }
        let n =
            self.checked_n_elements().filter(|&n| usize::try_from(n).is_ok()).ok_or_else(|| self.dims_overflow())?;
        let ty = self.ggml_type;
        let ne0 = self.dims.first().copied().unwrap_or(1);
        if !ne0.is_multiple_of(ty.block_size()) {
            return Err(GgufError::NotBlockMultiple {
                what: format!("tensor `{}` row length (ne0)", self.name),
                count: ne0,
                ty,
                block_size: ty.block_size(),
            });
        }
        let n_bytes = ty.bytes_for(n).ok_or_else(|| self.dims_overflow())?;
        Ok((n, n_bytes))
    }
}

/// A parsed GGUF file (version 2 or 3) that owns its bytes.
///
/// [`GgufFile::from_bytes`] validates everything up front: header, every metadata value,
/// every tensor's type, dims and size, alignment, and that every tensor's data lies inside the
/// file without overlapping another's. Tensor data is then sliced out of the owned bytes on
/// demand ([`GgufFile::tensor_data`]) or decoded to f32 ([`GgufFile::tensor_f32`]).
#[derive(Clone)]
pub struct GgufFile {
    /// Format version (2 or 3).
    pub version: u32,
    /// Metadata in file order. Keys are unique.
    pub metadata: Vec<(String, Value)>,
    /// Tensor infos in file order. Names are unique.
    pub tensors: Vec<TensorInfo>,
    alignment: u64,
    data_offset: u64,
    bytes: Vec<u8>,
}

impl fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GgufFile")
            .field("version", &self.version)
            .field("metadata_keys", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .field("alignment", &self.alignment)
            .field("data_offset", &self.data_offset)
            .field("file_len", &self.bytes.len())
            .finish()
    }
}

impl GgufFile {
    /// Reads and validates the file at `path` (read whole into memory).
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|source| GgufError::Io { path: path.to_path_buf(), source })?;
        Self::from_bytes(bytes)
    }

    /// Parses and validates a whole GGUF file. Never panics, and allocates at most in proportion
    /// to `bytes.len()` whatever the counts in the file claim.
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Self> {
        let Header { version, metadata, tensors, alignment, data_offset } = parse(&bytes)?;
        Ok(Self { version, metadata, tensors, alignment, data_offset, bytes })
    }

    /// The data alignment (`general.alignment`, default 32).
    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// Absolute byte offset of the data section.
    pub fn data_offset(&self) -> u64 {
        self.data_offset
    }

    /// The whole file.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Gives the file bytes back.
    pub fn into_bytes(self) -> Vec<u8> {
        self.bytes
    }

    /// The value of metadata key `key`.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// The value of `key`, or [`GgufError::MissingKey`].
    pub fn require(&self, key: &str) -> Result<&Value> {
        self.get(key).ok_or_else(|| GgufError::MissingKey(key.to_owned()))
    }

    fn require_as<'a, T>(
        &'a self,
        key: &str,
        expected: &'static str,
        convert: impl FnOnce(&'a Value) -> Option<T>,
    ) -> Result<T> {
        let value = self.require(key)?;
        convert(value).ok_or_else(|| GgufError::WrongType { key: key.to_owned(), expected, found: value.type_name() })
    }

    /// The string value of `key` (errors: missing key, not a string).
    pub fn require_str(&self, key: &str) -> Result<&str> {
        self.require_as(key, "a string", Value::as_str)
    }

    /// The value of `key` as u64: any unsigned integer type, or a non-negative signed one.
    pub fn require_u64(&self, key: &str) -> Result<u64> {
        self.require_as(key, "a non-negative integer", Value::as_u64)
    }

    /// The value of `key` as i64 (any integer type that fits).
    pub fn require_i64(&self, key: &str) -> Result<i64> {
        self.require_as(key, "an integer", Value::as_i64)
    }

    /// The value of `key` as f64 (any number type).
    pub fn require_f64(&self, key: &str) -> Result<f64> {
        self.require_as(key, "a number", Value::as_f64)
    }

    /// The bool value of `key`.
    pub fn require_bool(&self, key: &str) -> Result<bool> {
        self.require_as(key, "a bool", Value::as_bool)
    }

    /// The elements of array `key`.
    pub fn require_array(&self, key: &str) -> Result<&[Value]> {
        self.require_as(key, "an array", Value::as_array)
    }

    /// The strings of string array `key` (e.g. `tokenizer.ggml.tokens`).
    pub fn require_strings(&self, key: &str) -> Result<Vec<&str>> {
        self.require_as(key, "an array of strings", Value::strings)
    }

    /// `general.architecture` (`"llama"`, `"qwen2"`, ...).
    pub fn architecture(&self) -> Result<&str> {
        self.require_str("general.architecture")
    }

    /// The info of tensor `name`.
    pub fn tensor_info(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The raw data of a tensor of this file. An info that does not describe data inside this
    /// file (one built or edited by hand) gives an empty slice; [`GgufFile::tensor_bytes`]
    /// reports it as an error instead.
    pub fn tensor_data(&self, info: &TensorInfo) -> &[u8] {
        self.checked_data(info).unwrap_or_default()
    }

    /// The raw data of tensor `name`.
    pub fn tensor_bytes(&self, name: &str) -> Result<&[u8]> {
        let info = self.tensor_info(name).ok_or_else(|| GgufError::MissingTensor(name.to_owned()))?;
        self.checked_data(info)
    }

    fn checked_data(&self, info: &TensorInfo) -> Result<&[u8]> {
        let (_, n_bytes) = info.validate_size()?;
        let file_len = self.bytes.len() as u64;
        let start = self.data_offset.checked_add(info.offset);
        let end = start.and_then(|s| s.checked_add(n_bytes));
        let slice = match (start, end) {
            (Some(s), Some(e)) => {
                usize::try_from(s).ok().zip(usize::try_from(e).ok()).and_then(|(s, e)| self.bytes.get(s..e))
            }
            _ => None,
        };
        slice.ok_or_else(|| GgufError::TensorOutOfBounds {
            name: info.name.clone(),
            start: start.unwrap_or(u64::MAX),
            end: end.unwrap_or(u64::MAX),
            file_len,
        })
    }

    /// Tensor `name` decoded to f32, row-major, with shape [`TensorInfo::shape`].
    ///
    /// Errors: no such tensor, or a type this crate cannot decode (see [`codec`]).
    pub fn tensor_f32(&self, name: &str) -> Result<HostTensor> {
        let info = self.tensor_info(name).ok_or_else(|| GgufError::MissingTensor(name.to_owned()))?;
        let (n, _) = info.validate_size()?;
        let n = usize::try_from(n).map_err(|_| info.dims_overflow())?;
        let data = codec::dequantize(info.ggml_type, self.checked_data(info)?, n)?;
        Ok(HostTensor { shape: info.shape(), data })
    }
}

/// Everything [`parse`] finds.
struct Header {
    version: u32,
    metadata: Vec<(String, Value)>,
    tensors: Vec<TensorInfo>,
    alignment: u64,
    data_offset: u64,
}

/// A bounds-checked little-endian reader over the file bytes.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn remaining(&self) -> usize {
        self.buf.len().saturating_sub(self.pos)
    }

    fn offset(&self) -> u64 {
        self.pos as u64
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        let slice = self.pos.checked_add(n).and_then(|end| self.buf.get(self.pos..end));
        match slice {
            Some(s) => {
                self.pos += s.len();
                Ok(s)
            }
            None => Err(GgufError::Truncated {
                what: what.to_owned(),
                offset: self.offset(),
                needed: n as u64,
                available: self.remaining() as u64,
            }),
        }
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        let offset = self.offset();
        let available = self.remaining() as u64;
        self.take(N, what)?.first_chunk::<N>().copied().ok_or_else(|| GgufError::Truncated {
            what: what.to_owned(),
            offset,
            needed: N as u64,
            available,
        })
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        self.array(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        self.array(what).map(u64::from_le_bytes)
    }

    /// Checks that `count` items of at least `min_size` bytes each can fit in the rest of the
    /// file, before anything is allocated for them; returns `count` as usize.
    fn fits(&self, count: u64, min_size: u64, count_offset: u64, what: &str) -> Result<usize> {
        let remaining = self.remaining() as u64;
        match count.checked_mul(min_size) {
            Some(total) if total <= remaining => {
                usize::try_from(count).map_err(|_| GgufError::TooLarge { what: format!("{what} count"), value: count })
            }
            _ => Err(GgufError::CountTooLarge { what: what.to_owned(), count, offset: count_offset, remaining }),
        }
    }

    fn string(&mut self, what: &str) -> Result<String> {
        let len_offset = self.offset();
        let len = self.u64(what)?;
        let len = self.fits(len, 1, len_offset, &format!("{what} length"))?;
        let start = self.offset();
        let bytes = self.take(len, what)?;
        std::str::from_utf8(bytes)
            .map(str::to_owned)
            .map_err(|_| GgufError::InvalidUtf8 { what: what.to_owned(), offset: start })
    }

    fn bool(&mut self, what: &str) -> Result<bool> {
        let offset = self.offset();
        let [raw] = self.array::<1>(what)?;
        parse_bool(raw, offset, what)
    }

    /// A value of GGUF type `ty` (whose id was read at `ty_offset`).
    fn value(&mut self, ty: u32, ty_offset: u64, depth: usize) -> Result<Value> {
        const WHAT: &str = "value";
        Ok(match ty {
            type_id::U8 => Value::U8(u8::from_le_bytes(self.array(WHAT)?)),
            type_id::I8 => Value::I8(i8::from_le_bytes(self.array(WHAT)?)),
            type_id::U16 => Value::U16(u16::from_le_bytes(self.array(WHAT)?)),
            type_id::I16 => Value::I16(i16::from_le_bytes(self.array(WHAT)?)),
            type_id::U32 => Value::U32(u32::from_le_bytes(self.array(WHAT)?)),
            type_id::I32 => Value::I32(i32::from_le_bytes(self.array(WHAT)?)),
            type_id::U64 => Value::U64(u64::from_le_bytes(self.array(WHAT)?)),
            type_id::I64 => Value::I64(i64::from_le_bytes(self.array(WHAT)?)),
            type_id::F32 => Value::F32(f32::from_le_bytes(self.array(WHAT)?)),
            type_id::F64 => Value::F64(f64::from_le_bytes(self.array(WHAT)?)),
            type_id::BOOL => Value::Bool(self.bool(WHAT)?),
            type_id::STRING => Value::String(self.string("string value")?),
            type_id::ARRAY => self.array_value(depth)?,
            raw => return Err(GgufError::UnknownValueType { what: "value type".into(), raw, offset: ty_offset }),
        })
    }

    /// An array value (element type, count, elements), nested at most [`MAX_ARRAY_DEPTH`] deep.
    fn array_value(&mut self, depth: usize) -> Result<Value> {
        if depth >= MAX_ARRAY_DEPTH {
            return Err(GgufError::NestingTooDeep { what: "array".into(), max: MAX_ARRAY_DEPTH });
        }
        let ty_offset = self.offset();
        let elem = self.u32("array element type")?;
        let count_offset = self.offset();
        let count = self.u64("array count")?;
        let min_size = min_encoded_size(elem).ok_or(GgufError::UnknownValueType {
            what: "array element type".into(),
            raw: elem,
            offset: ty_offset,
        })?;
        let n = self.fits(count, min_size, count_offset, "array element")?;
        let items = match elem {
            type_id::U8 => self.fixed(n, |b: [u8; 1]| Value::U8(b[0]))?,
            type_id::I8 => self.fixed(n, |b| Value::I8(i8::from_le_bytes(b)))?,
            type_id::U16 => self.fixed(n, |b| Value::U16(u16::from_le_bytes(b)))?,
            type_id::I16 => self.fixed(n, |b| Value::I16(i16::from_le_bytes(b)))?,
            type_id::U32 => self.fixed(n, |b| Value::U32(u32::from_le_bytes(b)))?,
            type_id::I32 => self.fixed(n, |b| Value::I32(i32::from_le_bytes(b)))?,
            type_id::U64 => self.fixed(n, |b| Value::U64(u64::from_le_bytes(b)))?,
            type_id::I64 => self.fixed(n, |b| Value::I64(i64::from_le_bytes(b)))?,
            type_id::F32 => self.fixed(n, |b| Value::F32(f32::from_le_bytes(b)))?,
            type_id::F64 => self.fixed(n, |b| Value::F64(f64::from_le_bytes(b)))?,
            type_id::BOOL => {
                let start = self.offset();
                let bytes = self.take(n, "array elements")?;
                bytes
                    .iter()
                    .zip(start..)
                    .map(|(&b, offset)| parse_bool(b, offset, "array element").map(Value::Bool))
                    .collect::<Result<_>>()?
            }
            type_id::STRING => {
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(Value::String(self.string("array string")?));
                }
                items
            }
            _ => {
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.array_value(depth + 1)?);
                }
                items
            }
        };
        Ok(Value::Array(items))
    }

    /// `n` fixed-size elements (the caller checked that they fit).
    fn fixed<const N: usize>(&mut self, n: usize, make: impl Fn([u8; N]) -> Value) -> Result<Vec<Value>> {
        let len = n.checked_mul(N).ok_or_else(|| GgufError::TooLarge { what: "array".into(), value: n as u64 })?;
        let bytes = self.take(len, "array elements")?;
        Ok(bytes.as_chunks::<N>().0.iter().map(|&b| make(b)).collect())
    }
}

fn parse_bool(raw: u8, offset: u64, what: &str) -> Result<bool> {
    match raw {
        0 => Ok(false),
        1 => Ok(true),
        _ => Err(GgufError::InvalidBool { what: what.to_owned(), raw, offset }),
    }
}

/// The fewest bytes a value of GGUF type `ty` takes (`None` for unknown types).
fn min_encoded_size(ty: u32) -> Option<u64> {
    Some(match ty {
        type_id::U8 | type_id::I8 | type_id::BOOL => 1,
        type_id::U16 | type_id::I16 => 2,
        type_id::U32 | type_id::I32 | type_id::F32 => 4,
        type_id::U64 | type_id::I64 | type_id::F64 => 8,
        type_id::STRING => 8,
        type_id::ARRAY => 12,
        _ => return None,
    })
}

/// `value` rounded up to a multiple of `alignment` (a power of two).
pub(crate) fn align_up(value: u64, alignment: u64) -> Option<u64> {
    let mask = alignment.checked_sub(1)?;
    value.checked_add(mask).map(|v| v & !mask)
}

/// Checks a `general.alignment` value as llama.cpp and gguf-py do: a u32, non-zero power of two.
pub(crate) fn alignment_of(value: &Value) -> Result<u64> {
    match *value {
        Value::U32(a) if a.is_power_of_two() => Ok(a.into()),
        Value::U32(a) => Err(GgufError::BadAlignment { alignment: a.into() }),
        ref other => {
            Err(GgufError::WrongType { key: ALIGNMENT_KEY.to_owned(), expected: "u32", found: other.type_name() })
        }
    }
}

fn parse(buf: &[u8]) -> Result<Header> {
    let mut c = Cursor { buf, pos: 0 };
    let magic = c.array::<4>("magic")?;
    if &magic != crate::GGUF_MAGIC {
        return Err(GgufError::BadMagic { found: magic });
    }
    let version = c.u32("version")?;
    match version {
        2 | 3 => {}
        v if v & 0xFFFF == 0 && (1..=3).contains(&v.swap_bytes()) => return Err(GgufError::BigEndian { raw: v }),
        v => return Err(GgufError::UnsupportedVersion { version: v }),
    }
    let tensor_count_offset = c.offset();
    let tensor_count = c.u64("tensor count")?;
    let kv_count_offset = c.offset();
    let kv_count = c.u64("metadata entry count")?;
    // Smallest encodings: a tensor info is an empty name (8) + n_dims (4) + type (4) + offset (8);
    // a metadata entry is an empty key (8) + type (4) + a one-byte value.
    let n_tensors = c.fits(tensor_count, 24, tensor_count_offset, "tensor")?;
    let n_kv = c.fits(kv_count, 13, kv_count_offset, "metadata entry")?;

    let mut metadata = Vec::with_capacity(n_kv);
    let mut keys = HashSet::with_capacity(n_kv);
    for index in 0..n_kv {
        let key = c.string("metadata key").map_err(|e| e.context(|| format!("metadata entry {index}")))?;
        let ty_offset = c.offset();
        let value = c
            .u32("value type")
            .and_then(|ty| c.value(ty, ty_offset, 0))
            .map_err(|e| e.context(|| format!("metadata key `{key}`")))?;
        if !keys.insert(key.clone()) {
            return Err(GgufError::DuplicateKey(key));
        }
        metadata.push((key, value));
    }
    let alignment = match metadata.iter().find(|(k, _)| k == ALIGNMENT_KEY) {
        Some((_, v)) => alignment_of(v)?,
        None => DEFAULT_ALIGNMENT,
    };

    let mut tensors = Vec::with_capacity(n_tensors);
    let mut names = HashSet::with_capacity(n_tensors);
    for index in 0..n_tensors {
        let name = c.string("tensor name").map_err(|e| e.context(|| format!("tensor info {index}")))?;
        let info = read_tensor_info(&mut c, name).map_err(|e| e.context(|| format!("tensor info {index}")))?;
        if !names.insert(info.name.clone()) {
            return Err(GgufError::DuplicateTensor(info.name));
        }
        tensors.push(info);
    }

    let data_offset = align_up(c.offset(), alignment)
        .ok_or(GgufError::TooLarge { what: "data section offset".into(), value: c.offset() })?;
    validate_tensors(&tensors, data_offset, alignment, buf.len() as u64)?;
    Ok(Header { version, metadata, tensors, alignment, data_offset })
}

/// The rest of a tensor info after its name.
fn read_tensor_info(c: &mut Cursor<'_>, name: String) -> Result<TensorInfo> {
    let n_dims = c.u32("dimension count")?;
    if n_dims as usize > MAX_DIMS {
        return Err(GgufError::TooManyDims { name, n_dims: n_dims.into() });
    }
    let mut dims = Vec::with_capacity(MAX_DIMS);
    for _ in 0..n_dims {
        dims.push(c.u64("dimension")?);
    }
    let raw = c.u32("tensor type")?;
    let ggml_type =
        GgmlType::from_u32(raw).map_err(|_| GgufError::UnknownTensorType { raw, tensor: Some(name.clone()) })?;
    let offset = c.u64("tensor data offset")?;
    Ok(TensorInfo { name, dims, ggml_type, offset })
}

/// Sizes, alignment, bounds and overlap of every tensor's data.
fn validate_tensors(tensors: &[TensorInfo], data_offset: u64, alignment: u64, file_len: u64) -> Result<()> {
    let mut ranges = Vec::with_capacity(tensors.len());
    for (index, t) in tensors.iter().enumerate() {
        let (_, n_bytes) = t.validate_size()?;
        if !t.offset.is_multiple_of(alignment) {
            return Err(GgufError::Misaligned { name: t.name.clone(), offset: t.offset, alignment });
        }
        let start = data_offset.checked_add(t.offset);
        let end = start.and_then(|s| s.checked_add(n_bytes));
        match (start, end) {
            (Some(start), Some(end)) if end <= file_len => {
                if end > start {
                    ranges.push((start, end, index));
                }
            }
            _ => {
                return Err(GgufError::TensorOutOfBounds {
                    name: t.name.clone(),
                    start: start.unwrap_or(u64::MAX),
                    end: end.unwrap_or(u64::MAX),
                    file_len,
                });
            }
        }
    }
    ranges.sort_unstable();
    let mut previous: Option<(u64, usize)> = None; // (end, index) of the range reaching furthest
    for (start, end, index) in ranges {
        if let Some((prev_end, prev_index)) = previous
            && start < prev_end
        {
            let name = |i: usize| tensors.get(i).map(|t| t.name.clone()).unwrap_or_default();
            return Err(GgufError::OverlappingTensors { first: name(prev_index), second: name(index) });
        }
        previous = Some((end, index));
    }
    Ok(())
}
