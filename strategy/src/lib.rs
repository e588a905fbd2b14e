//! # covey-strategy
//!
//! Federated aggregation strategies for Covey, modelled on Flower's `Strategy` API but
//! pure policy: synchronous, free of I/O, and deterministic given their inputs (and,
//! for differential privacy, their seeded generator). The coordinator owns the sockets,
//! verification, sampling and the privacy accountant; a strategy only says what to ask
//! clients to do ([`Strategy::configure_round`]) and turns the round's verified client
//! deltas into the step to apply to the global LoRA adapter ([`Strategy::aggregate`]).
//!
//! * [`FedAvg`] and [`FedProx`]: example-weighted mean, streamed (memory independent of
//!   the number of updates), with a server learning rate ([`fedavg`]).
//! * [`FedOpt`]: FedAdam, FedYogi and FedAdagrad server optimisers of Reddi et al.
//!   (ICLR 2021) on the weighted mean delta ([`server_opt`]).
//! * [`TrimmedMean`] and [`CoordinateMedian`]: unweighted robust aggregators ([`robust`]).
//! * [`Krum`] (and multi-Krum) and [`GeometricMedian`] (RFA): robust aggregators over
//!   whole updates ([`byzantine`]).
//! * [`DpFedAvg`]: server-side DP-FedAvg with fixed or adaptive clipping, wrapping any
//!   [`ServerUpdate`] (the FedAvg and server-optimiser family) ([`dp`]).
//! * [`DpFtrl`]: server-side DP-FTRL with momentum (tree-aggregated noise, no sampling
//!   assumption), wrapping the same family ([`ftrl`]).
//! * [`StrategyConfig`], [`DpConfig`] and [`build`]: the serde configuration the
//!   coordinator embeds in its TOML ([`config`]).
//! * [`conformance::check_strategy`]: the property suite every strategy must pass.
//!
//! Strategies persist their state ([`Strategy::state`], a serde [`StrategyState`]) so a
//! coordinator can resume after a crash.
//!
//! ```
//! use covey_strategy::{ClientUpdate, FedAvg, RoundContext, Strategy};
//! use covey_tensors::{HostTensor, NamedTensors};
//!
//! let update = |client: &str, n: u64, x: f32| {
//!     let mut delta = NamedTensors::new();
//!     delta.insert("lora_A".into(), HostTensor::new(vec![2], vec![x, -x]).expect("tensor"));
//!     ClientUpdate { client: client.into(), num_examples: n, delta, within_clip: None }
//! };
//! let mut strategy: Box<dyn Strategy> = Box::new(FedAvg::default());
//! let ctx = RoundContext { round: 1, expected_clients: 2, population: 10 };
//! let mut updates = vec![update("a", 1, 1.0), update("b", 3, 5.0)].into_iter();
//! let agg = strategy.aggregate(&ctx, &mut updates, 0).expect("aggregate").expect("some updates");
//! // (1·1 + 3·5) / 4 = 4
//! assert_eq!(agg.step["lora_A"].data, vec![4.0, -4.0]);
//! assert_eq!((agg.num_updates, agg.total_examples), (2, 4));
//! assert!(agg.privacy.is_none());
//! ```

pub mod byzantine;
mod common;
pub mod config;
pub mod conformance;
pub mod dp;
pub mod fedavg;
pub mod ftrl;
pub mod robust;
pub mod server_opt;
pub mod state;

use covey_tensors::NamedTensors;

pub use byzantine::{GeometricMedian, Krum};
pub use config::{ClipConfig, DpConfig, Mechanism, Randomness, StrategyConfig, build};
pub use dp::DpFedAvg;
pub use fedavg::{FedAvg, FedProx};
pub use ftrl::DpFtrl;
pub use robust::{CoordinateMedian, TrimmedMean};
pub use server_opt::{FedOpt, FedOptParams, Optimizer};
pub use state::StrategyState;

/// One verified client update: the delta (PEFT-named LoRA factors, relative to the
/// round's starting point) and its weight.
///
/// `Debug` prints shapes and norms only (through [`covey_tensors::HostTensor`]'s `Debug`),
/// never values.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientUpdate {
    /// Who sent it (used in error messages).
    pub client: String,
    /// Number of local training examples: the weight of example-weighted strategies.
    pub num_examples: u64,
    /// The delta, by tensor name.
    pub delta: NamedTensors,
    /// For adaptive clipping: whether the client's pre-clip update norm was at most the
    /// round's clip norm. `None`: the server judges from the norm it receives.
    pub within_clip: Option<bool>,
}

