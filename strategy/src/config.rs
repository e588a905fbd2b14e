//! The serde configuration of a strategy, as the coordinator embeds it in its TOML, and
//! [`build`], which validates it and returns the strategy.
//!
//! ```
//! use covey_strategy::{DpConfig, Randomness, StrategyConfig, build};
//!
//! let strategy: StrategyConfig = serde_json::from_str(r#"{"kind": "fed-adam", "eta": 0.05}"#).expect("config");
//! let dp: DpConfig = serde_json::from_str(
//!     r#"{"noise_multiplier": 1.1, "clip": {"kind": "adaptive", "initial": 0.5}}"#,
//! ).expect("dp");
//! let s = build(&strategy, Some(&dp), Randomness::Os).expect("valid");
//! assert_eq!(s.name(), "dp-adaptive(fed-adam)");
//! let ftrl: DpConfig = serde_json::from_str(
//!     r#"{"mechanism": "dp-ftrl", "noise_multiplier": 1.0, "clip": {"kind": "fixed", "norm": 1.0}, "tree_period": 8}"#,
//! ).expect("dp");
//! let s = build(&strategy, Some(&ftrl), Randomness::Os).expect("valid");
//! assert_eq!(s.name(), "dp-ftrl(fed-adam)");
//! ```

use covey_privacy::SecureRng;
use covey_privacy::adaptive::AdaptiveClipConfig;
use covey_privacy::tree::SeedSource;
use serde::{Deserialize, Serialize};

use crate::{
    CoordinateMedian, DpFedAvg, FedAvg, FedOpt, FedOptParams, FedProx, Optimizer, ServerUpdate, Strategy,
    StrategyError, TrimmedMean,
};

fn invalid(field: &'static str, value: f64, reason: &'static str) -> StrategyError {
    StrategyError::InvalidConfig { field, value: value.to_string(), reason }
}

/// `value` must be finite and > 0.
pub(crate) fn check_positive(field: &'static str, value: f64) -> Result<(), StrategyError> {
    if value.is_finite() && value > 0.0 { Ok(()) } else { Err(invalid(field, value, "must be finite and > 0")) }
}

/// `value` must be finite and ≥ 0.
pub(crate) fn check_non_negative(field: &'static str, value: f64) -> Result<(), StrategyError> {
    if value.is_finite() && value >= 0.0 { Ok(()) } else { Err(invalid(field, value, "must be finite and >= 0")) }
}

/// `value` must be in [0, 1).
pub(crate) fn check_unit_interval(field: &'static str, value: f64) -> Result<(), StrategyError> {
    if (0.0..1.0).contains(&value) { Ok(()) } else { Err(invalid(field, value, "must be in [0, 1)")) }
}

/// `value` must be in [0, 1].
pub(crate) fn check_quantile(field: &'static str, value: f64) -> Result<(), StrategyError> {
    if (0.0..=1.0).contains(&value) { Ok(()) } else { Err(invalid(field, value, "must be in [0, 1]")) }
}

/// `value` must be in [0, 0.5).
pub(crate) fn check_trim_fraction(field: &'static str, value: f64) -> Result<(), StrategyError> {
    if (0.0..0.5).contains(&value) { Ok(()) } else { Err(invalid(field, value, "must be in [0, 0.5)")) }
}

fn one() -> f64 {
    1.0
}
fn beta1() -> f64 {
    0.9
}
fn beta2() -> f64 {
    0.99
}
fn eta_adam() -> f64 {
    Optimizer::Adam.defaults().eta
}
fn tau_adam() -> f64 {
    Optimizer::Adam.defaults().tau
}
fn eta_yogi() -> f64 {
    Optimizer::Yogi.defaults().eta
}
fn tau_yogi() -> f64 {
    Optimizer::Yogi.defaults().tau
}
fn eta_adagrad() -> f64 {
    Optimizer::Adagrad.defaults().eta
}
fn beta1_adagrad() -> f64 {
    Optimizer::Adagrad.defaults().beta1
}
fn tau_adagrad() -> f64 {
    Optimizer::Adagrad.defaults().tau
}

