//! Server-side DP-FedAvg (McMahan, Ramage, Talwar and Zhang, ICLR 2018), with fixed or
//! adaptive clipping (Andrew, Thakkar, McMahan and Ramaswamy, NeurIPS 2021), as Flower's
//! `DifferentialPrivacyServerSideFixedClipping` / `...AdaptiveClipping`.
//!
//! # Mechanism
//!
//! Each round, with `m = expected_clients`:
//!
//! 1. every incoming delta is clipped to global L2 norm `C` (over all its tensors; the
//!    scaling is exact in f64, inside the one f64 accumulator);
//! 2. the clipped deltas are summed with **uniform** weights (`num_examples` is ignored:
//!    weighting would let one client's weight, and so the sensitivity, grow);
//! 3. `N(0, (z_Δ C)²)` is added to every coordinate of the sum, drawn from the wrapper's
//!    [`SecureRng`] and snapped to the grid of [`covey_privacy::noise::snapping_grid`]
//!    (see `covey_privacy::noise` for why);
//! 4. the noised sum is divided by `m`, **not** by the number of updates received (the
//!    fixed-denominator estimator of the paper: the sensitivity of the mean is `C / m`
//!    whoever drops out, so the mean carries noise of standard deviation `z_Δ C / m`);
//! 5. the noised mean is handed to the wrapped strategy's [`ServerUpdate::server_step`]
//!    (FedAvg's learning rate, FedAdam's moments, ...): post-processing, free in privacy.
//!
//! Design choice: rather than wrapping any [`Strategy`] and feeding it clipped updates with
//! equal weights, the wrapper computes the private mean itself and wraps only
//! [`ServerUpdate`]s, the strategies whose aggregation is "mean → step". That keeps the
//! privacy-critical arithmetic in one place, independent of how an inner strategy
//! weighs or collects updates.
//!
//! With fixed clipping `z_Δ = z`. With adaptive clipping, the server also releases a noised
//! centred count (sensitivity ½, see [`covey_privacy::adaptive`]) of the clients whose
//! update norm was at most `C` (a client's own report
//! [`ClientUpdate::within_clip`] if present, else the norm the server sees), updates `C`
//! geometrically toward the target quantile ([`AdaptiveClipper`]), and gives the updates
//! the larger `z_Δ = update_noise_multiplier(z, σ_b)` so the round as a whole has
//! multiplier `z`. The [`PrivacyEvent`] always reports the total `z`, the `C` applied this
//! round and `q = m / population`.

use covey_privacy::SecureRng;
use covey_privacy::adaptive::{AdaptiveClipConfig, AdaptiveClipper, update_noise_multiplier};
use covey_privacy::noise::snapping_grid;

use crate::common::{clipped_sum, private_denominator};
use crate::config::{check_positive, check_quantile};
use crate::{
    Aggregate, ClientUpdate, PrivacyEvent, RoundConfig, RoundContext, ServerUpdate, Strategy, StrategyError,
    StrategyState,
};

const CLIP_NORM: &str = "clip_norm";

#[derive(Debug)]
enum Clipping {
    Fixed { norm: f64 },
    Adaptive { clipper: AdaptiveClipper, config: AdaptiveClipConfig, update_noise_multiplier: f64 },
}

/// DP-FedAvg around a [`ServerUpdate`] strategy. See the [module documentation](self).
#[derive(Debug)]
pub struct DpFedAvg<S> {
    inner: S,
    noise_multiplier: f64,
    clipping: Clipping,
    rng: SecureRng,
}

impl<S: ServerUpdate> DpFedAvg<S> {
    /// DP-FedAvg with a fixed clip norm `clip_norm` and noise multiplier `noise_multiplier`
    /// (both finite and > 0), drawing noise from `rng`
    /// ([`SecureRng::from_os`] in production).
    pub fn fixed(inner: S, noise_multiplier: f64, clip_norm: f64, rng: SecureRng) -> Result<Self, StrategyError> {
        check_positive("noise_multiplier", noise_multiplier)?;
        check_positive("clip.norm", clip_norm)?;
        Ok(Self { inner, noise_multiplier, clipping: Clipping::Fixed { norm: clip_norm }, rng })
    }

    /// DP-FedAvg with adaptive clipping: the round's total noise multiplier is
    /// `noise_multiplier`; `config.count_noise_std` must exceed half of it.
    pub fn adaptive(
        inner: S,
        noise_multiplier: f64,
        config: AdaptiveClipConfig,
        rng: SecureRng,
    ) -> Result<Self, StrategyError> {
        check_positive("noise_multiplier", noise_multiplier)?;
        check_positive("clip.initial", config.initial_clip)?;
        check_quantile("clip.target_quantile", config.target_quantile)?;
        check_positive("clip.learning_rate", config.learning_rate)?;
        check_positive("clip.count_noise_std", config.count_noise_std)?;
        let z_updates = update_noise_multiplier(noise_multiplier, config.count_noise_std).map_err(|_| {
            StrategyError::InvalidConfig {
                field: "clip.count_noise_std",
                value: config.count_noise_std.to_string(),
                reason: "too small: 2 * count_noise_std must exceed noise_multiplier",
            }
        })?;
        let clipper = AdaptiveClipper::new(config)?;
        Ok(Self {
            inner,
            noise_multiplier,
            clipping: Clipping::Adaptive { clipper, config, update_noise_multiplier: z_updates },
            rng,
        })
    }

