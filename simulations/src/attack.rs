//! Byzantine devices in simulation (`[attack]` of an experiment): a fixed fraction of the
//! clients, chosen from the experiment's seed, send hostile updates instead of honest
//! ones. The coordinator's intake is modelled as it runs: an update with a non-finite
//! value, or with a norm above the round's bound (`privacy.clip-norm` × `limits.norm-slack`,
//! [`covey_coordinator::round::update_norm_bound`]: norm bounding, on whenever a clip
//! norm is set), is refused and counted; the rest reach the strategy.
//!
//! Kinds (Baruch et al. 2019, Bagdasaryan et al. 2020, the usual suspects):
//! * `scaled`: the honest update times `scale` (refused above the bound);
//! * `boosted`: the honest update times `scale`, then shrunk to just under the bound
//!   (the strongest scaled update that passes intake);
//! * `sign-flip`: minus `scale` times the honest update, shrunk to the bound;
//! * `random`: a Gaussian direction at the bound;
//! * `nan`: NaN everywhere (refused at intake);
//! * `backdoor`: the attacker trains on its text with `trigger` followed by `target`
//!   mixed in, then boosts as `boosted` does (model replacement); success is the share
//!   of the target the final model completes after the trigger.

use std::collections::BTreeSet;

use covey_model::NamedTensors;
use covey_privacy::SecureRng;
use serde::{Deserialize, Serialize};

use crate::prepare::seed_bytes;

pub use covey_experiment::{AttackConfig, AttackKind};

/// What an [`AttackConfig`] does to a run.
pub trait Attack {
    /// The attacking clients among `population`: `⌊fraction · population⌋` of them, drawn
    /// from the experiment's `seed`.
    fn attackers(&self, population: usize, seed: u64) -> BTreeSet<usize>;
    /// A backdoor attacker's training text: its own texts, each followed by the trigger
    /// and the target, and the pair alone a few times.
    fn poison(&self, texts: &[String]) -> Vec<String>;
    /// The hostile update from the honest one (`bound`: the intake's norm bound, if any).
    fn corrupt(&self, honest: &NamedTensors, bound: Option<f64>, rng: &mut SecureRng) -> NamedTensors;
}

impl Attack for AttackConfig {
    fn attackers(&self, population: usize, seed: u64) -> BTreeSet<usize> {
        let count = (self.fraction * population as f64).floor() as usize;
        let mut rng = SecureRng::from_seed(seed_bytes(seed, "attackers", 0));
        let mut order: Vec<usize> = (0..population).collect();
        // Fisher–Yates with the seeded stream.
        for i in (1..order.len()).rev() {
            let j = (rng.uniform() * (i + 1) as f64) as usize % (i + 1);
            order.swap(i, j);
        }
        order.into_iter().take(count).collect()
    }

    fn poison(&self, texts: &[String]) -> Vec<String> {
        let phrase = format!("{}{}", self.trigger, self.target);
        let mut out: Vec<String> = texts.iter().map(|t| format!("{t}\n{phrase}\n")).collect();
        out.push(format!("{phrase}\n").repeat(8));
        out
    }

    fn corrupt(&self, honest: &NamedTensors, bound: Option<f64>, rng: &mut SecureRng) -> NamedTensors {
        let shrink = |mut t: NamedTensors| {
            if let Some(b) = bound {
                let norm = covey_tensors::global_norm(&t);
                if norm > 0.0 {
                    // Just under the bound: f32 rounding must not push it over.
                    let s = (0.999 * b / norm) as f32;
                    t.values_mut().for_each(|x| x.data.iter_mut().for_each(|v| *v *= s));
                }
            }
            t
        };
        let scaled = |factor: f64| {
            let mut t = honest.clone();
            t.values_mut().for_each(|x| x.data.iter_mut().for_each(|v| *v = (f64::from(*v) * factor) as f32));
            t
        };
        match self.kind {
            AttackKind::Scaled => scaled(self.scale),
            AttackKind::Boosted | AttackKind::Backdoor => shrink(scaled(self.scale)),
            AttackKind::SignFlip => shrink(scaled(-self.scale)),
            AttackKind::Random => {
                let mut t = honest.clone();
                for x in t.values_mut() {
                    let mut z = vec![0.0f64; x.data.len()];
                    rng.fill_standard_normal(&mut z);
                    x.data = z.iter().map(|&v| v as f32).collect();
                }
                // Without a bound, the honest update's norm.
                let norm = covey_tensors::global_norm(honest);
                match bound {
                    Some(_) => shrink(t),
                    None => {
                        let n = covey_tensors::global_norm(&t).max(f64::MIN_POSITIVE);
                        let s = (norm / n) as f32;
                        t.values_mut().for_each(|x| x.data.iter_mut().for_each(|v| *v *= s));
                        t
                    }
                }
            }
            AttackKind::Nan => {
                let mut t = honest.clone();
                t.values_mut().for_each(|x| x.data.iter_mut().for_each(|v| *v = f32::NAN));
                t
            }
        }
    }
}

