//! # covey-privacy
//!
//! Differential privacy for Covey: L2 clipping of whole updates and per-example
//! gradients, Gaussian noise from a cryptographically secure generator, an RDP
//! accountant for the subsampled Gaussian (PLD as the tighter option), noise
//! calibration, adaptive clipping and per-device privacy budgets.
//!
//! Not built yet: this crate is a placeholder so the workspace has its final shape.
//! It will know nothing of burn or gRPC: it works on flat `f32` vectors and typed
//! wrappers (`Clipped`, `Privatized`) so that skipping a step does not compile.
