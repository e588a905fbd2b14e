//! Byzantine-robust aggregators that look at whole updates rather than coordinates:
//! Krum and multi-Krum (Blanchard, El Mhamdi, Guerraoui and Stainer, NeurIPS 2017) and the
//! geometric median of RFA (Pillutla, Kakade and Harchaoui, IEEE TSP 2022).
//!
//! All three are unweighted (a client could inflate `num_examples`), collect the round's
//! updates (distances need them all at once), and return the aggregate as the step (no
//! server learning rate), like the coordinate-wise ones in [`crate::robust`]. Updates are
//! flattened in tensor-name order; distances are computed in f64.

use covey_tensors::{HostTensor, NamedTensors};

use crate::common::collect_checked;
use crate::config::check_trim_fraction;
use crate::{Aggregate, ClientUpdate, RoundContext, Strategy, StrategyError, StrategyState};

fn flatten(u: &ClientUpdate) -> Vec<f64> {
    u.delta.values().flat_map(|t| t.data.iter().map(|&x| f64::from(x))).collect()
}

fn unflatten(like: &NamedTensors, flat: &[f64]) -> NamedTensors {
    let mut out = NamedTensors::new();
    let mut at = 0;
    for (name, t) in like {
        let n = t.data.len();
        let data = flat[at..at + n].iter().map(|&x| x as f32).collect();
        out.insert(name.clone(), HostTensor { shape: t.shape.clone(), data });
        at += n;
    }
    out
}

fn squared_distance(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum()
}

fn finish(rounds: &mut u64, updates: &[ClientUpdate], step: NamedTensors) -> Aggregate {
    *rounds += 1;
    Aggregate {
        step,
        num_updates: updates.len(),
        total_examples: updates.iter().fold(0u64, |s, u| s.saturating_add(u.num_examples)),
        privacy: None,
    }
}

/// Krum's scores: for each update, the sum of squared distances to its `n − f − 2`
/// nearest others (at least one; none when it is alone).
fn krum_scores(points: &[Vec<f64>], f: usize) -> Vec<f64> {
    let n = points.len();
    let neighbours = n.saturating_sub(f + 2).max(1).min(n.saturating_sub(1));
    (0..n)
        .map(|i| {
            let mut d: Vec<f64> =
                (0..n).filter(|&j| j != i).map(|j| squared_distance(&points[i], &points[j])).collect();
            d.sort_by(f64::total_cmp);
            d.iter().take(neighbours).sum()
        })
        .collect()
}

/// Krum (`keep = 1`) and multi-Krum: score every update by the squared distances to its
/// `n − f − 2` nearest others, `f = ⌊byzantine_fraction · n⌋`, and average the `m`
/// best-scored (unweighted): `m = 1` for Krum, `m = n − f` for multi-Krum. Ties go to the
/// smaller flattened update in lexicographic order, so the result does not depend on the
/// order updates arrive in.
#[derive(Debug, Clone, PartialEq)]
pub struct Krum {
    byzantine_fraction: f64,
    multi: bool,
    rounds: u64,
}

impl Krum {
    /// Krum, tolerating a fraction `byzantine_fraction` ∈ [0, 0.5) of attackers.
    pub fn new(byzantine_fraction: f64) -> Result<Self, StrategyError> {
        check_trim_fraction("byzantine_fraction", byzantine_fraction)?;
        Ok(Self { byzantine_fraction, multi: false, rounds: 0 })
    }

    /// Multi-Krum: the mean of the `n − f` best-scored updates.
    pub fn multi(byzantine_fraction: f64) -> Result<Self, StrategyError> {
        Ok(Self { multi: true, ..Self::new(byzantine_fraction)? })
    }
}

impl Strategy for Krum {
    fn name(&self) -> String {
        if self.multi { "multi-krum".into() } else { "krum".into() }
    }

