//! Correlated noise for DP-FTRL (Kairouz et al. 2021, "Practical and private (deep)
//! learning without sampling or shuffling"): tree aggregation of Gaussian noise, in the
//! **restart** variant — a fresh binary tree every `period` steps.
//!
//! DP-FTRL releases noisy *prefix sums* of the clipped updates. Within a tree, the noise
//! in the prefix sum of steps `1..=t` is the sum of the Gaussian nodes of the dyadic
//! blocks that make up `[1, t]` (one per set bit of `t`), so it has `O(log t)` nodes
//! instead of `t`. The server releases the increments: the value to add at step `t` is
//! the step's clipped sum plus `N_t − N_prev` ([`CorrelatedNoise::noise_for_step`]), so
//! the running sum of releases carries exactly the tree's noise. At a restart the last
//! tree's noise stays in the model and the next tree starts from zero.
//!
//! Every node's noise is drawn from its own 32-byte seed (fresh from the OS CSPRNG when
//! the node is first used) through ChaCha20, and regenerated from the seed when it is
//! needed again, so the state is the seeds of the current prefix's nodes: `O(log period)`
//! seeds, never a noise vector. Steps that release nothing (a failed round) are skipped:
//! their leaves hold no data, and the next release takes the increment over the gap.
//!
//! **Sensitivity.** A device's update at one step enters one node per level of the tree:
//! `depth = ⌈log2(period + 1)⌉` nodes. With at most one contribution per tree (the
//! coordinator enforces `min-separation = period`) and at most `k` contributions in all,
//! the squared L2 sensitivity of everything released is `k · depth` (per unit clip norm):
//! the whole run is one Gaussian mechanism with multiplier `z / √(k · depth)`, with no
//! sampling assumption ([`CorrelatedNoise::sensitivity_squared`]; accounted by
//! [`crate::Accountant::epsilon_without_sampling`], checked against `dp_accounting`'s
//! tree-aggregation RDP in `tests/vectors/tree_vectors.json`).
//!
//! The noise source is the [`CorrelatedNoise`] trait, so that matrix-factorisation
//! mechanisms (BLT, McMahan et al. 2024) can take the tree's place.

use serde::{Deserialize, Serialize};

use crate::error::{PrivacyError, Result};
use crate::noise::SecureRng;

/// A source of correlated Gaussian noise for released running sums.
pub trait CorrelatedNoise: std::fmt::Debug + Send {
    /// The mechanism's name (for manifests and reports).
    fn name(&self) -> String;

    /// The noise, in units of the noise standard deviation, to add to the value released
    /// at `step` (1-based, strictly increasing between calls; skipped steps release
    /// nothing), `dim` coordinates.
    fn noise_for_step(&mut self, step: u64, dim: usize) -> Result<Vec<f64>>;

    /// Squared L2 sensitivity of everything released, per unit clip norm, for a device
    /// contributing to at most `participations` steps at least `period` steps apart.
    fn sensitivity_squared(&self, participations: u64) -> f64;
}

/// Where fresh node seeds come from.
#[derive(Debug)]
pub enum SeedSource {
    /// 32 fresh bytes from the operating system per node (production).
    Os,
    /// A seeded ChaCha20 stream (simulations with a fixed seed, tests).
    Rng(Box<SecureRng>),
}

impl SeedSource {
    fn fresh(&mut self) -> Result<[u8; 32]> {
        let mut seed = [0u8; 32];
        match self {
            SeedSource::Os => getrandom::fill(&mut seed).map_err(PrivacyError::Entropy)?,
            SeedSource::Rng(rng) => rng.fill_bytes(&mut seed),
        }
        Ok(seed)
    }
}

/// One node of the current tree: the dyadic block `((index − 1)·2^level, index·2^level]`
/// of the tree's steps, and the seed of its noise.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeSeed {
    /// Level (0: one step).
    pub level: u32,
    /// 1-based index of the block at its level.
    pub index: u64,
    /// The seed its noise is drawn from. Secret: anyone holding it can subtract the noise.
    pub seed: [u8; 32],
}

