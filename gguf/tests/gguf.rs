//! File-level tests: writer → reader round trips, llama.cpp layout, hostile input (truncation,
//! patched fields, seeded mutation fuzzing), and the real SmolLM2 GGUF when it is present.

use std::path::Path;

use covey_gguf::{GgmlType, GgufError, GgufFile, GgufWriter, Value, codec};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

/// A Q4_K block with f16 d = 0.0078125, dmin = 0.001953125 and patterned scales and quants.
fn q4_k_block() -> Vec<u8> {
    let mut b: Vec<u8> = (0..144u32).map(|i| (i * 73 + 41) as u8).collect();
    b[0..4].copy_from_slice(&[0x00, 0x20, 0x00, 0x18]);
    b
}

/// A small file with metadata of several types and tensors of several types. The last tensor is
/// 32 bytes (a multiple of the alignment), so the file ends exactly where its data ends.
fn sample_writer() -> GgufWriter {
    let mut w = GgufWriter::new();
    w.add_metadata("general.architecture", "llama").expect("arch");
    w.add_metadata("llama.block_count", 2u32).expect("u32");
    w.add_metadata("general.flag", true).expect("bool");
    w.add_metadata("llama.rope.freq_base", 10000f32).expect("f32");
    w.add_metadata("tokenizer.ggml.tokens", vec!["<s>", "</s>", "a", "b"]).expect("strings");
    w.add_metadata("tokenizer.ggml.token_type", vec![3i32, 3, 1, 1]).expect("i32s");
    w.add_metadata("x.nested", Value::Array(vec![Value::from(vec![1u8, 2]), Value::from(vec![3u8])])).expect("nested");
    w.add_tensor_f32("w.q8", &[2, 64], &values(128, 1), GgmlType::Q8_0).expect("q8_0");
    w.add_tensor_f32("w.q41", &[2, 32], &values(64, 2), GgmlType::Q4_1).expect("q4_1");
    w.add_tensor_raw("w.q4k", &[256], GgmlType::Q4K, q4_k_block()).expect("q4_k");
    w.add_tensor_f32("w.f16", &[3, 1], &[0.5, -1.0, 2.0], GgmlType::F16).expect("f16");
    w.add_tensor_f32("norm", &[8], &values(8, 3), GgmlType::F32).expect("f32");
    w
}

fn sample() -> Vec<u8> {
    sample_writer().to_bytes().expect("to_bytes")
}

fn find(haystack: &[u8], needle: &[u8]) -> usize {
    haystack.windows(needle.len()).position(|w| w == needle).expect("needle in file")
}

/// Position of the u64 length prefix of GGUF string `s`.
fn string_at(bytes: &[u8], s: &str) -> usize {
    let mut needle = (s.len() as u64).to_le_bytes().to_vec();
    needle.extend_from_slice(s.as_bytes());
    find(bytes, &needle)
}

/// Where the fields of tensor info `name` are: (n_dims, first dim, type, offset).
fn tensor_fields(bytes: &[u8], name: &str) -> (usize, usize, usize, usize) {
    let n_dims_at = string_at(bytes, name) + 8 + name.len();
    let n_dims = u32::from_le_bytes(bytes[n_dims_at..n_dims_at + 4].try_into().expect("u32")) as usize;
    let type_at = n_dims_at + 4 + 8 * n_dims;
    (n_dims_at, n_dims_at + 4, type_at, type_at + 4)
}

fn patch(bytes: &mut [u8], at: usize, value: &[u8]) {
    bytes[at..at + value.len()].copy_from_slice(value);
}

fn parse_err(bytes: Vec<u8>) -> GgufError {
    let err = GgufFile::from_bytes(bytes).expect_err("invalid file");
    assert!(!err.to_string().is_empty());
    err
}

