//! The round policy, pure: no I/O, no transport, no clock. Given the configuration, the
//! number of eligible devices and the strategy, it decides how the cohort is sampled,
//! what every device's task is, and, given the aggregate, what the round spends in
//! privacy. The coordinator's engine and `covey-sim`'s in-process runner both call it,
//! so a simulated round and a served round are the same round.
//!
//! A round's parameters are fixed when it opens ([`RoundPolicy::plan`]) and stored on its
//! record: a poll or an upload compares against the plan, and the strategy is consulted
//! once per round, not per request.

use covey_privacy::SecureRng;
use covey_proto::manifest::PrivacySpent;
use covey_proto::task::{LoraSpec, PrivacySpec, Task, TrainingSpec};
use covey_strategy::{Mechanism, PrivacyEvent, RoundContext, Strategy};
use serde::{Deserialize, Serialize};

use crate::config::CoordinatorConfig;
use crate::error::Result;

/// How a round samples its cohort: every one of `population` devices joins independently
/// with probability `expected / population` (Poisson sampling, as the accountant assumes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sampling {
    /// N: the devices the cohort is sampled from, as the accountant counts them.
    pub population: usize,
    /// q·N: the expected cohort (central DP divides by it).
    pub expected: usize,
}

impl Sampling {
    /// The sampling rate q.
    pub fn rate(&self) -> f64 {
        (self.expected as f64 / self.population.max(1) as f64).min(1.0)
    }

    /// What the strategy is told about round `round`.
    pub fn context(&self, round: u64) -> RoundContext {
        RoundContext { round, expected_clients: self.expected.max(1), population: self.population.max(1) }
    }
}

/// Why no round opens.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum NoRound {
    /// Fewer eligible devices than `min-available` (or `min-updates`).
    NotEnoughDevices {
        /// Eligible now.
        eligible: usize,
    },
    /// `privacy.population` is below the eligible devices: the sampling rate would
    /// understate each device's chance of being sampled.
    PopulationTooSmall {
        /// Configured.
        population: usize,
        /// Eligible now.
        eligible: usize,
    },
    /// δ is not below 1 / (enrolled devices): a guarantee with such a δ allows one
    /// device's data to be published outright.
    DeltaTooLarge {
        /// Configured δ.
        delta: f64,
        /// Enrolled devices.
        devices: usize,
    },
    /// One more round would take ε past `privacy.target-epsilon`.
    BudgetReached {
        /// ε spent so far.
        epsilon: f64,
        /// ε after one more round.
        next: f64,
    },
}

/// A Gaussian release composed into the accountant.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PrivacyRecord {
    /// Sampling rate (1 for DP-FTRL: no sampling assumed).
    pub q: f64,
    /// Noise multiplier.
    pub z: f64,
    /// DP-FTRL: the rounds per noise tree. Absent: a subsampled Gaussian release.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tree_period: Option<u64>,
}

impl PrivacyRecord {
    /// A subsampled Gaussian release.
    pub fn sampled(q: f64, z: f64) -> Self {
        Self { q, z, tree_period: None }
    }
}

/// What a round is opened on, besides the policy's own choices.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RoundFrame {
    /// Round number.
    pub round_id: u64,
    /// The version devices train from.
    pub base_version: u64,
    /// SHA-256 of its signed manifest.
    pub base_manifest_hash: [u8; 32],
    /// SHA-256 of the frozen `A` factors.
    pub a_factors_sha256: [u8; 32],
    /// Deadline, ms since the Unix epoch.
    pub deadline_ms: u64,
    /// Largest payload an update may have.
    pub max_payload_bytes: u64,
}

/// Everything a round prescribes to each of its devices (a task without its per-device
/// id and nonce), fixed when the round opens and stored on the round. Values are at wire
/// precision, so the task built from it means exactly what its message says.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundPlan {
    /// The round, its base version and deadline.
    pub frame: RoundFrame,
    /// LoRA layout (the `A` factors' hash is the frame's).
    pub lora: LoraSpec,
    /// Local training: the configuration's, the strategy's FedProx μ, the round's seed
    /// (`training.seed` XOR the round number).
    pub training: TrainingSpec,
    /// Clip norm (the strategy's, else `privacy.clip-norm`) and local noise.
    pub privacy: PrivacySpec,
}

