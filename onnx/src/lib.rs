//! # covey-onnx
//!
//! Export a Covey Llama-style decoder (Hugging Face tensor names and semantics, see
//! [`covey_infer::LlamaConfig`]) to an ONNX model that ONNX Runtime (desktop or mobile),
//! tract and other ONNX runtimes load as it is.
//!
//! ## The graph
//!
//! * **Input** `input_ids`: INT64 `[batch, sequence]`, both dimensions symbolic.
//! * **Output** `logits`: FLOAT `[batch, sequence, vocab_size]`, the next-token logits of
//!   every position.
//! * Default ONNX domain, opset 17 by default (17 to 21 accepted, see [`MIN_OPSET`] and
//!   [`MAX_OPSET`]); IR version 8 (9 for opsets 19 and 20, 10 for 21).
//! * **No KV cache in this version**: every call attends over the whole `input_ids`, so
//!   generating `n` tokens re-runs the prefix each time (fine for the few-million
//!   parameter students Covey trains; a cached variant would add `past_key_values`
//!   inputs and outputs).
//! * Positions are computed inside the graph from the sequence length
//!   (`Shape → Gather → Range → Cast → Mul` by the `rope.inv_freq` initializer `→ Cos/Sin`),
//!   and so is the causal mask (`Greater` of key and query positions, then `Where` with
//!   −1e9 before the `Softmax`), so one file serves any length up to
//!   `max_position_embeddings` (longer inputs run, but the model was not trained for them).
//! * Operators used: `Gather`, `Shape`, `Range`, `Cast`, `Unsqueeze`, `Concat`, `Cos`,
//!   `Sin`, `Greater`, `Where`, `MatMul`, `Transpose`, `Reshape`, `Slice`, `Neg`, `Mul`,
//!   `Add`, `Div`, `Sqrt`, `ReduceMean`, `Softmax`, `Sigmoid` and, for int8 weights,
//!   `DequantizeLinear`. RMSNorm is `x / sqrt(mean(x²) + eps) * weight`, SiLU is
//!   `x * Sigmoid(x)`, RoPE is Hugging Face's rotate-half form, grouped-query attention
//!   reshapes the queries to `[batch, kv_heads, group, sequence, head_dim]` so each KV head
//!   broadcasts over its group in the `MatMul`.
//! * Nodes and initializers are named after the Hugging Face tensors
//!   (`model.layers.0.self_attn.q_proj.weight` is the initializer,
//!   `model.layers.0.self_attn.q_proj` the `MatMul` that applies it), so the graph reads
//!   naturally in [Netron](https://netron.app). Weight initializers keep the Hugging Face
//!   `[out, in]` layout; a `Transpose` node turns them into `MatMul`'s `[in, out]`
//!   (constant-folded for f32 weights; for int8 ones ONNX Runtime absorbs it into a
//!   transposed `FusedMatMul`, tract folds the whole dequantization).
//!
//! ## Int8 weights
//!
//! With [`WeightFormat::Int8`] every 2-D weight — the seven projections of each layer, the
//! token embedding and an untied `lm_head` — is stored as an INT8 initializer under its
//! own name, quantized by [`covey_tensors::quant::Int8Tensor::quantize`]: symmetric, one
//! f32 scale per output row (`scale = max|row| / 127`, `q = round(x / scale)` clamped to
//! ±127), the scales in an f32 initializer `<name>.qscale`. The graph dequantizes with a
//! standard per-axis `DequantizeLinear` (axis 0, zero point omitted, i.e. 0), so the
//! values it computes with are exactly those of `covey-infer`'s `Precision::Int8`. Norm
//! weights stay f32. The file is a little over a quarter of the f32 one (0.26 for the
//! 3.2 M parameter student; 0.45 for `LlamaConfig::tiny()`, whose ~20 KB of graph
//! structure weighs as much as its weights).
//!
//! At opset 21 ONNX Runtime's extended optimizations fuse `DequantizeLinear` + `MatMul`
//! into its `MatMulNBits` kernel, which by default (accuracy level 4) also quantizes the
//! activations to int8: logits then move by ~1e-2. To compute exactly what the graph says,
//! set the session config entry `session.qdq_matmulnbits_accuracy_level` to `"1"`, or
//! export at the default opset 17, where no such fusion happens.
//!
//! ## Running it
//!
//! ```python
//! import numpy as np, onnxruntime
//! session = onnxruntime.InferenceSession("student.onnx")
//! ids = np.array([[72, 101, 108, 108, 111]], dtype=np.int64)   # [batch, sequence]
//! (logits,) = session.run(None, {"input_ids": ids})            # [1, 5, vocab]
//! next_token = int(logits[0, -1].argmax())
//! ```
//!
//! The files pass `onnx.checker.check_model(model, full_check=True)` and ONNX Runtime's
//! logits agree with `covey-infer`'s to ~1e-6 at every graph optimization level (checked
//! by hand with onnx 1.23 and onnxruntime 1.32; the crate's own tests run the files in
//! tract, which needs no Python).
//!
//! ```
//! use covey_infer::{LlamaConfig, random_tensors};
//! use covey_onnx::{ExportOptions, WeightFormat, export};
//!
//! let config = LlamaConfig::tiny();
//! let weights = random_tensors(&config, 1);
//! let f32_bytes = export(&config, &weights, &ExportOptions::default()).unwrap();
//! let int8 = ExportOptions { weights: WeightFormat::Int8, ..ExportOptions::default() };
//! let int8_bytes = export(&config, &weights, &int8).unwrap();
//! assert!(int8_bytes.len() * 2 < f32_bytes.len());
//! ```
//!
//! ## Why hand-written protobuf messages
//!
//! The ONNX file is written with a dozen hand-written [`prost`] messages ([`proto`]), the
//! subset of `onnx.proto` the exporter needs, with its field numbers: no build script, no
//! `protoc`. burn-onnx's exporter is experimental and cannot lower a Llama graph (it has no
//! `Transpose`, `Pow`, `Sin`, `Cos` or `Where`), and the `onnx-protobuf` crate is MPL
//! licensed and built on rust-protobuf rather than the prost the workspace already uses.

