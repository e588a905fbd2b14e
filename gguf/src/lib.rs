//! GGUF files, the format llama.cpp reads and writes: a bounds-checked reader, a writer, and
//! the ggml block codecs.
//!
//! * [`GgufFile`]: parses a GGUF v2/v3 file (little-endian) held in memory and validates all of
//!   it up front: header, metadata values, tensor types, dims, sizes, alignment, and that every
//!   tensor's data lies inside the file without overlap. Metadata by key ([`GgufFile::get`],
//!   [`GgufFile::require_u64`], ...), tensor data raw ([`GgufFile::tensor_data`]) or decoded to
//!   a row-major f32 [`covey_tensors::HostTensor`] ([`GgufFile::tensor_f32`]).
//! * [`GgufWriter`]: builds a GGUF v3 file with llama.cpp's exact layout (aligned offsets,
//!   padding after the tensor infos and after every tensor), from f32 values it encodes or from
//!   raw encoded bytes.
//! * [`codec`]: `dequantize` / `quantize`, operation for operation as llama.cpp's reference code
//!   (`ggml-quants.c`), with the error bound of each quantizer documented and tested.
//!
//! # Quick start
//!
//! ```
//! use covey_gguf::{GgmlType, GgufFile, GgufWriter, Value};
//!
//! let mut w = GgufWriter::new();
//! w.add_metadata("general.architecture", "llama")?;
//! w.add_metadata("llama.block_count", 2u32)?;
//! w.add_metadata("tokenizer.ggml.tokens", vec!["<s>", "</s>", "hi"])?;
//! // A [2, 32] weight (row-major, [out, in]), stored as Q8_0; a [4] vector stored as F32.
//! let weight: Vec<f32> = (0..64).map(|i| i as f32 / 64.0 - 0.5).collect();
//! w.add_tensor_f32("blk.0.w", &[2, 32], &weight, GgmlType::Q8_0)?;
//! w.add_tensor_f32("blk.0.norm", &[4], &[1.0, 2.0, 3.0, 4.0], GgmlType::F32)?;
//! let bytes = w.to_bytes()?;
//!
//! let file = GgufFile::from_bytes(bytes)?;
//! assert_eq!(file.version, 3);
//! assert_eq!(file.architecture()?, "llama");
//! assert_eq!(file.require_u64("llama.block_count")?, 2);
//! assert_eq!(file.require_strings("tokenizer.ggml.tokens")?, ["<s>", "</s>", "hi"]);
//! assert_eq!(file.get("general.name"), None);
//!
//! let info = file.tensor_info("blk.0.w").expect("tensor");
//! assert_eq!((info.dims.as_slice(), info.ggml_type), (&[32u64, 2][..], GgmlType::Q8_0));
//! let w = file.tensor_f32("blk.0.w")?;
//! assert_eq!(w.shape, [2, 32]);
//! // Q8_0 keeps every value within d/2 + f16 rounding, d = 0.5/127 here.
//! assert!(w.data.iter().zip(&weight).all(|(a, b)| (a - b).abs() <= 0.5 / 127.0));
//! assert_eq!(file.tensor_f32("blk.0.norm")?.data, [1.0, 2.0, 3.0, 4.0]);
//! # Ok::<(), covey_gguf::GgufError>(())
//! ```
//!
//! # What is supported
//!
//! * Reading: GGUF versions 2 and 3, every metadata value type (arrays nested up to
//!   [`MAX_ARRAY_DEPTH`] deep), every ggml tensor type id ggml currently defines (including the
//!   i-quants; removed ids are rejected). Big-endian files are detected and refused.
//! * Decoding to f32: F32, F16, BF16, F64, I8–I64, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, the K-quants
//!   Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, Q8_K, and IQ4_NL, IQ4_XS. Not decoded (clear
//!   [`GgufError::UnsupportedType`]): the grid-based i-quants (IQ1_S, IQ1_M, IQ2_XXS, IQ2_XS,
//!   IQ2_S, IQ3_XXS, IQ3_S), TQ1_0, TQ2_0, MXFP4, NVFP4, Q1_0 and Q8_1. Their raw bytes are still
//!   available, and [`GgufWriter::add_tensor_raw`] / [`GgufWriter::from_file`] copy them.
//! * Encoding from f32: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 (not the K-quants, whose
//!   reference quantizers search for scales).
//!
//! # Robustness
//!
//! No input makes this crate panic, and no count read from a file makes it allocate more than
//! a small multiple of the file size: every length is checked against the bytes left before
//! anything is allocated, all size arithmetic is checked, and there is no `unsafe` (files are
//! read, not memory-mapped). The tests feed it every prefix of a valid file and thousands of
//! random mutations.
//!
//! # Why hand-written
//!
//! The `ggus` / `ggml-quants` crates exist, but `ggml-quants` has `todo!()` for the K-quants: a
//! panic on a hostile, or merely K-quantized, file, where this crate must return an error.
//! candle's GGUF reader would pull in a whole ML framework for a few hundred lines of parsing.

pub mod codec;
mod error;
mod reader;
mod types;
mod value;
mod writer;

pub use error::{GgufError, Result};
pub use reader::{GgufFile, TensorInfo};
pub use types::GgmlType;
pub use value::Value;
pub use writer::GgufWriter;

/// The four bytes every GGUF file starts with.
pub const GGUF_MAGIC: &[u8; 4] = b"GGUF";

/// Data alignment when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;

/// Most dimensions a ggml tensor has.
pub const MAX_DIMS: usize = 4;

/// Deepest nesting of metadata arrays read or written (llama.cpp itself reads no nested arrays).
pub const MAX_ARRAY_DEPTH: usize = 8;