impl RoundPlan {
    /// The task of one device: this plan with its task id and nonce.
    pub fn task(&self, task_id: [u8; 16], nonce: [u8; 32]) -> Task {
        let f = &self.frame;
        Task {
            round_id: f.round_id,
            task_id,
            nonce,
            base_version: f.base_version,
            base_manifest_hash: f.base_manifest_hash,
            lora: self.lora.clone(),
            training: self.training.clone(),
            privacy: self.privacy,
            deadline_unix_ms: f.deadline_ms,
            max_payload_bytes: f.max_payload_bytes,
        }
    }

    /// Examples behind every update: steps × batch size. The aggregation weight of every
    /// update of the round, whatever a device declares.
    pub fn examples_per_update(&self) -> u64 {
        self.training.examples()
    }
}

/// The round policy of one configuration.
#[derive(Debug, Clone, Copy)]
pub struct RoundPolicy<'a> {
    config: &'a CoordinatorConfig,
}

/// A value at `f32` precision (what the wire carries), as `f64`.
fn wire(v: f64) -> f64 {
    f64::from(v as f32)
}

impl<'a> RoundPolicy<'a> {
    /// The policy of `config`.
    pub fn new(config: &'a CoordinatorConfig) -> Self {
        Self { config }
    }

    /// How a round samples from `eligible` devices: N = max(`privacy.population`,
    /// eligible) and q·N = the configured cohort; refused below `min-available` (or
    /// `min-updates`), and when the declared population is below the eligible devices.
    /// Eligible: online (enrolled, not revoked, seen within the eligibility window) and
    /// within the participation limits.
    pub fn sampling(&self, eligible: usize) -> std::result::Result<Sampling, NoRound> {
        self.sampling_among(eligible, eligible)
    }

    /// [`RoundPolicy::sampling`] when the participation limits leave `eligible` of the
    /// `online` devices: `min-available` counts the devices online (a fleet is up), the
    /// rest counts the eligible.
    pub fn sampling_among(&self, online: usize, eligible: usize) -> std::result::Result<Sampling, NoRound> {
        let rounds = &self.config.rounds;
        if online < rounds.min_available || eligible < rounds.min_updates.max(1) {
            return Err(NoRound::NotEnoughDevices { eligible });
        }
        let configured = self.config.privacy.population;
        if configured > 0 && configured < eligible {
            return Err(NoRound::PopulationTooSmall { population: configured, eligible });
        }
        let population = configured.max(eligible);
        Ok(Sampling { population, expected: self.config.cohort_size(population).max(1) })
    }

    /// Refuse a round when δ is not below 1 / `enrolled` (with any noise configured), or
    /// when it could take ε past `privacy.target-epsilon`, given the events composed so far
    /// and the most contributions any device has made (`max_contributions`).
    pub fn within_budget(
        &self,
        events: &[PrivacyRecord],
        sampling: &Sampling,
        enrolled: usize,
        max_contributions: u64,
    ) -> Result<Option<NoRound>> {
        let privacy = &self.config.privacy;
        let noisy = privacy.central.is_some() || privacy.local_noise_multiplier > 0.0;
        if noisy && enrolled > 0 && privacy.delta >= 1.0 / enrolled as f64 {
            return Ok(Some(NoRound::DeltaTooLarge { delta: privacy.delta, devices: enrolled }));
        }
        let Some(target) = privacy.target_epsilon else { return Ok(None) };
        let epsilon = privacy_spent(self.config, events, max_contributions)?.epsilon;
        let mut next = events.to_vec();
        next.push(self.next_record(sampling));
        let next = privacy_spent(self.config, &next, max_contributions + 1)?.epsilon;
        Ok((next > target).then_some(NoRound::BudgetReached { epsilon, next }))
    }

