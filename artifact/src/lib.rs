//! # covey-artifact
//!
//! Model artifacts without an ML framework: what `covey-model` loads and writes, and what
//! a coordinator or a device can read without linking burn.
//!
//! * [`artifact`]: [`LoadedModel`], a GGUF file or a model directory (`config.json`,
//!   `model.safetensors` in f32, int8 or int4, `tokenizer.json`, chat template and
//!   special tokens), weights kept as stored; an inference engine from it.
//! * [`gguf_import`]: GGUF → configuration, Hugging Face-named weights, tokenizer.
//! * [`tokenizer`]: byte-level, or Hugging Face `tokenizer.json` through `tokenizers`.
//! * [`chat`]: the model's Jinja chat template, rendered as `transformers` does.
//! * [`export`]: to safetensors, GGUF and ONNX.
//!
//! Architecture invariant: no burn; errors are this crate's [`ArtifactError`].

pub mod artifact;
pub mod chat;
pub mod error;
pub mod export;
pub mod gguf_import;
pub mod tokenizer;

pub use artifact::LoadedModel;
pub use error::{ArtifactError, Result};
pub use tokenizer::Tokenizer;

/// The weights file of a model directory (Hugging Face's name).
pub const MODEL_FILE: &str = "model.safetensors";
/// The configuration file of a model directory (Hugging Face's name).
pub const CONFIG_FILE: &str = "config.json";