/// What a [`TreeNoise`] persists: the tree in progress, the last step released in it and
/// the seeds of that step's prefix nodes (at most `depth`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TreeState {
    /// Steps per tree.
    pub period: u64,
    /// Index of the tree in progress (0-based).
    pub tree: u64,
    /// Last step released in that tree (1-based within the tree; 0: none yet).
    pub last: u64,
    /// Seeds of the nodes of `[1, last]`'s dyadic decomposition.
    pub nodes: Vec<NodeSeed>,
}

/// The number of levels of a tree over `period` steps: `⌈log2(period + 1)⌉`.
pub fn depth(period: u64) -> u32 {
    64 - period.leading_zeros()
}

/// The dyadic blocks `(level, index)` that make up `[1, t]`, largest first.
pub fn decomposition(t: u64) -> Vec<(u32, u64)> {
    (0..64u32).rev().filter(|&l| t >> l & 1 == 1).map(|l| (l, t >> l)).collect()
}

/// The standard-normal noise of a node, regenerated from its seed.
pub fn node_noise(seed: &[u8; 32], dim: usize) -> Vec<f64> {
    let mut out = vec![0.0; dim];
    SecureRng::from_seed(*seed).fill_standard_normal(&mut out);
    out
}

/// Tree-aggregated Gaussian noise with restarts. See the [module documentation](self).
#[derive(Debug)]
pub struct TreeNoise {
    state: TreeState,
    seeds: SeedSource,
}

impl TreeNoise {
    /// A tree of `period` steps (≥ 1), restarted every `period` steps.
    pub fn new(period: u64, seeds: SeedSource) -> Result<Self> {
        if period == 0 {
            return Err(PrivacyError::param("period", 0.0, "a tree covers at least one step"));
        }
        Ok(Self { state: TreeState { period, tree: 0, last: 0, nodes: Vec::new() }, seeds })
    }

    /// Resume from a persisted state.
    pub fn restore(state: TreeState, seeds: SeedSource) -> Result<Self> {
        if state.period == 0 || state.last > state.period {
            return Err(PrivacyError::param("tree.last", state.last as f64, "outside the tree's period"));
        }
        let expected = decomposition(state.last);
        let found: Vec<(u32, u64)> = state.nodes.iter().map(|n| (n.level, n.index)).collect();
        if found != expected {
            return Err(PrivacyError::param(
                "tree.nodes",
                state.nodes.len() as f64,
                "not the dyadic decomposition of the last step",
            ));
        }
        Ok(Self { state, seeds })
    }

    /// Go back to (or adopt) a state, validated as by [`TreeNoise::restore`], keeping this
    /// tree's seed source: a round that failed after drawing its noise is undone this way.
    pub fn rewind(&mut self, state: TreeState) -> Result<()> {
        let period = self.state.period;
        let checked = Self::restore(state, SeedSource::Os)?;
        if checked.state.period != period {
            return Err(PrivacyError::param("tree.period", checked.state.period as f64, "another tree's period"));
        }
        self.state = checked.state;
        Ok(())
    }

    /// The state to persist.
    pub fn state(&self) -> &TreeState {
        &self.state
    }

    /// Steps per tree.
    pub fn period(&self) -> u64 {
        self.state.period
    }

    /// The noise now in the prefix sum of the tree in progress, regenerated from the
    /// seeds (`Σ` of its nodes' noise).
    pub fn prefix_noise(&self, dim: usize) -> Vec<f64> {
        let mut out = vec![0.0; dim];
        for n in &self.state.nodes {
            for (o, v) in out.iter_mut().zip(node_noise(&n.seed, dim)) {
                *o += v;
            }
        }
        out
    }
}

impl CorrelatedNoise for TreeNoise {
    fn name(&self) -> String {
        format!("tree-aggregation-restart({})", self.state.period)
    }

