//! Adaptive server optimisers of Reddi et al., "Adaptive Federated Optimization"
//! (ICLR 2021): FedAdam, FedYogi and FedAdagrad.
//!
//! Each round, the pseudo-gradient `Δ` is the example-weighted mean delta (as in FedAvg),
//! and, coordinate by coordinate,
//!
//! ```text
//! m ← β₁ m + (1 − β₁) Δ
//! v ← v + Δ²                              (Adagrad)
//! v ← β₂ v + (1 − β₂) Δ²                  (Adam)
//! v ← v − (1 − β₂) Δ² sign(v − Δ²)        (Yogi, sign(0) = 0)
//! step = η m / (√v + τ)
//! ```
//!
//! with `m` and `v` starting at zero and no bias correction (the paper's Algorithm 2, as
//! Flower). Moments are kept per tensor name in f32 (the arithmetic is f64), persist across
//! rounds, and are part of [`Strategy::state`] (tensors `m/<name>` and `v/<name>`), so a
//! restored strategy continues exactly. A tensor absent from a round keeps its moments.
//!
//! Defaults follow Flower: FedAdam η = 0.1, β₁ = 0.9, β₂ = 0.99, τ = 1e-9; FedYogi
//! η = 0.01, β₁ = 0.9, β₂ = 0.99, τ = 1e-3; FedAdagrad η = 0.1, β₁ = 0 (no momentum),
//! τ = 1e-9.

use covey_tensors::{HostTensor, NamedTensors};

use crate::config::{check_positive, check_unit_interval};
use crate::fedavg::{ROUNDS, aggregate_weighted};
use crate::{Aggregate, ClientUpdate, RoundContext, ServerUpdate, Strategy, StrategyError, StrategyState};

/// Which second-moment rule a [`FedOpt`] uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Optimizer {
    /// FedAdam: exponential moving average of `Δ²`.
    Adam,
    /// FedYogi: additive, sign-controlled update of `v`.
    Yogi,
    /// FedAdagrad: running sum of `Δ²` (β₂ unused).
    Adagrad,
}

impl Optimizer {
    /// The strategy name: `fed-adam`, `fed-yogi` or `fed-adagrad`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Adam => "fed-adam",
            Self::Yogi => "fed-yogi",
            Self::Adagrad => "fed-adagrad",
        }
    }

    /// Flower's default hyper-parameters for this optimiser.
    pub fn defaults(self) -> FedOptParams {
        match self {
            Self::Adam => FedOptParams { eta: 1e-1, beta1: 0.9, beta2: 0.99, tau: 1e-9 },
            Self::Yogi => FedOptParams { eta: 1e-2, beta1: 0.9, beta2: 0.99, tau: 1e-3 },
            Self::Adagrad => FedOptParams { eta: 1e-1, beta1: 0.0, beta2: 0.0, tau: 1e-9 },
        }
    }
}

/// Hyper-parameters of a server optimiser.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FedOptParams {
    /// Server learning rate η (finite, > 0).
    pub eta: f64,
    /// First-moment decay β₁ in [0, 1).
    pub beta1: f64,
    /// Second-moment decay β₂ in [0, 1) (unused by Adagrad).
    pub beta2: f64,
    /// Adaptivity τ (finite, > 0).
    pub tau: f64,
}

impl FedOptParams {
    fn validate(&self, optimizer: Optimizer) -> Result<(), StrategyError> {
        check_positive("eta", self.eta)?;
        check_unit_interval("beta1", self.beta1)?;
        if optimizer != Optimizer::Adagrad {
            check_unit_interval("beta2", self.beta2)?;
        }
        check_positive("tau", self.tau)
    }
}

/// A FedAdam, FedYogi or FedAdagrad server optimiser on the example-weighted mean delta.
#[derive(Debug, Clone, PartialEq)]
pub struct FedOpt {
    optimizer: Optimizer,
    params: FedOptParams,
    m: NamedTensors,
    v: NamedTensors,
    rounds: u64,
}

impl FedOpt {
    /// A server optimiser with checked hyper-parameters.
    pub fn new(optimizer: Optimizer, params: FedOptParams) -> Result<Self, StrategyError> {
        params.validate(optimizer)?;
        Ok(Self { optimizer, params, m: NamedTensors::new(), v: NamedTensors::new(), rounds: 0 })
    }

    /// FedAdam with Flower's defaults.
    pub fn fed_adam() -> Self {
        Self::with_defaults(Optimizer::Adam)
    }

    /// FedYogi with Flower's defaults.
    pub fn fed_yogi() -> Self {
        Self::with_defaults(Optimizer::Yogi)
    }

    /// FedAdagrad with Flower's defaults.
    pub fn fed_adagrad() -> Self {
        Self::with_defaults(Optimizer::Adagrad)
    }

    fn with_defaults(optimizer: Optimizer) -> Self {
        Self { optimizer, params: optimizer.defaults(), m: NamedTensors::new(), v: NamedTensors::new(), rounds: 0 }
    }

