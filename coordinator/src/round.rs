//! The round policy, pure: no I/O, no transport, no clock. Given the configuration, the
//! number of eligible devices and the strategy, it decides how the cohort is sampled,
//! what every device's task is, and, given the aggregate, what the round spends in
//! privacy. The coordinator's engine and `covey-sim`'s in-process runner both call it,
//! so a simulated round and a served round are the same round.
//!
//! A round's parameters are fixed when it opens ([`RoundPolicy::plan`]) and stored on its
//! record: a poll or an upload compares against the plan, and the strategy is consulted
//! once per round, not per request.

use covey_privacy::{Accountant, SecureRng};
use covey_proto::manifest::PrivacySpent;
use covey_proto::task::{LoraSpec, PrivacySpec, Task, TrainingSpec};
use covey_strategy::{PrivacyEvent, RoundContext, Strategy};
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
    /// Sampling rate.
    pub q: f64,
    /// Noise multiplier.
    pub z: f64,
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
    pub fn sampling(&self, eligible: usize) -> std::result::Result<Sampling, NoRound> {
        let rounds = &self.config.rounds;
        if eligible < rounds.min_available.max(rounds.min_updates) {
            return Err(NoRound::NotEnoughDevices { eligible });
        }
        let configured = self.config.privacy.population;
        if configured > 0 && configured < eligible {
            return Err(NoRound::PopulationTooSmall { population: configured, eligible });
        }
        let population = configured.max(eligible);
        Ok(Sampling { population, expected: self.config.cohort_size(population).max(1) })
    }

    /// Refuse a round that would take ε past `privacy.target-epsilon`, given the events
    /// composed so far.
    pub fn within_budget(&self, events: &[PrivacyRecord], sampling: &Sampling) -> Result<Option<NoRound>> {
        let Some(target) = self.config.privacy.target_epsilon else { return Ok(None) };
        let privacy = &self.config.privacy;
        let z = privacy.central.as_ref().map_or(privacy.local_noise_multiplier, |c| c.noise_multiplier);
        let epsilon = privacy_spent(privacy.accountant, events, privacy.delta)?.epsilon;
        let mut next = events.to_vec();
        next.push(PrivacyRecord { q: sampling.rate(), z });
        let next = privacy_spent(privacy.accountant, &next, privacy.delta)?.epsilon;
        Ok((next > target).then_some(NoRound::BudgetReached { epsilon, next }))
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
        match released {
            Some(e) => Some(PrivacyRecord { q: e.sampling_rate, z: e.noise_multiplier }),
            None if plan.privacy.noise_multiplier > 0.0 => {
                Some(PrivacyRecord { q: sampling.rate(), z: plan.privacy.noise_multiplier })
            }
            None => None,
        }
    }
}

/// ε spent by `events` at `delta` under `accountant` (each event one round of the
/// subsampled Gaussian; composition commutes); nothing spent without events.
pub fn privacy_spent(accountant: Accountant, events: &[PrivacyRecord], delta: f64) -> Result<PrivacySpent> {
    if events.is_empty() {
        return Ok(PrivacySpent { epsilon: 0.0, delta, accountant: "none".into(), rounds: 0 });
    }
    let rounds: Vec<(f64, f64)> = events.iter().map(|e| (e.q.clamp(0.0, 1.0), e.z)).collect();
    let epsilon = accountant.epsilon_of_rounds(&rounds, delta)?;
    Ok(PrivacySpent { epsilon, delta, accountant: accountant.manifest_name().into(), rounds: events.len() as u64 })
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
        let mut strategy = covey_strategy::build(&c.strategy, None, SecureRng::from_seed([0; 32])).expect("strategy");
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
        let mut strategy = covey_strategy::build(&c.strategy, None, SecureRng::from_seed([0; 32])).expect("strategy");
        let plan = RoundPolicy::new(&c).plan(&frame(1), &s, &mut *strategy);
        assert_eq!(RoundPolicy::new(&c).privacy_event(&plan, &s, None), None);
        c.privacy.clip_norm = 1.0;
        c.privacy.local_noise_multiplier = 1.5;
        let plan = RoundPolicy::new(&c).plan(&frame(1), &s, &mut *strategy);
        let event = RoundPolicy::new(&c).privacy_event(&plan, &s, None);
        assert_eq!(event, Some(PrivacyRecord { q: 0.2, z: 1.5 }));
        assert_eq!(privacy_spent(Accountant::Rdp, &[], 1e-5).expect("none").epsilon, 0.0);
        let one = [PrivacyRecord { q: 0.2, z: 1.5 }];
        let rdp = privacy_spent(Accountant::Rdp, &one, 1e-5).expect("spent");
        let pld = privacy_spent(Accountant::Pld, &one, 1e-5).expect("spent");
        assert!(rdp.epsilon > pld.epsilon && pld.epsilon > 0.0, "{} vs {}", rdp.epsilon, pld.epsilon);
        assert_eq!(
            (rdp.accountant.as_str(), pld.accountant.as_str()),
            ("rdp-subsampled-gaussian", "pld-subsampled-gaussian")
        );
    }
}