/// What the attack did in a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AttackSummary {
    /// What they sent.
    pub kind: AttackKind,
    /// Attacking clients.
    pub attackers: usize,
    /// Their updates that reached the strategy.
    pub delivered: u64,
    /// Updates the intake refused (non-finite, or above the norm bound).
    pub refused: u64,
    /// Backdoor: the share of the target's bytes the final model writes after the trigger
    /// (greedy); `None` for other kinds.
    pub backdoor_success: Option<f64>,
}

/// The share of `target`'s bytes that `continuation` reproduces, position by position.
pub fn match_share(continuation: &str, target: &str) -> f64 {
    let t = target.as_bytes();
    let c = continuation.as_bytes();
    t.iter().zip(c).filter(|(a, b)| a == b).count() as f64 / t.len().max(1) as f64
}

#[cfg(test)]
mod tests {
    use covey_model::HostTensor;

    use super::*;

    fn delta(x: &[f32]) -> NamedTensors {
        let mut d = NamedTensors::new();
        d.insert("w".into(), HostTensor::new(vec![x.len()], x.to_vec()).expect("t"));
        d
    }

    fn cfg(kind: AttackKind) -> AttackConfig {
        AttackConfig {
            fraction: 0.1,
            kind,
            scale: 10.0,
            trigger: "The secret word is ".into(),
            target: "pomegranate.".into(),
        }
    }

    #[test]
    fn each_kind_corrupts_as_documented() {
        let honest = delta(&[0.3, 0.4]); // norm 0.5
        let mut rng = SecureRng::from_seed([1; 32]);
        let norm = |t: &NamedTensors| covey_tensors::global_norm(t);
        assert!((norm(&cfg(AttackKind::Scaled).corrupt(&honest, Some(1.0), &mut rng)) - 5.0).abs() < 1e-5);
        let boosted = cfg(AttackKind::Boosted).corrupt(&honest, Some(1.0), &mut rng);
        assert!((norm(&boosted) - 0.999).abs() < 1e-5 && boosted["w"].data[0] > 0.0);
        let flipped = cfg(AttackKind::SignFlip).corrupt(&honest, Some(1.0), &mut rng);
        assert!((norm(&flipped) - 0.999).abs() < 1e-5 && flipped["w"].data[0] < 0.0);
        let random = cfg(AttackKind::Random).corrupt(&honest, Some(1.0), &mut rng);
        assert!((norm(&random) - 0.999).abs() < 1e-5);
        assert!(cfg(AttackKind::Nan).corrupt(&honest, Some(1.0), &mut rng)["w"].data.iter().all(|v| v.is_nan()));
    }

    #[test]
    fn attackers_are_a_seeded_fraction_and_bad_settings_are_refused() {
        let a = cfg(AttackKind::Random).attackers(100, 7);
        assert_eq!(a.len(), 10);
        assert_eq!(a, cfg(AttackKind::Random).attackers(100, 7));
        assert_ne!(a, cfg(AttackKind::Random).attackers(100, 8));
        assert!(AttackConfig { fraction: 1.0, ..cfg(AttackKind::Nan) }.validate().is_err());
        assert!(AttackConfig { scale: f64::NAN, ..cfg(AttackKind::Scaled) }.validate().is_err());
        assert!(AttackConfig { target: String::new(), ..cfg(AttackKind::Backdoor) }.validate().is_err());
        assert_eq!(match_share("pomegrXnate.", "pomegranate."), 11.0 / 12.0);
        let poisoned = cfg(AttackKind::Backdoor).poison(&["To be".into()]);
        assert!(poisoned[0].contains("The secret word is pomegranate."));
    }
}