    /// The optimiser.
    pub fn optimizer(&self) -> Optimizer {
        self.optimizer
    }

    /// The hyper-parameters.
    pub fn params(&self) -> FedOptParams {
        self.params
    }

    /// Number of rounds aggregated so far.
    pub fn rounds(&self) -> u64 {
        self.rounds
    }

    /// The first and second moments kept for `tensor`, if any.
    pub fn moments(&self, tensor: &str) -> Option<(&HostTensor, &HostTensor)> {
        Some((self.m.get(tensor)?, self.v.get(tensor)?))
    }
}

fn sign(x: f64) -> f64 {
    if x > 0.0 {
        1.0
    } else if x < 0.0 {
        -1.0
    } else {
        0.0
    }
}

impl Strategy for FedOpt {
    fn name(&self) -> String {
        self.optimizer.name().into()
    }

    fn aggregate(
        &mut self,
        _ctx: &RoundContext,
        updates: &mut dyn Iterator<Item = ClientUpdate>,
        _failures: usize,
    ) -> Result<Option<Aggregate>, StrategyError> {
        aggregate_weighted(self, updates)
    }

    fn state(&self) -> Result<StrategyState, StrategyError> {
        let mut s = StrategyState::new(self.name());
        s.scalars.insert(ROUNDS.into(), self.rounds as f64);
        for (name, t) in &self.m {
            s.tensors.insert(format!("m/{name}"), t.clone());
        }
        for (name, t) in &self.v {
            s.tensors.insert(format!("v/{name}"), t.clone());
        }
        Ok(s)
    }

    fn restore(&mut self, state: StrategyState) -> Result<(), StrategyError> {
        state.expect_strategy(&self.name())?;
        let rounds = state.count(ROUNDS)?;
        let invalid = |key: &str, reason| StrategyError::StateInvalid {
            strategy: state.strategy.clone(),
            key: key.to_string(),
            reason,
        };
        let (mut m, mut v) = (NamedTensors::new(), NamedTensors::new());
        for (key, t) in &state.tensors {
            if t.shape.iter().product::<usize>() != t.data.len() {
                return Err(invalid(key, "has values that do not fill its shape"));
            }
            if let Some(name) = key.strip_prefix("m/") {
                m.insert(name.to_string(), t.clone());
            } else if let Some(name) = key.strip_prefix("v/") {
                v.insert(name.to_string(), t.clone());
            } else {
                return Err(invalid(key, "is neither a first (m/) nor a second (v/) moment"));
            }
        }
        for (name, tm) in &m {
            match v.get(name) {
                Some(tv) if tv.shape == tm.shape => {}
                _ => return Err(invalid(&format!("v/{name}"), "is missing or has another shape than its m/")),
            }
        }
        if let Some(name) = v.keys().find(|n| !m.contains_key(*n)) {
            return Err(invalid(&format!("m/{name}"), "is missing"));
        }
        (self.m, self.v, self.rounds) = (m, v, rounds);
        Ok(())
    }
}