    /// The clip norm the next round will apply.
    pub fn clip_norm(&self) -> f64 {
        match &self.clipping {
            Clipping::Fixed { norm } => *norm,
            Clipping::Adaptive { clipper, .. } => clipper.clip_norm(),
        }
    }

    /// The round's total noise multiplier `z`.
    pub fn noise_multiplier(&self) -> f64 {
        self.noise_multiplier
    }

    /// The noise multiplier applied to the sum of updates (`z`, or with adaptive clipping
    /// the larger `z_Δ`).
    pub fn update_noise_multiplier(&self) -> f64 {
        match &self.clipping {
            Clipping::Fixed { .. } => self.noise_multiplier,
            Clipping::Adaptive { update_noise_multiplier, .. } => *update_noise_multiplier,
        }
    }

    /// The wrapped strategy.
    pub fn inner(&self) -> &S {
        &self.inner
    }
}

impl<S: ServerUpdate> Strategy for DpFedAvg<S> {
    fn name(&self) -> String {
        let mode = match self.clipping {
            Clipping::Fixed { .. } => "fixed",
            Clipping::Adaptive { .. } => "adaptive",
        };
        format!("dp-{mode}({})", self.inner.name())
    }

    fn configure_round(&mut self, ctx: &RoundContext) -> RoundConfig {
        RoundConfig { clip_norm: Some(self.clip_norm()), ..self.inner.configure_round(ctx) }
    }

    fn aggregate(
        &mut self,
        ctx: &RoundContext,
        updates: &mut dyn Iterator<Item = ClientUpdate>,
        _failures: usize,
    ) -> Result<Option<Aggregate>, StrategyError> {
        let m = private_denominator(ctx)?;
        if ctx.population < m {
            return Err(StrategyError::InvalidContext {
                field: "population",
                value: ctx.population,
                reason: "smaller than expected_clients: the sampling rate would exceed 1",
            });
        }
        let c = self.clip_norm();
        let (mut acc, unclipped) = clipped_sum(updates, c)?;
        if acc.count == 0 {
            return Ok(None);
        }
        let sigma = self.update_noise_multiplier() * c;
        let grid = snapping_grid(sigma);
        let mut noise = vec![0.0f64; 4096];
        for sum in acc.sums_mut() {
            for chunk in sum.chunks_mut(4096) {
                let z = &mut noise[..chunk.len()];
                self.rng.fill_standard_normal(z);
                for (s, z) in chunk.iter_mut().zip(z.iter()) {
                    *s = ((*s + sigma * z) / grid).round() * grid;
                }
            }
        }
        let (num_updates, total_examples) = (acc.count, acc.total_examples);
        let step = self.inner.server_step(acc.finish(m as f64))?;
        if let Clipping::Adaptive { clipper, .. } = &mut self.clipping {
            clipper.update(unclipped, num_updates, m as f64, &mut self.rng);
        }
        let privacy = PrivacyEvent {
            noise_multiplier: self.noise_multiplier,
            clip_norm: c,
            sampling_rate: m as f64 / ctx.population as f64,
        };
        Ok(Some(Aggregate { step, num_updates, total_examples, privacy: Some(privacy) }))
    }

    fn state(&self) -> Result<StrategyState, StrategyError> {
        let mut s = StrategyState::new(self.name());
        if let Clipping::Adaptive { clipper, .. } = &self.clipping {
            s.scalars.insert(CLIP_NORM.into(), clipper.clip_norm());
        }
        s.inner = Some(Box::new(self.inner.state()?));
        Ok(s)
    }