    fn aggregate(
        &mut self,
        _ctx: &RoundContext,
        updates: &mut dyn Iterator<Item = ClientUpdate>,
        _failures: usize,
    ) -> Result<Option<Aggregate>, StrategyError> {
        let updates = collect_checked(updates)?;
        let Some(first) = updates.first() else { return Ok(None) };
        let points: Vec<Vec<f64>> = updates.iter().map(flatten).collect();
        let n = points.len();
        let f = (self.byzantine_fraction * n as f64).floor() as usize;
        let scores = krum_scores(&points, f);
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by(|&a, &b| {
            scores[a].total_cmp(&scores[b]).then_with(|| {
                points[a]
                    .iter()
                    .zip(&points[b])
                    .map(|(x, y)| x.total_cmp(y))
                    .find(|o| o.is_ne())
                    .unwrap_or(std::cmp::Ordering::Equal)
            })
        });
        let keep = if self.multi { (n - f).max(1) } else { 1 };
        let mut mean = vec![0.0f64; points[0].len()];
        for &i in &order[..keep] {
            for (m, x) in mean.iter_mut().zip(&points[i]) {
                *m += x;
            }
        }
        mean.iter_mut().for_each(|m| *m /= keep as f64);
        let step = unflatten(&first.delta, &mean);
        Ok(Some(finish(&mut self.rounds, &updates, step)))
    }

    crate::state::rounds_only_state!();
}

/// The geometric median of the updates (unweighted), by smoothed Weiszfeld iterations
/// from the mean (RFA): `z ← Σ x_i / max(ν, |z − x_i|) / Σ 1 / max(ν, |z − x_i|)`, stopped
/// after `max_iterations` or when `z` moves less than `tolerance` (relative). Its
/// breakdown point is ½: fewer than half the updates cannot move it arbitrarily far.
#[derive(Debug, Clone, PartialEq)]
pub struct GeometricMedian {
    max_iterations: usize,
    smoothing: f64,
    rounds: u64,
}

/// Iterations of [`GeometricMedian`] by default (RFA uses 3 to 10).
pub const GEOMETRIC_MEDIAN_ITERATIONS: usize = 10;

impl GeometricMedian {
    /// A geometric median with at most `max_iterations` (≥ 1) Weiszfeld steps and
    /// smoothing `smoothing` (> 0: the distance below which an update stops dominating).
    pub fn new(max_iterations: usize, smoothing: f64) -> Result<Self, StrategyError> {
        if max_iterations == 0 {
            return Err(StrategyError::InvalidConfig {
                field: "max_iterations",
                value: "0".into(),
                reason: "at least one Weiszfeld step",
            });
        }
        crate::config::check_positive("smoothing", smoothing)?;
        Ok(Self { max_iterations, smoothing, rounds: 0 })
    }
}

impl Default for GeometricMedian {
    fn default() -> Self {
        Self { max_iterations: GEOMETRIC_MEDIAN_ITERATIONS, smoothing: 1e-6, rounds: 0 }
    }
}

impl Strategy for GeometricMedian {
    fn name(&self) -> String {
        "geometric-median".into()
    }

    fn aggregate(
        &mut self,
        _ctx: &RoundContext,
        updates: &mut dyn Iterator<Item = ClientUpdate>,
        _failures: usize,
    ) -> Result<Option<Aggregate>, StrategyError> {
        let updates = collect_checked(updates)?;
        let Some(first) = updates.first() else { return Ok(None) };
        let points: Vec<Vec<f64>> = updates.iter().map(flatten).collect();
        let n = points.len() as f64;
        let mut z = vec![0.0f64; points[0].len()];
        for p in &points {
            for (zi, x) in z.iter_mut().zip(p) {
                *zi += x / n;
            }
        }
        for _ in 0..self.max_iterations {
            let weights: Vec<f64> =
                points.iter().map(|p| 1.0 / squared_distance(&z, p).sqrt().max(self.smoothing)).collect();
            let total: f64 = weights.iter().sum();
            let mut next = vec![0.0f64; z.len()];
            for (p, w) in points.iter().zip(&weights) {
                for (ni, x) in next.iter_mut().zip(p) {
                    *ni += w * x / total;
                }
            }
            let moved = squared_distance(&next, &z).sqrt();
            let scale = next.iter().map(|x| x * x).sum::<f64>().sqrt().max(1e-30);
            z = next;
            if moved <= 1e-9 * scale {
                break;
            }
        }
        let step = unflatten(&first.delta, &z);
        Ok(Some(finish(&mut self.rounds, &updates, step)))
    }