impl ServerUpdate for FedOpt {
    fn server_step(&mut self, mean_delta: NamedTensors) -> Result<NamedTensors, StrategyError> {
        for (name, t) in &mean_delta {
            if let Some(m) = self.m.get(name).filter(|m| m.shape != t.shape) {
                return Err(StrategyError::StateShape {
                    tensor: name.clone(),
                    expected: m.shape.clone(),
                    found: t.shape.clone(),
                });
            }
        }
        let FedOptParams { eta, beta1, beta2, tau } = self.params;
        let mut steps = NamedTensors::new();
        for (name, delta) in mean_delta {
            let m = self.m.entry(name.clone()).or_insert_with(|| HostTensor::zeros(&delta.shape));
            let v = self.v.entry(name.clone()).or_insert_with(|| HostTensor::zeros(&delta.shape));
            let mut step = Vec::with_capacity(delta.data.len());
            for ((&d, mi), vi) in delta.data.iter().zip(m.data.iter_mut()).zip(v.data.iter_mut()) {
                let d = f64::from(d);
                let d2 = d * d;
                *mi = (beta1 * f64::from(*mi) + (1.0 - beta1) * d) as f32;
                let v_old = f64::from(*vi);
                let v_new = match self.optimizer {
                    Optimizer::Adagrad => v_old + d2,
                    Optimizer::Adam => beta2 * v_old + (1.0 - beta2) * d2,
                    Optimizer::Yogi => v_old - (1.0 - beta2) * d2 * sign(v_old - d2),
                };
                *vi = v_new as f32;
                // From the stored (f32) moments, so a restored optimiser continues exactly.
                step.push((eta * f64::from(*mi) / (f64::from(*vi).max(0.0).sqrt() + tau)) as f32);
            }
            steps.insert(name, HostTensor { shape: delta.shape, data: step });
        }
        self.rounds += 1;
        Ok(steps)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mean(x: &[f32]) -> NamedTensors {
        let mut t = NamedTensors::new();
        t.insert("a".into(), HostTensor::new(vec![x.len()], x.to_vec()).expect("t"));
        t
    }

    /// Reference implementation in plain f64, the formulas of the module documentation.
    fn reference(opt: Optimizer, p: FedOptParams, deltas: &[f64]) -> Vec<f64> {
        let (mut m, mut v) = (0.0f64, 0.0f64);
        let mut out = Vec::new();
        for &d in deltas {
            m = p.beta1 * m + (1.0 - p.beta1) * d;
            v = match opt {
                Optimizer::Adagrad => v + d * d,
                Optimizer::Adam => p.beta2 * v + (1.0 - p.beta2) * d * d,
                Optimizer::Yogi => v - (1.0 - p.beta2) * d * d * sign(v - d * d),
            };
            out.push(p.eta * m / (v.sqrt() + p.tau));
        }
        out
    }

    #[test]
    fn matches_the_reference_formulas_over_rounds() {
        let deltas = [0.5, -0.2, 0.3, 0.3, -1.0, 0.05];
        for opt in [Optimizer::Adam, Optimizer::Yogi, Optimizer::Adagrad] {
            let mut s = FedOpt::new(opt, opt.defaults()).expect("opt");
            let want = reference(opt, opt.defaults(), &deltas);
            for (round, (&d, w)) in deltas.iter().zip(&want).enumerate() {
                let step = s.server_step(mean(&[d as f32])).expect("step");
                let got = f64::from(step["a"].data[0]);
                assert!((got - w).abs() <= 1e-5 * w.abs().max(1e-3), "{opt:?} round {round}: {got} vs {w}");
            }
            assert_eq!(s.rounds(), deltas.len() as u64);
        }
    }

    #[test]
    fn first_adam_step_is_about_eta_in_the_direction_of_the_delta() {
        let mut s = FedOpt::fed_adam();
        let step = s.server_step(mean(&[2.0, -0.001, 0.0])).expect("step");
        // η (1−β₁) / √(1−β₂) = 0.1 · 0.1 / 0.0995
        let k = 0.1 * 0.1 / 0.01f64.sqrt();
        assert!((f64::from(step["a"].data[0]) - k).abs() < 1e-6);
        assert!((f64::from(step["a"].data[1]) + k).abs() < 1e-4);
        assert_eq!(step["a"].data[2], 0.0);
    }

    #[test]
    fn yogi_sign_of_zero_is_zero() {
        let mut s = FedOpt::fed_yogi();
        // Zero delta on zero v: v stays 0 (numpy's sign(0) = 0), step 0.
        let step = s.server_step(mean(&[0.0])).expect("step");
        assert_eq!(step["a"].data[0], 0.0);
        assert_eq!(s.moments("a").expect("moments").1.data[0], 0.0);
    }

    #[test]
    fn shape_change_is_refused_without_touching_state() {
        let mut s = FedOpt::fed_adam();
        s.server_step(mean(&[1.0, 2.0])).expect("step");
        let before = s.clone();
        assert!(matches!(s.server_step(mean(&[1.0])), Err(StrategyError::StateShape { .. })));
        assert_eq!(s, before);
    }

    #[test]
    fn state_round_trip_continues_exactly() {
        let mut a = FedOpt::fed_yogi();
        a.server_step(mean(&[0.3, -0.7])).expect("step");
        let json = serde_json::to_string(&a.state().expect("state")).expect("json");
        let mut b = FedOpt::fed_yogi();
        b.restore(serde_json::from_str(&json).expect("parse")).expect("restore");
        assert_eq!(a, b);
        let sa = a.server_step(mean(&[0.1, 0.2])).expect("a");
        let sb = b.server_step(mean(&[0.1, 0.2])).expect("b");
        assert_eq!(sa, sb);
        let mut bad = a.state().expect("state");
        bad.tensors.remove("v/a");
        assert!(matches!(b.restore(bad), Err(StrategyError::StateInvalid { .. })));
        assert!(matches!(FedOpt::fed_adam().restore(a.state().expect("s")), Err(StrategyError::StateMismatch { .. })));
    }

    #[test]
    fn hyper_parameters_are_checked() {
        let ok = Optimizer::Adam.defaults();
        assert!(FedOpt::new(Optimizer::Adam, FedOptParams { eta: 0.0, ..ok }).is_err());
        assert!(FedOpt::new(Optimizer::Adam, FedOptParams { beta1: 1.0, ..ok }).is_err());
        assert!(FedOpt::new(Optimizer::Yogi, FedOptParams { beta2: -0.1, ..ok }).is_err());
        assert!(FedOpt::new(Optimizer::Adagrad, FedOptParams { beta2: 7.0, ..ok }).is_ok());
        let err = FedOpt::new(Optimizer::Adam, FedOptParams { tau: 0.0, ..ok }).expect_err("tau");
        assert!(err.to_string().contains("tau"), "{err}");
    }
}