#[test]
fn metadata_of_every_value_type_round_trips() {
    let entries: Vec<(&str, Value)> = vec![
        ("t.u8", Value::U8(200)),
        ("t.i8", Value::I8(-100)),
        ("t.u16", Value::U16(65000)),
        ("t.i16", Value::I16(-32000)),
        ("t.u32", Value::U32(4_000_000_000)),
        ("t.i32", Value::I32(-2_000_000_000)),
        ("t.u64", Value::U64(u64::MAX)),
        ("t.i64", Value::I64(i64::MIN)),
        ("t.f32", Value::F32(1e-5)),
        ("t.f64", Value::F64(std::f64::consts::PI)),
        ("t.bool_true", Value::Bool(true)),
        ("t.bool_false", Value::Bool(false)),
        ("t.string", Value::from("héllo {{ chat }} \u{1F600}")),
        ("t.empty_string", Value::from("")),
        ("t.strings", Value::from(vec!["Ġ t", "Ġ a", ""])),
        ("t.i32s", Value::from(vec![1i32, -2, 3])),
        ("t.u8s", Value::from(vec![0u8, 255])),
        ("t.i8s", Value::from(vec![-1i8, 1])),
        ("t.u16s", Value::from(vec![1u16, 2])),
        ("t.i16s", Value::from(vec![-1i16, 2])),
        ("t.u32s", Value::from(vec![7u32])),
        ("t.u64s", Value::from(vec![u64::MAX, 0])),
        ("t.i64s", Value::from(vec![i64::MIN, 5])),
        ("t.f32s", Value::from(vec![0.5f32, -0.25])),
        ("t.f64s", Value::from(vec![1e300f64])),
        ("t.bools", Value::from(vec![true, false, true])),
        ("t.empty", Value::Array(vec![])),
        ("t.nested", Value::Array(vec![Value::from(vec!["a"]), Value::from(vec![1u64, 2])])),
    ];
    let mut w = GgufWriter::new();
    for (k, v) in &entries {
        w.add_metadata(*k, v.clone()).expect("add");
    }
    let file = GgufFile::from_bytes(w.to_bytes().expect("bytes")).expect("parse");
    assert_eq!(file.version, 3);
    assert!(file.tensors.is_empty());
    let got: Vec<(&str, &Value)> = file.metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let want: Vec<(&str, &Value)> = entries.iter().map(|(k, v)| (*k, v)).collect();
    assert_eq!(got, want, "order and values are kept");
    assert_eq!(file.require_u64("t.u32").expect("u64"), 4_000_000_000);
    assert_eq!(file.require_i64("t.i8").expect("i64"), -100);
    assert_eq!(file.require_f64("t.f32").expect("f64"), f64::from(1e-5f32));
    assert!(file.require_bool("t.bool_true").expect("bool"));
    assert_eq!(file.require_strings("t.strings").expect("strings"), ["Ġ t", "Ġ a", ""]);
    assert_eq!(file.require_array("t.i32s").expect("array").len(), 3);
    assert_eq!(file.get("t.i32s").and_then(Value::i64s), Some(vec![1, -2, 3]));
}

#[test]
fn require_errors_name_the_key() {
    let file = GgufFile::from_bytes(sample()).expect("parse");
    let err = file.require_u64("llama.context_length").expect_err("missing");
    assert_eq!(err.to_string(), "missing metadata key `llama.context_length`");
    let err = file.require_u64("general.architecture").expect_err("wrong type");
    assert_eq!(err.to_string(), "metadata key `general.architecture` is string, expected a non-negative integer");
    assert!(matches!(file.require_str("llama.block_count"), Err(GgufError::WrongType { .. })));
    assert!(matches!(file.tensor_f32("nope"), Err(GgufError::MissingTensor(n)) if n == "nope"));
}

