//! # covey-model
//!
//! The student language model of Covey, on [burn](https://burn.dev) 0.22: a
//! Llama-style decoder (RMSNorm, RoPE, SwiGLU, grouped-query attention) that
//! carries LoRA adapters, with the tooling around it — tokenizers, corpora,
//! training, evaluation, generation with a KV cache, and safetensors
//! checkpoints under Hugging Face (base) and PEFT (adapter) names.
//!
//! ## Quick start
//!
//! ```
//! use covey_model::{LlamaConfig, Llama, LoraConfig, cpu_device};
//! use burn::tensor::{Int, Tensor, TensorData};
//!
//! let device = cpu_device();
//! let model = Llama::init(&LlamaConfig::tiny(), 0, &device).unwrap();
//! let tokens = Tensor::<2, Int>::from_data(TensorData::new(vec![72i64, 105], [1, 2]), &device);
//! let base = model.forward(tokens.clone());
//! // A fresh adapter has B = 0, so the model is unchanged.
//! let tuned = model.with_lora(&LoraConfig::default(), &device).unwrap();
//! let same = tuned.forward(tokens);
//! assert_eq!(base.into_data(), same.into_data());
//! ```
//!
//! ## Feature flags
//!
//! * `gpu` — the wgpu backend (Vulkan, Metal, DX12) through [`gpu_device`]. Off by
//!   default; the CPU backend is burn's `flex`.
//!
//! Architecture invariant: this crate knows nothing of gRPC, differential privacy or
//! aggregation. It exposes plain host tensors ([`NamedTensors`], from `covey-tensors`)
//! for those layers; [`local_round`] runs one client's local FFA-LoRA round on them.

pub mod batch;
pub mod checkpoint;
pub mod config;
pub mod data;
pub mod distill;
pub mod error;
pub mod eval;
pub mod generate;
mod init;
pub mod keyboard;
pub mod llama;
pub mod local_round;
pub mod lora;
pub mod personal;
pub mod prune;
pub mod train;

pub use checkpoint::{HostTensor, NamedTensors};
pub use config::{LlamaConfig, LoraConfig, LoraTarget};
pub use covey_artifact::{LoadedModel, artifact, chat, export, gguf_import, tokenizer};
pub use covey_infer::{KernelPath, Model as InferenceModel, Precision};
pub use covey_qlora::FrozenAdapter;
pub use error::{ModelError, Result};
pub use eval::EvalMetrics;
pub use generate::SamplingConfig;
pub use llama::{KvCache, Llama};
pub use local_round::{
    AdapterRun, ChatFormat, ExampleDp, LocalResult, LocalRound, LocalTrainSpec, NoiseSource, Resume, RoundBase,
    RoundProgress, TrainedAdapter, evaluate_texts, seeded_a, tokenize_corpus, train_adapter, train_local_adapter,
    train_local_adapter_burn, train_local_adapter_private,
};
pub use tokenizer::Tokenizer;
pub use train::TrainConfig;

use burn::tensor::Device;

/// The CPU device (burn's `flex` backend). Always build devices explicitly: with the
/// `gpu` feature on, `Device::default()` would pick wgpu.
pub fn cpu_device() -> Device {
    Device::flex()
}

/// The default wgpu device (first high-performance adapter).
#[cfg(feature = "gpu")]
pub fn gpu_device() -> Device {
    Device::wgpu(burn::tensor::DeviceKind::DefaultDevice)
}

#[cfg(test)]
mod tests;
