//! The property suite every [`Strategy`] must pass, public so the coordinator and future
//! strategies reuse it: `check_strategy(&|| Box::new(MyStrategy::new()), &expectations)`.
//!
//! Properties checked, each on fresh strategies from `make`:
//!
//! 1. **Nothing to aggregate**: no updates (with or without failures) gives `Ok(None)` and
//!    leaves [`Strategy::state`] unchanged.
//! 2. **Fixed point**: three identical updates `X` (different weights) give a step with
//!    `X`'s tensors and shapes, the right counts, finite values, and
//!    [`FixedPoint::Exact`]: the step equals `X` (mean, median, trimmed mean, DP with
//!    negligible noise); [`FixedPoint::SameSign`]: every coordinate of the step has the sign
//!    of `X`'s (server optimisers, whose first step is `η m / (√v + τ)`, and FedAvg with a
//!    server learning rate other than 1).
//! 3. **Order**: permuting the updates changes the step by at most the tolerance.
//! 4. **Weights**: [`Weighting::ByExamples`]: two copies of `X` with weight 1 equal one
//!    copy with weight 2; [`Weighting::Uniform`]: changing `num_examples` changes nothing.
//! 5. **State**: after a round, `state()` survives a JSON round trip exactly, a fresh
//!    strategy restored from it produces the same next step as the original, and a state
//!    of another strategy is refused.
//! 6. **Malformed rounds**: a differently shaped, missing, extra or non-finite tensor gives
//!    `Err` (not a panic) and leaves the state unchanged.
//!
//! Steps are compared coordinate-wise with `|a − b| ≤ tolerance · max(1, |a|, |b|)`.
//! Randomised strategies (DP) must be built with a seeded generator and noise small
//! against the tolerance (e.g. `z = 1e-9`, `C = 100`): a restored wrapper draws different
//! noise from the original.

use covey_tensors::{HostTensor, NamedTensors};

use crate::{ClientUpdate, RoundContext, Strategy, StrategyState};

/// Whether a strategy weighs updates by their `num_examples`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Weighting {
    /// Example-weighted (FedAvg, FedProx, server optimisers).
    ByExamples,
    /// Every update counts the same (median, trimmed mean, DP-FedAvg).
    Uniform,
}

/// What identical updates must produce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FixedPoint {
    /// The step equals the common delta.
    Exact,
    /// Every coordinate of the step has the sign of the delta's.
    SameSign,
}

/// What [`check_strategy`] expects of a strategy.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Expectations {
    /// How updates are weighted.
    pub weighting: Weighting,
    /// What identical updates produce.
    pub fixed_point: FixedPoint,
    /// Relative tolerance of step comparisons (see the module documentation).
    pub tolerance: f32,
}

impl Expectations {
    /// Expectations with the default tolerance 1e-6.
    pub fn new(weighting: Weighting, fixed_point: FixedPoint) -> Self {
        Self { weighting, fixed_point, tolerance: 1e-6 }
    }
}

/// Deterministic pseudo-random numbers in [0, 1) (SplitMix64).
struct Numbers(u64);

impl Numbers {
    fn next(&mut self) -> f32 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 40) as f32 / (1u64 << 24) as f32
    }
}

const A: &str = "base_model.model.layers.0.self_attn.q_proj.lora_A.weight";
const B: &str = "base_model.model.layers.0.self_attn.q_proj.lora_B.weight";

/// A LoRA-shaped delta whose coordinates have a fixed sign pattern (shared by all seeds)
/// and magnitudes in [0.2, 1), so means never cancel to zero.
fn delta(seed: u64) -> NamedTensors {
    let mut signs = Numbers(0xC0FE);
    let mut mags = Numbers(seed);
    let mut tensor = |shape: Vec<usize>| {
        let n = shape.iter().product();
        let data = (0..n)
            .map(|_| {
                let s = if signs.next() < 0.5 { -1.0 } else { 1.0 };
                s * (0.2 + 0.8 * mags.next())
            })
            .collect();
        HostTensor { shape, data }
    };
    let mut t = NamedTensors::new();
    t.insert(A.into(), tensor(vec![4, 16]));
    t.insert(B.into(), tensor(vec![16, 4]));
    t
}

