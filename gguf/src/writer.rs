//! Writing GGUF v3 files: [`GgufWriter`].

use std::collections::HashSet;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use crate::reader::{ALIGNMENT_KEY, align_up, alignment_of};
use crate::value::type_id;
use crate::{DEFAULT_ALIGNMENT, GgmlType, GgufError, GgufFile, MAX_ARRAY_DEPTH, MAX_DIMS, Result, Value, codec};

/// ggml's `GGML_MAX_NAME`: tensor names must be shorter (they are NUL-terminated there).
const GGML_MAX_NAME: usize = 64;

/// One tensor waiting to be written.
#[derive(Debug, Clone)]
struct PendingTensor {
    name: String,
    dims: Vec<u64>,
    ggml_type: GgmlType,
    data: Vec<u8>,
}

/// Builds a GGUF v3 file that llama.cpp and gguf-py load.
///
/// Layout, as llama.cpp's `gguf_write_to_buf`: header, metadata in insertion order, tensor
/// infos in insertion order, zero padding to the alignment, then each tensor's data followed by
/// zero padding to the alignment. Tensor offsets are therefore multiples of the alignment and
/// exactly the running sum of the padded sizes, which is what llama.cpp checks. The alignment is
/// 32 unless `general.alignment` (a u32 power of two) is added.
///
/// Everything is checked when added (duplicate keys and names, homogeneous arrays, names
/// shorter than 64 bytes, dims, block multiples, byte lengths), so the file is valid.
#[derive(Debug, Clone)]
pub struct GgufWriter {
    metadata: Vec<(String, Value)>,
    tensors: Vec<PendingTensor>,
    names: HashSet<String>,
    alignment: u64,
}

impl Default for GgufWriter {
    fn default() -> Self {
        Self::new()
    }
}

impl GgufWriter {
    /// An empty file: no metadata, no tensors, alignment 32.
    pub fn new() -> Self {
        Self { metadata: Vec::new(), tensors: Vec::new(), names: HashSet::new(), alignment: DEFAULT_ALIGNMENT }
    }

    /// A writer holding a copy of `file`'s metadata and tensors (raw, not re-encoded), to edit and
    /// write back out.
    pub fn from_file(file: &GgufFile) -> Result<Self> {
        let mut writer = Self::new();
        for (key, value) in &file.metadata {
            writer.add_metadata(key.clone(), value.clone())?;
        }
        for info in &file.tensors {
            writer.add_tensor_raw(
                info.name.clone(),
                &info.dims,
                info.ggml_type,
                file.tensor_bytes(&info.name)?.to_vec(),
            )?;
        }
        Ok(writer)
    }

    /// The alignment the file will use.
    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// Metadata added so far, in order.
    pub fn metadata(&self) -> &[(String, Value)] {
        &self.metadata
    }

    /// Adds a metadata entry. `value` can be any [`Value`] or anything convertible to one:
    /// `"llama"`, `30u32`, `1e-5f32`, `true`, `vec!["a", "b"]` (array of strings),
    /// `vec![1i32, 2]` (array of i32).
    ///
    /// Errors: a key already added, an array whose elements differ in type, arrays nested deeper
    /// than [`MAX_ARRAY_DEPTH`], and a `general.alignment` that is not a u32 power of two.
    /// An empty array is written with element type string.
    pub fn add_metadata(&mut self, key: impl Into<String>, value: impl Into<Value>) -> Result<()> {
        let key = key.into();
        if self.metadata.iter().any(|(k, _)| *k == key) {
            return Err(GgufError::DuplicateKey(key));
        }
        let value = value.into();
        self.check_entry(&key, &value)?;
        self.metadata.push((key, value));
        Ok(())
    }

    /// Adds a metadata entry, or replaces the value of an existing key in place.
    pub fn set_metadata(&mut self, key: impl Into<String>, value: impl Into<Value>) -> Result<()> {
        let key = key.into();
        let value = value.into();
        self.check_entry(&key, &value)?;
        match self.metadata.iter_mut().find(|(k, _)| *k == key) {
            Some((_, slot)) => *slot = value,
            None => self.metadata.push((key, value)),
        }
        Ok(())
    }