    crate::state::rounds_only_state!();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn update(client: &str, x: &[f32]) -> ClientUpdate {
        let mut delta = NamedTensors::new();
        delta.insert("w".into(), HostTensor::new(vec![x.len()], x.to_vec()).expect("t"));
        ClientUpdate { client: client.into(), num_examples: 1, delta, within_clip: None }
    }

    const CTX: RoundContext = RoundContext { round: 1, expected_clients: 10, population: 10 };

    fn run(s: &mut dyn Strategy, ups: Vec<ClientUpdate>) -> Vec<f32> {
        s.aggregate(&CTX, &mut ups.into_iter(), 0).expect("ok").expect("some").step["w"].data.clone()
    }

    /// Eight honest updates around (1, 1) and two attackers: one scaled far out, one
    /// sign-flipped and scaled.
    fn round_with_attackers() -> Vec<ClientUpdate> {
        let mut ups: Vec<ClientUpdate> = (0..8)
            .map(|i| {
                let e = (i as f32 - 3.5) * 0.01;
                update(&format!("h{i}"), &[1.0 + e, 1.0 - e])
            })
            .collect();
        ups.push(update("scaled", &[100.0, 100.0]));
        ups.push(update("flipped", &[-50.0, -50.0]));
        ups
    }

    #[test]
    fn krum_and_multi_krum_ignore_the_attackers() {
        let k = run(&mut Krum::new(0.2).expect("krum"), round_with_attackers());
        assert!((k[0] - 1.0).abs() < 0.05 && (k[1] - 1.0).abs() < 0.05, "{k:?}");
        let m = run(&mut Krum::multi(0.2).expect("multi"), round_with_attackers());
        // f = 2: the 8 honest ones are kept and averaged.
        assert!((m[0] - 1.0).abs() < 1e-6 && (m[1] - 1.0).abs() < 1e-6, "{m:?}");
        let mean = round_with_attackers().iter().map(|u| u.delta["w"].data[0]).sum::<f32>() / 10.0;
        assert!(mean > 5.0, "the plain mean is dragged away: {mean}");
    }

    #[test]
    fn the_geometric_median_stays_with_the_majority() {
        let g = run(&mut GeometricMedian::default(), round_with_attackers());
        assert!((g[0] - 1.0).abs() < 0.1 && (g[1] - 1.0).abs() < 0.1, "{g:?}");
        // Collinear points: the median of 1, 2, 100 along a line is 2.
        let line = vec![update("a", &[1.0, 0.0]), update("b", &[2.0, 0.0]), update("c", &[100.0, 0.0])];
        let g = run(&mut GeometricMedian::new(200, 1e-9).expect("gm"), line);
        assert!((g[0] - 2.0).abs() < 1e-2 && g[1].abs() < 1e-6, "{g:?}");
    }

    #[test]
    fn few_updates_and_bad_settings() {
        assert_eq!(run(&mut Krum::new(0.3).expect("krum"), vec![update("a", &[3.0])]), vec![3.0]);
        let two = vec![update("a", &[1.0]), update("b", &[3.0])];
        assert_eq!(run(&mut Krum::new(0.0).expect("krum"), two.clone()), vec![1.0], "a tie goes to the smaller");
        assert_eq!(run(&mut Krum::multi(0.0).expect("multi"), two), vec![2.0]);
        assert!(Krum::new(0.5).is_err() && Krum::multi(-0.1).is_err());
        assert!(GeometricMedian::new(0, 1e-6).is_err() && GeometricMedian::new(3, 0.0).is_err());
        let mut g = GeometricMedian::default();
        assert!(g.aggregate(&CTX, &mut std::iter::empty(), 2).expect("ok").is_none());
        let bad = vec![update("a", &[1.0]), update("b", &[f32::NAN])];
        assert!(matches!(g.aggregate(&CTX, &mut bad.into_iter(), 0), Err(StrategyError::NonFinite { .. })));
    }
}