#[test]
fn tensors_of_every_writable_type_round_trip() {
    let types = [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::BF16,
        GgmlType::Q8_0,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
    ];
    let mut w = GgufWriter::new();
    let mut expected = Vec::new();
    for (i, ty) in types.into_iter().enumerate() {
        let x = values(3 * 64, 10 + i as u64);
        let name = format!("t.{ty}");
        w.add_tensor_f32(name.clone(), &[3, 64], &x, ty).expect("add");
        let bytes = codec::quantize(ty, &x).expect("quantize");
        expected.push((name, ty, bytes.clone(), codec::dequantize(ty, &bytes, x.len()).expect("dequantize")));
    }
    // Other shapes: a scalar, a 4-D tensor, an empty one; raw K-quant and i-quant data.
    w.add_tensor_f32("t.scalar", &[], &[7.5], GgmlType::F32).expect("scalar");
    let x4 = values(2 * 3 * 2 * 32, 99);
    w.add_tensor_f32("t.4d", &[2, 3, 2, 32], &x4, GgmlType::F16).expect("4d");
    w.add_tensor_f32("t.empty", &[0, 32], &[], GgmlType::Q8_0).expect("empty");
    w.add_tensor_raw("t.q4k", &[256, 2], GgmlType::Q4K, [q4_k_block(), q4_k_block()].concat()).expect("q4k");
    w.add_tensor_raw("t.iq2", &[256], GgmlType::IQ2XXS, vec![1; 66]).expect("iq2");
    let file = GgufFile::from_bytes(w.to_bytes().expect("bytes")).expect("parse");

    for (name, ty, bytes, values) in expected {
        let info = file.tensor_info(&name).expect("info");
        assert_eq!((info.dims.as_slice(), info.ggml_type), (&[64u64, 3][..], ty));
        assert_eq!(info.shape(), [3, 64]);
        assert_eq!((info.n_elements(), info.n_bytes()), (192, bytes.len() as u64));
        assert_eq!(file.tensor_data(info), bytes.as_slice(), "{name}");
        let t = file.tensor_f32(&name).expect("f32");
        assert_eq!(t.shape, [3, 64]);
        assert_eq!(t.data, values, "{name}");
    }
    let s = file.tensor_f32("t.scalar").expect("scalar");
    assert_eq!((s.shape.as_slice(), s.data.as_slice()), (&[][..], &[7.5f32][..]));
    let t4 = file.tensor_f32("t.4d").expect("4d");
    assert_eq!(t4.shape, [2, 3, 2, 32]);
    assert_eq!(file.tensor_info("t.4d").expect("4d").dims, [32, 2, 3, 2]);
    assert_eq!(
        t4.data,
        codec::dequantize(GgmlType::F16, &codec::quantize(GgmlType::F16, &x4).expect("q"), 384).expect("dq")
    );
    let e = file.tensor_f32("t.empty").expect("empty");
    assert_eq!((e.shape.as_slice(), e.data.len()), (&[0, 32][..], 0));
    let q4k = file.tensor_f32("t.q4k").expect("q4k");
    assert_eq!(q4k.shape, [2, 256]);
    assert_eq!(q4k.data[..256], q4k.data[256..]);
    let err = file.tensor_f32("t.iq2").expect_err("unsupported");
    assert!(matches!(err, GgufError::UnsupportedType { ty: GgmlType::IQ2XXS, .. }), "{err}");
    assert_eq!(file.tensor_bytes("t.iq2").expect("raw bytes"), [1; 66]);
}

#[test]
fn layout_matches_llama_cpp() {
    for alignment in [None, Some(64u32), Some(1)] {
        let mut w = sample_writer();
        if let Some(a) = alignment {
            w.add_metadata("general.alignment", a).expect("alignment");
        }
        let bytes = w.to_bytes().expect("bytes");
        let file = GgufFile::from_bytes(bytes.clone()).expect("parse");
        let align = u64::from(alignment.unwrap_or(32));
        assert_eq!(file.alignment(), align);
        assert_eq!(&bytes[..8], b"GGUF\x03\x00\x00\x00");
        assert_eq!(file.data_offset() % align, 0);
        // The data section starts at the first aligned position after the last tensor info,
        // and the padding before it is zeros.
        let last = file.tensors.last().expect("tensor");
        let (_, _, _, offset_at) = tensor_fields(&bytes, &last.name);
        let infos_end = offset_at as u64 + 8;
        assert!(file.data_offset() >= infos_end && file.data_offset() - infos_end < align);
        assert!(bytes[infos_end as usize..file.data_offset() as usize].iter().all(|&b| b == 0));
        // Offsets are exactly the running sum of padded sizes (what llama.cpp's gguf.cpp checks).
        let mut expected_offset = 0;
        for t in &file.tensors {
            assert_eq!(t.offset, expected_offset, "{}", t.name);
            expected_offset += t.n_bytes().div_ceil(align) * align;
        }
        assert_eq!(bytes.len() as u64, file.data_offset() + expected_offset);
    }
}

#[test]
fn re_serializing_a_parsed_file_is_byte_identical() {
    let bytes = sample();
    let file = GgufFile::from_bytes(bytes.clone()).expect("parse");
    assert_eq!(GgufWriter::from_file(&file).expect("copy").to_bytes().expect("bytes"), bytes);
    let mut w = GgufWriter::from_file(&file).expect("copy");
    w.set_metadata("llama.block_count", 3u32).expect("set");
    w.set_metadata("general.name", "edited").expect("set new");
    let edited = GgufFile::from_bytes(w.to_bytes().expect("bytes")).expect("parse");
    assert_eq!(edited.require_u64("llama.block_count").expect("u64"), 3);
    assert_eq!(edited.require_str("general.name").expect("str"), "edited");
    assert_eq!(edited.metadata[1].0, "llama.block_count", "set_metadata keeps the position");
}

