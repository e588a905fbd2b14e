//! Byzantine-robust, unweighted aggregators (Yin et al., ICML 2018): coordinate-wise
//! trimmed mean and coordinate-wise median.
//!
//! Both ignore `num_examples` (a client could inflate it) and collect the round's updates
//! (memory grows with their number), since every coordinate needs all values at once.
//! The step is the aggregate itself (no server learning rate).

use covey_tensors::{HostTensor, NamedTensors};

use crate::common::collect_checked;
use crate::config::check_trim_fraction;
use crate::{Aggregate, ClientUpdate, RoundContext, Strategy, StrategyError, StrategyState};

/// Apply `reduce` to the sorted values of each coordinate across `updates` (non-empty,
/// validated).
fn per_coordinate(updates: &[ClientUpdate], reduce: impl Fn(&[f32]) -> f32) -> NamedTensors {
    let mut out = NamedTensors::new();
    let Some(first) = updates.first() else {
        return out;
    };
    let mut column = Vec::with_capacity(updates.len());
    for (name, t) in &first.delta {
        let tensors: Vec<&HostTensor> = updates.iter().filter_map(|u| u.delta.get(name)).collect();
        let data = (0..t.data.len())
            .map(|j| {
                column.clear();
                column.extend(tensors.iter().map(|t| t.data[j]));
                column.sort_unstable_by(f32::total_cmp);
                reduce(&column)
            })
            .collect();
        out.insert(name.clone(), HostTensor { shape: t.shape.clone(), data });
    }
    out
}

fn aggregate_with(
    rounds: &mut u64,
    updates: &mut dyn Iterator<Item = ClientUpdate>,
    reduce: impl Fn(&[f32]) -> f32,
) -> Result<Option<Aggregate>, StrategyError> {
    let updates = collect_checked(updates)?;
    if updates.is_empty() {
        return Ok(None);
    }
    let step = per_coordinate(&updates, reduce);
    *rounds += 1;
    Ok(Some(Aggregate {
        step,
        num_updates: updates.len(),
        total_examples: updates.iter().fold(0u64, |s, u| s.saturating_add(u.num_examples)),
        privacy: None,
    }))
}

/// Coordinate-wise trimmed mean: per coordinate, drop the `⌊β n⌋` largest and the
/// `⌊β n⌋` smallest of the `n` values and average the rest (unweighted), as
/// `scipy.stats.trim_mean`.
#[derive(Debug, Clone, PartialEq)]
pub struct TrimmedMean {
    beta: f64,
    rounds: u64,
}

impl TrimmedMean {
    /// A trimmed mean dropping the fraction `beta` ∈ [0, 0.5) at each end.
    pub fn new(beta: f64) -> Result<Self, StrategyError> {
        check_trim_fraction("beta", beta)?;
        Ok(Self { beta, rounds: 0 })
    }

    /// The fraction trimmed at each end.
    pub fn beta(&self) -> f64 {
        self.beta
    }
}

impl Strategy for TrimmedMean {
    fn name(&self) -> String {
        "trimmed-mean".into()
    }

    fn aggregate(
        &mut self,
        _ctx: &RoundContext,
        updates: &mut dyn Iterator<Item = ClientUpdate>,
        _failures: usize,
    ) -> Result<Option<Aggregate>, StrategyError> {
        let beta = self.beta;
        aggregate_with(&mut self.rounds, updates, |sorted| {
            let n = sorted.len();
            // β < 0.5 keeps at least one value.
            let k = ((beta * n as f64).floor() as usize).min((n - 1) / 2);
            let kept = &sorted[k..n - k];
            (kept.iter().map(|&x| f64::from(x)).sum::<f64>() / kept.len() as f64) as f32
        })
    }

    crate::state::rounds_only_state!();
}

/// Coordinate-wise median (unweighted; the mean of the two middle values for an even
/// number of updates, as `numpy.median`).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct CoordinateMedian {
    rounds: u64,
}

impl CoordinateMedian {
    /// A coordinate-wise median.
    pub fn new() -> Self {
        Self::default()
    }
}

impl Strategy for CoordinateMedian {
    fn name(&self) -> String {
        "median".into()
    }

    fn aggregate(
        &mut self,
        _ctx: &RoundContext,
        updates: &mut dyn Iterator<Item = ClientUpdate>,
        _failures: usize,
    ) -> Result<Option<Aggregate>, StrategyError> {
        aggregate_with(&mut self.rounds, updates, |sorted| {
            let n = sorted.len();
            if n % 2 == 1 {
                sorted[n / 2]
            } else {
                ((f64::from(sorted[n / 2 - 1]) + f64::from(sorted[n / 2])) / 2.0) as f32
            }
        })
    }

    crate::state::rounds_only_state!();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn update(client: &str, n: u64, x: &[f32]) -> ClientUpdate {
        let mut delta = NamedTensors::new();
        delta.insert("w".into(), HostTensor::new(vec![x.len()], x.to_vec()).expect("t"));
        ClientUpdate { client: client.into(), num_examples: n, delta, within_clip: None }
    }

    const CTX: RoundContext = RoundContext { round: 1, expected_clients: 5, population: 5 };

    fn run(s: &mut dyn Strategy, ups: Vec<ClientUpdate>) -> Vec<f32> {
        s.aggregate(&CTX, &mut ups.into_iter(), 0).expect("ok").expect("some").step["w"].data.clone()
    }

    #[test]
    fn trimmed_mean_drops_the_extremes() {
        // Per coordinate: one attacker value far out on each side.
        let ups = vec![
            update("a", 1, &[1.0, -1e6]),
            update("b", 1, &[2.0, 2.0]),
            update("c", 100, &[3.0, 3.0]),
            update("d", 1, &[4.0, 4.0]),
            update("evil", 1, &[1e6, 5.0]),
        ];
        // n = 5, β = 0.2: one dropped each side.
        assert_eq!(run(&mut TrimmedMean::new(0.2).expect("b"), ups.clone()), vec![3.0, 3.0]);
        // β = 0.1: ⌊0.5⌋ = 0 dropped: the plain unweighted mean.
        let plain = run(&mut TrimmedMean::new(0.1).expect("b"), ups);
        assert!((plain[0] - (1e6 + 10.0) / 5.0).abs() < 1e-1);
    }

    #[test]
    fn median_odd_and_even() {
        let ups = vec![update("a", 1, &[5.0]), update("b", 9, &[-1.0]), update("c", 1, &[100.0])];
        assert_eq!(run(&mut CoordinateMedian::new(), ups.clone()), vec![5.0]);
        let mut four = ups;
        four.push(update("d", 1, &[6.0]));
        assert_eq!(run(&mut CoordinateMedian::new(), four), vec![5.5]);
    }

    #[test]
    fn bad_beta_and_empty_rounds() {
        assert!(TrimmedMean::new(0.5).is_err());
        assert!(TrimmedMean::new(-0.01).is_err());
        assert!(TrimmedMean::new(0.0).is_ok());
        let mut m = CoordinateMedian::new();
        assert!(m.aggregate(&CTX, &mut std::iter::empty(), 3).expect("ok").is_none());
        let bad = vec![update("a", 1, &[1.0]), update("b", 1, &[1.0, 2.0])];
        assert!(matches!(m.aggregate(&CTX, &mut bad.into_iter(), 0), Err(StrategyError::ShapeMismatch { .. })));
    }
}