/// What the strategy asks clients to do this round.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RoundConfig {
    /// Clip norm of the round, where the strategy clips (DP): clients may clip to it and
    /// report [`ClientUpdate::within_clip`]. The server clips again regardless.
    pub clip_norm: Option<f64>,
    /// FedProx proximal coefficient μ for the client objective (0: plain local training).
    pub proximal_mu: f64,
}

/// The outcome of one round's aggregation.
#[derive(Debug, Clone, PartialEq)]
pub struct Aggregate {
    /// The delta to add to the global adapter, by tensor name.
    pub step: NamedTensors,
    /// Number of client updates aggregated.
    pub num_updates: usize,
    /// Sum of their `num_examples`.
    pub total_examples: u64,
    /// What this release costs in privacy, for the coordinator's accountant (`None`:
    /// the strategy adds no noise).
    pub privacy: Option<PrivacyEvent>,
}

/// One Gaussian-mechanism release, as the coordinator's accountant composes it
/// (`RdpAccountant::compose_subsampled_gaussian(sampling_rate, noise_multiplier, 1)`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PrivacyEvent {
    /// The round's total noise multiplier `z` (with adaptive clipping: of the updates and
    /// the clip count together).
    pub noise_multiplier: f64,
    /// The clip norm `C` applied to each update this round.
    pub clip_norm: f64,
    /// Sampling rate `q = expected_clients / population`.
    pub sampling_rate: f64,
}

/// Facts about the round the coordinator is running.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoundContext {
    /// Round number (1-based by convention; strategies do not depend on it).
    pub round: u64,
    /// Number of clients sampled for the round (DP-FedAvg divides by it).
    pub expected_clients: usize,
    /// Number of clients the round was sampled from.
    pub population: usize,
}

/// A federated aggregation strategy. Object safe: the coordinator holds a `Box<dyn Strategy>`.
pub trait Strategy: Send {
    /// Short name (`fed-avg`, `fed-adam`, `dp-fixed(fed-avg)`, ...); [`Strategy::restore`]
    /// refuses state written under another name.
    fn name(&self) -> String;

    /// What clients should do this round. Default: plain local training, no clip norm.
    fn configure_round(&mut self, ctx: &RoundContext) -> RoundConfig {
        let _ = ctx;
        RoundConfig::default()
    }

    /// Aggregate the round's verified updates into a step.
    ///
    /// Streamed: `updates` yields one update at a time; the FedAvg family (and DP-FedAvg)
    /// keep one accumulator, so memory does not grow with the number of updates; the
    /// robust aggregators collect them. `failures` is the number of clients that did not
    /// deliver (informational). No updates: `Ok(None)`, and the state is unchanged.
    /// On error the round is lost but the state is unchanged.
    fn aggregate(
        &mut self,
        ctx: &RoundContext,
        updates: &mut dyn Iterator<Item = ClientUpdate>,
        failures: usize,
    ) -> Result<Option<Aggregate>, StrategyError>;

    /// The state to persist (server optimiser moments, adaptive clip norm, round counter).
    fn state(&self) -> Result<StrategyState, StrategyError>;

    /// Resume from [`Strategy::state`] of a strategy of the same name.
    fn restore(&mut self, state: StrategyState) -> Result<(), StrategyError>;
}

/// A strategy whose aggregation is "mean delta → step": the FedAvg and server-optimiser
/// family. [`DpFedAvg`] computes a clipped, noised mean itself and hands it to
/// [`ServerUpdate::server_step`]; robust aggregators are not `ServerUpdate`s because their
/// sensitivity is not that of a clipped mean.
pub trait ServerUpdate: Strategy {
    /// Turn the round's mean delta (the pseudo-gradient) into the step to apply, advancing
    /// any server optimiser state. Fails, leaving the state unchanged, if a tensor's shape
    /// disagrees with the state kept for its name.
    fn server_step(&mut self, mean_delta: NamedTensors) -> Result<NamedTensors, StrategyError>;
}

