//! # covey-qlora
//!
//! LoRA fine-tuning of a Llama-style model on the CPU, with the base held **as the release
//! stores it** (int8, int4 or f32): the forward and backward passes are written out by
//! hand over `gemm`'s kernels, so no ML framework and no f32 copy of the base is needed.
//! What keeps a step small (see [`Trainer`]): layer recomputation, the base decoded one
//! layer at a time, a cross-entropy that never holds the logits of the whole vocabulary,
//! and gradients for the trained `B` factors only (FFA-LoRA: `A` is frozen and issued by
//! the coordinator).
//!
//! `covey-model` runs its local rounds through this crate ([`Trainer::accumulate`] per
//! micro-batch, then [`Trainer::step`]); its burn model is the reference the tests check
//! this crate's gradients against.
//!
//! ```
//! use covey_infer::{LlamaConfig, random_tensors};
//! use covey_qlora::{AdamW, Base, HostBatch, LoraSpec, Trainer};
//! use covey_tensors::lora::{LoraTarget, frozen_a};
//!
//! let config = LlamaConfig::tiny();
//! let weights = random_tensors(&config, 1);
//! let base = Base::from_tensors(&config, &weights).unwrap();
//! let spec = LoraSpec { rank: 4, scale: 2.0, targets: vec![LoraTarget::Q, LoraTarget::V], train_a: false };
//! let a = frozen_a(&weights, 4, &spec.targets, 7);
//! let mut trainer = Trainer::new(&base, &spec, &a, None, None).unwrap();
//! let batch = HostBatch { batch: 1, seq: 4, inputs: vec![1, 2, 3, 4], targets: vec![2, 3, 4, 5], weights: None };
//! let opt = AdamW { beta_1: 0.9, beta_2: 0.95, epsilon: 1e-8, weight_decay: 0.0 };
//! let first = trainer.accumulate(&batch, 1.0).unwrap();
//! for _ in 0..20 {
//!     trainer.step(1e-2, &opt);
//!     trainer.zero_grad();
//!     trainer.accumulate(&batch, 1.0).unwrap();
//! }
//! assert!(trainer.accumulate(&batch, 1.0).unwrap() < first);
//! ```

mod adapter;
mod base;
mod engine;
pub mod error;

pub use adapter::{FrozenAdapter, LoraSpec};
pub use base::Base;
pub use engine::{AdamW, HostBatch, Trainer};
pub use error::{QloraError, Result};