fn update(client: &str, num_examples: u64, delta: NamedTensors) -> ClientUpdate {
    ClientUpdate { client: client.into(), num_examples, delta, within_clip: None }
}

fn ctx(round: u64, updates: usize) -> RoundContext {
    RoundContext { round, expected_clients: updates, population: 100 }
}

/// Configure and aggregate a round of `updates`; panics unless it yields a step.
fn step_of(s: &mut dyn Strategy, round: u64, updates: Vec<ClientUpdate>, what: &str) -> NamedTensors {
    let name = s.name();
    let ctx = ctx(round, updates.len());
    let rc = s.configure_round(&ctx);
    assert!(rc.proximal_mu.is_finite() && rc.proximal_mu >= 0.0, "{name}: proximal_mu {}", rc.proximal_mu);
    if let Some(c) = rc.clip_norm {
        assert!(c.is_finite() && c > 0.0, "{name}: clip_norm {c}");
    }
    let n = updates.len();
    let total: u64 = updates.iter().map(|u| u.num_examples).sum();
    let agg = match s.aggregate(&ctx, &mut updates.into_iter(), 0) {
        Ok(Some(agg)) => agg,
        Ok(None) => panic!("{name}: {what}: no aggregate from {n} updates"),
        Err(e) => panic!("{name}: {what}: {e}"),
    };
    assert_eq!((agg.num_updates, agg.total_examples), (n, total), "{name}: {what}: counts");
    for (tensor, t) in &agg.step {
        assert!(t.is_finite(), "{name}: {what}: `{tensor}` is not finite");
    }
    agg.step
}

fn assert_close(a: &NamedTensors, b: &NamedTensors, tol: f32, what: &str) {
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>(), "{what}: tensor names differ");
    for (name, ta) in a {
        let tb = &b[name];
        assert_eq!(ta.shape, tb.shape, "{what}: `{name}` shapes differ");
        for (i, (&x, &y)) in ta.data.iter().zip(&tb.data).enumerate() {
            let bound = tol * 1f32.max(x.abs()).max(y.abs());
            assert!((x - y).abs() <= bound, "{what}: `{name}`[{i}]: {x} vs {y}");
        }
    }
}

fn state_of(s: &dyn Strategy) -> StrategyState {
    match s.state() {
        Ok(st) => st,
        Err(e) => panic!("{}: state(): {e}", s.name()),
    }
}