/// Which strategy to run, tagged by `kind`. Omitted hyper-parameters take Flower's defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum StrategyConfig {
    /// [`FedAvg`].
    FedAvg {
        /// Server learning rate (default 1).
        #[serde(default = "one")]
        server_learning_rate: f64,
    },
    /// [`FedProx`].
    FedProx {
        /// Proximal coefficient μ ≥ 0.
        mu: f64,
        /// Server learning rate (default 1).
        #[serde(default = "one")]
        server_learning_rate: f64,
    },
    /// [`FedOpt`] with [`Optimizer::Adam`].
    FedAdam {
        /// Server learning rate η (default 0.1).
        #[serde(default = "eta_adam")]
        eta: f64,
        /// β₁ (default 0.9).
        #[serde(default = "beta1")]
        beta1: f64,
        /// β₂ (default 0.99).
        #[serde(default = "beta2")]
        beta2: f64,
        /// τ (default 1e-9).
        #[serde(default = "tau_adam")]
        tau: f64,
    },
    /// [`FedOpt`] with [`Optimizer::Yogi`].
    FedYogi {
        /// Server learning rate η (default 0.01).
        #[serde(default = "eta_yogi")]
        eta: f64,
        /// β₁ (default 0.9).
        #[serde(default = "beta1")]
        beta1: f64,
        /// β₂ (default 0.99).
        #[serde(default = "beta2")]
        beta2: f64,
        /// τ (default 1e-3).
        #[serde(default = "tau_yogi")]
        tau: f64,
    },
    /// [`FedOpt`] with [`Optimizer::Adagrad`].
    FedAdagrad {
        /// Server learning rate η (default 0.1).
        #[serde(default = "eta_adagrad")]
        eta: f64,
        /// β₁ (default 0: no momentum).
        #[serde(default = "beta1_adagrad")]
        beta1: f64,
        /// τ (default 1e-9).
        #[serde(default = "tau_adagrad")]
        tau: f64,
    },
    /// [`TrimmedMean`].
    TrimmedMean {
        /// Fraction trimmed at each end, in [0, 0.5).
        beta: f64,
    },
    /// [`CoordinateMedian`].
    Median {},
    /// [`crate::Krum`]: the one update closest to its `n − f − 2` nearest others.
    Krum {
        /// Fraction of the round's updates assumed Byzantine, in [0, 0.5) (default 0.1).
        #[serde(default = "byzantine_fraction")]
        byzantine_fraction: f64,
    },
    /// Multi-Krum: the mean of the `n − f` best-scored updates.
    MultiKrum {
        /// Fraction of the round's updates assumed Byzantine, in [0, 0.5) (default 0.1).
        #[serde(default = "byzantine_fraction")]
        byzantine_fraction: f64,
    },
    /// [`crate::GeometricMedian`] (RFA).
    GeometricMedian {
        /// Weiszfeld iterations at most (default 10).
        #[serde(default = "geometric_median_iterations")]
        max_iterations: usize,
        /// Smoothing ν > 0 (default 1e-6).
        #[serde(default = "geometric_median_smoothing")]
        smoothing: f64,
    },
}

fn byzantine_fraction() -> f64 {
    0.1
}
fn geometric_median_iterations() -> usize {
    crate::byzantine::GEOMETRIC_MEDIAN_ITERATIONS
}
fn geometric_median_smoothing() -> f64 {
    1e-6
}

impl Default for StrategyConfig {
    /// Plain FedAvg.
    fn default() -> Self {
        Self::FedAvg { server_learning_rate: 1.0 }
    }
}

impl StrategyConfig {
    /// The `kind` tag (`fed-avg`, ...), which is also the built strategy's name without DP.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::FedAvg { .. } => "fed-avg",
            Self::FedProx { .. } => "fed-prox",
            Self::FedAdam { .. } => "fed-adam",
            Self::FedYogi { .. } => "fed-yogi",
            Self::FedAdagrad { .. } => "fed-adagrad",
            Self::TrimmedMean { .. } => "trimmed-mean",
            Self::Median {} => "median",
            Self::Krum { .. } => "krum",
            Self::MultiKrum { .. } => "multi-krum",
            Self::GeometricMedian { .. } => "geometric-median",
        }
    }
}

