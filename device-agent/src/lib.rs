//! # covey-agent
//!
//! The on-device runtime of Covey: local data, LoRA fine-tuning with differential
//! privacy (through `covey-model` and `covey-privacy`), the device's Ed25519 identity,
//! signing of adapter deltas, a gRPC client with retry, and local inference.
//!
//! Not built yet: this crate is a placeholder so the workspace has its final shape.
//! Architecture invariant: the agent never links the coordinator or its storage stack.