/// Run the property suite (see the [module documentation](self)) on strategies from `make`.
///
/// # Panics
/// On the first property that does not hold, naming the strategy and the property.
pub fn check_strategy(make: &dyn Fn() -> Box<dyn Strategy>, expect: &Expectations) {
    let name = make().name();
    let tol = expect.tolerance;
    let (x, y, z) = (delta(1), delta(2), delta(3));

    // 1. Nothing to aggregate.
    for failures in [0, 3] {
        let mut s = make();
        let before = state_of(s.as_ref());
        let out = s.aggregate(&ctx(1, 3), &mut std::iter::empty(), failures);
        assert!(matches!(out, Ok(None)), "{name}: no updates ({failures} failures) must give Ok(None): {out:?}");
        assert_eq!(state_of(s.as_ref()), before, "{name}: an empty round changed the state");
    }

    // 2. Identical updates.
    let step = step_of(
        make().as_mut(),
        1,
        vec![update("a", 1, x.clone()), update("b", 2, x.clone()), update("c", 3, x.clone())],
        "identical updates",
    );
    match expect.fixed_point {
        FixedPoint::Exact => assert_close(&step, &x, tol, &format!("{name}: identical updates are a fixed point")),
        FixedPoint::SameSign => {
            assert_close(
                &step.iter().map(|(n, t)| (n.clone(), sign(t))).collect(),
                &x.iter().map(|(n, t)| (n.clone(), sign(t))).collect(),
                0.0,
                &format!("{name}: identical updates give a step of their sign"),
            );
        }
    }

    // 3. Order.
    let forward = vec![update("x", 1, x.clone()), update("y", 2, y.clone()), update("z", 3, z.clone())];
    let mut backward = forward.clone();
    backward.rotate_left(1);
    backward.swap(0, 1);
    let a = step_of(make().as_mut(), 1, forward, "order");
    let b = step_of(make().as_mut(), 1, backward, "order (permuted)");
    assert_close(&a, &b, tol, &format!("{name}: the order of updates matters"));

    // 4. Weights.
    let (a, b) = match expect.weighting {
        Weighting::ByExamples => (
            step_of(
                make().as_mut(),
                1,
                vec![update("x1", 1, x.clone()), update("x2", 1, x.clone()), update("y", 1, y.clone())],
                "weights",
            ),
            step_of(make().as_mut(), 1, vec![update("x", 2, x.clone()), update("y", 1, y.clone())], "weights (merged)"),
        ),
        Weighting::Uniform => (
            step_of(
                make().as_mut(),
                1,
                vec![update("x", 1, x.clone()), update("y", 5, y.clone()), update("z", 2, z.clone())],
                "weights",
            ),
            step_of(
                make().as_mut(),
                1,
                vec![update("x", 4, x.clone()), update("y", 1, y.clone()), update("z", 9, z.clone())],
                "weights (changed)",
            ),
        ),
    };
    let what = match expect.weighting {
        Weighting::ByExamples => "two copies of weight 1 differ from one copy of weight 2",
        Weighting::Uniform => "an unweighted strategy depends on num_examples",
    };
    assert_close(&a, &b, tol, &format!("{name}: {what}"));

    // 5. State.
    let mut original = make();
    step_of(original.as_mut(), 1, vec![update("x", 1, x.clone()), update("y", 2, y.clone())], "state, round 1");
    let st = state_of(original.as_ref());
    assert_eq!(st.strategy, name, "{name}: state names another strategy");
    let json = match serde_json::to_string(&st) {
        Ok(j) => j,
        Err(e) => panic!("{name}: state does not serialize: {e}"),
    };
    let back: StrategyState = match serde_json::from_str(&json) {
        Ok(b) => b,
        Err(e) => panic!("{name}: state does not deserialize: {e}"),
    };
    assert_eq!(back, st, "{name}: state changed through JSON");
    let mut restored = make();
    if let Err(e) = restored.restore(back) {
        panic!("{name}: restore: {e}");
    }
    assert_eq!(state_of(restored.as_ref()), st, "{name}: restored state differs");
    let round2 = || vec![update("y", 3, y.clone()), update("z", 1, z.clone())];
    let a = step_of(original.as_mut(), 2, round2(), "state, round 2");
    let b = step_of(restored.as_mut(), 2, round2(), "state, round 2 (restored)");
    assert_close(&a, &b, tol, &format!("{name}: a restored strategy continues differently"));
    assert!(make().restore(StrategyState::new("no-such-strategy")).is_err(), "{name}: restored a foreign state");

    // 6. Malformed rounds.
    let mut reshaped = x.clone();
    if let Some(t) = reshaped.get_mut(A) {
        t.shape = vec![16, 4];
    }
    let mut missing = x.clone();
    missing.remove(B);
    let mut extra = x.clone();
    extra.insert("base_model.model.lm_head.weight".into(), HostTensor::zeros(&[2]));
    let mut nan = x.clone();
    if let Some(t) = nan.get_mut(B) {
        t.data[5] = f32::NAN;
    }
    let mut truncated = x.clone();
    if let Some(t) = truncated.get_mut(A) {
        t.data.pop();
    }
    for (what, bad) in
        [("reshaped", reshaped), ("missing", missing), ("extra", extra), ("nan", nan), ("truncated", truncated)]
    {
        for first in [true, false] {
            let mut s = make();
            let before = state_of(s.as_ref());
            let ups = if first {
                vec![update("bad", 1, bad.clone()), update("good", 1, x.clone())]
            } else {
                vec![update("good", 1, x.clone()), update("bad", 1, bad.clone())]
            };
            let out = s.aggregate(&ctx(1, 2), &mut ups.into_iter(), 0);
            // A lone malformed first update may be self-consistent (missing / extra), so the
            // good one then mismatches: either way the round must fail.
            assert!(out.is_err(), "{name}: a {what} tensor (first: {first}) was accepted");
            assert_eq!(state_of(s.as_ref()), before, "{name}: a failed round changed the state");
        }
    }
}