/// Server-side differential privacy around a FedAvg-family strategy: DP-FedAvg (noise
/// per round, privacy from Poisson sampling) or DP-FTRL (tree-aggregated noise, privacy
/// from participation limits, no sampling assumption).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DpConfig {
    /// The mechanism (default `dp-fedavg`).
    #[serde(default)]
    pub mechanism: Mechanism,
    /// The round's total noise multiplier `z` (finite, > 0), as the accountant sees it
    /// (DP-FTRL: of every tree node).
    pub noise_multiplier: f64,
    /// How the clip norm is chosen (DP-FTRL: fixed only).
    pub clip: ClipConfig,
    /// DP-FTRL's server momentum β in [0, 1) (default 0: the step is the noisy mean, on
    /// the scale DP-FedAvg's server learning rate was tuned for; with β, a server
    /// learning rate near `1 − β` keeps the scale — DP-FTRLM of Kairouz et al.).
    #[serde(default = "ftrl_momentum")]
    pub momentum: f64,
    /// DP-FTRL: rounds per noise tree (a fresh tree after each). The coordinator sets it
    /// to `privacy.participation.min-separation` when absent, and refuses a longer one:
    /// a device must contribute at most once per tree.
    #[serde(default)]
    pub tree_period: Option<u64>,
}

impl DpConfig {
    /// DP-FedAvg with `noise_multiplier` and `clip`.
    pub fn fed_avg(noise_multiplier: f64, clip: ClipConfig) -> Self {
        Self { mechanism: Mechanism::DpFedAvg, noise_multiplier, clip, momentum: ftrl_momentum(), tree_period: None }
    }

    /// DP-FTRL with `noise_multiplier`, a fixed clip norm and a tree of `period` rounds.
    pub fn ftrl(noise_multiplier: f64, clip_norm: f64, period: u64) -> Self {
        Self {
            mechanism: Mechanism::DpFtrl,
            noise_multiplier,
            clip: ClipConfig::Fixed { norm: clip_norm },
            momentum: ftrl_momentum(),
            tree_period: Some(period),
        }
    }
}

fn ftrl_momentum() -> f64 {
    0.0
}

/// The central DP mechanism of [`DpConfig`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mechanism {
    /// DP-FedAvg ([`DpFedAvg`]): independent noise every round; the accountant assumes
    /// Poisson sampling of the cohort.
    #[default]
    DpFedAvg,
    /// DP-FTRL ([`crate::DpFtrl`]): tree-aggregated noise; the accountant uses the
    /// coordinator's participation limits and assumes no sampling.
    DpFtrl,
}

impl Mechanism {
    /// The name in configuration files and manifests.
    pub fn name(self) -> &'static str {
        match self {
            Mechanism::DpFedAvg => "dp-fedavg",
            Mechanism::DpFtrl => "dp-ftrl",
        }
    }
}

/// Where a private strategy's randomness comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Randomness {
    /// The operating system's CSPRNG (production): DP-FedAvg's generator is keyed from it
    /// and every DP-FTRL tree node takes 32 fresh bytes from it.
    Os,
    /// A fixed seed (simulations, tests, validation): reproducible, not private.
    Seeded([u8; 32]),
}

/// The clipping of [`DpConfig`], tagged by `kind`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum ClipConfig {
    /// A fixed clip norm.
    Fixed {
        /// The clip norm `C` (finite, > 0).
        norm: f64,
    },
    /// Quantile-tracking adaptive clipping (Andrew et al., 2021).
    Adaptive {
        /// Initial clip norm (finite, > 0).
        initial: f64,
        /// Target quantile γ of unclipped updates, in [0, 1] (default 0.5).
        #[serde(default = "default_quantile")]
        target_quantile: f64,
        /// Geometric learning rate η_C (finite, > 0; default 0.2).
        #[serde(default = "default_clip_lr")]
        learning_rate: f64,
        /// Standard deviation σ_b of the noise on the unclipped count (finite, > 0, and
        /// 2σ_b > noise_multiplier; default 5, the paper's m/20 for m = 100).
        #[serde(default = "default_count_noise")]
        count_noise_std: f64,
    },
}

fn default_quantile() -> f64 {
    AdaptiveClipConfig::default().target_quantile
}
fn default_clip_lr() -> f64 {
    AdaptiveClipConfig::default().learning_rate
}
fn default_count_noise() -> f64 {
    AdaptiveClipConfig::default().count_noise_std
}