    /// Restores the inner strategy and the adaptive clip norm. The generator is not part
    /// of the state: a restored wrapper draws fresh noise from the generator it was built with.
    fn restore(&mut self, state: StrategyState) -> Result<(), StrategyError> {
        state.expect_strategy(&self.name())?;
        let clipper = match &self.clipping {
            Clipping::Fixed { .. } => None,
            Clipping::Adaptive { config, .. } => {
                let clip = state.scalar(CLIP_NORM)?;
                if !(clip.is_finite() && clip > 0.0) {
                    return Err(StrategyError::StateInvalid {
                        strategy: state.strategy.clone(),
                        key: CLIP_NORM.into(),
                        reason: "must be finite and > 0",
                    });
                }
                Some(AdaptiveClipper::new(AdaptiveClipConfig { initial_clip: clip, ..*config })?)
            }
        };
        let inner = state
            .inner
            .ok_or_else(|| StrategyError::StateMissing { strategy: state.strategy.clone(), key: "inner".into() })?;
        self.inner.restore(*inner)?;
        if let (Some(new), Clipping::Adaptive { clipper, .. }) = (clipper, &mut self.clipping) {
            *clipper = new;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{FedAvg, FedOpt, FedProx};
    use covey_tensors::{HostTensor, NamedTensors};

    fn update(client: &str, n: u64, x: Vec<f32>) -> ClientUpdate {
        let mut delta = NamedTensors::new();
        delta.insert("w".into(), HostTensor::new(vec![x.len()], x).expect("t"));
        ClientUpdate { client: client.into(), num_examples: n, delta, within_clip: None }
    }

    fn ctx(m: usize, population: usize) -> RoundContext {
        RoundContext { round: 1, expected_clients: m, population }
    }

    fn seeded(seed: u8) -> SecureRng {
        SecureRng::from_seed([seed; 32])
    }

    fn std_of(x: &[f32]) -> (f64, f64) {
        let n = x.len() as f64;
        let mean = x.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
        let var = x.iter().map(|&v| (f64::from(v) - mean).powi(2)).sum::<f64>() / (n - 1.0);
        (mean, var.sqrt())
    }

    #[test]
    fn noise_std_is_z_c_over_m() {
        let d = 100_000;
        let (z, c, m) = (1.3, 0.7, 10);
        let mut s = DpFedAvg::fixed(FedAvg::default(), z, c, seeded(1)).expect("dp");
        let mut ups = (0..m).map(|i| update(&format!("c{i}"), 1, vec![0.0; d]));
        let agg = s.aggregate(&ctx(m, 1000), &mut ups, 0).expect("ok").expect("some");
        let (mean, std) = std_of(&agg.step["w"].data);
        let want = z * c / m as f64;
        assert!((std / want - 1.0).abs() < 0.02, "std {std} vs {want}");
        assert!(mean.abs() < 5.0 * want / (d as f64).sqrt(), "mean {mean}");
        assert_eq!(agg.privacy, Some(PrivacyEvent { noise_multiplier: z, clip_norm: c, sampling_rate: 0.01 }));

        // Adaptive: the updates get z_Δ > z; the event still reports z.
        let cfg = AdaptiveClipConfig { initial_clip: c, count_noise_std: 2.0, ..AdaptiveClipConfig::default() };
        let mut s = DpFedAvg::adaptive(FedAvg::default(), z, cfg, seeded(2)).expect("dp");
        let z_delta = s.update_noise_multiplier();
        assert!(z_delta > z);
        let mut ups = (0..m).map(|i| update(&format!("c{i}"), 1, vec![0.0; d]));
        let agg = s.aggregate(&ctx(m, 1000), &mut ups, 0).expect("ok").expect("some");
        let (_, std) = std_of(&agg.step["w"].data);
        let want = z_delta * c / m as f64;
        assert!((std / want - 1.0).abs() < 0.02, "adaptive std {std} vs {want}");
        assert_eq!(agg.privacy.expect("event").noise_multiplier, z);
    }

    #[test]
    fn one_huge_update_moves_the_mean_by_at_most_c_over_m_plus_noise() {
        let (d, m, c, z) = (1000, 10, 1.0, 0.01);
        let mut s = DpFedAvg::fixed(FedAvg::default(), z, c, seeded(3)).expect("dp");
        let mut ups: Vec<ClientUpdate> = (0..m - 1).map(|i| update(&format!("c{i}"), 1, vec![0.0; d])).collect();
        ups.push(update("evil", 1_000_000, (0..d).map(|i| if i % 2 == 0 { 1e6 } else { -3e5 }).collect()));
        let agg = s.aggregate(&ctx(m, 100), &mut ups.into_iter(), 0).expect("ok").expect("some");
        let norm = covey_tensors::global_norm(&agg.step);
        let noise_norm = z * c / m as f64 * (d as f64).sqrt();
        assert!(norm <= c / m as f64 + 2.0 * noise_norm, "norm {norm}");
        assert!(norm >= c / m as f64 - 2.0 * noise_norm, "the clipped update still counts: {norm}");
    }

    #[test]
    fn adaptive_clip_tracks_the_target_quantile() {
        // 100 clients with update norms 0.01, ..., 1.0: the median is ≈ 0.5.
        for initial in [0.01, 5.0] {
            let cfg =
                AdaptiveClipConfig { initial_clip: initial, count_noise_std: 1.0, ..AdaptiveClipConfig::default() };
            let mut s = DpFedAvg::adaptive(FedAvg::default(), 1.0, cfg, seeded(4)).expect("dp");
            for _ in 0..300 {
                let mut ups = (1..=100).map(|i| update(&format!("c{i}"), 1, vec![i as f32 / 100.0]));
                s.aggregate(&ctx(100, 1000), &mut ups, 0).expect("ok");
            }
            let c = s.clip_norm();
            assert!((0.35..0.65).contains(&c), "from {initial}: clip {c} did not reach the median");
        }
    }

    #[test]
    fn client_reports_of_within_clip_take_precedence() {
        let cfg = AdaptiveClipConfig { initial_clip: 1.0, count_noise_std: 1.0, ..AdaptiveClipConfig::default() };
        for (report, grows) in [(false, true), (true, false)] {
            let mut s = DpFedAvg::adaptive(FedAvg::default(), 1.0, cfg, seeded(5)).expect("dp");
            // Norm 1e-3 < C: the server alone would count them unclipped.
            let mut ups =
                (0..50).map(|i| ClientUpdate { within_clip: Some(report), ..update(&format!("c{i}"), 1, vec![1e-3]) });
            s.aggregate(&ctx(50, 100), &mut ups, 0).expect("ok");
            assert_eq!(s.clip_norm() > 1.0, grows, "report {report}: clip {}", s.clip_norm());
        }
    }

    #[test]
    fn weights_are_ignored_and_configuration_forwarded() {
        let run = |w: [u64; 2]| {
            let mut s = DpFedAvg::fixed(FedAvg::default(), 1e-9, 100.0, seeded(6)).expect("dp");
            let ups = vec![update("a", w[0], vec![1.0, 2.0]), update("b", w[1], vec![3.0, 0.0])];
            s.aggregate(&ctx(2, 10), &mut ups.into_iter(), 0).expect("ok").expect("some").step
        };
        let (a, b) = (run([1, 1]), run([1, 1000]));
        assert_eq!(a, b);
        assert!((a["w"].data[0] - 2.0).abs() < 1e-6 && (a["w"].data[1] - 1.0).abs() < 1e-6);
        let mut p = DpFedAvg::fixed(FedProx::new(0.3).expect("p"), 1.0, 0.5, seeded(7)).expect("dp");
        let rc = p.configure_round(&ctx(2, 10));
        assert_eq!((rc.clip_norm, rc.proximal_mu), (Some(0.5), 0.3));
        assert_eq!(p.name(), "dp-fixed(fed-prox)");
    }

    #[test]
    fn fixed_denominator_and_context_errors() {
        // Two of four expected clients deliver: the mean is divided by 4.
        let mut s = DpFedAvg::fixed(FedAvg::default(), 1e-9, 100.0, seeded(8)).expect("dp");
        let ups = vec![update("a", 1, vec![4.0]), update("b", 1, vec![4.0])];
        let agg = s.aggregate(&ctx(4, 10), &mut ups.clone().into_iter(), 2).expect("ok").expect("some");
        assert!((agg.step["w"].data[0] - 2.0).abs() < 1e-6);
        assert!(matches!(
            s.aggregate(&ctx(0, 10), &mut ups.clone().into_iter(), 0),
            Err(StrategyError::InvalidContext { field: "expected_clients", .. })
        ));
        assert!(matches!(
            s.aggregate(&ctx(4, 3), &mut ups.into_iter(), 0),
            Err(StrategyError::InvalidContext { field: "population", .. })
        ));
    }

    #[test]
    fn seeds_replay_and_state_restores_the_clip() {
        let cfg = AdaptiveClipConfig { initial_clip: 0.5, count_noise_std: 2.0, ..AdaptiveClipConfig::default() };
        let make = |seed| DpFedAvg::adaptive(FedOpt::fed_adam(), 1.0, cfg, seeded(seed)).expect("dp");
        let round = |s: &mut DpFedAvg<FedOpt>| {
            let mut ups = (0..5).map(|i| update(&format!("c{i}"), 1, vec![i as f32, 1.0]));
            s.aggregate(&ctx(5, 50), &mut ups, 0).expect("ok").expect("some").step
        };
        let (mut a, mut b, mut other) = (make(9), make(9), make(10));
        assert_eq!(round(&mut a), round(&mut b));
        assert_ne!(round(&mut a), round(&mut other));
        let st = a.state().expect("state");
        assert_eq!(st.strategy, "dp-adaptive(fed-adam)");
        let mut restored = make(11);
        restored.restore(st.clone()).expect("restore");
        assert_eq!(restored.clip_norm(), a.clip_norm());
        assert_eq!(restored.state().expect("state"), st);
        let mut fixed = DpFedAvg::fixed(FedOpt::fed_adam(), 1.0, 1.0, seeded(1)).expect("dp");
        assert!(matches!(fixed.restore(st), Err(StrategyError::StateMismatch { .. })));
    }
}