#[test]
fn write_and_open_a_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("m.gguf");
    sample_writer().write(&path).expect("write");
    let file = GgufFile::open(&path).expect("open");
    assert_eq!(file.as_bytes(), sample().as_slice());
    let missing = dir.path().join("absent.gguf");
    let err = GgufFile::open(&missing).expect_err("absent");
    assert!(matches!(&err, GgufError::Io { path, .. } if path == &missing));
    assert!(err.to_string().contains("absent.gguf"), "{err}");
    let err = sample_writer().write(dir.path()).expect_err("a directory");
    assert!(matches!(err, GgufError::Io { .. }));
}

#[test]
fn writer_rejects_invalid_input() {
    let mut w = sample_writer();
    assert!(matches!(w.add_metadata("llama.block_count", 1u32), Err(GgufError::DuplicateKey(_))));
    let mixed = Value::Array(vec![Value::U32(1), Value::I32(2)]);
    let err = w.add_metadata("x.mixed", mixed).expect_err("mixed");
    assert!(matches!(err, GgufError::MixedArray { index: 1, expected: "u32", found: "i32", .. }), "{err}");
    let mut deep = Value::from(vec![1u8]);
    for _ in 0..covey_gguf::MAX_ARRAY_DEPTH {
        deep = Value::Array(vec![deep]);
    }
    assert!(matches!(w.add_metadata("x.deep", deep), Err(GgufError::NestingTooDeep { .. })));
    assert!(matches!(w.add_metadata("general.alignment", 48u32), Err(GgufError::BadAlignment { alignment: 48 })));
    assert!(matches!(w.add_metadata("general.alignment", 0u32), Err(GgufError::BadAlignment { alignment: 0 })));
    assert!(matches!(w.add_metadata("general.alignment", 64u64), Err(GgufError::WrongType { .. })));
    let x = values(64, 5);
    assert!(matches!(w.add_tensor_f32("w.q8", &[1, 64], &x, GgmlType::Q8_0), Err(GgufError::DuplicateTensor(_))));
    let long = "x".repeat(64);
    assert!(matches!(w.add_tensor_f32(long, &[64], &x, GgmlType::F32), Err(GgufError::NameTooLong { len: 64, .. })));
    let err = w.add_tensor_f32("a", &[2, 33], &x, GgmlType::F32).expect_err("shape");
    assert!(matches!(err, GgufError::ShapeMismatch { expected: 66, found: 64, .. }), "{err}");
    let err = w.add_tensor_f32("a", &[4, 16], &x, GgmlType::Q8_0).expect_err("row not a block multiple");
    assert!(matches!(err, GgufError::NotBlockMultiple { count: 16, block_size: 32, .. }), "{err}");
    let err = w.add_tensor_f32("a", &[2, 2, 2, 2, 4], &x, GgmlType::F32).expect_err("5 dims");
    assert!(matches!(err, GgufError::TooManyDims { n_dims: 5, .. }), "{err}");
    let err = w.add_tensor_f32("a", &[usize::MAX, 2], &x, GgmlType::F32).expect_err("overflow");
    assert!(matches!(err, GgufError::DimsOverflow { .. }), "{err}");
    let err = w.add_tensor_raw("a", &[32], GgmlType::Q4_0, vec![0; 17]).expect_err("bytes");
    assert!(matches!(err, GgufError::ByteLength { expected: 18, found: 17, .. }), "{err}");
    let err = w.add_tensor_f32("a", &[64], &x, GgmlType::Q6K).expect_err("no quantizer");
    assert!(matches!(err, GgufError::UnsupportedType { ty: GgmlType::Q6K, .. }), "{err}");
    // Nothing invalid was added.
    assert_eq!(w.to_bytes().expect("bytes"), sample());
}

#[test]
fn every_prefix_of_a_valid_file_is_an_error() {
    let bytes = sample();
    GgufFile::from_bytes(bytes.clone()).expect("the whole file parses");
    for len in 0..bytes.len() {
        let err = parse_err(bytes[..len].to_vec());
        assert!(
            matches!(
                err,
                GgufError::Truncated { .. } | GgufError::CountTooLarge { .. } | GgufError::TensorOutOfBounds { .. }
            ),
            "prefix {len}: {err}"
        );
    }
}