    /// What the next round will record if it publishes (as [`RoundPolicy::privacy_event`]).
    fn next_record(&self, sampling: &Sampling) -> PrivacyRecord {
        let privacy = &self.config.privacy;
        match privacy.effective_central() {
            Some(c) if c.mechanism == Mechanism::DpFtrl => {
                PrivacyRecord { q: 1.0, z: c.noise_multiplier, tree_period: c.tree_period }
            }
            Some(c) => PrivacyRecord::sampled(sampling.rate(), c.noise_multiplier),
            None => PrivacyRecord::sampled(sampling.rate(), privacy.local_noise_multiplier),
        }
    }

    /// The cohort of round `round_id`: the indices of the `eligible` devices (in the
    /// caller's order) sampled, each independently with probability q. Drawn from the OS
    /// CSPRNG, or, in simulations (`rounds.seed`), from a ChaCha20 stream keyed by the
    /// seed and the round.
    pub fn cohort(&self, round_id: u64, eligible: usize, sampling: &Sampling) -> Result<Vec<usize>> {
        let mut rng = match self.config.rounds.seed {
            Some(seed) => {
                let mut key = [0u8; 32];
                key[..8].copy_from_slice(&seed.to_be_bytes());
                key[8..16].copy_from_slice(&round_id.to_be_bytes());
                SecureRng::from_seed(key)
            }
            None => SecureRng::from_os()?,
        };
        Ok(covey_privacy::sampling::poisson(eligible, sampling.rate(), &mut rng)?)
    }

    /// The round's plan: LoRA and training from the configuration, the round's seed
    /// (`training.seed` XOR the round number), the clip norm and FedProx μ the strategy
    /// asks for this round (else `privacy.clip-norm`), the local noise.
    pub fn plan(&self, frame: &RoundFrame, sampling: &Sampling, strategy: &mut dyn Strategy) -> RoundPlan {
        let c = self.config;
        let asked = strategy.configure_round(&sampling.context(frame.round_id));
        RoundPlan {
            frame: *frame,
            lora: LoraSpec {
                rank: c.lora.rank,
                alpha: f64::from(c.lora.alpha),
                targets: c.lora.lora_targets(),
                a_factors_sha256: frame.a_factors_sha256,
            },
            training: TrainingSpec {
                steps: c.training.steps as usize,
                batch_size: c.training.batch_size as usize,
                seq_len: c.training.seq_len as usize,
                learning_rate: f64::from(c.training.learning_rate),
                proximal_mu: wire(asked.proximal_mu),
                seed: c.training.seed ^ frame.round_id,
                update_encoding: c.training.update_encoding,
            },
            privacy: PrivacySpec {
                clip_norm: asked.clip_norm.unwrap_or(c.privacy.clip_norm),
                noise_multiplier: c.privacy.local_noise_multiplier,
            },
        }
    }

    /// What a published round spends: the strategy's release (central DP), else, under
    /// local noise, each device's own Gaussian release at the round's sampling rate;
    /// nothing without noise.
    pub fn privacy_event(
        &self,
        plan: &RoundPlan,
        sampling: &Sampling,
        released: Option<&PrivacyEvent>,
    ) -> Option<PrivacyRecord> {
        let tree_period = match self.config.privacy.effective_central() {
            Some(c) if c.mechanism == Mechanism::DpFtrl => c.tree_period,
            _ => None,
        };
        match released {
            Some(e) => Some(PrivacyRecord { q: e.sampling_rate, z: e.noise_multiplier, tree_period }),
            None if plan.privacy.noise_multiplier > 0.0 => {
                Some(PrivacyRecord::sampled(sampling.rate(), plan.privacy.noise_multiplier))
            }
            None => None,
        }
    }
}

