//! # covey-infer
//!
//! Covey's on-device inference engine: the Llama-style decoder of `covey-model`
//! (RMSNorm, rotate-half RoPE, grouped-query attention, SwiGLU) on plain host memory,
//! with its weights held **as stored** — f32, int8 per output channel, or int4 in packed
//! groups of 32 — and multiplied without expanding them to f32. It has a KV cache per
//! [`Session`], greedy and sampled generation, and windowed perplexity. No ML framework:
//! it builds in seconds and is what a phone-class device runs.
//!
//! ```
//! use covey_infer::{LlamaConfig, Model, Precision, SamplingConfig, random_tensors};
//!
//! let config = LlamaConfig::tiny();
//! let weights = random_tensors(&config, 7);
//! let f32_model = Model::from_tensors(config.clone(), &weights, Precision::F32).unwrap();
//! let int4_model = Model::from_tensors(config, &weights, Precision::Int4).unwrap();
//! assert!(int4_model.weight_bytes() * 3 < f32_model.weight_bytes());
//! let greedy = SamplingConfig { temperature: 0.0, max_new_tokens: 5, ..Default::default() };
//! let a = int4_model.generate(&[1, 2, 3], &greedy, &[]).unwrap();
//! assert_eq!(a, int4_model.generate(&[1, 2, 3], &greedy, &[]).unwrap());
//! ```
//!
//! Architecture invariant: this crate knows nothing of burn, training, tokenizers or
//! file formats beyond `covey-tensors`' safetensors; `covey-model` loads models into
//! it, `covey-onnx` is checked against it.

pub mod config;
pub mod engine;
pub mod error;
pub mod gemm;
pub mod kernels;
mod qdot;
pub mod sample;

pub use config::LlamaConfig;
pub use engine::{Model, Precision, Session, expected_shapes, random_tensors};
pub use error::{InferError, Result};
pub use kernels::Weight;
pub use qdot::KernelPath;
pub use sample::SamplingConfig;