#[test]
fn header_errors() {
    let bytes = sample();
    let mut b = bytes.clone();
    patch(&mut b, 0, b"PK\x03\x04");
    let err = parse_err(b);
    assert!(matches!(err, GgufError::BadMagic { found } if &found == b"PK\x03\x04"));
    assert!(err.to_string().starts_with("not a GGUF file: magic is [50, 4b, 03, 04] (\"PK\\x03\\x04\")"), "{err}");
    for version in [0u32, 1, 4, 0xFFFF_FFFF] {
        let mut b = bytes.clone();
        patch(&mut b, 4, &version.to_le_bytes());
        assert!(matches!(parse_err(b), GgufError::UnsupportedVersion { version: v } if v == version));
    }
    let mut b = bytes.clone();
    patch(&mut b, 4, &3u32.to_be_bytes());
    assert!(matches!(parse_err(b), GgufError::BigEndian { .. }));
    let mut b = bytes.clone();
    patch(&mut b, 4, &2u32.to_le_bytes());
    assert_eq!(GgufFile::from_bytes(b).expect("version 2 reads").version, 2);
    // Counts that cannot fit in the file are refused before anything is allocated.
    for (at, count) in [(8, 1u64 << 60), (8, u64::MAX), (16, 1u64 << 60), (16, u64::MAX / 13 + 1)] {
        let mut b = bytes.clone();
        patch(&mut b, at, &count.to_le_bytes());
        let err = parse_err(b);
        assert!(matches!(err, GgufError::CountTooLarge { count: c, .. } if c == count), "{err}");
    }
}

#[test]
fn metadata_errors() {
    let bytes = sample();
    // A string length of u64::MAX (a key) and 2^60 (a string value).
    let mut b = bytes.clone();
    patch(&mut b, string_at(&bytes, "llama.block_count"), &u64::MAX.to_le_bytes());
    let err = parse_err(b);
    assert!(matches!(err, GgufError::CountTooLarge { count: u64::MAX, .. }), "{err}");
    assert!(err.to_string().contains("metadata key length"), "{err}");
    let mut b = bytes.clone();
    patch(&mut b, string_at(&bytes, "llama"), &(1u64 << 60).to_le_bytes());
    let err = parse_err(b);
    assert!(err.to_string().contains("general.architecture"), "the key is named: {err}");
    // An array count of 2^60.
    let tokens_type_at = string_at(&bytes, "tokenizer.ggml.tokens") + 8 + "tokenizer.ggml.tokens".len();
    let mut b = bytes.clone();
    patch(&mut b, tokens_type_at + 8, &(1u64 << 60).to_le_bytes());
    let err = parse_err(b);
    assert!(matches!(err, GgufError::CountTooLarge { count, .. } if count == 1 << 60), "{err}");
    assert!(err.to_string().contains("tokenizer.ggml.tokens"), "{err}");
    // Unknown value types, top-level and as an array element type.
    let block_count_type_at = string_at(&bytes, "llama.block_count") + 8 + "llama.block_count".len();
    let mut b = bytes.clone();
    patch(&mut b, block_count_type_at, &13u32.to_le_bytes());
    let err = parse_err(b);
    assert!(matches!(err, GgufError::UnknownValueType { raw: 13, .. }), "{err}");
    let mut b = bytes.clone();
    patch(&mut b, tokens_type_at + 4, &99u32.to_le_bytes());
    assert!(matches!(parse_err(b), GgufError::UnknownValueType { raw: 99, .. }));
    // Invalid UTF-8 in a key; a bool that is neither 0 nor 1.
    let mut b = bytes.clone();
    b[string_at(&bytes, "general.architecture") + 8] = 0xFF;
    assert!(matches!(parse_err(b), GgufError::InvalidUtf8 { .. }));
    let flag_at = string_at(&bytes, "general.flag") + 8 + "general.flag".len() + 4;
    let mut b = bytes.clone();
    b[flag_at] = 2;
    assert!(matches!(parse_err(b), GgufError::InvalidBool { raw: 2, .. }));
    // Duplicate keys.
    let mut w = GgufWriter::new();
    w.add_metadata("k.a", 1u8).expect("a");
    w.add_metadata("k.b", 2u8).expect("b");
    let mut b = w.to_bytes().expect("bytes");
    let at = string_at(&b, "k.b") + 8;
    patch(&mut b, at, b"k.a");
    assert!(matches!(parse_err(b), GgufError::DuplicateKey(k) if k == "k.a"));
}