    fn check_entry(&mut self, key: &str, value: &Value) -> Result<()> {
        check_value(key, value, 0)?;
        if key == ALIGNMENT_KEY {
            self.alignment = alignment_of(value)?;
        }
        Ok(())
    }

    fn check_name(&self, name: &str) -> Result<()> {
        if name.len() >= GGML_MAX_NAME {
            return Err(GgufError::NameTooLong { name: name.to_owned(), len: name.len() });
        }
        if self.names.contains(name) {
            return Err(GgufError::DuplicateTensor(name.to_owned()));
        }
        Ok(())
    }

    /// Adds a tensor from row-major f32 values, encoded as `ty` with [`codec::quantize`]
    /// (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1). `shape` is row-major (`[out, in]` for a
    /// weight); it is stored reversed, as ggml dims. The innermost dimension (`shape.last()`,
    /// ggml's `ne0`) must be a multiple of the type's block size, as ggml requires of every row.
    pub fn add_tensor_f32(
        &mut self,
        name: impl Into<String>,
        shape: &[usize],
        values: &[f32],
        ty: GgmlType,
    ) -> Result<()> {
        let name = name.into();
        self.check_name(&name)?;
        if !ty.can_quantize() {
            return Err(GgufError::UnsupportedType { ty, op: "quantizing to" });
        }
        let dims: Vec<u64> = shape.iter().rev().map(|&d| d as u64).collect();
        if dims.len() > MAX_DIMS {
            return Err(GgufError::TooManyDims { name, n_dims: dims.len() as u64 });
        }
        let Some(expected) = dims.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d)) else {
            return Err(GgufError::DimsOverflow { name, dims });
        };
        if expected != values.len() as u64 {
            return Err(GgufError::ShapeMismatch { name, shape: shape.to_vec(), expected, found: values.len() });
        }
        let ne0 = dims.first().copied().unwrap_or(1);
        if !ne0.is_multiple_of(ty.block_size()) {
            return Err(GgufError::NotBlockMultiple {
                what: format!("tensor `{name}` innermost dimension"),
                count: ne0,
                ty,
                block_size: ty.block_size(),
            });
        }
        let data = codec::quantize(ty, values)?;
        self.push(PendingTensor { name, dims, ggml_type: ty, data });
        Ok(())
    }

    /// Adds a tensor from already-encoded bytes. `dims` are in ggml order (`ne0` first), and
    /// `bytes` must be exactly the size they imply for `ty` (any known type, quantized or not).
    pub fn add_tensor_raw(
        &mut self,
        name: impl Into<String>,
        dims: &[u64],
        ty: GgmlType,
        bytes: Vec<u8>,
    ) -> Result<()> {
        let name = name.into();
        self.check_name(&name)?;
        let info = crate::TensorInfo { name, dims: dims.to_vec(), ggml_type: ty, offset: 0 };
        let (_, expected) = info.validate_size()?;
        if expected != bytes.len() as u64 {
            return Err(GgufError::ByteLength {
                what: format!("tensor `{}` ({ty}, dims {dims:?})", info.name),
                expected,
                found: bytes.len() as u64,
            });
        }
        self.push(PendingTensor { name: info.name, dims: info.dims, ggml_type: ty, data: bytes });
        Ok(())
    }

    fn push(&mut self, tensor: PendingTensor) {
        self.names.insert(tensor.name.clone());
        self.tensors.push(tensor);
    }

    /// The whole file.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let mut out = Vec::with_capacity(self.data_len()?.saturating_add(1 << 16));
        self.write_to(&mut out).map_err(|source| GgufError::Io { path: PathBuf::from("<memory>"), source })?;
        Ok(out)
    }

    /// Writes the file to `path` (created or truncated).
    pub fn write(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let io_err = |source| GgufError::Io { path: path.to_path_buf(), source };
        let file = std::fs::File::create(path).map_err(io_err)?;
        let mut w = io::BufWriter::new(file);
        self.write_to(&mut w).map_err(io_err)?;
        w.into_inner().map_err(|e| io_err(e.into_error()))?.sync_all().map_err(io_err)
    }

    /// Size of the data section (padded).
    fn data_len(&self) -> Result<usize> {
        let mut total = 0u64;
        for t in &self.tensors {
            total =
                self.padded(t.data.len() as u64).and_then(|p| total.checked_add(p)).ok_or_else(|| self.too_large())?;
        }
        usize::try_from(total).map_err(|_| self.too_large())
    }

    fn padded(&self, len: u64) -> Option<u64> {
        align_up(len, self.alignment)
    }

    fn too_large(&self) -> GgufError {
        GgufError::TooLarge { what: "GGUF data section".into(), value: u64::MAX }
    }

    /// Streams the file to `w`.
    fn write_to(&self, w: &mut impl Write) -> io::Result<()> {
        let mut header = Vec::new();
        header.extend_from_slice(crate::GGUF_MAGIC);
        header.extend_from_slice(&3u32.to_le_bytes());
        header.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        header.extend_from_slice(&(self.metadata.len() as u64).to_le_bytes());
        for (key, value) in &self.metadata {
            put_string(&mut header, key);
            header.extend_from_slice(&value.type_id().to_le_bytes());
            put_value(&mut header, value);
        }
        let mut offset = 0u64;
        for t in &self.tensors {
            put_string(&mut header, &t.name);
            header.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                header.extend_from_slice(&d.to_le_bytes());
            }
            header.extend_from_slice(&t.ggml_type.id().to_le_bytes());
            header.extend_from_slice(&offset.to_le_bytes());
            offset = self
                .padded(t.data.len() as u64)
                .and_then(|p| offset.checked_add(p))
                .ok_or_else(|| io::Error::other("GGUF data section size overflows u64"))?;
        }
        w.write_all(&header)?;
        let zeros = vec![0u8; usize::try_from(self.alignment).unwrap_or(0)];
        self.pad(w, header.len(), &zeros)?;
        for t in &self.tensors {
            w.write_all(&t.data)?;
            self.pad(w, t.data.len(), &zeros)?;
        }
        w.flush()
    }

    /// Writes the zeros that take `len` bytes to the next multiple of the alignment.
    fn pad(&self, w: &mut impl Write, len: usize, zeros: &[u8]) -> io::Result<()> {
        let rem = usize::try_from(len as u64 % self.alignment).unwrap_or(0);
        if rem == 0 {
            return Ok(());
        }
        let n = zeros.len().saturating_sub(rem);
        w.write_all(zeros.get(..n).unwrap_or_default())
    }
}