/// The largest L2 norm of an update the coordinator accepts for `plan`, whose `B` has
/// `values` coordinates (`None`: no clip norm, no bound): the clip norm times
/// `limits.norm-slack`, plus room for the task's local noise of std z·C per value.
pub fn update_norm_bound(config: &CoordinatorConfig, plan: &RoundPlan, values: usize) -> Option<f64> {
    let (clip_norm, z) = (plan.privacy.clip_norm, plan.privacy.noise_multiplier);
    (clip_norm > 0.0).then(|| {
        // Local noise of std z·C per value has norm about z·C·√d; allow a wide margin.
        let noise = z * (values as f64).sqrt() + 5.0 * z;
        clip_norm * (config.limits.norm_slack + noise) * (1.0 + 1e-6)
    })
}

/// The privacy report of a run: ε spent by `events` at `privacy.delta` under
/// `privacy.accountant`, with the mechanism, what the guarantee assumes and the
/// participation bound. `max_contributions` is the most contributions any device has made
/// so far (DP-FTRL's ε grows with it; ignored otherwise).
///
/// Subsampled releases (DP-FedAvg, local noise) compose as Poisson-subsampled Gaussians.
/// DP-FTRL releases are one Gaussian mechanism of squared sensitivity `k · depth(period)`
/// over the whole run, `k` the contributions per device (so far, and at the configured
/// bound for `epsilon_bound`). A run with both (a mechanism changed mid-run) adds the two
/// ε, each at δ/2.
pub fn privacy_spent(
    config: &CoordinatorConfig,
    events: &[PrivacyRecord],
    max_contributions: u64,
) -> Result<PrivacySpent> {
    let privacy = &config.privacy;
    let delta = privacy.delta;
    let accountant = privacy.accountant;
    let limits = privacy.participation;
    let mechanism = match (privacy.mechanism(), privacy.local_noise_multiplier > 0.0) {
        (Some(m), _) => m.name(),
        (None, true) => "local-gaussian",
        (None, false) => "none",
    };
    let assumption = match mechanism {
        "dp-ftrl" => "participation-limits",
        "none" => "none",
        _ => "poisson-sampling",
    };
    let mut report = PrivacySpent {
        epsilon: 0.0,
        delta,
        accountant: "none".into(),
        rounds: events.len() as u64,
        mechanism: mechanism.into(),
        assumption: assumption.into(),
        max_participations: limits.max_participations,
        min_separation: limits.min_separation,
        epsilon_bound: None,
    };
    let sampled: Vec<(f64, f64)> =
        events.iter().filter(|e| e.tree_period.is_none()).map(|e| (e.q.clamp(0.0, 1.0), e.z)).collect();
    let tree: Vec<&PrivacyRecord> = events.iter().filter(|e| e.tree_period.is_some()).collect();
    let split = if !sampled.is_empty() && !tree.is_empty() { 2.0 } else { 1.0 };
    if !sampled.is_empty() {
        report.epsilon += accountant.epsilon_of_rounds(&sampled, delta / split)?;
    }
    let ftrl_bound = match privacy.effective_central() {
        Some(c) if c.mechanism == Mechanism::DpFtrl => {
            Some((c.noise_multiplier, c.tree_period.unwrap_or(limits.min_separation).max(1)))
        }
        _ => None,
    };
    // The contributions DP-FTRL's accountant may count: at most one per tree, at most
    // max-participations.
    let cap = |k: u64| if limits.max_participations > 0 { k.min(limits.max_participations) } else { k };
    if !tree.is_empty() {
        // Conservative over releases made with other settings: the smallest z, the deepest tree.
        let z = tree.iter().map(|e| e.z).fold(f64::INFINITY, f64::min);
        let period = tree.iter().filter_map(|e| e.tree_period).max().unwrap_or(1);
        let k = cap(max_contributions.min(tree.len() as u64)).max(1);
        let s2 = k as f64 * f64::from(covey_privacy::tree::depth(period));
        report.epsilon += accountant.epsilon_without_sampling(z, s2, delta / split)?;
    }
    if let Some((z, period)) = ftrl_bound {
        // With max-rounds, a device can contribute to at most that many trees.
        let max_rounds = config.rounds.max_rounds;
        let trees = (max_rounds > 0).then(|| max_rounds.div_ceil(period));
        let k = match (limits.max_participations, trees) {
            (0, None) => None,
            (0, Some(t)) => Some(t),
            (m, Some(t)) => Some(m.min(t)),
            (m, None) => Some(m),
        };
        if let Some(k) = k {
            let s2 = k as f64 * f64::from(covey_privacy::tree::depth(period));
            report.epsilon_bound = Some(accountant.epsilon_without_sampling(z, s2, delta)?);
        }
    }
    if !events.is_empty() {
        report.accountant = accountant.manifest_name().into();
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> CoordinatorConfig {
        let mut c = CoordinatorConfig::default();
        c.rounds.target_updates = 4;
        c.rounds.min_updates = 2;
        c.rounds.min_available = 2;
        c.rounds.over_selection = 0.0;
        c.rounds.seed = Some(7);
        c.training.seed = 100;
        c
    }

    fn frame(round_id: u64) -> RoundFrame {
        RoundFrame {
            round_id,
            base_version: 3,
            base_manifest_hash: [1; 32],
            a_factors_sha256: [2; 32],
            deadline_ms: 9,
            max_payload_bytes: 1 << 20,
        }
    }

    #[test]
    fn sampling_follows_the_population_and_refuses_an_understated_one() {
        let mut c = config();
        let p = RoundPolicy::new(&c);
        assert_eq!(p.sampling(1), Err(NoRound::NotEnoughDevices { eligible: 1 }));
        assert_eq!(p.sampling(20), Ok(Sampling { population: 20, expected: 4 }));
        c.privacy.population = 10;
        let p = RoundPolicy::new(&c);
        assert_eq!(p.sampling(12), Err(NoRound::PopulationTooSmall { population: 10, eligible: 12 }));
        assert_eq!(p.sampling(5).map(|s| s.rate()), Ok(0.4));
    }

    #[test]
    fn a_seeded_cohort_depends_on_the_seed_and_the_round_only() {
        let c = config();
        let p = RoundPolicy::new(&c);
        let s = p.sampling(50).expect("sampling");
        let a = p.cohort(1, 50, &s).expect("cohort");
        assert_eq!(a, p.cohort(1, 50, &s).expect("cohort"));
        assert_ne!(a, p.cohort(2, 50, &s).expect("cohort"));
        assert!(a.windows(2).all(|w| w[0] < w[1]) && a.iter().all(|&i| i < 50));
    }

    #[test]
    fn the_plan_takes_the_strategys_clip_and_mu_at_wire_precision() {
        let mut c = config();
        c.strategy = covey_strategy::StrategyConfig::default();
        c.privacy.clip_norm = 0.75;
        let p = RoundPolicy::new(&c);
        let s = p.sampling(10).expect("sampling");
        let mut strategy =
            covey_strategy::build(&c.strategy, None, covey_strategy::Randomness::Seeded([0; 32])).expect("strategy");
        let plan = p.plan(&frame(5), &s, &mut *strategy);
        assert_eq!((plan.privacy.clip_norm, plan.training.seed, plan.examples_per_update()), (0.75, 100 ^ 5, 20 * 8));
        let task = plan.task([4; 16], [5; 32]);
        let message = task.to_message(&[0; 64]);
        assert_eq!(Task::try_from(&message).expect("valid"), task, "the task means what its message says");
    }

    #[test]
    fn local_noise_is_accounted_at_the_sampling_rate_and_no_noise_spends_nothing() {
        let mut c = config();
        let s = Sampling { population: 20, expected: 4 };
        let mut strategy =
            covey_strategy::build(&c.strategy, None, covey_strategy::Randomness::Seeded([0; 32])).expect("strategy");
        let plan = RoundPolicy::new(&c).plan(&frame(1), &s, &mut *strategy);
        assert_eq!(RoundPolicy::new(&c).privacy_event(&plan, &s, None), None);
        c.privacy.clip_norm = 1.0;
        c.privacy.local_noise_multiplier = 1.5;
        let plan = RoundPolicy::new(&c).plan(&frame(1), &s, &mut *strategy);
        let event = RoundPolicy::new(&c).privacy_event(&plan, &s, None);
        assert_eq!(event, Some(PrivacyRecord::sampled(0.2, 1.5)));
        let none = privacy_spent(&c, &[], 0).expect("none");
        assert_eq!((none.epsilon, none.accountant.as_str()), (0.0, "none"));
        assert_eq!((none.mechanism.as_str(), none.assumption.as_str()), ("local-gaussian", "poisson-sampling"));
        let one = [PrivacyRecord::sampled(0.2, 1.5)];
        let rdp = privacy_spent(&c, &one, 1).expect("spent");
        c.privacy.accountant = covey_privacy::Accountant::Pld;
        let pld = privacy_spent(&c, &one, 1).expect("spent");
        assert!(rdp.epsilon > pld.epsilon && pld.epsilon > 0.0, "{} vs {}", rdp.epsilon, pld.epsilon);
        assert_eq!(
            (rdp.accountant.as_str(), pld.accountant.as_str()),
            ("rdp-subsampled-gaussian", "pld-subsampled-gaussian")
        );
    }

    /// DP-FTRL: ε grows with the most contributions of any device (at most
    /// max-participations), not with the rounds; its bound is the configured limit's ε.
    #[test]
    fn dp_ftrl_is_accounted_from_the_participation_bound_without_sampling() {
        let mut c = config();
        c.privacy.central = Some(covey_strategy::DpConfig::ftrl(2.0, 1.0, 8));
        c.privacy.participation = crate::config::ParticipationLimits { min_separation: 8, max_participations: 3 };
        let s = Sampling { population: 1000, expected: 10 };
        let event = RoundPolicy::new(&c).next_record(&s);
        assert_eq!(event, PrivacyRecord { q: 1.0, z: 2.0, tree_period: Some(8) });
        let rounds = vec![event; 40];
        let depth = f64::from(covey_privacy::tree::depth(8));
        let at = |k: u64| c.privacy.accountant.epsilon_without_sampling(2.0, k as f64 * depth, 1e-5).expect("eps");
        let one = privacy_spent(&c, &rounds, 1).expect("report");
        assert_eq!(one.epsilon, at(1));
        assert_eq!((one.mechanism.as_str(), one.assumption.as_str()), ("dp-ftrl", "participation-limits"));
        assert_eq!((one.max_participations, one.min_separation), (3, 8));
        assert_eq!(one.epsilon_bound, Some(at(3)));
        // More contributions than the limit allows can not have happened; the report is capped.
        assert_eq!(privacy_spent(&c, &rounds, 9).expect("report").epsilon, at(3));
        // Without max-participations, max-rounds bounds the trees a device meets.
        c.privacy.participation.max_participations = 0;
        c.rounds.max_rounds = 20;
        assert_eq!(privacy_spent(&c, &rounds, 1).expect("report").epsilon_bound, Some(at(3)));
        // Budget: a target between ε(2) and ε(3) stops the round that could make it 3.
        c.privacy.target_epsilon = Some(0.5 * (at(2) + at(3)));
        let p = RoundPolicy::new(&c);
        assert_eq!(p.within_budget(&rounds, &s, 1000, 1).expect("budget"), None);
        assert!(matches!(p.within_budget(&rounds, &s, 1000, 2).expect("budget"), Some(NoRound::BudgetReached { .. })));
        // δ must be below 1 / enrolled devices.
        assert_eq!(p.within_budget(&rounds, &s, 99_999, 0).expect("budget"), None);
        assert!(matches!(
            p.within_budget(&rounds, &s, 100_000, 0).expect("budget"),
            Some(NoRound::DeltaTooLarge { devices: 100_000, .. })
        ));
    }
}