#[test]
fn alignment_errors() {
    let mut w = sample_writer();
    w.add_metadata("general.alignment", 64u32).expect("alignment");
    let bytes = w.to_bytes().expect("bytes");
    let value_at = string_at(&bytes, "general.alignment") + 8 + "general.alignment".len() + 4;
    for bad in [0u32, 48] {
        let mut b = bytes.clone();
        patch(&mut b, value_at, &bad.to_le_bytes());
        let err = parse_err(b);
        assert!(matches!(err, GgufError::BadAlignment { alignment } if alignment == u64::from(bad)), "{err}");
    }
    let mut b = bytes.clone();
    patch(&mut b, value_at - 4, &5u32.to_le_bytes()); // u32 → i32
    assert!(matches!(parse_err(b), GgufError::WrongType { expected: "u32", found: "i32", .. }));
}

#[test]
fn nested_arrays_deeper_than_the_limit_are_refused_without_recursing_further() {
    // A hand-built file whose one value is 100 000 arrays, each holding the next.
    let mut b = b"GGUF".to_vec();
    b.extend(3u32.to_le_bytes());
    b.extend(0u64.to_le_bytes());
    b.extend(1u64.to_le_bytes());
    b.extend(1u64.to_le_bytes());
    b.push(b'x');
    b.extend(9u32.to_le_bytes());
    for _ in 0..100_000 {
        b.extend(9u32.to_le_bytes());
        b.extend(1u64.to_le_bytes());
    }
    b.extend(0u32.to_le_bytes());
    b.extend(0u64.to_le_bytes());
    let err = parse_err(b);
    assert!(matches!(err, GgufError::NestingTooDeep { max: covey_gguf::MAX_ARRAY_DEPTH, .. }), "{err}");
}

#[test]
fn tensor_info_errors() {
    let bytes = sample();
    let (n_dims_at, dims_at, type_at, offset_at) = tensor_fields(&bytes, "w.q8");
    // Unknown tensor type id, named with the tensor.
    for raw in [4u32, 31, 1000] {
        let mut b = bytes.clone();
        patch(&mut b, type_at, &raw.to_le_bytes());
        let err = parse_err(b);
        assert!(
            matches!(&err, GgufError::UnknownTensorType { raw: r, tensor: Some(n) } if *r == raw && n == "w.q8"),
            "{err}"
        );
        assert_eq!(err.to_string(), format!("unknown ggml tensor type id {raw} for tensor `w.q8`"));
    }
    // Too many dims.
    let mut b = bytes.clone();
    patch(&mut b, n_dims_at, &5u32.to_le_bytes());
    assert!(matches!(parse_err(b), GgufError::TooManyDims { n_dims: 5, .. }));
    // Dims whose product overflows, and a dim beyond i64::MAX.
    for dims in [[1u64 << 40, 1 << 40], [u64::MAX, 1], [1 << 62, 4]] {
        let mut b = bytes.clone();
        patch(&mut b, dims_at, &dims[0].to_le_bytes());
        patch(&mut b, dims_at + 8, &dims[1].to_le_bytes());
        let err = parse_err(b);
        assert!(matches!(err, GgufError::DimsOverflow { .. }), "{dims:?}: {err}");
    }
    // ne0 not a multiple of the Q8_0 block size.
    let mut b = bytes.clone();
    patch(&mut b, dims_at, &48u64.to_le_bytes());
    let err = parse_err(b);
    assert!(matches!(err, GgufError::NotBlockMultiple { count: 48, block_size: 32, .. }), "{err}");
    // A huge (but consistent) tensor: its data cannot be in the file.
    let mut b = bytes.clone();
    patch(&mut b, dims_at + 8, &(1u64 << 40).to_le_bytes());
    assert!(matches!(parse_err(b), GgufError::TensorOutOfBounds { .. }));
    // Offsets: beyond the end, misaligned, overlapping.
    let mut b = bytes.clone();
    patch(&mut b, offset_at, &(1u64 << 20).to_le_bytes());
    let err = parse_err(b);
    assert!(matches!(&err, GgufError::TensorOutOfBounds { name, .. } if name == "w.q8"), "{err}");
    let mut b = bytes.clone();
    patch(&mut b, offset_at, &u64::MAX.to_le_bytes());
    assert!(matches!(parse_err(b), GgufError::Misaligned { .. }));
    let mut b = bytes.clone();
    patch(&mut b, offset_at, &(u64::MAX - 31).to_le_bytes());
    assert!(matches!(parse_err(b), GgufError::TensorOutOfBounds { end: u64::MAX, .. }));
    let mut b = bytes.clone();
    patch(&mut b, tensor_fields(&bytes, "w.q41").3, &8u64.to_le_bytes());
    let err = parse_err(b);
    assert!(matches!(err, GgufError::Misaligned { offset: 8, alignment: 32, .. }), "{err}");
    let mut b = bytes.clone();
    patch(&mut b, tensor_fields(&bytes, "w.q41").3, &32u64.to_le_bytes());
    let err = parse_err(b);
    assert!(
        matches!(&err, GgufError::OverlappingTensors { first, second } if first == "w.q8" && second == "w.q41"),
        "{err}"
    );
    // A tensor-name length of u64::MAX; duplicate tensor names.
    let mut b = bytes.clone();
    patch(&mut b, string_at(&bytes, "w.q41"), &u64::MAX.to_le_bytes());
    assert!(matches!(parse_err(b), GgufError::CountTooLarge { count: u64::MAX, .. }));
    let mut w = GgufWriter::new();
    w.add_tensor_f32("t.a", &[4], &[1.0; 4], GgmlType::F32).expect("a");
    w.add_tensor_f32("t.b", &[4], &[2.0; 4], GgmlType::F32).expect("b");
    let mut b = w.to_bytes().expect("bytes");
    let at = string_at(&b, "t.b") + 8;
    patch(&mut b, at, b"t.a");
    assert!(matches!(parse_err(b), GgufError::DuplicateTensor(n) if n == "t.a"));
}