/// Validate `config` (and `dp`) and build the strategy; with `dp`, the strategy is wrapped
/// in [`DpFedAvg`] or [`crate::DpFtrl`], which draw their noise from `randomness`.
///
/// Differential privacy wraps only the FedAvg family (`fed-avg`, `fed-prox`, `fed-adam`,
/// `fed-yogi`, `fed-adagrad`): the robust aggregators' (trimmed mean, median, Krum,
/// multi-Krum, geometric median) sensitivity is not that of a clipped mean.
pub fn build(
    config: &StrategyConfig,
    dp: Option<&DpConfig>,
    randomness: Randomness,
) -> Result<Box<dyn Strategy>, StrategyError> {
    use StrategyConfig as C;
    let opt = |optimizer, params| FedOpt::new(optimizer, params);
    match *config {
        C::FedAvg { server_learning_rate } => with_dp(FedAvg::new(server_learning_rate)?, dp, randomness),
        C::FedProx { mu, server_learning_rate } => {
            with_dp(FedProx::with_server_learning_rate(mu, server_learning_rate)?, dp, randomness)
        }
        C::FedAdam { eta, beta1, beta2, tau } => {
            with_dp(opt(Optimizer::Adam, FedOptParams { eta, beta1, beta2, tau })?, dp, randomness)
        }
        C::FedYogi { eta, beta1, beta2, tau } => {
            with_dp(opt(Optimizer::Yogi, FedOptParams { eta, beta1, beta2, tau })?, dp, randomness)
        }
        C::FedAdagrad { eta, beta1, tau } => {
            let beta2 = Optimizer::Adagrad.defaults().beta2;
            with_dp(opt(Optimizer::Adagrad, FedOptParams { eta, beta1, beta2, tau })?, dp, randomness)
        }
        C::TrimmedMean { beta } => without_dp(TrimmedMean::new(beta)?, config, dp),
        C::Median {} => without_dp(CoordinateMedian::new(), config, dp),
        C::Krum { byzantine_fraction } => without_dp(crate::Krum::new(byzantine_fraction)?, config, dp),
        C::MultiKrum { byzantine_fraction } => without_dp(crate::Krum::multi(byzantine_fraction)?, config, dp),
        C::GeometricMedian { max_iterations, smoothing } => {
            without_dp(crate::GeometricMedian::new(max_iterations, smoothing)?, config, dp)
        }
    }
}

fn with_dp<S: ServerUpdate + 'static>(
    inner: S,
    dp: Option<&DpConfig>,
    randomness: Randomness,
) -> Result<Box<dyn Strategy>, StrategyError> {
    let Some(dp) = dp else {
        return Ok(Box::new(inner));
    };
    let rng = match randomness {
        Randomness::Os => SecureRng::from_os()?,
        Randomness::Seeded(seed) => SecureRng::from_seed(seed),
    };
    if dp.mechanism == Mechanism::DpFtrl {
        let ClipConfig::Fixed { norm } = dp.clip else {
            return Err(invalid("clip", 0.0, "DP-FTRL needs a fixed clip norm (adaptive clipping is DP-FedAvg's)"));
        };
        let Some(period) = dp.tree_period else {
            return Err(invalid("tree_period", 0.0, "DP-FTRL needs a tree period (rounds per noise tree)"));
        };
        let seeds = match randomness {
            Randomness::Os => SeedSource::Os,
            Randomness::Seeded(_) => SeedSource::Rng(Box::new(rng)),
        };
        return Ok(Box::new(crate::DpFtrl::new(inner, dp.noise_multiplier, norm, dp.momentum, period, seeds)?));
    }
    Ok(match dp.clip {
        ClipConfig::Fixed { norm } => Box::new(DpFedAvg::fixed(inner, dp.noise_multiplier, norm, rng)?),
        ClipConfig::Adaptive { initial, target_quantile, learning_rate, count_noise_std } => {
            let clip = AdaptiveClipConfig { initial_clip: initial, target_quantile, learning_rate, count_noise_std };
            Box::new(DpFedAvg::adaptive(inner, dp.noise_multiplier, clip, rng)?)
        }
    })
}