fn sign(t: &HostTensor) -> HostTensor {
    HostTensor {
        shape: t.shape.clone(),
        data: t.data.iter().map(|&v| if v == 0.0 { 0.0 } else { v.signum() }).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ClipConfig, DpConfig, Randomness, StrategyConfig, build};
    use crate::{CoordinateMedian, DpFedAvg, DpFtrl, FedAvg, FedOpt, FedProx, TrimmedMean};
    use covey_privacy::SecureRng;
    use covey_privacy::adaptive::AdaptiveClipConfig;

    fn rng() -> SecureRng {
        SecureRng::from_seed([42; 32])
    }

    const EXACT: Expectations =
        Expectations { weighting: Weighting::ByExamples, fixed_point: FixedPoint::Exact, tolerance: 1e-6 };
    const SIGN: Expectations =
        Expectations { weighting: Weighting::ByExamples, fixed_point: FixedPoint::SameSign, tolerance: 1e-6 };
    const ROBUST: Expectations =
        Expectations { weighting: Weighting::Uniform, fixed_point: FixedPoint::Exact, tolerance: 1e-6 };
    const DP_EXACT: Expectations =
        Expectations { weighting: Weighting::Uniform, fixed_point: FixedPoint::Exact, tolerance: 1e-6 };
    const DP_SIGN: Expectations =
        Expectations { weighting: Weighting::Uniform, fixed_point: FixedPoint::SameSign, tolerance: 1e-6 };

    #[test]
    fn fedavg_family() {
        check_strategy(&|| Box::new(FedAvg::default()), &EXACT);
        check_strategy(&|| Box::new(FedAvg::new(0.5).expect("lr")), &SIGN);
        check_strategy(&|| Box::new(FedProx::new(0.01).expect("mu")), &EXACT);
    }

    #[test]
    fn server_optimizers() {
        check_strategy(&|| Box::new(FedOpt::fed_adam()), &SIGN);
        check_strategy(&|| Box::new(FedOpt::fed_yogi()), &SIGN);
        check_strategy(&|| Box::new(FedOpt::fed_adagrad()), &SIGN);
    }

    #[test]
    fn robust_aggregators() {
        check_strategy(&|| Box::new(TrimmedMean::new(0.0).expect("beta")), &ROBUST);
        check_strategy(&|| Box::new(TrimmedMean::new(0.34).expect("beta")), &ROBUST);
        check_strategy(&|| Box::new(CoordinateMedian::new()), &ROBUST);
        check_strategy(&|| Box::new(crate::Krum::new(0.0).expect("krum")), &ROBUST);
        check_strategy(&|| Box::new(crate::Krum::new(0.34).expect("krum")), &ROBUST);
        check_strategy(&|| Box::new(crate::Krum::multi(0.34).expect("multi")), &ROBUST);
        check_strategy(&|| Box::new(crate::GeometricMedian::default()), &ROBUST);
    }

    #[test]
    fn dp_wrappers_with_negligible_noise() {
        check_strategy(&|| Box::new(DpFedAvg::fixed(FedAvg::default(), 1e-9, 100.0, rng()).expect("dp")), &DP_EXACT);
        let cfg = AdaptiveClipConfig { initial_clip: 100.0, count_noise_std: 1e-6, ..AdaptiveClipConfig::default() };
        check_strategy(&|| Box::new(DpFedAvg::adaptive(FedAvg::default(), 1e-9, cfg, rng()).expect("dp")), &DP_EXACT);
        check_strategy(&|| Box::new(DpFedAvg::adaptive(FedOpt::fed_yogi(), 1e-9, cfg, rng()).expect("dp")), &DP_SIGN);
        check_strategy(&|| Box::new(DpFedAvg::fixed(FedOpt::fed_adam(), 1e-9, 100.0, rng()).expect("dp")), &DP_SIGN);
        let seeds = || covey_privacy::tree::SeedSource::Rng(Box::new(rng()));
        check_strategy(
            &|| Box::new(DpFtrl::new(FedAvg::default(), 1e-9, 100.0, 0.9, 8, seeds()).expect("ftrl")),
            &DP_EXACT,
        );
        check_strategy(
            &|| Box::new(DpFtrl::new(FedOpt::fed_adam(), 1e-9, 100.0, 0.5, 1, seeds()).expect("ftrl")),
            &DP_SIGN,
        );
    }

    #[test]
    fn every_configurable_strategy_through_build() {
        let configs = [
            (StrategyConfig::default(), EXACT),
            (StrategyConfig::FedProx { mu: 0.1, server_learning_rate: 1.0 }, EXACT),
            (StrategyConfig::FedAdam { eta: 0.1, beta1: 0.9, beta2: 0.99, tau: 1e-9 }, SIGN),
            (StrategyConfig::FedYogi { eta: 0.01, beta1: 0.9, beta2: 0.99, tau: 1e-3 }, SIGN),
            (StrategyConfig::FedAdagrad { eta: 0.1, beta1: 0.0, tau: 1e-9 }, SIGN),
            (StrategyConfig::TrimmedMean { beta: 0.2 }, ROBUST),
            (StrategyConfig::Median {}, ROBUST),
            (StrategyConfig::Krum { byzantine_fraction: 0.1 }, ROBUST),
            (StrategyConfig::MultiKrum { byzantine_fraction: 0.2 }, ROBUST),
            (StrategyConfig::GeometricMedian { max_iterations: 5, smoothing: 1e-6 }, ROBUST),
        ];
        let dps = [
            DpConfig::fed_avg(1e-9, ClipConfig::Fixed { norm: 100.0 }),
            DpConfig::fed_avg(
                1e-9,
                ClipConfig::Adaptive {
                    initial: 100.0,
                    target_quantile: 0.5,
                    learning_rate: 0.2,
                    count_noise_std: 1e-6,
                },
            ),
            DpConfig::ftrl(1e-9, 100.0, 4),
        ];
        for (config, expect) in configs {
            check_strategy(&|| build(&config, None, Randomness::Seeded([42; 32])).expect("build"), &expect);
            if expect.weighting == Weighting::ByExamples {
                let dp_expect = Expectations { weighting: Weighting::Uniform, ..expect };
                for dp in &dps {
                    check_strategy(
                        &|| build(&config, Some(dp), Randomness::Seeded([42; 32])).expect("build"),
                        &dp_expect,
                    );
                }
            }
        }
    }

    /// A strategy that breaks the order property must be caught.
    #[test]
    #[should_panic(expected = "order")]
    fn the_suite_catches_a_last_update_wins_strategy() {
        struct LastWins;
        impl Strategy for LastWins {
            fn name(&self) -> String {
                "last-wins".into()
            }
            fn configure_round(&mut self, _: &RoundContext) -> crate::RoundConfig {
                crate::RoundConfig::default()
            }
            fn aggregate(
                &mut self,
                _: &RoundContext,
                updates: &mut dyn Iterator<Item = ClientUpdate>,
                _: usize,
            ) -> Result<Option<crate::Aggregate>, crate::StrategyError> {
                let all: Vec<ClientUpdate> = updates.collect();
                Ok(all.last().map(|u| crate::Aggregate {
                    step: u.delta.clone(),
                    num_updates: all.len(),
                    total_examples: all.iter().map(|u| u.num_examples).sum(),
                    privacy: None,
                }))
            }
            fn state(&self) -> Result<StrategyState, crate::StrategyError> {
                Ok(StrategyState::new("last-wins"))
            }
            fn restore(&mut self, s: StrategyState) -> Result<(), crate::StrategyError> {
                s.expect_strategy("last-wins")
            }
        }
        check_strategy(&|| Box::new(LastWins), &EXACT);
    }
}
