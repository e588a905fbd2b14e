//! Server-side DP-FTRL with momentum (Kairouz, McMahan, Song, Thakkar, Thakurta and Xu,
//! ICML 2021; the mechanism behind Gboard's DP language models): differential privacy
//! without any sampling assumption, from tree-aggregated noise and participation limits.
//!
//! # Mechanism
//!
//! Each round `t` (the round id: rounds that release nothing leave a gap), with
//! `m = expected_clients`:
//!
//! 1. every incoming delta is clipped to global L2 norm `C` and the clipped deltas are
//!    summed with uniform weights (as [`crate::DpFedAvg`]);
//! 2. the tree's noise for step `t` ([`covey_privacy::tree::TreeNoise`], a fresh tree
//!    every `period` rounds), times `z·C`, is added, snapped to the grid of
//!    [`covey_privacy::noise::snapping_grid`]: the running sum of these releases is the
//!    noisy prefix sum of DP-FTRL, whose noise has `O(log period)` nodes;
//! 3. the noisy sum is divided by `m` (the fixed-denominator mean);
//! 4. server momentum `v ← β·v + mean` (the DP-FTRLM of the paper), and `v` is handed
//!    to the wrapped strategy's [`ServerUpdate::server_step`] (FedAvg's learning rate):
//!    post-processing, free in privacy.
//!
//! The privacy guarantee needs the coordinator to keep each device to one contribution
//! per tree (`privacy.participation.min-separation ≥ period`) and to bound its
//! contributions (`max-participations`); the accountant then treats the whole run as one
//! Gaussian mechanism of squared sensitivity `k · depth(period)`
//! ([`covey_privacy::tree::CorrelatedNoise::sensitivity_squared`]). The
//! [`PrivacyEvent`] of a round therefore reports `sampling_rate = 1`: nothing is
//! amplified by sampling.

use covey_privacy::noise::snapping_grid;
use covey_privacy::tree::{CorrelatedNoise, SeedSource, TreeNoise, TreeState};
use covey_tensors::{HostTensor, NamedTensors};

use crate::common::{clipped_sum, private_denominator};
use crate::config::check_positive;
use crate::{
    Aggregate, ClientUpdate, PrivacyEvent, RoundConfig, RoundContext, ServerUpdate, Strategy, StrategyError,
    StrategyState,
};

const TREE: &str = "tree";
const VELOCITY: &str = "velocity.";

/// DP-FTRL around a [`ServerUpdate`] strategy. See the [module documentation](self).
#[derive(Debug)]
pub struct DpFtrl<S> {
    inner: S,
    noise_multiplier: f64,
    clip_norm: f64,
    momentum: f64,
    tree: TreeNoise,
    velocity: Option<NamedTensors>,
}

impl<S: ServerUpdate> DpFtrl<S> {
    /// DP-FTRL with clip norm `clip_norm`, noise multiplier `noise_multiplier` (per tree
    /// node), server momentum `momentum` in [0, 1), and a noise tree restarted every
    /// `period` rounds whose node seeds come from `seeds` ([`SeedSource::Os`] in
    /// production).
    pub fn new(
        inner: S,
        noise_multiplier: f64,
        clip_norm: f64,
        momentum: f64,
        period: u64,
        seeds: SeedSource,
    ) -> Result<Self, StrategyError> {
        check_positive("noise_multiplier", noise_multiplier)?;
        check_positive("clip.norm", clip_norm)?;
        if !(0.0..1.0).contains(&momentum) {
            return Err(StrategyError::InvalidConfig {
                field: "momentum",
                value: momentum.to_string(),
                reason: "must be in [0, 1)",
            });
        }
        let tree = TreeNoise::new(period, seeds).map_err(|_| StrategyError::InvalidConfig {
            field: "tree_period",
            value: period.to_string(),
            reason: "a tree covers at least one round",
        })?;
        Ok(Self { inner, noise_multiplier, clip_norm, momentum, tree, velocity: None })
    }

    /// The noise tree (its period and the squared sensitivity the accountant uses).
    pub fn tree(&self) -> &TreeNoise {
        &self.tree
    }
}

impl<S: ServerUpdate> Strategy for DpFtrl<S> {
    fn name(&self) -> String {
        format!("dp-ftrl({})", self.inner.name())
    }

    fn configure_round(&mut self, ctx: &RoundContext) -> RoundConfig {
        RoundConfig { clip_norm: Some(self.clip_norm), ..self.inner.configure_round(ctx) }
    }

