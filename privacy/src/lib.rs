//! # covey-privacy
//!
//! Differential privacy for Covey, on flat `f32` vectors and typed wrappers; it knows
//! nothing of burn or gRPC.
//!
//! * [`clip`]: L2 clipping of a whole update (user-level DP, DP-FedAvg) or per example
//!   (DP-SGD). Returns a [`Clipped`].
//! * [`noise`]: Gaussian noise `N(0, (z·C)²)` from an OS-keyed ChaCha20 generator,
//!   snapped to a grid against floating-point attacks. Takes a [`Clipped`], returns a
//!   [`Privatized`] — the only type an uploader should accept, so that skipping a step
//!   does not compile.
//! * [`rdp`]: the RDP accountant of the Poisson-subsampled Gaussian, matching Google's
//!   `dp_accounting` to a relative 1e-6 (checked-in test vectors).
//! * [`pld`]: the PLD accountant of the same mechanism (connect-the-dots discretisation,
//!   FFT composition), tighter than RDP, matching `dp_accounting`'s PLD within 1 %.
//! * [`accountant`]: which accountant ([`Accountant`]: `rdp` or `pld`) and ε of a run's
//!   releases under it — the one place callers choose.
//! * [`tree`]: DP-FTRL's tree-aggregated Gaussian noise (restart variant), regenerated
//!   from per-node seeds, behind the [`tree::CorrelatedNoise`] trait; its sensitivity
//!   under participation limits, for [`Accountant::epsilon_without_sampling`].
//! * [`audit`]: the empirical lower bound on ε from one training run with canaries
//!   (Steinke, Nasr and Jagielski 2023).
//! * [`calibrate`]: the smallest noise multiplier for a target (ε, δ).
//! * [`zcdp`]: zCDP of the plain Gaussian and its (ε, δ) conversion.
//! * [`adaptive`]: quantile-tracking adaptive clipping and its noise split.
//! * [`ledger`]: a persisted per-device budget ledger that refuses overspending.
//! * [`sampling`]: Poisson sampling of cohorts, the sampling the accountant assumes.
//!
//! ## Quick start
//!
//! ```
//! use covey_privacy::{clip::{clip, ClipNorm}, noise::{privatize, NoiseMultiplier, SecureRng}, rdp};
//!
//! let c = ClipNorm::new(1.0).unwrap();
//! let clipped = clip(vec![3.0, 4.0], c).unwrap();           // norm 5 → 1
//! assert!((covey_privacy::clip::l2_norm(clipped.values()) - 1.0).abs() < 1e-6);
//! let z = NoiseMultiplier::new(1.1).unwrap();
//! let private = privatize(clipped, z, &mut SecureRng::from_os().unwrap());
//! assert_eq!(private.values().len(), 2);
//! // 100 rounds, 1% of the clients each round, at δ = 1e-5:
//! let (eps, _order) = rdp::epsilon(0.01, 1.1, 100, 1e-5).unwrap();
//! assert!(eps > 0.1 && eps < 1.0);
//! ```

pub mod accountant;
pub mod adaptive;
pub mod audit;
pub mod calibrate;
pub mod clip;
pub mod error;
pub mod ledger;
pub mod noise;
pub mod pld;
pub mod rdp;
pub mod sampling;
pub mod tree;
pub mod zcdp;

pub use accountant::{Accountant, SampledGaussian};
pub use clip::{ClipNorm, Clipped};
pub use error::{PrivacyError, Result};
pub use ledger::{Budget, BudgetLedger};
pub use noise::{NoiseMultiplier, Privatized, SecureRng};
pub use pld::PldAccountant;
pub use rdp::RdpAccountant;