pub mod proto;

mod graph;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use covey_infer::LlamaConfig;
use covey_tensors::NamedTensors;
use prost::Message;

use crate::proto::{ModelProto, OperatorSetIdProto, StringStringEntryProto};

/// Lowest opset this exporter writes (per-axis `DequantizeLinear`, `Unsqueeze` with an
/// `axes` input and `Softmax` over one axis need 13; 17 is the project's baseline).
pub const MIN_OPSET: i64 = 17;
/// Highest opset this exporter writes (from 18 `ReduceMean` takes its axes as an input,
/// which the exporter handles; nothing it uses changes meaning up to 21).
pub const MAX_OPSET: i64 = 21;
/// The opset [`ExportOptions::default`] uses.
pub const DEFAULT_OPSET: i64 = 17;

/// Name of the graph's input (INT64 `[batch, sequence]`).
pub const INPUT_NAME: &str = graph::INPUT;
/// Name of the graph's output (FLOAT `[batch, sequence, vocab_size]`).
pub const OUTPUT_NAME: &str = graph::OUTPUT;

/// Everything that can go wrong while exporting.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OnnxError {
    /// A tensor the configuration needs is absent.
    #[error("missing tensor `{0}`")]
    MissingTensor(String),
    /// A tensor has the wrong shape for the configuration.
    #[error("tensor `{name}` has shape {found:?}, expected {expected:?}")]
    ShapeMismatch {
        /// Tensor name.
        name: String,
        /// The shape the configuration implies.
        expected: Vec<usize>,
        /// The shape found.
        found: Vec<usize>,
    },
    /// A tensor's values do not fill its shape.
    #[error("tensor `{name}` holds {found} values but its shape needs {expected}")]
    DataLength {
        /// Tensor name.
        name: String,
        /// Product of the shape.
        expected: usize,
        /// Number of values held.
        found: usize,
    },
    /// The configuration is impossible (the error names the field).
    #[error(transparent)]
    InvalidConfig(covey_infer::InferError),
    /// The requested opset is outside what the exporter writes.
    #[error("unsupported ONNX opset {opset}: this exporter writes opsets {min} to {max}")]
    UnsupportedOpset {
        /// The opset requested.
        opset: i64,
        /// [`MIN_OPSET`].
        min: i64,
        /// [`MAX_OPSET`].
        max: i64,
    },
    /// A weight could not be quantized to int8 (it holds NaN or infinite values).
    #[error("cannot quantize tensor `{name}` to int8: {source}")]
    Quantization {
        /// Tensor name.
        name: String,
        /// The quantizer's error.
        #[source]
        source: covey_tensors::TensorError,
    },
    /// The model does not fit one protobuf message (2 GiB).
    #[error("the ONNX model would take {bytes} bytes, over protobuf's 2 GiB limit")]
    TooLarge {
        /// Encoded size.
        bytes: usize,
    },
    /// A file could not be written.
    #[error("{path}: {source}")]
    Io {
        /// The file involved.
        path: PathBuf,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },
}