    fn aggregate(
        &mut self,
        ctx: &RoundContext,
        updates: &mut dyn Iterator<Item = ClientUpdate>,
        _failures: usize,
    ) -> Result<Option<Aggregate>, StrategyError> {
        let m = private_denominator(ctx)?;
        let c = self.clip_norm;
        let (mut acc, _) = clipped_sum(updates, c)?;
        if acc.count == 0 {
            return Ok(None);
        }
        let dim: usize = acc.sums_mut().map(|s| s.len()).sum();
        // A round that fails after this point rewinds the tree: the state stays unchanged.
        let before = self.tree.state().clone();
        let noise = self.tree.noise_for_step(ctx.round, dim).map_err(|_| StrategyError::InvalidContext {
            field: "round",
            value: ctx.round as usize,
            reason: "DP-FTRL's noise tree needs round numbers that increase, and fresh seeds from the OS",
        })?;
        let sigma = self.noise_multiplier * c;
        let grid = snapping_grid(sigma);
        let mut offset = 0;
        for sum in acc.sums_mut() {
            for (s, z) in sum.iter_mut().zip(&noise[offset..]) {
                *s = ((*s + sigma * z) / grid).round() * grid;
            }
            offset += sum.len();
        }
        let (num_updates, total_examples) = (acc.count, acc.total_examples);
        let mean = acc.finish(m as f64);
        let velocity = match &self.velocity {
            None => mean,
            Some(v) => mean
                .into_iter()
                .map(|(name, t)| {
                    let data = match v.get(&name) {
                        Some(old) if old.shape == t.shape => t
                            .data
                            .iter()
                            .zip(&old.data)
                            .map(|(&x, &o)| (self.momentum * f64::from(o) + f64::from(x)) as f32)
                            .collect(),
                        _ => t.data,
                    };
                    (name, HostTensor { shape: t.shape, data })
                })
                .collect(),
        };
        let step = match self.inner.server_step(velocity.clone()) {
            Ok(step) => step,
            Err(e) => {
                self.tree.rewind(before).expect("a state the tree itself held");
                return Err(e);
            }
        };
        self.velocity = Some(velocity);
        let privacy = PrivacyEvent { noise_multiplier: self.noise_multiplier, clip_norm: c, sampling_rate: 1.0 };
        Ok(Some(Aggregate { step, num_updates, total_examples, privacy: Some(privacy) }))
    }

    fn state(&self) -> Result<StrategyState, StrategyError> {
        let mut s = StrategyState::new(self.name());
        let tree = serde_json::to_string(self.tree.state()).map_err(|_| StrategyError::StateInvalid {
            strategy: self.name(),
            key: TREE.into(),
            reason: "the noise tree does not serialize",
        })?;
        s.texts.insert(TREE.into(), tree);
        if let Some(v) = &self.velocity {
            for (name, t) in v {
                s.tensors.insert(format!("{VELOCITY}{name}"), t.clone());
            }
        }
        s.inner = Some(Box::new(self.inner.state()?));
        Ok(s)
    }

    /// Restores the inner strategy, the momentum and the noise tree (its live node
    /// seeds). Fresh nodes are drawn from the seed source the wrapper was built with.
    fn restore(&mut self, state: StrategyState) -> Result<(), StrategyError> {
        state.expect_strategy(&self.name())?;
        let text = state
            .texts
            .get(TREE)
            .ok_or_else(|| StrategyError::StateMissing { strategy: state.strategy.clone(), key: TREE.into() })?;
        let invalid = |reason: &'static str| StrategyError::StateInvalid {
            strategy: state.strategy.clone(),
            key: TREE.into(),
            reason,
        };
        let tree: TreeState = serde_json::from_str(text).map_err(|_| invalid("not a noise tree"))?;
        if tree.period != self.tree.period() {
            return Err(invalid("written with another tree period"));
        }
        TreeNoise::restore(tree.clone(), SeedSource::Os).map_err(|_| invalid("inconsistent noise tree"))?;
        let velocity: NamedTensors = state
            .tensors
            .iter()
            .filter_map(|(k, t)| k.strip_prefix(VELOCITY).map(|n| (n.to_string(), t.clone())))
            .collect();
        let inner = state
            .inner
            .ok_or_else(|| StrategyError::StateMissing { strategy: state.strategy.clone(), key: "inner".into() })?;
        self.inner.restore(*inner)?;
        // Keep the configured seed source; take the restored tree's position and seeds.
        self.tree.rewind(tree).map_err(|_| invalid("inconsistent noise tree"))?;
        self.velocity = (!velocity.is_empty()).then_some(velocity);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use covey_privacy::SecureRng;
    use covey_tensors::HostTensor;