#[test]
fn seeded_mutations_never_panic() {
    let base = sample();
    let header_len = GgufFile::from_bytes(base.clone()).expect("parse").data_offset() as usize;
    let interesting = [0u64, 1, 2, 4, 5, 9, 13, 31, 32, 255, 1 << 32, 1 << 60, u64::MAX, u64::MAX - 31];
    let mut rng = ChaCha8Rng::seed_from_u64(0x5EED_F022);
    let (mut ok, mut err) = (0, 0);
    for iteration in 0..4000 {
        let mut b = base.clone();
        for _ in 0..rng.random_range(1..=3) {
            if b.is_empty() {
                break;
            }
            // Mostly in the header, where the parser makes its decisions.
            let limit = if rng.random_bool(0.85) { header_len.min(b.len()) } else { b.len() };
            let pos = rng.random_range(0..limit);
            match rng.random_range(0..6) {
                0 => b[pos] ^= 1 << rng.random_range(0..8),
                1 => b[pos] = rng.random(),
                2 => b.truncate(pos),
                3 => {
                    let n = rng.random_range(1..16);
                    let insert: Vec<u8> = (0..n).map(|_| rng.random()).collect();
                    b.splice(pos..pos, insert);
                }
                4 => {
                    let end = (pos + rng.random_range(1..24)).min(b.len());
                    b.drain(pos..end);
                }
                _ => {
                    let v = interesting[rng.random_range(0..interesting.len())].to_le_bytes();
                    let end = (pos + 8).min(b.len());
                    b[pos..end].copy_from_slice(&v[..end - pos]);
                }
            }
        }
        let outcome = std::panic::catch_unwind(|| match GgufFile::from_bytes(b) {
            Ok(file) => {
                for t in &file.tensors {
                    let _ = file.tensor_data(t);
                    let _ = file.tensor_f32(&t.name).map(|x| x.data.len());
                }
                true
            }
            Err(e) => {
                assert!(!e.to_string().is_empty());
                false
            }
        });
        match outcome {
            Ok(true) => ok += 1,
            Ok(false) => err += 1,
            Err(_) => panic!("mutation iteration {iteration} panicked"),
        }
    }
    // Both outcomes must be common, or the mutations test nothing.
    assert!(ok > 100 && err > 1000, "ok {ok}, err {err}");
}

const SMOLLM2: &str = "/work/shared/models/SmolLM2-135M-Instruct.Q4_1.gguf";