fn put_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// A value's payload (without its type id).
fn put_value(out: &mut Vec<u8>, value: &Value) {
    match value {
        Value::U8(v) => out.push(*v),
        Value::I8(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::U16(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::I16(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::U32(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::I32(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::U64(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::I64(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::F32(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::F64(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::Bool(v) => out.push(u8::from(*v)),
        Value::String(s) => put_string(out, s),
        Value::Array(items) => {
            let elem = items.first().map_or(type_id::STRING, Value::type_id);
            out.extend_from_slice(&elem.to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for item in items {
                put_value(out, item);
            }
        }
    }
}

/// Arrays must be homogeneous and nested at most [`MAX_ARRAY_DEPTH`] deep (what the reader
/// accepts).
fn check_value(key: &str, value: &Value, depth: usize) -> Result<()> {
    let Value::Array(items) = value else { return Ok(()) };
    if depth >= MAX_ARRAY_DEPTH {
        return Err(GgufError::NestingTooDeep { what: format!("metadata key `{key}`"), max: MAX_ARRAY_DEPTH });
    }
    let Some(first) = items.first() else { return Ok(()) };
    for (index, item) in items.iter().enumerate() {
        if item.type_id() != first.type_id() {
            return Err(GgufError::MixedArray {
                key: key.to_owned(),
                index,
                expected: first.type_name(),
                found: item.type_name(),
            });
        }
        check_value(key, item, depth + 1)?;
    }
    Ok(())
}