    use super::*;
    use crate::{FedAvg, FedOpt};

    fn update(client: &str, x: Vec<f32>) -> ClientUpdate {
        let mut delta = NamedTensors::new();
        delta.insert("w".into(), HostTensor::new(vec![x.len()], x).expect("t"));
        ClientUpdate { client: client.into(), num_examples: 1, delta, within_clip: None }
    }

    fn seeds() -> SeedSource {
        SeedSource::Rng(Box::new(SecureRng::from_seed([9; 32])))
    }

    /// With FedAvg (learning rate 1) and no momentum, each step is the clipped mean plus
    /// `z·C/m` times the tree's increment for the round: the steps' running sum carries
    /// exactly a tree's prefix noise, round ids with gaps included.
    #[test]
    fn steps_carry_the_tree_noise_of_their_round() {
        let (z, c, m, period, dim) = (2.0, 1.0, 4usize, 8u64, 6usize);
        let mut s = DpFtrl::new(FedAvg::default(), z, c, 0.0, period, seeds()).expect("ftrl");
        let mut twin = TreeNoise::new(period, seeds()).expect("tree");
        let x = vec![0.1f32; dim]; // norm < C: not clipped
        let sigma = z * c;
        for round in [1u64, 2, 3, 5, 8, 9, 12] {
            let ctx = RoundContext { round, expected_clients: m, population: 100 };
            let ups = vec![update("a", x.clone()), update("b", x.clone())];
            let agg = s.aggregate(&ctx, &mut ups.into_iter(), 0).expect("aggregate").expect("some");
            assert_eq!(agg.privacy.expect("event").sampling_rate, 1.0);
            let inc = twin.noise_for_step(round, dim).expect("twin");
            for (i, &v) in agg.step["w"].data.iter().enumerate() {
                let expected = (2.0 * 0.1 + sigma * inc[i]) / m as f64;
                assert!((f64::from(v) - expected).abs() < 1e-3 * sigma / m as f64, "round {round}: {v} vs {expected}");
            }
        }
        assert_eq!(s.tree().state(), twin.state());
        let ctx = RoundContext { round: 12, expected_clients: m, population: 100 };
        let err = s.aggregate(&ctx, &mut vec![update("a", x.clone())].into_iter(), 0).expect_err("replayed round");
        assert!(err.to_string().contains("increase"), "{err}");
    }

    #[test]
    fn a_failed_round_leaves_the_tree_and_momentum_unchanged() {
        let mut s = DpFtrl::new(FedOpt::fed_adam(), 1.0, 1.0, 0.9, 4, seeds()).expect("ftrl");
        let ctx = |round| RoundContext { round, expected_clients: 2, population: 10 };
        s.aggregate(&ctx(1), &mut vec![update("a", vec![0.1; 3])].into_iter(), 0).expect("round 1");
        let before = s.state().expect("state");
        // Adam's moments have 3 values for `w`: a 4-value `w` fails in the server step.
        let out = s.aggregate(&ctx(2), &mut vec![update("a", vec![0.1; 4])].into_iter(), 0);
        assert!(out.is_err());
        assert_eq!(s.state().expect("state"), before);
        s.aggregate(&ctx(2), &mut vec![update("a", vec![0.1; 3])].into_iter(), 0).expect("round 2 retried");
    }

    #[test]
    fn a_state_from_another_period_or_a_broken_tree_is_refused() {
        let mut a = DpFtrl::new(FedAvg::default(), 1.0, 1.0, 0.9, 4, seeds()).expect("ftrl");
        let ctx = RoundContext { round: 3, expected_clients: 2, population: 10 };
        a.aggregate(&ctx, &mut vec![update("a", vec![0.1; 3])].into_iter(), 0).expect("round");
        let state = a.state().expect("state");
        let mut other = DpFtrl::new(FedAvg::default(), 1.0, 1.0, 0.9, 8, seeds()).expect("ftrl");
        assert!(other.restore(state.clone()).is_err());
        let mut broken = state.clone();
        broken.texts.insert(TREE.into(), broken.texts[TREE].replace("\"last\":3", "\"last\":2"));
        let mut b = DpFtrl::new(FedAvg::default(), 1.0, 1.0, 0.9, 4, seeds()).expect("ftrl");
        assert!(b.restore(broken).is_err());
        b.restore(state).expect("restore");
        assert_eq!(b.tree().state(), a.tree().state());
    }
}