    fn noise_for_step(&mut self, step: u64, dim: usize) -> Result<Vec<f64>> {
        if step == 0 {
            return Err(PrivacyError::param("step", 0.0, "steps are 1-based"));
        }
        let period = self.state.period;
        let (tree, t) = ((step - 1) / period, (step - 1) % period + 1);
        if tree < self.state.tree || (tree == self.state.tree && t <= self.state.last) {
            return Err(PrivacyError::param("step", step as f64, "steps must increase"));
        }
        let mut out = vec![0.0; dim];
        let mut kept: Vec<NodeSeed> = Vec::new();
        if tree == self.state.tree {
            // Nodes of the last prefix that leave: subtract their noise; the others stay.
            let next = decomposition(t);
            for n in self.state.nodes.iter().cloned() {
                if next.contains(&(n.level, n.index)) {
                    kept.push(n);
                } else {
                    for (o, v) in out.iter_mut().zip(node_noise(&n.seed, dim)) {
                        *o -= v;
                    }
                }
            }
        }
        // A new tree starts from zero: the previous tree's noise stays in the model.
        let mut nodes = Vec::new();
        for (level, index) in decomposition(t) {
            if let Some(pos) = kept.iter().position(|n| (n.level, n.index) == (level, index)) {
                nodes.push(kept.swap_remove(pos));
                continue;
            }
            let seed = self.seeds.fresh()?;
            for (o, v) in out.iter_mut().zip(node_noise(&seed, dim)) {
                *o += v;
            }
            nodes.push(NodeSeed { level, index, seed });
        }
        self.state = TreeState { period, tree, last: t, nodes };
        Ok(out)
    }

    fn sensitivity_squared(&self, participations: u64) -> f64 {
        participations as f64 * f64::from(depth(self.state.period))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use serde::Deserialize;

    use super::*;
    use crate::Accountant;

    fn seeded(period: u64) -> TreeNoise {
        TreeNoise::new(period, SeedSource::Rng(Box::new(SecureRng::from_seed([7; 32])))).expect("tree")
    }

    #[test]
    fn decompositions_are_the_dyadic_blocks_of_the_prefix() {
        assert_eq!(decomposition(1), [(0, 1)]);
        assert_eq!(decomposition(6), [(2, 1), (1, 3)]); // [1,4] ∪ [5,6]
        assert_eq!(decomposition(7), [(2, 1), (1, 3), (0, 7)]);
        assert_eq!(decomposition(8), [(3, 1)]);
        for t in 1..200u64 {
            let blocks = decomposition(t);
            let mut end = 0;
            for (l, i) in blocks {
                assert_eq!((i - 1) << l, end, "t={t}: blocks are contiguous from 1");
                end = i << l;
            }
            assert_eq!(end, t);
        }
        assert_eq!([depth(1), depth(2), depth(3), depth(4), depth(7), depth(16), depth(1000)], [1, 2, 2, 3, 3, 5, 10]);
    }

    /// The running sum of the released noise equals, after every step, the sum of the
    /// noise of exactly the nodes of that prefix's decomposition, regenerated from their
    /// seeds; a node's seed never changes while it lives; a restart starts from zero.
    #[test]
    fn every_prefix_carries_exactly_the_noise_of_its_nodes() {
        let dim = 5;
        let period = 13;
        let mut tree = seeded(period);
        let mut running = vec![0.0; dim];
        let mut carried = vec![0.0; dim]; // noise of finished trees
        let mut seen: BTreeMap<(u64, u32, u64), [u8; 32]> = BTreeMap::new();
        // Steps with gaps (rounds that released nothing) and two restarts.
        let steps = [1u64, 2, 3, 5, 6, 7, 8, 12, 13, 14, 15, 19, 26, 27, 40];
        let mut last_tree = 0;
        for &step in &steps {
            let inc = tree.noise_for_step(step, dim).expect("step");
            let (tr, t) = ((step - 1) / period, (step - 1) % period + 1);
            if tr != last_tree {
                // The finished tree's noise stays in the running sum.
                carried = running.clone();
                last_tree = tr;
            }
            for (r, v) in running.iter_mut().zip(&inc) {
                *r += v;
            }
            let state = tree.state();
            let ids: Vec<(u32, u64)> = state.nodes.iter().map(|n| (n.level, n.index)).collect();
            assert_eq!(ids, decomposition(t), "step {step}");
            let mut expected = carried.clone();
            for n in &state.nodes {
                if let Some(old) = seen.insert((tr, n.level, n.index), n.seed) {
                    assert_eq!(old, n.seed, "a live node's seed changed");
                }
                for (e, v) in expected.iter_mut().zip(node_noise(&n.seed, dim)) {
                    *e += v;
                }
            }
            for (r, e) in running.iter().zip(&expected) {
                assert!((r - e).abs() < 1e-12, "step {step}: {r} vs {e}");
            }
            let prefix = tree.prefix_noise(dim);
            for ((p, e), c) in prefix.iter().zip(&expected).zip(&carried) {
                assert!((p + c - e).abs() < 1e-12);
            }
            assert!(state.nodes.len() <= depth(period) as usize);
        }
        assert!(tree.noise_for_step(40, dim).is_err(), "steps must increase");
        assert!(tree.noise_for_step(3, dim).is_err());
    }

    #[test]
    fn a_restored_tree_releases_what_the_original_would() {
        let (dim, period) = (4, 16);
        let mut a = seeded(period);
        for s in 1..=5 {
            a.noise_for_step(s, dim).expect("step");
        }
        let json = serde_json::to_string(a.state()).expect("state");
        let state: TreeState = serde_json::from_str(&json).expect("state");
        let mut b = TreeNoise::restore(state.clone(), SeedSource::Os).expect("restore");
        assert_eq!(b.prefix_noise(dim), a.prefix_noise(dim));
        // Step 6 = [1,4] ∪ [5,6]: node [5] leaves, [5,6] is fresh. The part from the
        // leaving node is the same for both; the fresh node differs (fresh seeds).
        let ia = a.noise_for_step(6, dim).expect("a");
        let ib = b.noise_for_step(6, dim).expect("b");
        let fresh_a = node_noise(&a.state().nodes[1].seed, dim);
        let fresh_b = node_noise(&b.state().nodes[1].seed, dim);
        for i in 0..dim {
            assert!(((ia[i] - fresh_a[i]) - (ib[i] - fresh_b[i])).abs() < 1e-12);
        }
        let mut bad = state;
        bad.nodes.pop();
        assert!(TreeNoise::restore(bad, SeedSource::Os).is_err());
        assert!(TreeNoise::new(0, SeedSource::Os).is_err());
    }

    #[test]
    fn node_noise_is_standard_normal() {
        let x = node_noise(&[3; 32], 100_000);
        let n = x.len() as f64;
        let mean = x.iter().sum::<f64>() / n;
        let var = x.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0);
        assert!(mean.abs() < 0.02 && (var - 1.0).abs() < 0.02, "{mean} {var}");
        assert_ne!(node_noise(&[3; 32], 4), node_noise(&[4; 32], 4));
    }