#[test]
fn smollm2_q4_1_gguf() {
    if !Path::new(SMOLLM2).exists() {
        println!("skipping: {SMOLLM2} is absent");
        return;
    }
    let file = GgufFile::open(SMOLLM2).expect("open");
    assert_eq!(file.version, 3);
    assert_eq!(file.tensors.len(), 272);
    assert_eq!(file.alignment(), 32);
    assert_eq!(file.architecture().expect("arch"), "llama");
    assert_eq!(file.require_u64("llama.block_count").expect("blocks"), 30);
    assert_eq!(file.require_u64("llama.embedding_length").expect("d"), 576);
    assert_eq!(file.require_f64("llama.rope.freq_base").expect("rope"), 100000.0);
    assert_eq!(file.require_u64("tokenizer.ggml.bos_token_id").expect("bos"), 1);
    let tokens = file.require_strings("tokenizer.ggml.tokens").expect("tokens");
    assert_eq!(tokens.len(), 49152);
    assert_eq!(tokens[..3], ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]);
    let merges = file.require_strings("tokenizer.ggml.merges").expect("merges");
    assert_eq!((merges.len(), merges[0]), (48900, "Ġ t"));
    let token_type = file.get("tokenizer.ggml.token_type").and_then(Value::i64s).expect("token types");
    assert_eq!((token_type.len(), token_type[0]), (49152, 3));

    let embd = file.tensor_info("token_embd.weight").expect("token_embd");
    assert_eq!((embd.ggml_type, embd.shape()), (GgmlType::Q8_0, vec![49152, 576]));
    // gguf-py reports this tensor's data at absolute byte 1785664.
    assert_eq!(file.data_offset() + embd.offset, 1_785_664);
    let q = file.tensor_info("blk.0.attn_q.weight").expect("attn_q");
    assert_eq!((q.ggml_type, q.shape()), (GgmlType::Q4_1, vec![576, 576]));

    // Reference values from gguf-py 0.17: `gguf.quants.dequantize(t.data, t.tensor_type)`.
    let norm = file.tensor_f32("blk.0.attn_norm.weight").expect("norm");
    assert_eq!(norm.shape, [576]);
    assert_eq!(
        norm.data[..4].iter().map(|&v| f64::from(v)).collect::<Vec<_>>(),
        [0.01397705078125, 0.0238037109375, -0.019775390625, -0.0302734375]
    );
    let attn_q = file.tensor_f32("blk.0.attn_q.weight").expect("attn_q");
    assert_eq!(attn_q.shape, [576, 576]);
    assert_eq!(
        attn_q.data[..4].iter().map(|&v| f64::from(v)).collect::<Vec<_>>(),
        [-0.0963134765625, 0.1573486328125, -0.0963134765625, -0.73046875]
    );
    assert_eq!(attn_q.data.last().map(|&v| f64::from(v)), Some(-0.255859375));
    assert!(attn_q.data.iter().all(|v| v.is_finite() && v.abs() < 10.0));
    let max = attn_q.data.iter().fold(0f32, |m, v| m.max(v.abs()));
    assert_eq!(f64::from(max), 5.251953125);
    let sum: f64 = attn_q.data.iter().map(|&v| f64::from(v)).sum();
    assert!((sum - 59.22322082519531).abs() < 1e-6, "{sum}");
    // ffn_down maps 1536 → 576: ggml dims [1536, 576], row-major [576, 1536].
    let down = file.tensor_info("blk.0.ffn_down.weight").expect("ffn_down");
    assert_eq!((down.dims.as_slice(), down.shape()), (&[1536u64, 576][..], vec![576, 1536]));
    // Copying the file through the writer reproduces llama.cpp's bytes exactly (same layout).
    let copy = GgufWriter::from_file(&file).expect("copy").to_bytes().expect("bytes");
    assert!(copy == file.as_bytes(), "re-serialized file differs");
    // First row of the embedding (18 Q8_0 blocks), without decoding all 28M values.
    let row = codec::dequantize(GgmlType::Q8_0, &file.tensor_data(embd)[..18 * 34], 576).expect("row");
    let first: Vec<f64> = row[..4].iter().map(|&v| f64::from(v)).collect();
    assert_eq!(first, [-0.10654449462890625, 0.032978057861328125, 0.048198699951171875, -0.022830963134765625]);
}
