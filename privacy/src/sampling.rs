//! Poisson sampling: every member of a population joins the sample independently with
//! probability `q`. It is the sampling the subsampled-Gaussian accountant ([`crate::rdp`])
//! assumes, with add/remove-one adjacency: a fixed-size draw without replacement is a
//! different mechanism (replace-one adjacency) and must not be accounted with it.
//!
//! The coordinator draws cohorts with a [`SecureRng`] keyed from the OS, so nobody can
//! tell in advance who will be sampled (amplification by sampling assumes it);
//! simulations key it from their seed to be reproducible.

use crate::error::{PrivacyError, Result};
use crate::noise::SecureRng;

/// The members of `0..population` that join, each with probability `q` (in `[0, 1]`), in
/// increasing order.
pub fn poisson(population: usize, q: f64, rng: &mut SecureRng) -> Result<Vec<usize>> {
    if !(0.0..=1.0).contains(&q) {
        return Err(PrivacyError::param("q", q, "a sampling rate must be in [0, 1]"));
    }
    Ok((0..population).filter(|_| rng.uniform() < q).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_join_independently_at_rate_q() {
        let mut rng = SecureRng::from_seed([7; 32]);
        let (n, q, rounds) = (50, 0.2, 400);
        let mut counts = vec![0usize; n];
        let mut sizes = std::collections::BTreeSet::new();
        for _ in 0..rounds {
            let s = poisson(n, q, &mut rng).expect("sample");
            assert!(s.windows(2).all(|w| w[0] < w[1]), "increasing, no repeats");
            sizes.insert(s.len());
            for i in s {
                counts[i] += 1;
            }
        }
        // Each member: 400 Bernoulli(0.2) draws, mean 80, sd 8.
        assert!(counts.iter().all(|&c| (40..=120).contains(&c)), "{counts:?}");
        let mean = counts.iter().sum::<usize>() as f64 / (n * rounds) as f64;
        assert!((mean - q).abs() < 0.01, "overall rate {mean}");
        assert!(sizes.len() > 5, "sample sizes vary: {sizes:?}");
        assert_eq!(poisson(n, 1.0, &mut rng).expect("all").len(), n);
        assert!(poisson(n, 0.0, &mut rng).expect("none").is_empty());
        assert!(poisson(n, 1.5, &mut rng).is_err());
    }
}
