//! FedAvg (McMahan et al., AISTATS 2017) and FedProx (Li et al., MLSys 2020).
//!
//! The step is `η_s · Σᵢ nᵢ Δᵢ / Σᵢ nᵢ`: the example-weighted mean of the deltas times a
//! server learning rate `η_s` (1 by default: plain FedAvg). The mean is a running sum in
//! f64, one accumulator whatever the number of updates. FedProx aggregates the same way;
//! its proximal term `μ/2 ‖w − w_global‖²` is the clients' business, and the strategy only
//! sends `μ` in [`RoundConfig::proximal_mu`].

use covey_tensors::NamedTensors;

use crate::common::{Accumulator, scaled};
use crate::config::{check_non_negative, check_positive};
use crate::{Aggregate, ClientUpdate, RoundConfig, RoundContext, ServerUpdate, Strategy, StrategyError, StrategyState};

/// The example-weighted mean of a stream of updates, its count and total examples
/// (`None` for no updates).
pub(crate) fn weighted_mean(
    updates: &mut dyn Iterator<Item = ClientUpdate>,
) -> Result<Option<(NamedTensors, usize, u64)>, StrategyError> {
    let mut acc = Accumulator::default();
    for u in updates {
        acc.add(&u, u.num_examples as f64, 1.0)?;
    }
    if acc.count == 0 {
        return Ok(None);
    }
    if acc.total_weight <= 0.0 {
        return Err(StrategyError::ZeroTotalWeight { updates: acc.count });
    }
    let (n, total, weight) = (acc.count, acc.total_examples, acc.total_weight);
    Ok(Some((acc.finish(weight), n, total)))
}

/// FedAvg-family aggregation: weighted mean, then the strategy's server step.
pub(crate) fn aggregate_weighted<S: ServerUpdate + ?Sized>(
    strategy: &mut S,
    updates: &mut dyn Iterator<Item = ClientUpdate>,
) -> Result<Option<Aggregate>, StrategyError> {
    let Some((mean, num_updates, total_examples)) = weighted_mean(updates)? else {
        return Ok(None);
    };
    let step = strategy.server_step(mean)?;
    Ok(Some(Aggregate { step, num_updates, total_examples, privacy: None }))
}

/// The `rounds` scalar key of every strategy's state.
pub(crate) const ROUNDS: &str = "rounds";

/// Federated averaging with a server learning rate.
#[derive(Debug, Clone, PartialEq)]
pub struct FedAvg {
    server_learning_rate: f64,
    rounds: u64,
}

impl Default for FedAvg {
    /// Plain FedAvg: server learning rate 1.
    fn default() -> Self {
        Self { server_learning_rate: 1.0, rounds: 0 }
    }
}

impl FedAvg {
    /// FedAvg whose step is `server_learning_rate` times the weighted mean delta
    /// (finite and > 0).
    pub fn new(server_learning_rate: f64) -> Result<Self, StrategyError> {
        check_positive("server_learning_rate", server_learning_rate)?;
        Ok(Self { server_learning_rate, rounds: 0 })
    }

    /// The server learning rate.
    pub fn server_learning_rate(&self) -> f64 {
        self.server_learning_rate
    }

    /// Number of rounds aggregated so far (rounds without updates do not count).
    pub fn rounds(&self) -> u64 {
        self.rounds
    }

    fn state_named(&self, name: &str) -> StrategyState {
        StrategyState::rounds_only(name, self.rounds)
    }

    fn restore_named(&mut self, name: &str, state: &StrategyState) -> Result<(), StrategyError> {
        self.rounds = state.restore_rounds(name)?;
        Ok(())
    }
}

impl Strategy for FedAvg {
    fn name(&self) -> String {
        "fed-avg".into()
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
        Ok(self.state_named(&self.name()))
    }

    fn restore(&mut self, state: StrategyState) -> Result<(), StrategyError> {
        self.restore_named(&self.name(), &state)
    }
}

impl ServerUpdate for FedAvg {
    fn server_step(&mut self, mean_delta: NamedTensors) -> Result<NamedTensors, StrategyError> {
        self.rounds += 1;
        Ok(scaled(mean_delta, self.server_learning_rate))
    }
}

/// FedProx: FedAvg aggregation; clients add the proximal term `μ/2 ‖w − w_global‖²`.
#[derive(Debug, Clone, PartialEq)]
pub struct FedProx {
    avg: FedAvg,
    mu: f64,
}

impl FedProx {
    /// FedProx with proximal coefficient `mu` (finite, ≥ 0) and server learning rate 1.
    pub fn new(mu: f64) -> Result<Self, StrategyError> {
        check_non_negative("mu", mu)?;
        Ok(Self { avg: FedAvg::default(), mu })
    }

    /// FedProx with a server learning rate other than 1.
    pub fn with_server_learning_rate(mu: f64, server_learning_rate: f64) -> Result<Self, StrategyError> {
        check_non_negative("mu", mu)?;
        Ok(Self { avg: FedAvg::new(server_learning_rate)?, mu })
    }

    /// The proximal coefficient μ.
    pub fn mu(&self) -> f64 {
        self.mu
    }
}

impl Strategy for FedProx {
    fn name(&self) -> String {
        "fed-prox".into()
    }