/// How the 2-D weights are stored in the ONNX file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WeightFormat {
    /// f32 initializers.
    #[default]
    F32,
    /// int8 initializers with one f32 scale per output row, dequantized in the graph
    /// (`DequantizeLinear`, axis 0). Norm weights stay f32.
    Int8,
}

impl WeightFormat {
    /// The value of the `covey.weights` metadata entry.
    pub fn label(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::Int8 => covey_tensors::quant::INT8_SCHEME,
        }
    }
}

/// Settings of [`export`].
#[derive(Debug, Clone, PartialEq)]
pub struct ExportOptions {
    /// Storage of the 2-D weights. Default f32.
    pub weights: WeightFormat,
    /// ONNX opset of the default domain, [`MIN_OPSET`]..=[`MAX_OPSET`]. Default 17.
    pub opset: i64,
    /// `ModelProto.producer_name`. Default `covey-onnx`.
    pub producer_name: String,
    /// `ModelProto.producer_version`. Default this crate's version.
    pub producer_version: String,
    /// `ModelProto.model_version`. Default 1.
    pub model_version: i64,
    /// `ModelProto.doc_string`. Default empty.
    pub doc_string: String,
    /// Extra `metadata_props` entries; they override the automatic ones (`covey.weights`
    /// and one `llama.<field>` per configuration field) on equal keys.
    pub metadata: BTreeMap<String, String>,
}

impl Default for ExportOptions {
    fn default() -> Self {
        Self {
            weights: WeightFormat::F32,
            opset: DEFAULT_OPSET,
            producer_name: env!("CARGO_PKG_NAME").into(),
            producer_version: env!("CARGO_PKG_VERSION").into(),
            model_version: 1,
            doc_string: String::new(),
            metadata: BTreeMap::new(),
        }
    }
}

/// ONNX IR version that goes with an opset (the oldest IR that knows it).
fn ir_version(opset: i64) -> i64 {
    match opset {
        ..=18 => 8,
        19 | 20 => 9,
        _ => 10,
    }
}

/// Check the configuration and that every tensor it needs is present, shaped right and
/// filled. Extra tensors are ignored (so is `lm_head.weight` of a tied model).
pub fn validate(config: &LlamaConfig, tensors: &NamedTensors) -> Result<(), OnnxError> {
    config.validate().map_err(OnnxError::InvalidConfig)?;
    for (name, expected) in covey_infer::expected_shapes(config) {
        let t = tensors.get(&name).ok_or_else(|| OnnxError::MissingTensor(name.clone()))?;
        if t.shape != expected {
            return Err(OnnxError::ShapeMismatch { name, expected, found: t.shape.clone() });
        }
        let needed: usize = expected.iter().product();
        if t.data.len() != needed {
            return Err(OnnxError::DataLength { name, expected: needed, found: t.data.len() });
        }
    }
    Ok(())
}