    #[test]
    fn accounting_matches_dp_accounting_tree_aggregation() {
        #[derive(Deserialize)]
        struct Vector {
            noise_multiplier: f64,
            period: u64,
            participations: u64,
            delta: f64,
            rdp_epsilon: f64,
            pld_epsilon: f64,
        }
        #[derive(Deserialize)]
        struct File {
            vectors: Vec<Vector>,
        }
        let file: File = serde_json::from_str(include_str!("../tests/vectors/tree_vectors.json")).expect("vectors");
        assert_eq!(file.vectors.len(), 240);
        for v in &file.vectors {
            let tree = TreeNoise::new(v.period, SeedSource::Os).expect("tree");
            let s2 = tree.sensitivity_squared(v.participations);
            let rdp = Accountant::Rdp.epsilon_without_sampling(v.noise_multiplier, s2, v.delta).expect("rdp");
            let rel = (rdp - v.rdp_epsilon).abs() / v.rdp_epsilon;
            assert!(
                rel < 1e-9,
                "z={} b={} k={}: RDP {rdp} vs {}",
                v.noise_multiplier,
                v.period,
                v.participations,
                v.rdp_epsilon
            );
            let pld = Accountant::Pld.epsilon_without_sampling(v.noise_multiplier, s2, v.delta).expect("pld");
            let rel = (pld - v.pld_epsilon).abs() / v.pld_epsilon;
            assert!(
                rel < 1e-3,
                "z={} b={} k={}: PLD {pld} vs {}",
                v.noise_multiplier,
                v.period,
                v.participations,
                v.pld_epsilon
            );
            assert!(pld <= rdp);
        }
    }
}