/// Everything that can go wrong in `covey-strategy`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StrategyError {
    /// An update lacks a tensor the round's first update has.
    #[error("update from {client} lacks tensor `{tensor}`")]
    MissingTensor {
        /// The client.
        client: String,
        /// The tensor.
        tensor: String,
    },
    /// An update has a tensor the round's first update lacks.
    #[error("update from {client} has unexpected tensor `{tensor}`")]
    UnexpectedTensor {
        /// The client.
        client: String,
        /// The tensor.
        tensor: String,
    },
    /// An update's tensor has another shape than in the round's first update.
    #[error("update from {client}: tensor `{tensor}` has shape {found:?}, expected {expected:?}")]
    ShapeMismatch {
        /// The client.
        client: String,
        /// The tensor.
        tensor: String,
        /// Shape in the first update.
        expected: Vec<usize>,
        /// Shape in this update.
        found: Vec<usize>,
    },
    /// An update's tensor holds a number of values other than its shape's product.
    #[error("update from {client}: tensor `{tensor}` has shape {shape:?} but {values} values")]
    MalformedTensor {
        /// The client.
        client: String,
        /// The tensor.
        tensor: String,
        /// Its shape.
        shape: Vec<usize>,
        /// Its number of values.
        values: usize,
    },
    /// An update's tensor holds NaN or infinity.
    #[error("update from {client}: tensor `{tensor}` holds NaN or infinite values")]
    NonFinite {
        /// The client.
        client: String,
        /// The tensor.
        tensor: String,
    },
    /// Every update of an example-weighted strategy reported zero examples.
    #[error("the {updates} updates report 0 examples in total: the weighted mean is undefined")]
    ZeroTotalWeight {
        /// Number of updates.
        updates: usize,
    },
    /// The round context cannot be used (e.g. DP with no expected clients).
    #[error("invalid round context: {field} = {value}: {reason}")]
    InvalidContext {
        /// The field of [`RoundContext`].
        field: &'static str,
        /// Its value.
        value: usize,
        /// Why it is invalid.
        reason: &'static str,
    },
    /// A configuration value is out of range.
    #[error("invalid strategy configuration: {field} = {value}: {reason}")]
    InvalidConfig {
        /// The configuration field.
        field: &'static str,
        /// The value given, rendered.
        value: String,
        /// Why it is invalid.
        reason: &'static str,
    },
    /// A state was written by another strategy.
    #[error("state was written by strategy `{found}`, cannot restore it into `{expected}`")]
    StateMismatch {
        /// This strategy's name.
        expected: String,
        /// The name in the state.
        found: String,
    },
    /// A state lacks an entry this strategy needs.
    #[error("state of `{strategy}` lacks `{key}`")]
    StateMissing {
        /// The strategy.
        strategy: String,
        /// The missing scalar, tensor or nested state.
        key: String,
    },
    /// A state entry cannot be used.
    #[error("state of `{strategy}`: `{key}` {reason}")]
    StateInvalid {
        /// The strategy.
        strategy: String,
        /// The entry.
        key: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A tensor's shape disagrees with the server state kept for its name (e.g. moments).
    #[error("tensor `{tensor}` has shape {found:?} but the server state holds {expected:?}")]
    StateShape {
        /// The tensor.
        tensor: String,
        /// Shape in the state.
        expected: Vec<usize>,
        /// Shape of the delta.
        found: Vec<usize>,
    },
    /// A differential-privacy parameter was refused by `covey-privacy`.
    #[error(transparent)]
    Privacy(#[from] covey_privacy::PrivacyError),
}

/// Result alias of this crate.
pub type Result<T, E = StrategyError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;
    use covey_tensors::HostTensor;

    #[test]
    fn client_update_debug_prints_no_values() {
        let mut delta = NamedTensors::new();
        delta.insert("w".into(), HostTensor::new(vec![2], vec![0.123_456_7, 0.765_432_1]).expect("tensor"));
        let u = ClientUpdate { client: "c".into(), num_examples: 3, delta, within_clip: Some(true) };
        let s = format!("{u:?}");
        assert!(!s.contains("0.123") && !s.contains("0.765"), "{s}");
        assert!(s.contains("shape"), "{s}");
    }

    #[test]
    fn strategy_is_object_safe_and_send() {
        fn assert_send<T: Send>(_: &T) {}
        let s: Box<dyn Strategy> = Box::new(FedAvg::default());
        assert_send(&s);
        assert_eq!(s.name(), "fed-avg");
    }

    #[test]
    fn errors_name_client_and_tensor() {
        let e = StrategyError::ShapeMismatch {
            client: "dev-7".into(),
            tensor: "q_proj.lora_A".into(),
            expected: vec![4, 8],
            found: vec![4, 9],
        };
        let s = e.to_string();
        assert!(s.contains("dev-7") && s.contains("q_proj.lora_A"), "{s}");
    }
}