fn metadata(config: &LlamaConfig, options: &ExportOptions) -> Vec<StringStringEntryProto> {
    let mut entries: BTreeMap<String, String> = [
        ("covey.weights", options.weights.label().to_string()),
        ("llama.hidden_size", config.hidden_size.to_string()),
        ("llama.num_hidden_layers", config.num_hidden_layers.to_string()),
        ("llama.num_attention_heads", config.num_attention_heads.to_string()),
        ("llama.num_key_value_heads", config.num_key_value_heads.to_string()),
        ("llama.intermediate_size", config.intermediate_size.to_string()),
        ("llama.vocab_size", config.vocab_size.to_string()),
        ("llama.rope_theta", config.rope_theta.to_string()),
        ("llama.max_position_embeddings", config.max_position_embeddings.to_string()),
        ("llama.tie_word_embeddings", config.tie_word_embeddings.to_string()),
        ("llama.rms_norm_eps", config.rms_norm_eps.to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    entries.extend(options.metadata.iter().map(|(k, v)| (k.clone(), v.clone())));
    entries.into_iter().map(|(key, value)| StringStringEntryProto { key, value }).collect()
}

/// Build the ONNX model as a [`ModelProto`] (what [`export`] encodes), e.g. to inspect it.
pub fn export_model(
    config: &LlamaConfig,
    tensors: &NamedTensors,
    options: &ExportOptions,
) -> Result<ModelProto, OnnxError> {
    if !(MIN_OPSET..=MAX_OPSET).contains(&options.opset) {
        return Err(OnnxError::UnsupportedOpset { opset: options.opset, min: MIN_OPSET, max: MAX_OPSET });
    }
    validate(config, tensors)?;
    let graph = graph::build(config, tensors, options.weights, options.opset)?;
    Ok(ModelProto {
        ir_version: ir_version(options.opset),
        opset_import: vec![OperatorSetIdProto { domain: String::new(), version: options.opset }],
        producer_name: options.producer_name.clone(),
        producer_version: options.producer_version.clone(),
        domain: String::new(),
        model_version: options.model_version,
        doc_string: options.doc_string.clone(),
        graph: Some(graph),
        metadata_props: metadata(config, options),
    })
}

/// Export the model to ONNX bytes (a serialized `ModelProto`).
///
/// The tensors are checked against `config` first: a missing or misshapen tensor is an
/// error naming it. See the crate documentation for the graph.
pub fn export(config: &LlamaConfig, tensors: &NamedTensors, options: &ExportOptions) -> Result<Vec<u8>, OnnxError> {
    let model = export_model(config, tensors, options)?;
    let bytes = model.encoded_len();
    if bytes > i32::MAX as usize {
        return Err(OnnxError::TooLarge { bytes });
    }
    Ok(model.encode_to_vec())
}

/// [`export`] to a file; returns the number of bytes written.
pub fn export_to_file(
    config: &LlamaConfig,
    tensors: &NamedTensors,
    options: &ExportOptions,
    path: impl AsRef<Path>,
) -> Result<usize, OnnxError> {
    let path = path.as_ref();
    let bytes = export(config, tensors, options)?;
    std::fs::write(path, &bytes).map_err(|source| OnnxError::Io { path: path.to_owned(), source })?;
    Ok(bytes.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::data_type;
    use covey_infer::random_tensors;

    fn tiny() -> (LlamaConfig, NamedTensors) {
        let c = LlamaConfig::tiny();
        let t = random_tensors(&c, 11);
        (c, t)
    }

    #[test]
    fn model_header_and_io_are_as_documented() {
        let (c, t) = tiny();
        let m = export_model(&c, &t, &ExportOptions::default()).expect("export");
        assert_eq!(m.ir_version, 8);
        assert_eq!(m.opset_import, vec![OperatorSetIdProto { domain: String::new(), version: 17 }]);
        assert_eq!(m.producer_name, "covey-onnx");
        let g = m.graph.expect("graph");
        assert_eq!(g.input.len(), 1);
        assert_eq!(g.input[0].name, INPUT_NAME);
        assert_eq!(g.output.len(), 1);
        assert_eq!(g.output[0].name, OUTPUT_NAME);
        let meta: BTreeMap<_, _> = m.metadata_props.iter().map(|e| (e.key.as_str(), e.value.as_str())).collect();
        assert_eq!(meta["covey.weights"], "f32");
        assert_eq!(meta["llama.vocab_size"], "256");
        // Every node input is produced before it is used (topological order).
        let mut known: std::collections::HashSet<&str> = g.initializer.iter().map(|t| t.name.as_str()).collect();
        known.insert(INPUT_NAME);
        for n in &g.node {
            for i in &n.input {
                assert!(known.contains(i.as_str()), "{} uses {i} before it exists", n.name);
            }
            known.extend(n.output.iter().map(String::as_str));
        }
        assert!(known.contains(OUTPUT_NAME));
        // Node names are unique.
        let names: std::collections::HashSet<&str> = g.node.iter().map(|n| n.name.as_str()).collect();
        assert_eq!(names.len(), g.node.len());
        // Initializers carry the Hugging Face names.
        let q = g.initializer.iter().find(|t| t.name == "model.layers.1.self_attn.k_proj.weight").expect("k_proj");
        assert_eq!((q.data_type, q.dims.clone()), (data_type::FLOAT, vec![16, 32]));
    }

    #[test]
    fn int8_weights_are_int8_initializers_with_row_scales() {
        let (c, t) = tiny();
        let opts = ExportOptions { weights: WeightFormat::Int8, ..ExportOptions::default() };
        let g = export_model(&c, &t, &opts).expect("export").graph.expect("graph");
        let find = |name: &str| g.initializer.iter().find(|t| t.name == name).expect(name);
        let embed = find("model.embed_tokens.weight");
        assert_eq!((embed.data_type, embed.raw_data.len()), (data_type::INT8, 256 * 32));
        let scales = find("model.embed_tokens.weight.qscale");
        assert_eq!((scales.data_type, scales.dims.clone()), (data_type::FLOAT, vec![256]));
        assert_eq!(find("model.norm.weight").data_type, data_type::FLOAT);
        let down = find("model.layers.0.mlp.down_proj.weight");
        let q = covey_tensors::quant::Int8Tensor::quantize(&t["model.layers.0.mlp.down_proj.weight"]).expect("quant");
        assert_eq!(down.raw_data, q.values.iter().map(|&v| v as u8).collect::<Vec<_>>());
        let n_dq = g.node.iter().filter(|n| n.op_type == "DequantizeLinear").count();
        assert_eq!(n_dq, 1 + 7 * c.num_hidden_layers);
    }

    #[test]
    fn opsets_and_ir_versions() {
        let (c, t) = tiny();
        for (opset, ir) in [(17, 8), (18, 8), (19, 9), (20, 9), (21, 10)] {
            let m = export_model(&c, &t, &ExportOptions { opset, ..ExportOptions::default() }).expect("export");
            assert_eq!(m.ir_version, ir, "opset {opset}");
        }
        for opset in [16, 22] {
            let err = export(&c, &t, &ExportOptions { opset, ..ExportOptions::default() }).expect_err("refused");
            assert!(matches!(err, OnnxError::UnsupportedOpset { .. }), "{err}");
        }
    }

    #[test]
    fn bad_inputs_are_named() {
        let (c, t) = tiny();
        let mut bad = c.clone();
        bad.num_key_value_heads = 3;
        let err = export(&bad, &t, &ExportOptions::default()).expect_err("invalid").to_string();
        assert!(err.contains("num_key_value_heads"), "{err}");

        let name = "model.layers.0.self_attn.v_proj.weight";
        let mut short = t.clone();
        short.get_mut(name).expect("present").data.pop();
        let err = export(&c, &short, &ExportOptions::default()).expect_err("short").to_string();
        assert!(err.contains(name) && err.contains("values"), "{err}");

        let mut nan = t.clone();
        nan.get_mut("model.embed_tokens.weight").expect("present").data[3] = f32::NAN;
        let opts = ExportOptions { weights: WeightFormat::Int8, ..ExportOptions::default() };
        let err = export(&c, &nan, &opts).expect_err("NaN").to_string();
        assert!(err.contains("model.embed_tokens.weight"), "{err}");

        let dir = std::env::temp_dir().join("covey-onnx-no-such-dir").join("x").join("m.onnx");
        let err = export_to_file(&c, &t, &ExportOptions::default(), &dir).expect_err("no dir").to_string();
        assert!(err.contains("m.onnx"), "{err}");
    }
}