fn without_dp<S: Strategy + 'static>(
    strategy: S,
    config: &StrategyConfig,
    dp: Option<&DpConfig>,
) -> Result<Box<dyn Strategy>, StrategyError> {
    match dp {
        None => Ok(Box::new(strategy)),
        Some(_) => Err(StrategyError::InvalidConfig {
            field: "dp",
            value: config.kind().to_string(),
            reason: "differential privacy wraps only fed-avg, fed-prox, fed-adam, fed-yogi and fed-adagrad",
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<StrategyConfig, serde_json::Error> {
        serde_json::from_str(json)
    }

    fn rng() -> Randomness {
        Randomness::Seeded([3; 32])
    }

    #[test]
    fn kinds_parse_with_defaults_and_round_trip() {
        let cases = [
            (r#"{"kind":"fed-avg"}"#, StrategyConfig::FedAvg { server_learning_rate: 1.0 }),
            (r#"{"kind":"fed-prox","mu":0.01}"#, StrategyConfig::FedProx { mu: 0.01, server_learning_rate: 1.0 }),
            (r#"{"kind":"fed-adam"}"#, StrategyConfig::FedAdam { eta: 0.1, beta1: 0.9, beta2: 0.99, tau: 1e-9 }),
            (
                r#"{"kind":"fed-yogi","eta":0.5}"#,
                StrategyConfig::FedYogi { eta: 0.5, beta1: 0.9, beta2: 0.99, tau: 1e-3 },
            ),
            (r#"{"kind":"fed-adagrad"}"#, StrategyConfig::FedAdagrad { eta: 0.1, beta1: 0.0, tau: 1e-9 }),
            (r#"{"kind":"trimmed-mean","beta":0.1}"#, StrategyConfig::TrimmedMean { beta: 0.1 }),
            (r#"{"kind":"median"}"#, StrategyConfig::Median {}),
            (r#"{"kind":"krum"}"#, StrategyConfig::Krum { byzantine_fraction: 0.1 }),
            (
                r#"{"kind":"multi-krum","byzantine_fraction":0.2}"#,
                StrategyConfig::MultiKrum { byzantine_fraction: 0.2 },
            ),
            (r#"{"kind":"geometric-median"}"#, StrategyConfig::GeometricMedian { max_iterations: 10, smoothing: 1e-6 }),
        ];
        for (json, want) in cases {
            let got = parse(json).expect(json);
            assert_eq!(got, want, "{json}");
            let again = parse(&serde_json::to_string(&got).expect("ser")).expect("re-parse");
            assert_eq!(again, want);
            let built = build(&got, None, rng()).expect(json);
            assert_eq!(built.name(), got.kind());
        }
        assert_eq!(StrategyConfig::default().kind(), "fed-avg");
    }

    #[test]
    fn unknown_kinds_and_fields_are_refused() {
        for json in [
            r#"{"kind":"fed-sgd"}"#,
            r#"{"kind":"fed-avg","lr":1.0}"#,
            r#"{"kind":"fed-adagrad","beta2":0.9}"#,
            r#"{"kind":"median","beta":0.1}"#,
            r#"{"kind":"trimmed-mean"}"#,
            r#"{"kind":"fed-prox"}"#,
        ] {
            assert!(parse(json).is_err(), "{json} should be refused");
        }
        assert!(
            serde_json::from_str::<DpConfig>(r#"{"noise_multiplier":1,"clip":{"kind":"fixed","norm":1,"x":2}}"#)
                .is_err()
        );
        assert!(
            serde_json::from_str::<DpConfig>(r#"{"noise_multiplier":1,"clip":{"kind":"fixed","norm":1},"x":2}"#)
                .is_err()
        );
    }

    #[test]
    fn out_of_range_values_name_the_field() {
        let cases = [
            (StrategyConfig::FedAvg { server_learning_rate: 0.0 }, "server_learning_rate"),
            (StrategyConfig::FedProx { mu: -1.0, server_learning_rate: 1.0 }, "mu"),
            (StrategyConfig::FedAdam { eta: -0.1, beta1: 0.9, beta2: 0.99, tau: 1e-9 }, "eta"),
            (StrategyConfig::FedYogi { eta: 0.1, beta1: 1.0, beta2: 0.99, tau: 1e-9 }, "beta1"),
            (StrategyConfig::FedAdam { eta: 0.1, beta1: 0.9, beta2: f64::NAN, tau: 1e-9 }, "beta2"),
            (StrategyConfig::FedAdagrad { eta: 0.1, beta1: 0.0, tau: 0.0 }, "tau"),
            (StrategyConfig::TrimmedMean { beta: 0.5 }, "beta"),
        ];
        for (config, field) in cases {
            match build(&config, None, rng()) {
                Err(StrategyError::InvalidConfig { field: f, .. }) => assert_eq!(f, field, "{config:?}"),
                Err(other) => panic!("{config:?}: unexpected error {other}"),
                Ok(s) => panic!("{config:?}: built {}", s.name()),
            }
        }
    }

    #[test]
    fn dp_sections_are_validated_and_wrap_only_the_fedavg_family() {
        let fixed = DpConfig::fed_avg(1.0, ClipConfig::Fixed { norm: 1.0 });
        let s =
            build(&StrategyConfig::FedProx { mu: 0.1, server_learning_rate: 1.0 }, Some(&fixed), rng()).expect("dp");
        assert_eq!(s.name(), "dp-fixed(fed-prox)");
        for config in [
            StrategyConfig::Median {},
            StrategyConfig::TrimmedMean { beta: 0.1 },
            StrategyConfig::Krum { byzantine_fraction: 0.1 },
            StrategyConfig::MultiKrum { byzantine_fraction: 0.1 },
            StrategyConfig::GeometricMedian { max_iterations: 10, smoothing: 1e-6 },
        ] {
            assert!(matches!(
                build(&config, Some(&fixed), rng()),
                Err(StrategyError::InvalidConfig { field: "dp", .. })
            ));
        }
        let adaptive = |z: f64, initial: f64, q: f64, lr: f64, sb: f64| {
            DpConfig::fed_avg(
                z,
                ClipConfig::Adaptive { initial, target_quantile: q, learning_rate: lr, count_noise_std: sb },
            )
        };
        let cases = [
            (adaptive(0.0, 1.0, 0.5, 0.2, 5.0), "noise_multiplier"),
            (adaptive(1.0, -1.0, 0.5, 0.2, 5.0), "clip.initial"),
            (adaptive(1.0, 1.0, 1.5, 0.2, 5.0), "clip.target_quantile"),
            (adaptive(1.0, 1.0, 0.5, 0.0, 5.0), "clip.learning_rate"),
            (adaptive(1.0, 1.0, 0.5, 0.2, 0.4), "clip.count_noise_std"),
            (DpConfig::fed_avg(1.0, ClipConfig::Fixed { norm: f64::INFINITY }), "clip.norm"),
            (DpConfig { tree_period: None, ..DpConfig::ftrl(1.0, 1.0, 8) }, "tree_period"),
            (DpConfig { clip: adaptive(1.0, 1.0, 0.5, 0.2, 5.0).clip, ..DpConfig::ftrl(1.0, 1.0, 8) }, "clip"),
            (DpConfig { momentum: 1.0, ..DpConfig::ftrl(1.0, 1.0, 8) }, "momentum"),
            (DpConfig::ftrl(1.0, 1.0, 0), "tree_period"),
            (DpConfig::ftrl(-1.0, 1.0, 8), "noise_multiplier"),
        ];
        for (dp, field) in cases {
            match build(&StrategyConfig::default(), Some(&dp), rng()) {
                Err(StrategyError::InvalidConfig { field: f, .. }) => assert_eq!(f, field, "{dp:?}"),
                Err(other) => panic!("{dp:?}: unexpected error {other}"),
                Ok(s) => panic!("{dp:?}: built {}", s.name()),
            }
        }
        let parsed: DpConfig =
            serde_json::from_str(r#"{"noise_multiplier":1.0,"clip":{"kind":"adaptive","initial":0.3}}"#).expect("dp");
        assert_eq!(parsed, adaptive(1.0, 0.3, 0.5, 0.2, 5.0));
        let ftrl = build(&StrategyConfig::default(), Some(&DpConfig::ftrl(1.0, 1.0, 8)), rng()).expect("ftrl");
        assert_eq!(ftrl.name(), "dp-ftrl(fed-avg)");
        let err = serde_json::from_str::<DpConfig>(
            r#"{"mechanism":"dp-sgd","noise_multiplier":1.0,"clip":{"kind":"fixed","norm":1.0}}"#,
        )
        .expect_err("mechanism")
        .to_string();
        assert!(err.contains("dp-sgd") && err.contains("dp-ftrl"), "{err}");
    }
}