    fn configure_round(&mut self, _ctx: &RoundContext) -> RoundConfig {
        RoundConfig { proximal_mu: self.mu, ..RoundConfig::default() }
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
        Ok(self.avg.state_named(&self.name()))
    }

    fn restore(&mut self, state: StrategyState) -> Result<(), StrategyError> {
        self.avg.restore_named(&self.name(), &state)
    }
}

impl ServerUpdate for FedProx {
    fn server_step(&mut self, mean_delta: NamedTensors) -> Result<NamedTensors, StrategyError> {
        self.avg.server_step(mean_delta)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use covey_tensors::HostTensor;

    fn update(client: &str, n: u64, a: Vec<f32>, b: Vec<f32>) -> ClientUpdate {
        let mut delta = NamedTensors::new();
        delta.insert("l.lora_A".into(), HostTensor::new(vec![a.len()], a).expect("a"));
        delta.insert("l.lora_B".into(), HostTensor::new(vec![b.len(), 1], b).expect("b"));
        ClientUpdate { client: client.into(), num_examples: n, delta, within_clip: None }
    }

    const CTX: RoundContext = RoundContext { round: 1, expected_clients: 3, population: 10 };

    #[test]
    fn weighted_mean_and_server_learning_rate() {
        let ups = || vec![update("a", 1, vec![1.0, 0.0], vec![2.0]), update("b", 3, vec![5.0, 4.0], vec![-2.0])];
        let agg = FedAvg::default().aggregate(&CTX, &mut ups().into_iter(), 0).expect("ok").expect("some");
        assert_eq!(agg.step["l.lora_A"].data, vec![4.0, 3.0]);
        assert_eq!(agg.step["l.lora_B"].data, vec![-1.0]);
        assert_eq!(agg.step["l.lora_B"].shape, vec![1, 1]);
        assert_eq!((agg.num_updates, agg.total_examples), (2, 4));
        let mut half = FedAvg::new(0.5).expect("lr");
        let agg = half.aggregate(&CTX, &mut ups().into_iter(), 1).expect("ok").expect("some");
        assert_eq!(agg.step["l.lora_A"].data, vec![2.0, 1.5]);
        assert_eq!(half.rounds(), 1);
    }

    #[test]
    fn nothing_to_aggregate_and_zero_weights() {
        let mut s = FedAvg::default();
        assert!(s.aggregate(&CTX, &mut std::iter::empty(), 5).expect("ok").is_none());
        assert_eq!(s.rounds(), 0);
        let zero = vec![update("a", 0, vec![1.0], vec![1.0]), update("b", 0, vec![1.0], vec![1.0])];
        assert!(matches!(
            s.aggregate(&CTX, &mut zero.into_iter(), 0),
            Err(StrategyError::ZeroTotalWeight { updates: 2 })
        ));
    }

    #[test]
    fn mismatch_names_client_and_tensor() {
        let ups = vec![update("a", 1, vec![1.0, 2.0], vec![1.0]), update("evil", 1, vec![1.0, 2.0, 3.0], vec![1.0])];
        let err = FedAvg::default().aggregate(&CTX, &mut ups.into_iter(), 0).expect_err("mismatch");
        let msg = err.to_string();
        assert!(msg.contains("evil") && msg.contains("l.lora_A"), "{msg}");
    }

    #[test]
    fn streaming_does_not_collect() {
        // A lazily generated stream of many updates aggregates without holding them.
        let mut s = FedAvg::default();
        let mut it = (0..10_000u64).map(|i| update(&format!("c{i}"), 1, vec![i as f32, 1.0], vec![0.5]));
        let agg = s.aggregate(&CTX, &mut it, 0).expect("ok").expect("some");
        assert!((agg.step["l.lora_A"].data[0] - 4999.5).abs() < 1e-3);
        assert_eq!(agg.num_updates, 10_000);
    }

    #[test]
    fn fedprox_sends_mu_and_averages() {
        let mut p = FedProx::new(0.01).expect("mu");
        assert_eq!(p.configure_round(&CTX).proximal_mu, 0.01);
        assert_eq!(p.configure_round(&CTX).clip_norm, None);
        let ups = vec![update("a", 1, vec![1.0, 0.0], vec![2.0]), update("b", 1, vec![3.0, 0.0], vec![0.0])];
        let agg = p.aggregate(&CTX, &mut ups.into_iter(), 0).expect("ok").expect("some");
        assert_eq!(agg.step["l.lora_A"].data, vec![2.0, 0.0]);
        assert!(FedProx::new(-1.0).is_err());
        assert!(FedAvg::new(0.0).is_err());
        assert!(FedAvg::new(f64::NAN).is_err());
    }

    #[test]
    fn state_restores_round_counter_and_refuses_other_strategies() {
        let mut a = FedAvg::default();
        let ups = vec![update("a", 1, vec![1.0, 0.0], vec![2.0])];
        a.aggregate(&CTX, &mut ups.into_iter(), 0).expect("ok");
        let st = a.state().expect("state");
        let mut b = FedAvg::default();
        b.restore(st.clone()).expect("restore");
        assert_eq!(b.rounds(), 1);
        let mut p = FedProx::new(0.1).expect("p");
        assert!(matches!(p.restore(st), Err(StrategyError::StateMismatch { .. })));
    }
}
